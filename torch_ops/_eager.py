"""Eager (CPU / CUDA) kernels: the native row copy (numpy on the calling
thread for small CPU copies, else ``index_copy_`` of words) and the JAX paths
on a staging cache of the written rows. Both write into the caller's tensor in place."""

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
    8-byte words (float64), first dimension kept: ``[N, H * D * itemsize / w]``
    when the heads of a row are contiguous and fill whole words together (two
    views, ~3 µs), else ``[N, H, D * itemsize / w]`` when each head's ``D``
    elements fill whole words; failing both (or unaligned), :func:`as_copyable`.

    ``index_copy_`` then moves 16- or 8-byte words: measured 2-3x faster than
    the native bfloat16 kernel and up to 3.5x faster for float32. It only
    moves them — no arithmetic — so the bits, NaN payloads and denormals
    included, arrive unchanged (a test copies every bfloat16 bit pattern this way).

    Two dimensions, not three, because of threads (measured on torch 2.13,
    2 threads): on ``[N, W]`` words ``index_copy_`` runs on one thread up to
    32,768 words (512 KiB of rows: a decode step of 64 rows of 16 x 128
    float32 takes 16 µs at any thread count) and in parallel above that
    (faster from the first word beyond: 11 µs against 18 µs at 33,280); on
    ``[N, H, W / H]`` it opened a parallel region from 8,192 words on,
    costing 2x on 2 threads (the same 64 rows: 31 µs against 16 µs)."""
    if t.dim() == 3 and t.stride(2) == 1:
        num, heads, dim = t.shape
        head_bytes = dim * t.element_size()
        contiguous_heads = heads == 1 or t.stride(1) == dim
        for word, size in _WORDS:
            try:
                if contiguous_heads and heads * head_bytes % size == 0:
                    return t.view(num, heads * dim).view(word)
                if head_bytes % size == 0:
                    return t.view(word)
            except RuntimeError:  # storage offset or a stride not a whole number of words
                continue
    return as_copyable(t)


def _index_on(rows: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``rows`` as an index tensor on ``like``'s device (shared with numpy on CPU)."""
    index = torch.from_numpy(rows)
    return index if like.is_cpu else index.to(like.device)


#: Row copies up to this many bytes run on one thread (numpy, below), bigger ones
#: with ``index_copy_`` in parallel when torch has more than one intra-op thread.
SERIAL_COPY_BYTES = 1 << 19  # 512 KiB: 32,768 16-byte words, at::internal::GRAIN_SIZE


def host_rows(t: torch.Tensor) -> np.ndarray:
    """A CPU ``[N, H, D]`` tensor as a numpy view ``[N, H, 1]`` of ``D *
    itemsize``-byte void items (no copy; 16-bit floats and float8 through a
    same-width integer view). Raises ``ValueError`` when ``D`` is strided."""
    if t.requires_grad:  # grad mode off: numpy() refuses such tensors
        t = t.detach()
    a = (t if t.dtype in _NUMPY_DTYPES else t.view(_BITS[t.element_size()])).numpy()  # [N, H, D]
    nbytes = a.shape[-1] * a.itemsize
    void = _VOIDS.get(nbytes) or _VOIDS.setdefault(nbytes, np.dtype((np.void, nbytes)))
    return a.view(void)


_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int8, torch.uint8, torch.int16, torch.int32}
_VOIDS: dict = {}  # bytes -> np.dtype((np.void, bytes))


def copy_rows_(flat: torch.Tensor, dst_rows: np.ndarray, rows: torch.Tensor) -> None:
    """``flat[dst_rows[i]] = rows[i]`` for every ``i`` (``dst_rows`` i64[n],
    validated), by one of two exact byte copies:

    * on CPU, up to :data:`SERIAL_COPY_BYTES` or on one intra-op thread:
      numpy's assignment of void items (one ``memcpy`` per head), always on
      the calling thread, with the least per-call work (~5 µs of views);
    * else one ``index_copy_`` of 16- or 8-byte words (:func:`as_rows`),
      which runs in parallel above 32,768 words.

    Why (measured on torch 2.13, 2 threads, a decode step of 64 rows of 16 x
    128 float32 = 512 KiB): torch's ``index_copy_`` of exactly 32,768 words
    opens a parallel region in which one thread works (44 µs against 28 µs
    on one thread), and whatever runs next meets a still-spinning worker;
    the numpy copy took 21-23 µs at any thread count. Above 512 KiB the
    parallel copy wins (2 MiB: 101 µs against 229 µs)."""
    if flat.is_cpu and rows.is_cpu and flat.dtype == rows.dtype and (
        rows.numel() * rows.element_size() <= SERIAL_COPY_BYTES or torch.get_num_threads() == 1
    ):
        try:
            host_rows(flat)[dst_rows] = host_rows(rows)
            return
        except ValueError:  # a strided last dimension: no void view
            pass
    copy_words_(flat, dst_rows, rows)


def copy_words_(flat: torch.Tensor, dst_rows: np.ndarray, rows: torch.Tensor) -> None:
    """:func:`copy_rows_` by one ``index_copy_`` of words (any device)."""
    index = _index_on(dst_rows, flat)
    dst, src = as_rows(flat), as_rows(rows)
    if dst.dtype is not src.dtype or dst.shape[1:] != src.shape[1:]:
        dst, src = as_copyable(flat), as_copyable(rows)
    dst.index_copy_(0, index, src)


_RUN = np.arange(1 << 14, dtype=np.int64)  # i64[16384]: 0, 1, 2, ...
_RUN_BYTES = _RUN.tobytes()


class RowPlan:
    """Where every copied row goes: the valid slices with ``len > 0``, packed
    end to end (the order of ``slice_indices``).

    Built from the valid columns ``i64[3, total]`` that
    ``torch_ops._validation.host_columns`` returns, and the lengths' range
    that ``validate_data`` returns (else it is found here); it runs on every
    eager call, so it does only the numpy work the row copy needs (a decode
    step, every slice one row, validated: none)."""

    def __init__(self, cols: np.ndarray, length_range: tuple[int, int] | None = None):
        # length_range: the lengths' (min, max) when validation computed them.
        dst, src, length = cols[0], cols[1], cols[2]  # i64[total] each (indexing is cheaper than unpacking)
        if length_range is None:
            decode, some_empty = bool((length == 1).all()), None
        else:
            decode, some_empty = length_range == (1, 1), length_range[0] == 0
        if decode:  # every slice is one row: nothing to drop or count
            num_rows = len(length)
        else:
            if some_empty or (some_empty is None and not length.all()):
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

    _last = (None, None)  # (cols, its plan): the plan of the last columns seen

    @classmethod
    def of(cls, cols: np.ndarray, length_range: tuple[int, int] | None = None) -> "RowPlan":
        """``RowPlan(cols, length_range)``, reused when ``cols`` is the very
        array of the last call (``torch_ops._validation.checked_columns``
        returns the same array for the same metadata: every layer of a model
        step). Plans and columns are never modified, so reuse is exact."""
        last_cols, plan = cls._last
        if cols is not last_cols:
            plan = cls(cols, length_range)
            cls._last = (cols, plan)
        return plan

    @functools.cached_property
    def packed_start(self) -> np.ndarray:
        """i64[n]: the first packed row of each slice."""
        return np.cumsum(self.length) - self.length

    @functools.cached_property
    def contiguous_source(self) -> bool:
        """Whether the slices read one contiguous run of the tokens, in order."""
        src = self.src
        if self._within is None:  # one row a slice: src must be src[0], src[0] + 1, ... (bytes compared: ~1 µs)
            return len(src) <= len(_RUN) and (src - src[0]).tobytes() == _RUN_BYTES[: 8 * len(src)]
        return bool((src[1:] - src[:-1] == self.length[:-1]).all())

    def source_rows(self, new_kv_tokens: torch.Tensor) -> torch.Tensor:
        """The source rows in packed order: ``new_kv_tokens`` itself or a view
        of it when the slices read one contiguous run of it in order
        (block-table layouts do), else a gather."""
        if self.contiguous_source:
            start = int(self.src[0])
            if start == 0 and self.num_rows == new_kv_tokens.shape[0]:
                return new_kv_tokens  # the whole tensor (no view to make)
            return new_kv_tokens.narrow(0, start, self.num_rows)
        src = self.src
        src_rows = src if self._within is None else np.repeat(src, self.length) + self._within
        return new_kv_tokens.index_select(0, _index_on(src_rows, new_kv_tokens))


def update_rows_(new_kv_tokens: torch.Tensor, plan: RowPlan, flat: torch.Tensor, convert=None) -> None:
    """``impl="auto"`` / ``"torch"`` on eager tensors: copy every named row
    with one row copy (:func:`copy_rows_`). ``convert``, when given, turns the source rows (in
    packed order) into ``flat``'s dtype as ``(start, rows)`` runs covering
    them (a quantized write: ``torch_ops._quantize.quantized_pieces``); all
    runs are converted before the first is copied, so a failure leaves
    ``flat`` untouched."""
    if plan.num_rows == 0:
        return
    rows = plan.source_rows(new_kv_tokens)  # [num_rows, H, D]
    if convert is None:
        copy_rows_(flat, plan.dst_rows, rows)
        return
    for start, run in list(convert(rows)):
        copy_rows_(flat, plan.dst_rows[start : start + run.shape[0]], run)


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
    plan: RowPlan,
    num_slices: int,
    flat: torch.Tensor,
    *,
    impl: str,
    page_size: int,
    slices_per_processing_page: int,
) -> None:
    """``impl`` in ``jax``/``scan``/``pallas_interpret`` on eager tensors: the
    JAX code on a staging cache, then one ``index_copy_`` into ``flat``."""
    if plan.num_rows == 0:
        return
    rows = staged_update(
        new_kv_tokens, plan, num_slices, impl=impl, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page,
    )
    copy_rows_(flat, plan.dst_rows, rows.to(flat.device))
