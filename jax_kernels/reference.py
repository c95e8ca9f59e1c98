"""Plain numpy reference implementations: the single source of truth.

Tests and benchmarks compare every implementation (the Pallas kernel in the
TPU interpreter, the JAX fallbacks, the torch op on every device) against the
loops in this module. They are written to be obviously right, not fast.
"""

from __future__ import annotations

import numpy as np


def kv_cache_update_reference(
    new_kv_tokens,  # [T, H, D]
    slice_indices,  # int[3, S]
    kv_cache_pages,  # [R, H, D]
    total_update_slices,  # int[1]
) -> np.ndarray:
    """Return a copy of ``kv_cache_pages`` with the first ``total_update_slices[0]``
    slices applied, in order: ``cache[d:d+n] = new_kv_tokens[s:s+n]`` for each
    column ``(d, s, n)`` of ``slice_indices``.

    Inputs may be numpy arrays or anything ``np.asarray`` accepts (JAX arrays,
    CPU torch tensors of numpy-representable dtypes). The input is not modified.
    """
    new = np.asarray(new_kv_tokens)
    idx = np.asarray(slice_indices)
    out = np.array(kv_cache_pages, copy=True)
    total = int(np.asarray(total_update_slices).reshape(-1)[0])
    for s in range(total):
        dst, src, n = (int(v) for v in idx[:, s])
        out[dst : dst + n] = new[src : src + n]
    return out


def slice_indices_from_block_table_reference(
    block_table,  # int[B, max_pages_per_req]
    start_positions,  # int[B]
    num_new_tokens,  # int[B]
    *,
    page_size: int,
    max_num_slices: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The block table → slice indices conversion, one Python loop.

    Request ``b`` owns rows ``[sum(num_new_tokens[:b]), sum(num_new_tokens[:b+1]))``
    of ``new_kv_tokens``; they go to its logical positions
    ``start_positions[b], start_positions[b] + 1, ...``. Logical page ``p`` of
    request ``b`` is physical page ``block_table[b, p]``. One slice per
    (request, touched page), requests in order, pages in order; the remaining
    columns are zero. Returns ``(int32[3, max_num_slices], int32[1])`` and
    raises ``ValueError`` when more than ``max_num_slices`` slices are needed.
    """
    table = np.asarray(block_table)
    starts = np.asarray(start_positions).reshape(-1)
    counts = np.asarray(num_new_tokens).reshape(-1)
    columns = []
    src = 0
    for b in range(len(counts)):
        pos, end = int(starts[b]), int(starts[b]) + int(counts[b])
        while pos < end:
            page = pos // page_size
            run_end = min(end, (page + 1) * page_size)
            dst = int(table[b, page]) * page_size + pos % page_size
            columns.append((dst, src, run_end - pos))
            src += run_end - pos
            pos = run_end
    if len(columns) > max_num_slices:
        raise ValueError(
            f"the batch needs {len(columns)} slices but {max_num_slices=}"
        )
    out = np.zeros((3, max_num_slices), np.int32)
    for i, col in enumerate(columns):
        out[:, i] = col
    return out, np.array([len(columns)], np.int32)
