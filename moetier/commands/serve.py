"""``moetier serve``: an OpenAI-compatible HTTP server (continuous batching) for a model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moetier.errors import MoetierError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description=(
            "Serve MODEL_DIR (default: the embedded model) with /v1/models, /v1/completions, "
            "/v1/chat/completions (streaming and not), /health and /metrics. Requests are batched "
            "continuously at decode-step granularity. Binds 127.0.0.1 unless --host is given."
        ),
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL_DIR",
        help="checkpoint directory (config.json + safetensors); default: the embedded model",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--max-ram",
        default=None,
        metavar="SIZE",
        help="RAM budget for weights, e.g. 8G (routed experts beyond it stay on disk)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("MOETIER_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 (default: $MOETIER_API_KEY, else none)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests allowed to wait for a batch slot; more get HTTP 429 (default 64)",
    )
    p.add_argument(
        "--max-batch", type=int, default=16, metavar="N", help="sequences decoded together in one step (default 16)"
    )
    p.add_argument(
        "--max-step-tokens",
        type=int,
        default=2048,
        metavar="N",
        help="flat-batch token budget per step; longer prompts are prefilled in chunks",
    )
    p.add_argument("--max-body", default="4MiB", metavar="SIZE", help="largest request body (default 4MiB)")
    p.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="model id clients send (default: the directory name, or 'moetier-embedded')",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def _bytes(value: str, what: str) -> int:
    from moetier.weights.plan import parse_bytes

    return parse_bytes(value, what)


def run(args: argparse.Namespace) -> int:
    for flag, v in (
        ("--max-queue", args.max_queue),
        ("--max-batch", args.max_batch),
        ("--max-step-tokens", args.max_step_tokens),
    ):
        if v < 1:
            raise MoetierError(f"{flag}: must be at least 1, got {v}")
    if not 0 <= args.port <= 65535:
        raise MoetierError(f"--port: expected 0..65535, got {args.port}")
    max_body = _bytes(args.max_body, "--max-body")
    opts = {}
    if args.max_ram is not None:
        opts["max_ram"] = _bytes(args.max_ram, "--max-ram")
    if args.model is not None and not Path(args.model).is_dir():
        raise MoetierError(f"MODEL_DIR: {args.model} is not a directory")

    import moetier
    from moetier.serve.app import build_app, serve

    model = moetier.load(args.model, **opts)
    name = args.served_model_name or (Path(args.model).resolve().name if args.model else "moetier-embedded")
    app = build_app(
        model,
        model_name=name,
        api_key=args.api_key,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_step_tokens=args.max_step_tokens,
        max_body_bytes=max_body,
    )
    print(f"moetier: serving {name} on http://{args.host}:{args.port}/v1", flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
