"""The paged KV cache update: Pallas TPU kernel, JAX fallbacks, validation."""

from .api import kv_cache_update, kv_cache_update_kv
from .compiler_options import update_compiler_options
from .fallbacks import kv_cache_update_jax, kv_cache_update_scatter
from .kernel import kv_cache_update_pallas
from .prepare import localize_slices
from .quantize import QUANTIZED_DTYPES, dequantize_kv
from .sharding import kv_cache_update_sharded
from .tpu_config import KernelConfig, tpu_kernel_config
from .validation import dynamic_validate_inputs, static_validate_inputs, tpu_kernel_problem

__all__ = [
    "kv_cache_update",
    "kv_cache_update_kv",
    "localize_slices",
    "dequantize_kv",
    "QUANTIZED_DTYPES",
    "kv_cache_update_jax",
    "kv_cache_update_scatter",
    "kv_cache_update_pallas",
    "kv_cache_update_sharded",
    "static_validate_inputs",
    "dynamic_validate_inputs",
    "tpu_kernel_problem",
    "tpu_kernel_config",
    "KernelConfig",
    "update_compiler_options",
]
