"""Fuzz the command line (issue 12): generated argument lists for every subcommand (types,
signs, units, unicode and undecodable bytes, missing values, missing and repeated flags).
Every outcome is exit 0, or exit 2 with ONE line on stderr; never a traceback.

The arguments are drawn from each subcommand's own parser (its flags, their types and
choices) and from pools of awkward values. What would block or take long is stubbed without
skipping any validation: ``serve`` does not listen (``moetier.serve.app.serve``), ``chat``
reads an empty stdin, ``probe`` measures with tiny sizes, generation stops after 4 tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sys

import pytest

from moetier import cli
from tests.helpers import make_tiny_checkpoint

INTS = ["0", "1", "-5", "3", "16", "1000000000000", "x", "1.5", "", "٣"]
FLOATS = ["0", "0.7", "-1", "2", "nan", "inf", "-inf", "1e400", "abc", "0.0001"]
STRINGS = ["ROMEO:", "2", "2.0", "0.25", "25%", "200%", "-1G", "8GB", "600M", "3.35TB/s", "989T", "0", "abc",
           "é漢字🙂", "bad\udcffbyte", "", " ", "--", "x=1", "link_bw=4x", "cache=2x", "nope=3", "/nonexistent/path",
           "deepseek-v3", "qwen3-30b-a3b", "h100", "cpu", "bf16", "int4", "mixed:experts=fp4"]
POSITIONALS = {
    "census": ["deepseek-v3", "olmoe-1b-7b", "nope", "/nonexistent", "MODEL"],
    "plan": ["qwen3-30b-a3b", "mixtral-8x7b", "nope", "/nonexistent"],
    "simulate": ["TRACE", "/nonexistent.npz"],
    "machines": ["h100", "nope"],
    "trace": ["stats", "import", "/nonexistent"],
}
CASES_PER_COMMAND = 24


def subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def value_for(action: argparse.Action, rnd: random.Random) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices and rnd.random() < 0.7:
        return [rnd.choice([*map(str, action.choices), "bogus"])]
    pool = INTS if action.type is int else FLOATS if action.type is float else STRINGS
    return [rnd.choice(pool)]


def generate(name: str, p: argparse.ArgumentParser, rnd: random.Random, extra: dict[str, list[str]]) -> list[str]:
    opts = [a for a in p._actions if a.option_strings and a.dest != "help"]
    args: list[str] = [name]
    pos = [a for a in p._actions if not a.option_strings]
    if pos and rnd.random() < 0.8:
        args.append(rnd.choice(extra.get(name, POSITIONALS.get(name, ["x"]))))
    for a in rnd.sample(opts, k=min(len(opts), rnd.randint(0, 5))):
        flag = rnd.choice(a.option_strings)
        vals = value_for(a, rnd)
        args += [flag, *vals]
        if rnd.random() < 0.1:  # repeated
            args += [flag, *value_for(a, rnd)]
    if rnd.random() < 0.1 and len(args) > 1:  # a flag missing its value at the end
        args = args[:-1] if args[-1] and not args[-1].startswith("-") else args
    return args


@pytest.fixture()
def stubs(monkeypatch, tmp_path):
    """Stubs for the fuzz; also runs it in ``tmp_path``: generated options such as ``--plot 25%``
    or ``--out h100`` write relative paths, which must not land in the checkout."""
    import moetier.runtime
    import moetier.serve.app
    from moetier.planner import probe as probe_mod

    monkeypatch.setenv("MOETIER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(moetier.serve.app, "serve", lambda *a, **k: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    real_probe = probe_mod.probe
    monkeypatch.setattr(probe_mod, "probe", lambda sizes=None, directory=None: real_probe(
        probe_mod.ProbeSizes(mem_bytes=2**20, mem_repeats=1, disk_bytes=2**20, disk_block=2**16, matmul_n=64,
                             matmul_seconds=0.01), directory))
    real_gen = moetier.runtime.Model.generate_ids

    def short(self, prompt_ids, max_tokens=128, *a, **k):
        return real_gen(self, prompt_ids, min(max_tokens, 4), *a, **k)

    monkeypatch.setattr(moetier.runtime.Model, "generate_ids", short)


def outcome(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse: --help (0) or a usage error (2)
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_generated_argument_lists_never_trace_back(stubs, tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz"), "qwen3_moe")
    trace = tmp_path_factory.mktemp("fuzz_trace") / "t.npz"
    assert outcome(["trace", str(ckpt), "--prompts", str(_prompts(trace.parent)), "--out", str(trace),
                    "--max-tokens", "3"])[0] == 0
    model_dirs = [str(ckpt), "/nonexistent", "é"]
    extra = {"run": model_dirs, "chat": model_dirs, "serve": model_dirs,
             "simulate": [str(trace), "/nonexistent.npz"], "trace": ["stats", str(ckpt)]}
    rnd = random.Random(12)
    bad = []
    for name, p in subparsers().items():
        for _ in range(CASES_PER_COMMAND):
            argv = generate(name, p, rnd, extra)
            if name == "run" and "--prompt" not in argv and rnd.random() < 0.7:
                argv += ["--prompt", rnd.choice(["ROMEO:", "é漢字", "x\udcff"])]
            if name == "trace" and argv[1:2] == ["stats"]:
                argv.insert(2, rnd.choice([str(trace), "/nonexistent"]))
            try:
                rc, out, err = outcome(argv)
            except Exception as e:
                bad.append(f"{argv!r}: raised {type(e).__name__}: {e}")
                continue
            lines = err.strip().splitlines()
            if rc == 0:
                if "Traceback" in err:
                    bad.append(f"{argv!r}: exit 0 with a traceback")
            elif rc == 2:
                if len(lines) != 1 or "error" not in lines[0]:
                    bad.append(f"{argv!r}: exit 2 with {len(lines)} stderr lines: {err[-600:]!r}")
            else:
                bad.append(f"{argv!r}: exit {rc}: {err[-600:]!r}")
    assert not bad, "\n".join(bad)


def _prompts(d):
    p = d / "prompts.txt"
    p.write_text("hello world\nthe end\n")
    return p


def test_specific_traps_are_one_line_errors(stubs, tmp_path):
    bad_file = tmp_path / "p.txt"
    bad_file.write_bytes(b"ok\n\xff\xfe bad\n")
    cases = [
        (["run", "--prompt", "ab\udcff"], "--prompt: not valid UTF-8 text (byte 0xff"),
        (["run", "--prompt", "x", "--threads", "0"], "--threads: expected a positive integer or 'auto', got '0'"),
        (["run", "--prompt", "x", "--max-tokens", "-5"], "--max-tokens -5"),
        (["run", "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["run", "--prompt", "x", "--expert-cache", "2"], "did you mean '2GB'"),
        (["run", "--prompt", "x", "--max-ram", "600"], "write the unit"),
        (["plan", "mixtral-8x7b", "--machine", "h100", "--cache", "8"], "did you mean '8GB'"),
        (["plan", "mixtral-8x7b", "--machine", "h100", "--devices", "0"], "--devices 0"),
        (["plan", "mixtral-8x7b", "--machine", "h100", "--cache", "3.35TB/s"], "not a size"),
        (["trace", "--prompts", str(bad_file), "--out", str(tmp_path / "t.npz")], ":2: not UTF-8 text (byte 0xff"),
        (["trace", "--prompts", str(bad_file), "--out", str(tmp_path / "t.npz"), "--max-tokens", "0"],
         "--max-tokens 0"),
    ]
    import moetier.runtime

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    for argv, want in cases:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(moetier.runtime, "load_spec", no_load)
            rc, out, err = outcome(argv)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and want in err, (argv, err)
        assert "TB/s" not in err or "3.35TB/s" in argv  # size errors show sizes, not bandwidths
