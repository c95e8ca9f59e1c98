"""Small helpers shared by the kernels: integer math and host/trace checks."""

from __future__ import annotations

import jax
import numpy as np


def cdiv(a: int, v: int) -> int:
    """Ceiling division: the number of size-``v`` pieces that hold ``a`` items.

    Works on Python ints and on JAX/numpy integer arrays alike.

    >>> cdiv(10, 3)
    4
    """
    return (a + v - 1) // v


def is_traced(*values) -> bool:
    """True if any value is a JAX tracer (we are inside ``jit``/``vmap``/...)."""
    return any(isinstance(v, jax.core.Tracer) for v in values)


def is_on_host(value) -> bool:
    """True if ``value``'s data can be read without a device→host transfer.

    numpy arrays, Python scalars and JAX arrays placed on CPU devices are on
    the host; JAX arrays on TPU/GPU and tracers are not.
    """
    if isinstance(value, jax.core.Tracer):
        return False
    if isinstance(value, jax.Array):
        try:
            return all(d.platform == "cpu" for d in value.devices())
        except Exception:  # deleted or otherwise unreadable arrays
            return False
    return isinstance(value, (np.ndarray, np.generic, int, list, tuple))
