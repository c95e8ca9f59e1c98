"""bridge.layouts: combined K/V heads and flat ⇄ paged caches, torch views and JAX arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bridge
import jax.numpy as jnp

T, H, D = 5, 3, 4


def kv_pair(dtype=torch.float32):
    k = torch.arange(T * H * D, dtype=torch.float32).reshape(T, H, D).to(dtype)
    v = (-1 - torch.arange(T * H * D, dtype=torch.float32)).reshape(T, H, D).to(dtype)
    return k, v


def storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- combined heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_merge_matches_vllm_layout(dtype):
    k, v = kv_pair(dtype)
    kv = bridge.merge_kv(k, v)
    assert kv.shape == (T, 2 * H, D) and kv.dtype == dtype
    assert torch.equal(kv, torch.cat([k, v], dim=-1).reshape(-1, 2 * H, D))
    for h in range(H):
        assert torch.equal(kv[:, 2 * h], k[:, h]) and torch.equal(kv[:, 2 * h + 1], v[:, h])


def test_merge_is_a_copy():
    k, v = kv_pair()
    kv = bridge.merge_kv(k, v)
    assert storage_ptr(kv) not in (storage_ptr(k), storage_ptr(v))
    k.zero_()
    assert kv[:, 0].abs().sum() > 0


def test_split_returns_views_of_the_same_storage():
    k, v = kv_pair()
    kv = bridge.merge_kv(k, v)
    k2, v2 = bridge.split_kv(kv)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    assert storage_ptr(k2) == storage_ptr(v2) == storage_ptr(kv)
    assert k2.data_ptr() == kv.data_ptr()
    assert v2.data_ptr() == kv.data_ptr() + D * kv.element_size()  # head 1 of row 0
    assert k2.stride() == (2 * H * D, 2 * D, 1) and not k2.is_contiguous()
    v2[2, 1, 3] = 1000.0  # writes through the view land in kv
    assert kv[2, 3, 3].item() == 1000.0


def test_jax_merge_and_split_match_torch():
    k, v = kv_pair()
    kv = bridge.merge_kv(jnp.asarray(k.numpy()), jnp.asarray(v.numpy()))
    np.testing.assert_array_equal(np.asarray(kv), bridge.merge_kv(k, v).numpy())
    k2, v2 = bridge.split_kv(kv)
    np.testing.assert_array_equal(np.asarray(k2), k.numpy())
    np.testing.assert_array_equal(np.asarray(v2), v.numpy())


def test_split_views_convert_to_jax_with_right_values():
    kv = bridge.merge_kv(*kv_pair())
    k, v = bridge.split_kv(kv)
    np.testing.assert_array_equal(np.asarray(bridge.to_jax(v)), v.numpy())
    with pytest.raises(bridge.ZeroCopyError, match="not dense"):
        bridge.to_jax(v, copy=False)


def test_combined_heads_errors():
    k, v = kv_pair()
    with pytest.raises(ValueError, match=r"k.shape=\(5, 3, 4\) must equal v.shape=\(5, 2, 4\)"):
        bridge.merge_kv(k, v[:, :2])
    with pytest.raises(TypeError, match="k.dtype"):
        bridge.merge_kv(k, v.half())
    with pytest.raises(ValueError, match="num_kv_heads"):
        bridge.merge_kv(k[0], v[0])
    with pytest.raises(TypeError, match="both torch tensors or both JAX arrays"):
        bridge.merge_kv(k, jnp.asarray(v.numpy()))
    with pytest.raises(TypeError, match="kv must be"):
        bridge.split_kv(np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match=r"kv.shape\[1\]=3 must be even"):
        bridge.split_kv(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="got shape"):
        bridge.split_kv(torch.zeros(2, 4))


# --------------------------------------------------------------------------- paged caches


def test_to_paged_and_to_flat_are_views():
    flat = torch.arange(6 * 4 * 2 * 3, dtype=torch.float32).reshape(24, 2, 3)
    paged = bridge.to_paged(flat, 4)
    assert paged.shape == (6, 4, 2, 3)
    assert paged.data_ptr() == flat.data_ptr() and storage_ptr(paged) == storage_ptr(flat)
    assert torch.equal(paged[2, 1], flat[9])
    paged[5, 3, 1, 2] = -7.0
    assert flat[23, 1, 2].item() == -7.0
    back = bridge.to_flat(paged)
    assert back.shape == flat.shape and back.data_ptr() == flat.data_ptr()
    assert torch.equal(back, flat)


def test_paged_views_of_a_split_kv_cache():
    """A flat K cache that is itself a strided view (split_kv) still pages as a view."""
    cache = torch.arange(8 * 4 * 2, dtype=torch.float32).reshape(8, 4, 2)
    k_flat, _ = bridge.split_kv(cache)
    k_paged = bridge.to_paged(k_flat, 2)
    assert k_paged.shape == (4, 2, 2, 2) and storage_ptr(k_paged) == storage_ptr(cache)
    assert torch.equal(k_paged.reshape(8, 2, 2), k_flat)


def test_not_viewable_raises_clearly():
    paged = torch.zeros(4, 6, 2, 3).transpose(0, 1)  # [6, 4, 2, 3], pages and rows swapped
    with pytest.raises(ValueError, match=r"cannot be viewed .* without a copy.*contiguous"):
        bridge.to_flat(paged)


def test_paged_validation_names_argument_and_value():
    flat = torch.zeros(24, 2, 3)
    with pytest.raises(ValueError, match=r"page_size=5 must divide cache.shape\[0\]=24"):
        bridge.to_paged(flat, 5)
    with pytest.raises(ValueError, match="page_size=0 must be positive"):
        bridge.to_paged(flat, 0)
    with pytest.raises(TypeError, match="page_size=4.0 must be a Python int"):
        bridge.to_paged(flat, 4.0)
    with pytest.raises(TypeError, match="page_size=True"):
        bridge.to_paged(flat, True)
    with pytest.raises(ValueError, match="flat"):
        bridge.to_paged(torch.zeros(24, 2), 4)
    with pytest.raises(ValueError, match="paged"):
        bridge.to_flat(flat)


def test_jax_paged_round_trip():
    flat = jnp.arange(24 * 2 * 3, dtype=jnp.float32).reshape(24, 2, 3)
    paged = bridge.to_paged(flat, 8)
    assert paged.shape == (3, 8, 2, 3)
    np.testing.assert_array_equal(np.asarray(paged[1, 2]), np.asarray(flat[10]))
    np.testing.assert_array_equal(np.asarray(bridge.to_flat(paged)), np.asarray(flat))
    with pytest.raises(ValueError, match="page_size=7"):
        bridge.to_paged(flat, 7)


def test_xla_tensors(xla_device):
    k, v = kv_pair()
    kv = bridge.merge_kv(k.to(xla_device), v.to(xla_device))
    k2, v2 = bridge.split_kv(kv)
    paged = bridge.to_paged(kv, 5)
    assert paged.device.type == "xla" and paged.shape == (1, 5, 2 * H, D)
    assert torch.equal(kv.cpu(), bridge.merge_kv(k, v))
    assert torch.equal(v2.cpu(), v) and torch.equal(bridge.to_flat(paged).cpu(), kv.cpu())
