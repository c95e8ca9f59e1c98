"""Input validation for ``kv_cache_update``.

Two kinds of checks, kept apart:

* :func:`static_validate_inputs` looks only at shapes, dtypes and static
  configuration. It runs at trace time on every path, tracers included.
* :func:`dynamic_validate_inputs` looks at the *values* of the slice metadata.
  It needs the metadata on the host and runs before any data moves, so a
  rejected call never touches the cache.

Every error names the argument and the offending value.
"""

from __future__ import annotations

import numpy as np

from .quantize import quantizes
from .tpu_config import kernel_config, tpu_kernel_config, vmem_buffers

#: The argument names of ``kv_cache_update``, in order; callers with other
#: names (the torch op's ``kv_cache``, ``kv_cache_update_kv``'s ``key``/``k_cache``)
#: pass their own so that errors name what *they* were given.
NAMES = ("new_kv_tokens", "slice_indices", "kv_cache_pages", "total_update_slices")


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(x))


def _dtype(x) -> np.dtype:
    dt = getattr(x, "dtype", None)
    return np.dtype(dt) if dt is not None else np.asarray(x).dtype


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={value!r} must be a Python int")
    if value < 1:
        raise ValueError(f"{name}={value} must be positive")


def cache_rows(new_shape, cache_shape, *, page_size: int, names=NAMES) -> tuple[int, tuple[int, ...]]:
    """``(num_rows, row)``: how a cache of ``cache_shape`` holds rows of the
    tokens' per-row shape ``row = new_shape[1:]``, or a ValueError naming the
    argument. Rows are ``[H, D]`` (combined heads, separate K or V) or
    ``[H', pack, D']`` (packed); the cache is flat ``[R, *row]`` or paged
    ``[P, page_size, *row]``."""
    tok_name, _, cache_name, _ = names
    if len(new_shape) not in (3, 4):
        raise ValueError(
            f"{tok_name} must be [num_tokens, heads, head_dim] or packed [num_tokens, heads // pack, "
            f"pack, head_dim], got shape {new_shape}"
        )
    row = new_shape[1:]
    kind = "" if len(row) == 2 else "packed "
    if len(cache_shape) not in (len(row) + 1, len(row) + 2):
        raise ValueError(
            f"{cache_name} must be {kind}flat [num_pages * page_size, *{row}] or {kind}paged "
            f"[num_pages, page_size, *{row}] to hold rows of {tok_name} (shape {new_shape}), "
            f"got shape {cache_shape}"
        )
    if cache_shape[len(cache_shape) - len(row):] != row:
        raise ValueError(
            f"{tok_name} rows {row} do not match {cache_name} rows "
            f"{cache_shape[len(cache_shape) - len(row):]} "
            f"({tok_name}.shape={new_shape}, {cache_name}.shape={cache_shape})"
        )
    if len(cache_shape) == len(row) + 2:
        if cache_shape[1] != page_size:
            raise ValueError(f"paged {cache_name}.shape[1]={cache_shape[1]} must equal {page_size=}")
        num_rows = cache_shape[0] * page_size
    elif cache_shape[0] % page_size:
        raise ValueError(f"{cache_name}.shape[0]={cache_shape[0]} is not a multiple of {page_size=}")
    else:
        num_rows = cache_shape[0]
    for name, count in ((cache_name, num_rows), (tok_name, new_shape[0])):
        if count > INT32_MAX:
            raise ValueError(
                f"{name} has {count} rows; rows are indexed with int32, so at most {INT32_MAX} "
                f"(shard a larger cache over its pages: page_shard_index / kv_cache_update_sharded)"
            )
    return num_rows, row


INT32_MAX = 2**31 - 1


def static_validate_inputs(
    new_kv_tokens,  # [T, *row]: row [H, D] or packed [H', pack, D']
    slice_indices,  # int[3, S]
    kv_cache_pages,  # [R, *row] or [P, page_size, *row]
    total_update_slices,  # int[1]
    *,
    page_size: int,
    slices_per_processing_page: int | None = None,
    for_tpu_kernel: bool = False,
    names: tuple[str, str, str, str] = NAMES,
    k_scale=None,
    v_scale=None,
) -> None:
    """Check ranks, shapes, dtypes and static config. Raises ValueError/TypeError.

    The dtypes are equal, or the write quantizes (``quantize.quantizes``: an
    8-bit cache from wider rows, both scales given and, when concrete,
    positive and finite).

    The cache holds rows of the tokens' per-row shape (see :func:`cache_rows`);
    a packed row ``[H', pack, D']`` must have ``pack == 32 // bits(dtype)``.
    ``for_tpu_kernel=True`` adds the Pallas kernel's own rules
    (``head_dim % 128 == 0``, the VMEM staging budget and SMEM: see
    ``tpu_config``). ``names``: the
    argument names errors use, in this order.
    """
    tok_name, idx_name, cache_name, total_name = names
    _check_positive_int("page_size", page_size)
    if slices_per_processing_page is not None:
        _check_positive_int("slices_per_processing_page", slices_per_processing_page)

    new_shape = _shape(new_kv_tokens)
    idx_shape = _shape(slice_indices)
    total_shape = _shape(total_update_slices)
    _, row = cache_rows(new_shape, _shape(kv_cache_pages), page_size=page_size, names=names)
    if len(idx_shape) != 2 or idx_shape[0] != 3:
        raise ValueError(f"{idx_name} must be [3, num_slices], got shape {idx_shape}")
    if int(np.prod(total_shape, dtype=np.int64)) != 1 or len(total_shape) > 1:
        raise ValueError(f"{total_name} must hold one integer (shape [1]), got shape {total_shape}")

    for name, x in ((idx_name, slice_indices), (total_name, total_update_slices)):
        if not np.issubdtype(_dtype(x), np.integer):
            raise TypeError(f"{name} must have an integer dtype, got {_dtype(x)}")
    quantizes(_dtype(new_kv_tokens), _dtype(kv_cache_pages), k_scale, v_scale, names=(tok_name, cache_name))
    if len(row) == 3:
        bits = _dtype(kv_cache_pages).itemsize * 8
        if bits > 32 or row[1] != 32 // bits:
            raise ValueError(
                f"{cache_name} is packed [.., heads // pack, pack={row[1]}, head_dim] but a "
                f"{_dtype(kv_cache_pages)} cache packs {32 // bits if bits <= 32 else 'no'} values per "
                f"32-bit word (shape {_shape(kv_cache_pages)}); see jax_kernels.kv_cache_shape"
            )

    if for_tpu_kernel:
        problem = kernel_config(
            vmem_buffers([(row, _dtype(new_kv_tokens), _dtype(kv_cache_pages))]), page_size=page_size,
            num_slices=idx_shape[1],
            slices_per_processing_page=slices_per_processing_page,
        ).problem
        if problem:
            raise ValueError(problem)


def tpu_kernel_problem(
    cache_shape, dtype, *, page_size: int, slices_per_processing_page: int | None = None, num_slices: int | None = None,
    row_ndim: int | None = None,
) -> str | None:
    """Why the Pallas kernel cannot take a cache of this shape/dtype, or None:
    ``tpu_kernel_config(...).problem`` (``num_slices`` defaults to
    ``slices_per_processing_page``, or 64)."""
    if num_slices is None:
        num_slices = slices_per_processing_page or 64
    return tpu_kernel_config(
        cache_shape, dtype, page_size=page_size, num_slices=num_slices,
        slices_per_processing_page=slices_per_processing_page, row_ndim=row_ndim,
    ).problem


def dynamic_validate_inputs(
    new_kv_tokens,  # [T, *row] (only its shape is read)
    slice_indices,  # int[3, S], on the host
    kv_cache_pages,  # [R, *row] or [P, page_size, *row] (only its shape is read)
    total_update_slices,  # int[1], on the host
    *,
    page_size: int,
    names: tuple[str, str, str, str] = NAMES,
    page_shard_index=None,
) -> None:
    """Check the slice metadata's values. Raises ``ValueError`` naming the slice.

    The first ``total_update_slices[0]`` columns of ``slice_indices`` must each
    satisfy ``0 <= len <= page_size``, ``0 <= dst``, ``dst + len <= R`` (``R``
    the cache's rows), ``0 <= src``, ``src + len <= T``, and no two of them may
    write the same cache row. Padding columns (beyond the total) are never read.
    With a ``page_shard_index`` the destinations are rows of the whole
    (sharded) cache, so ``dst + len <= R`` is not checked: rows outside this
    shard's pages are skipped, not errors.

    ``slice_indices`` and ``total_update_slices`` must be host data (numpy
    arrays or CPU arrays); reading device arrays forces a device→host sync,
    which is the caller's decision.
    """
    cache_shape = _shape(kv_cache_pages)
    row_ndim = len(_shape(new_kv_tokens)) - 1
    num_rows = int(np.prod(cache_shape[: len(cache_shape) - row_ndim], dtype=np.int64))
    check_slice_columns(
        slice_columns(slice_indices, total_update_slices, names=names),
        num_tokens=_shape(new_kv_tokens)[0],
        num_rows=UNBOUNDED if page_shard_index is not None else num_rows,
        page_size=page_size,
        names=names,
    )


#: ``num_rows`` for destinations with no upper bound (a page shard's global rows).
UNBOUNDED = np.iinfo(np.int64).max // 4


def slice_columns(slice_indices, total_update_slices, *, names=NAMES) -> np.ndarray:
    """The valid columns ``slice_indices[:, :total]`` as ``i64[3, total]`` (a
    copy), after checking ``0 <= total <= num_slices``. Host data only."""
    idx = np.asarray(slice_indices)  # int[3, S]
    num_slices = idx.shape[1]
    total = total_update_slices if type(total_update_slices) is int else int(np.asarray(total_update_slices).reshape(-1)[0])
    if not 0 <= total <= num_slices:
        raise ValueError(f"{names[3]}={total} must be in [0, num_slices={num_slices}]")
    cols = idx[:, :total]
    if cols.dtype == np.uint64 and total and cols.max() > np.iinfo(np.int64).max:
        j = int(np.argmax((cols > np.iinfo(np.int64).max).any(axis=0)))
        d, s, n = (int(v) for v in cols[:, j])
        raise ValueError(f"{names[1]}[:, {j}] = (dst={d}, src={s}, len={n}): values beyond int64")
    return cols.astype(np.int64)


#: Up to this many slices, one sort of all three rows gives the extremes and the
#: sorted destinations (measured on numpy 2.4, 64 decode slices: 4.3 µs
#: against 6.9 µs for min, max and a set of the destinations; 256: 6.2 against
#: 13.7); above, min and max and a sort of the destinations alone are cheaper.
_SORT_ALL_MAX = 512


def check_slice_columns(
    cols: np.ndarray, *, num_tokens: int, num_rows: int, page_size: int, names=NAMES
) -> tuple[int, int]:
    """The per-slice checks of :func:`dynamic_validate_inputs` on the valid
    columns ``cols`` (``i64[3, total]``, from :func:`slice_columns`). Returns
    the smallest and the largest length (``(0, 0)`` for no slice), which
    callers may reuse (``(1, 1)``: a decode step).

    Written for the common, valid case: a handful of whole-array numpy
    calls (it runs before every eager update with new metadata: ~4 µs for a
    decode step of 64 slices); per-slice detail is computed only to word an error."""
    total = cols.shape[1]
    if total == 0:
        return 0, 0
    if total <= _SORT_ALL_MAX:
        ordered = np.sort(cols, axis=1)  # i64[3, total]: each row sorted
        extremes = ordered[:, :: total - 1] if total > 1 else ordered[:, [0, 0]]  # i64[3, 2]: each row's min, max
        (dst_min, dst_max), (src_min, src_max), (len_min, len_max) = extremes.tolist()
        starts = ordered[0]  # i64[total]: the destinations, sorted
    else:
        (dst_min, src_min, len_min), (dst_max, src_max, len_max) = cols.min(axis=1).tolist(), cols.max(axis=1).tolist()
        starts = None
    bad = min(dst_min, src_min, len_min) < 0 or len_max > page_size
    if not bad and (dst_max + len_max > num_rows or src_max + len_max > num_tokens):
        # max(dst) + max(len) in bounds (Python ints) proves every dst + len is;
        # when it is not, the exact ends decide, compared as dst > rows - len:
        # dst + len could overflow int64 (dst near 2**63 would wrap negative and pass).
        bad = bool((cols[0] > num_rows - cols[2]).any() or (cols[1] > num_tokens - cols[2]).any())
    if bad:
        _raise_bad_slice(cols, num_tokens=num_tokens, num_rows=num_rows, page_size=page_size, names=names)
    if total < 2 or len_max == 0:
        return len_min, len_max
    dst, length = cols[0], cols[2]  # i64[total] each
    if len_min == len_max:  # every slice the same length (decode: 1): sorted starts that far apart are disjoint
        if starts is None:
            starts = np.sort(dst)
        # (for length 1, "equal neighbours" is the same test and cheaper)
        close = starts[1:] == starts[:-1] if len_min == 1 else starts[1:] - starts[:-1] < len_min  # bool[total - 1]
        if not np.count_nonzero(close):
            return len_min, len_max
    else:
        live = None if len_min > 0 else np.flatnonzero(length)
        order = np.argsort(dst if live is None else dst[live], kind="stable")
        if live is not None:
            order = live[order]
        if (dst[order[1:]] >= (dst + length)[order[:-1]]).all():
            return len_min, len_max
    _raise_overlap(dst, dst + length, length, names=names)


def _raise_bad_slice(cols, *, num_tokens: int, num_rows: int, page_size: int, names):
    tok_name, idx_name, cache_name, _ = names
    dst, src, length = cols
    # bool[total]. The end tests cannot overflow for a column whose length is in [0, page_size]; for any other
    # column they may, but the first two tests already flag it.
    bad = (cols.min(axis=0) < 0) | (length > page_size) | (dst > num_rows - length) | (src > num_tokens - length)
    j = int(np.argmax(bad))
    d, s, n = int(dst[j]), int(src[j]), int(length[j])
    if min(d, s, n) < 0:
        why = "negative value"
    elif n > page_size:
        why = f"length {n} exceeds {page_size=}"
    elif d + n > num_rows:
        why = f"destination rows [{d}, {d + n}) fall outside {cache_name} ({num_rows} rows)"
    else:
        why = f"source rows [{s}, {s + n}) fall outside {tok_name} ({num_tokens} rows)"
    raise ValueError(f"{idx_name}[:, {j}] = (dst={d}, src={s}, len={n}): {why}")


def _raise_overlap(dst, end, length, *, names):
    idx_name = names[1]
    live = np.flatnonzero(length)
    order = live[np.argsort(dst[live], kind="stable")]
    k = int(np.argmax(dst[order[1:]] < end[order[:-1]]))
    a, b = int(order[k]), int(order[k + 1])
    raise ValueError(
        f"{idx_name}[:, {a}] and {idx_name}[:, {b}] write overlapping cache "
        f"rows ([{int(dst[a])}, {int(end[a])}) and [{int(dst[b])}, {int(end[b])})); "
        f"destinations must be disjoint"
    )
