"""Scenarios of the side-by-side benchmark, and the peers' artefacts they need on demand.

(a) ``embedded``: the embedded model (``moetier/data/embedded/``), in RAM.
(b) ``ram``: a synthetic Qwen3-MoE of ~2.5 GB bf16 that fits RAM (written once to the cache
    dir by ``bench.bench_runtime.ensure_synthetic``; random weights).
(c) ``overcap``: a model ~3x the memory cap (the weight-hierarchy benchmark's
    realistic-routing "wide" model, ``bench.bench_hierarchy``), every engine under the cap.

Nothing here is committed: converted GGUF files, the llama.cpp venv and sources live in
``$MOETIER_BENCH_CACHE`` (default ``~/.cache/moetier-bench``). When absent they are rebuilt:
``pip install llama-cpp-python==0.3.36`` into a venv there (compiles llama.cpp for the CPU:
about 6 minutes on 2 cores) and ``pip download --no-binary`` of the same sdist for
``convert_hf_to_gguf.py`` (seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
REPO = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers.py"
GIB = 2**30


def bench_cache() -> Path:
    env = os.environ.get("MOETIER_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "moetier-bench"


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- llama.cpp


def llama_python() -> Path:
    """The llama-cpp-python venv's interpreter; built on demand (~6 min, compiles llama.cpp)."""
    venv = bench_cache() / "llama-venv"
    py = venv / "bin" / "python"
    ok = py.exists() and subprocess.run(
        [str(py), "-c", f"import llama_cpp; assert llama_cpp.__version__ == '{LLAMA_CPP_PYTHON_VERSION}'"],
        capture_output=True).returncode == 0
    if not ok:
        _log(f"building llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} into {venv} (compiles llama.cpp, ~6 min)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], check=True,
                       env={**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON")})
    return py


def llama_cpp_src() -> Path:
    """llama.cpp's sources from the llama-cpp-python sdist (convert_hf_to_gguf.py, gguf-py)."""
    base = bench_cache() / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    d = base / "vendor" / "llama.cpp"
    if (d / "convert_hf_to_gguf.py").exists():
        return d
    sd = bench_cache() / "sdist"
    tgz = sd / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not tgz.exists():
        _log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (converter sources)")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(sd), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], check=True)
    with tarfile.open(tgz) as tf:
        tf.extractall(base.parent, filter="data")
    return d


def make_tokenizer_json(path: Path, vocab_size: int = 512, seed: int = 0) -> None:
    """A small byte-level BPE tokenizer (``tokenizers``), for checkpoints that ship none.

    Only the GGUF converter needs it (it writes a vocabulary, padded to the config's
    vocab_size); the benchmark itself feeds token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    r = random.Random(seed)
    words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(1, 8))) for _ in range(2000)]
    text = [" ".join(r.choice(words) for _ in range(50)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))


def with_tokenizer(model_dir: Path) -> Path:
    """``model_dir`` if it has a tokenizer, else a cache dir of symlinks to it plus a tokenizer."""
    if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer.model").exists():
        return model_dir
    key = hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:8]
    view = bench_cache() / "views" / f"{model_dir.name}-{key}"
    view.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        link = view / f.name
        if f.is_file() and not link.exists():
            link.symlink_to(f.resolve())
    if not (view / "tokenizer.json").exists():
        make_tokenizer_json(view / "tokenizer.json")
    return view


def gguf_outtype(torch_dtype: str) -> str:
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(torch_dtype, "f32")


def ensure_gguf(model_dir: Path, outtype: str, timeout: float = 7200) -> Path:
    """Convert ``model_dir`` with llama.cpp's converter at ``outtype`` (cached)."""
    st = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in model_dir.iterdir()
                if f.suffix in (".safetensors", ".json"))
    key = hashlib.sha1(json.dumps([str(model_dir.resolve()), st]).encode()).hexdigest()[:10]
    out = bench_cache() / "gguf" / f"{model_dir.name}-{key}-{outtype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = with_tokenizer(model_dir)
    tmp = out.with_suffix(".part")
    _log(f"converting {model_dir} -> {out} ({outtype}) with llama.cpp's convert_hf_to_gguf.py")
    env = {**os.environ, "PYTHONPATH": str(llama_cpp_src() / "gguf-py")}
    p = subprocess.run([sys.executable, str(PEERS), "convert", "--llama-cpp-dir", str(llama_cpp_src()),
                        str(src), "--outtype", outtype, "--outfile", str(tmp)],
                       capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0 or not tmp.exists():
        raise RuntimeError(f"GGUF conversion of {model_dir} failed:\n{p.stderr[-3000:]}")
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    name: str
    title: str
    resolve: Callable[[], Path]  # -> checkpoint dir (built on demand)
    engines: tuple[str, ...]
    cap_bytes: Callable[[Path], int | None] = lambda d: None  # None: in RAM (cgroup only accounts)
    moetier_options: Callable[[Path, int | None], dict[str, Any]] = lambda d, cap: {}
    tokens: int = 32  # decode tokens per run unless --tokens
    prompt_len: int = 64  # prompt tokens unless --prompt-len
    notes: list[str] = field(default_factory=list)


def model_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def embedded_dir() -> Path:
    from moetier.runtime import EMBEDDED_DIR

    if not (EMBEDDED_DIR / "config.json").exists():
        raise FileNotFoundError(f"{EMBEDDED_DIR}: the embedded model is not installed")
    return EMBEDDED_DIR


def ram_model_dir(size_gb: float = 2.5) -> Path:
    from bench.bench_runtime import ensure_synthetic

    return ensure_synthetic(size_gb)


def _wide_from(src: Path, name: str, target_gb: float) -> Path:
    """``scripts/make_wide_model.py`` applied to ``src`` (cached under the bench cache)."""
    key = hashlib.sha1(json.dumps(sorted((f.name, f.stat().st_size) for f in src.iterdir()
                                         if f.suffix == ".safetensors" or f.name == "config.json"))
                       .encode()).hexdigest()[:8]
    out = bench_cache() / "models" / f"wide-{name}-{key}-{target_gb:g}gb"
    if not (out / "config.json").exists():
        _log(f"building the wide model {out} from {src} (scripts/make_wide_model.py, {target_gb:g} GB)")
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_wide_model.py"), "--src", str(src),
                        "--out", str(out), "--target-gb", str(target_gb)], check=True, stdout=subprocess.DEVNULL)
    return out


def standin_source() -> Path:
    """A random-weight qwen3_moe of the embedded model's default shape (scripts/train_embedded.py),
    used as the wide model's source only when the trained embedded model is not installed."""
    from bench.bench_runtime import synthetic_config, write_synthetic

    d = bench_cache() / "models" / "standin-embedded-shape"
    if not (d / "config.json").exists():
        cfg = synthetic_config(0.1)
        cfg.update(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   vocab_size=4096, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128)
        write_synthetic(d, cfg)
        make_tokenizer_json(d / "tokenizer.json")
    return d


WIDE_TARGET_GB = 8.5


def overcap_model_dir() -> Path:
    """The wide, realistic-routing model (>= 8 GB): the hierarchy benchmark's builder when it
    exposes one, else ``scripts/make_wide_model.py`` from the embedded model, else (embedded
    model not installed) from a random-weight stand-in of the same shape (routing not trained).
    ``$MOETIER_BENCH_WIDE_MODEL`` names an existing one (e.g. the hierarchy benchmark's)."""
    env = os.environ.get("MOETIER_BENCH_WIDE_MODEL")
    if env:
        if not (Path(env) / "config.json").exists():
            raise FileNotFoundError(f"MOETIER_BENCH_WIDE_MODEL={env}: no config.json (incomplete checkpoint?)")
        return Path(env)
    try:
        import bench.bench_hierarchy as bh
    except ImportError:
        bh = None
    for name in ("ensure_wide_model", "ensure_wide", "wide_model_dir", "build_wide_model"):
        fn = getattr(bh, name, None)
        if callable(fn):
            return Path(fn())
    try:
        return _wide_from(embedded_dir(), "embedded", WIDE_TARGET_GB)
    except FileNotFoundError:
        return _wide_from(standin_source(), "standin", WIDE_TARGET_GB)


def tiny_model_dir() -> Path:
    """A 5 MB Qwen3-MoE (2 layers, 8 experts) for checking the pipeline end to end in seconds."""
    from bench.bench_runtime import synthetic_config, write_synthetic

    d = bench_cache() / "models" / "tiny-qwen3moe"
    if not (d / "config.json").exists():
        cfg = synthetic_config(0.1)
        cfg.update(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=1000, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128)
        write_synthetic(d, cfg)
    return d


OVERCAP_RATIO = 3.0


def overcap_cap(d: Path) -> int:
    """The memory cap for (c): a third of the checkpoint, rounded to 0.25 GiB."""
    return max(1, round(model_bytes(d) / OVERCAP_RATIO / (GIB / 4))) * (GIB // 4)


def overcap_moetier_options(d: Path, cap: int | None) -> dict[str, Any]:
    return {"max_ram": cap, "prefetch": True}


SCENARIOS: dict[str, Scenario] = {
    "embedded": Scenario("embedded", "(a) embedded model, in RAM", embedded_dir,
                         ("moetier", "llama_cpp", "transformers", "moetier_torch")),
    "ram": Scenario("ram", "(b) synthetic Qwen3-MoE 2.5 GB, in RAM", ram_model_dir,
                    ("moetier", "llama_cpp", "transformers", "moetier_torch")),
    "overcap": Scenario("overcap", "(c) wide MoE ~3x the memory cap", overcap_model_dir,
                        ("moetier", "llama_cpp", "transformers_offload"),
                        cap_bytes=overcap_cap, moetier_options=overcap_moetier_options,
                        tokens=16, prompt_len=32),  # accelerate's offload reads ~6 GB per token
}
# not part of ``all``: a seconds-long end-to-end check of the harness (python -m bench tiny --out tiny)
EXTRA_SCENARIOS: dict[str, Scenario] = {
    "tiny": Scenario("tiny", "(t) tiny synthetic Qwen3-MoE, harness check", tiny_model_dir,
                     ("moetier", "llama_cpp", "transformers")),
    "tiny-capped": Scenario("tiny-capped", "(t) tiny synthetic Qwen3-MoE under a cap, harness check",
                            tiny_model_dir, ("moetier", "llama_cpp", "transformers_offload"),
                            cap_bytes=lambda d: 2 * GIB, moetier_options=lambda d, cap: {"max_ram": cap}),
}


def prompt_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """Deterministic prompt token ids, the same for every engine (ids 10..vocab-1)."""
    r = random.Random(seed)
    hi = max(11, vocab_size - 1)
    return [r.randrange(10, hi) for _ in range(n)]
