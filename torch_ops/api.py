"""The documented Python entry points (thin, keyword-only wrappers of the ops)."""

from __future__ import annotations

import torch


def _scales(cache: torch.Tensor, k_scale, v_scale):
    """The ops take scales as scalar tensors (graph data, not constants):
    Python floats become float32 tensors on the cache's device."""
    return tuple(
        s if s is None or isinstance(s, torch.Tensor) else torch.tensor(s, dtype=torch.float32, device=cache.device)
        for s in (k_scale, v_scale)
    )


def kv_cache_update(
    new_kv_tokens: torch.Tensor,  # [T, *row]: row [H, D] or packed [H', pack, D']
    slice_indices: torch.Tensor,  # int[3, S]: rows (dst row in cache, src row in new_kv_tokens, len)
    kv_cache: torch.Tensor,  # [P * page_size, *row] or [P, page_size, *row]; updated in place
    total_update_slices: torch.Tensor,  # int[1]
    *,
    page_size: int = 32,
    slices_per_processing_page: int | None = None,
    impl: str = "auto",
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> None:
    """Write token rows into ``kv_cache`` in place (``torch.ops.paged_kv.kv_cache_update``).

    For each of the first ``total_update_slices[0]`` columns ``(dst, src, len)``
    of ``slice_indices``: ``cache[dst:dst+len] = new_kv_tokens[src:src+len]``
    (rows of the flat cache). The rest of ``slice_indices`` is padding and is
    never read. ``H`` is the combined K+V head count.

    ``kv_cache`` may be flat ``[P * page_size, *row]`` or paged
    ``[P, page_size, *row]``, with rows ``[H, D]`` (combined heads: vLLM's
    2025 TPU layout) or packed ``[H', pack, D']`` (tpu-inference's RPA v3
    cache; see ``jax_kernels.layouts``); either way the caller's tensor is updated (eager:
    same ``data_ptr``, every view sees it; PyTorch/XLA: the same buffer,
    aliased when the graph is synced). ``impl`` picks the path — see
    ``torch_ops.IMPLS`` and the README; all write identical bits.

    Quantize on write: a ``float8_e4m3fn``/``float8_e5m2``/``int8`` cache from
    ``bfloat16``/``float16``/``float32`` tokens with ``k_scale`` and
    ``v_scale`` (floats or float32 scalar tensors on the cache's device; K
    heads — even heads — by ``k_scale``): ``jax_kernels.kv_cache_update``'s
    math, bit for bit, on every impl.

    Errors (``ValueError``/``TypeError`` naming the argument, cache unchanged):
    shapes, dtypes, devices, ``impl``, and — whenever the metadata is on the
    host, or under ``torch_ops.validation("always")`` — the slice data and
    the scales' values.
    """
    torch.ops.paged_kv.kv_cache_update(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl,
        *_scales(kv_cache, k_scale, v_scale),
    )


def kv_cache_update_functional(
    new_kv_tokens: torch.Tensor,
    slice_indices: torch.Tensor,
    kv_cache: torch.Tensor,
    total_update_slices: torch.Tensor,
    *,
    page_size: int = 32,
    slices_per_processing_page: int | None = None,
    impl: str = "auto",
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Like :func:`kv_cache_update`, but returns an updated copy and leaves
    ``kv_cache`` untouched (``torch.ops.paged_kv.kv_cache_update_functional``).
    Eager, this costs a copy of the cache; under PyTorch/XLA, ``cache.copy_(result)``
    with the result dropped before the sync updates in place."""
    return torch.ops.paged_kv.kv_cache_update_functional(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl,
        *_scales(kv_cache, k_scale, v_scale),
    )


def kv_cache_update_kv(
    key: torch.Tensor,  # [T, *row_k]
    value: torch.Tensor,  # [T, *row_v]
    slice_indices: torch.Tensor,  # int[3, S]
    k_cache: torch.Tensor,  # [P * page_size, *row_k] or [P, page_size, *row_k]; updated in place
    v_cache: torch.Tensor,  # [P * page_size, *row_v] or [P, page_size, *row_v]; updated in place
    total_update_slices: torch.Tensor,  # int[1]
    *,
    page_size: int = 32,
    slices_per_processing_page: int | None = None,
    impl: str = "auto",
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> None:
    """:func:`kv_cache_update` for separate K and V caches with the same slices
    (``torch.ops.paged_kv.kv_cache_update_kv``): ``k_cache`` gets ``key``'s
    rows and ``v_cache`` ``value``'s, both in place. Rows are ``[kvH, D]`` (or
    packed); the two caches must have the same number of rows and the tokens
    the same count. Validation and errors as for :func:`kv_cache_update`,
    naming ``key``/``value``/``k_cache``/``v_cache``."""
    torch.ops.paged_kv.kv_cache_update_kv(
        key, value, slice_indices, k_cache, v_cache, total_update_slices, page_size, slices_per_processing_page, impl,
        *_scales(k_cache, k_scale, v_scale),
    )


def kv_cache_update_kv_functional(
    key: torch.Tensor,
    value: torch.Tensor,
    slice_indices: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    total_update_slices: torch.Tensor,
    *,
    page_size: int = 32,
    slices_per_processing_page: int | None = None,
    impl: str = "auto",
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`kv_cache_update_kv`, but returns updated copies
    ``(k_cache, v_cache)`` and leaves the inputs untouched
    (``torch.ops.paged_kv.kv_cache_update_kv_functional``)."""
    return torch.ops.paged_kv.kv_cache_update_kv_functional(
        key, value, slice_indices, k_cache, v_cache, total_update_slices, page_size, slices_per_processing_page, impl,
        *_scales(k_cache, k_scale, v_scale),
    )
