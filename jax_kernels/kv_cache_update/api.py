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
from .prepare import KV_NAMES, prepare, tpu_config
from .validation import NAMES


@functools.partial(
    jax.jit, static_argnames=("page_size", "slices_per_processing_page", "vmem_limit_bytes", "use_kernel")
)
def update_auto(
    tokens, slice_indices, caches, total_update_slices, scales, *, page_size, slices_per_processing_page,
    vmem_limit_bytes, use_kernel,
):
    """The Pallas kernel where the computation is lowered for TPU and
    ``use_kernel`` (the kernel's rules hold), the scatter fallback elsewhere."""
    def fallback(tokens, slice_indices, caches, total_update_slices, scales):
        return scatter_update(tokens, slice_indices, caches, total_update_slices, page_size=page_size, scales=scales)

    if not use_kernel:
        return fallback(tokens, slice_indices, caches, total_update_slices, scales)

    def kernel(tokens, slice_indices, caches, total_update_slices, scales):
        return pallas_update(
            tokens, slice_indices, caches, total_update_slices, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, vmem_limit_bytes=vmem_limit_bytes, scales=scales,
        )

    return jax.lax.platform_dependent(
        tokens, slice_indices, caches, total_update_slices, scales, tpu=kernel, default=fallback
    )


def update(
    tokens,  # tuple of [T, *row_i]
    slice_indices,  # int[3, S]
    caches,  # tuple of caches holding rows row_i
    total_update_slices,  # int[1]
    *,
    page_size: int,
    slices_per_processing_page: int | None,
    vmem_limit_bytes: int | None = None,
    interpret,
    validate,
    page_shard_index,
    names,
    k_scale=None,
    v_scale=None,
):  # -> tuple of updated caches
    """``kv_cache_update`` on one or more (tokens, cache) pairs sharing the slices."""
    kernel_wanted = interpret is not False and interpret is not None
    idx, scales = prepare(
        tokens, slice_indices, caches, total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, for_tpu_kernel=kernel_wanted, validate=validate,
        page_shard_index=page_shard_index, names=names, vmem_limit_bytes=vmem_limit_bytes,
        k_scale=k_scale, v_scale=v_scale,
    )
    if kernel_wanted:
        run = functools.partial(
            pallas_update, tuple(tokens), idx, tuple(caches), total_update_slices, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, vmem_limit_bytes=vmem_limit_bytes,
            interpret=interpret, scales=scales,
        )
        if is_traced(*tokens, idx, *caches, total_update_slices):
            return run()
        with INTERPRETER_LOCK:  # the interpreter is not thread-safe
            return jax.block_until_ready(run())
    use_kernel = tpu_config(
        tokens, idx, caches, page_size=page_size, slices_per_processing_page=slices_per_processing_page,
        vmem_limit_bytes=vmem_limit_bytes,
    ).problem is None
    return update_auto(
        tuple(tokens), idx, tuple(caches), total_update_slices, scales, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, vmem_limit_bytes=vmem_limit_bytes,
        use_kernel=use_kernel,
    )


def kv_cache_update(
    new_kv_tokens,  # [T, *row]: row [H, D] (H = combined K+V heads) or packed [H', pack, D']
    slice_indices,  # int[3, S]: rows (dst row in cache, src row in new_kv_tokens, len)
    kv_cache_pages,  # [P * page_size, *row] or [P, page_size, *row]
    total_update_slices,  # int[1]
    *,
    page_size: int = 32,
    slices_per_processing_page: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret=False,
    validate: bool | None = None,
    page_shard_index=None,
    k_scale=None,
    v_scale=None,
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
      in the packed layout) a multiple of 128 and its staging buffer within
      the VMEM limit (``jax_kernels.tpu_kernel_config`` says what it will use,
      and why not); when these do not hold, the fallback below runs on TPU too.
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
      slices_per_processing_page: slices per kernel grid step. Static.
        ``None`` (default): sized from the chip's VMEM — ``(vmem_limit_bytes -
        1 MiB) // page bytes``, a power of two, at most 64 and at most the
        slices passed (``jax_kernels.kv_cache_update.tpu_config``). An integer
        is honoured exactly (EasyDeL's default was 8); any positive value
        works (the slice count need not be a multiple).
      vmem_limit_bytes: the kernel's scoped VMEM limit (Mosaic's compiler
        parameter). ``None``: ``min(40 MiB, 5/8 of the chip's VMEM)``, or more
        to hold an explicit ``slices_per_processing_page``'s buffer.
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
      k_scale, v_scale: quantize on write. When ``kv_cache_pages`` is
        ``float8_e4m3fn``, ``float8_e5m2`` or ``int8`` and the tokens are
        ``bfloat16``/``float16``/``float32``, both are required (floats or
        float32 scalars, positive and finite) and the rows are written as
        ``q = x.astype(float32) / scale`` clipped and cast (K heads — even
        heads — by ``k_scale``, V heads by ``v_scale``); on TPU inside the
        kernel, in VMEM between its two DMAs. See ``quantize.py`` for the exact
        math (NaN, ±inf, rounding). With equal dtypes: ``None`` (or 1).

    Returns:
      The updated cache, same shape and dtype as ``kv_cache_pages``.
    """
    return update(
        (new_kv_tokens,), slice_indices, (kv_cache_pages,), total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, vmem_limit_bytes=vmem_limit_bytes,
        interpret=interpret, validate=validate, page_shard_index=page_shard_index, names=(NAMES,),
        k_scale=k_scale, v_scale=v_scale,
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
    slices_per_processing_page: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret=False,
    validate: bool | None = None,
    page_shard_index=None,
    k_scale=None,
    v_scale=None,
):  # -> (k_cache, v_cache)
    """:func:`kv_cache_update` for separate K and V caches with the same slices:
    returns the updated ``(k_cache, v_cache)``. On TPU one kernel launch writes
    both (a staging buffer each; the VMEM rule counts both rows); elsewhere
    one scatter each, from row indices computed once. ``key``/``value`` must
    have the same number of tokens and ``k_cache``/``v_cache`` the same number
    of rows; their rows (heads, head_dim, dtype) may differ."""
    return update(
        (key, value), slice_indices, (k_cache, v_cache), total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, vmem_limit_bytes=vmem_limit_bytes,
        interpret=interpret, validate=validate, page_shard_index=page_shard_index, names=KV_NAMES,
        k_scale=k_scale, v_scale=v_scale,
    )
