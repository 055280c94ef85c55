"""``moetier run [MODEL_DIR] --prompt TEXT``: stream a completion, then print speed and memory.

Extension point: :func:`add_load_arguments` adds the options that configure loading and
:func:`load_kwargs` turns them into ``moetier.load(**kwargs)``; other parts (the weight
hierarchy's ``--max-ram``/``--policy``/...) extend these two functions, and both ``run``
and ``chat`` use them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moetier.errors import MoetierError

# hooks: (add_arguments(parser), kwargs(args) -> dict) registered by other modules
LOAD_OPTION_HOOKS: list[tuple[Any, Any]] = []


def _hierarchy_hook() -> tuple[Any, Any]:
    from moetier.weights import tiered

    return tiered.add_arguments, tiered.load_kwargs


def _quantize_hook() -> tuple[Any, Any]:
    from moetier.quant import atload

    return atload.add_arguments, atload.load_kwargs


LOAD_OPTION_HOOKS.append(_hierarchy_hook())
LOAD_OPTION_HOOKS.append(_quantize_hook())


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None,
                   help="checkpoint directory or llama.cpp .gguf file (default: the embedded model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weight/activation precision (auto: bfloat16 for bf16 checkpoints)")
    p.add_argument("--threads", type=_threads_arg, default=None, metavar="N",
                   help="CPU threads for torch and the native kernels (default: auto = the cores this process "
                        "may use minus those other work is using, re-chosen while running; a fixed N is "
                        "fastest only on an otherwise idle machine)")
    p.add_argument("--no-native", action="store_true",
                   help="decode with the torch path instead of the native kernels (also: MOETIER_NATIVE=0)")
    for add, _ in LOAD_OPTION_HOOKS:
        add(p)


def _threads_arg(v: str) -> int | None:
    if v == "auto":
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {v!r}")
    return n


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": args.dtype, "threads": args.threads}
    if getattr(args, "context", None) is not None:
        kw["context"] = args.context
    if getattr(args, "no_native", False):
        kw["native"] = False
    for _, get in LOAD_OPTION_HOOKS:
        kw.update(get(args))
    return kw


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, metavar="N",
                   help="tokens to generate at most (default 128; also stops at the context limit)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely tokens only (default 0 = all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the most likely tokens whose probabilities sum to p (default 1 = all)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for sampling (default: a fresh one each run; greedy needs none)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def text_arg(value: str | None, flag: str) -> str | None:
    """A command-line string that must be text: arguments that are not valid UTF-8 reach Python
    as lone surrogates (``\\udcff``); refuse them naming the flag and the byte."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        byte = f"0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else repr(bad)
        raise MoetierError(f"{flag}: not valid UTF-8 text (byte {byte} at character {e.start})") from None
    return value


def check_args(args: argparse.Namespace) -> None:
    """Validate what can be checked without the model, before anything loads (run, chat, serve)."""
    from moetier.generation import GenerationError, SamplingParams

    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise MoetierError(f"--threads {args.threads}: expected a whole number >= 1")
    if getattr(args, "max_tokens", 0) < 0:
        raise MoetierError(f"--max-tokens {args.max_tokens}: expected a whole number >= 0")
    if getattr(args, "context", None) is not None and args.context < 1:
        raise MoetierError(f"--context {args.context}: expected a whole number of tokens >= 1")
    if hasattr(args, "temperature"):
        try:
            SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        except GenerationError as e:  # "top_p must be in (0, 1], got 2.0" -> "--top-p ..."
            name = str(e).split(" ", 1)[0]
            raise MoetierError(f"--{name.replace('_', '-')}{str(e)[len(name):]}") from None
        if args.seed is not None and not 0 <= args.seed < 2**63:
            raise MoetierError(f"--seed {args.seed}: expected 0 .. 2**63-1")
    for flag in ("prompt", "system", "model_dir", "plan", "profile"):
        text_arg(getattr(args, flag, None), "--" + flag.replace("_", "-") if flag != "model_dir" else "MODEL_DIR")
    for s in getattr(args, "stop", None) or []:
        text_arg(s, "--stop")
        if not s:
            raise MoetierError("--stop: an empty stop string would stop at once")
    md = getattr(args, "model_dir", None)
    if md is not None and not Path(md).is_dir() and not (Path(md).suffix == ".gguf" and Path(md).is_file()):
        raise MoetierError(f"MODEL_DIR {md}: not a directory or a .gguf file (expected a checkpoint directory "
                           "with config.json and *.safetensors, or a llama.cpp .gguf file)")
    if getattr(args, "max_ram", None) is not None:
        from moetier.weights.plan import parse_bytes

        parse_bytes(args.max_ram, "--max-ram")
    if getattr(args, "expert_cache", None) is not None:
        from moetier.weights.plan import parse_cache_option

        parse_cache_option(args.expert_cache, "--expert-cache")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text from a prompt and report speed",
                       description="Generate a completion, streaming it, then print prefill/decode "
                                   "tokens per second and peak RSS.",
                       epilog="examples:\n"
                              "  moetier run --prompt \"And the LORD said\" --max-tokens 32 --threads 1\n"
                              "  moetier run --prompt \"ROMEO:\" --max-ram 1G --expert-cache 25% --json")
    add_load_arguments(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    from moetier.distributed.launch import add_arguments as add_ep_arguments

    add_ep_arguments(p)
    p.set_defaults(func=main)


@contextlib.contextmanager
def loading_notice(what: str, stream: Any = None, enabled: bool | None = None, after: float = 1.0,
                   every: float = 1.0) -> Iterator[None]:
    """On a terminal, say that ``what`` is loading once it takes more than ``after`` seconds and
    tick the elapsed time until done (the line is then cleared). Quiet when ``stream`` is not a
    tty (or ``enabled`` is False: ``--json``)."""
    stream = stream if stream is not None else sys.stderr
    on = enabled if enabled is not None else bool(getattr(stream, "isatty", lambda: False)())
    if not on:
        yield
        return
    done = threading.Event()
    t0 = time.perf_counter()
    shown = []

    def tick() -> None:
        if done.wait(after):
            return
        while not done.is_set():
            stream.write(f"\r[loading {what}: {time.perf_counter() - t0:.0f} s]")
            stream.flush()
            shown.append(True)
            done.wait(every)

    th = threading.Thread(target=tick, daemon=True)
    th.start()
    try:
        yield
    finally:
        done.set()
        th.join()
        if shown:
            stream.write(f"\r[loaded {what} in {time.perf_counter() - t0:.1f} s]\n")
            stream.flush()


def model_label(args: argparse.Namespace) -> str:
    return str(args.model_dir) if getattr(args, "model_dir", None) else "the embedded model"


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(args: argparse.Namespace) -> int:
    import moetier

    check_args(args)
    if getattr(args, "ep", None) is not None:
        from moetier.distributed.launch import run_main

        return run_main(args, load_kwargs(args), lambda model, extra: generate_and_print(args, model, extra))
    with loading_notice(model_label(args), enabled=False if args.json else None):
        model = moetier.load(args.model_dir, **load_kwargs(args))
    return generate_and_print(args, model)


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
        paths = model.compute_paths()
        print(json.dumps({
            "text": res.text,
            "finish_reason": res.finish_reason,
            "prompt_tokens": len(res.prompt_ids),
            "completion_tokens": len(res.ids),
            "prefill_tokens_per_s": res.prefill_tokens_per_s,
            "decode_tokens_per_s": res.decode_tokens_per_s,
            "peak_rss_bytes": rss,
            "decode_path": paths["decode"]["path"],
            "native_unavailable_reason": model.native_reason,
            "prefill_path": paths["prefill"]["path"],
            "prefill_path_reason": paths["prefill"]["reason"],
            "compute_paths": paths,
            "threads": model.thread_setting(),
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
