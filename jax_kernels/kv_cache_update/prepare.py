"""What every entry point does before it moves data: validate, then localize.

One path for every layout, for one cache (``kv_cache_update``) or a K and a V
cache sharing the slices (``kv_cache_update_kv``), and for a page shard:

1. :func:`static_validate_pairs` — shapes, dtypes, static arguments, at trace
   time (``validation.static_validate_inputs`` per pair, then that the pairs
   agree on tokens and rows);
2. :func:`check_slice_data` — the slice values, on the host, as ``validate`` asks;
3. :func:`localize_slices` — with ``page_shard_index``, destinations given as
   rows of the whole cache become rows of this shard (EasyDeL 0.3's meaning).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .._utils import is_on_host, is_traced
from .quantize import scale_pairs
from .tpu_config import KernelConfig, kernel_config, vmem_buffers
from .validation import NAMES, cache_rows, dynamic_validate_inputs, static_validate_inputs

#: Argument names of ``kv_cache_update_kv``'s two pairs.
KV_NAMES = (
    ("key", "slice_indices", "k_cache", "total_update_slices"),
    ("value", "slice_indices", "v_cache", "total_update_slices"),
)


def static_validate_pairs(
    tokens, slice_indices, caches, total_update_slices, *, page_size, slices_per_processing_page=None,
    for_tpu_kernel=False, names=(NAMES,), vmem_limit_bytes=None, k_scale=None, v_scale=None,
) -> bool:
    """:func:`static_validate_inputs` for each ``(tokens[i], caches[i])``; the
    pairs must have the same number of tokens and of cache rows (their rows
    may differ: K and V of other widths, other dtypes). Returns whether the
    write quantizes (then every pair must)."""
    for t, c, n in zip(tokens, caches, names):
        static_validate_inputs(
            t, slice_indices, c, total_update_slices, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, names=n, k_scale=k_scale, v_scale=v_scale,
        )
    quantized = {np.dtype(t.dtype) != np.dtype(c.dtype) for t, c in zip(tokens, caches)}
    if len(quantized) > 1:
        raise TypeError(
            "either every cache is written in its tokens' dtype or every one is quantized, got "
            + ", ".join(f"{n[0]} {np.dtype(t.dtype)} -> {n[2]} {np.dtype(c.dtype)}" for t, c, n in zip(tokens, caches, names))
        )
    if len(tokens) > 1:
        (t0, c0, n0), *rest = zip(tokens, caches, names)
        rows0 = cache_rows(np.shape(t0), np.shape(c0), page_size=page_size, names=n0)[0]
        for t, c, n in rest:
            if np.shape(t)[0] != np.shape(t0)[0]:
                raise ValueError(f"{n[0]} has {np.shape(t)[0]} tokens but {n0[0]} has {np.shape(t0)[0]}")
            rows = cache_rows(np.shape(t), np.shape(c), page_size=page_size, names=n)[0]
            if rows != rows0:
                raise ValueError(
                    f"{n[2]} has {rows} rows but {n0[2]} has {rows0} (shapes {np.shape(c)} and {np.shape(c0)})"
                )
    if for_tpu_kernel:
        problem = tpu_config(
            tokens, slice_indices, caches, page_size=page_size, slices_per_processing_page=slices_per_processing_page,
            vmem_limit_bytes=vmem_limit_bytes,
        ).problem
        if problem:
            raise ValueError(problem)
    return quantized.pop()


def tpu_config(
    tokens, slice_indices, caches, *, page_size, slices_per_processing_page=None, vmem_limit_bytes=None
) -> KernelConfig:
    """How one Pallas kernel launch would update these caches (``problem``:
    why it cannot, or None)."""
    rows = vmem_buffers([(np.shape(t)[1:], t.dtype, c.dtype) for t, c in zip(tokens, caches)])
    return kernel_config(
        rows, page_size=page_size, num_slices=np.shape(slice_indices)[1],
        slices_per_processing_page=slices_per_processing_page, vmem_limit_bytes=vmem_limit_bytes,
    )


def check_page_shard_index(page_shard_index, num_rows: int) -> None:
    """A concrete ``page_shard_index`` must be an integer ``>= 0`` whose rows
    ``[i * num_rows, (i + 1) * num_rows)`` are int32 row numbers."""
    if page_shard_index is None or is_traced(page_shard_index):
        return
    value = np.asarray(page_shard_index)
    if value.shape not in ((), (1,)) or not np.issubdtype(value.dtype, np.integer):
        raise TypeError(f"page_shard_index={page_shard_index!r} must be one integer")
    shard = int(value.reshape(-1)[0])
    if shard < 0 or (shard + 1) * num_rows > np.iinfo(np.int32).max:
        raise ValueError(
            f"page_shard_index={shard} is out of range: shard rows [{shard} * {num_rows}, "
            f"{shard + 1} * {num_rows}) must be non-negative int32 row numbers"
        )


def check_slice_data(
    tokens, slice_indices, caches, total_update_slices, *, page_size, validate, names=(NAMES,), page_shard_index=None
):
    """``dynamic_validate_inputs`` as ``validate`` asks: ``None`` — when the
    metadata is concrete and on the host; ``True`` — always (fetching device
    metadata); ``False`` — never. The pairs share the slices and the row
    count, so the first pair decides."""
    if validate is None:
        validate = not is_traced(slice_indices, total_update_slices) and (
            is_on_host(slice_indices) and is_on_host(total_update_slices)
        )
    if not validate:
        return
    if is_traced(slice_indices, total_update_slices):
        raise ValueError("validate=True needs concrete slice metadata, not values traced inside jit")
    dynamic_validate_inputs(
        tokens[0], np.asarray(slice_indices), caches[0], np.asarray(total_update_slices), page_size=page_size,
        names=names[0], page_shard_index=page_shard_index,
    )


def localize_slices(
    slice_indices,  # int[3, S]: dst rows of the whole cache
    *,
    num_rows: int,  # rows of this shard
    page_shard_index,  # int or i32[]: this shard's index
):  # -> i32[3, S]
    """Slices whose destinations are rows of the whole page-sharded cache, as
    slices of shard ``page_shard_index``, which holds rows ``[i * num_rows,
    (i + 1) * num_rows)``: each slice is clipped to those rows (its source
    shifted alike) and one that misses them gets length 0. EasyDeL 0.3 keeps a
    slice whole when its *first* row is local; clipping gives the same result
    for slices within a page and stays inside the shard for one that crosses
    into the next shard's pages. Jit-able; padding columns stay padding."""
    idx = slice_indices.astype(jnp.int32)  # i32[3, S]
    lo = jnp.asarray(page_shard_index, jnp.int32).reshape(()) * num_rows  # i32[]
    dst, src, length = idx  # i32[S] each
    start = jnp.clip(dst, lo, lo + num_rows)  # i32[S]
    end = jnp.clip(dst + length, lo, lo + num_rows)  # i32[S]
    return jnp.stack([start - lo, src + (start - dst), jnp.maximum(end - start, 0)])


def prepare(
    tokens, slice_indices, caches, total_update_slices, *, page_size, slices_per_processing_page=None,
    for_tpu_kernel=False, validate=None, page_shard_index=None, names=(NAMES,), vmem_limit_bytes=None,
    k_scale=None, v_scale=None,
):  # -> (int[3, S]: the slices to apply, f32[n, 2] scales per cache or None)
    """Steps 1-3 above; returns the slice indices the implementation applies
    and, for a quantized write, each cache's (even heads, odd heads) scales:
    one cache of interleaved heads takes ``(k_scale, v_scale)``, a K and a V
    cache take ``(k_scale, k_scale)`` and ``(v_scale, v_scale)``."""
    quantized = static_validate_pairs(
        tokens, slice_indices, caches, total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, for_tpu_kernel=for_tpu_kernel, names=names,
        vmem_limit_bytes=vmem_limit_bytes, k_scale=k_scale, v_scale=v_scale,
    )
    num_rows = cache_rows(np.shape(tokens[0]), np.shape(caches[0]), page_size=page_size, names=names[0])[0]
    check_page_shard_index(page_shard_index, num_rows)
    check_slice_data(
        tokens, slice_indices, caches, total_update_slices, page_size=page_size, validate=validate, names=names,
        page_shard_index=page_shard_index,
    )
    scales = scale_pairs(k_scale, v_scale, "interleaved" if len(tokens) == 1 else "separate") if quantized else None
    if page_shard_index is None:
        return slice_indices, scales
    return localize_slices(jnp.asarray(slice_indices), num_rows=num_rows, page_shard_index=page_shard_index), scales


__all__ = ["KV_NAMES", "check_slice_data", "localize_slices", "prepare", "static_validate_pairs", "tpu_config"]
