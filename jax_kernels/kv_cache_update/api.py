"""``kv_cache_update``: the public entry point, keeping EasyDeL's contract.

It validates, then picks the implementation by the platform being *lowered
for* (``jax.lax.platform_dependent``), not by ``jax.default_backend()``: a
TPU lowering or export from a CPU host still gets the Pallas kernel, and a
CPU/GPU run gets the fast scatter fallback.
"""

from __future__ import annotations

import functools

import jax

from .._utils import is_traced
from .fallbacks import scatter_update
from .kernel import INTERPRETER_LOCK, pallas_update
from .prepare import KV_NAMES, prepare, tpu_problem
from .validation import NAMES


@functools.partial(jax.jit, static_argnames=("page_size", "slices_per_processing_page", "use_kernel"))
def _update_auto(tokens, slice_indices, caches, total_update_slices, *, page_size, slices_per_processing_page, use_kernel):
    fallback = functools.partial(scatter_update, page_size=page_size)
    if not use_kernel:
        return fallback(tokens, slice_indices, caches, total_update_slices)
    kernel = functools.partial(pallas_update, page_size=page_size, slices_per_processing_page=slices_per_processing_page)
    return jax.lax.platform_dependent(tokens, slice_indices, caches, total_update_slices, tpu=kernel, default=fallback)


def update(
    tokens,  # tuple of [T, *row_i]
    slice_indices,  # int[3, S]
    caches,  # tuple of caches holding rows row_i
    total_update_slices,  # int[1]
    *,
    page_size: int,
    slices_per_processing_page: int,
    interpret,
    validate,
    page_shard_index,
    names,
):  # -> tuple of updated caches
    """``kv_cache_update`` on one or more (tokens, cache) pairs sharing the slices."""
    kernel_wanted = interpret is not False and interpret is not None
    idx = prepare(
        tokens, slice_indices, caches, total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, for_tpu_kernel=kernel_wanted, validate=validate,
        page_shard_index=page_shard_index, names=names,
    )
    if kernel_wanted:
        run = functools.partial(
            pallas_update, tuple(tokens), idx, tuple(caches), total_update_slices, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, interpret=interpret,
        )
        if is_traced(*tokens, idx, *caches, total_update_slices):
            return run()
        with INTERPRETER_LOCK:  # the interpreter is not thread-safe
            return jax.block_until_ready(run())
    use_kernel = tpu_problem(tokens, caches, page_size=page_size, slices_per_processing_page=slices_per_processing_page) is None
    return _update_auto(
        tuple(tokens), idx, tuple(caches), total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, use_kernel=use_kernel,
    )


def kv_cache_update(
    new_kv_tokens,  # [T, *row]: row [H, D] (H = combined K+V heads) or packed [H', pack, D']
    slice_indices,  # int[3, S]: rows (dst row in cache, src row in new_kv_tokens, len)
    kv_cache_pages,  # [P * page_size, *row] or [P, page_size, *row]
    total_update_slices,  # int[1]
    *,
    page_size: int = 32,
    slices_per_processing_page: int = 8,
    interpret=False,
    validate: bool | None = None,
    page_shard_index=None,
):
    """Write token rows into a paged KV cache; return the updated cache.

    For each of the first ``total_update_slices[0]`` columns ``(dst, src, len)``
    of ``slice_indices``: ``rows[dst:dst+len] = new_kv_tokens[src:src+len]``,
    where ``rows`` is the cache as ``[num_pages * page_size, *row]``. The
    remaining columns are padding and are never read.

    Layouts (``jax_kernels.layouts``): a row is what one token stores —
    ``[H, D]`` (combined K+V heads k0, v0, k1, v1, ..., or one of separate K
    and V caches) or packed ``[H', pack, D']`` (tpu-inference's RPA v3 cache,
    ``pack = 32 // bits``). The cache is flat ``[P * page_size, *row]`` or paged
    ``[P, page_size, *row]``; the result has the cache's shape.

    Implementation, chosen by the platform the computation is lowered for:

    * TPU: the Pallas kernel (async DMAs through VMEM, cache aliased in place —
      pass the cache through a ``jax.jit(..., donate_argnums=...)`` to update
      it without a copy). Needs the row's last dim (``head_dim``, padded to 128
      in the packed layout) a multiple of 128 and a staging buffer
      ``slices_per_processing_page * page_size * row bytes`` within 16 MiB;
      when these do not hold, the fallback below runs on TPU too.
    * Elsewhere: :func:`kv_cache_update_scatter`, the fastest correct JAX path.
    * ``interpret=True`` (or a ``pltpu.InterpretParams``): the Pallas kernel's
      own code in the TPU interpreter, on any backend. Slow; for testing.

    Args:
      new_kv_tokens: ``[num_tokens, *row]``.
      slice_indices: integer ``[3, num_slices]``.
      kv_cache_pages: ``[num_pages * page_size, *row]`` or ``[num_pages,
        page_size, *row]``, same dtype as ``new_kv_tokens``.
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
      page_shard_index: EasyDeL 0.3's argument, for a cache whose pages are
        sharded over devices (a data-parallel axis): this call holds shard
        ``i``'s pages, rows ``[i * R, (i + 1) * R)`` of the whole cache, and
        ``slice_indices`` names rows of the whole cache; slices (or the parts
        of them) outside this shard are skipped. An int or a traced int32
        (``jax.lax.axis_index``). ``None`` (default) = unsharded, the same as
        EasyDeL's default ``0`` for valid slices.

    Returns:
      The updated cache, same shape and dtype as ``kv_cache_pages``.
    """
    return update(
        (new_kv_tokens,), slice_indices, (kv_cache_pages,), total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, interpret=interpret, validate=validate,
        page_shard_index=page_shard_index, names=(NAMES,),
    )[0]


def kv_cache_update_kv(
    key,  # [T, *row_k]: row [kvH, D] or packed
    value,  # [T, *row_v]
    slice_indices,  # int[3, S]
    k_cache,  # [P * page_size, *row_k] or [P, page_size, *row_k]
    v_cache,  # [P * page_size, *row_v] or [P, page_size, *row_v]
    total_update_slices,  # int[1]
    *,
    page_size: int = 32,
    slices_per_processing_page: int = 8,
    interpret=False,
    validate: bool | None = None,
    page_shard_index=None,
):  # -> (k_cache, v_cache)
    """:func:`kv_cache_update` for separate K and V caches with the same slices:
    returns the updated ``(k_cache, v_cache)``. On TPU one kernel launch writes
    both (a staging buffer each; the VMEM rule counts both rows); elsewhere
    one scatter each, from row indices computed once. ``key``/``value`` must
    have the same number of tokens and ``k_cache``/``v_cache`` the same number
    of rows; their rows (heads, head_dim, dtype) may differ."""
    return update(
        (key, value), slice_indices, (k_cache, v_cache), total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, interpret=interpret, validate=validate,
        page_shard_index=page_shard_index, names=KV_NAMES,
    )
