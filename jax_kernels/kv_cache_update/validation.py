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

# The Pallas kernel moves whole [H, D] rows with DMAs; TPU vector registers are
# 128 lanes wide, so the kernel's VMEM staging buffer needs head_dim % 128 == 0.
# The pure-JAX fallbacks have no such rule.
TPU_LANE_WIDTH = 128
# Default scoped VMEM budget on the smallest current TPUs (v5e: 16 MiB).
TPU_VMEM_SCRATCH_LIMIT_BYTES = 16 * 1024 * 1024


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


def static_validate_inputs(
    new_kv_tokens,  # [T, H, D]
    slice_indices,  # int[3, S]
    kv_cache_pages,  # [P * page_size, H, D]
    total_update_slices,  # int[1]
    *,
    page_size: int,
    slices_per_processing_page: int | None = None,
    for_tpu_kernel: bool = False,
) -> None:
    """Check ranks, shapes, dtypes and static config. Raises ValueError/TypeError.

    ``for_tpu_kernel=True`` adds the Pallas kernel's own rules
    (``head_dim % 128 == 0`` and the VMEM staging budget).
    """
    _check_positive_int("page_size", page_size)
    if slices_per_processing_page is not None:
        _check_positive_int("slices_per_processing_page", slices_per_processing_page)

    new_shape = _shape(new_kv_tokens)
    cache_shape = _shape(kv_cache_pages)
    idx_shape = _shape(slice_indices)
    total_shape = _shape(total_update_slices)
    if len(new_shape) != 3:
        raise ValueError(
            f"new_kv_tokens must be [num_tokens, num_combined_kv_heads, head_dim], "
            f"got shape {new_shape}"
        )
    if len(cache_shape) != 3:
        raise ValueError(
            f"kv_cache_pages must be [num_pages * page_size, num_combined_kv_heads, "
            f"head_dim], got shape {cache_shape}"
        )
    if len(idx_shape) != 2 or idx_shape[0] != 3:
        raise ValueError(f"slice_indices must be [3, num_slices], got shape {idx_shape}")
    if int(np.prod(total_shape, dtype=np.int64)) != 1 or len(total_shape) > 1:
        raise ValueError(
            f"total_update_slices must hold one integer (shape [1]), got shape {total_shape}"
        )
    if new_shape[1:] != cache_shape[1:]:
        raise ValueError(
            f"new_kv_tokens heads/head_dim {new_shape[1:]} do not match "
            f"kv_cache_pages heads/head_dim {cache_shape[1:]} "
            f"(new_kv_tokens.shape={new_shape}, kv_cache_pages.shape={cache_shape})"
        )
    if cache_shape[0] % page_size:
        raise ValueError(
            f"kv_cache_pages.shape[0]={cache_shape[0]} is not a multiple of {page_size=}"
        )

    for name, x in (("slice_indices", slice_indices), ("total_update_slices", total_update_slices)):
        if not np.issubdtype(_dtype(x), np.integer):
            raise TypeError(f"{name} must have an integer dtype, got {_dtype(x)}")
    if _dtype(new_kv_tokens) != _dtype(kv_cache_pages):
        raise TypeError(
            f"new_kv_tokens.dtype={_dtype(new_kv_tokens)} must equal "
            f"kv_cache_pages.dtype={_dtype(kv_cache_pages)}"
        )

    if for_tpu_kernel:
        problem = tpu_kernel_problem(
            cache_shape,
            _dtype(kv_cache_pages),
            page_size=page_size,
            slices_per_processing_page=slices_per_processing_page or 1,
        )
        if problem:
            raise ValueError(problem)


def tpu_kernel_problem(
    cache_shape, dtype, *, page_size: int, slices_per_processing_page: int
) -> str | None:
    """Why the Pallas kernel cannot take a cache of this shape/dtype, or None."""
    _, heads, head_dim = cache_shape
    if head_dim % TPU_LANE_WIDTH:
        return (
            f"{head_dim=} must be a multiple of {TPU_LANE_WIDTH} for the Pallas TPU "
            f"kernel (TPU lane width); the JAX fallbacks accept any head_dim"
        )
    scratch = slices_per_processing_page * page_size * heads * head_dim * np.dtype(dtype).itemsize
    if scratch > TPU_VMEM_SCRATCH_LIMIT_BYTES:
        return (
            f"the kernel's VMEM staging buffer would take {scratch} bytes "
            f"({slices_per_processing_page=} x {page_size=} x {heads} heads x "
            f"{head_dim=}); lower slices_per_processing_page to stay under "
            f"{TPU_VMEM_SCRATCH_LIMIT_BYTES} bytes"
        )
    return None


def dynamic_validate_inputs(
    new_kv_tokens,  # [T, H, D] (only its shape is read)
    slice_indices,  # int[3, S], on the host
    kv_cache_pages,  # [R, H, D] (only its shape is read)
    total_update_slices,  # int[1], on the host
    *,
    page_size: int,
) -> None:
    """Check the slice metadata's values. Raises ``ValueError`` naming the slice.

    The first ``total_update_slices[0]`` columns of ``slice_indices`` must each
    satisfy ``0 <= len <= page_size``, ``0 <= dst``, ``dst + len <= R``,
    ``0 <= src``, ``src + len <= T``, and no two of them may write the same
    cache row. Padding columns (beyond the total) are never read.

    ``slice_indices`` and ``total_update_slices`` must be host data (numpy
    arrays or CPU arrays); reading device arrays forces a device→host sync,
    which is the caller's decision.
    """
    check_slice_columns(
        slice_columns(slice_indices, total_update_slices),
        num_tokens=_shape(new_kv_tokens)[0],
        num_rows=_shape(kv_cache_pages)[0],
        page_size=page_size,
    )


def slice_columns(slice_indices, total_update_slices) -> np.ndarray:
    """The valid columns ``slice_indices[:, :total]`` as ``i64[3, total]`` (a
    copy), after checking ``0 <= total <= num_slices``. Host data only."""
    idx = np.asarray(slice_indices)  # int[3, S]
    num_slices = idx.shape[1]
    total = int(np.asarray(total_update_slices).reshape(-1)[0])
    if not 0 <= total <= num_slices:
        raise ValueError(f"total_update_slices={total} must be in [0, num_slices={num_slices}]")
    return idx[:, :total].astype(np.int64)


def check_slice_columns(cols: np.ndarray, *, num_tokens: int, num_rows: int, page_size: int) -> None:
    """The per-slice checks of :func:`dynamic_validate_inputs` on the valid
    columns ``cols`` (``i64[3, total]``, from :func:`slice_columns`).

    Written for the common, valid case: a handful of whole-array numpy
    reductions (it runs before every eager update); per-slice detail is
    computed only to word an error."""
    total = cols.shape[1]
    if total == 0:
        return
    dst, src, length = cols  # i64[total] each
    dst_min, src_min, len_min = cols.min(axis=1).tolist()
    dst_max, src_max, len_max = cols.max(axis=1).tolist()
    bad = min(dst_min, src_min, len_min) < 0 or len_max > page_size
    if not bad and (dst_max + len_max > num_rows or src_max + len_max > num_tokens):
        # max(dst) + max(len) in bounds proves every dst + len is; when it is
        # not, the exact ends decide.
        ends = cols[:2] + length  # i64[2, total]
        bad = ends[0].max() > num_rows or ends[1].max() > num_tokens
    if bad:
        _raise_bad_slice(cols, cols[:2] + length, num_tokens=num_tokens, num_rows=num_rows, page_size=page_size)
    if total < 2 or len_max == 0:
        return
    if len_min == len_max:  # every slice the same length (decode: 1): sorting the destinations suffices
        starts = np.sort(dst)
        if (starts[1:] - starts[:-1] >= len_min).all():
            return
    else:
        live = None if len_min > 0 else np.flatnonzero(length)
        order = np.argsort(dst if live is None else dst[live], kind="stable")
        if live is not None:
            order = live[order]
        if (dst[order[1:]] >= (dst + length)[order[:-1]]).all():
            return
    _raise_overlap(dst, dst + length, length)


def _raise_bad_slice(cols, ends, *, num_tokens: int, num_rows: int, page_size: int):
    dst, src, length = cols
    bad = (cols.min(axis=0) < 0) | (length > page_size) | (ends[0] > num_rows) | (ends[1] > num_tokens)
    j = int(np.argmax(bad))
    d, s, n = int(dst[j]), int(src[j]), int(length[j])
    if min(d, s, n) < 0:
        why = "negative value"
    elif n > page_size:
        why = f"length {n} exceeds {page_size=}"
    elif d + n > num_rows:
        why = f"destination rows [{d}, {d + n}) fall outside kv_cache_pages ({num_rows} rows)"
    else:
        why = f"source rows [{s}, {s + n}) fall outside new_kv_tokens ({num_tokens} rows)"
    raise ValueError(f"slice_indices[:, {j}] = (dst={d}, src={s}, len={n}): {why}")


def _raise_overlap(dst, end, length):
    live = np.flatnonzero(length)
    order = live[np.argsort(dst[live], kind="stable")]
    k = int(np.argmax(dst[order[1:]] < end[order[:-1]]))
    a, b = int(order[k]), int(order[k + 1])
    raise ValueError(
        f"slice_indices[:, {a}] and slice_indices[:, {b}] write overlapping cache "
        f"rows ([{int(dst[a])}, {int(end[a])}) and [{int(dst[b])}, {int(end[b])})); "
        f"destinations must be disjoint"
    )
