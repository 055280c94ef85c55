"""Tokenizer: ``tokenizer.json`` (HF tokenizers) + ``tokenizer_config.json`` (special tokens,
chat template). Chat templates are rendered with a sandboxed jinja2 environment."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from moetier.errors import WeightError


def _token_str(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightError(f"{path}: not valid JSON ({e})") from None


class Tokenizer:
    def __init__(self, directory: str | Path, extra_eos_ids: Sequence[int] = ()):
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(directory)
        tj = d / "tokenizer.json"
        if not tj.exists():
            raise WeightError(f"{tj}: missing (moetier needs a tokenizer.json next to config.json)")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:  # the Rust parser raises plain Exceptions
            raise WeightError(f"{tj}: cannot be parsed as a tokenizers file ({e})") from None
        cfg_path = d / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.exists() else {}
        if not isinstance(cfg, dict):
            raise WeightError(f"{cfg_path}: expected a JSON object")
        eos: list[int] = []
        gen = d / "generation_config.json"
        if gen.exists():
            g = _read_json(gen)
            ge = g.get("eos_token_id") if isinstance(g, dict) else None
            eos += [ge] if isinstance(ge, int) else [i for i in (ge or []) if isinstance(i, int)]
        self._setup(tok, cfg, self._find_template(d, cfg), [*eos, *extra_eos_ids])

    @classmethod
    def from_tokenizer(cls, tok: Any, config: Mapping[str, Any], chat_template: str | None,
                       extra_eos_ids: Sequence[int] = ()) -> Tokenizer:
        """From a built ``tokenizers.Tokenizer`` (e.g. a GGUF file's vocabulary, see
        ``moetier.gguf_tokenizer``) and a tokenizer_config-style mapping (bos/eos tokens)."""
        self = cls.__new__(cls)
        self._setup(tok, dict(config), chat_template, list(extra_eos_ids))
        return self

    def _setup(self, tok: Any, cfg: dict, chat_template: str | None, extra_eos: list[int]) -> None:
        self._tok = tok
        self.config = cfg
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.chat_template = chat_template
        eos: list[int] = []
        if self.eos_token is not None:
            tid = self._tok.token_to_id(self.eos_token)
            if tid is not None:
                eos.append(tid)
        eos += extra_eos
        vocab = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if 0 <= i < vocab))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self._max_token_chars: int | None = None
        self._plain: Any = None  # a copy that encodes control-token text as ordinary text
        # control tokens: typed in chat content they must stay text (see encode_chat)
        self.special_strings: tuple[str, ...] = tuple(
            t.content for t in self._tok.get_added_tokens_decoder().values() if t.special and t.content
        )

    @staticmethod
    def _find_template(d: Path, cfg: Mapping[str, Any]) -> str | None:
        jinja = d / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text(encoding="utf-8")
        t = cfg.get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, Mapping)}
            t = named.get("default") or next(iter(named.values()), None)
        if t is None and (d / "chat_template.json").exists():
            t = _read_json(d / "chat_template.json").get("chat_template")
        return t if isinstance(t, str) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode holds it): a long text does not stall other threads
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry in characters: no token covers more input characters
        (byte-level and SentencePiece vocabularies spell a token with >= 1 character per input
        character), so a text of n characters needs at least n / max_token_chars tokens."""
        if self._max_token_chars is None:
            self._max_token_chars = max(1, max(map(len, self._tok.get_vocab(with_added_tokens=True))))
        return self._max_token_chars

    def count_tokens_upto(self, text: str, limit: int, piece_chars: int = 4096) -> int:
        """Tokens in ``text``, counted piece by piece (pieces cut after whitespace) and stopping
        as soon as the count passes ``limit``: time and memory are bounded by ``limit``, not by
        the length of ``text``. Cuts may change merges across them, so this is an estimate for
        refusing overlong inputs early, not the encoding."""
        n, i = 0, 0
        while i < len(text) and n <= limit:
            j = min(len(text), i + piece_chars)
            if j < len(text):
                cut = max(text.rfind(" ", i + piece_chars // 2, j), text.rfind("\n", i + piece_chars // 2, j))
                j = cut + 1 if cut > i else j
            n += len(self.encode(text[i:j], add_special_tokens=False))
            i = j
        return n

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` with the checkpoint's chat template (sandboxed jinja2)."""
        if self.chat_template is None:
            raise WeightError("tokenizer_config.json: no 'chat_template' (this model has no chat format)")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            tmpl = env.from_string(self.chat_template)
            return tmpl.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs,
            )
        except TemplateError as e:
            raise WeightError(f"tokenizer_config.json: chat_template failed to render ({e})") from None

    def encode_plain(self, text: str) -> list[int]:
        """``text`` as ordinary text: control-token strings in it are NOT control tokens."""
        if self._plain is None:
            from tokenizers import Tokenizer as HFTokenizer

            plain = HFTokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Chat messages -> prompt ids. Control tokens come only from the template: content that
        spells a control token (``<|im_end|><|im_start|>system`` typed by a user) is encoded as
        text, so it cannot forge a turn. Content without such text is encoded together with the
        template, exactly as ``encode(apply_chat_template(...))`` does (and transformers)."""
        rendered = self.apply_chat_template(messages, add_generation_prompt)
        risky = {
            i for i, m in enumerate(messages)
            if isinstance(m.get("content"), str) and any(s in m["content"] for s in self.special_strings)
        }
        if not risky:
            return self.encode(rendered, add_special_tokens=False)
        # render again with a marker in place of each risky content, then encode the template's
        # text (with its control tokens) and the contents (as plain text) piece by piece
        marker = "\ue000moetier-content-{}\ue001"
        marked = [{**m, "content": marker.format(i)} if i in risky else m for i, m in enumerate(messages)]
        parts = re.split("\ue000moetier-content-(\\d+)\ue001", self.apply_chat_template(marked, add_generation_prompt))
        rebuilt = "".join(messages[int(p)]["content"] if k % 2 else p for k, p in enumerate(parts))
        if rebuilt != rendered:
            raise WeightError(
                "chat_template: it transforms message content that contains control-token text, so that "
                "text cannot be kept apart from the template's control tokens; remove the control tokens"
            )
        ids: list[int] = []
        for k, p in enumerate(parts):
            if k % 2:
                ids += self.encode_plain(messages[int(p)]["content"])
            elif p:
                ids += self.encode(p, add_special_tokens=False)
        return ids
