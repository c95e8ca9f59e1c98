"""The eager quantize (torch_ops._quantize): both of its implementations, and
the runs it splits rows into, bitwise equal to the numpy reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import jax_kernels as jk
import torch_ops
from jax_kernels.testing import bits
from torch_ops import _quantize
from test_quantize import (
    CACHE_DTYPES, K_SCALE, PAGE_SIZE, TOKEN_DTYPES, TORCH, V_SCALE, case, expected, to_torch, torch_bits,
)

SCALES = (torch.tensor(K_SCALE), torch.tensor(V_SCALE))


def every_pattern(token_dtype: str) -> torch.Tensor:  # [65536, 2, 1] (float32: 65536 spread patterns)
    """Every 16-bit pattern of a 16-bit token dtype (NaNs, infinities, subnormals,
    ±0 included), each under both scales (head 0: K, head 1: V); for float32
    the same count of patterns spread over all exponents."""
    if token_dtype == "float32":
        pattern = np.arange(65536, dtype=np.uint32) * 65537  # every top half once, varied low bits
        x = torch.from_numpy(pattern.view(np.int32)).view(torch.float32)
    else:
        x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(TORCH[token_dtype])
    return x.view(-1, 1, 1).expand(-1, 2, 1).contiguous()


def reference_bits(x: torch.Tensor, cache_dtype: str) -> np.ndarray:
    tokens = x.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if x.dtype == torch.bfloat16 else x.numpy()
    dtype = np.dtype(getattr(ml_dtypes, cache_dtype, cache_dtype))
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN tokens, divided
        return bits(jk.quantize_reference(tokens, K_SCALE, V_SCALE, dtype))


@pytest.mark.parametrize("route", ["jax", "torch"])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("token_dtype", TOKEN_DTYPES)
def test_both_implementations_give_the_reference_bits_for_every_pattern(route, token_dtype, cache_dtype, monkeypatch):
    monkeypatch.setattr(_quantize, "HOST_PIECE_MIN_ELEMENTS", 1 if route == "jax" else 1 << 40)
    x = every_pattern(token_dtype)
    runs = list(_quantize.quantized_pieces(x, *SCALES, TORCH[cache_dtype]))
    assert len(runs) == 1  # one run of 65,536 rows by the route chosen
    got = _quantize.quantize_rows(x, *SCALES, TORCH[cache_dtype])
    assert got.dtype == TORCH[cache_dtype] and got.shape == x.shape
    np.testing.assert_array_equal(got.view(torch.uint8).numpy(), reference_bits(x, cache_dtype).view(np.uint8))


def test_runs_are_powers_of_two_rows_between_the_bounds_then_a_torch_tail(monkeypatch):
    monkeypatch.setattr(_quantize, "HOST_PIECE_MIN_ELEMENTS", 4 * 256)  # 4 rows of 2 x 128
    monkeypatch.setattr(_quantize, "HOST_PIECE_MAX_ELEMENTS", 64 * 256)  # 64 rows
    calls = []
    real = _quantize._quantize_jax
    monkeypatch.setattr(_quantize, "_quantize_jax", lambda rows, *a: calls.append(rows.shape[0]) or real(rows, *a))
    x = torch.randn(203, 2, 128).to(torch.bfloat16)
    runs = list(_quantize.quantized_pieces(x, *SCALES, torch.float8_e4m3fn))
    starts = [s for s, _ in runs]
    sizes = [r.shape[0] for _, r in runs]
    assert calls == [64, 64, 64, 8] and sizes == [64, 64, 64, 8, 3]  # 203 = 3 * 64 + 8 + 3 (the tail: < 4 rows)
    assert starts == [0, 64, 128, 192, 200]
    np.testing.assert_array_equal(
        torch.cat([r for _, r in runs]).view(torch.uint8).numpy(), reference_bits(x, "float8_e4m3fn")
    )
    # Below the threshold everything is torch's; other devices never reach JAX (CPU here: the dtype check).
    calls.clear()
    assert [r.shape[0] for _, r in _quantize.quantized_pieces(x[:3], *SCALES, torch.int8)] == [3] and calls == []


def test_token_counts_compile_a_bounded_set_of_shapes(monkeypatch):
    monkeypatch.setattr(_quantize, "HOST_PIECE_MIN_ELEMENTS", 2 * 128)  # 1 row of 2 x 128
    monkeypatch.setattr(_quantize, "HOST_PIECE_MAX_ELEMENTS", 16 * 256)  # 16 rows
    _quantize._jitted_quantize.cache_clear()
    for n in range(1, 70):
        _quantize.quantize_rows(torch.randn(n, 2, 128).to(torch.float16), *SCALES, torch.float8_e5m2)
    jitted = _quantize._jitted_quantize(np.dtype(ml_dtypes.float8_e5m2))
    assert jitted._cache_size() == 5  # 1, 2, 4, 8 and 16 rows, for 69 token counts


@pytest.mark.parametrize("layout", ["combined", "packed"])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("token_dtype", TOKEN_DTYPES)
def test_op_writes_runs_of_both_implementations_bitwise(token_dtype, cache_dtype, layout, monkeypatch):
    """The op's quantized write in runs: JAX for runs of >= 4 rows, torch for the
    rest (the test's 24 tokens: 16 + 8 by JAX, or with a bound of 16 rows, 16
    by JAX and the 8 left by torch), the same bits as the reference."""
    for min_rows in (4, 16):
        new, idx, cache_np, total = case(11, token_dtype, cache_dtype, layout)
        monkeypatch.setattr(_quantize, "HOST_PIECE_MIN_ELEMENTS", min_rows * new[0].size)
        cache = to_torch(cache_np, cache_dtype)
        torch_ops.kv_cache_update(
            to_torch(new, token_dtype), torch.from_numpy(idx), cache, torch.from_numpy(total), page_size=PAGE_SIZE,
            k_scale=K_SCALE, v_scale=V_SCALE,
        )
        np.testing.assert_array_equal(torch_bits(cache), bits(expected(new, idx, cache_np, total)).view(np.uint8))


def test_a_failing_quantize_leaves_the_cache_unchanged(monkeypatch):
    """Every run is quantized before the first is copied: a failure in a later
    run (here the torch tail) writes nothing."""
    new, idx, cache_np, total = case(12, "bfloat16", "float8_e4m3fn", "combined")
    monkeypatch.setattr(_quantize, "HOST_PIECE_MIN_ELEMENTS", 16 * new[0].size)

    def fail(*args):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(_quantize, "_quantize_torch", fail)
    cache = to_torch(cache_np, "float8_e4m3fn")
    before = torch_bits(cache).copy()
    with pytest.raises(RuntimeError, match="simulated"):
        torch_ops.kv_cache_update(
            to_torch(new, "bfloat16"), torch.from_numpy(idx), cache, torch.from_numpy(total), page_size=PAGE_SIZE,
            k_scale=K_SCALE, v_scale=V_SCALE,
        )
    np.testing.assert_array_equal(torch_bits(cache), before)


_HOST_DEVICE_CHILD = """
import jax, torch
jax.config.update("jax_default_device", jax.devices()[1])  # not the device the quantize should pick
import torch_ops
from torch_ops import _quantize
seen = []
real = torch.from_dlpack
torch.from_dlpack = lambda a: seen.append(a.devices()) or real(a)
_quantize.HOST_PIECE_MIN_ELEMENTS = 1
q = _quantize.quantize_rows(torch.randn(4, 2, 128), torch.tensor(2.0), torch.tensor(0.5), torch.int8)
assert seen == [{jax.devices("cpu")[0]}], seen
print("on", seen[0])
"""


def test_the_jax_runs_stay_on_the_host_whatever_jax_s_default_device():
    """CPU rows are quantized on JAX's first CPU device even when JAX's default
    device is another one (on a TPU VM it is a TPU, whose arrays torch cannot
    import): here, in a child with two CPU devices, the default is the second."""
    import os
    import pathlib
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _HOST_DEVICE_CHILD], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on {CpuDevice(id=0)}" in out.stdout
