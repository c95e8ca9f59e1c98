"""Pure-JAX implementations of the paged KV cache update (any backend).

* :func:`kv_cache_update_jax` — EasyDeL's ``lax.scan`` fallback, kept for its
  contract, with its end-of-cache bug fixed (see ``_scan_update_one_slice``).
* :func:`kv_cache_update_scatter` — the fast fallback: one scatter of exactly
  the rows the slices name (plus a gather when sources overlap).
  ``kv_cache_update`` uses it everywhere but TPU.

Both take the same arguments as the kernel and return a new cache; under
``jax.jit(..., donate_argnums=...)`` XLA updates the donated cache in place.
Neither validates data: callers run ``dynamic_validate_inputs`` on the host.
Padding columns (index >= ``total_update_slices[0]``) are never applied, and a
``total_update_slices`` above ``num_slices`` is treated as ``num_slices``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._utils import cdiv
from .validation import static_validate_inputs


def _num_valid_slices(total_update_slices, num_slices: int):
    # i32[]: the count of slices to apply, clipped to what exists.
    return jnp.clip(jnp.asarray(total_update_slices).reshape(-1)[0].astype(jnp.int32), 0, num_slices)


# --------------------------------------------------------------------------- scan


def _scan_update_one_slice(cache, padded_new, dst, src, length, *, window: int):
    """Write ``padded_new[src + window : ... + length]`` to ``cache[dst : dst + length]``.

    ``dynamic_slice`` clamps its start so the window stays inside the array;
    EasyDeL's fallback therefore wrote a slice that starts part-way into the
    last page onto the wrong rows. Here the window start is clamped explicitly
    and the mask and the source offset are shifted by the same amount, so every
    offset of every page lands right.
    """
    num_rows, heads, head_dim = cache.shape
    w0 = jnp.clip(dst, 0, num_rows - window)  # i32[]: where the window really starts
    shift = dst - w0  # i32[]: 0, except near the end of the cache
    # padded_new has `window` zero rows on both sides, so src - shift + window >= 0.
    new_win = jax.lax.dynamic_slice(padded_new, (src - shift + window, 0, 0), (window, heads, head_dim))
    cur_win = jax.lax.dynamic_slice(cache, (w0, 0, 0), (window, heads, head_dim))
    rows = jnp.arange(window, dtype=jnp.int32)[:, None, None]  # i32[window, 1, 1]
    mask = (rows >= shift) & (rows < shift + length)
    return jax.lax.dynamic_update_slice(cache, jnp.where(mask, new_win, cur_win), (w0, 0, 0))


@functools.partial(jax.jit, static_argnames=("page_size",))
def _kv_cache_update_scan(new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, *, page_size):
    num_rows = kv_cache_pages.shape[0]
    if num_rows == 0:
        return kv_cache_pages
    window = min(page_size, num_rows)
    idx = slice_indices.astype(jnp.int32)  # i32[3, S]
    num_valid = _num_valid_slices(total_update_slices, idx.shape[1])
    # [T + 2*window, H, D]: zero rows around the tokens keep every window in range.
    padded_new = jnp.pad(new_kv_tokens, [(window, window), (0, 0), (0, 0)])

    def step(cache, s):
        # Padding slices (s >= num_valid) get length 0: the window is written
        # back unchanged. (A lax.cond here would make XLA copy the cache.)
        length = jnp.where(s < num_valid, idx[2, s], 0)
        return _scan_update_one_slice(cache, padded_new, idx[0, s], idx[1, s], length, window=window), None

    slice_ids = jnp.arange(idx.shape[1], dtype=jnp.int32)  # i32[S]
    return jax.lax.scan(step, kv_cache_pages, slice_ids)[0]


def kv_cache_update_jax(
    new_kv_tokens,  # [T, H, D]
    slice_indices,  # int[3, S]
    kv_cache_pages,  # [P * page_size, H, D]
    total_update_slices,  # int[1]
    *,
    page_size: int = 32,
):
    """The ``lax.scan`` fallback: one masked page-sized window update per slice.

    Same contract as :func:`jax_kernels.kv_cache_update`. Cost grows with the
    number of slices (padding included) times ``page_size``; prefer
    :func:`kv_cache_update_scatter`, which ``kv_cache_update`` uses off TPU.
    """
    static_validate_inputs(
        new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, page_size=page_size
    )
    return _kv_cache_update_scan(
        new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, page_size=page_size
    )


# ------------------------------------------------------------------------ scatter


def _packed_rows(idx, lengths, first, count: int, num_rows: int):
    """Rows ``first .. first + count - 1`` of the valid slices packed end to end:
    ``(dst i32[count], src i32[count])``; rows past the end get ``dst == num_rows``."""
    ends = jnp.cumsum(lengths)  # i32[S]: exclusive end of each slice in packed order
    k = first + jnp.arange(count, dtype=jnp.int32)  # i32[count]
    s = jnp.minimum(jnp.searchsorted(ends, k, side="right"), idx.shape[1] - 1)  # i32[count]
    offset = k - (ends[s] - lengths[s])  # i32[count]: row within its slice
    live = k < ends[-1]
    return jnp.where(live, idx[0, s] + offset, num_rows), jnp.where(live, idx[1, s] + offset, 0)


@functools.partial(jax.jit, static_argnames=("page_size",))
def _kv_cache_update_scatter(new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, *, page_size):
    del page_size  # lengths are validated against it; the scatter does not need it
    num_rows = kv_cache_pages.shape[0]
    num_tokens = new_kv_tokens.shape[0]
    idx = slice_indices.astype(jnp.int32)  # i32[3, S]
    num_slices = idx.shape[1]
    if num_slices == 0 or num_rows == 0 or num_tokens == 0:
        return kv_cache_pages  # nothing can be written (a valid slice needs src + len <= T)
    num_valid = _num_valid_slices(total_update_slices, num_slices)
    lengths = jnp.where(jnp.arange(num_slices) < num_valid, idx[2], 0)  # i32[S]
    total_rows = jnp.sum(lengths)  # i32[]

    # Pass 1: send every token row to the cache row that names it, scattering
    # straight from new_kv_tokens (no gather of the sources: measured 3x
    # faster for a decode step on XLA:CPU). It covers the first num_tokens
    # packed rows, which is all of them unless sources overlap.
    dst, src = _packed_rows(idx, lengths, 0, num_tokens, num_rows)  # i32[T] each
    live = jnp.arange(num_tokens, dtype=jnp.int32) < total_rows  # bool[T]
    src = jnp.where(live, src, num_tokens)
    dst_of_token = jnp.full((num_tokens,), num_rows, jnp.int32).at[src].set(dst, mode="drop")  # i32[T]
    # A token row two slices read keeps one destination; the others are redone below.
    lost = live & (dst_of_token[jnp.minimum(src, num_tokens - 1)] != dst)  # bool[T]
    cache = kv_cache_pages.at[dst_of_token].set(new_kv_tokens, mode="drop")

    # Pass 2, only when sources overlap (a loop that runs zero times otherwise;
    # a lax.cond would make XLA copy the cache): every packed row, gathered,
    # num_tokens rows at a time. Rows pass 1 wrote are written again with the
    # same values.
    def chunk(c, cache):
        dst, src = _packed_rows(idx, lengths, c * num_tokens, num_tokens, num_rows)
        # dst == num_rows marks padding rows: mode="drop" skips them.
        return cache.at[dst].set(new_kv_tokens[src], mode="drop")

    redo = (total_rows > num_tokens) | jnp.any(lost)
    return jax.lax.fori_loop(0, jnp.where(redo, cdiv(total_rows, num_tokens), 0), chunk, cache)


def kv_cache_update_scatter(
    new_kv_tokens,  # [T, H, D]
    slice_indices,  # int[3, S]
    kv_cache_pages,  # [P * page_size, H, D]
    total_update_slices,  # int[1]
    *,
    page_size: int = 32,
):
    """The fast fallback: scatter the token rows into the cache rows that name them.

    Same contract as :func:`jax_kernels.kv_cache_update`. It moves only the
    rows the valid slices name: one scatter straight from ``new_kv_tokens``
    when no token row is read by two slices (block-table layouts), else a
    gather and scatter of the packed rows, ``num_tokens`` at a time. Its cost
    does not depend on the cache size when the cache is donated.
    """
    static_validate_inputs(
        new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, page_size=page_size
    )
    return _kv_cache_update_scatter(
        new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, page_size=page_size
    )
