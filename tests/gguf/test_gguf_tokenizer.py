"""Tokenizers built from GGUF metadata give the original tokenizer's ids.

* byte-level BPE (``gpt2``): the embedded model's tokenizer.json, converted to GGUF by
  llama.cpp's converter (tests/data/gguf/embedded-vocab.gguf), vs the same tokenizer.json;
* SentencePiece (``llama``): the Mixtral fixture's vocabulary vs the sentencepiece library
  running the original tokenizer.model (what HF's Llama tokenizers reproduce).
"""

from __future__ import annotations

import random

import pytest

from moetier.gguf_tokenizer import PRE_SPLITS, build_hf_tokenizer, gguf_tokenizer
from moetier.runtime import EMBEDDED_DIR
from moetier.tokenizer import Tokenizer
from moetier.weights.gguf_io import GGUFIndex
from tests.gguf.helpers import DATA, fixture

pytest.importorskip("gguf", reason="the gguf extra (pip install moetier[gguf]) is not installed")

PIECES = [
    "The quick brown fox jumps over the lazy dog. ", "It's 3.14159 or 1,000,000 — isn't it? ",
    "def route(x, k=2):\n    scores = x @ W.T\n\treturn scores.topk(k)  # top-k\n\n",
    "for (int i = 0; i < n; ++i) { y[i] += a * x[i]; }\r\n",
    "混合专家模型在中央处理器上运行。", "日本語のテキストとカタカナ、ひらがな。", "한국어 문장도 있습니다. ",
    "Emoji: 😀🚀👩‍💻🇫🇷 ❤️ ", "    indented    with   runs\n\n\n   of spaces  ", "\t\ttabs\t and \u00a0nbsp ",
    "CamelCaseWords and snake_case_words, URLs https://example.org/a?b=c&d=e ", "ÀÉÎÕÜ àéîõü ß ẞ ",
    "12345678901234567890 ", "<|im_start|>user\nhello<|im_end|>\n", "'s 've 'RE 'Ll ", "   ", "\n",
]


def corpus(n_chars: int = 12000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out, total = [], 0
    while total < n_chars:
        s = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6)))
        out.append(s)
        total += len(s)
    return out


def test_bpe_ids_equal_hf_tokenizer_on_mixed_text() -> None:
    idx = GGUFIndex(fixture("embedded-vocab"))
    assert idx.meta["tokenizer.ggml.pre"] == "gpt-2"
    ours = gguf_tokenizer(idx.meta, "embedded-vocab.gguf")
    ref = Tokenizer(EMBEDDED_DIR)
    texts = corpus()
    assert sum(map(len, texts)) >= 10000
    for t in texts:
        assert ours.encode(t) == ref.encode(t), t
        assert ours.encode(t, add_special_tokens=False) == ref.encode(t, add_special_tokens=False)
    whole = "".join(texts)
    ids = ours.encode(whole)
    assert ids == ref.encode(whole)
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.chat_template == ref.chat_template and ours.eos_token_ids[0] == ref.eos_token_ids[0]
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs)


def test_sentencepiece_ids_equal_sentencepiece() -> None:
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(DATA / "mixtral-bf16.tokenizer.model"))
    idx = GGUFIndex(fixture("mixtral-bf16"))
    assert idx.meta["tokenizer.ggml.model"] == "llama"
    ours = gguf_tokenizer(idx.meta, "mixtral-bf16.gguf")
    texts = [t.replace("<|im_start|>", "").replace("<|im_end|>", "") for t in corpus(seed=1)]
    assert sum(map(len, texts)) >= 10000
    for t in texts:
        want = sp.encode(t)
        assert ours.encode(t, add_special_tokens=False) == want, t
        assert ours.encode(t) == [sp.bos_id(), *want]
        assert ours.decode(want) == sp.decode(want)


@pytest.mark.parametrize("pre", sorted(PRE_SPLITS))
def test_every_pre_tokenizer_builds_and_round_trips(pre: str) -> None:
    idx = GGUFIndex(fixture("embedded-vocab"))
    meta = {**idx.meta, "tokenizer.ggml.pre": pre}
    tok = build_hf_tokenizer(meta, "x.gguf")
    text = "".join(corpus(2000, seed=2))
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    # digits: qwen2 splits every digit, llama3 / deepseek-v3 / gpt-4o groups of up to three
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("x 12345")]
    if pre == "qwen2":
        assert pieces[-5:] == ["1", "2", "3", "4", "5"]
    elif pre in ("llama3", "deepseek-v3", "gpt-4o"):
        assert pieces[-2:] == ["123", "45"]


def test_unknown_pre_tokenizer_is_one_clear_error() -> None:
    from moetier.errors import WeightError

    idx = GGUFIndex(fixture("embedded-vocab"))
    with pytest.raises(WeightError, match="pre-tokenizer 'chameleon' is not supported"):
        build_hf_tokenizer({**idx.meta, "tokenizer.ggml.pre": "chameleon"}, "x.gguf")
