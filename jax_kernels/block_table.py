"""Block table → slice indices for ``kv_cache_update`` (JAX, jit-able)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ._utils import is_traced


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={value!r} must be a Python int")
    if value < minimum:
        raise ValueError(f"{name}={value} must be {'positive' if minimum == 1 else 'non-negative'}")


def page_entry_limit(page_size: int, num_pages: int | None = None) -> int:
    """The exclusive upper bound of a page-table entry a write uses: ``num_pages``
    when given, and in any case ``2**31 // page_size``, so that every row of the
    page (``entry * page_size + offset``) fits int32, the slice indices' dtype
    (a larger entry would wrap to another page's rows, not fail)."""
    limit = 2**31 // page_size
    return limit if num_pages is None else min(num_pages, limit)


def page_entry_bound(entry: int, page_size: int, num_pages: int | None = None) -> str:
    """What a refused page-table ``entry`` must be, in words, for its error."""
    limit = page_entry_limit(page_size, num_pages)
    if num_pages is not None and limit == num_pages:
        return f"in [0, {num_pages=})"
    if entry < 0:
        return "non-negative"
    return f"below 2**31 // {page_size=} = {limit}, so that its rows fit int32"


def max_num_slices_bound(max_num_reqs: int, max_num_tokens: int, page_size: int) -> int:
    """A ``max_num_slices`` that always suffices (vLLM's bound).

    ``min(2 * max_num_reqs + max_num_tokens // page_size, max_num_tokens)``,
    and a true upper bound: a request with ``n >= 1`` new tokens starting
    anywhere in a page touches at most ``(n + page_size - 2) // page_size + 1 <=
    n // page_size + 2`` pages; summing, ``sum(n_b // page_size) <=
    max_num_tokens // page_size``; and each slice holds at least one token.
    (Checked exhaustively for small sizes in ``tests/test_page_tables.py``.)
    """
    _check_int("max_num_reqs", max_num_reqs, minimum=0)
    _check_int("max_num_tokens", max_num_tokens, minimum=0)
    _check_int("page_size", page_size, minimum=1)
    return min(2 * max_num_reqs + max_num_tokens // page_size, max_num_tokens)


@functools.partial(jax.jit, static_argnames=("page_size", "max_num_slices"))
def _slice_indices_from_block_table(block_table, start_positions, num_new_tokens, *, page_size, max_num_slices):
    table = block_table.astype(jnp.int32)  # i32[B, pages_per_req]
    starts = start_positions.reshape(-1).astype(jnp.int32)  # i32[B]
    counts = num_new_tokens.reshape(-1).astype(jnp.int32)  # i32[B]
    num_reqs, pages_per_req = table.shape
    if num_reqs == 0:
        return jnp.zeros((3, max_num_slices), jnp.int32), jnp.zeros((1,), jnp.int32)
    first_page = starts // page_size  # i32[B]
    touched = jnp.where(counts > 0, (starts + counts - 1) // page_size - first_page + 1, 0)  # i32[B]
    slice_end = jnp.cumsum(touched)  # i32[B]: exclusive end of each request's slices
    if max_num_slices == 0:  # no room: the true count tells the update's validation
        return jnp.zeros((3, 0), jnp.int32), slice_end[-1:]
    token_start = jnp.cumsum(counts) - counts  # i32[B]: first row in new_kv_tokens
    j = jnp.arange(max_num_slices, dtype=jnp.int32)  # i32[S]
    req = jnp.minimum(jnp.sum(slice_end[None, :] <= j[:, None], axis=1), num_reqs - 1)  # i32[S]
    page_of_req = j - (slice_end[req] - touched[req])  # i32[S]
    logical_page = first_page[req] + page_of_req  # i32[S]
    pos = jnp.maximum(starts[req], logical_page * page_size)  # i32[S]
    end = jnp.minimum(starts[req] + counts[req], (logical_page + 1) * page_size)  # i32[S]
    physical = table[req, jnp.clip(logical_page, 0, pages_per_req - 1)]  # i32[S]
    live = j < slice_end[-1]
    indices = jnp.stack(
        [physical * page_size + pos % page_size, token_start[req] + pos - starts[req], end - pos]
    )  # i32[3, S]
    return jnp.where(live[None, :], indices, 0), slice_end[-1:]


def slice_indices_from_block_table(
    block_table,  # int[B, max_pages_per_req]
    start_positions,  # int[B]
    num_new_tokens,  # int[B]
    *,
    page_size: int,
    max_num_slices: int,
    num_pages: int | None = None,
):
    """Slice indices for a batch of requests whose pages a block table names.

    Request ``b``'s new tokens are rows ``[sum(num_new_tokens[:b]),
    sum(num_new_tokens[:b+1]))`` of ``new_kv_tokens``; they go to its logical
    positions ``start_positions[b], start_positions[b] + 1, ...``, and logical
    page ``p`` of request ``b`` is physical page ``block_table[b, p]``. One
    slice per (request, touched page) — a slice never crosses a page —,
    requests in order, then pages; the remaining columns are zero.

    Returns ``(slice_indices i32[3, max_num_slices], total_update_slices i32[1])``.
    Shapes are static, so it is jit-able. Use :func:`max_num_slices_bound` for
    ``max_num_slices``. With concrete inputs, needing more slices than
    ``max_num_slices``, negative inputs, or a touched page beyond the block
    table's width raise ``ValueError``, and so does a used block-table entry
    outside ``[0, num_pages)`` when ``num_pages`` (the cache's page count) is
    given, or at least ``2**31 // page_size`` in any case (:func:`page_entry_limit`:
    its rows would pass int32 and wrap to another page's); inside ``jit``
    nothing can raise, so
    ``total_update_slices`` then holds the true count (> ``max_num_slices``)
    and ``kv_cache_update``'s validation rejects it.
    """
    if page_size < 1:
        raise ValueError(f"{page_size=} must be positive")
    if max_num_slices < 0:
        raise ValueError(f"{max_num_slices=} must be non-negative")
    if np.ndim(block_table) != 2:
        raise ValueError(f"block_table must be [num_reqs, max_pages_per_req], got shape {np.shape(block_table)}")
    num_reqs = np.shape(block_table)[0]
    for name, x in (("start_positions", start_positions), ("num_new_tokens", num_new_tokens)):
        if np.shape(x) != (num_reqs,):
            raise ValueError(f"{name} must have shape ({num_reqs},) to match block_table, got {np.shape(x)}")
    for name, x in (("block_table", block_table), ("start_positions", start_positions), ("num_new_tokens", num_new_tokens)):
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        if not np.issubdtype(dtype, np.integer):
            raise TypeError(f"{name} must have an integer dtype, got {dtype}")
    if not is_traced(block_table, start_positions, num_new_tokens):
        _check_block_table_on_host(
            np.asarray(block_table), np.asarray(start_positions), np.asarray(num_new_tokens),
            page_size=page_size, max_num_slices=max_num_slices, num_pages=num_pages,
        )
    return _slice_indices_from_block_table(
        jnp.asarray(block_table), jnp.asarray(start_positions), jnp.asarray(num_new_tokens),
        page_size=page_size, max_num_slices=max_num_slices,
    )


def _check_block_table_on_host(table, starts, counts, *, page_size, max_num_slices, num_pages=None):
    for name, x in (("start_positions", starts), ("num_new_tokens", counts)):
        if (x < 0).any():
            b = int(np.argmax(x < 0))
            raise ValueError(f"{name}[{b}]={int(x[b])} must be non-negative")
    starts64, counts64 = starts.astype(np.int64), counts.astype(np.int64)
    live = counts64 > 0
    last_page = np.where(live, (starts64 + counts64 - 1) // page_size, -1)
    if live.any() and (last_page >= table.shape[1]).any():
        b = int(np.argmax(last_page >= table.shape[1]))
        raise ValueError(
            f"request {b} writes logical page {int(last_page[b])} but block_table has only "
            f"{table.shape[1]} pages per request (start_positions[{b}]={int(starts[b])}, "
            f"num_new_tokens[{b}]={int(counts[b])}, {page_size=})"
        )
    needed = int(np.sum(np.where(live, last_page - starts64 // page_size + 1, 0)))
    if needed > max_num_slices:
        raise ValueError(f"the batch needs {needed} slices but {max_num_slices=}; see max_num_slices_bound")
    limit = page_entry_limit(page_size, num_pages)
    for b in np.flatnonzero(live):
        used = table[b, starts64[b] // page_size : last_page[b] + 1]
        bad = (used < 0) | (used >= limit)
        if bad.any():
            p = int(starts64[b] // page_size + np.argmax(bad))
            raise ValueError(
                f"block_table[{b}, {p}]={int(table[b, p])} is not a page of the cache: it must be "
                f"{page_entry_bound(int(table[b, p]), page_size, num_pages)}"
            )
