"""The ops in namespace ``paged_kv``: schemas, fake kernels, device kernels.

* ``paged_kv::kv_cache_update`` mutates ``kv_cache`` and returns nothing.
* ``paged_kv::kv_cache_update_functional`` returns a new cache.

Kernels: CPU and CUDA (eager), XLA, and one at the ``Functionalize`` key: under
functionalization (PyTorch/XLA's default mode, torch.compile) the mutating op
runs as the functional op followed by ``kv_cache.copy_``, which XLA turns into
an in-place update when the graph is synced.
"""

from __future__ import annotations

import torch

from . import _eager, _validation, _xla

_DEFAULTS = dict(page_size=32, slices_per_processing_page=8, impl="auto")


def _prepare(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl):
    """All checks that can run here, before any data moves. Returns
    ``(flat cache view, host metadata or None)``."""
    flat = _validation.validate_static(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices,
        page_size=page_size, slices_per_processing_page=slices_per_processing_page, impl=impl,
    )
    mode = _validation.validation_mode()
    on_host = slice_indices.device.type == "cpu"
    meta = None
    if on_host or impl == "pallas_interpret" or (mode == "always" and slice_indices.device.type != "cpu"):
        meta = _validation.host_metadata(slice_indices, total_update_slices)
    if meta is not None and mode != "never":
        _validation.validate_data(new_kv_tokens, meta[0], flat, meta[1], page_size=page_size)
    return flat, meta


# ------------------------------------------------------------------- mutating op


@torch.library.custom_op("paged_kv::kv_cache_update", mutates_args=("kv_cache",))
def kv_cache_update(
    new_kv_tokens: torch.Tensor,
    slice_indices: torch.Tensor,
    kv_cache: torch.Tensor,
    total_update_slices: torch.Tensor,
    page_size: int = 32,
    slices_per_processing_page: int = 8,
    impl: str = "auto",
) -> None:
    """Eager CPU/CUDA kernel (other devices register their own below)."""
    flat, meta = _prepare(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl)
    _update_eager_(new_kv_tokens, flat, meta, slice_indices, total_update_slices, page_size, slices_per_processing_page, impl)


def _update_eager_(new_kv_tokens, flat, meta, slice_indices, total_update_slices, page_size, slices_per_processing_page, impl):
    if impl == "pallas":
        raise ValueError(
            f"impl='pallas' needs PyTorch/XLA tensors on a TPU, got {flat.device} tensors; "
            f"use impl='pallas_interpret' to run the kernel's code elsewhere"
        )
    if meta is None:  # CUDA metadata with validation mode "host"/"never": fetch it (a sync)
        meta = _validation.host_metadata(slice_indices, total_update_slices)
    idx, total = meta
    if impl in ("auto", "torch"):
        _eager.update_rows_(new_kv_tokens, idx, total, flat)
    else:
        _eager.update_staged_(
            new_kv_tokens, idx, total, flat, impl=impl, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page,
        )


@kv_cache_update.register_fake
def _(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=32, slices_per_processing_page=8, impl="auto"):
    _validation.validate_static(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices,
        page_size=page_size, slices_per_processing_page=slices_per_processing_page, impl=impl,
    )
    return None


@kv_cache_update.register_kernel("xla")
def _(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=32, slices_per_processing_page=8, impl="auto"):
    # Reached with XLA_DISABLE_FUNCTIONALIZATION=1; otherwise the Functionalize kernel runs.
    kv_cache.copy_(
        kv_cache_update_functional(
            new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl
        )
    )


# ----------------------------------------------------------------- functional op


@torch.library.custom_op("paged_kv::kv_cache_update_functional", mutates_args=())
def kv_cache_update_functional(
    new_kv_tokens: torch.Tensor,
    slice_indices: torch.Tensor,
    kv_cache: torch.Tensor,
    total_update_slices: torch.Tensor,
    page_size: int = 32,
    slices_per_processing_page: int = 8,
    impl: str = "auto",
) -> torch.Tensor:
    """Eager CPU/CUDA kernel: a copy of the cache, updated (O(cache) by nature)."""
    flat, meta = _prepare(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl)
    if impl == "pallas":  # before the O(cache) clone
        _update_eager_(new_kv_tokens, flat, meta, slice_indices, total_update_slices, page_size, slices_per_processing_page, impl)
    out = kv_cache.clone()
    flat_out = _validation.flat_cache(out, page_size)
    _update_eager_(new_kv_tokens, flat_out, meta, slice_indices, total_update_slices, page_size, slices_per_processing_page, impl)
    return out


@kv_cache_update_functional.register_fake
def _(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=32, slices_per_processing_page=8, impl="auto"):
    _validation.validate_static(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices,
        page_size=page_size, slices_per_processing_page=slices_per_processing_page, impl=impl,
    )
    return torch.empty_like(kv_cache)


@kv_cache_update_functional.register_kernel("xla")
def _(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=32, slices_per_processing_page=8, impl="auto"):
    _, meta = _prepare(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl)
    return _xla.functional_update(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices, impl=impl, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, host_meta=meta,
    )


# ------------------------------------------------------- under functionalization


def _functionalize_kernel(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=32, slices_per_processing_page=8, impl="auto"):
    kv_cache.copy_(
        torch.ops.paged_kv.kv_cache_update_functional(
            new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl
        )
    )


_lib = torch.library.Library("paged_kv", "IMPL")
_lib.impl("kv_cache_update", _functionalize_kernel, "Functionalize")
