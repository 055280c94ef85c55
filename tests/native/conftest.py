"""Fixtures shared by the native-kernel tests: the native path on (whatever the caller's
environment says), the built library, and the MLA multi-token steps held to the absorbed form."""

from __future__ import annotations

import pytest

from moetier import native


@pytest.fixture(scope="module")
def _native_on():
    """MOETIER_NATIVE / MOETIER_ISA unset for the module (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("_native_on")``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MOETIER_NATIVE", raising=False)
        mp.delenv("MOETIER_ISA", raising=False)
        yield


@pytest.fixture(scope="module")
def lib(_native_on):
    """The native library (built on first use); skipped only where no C compiler exists."""
    if native._compiler() is None:
        pytest.skip("no C compiler on PATH")
    lib = native.library()
    assert lib is not None, native.unavailable_reason()
    return lib


@pytest.fixture
def absorbed(monkeypatch):
    """MLA multi-token steps in the absorbed form only (the single-token step's arithmetic, so a
    prefill is bit for bit the single steps; the plain form a prompt takes by default is not)."""
    from moetier.native import mla_prefill

    monkeypatch.setattr(mla_prefill, "PLAIN", False)
