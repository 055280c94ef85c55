"""Building the native kernels: the one-line warning without a (working) compiler, a kernel cache safe to
share (two processes compiling at once), an unwritable cache dir (falls back to a temp dir, said once),
and what ``moetier doctor`` reports about them."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moetier import native
from moetier.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process state in which the library was never tried, a fresh cache, the native path on."""
    for name, value in (("_tried", False), ("_lib", None), ("_reason", None), ("_path", None), ("_log", None),
                        ("_fallback", None)):
        monkeypatch.setattr(native, name, value)
    monkeypatch.setenv("MOETIER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MOETIER_NATIVE", raising=False)
    return tmp_path


@pytest.fixture
def cc():
    found = native._compiler()
    if found is None:
        pytest.skip("no C compiler on PATH")
    return shutil.which(found)


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_no_compiler_warns_once(fresh, monkeypatch, capsys):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(fresh / "empty"))
    assert native.library() is None
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert "not built" in err[0] and "no C compiler" in err[0]  # what
    assert "torch path" in err[0]  # what it costs
    assert "apt-get install gcc" in err[0]  # how to fix it
    assert native.library() is None and native.library() is None
    assert capsys.readouterr().err == ""  # once per process


def test_failing_compiler_warns_once_with_its_error(fresh, monkeypatch, capsys, cc):
    bad = _script(fresh / "badcc", f"""\
        if [ "$1" = "--version" ]; then exec {cc} --version; fi
        echo "decode.c:1:1: error: boom from the compiler" >&2
        exit 1
        """)
    monkeypatch.setenv("CC", bad)
    assert native.library() is None
    reason = native.unavailable_reason()
    assert reason and "failed" in reason and "boom from the compiler" in reason
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "boom from the compiler" in err[0] and "torch path" in err[0], err
    assert not list((fresh / "cache" / "native").iterdir())  # no half-built library or temp file left
    assert native.library() is None and capsys.readouterr().err == ""
    info = native.build_info()
    assert not info["available"] and "boom from the compiler" in info["compiler_output"]


def test_working_build_says_nothing(fresh, capsys, cc):
    assert native.library() is not None, native.unavailable_reason()
    assert capsys.readouterr().err == ""
    (so,) = (fresh / "cache" / "native").iterdir()
    assert so.suffix == ".so" and native.build_info()["library"] == str(so)


WORKER = """
import os, sys, time
from pathlib import Path
from moetier import native  # imports torch: slow, so the barrier below comes after it
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
lib = native.library()
print("OK" if lib is not None else "FAILED", native._path or native.unavailable_reason())
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MOETIER_NATIVE", "TMPDIR")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def test_two_processes_compiling_at_once_both_succeed(tmp_path, cc):
    """A compiler wrapper holds each compile until both processes are compiling, so the builds really race
    (neither finds the other's library in the cache); both must load a complete library."""
    started = tmp_path / "started"
    started.mkdir()
    wrapper = _script(tmp_path / "slowcc", f"""\
        case " $* " in *" -shared "*) ;; *) exec {cc} "$@";; esac  # only the library build waits
        touch "{started}/$$"
        i=0
        while [ "$(ls "{started}" | wc -l)" -lt 2 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
        exec {cc} "$@"
        """)
    env = _env(MOETIER_CACHE_DIR=str(tmp_path / "cache"), CC=wrapper)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / f"ready{i}"), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.startswith("OK"), (out, err)
    assert len(list(started.iterdir())) == 2  # both compiled: a real race
    files = list((tmp_path / "cache" / "native").iterdir())
    assert [f.suffix for f in files] == [".so"], files  # one library, no temp files left
    assert {out.split()[1] for out, _ in outs} == {str(files[0])}


def test_unwritable_cache_falls_back_to_a_temp_dir(tmp_path, cc):
    """The cache dir cannot be created (its parent is a file: fails even for root, unlike chmod)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    code = """
from moetier import native
a = native.library()
native._tried, native._lib = False, None  # a second load in the same process: no second note
b = native.library()
print("OK" if a is not None and b is not None else "FAILED", native.build_info()["library"])
"""
    env = _env(MOETIER_CACHE_DIR=str(blocker / "cache"), TMPDIR=str(tmpdir))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("OK"), (res.stdout, res.stderr)
    err = _lines(res.stderr)
    assert len(err) == 1 and "not writable" in err[0] and str(blocker / "cache" / "native") in err[0], err
    lib = Path(res.stdout.split()[1])
    assert lib.parent == tmpdir / f"moetier-{os.getuid()}" / "native" and lib.is_file()
    assert str(lib.parent) in err[0]  # says where it went
    assert not (tmpdir / f"moetier-{os.getuid()}").stat().st_mode & 0o077  # private


def test_doctor_reports_the_kernels(fresh, capsys, cc):
    assert cli_main(["doctor", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    n = d["native"]
    assert n["available"] and n["compiler"] == cc and "decode.c" in n["sources"]
    assert Path(n["library"]).parent == fresh / "cache" / "native"
    assert n["dispatch"] == native.isa() and n["dispatch"] in n["isas_supported"]
    assert n["dispatch"] in native.ISAS
    import torch

    assert d["torch"]["version"] == torch.__version__ and d["torch"]["threads"] >= 1
    assert d["cache"]["dir"] == str(fresh / "cache") and d["cache"]["writable"]
    assert set(d["extras"]) == {"serve", "plot", "gguf", "bench"}
    assert cli_main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert f"({n['dispatch']} path)" in text and "extra serve" in text
    assert f"kernel isas   {' '.join(native.isas_supported())} (this CPU runs" in text


def test_missing_sources_say_so(fresh, monkeypatch, capsys, cc):
    """An install without the C sources (the bug of issue 18) names the problem instead of building an empty
    library."""
    monkeypatch.setattr(native, "CSRC", fresh / "csrc-empty")
    assert native.library() is None
    assert "no C sources in" in native.unavailable_reason() and "reinstall" in native.unavailable_reason()
    assert len(_lines(capsys.readouterr().err)) == 1


def test_damaged_cached_library_is_rebuilt(fresh, capsys, cc):
    d = fresh / "cache" / "native"
    d.mkdir(parents=True)
    damaged = d / f"decode-{native._key(cc)}.so"
    damaged.write_bytes(b"\x7fELF truncated")
    assert native.library() is not None, native.unavailable_reason()
    assert native._path == damaged and damaged.stat().st_size > 1000  # replaced in place by a good build
    assert capsys.readouterr().err == ""
