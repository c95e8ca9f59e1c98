"""Importing the library changes and prints nothing unless the process asked for PyTorch/XLA.

The rule (bridge/_jax_import.py): torch_xla's JAX guard runs at import only when
torch_xla is already imported, ``PJRT_DEVICE`` is set or a TPU is attached; the
XLA code paths run it themselves before JAX first touches XLA tensors.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from bridge import _jax_import

ROOT = pathlib.Path(__file__).resolve().parents[1]

# After the import: what the process looks like, then (with torch_xla) an XLA call.
QUIET_IMPORT = textwrap.dedent(
    """
    import sys, os
    sys.path.insert(0, os.getcwd())
    import torch_ops, bridge, jax_kernels
    from jax._src import xla_bridge
    from bridge import _jax_import
    state = {
        "torch_xla imported": "torch_xla" in sys.modules,
        "jax backends": sorted(xla_bridge._backends),
        "guarded": _jax_import._guarded,
        "PJRT_DEVICE": os.environ.get("PJRT_DEVICE"),
        "tpu": _jax_import.tpu_attached(),
    }
    sys.stdout.flush()
    sys.stderr.write("IMPORTED\\n")  # what came before this on stdout and stderr came from the import
    print("STATE", state)
    if _jax_import.torch_xla_installed():
        import torch, torch_xla
        dev = torch_xla.device()
        cache = torch.zeros(32, 2, 128, device=dev)                                   # f32[32, 2, 128]
        tokens = torch.ones(2, 2, 128, device=dev)                                    # f32[2, 2, 128]
        slices = torch.tensor([[3], [0], [2]], dtype=torch.int32, device=dev)         # i32[3, 1]
        total = torch.tensor([1], dtype=torch.int32, device=dev)                      # i32[1]
        torch.ops.paged_kv.kv_cache_update(tokens, slices, cache, total, page_size=16)
        print("xla rows", (cache.cpu() != 0).any(-1).any(-1).nonzero().flatten().tolist(), "guarded", _jax_import._guarded)
    """
)


def _run(code: str, env_changes: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PJRT_DEVICE"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_import_prints_and_initializes_nothing_without_pjrt_device():
    run = _run(QUIET_IMPORT, {})
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.stdout
    if "'tpu': True" in report:
        pytest.skip("a TPU is attached: there the guard runs at import by design")
    assert report.startswith("STATE ") and run.stderr.startswith("IMPORTED\n"), (report, run.stderr)
    assert "'torch_xla imported': False" in report and "'jax backends': []" in report, report
    assert "'guarded': False" in report and "'PJRT_DEVICE': None" in report, report
    if _jax_import.torch_xla_installed():
        # The user's own `import torch_xla` may announce the device; the op then works and has run the guard.
        assert "xla rows [3, 4] guarded True" in report, report


def test_torch_xla_imported_first_runs_the_guard_at_import():
    pytest.importorskip("torch_xla", reason="torch_xla is not installed in this environment")
    code = QUIET_IMPORT.replace("import torch_ops, bridge", "import torch_xla, torch_ops, bridge", 1)
    run = _run(code, {})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "'torch_xla imported': True" in run.stdout and "'guarded': True" in run.stdout, run.stdout
    assert "xla rows [3, 4] guarded True" in run.stdout, run.stdout


def test_guard_rule_at_import(monkeypatch):
    """guard_wanted_at_import: torch_xla installed and (imported, PJRT_DEVICE set, or a TPU)."""
    monkeypatch.setattr(_jax_import, "torch_xla_installed", lambda: True)
    monkeypatch.setattr(_jax_import, "tpu_attached", lambda: False)
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    monkeypatch.delitem(sys.modules, "torch_xla", raising=False)
    assert not _jax_import.guard_wanted_at_import()
    monkeypatch.setattr(_jax_import, "tpu_attached", lambda: True)
    assert _jax_import.guard_wanted_at_import()
    monkeypatch.setattr(_jax_import, "tpu_attached", lambda: False)
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert _jax_import.guard_wanted_at_import()
    monkeypatch.delenv("PJRT_DEVICE")
    monkeypatch.setitem(sys.modules, "torch_xla", sys.modules.get("torch_xla") or object())
    assert _jax_import.guard_wanted_at_import()
    monkeypatch.setattr(_jax_import, "torch_xla_installed", lambda: False)
    assert not _jax_import.guard_wanted_at_import()


def test_xla_paths_run_the_guard_themselves(xla_device, monkeypatch):
    """Each path that hands XLA tensors to JAX calls guard_xla (the one setter of ``_guarded``)."""
    import jax.numpy as jnp

    import bridge
    import torch_ops
    from bridge.xla_staging import StagedJaxFunction

    def run(path, fn):
        monkeypatch.setattr(_jax_import, "_guarded", False)
        fn()
        assert _jax_import._guarded, f"{path} did not run guard_xla"

    x = torch.arange(4.0, device=xla_device)  # f32[4]
    run("StagedJaxFunction", lambda: StagedJaxFunction(lambda a: (a + 1,), name="xla::guard_test"))
    run("call_jax", lambda: bridge.call_jax(lambda a: jnp.flip(a) * 5, x))  # a new function: a new staging
    run("to_jax", lambda: bridge.to_jax(x))
    cache = torch.zeros(32, 2, 128, device=xla_device)  # f32[32, 2, 128]
    slices = torch.tensor([[0], [0], [1]], dtype=torch.int32, device=xla_device)  # i32[3, 1]
    total = torch.tensor([1], dtype=torch.int32, device=xla_device)  # i32[1]
    tokens = torch.ones(1, 2, 128, device=xla_device)  # f32[1, 2, 128]
    run("op", lambda: torch_ops.kv_cache_update(tokens, slices, cache, total, page_size=16))
