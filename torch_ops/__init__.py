"""``torch.ops.paged_kv``: update a paged KV cache in place from PyTorch.

    import torch_ops  # registers torch.ops.paged_kv.*
    torch.ops.paged_kv.kv_cache_update(new_kv_tokens, slice_indices, kv_cache, total_update_slices,
                                       page_size=32, impl="auto")
"""

from . import _library  # noqa: F401  (registers the ops)
from ._impls import IMPLS
from ._validation import validation, validation_mode
from .api import kv_cache_update, kv_cache_update_functional

__all__ = [
    "IMPLS",
    "kv_cache_update",
    "kv_cache_update_functional",
    "validation",
    "validation_mode",
]
