"""The documented Python entry points (thin, keyword-only wrappers of the ops)."""

from __future__ import annotations

import torch


def kv_cache_update(
    new_kv_tokens: torch.Tensor,  # [T, H, D]
    slice_indices: torch.Tensor,  # int[3, S]: rows (dst row in cache, src row in new_kv_tokens, len)
    kv_cache: torch.Tensor,  # [P * page_size, H, D] or [P, page_size, H, D]; updated in place
    total_update_slices: torch.Tensor,  # int[1]
    *,
    page_size: int = 32,
    slices_per_processing_page: int = 8,
    impl: str = "auto",
) -> None:
    """Write token rows into ``kv_cache`` in place (``torch.ops.paged_kv.kv_cache_update``).

    For each of the first ``total_update_slices[0]`` columns ``(dst, src, len)``
    of ``slice_indices``: ``cache[dst:dst+len] = new_kv_tokens[src:src+len]``
    (rows of the flat cache). The rest of ``slice_indices`` is padding and is
    never read. ``H`` is the combined K+V head count.

    ``kv_cache`` may be flat ``[P * page_size, H, D]`` or vLLM's paged
    ``[P, page_size, H, D]``; either way the caller's tensor is updated (eager:
    same ``data_ptr``, every view sees it; PyTorch/XLA: the same buffer,
    aliased when the graph is synced). ``impl`` picks the path — see
    ``torch_ops.IMPLS`` and the README; all write identical bits.

    Errors (``ValueError``/``TypeError`` naming the argument, cache unchanged):
    shapes, dtypes, devices, ``impl``, and — whenever the metadata is on the
    host, or under ``torch_ops.validation("always")`` — the slice data.
    """
    torch.ops.paged_kv.kv_cache_update(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl
    )


def kv_cache_update_functional(
    new_kv_tokens: torch.Tensor,
    slice_indices: torch.Tensor,
    kv_cache: torch.Tensor,
    total_update_slices: torch.Tensor,
    *,
    page_size: int = 32,
    slices_per_processing_page: int = 8,
    impl: str = "auto",
) -> torch.Tensor:
    """Like :func:`kv_cache_update`, but returns an updated copy and leaves
    ``kv_cache`` untouched (``torch.ops.paged_kv.kv_cache_update_functional``).
    Eager, this costs a copy of the cache; under PyTorch/XLA, ``cache.copy_(result)``
    with the result dropped before the sync updates in place."""
    return torch.ops.paged_kv.kv_cache_update_functional(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl
    )
