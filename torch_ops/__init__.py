"""``torch.ops.paged_kv``: update a paged KV cache in place from PyTorch.

    import torch_ops  # registers torch.ops.paged_kv.*
    torch.ops.paged_kv.kv_cache_update(new_kv_tokens, slice_indices, kv_cache, total_update_slices,
                                       page_size=32, impl="auto")
    torch.ops.paged_kv.kv_cache_update_kv(key, value, slice_indices, k_cache, v_cache, total_update_slices)
"""

import bridge  # noqa: F401  (first: JAX is imported through bridge._jax_import and its guard rule)

from . import _library  # noqa: F401  (registers the ops)
from ._torchax import enable_torchax, install as _install_torchax  # noqa: E402
from ._torchtpu import install as _install_torchtpu  # noqa: E402
_install_torchax(), _install_torchtpu()  # torchax / TorchTPU kernels: now if loaded, else right after their import
from ._impls import IMPLS
from ._validation import validation, validation_mode
from .api import kv_cache_update, kv_cache_update_functional, kv_cache_update_kv, kv_cache_update_kv_functional
from .page_tables import (
    max_num_slices_bound,
    slice_indices_from_block_table,
    slice_indices_from_ragged_metadata,
    slice_indices_from_slot_mapping,
)

__all__ = [
    "IMPLS",
    "enable_torchax",
    "kv_cache_update",
    "kv_cache_update_functional",
    "kv_cache_update_kv",
    "kv_cache_update_kv_functional",
    "max_num_slices_bound",
    "slice_indices_from_block_table",
    "slice_indices_from_ragged_metadata",
    "slice_indices_from_slot_mapping",
    "validation",
    "validation_mode",
]
