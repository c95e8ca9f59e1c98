"""Which integer dtypes the slice metadata may have, and what values beyond int32 do.

The kernels compute in int32. Every integer dtype that can hold the values is
accepted and gives the same result; values are checked on the host as int64, so
an int64 index of 2**31 or more is refused (it names no row of a cache) instead
of wrapping onto a row that exists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax_kernels as jk
import torch_ops
from jax_kernels.testing import bits, random_slices, random_tokens, sentinel_cache

HEADS, HEAD_DIM, PAGE_SIZE = 2, 128, 16
NUM_ROWS, NUM_TOKENS, NUM_SLICES = 8 * PAGE_SIZE, 40, 8  # every value fits int8: rows < 128
NUMPY_INTS = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
TORCH_INTS = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
TORCH_REFUSED = [torch.uint16, torch.uint32, torch.uint64]  # the bridge maps no JAX dtype to them
EAGER_IMPLS = [i for i in torch_ops.IMPLS if i != "pallas"]
BEYOND_INT32 = 2**32 + 5  # wraps to row 5 in int32


def _case(seed=0):
    rng = np.random.default_rng(seed)
    cache = sentinel_cache(NUM_ROWS, HEADS, HEAD_DIM, "float32")  # f32[128, 2, 128]
    new = random_tokens(rng, NUM_TOKENS, HEADS, HEAD_DIM, "float32")  # f32[40, 2, 128]
    idx, total = random_slices(rng, num_rows=NUM_ROWS, num_tokens=NUM_TOKENS, page_size=PAGE_SIZE, num_slices=NUM_SLICES)
    return new, idx, cache, total, jk.kv_cache_update_reference(new, idx, cache, total)  # idx i32[3, 8], total i32[1]


@pytest.mark.parametrize("dtype", NUMPY_INTS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fn", [jk.kv_cache_update, jk.kv_cache_update_jax], ids=lambda f: f.__name__)
def test_jax_api_takes_every_integer_dtype(fn, dtype):
    new, idx, cache, total, expected = _case()
    out = fn(new, idx.astype(dtype), cache, total.astype(dtype), page_size=PAGE_SIZE)
    np.testing.assert_array_equal(bits(np.asarray(out)), bits(expected))


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.uint32], ids=lambda d: np.dtype(d).name)
def test_jax_api_refuses_values_beyond_int32(dtype):
    new, idx, cache, total, _ = _case()
    idx = idx.astype(dtype)
    idx[0, 0] = BEYOND_INT32 if np.dtype(dtype).itemsize == 8 else 2**31 + 5
    with pytest.raises(ValueError, match=r"slice_indices\[:, 0\] = \(dst=(4294967301|2147483653),"):
        jk.kv_cache_update(new, idx, cache, total.astype(dtype), page_size=PAGE_SIZE)


def _run_op(idx_dtype, total_dtype, impl, device="cpu"):
    new, idx, cache_np, total, expected = _case()
    cache = torch.from_numpy(cache_np.copy()).to(device)
    torch_ops.kv_cache_update(
        torch.from_numpy(new).to(device), torch.from_numpy(idx.astype(np.int64)).to(idx_dtype).to(device), cache,
        torch.from_numpy(total.astype(np.int64)).to(total_dtype).to(device), page_size=PAGE_SIZE, impl=impl,
    )
    np.testing.assert_array_equal(bits(cache.cpu().numpy()), bits(expected))


@pytest.mark.parametrize("dtype", TORCH_INTS, ids=str)
@pytest.mark.parametrize("impl", EAGER_IMPLS)
def test_torch_op_takes_the_torch_integer_dtypes(impl, dtype):
    _run_op(dtype, dtype, impl)


@pytest.mark.parametrize("dtype", TORCH_INTS, ids=str)
def test_torch_op_on_xla_takes_the_torch_integer_dtypes(dtype, xla_device):
    _run_op(dtype, dtype, "auto", xla_device)


@pytest.mark.parametrize("dtype", TORCH_REFUSED, ids=str)
@pytest.mark.parametrize("name", ["slice_indices", "total_update_slices"])
def test_torch_op_refuses_unsigned_dtypes_without_a_jax_twin(name, dtype):
    idx_dtype, total_dtype = (dtype, torch.int32) if name == "slice_indices" else (torch.int32, dtype)
    with pytest.raises(TypeError, match=rf"^{name}: torch dtype {dtype} is not supported"):
        _run_op(idx_dtype, total_dtype, "auto")


def _beyond_int32_args(device):
    new, idx, cache_np, total, _ = _case()
    idx = torch.from_numpy(idx.astype(np.int64))  # i64[3, 8]
    idx[0, 0] = BEYOND_INT32
    cache = torch.from_numpy(cache_np.copy()).to(device)
    args = (torch.from_numpy(new).to(device), idx.to(device), cache, torch.from_numpy(total.astype(np.int64)).to(device))
    return args, cache_np


@pytest.mark.parametrize("impl", EAGER_IMPLS)
def test_torch_op_refuses_int64_values_beyond_int32(impl):
    args, cache_np = _beyond_int32_args("cpu")
    with pytest.raises(ValueError, match=r"slice_indices\[:, 0\] = \(dst=4294967301,"):
        torch_ops.kv_cache_update(*args, page_size=PAGE_SIZE, impl=impl)
    np.testing.assert_array_equal(bits(args[2].numpy()), bits(cache_np))


def test_torch_op_on_xla_refuses_int64_values_beyond_int32_when_validating(xla_device):
    args, cache_np = _beyond_int32_args(xla_device)
    with torch_ops.validation("always"), pytest.raises(ValueError, match=r"slice_indices\[:, 0\] = \(dst=4294967301,"):
        torch_ops.kv_cache_update(*args, page_size=PAGE_SIZE)
    np.testing.assert_array_equal(bits(args[2].cpu().numpy()), bits(cache_np))
