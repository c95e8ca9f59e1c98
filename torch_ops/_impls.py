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

import jax_kernels as jk

IMPLS = ("auto", "torch", "jax", "scan", "pallas", "pallas_interpret")


def check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(map(repr, IMPLS))}")


def jax_update(
    new_kv_tokens,  # [T, H, D]
    slice_indices,  # i32[3, S]
    kv_cache,  # [R, H, D] or [P, page_size, H, D]
    total_update_slices,  # i32[1]
    *,
    impl: str,
    page_size: int,
    slices_per_processing_page: int,
):
    """The JAX function behind ``impl`` (``auto``, ``jax``, ``scan``, ``pallas``,
    ``pallas_interpret``), on a flat or paged cache. Metadata is validated by
    the caller (on the host) before this runs. One module-level function, so
    ``call_jax``'s cache (keyed by function, shapes and static values) hits."""
    flat = kv_cache.reshape(-1, *kv_cache.shape[-2:])
    if impl == "auto":
        out = jk.kv_cache_update(
            new_kv_tokens, slice_indices, flat, total_update_slices, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, validate=False,
        )
    elif impl == "jax":
        out = jk.kv_cache_update_scatter(new_kv_tokens, slice_indices, flat, total_update_slices, page_size=page_size)
    elif impl == "scan":
        out = jk.kv_cache_update_jax(new_kv_tokens, slice_indices, flat, total_update_slices, page_size=page_size)
    elif impl in ("pallas", "pallas_interpret"):
        jk.static_validate_inputs(
            new_kv_tokens, slice_indices, flat, total_update_slices, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, for_tpu_kernel=True,
        )
        out = jk.kv_cache_update_pallas(
            new_kv_tokens, slice_indices, flat, total_update_slices, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, interpret=impl == "pallas_interpret",
        )
    else:
        raise ValueError(f"impl={impl!r} has no JAX function")
    return out.reshape(kv_cache.shape)
