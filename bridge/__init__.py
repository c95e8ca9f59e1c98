"""Call JAX from PyTorch and PyTorch/XLA: array conversion, ``call_jax``, KV cache layouts.

Importing ``bridge`` imports JAX through :mod:`bridge._jax_import`, which runs
PyTorch/XLA's JAX import guard first where the process uses PyTorch/XLA or a
TPU is attached (see its docstring); the XLA paths run it before their first
JAX work either way.
"""

from bridge.call import call_jax, clear_cache
from bridge.dlpack import ZeroCopyError, to_jax, to_torch, zero_copy_dtypes
from bridge.dtypes import jax_to_torch_dtype, torch_to_jax_dtype
from bridge.layouts import dequantize_kv, kv_cache_shape, merge_kv, split_kv, to_flat, to_paged

__all__ = [
    "ZeroCopyError",
    "call_jax",
    "clear_cache",
    "dequantize_kv",
    "jax_to_torch_dtype",
    "kv_cache_shape",
    "merge_kv",
    "split_kv",
    "to_flat",
    "to_jax",
    "to_paged",
    "to_torch",
    "torch_to_jax_dtype",
    "zero_copy_dtypes",
]
