"""The probe: measurements (tiny sizes), JSON cache in MOETIER_CACHE_DIR, the cpu machine."""

from __future__ import annotations

import json
import os

import pytest

from moetier.cli import main
from moetier.planner import machines, probe

TINY = probe.ProbeSizes(mem_bytes=4 * 2**20, mem_repeats=2, disk_bytes=2 * 2**20, disk_block=2**20,
                        matmul_n=64, matmul_seconds=0.02, kernel_n=128, kernel_seconds=0.005)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MOETIER_CACHE_DIR", str(d))
    return d


def test_cache_dir_honours_env(cache):
    assert probe.cache_dir() == cache
    assert probe.cache_path() == cache / "probe.json"


def test_probe_measures_and_caches(cache, monkeypatch):
    rec, cached = probe.get_probe(sizes=TINY)
    assert not cached
    assert (cache / "probe.json").is_file()
    on_disk = json.loads((cache / "probe.json").read_text())
    assert on_disk["timestamp"] == rec["timestamp"]
    for k in ("memory_read_bw", "memory_read_bw_per_core", "disk_read_bw", "ram_bytes", "disk_free_bytes"):
        assert rec[k] > 0, k
    assert rec["memory_method"] in (probe.MEMORY_METHOD, "torch sum, wall clock")
    if rec["memory_method"] == probe.MEMORY_METHOD:  # rounds spread over the probe; the figures: their best
        assert len(rec["memory_rounds"]) == probe.MEMORY_ROUNDS and rec["memory_reader"]
        assert rec["memory_read_bw_per_core"] == max(r[0] for r in rec["memory_rounds"])
        assert rec["memory_read_bw"] == max(r[1] for r in rec["memory_rounds"])
    assert rec["matmul_flops"]["fp32"] > 0 and rec["matmul_flops"]["bf16"] > 0
    assert rec["cores_usable"] >= 1
    assert rec["disk_method"] in ("O_DIRECT", "fadvise-DONTNEED")
    assert not list(cache.glob("probe-*.bin")), "temp file must be removed"

    # second call: served from the cache, nothing measured
    def boom(*a, **k):
        raise AssertionError("should not re-measure")

    monkeypatch.setattr(probe, "probe", boom)
    rec2, cached2 = probe.get_probe(sizes=TINY)
    assert cached2 and rec2["timestamp"] == rec["timestamp"]
    m = machines.get_machine("cpu")
    assert m.confidence == "M"
    assert [t.name for t in m.tiers] == ["dram", "ssd"] and m.compute_tier_name == "dram"
    assert m.tier("dram").read_bw == rec["memory_read_bw"]
    assert m.flops["bf16"] == rec["matmul_flops"]["bf16"]
    assert m.efficiency.compute == 1.0
    from moetier import native

    if native.library() is not None:  # the native decode kernels' rate per stored format
        assert set(rec["kernel_rates"]) == {"fp32", "bf16", "fp8", "int8:g128", "int4:g32", "int4:g128", "fp4",
                                            "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k",
                                            "q6_k"}  # the GGUF files' types too (`moetier plan MODEL.gguf`)
        assert all(v > 0 for v in rec["kernel_rates"].values())
        assert m.kernel_rate("int4:g32") == rec["kernel_rates"]["int4:g32"]
    else:
        assert rec["kernel_rates"] == {} and m.kernel_rates == {}


def test_refresh_remeasures(cache):
    rec, _ = probe.get_probe(sizes=TINY)
    rec2, cached = probe.get_probe(refresh=True, sizes=TINY)
    assert not cached and rec2["timestamp"] >= rec["timestamp"]
    assert json.loads(probe.cache_path().read_text())["timestamp"] == rec2["timestamp"]


def test_corrupt_or_old_cache_is_remeasured(cache):
    cache.mkdir(parents=True)
    probe.cache_path().write_text("{not json")
    assert probe.load_cached() is None
    probe.cache_path().write_text(json.dumps({"version": -1}))
    assert probe.load_cached() is None
    rec, cached = probe.get_probe(sizes=TINY)
    assert not cached and probe.load_cached()["timestamp"] == rec["timestamp"]


def _fake_record() -> dict:
    import time  # fresh (an old record would be re-measured as stale)

    return {"version": probe.PROBE_VERSION, "timestamp": time.time(), "timestamp_utc": "2026-01-01T00:00:01Z",
            "host": "fake", "cores_usable": 2, "cores_logical": 2, "cores_physical": 2,
            "ram_bytes": 16e9, "ram_available_bytes": 8e9, "disk_free_bytes": 1e12, "disk_dir": "/x",
            "memory_read_bw": 20e9, "disk_read_bw": 2e9, "disk_method": "O_DIRECT",
            "matmul_flops": {"fp32": 1e11, "bf16": 2e11}, "kernel_rates": {},
            "kernel_rates_method": probe.KERNEL_RATES_METHOD, "sizes": {}, "probe_seconds": 1.0,
            "memory_read_bw_per_core": 12e9, "memory_method": probe.MEMORY_METHOD}


def test_a_record_with_kernel_rates_timed_the_old_way_is_measured_again(cache):
    cache.mkdir(parents=True)
    rec = _fake_record()
    probe.cache_path().write_text(json.dumps(rec))
    assert probe.load_cached() is not None
    del rec["kernel_rates_method"]  # wall-clock rates at all cores (before 2026-12-02): load-sensitive
    probe.cache_path().write_text(json.dumps(rec))
    assert probe.load_cached() is None


def test_a_record_with_the_old_memory_figure_is_measured_again(cache):
    """A record whose memory bandwidth was a wall-clock torch sum (27-47 GB/s over one day on the
    shared VM) is measured again with the native CPU-time readers."""
    cache.mkdir(parents=True)
    rec = _fake_record()
    del rec["memory_method"]
    probe.cache_path().write_text(json.dumps(rec))
    assert probe.load_cached() is None
    # one taken without the native library says so and is kept (no re-probe on every command)
    probe.cache_path().write_text(json.dumps({**rec, "memory_method": "torch sum, wall clock"}))
    assert probe.load_cached() is not None


def test_best_pass_is_the_slowest_thread_of_the_fastest_pass():
    # 2 threads, 3 passes over 8 GB in all: pass 1's slowest thread took 0.5 s -> 16 GB/s
    cpu = [[1.0, 0.4, 0.9], [0.9, 0.5, 2.0]]
    assert probe.best_rates(8e9, cpu) == pytest.approx(16e9)
    assert probe.best_rates(8e9, [[2.0, 4.0]]) == pytest.approx(4e9)


def test_memory_buffer_is_larger_than_the_caches(monkeypatch):
    monkeypatch.setattr(probe, "llc_bytes", lambda: 32 * 2**20)
    assert probe.memory_buffer_bytes(4 * 2**20) == 256 * 2**20
    assert probe.memory_buffer_bytes(2**30) == 2**30


def test_memory_readers_read_every_byte_and_time_memory_not_cache():
    """The native readers' word sum equals the buffer's (every byte read on every pass, for 1
    and 2 threads: read_passes raises otherwise), the rates are plausible, and a buffer far larger
    than the caches reads slower than one that stays in L2 (the timing is of the reads)."""
    from moetier import native

    if native.library() is None:
        pytest.skip("native library unavailable")
    big = probe.memory_buffer_bytes(64 * 2**20)
    for threads in (1, 2):
        cpu, wall, nbytes = probe.read_passes(big, threads, 3)
        assert len(cpu) == threads and all(len(c) == 3 for c in cpu)
        assert nbytes == big
        assert all(t > 0 for c in cpu for t in c) and all(t > 0 for c in wall for t in c)
    cpu, _, nbytes = probe.read_passes(big, 1, 4)
    dram = probe.best_rates(nbytes, [c[1:] for c in cpu])
    cpu, _, nbytes = probe.read_passes(256 * 2**10, 1, 40)
    cached = probe.best_rates(nbytes, [c[1:] for c in cpu])
    assert 1e8 < dram < 1e12
    assert cached > 1.3 * dram, (cached, dram)
    one, every = probe.measure_memory_bw(16 * 2**20, 2)
    assert 1e8 < one < 1e12 and every >= 0.5 * one


@pytest.mark.parametrize("words", [1, 7, 8, 9, 63, 64, 65, 8 * 4 * 3 + 5, 100_003])
def test_memory_readers_sum_every_word_on_every_instruction_set(words):
    """mt_read_bw on every instruction set this CPU runs (forced like the weight kernels'), 1-3
    threads, 1-8 streams (3: rounded down to 2): its sum equals numpy's (mod 2^64) on sizes that
    are not whole lines, streams or threads, so no path skips or double-reads a word."""
    import numpy as np

    from moetier import native

    lib = native.library()
    if lib is None:
        pytest.skip("native library unavailable")
    rng = np.random.default_rng(words)
    ref = rng.integers(0, 2**64, size=words, dtype=np.uint64)
    want = int(ref.sum(dtype=np.uint64))  # numpy wraps mod 2^64, as the readers do
    buf = np.ascontiguousarray(ref)
    cpu, wall = np.zeros(3 * 2), np.zeros(3 * 2)
    try:
        for isa in native.isas_supported():
            native.set_isa(isa)
            for threads in (1, 2, 3):
                for streams in (1, 2, 3, 4, 8):
                    got = lib.mt_read_bw(buf.ctypes.data, words, threads, streams, 2, cpu.ctypes.data,
                                         wall.ctypes.data)
                    assert got == want * 2 % 2**64, (isa, threads, streams)
    finally:
        native.set_isa(None)


def test_memory_figure_is_the_best_round(monkeypatch):
    """MemoryReaders keeps each round's (one core, all cores) and the best of all rounds: a round
    taken while something else used the memory bus does not lower the figure."""
    from moetier import native

    if native.library() is None:
        pytest.skip("native library unavailable")
    m = probe.MemoryReaders(2**20, threads=2)
    cpu = iter([[[0.10]], [[0.08], [0.09]], [[0.05]], [[0.20], [0.50]], [[0.07]], [[0.04], [0.06]]])
    monkeypatch.setattr(probe, "read_passes", lambda buf, threads, passes: (next(cpu), [], 10**9))
    for _ in range(3):
        m.round(1)
    assert m.rounds == [(pytest.approx(10e9), pytest.approx(1e9 / 0.09)), (pytest.approx(20e9), pytest.approx(2e9)),
                        (pytest.approx(1e9 / 0.07), pytest.approx(1e9 / 0.06))]
    assert m.rates() == (pytest.approx(20e9), pytest.approx(1e9 / 0.06))


def test_machine_as_seen_by_fewer_cores():
    """A 1-thread run's bound: one core's memory read and kernel rates, not the machine's."""
    rec = {**_fake_record(), "kernel_rates": {"bf16": 80e9, "int4:g32": 60e9}}
    full = probe.machine_from_probe(rec)
    one = probe.machine_from_probe(rec, cores=1)
    assert full.tier("dram").read_bw == 20e9 and one.tier("dram").read_bw == 12e9
    assert full.kernel_rate("bf16") == 80e9 and one.kernel_rate("bf16") == 40e9
    assert one.kernel_rate("int4:g32") == 30e9
    assert probe.machine_from_probe(rec, cores=2).tier("dram").read_bw == 20e9
    old = {k: v for k, v in rec.items() if k != "memory_read_bw_per_core"}
    assert probe.machine_from_probe(old, cores=1).tier("dram").read_bw == 10e9


def test_probe_cli_reads_cache(cache, capsys):
    cache.mkdir(parents=True)
    probe.cache_path().write_text(json.dumps(_fake_record()))
    assert main(["probe", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["from_cache"] is True and d["memory_read_bw"] == 20e9
    assert main(["probe"]) == 0
    out = capsys.readouterr().out
    assert "20 GB/s" in out and "2 GB/s" in out and "cached" in out


def test_disk_bandwidth_small_file(tmp_path):
    bw, method = probe.measure_disk_bw(tmp_path, 2 * 2**20, 2**20)
    assert bw > 0 and method in ("O_DIRECT", "fadvise-DONTNEED")
    assert list(tmp_path.iterdir()) == []


def test_plan_on_measured_cpu_uses_cache(cache, capsys):
    """`moetier plan --machine cpu` reads the cached probe: dram (cache) -> ssd (store)."""
    cache.mkdir(parents=True)
    probe.cache_path().write_text(json.dumps(_fake_record()))
    assert main(["plan", "olmoe-1b-7b", "--machine", "cpu", "--cache", "1GB", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    tiers = d["placement"]["tiers"]
    assert [t["name"] for t in tiers] == ["dram", "ssd"]
    assert tiers[0]["experts"] > 0 and tiers[1]["experts"] > 0
    assert d["bottleneck"] == "communication"  # 2 GB/s disk feeds the misses
    assert d["efficiency"] == {"compute": 1.0, "memory": 1.0, "link": 1.0}
    ssd = d["decode"]["tiers"][1]
    assert ssd["mode"] == "move" and ssd["path_bw"] == 2e9


def test_probe_age_and_load_are_shown_and_stale_or_busy_probes_remeasured(cache, monkeypatch, capsys):
    """issue 12 item 11: a probe taken under load (9 GB/s instead of 40) was used silently."""
    monkeypatch.setattr(probe.os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # busy while probing
    rec, cached = probe.get_probe(sizes=TINY)
    assert not cached and rec["load_per_core"] == pytest.approx(9.0 / len(os.sched_getaffinity(0)))
    assert "busy" in probe.describe(rec) and "ago" in probe.describe(rec)
    m = probe.machine_from_probe(rec)
    assert "busy" in m.source
    from moetier.planner import roofline

    assert any("busy" in n for n in roofline.plan("olmoe-1b-7b", m).assumptions)  # shown where used
    # still busy: the busy probe is the best there is (kept); quiet now: measured again, said so
    assert probe.get_probe(sizes=TINY)[1] is True
    monkeypatch.setattr(probe.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    capsys.readouterr()
    rec2, cached = probe.get_probe(sizes=TINY)
    assert not cached and rec2["load_per_core"] == 0.0
    assert "was taken under load" in capsys.readouterr().err
    assert probe.get_probe(sizes=TINY)[1] is True
    # stale: measured again
    old = {**rec2, "timestamp": rec2["timestamp"] - probe.STALE_SECONDS - 1}
    probe.cache_path().write_text(json.dumps(old))
    assert probe.get_probe(sizes=TINY)[1] is False
    assert "days old" in capsys.readouterr().err
