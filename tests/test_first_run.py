"""First run (issue 12 item 13): scripts/env.sh says what it is doing; a slow load shows
progress on a terminal and stays quiet otherwise; the options have help texts."""

from __future__ import annotations

import io
import os
import subprocess
import threading
from pathlib import Path

from moetier.cli import build_parser
from moetier.commands.run import loading_notice

ROOT = Path(__file__).resolve().parents[1]


def test_env_sh_reports_its_steps(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    (venv / "bin" / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / "bin" / "activate").write_text(f'PATH="{venv}/bin:$PATH"\n')
    p = subprocess.run(["bash", "-c", f"source {ROOT}/scripts/env.sh"], capture_output=True, text=True,
                       env={**os.environ, "MOETIER_VENV": str(venv)}, timeout=60)
    assert p.returncode == 0, p.stderr
    for step in ("[moetier] installing into", "1/3", "2/3", "3/3", "[moetier] installed in"):
        assert step in p.stderr, p.stderr
    assert "-q" in log.read_text()  # not a terminal: pip is quiet
    p = subprocess.run(["bash", "-c", f"source {ROOT}/scripts/env.sh"], capture_output=True, text=True,
                       env={**os.environ, "MOETIER_VENV": str(venv)}, timeout=60)
    assert "installing" not in p.stderr  # stamped: nothing to do, nothing said


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_load_progress_only_on_a_terminal():
    release = threading.Event()
    tty = Tty()
    with loading_notice("big model", stream=tty, after=0.0, every=0.01):
        while "loading big model" not in tty.getvalue():  # it ticks while the load runs
            release.wait(0.01)
    assert tty.getvalue().endswith("s]\n") and "[loaded big model in" in tty.getvalue()
    plain = io.StringIO()
    with loading_notice("big model", stream=plain, after=0.0, every=0.01):
        release.wait(0.05)
    assert plain.getvalue() == ""
    quiet = Tty()
    with loading_notice("big model", stream=quiet, enabled=False, after=0.0, every=0.01):  # --json
        release.wait(0.05)
    assert quiet.getvalue() == ""


def test_every_run_chat_serve_option_has_help():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = []
    for name, p in sub.choices.items():
        assert p.description, f"{name} has no description"
        for a in p._actions:
            if a.dest != "help" and not a.help:
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing
