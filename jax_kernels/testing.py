"""Layouts and caches for tests and benchmarks (numpy only, deterministic).

Shared by ``tests/`` and ``benchmarks/`` so both exercise the same cases.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

#: Cache dtypes every implementation is tested on (numpy / ml_dtypes names).
TEST_DTYPES = ("float32", "bfloat16", "float16", "int8", "float8_e4m3fn")


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a name, including ml_dtypes' bfloat16 and float8 types."""
    if hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def bits(x) -> np.ndarray:
    """The raw bits of an array (same-width unsigned ints), for bitwise equality
    that also compares NaN payloads."""
    a = np.asarray(x)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def sentinel_cache(num_rows: int, heads: int, head_dim: int, dtype) -> np.ndarray:
    """A cache filled with a sentinel: NaN for floating types, the minimum
    value for integers. Rows that no slice names must come back bitwise equal."""
    dt = np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    fill = np.iinfo(dt).min if np.issubdtype(dt, np.integer) else np.nan
    return np.full((num_rows, heads, head_dim), fill, dtype=dt)


def random_tokens(rng: np.random.Generator, num_tokens: int, heads: int, head_dim: int, dtype) -> np.ndarray:
    """Distinct-looking token rows (no NaNs) of the given dtype."""
    dt = np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        return rng.integers(-100, 100, (num_tokens, heads, head_dim)).astype(dt)
    return rng.uniform(-4, 4, (num_tokens, heads, head_dim)).astype(dt)


def random_slices(
    rng: np.random.Generator,
    *,
    num_rows: int,
    num_tokens: int,
    page_size: int,
    num_slices: int,
    num_valid: int | None = None,
    within_pages: bool = False,
    garbage_padding: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """A random valid layout: ``(slice_indices i32[3, S], total i32[1])``.

    Valid slices have lengths in ``[0, page_size]``, disjoint destinations at
    random offsets (crossing page boundaries unless ``within_pages``), and
    sources packed in a random order within ``num_tokens``. Padding columns
    hold garbage (negative and out-of-range values) unless ``garbage_padding``
    is False, so an implementation that reads them fails.
    """
    if num_valid is None:
        num_valid = int(rng.integers(0, num_slices + 1))
    lengths = rng.integers(0, page_size + 1, num_valid)
    # Fit the sources in num_tokens and the destinations in the cache.
    while lengths.sum() > min(num_tokens, num_rows) and lengths.any():
        lengths[rng.integers(num_valid)] //= 2
    if within_pages:
        # Whole pages, each slice placed inside one page.
        pages = rng.permutation(num_rows // page_size)[:num_valid]
        lengths = lengths[: len(pages)]
        num_valid = len(pages)
        offsets = np.array([rng.integers(0, page_size - n + 1) for n in lengths], dtype=np.int64)
        dst = pages * page_size + offsets
    else:
        free = num_rows - int(lengths.sum())
        # Random gaps before each slice (stars and bars), slices in random order.
        cuts = np.sort(rng.integers(0, free + 1, num_valid))
        gaps = np.diff(np.concatenate([[0], cuts]))
        order = rng.permutation(num_valid)
        dst = np.empty(num_valid, np.int64)
        pos = 0
        for k, s in enumerate(order):
            pos += gaps[k]
            dst[s] = pos
            pos += lengths[s]
    src_free = num_tokens - int(lengths.sum())
    cuts = np.sort(rng.integers(0, src_free + 1, num_valid))
    gaps = np.diff(np.concatenate([[0], cuts]))
    src = np.empty(num_valid, np.int64)
    pos = 0
    for k, s in enumerate(rng.permutation(num_valid)):
        pos += gaps[k]
        src[s] = pos
        pos += lengths[s]
    idx = np.zeros((3, num_slices), np.int32)
    idx[:, :num_valid] = np.stack([dst, src, lengths])
    if garbage_padding and num_slices > num_valid:
        idx[:, num_valid:] = rng.integers(-(2**20), 2**20, (3, num_slices - num_valid))
    return idx, np.array([num_valid], np.int32)
