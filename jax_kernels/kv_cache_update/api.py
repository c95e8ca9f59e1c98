"""``kv_cache_update``: the public entry point, keeping EasyDeL's contract.

It validates, then picks the implementation by the platform being *lowered
for* (``jax.lax.platform_dependent``), not by ``jax.default_backend()``: a
TPU lowering or export from a CPU host still gets the Pallas kernel, and a
CPU/GPU run gets the fast scatter fallback.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from .._utils import is_on_host, is_traced
from .fallbacks import _kv_cache_update_scatter
from .kernel import INTERPRETER_LOCK, kv_cache_update_pallas
from .validation import dynamic_validate_inputs, static_validate_inputs, tpu_kernel_problem


@functools.partial(jax.jit, static_argnames=("page_size", "slices_per_processing_page", "use_kernel"))
def _kv_cache_update_auto(
    new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, *, page_size, slices_per_processing_page, use_kernel
):
    fallback = functools.partial(_kv_cache_update_scatter, page_size=page_size)
    if not use_kernel:
        return fallback(new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices)
    kernel = functools.partial(
        kv_cache_update_pallas, page_size=page_size, slices_per_processing_page=slices_per_processing_page
    )
    return jax.lax.platform_dependent(
        new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, tpu=kernel, default=fallback
    )


def check_slice_data(new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, *, page_size, validate):
    """``dynamic_validate_inputs`` as ``validate`` asks: ``None`` — when the
    metadata is concrete and on the host; ``True`` — always (fetching device
    metadata); ``False`` — never."""
    if validate is None:
        validate = not is_traced(slice_indices, total_update_slices) and (
            is_on_host(slice_indices) and is_on_host(total_update_slices)
        )
    if not validate:
        return
    if is_traced(slice_indices, total_update_slices):
        raise ValueError("validate=True needs concrete slice metadata, not values traced inside jit")
    dynamic_validate_inputs(
        new_kv_tokens, np.asarray(slice_indices), kv_cache_pages, np.asarray(total_update_slices), page_size=page_size
    )


def kv_cache_update(
    new_kv_tokens,  # [T, H, D]
    slice_indices,  # int[3, S]: rows (dst row in cache, src row in new_kv_tokens, len)
    kv_cache_pages,  # [P * page_size, H, D]
    total_update_slices,  # int[1]
    *,
    page_size: int = 32,
    slices_per_processing_page: int = 8,
    interpret=False,
    validate: bool | None = None,
):
    """Write token rows into a paged KV cache; return the updated cache.

    For each of the first ``total_update_slices[0]`` columns ``(dst, src, len)``
    of ``slice_indices``: ``cache[dst:dst+len] = new_kv_tokens[src:src+len]``.
    The remaining columns are padding and are never read. ``H`` is the
    combined K+V head count (see ``bridge.layouts`` for the interleaving).

    Implementation, chosen by the platform the computation is lowered for:

    * TPU: the Pallas kernel (async DMAs through VMEM, cache aliased in place —
      pass the cache through a ``jax.jit(..., donate_argnums=...)`` to update
      it without a copy). Needs ``head_dim % 128 == 0`` and a staging buffer
      ``slices_per_processing_page * page_size * H * D`` within 16 MiB; when
      these do not hold, the fallback below runs on TPU too.
    * Elsewhere: :func:`kv_cache_update_scatter`, the fastest correct JAX path.
    * ``interpret=True`` (or a ``pltpu.InterpretParams``): the Pallas kernel's
      own code in the TPU interpreter, on any backend. Slow; for testing.

    Args:
      new_kv_tokens: ``[num_tokens, num_combined_kv_heads, head_dim]``.
      slice_indices: integer ``[3, num_slices]``.
      kv_cache_pages: ``[num_pages * page_size, num_combined_kv_heads, head_dim]``,
        same dtype as ``new_kv_tokens``.
      total_update_slices: integer ``[1]``, ``0 <= total <= num_slices``.
      page_size: rows per page; every slice is at most this long. Static.
      slices_per_processing_page: slices per kernel grid step. Static. Any
        positive value works (the slice count need not be a multiple).
      interpret: run the kernel in the TPU interpreter.
      validate: check the slice metadata's values first (``ValueError`` on a
        slice out of range, too long, negative, overlapping another, or a bad
        total). ``None`` (default): check whenever the metadata is concrete and
        on the host (numpy, CPU arrays); never inside ``jit``. ``True``: also
        fetch device metadata to check (a device→host sync). ``False``: skip.

    Returns:
      The updated cache, same shape and dtype as ``kv_cache_pages``.
    """
    kernel_wanted = interpret is not False and interpret is not None
    static_validate_inputs(
        new_kv_tokens,
        slice_indices,
        kv_cache_pages,
        total_update_slices,
        page_size=page_size,
        slices_per_processing_page=slices_per_processing_page,
        for_tpu_kernel=kernel_wanted,
    )
    check_slice_data(new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, page_size=page_size, validate=validate)
    if kernel_wanted:
        run = functools.partial(
            kv_cache_update_pallas,
            new_kv_tokens,
            slice_indices,
            kv_cache_pages,
            total_update_slices,
            page_size=page_size,
            slices_per_processing_page=slices_per_processing_page,
            interpret=interpret,
        )
        if is_traced(new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices):
            return run()
        with INTERPRETER_LOCK:  # the interpreter is not thread-safe
            return jax.block_until_ready(run())
    use_kernel = (
        tpu_kernel_problem(
            kv_cache_pages.shape,
            kv_cache_pages.dtype,
            page_size=page_size,
            slices_per_processing_page=slices_per_processing_page,
        )
        is None
    )
    return _kv_cache_update_auto(
        new_kv_tokens,
        slice_indices,
        kv_cache_pages,
        total_update_slices,
        page_size=page_size,
        slices_per_processing_page=slices_per_processing_page,
        use_kernel=use_kernel,
    )
