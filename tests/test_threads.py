"""The default thread count: cores available (affinity, SMT, cgroup quota), other load, the choice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetier import threads as mt
from moetier.errors import ConfigError
from tests.helpers.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("threads"), "qwen3_moe", tokenizer=False)


def test_cpu_list():
    assert mt._cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert mt._cpu_list("5") == {5}


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    for cpu, sib in {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3", 4: "4"}.items():
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(sib + "\n")
    assert mt.physical_cores({0, 1, 2, 3, 4}, tmp_path) == 3
    assert mt.physical_cores({0, 2}, tmp_path) == 1
    assert mt.physical_cores({7, 8}, tmp_path) == 2  # no topology: each CPU is a core


def test_cgroup_quota_v2_takes_the_tightest_ancestor(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "a" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "a" / "b" / "cpu.max").write_text("300000 100000\n")
    assert mt.cgroup_quota(tmp_path, "0::/a/b\n") == pytest.approx(1.5)
    assert mt.cgroup_quota(tmp_path, "0::/\n") is None


def test_cgroup_quota_v1(tmp_path):
    d = tmp_path / "cpu,cpuacct" / "docker" / "x"
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text("250000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    assert mt.cgroup_quota(tmp_path, "4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n") == pytest.approx(2.5)
    assert mt.cgroup_quota(tmp_path, "4:memory:/docker/x\n") is None


def test_available_cores_is_within_affinity():
    n = mt.available_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def _stat(ticks: dict[int, tuple[int, int]]) -> str:
    """/proc/stat text: cpuN busy (user) and idle ticks."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for c, (busy, idle) in ticks.items():
        lines.append(f"cpu{c} {busy} 0 0 {idle} 0 0 0 0 0 0")
    return "\n".join(lines) + "\nintr 1 2 3\n"


def test_cpu_load_subtracts_our_own_time(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(_stat({0: (0, 0), 1: (0, 0), 2: (0, 0)}))
    clock = {"wall": 100.0, "cpu": 5.0}
    monkeypatch.setattr(mt.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(mt.time, "process_time", lambda: clock["cpu"])
    load = mt.CpuLoad({0, 1}, str(stat))  # cpu2 is not ours: its load does not count
    hz = load.hz
    # 2 s: cpu0 fully busy, cpu1 half busy, cpu2 busy; we used 1 s of CPU -> others 1.5 - 0.5 = 1 core
    clock["wall"], clock["cpu"] = 102.0, 6.0
    stat.write_text(_stat({0: (2 * hz, 0), 1: (hz, hz), 2: (2 * hz, 0)}))
    assert load.sample() == pytest.approx(1.0)
    # next 1 s: everything idle -> 0 (never negative)
    clock["wall"], clock["cpu"] = 103.0, 6.5
    stat.write_text(_stat({0: (2 * hz, hz), 1: (hz, 2 * hz), 2: (2 * hz, hz)}))
    assert load.sample() == 0.0


def test_busy_jiffies_counts_steal_not_iowait():
    text = "cpu0 1 2 3 100 7 4 5 6 0 0\n"
    assert mt._busy_jiffies({0}, text) == 1 + 2 + 3 + 4 + 5 + 6


def test_choose():
    assert mt.choose(2, 0.0) == 2
    assert mt.choose(2, 0.2) == 2
    assert mt.choose(2, 1.0) == 1  # one core held by a busy loop
    assert mt.choose(2, 0.5) == 1
    assert mt.choose(2, 5.0) == 1  # never below one
    assert mt.choose(8, 2.1) == 6
    assert mt.choose(1, 0.0) == 1
    # hysteresis: a thread given up comes back only below RAISE_AT
    assert mt.choose(2, 0.2, current=1) == 1
    assert mt.choose(2, 0.1, current=1) == 2
    assert mt.choose(2, 0.2, current=2) == 2


class _FakeLoad:
    def __init__(self, others):
        self.others = list(others)
        self.t = 0.0

    def elapsed(self):
        return 10.0

    def sample(self):
        return self.others.pop(0)


def test_auto_threads_follows_the_load_and_yields_to_explicit_settings(monkeypatch):
    before = torch.get_num_threads()
    try:
        a = mt.AutoThreads.__new__(mt.AutoThreads)
        a.cores, a.threads, a.others, a.changes, a.overridden = 2, None, None, 0, False
        a.load = _FakeLoad([0.0, 1.0, 0.05])
        assert a.update() == 2 and torch.get_num_threads() == 2
        assert a.update() == 1 and torch.get_num_threads() == 1  # a neighbour took a core
        assert a.update() == 2 and a.changes == 2  # ... and left
        torch.set_num_threads(1)  # someone chose explicitly: adapting stops
        assert a.update() == 1 and a.overridden
        assert a.describe()["mode"].startswith("fixed")
    finally:
        torch.set_num_threads(before)


def test_auto_threads_interval(monkeypatch):
    before = torch.get_num_threads()
    try:
        a = mt.AutoThreads()
        n = a.update()
        assert 1 <= n <= a.cores and a.others is not None
        # within INTERVAL the choice is not re-sampled
        last = a.load.last
        assert a.update() == n and a.load.last is last
    finally:
        torch.set_num_threads(before)


def test_set_wait_policy_respects_the_user():
    env: dict[str, str] = {}
    assert mt.set_wait_policy(env) and env == {"GOMP_SPINCOUNT": mt.SPINCOUNT}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not mt.set_wait_policy(env) and "GOMP_SPINCOUNT" not in env
    env = {"GOMP_SPINCOUNT": "7"}
    assert not mt.set_wait_policy(env) and env["GOMP_SPINCOUNT"] == "7"


def test_import_sets_the_wait_policy_before_torch():
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    code = "import os, moetier, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == mt.SPINCOUNT


def test_load_threads_argument(tiny):
    import moetier

    before = torch.get_num_threads()
    try:
        m = moetier.load(tiny, tokenizer=False, threads=1)
        assert m.auto_threads is None and torch.get_num_threads() == 1
        m = moetier.load(tiny, tokenizer=False)
        assert m.auto_threads is mt.auto()
        for bad in (0, -2, "many", True):
            with pytest.raises(ConfigError, match="threads"):
                moetier.load(tiny, tokenizer=False, threads=bad)
    finally:
        torch.set_num_threads(before)


def test_cli_threads_option():
    from moetier.cli import build_parser

    p = build_parser()
    assert p.parse_args(["run", "--prompt", "x", "--threads", "3"]).threads == 3
    assert p.parse_args(["run", "--prompt", "x", "--threads", "auto"]).threads is None
    assert p.parse_args(["run", "--prompt", "x"]).threads is None
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--prompt", "x", "--threads", "0"])
    help_text = p._subparsers._group_actions[0].choices["run"].format_help()
    assert "--threads" in help_text and "auto" in help_text


def test_first_choice_waits_for_a_window(monkeypatch):
    slept = []
    monkeypatch.setattr(mt.time, "sleep", lambda s: slept.append(s))
    before = torch.get_num_threads()
    try:
        a = mt.AutoThreads()  # sampling starts now: the first choice waits for FIRST_WINDOW
        a.update()
    finally:
        torch.set_num_threads(before)
    assert len(slept) == 1 and 0 < slept[0] <= mt.FIRST_WINDOW
