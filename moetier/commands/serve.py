"""``moetier serve``: an OpenAI-compatible HTTP server (continuous batching) for a model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from moetier.commands.run import add_load_arguments, load_kwargs
from moetier.errors import MoetierError
from moetier.weights.plan import parse_bytes


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
    add_load_arguments(p)  # MODEL_DIR, --dtype, --threads and the weight hierarchy's options
    # Serving defaults to float32: Model.step is batch-invariant in float32 (a request's greedy answer
    # does not depend on what it shares the flat batch with) and RSS stays flat under load; in bfloat16
    # logits move by ~3e-2 with the batch and RSS grew (bench/results/serve.json). --dtype auto/bfloat16
    # halves the weight bytes when memory matters more.
    p.set_defaults(dtype="float32")
    for action in p._actions:
        if action.dest == "dtype":
            action.help = (
                "weight/activation precision (serve default: float32, batch-invariant; auto: the checkpoint's)"
            )
    if "--max-ram" not in p._option_string_actions:  # fallback until a load hook provides it
        p.add_argument(
            "--max-ram",
            default=None,
            metavar="SIZE",
            help="RAM budget for weights, e.g. 8G (needs the weight hierarchy)",
        )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MOETIER_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $MOETIER_API_KEY, else none; "
        "prefer the variable: a key on the command line is visible in ps)",
    )
    p.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics without the API key (for a scraper on a trusted network); /health is always open",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="on SIGTERM/Ctrl-C, seconds to let running requests finish before ending them with an error "
        "(streams get an error chunk and [DONE]) (default 10)",
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
    p.add_argument(
        "--max-body",
        default="auto",
        metavar="SIZE",
        help="largest request body, e.g. 1MiB (default auto: sized from the context window, at most 32MiB)",
    )
    p.add_argument(
        "--request-ram",
        default="auto",
        metavar="SIZE",
        help="memory for request bodies being read and parsed together, e.g. 64MB; a request that would need "
        "more waits (503) or, alone, is refused (413). With --max-ram it is part of the budget, with the token ids "
        "of waiting and running requests (default auto: max(16MB, 5%% of --max-ram); without --max-ram: 4 "
        "bodies of --max-body)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also serve requests whose Host header is NAME (repeatable; '.example.com' for a domain, '*' for "
        "any). Served by default: localhost, IP addresses and the --host name (DNS-rebinding protection)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000; '*' for any) call the API, with CORS "
        "headers (repeatable); requests with any other Origin header are refused (403)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="seconds a client may take to send a request's headers, or pause while sending its body (default 15)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=256,
        metavar="N",
        help="open connections allowed; more are answered 503 and closed (default 256)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="model id clients send (default: the directory name, or 'moetier-embedded')",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log verbosity (default info: one access line per request)")
    from moetier.distributed.launch import add_arguments as add_ep_arguments

    add_ep_arguments(p)
    p.set_defaults(func=run)


def _request_ram(args: argparse.Namespace) -> int | None:
    """``--request-ram`` in bytes; auto: from ``--max-ram`` when given, else None (the server's default)."""
    if getattr(args, "request_ram", "auto") != "auto":
        return parse_bytes(args.request_ram, "--request-ram")
    if getattr(args, "max_ram", None) is not None:
        from moetier.serve import memory

        return memory.default_request_ram(parse_bytes(args.max_ram, "--max-ram"))
    return None


def _load_model(args: argparse.Namespace) -> Any:
    """Load like ``moetier run`` (same options and hooks). With weight-hierarchy options, the RAM
    budget reserves KV cache for this server's whole batch (``--max-batch``) at the model's context,
    and with ``--max-ram`` the request memory (``serve/memory.py``)."""
    import inspect

    import moetier
    from moetier.weights import tiered

    opts = load_kwargs(args)
    if tiered.hierarchy_options_given(opts):
        params = inspect.signature(tiered.load).parameters
        if "batch" in params:
            opts.setdefault("batch", args.max_batch)
        if "context" in params and opts.get("context") is None:
            from moetier.runtime import EMBEDDED_DIR
            from moetier.spec import load_spec

            opts["context"] = load_spec(args.model_dir or EMBEDDED_DIR).max_position_embeddings
        if opts.get("max_ram") is not None and "request_bytes" in params:
            from moetier.serve import memory

            opts["request_bytes"] = memory.request_memory(
                context=int(opts["context"]), request_ram=_request_ram(args) or 0, max_queue=args.max_queue,
                max_batch=args.max_batch).total
    return moetier.load(args.model_dir, **opts)


def run(args: argparse.Namespace) -> int:
    from moetier.extras import require

    require("serve", "moetier serve")  # before the model loads: one line naming the extra
    for flag, v in (
        ("--max-queue", args.max_queue),
        ("--max-batch", args.max_batch),
        ("--max-step-tokens", args.max_step_tokens),
    ):
        if v < 1:
            raise MoetierError(f"{flag}: must be at least 1, got {v}")
    if args.max_connections < 1:
        raise MoetierError(f"--max-connections: must be at least 1, got {args.max_connections}")
    if not args.shutdown_timeout > 0:
        raise MoetierError(f"--shutdown-timeout: must be > 0 seconds, got {args.shutdown_timeout}")
    if not args.read_timeout > 0:
        raise MoetierError(f"--read-timeout: must be > 0 seconds, got {args.read_timeout}")
    if not 0 <= args.port <= 65535:
        raise MoetierError(f"--port: expected 0..65535, got {args.port}")
    if args.max_body != "auto":
        parse_bytes(args.max_body, "--max-body")  # checked before loading
    _request_ram(args)  # checked before loading
    from moetier.commands.run import check_args

    check_args(args)  # load options (threads, sizes, model dir) checked before loading
    if args.model_dir is not None and not Path(args.model_dir).is_dir() and not (
            Path(args.model_dir).suffix == ".gguf" and Path(args.model_dir).is_file()):
        raise MoetierError(f"MODEL_DIR: {args.model_dir} is not a directory or a .gguf file")
    if getattr(args, "ep", None) is not None:  # expert parallelism: rank 0 serves (docs/expert-parallel.md)
        from moetier.distributed.launch import serve_main

        return serve_main(args, load_kwargs(args), lambda model, **kw: _app(args, model, **kw),
                          lambda app: _serve(args, app))
    return _serve(args, _app(args, _load_model(args)))


def _app(args: argparse.Namespace, model: Any, **kw: Any) -> Any:
    """The server's app for ``model`` (``kw``: more ``build_app`` options, e.g. a backend)."""
    from moetier.serve.app import build_app

    max_body = None if args.max_body == "auto" else parse_bytes(args.max_body, "--max-body")
    request_ram = _request_ram(args)
    name = args.served_model_name or (Path(args.model_dir).resolve().name.removesuffix(".gguf") if args.model_dir
                                      else "moetier-embedded")
    return build_app(
        model,
        model_name=name,
        api_key=args.api_key,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_step_tokens=args.max_step_tokens,
        max_body_bytes=max_body,
        request_ram=request_ram,
        host=args.host,
        allow_hosts=args.allow_host,
        allow_origins=args.allow_origin,
        read_timeout=args.read_timeout,
        max_connections=args.max_connections,
        metrics_public=args.metrics_public,
        **kw,
    )


def _serve(args: argparse.Namespace, app: Any) -> int:
    from moetier.serve.app import serve

    name = app.state.serving.model_name
    print(f"moetier: serving {name} on http://{args.host}:{args.port}/v1", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"moetier: warning: listening on {args.host} without --api-key", file=sys.stderr, flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level, shutdown_timeout=args.shutdown_timeout)
    return 0
