"""One rank of the test job: ``python -m tests.distributed._worker OUT CASES.json`` under a
torchrun-style environment. For each case every rank loads its share; rank 0 records the
prefill logits, a greedy decode (tokens, logits) and per-step byte counters, then stops the
followers. Rank 0 writes everything to OUT (torch.save). ``"exchange"`` picks the pattern,
``"native"`` native decode (``ep.load(native=...)``, default off here). A
start-up refusal (hash mismatch: ``"model_by_rank": {"1": DIR}``, ``"redundant_by_rank": {"1": R}``
or ``"exchange_by_rank": {"1": X}``) is recorded as ``{"error": message}`` and the job goes on;
``"die_after": n`` (last case) makes rank 1 exit abruptly after serving n MoE layers, ``"hang_after":
n`` makes rank ``"hang_rank"`` stop itself (SIGSTOP) instead; rank 0 records the error it gets (within
the case's step ``"timeout"``), saves, and leaves; a follower that sees the fault writes its one-line
error to ``OUT.rankR.err`` and exits 2."""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

import moetier.distributed as ep
from moetier.distributed import shm
from moetier.distributed.launch import make_placement


def main() -> int:
    out, cases = sys.argv[1], json.loads(open(sys.argv[2]).read())
    rank, world = ep.init()
    results = []
    try:
        for c in cases:
            path = c.get("model_by_rank", {}).get(str(rank), c["model"])
            redundant = c.get("redundant_by_rank", {}).get(str(rank), c.get("redundant", 0))
            exchange = c.get("exchange_by_rank", {}).get(str(rank), c.get("exchange", ep.DEFAULT_EXCHANGE))
            placement = make_placement(path, world, 0 if c.get("placement") else redundant,
                                       c.get("placement"), c.get("routing_profile"))
            try:
                model, group = ep.load(path, rank, world, placement, dtype="float32", tokenizer=False, threads=1,
                                       timeout_s=c.get("timeout"), exchange=exchange, native=c.get("native", False),
                                       **c.get("hierarchy", {}))
            except ep.DistributedError as e:  # every rank sees a start-up refusal: record it, go on
                results.append({"error": str(e)})
                continue
            left = group.shm_name is not None and (shm.SHM_DIR / group.shm_name).exists()  # unlinked at set-up?
            mine = set(placement.device_experts[rank])
            n_layers = len(model.spec.moe_layer_ids)
            if c.get("hierarchy"):  # a tiered provider over this rank's share: fewer slots than the share
                tiered = model.provider.local
                assert tiered is model.hierarchy and tiered.cache.capacity < len(mine) * n_layers
            else:
                local = model.provider.local.experts
                assert {e for _, e in local} == mine and len(local) == len(mine) * n_layers, \
                    f"rank {rank} holds experts it does not own"
            if rank != 0:
                if c.get("die_after") is not None and rank == 1:
                    group.serve(model, max_calls=c["die_after"])
                    os._exit(3)
                if c.get("hang_after") is not None and rank == c["hang_rank"]:
                    group.serve(model, max_calls=c["hang_after"])
                    os.kill(os.getpid(), signal.SIGSTOP)  # hung: alive, sockets open, silent
                try:
                    group.serve(model)
                except ep.DistributedError as e:
                    with open(f"{out}.rank{rank}.err", "w") as f:
                        f.write(str(e))
                    ep.exit_after_fault(str(e))
                if group.exchange == "replicated":  # rank 0's dropped sequences (the prefill's) were dropped here
                    assert len(group._mirrors) == 1, f"rank {rank} keeps {len(group._mirrors)} sequences"
                if c.get("hierarchy"):  # the rank read only experts it owns, into its own cache
                    read = {e for (_, e) in model.provider.local.cache.slot_of}
                    assert read and read <= mine, f"rank {rank} cached experts it does not own: {read - mine}"
                continue
            if c.get("die_after") is not None or c.get("hang_after") is not None:  # the error, not a hang
                try:
                    model.generate_ids(c["prompt"], c["new"])
                    results.append({"error": None})
                except ep.DistributedError as e:
                    results.append({"error": str(e), "native_calls": group.stats.native_calls})
                torch.save(results, out)
                os._exit(0)  # the group is broken: leave without its destructors
            routed: list = []
            model.add_router_observer(lambda layer, ids, w, routed=routed: routed.append(ids.reshape(-1).tolist()))
            prefill = model.logits(c["prompt"])  # [n, V]
            seq = model.new_sequence(capacity=len(c["prompt"]) + c["new"] + 1)
            logits = model.step([(seq, c["prompt"])])
            toks, step_logits, steps = [], [], []
            for _ in range(c["new"]):
                t = int(logits[0].argmax())
                toks.append(t)
                before = dict(vars(group.stats))
                routed.clear()
                logits = model.step([(seq, [t])])
                step_logits.append(logits[0])
                after = vars(group.stats)
                steps.append({k: after[k] - before[k] for k in ("dispatch_bytes_sent", "dispatch_bytes_recv",
                                                                "combine_bytes_sent", "combine_bytes_recv",
                                                                "remote_pairs", "local_pairs")}
                             | {"routed": [list(r) for r in routed]})
            one_by_one = one_by_one_stats = batch = None
            if c.get("native"):  # a batched step: two sequences' prompts, then a token each (all logits)
                s1, s2 = (model.new_sequence(capacity=len(c["prompt"]) + 2) for _ in range(2))
                half = len(c["prompt"]) // 2
                batch = torch.cat([model.step([(s1, c["prompt"][:half]), (s2, c["prompt"][half:])], all_logits=True),
                                   model.step([(s1, toks[:1]), (s2, toks[1:2])], all_logits=True)])
            if c.get("native"):  # the prompt a token at a time too: every step a (native) decode step,
                # without the observer: rank 0's whole steps (with shm: the exchange inside mt_step)
                model.remove_router_observer(model.net.observers[0])
                seq = model.new_sequence(capacity=len(c["prompt"]) + c["new"] + 1)
                before = dict(vars(group.stats))
                one_by_one = torch.cat([model.step([(seq, [t])]) for t in c["prompt"] + toks])
                one_by_one_stats = {k: v - before[k] for k, v in vars(group.stats).items()}
            if c.get("hierarchy"):
                read = {e for (_, e) in model.provider.local.cache.slot_of}
                assert read and read <= mine, f"rank 0 cached experts it does not own: {read - mine}"
            paths = model.compute_paths()
            results.append({"prefill": prefill, "tokens": toks, "step_logits": torch.stack(step_logits),
                            "steps": steps, "per_rank": group.stop(), "placement": placement.to_json(),
                            "hidden": model.spec.hidden_size, "exchange": group.exchange,
                            "decode_path": paths["decode"]["path"], "prefill_path": paths["prefill"]["path"],
                            "native_reason": model.native_reason, "one_by_one": one_by_one,
                            "one_by_one_stats": one_by_one_stats, "batch": batch,
                            "native_exchange": group.native_exchange_why,
                            "transport": group.transport, "segment_left": left})
        if rank == 0:
            torch.save(results, out)
        return 0
    except ep.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ep.shutdown()


if __name__ == "__main__":
    sys.exit(main())
