"""Make the GGUF test fixtures in tests/data/gguf/ with llama.cpp's own tools.

    python scripts/make_gguf_fixtures.py --llama-cpp-dir DIR [--quantize BIN | --llama-python PY] [--only NAME ...]

DIR is llama.cpp's source tree (``vendor/llama.cpp`` of the llama-cpp-python 0.3.36 sdist:
``pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:``); its
``convert_hf_to_gguf.py`` converts tiny ``save_pretrained`` checkpoints (tests/helpers,
deterministic from their seed, so the tests rebuild the HF original in memory). The
quantized fixtures (legacy, K, MXFP4, DeepSeek Q8_0) are made by llama.cpp's own quantizer:
BIN is llama.cpp's ``llama-quantize`` (``cmake -B build -DGGML_NATIVE=OFF && cmake --build
build --target llama-quantize``); or, without BIN, PY is the interpreter of a venv with
``llama-cpp-python==0.3.36`` (the bench's ``~/.cache/moetier-bench/llama-venv``), which runs
the same quantizer library (``llama_cpp.llama_model_quantize``, same options) through
``bench/peers.py quantize``. The converter runs through
``bench/peers.py convert`` (an unknown BPE pre-tokenizer hash -> ``qwen2``; the tiny
tokenizers have no known hash). Without ``--quantize``, the legacy and MXFP4 fixtures are
Without either, the legacy and MXFP4 fixtures are
quantized with gguf-py's quantizers (:func:`requantize_gguf_py`), and the K-quant one only
with ``--random-k-blocks`` (random K blocks: a decoding test, not a quantization).

The committed fixtures were made on 2026-12-01 with (llama-cpp-python 0.3.36 built by
``bench/scenarios.py: llama_python``, sources from its sdist):

    B=~/.cache/moetier-bench
    python scripts/make_gguf_fixtures.py --llama-cpp-dir $B/src/llama_cpp_python-0.3.36/vendor/llama.cpp \
        --llama-python $B/llama-venv/bin/python

(every fixture; the float ones and ``qwen3moe-q8_0`` come from the converter alone, so they
are the same bytes as before).

Fixtures (name -> family, HF overrides, how it is made) are in :data:`FIXTURES`; the tests
import the same table to rebuild each original.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data" / "gguf"

# name -> (family, seed, HF config overrides, converter outtype, llama-quantize arguments or None)
# The quantized fixtures are one layer wide enough (256) for the K types' 256-value blocks;
# --tensor-type puts each block type of a family on some tensor (llama-quantize's own choice
# for the named recipe otherwise).
_WIDE = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_experts=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=128, num_hidden_layers=1)
_LEGACY = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0",
           "--tensor-type", "ffn_gate_exps=q4_0", "--tensor-type", "ffn_up_exps=q4_1",
           "--tensor-type", "ffn_down_exps=q5_0", "--tensor-type", "attn_q=q5_1", "--tensor-type", "attn_k=q8_0"]
_KQUANT = ["--tensor-type", "ffn_gate_exps=q2_k", "--tensor-type", "ffn_up_exps=q3_k",
           "--tensor-type", "ffn_down_exps=q4_k", "--tensor-type", "attn_q=q5_k", "--tensor-type", "attn_v=q6_k"]
FIXTURES: dict[str, tuple[str, int, dict, str, list[str] | None]] = {
    "qwen3moe-bf16": ("qwen3_moe", 1, {}, "bf16", None),
    "qwen2moe-bf16": ("qwen2_moe", 2, {}, "bf16", None),
    "mixtral-bf16": ("mixtral", 3, {"vocab_size": 400, "intermediate_size": 32}, "bf16", None),  # SentencePiece
    "olmoe-bf16": ("olmoe", 4, {"intermediate_size": 32}, "bf16", None),
    "deepseek2-bf16": ("deepseek_v3", 5, {}, "bf16", None),
    "gptoss-bf16": ("gpt_oss", 10, {}, "bf16", None),
    "qwen3moe-q8_0": ("qwen3_moe", 9, {}, "q8_0", None),  # the converter's own Q8_0
    "qwen3moe-legacy": ("qwen3_moe", 6, _WIDE, "f32", [*_LEGACY, "Q8_0"]),  # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
    "qwen3moe-kquant": ("qwen3_moe", 7, _WIDE, "f32", [*_KQUANT, "Q4_K_M"]),  # Q2_K..Q6_K
    "qwen3moe-mxfp4": ("qwen3_moe", 8, _WIDE, "f32", ["MXFP4_MOE"]),  # MXFP4 experts, Q8_0 others
    "gptoss-mxfp4": ("gpt_oss", 11, {}, "f32", ["MXFP4_MOE"]),  # gpt-oss as released: MXFP4 experts
    "deepseek2-q8_0": ("deepseek_v3", 12, {}, "f32", ["Q8_0"]),  # MLA with quantized projections
}
SPM_CORPUS = ["the quick brown fox jumps over the lazy dog. " * 4, "hello world, hello moetier! " * 4,
              "Once upon a time there was a tiny model that ran on a CPU.", "def f(x):\n    return x * 2\n",
              "日本語のテキスト 中文 😀"]


def spm_tokenizer(directory: Path, vocab_size: int) -> None:
    """Replace the checkpoint's tokenizer with a SentencePiece BPE model (llama-style, byte fallback)."""
    import sentencepiece as spm

    corpus = directory / "spm_corpus.txt"
    corpus.write_text("\n".join(SPM_CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    (directory / "tokenizer.json").unlink()


def hf_checkpoint(name: str, root: Path) -> Path:
    import torch

    from tests.helpers import moe_families  # noqa: F401  (registers deepseek / gpt-oss recipes)
    from tests.helpers.checkpoints import make_tiny_checkpoint

    family, seed, over, outtype, _ = FIXTURES[name]
    dtype = torch.bfloat16 if outtype == "bf16" else torch.float32
    ck = make_tiny_checkpoint(root, family, seed=seed, dtype=dtype, name=name, **over)
    if family == "mixtral":
        spm_tokenizer(ck, over["vocab_size"])
    return ck


def make(name: str, llama_cpp_dir: Path, quantize: Path | None, root: Path, llama_python: Path | None = None) -> Path:
    _, _, _, outtype, qargs = FIXTURES[name]
    ck = hf_checkpoint(name, root)
    out = OUT / f"{name}.gguf"
    conv = out if qargs is None else root / f"{name}-{outtype}.gguf"
    subprocess.run([sys.executable, str(REPO / "bench" / "peers.py"), "convert", "--llama-cpp-dir",
                    str(llama_cpp_dir), str(ck), "--outfile", str(conv), "--outtype", outtype], check=True)
    if qargs is not None and quantize is not None:
        subprocess.run([str(quantize), *qargs[:-1], str(conv), str(out), qargs[-1]], check=True)
    elif qargs is not None and llama_python is not None:
        subprocess.run([str(llama_python), str(REPO / "bench" / "peers.py"), "quantize", str(conv), str(out),
                        qargs[-1], *qargs[:-1]], check=True)
    elif qargs is not None:
        requantize_gguf_py(conv, out, qargs)
    if (ck / "tokenizer.model").exists():
        (OUT / f"{name}.tokenizer.model").write_bytes((ck / "tokenizer.model").read_bytes())
    return out


GGUF_PY_RECIPES = {"Q8_0": ("Q8_0", "Q8_0"), "MXFP4_MOE": ("MXFP4", "Q8_0")}  # recipe -> (experts, others)
RANDOM_K = False  # --random-k-blocks: Q4_K_M -> random K blocks where the recipe names K types


def requantize_gguf_py(src: Path, out: Path, qargs: list[str]) -> None:
    """Without llama-quantize: the same recipe with gguf-py's quantizers (``gguf.quants.quantize``,
    which llama.cpp's converter itself uses; they exist for the legacy types and MXFP4, not for
    the K types). 1-D tensors, biases and routers stay F32 as llama-quantize leaves them."""
    import gguf
    import numpy as np

    recipe = qargs[-1]
    if recipe == "Q4_K_M" and RANDOM_K:
        recipe = "Q8_0"  # tensors not named by --tensor-type: Q8_0
    if recipe not in GGUF_PY_RECIPES:
        raise SystemExit(f"{out.name}: recipe {recipe} needs --quantize (llama-quantize): gguf-py has no K quantizer "
                         "(--random-k-blocks writes random K blocks instead)")
    experts, others = GGUF_PY_RECIPES[recipe]
    rules: dict[str, str] = {}
    for flag, val in zip(qargs[:-1:2], qargs[1:-1:2]):
        if flag == "--tensor-type":
            k, v = val.split("=")
            rules[k] = v.upper()
        elif flag == "--token-embedding-type":
            rules["token_embd"] = val.upper()
        elif flag == "--output-tensor-type":
            rules["output"] = val.upper()
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(out, str(r.fields["general.architecture"].contents()))
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        w.add_key_value(name, f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
    for t in r.tensors:
        data = np.array(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape.tolist())])
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.split(".")[0]
        if data.ndim == 1 or kind == "ffn_gate_inp" or not t.name.endswith(".weight"):  # biases stay F32
            w.add_tensor(t.name, data)
            continue
        qtype = rules.get(kind) or (experts if kind.endswith("_exps") else others)
        q = gguf.GGMLQuantizationType[qtype]
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[q][0]:  # rows not whole blocks: kept F32 (llama-quantize
            w.add_tensor(t.name, data)  # falls back to another type for these)
            continue
        if qtype.endswith("_K"):  # no K quantizer in gguf-py: random blocks with moderate float16 scales
            w.add_tensor(t.name, random_k_blocks(data.shape, q, np.random.default_rng(len(t.name))), raw_dtype=q)
        else:
            w.add_tensor(t.name, gguf.quants.quantize(data, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_k_blocks(shape: tuple[int, ...], qtype: object, rng: object) -> object:
    """Random K-quant blocks for ``shape`` (not a quantization of anything): every quantized
    value and sub-scale random, the float16 super-block scales ``d`` / ``dmin`` set to small
    random values so weights have a sane magnitude (~1/sqrt(cols))."""
    import gguf
    import numpy as np

    bs, ts = gguf.GGML_QUANT_SIZES[qtype]  # type: ignore[index]
    nblk = int(np.prod(shape)) // bs
    raw = rng.integers(0, 256, size=(nblk, ts), dtype=np.uint8)  # type: ignore[attr-defined]
    d = (rng.uniform(0.2, 1.0, size=(nblk, 1)) / (64 * shape[-1] ** 0.5)).astype(np.float16)  # type: ignore
    dmin = (rng.uniform(0.2, 1.0, size=(nblk, 1)) / (64 * shape[-1] ** 0.5)).astype(np.float16)  # type: ignore
    name = gguf.GGMLQuantizationType(qtype).name
    # byte offsets of d (and dmin) in block_q{2..6}_K (ggml-common.h)
    at = {"Q2_K": (80, 82), "Q3_K": (108, None), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, None)}[name]
    raw[:, at[0]:at[0] + 2] = d.view(np.uint8)
    if at[1] is not None:
        raw[:, at[1]:at[1] + 2] = dmin.view(np.uint8)
    return raw.reshape(*shape[:-1], shape[-1] // bs * ts)


def embedded_vocab(llama_cpp_dir: Path) -> Path:
    """The embedded model's tokenizer as GGUF metadata (``--vocab-only``; its byte-level BPE
    splits with GPT-2's regex, so the pre-tokenizer is written as ``gpt-2``)."""
    out = OUT / "embedded-vocab.gguf"
    code = ("import sys; sys.path.insert(0, 'bench'); import peers; peers.LLAMA_CPP_PRE_FALLBACK = 'gpt-2'; "
            f"peers.convert({str(llama_cpp_dir)!r}, ['moetier/data/embedded', '--vocab-only', '--outfile', "
            f"{str(out)!r}])")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp-dir", required=True, type=Path)
    ap.add_argument("--quantize", type=Path, default=None, help="llama-quantize binary")
    ap.add_argument("--llama-python", type=Path, default=None,
                    help="without --quantize: python of a venv with llama-cpp-python (llama.cpp's quantizer)")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--random-k-blocks", action="store_true",
                    help="without llama-quantize: write the K-quant fixture's K tensors as random blocks")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    global RANDOM_K
    RANDOM_K = a.random_k_blocks
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.only or [*FIXTURES, "embedded-vocab"]:
            if name == "embedded-vocab":
                p = embedded_vocab(a.llama_cpp_dir)
            else:
                p = make(name, a.llama_cpp_dir, a.quantize, Path(tmp), a.llama_python)
            print(f"{p.relative_to(REPO)}: {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
