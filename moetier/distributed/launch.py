"""Starting expert-parallel jobs: ``moetier run --ep P`` spawns P local ranks torchrun-style
(one process per rank, ``MASTER_ADDR=127.0.0.1``, a free port, ``RANK``/``WORLD_SIZE``);
``--ep auto`` is a rank started by torchrun. :func:`run_rank` is what each rank runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence as Seq
from typing import Any

from moetier.errors import ConfigError

SPAWN_GRACE_S = 15.0  # after one rank exits with an error, how long the others get to notice


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(cmd: Seq[str], world: int, env: dict[str, str] | None = None, quiet_followers: bool = True,
          timeout_s: float | None = None, grace_s: float = SPAWN_GRACE_S) -> list[int]:
    """Run ``cmd`` as ``world`` local ranks; returns their exit codes (rank order). When a rank
    fails, or rank 0 ends (followers never outlive it), the others are given ``grace_s`` to exit
    on their own, then terminated (killed if they do not: a stopped process)."""
    base = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
    procs = []
    t0 = time.monotonic()
    failed_at: float | None = None
    try:
        for r in range(world):
            e = {**base, "RANK": str(r), "LOCAL_RANK": str(r)}
            out = subprocess.DEVNULL if (quiet_followers and r) else None
            procs.append(subprocess.Popen(list(cmd), env=e, stdout=out))
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and (procs[0].returncode is not None or
                                      any(p.returncode not in (None, 0) for p in procs)):
                failed_at = now
            if (failed_at is not None and now - failed_at > grace_s) or \
                    (timeout_s is not None and now - t0 > timeout_s):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.send_signal(signal.SIGCONT)  # a stopped (hung) rank takes its SIGTERM now
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return [p.returncode for p in procs]


def respawn_argv(argv: Seq[str]) -> list[str]:
    """This command line with ``--ep P`` turned into ``--ep auto`` (what each local rank runs)."""
    argv = list(argv)
    if "--ep" in argv:
        argv[argv.index("--ep") + 1] = "auto"
        return argv
    return [a if not a.startswith("--ep=") else "--ep=auto" for a in argv]


def cli_argv(args: argparse.Namespace) -> list[str]:
    """The arguments the CLI parsed (``cli.main`` keeps them), else this process's."""
    return list(getattr(args, "argv", None) or sys.argv[1:])


def job_code(codes: Seq[int]) -> int:
    bad = [c for c in codes if c]
    return 0 if not bad else (bad[0] if bad[0] > 0 else 1)


def parse_ep(value: str) -> str | int:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--ep {value!r}: expected 'auto' (under torchrun) or a number of local ranks") from None
    if n < 1:
        raise ConfigError(f"--ep {n}: expected >= 1 ranks")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert parallelism (docs/expert-parallel.md)")
    g.add_argument("--ep", default=None, metavar="auto|P",
                   help="expert-parallel: 'auto' = this process is a torchrun rank; P = spawn P local ranks")
    g.add_argument("--redundant-experts", type=int, default=0, metavar="R",
                   help="EPLB: R extra copies of the hottest experts (from --routing-profile, default the model's "
                        "routing_profile.json)")
    g.add_argument("--routing-profile", default=None, metavar="FILE",
                   help="per-expert loads for --redundant-experts (routing profile or trace)")
    g.add_argument("--placement", default=None, metavar="FILE",
                   help="expert placement JSON (moetier.ep_placement/1) instead of a computed one")
    g.add_argument("--ep-exchange", default=None, choices=("replicated", "direct"),
                   help="replicated: every rank runs attention and routers, one exchange of expert outputs per MoE "
                        "layer; direct: rank 0 alone runs them and sends rows to the experts' ranks (default: "
                        "see docs/expert-parallel.md)")
    g.add_argument("--ep-restarts", type=int, default=3, metavar="N",
                   help="serve --ep P: restart the local job up to N times after a rank fails (under torchrun: "
                        "its --max-restarts)")


def make_placement(model_dir: Any, world: int, redundant: int = 0, placement_file: str | None = None,
                   routing_profile: str | None = None) -> Any:
    from pathlib import Path

    from moetier.distributed import placement as pl
    from moetier.runtime import EMBEDDED_DIR
    from moetier.spec import load_spec

    d = Path(model_dir) if model_dir is not None else EMBEDDED_DIR
    spec = load_spec(d)
    if placement_file is not None:
        if redundant:
            raise ConfigError("--placement and --redundant-experts: pass one (the file already says the copies)")
        return pl.load(placement_file, spec.num_experts, world)
    if redundant == 0:
        return pl.contiguous(spec.num_experts, world)
    prof = routing_profile or (d / "routing_profile.json")
    if not Path(prof).is_file():
        raise ConfigError(f"--redundant-experts {redundant}: no routing profile ({prof} missing; pass "
                          "--routing-profile FILE)")
    return pl.from_profile(pl.profile_loads(prof), world, redundant)


def check_ep_options(args: argparse.Namespace, load_kw: dict[str, Any]) -> str | int:
    """--ep's value, after refusing what expert parallelism does not support (one line each)."""
    ep = parse_ep(args.ep)
    if load_kw.get("prefetch"):
        raise ConfigError("--ep with --prefetch: not supported (rank 0's router guesses would read experts other "
                          "ranks hold); each rank reads its experts on demand")
    if getattr(args, "ep_restarts", 0) < 0:
        raise ConfigError(f"--ep-restarts {args.ep_restarts}: expected >= 0")
    return ep


def run_main(args: argparse.Namespace, load_kw: dict[str, Any], report: Any) -> int:
    """``moetier run ... --ep``: spawn local ranks, or be one rank. ``report(model, extra)``
    is the single-process run's generate-and-print, called on rank 0."""
    ep = check_ep_options(args, load_kw)
    if ep != "auto":
        make_placement(args.model_dir, ep, args.redundant_experts, args.placement, args.routing_profile)  # fail early
        return job_code(spawn([sys.executable, "-m", "moetier", *respawn_argv(cli_argv(args))], ep))
    return run_rank(args, load_kw, report)


def _load_rank(args: argparse.Namespace, load_kw: dict[str, Any]) -> tuple[Any, Any, Any, int, int]:
    """Join the job and load this rank's share: (model, group, placement, rank, world)."""
    import moetier.distributed as ep

    rank, world = ep.init()
    placement = make_placement(args.model_dir, world, args.redundant_experts, args.placement, args.routing_profile)
    kw = dict(load_kw)  # native: False with --no-native, else decode runs natively under direct (ep.load)
    if kw.get("threads") is None:  # ranks sharing a machine share its cores (OpenMP workers spin-wait)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        pinned = ep.pinned_cpus()  # this rank's own CPUs, or None: share the machine's
        kw["threads"] = len(pinned) if pinned else max(1, (os.cpu_count() or 1) // max(1, local))
    model, group = ep.load(args.model_dir, rank, world, placement,
                           exchange=getattr(args, "ep_exchange", None) or ep.DEFAULT_EXCHANGE, **kw)
    return model, group, placement, rank, world


def report_figures(model: Any, group: Any, placement: Any, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``expert_parallel`` block of ``--json``: every rank's counters next to the planner's formula."""
    from moetier.planner.cluster import direct_remote_pairs, ep_rows_per_token, pair_bytes

    s, H, k, world = model.spec, model.spec.hidden_size, model.spec.top_k, group.world
    dt = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}[str(model.dtype)]
    if getattr(group, "native", None) is not None:  # native decode steps move float32 rows
        dt = "fp32"
    out_pairs, _ = direct_remote_pairs(k, world)
    return {"ranks": world, "exchange": group.exchange, "transport": group.transport,
            "transport_why": group.transport_why, "native_exchange": group.native_exchange is not None,
            "native_exchange_why": group.native_exchange_why,
            "planner_rows_per_token": ep_rows_per_token(group.exchange, k, world),
            "placement": placement.to_json()["device_experts"], "per_rank": per_rank,
            "pair_bytes": pair_bytes(H, dt), "step_timeout_s": group.timeout_s,
            "planner_remote_pairs_per_token": out_pairs,
            "measured_remote_pairs_per_token": per_rank[0]["remote_pairs"] / max(
                1, (per_rank[0]["remote_pairs"] + per_rank[0]["local_pairs"]) // k) if s.top_k else 0.0}


def run_rank(args: argparse.Namespace, load_kw: dict[str, Any], report: Any) -> int:
    import moetier.distributed as ep

    try:
        model, group, placement, rank, world = _load_rank(args, load_kw)
        if rank != 0:
            group.serve(model)
            ep.shutdown()
            return 0
        code = report(model, lambda: {"expert_parallel": report_figures(model, group, placement, group.stop())})
        ep.shutdown()
        return code
    except ep.DistributedError as e:  # one line; leave without the broken group's destructors
        ep.exit_after_fault(str(e))
        raise  # not reached


# ------------------------------------------------------------------------------------ serving
FAULT_GRACE_S = 5.0  # rank 0 answers 503 this long after losing a rank, then exits for a restart
FAULT_RESTART_GRACE_S = 3.0  # then the followers get this long to leave before they are terminated


def serve_main(args: argparse.Namespace, load_kw: dict[str, Any], make_app: Any, serve_app: Any) -> int:
    """``moetier serve ... --ep``: spawn (and restart) local ranks, or be one rank.

    ``make_app(model, **build_app_kw)`` builds the server's app, ``serve_app(app)`` runs it."""
    ep = check_ep_options(args, load_kw)
    if ep == "auto":
        return serve_rank(args, load_kw, make_app, serve_app)
    make_placement(args.model_dir, ep, args.redundant_experts, args.placement, args.routing_profile)  # fail early
    cmd = [sys.executable, "-m", "moetier", *respawn_argv(cli_argv(args))]

    def on_term(signum: int, frame: Any) -> None:  # SIGTERM: stop the ranks (spawn's cleanup) and leave
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for attempt in range(args.ep_restarts + 1):
            codes = spawn(cmd, ep, quiet_followers=False, grace_s=FAULT_RESTART_GRACE_S)
            if codes[0] == 0 or any(c in (-2, 130) for c in codes):  # rank 0 ended cleanly, or Ctrl-C
                return job_code(codes)
            if attempt < args.ep_restarts:
                print(f"moetier: expert-parallel job ended (exit codes {codes}); restarting it "
                      f"({attempt + 1} of {args.ep_restarts})", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # the ranks were stopped by spawn's cleanup
        return 130
    return job_code(codes)


class _RankLost(BaseException):
    """Raised through the serving engine's step so that its thread dies (every request 503)
    instead of failing one batch and going on with a broken group."""


def serve_rank(args: argparse.Namespace, load_kw: dict[str, Any], make_app: Any, serve_app: Any) -> int:
    import threading

    import moetier.distributed as ep
    from moetier.serve.engine import ModelBackend

    try:
        model, group, _, rank, _ = _load_rank(args, load_kw)
        if rank != 0:
            group.serve(model)
            ep.shutdown()
            return 0
    except ep.DistributedError as e:
        ep.exit_after_fault(str(e))

    class EPBackend(ModelBackend):
        def step(self, batch: Any) -> Any:
            try:
                return super().step(batch)
            except ep.DistributedError as e:
                raise _RankLost(str(e)) from None

    app = make_app(model, backend=EPBackend(model), max_restarts=0)
    engine = app.state.serving.engine

    def watch() -> None:  # a fault seen by a step or by the heartbeat: 503 everywhere, then leave
        while group.fault is None:
            time.sleep(0.1)
        engine.dead_reason = f"expert-parallel rank lost: {group.fault}"
        grace = float(os.environ.get("MOETIER_EP_FAULT_GRACE", FAULT_GRACE_S))
        print(f"moetier: {group.fault}; answering 503 for {grace:g} s, then exiting for a restart",
              file=sys.stderr, flush=True)
        time.sleep(grace)
        ep.exit_after_fault(group.fault)

    threading.Thread(target=watch, name="moetier-ep-watch", daemon=True).start()
    # uvicorn re-raises the SIGTERM / SIGINT it stopped on once it has shut down, to the handler it
    # found: noted here, so that rank 0 releases the followers (a clean stop, no "rank 0 exited"
    # error on their side) before it leaves
    stopped_by: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
    serve_app(app)
    try:  # release the followers (they may already be gone: a launcher stops every rank at once)
        group.stop()
        ep.shutdown()
    except ep.DistributedError:
        os._exit(0)
    return 0
