"""JAX kernels for paged KV caches. Imports jax only — never torch.

    from jax_kernels import kv_cache_update
"""

from ._utils import cdiv
from .block_table import max_num_slices_bound, slice_indices_from_block_table
from .ragged_metadata import slice_indices_from_ragged_metadata
from .slot_mapping import slice_indices_from_slot_mapping
from .kv_cache_update import (
    dynamic_validate_inputs,
    kv_cache_update,
    kv_cache_update_kv,
    localize_slices,
    dequantize_kv,
    QUANTIZED_DTYPES,
    kv_cache_update_jax,
    kv_cache_update_pallas,
    kv_cache_update_scatter,
    kv_cache_update_sharded,
    static_validate_inputs,
    tpu_kernel_problem,
    tpu_kernel_config,
    KernelConfig,
    update_compiler_options,
)
from .layouts import LAYOUTS, dtype_packing, kv_cache_shape, merge_kv, split_kv
from .reference import (
    kv_cache_update_reference,
    quantize_reference,
    slice_indices_from_block_table_reference,
    slice_indices_from_ragged_metadata_reference,
    slice_indices_from_slot_mapping_reference,
)

__all__ = [
    "cdiv",
    "kv_cache_update",
    "kv_cache_update_kv",
    "localize_slices",
    "dequantize_kv",
    "QUANTIZED_DTYPES",
    "quantize_reference",
    "LAYOUTS",
    "dtype_packing",
    "kv_cache_shape",
    "merge_kv",
    "split_kv",
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
    "slice_indices_from_block_table",
    "max_num_slices_bound",
    "kv_cache_update_reference",
    "slice_indices_from_block_table_reference",
    "slice_indices_from_slot_mapping",
    "slice_indices_from_ragged_metadata",
    "slice_indices_from_slot_mapping_reference",
    "slice_indices_from_ragged_metadata_reference",
]
