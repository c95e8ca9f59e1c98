"""The torch ⇄ JAX dtype table, both ways, and DLPack carrier dtypes.

Supported: float32, float16, bfloat16, float8_e4m3fn, float8_e5m2, int8, int16,
int32, int64, uint8, bool. Anything else raises ``TypeError`` naming the dtype.

``int64`` exists in JAX only with ``jax_enable_x64=True``; without it JAX narrows
int64 to int32 (silently truncating values). :func:`check_jax_can_hold` turns
that into a ``TypeError`` instead.

Which of these dtypes DLPack itself carries depends on the jax version (float8
does not travel through DLPack in jax 0.7.1); :mod:`bridge.dlpack` measures that
and ships the others as a same-width integer view, :func:`dlpack_carrier_dtype`.
"""

from __future__ import annotations

import numpy as np
import torch

from bridge._jax_import import jax
import jax.numpy as jnp  # noqa: E402  (after the guarded import above)

TORCH_TO_JAX_DTYPE: dict[torch.dtype, np.dtype] = {
    torch.float32: np.dtype(jnp.float32),
    torch.float16: np.dtype(jnp.float16),
    torch.bfloat16: np.dtype(jnp.bfloat16),
    torch.float8_e4m3fn: np.dtype(jnp.float8_e4m3fn),
    torch.float8_e5m2: np.dtype(jnp.float8_e5m2),
    torch.int8: np.dtype(jnp.int8),
    torch.int16: np.dtype(jnp.int16),
    torch.int32: np.dtype(jnp.int32),
    torch.int64: np.dtype(jnp.int64),
    torch.uint8: np.dtype(jnp.uint8),
    torch.bool: np.dtype(jnp.bool_),
}

JAX_TO_TORCH_DTYPE: dict[np.dtype, torch.dtype] = {
    jax_dtype: torch_dtype for torch_dtype, jax_dtype in TORCH_TO_JAX_DTYPE.items()
}

# Same-width integer dtypes used to ship a dtype DLPack does not carry:
# torch's ``tensor.view(carrier)`` re-interprets the bytes without a copy.
_CARRIER_BY_ITEMSIZE: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int16,
    4: torch.int32,
    8: torch.int64,
}


def _supported_names() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in TORCH_TO_JAX_DTYPE)


def torch_to_jax_dtype(dtype: torch.dtype) -> np.dtype:
    """The JAX (numpy-style) dtype for a torch dtype; ``TypeError`` if unsupported."""
    try:
        return TORCH_TO_JAX_DTYPE[dtype]
    except (KeyError, TypeError):
        raise TypeError(
            f"torch dtype {dtype!r} is not supported by the bridge "
            f"(supported: {_supported_names()})"
        ) from None


def jax_to_torch_dtype(dtype) -> torch.dtype:
    """The torch dtype for a JAX/numpy dtype (or anything ``np.dtype`` accepts)."""
    try:
        key = np.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"JAX dtype {dtype!r} is not supported by the bridge (supported: {_supported_names()})"
        ) from None
    try:
        return JAX_TO_TORCH_DTYPE[key]
    except KeyError:
        raise TypeError(
            f"JAX dtype {key} is not supported by the bridge (supported: {_supported_names()})"
        ) from None


def check_jax_can_hold(dtype: torch.dtype) -> None:
    """Raise ``TypeError`` if JAX, as configured now, cannot hold torch ``dtype`` exactly.

    That is int64 while ``jax_enable_x64`` is off: JAX would narrow it to int32.
    """
    torch_to_jax_dtype(dtype)
    if dtype == torch.int64 and not jax.config.jax_enable_x64:
        raise TypeError(
            "torch.int64 needs jax_enable_x64=True; without it JAX narrows int64 to int32 "
            "and truncates values. Enable x64 (jax.config.update('jax_enable_x64', True)) "
            "or cast the tensor to torch.int32 first"
        )


def dlpack_carrier_dtype(dtype: torch.dtype) -> torch.dtype:
    """The same-width integer torch dtype that carries ``dtype`` through DLPack."""
    torch_to_jax_dtype(dtype)
    return _CARRIER_BY_ITEMSIZE[dtype.itemsize]
