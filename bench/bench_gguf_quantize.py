"""``moetier quantize ... --type T`` vs llama.cpp's quantizer, and llama.cpp running moetier's GGUF.

    python -m bench.bench_gguf_quantize [--tokens 32] [--threads 2]

On the embedded model (``moetier/data/embedded``):

1. llama.cpp's ``convert_hf_to_gguf.py`` (llama-cpp-python 0.3.36 sdist, via ``bench/peers.py
   convert``) writes an F32 GGUF. Both quantizers start from it: llama.cpp's
   ``llama_model_quantize`` (its ftype for Q8_0 / Q6_K / Q4_K_M / Q5_K_M; ``pure`` with the
   Q4_K_M / Q5_K_M ftype for the plain Q4_K / Q5_K) and ``moetier.weights.gguf_write`` (the
   code behind ``moetier quantize``). Per type: the tensor types chosen, the fraction of
   identical blocks, the max |difference| of the dequantized values (gguf-py). moetier's file
   from the HF checkpoint directory is also compared with the one from the F32 GGUF.
2. llama.cpp loads moetier's Q8_0 and Q4_K_M files (``use_extra_bufts=False``: its CPU repack
   path is not what is compared) and decodes ``--tokens`` greedy tokens from fixed prompt ids;
   moetier decodes the same file. Reported: identical tokens, the first divergence, and per
   step the max |logit difference| between the engines and of each against the float32
   dequantization of the same file run by moetier (the reference both approximate: llama.cpp
   quantizes activations to 8 bits for its K-quant / Q8_0 dot products, moetier keeps them
   float32).

3. The other families moetier writes (tiny random-weight checkpoints of tests/helpers: qwen2_moe
   with shared experts and biases, mixtral with its permuted q/k rows and a SentencePiece
   vocabulary, olmoe with full-width q/k norms (as many KV heads as heads: llama.cpp's OLMoE
   has no GQA), qwen3_moe) at Q8_0: llama.cpp loads each file and decodes 16 greedy tokens;
   moetier, teacher-forced on llama.cpp's tokens, gives its own argmax per step (a differing
   step is reported with moetier's top-2 logit gap there) and the max |logit difference|.

Writes ``bench/results/gguf_quantize.json``. The llama.cpp side runs in the bench's llama-cpp-python
venv (``bench.scenarios.llama_python``) as ``python bench/bench_gguf_quantize.py llama ...``;
this file imports only the standard library at the top for that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "gguf_quantize.json"
# moetier --type -> (llama_ftype, pure)
LLAMA_FTYPES = {"Q8_0": (7, False), "Q6_K": (18, False), "Q5_K": (17, True), "Q4_K": (15, True),
                "Q5_K_M": (17, False), "Q4_K_M": (15, False)}
PROMPT_IDS = [1750, 324, 486, 262, 731, 15, 423, 412, 264, 1024, 300, 17, 88, 962, 411, 262]


# ----------------------------------------------------------------------------- llama.cpp side


def llama_quantize(src: str, dst: str, ftype: int, pure: bool, threads: int) -> dict[str, Any]:
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.pure, p.nthread = ftype, pure, threads
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    return {"rc": rc, "seconds": time.perf_counter() - t0, "llama_cpp_python": llama_cpp.__version__}


def llama_generate(model: str, prompt: list[int], tokens: int, threads: int, logits_out: str) -> dict[str, Any]:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=len(prompt) + tokens + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, logits_all=False, verbose=False, use_extra_bufts=False)
    n_vocab = llm.n_vocab()
    rows, ids = [], []
    llm.eval(prompt)
    for _ in range(tokens):
        row = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy()
        rows.append(row)
        ids.append(int(row.argmax()))
        llm.eval([ids[-1]])
    np.save(logits_out, np.stack(rows).astype(np.float32))
    return {"ids": ids, "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
            "use_extra_bufts": False}


def llama_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_gguf_quantize.py llama")
    ap.add_argument("what", choices=["quantize", "generate"])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--ftype", type=int, default=0)
    ap.add_argument("--pure", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-ids", default=",".join(map(str, PROMPT_IDS)))
    a = ap.parse_args(argv)
    if a.what == "quantize":
        res = llama_quantize(a.model, a.out, a.ftype, a.pure, a.threads)
    else:
        res = llama_generate(a.model, [int(x) for x in a.prompt_ids.split(",")], a.tokens, a.threads, a.out)
    print("LLAMA_RESULT " + json.dumps(res))
    return 0


def run_llama(py: Path, *args: str) -> dict[str, Any]:
    p = subprocess.run([str(py), __file__, "llama", *args], capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("LLAMA_RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"llama.cpp worker failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(line[len("LLAMA_RESULT "):])


# ----------------------------------------------------------------------------- moetier side


def compare_files(a: Path, b: Path) -> dict[str, Any]:
    """Tensor by tensor: types, identical blocks, max |dequantized difference| (gguf-py)."""
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    out: dict[str, Any] = {"tensors": len(ta), "same_names": set(ta) == set(tb), "type_mismatch": [],
                           "blocks": 0, "identical_blocks": 0, "max_abs_diff": 0.0, "differing_tensors": {}}
    for name, x in ta.items():
        y = tb.get(name)
        if y is None:
            continue
        if x.tensor_type != y.tensor_type:
            out["type_mismatch"].append([name, x.tensor_type.name, y.tensor_type.name])
            continue
        bs, ts = gguf.GGML_QUANT_SIZES[x.tensor_type]
        ra = np.asarray(x.data).view(np.uint8).reshape(-1, ts)
        rb = np.asarray(y.data).view(np.uint8).reshape(-1, ts)
        same = (ra == rb).all(axis=1)
        out["blocks"] += same.size
        out["identical_blocks"] += int(same.sum())
        da = gguf.quants.dequantize(np.asarray(x.data), x.tensor_type).astype(np.float32)
        db = gguf.quants.dequantize(np.asarray(y.data), y.tensor_type).astype(np.float32)
        d = float(np.abs(da - db).max()) if da.size else 0.0
        out["max_abs_diff"] = max(out["max_abs_diff"], d)
        if not same.all():
            out["differing_tensors"][name] = {"type": x.tensor_type.name, "blocks": int(same.size),
                                              "differing": int((~same).sum()), "max_abs_diff": d}
    out["identical_fraction"] = out["identical_blocks"] / max(1, out["blocks"])
    return out


def types_of(path: Path) -> dict[str, int]:
    import gguf

    c: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        c[t.tensor_type.name] = c.get(t.tensor_type.name, 0) + 1
    return dict(sorted(c.items()))


def moetier_logits(path: Path, prompt: list[int], forced: list[int] | None, tokens: int) -> tuple[list[int], Any]:
    """Greedy ``tokens`` steps (or teacher-forced on ``forced``): (ids, logits [tokens, vocab])."""
    import torch

    import moetier

    m = moetier.load(path, tokenizer=False)
    seq = m.new_sequence(capacity=len(prompt) + tokens + 8)
    rows, ids = [], []
    with torch.no_grad():
        logits = m.step([(seq, prompt)])[0]
        for i in range(tokens):
            rows.append(logits.float().clone())
            ids.append(int(logits.argmax()) if forced is None else forced[i])
            logits = m.step([(seq, [ids[-1]])])[0]
    return ids, torch.stack(rows)


FAMILIES = {  # name -> (family, overrides) for tests.helpers.checkpoints.make_tiny_checkpoint
    "qwen2_moe": ("qwen2_moe", {}),
    "mixtral": ("mixtral", {"vocab_size": 400, "intermediate_size": 32}),
    "olmoe": ("olmoe", {"num_key_value_heads": 4, "intermediate_size": 32}),
    "qwen3_moe": ("qwen3_moe", {}),
}


def families(py: Path, w: Path, res: dict[str, Any], threads: int, tokens: int = 16) -> None:
    import numpy as np

    from moetier.weights.gguf_write import write_gguf
    from scripts.make_gguf_fixtures import spm_tokenizer
    from tests.helpers.checkpoints import make_tiny_checkpoint

    prompt = [5, 17, 40, 9, 33, 101, 7, 60]
    res["families"] = {}
    for name, (family, over) in FAMILIES.items():
        ck = make_tiny_checkpoint(w, family, seed=3, name=f"tiny-{name}", **over)
        if family == "mixtral":
            spm_tokenizer(ck, over["vocab_size"])
        f = w / f"tiny-{name}-Q8_0.gguf"
        write_gguf(ck, f, "Q8_0")
        npy = w / f"tiny-{name}.npy"
        lg = run_llama(py, "generate", str(f), str(npy), "--threads", str(threads), "--tokens", str(tokens),
                       "--prompt-ids", ",".join(map(str, prompt)))
        ll = np.load(npy)
        _, ml = moetier_logits(f, prompt, lg["ids"], tokens)  # teacher-forced on llama.cpp's tokens
        ml = ml.numpy()
        diff = [{"step": i, "llama_cpp": lg["ids"][i], "moetier": int(ml[i].argmax()),
                 "moetier_top2_gap": float(np.diff(np.sort(ml[i])[-2:])[0])}
                for i in range(tokens) if int(ml[i].argmax()) != lg["ids"][i]]
        res["families"][name] = {"loads_in_llama_cpp": True, "steps": tokens, "argmax_differs_at": diff,
                                 "max_abs_logit_diff": float(np.abs(ml - ll).max()),
                                 "logit_scale_max_abs": float(np.abs(ml).max())}
        print(f"{name}: llama.cpp ran moetier's Q8_0 file; argmax differs at {len(diff)} of {tokens} steps, "
              f"max |dlogit| {res['families'][name]['max_abs_logit_diff']:.3g}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "llama":
        return llama_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(LLAMA_FTYPES))
    ap.add_argument("--generate", default="Q8_0,Q4_K_M", help="types whose moetier file llama.cpp runs")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    from bench.scenarios import PEERS, llama_cpp_src, llama_python
    from moetier.weights.gguf_write import write_gguf

    torch.set_num_threads(a.threads)
    py = llama_python()
    emb = REPO / "moetier" / "data" / "embedded"
    res: dict[str, Any] = {"model": "moetier/data/embedded", "threads": a.threads, "tokens": a.tokens,
                           "prompt_ids": PROMPT_IDS, "quantize": {}, "generate": {}}
    with tempfile.TemporaryDirectory(prefix="moetier-ggufq-") as tmp:
        w = Path(tmp)
        f32 = w / "emb-f32.gguf"
        subprocess.run([sys.executable, str(PEERS), "convert", "--llama-cpp-dir", str(llama_cpp_src()), str(emb),
                        "--outfile", str(f32), "--outtype", "f32"], check=True, capture_output=True)
        for t in a.types.split(","):
            ftype, pure = LLAMA_FTYPES[t]
            ours, ours_hf, theirs = w / f"moetier-{t}.gguf", w / f"moetier-hf-{t}.gguf", w / f"llama-{t}.gguf"
            rep = write_gguf(f32, ours, t)
            write_gguf(emb, ours_hf, t)
            lq = run_llama(py, "quantize", str(f32), str(theirs), "--ftype", str(ftype), "--threads",
                           str(a.threads), *(["--pure"] if pure else []))
            assert lq["rc"] == 0, lq
            cmp = compare_files(theirs, ours)
            hf = compare_files(ours, ours_hf)
            res["quantize"][t] = {
                "llama_ftype": ftype, "llama_pure": pure, "moetier_types": types_of(ours),
                "llama_types": types_of(theirs), "vs_llama_cpp": cmp,
                "hf_source_vs_f32_gguf_source_identical_fraction": hf["identical_fraction"],
                "moetier_seconds": rep.seconds, "llama_cpp_seconds": lq["seconds"],
                "fallback_notes": rep.notes, "llama_cpp_python": lq["llama_cpp_python"],
            }
            print(f"{t}: {cmp['identical_blocks']}/{cmp['blocks']} blocks identical to llama.cpp's, "
                  f"max |dequantized diff| {cmp['max_abs_diff']:.3g}, type mismatches {len(cmp['type_mismatch'])}",
                  file=sys.stderr)
        for t in [x for x in a.generate.split(",") if x]:
            ours = w / f"moetier-{t}.gguf"
            if not ours.exists():
                write_gguf(f32, ours, t)
            deq = w / f"deq-{t}.gguf"
            write_gguf(ours, deq, "F32")
            npy = w / f"llama-logits-{t}.npy"
            lg = run_llama(py, "generate", str(ours), str(npy), "--threads", str(a.threads), "--tokens",
                           str(a.tokens), "--prompt-ids", ",".join(map(str, PROMPT_IDS)))
            l_logits = torch.from_numpy(np.load(npy))
            m_ids, m_logits = moetier_logits(ours, PROMPT_IDS, None, a.tokens)
            # the float32 reference (dequantized file, moetier) on moetier's tokens
            _, ref = moetier_logits(deq, PROMPT_IDS, m_ids, a.tokens)
            same = next((i for i, (x, y) in enumerate(zip(lg["ids"], m_ids)) if x != y), None)
            n = a.tokens if same is None else same + 1  # steps with the same history in both engines
            res["generate"][t] = {
                "identical_tokens": lg["ids"] == m_ids, "first_divergence": same,
                "llama_cpp_ids": lg["ids"], "moetier_ids": m_ids,
                "steps_compared": n,
                "max_abs_logit_diff_llama_vs_moetier": float((l_logits[:n] - m_logits[:n]).abs().max()),
                "max_abs_logit_diff_llama_vs_f32_reference": float((l_logits[:n] - ref[:n]).abs().max()),
                "max_abs_logit_diff_moetier_vs_f32_reference": float((m_logits[:n] - ref[:n]).abs().max()),
                "logit_scale_max_abs": float(ref[:n].abs().max()),
                "llama_cpp_system_info": lg["system_info"], "use_extra_bufts": lg["use_extra_bufts"],
            }
            g = res["generate"][t]
            print(f"{t}: llama.cpp on moetier's file: identical greedy tokens {g['identical_tokens']} "
                  f"({a.tokens} steps); max |dlogit| llama-moetier {g['max_abs_logit_diff_llama_vs_moetier']:.3g}, "
                  f"llama-f32 {g['max_abs_logit_diff_llama_vs_f32_reference']:.3g}, "
                  f"moetier-f32 {g['max_abs_logit_diff_moetier_vs_f32_reference']:.3g}", file=sys.stderr)
        families(py, w, res, a.threads)
    res["command"] = "python -m bench.bench_gguf_quantize " + " ".join(argv)
    res["cpu"] = os.uname().machine
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
