"""tpu-inference's ragged-paged-attention metadata → slice indices (JAX, jit-able).

tpu-inference (vLLM's TPU backend) hands its ragged paged attention kernel
(``kernels/ragged_paged_attention``, v3) these arrays, built by its runner:

* ``page_indices`` ``i32[max_num_seqs * pages_per_seq]``: the block tables,
  flattened; logical page ``p`` of request ``i`` is physical page
  ``page_indices[i * pages_per_seq + p]`` (rows of unused requests are 0);
* ``cu_q_lens`` ``i32[max_num_seqs + 1]``: request ``i``'s new tokens are
  query rows ``[cu_q_lens[i], cu_q_lens[i + 1])``; ``cu_q_lens[0] = 0`` and
  past the last request the runner repeats ``cu_q_lens[num_seqs]``;
* ``kv_lens`` ``i32[max_num_seqs]``: the sequence length *after* this step
  (``num_computed_tokens + q_len``), 0 past the last request; the new tokens
  sit at positions ``kv_lens[i] - q_len ... kv_lens[i] - 1`` (the kernel writes
  them there: ``kv_cache[indices].at[kv_len - q_len:kv_len].set(new_kv[q_start:q_end])``);
* the number of requests: v2's ``num_seqs`` ``i32[1]``; v3 passes
  ``distribution = (decode_end, prefill_end, num_seqs)`` instead, so give
  ``distribution[2:]`` as ``num_seqs``.

This is a block table with ``start = kv_len - q_len`` and ``count = q_len``,
so the slice math is ``block_table``'s; this module maps the arguments and
checks them under their own names.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ._utils import is_on_host
from .block_table import _check_int, _slice_indices_from_block_table, page_entry_bound, page_entry_limit
from .slot_mapping import is_integer_dtype

_INT32_MAX = 2**31 - 1
_NAMES = ("page_indices", "cu_q_lens", "kv_lens", "num_seqs")


@functools.partial(jax.jit, static_argnames=("page_size", "pages_per_seq", "max_num_slices"))
def _slice_indices_from_ragged_metadata(
    page_indices, cu_q_lens, kv_lens, num_seqs, *, page_size, pages_per_seq, max_num_slices
):
    table = page_indices.astype(jnp.int32).reshape(-1, pages_per_seq)  # i32[N, pages_per_seq]
    cu = cu_q_lens.astype(jnp.int32)  # i32[N + 1]
    live = jnp.arange(table.shape[0], dtype=jnp.int32) < num_seqs.astype(jnp.int32)[0]  # bool[N]
    q_lens = jnp.where(live, cu[1:] - cu[:-1], 0)  # i32[N]
    starts = jnp.where(live, kv_lens.astype(jnp.int32) - q_lens, 0)  # i32[N]
    indices, total = _slice_indices_from_block_table(
        table, starts, q_lens, page_size=page_size, max_num_slices=max_num_slices
    )  # i32[3, S], i32[1]; sources count from 0
    used = jnp.arange(max_num_slices, dtype=jnp.int32) < total  # bool[S]
    offset = jnp.where(used, cu[0], 0)  # i32[S]: the first request's query row
    return indices.at[1].add(offset), total


def slice_indices_from_ragged_metadata(
    page_indices,  # int[max_num_seqs * pages_per_seq]
    cu_q_lens,  # int[max_num_seqs + 1]
    kv_lens,  # int[max_num_seqs]
    num_seqs,  # int[1]
    *,
    page_size: int,
    pages_per_seq: int,
    max_num_slices: int,
    num_pages: int | None = None,
):
    """Slice indices for writing the new K/V rows of tpu-inference's ragged batch.

    Request ``i < num_seqs[0]`` owns rows ``[cu_q_lens[i], cu_q_lens[i+1])`` of
    ``new_kv_tokens``; with ``q_len = cu_q_lens[i+1] - cu_q_lens[i]`` they go to
    its positions ``kv_lens[i] - q_len ... kv_lens[i] - 1``, and its logical page
    ``p`` is physical page ``page_indices[i * pages_per_seq + p]``. Requests at
    ``i >= num_seqs[0]`` are padding, whatever their entries hold. One slice per
    (request, touched page), requests in order, then pages; the remaining
    columns are zero. A request with ``q_len = 0`` writes nothing.

    Returns ``(slice_indices i32[3, max_num_slices], total_update_slices i32[1])``;
    static shapes, jit-able. ``max_num_slices_bound(max_num_seqs, num_tokens,
    page_size)`` always suffices.

    With concrete inputs on the host (numpy, CPU arrays) it raises ``ValueError``
    naming the argument for ``num_seqs[0]`` outside ``[0, max_num_seqs]``,
    ``cu_q_lens`` negative or decreasing, a ``kv_lens[i]`` below its request's
    ``q_len``, a write past ``pages_per_seq`` pages, a used ``page_indices``
    entry negative, ``>= num_pages`` (with ``num_pages``, the cache's page
    count) or ``>= 2**31 // page_size`` (its rows would pass int32:
    ``block_table.page_entry_limit``), and more slices needed than ``max_num_slices``. Shapes and
    dtypes are checked always. Inside ``jit`` nothing can raise:
    ``total_update_slices`` holds the true count, so ``kv_cache_update``'s
    validation rejects a batch that did not fit.
    """
    _check_int("page_size", page_size, minimum=1)
    _check_int("pages_per_seq", pages_per_seq, minimum=1)
    _check_int("max_num_slices", max_num_slices, minimum=0)
    if num_pages is not None:
        _check_int("num_pages", num_pages, minimum=1)
    args = (page_indices, cu_q_lens, kv_lens, num_seqs)
    check_ragged_metadata_static(
        [np.shape(x) for x in args],
        [x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype for x in args],
        pages_per_seq=pages_per_seq,
    )
    on_host = all(is_on_host(x) for x in args)
    if on_host:
        check_ragged_metadata_values(
            *(np.asarray(x) for x in args), page_size=page_size, pages_per_seq=pages_per_seq, num_pages=num_pages
        )
    indices, total = _slice_indices_from_ragged_metadata(
        *(jnp.asarray(x) for x in args),
        page_size=page_size, pages_per_seq=pages_per_seq, max_num_slices=max_num_slices,
    )
    if on_host:
        check_num_slices(int(total[0]), max_num_slices)
    return indices, total


def check_ragged_metadata_static(shapes, dtypes, *, pages_per_seq: int) -> None:
    """Ranks, shapes and dtypes (numpy, JAX or torch dtypes; shared with the torch
    front end); raises naming the argument."""
    for name, dtype in zip(_NAMES, dtypes):
        if not is_integer_dtype(dtype):
            raise TypeError(f"{name} must have an integer dtype, got {dtype}")
    page_shape, cu_shape, kv_shape, n_shape = (tuple(s) for s in shapes)
    if len(kv_shape) != 1:
        raise ValueError(f"kv_lens must be [max_num_seqs], got shape {kv_shape}")
    max_num_seqs = kv_shape[0]
    if cu_shape != (max_num_seqs + 1,):
        raise ValueError(
            f"cu_q_lens must be [max_num_seqs + 1] = ({max_num_seqs + 1},) (kv_lens has {max_num_seqs} "
            f"entries), got shape {cu_shape}"
        )
    if page_shape != (max_num_seqs * pages_per_seq,):
        raise ValueError(
            f"page_indices must be flat [max_num_seqs * pages_per_seq] = ({max_num_seqs * pages_per_seq},) "
            f"({max_num_seqs=}, {pages_per_seq=}; flatten a [max_num_seqs, pages_per_seq] block table), "
            f"got shape {page_shape}"
        )
    if n_shape != (1,):
        raise ValueError(f"num_seqs must hold one integer, shape (1,), got shape {n_shape}")


def check_ragged_metadata_values(page_indices, cu_q_lens, kv_lens, num_seqs, *, page_size, pages_per_seq, num_pages):
    """Host checks of the values (numpy arrays), shared with the torch front end."""
    max_num_seqs = kv_lens.shape[0]
    n = int(num_seqs[0])
    if not 0 <= n <= max_num_seqs:
        raise ValueError(f"num_seqs[0]={n} must be in [0, {max_num_seqs}] (kv_lens has {max_num_seqs} entries)")
    cu = cu_q_lens[: n + 1].astype(np.int64)  # i64[n + 1]
    kv = kv_lens[:n].astype(np.int64)  # i64[n]
    if n == 0:
        return
    if cu[0] < 0:
        raise ValueError(f"cu_q_lens[0]={int(cu[0])} must be non-negative")
    q = cu[1:] - cu[:-1]  # i64[n]
    if (q < 0).any():
        i = int(np.argmax(q < 0))
        raise ValueError(
            f"cu_q_lens must not decrease: cu_q_lens[{i + 1}]={int(cu[i + 1])} < cu_q_lens[{i}]={int(cu[i])}"
        )
    if cu[-1] > _INT32_MAX or (kv > _INT32_MAX).any():
        raise ValueError("cu_q_lens and kv_lens must stay below 2**31 (int32 rows and positions)")
    if (kv < q).any():
        i = int(np.argmax(kv < q))
        raise ValueError(
            f"kv_lens[{i}]={int(kv[i])} is smaller than request {i}'s {int(q[i])} new tokens "
            f"(cu_q_lens[{i + 1}] - cu_q_lens[{i}]); kv_lens counts the new tokens too"
        )
    writes = q > 0  # bool[n]
    last_page = (kv - 1) // page_size  # i64[n]
    if (writes & (last_page >= pages_per_seq)).any():
        i = int(np.argmax(writes & (last_page >= pages_per_seq)))
        raise ValueError(
            f"request {i} writes position {int(kv[i]) - 1} (kv_lens[{i}]={int(kv[i])}), logical page "
            f"{int(last_page[i])}, but {pages_per_seq=} ({page_size=})"
        )
    first_page = (kv - q) // page_size  # i64[n]
    table = page_indices.astype(np.int64).reshape(max_num_seqs, pages_per_seq)[:n]  # i64[n, pages_per_seq]
    col = np.arange(pages_per_seq)  # i64[pages_per_seq]
    used = writes[:, None] & (col >= first_page[:, None]) & (col <= last_page[:, None])  # bool[n, pages_per_seq]
    bad = used & ((table < 0) | (table >= page_entry_limit(page_size, num_pages)))  # bool[n, pages_per_seq]
    if bad.any():
        i, p = divmod(int(np.argmax(bad.reshape(-1))), pages_per_seq)
        raise ValueError(
            f"page_indices[{i * pages_per_seq + p}]={int(table[i, p])} (request {i}, logical page {p}) "
            f"must be {page_entry_bound(int(table[i, p]), page_size, num_pages)}"
        )


def check_num_slices(needed: int, max_num_slices: int) -> None:
    if needed > max_num_slices:
        raise ValueError(
            f"the batch needs {needed} slices but {max_num_slices=}; "
            f"max_num_slices_bound(max_num_seqs, num_tokens, page_size) gives a value that always suffices"
        )
