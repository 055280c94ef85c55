"""Engine workers for the side-by-side benchmark: one process per engine, one JSON line out.

    python bench/peers.py ENGINE MODEL --prompt-ids 1,2,3 --tokens 32 --runs 5 [--threads 2]

ENGINE is ``moetier``, ``moetier_torch`` (moetier with its native decode turned off),
``moetier_steps`` (moetier through ``Model.step`` in llama.cpp's timing loop, in RAM),
``llama_cpp``, ``transformers`` (eager) or ``transformers_offload``
(transformers + accelerate, ``device_map="auto"`` with a CPU budget, the rest offloaded to
disk). Every engine gets the same prompt token ids (no tokenizer in the timed path), decodes
greedily for exactly ``--tokens`` tokens (EOS ignored), does one untimed warm-up generation
(as its users would: it pages the weights in and allocates), then ``--runs`` timed
generations. Timing definitions match ``moetier.generation.GenerationResult``:
prefill tok/s = prompt tokens / time of the prompt forward (to the last token's logits);
decode tok/s = single-token forwards / their time (the first new token comes from the
prefill).

This file is also run by llama.cpp's own venv (``llama-cpp-python`` is never installed into
the moetier venv), so it imports only the standard library at the top.

``python bench/peers.py convert HF_DIR OUT.gguf --outtype bf16`` runs llama.cpp's
``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist) with one addition made at import
time, not on disk: a BPE tokenizer whose pre-tokenizer hash llama.cpp does not know (the
embedded model's, the synthetic checkpoints') is written with the ``qwen2`` pre-tokenizer
instead of aborting. The benchmark feeds token ids, so the pre-tokenizer never runs.

``python bench/peers.py quantize IN.gguf OUT.gguf RECIPE [--tensor-type NAME=TYPE ...]
[--token-embedding-type TYPE] [--output-tensor-type TYPE]`` (llama.cpp's venv) quantizes with
llama.cpp's own quantizer through ``llama_cpp.llama_model_quantize`` (the library behind
``llama-quantize``; the same options). RECIPE is a llama ftype name without ``MOSTLY_``
(``Q8_0``, ``Q4_K_M``, ``MXFP4_MOE``, ...).

llama.cpp's CPU backend repacks Q4_0/Q4_K/Q8_0... weights into "extra buffer types" (AMX on
Intel CPUs that report it, else AVX-512/AVX2 interleaved layouts). On a VM that reports AMX
but traps its instructions this dies with SIGILL, so ``run_llama_cpp`` loads with
``use_extra_bufts = False`` when the CPU flags name AMX (or when told to with the engine option
``{"use_extra_bufts": false}``) and records which it used (``use_extra_bufts`` in the result).

``python bench/peers.py logits MODEL.gguf --prompt-ids .. --continuation .. --out F.npy``
(llama.cpp's venv) saves llama.cpp's decode-path logits along a given continuation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENGINES = ("moetier", "moetier_torch", "moetier_steps", "llama_cpp", "transformers", "transformers_offload")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def timed_generations(prefill: Callable[[list[int]], int], step: Callable[[int], int],
                      reset: Callable[[], None], prompt: list[int], tokens: int, runs: int,
                      warmup: int = 1) -> dict[str, Any]:
    """Run ``warmup`` + ``runs`` greedy generations of exactly ``tokens`` tokens.

    ``prefill(prompt) -> first token``; ``step(token) -> next token``; ``reset()`` clears the
    sequence state. Returns per-run rates and the first (cold, warm-up) run's rates.
    """
    pre, dec, cpre, cdec, out_ids = [], [], [], [], []
    for _ in range(warmup + runs):
        reset()
        t0, c0 = time.perf_counter(), time.process_time()
        tok = prefill(prompt)
        t1, c1 = time.perf_counter(), time.process_time()
        ids = [tok]
        for _ in range(tokens - 1):
            tok = step(tok)
            ids.append(tok)
        t2, c2 = time.perf_counter(), time.process_time()
        pre.append(len(prompt) / (t1 - t0))
        dec.append((tokens - 1) / (t2 - t1) if tokens > 1 else 0.0)
        cpre.append(len(prompt) / max(c1 - c0, 1e-9))
        cdec.append((tokens - 1) / max(c2 - c1, 1e-9) if tokens > 1 else 0.0)
        out_ids = ids
    return {
        "prefill_tokens_per_s_runs": pre[warmup:],
        "decode_tokens_per_s_runs": dec[warmup:],
        # per CPU-second of the process (all its threads): on a loaded machine, what the engine
        # costs rather than what the scheduler gave it
        "prefill_tokens_per_cpu_s_runs": cpre[warmup:],
        "decode_tokens_per_cpu_s_runs": cdec[warmup:],
        "first_run": {"prefill_tokens_per_s": pre[0], "decode_tokens_per_s": dec[0]} if warmup else None,
        "output_ids": out_ids,
    }


# ----------------------------------------------------------------------------- engines


def _load_moetier(a: argparse.Namespace) -> tuple[Any, dict[str, Any], float]:
    """(model, load kwargs, load seconds). Engine options: moetier CLI load flags (through
    ``moetier run``'s load-option hooks), or one JSON object of keyword arguments; hierarchy
    options (max_ram, policy, expert_cache, prefetch, ...) go to ``moetier.weights.tiered.load``."""
    import moetier

    if a.engine_args and a.engine_args[0].lstrip().startswith("{"):
        kw: dict[str, Any] = {"dtype": a.dtype, "threads": a.threads, **json.loads(a.engine_args[0])}
    else:
        import moetier.cli
        from moetier.commands import run as run_cmd

        moetier.cli.build_parser()  # imports every command module, so load-option hooks register
        p = argparse.ArgumentParser()
        run_cmd.add_load_arguments(p)
        ns = p.parse_args([a.model, "--dtype", a.dtype, "--threads", str(a.threads), *a.engine_args])
        kw = run_cmd.load_kwargs(ns)
    if a.engine == "moetier_torch":
        kw["native"] = False
    hier = {"max_ram", "policy", "expert_cache", "cache_scope", "prefetch", "plan"}
    t0 = time.perf_counter()
    if any(kw.get(k) is not None for k in hier):
        from moetier.weights import tiered

        m = tiered.load(a.model, tokenizer=False, **kw)
    else:
        m = moetier.load(a.model, tokenizer=False, **kw)
    return m, kw, time.perf_counter() - t0


def hierarchy_summary(m: Any) -> dict[str, Any]:
    """The weight hierarchy's figures of a tiered-loaded model (since its metrics' last reset)."""
    summ = m.hierarchy_metrics.summary()
    out = {k: summ.get(k) for k in ("tokens", "hit_rate", "decode_hit_rate", "cache_hit_rate", "bytes_per_token",
                                    "store_bytes_demand", "store_bytes_prefetch", "stall_seconds",
                                    "prefetch_precision", "prefetch_recall") if k in summ}
    h = getattr(m, "hierarchy", None)
    if h is not None:
        out["cache_bytes"] = getattr(h, "cache_bytes", None)
        out["pinned_bytes"] = getattr(h, "pinned_bytes", None)
    return out


def run_moetier_steps(a: argparse.Namespace) -> dict[str, Any]:
    """moetier through ``Model.step`` in the same timed loop as llama.cpp's (prompt in one
    forward, then one token per forward; wall and CPU time)."""
    import torch

    m, kw, load_s = _load_moetier(a)
    metrics = getattr(m, "hierarchy_metrics", None)  # tiered load (--max-ram ...): hit rate, bytes read
    state: dict[str, Any] = {"resets": 0}

    def reset() -> None:
        state["seq"] = m.new_sequence(capacity=len(a.prompt_ids) + a.tokens + 1)
        state["resets"] += 1
        if metrics is not None and state["resets"] == 2:  # the timed runs' figures, not the warm-up's
            metrics.reset()

    def fwd(ids: list[int]) -> int:
        return int(m.step([(state["seq"], ids)])[0].argmax())

    res = timed_generations(fwd, lambda t: fwd([t]), reset, a.prompt_ids, a.tokens, a.runs)
    res.update(load_s=load_s, torch_threads=torch.get_num_threads(), load_kwargs={k: str(v) for k, v in kw.items()},
               decode_path="native" if m.native_reason is None else "torch", native_reason=m.native_reason,
               compute_paths=m.compute_paths())
    if metrics is not None:
        res["hierarchy"] = hierarchy_summary(m)
    return res


def run_moetier(a: argparse.Namespace) -> dict[str, Any]:
    """moetier via the library (``generate_ids``); load options as :func:`_load_moetier`."""
    import torch

    m, kw, load_s = _load_moetier(a)
    metrics = getattr(m, "hierarchy_metrics", None)

    def gen(prompt: list[int]) -> Any:
        return m.generate_ids(prompt, max_tokens=a.tokens)

    pre, dec, first = [], [], None
    ids: list[int] = []
    for r in range(1 + a.runs):
        g = gen(a.prompt_ids)
        if r == 0:  # warm-up: pages weights in, fills the expert cache
            first = {"prefill_tokens_per_s": g.prefill_tokens_per_s, "decode_tokens_per_s": g.decode_tokens_per_s}
            if metrics is not None:
                metrics.reset()
            continue
        pre.append(g.prefill_tokens_per_s)
        dec.append(g.decode_tokens_per_s)
        ids = list(g.ids)
    res: dict[str, Any] = {"prefill_tokens_per_s_runs": pre, "decode_tokens_per_s_runs": dec,
                           "first_run": first, "output_ids": ids}
    if metrics is not None:
        res["hierarchy"] = hierarchy_summary(m)
    if a.profile_steps:
        res["profile"] = profile_decode(m, a.prompt_ids, a.profile_steps)
    res.update(load_s=load_s, torch_threads=torch.get_num_threads(), load_kwargs={k: str(v) for k, v in kw.items()},
               decode_path="native" if m.native_reason is None else "torch", native_reason=m.native_reason)
    return res


def profile_decode(m: Any, prompt: list[int], steps: int, top: int = 12) -> dict[str, Any]:
    """Where a moetier decode step's time goes: torch.profiler over ``steps`` single-token
    forwards (after an unprofiled prefill). Reports, per token, the wall time without and with
    the profiler, the number of torch ops, the self time of the top ops, and the share of the
    wall time spent outside torch ops (Python and dispatch overhead, as seen by the profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def decode(n: int, prof: Any = None) -> float:
        seq = m.new_sequence(capacity=len(prompt) + n + 1)
        logits = m.step([(seq, prompt)])
        tok = int(logits[0].argmax())
        if prof is not None:
            prof.start()
        t0 = time.perf_counter()
        for _ in range(n):
            logits = m.step([(seq, [tok])])
            tok = int(logits[0].argmax())
        dt = (time.perf_counter() - t0) / n
        if prof is not None:
            prof.stop()
        return dt

    with torch.inference_mode():
        plain = decode(steps)
        prof = profile(activities=[ProfilerActivity.CPU])
        profiled = decode(steps, prof)
    ka = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    # ops called from other ops are counted in their parent's total; self times add up without overlap
    self_us = sum(e.self_cpu_time_total for e in ka)
    n_ops = sum(e.count for e in ka)
    tops = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    per = 1.0 / steps
    return {
        "steps": steps,
        "wall_s_per_token": plain,
        "wall_s_per_token_profiled": profiled,
        "torch_ops_per_token": n_ops * per,
        "op_self_s_per_token": self_us * 1e-6 * per,
        "outside_ops_share_profiled": max(0.0, 1 - self_us * 1e-6 * per / profiled),
        "top_ops": [{"op": e.key, "calls_per_token": e.count * per,
                     "self_s_per_token": e.self_cpu_time_total * 1e-6 * per} for e in tops],
    }


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx" in line for line in f)
    except OSError:
        return False


def load_llama(model: str, n_ctx: int, threads: int, extra: dict[str, Any],
               logits_all: bool = False) -> tuple[Any, bool]:
    """``llama_cpp.Llama`` for ``model``; ``extra["use_extra_bufts"]`` (default: not on AMX CPUs)
    goes into the model parameters (the high-level constructor has no argument for it).
    Returns (llm, use_extra_bufts)."""
    import llama_cpp.llama_cpp as low  # the module ``Llama`` takes its default params from
    from llama_cpp import Llama

    extra = dict(extra)
    bufts = bool(extra.pop("use_extra_bufts", not cpu_has_amx()))
    orig = low.llama_model_default_params

    def params() -> Any:
        p = orig()
        p.use_extra_bufts = bufts
        return p

    low.llama_model_default_params = params
    try:
        llm = Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                    n_ubatch=512, logits_all=logits_all, verbose=False, **extra)
    finally:
        low.llama_model_default_params = orig
    assert llm.model_params.use_extra_bufts == bufts
    return llm, bufts


def run_llama_cpp(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    extra = dict(json.loads(a.engine_args[0])) if a.engine_args else {}
    t0 = time.perf_counter()
    llm, bufts = load_llama(a.model, len(a.prompt_ids) + a.tokens + 16, a.threads, extra)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        return int(np.argmax(logits))

    def prefill(prompt: list[int]) -> int:
        llm.eval(prompt)
        return last_argmax()

    def step(tok: int) -> int:
        llm.eval([tok])
        return last_argmax()

    res = timed_generations(prefill, step, llm.reset, a.prompt_ids, a.tokens, a.runs)
    import llama_cpp

    res.update(load_s=load_s, use_mmap=extra.get("use_mmap", True), use_extra_bufts=bufts,
               llama_cpp_python=llama_cpp.__version__,
               system_info=llama_cpp.llama_print_system_info().decode(errors="replace"))
    return res


def run_transformers(a: argparse.Namespace, offload: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(a.threads)
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    kw: dict[str, Any] = {"dtype": dt, "attn_implementation": "eager"}
    if offload:
        opts = dict(json.loads(a.engine_args[0])) if a.engine_args else {}
        folder = opts.get("offload_folder") or str(Path(a.model).parent / (Path(a.model).name + "-offload"))
        kw.update(device_map="auto", max_memory={"cpu": int(opts.get("cpu_bytes", 2 * 2**30))},
                  offload_folder=folder, offload_buffers=True)
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(a.model, **kw).eval()
    load_s = time.perf_counter() - t0
    state: dict[str, Any] = {}

    def reset() -> None:
        state["cache"] = DynamicCache(config=m.config)
        state["pos"] = 0

    def fwd(ids: list[int]) -> int:
        n = len(ids)
        x = torch.tensor([ids])
        pos = torch.arange(state["pos"], state["pos"] + n).unsqueeze(0)
        out = m(input_ids=x, past_key_values=state["cache"], use_cache=True, position_ids=pos,
                logits_to_keep=1)
        state["pos"] += n
        return int(out.logits[0, -1].argmax())

    with torch.inference_mode():
        res = timed_generations(fwd, lambda t: fwd([t]), reset, a.prompt_ids, a.tokens, a.runs)
    res.update(load_s=load_s, torch_threads=torch.get_num_threads())
    if offload:
        devmap = getattr(m, "hf_device_map", {}) or {}
        res["device_map_counts"] = {str(v): sum(1 for x in devmap.values() if x == v) for v in set(devmap.values())}
    return res


# ----------------------------------------------------------------------------- convert

LLAMA_CPP_PRE_FALLBACK = "qwen2"


def convert(llama_cpp_dir: str, argv: list[str]) -> None:
    """Run convert_hf_to_gguf.py with the unknown-pre-tokenizer fallback patched in."""
    import runpy

    sys.path[:0] = [llama_cpp_dir, os.path.join(llama_cpp_dir, "gguf-py")]
    import conversion.base as cb  # type: ignore[import-not-found]

    orig = cb.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return orig(self, tokenizer)
        except NotImplementedError:
            print(f"moetier-bench: unknown BPE pre-tokenizer hash; writing {LLAMA_CPP_PRE_FALLBACK!r}",
                  file=sys.stderr)
            return LLAMA_CPP_PRE_FALLBACK

    cb.TextModel.get_vocab_base_pre = get_vocab_base_pre
    # DeepSeek-V2-Lite-style configs (q_lora_rank null): this converter omits the key and this
    # llama.cpp's loader and quantizer then refuse the file; write 0 (llama.cpp and moetier read
    # 0 as "no query LoRA")
    import conversion.deepseek as cd  # type: ignore[import-not-found]

    orig_params = cd.DeepseekV2Model.set_gguf_parameters

    def set_gguf_parameters(self: Any) -> None:
        orig_params(self)
        if self.hparams.get("q_lora_rank") is None:
            self.gguf_writer.add_q_lora_rank(0)

    cd.DeepseekV2Model.set_gguf_parameters = set_gguf_parameters
    script = os.path.join(llama_cpp_dir, "convert_hf_to_gguf.py")
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def llama_cpp_logits(model: str, prompt: list[int], continuation: list[int], threads: int, out: str,
                     extra: dict[str, Any]) -> bool:
    """llama.cpp's decode-path logits: the prompt in one forward, then the continuation one
    token per forward; the last logits of each forward ([1 + len(continuation), V] float32)
    saved with numpy to ``out``. Returns use_extra_bufts."""
    import numpy as np

    llm, bufts = load_llama(model, len(prompt) + len(continuation) + 16, threads, extra)
    n_vocab = llm.n_vocab()
    rows = []
    for ids in [prompt, *([t] for t in continuation)]:
        llm.eval(ids)
        rows.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy())
    np.save(out, np.stack(rows).astype(np.float32))
    return bufts


def quantize(src: str, out: str, recipe: str, tensor_types: list[str], token_embedding_type: str | None,
             output_tensor_type: str | None, threads: int = 0) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``) with llama-quantize's options:
    ``tensor_types`` = ["NAME=TYPE", ...] (NAME a regex searched in the tensor name)."""
    import ctypes

    import llama_cpp

    def ggml_type(name: str) -> int:
        v = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
        if v is None:
            raise SystemExit(f"unknown ggml type {name!r}")
        return int(v)

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{recipe.upper()}", None)
    if ftype is None:
        raise SystemExit(f"unknown recipe {recipe!r} (a LLAMA_FTYPE_MOSTLY_* name)")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = int(ftype)
    p.nthread = threads
    if token_embedding_type:
        p.token_embedding_type = ggml_type(token_embedding_type)
    if output_tensor_type:
        p.output_tensor_type = ggml_type(output_tensor_type)
    keep = []
    if tensor_types:
        arr = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, tt in enumerate(tensor_types):
            name, typ = tt.split("=")
            keep.append(name.encode())
            arr[i].pattern = keep[-1]
            arr[i].type = ggml_type(typ)
        arr[len(tensor_types)].pattern = None
        p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {out}, {recipe}) failed: {rc}")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        ap = argparse.ArgumentParser(prog="peers.py convert")
        ap.add_argument("--llama-cpp-dir", required=True)
        ns, rest = ap.parse_known_args(argv[1:])
        convert(ns.llama_cpp_dir, rest)
        return 0
    if argv and argv[0] == "logits":
        ap = argparse.ArgumentParser(prog="peers.py logits")
        ap.add_argument("model")
        ap.add_argument("--prompt-ids", required=True, type=lambda s: [int(x) for x in s.split(",") if x])
        ap.add_argument("--continuation", required=True, type=lambda s: [int(x) for x in s.split(",") if x])
        ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        ap.add_argument("--out", required=True)
        ap.add_argument("--options", default="{}", help="JSON engine options (use_extra_bufts)")
        ns = ap.parse_args(argv[1:])
        bufts = llama_cpp_logits(ns.model, ns.prompt_ids, ns.continuation, ns.threads, ns.out, json.loads(ns.options))
        print("BENCH_RESULT " + json.dumps({"use_extra_bufts": bufts}))
        return 0
    if argv and argv[0] == "quantize":
        ap = argparse.ArgumentParser(prog="peers.py quantize")
        ap.add_argument("src")
        ap.add_argument("out")
        ap.add_argument("recipe")
        ap.add_argument("--tensor-type", action="append", default=[])
        ap.add_argument("--token-embedding-type")
        ap.add_argument("--output-tensor-type")
        ap.add_argument("--threads", type=int, default=0)
        ns = ap.parse_args(argv[1:])
        quantize(ns.src, ns.out, ns.recipe, ns.tensor_type, ns.token_embedding_type, ns.output_tensor_type,
                 ns.threads)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine", choices=ENGINES)
    ap.add_argument("model")
    ap.add_argument("--prompt-ids", required=True, type=lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--profile-steps", type=int, default=0, help="moetier: profile N decode steps after timing")
    ap.epilog = "after --: moetier load flags (e.g. --max-ram 3G), or one JSON object of engine options"
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)
    a.engine_args = extra
    t0 = time.perf_counter()
    if a.engine in ("moetier", "moetier_torch"):
        res = run_moetier(a)
    elif a.engine == "moetier_steps":
        res = run_moetier_steps(a)
    elif a.engine == "llama_cpp":
        res = run_llama_cpp(a)
    else:
        res = run_transformers(a, offload=a.engine == "transformers_offload")
    res.update(engine=a.engine, dtype=a.dtype, threads=a.threads, prompt_tokens=len(a.prompt_ids),
               decode_tokens=a.tokens, runs=a.runs, peak_rss_bytes=peak_rss_bytes(),
               worker_wall_s=time.perf_counter() - t0)
    print("BENCH_RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
