"""Fast tests of the side-by-side harness's pure parts (no engine runs)."""

from __future__ import annotations

import json
import math

import pytest

from bench import report
from bench.__main__ import jsonable, parse_worker_output
from bench.peers import timed_generations
from bench.scenarios import gguf_outtype, prompt_ids


def _engine(pre: list[float], dec: list[float], **kw) -> dict:
    return {"status": "ok", "prefill_tokens_per_s_runs": pre, "decode_tokens_per_s_runs": dec, **kw}


def _scenario(m_dec: list[float], l_dec: list[float], bound: float | None = 10.0) -> dict:
    eng = {
        "moetier": report.summarize_engine(_engine([100, 120, 110, 90, 130], m_dec, output_ids_sample=[1, 2, 3, 4])),
        "llama_cpp": report.summarize_engine(_engine([200, 200, 200, 200, 200], l_dec, output_ids_sample=[1, 2, 9])),
        "transformers_offload": {"status": "oom", "error": "killed"},
    }
    sc = {"title": "(c) test", "engines": eng, "cap_bytes": 3 * 2**30, "model_bytes": 9e9, "dtype": "bfloat16",
          "planner": None if bound is None else {"decode_tokens_per_s": bound, "prefill_tokens_per_s": 400.0,
                                                 "bottleneck": "communication", "prefill_bottleneck": "compute",
                                                 "precision": "bf16"}}
    return report.finish_scenario("overcap", sc)


def test_summarize_engine_medians_and_extremes() -> None:
    s = report.summarize_engine(_engine([1, 5, 3, 2, 4], [10, 30, 20, 50, 40], output_ids_sample=[1]))
    assert s["prefill_tokens_per_s"] == 3 and s["decode_tokens_per_s"] == 30
    assert s["decode_tokens_per_s_min"] == 10 and s["decode_tokens_per_s_max"] == 50
    assert report.summarize_engine(_engine([1, 2], [3, 5]))["decode_tokens_per_s"] == 4  # even count: mean of middle
    failed = report.summarize_engine({"status": "failed", "error": "x"})
    assert "decode_tokens_per_s" not in failed and failed["status"] == "failed"


def test_ratio_handles_missing_and_zero() -> None:
    assert report.ratio(10.0, 4.0) == 2.5
    assert report.ratio(None, 4.0) is None and report.ratio(1.0, 0.0) is None and report.ratio(1.0, None) is None
    assert report.ratio(float("nan"), 1.0) is None


def test_pair_ratios_targets_and_agreement() -> None:
    sc = _scenario([9, 10, 11, 8, 12], [4, 5, 5, 5, 6])
    r = sc["ratios"]["moetier/llama_cpp"]
    assert r["decode"] == pytest.approx(2.0) and r["prefill"] == pytest.approx(110 / 200)
    assert sc["ratios"]["moetier/transformers_offload"]["decode"] is None
    assert sc["ratios"]["moetier/transformers_offload"]["peer_status"] == "oom"
    assert sc["moetier_vs_bound"]["decode"] == pytest.approx(1.0)
    assert sc["token_agreement"]["llama_cpp"] == 2
    t = {x["target"]: x for x in sc["targets"]}
    assert t["moetier decode >= 2x llama.cpp (mmap)"]["pass"] is True
    # a peer that cannot run under the cap: the target passes if moetier ran
    assert t["moetier decode >= 2x transformers + accelerate offload"]["pass"] is True
    assert t["moetier decode within 15% of the planner's bound"]["pass"] is True
    low = _scenario([5, 5, 5, 5, 5], [5, 5, 5, 5, 5], bound=10.0)
    t = {x["target"]: x for x in low["targets"]}
    assert t["moetier decode >= 2x llama.cpp (mmap)"]["pass"] is False
    assert t["moetier decode within 15% of the planner's bound"]["pass"] is False
    nob = _scenario([5] * 5, [5] * 5, bound=None)
    assert nob["moetier_vs_bound"]["decode"] is None
    assert {x["target"]: x for x in nob["targets"]}["moetier decode within 15% of the planner's bound"]["pass"] is None


def test_result_schema_roundtrip_and_rendering(tmp_path) -> None:
    payload = {
        "provenance": {"cpu": "Test CPU", "cores": 2, "ram_bytes": 24e9, "date": "2026-01-01T00:00:00Z",
                       "versions": {"moetier": "0.1.0", "torch": "2.x"}},
        "machine": {"memory_read_bw": 11.2e9, "disk_read_bw": 1.1e9},
        "peer_versions": {"llama_cpp_python": "0.3.36"},
        "settings": {"prompt_tokens": 64, "decode_tokens": 32, "runs": 5, "threads": 2},
        "scenarios": {"overcap": _scenario([9, 10, 11, 8, 12], [4, 5, 5, 5, 6]),
                      "embedded": {"title": "(a) embedded", "error": "not installed"}},
    }
    payload = jsonable(payload)
    assert json.loads(json.dumps(payload)) == payload
    md = report.render_markdown(payload)
    assert "## (c) test" in md and "| moetier (bound: 400 / 10.00, communication)" in md
    assert "2.00x" in md and "oom" in md and "Not run: not installed" in md
    assert "PASS: moetier decode >= 2x llama.cpp (mmap)" in md
    block = report.render_readme_block(payload)
    assert block.startswith(report.README_BEGIN) and block.endswith(report.README_END)
    assert "0.3.36" in block and "not run" in block
    text = "# bench\n\nintro\n"
    once = report.replace_marked_block(text, block)
    assert once.count(report.README_BEGIN) == 1 and once.startswith("# bench")
    newer = block.replace("Test CPU", "Other CPU")
    twice = report.replace_marked_block(once, newer)
    assert twice.count(report.README_BEGIN) == 1 and "Other CPU" in twice and "Test CPU" not in twice
    png = report.plot(payload, tmp_path / "p.png")
    assert png is None or png.stat().st_size > 1000


def test_worker_protocol_and_timing_loop() -> None:
    assert parse_worker_output("noise\nBENCH_RESULT {\"a\": 1}\n") == {"a": 1}
    assert parse_worker_output("no result") is None
    calls = {"reset": 0, "step": 0}

    def reset() -> None:
        calls["reset"] += 1

    def step(t: int) -> int:
        calls["step"] += 1
        return t + 1

    r = timed_generations(lambda p: len(p), step, reset, [1, 2, 3], tokens=4, runs=2)
    assert calls["reset"] == 3 and calls["step"] == 9  # 1 warm-up + 2 runs, 3 decode steps each
    assert r["output_ids"] == [3, 4, 5, 6]
    assert len(r["decode_tokens_per_s_runs"]) == 2 and all(x > 0 for x in r["decode_tokens_per_s_runs"])
    assert r["first_run"] is not None and not math.isnan(r["first_run"]["prefill_tokens_per_s"])


def test_prompt_ids_and_outtype() -> None:
    a, b = prompt_ids(1000, 64, seed=0), prompt_ids(1000, 64, seed=0)
    assert a == b and len(a) == 64 and all(10 <= x < 1000 for x in a)
    assert gguf_outtype("bfloat16") == "bf16" and gguf_outtype("float32") == "f32"


def test_merge_rounds_and_round_ratios() -> None:
    r1 = _engine([1, 2], [10, 20], peak_rss_bytes=5, cgroup_peak_bytes=7, load_s=1.0)
    r2 = _engine([3], [30], peak_rss_bytes=9, cgroup_peak_bytes=6, load_s=3.0)
    m = report.merge_rounds([r1, r2])
    assert m["decode_tokens_per_s_runs"] == [10, 20, 30] and m["prefill_tokens_per_s_runs"] == [1, 2, 3]
    assert m["peak_rss_bytes"] == 9 and m["cgroup_peak_bytes"] == 7 and m["load_s"] == 2.0 and m["rounds"] == 2
    bad = report.merge_rounds([r1, {"status": "oom", "error": "killed"}])
    assert bad["status"] == "oom" and bad["rounds_ok"] == 1
    assert report.merge_rounds([])["status"] == "failed"
    rr = report.round_ratios([{"moetier": _engine([1], [10]), "llama_cpp": _engine([1], [5])},
                              {"moetier": _engine([1], [9]), "llama_cpp": _engine([1], [3]),
                               "transformers": {"status": "failed"}}])
    assert rr == {"moetier/llama_cpp": [2.0, 3.0]}


def test_order_scenarios() -> None:
    got = report.order_scenarios({"overcap@t1": 1, "ram@t1": 2, "embedded@fp32@t1": 3, "embedded@t1": 4, "x": 5},
                                 ["embedded", "ram", "overcap"])
    assert list(got) == ["embedded@t1", "embedded@fp32@t1", "ram@t1", "overcap@t1", "x"]


def test_gguf_side_by_side_ratios_table_and_readme_block(tmp_path) -> None:
    from bench import bench_gguf

    sp = {"moetier": {"64": {"prefill": [10.0, 30.0, 20.0], "decode": [110.0, 90.0, 100.0], "decode_cpu": [300.0]},
                      "512": {"prefill": [40.0, 60.0], "decode": []}},
          "llama_cpp": {"64": {"prefill": [20.0, 20.0, 20.0], "decode": [50.0, 50.0, 100.0], "decode_cpu": [100.0]},
                        "512": {"prefill": [50.0, 50.0], "decode": []}}}
    r = bench_gguf.ratios(sp, [64, 512])
    assert set(r) == {"prefill_64", "decode_64", "decode_cpu_64", "prefill_512"}  # only rates both engines have
    assert r["decode_64"]["ratio_median"] == pytest.approx(2.0) and r["decode_64"]["ratio_best"] == pytest.approx(1.1)
    assert r["prefill_512"]["ratio_median"] == pytest.approx(1.0)
    doc = {"prompts": [64, 512], "threads": 1, "rows": [{"scenario": "embedded", "type": "Q4_K_M", "file_bytes": 1.1e7,
                                           "ratios": r, "same_greedy_tokens": False,
                                           "accuracy": {"moetier_max_abs_dlogit": 6e-6,
                                                        "llama_cpp_max_abs_dlogit": 0.08}}]}
    table = bench_gguf.render(doc)
    assert ("| embedded | Q4_K_M | 0.01 | 1 | 100.0 / 50.0 (2.00x) | 300.0 / 100.0 (3.00x) | 20.0 / 20.0 (1.00x) | - "
            "| 50.0 / 50.0 (1.00x) | - | - | no |") in table
    assert "6e-06 / 0.08" in table
    doc["rows"][0]["planner"] = {"fraction_of_bound": 0.8, "decode_tokens_per_s": 125.0, "binds_on": "memory",
                                 "memory_alone_tokens_per_s": 125.0}
    assert "| 80% of 125.0 (memory; memory alone 125.0) | no |" in bench_gguf.render(doc)
    readme = tmp_path / "README.md"
    readme.write_text("# bench\n\ntext\n")
    bench_gguf.write_readme(doc, readme)
    once = readme.read_text()
    bench_gguf.write_readme(doc, readme)  # replaces its block, keeps the rest
    assert readme.read_text() == once and once.startswith("# bench\n\ntext\n") and once.count("| embedded |") == 1


def test_gguf_bf16_type_is_the_converted_file_run_at_bfloat16(tmp_path) -> None:
    from bench import bench_gguf

    src = tmp_path / "m-bf16.gguf"
    src.write_bytes(b"GGUF")
    assert bench_gguf.ensure_quantized(src, "BF16") == src  # no llama.cpp quantize, no copy
    assert bench_gguf.run_dtype(src) == "bfloat16"  # weights in their bf16 bytes, not a float32 copy
    assert bench_gguf.run_dtype(tmp_path / "m-Q8_0.gguf") == "float32"


def test_gguf_cap_choice_and_cap_rows_in_the_table(tmp_path) -> None:
    import json

    from bench import bench_gguf

    g8 = 2**30 // 8
    # a third of the file, to 1/8 GiB; moetier's smallest --max-ram raises it (rounded up)
    assert bench_gguf.choose_cap(3 * 2**30, None) == 2**30
    assert bench_gguf.choose_cap(3 * 2**30, 2**30 - 1) == 2**30
    assert bench_gguf.choose_cap(3 * 2**30, 2**30 + 1) == 2**30 + g8
    assert bench_gguf.choose_cap(2_600_000_000, 900_000_000) == 7 * g8  # 0.807 GiB -> 0.875 GiB
    assert bench_gguf.choose_cap(1000, None) == g8  # never zero
    r = {"decode_64": {"moetier": {"median": 3.0}, "llama_cpp": {"median": 1.0}, "ratio_median": 3.0}}
    a = {"prompts": [64, 512], "threads": 2, "rows": [{"scenario": "ram", "type": "Q8_0", "file_bytes": 2.6e9,
                                                        "ratios": r}]}
    b = {"prompts": [64], "threads": 2, "rows": [{"scenario": "cap", "type": "Q4_K_M", "file_bytes": 3 * 2**30,
                                                   "cap_bytes": 2**30, "ratios": r},
                                                  {"scenario": "ram", "type": "Q8_0", "file_bytes": 1.0, "ratios": {}}]}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    doc = bench_gguf.combined([tmp_path / "a.json", tmp_path / "b.json"])
    assert [(x["scenario"], x["file_bytes"]) for x in doc["rows"]] == [("ram", 2.6e9), ("cap", 3 * 2**30)]
    table = bench_gguf.render(doc)
    assert "| cap (cap 1.00 GiB = file / 3.0) | Q4_K_M | 3.22 | 2 | 3.00 / 1.00 (3.00x) |" in table
    assert "| ram | Q8_0 |" in table and "prefill 512 tok/s" in table



def test_bench_lock_under_flock_of_the_same_file(tmp_path):
    """`flock LOCK python -m bench...`: the bench's own lock sees an ancestor holding it and goes on
    (taking it again would wait forever); a lock held by an unrelated process is waited for."""
    import subprocess
    import sys
    from pathlib import Path

    lock = tmp_path / "bench.lock"
    root = Path(__file__).resolve().parents[1]
    child = (f"from pathlib import Path; from bench.common import bench_lock\n"
             f"with bench_lock(Path({str(lock)!r})): print('inside')")
    # what flock(1) does: hold the lock, run the command as a child
    parent = (f"import fcntl, subprocess, sys\nf = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
              f"sys.exit(subprocess.run([sys.executable, '-c', {child!r}]).returncode)")
    r = subprocess.run([sys.executable, "-c", parent], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "inside", r.stderr
    # an unrelated holder: the bench waits (times out here) and says so
    hold = (f"import fcntl, time\nf = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            f"print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(subprocess.TimeoutExpired) as e:
            subprocess.run([sys.executable, "-c", child], cwd=root, capture_output=True, timeout=8)
        assert b"waiting for" in (e.value.stderr or b"")
    finally:
        holder.kill()
        holder.wait()
