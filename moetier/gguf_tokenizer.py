"""The tokenizer and chat template stored in a GGUF file, as a :class:`moetier.tokenizer.Tokenizer`.

GGUF keeps the vocabulary as metadata (``tokenizer.ggml.*``, written by llama.cpp's
``convert_hf_to_gguf.py``): ``model`` (``gpt2`` = byte-level BPE, ``llama`` = SentencePiece),
``tokens``, ``token_type`` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte),
``merges`` (BPE), ``scores`` (SentencePiece), ``pre`` (the BPE pre-tokenizer's name), the
special token ids and ``add_bos_token``; ``tokenizer.chat_template`` is the jinja template.
This module builds the equivalent ``tokenizers`` pipeline:

* ``gpt2``: BPE over byte-level symbols; the pre-tokenizer split named by ``pre`` uses the
  original regexes of the HF tokenizers those names stand for (llama.cpp's own copies are
  adapted for its regex engine, see ``llama-vocab.cpp``), then the byte-level mapping.
* ``llama``: SentencePiece BPE as HF's ``LlamaTokenizerFast`` runs it: ``▁`` prepended and
  replacing spaces, merges ranked by the merged piece's score, byte fallback ``<0xNN>``.

Control and user-defined tokens are added as special tokens (never split, skipped when
decoding with ``skip_special_tokens``).
"""

from __future__ import annotations

from typing import Any

from moetier.errors import WeightError
from moetier.tokenizer import Tokenizer

_CONTRACTIONS_I = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# pre name -> list of split regexes (applied in order, "isolated"), None = GPT-2's ByteLevel regex
PRE_SPLITS: dict[str, list[str] | None] = {
    "default": None,
    "gpt-2": None,
    "olmo": None,
    "llama3": [_CONTRACTIONS_I + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+"],
    "qwen2": [_CONTRACTIONS_I + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "deepseek-v3": [
        r"\p{N}{1,3}",
        r"[一-龥぀-ゟ゠-ヿ]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    ],
    "gpt-4o": [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS_I + "?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS_I + "?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ],
}
PRE_ALIASES = {"llama-bpe": "llama3", "deepseek-r1-qwen": "qwen2", "deepseek-v3": "deepseek-v3",
               "kimi-k2": "deepseek-v3"}
IGNORE_MERGES = {"llama3", "gpt-4o"}  # HF's tokenizer.json for these sets "ignore_merges": true
CONTROL, USER_DEFINED, BYTE = 3, 4, 6


def _meta_list(meta: dict[str, Any], key: str, src: str) -> list:
    v = meta.get(key)
    if not isinstance(v, list):
        raise WeightError(f"{src}: GGUF metadata '{key}' is missing (no tokenizer in this file)")
    return v


def build_hf_tokenizer(meta: dict[str, Any], src: str) -> Any:
    """A ``tokenizers.Tokenizer`` from GGUF ``tokenizer.ggml.*`` metadata."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    tokens = [str(t) for t in _meta_list(meta, "tokenizer.ggml.tokens", src)]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in _meta_list(meta, "tokenizer.ggml.merges", src)]
        pre = str(meta.get("tokenizer.ggml.pre", "default"))
        pre = PRE_ALIASES.get(pre, pre)
        if pre not in PRE_SPLITS:
            raise WeightError(f"{src}: GGUF tokenizer pre-tokenizer {pre!r} is not supported "
                              f"(supported: {', '.join(sorted({*PRE_SPLITS, *PRE_ALIASES}))})")
        tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre in IGNORE_MERGES))
        splits = PRE_SPLITS[pre]
        if splits is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        tok = HFTokenizer(models.BPE(vocab, _sentencepiece_merges(tokens, types, scores), byte_fallback=True,
                                     unk_token=_unk(tokens, types), fuse_unk=True))
        prefix = [normalizers.Prepend("▁")] if meta.get("tokenizer.ggml.add_space_prefix", True) else []
        tok.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        raise WeightError(f"{src}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                if ty in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens(specials)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    if add_bos and bos is not None:
        b = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                           special_tokens=[(b, int(bos))])
    return tok


def _unk(tokens: list[str], types: list[int]) -> str | None:
    return next((t for t, ty in zip(tokens, types) if ty == 2), None)


def _sentencepiece_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece vocabulary: every split of a piece into two pieces,
    ranked by the merged piece's score (higher first), then by the parts' ids."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, str, str]] = []
    for piece, i in vocab.items():
        if types[i] not in (1,) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                found.append((-float(scores[i]), vocab[a], vocab[b], a, b))
    found.sort()
    return [(a, b) for _, _, _, a, b in found]


def gguf_tokenizer(meta: dict[str, Any], src: str, extra_eos_ids: list[int] | None = None) -> Tokenizer:
    """moetier's Tokenizer (encode / decode / chat template) for a GGUF file's metadata."""
    tok = build_hf_tokenizer(meta, src)
    tokens = meta["tokenizer.ggml.tokens"]

    def name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return str(tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else None

    cfg = {"bos_token": name("bos"), "eos_token": name("eos"), "pad_token": name("padding")}
    eos = list(extra_eos_ids or [])
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        eos.append(int(eot))
    template = meta.get("tokenizer.chat_template")
    return Tokenizer.from_tokenizer(tok, cfg, template if isinstance(template, str) else None, eos)
