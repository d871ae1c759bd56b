"""Shared fixtures for tests/data: one MNIST-1D generation per session, in a temporary cache."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mnist1d_cache(tmp_path_factory):
    """A QNREF_CACHE directory holding the MNIST-1D arrays, generated once for the session."""
    pytest.importorskip("mnist1d")
    from qnref.data import mnist1d_arrays

    root = tmp_path_factory.mktemp("qnref-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QNREF_CACHE", str(root))
        arrays = mnist1d_arrays()
    return root, arrays


@pytest.fixture
def mnist1d_env(mnist1d_cache, monkeypatch):
    root, arrays = mnist1d_cache
    monkeypatch.setenv("QNREF_CACHE", str(root))
    return root, arrays


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QNREF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
