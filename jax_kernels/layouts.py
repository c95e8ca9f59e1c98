"""KV cache layouts: the shapes engines store K and V in, and K/V ⇄ cache rows (JAX).

The update itself is layout-blind: it copies whole cache *rows* (everything a
token stores at one cache position). What differs between engines is the shape
of a row and how K and V heads sit in it:

============== ================================================ ==================================
``layout``     cache                                            a row (``new_kv_tokens[t]``)
============== ================================================ ==================================
``combined``   ``[P, page_size, 2 * kvH, D]``                   ``[2 * kvH, D]``, heads k0, v0, k1, v1, ...
               (vLLM's TPU backend of 2025; flat: ``[P * page_size, 2 * kvH, D]``)
``packed``     ``[P, page_size, H2 // pack, pack, D128]``       ``[H2 // pack, pack, D128]``
               (tpu-inference's ragged paged attention v3)       ``H2 = align(2 * kvH, pack)``, heads
                                                                k0, v0, k1, v1, ... then zero heads;
                                                                ``D128 = align(D, 128)``, zero lanes
``packed_hd64`` ``[P, page_size, H1 // pack, pack, 128]``        ``[H1 // pack, pack, 128]``: per head,
               (tpu-inference's ``kernel_hd64``, ``D == 64``)    K in lanes 0-63, V in 64-127;
                                                                ``H1 = align(kvH, pack)``, zero heads
============== ================================================ ==================================

``pack = 32 // bits(dtype)``: 1 for float32, 2 for bfloat16/float16, 4 for the
8-bit types, so one TPU 32-bit word holds ``pack`` heads' values. Every row of
a cache is contiguous, so a paged cache is a free view of a flat
``[P * page_size, *row]`` one. Separate K and V caches (``[P * page_size, kvH,
D]`` each) are combined caches with ``kvH`` heads: see ``kv_cache_update_kv``.

:func:`kv_cache_shape`, :func:`merge_kv` and :func:`split_kv` agree bit for bit
with ``bridge.layouts`` (the torch side), and for ``packed``/``packed_hd64``
with tpu-inference's ``get_kv_cache_shape`` and ``merge_kv``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ._utils import cdiv
from .kv_cache_update.tpu_config import TPU_LANES

LAYOUTS = ("combined", "packed", "packed_hd64")


def align_to(x: int, a: int) -> int:
    """``x`` rounded up to a multiple of ``a``."""
    return cdiv(x, a) * a


def dtype_packing(dtype) -> int:
    """How many values of ``dtype`` one 32-bit word holds: ``32 // bits``.
    ``dtype``: anything numpy names, or a dtype with an ``itemsize`` (torch's)."""
    itemsize = getattr(dtype, "itemsize", None)
    bits = (itemsize if isinstance(itemsize, int) else np.dtype(dtype).itemsize) * 8
    if bits > 32:
        raise TypeError(f"{dtype=} is wider than 32 bits; packed layouts hold 8-, 16- and 32-bit types")
    return 32 // bits


def check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")


def _check_dims(**dims) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}={value!r} must be a Python int")
        if value < 1:
            raise ValueError(f"{name}={value} must be positive")


def row_shape(num_kv_heads: int, head_dim: int, dtype, *, layout: str = "combined") -> tuple[int, ...]:
    """The shape of one cache row (one token's K and V) in ``layout``."""
    check_layout(layout)
    _check_dims(num_kv_heads=num_kv_heads, head_dim=head_dim)
    if layout == "combined":
        return (2 * num_kv_heads, head_dim)
    pack = dtype_packing(dtype)
    if layout == "packed":
        return (align_to(2 * num_kv_heads, pack) // pack, pack, align_to(head_dim, TPU_LANES))
    if head_dim != 64:
        raise ValueError(f"layout='packed_hd64' holds head_dim=64 only, got {head_dim=}")
    return (align_to(num_kv_heads, pack) // pack, pack, 2 * head_dim)


def kv_cache_shape(
    num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype, *, layout: str = "combined"
) -> tuple[int, ...]:
    """The paged cache shape ``[num_pages, page_size, *row]`` for ``layout``.

    ``packed``: ``(P, page_size, align(2 * kvH, pack) // pack, pack, align(D, 128))``,
    tpu-inference's ``get_kv_cache_shape``. ``combined``: ``(P, page_size, 2 * kvH, D)``.
    ``packed_hd64``: ``(P, page_size, align(kvH, pack) // pack, pack, 128)``.
    """
    _check_dims(num_pages=num_pages, page_size=page_size)
    return (int(num_pages), int(page_size), *row_shape(num_kv_heads, head_dim, dtype, layout=layout))


def check_kv(k, v) -> None:
    if k.ndim != 3:
        raise ValueError(f"k must be [num_tokens, num_kv_heads, head_dim], got shape {tuple(k.shape)}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k.shape={tuple(k.shape)} must equal v.shape={tuple(v.shape)}")
    if k.dtype != v.dtype:
        raise TypeError(f"k.dtype={k.dtype} must equal v.dtype={v.dtype}")


def merge_plan(num_kv_heads: int, head_dim: int, dtype, layout: str):
    """How K and V ``[T, kvH, D]`` become rows, as data for both frameworks:
    ``(concat_axis, (head padding, lane padding), row)``. ``concat_axis`` is
    where K and V are joined before heads and lanes are padded: ``-1`` then a
    reshape to ``[T, 2 * kvH, D]`` interleaves heads (combined, packed); for
    ``packed_hd64`` the ``[T, kvH, 2 * D]`` rows keep K and V side by side."""
    row = row_shape(num_kv_heads, head_dim, dtype, layout=layout)
    heads = 2 * num_kv_heads if layout != "packed_hd64" else num_kv_heads
    lanes = head_dim if layout != "packed_hd64" else 2 * head_dim
    padded_heads = row[0] * (row[1] if len(row) == 3 else 1)
    return heads, lanes, (padded_heads - heads, row[-1] - lanes), row


def merge_kv(
    k,  # [T, kvH, D]
    v,  # [T, kvH, D]
    *,
    layout: str = "combined",
    cache_dtype=None,
):  # -> [T, *row_shape(kvH, D, cache_dtype or dtype, layout)]
    """K and V ``[T, kvH, D]`` as cache rows of ``layout`` (a new array).

    ``combined``: ``[T, 2 * kvH, D]``, heads k0, v0, k1, v1, ...; ``packed``:
    the same heads padded with zero heads to a multiple of ``pack`` and zero
    lanes to 128, as ``[T, H2 // pack, pack, D128]`` (bitwise tpu-inference's
    ``merge_kv``, padding included); ``packed_hd64``: ``[T, H1 // pack, pack, 128]``.
    ``cache_dtype``: for a quantized write (rows wider than the cache's
    8-bit values), pack the rows as that cache does (``pack`` of
    ``cache_dtype``); the rows keep ``k``'s dtype.
    """
    check_kv(k, v)
    num_tokens, num_kv_heads, head_dim = k.shape
    heads, lanes, (pad_heads, pad_lanes), row = merge_plan(num_kv_heads, head_dim, cache_dtype or k.dtype, layout)
    rows = jnp.concatenate([k, v], axis=-1).reshape(num_tokens, heads, lanes)  # [T, heads, lanes]
    if pad_heads or pad_lanes:
        rows = jnp.pad(rows, ((0, 0), (0, pad_heads), (0, pad_lanes)))
    return rows.reshape(num_tokens, *row)


def split_plan(num_kv_heads: int, head_dim: int, dtype, layout: str):
    """Where K and V sit in rows of ``layout``, as data for both frameworks:
    ``(row, heads, (k_heads, k_lanes), (v_heads, v_lanes))``: viewed as
    ``[T, heads, row[-1]]``, K is ``rows[:, k_heads, k_lanes]`` and V
    ``rows[:, v_heads, v_lanes]`` (slices: strided views in torch)."""
    row = row_shape(num_kv_heads, head_dim, dtype, layout=layout)
    heads = row[0] * (row[1] if len(row) == 3 else 1)
    if layout == "packed_hd64":
        return row, heads, (slice(0, num_kv_heads), slice(0, head_dim)), (slice(0, num_kv_heads), slice(head_dim, 2 * head_dim))
    lanes = slice(0, head_dim)
    return row, heads, (slice(0, 2 * num_kv_heads, 2), lanes), (slice(1, 2 * num_kv_heads, 2), lanes)


def split_kv(
    kv_rows,  # [T, *row]
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    *,
    layout: str = "combined",
    cache_dtype=None,
):  # -> (k [T, kvH, D], v [T, kvH, D])
    """Cache rows of ``layout`` back to ``(k, v)``, each ``[T, kvH, D]``, padding dropped.

    For ``combined`` the head count and ``head_dim`` are read off the rows when
    not given; the padded layouts need both (the padding hides them).
    ``cache_dtype``: rows packed for another dtype's cache (see :func:`merge_kv`).
    """
    num_tokens, (row, heads, k_at, v_at) = split_args(kv_rows, num_kv_heads, head_dim, layout, cache_dtype=cache_dtype)
    rows = kv_rows.reshape(num_tokens, heads, row[-1])  # [T, heads, lanes]
    return rows[:, k_at[0], k_at[1]], rows[:, v_at[0], v_at[1]]


def split_args(kv_rows, num_kv_heads, head_dim, layout, name="kv_rows", cache_dtype=None):
    """``(num_tokens, split_plan(...))`` after checking ``kv_rows`` (the
    caller's argument ``name``) holds rows of ``layout``; shared by the JAX and
    torch ``split_kv``."""
    check_layout(layout)
    shape = tuple(kv_rows.shape)
    if layout == "combined":
        if len(shape) != 3:
            raise ValueError(f"{name} must be [num_tokens, 2 * num_kv_heads, head_dim], got shape {shape}")
        if shape[1] % 2:
            raise ValueError(
                f"{name}.shape[1]={shape[1]} must be even (2 * num_kv_heads, heads k0, v0, k1, v1, ...)"
            )
        num_kv_heads = shape[1] // 2 if num_kv_heads is None else num_kv_heads
        head_dim = shape[2] if head_dim is None else head_dim
    elif num_kv_heads is None or head_dim is None:
        raise ValueError(f"split_kv(layout={layout!r}) needs num_kv_heads and head_dim, got {num_kv_heads=}, {head_dim=}")
    plan = split_plan(num_kv_heads, head_dim, cache_dtype or kv_rows.dtype, layout)
    if shape[1:] != plan[0]:
        raise ValueError(
            f"{name}.shape={shape} is not [num_tokens, *{plan[0]}] "
            f"({layout} rows of {num_kv_heads=}, {head_dim=}, dtype {cache_dtype or kv_rows.dtype})"
        )
    return shape[0], plan
