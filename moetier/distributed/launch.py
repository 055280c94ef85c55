"""Starting expert-parallel jobs: ``moetier run --ep P`` spawns P local ranks torchrun-style
(one process per rank, ``MASTER_ADDR=127.0.0.1``, a free port, ``RANK``/``WORLD_SIZE``);
``--ep auto`` is a rank started by torchrun. :func:`run_rank` is what each rank runs.
"""

from __future__ import annotations

import argparse
import os
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
          timeout_s: float | None = None) -> list[int]:
    """Run ``cmd`` as ``world`` local ranks; returns their exit codes (rank order). When a rank
    fails, the others are given ``SPAWN_GRACE_S`` to exit on their own, then terminated."""
    base = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
    procs = []
    for r in range(world):
        e = {**base, "RANK": str(r), "LOCAL_RANK": str(r)}
        out = subprocess.DEVNULL if (quiet_followers and r) else None
        procs.append(subprocess.Popen(list(cmd), env=e, stdout=out))
    t0 = time.monotonic()
    failed_at: float | None = None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if (failed_at is not None and now - failed_at > SPAWN_GRACE_S) or \
                    (timeout_s is not None and now - t0 > timeout_s):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return [p.returncode for p in procs]


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


def run_main(args: argparse.Namespace, load_kw: dict[str, Any], report: Any) -> int:
    """``moetier run ... --ep``: spawn local ranks, or be one rank. ``report(model, extra)``
    is the single-process run's generate-and-print, called on rank 0."""
    ep = parse_ep(args.ep)
    hier = {k: v for k, v in load_kw.items() if k not in ("dtype", "threads", "native")}
    if hier:
        raise ConfigError(f"--ep: weight-hierarchy options ({', '.join(sorted(hier))}) are not supported under "
                          "expert parallelism yet (each rank keeps its experts in RAM)")
    if ep != "auto":
        make_placement(args.model_dir, ep, args.redundant_experts, args.placement, args.routing_profile)  # fail early
        argv = list(sys.argv[1:])
        i = argv.index("--ep") if "--ep" in argv else -1
        if i >= 0:
            argv[i + 1] = "auto"
        else:
            argv = [a if not a.startswith("--ep=") else "--ep=auto" for a in argv]
        codes = spawn([sys.executable, "-m", "moetier", *argv], ep)
        bad = [(r, c) for r, c in enumerate(codes) if c]
        return 0 if not bad else (bad[0][1] if bad[0][1] and bad[0][1] > 0 else 1)
    return run_rank(args, load_kw, report)


def run_rank(args: argparse.Namespace, load_kw: dict[str, Any], report: Any) -> int:
    import moetier.distributed as ep
    from moetier.planner.cluster import direct_remote_pairs, pair_bytes

    rank, world = ep.init()
    try:
        placement = make_placement(args.model_dir, world, args.redundant_experts, args.placement,
                                   args.routing_profile)
        kw = {k: v for k, v in load_kw.items() if k != "native"}
        if kw.get("threads") is None:  # ranks sharing a machine share its cores (OpenMP workers spin-wait)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
            kw["threads"] = max(1, (os.cpu_count() or 1) // max(1, local))
        model, group = ep.load(args.model_dir, rank, world, placement, **kw)
        if rank != 0:
            group.serve(model)
            return 0

        def extra() -> dict[str, Any]:
            per_rank = group.stop()
            s, H, k = model.spec, model.spec.hidden_size, model.spec.top_k
            dt = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}[str(model.dtype)]
            out_pairs, _ = direct_remote_pairs(k, world)
            return {"expert_parallel": {
                "ranks": world, "placement": placement.to_json()["device_experts"],
                "per_rank": per_rank,
                "pair_bytes": pair_bytes(H, dt),
                "planner_remote_pairs_per_token": out_pairs,
                "measured_remote_pairs_per_token": per_rank[0]["remote_pairs"] / max(
                    1, (per_rank[0]["remote_pairs"] + per_rank[0]["local_pairs"]) // k) if s.top_k else 0.0,
            }}

        return report(model, extra)
    finally:
        ep.shutdown()
