"""Eager (CPU / CUDA) kernels: the native ``index_copy_`` path and the JAX
paths on a staging cache of the written rows. Both write into the caller's tensor in place."""

from __future__ import annotations

import functools

import bridge  # first: PyTorch/XLA's JAX import guard  # isort: skip
import jax
import numpy as np
import torch

from jax_kernels.kv_cache_update.kernel import INTERPRETER_LOCK

from ._impls import jax_update


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Dtypes CPU index_copy_ does not implement: copied as same-width integers.
_COPY_AS_BITS = {d for d in (getattr(torch, n, None) for n in dir(torch) if n.startswith("float8")) if isinstance(d, torch.dtype)}


def as_copyable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a same-width integer view of it (no copy) for dtypes whose
    ``index_copy_`` is missing (float8). Row copies move the exact bits either
    way; the integer view is slower for dtypes that have a native kernel."""
    return t.view(_BITS[t.element_size()]) if t.dtype in _COPY_AS_BITS else t


_WORDS = ((torch.complex128, 16), (torch.float64, 8))  # (word, bytes): 16- and 8-byte words


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[N, H, D]`` as a view (no copy) of 16-byte words (complex128) or
    8-byte words (float64), first dimension kept: ``[N, H, D * itemsize / w]``
    when each head's ``D`` elements fill whole words (one view, ~1 µs), else
    ``[N, H * D * itemsize / w]`` when the heads of a row are contiguous and
    fill whole words together; failing both (or unaligned), :func:`as_copyable`.

    ``index_copy_`` then moves 16- or 8-byte words: measured 2-3x faster than
    the native bfloat16 kernel and up to 3x faster for float32. It only moves
    them — no arithmetic — so the bits, NaN payloads and denormals included,
    arrive unchanged (a test copies every bfloat16 bit pattern this way).

    Wider words also mean fewer elements, which decides whether the copy runs
    on one thread: ``index_copy_`` (a TensorIterator) runs serially up to
    32,768 elements (``at::internal::GRAIN_SIZE``), i.e. up to 512 KiB of
    rows as 16-byte words (a decode step of 64 rows of 16 x 128 float32:
    no OpenMP region, no thread wake-up, the same time at any thread count),
    and starts a parallel region (waking every intra-op thread) only above
    that (measured 2-3x faster on 2 idle cores; on a busy machine a region
    can wait a scheduler tick for a descheduled thread, as torch's own ops do)."""
    if t.dim() == 3 and t.stride(2) == 1:
        heads, dim = t.shape[1], t.shape[2]
        head_bytes = dim * t.element_size()
        for word, size in _WORDS:
            if head_bytes % size == 0:
                shaped = t
            elif t.stride(1) == dim and heads * head_bytes % size == 0:
                shaped = t.view(t.shape[0], -1)
            else:
                continue
            try:
                return shaped.view(word)
            except RuntimeError:  # storage offset or a stride not a whole number of words
                continue
    return as_copyable(t)


def _index_on(rows: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``rows`` as an index tensor on ``like``'s device (shared with numpy on CPU)."""
    index = torch.from_numpy(rows)
    return index if like.is_cpu else index.to(like.device)


def copy_rows_(flat: torch.Tensor, dst_rows: np.ndarray, rows: torch.Tensor) -> None:
    """``flat[dst_rows[i]] = rows[i]`` for every ``i``, with one ``index_copy_``
    (on one thread up to 512 KiB of rows: see :func:`as_rows`)."""
    index = _index_on(dst_rows, flat)
    dst, src = as_rows(flat), as_rows(rows)
    if dst.dtype is not src.dtype or dst.shape[1:] != src.shape[1:]:
        dst, src = as_copyable(flat), as_copyable(rows)
    dst.index_copy_(0, index, src)


class RowPlan:
    """Where every copied row goes: the valid slices with ``len > 0``, packed
    end to end (the order of ``slice_indices``).

    Built from the valid columns ``i64[3, total]`` that
    ``torch_ops._validation.host_columns`` returns; it runs on every eager
    call, so it does only the numpy work the row copy needs (a decode step,
    every slice one row: one comparison and one reduction)."""

    def __init__(self, cols: np.ndarray):
        dst, src, length = cols[0], cols[1], cols[2]  # i64[total] each (indexing is cheaper than unpacking)
        if (length == 1).all():  # every slice is one row (decode): nothing to drop or count
            num_rows = len(length)
        else:
            if not length.all():
                keep = length > 0
                dst, src, length = dst[keep], src[keep], length[keep]
            num_rows = int(length.sum())
        self.dst, self.src, self.length = dst, src, length  # i64[n] each
        self.num_rows = num_rows
        if num_rows == len(length):  # every slice is one row: nothing to expand
            self._within = None
            self.dst_rows = dst
        else:
            # i64[num_rows]: the row offset within its slice, for every copied row.
            self._within = np.arange(num_rows) - np.repeat(self.packed_start, length)
            self.dst_rows = np.repeat(dst, length) + self._within  # i64[num_rows]

    @functools.cached_property
    def packed_start(self) -> np.ndarray:
        """i64[n]: the first packed row of each slice."""
        return np.cumsum(self.length) - self.length

    @functools.cached_property
    def contiguous_source(self) -> bool:
        """Whether the slices read one contiguous run of the tokens, in order."""
        src = self.src
        return bool((src[1:] - src[:-1] == self.length[:-1]).all())

    def source_rows(self, new_kv_tokens: torch.Tensor) -> torch.Tensor:
        """The source rows in packed order: ``new_kv_tokens`` itself or a view
        of it when the slices read one contiguous run of it in order
        (block-table layouts do), else a gather."""
        if self.contiguous_source:
            start = int(self.src[0]) if len(self.src) else 0
            if start == 0 and self.num_rows == new_kv_tokens.shape[0]:
                return new_kv_tokens  # the whole tensor (no view to make)
            return new_kv_tokens.narrow(0, start, self.num_rows)
        src = self.src
        src_rows = src if self._within is None else np.repeat(src, self.length) + self._within
        return new_kv_tokens.index_select(0, _index_on(src_rows, new_kv_tokens))


def update_rows_(new_kv_tokens: torch.Tensor, cols: np.ndarray, flat: torch.Tensor) -> None:
    """``impl="torch"``: copy every named row with one ``index_copy_``."""
    plan = RowPlan(cols)
    if plan.num_rows == 0:
        return
    copy_rows_(flat, plan.dst_rows, plan.source_rows(new_kv_tokens))


def staged_rows(plan: RowPlan, num_slices: int, page_size: int):
    """The JAX implementation's input for a compact staging cache that holds
    just the rows the call writes, packed: ``(num_staged_rows, idx i32[3, S],
    total i32[1])``. The staging cache is a whole number of pages, rounded up
    to a power of two pages so a new batch shape rarely means a new trace."""
    pages = max(1, -(-plan.num_rows // page_size))
    staged_idx = np.zeros((3, num_slices), np.int32)
    n = len(plan.length)
    staged_idx[:, :n] = np.stack([plan.packed_start, plan.src, plan.length])
    return (1 << (pages - 1).bit_length()) * page_size, staged_idx, np.array([n], np.int32)


@functools.lru_cache(maxsize=None)
def jitted_update(impl: str, page_size: int, slices_per_processing_page: int):
    """One jitted JAX function per (impl, page_size, slices_per_processing_page);
    jax.jit then caches one trace per input shape."""
    return jax.jit(
        functools.partial(
            jax_update, impl=impl, page_size=page_size, slices_per_processing_page=slices_per_processing_page
        )
    )


def staged_update(
    new_kv_tokens: torch.Tensor,
    plan: RowPlan,
    num_slices: int,
    *,
    impl: str,
    page_size: int,
    slices_per_processing_page: int,
) -> torch.Tensor:
    """Run the JAX implementation ``impl`` on a compact staging cache; return
    the written rows in packed order (``[plan.num_rows, H, D]``).

    JAX cannot write into memory it imported through DLPack (donation is
    ignored), so the kernels run on a staging cache holding only the rows this
    call writes — every slice keeps its length and source, its destination
    becomes its packed offset — and the caller copies those rows into place.
    Cost: O(rows written), not O(cache).
    """
    num_staged, staged_idx, staged_total = staged_rows(plan, num_slices, page_size)
    # The JAX code sees same-width integers (free views): it only moves bits,
    # XLA:CPU would otherwise run 16-bit float scatters through float32, and
    # jax 0.7.1's DLPack carries no float8.
    bits_dtype = _BITS[new_kv_tokens.element_size()]
    staging = torch.empty((num_staged, *new_kv_tokens.shape[1:]), dtype=bits_dtype, device=new_kv_tokens.device)
    run = functools.partial(
        jitted_update(impl, page_size, slices_per_processing_page),
        bridge.to_jax(new_kv_tokens.view(bits_dtype)),
        staged_idx,  # numpy: jit's C++ path transfers it (measured ~100 µs less than jnp.asarray on jax 0.7.1)
        bridge.to_jax(staging),
        staged_total,
    )
    if impl == "pallas_interpret":
        with INTERPRETER_LOCK:  # the TPU interpreter is not thread-safe
            out = jax.block_until_ready(run())
    else:
        out = run()
    return bridge.to_torch(out)[: plan.num_rows].view(new_kv_tokens.dtype)


def update_staged_(
    new_kv_tokens: torch.Tensor,
    cols: np.ndarray,
    num_slices: int,
    flat: torch.Tensor,
    *,
    impl: str,
    page_size: int,
    slices_per_processing_page: int,
) -> None:
    """``impl`` in ``jax``/``scan``/``pallas_interpret`` on eager tensors: the
    JAX code on a staging cache, then one ``index_copy_`` into ``flat``."""
    plan = RowPlan(cols)
    if plan.num_rows == 0:
        return
    rows = staged_update(
        new_kv_tokens, plan, num_slices, impl=impl, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page,
    )
    copy_rows_(flat, plan.dst_rows, rows.to(flat.device))
