"""Slot mapping → slice indices for ``kv_cache_update`` (JAX, jit-able).

A slot mapping names, per new token, the flat cache row it goes to: ``slot[t]``
= ``physical_page * page_size + offset``, ``-1`` for a padding token. It is the
format of vLLM's GPU backends (``slot_mapping``, padding ``PAD_SLOT_ID = -1``),
transformers' continuous batching (``write_index``) and sglang-jax
(``ForwardBatch.out_cache_loc``, the ``loc`` its ``update_kv_cache`` takes,
padded with ``-1``).

The host checks here work on numpy arrays so the torch front end
(``torch_ops.page_tables``) runs the very same checks on CPU tensors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ._utils import is_on_host
from .block_table import _check_int

_INT32_MAX = 2**31 - 1


@functools.partial(jax.jit, static_argnames=("page_size", "max_num_slices"))
def _slice_indices_from_slot_mapping(slot_mapping, *, page_size, max_num_slices):
    slot = slot_mapping.astype(jnp.int32)  # i32[T]
    num_tokens = slot.shape[0]
    if num_tokens == 0:
        return jnp.zeros((3, max_num_slices), jnp.int32), jnp.zeros((1,), jnp.int32)
    valid = slot >= 0  # bool[T]
    prev = jnp.concatenate([jnp.full((1,), -1, jnp.int32), slot[:-1]])  # i32[T]: the previous token's slot
    # Token t extends token t-1's slice: both real, the next row, and not the first row of a page.
    continues = valid & (prev >= 0) & (slot == prev + 1) & (slot % page_size != 0)  # bool[T]
    starts = valid & ~continues  # bool[T]: first token of a slice
    ends = valid & ~jnp.concatenate([continues[1:], jnp.zeros((1,), bool)])  # bool[T]: last token of a slice
    slice_id = jnp.cumsum(starts.astype(jnp.int32), dtype=jnp.int32) - 1  # i32[T]: the slice token t is in
    total = slice_id[-1:] + 1  # i32[1]: the true number of slices
    token = jnp.arange(num_tokens, dtype=jnp.int32)  # i32[T]
    # Column of each slice's first / last token; everything else goes to a dump column S, dropped below.
    first_col = jnp.where(starts, jnp.minimum(slice_id, max_num_slices), max_num_slices)  # i32[T]
    last_col = jnp.where(ends, jnp.minimum(slice_id, max_num_slices), max_num_slices)  # i32[T]
    first = jnp.zeros((max_num_slices + 1,), jnp.int32).at[first_col].set(token)[:max_num_slices]  # i32[S]
    last = jnp.zeros((max_num_slices + 1,), jnp.int32).at[last_col].set(token)[:max_num_slices]  # i32[S]
    live = jnp.arange(max_num_slices, dtype=jnp.int32) < total  # bool[S]
    indices = jnp.stack([slot[first], first, last - first + 1])  # i32[3, S]
    return jnp.where(live[None, :], indices, 0), total


def slice_indices_from_slot_mapping(
    slot_mapping,  # int[T]
    *,
    page_size: int,
    max_num_slices: int,
    num_rows: int | None = None,
):
    """Slice indices for new tokens whose cache rows a slot mapping names.

    ``slot_mapping[t]`` is the flat cache row token ``t`` (row ``t`` of
    ``new_kv_tokens``) goes to; ``-1`` marks a padding token, which is skipped.
    Consecutive tokens going to consecutive rows of one page merge into one
    slice ``(dst=slot_mapping[t0], src=t0, len)``; a slice never crosses a page
    boundary. Slices come in token order; the remaining columns are zero.

    Returns ``(slice_indices i32[3, max_num_slices], total_update_slices i32[1])``.
    Shapes are static, so it is jit-able. ``max_num_slices = len(slot_mapping)``
    always suffices (every slice holds at least one token); when the tokens
    belong to ``B`` requests, each writing consecutive positions of its own
    pages, ``max_num_slices_bound(B, len(slot_mapping), page_size)`` does too.

    A non-integer ``slot_mapping`` raises ``TypeError`` and one not of rank 1
    ``ValueError``, always. With concrete inputs on the host (numpy, CPU
    arrays) ``ValueError`` also names a slot below ``-1``, two tokens writing
    one row, a slot ``>= num_rows`` (the cache's row count, when given), and
    a batch needing more slices than ``max_num_slices``. Off the host or
    inside ``jit`` nothing is read back:
    every negative slot counts as padding, and ``total_update_slices`` holds
    the true count (``> max_num_slices`` if it did not fit, so
    ``kv_cache_update``'s validation rejects it).
    """
    _check_int("page_size", page_size, minimum=1)
    _check_int("max_num_slices", max_num_slices, minimum=0)
    if num_rows is not None:
        _check_int("num_rows", num_rows, minimum=1)
    check_slot_mapping_static(np.shape(slot_mapping), _dtype(slot_mapping))
    on_host = is_on_host(slot_mapping)
    if on_host:
        check_slot_mapping_values(np.asarray(slot_mapping), num_rows=num_rows)
    indices, total = _slice_indices_from_slot_mapping(
        jnp.asarray(slot_mapping), page_size=page_size, max_num_slices=max_num_slices
    )
    if on_host:
        check_num_slices(int(total[0]), max_num_slices, len(slot_mapping))
    return indices, total


def _dtype(x) -> np.dtype:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def is_integer_dtype(dtype) -> bool:
    """True for numpy/JAX integer dtypes and torch integer dtypes (bool is not an integer)."""
    if hasattr(dtype, "is_floating_point"):  # a torch.dtype; torch is never imported here
        return not (dtype.is_floating_point or dtype.is_complex or str(dtype) == "torch.bool")
    return np.issubdtype(np.dtype(dtype), np.integer)


def check_slot_mapping_static(shape, dtype) -> None:
    """Rank and dtype of ``slot_mapping`` (numpy, JAX or torch dtype; shared with the torch front end)."""
    if not is_integer_dtype(dtype):
        raise TypeError(f"slot_mapping must have an integer dtype, got {dtype}")
    if len(shape) != 1:
        raise ValueError(f"slot_mapping must be [num_tokens], got shape {tuple(shape)}")


def check_slot_mapping_values(slot, *, num_rows: int | None) -> None:
    """Host checks of a slot mapping's values (numpy ``int[T]``), shared with the
    torch front end. Raises ``ValueError`` naming ``slot_mapping``."""
    slot = slot.astype(np.int64)  # i64[T]
    if slot.size == 0:
        return
    if (slot < -1).any():
        t = int(np.argmax(slot < -1))
        raise ValueError(f"slot_mapping[{t}]={int(slot[t])} is negative; only -1 marks a padding token")
    limit = _INT32_MAX + 1 if num_rows is None else min(num_rows, _INT32_MAX + 1)
    if (slot >= limit).any():
        t = int(np.argmax(slot >= limit))
        where = f"outside the cache ({num_rows=})" if int(slot[t]) < _INT32_MAX + 1 else "beyond int32"
        raise ValueError(f"slot_mapping[{t}]={int(slot[t])} is {where}")
    real = np.flatnonzero(slot >= 0)  # i64[R]
    order = real[np.argsort(slot[real], kind="stable")]  # i64[R]: tokens by slot
    same = slot[order[1:]] == slot[order[:-1]]  # bool[R - 1]
    if same.any():
        k = int(np.argmax(same))
        a, b = sorted((int(order[k]), int(order[k + 1])))
        raise ValueError(
            f"slot_mapping[{a}] and slot_mapping[{b}] both write cache row {int(slot[a])}; "
            f"every real token needs its own row"
        )


def check_num_slices(needed: int, max_num_slices: int, num_tokens: int) -> None:
    if needed > max_num_slices:
        raise ValueError(
            f"slot_mapping needs {needed} slices but {max_num_slices=}; "
            f"max_num_slices=len(slot_mapping)={num_tokens} always suffices"
        )
