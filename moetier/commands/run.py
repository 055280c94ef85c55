"""``moetier run [MODEL_DIR] --prompt TEXT``: stream a completion, then print speed and memory.

Extension point: :func:`add_load_arguments` adds the options that configure loading and
:func:`load_kwargs` turns them into ``moetier.load(**kwargs)``; other parts (the weight
hierarchy's ``--max-ram``/``--policy``/...) extend these two functions, and both ``run``
and ``chat`` use them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# hooks: (add_arguments(parser), kwargs(args) -> dict) registered by other modules
LOAD_OPTION_HOOKS: list[tuple[Any, Any]] = []


def _hierarchy_hook() -> tuple[Any, Any]:
    from moetier.weights import tiered

    return tiered.add_arguments, tiered.load_kwargs


LOAD_OPTION_HOOKS.append(_hierarchy_hook())


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None,
                   help="checkpoint directory (default: the embedded model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weight/activation precision (auto: bfloat16 for bf16 checkpoints)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch and the native kernels)")
    p.add_argument("--no-native", action="store_true",
                   help="decode with the torch path instead of the native kernels (also: MOETIER_NATIVE=0)")
    for add, _ in LOAD_OPTION_HOOKS:
        add(p)


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": args.dtype, "threads": args.threads}
    if getattr(args, "no_native", False):
        kw["native"] = False
    for _, get in LOAD_OPTION_HOOKS:
        kw.update(get(args))
    return kw


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text from a prompt and report speed",
                       description="Generate a completion, streaming it, then print prefill/decode "
                                   "tokens per second and peak RSS.")
    add_load_arguments(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    from moetier.distributed.launch import add_arguments as add_ep_arguments

    add_ep_arguments(p)
    p.set_defaults(func=main)


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(args: argparse.Namespace) -> int:
    import moetier

    if getattr(args, "ep", None) is not None:
        from moetier.distributed.launch import run_main

        return run_main(args, load_kwargs(args), lambda model, extra: generate_and_print(args, model, extra))
    return generate_and_print(args, moetier.load(args.model_dir, **load_kwargs(args)))


def generate_and_print(args: argparse.Namespace, model: Any, extra: Any = None) -> int:
    """Generate and print (``extra()``, if given, adds figures to the report after generating)."""
    ids = model.encode_prompt(args.prompt, chat=args.chat)
    model.warmup()

    def stream(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    res = model.generate_ids(ids, args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                             stop=args.stop, on_text=None if args.json else stream)
    rss = peak_rss_bytes()
    from moetier.weights.tiered import run_report

    report = run_report(model, res.decode_tokens_per_s)  # weight hierarchy ({} when all in RAM)
    if extra is not None:
        report.update(extra())
    if args.json:
        print(json.dumps({
            "text": res.text,
            "finish_reason": res.finish_reason,
            "prompt_tokens": len(res.prompt_ids),
            "completion_tokens": len(res.ids),
            "prefill_tokens_per_s": res.prefill_tokens_per_s,
            "decode_tokens_per_s": res.decode_tokens_per_s,
            "peak_rss_bytes": rss,
            "decode_path": "native" if model.native_reason is None else "torch",
            "native_unavailable_reason": model.native_reason,
            "native_isa": native_isa(model),
            **report,
        }))
    else:
        if "bytes_per_token" in report:
            bpt = report["bytes_per_token"]
            pred = report.get("predicted_decode_tokens_per_s")
            print(f"[hierarchy] hit rate {report['hit_rate'] or 0:.1%}, "
                  f"store {(bpt['store'] or 0) / 1e6:.1f} MB/token, "
                  f"stall {report['stall_seconds']:.2f} s"
                  + (f", planner predicts {pred:.1f} tok/s" if pred else ""), file=sys.stderr)
        if "expert_parallel" in report:
            ep = report["expert_parallel"]
            r0 = ep["per_rank"][0]
            print(f"[expert parallel] {ep['ranks']} ranks, rank 0 dispatched {r0['dispatch_bytes_sent'] / 1e6:.2f} MB, "
                  f"combined {r0['combine_bytes_recv'] / 1e6:.2f} MB, communication {r0['comm_s']:.2f} s, "
                  f"expert compute {r0['compute_s']:.2f} s", file=sys.stderr)
        print()
        print(f"\n[{len(res.prompt_ids)} prompt tokens, {len(res.ids)} generated, finish: {res.finish_reason}] "
              f"prefill {res.prefill_tokens_per_s:.1f} tok/s, decode {res.decode_tokens_per_s:.1f} tok/s, "
              f"peak RSS {rss / 2**20:.0f} MiB, "
              + (f"native decode ({native_isa(model)})" if model.native_reason is None
                 else f"torch decode ({model.native_reason})"))
    return 0


def native_isa(model) -> str | None:
    """The native weight kernels' instruction set (``None`` on the torch path)."""
    if model.native_reason is not None:
        return None
    from moetier import native

    return native.isa()
