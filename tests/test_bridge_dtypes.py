"""bridge.dtypes: the torch ⇄ JAX dtype table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bridge
from bridge import dtypes
import jax
import jax.numpy as jnp

TABLE = [
    (torch.float32, jnp.float32),
    (torch.float16, jnp.float16),
    (torch.bfloat16, jnp.bfloat16),
    (torch.float8_e4m3fn, jnp.float8_e4m3fn),
    (torch.float8_e5m2, jnp.float8_e5m2),
    (torch.int8, jnp.int8),
    (torch.int16, jnp.int16),
    (torch.int32, jnp.int32),
    (torch.int64, jnp.int64),
    (torch.uint8, jnp.uint8),
    (torch.bool, jnp.bool_),
]


@pytest.mark.parametrize("torch_dtype, jax_dtype", TABLE, ids=[str(t) for t, _ in TABLE])
def test_table_both_ways(torch_dtype, jax_dtype):
    assert bridge.torch_to_jax_dtype(torch_dtype) == np.dtype(jax_dtype)
    assert bridge.jax_to_torch_dtype(jax_dtype) == torch_dtype
    assert bridge.jax_to_torch_dtype(np.dtype(jax_dtype)) == torch_dtype
    assert np.dtype(jax_dtype).itemsize == torch_dtype.itemsize


def test_table_is_exactly_the_promised_set():
    assert set(dtypes.TORCH_TO_JAX_DTYPE) == {t for t, _ in TABLE}
    assert len(dtypes.JAX_TO_TORCH_DTYPE) == len(TABLE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.uint16, torch.float8_e4m3fnuz])
def test_unsupported_torch_dtype_raises_naming_it(dtype):
    with pytest.raises(TypeError, match=str(dtype).removeprefix("torch.")):
        bridge.torch_to_jax_dtype(dtype)
    with pytest.raises(TypeError, match=str(dtype).removeprefix("torch.")):
        bridge.to_jax(torch.zeros(4, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.complex64, np.uint32, "int4"])
def test_unsupported_jax_dtype_raises_naming_it(dtype):
    with pytest.raises(TypeError, match=str(np.dtype(dtype) if dtype != "int4" else "int4")):
        bridge.jax_to_torch_dtype(dtype)


def test_unsupported_jax_array_dtype_raises_in_to_torch():
    with pytest.raises(TypeError, match="uint32"):
        bridge.to_torch(jnp.zeros(3, jnp.uint32))


def test_int64_needs_x64():
    if jax.config.jax_enable_x64:
        pytest.skip("jax_enable_x64 is on in this process")
    with pytest.raises(TypeError, match="jax_enable_x64"):
        dtypes.check_jax_can_hold(torch.int64)
    with pytest.raises(TypeError, match="int64"):
        bridge.to_jax(torch.arange(4))
    dtypes.check_jax_can_hold(torch.int32)


def test_int64_allowed_with_x64(jax_x64):
    dtypes.check_jax_can_hold(torch.int64)


@pytest.mark.parametrize("torch_dtype, jax_dtype", TABLE, ids=[str(t) for t, _ in TABLE])
def test_carrier_is_same_width_integer(torch_dtype, jax_dtype):
    carrier = dtypes.dlpack_carrier_dtype(torch_dtype)
    assert carrier.itemsize == torch_dtype.itemsize
    assert not carrier.is_floating_point and carrier != torch.bool
    # torch re-interprets without a copy.
    t = torch.zeros(8, dtype=torch_dtype)
    assert t.view(carrier).data_ptr() == t.data_ptr()
