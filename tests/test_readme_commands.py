"""Every command in README.md's ```bash blocks, in the ``scripts/run`` header and in the
subcommands' ``--help`` examples runs as written (issue 12): exit 0, no traceback.

They run in order (the tour's trace is recorded before it is analysed) in a temporary
directory that sees the repository's ``examples/``, ``moetier/`` and ``tests/`` (the paths the tour
uses: ``tests/data/gguf`` holds the tiny GGUF it runs),
with a private probe cache (``MOETIER_CACHE_DIR``) so the user's is not touched. Skipped: the
venv setup (``. .venv/bin/activate``), ``./scripts/test`` (this suite) and the install-from-wheel
lines (``pip install ...``, ``python -m build ...``: tests/test_wheel.py builds, installs and runs
the wheel). ``VAR=value`` words before a command are its environment. ``./scripts/run ARGS``
runs as the ``moetier run`` line it executes. ``moetier serve`` runs in the foreground: it is
started (on a free port when the written one is taken), asked ``/v1/models``, and stopped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MOETIER = [sys.executable, "-m", "moetier.cli"]


def readme_commands() -> list[list[str]]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def script_run_commands() -> list[list[str]]:
    """``./scripts/run ARGS`` = the ``exec moetier run ...`` line of scripts/run with ARGS appended."""
    text = (ROOT / "scripts" / "run").read_text()
    base = script_run_commands_base()
    examples = [shlex.split(m, comments=True) for m in re.findall(r"^#\s+(\./scripts/run\b.*)$", text, re.M)]
    return [base + ex[1:] for ex in examples]


def help_commands() -> list[list[str]]:
    from moetier.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    out = []
    for p in sub.choices.values():
        for line in (p.epilog or "").splitlines():
            if line.strip().startswith("moetier "):
                out.append(shlex.split(line, comments=True))
    return out


INSTALL = (["pip", "install"], ["python", "-m", "build"])  # run by tests/test_wheel.py


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading ``VAR=value`` words (the shell's per-command environment) and the command."""
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        k, v = words[0].split("=", 1)
        env[k] = v
        words = words[1:]
    return env, words


def all_commands() -> list[list[str]]:
    cmds = []
    for words in readme_commands() + script_run_commands() + help_commands():
        if words[0] == "." or words[0] == "./scripts/test" or any(words[: len(p)] == p for p in INSTALL):
            continue
        if words[0] == "./scripts/run":
            words = script_run_commands_base() + words[1:]
        cmds.append(words)
    return cmds


def script_run_commands_base() -> list[str]:
    text = (ROOT / "scripts" / "run").read_text()
    return shlex.split(re.search(r"^exec (moetier run .*?) \"\$@\"$", text, re.M).group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(words: list[str], cwd: Path, env: dict[str, str]) -> str | None:
    words = list(words)
    port = int(words[words.index("--port") + 1]) if "--port" in words else 8000
    with socket.socket() as s:
        taken = s.connect_ex(("127.0.0.1", port)) == 0
    if taken:
        port = free_port()
        if "--port" in words:
            words[words.index("--port") + 1] = str(port)
        else:
            words += ["--port", str(port)]
    proc = subprocess.Popen(MOETIER + words[1:], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"exited {proc.returncode}: {proc.stderr.read()[-2000:]}"
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models")
                if env.get("MOETIER_API_KEY"):
                    req.add_header("Authorization", f"Bearer {env['MOETIER_API_KEY']}")
                with urllib.request.urlopen(req, timeout=5) as r:
                    body = json.loads(r.read())
                return None if body.get("data") else f"/v1/models answered {body}"
            except OSError:
                time.sleep(0.5)
        return "did not answer /v1/models within 300 s"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_commands_are_found():
    words = {w[1] for w in (split_env(c)[1] for c in all_commands()) if len(w) > 1}
    assert {"run", "plan", "census", "trace", "simulate", "serve", "probe"} <= words
    assert any(w[0] == "./scripts/run" for w in readme_commands())


@pytest.mark.slow
def test_every_documented_command_runs(tmp_path):
    for name in ("examples", "moetier", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOETIER_CACHE_DIR": str(tmp_path / "cache")}
    failures = []
    for line in all_commands():
        extra, words = split_env(line)
        assert words[0] == "moetier", line
        cmd_env = {**env, **extra}
        if words[1] == "serve":
            err = run_serve(words, tmp_path, cmd_env)
        else:
            p = subprocess.run(MOETIER + words[1:], cwd=tmp_path, env=cmd_env, capture_output=True, text=True,
                               timeout=900)
            err = None if p.returncode == 0 and "Traceback" not in p.stderr else \
                f"exit {p.returncode}: {p.stderr.strip()[-1500:]}"
        if err:
            failures.append(f"{shlex.join(line)}\n    {err}")
    assert not failures, "\n".join(failures)
