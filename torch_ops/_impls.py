"""The update paths the torch op can take, and the JAX function behind each.

=================== =========================================================
``impl``            what runs
=================== =========================================================
``"auto"``          TPU (PyTorch/XLA): the Pallas kernel. PyTorch/XLA on other
                    devices: the scatter fallback, staged into the XLA graph.
                    Eager CPU/CUDA: ``"torch"``, the fastest correct path there.
``"torch"``         torch's own ops: the named rows copied with one
                    ``index_copy_`` (eager tensors only).
``"jax"``           ``jax_kernels.kv_cache_update_scatter``, the fast JAX fallback.
``"scan"``          ``jax_kernels.kv_cache_update_jax``, the ``lax.scan`` fallback.
``"pallas"``        the Pallas TPU kernel; PyTorch/XLA tensors on a TPU only.
``"pallas_interpret"`` the Pallas kernel's own code in the TPU interpreter, on
                    any device (slow; for running the exact TPU code on CPU).
=================== =========================================================

Every path writes bit-identical results. Eager tensors reach the JAX paths
through DLPack with only the pages the call touches staged (JAX cannot write
into memory it imported through DLPack, so the cost stays O(update) instead of
O(cache)); XLA tensors reach them through ``call_jax``, staged into the lazy graph.
"""

from __future__ import annotations

from jax_kernels.kv_cache_update import api as jk_update
from jax_kernels.kv_cache_update import fallbacks as jk_fallbacks
from jax_kernels.kv_cache_update import kernel as jk_kernel
from jax_kernels.kv_cache_update import prepare as jk_prepare

IMPLS = ("auto", "torch", "jax", "scan", "pallas", "pallas_interpret")


def check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(map(repr, IMPLS))}")


def jax_update_pairs(
    tokens,  # tuple of [T, *row_i]
    slice_indices,  # i32[3, S]
    caches,  # tuple of caches holding rows row_i (flat, paged or packed)
    total_update_slices,  # i32[1]
    *,
    impl: str,
    page_size: int,
    slices_per_processing_page: int | None,
    scales=None,  # f32[n, 2] or None: quantize for each cache (even heads, odd heads)
):  # -> tuple of updated caches
    """The JAX function behind ``impl`` (``auto``, ``jax``, ``scan``, ``pallas``,
    ``pallas_interpret``) on one or more (tokens, cache) pairs sharing the
    slices (one for ``kv_cache_update``, K and V for ``kv_cache_update_kv``).
    Shapes, scales and metadata are validated by the caller (torch side, on
    the host) before this runs. Module-level, so ``call_jax``'s cache (keyed
    by function, shapes and static values) hits."""
    tokens, caches = tuple(tokens), tuple(caches)
    if impl == "auto":
        use_kernel = jk_prepare.tpu_config(
            tokens, slice_indices, caches, page_size=page_size, slices_per_processing_page=slices_per_processing_page
        ).problem is None
        return jk_update.update_auto(
            tokens, slice_indices, caches, total_update_slices, scales, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, vmem_limit_bytes=None, use_kernel=use_kernel,
        )
    if impl == "jax":
        return jk_fallbacks.scatter_update(
            tokens, slice_indices, caches, total_update_slices, page_size=page_size, scales=scales
        )
    if impl == "scan":
        return jk_fallbacks.scan_update(tokens, slice_indices, caches, total_update_slices, page_size=page_size, scales=scales)
    if impl in ("pallas", "pallas_interpret"):
        return jk_kernel.pallas_update(
            tokens, slice_indices, caches, total_update_slices, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, interpret=impl == "pallas_interpret", scales=scales,
        )
    raise ValueError(f"impl={impl!r} has no JAX function")


def jax_update(
    new_kv_tokens,  # [T, *row]
    slice_indices,  # i32[3, S]
    kv_cache,  # [R, *row] or [P, page_size, *row]
    total_update_slices,  # i32[1]
    *,
    impl: str,
    page_size: int,
    slices_per_processing_page: int | None,
):
    """:func:`jax_update_pairs` for one cache, unquantized (the eager staged
    paths: eager rows are quantized in torch first)."""
    return jax_update_pairs(
        (new_kv_tokens,), slice_indices, (kv_cache,), total_update_slices, impl=impl, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page,
    )[0]
