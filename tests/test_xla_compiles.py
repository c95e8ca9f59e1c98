"""PyTorch/XLA: same shapes compile one graph, on the first call, and never again.

torch_xla counts every graph it compiles in the ``UncachedCompile`` counter.
Here the inputs are synced first, so each counted compile is the update's own.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _uncached_compiles() -> int:
    import torch_xla.debug.metrics as met

    return met.counter_value("UncachedCompile") or 0


# A fresh process: the first call of a signature is where a second compile used to hide
# (torch_xla's JAX setup changed JAX's config after the first cache key was computed).
FRESH_PROCESS = textwrap.dedent(
    """
    import sys, os
    sys.path.insert(0, os.getcwd())
    import torch, torch_xla, bridge, torch_ops
    import jax.numpy as jnp
    import torch_xla.debug.metrics as met

    def compiles():
        return met.counter_value("UncachedCompile") or 0

    dev = torch_xla.device()
    cache = torch.zeros(64 * 16, 2, 128, device=dev)                            # f32[1024, 2, 128]
    tokens = torch.ones(8, 2, 128, device=dev)                                  # f32[8, 2, 128]
    slices = torch.tensor([[0, 40], [0, 4], [4, 4]], dtype=torch.int32, device=dev)  # i32[3, 2]
    total = torch.tensor([2], dtype=torch.int32, device=dev)                    # i32[1]
    torch_xla.sync()
    per_call = []
    for _ in range(4):
        before = compiles()
        torch.ops.paged_kv.kv_cache_update(tokens, slices, cache, total, page_size=16)
        torch_xla.sync()
        per_call.append(compiles() - before)
    print("op", per_call)
    print("rows written", int((cache.cpu() != 0).any(-1).any(-1).sum()))

    x = torch.arange(6.0, device=dev)                                           # f32[6]
    torch_xla.sync()
    per_call = []
    for _ in range(4):
        before = compiles()
        y = bridge.call_jax(jnp.cumsum, x)
        torch_xla.sync()
        per_call.append(compiles() - before)
    print("call_jax", per_call)
    """
)


def test_fresh_process_compiles_once_per_signature(xla_device):
    env = dict(os.environ, PJRT_DEVICE=os.environ.get("PJRT_DEVICE", "CPU"))
    run = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "op [1, 0, 0, 0]" in run.stdout, run.stdout
    assert "rows written 8" in run.stdout, run.stdout  # 4 rows at 0..3, 4 at 40..43
    assert "call_jax [1, 0, 0, 0]" in run.stdout, run.stdout


@pytest.fixture
def shardy_as_in_a_fresh_process():
    """JAX's default ``jax_use_shardy_partitioner`` (torch_xla's setup turns it off), restored after."""
    import jax

    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", True)
    try:
        yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


def test_staged_function_compiles_once_and_survives_the_config_flipping_back(
    xla_device, shardy_as_in_a_fresh_process
):
    import jax
    import torch_xla
    from bridge.xla_staging import StagedJaxFunction

    staged = StagedJaxFunction(lambda x, y: (x * 3 - y,), name="xla::test_compiles")
    x = torch.arange(21, dtype=torch.float32).reshape(3, 7).to(xla_device)  # f32[3, 7]: no other test's shape
    y = torch.ones(3, 7, device=xla_device)  # f32[3, 7]
    torch_xla.sync()
    per_call = []
    for step in range(5):
        if step == 3:
            jax.config.update("jax_use_shardy_partitioner", True)  # a user sets it back between calls
        before = _uncached_compiles()
        (out,) = staged(x, y)
        torch_xla.sync()
        per_call.append(_uncached_compiles() - before)
    assert per_call == [1, 0, 0, 0, 0], per_call
    assert staged.num_lowered == 1
    torch.testing.assert_close(out.cpu(), x.cpu() * 3 - 1)
