"""XLA compiler options that keep a donated cache update O(update) on XLA:CPU.

Under ``jax.jit(..., donate_argnums=...)`` the fallbacks update the cache in
place, but XLA:CPU adds work proportional to the whole cache in two cases
(measured with jax 0.7.1 and 0.10.2 on a 2-core x86 machine; see the README):

* **Float normalization.** XLA:CPU computes in a wider type any float type
  it has no native kernels for: bfloat16 (in float32) and the 8- and 4-bit
  floats (float16 and float32 are native). A scatter or dynamic-update-slice
  into such a cache becomes "convert the whole cache, update, convert it
  back" — 0.8 s per bfloat16 decode step at 1 GiB. The update only moves
  bits, so the conversion pass can be switched off for it:
  ``xla_disable_hlo_passes``. It must stay on for real arithmetic: a bfloat16
  ``dot`` then fails to compile on XLA:CPU.
* **jaxlib < 0.8: dynamic-update-slice in a loop.** The MLIR fusion emitters
  that jaxlib 0.7 uses on CPU make each in-place dynamic-update-slice inside a
  ``while`` loop cost time that grows with the whole operand (not the window):
  the ``lax.scan`` fallback takes 11 ms instead of 1 ms for a 64-slice decode
  step into a 1 GiB float32 cache. ``xla_cpu_use_fusion_emitters=False`` (the
  older emitters) fixes it; it costs the scatter ~20%, so only the scan gets
  it. jaxlib 0.8 and later do not need it (0.8.0, 0.9.0 and 0.10.2 measured).

``compiler_options`` apply to a top-level ``jax.jit`` only, so pass these to
the jit whose only work is the update (JAX refuses them on a nested jit)::

    opts = update_compiler_options(cache.dtype)
    step = jax.jit(kv_cache_update, donate_argnums=2,
                   static_argnames=("page_size",), compiler_options=opts)

Off CPU the result is ``{}``: TPU computes these types natively (GPU was
not measured here).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

#: ``impl`` names: ``kv_cache_update`` ("auto"), ``kv_cache_update_scatter``,
#: ``kv_cache_update_jax`` (the ``lax.scan`` fallback).
UPDATE_IMPLS = ("auto", "scatter", "scan")

# The float types XLA:CPU computes natively; every other float is normalized.
_CPU_NATIVE_FLOATS = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))


def _xla_type_name(dtype: np.dtype) -> str:
    """XLA's lowercase name of a float type: bfloat16 → ``bf16``,
    float8_e4m3fn → ``f8e4m3fn``, float4_e2m1fn → ``f4e2m1fn``."""
    if dtype == np.dtype(jnp.bfloat16):
        return "bf16"
    if not dtype.name.startswith("float"):
        raise ValueError(f"dtype={dtype.name} has no XLA float type name")
    return "f" + dtype.name[len("float") :].replace("_", "")


def _jaxlib_version() -> tuple[int, int]:
    """(major, minor) of the installed jaxlib, which holds XLA:CPU."""
    import jaxlib

    major, minor = re.match(r"(\d+)\.(\d+)", jaxlib.__version__).groups()
    return int(major), int(minor)


def update_compiler_options(dtype, *, impl: str = "auto", platform: str | None = None) -> dict[str, str | bool]:
    """Options for ``jax.jit(..., compiler_options=...)`` around a cache update.

    Args:
      dtype: the cache's dtype.
      impl: which function the jit runs: ``"auto"`` (``kv_cache_update``),
        ``"scatter"`` (``kv_cache_update_scatter``) or ``"scan"``
        (``kv_cache_update_jax``).
      platform: the backend the jit compiles for; default
        ``jax.default_backend()``. Anything but ``"cpu"`` gets ``{}``.

    Returns:
      A new dict (possibly empty). Only for a jit that does no float
      arithmetic on ``dtype`` besides the update (see the module docstring).
    """
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype={dtype!r} is not a dtype") from None
    if impl not in UPDATE_IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(map(repr, UPDATE_IMPLS))}")
    if platform is None:
        platform = jax.default_backend()
    if platform.lower() != "cpu":
        return {}
    options: dict[str, str | bool] = {}
    if jnp.issubdtype(dtype, jnp.floating) and dtype not in _CPU_NATIVE_FLOATS:
        options["xla_disable_hlo_passes"] = f"float-normalization-{_xla_type_name(dtype)}"
    if impl == "scan" and _jaxlib_version() < (0, 8):
        options["xla_cpu_use_fusion_emitters"] = False
    return options
