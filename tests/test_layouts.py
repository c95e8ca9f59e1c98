"""Layout helpers: kv_cache_shape, merge_kv, split_kv in JAX and torch, bit for bit."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
import jax_kernels as jk
from jax_kernels.testing import TEST_DTYPES, bits, np_dtype

KV_HEADS = (1, 2, 3, 8)
HEAD_DIMS = (64, 80, 128, 256)
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8,
         "float8_e4m3fn": torch.float8_e4m3fn}
PACK = {"float32": 1, "bfloat16": 2, "float16": 2, "int8": 4, "float8_e4m3fn": 4}


def kv(rng, num_tokens, kv_heads, head_dim, dtype):
    d = np_dtype(dtype)
    if np.issubdtype(d, np.integer):
        return [rng.integers(-100, 100, (num_tokens, kv_heads, head_dim)).astype(d) for _ in "kv"]
    return [rng.uniform(1, 4, (num_tokens, kv_heads, head_dim)).astype(d) for _ in "kv"]  # no zeros: padding shows


def to_torch(a: np.ndarray, dtype_name: str) -> torch.Tensor:
    return torch.from_numpy(bits(a).copy()).view(TORCH[dtype_name])


def torch_bits(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().view(f"u{t.element_size()}")


@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_kv_cache_shape_of_each_layout(dtype):
    d, pack = np_dtype(dtype), PACK[dtype]
    # packed: heads 2*kvH rounded up to the packing, then split; head_dim rounded up to 128.
    assert jk.kv_cache_shape(10, 16, 3, 80, d, layout="packed") == (10, 16, -(-6 // pack), pack, 128)
    assert jk.kv_cache_shape(10, 16, 8, 256, d, layout="packed") == (10, 16, 16 // pack, pack, 256)
    assert jk.kv_cache_shape(10, 16, 1, 128, d, layout="packed") == (10, 16, -(-2 // pack), pack, 128)
    assert jk.kv_cache_shape(10, 16, 3, 64, d, layout="packed_hd64") == (10, 16, -(-3 // pack), pack, 128)
    assert jk.kv_cache_shape(10, 16, 3, 80, d) == (10, 16, 6, 80)  # combined is the default
    assert bridge.kv_cache_shape(10, 16, 3, 80, TORCH[dtype], layout="packed") == jk.kv_cache_shape(
        10, 16, 3, 80, d, layout="packed"
    )


def test_kv_cache_shape_rejects_bad_arguments():
    with pytest.raises(ValueError, match="layout='paged' is not one of"):
        jk.kv_cache_shape(4, 16, 2, 128, np.float32, layout="paged")
    with pytest.raises(ValueError, match="packed_hd64.*head_dim=64 only, got head_dim=128"):
        jk.kv_cache_shape(4, 16, 2, 128, np.float32, layout="packed_hd64")
    with pytest.raises(ValueError, match="num_kv_heads=0 must be positive"):
        jk.kv_cache_shape(4, 16, 0, 128, np.float32)
    with pytest.raises(TypeError, match="page_size=16.0 must be a Python int"):
        jk.kv_cache_shape(4, 16.0, 2, 128, np.float32)
    with pytest.raises(TypeError, match="wider than 32 bits"):
        jk.kv_cache_shape(4, 16, 2, 128, np.float64, layout="packed")


def _expected_rows(k, v, layout):
    """The rows, element by element (loops, not reshapes): where each K and V value goes."""
    num_tokens, kv_heads, head_dim = k.shape
    row = jk.layouts.row_shape(kv_heads, head_dim, k.dtype, layout=layout)
    out = np.zeros((num_tokens, *row), k.dtype)
    flat = out.reshape(num_tokens, -1, row[-1])  # [T, padded heads, lanes]: packed heads run h' * pack + p
    for h in range(kv_heads):
        if layout == "packed_hd64":
            flat[:, h, :head_dim], flat[:, h, head_dim:] = k[:, h], v[:, h]
        else:
            flat[:, 2 * h, :head_dim], flat[:, 2 * h + 1, :head_dim] = k[:, h], v[:, h]
    return out


@pytest.mark.parametrize("layout", jk.LAYOUTS)
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_merge_and_split_in_jax_and_torch(layout, dtype):
    rng = np.random.default_rng(0)
    # Every head count and head_dim, paired (padded heads: kvH 1 and 3 at pack 4; padded lanes: 64, 80).
    pairs = [*zip(KV_HEADS, HEAD_DIMS), (3, 64)] if layout != "packed_hd64" else [(h, 64) for h in KV_HEADS]
    for kv_heads, head_dim in pairs:
        k, v = kv(rng, 5, kv_heads, head_dim, dtype)
        want = _expected_rows(k, v, layout)  # padding heads and lanes are zero
        rows_jax = np.asarray(jk.merge_kv(jnp.asarray(k), jnp.asarray(v), layout=layout))
        rows_torch = bridge.merge_kv(to_torch(k, dtype), to_torch(v, dtype), layout=layout)
        assert rows_jax.shape == want.shape == tuple(rows_torch.shape), (kv_heads, head_dim)
        np.testing.assert_array_equal(bits(rows_jax), bits(want))
        np.testing.assert_array_equal(torch_bits(rows_torch), bits(want))
        # back again, padding dropped; torch gives views of the rows
        k_j, v_j = jk.split_kv(jnp.asarray(rows_jax), kv_heads, head_dim, layout=layout)
        k_t, v_t = bridge.split_kv(rows_torch, kv_heads, head_dim, layout=layout)
        for got in (np.asarray(k_j), torch_bits(k_t)):
            np.testing.assert_array_equal(bits(got), bits(k))
        for got in (np.asarray(v_j), torch_bits(v_t)):
            np.testing.assert_array_equal(bits(got), bits(v))
        assert k_t.untyped_storage().data_ptr() == v_t.untyped_storage().data_ptr() == rows_torch.untyped_storage().data_ptr()


def test_combined_helpers_keep_their_old_calls():
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    kv_rows = bridge.merge_kv(k, v)
    assert torch.equal(kv_rows, torch.stack([k, v], dim=2).reshape(4, 4, 8))
    k2, v2 = bridge.split_kv(kv_rows)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    assert k2.data_ptr() == kv_rows.data_ptr()  # a view


def test_split_rejects_rows_of_another_layout():
    rows = jk.merge_kv(jnp.ones((2, 3, 80), jnp.bfloat16), jnp.ones((2, 3, 80), jnp.bfloat16), layout="packed")
    with pytest.raises(ValueError, match="needs num_kv_heads and head_dim"):
        jk.split_kv(rows, layout="packed")
    with pytest.raises(ValueError, match=r"kv_rows.shape=\(2, 3, 2, 128\) is not \[num_tokens, \*\(2, 2, 128\)\]"):
        jk.split_kv(rows, 2, 80, layout="packed")
    with pytest.raises(ValueError, match=r"is not \[num_tokens, \*\(2, 4, 128\)\]"):
        jk.split_kv(rows.astype(jnp.int8), 3, 80, layout="packed")  # int8 packs 4
    with pytest.raises(TypeError, match="k.dtype=float32 must equal v.dtype=bfloat16"):
        jk.merge_kv(jnp.ones((2, 3, 80)), jnp.ones((2, 3, 80), jnp.bfloat16), layout="packed")
