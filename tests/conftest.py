"""Shared test setup: repo root on sys.path, XLA on CPU by default, common fixtures."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# PyTorch/XLA tests run on XLA:CPU unless the caller picked a device.
os.environ.setdefault("PJRT_DEVICE", "CPU")


def pytest_collection_modifyitems(config, items):
    """Tests that use the ``xla_device`` fixture get the ``xla`` marker (``-m xla`` selects them)."""
    for item in items:
        if "xla_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xla)


@pytest.fixture
def xla_device():
    """The default XLA device; skips where torch_xla is not installed (the `latest` env)."""
    pytest.importorskip("torch_xla", reason="torch_xla is not installed in this environment")
    import torch_xla

    return torch_xla.device()


@pytest.fixture
def jax_x64():
    """Turn ``jax_enable_x64`` on for one test, then restore it."""
    import bridge  # noqa: F401  (import JAX through bridge, as the library does)
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
