"""Four ranks on gloo over loopback (kept small for 2-core CI: a tiny mixtral, 8 experts, a few
tokens): the same logits and greedy tokens as one process with and without replicas, in both
exchange patterns, bytes by the planner's formula, and a HUNG rank (SIGSTOP, replicated exchange)
that makes every other rank exit with one line within the step timeout instead of waiting forever."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from moetier.distributed.launch import spawn
from moetier.planner.cluster import EP_EXCHANGES as EXCHANGES
from moetier.planner.cluster import ep_step_rows, pair_bytes
from tests.distributed.test_expert_parallel import check_native, reference
from tests.helpers import make_tiny_checkpoint

WORLD = 4
PROMPT = [5, 17, 42, 7, 99, 3]
NEW = 4
HUNG = 2  # the rank that stops itself
STEP_TIMEOUT = 4.0


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep4")
    mixtral = make_tiny_checkpoint(tmp, "mixtral", num_local_experts=8)
    skew = tmp / "loads.json"
    skew.write_text(json.dumps({"loads": [30.0, 1.0, 2.0, 12.0, 1.0, 6.0, 1.0, 3.0]}))
    cases = [{"name": f"mixtral/{x}", "model": str(mixtral), "exchange": x} for x in EXCHANGES] + [
        {"name": f"mixtral-r4/{x}", "model": str(mixtral), "redundant": 4, "routing_profile": str(skew),
         "exchange": x} for x in EXCHANGES] + [
        {"name": "mixtral/native", "model": str(mixtral), "exchange": "direct", "native": True},
        {"name": "mixtral-r4/native", "model": str(mixtral), "redundant": 4, "routing_profile": str(skew),
         "exchange": "direct", "native": True}] + [
        # replicated: every rank waits on every other's exchange (the P = 2 module's dying rank runs direct)
        {"name": "hangs", "model": str(mixtral), "hang_after": 2, "hang_rank": HUNG, "timeout": STEP_TIMEOUT,
         "exchange": "replicated"},
    ]
    for c in cases:
        c["prompt"], c["new"] = PROMPT, NEW
    spec_file, out = tmp / "cases.json", tmp / "out.pt"
    spec_file.write_text(json.dumps(cases))
    codes = spawn([sys.executable, "-m", "tests.distributed._worker", str(out), str(spec_file)], WORLD,
                  {"MOETIER_EP_TIMEOUT": "30"}, quiet_followers=False, timeout_s=900, grace_s=10)
    got = torch.load(out)
    errs = {r: Path(f"{out}.rank{r}.err").read_text() for r in range(WORLD) if Path(f"{out}.rank{r}.err").exists()}
    return {c["name"]: (c, r) for c, r in zip(cases, got)} | {"codes": codes, "errs": errs}


@pytest.mark.parametrize("name", [f"{c}/{x}" for c in ("mixtral", "mixtral-r4") for x in (*EXCHANGES, "native")])
def test_four_ranks_same_logits_and_tokens_as_one_process(job, name):
    c, r = job[name]
    if c.get("native"):  # native decode on every rank: one native process's bits (replicas too)
        check_native(c, r)
    prefill, toks, steps = reference(c)
    assert r["tokens"] == toks
    assert (r["prefill"] - prefill).abs().max().item() <= 1e-5
    assert (r["step_logits"] - steps).abs().max().item() <= 1e-5
    if not c.get("redundant"):  # same expert batches, same order: bit for bit (the torch path)
        assert torch.equal(r["prefill"], prefill) or c.get("native")  # (native: check_native's bits)
        assert torch.equal(r["step_logits"], steps) or c.get("native")
    else:
        assert sum(len(d) for d in r["placement"]["device_experts"]) == 8 + 4
    per = r["per_rank"]
    assert len(per) == WORLD and r["exchange"] == c["exchange"]
    assert per[0]["remote_pairs"] == sum(p["local_pairs"] for p in per[1:])
    row = pair_bytes(r["hidden"], "fp32")
    ways = [f"{kind}_{way}" for kind in ("dispatch", "combine") for way in ("sent", "recv")]
    for rank, p in enumerate(per):  # every rank: the planner's formula for its pairs
        rows = ep_step_rows(c["exchange"], WORLD, rank, p["local_pairs"], p["remote_pairs"])
        assert [p[f"{w.split('_')[0]}_bytes_{w.split('_')[1]}"] for w in ways] == [rows[w] * row for w in ways]
    if c["exchange"] == "direct":
        assert per[0]["dispatch_bytes_sent"] == sum(p["dispatch_bytes_recv"] for p in per[1:]) > 0
        assert per[0]["combine_bytes_recv"] == sum(p["combine_bytes_sent"] for p in per[1:])
    else:  # every rank's outputs go to the 3 others
        assert sum(p["combine_bytes_sent"] for p in per) == 3 * sum(p["combine_bytes_recv"] for p in per) / 3 > 0
    for s in r["steps"]:
        rows = ep_step_rows(c["exchange"], WORLD, 0, s["local_pairs"], s["remote_pairs"])
        assert [s[f"{w.split('_')[0]}_bytes_{w.split('_')[1]}"] for w in ways] == [rows[w] * row for w in ways]
    followers_used = [p["local_pairs"] > 0 for p in per[1:]]
    assert sum(followers_used) >= 2  # experts really ran on several other ranks


def test_a_hung_rank_makes_every_other_rank_exit_with_one_line(job):
    _, r = job["hangs"]
    err = r["error"]
    assert err is not None and err.startswith("rank 0: all-to-all with the other ranks timed out")
    assert f"step timeout {STEP_TIMEOUT:g} s" in err and "\n" not in err
    codes, errs = job["codes"], job["errs"]
    assert codes[0] == 0  # rank 0 recorded the error and left on its own
    assert codes[HUNG] < 0  # the stopped rank was terminated by the launcher
    for rk in range(1, WORLD):
        if rk == HUNG:
            continue
        assert codes[rk] == 2, codes  # left by itself with the one-line error, no hang, no abort
        assert errs[rk].startswith(f"rank {rk}: all-to-all with the other ranks") and "\n" not in errs[rk]
