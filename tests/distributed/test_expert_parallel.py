"""Expert parallelism on gloo over loopback: the same logits and greedy tokens as one process,
the bytes the cluster planner's formula gives, clear errors for bad placements and dead ranks.

One job of two ranks runs every exactness case (ranks load each model in turn), so the
module pays for one process start-up; the fault test starts its own small job."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

import moetier
import tests.helpers.moe_families  # noqa: F401  (registers deepseek_v3)
from moetier.distributed import placement as pl
from moetier.distributed.launch import make_placement, spawn
from moetier.errors import ConfigError
from moetier.planner.cluster import EP_EXCHANGES as EXCHANGES
from moetier.planner.cluster import ep_step_rows, pair_bytes
from moetier.runtime import EMBEDDED_DIR
from tests.helpers import make_tiny_checkpoint

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 128]
NEW = 6
WORLD = 2


@pytest.fixture(scope="module", params=["gloo", "auto"])  # auto: shared memory for direct (one machine)
def job(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("ep")
    mixtral = make_tiny_checkpoint(tmp, "mixtral", num_local_experts=8)
    dsv3 = make_tiny_checkpoint(tmp, "deepseek_v3")
    emitted = emit_embedded_placement(tmp / "placement.json")
    skew = tmp / "loads.json"
    skew.write_text(json.dumps({"loads": [40.0, 1.0, 1.0, 25.0, 2.0, 1.0, 9.0, 1.0]}))
    base = [
        {"name": "embedded", "model": str(EMBEDDED_DIR)},
        {"name": "embedded-r4", "model": str(EMBEDDED_DIR), "placement": str(emitted), "redundant": 4},
        # each rank's own weight hierarchy over its share: a 10% expert cache (12 slots < 64 owned)
        {"name": "embedded-tiered", "model": str(EMBEDDED_DIR), "hierarchy": {"expert_cache": "10%"}},
        {"name": "mixtral", "model": str(mixtral)},
        {"name": "mixtral-r2", "model": str(mixtral), "redundant": 2, "routing_profile": str(skew)},
        {"name": "deepseek_v3", "model": str(dsv3)},
        {"name": "deepseek_v3-r2", "model": str(dsv3), "redundant": 2},
    ]
    qwen2 = make_tiny_checkpoint(tmp, "qwen2_moe")  # a sigmoid-gated shared expert
    heavy = tmp / "heavy.json"  # rank 0 holds 28 of 32: many layers send the follower nothing
    pl.rank0_heavy(pl.profile_loads(EMBEDDED_DIR / "routing_profile.json"), WORLD, 28).save(heavy)
    cases = [{**c, "name": f"{c['name']}/{x}", "exchange": x} for c in base for x in EXCHANGES] + [
        # native decode under EP (direct): rank 0's native step, every rank's experts in the native kernels
        {**c, "name": f"{c['name']}/native", "exchange": "direct", "native": True} for c in base
        if c["name"] in NATIVE_BASES] + [
        {"name": "qwen2_moe/native", "model": str(qwen2), "exchange": "direct", "native": True},
        # csrc/sinks.c's decoders: gpt-oss (biases, clamped SwiGLU, top-k) and Llama-4 (top-1 on a
        # weighted input, a shared expert), natively and on the torch path
        *({"name": f"{fam}/{x}", "model": str(make_tiny_checkpoint(tmp, fam)), "exchange": "direct",
           "native": x == "native"} for fam in ("gpt_oss", "llama4") for x in ("native", "direct")),
        {"name": "embedded-heavy/native", "model": str(EMBEDDED_DIR), "placement": str(heavy), "exchange": "direct",
         "native": True},
        {"name": "qwen2_moe/direct", "model": str(qwen2), "exchange": "direct"},
    ] + [
        {"name": "mismatch", "model": str(EMBEDDED_DIR), "model_by_rank": {"1": str(mixtral)}},
        {"name": "placement-mismatch", "model": str(EMBEDDED_DIR), "redundant_by_rank": {"1": 4}},
        {"name": "exchange-mismatch", "model": str(EMBEDDED_DIR), "exchange": "replicated",
         "exchange_by_rank": {"1": "direct"}},
        # last: rank 1 exits (direct; test_four_ranks hangs a rank under replicated)
        # gloo: rank 1 dies in the prefill (its batched rows travel on gloo under both transports);
        # auto: after 8 prefill layers and 2 decode layers, so rank 0 notices on shared memory, inside
        # its native step's exchange (csrc/ep.c: the 20 ms liveness callback)
        {"name": "dies", "model": str(EMBEDDED_DIR), "die_after": 3 if request.param == "gloo" else 10,
         "exchange": "direct", "native": True},
    ]
    n_exp = {c["name"]: moetier.spec.load_spec(c["model"]).num_experts for c in cases}
    for c in cases:
        if c.get("redundant") and not c.get("routing_profile"):
            if c["model"] != str(EMBEDDED_DIR):  # a made-up skew for the tiny model
                p = tmp / f"{c['name'].replace('/', '-')}.json"
                p.write_text(json.dumps({"loads": [float((7 * e) % 5 + 1) for e in range(n_exp[c["name"]])]}))
                c["routing_profile"] = str(p)
        c["prompt"], c["new"] = PROMPT, NEW
    spec_file, out = tmp / "cases.json", tmp / "out.pt"
    spec_file.write_text(json.dumps(cases))
    t0 = time.monotonic()
    codes = spawn([sys.executable, "-m", "tests.distributed._worker", str(out), str(spec_file)], WORLD,
                  {"MOETIER_EP_TIMEOUT": "20", "MOETIER_EP_TRANSPORT": request.param}, quiet_followers=False,
                  timeout_s=600)
    assert codes == [0, 3]  # rank 1 dies in the last case (exit 3); rank 0 reports it and finishes
    got = torch.load(out)
    assert len(got) == len(cases)
    return {c["name"]: (c, r) for c, r in zip(cases, got)} | {"elapsed": time.monotonic() - t0,
                                                              "transport": request.param}


def emit_embedded_placement(path):
    """``moetier plan EMBEDDED --devices 2 --redundant-experts 4 --emit-placement FILE``."""
    from moetier.cli import main

    assert main(["plan", str(EMBEDDED_DIR), "--machine", "h100", "--devices", str(WORLD), "--redundant-experts", "4",
                 "--routing-profile", str(EMBEDDED_DIR / "routing_profile.json"), "--emit-placement", str(path)]) == 0
    return path


def test_plan_emits_the_placement_the_runtime_computes(tmp_path, capsys):
    f = emit_embedded_placement(tmp_path / "p.json")
    assert "wrote the expert placement for 2 ranks (4 redundant copies)" in capsys.readouterr().out
    got = pl.load(f, 32, WORLD)
    assert got == make_placement(None, WORLD, redundant=4)  # what `moetier run --ep 2 --redundant-experts 4` uses
    assert sum(len(d) for d in got.device_experts) == 36 and max(len(d) for d in got.device_experts) == 18


def greedy(m, c: dict) -> tuple[list[int], torch.Tensor]:
    """The prompt in one step, then ``c["new"]`` greedy single-token steps: (tokens, their logits [new, V])."""
    seq = m.new_sequence(capacity=len(c["prompt"]) + c["new"] + 1)
    logits = m.step([(seq, c["prompt"])])
    toks, steps = [], []
    for _ in range(c["new"]):
        t = int(logits[0].argmax())
        toks.append(t)
        logits = m.step([(seq, [t])])
        steps.append(logits[0])
    return toks, torch.stack(steps)


def reference(c: dict) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    m = moetier.load(c["model"], dtype="float32", tokenizer=False, native=False, threads=1)
    prefill = m.logits(c["prompt"])
    return (prefill, *greedy(m, c))


NATIVE_BASES = ("embedded", "embedded-r4", "embedded-tiered", "mixtral", "mixtral-r2", "deepseek_v3", "deepseek_v3-r2")
CASES = [f"{c}/{x}" for c in ("embedded", "embedded-r4", "embedded-tiered", "mixtral", "mixtral-r2", "deepseek_v3",
                               "deepseek_v3-r2") for x in EXCHANGES]


@pytest.mark.parametrize("name", CASES)
def test_same_logits_and_tokens_as_one_process(job, name):
    c, r = job[name]
    prefill, toks, steps = reference(c)
    assert (r["prefill"] - prefill).abs().max().item() <= 1e-5
    if not c.get("redundant"):  # same expert batches, same summation order: bit for bit
        assert torch.equal(r["prefill"], prefill) and torch.equal(r["step_logits"], steps)
    assert r["tokens"] == toks
    assert (r["step_logits"] - steps).abs().max().item() <= 1e-5
    # experts really ran on both ranks, and replicas (if any) were used
    per = r["per_rank"]
    assert per[0]["remote_pairs"] > 0 and per[1]["local_pairs"] == per[0]["remote_pairs"]
    if c.get("redundant"):
        copies = sum(len(d) for d in r["placement"]["device_experts"])
        assert copies == moetier.spec.load_spec(c["model"]).num_experts + c["redundant"]


def reference_native(c: dict) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """One native process (1 thread): prompt, greedy steps and a full prefill."""
    m = moetier.load(c["model"], dtype="float32", tokenizer=False, threads=1)
    assert m.native_reason is None
    toks, steps = greedy(m, c)
    return m.logits(c["prompt"]), toks, steps


NATIVE = [f"{c}/native" for c in NATIVE_BASES] + ["qwen2_moe/native", "embedded-heavy/native", "gpt_oss/native",
                                                   "llama4/native"]


@pytest.mark.parametrize("name", NATIVE)
def test_native_decode_under_ep_is_one_native_process_bit_for_bit(job, name):
    """Native decode on every rank (rank 0: attention, router, shared expert, its experts; the
    followers: theirs, from the float32 row) = one native process stepping the same tokens, bit for
    bit, with replicas too (each row is one expert's gemv rows, whichever rank runs it); within 1e-5
    of a fully native process (native prefill) and of the torch path, same greedy tokens."""
    c, r = job[name]
    check_native(c, r)
    per = r["per_rank"]
    assert per[0]["remote_pairs"] > 0 and per[1]["local_pairs"] == per[0]["remote_pairs"]


@pytest.mark.parametrize("name", NATIVE)
def test_the_exchange_runs_inside_the_native_step_on_shared_memory(job, name):
    """shm (auto): rank 0's whole steps exchange inside ``mt_step`` (csrc/ep.c) and the follower
    answers in C: every MoE layer of the observer-free steps (``one_by_one``, bit-identical to one
    process: test above) counted as native, with the planner's bytes for their pairs; gloo: the
    Python path. The follower serves every native decode message in C either way on shm."""
    c, r = job[name]
    s, per = r["one_by_one_stats"], r["per_rank"]
    layers = len(moetier.spec.load_spec(c["model"]).moe_layer_ids)
    steps = len(c["prompt"]) + len(r["tokens"])
    ext = name.split("/")[0] in ("gpt_oss", "llama4")  # csrc/sinks.c's experts: the Python-driven exchange
    if job["transport"] == "gloo" or c.get("hierarchy") or ext:  # Python's exchange (a tiered rank: its reads)
        why = (("GptOssDecoder" if "gpt_oss" in name else "Llama4Decoder") if ext else
               "the gloo transport" if job["transport"] == "gloo" else "this rank's experts are not all in RAM")
        assert r["native_exchange"].startswith(why)
        assert s["native_calls"] == 0 and per[1]["native_calls"] == 0 and per[0]["head_bytes"] == 0
        return
    assert r["native_exchange"] == "native"
    # the LM head's rows split over the ranks: rank 0 gathers the follower's share of every step's logits
    V = moetier.spec.load_spec(c["model"]).vocab_size
    assert [p["head_rows"] for p in per] == [-(-V // WORLD), V - -(-V // WORLD)]
    assert s["head_bytes"] == steps * 4 * per[1]["head_rows"] and per[1]["head_bytes"] == per[0]["head_bytes"]
    # the whole run: the single-token steps' heads and the multi-token steps' logit rows (split too:
    # the prompt's logits, the prompt's last, the two-sequence batch's all-logits steps)
    many_rows = len(c["prompt"]) + 1 + len(c["prompt"]) + 2
    assert per[0]["head_bytes"] == (steps + NEW + many_rows) * 4 * per[1]["head_rows"]
    assert s["native_calls"] == s["moe_calls"] == layers * steps
    rows = ep_step_rows("direct", WORLD, 0, s["local_pairs"], s["remote_pairs"])
    row = pair_bytes(r["hidden"], "fp32")
    assert s["remote_pairs"] > 0 and s["local_pairs"] + s["remote_pairs"] == steps * layers * \
        moetier.spec.load_spec(c["model"]).top_k
    for kind, way in (("dispatch", "sent"), ("combine", "recv")):
        assert s[f"{kind}_bytes_{way}"] == rows[f"{kind}_{way}"] * row > 0
    # the follower answered every decode message of the run in C (the observed steps' too): its
    # other MoE calls are the layers of the four multi-token forwards (two prompts, two batched steps)
    # that routed it pairs (a layer whose pairs all stay on rank 0 sends it nothing)
    many = per[1]["moe_calls"] - per[1]["native_calls"]
    assert per[1]["native_calls"] > 0 and (many == 4 * layers if "heavy" not in name else 0 < many <= 4 * layers)


def check_native(c: dict, r: dict) -> None:
    """A native-decode EP run ``r`` of case ``c`` against one process (see the test above). The
    prefill and batched steps run natively under EP too (every family: the generic, MLA and
    gpt-oss / Llama-4 steppers): bit for bit one native process (each (token, expert) row the same
    kernels' sum, whichever rank runs it, and the combine in the single-process order), replicas
    or not."""
    assert (r["decode_path"], r["prefill_path"], r["native_reason"]) == ("native", "native", None)
    m = moetier.load(c["model"], dtype="float32", tokenizer=False, threads=1)
    seq = m.new_sequence(capacity=len(c["prompt"]) + c["new"] + 1)  # every token a native decode step
    assert torch.equal(r["one_by_one"], torch.cat([m.step([(seq, [t])]) for t in c["prompt"] + r["tokens"]]))
    s1, s2 = (m.new_sequence(capacity=len(c["prompt"]) + 2) for _ in range(2))
    half = len(c["prompt"]) // 2
    batch = torch.cat([m.step([(s1, c["prompt"][:half]), (s2, c["prompt"][half:])], all_logits=True),
                       m.step([(s1, r["tokens"][:1]), (s2, r["tokens"][1:2])], all_logits=True)])
    assert torch.equal(r["batch"], batch)
    prefill, toks, steps = reference_native(c)
    assert r["tokens"] == toks
    assert torch.equal(r["step_logits"], steps) and torch.equal(r["prefill"], prefill)
    prefill, toks, steps = reference(c)  # the torch path
    assert r["tokens"] == toks
    assert (r["step_logits"] - steps).abs().max().item() <= 1e-5
    assert (r["prefill"] - prefill).abs().max().item() <= 1e-5


def test_llama4_and_gpt_oss_torch_path_under_ep(job):
    for name in ("llama4/direct", "gpt_oss/direct"):
        c, r = job[name]
        assert r["decode_path"] == "torch", name
        prefill, toks, steps = reference(c)
        assert r["tokens"] == toks and torch.equal(r["step_logits"], steps), name
        assert (r["prefill"] - prefill).abs().max().item() <= 1e-5, name


def test_qwen2_moe_torch_path_under_ep(job):
    c, r = job["qwen2_moe/direct"]
    assert r["decode_path"] == "torch"
    prefill, toks, steps = reference(c)
    assert r["tokens"] == toks and torch.equal(r["step_logits"], steps) and torch.equal(r["prefill"], prefill)


@pytest.mark.parametrize("name", CASES + NATIVE)
def test_bytes_match_the_planner_formula(job, name):
    c, r = job[name]
    row = pair_bytes(r["hidden"], "fp32")  # the cluster planner's bytes per pair per direction
    owner = {e: ranks for e, ranks in enumerate(pl.EPPlacement(
        r["placement"]["num_experts"], tuple(map(tuple, r["placement"]["device_experts"]))).owners())}
    assert r["exchange"] == c["exchange"]
    for s in r["steps"]:  # rank 0, every decode step: the bytes the planner's formula gives for its pairs
        rows = ep_step_rows(c["exchange"], WORLD, 0, s["local_pairs"], s["remote_pairs"])
        assert s["remote_pairs"] > 0 or s["local_pairs"] > 0
        for kind in ("dispatch", "combine"):
            for way in ("sent", "recv"):
                assert s[f"{kind}_bytes_{way}"] == rows[f"{kind}_{way}"] * row
        pairs = sum(len(ids) for ids in s["routed"])
        assert s["remote_pairs"] + s["local_pairs"] == pairs
        sure_remote = sum(1 for ids in s["routed"] for e in ids if 0 not in owner[e])
        sure_local = sum(1 for ids in s["routed"] for e in ids if owner[e] == [0])
        assert sure_remote <= s["remote_pairs"] <= pairs - sure_local
        if not c.get("redundant"):
            assert s["remote_pairs"] == sure_remote
    per = r["per_rank"]  # the whole run (prefill included), every rank
    for rank, p in enumerate(per):
        rows = ep_step_rows(c["exchange"], WORLD, rank, p["local_pairs"], p["remote_pairs"])
        assert [p[f"{kind}_bytes_{way}"] for kind in ("dispatch", "combine") for way in ("sent", "recv")] == \
            [rows[f"{kind}_{way}"] * row for kind in ("dispatch", "combine") for way in ("sent", "recv")]
    assert per[1]["dispatch_bytes_recv"] == per[0]["dispatch_bytes_sent"]
    assert per[1]["combine_bytes_sent"] == per[0]["combine_bytes_recv"]
    if c["exchange"] == "replicated":  # no dispatch; each rank's outputs reach the other
        assert per[0]["dispatch_bytes_sent"] == 0 and per[0]["combine_bytes_sent"] == per[1]["combine_bytes_recv"] > 0


def test_placement_must_cover_every_expert(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"format": pl.FORMAT, "num_experts": 4, "device_experts": [[0, 1], [1, 2]]}))
    with pytest.raises(ConfigError, match=r"placement .*p\.json: experts \[3\] are held by no rank"):
        pl.load(f, 4, 2)
    with pytest.raises(ConfigError, match="2 ranks in the file, the job has 3"):
        pl.load(f, 4, 3)
    good = pl.contiguous(6, 4)
    assert good.device_experts == ((0,), (1, 2), (3,), (4, 5))
    good.save(f)
    assert pl.load(f, 6, 4) == good


def test_rank0_heavy_placement_gives_rank0_the_hottest_experts(tmp_path):
    loads = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0]
    p = pl.rank0_heavy(loads, 3, 3)
    assert p.device_experts == ((2, 4, 6), (0, 1, 3), (5, 7))  # the rest dealt hottest first: 0, 7, 3, 5, 1
    assert sorted(e for d in p.device_experts for e in d) == list(range(8))
    p.save(tmp_path / "p.json")
    assert pl.load(tmp_path / "p.json", 8, 3) == p
    with pytest.raises(ConfigError, match="rank 0 holding 7 of 8 experts with 3 ranks: expected 1..6"):
        pl.rank0_heavy(loads, 3, 7)


@pytest.mark.parametrize("name", ["mismatch", "placement-mismatch", "exchange-mismatch"])
def test_a_rank_with_another_model_or_placement_is_refused_at_start(job, name):
    _, r = job[name]  # rank 1 loaded another model / computed another placement (4 replicas) / exchange
    assert "ranks [1] were started with a different model, dtype or placement than rank 0" in r["error"]
    assert "\n" not in r["error"]


def test_a_dead_rank_stops_the_others_with_a_clear_error(job):
    _, r = job["dies"]
    assert r["error"] is not None and r["error"].startswith("rank 0: all-to-all with the other ranks failed")
    assert "a peer rank died" in r["error"] and "\n" not in r["error"]
    if job["transport"] == "auto":  # shm (rank 1 died in a decode step): the dead-peer check names the rank
        assert "(shm: rank 1 (pid " in r["error"] and ") exited)" in r["error"]
        assert r["native_calls"] > 0  # rank 0 was exchanging inside its native step


def test_transport_taken_and_no_segment_left(job):
    """``MOETIER_EP_TRANSPORT``: gloo everywhere, or auto: shared memory for ``direct`` (every rank on
    this machine), gloo for ``replicated``; a shm segment is unlinked once every rank has mapped it."""
    done = [(c, r) for name, (c, r) in ((n, v) for n, v in job.items() if isinstance(v, tuple)) if "transport" in r]
    assert len(done) >= len(CASES)
    for c, r in done:
        want = "shm" if job["transport"] == "auto" and c["exchange"] == "direct" else "gloo"
        assert r["transport"] == want, c["name"]
        assert not r["segment_left"], c["name"]


@pytest.mark.parametrize("bulk_mb", ["0.01", "0"])
def test_multi_token_rows_in_a_small_shm_buffer_or_on_gloo(tmp_path, bulk_mb):
    """shm with multi-token buffers of 9 rows (``MOETIER_EP_SHM_BULK_MB=0.01``: the follower's ~20
    rows of a 10-token prompt go in 3 messages, one at a time) or none (``0``: rows beyond the control
    message on gloo): prefill, batched steps and decode still one native process's bits."""
    c = {"name": "embedded/native", "model": str(EMBEDDED_DIR), "exchange": "direct", "native": True,
         "prompt": PROMPT, "new": NEW}
    spec_file, out = tmp_path / "cases.json", tmp_path / "out.pt"
    spec_file.write_text(json.dumps([c]))
    codes = spawn([sys.executable, "-m", "tests.distributed._worker", str(out), str(spec_file)], WORLD,
                  {"MOETIER_EP_TIMEOUT": "20", "MOETIER_EP_TRANSPORT": "shm", "MOETIER_EP_SHM_BULK_MB": bulk_mb},
                  quiet_followers=False, timeout_s=300)
    assert codes == [0, 0]
    (r,) = torch.load(out)
    assert r["transport"] == "shm" and r["native_exchange"] == "native"
    check_native(c, r)
    per, layers = r["per_rank"], len(moetier.spec.load_spec(EMBEDDED_DIR).moe_layer_ids)
    many = per[1]["moe_calls"] - per[1]["native_calls"]  # messages of the four multi-token forwards
    assert many > 4 * layers if bulk_mb != "0" else many == 4 * layers


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_cli_spawns_local_ranks_and_reports_bytes(tmp_path, capfd, exchange):
    """``moetier run --ep 2 --redundant-experts 4 --ep-exchange X --json``: the text of the
    single-process run, rank 0 prints alone, per-rank bytes add up and match the planner's formula."""
    from moetier.cli import main

    argv = ["run", "--prompt", "Once upon a time", "--max-tokens", "5", "--dtype", "float32", "--json",
            "--ep", "2", "--redundant-experts", "4", "--ep-exchange", exchange]
    assert main(argv) == 0  # the ranks run the arguments main() parsed (not this process's sys.argv)
    out = capfd.readouterr().out.strip().splitlines()
    assert len(out) == 1  # only rank 0 prints
    d = json.loads(out[0])
    ref = moetier.load(dtype="float32", native=False, threads=1)
    assert d["text"] == ref.generate("Once upon a time", max_tokens=5)
    ep = d["expert_parallel"]
    assert ep["ranks"] == 2 and len(ep["per_rank"]) == 2 and ep["exchange"] == exchange
    import os

    gloo = os.environ.get("MOETIER_EP_TRANSPORT", "auto") == "gloo" or exchange == "replicated"
    assert ep["transport"] == ("gloo" if gloo else "shm")  # auto: both ranks on this machine
    assert ep["pair_bytes"] == pair_bytes(256, "fp32")
    for rank, r in enumerate(ep["per_rank"]):
        rows = ep_step_rows(exchange, 2, rank, r["local_pairs"], r["remote_pairs"])
        assert r["dispatch_bytes_sent"] == rows["dispatch_sent"] * ep["pair_bytes"]
        assert r["combine_bytes_recv"] == rows["combine_recv"] * ep["pair_bytes"]
        assert r["combine_bytes_sent"] == rows["combine_sent"] * ep["pair_bytes"]
    r0, rest = ep["per_rank"][0], ep["per_rank"][1:]
    assert r0["combine_bytes_recv"] == sum(r["combine_bytes_sent"] for r in rest) > 0
    assert r0["remote_pairs"] == sum(r["local_pairs"] for r in rest)
    assert all(r["local_pairs"] > 0 for r in rest)  # every rank computed experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_rows_carry_their_expert_ids_bit_exactly(dtype):
    from moetier.distributed.executor import pack, unpack

    x, e = torch.randn(5, 7).to(dtype), torch.tensor([3, 0, 300, 2**40, 1])
    b = pack(x, e)
    assert b.dtype == torch.uint8 and b.shape == (5, 7 * x.element_size() + 8)
    x2, e2 = unpack(b, dtype)
    assert torch.equal(x2, x) and torch.equal(e2, e)
    for n in (0, 1):  # empty and single-row receives (views with an offset)
        x2, e2 = unpack(pack(x[:n], e[2 : 2 + n]), dtype)
        assert torch.equal(x2, x[:n]) and e2.tolist() == e[2 : 2 + n].tolist()
