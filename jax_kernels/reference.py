"""Plain numpy reference implementations: the single source of truth.

Tests and benchmarks compare every implementation (the Pallas kernel in the
TPU interpreter, the JAX fallbacks, the torch op on every device) against the
loops in this module. They are written to be obviously right, not fast.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np


def quantize_reference(
    x,  # [N, *row] floating, heads k0, v0, k1, v1, ... (packed rows: heads h' * pack + p)
    k_scale,
    v_scale,
    dtype,  # float8_e4m3fn, float8_e5m2 or int8 (numpy / ml_dtypes)
) -> np.ndarray:
    """The quantized rows, in numpy and ml_dtypes (see ``kv_cache_update/quantize.py``):
    ``q = float32(x) / float32(scale)``, even heads by ``k_scale``, odd by
    ``v_scale``; float8: clip to the finite range, cast (round to nearest
    even; any NaN → the canonical quiet NaN); int8: round half to even, clip
    to [-128, 127], NaN → 0."""
    dt = np.dtype(dtype)
    xf = np.asarray(x).astype(np.float32)
    heads = xf.reshape(xf.shape[0], -1, xf.shape[-1])  # [N, heads, D]: a view of xf
    scale = np.where(np.arange(heads.shape[1]) % 2 == 1, np.float32(v_scale), np.float32(k_scale)).astype(np.float32)
    q = heads / scale[None, :, None]  # float32 division, correctly rounded
    if dt == np.int8:
        q = np.where(np.isnan(q), np.float32(0), np.clip(np.round(q), -128, 127))
    else:
        finite = float(ml_dtypes.finfo(dt).max)
        q = np.where(np.isnan(q), np.float32(np.nan), np.clip(q, -finite, finite))  # canonical NaN
    return q.astype(dt).reshape(xf.shape)


def kv_cache_update_reference(
    new_kv_tokens,  # [T, *row]
    slice_indices,  # int[3, S]
    kv_cache_pages,  # [R, *row] or [P, page_size, *row]
    total_update_slices,  # int[1]
    *,
    k_scale=None,
    v_scale=None,
) -> np.ndarray:
    """Return a copy of ``kv_cache_pages`` with the first ``total_update_slices[0]``
    slices applied, in order: ``rows[d:d+n] = new_kv_tokens[s:s+n]`` for each
    column ``(d, s, n)`` of ``slice_indices``, where ``rows`` is the cache as
    ``[R, *row]``, ``row = new_kv_tokens.shape[1:]`` (any layout: flat, paged,
    packed). When the cache's dtype differs from the tokens', the rows are
    quantized first (:func:`quantize_reference`, ``k_scale``/``v_scale``).

    Inputs may be numpy arrays or anything ``np.asarray`` accepts (JAX arrays,
    CPU torch tensors of numpy-representable dtypes). The input is not modified.
    """
    new = np.asarray(new_kv_tokens)
    idx = np.asarray(slice_indices)
    out = np.array(kv_cache_pages, copy=True)
    if new.dtype != out.dtype:
        new = quantize_reference(new, k_scale, v_scale, out.dtype)
    rows = out.reshape(-1, *new.shape[1:])  # a view of out: [R, *row]
    total = int(np.asarray(total_update_slices).reshape(-1)[0])
    for s in range(total):
        dst, src, n = (int(v) for v in idx[:, s])
        rows[dst : dst + n] = new[src : src + n]
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


def _columns_to_slices(columns, max_num_slices: int) -> tuple[np.ndarray, np.ndarray]:
    if len(columns) > max_num_slices:
        raise ValueError(f"the batch needs {len(columns)} slices but {max_num_slices=}")
    out = np.zeros((3, max_num_slices), np.int32)
    for i, col in enumerate(columns):
        out[:, i] = col
    return out, np.array([len(columns)], np.int32)


def slice_indices_from_slot_mapping_reference(
    slot_mapping,  # int[T]
    *,
    page_size: int,
    max_num_slices: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The slot mapping → slice indices conversion, one Python loop.

    Token ``t`` goes to cache row ``slot_mapping[t]``; ``-1`` is padding and is
    skipped. A token joins the previous token's slice when that token is real,
    its row is the next one, and the row does not start a page; otherwise it
    starts a slice ``(slot_mapping[t], t, 1)``. Returns ``(int32[3,
    max_num_slices], int32[1])``, remaining columns zero, and raises
    ``ValueError`` when more than ``max_num_slices`` slices are needed.
    """
    slots = [int(s) for s in np.asarray(slot_mapping).reshape(-1)]
    columns = []  # [dst, src, len] lists
    for t, slot in enumerate(slots):
        if slot == -1:
            continue
        if t > 0 and slots[t - 1] != -1 and slot == slots[t - 1] + 1 and slot % page_size != 0:
            columns[-1][2] += 1
        else:
            columns.append([slot, t, 1])
    return _columns_to_slices(columns, max_num_slices)


def slice_indices_from_ragged_metadata_reference(
    page_indices,  # int[max_num_seqs * pages_per_seq]
    cu_q_lens,  # int[max_num_seqs + 1]
    kv_lens,  # int[max_num_seqs]
    num_seqs,  # int[1]
    *,
    page_size: int,
    pages_per_seq: int,
    max_num_slices: int,
) -> tuple[np.ndarray, np.ndarray]:
    """tpu-inference's ragged metadata → slice indices, token by token.

    Request ``i < num_seqs[0]`` owns rows ``cu_q_lens[i] .. cu_q_lens[i+1] - 1``
    of ``new_kv_tokens``; with ``q_len`` of them, its ``k``-th new token sits at
    position ``kv_lens[i] - q_len + k``, in logical page ``position //
    page_size``, which is physical page ``page_indices[i * pages_per_seq +
    page]``. A slice starts at a request's first token and at every page
    start; the others extend it. Returns ``(int32[3, max_num_slices],
    int32[1])``, remaining columns zero; raises ``ValueError`` when more than
    ``max_num_slices`` slices are needed.
    """
    pages = np.asarray(page_indices).reshape(-1)
    cu = np.asarray(cu_q_lens).reshape(-1)
    kv = np.asarray(kv_lens).reshape(-1)
    columns = []  # [dst, src, len] lists
    for i in range(int(np.asarray(num_seqs).reshape(-1)[0])):
        q_len = int(cu[i + 1]) - int(cu[i])
        for k in range(q_len):
            pos = int(kv[i]) - q_len + k
            row = int(pages[i * pages_per_seq + pos // page_size]) * page_size + pos % page_size
            if k > 0 and pos % page_size != 0:
                columns[-1][2] += 1
            else:
                columns.append([row, int(cu[i]) + k, 1])
    return _columns_to_slices(columns, max_num_slices)
