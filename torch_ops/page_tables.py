"""Paging metadata → slice indices for the KV cache update, in torch (CPU or XLA).

Three front ends, each the twin of the ``jax_kernels`` function of the same
name (bit-identical results): :func:`slice_indices_from_block_table` (below),
:func:`slice_indices_from_slot_mapping` (a cache row per token, ``-1`` =
padding: vLLM's GPU backends, transformers, sglang-jax) and
:func:`slice_indices_from_ragged_metadata` (tpu-inference's ragged paged
attention arrays, which is the block-table math with ``start = kv_len - q_len``).
The last two run the ``jax_kernels`` host checks on CPU tensors' data and
nothing on other devices.

:func:`slice_indices_from_block_table` turns vLLM-style paging metadata
(a block table, start positions and new-token counts per request) into the
``(slice_indices, total_update_slices)`` pair the update kernel consumes:

* request ``b``'s new tokens are rows ``[sum(n[:b]), sum(n[:b+1]))`` of
  ``new_kv_tokens`` and go to its logical positions ``start[b], start[b]+1, ...``;
* logical page ``p`` of request ``b`` is physical page ``block_table[b, p]``;
* one slice ``(dst, src, len)`` per (request, touched page), requests in order
  then pages in order, so no slice crosses a page; remaining columns are zero.

It is pure vectorized torch with static shapes (no ``.item()``, ``.cpu()``,
``nonzero`` or data-dependent shapes), so on XLA it stays in the lazy graph and
never makes the host wait for the device. The formulation matches
``jax_kernels.slice_indices_from_block_table`` step for step, so the two agree
bit for bit; the plain-Python reference is
``jax_kernels.reference.slice_indices_from_block_table_reference``.

Value checks need the data on the host, so they run only for CPU tensors:
negative inputs, more slices than ``max_num_slices``, logical pages beyond the
block table's columns, and physical pages outside ``[0, num_pages)`` (with
``num_pages``) or at least ``2**31 // page_size`` (their rows would pass
int32, and wrap to another page's) raise ``ValueError``. On other devices (XLA, CUDA) nothing is
read back: a batch needing more than ``max_num_slices`` slices returns the first
``max_num_slices`` and the *true* count in ``total_update_slices`` (greater than
``max_num_slices``, so the update op's validation rejects it), and out-of-range
pages are clamped into the block table (garbage in, garbage out).
"""

from __future__ import annotations

import torch

from jax_kernels import max_num_slices_bound  # noqa: F401  (re-exported: one implementation)
from jax_kernels import ragged_metadata as _jk_ragged
from jax_kernels import slot_mapping as _jk_slots
from jax_kernels.block_table import page_entry_bound, page_entry_limit


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be a Python int")
    if value < minimum:
        raise ValueError(f"{name}={value} must be {'positive' if minimum == 1 else 'non-negative'}")


def slice_indices_from_block_table(
    block_table: torch.Tensor,  # int[B, max_pages_per_req]
    start_positions: torch.Tensor,  # int[B]
    num_new_tokens: torch.Tensor,  # int[B]
    *,
    page_size: int,
    max_num_slices: int,
    num_pages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (i32[3, max_num_slices], i32[1])
    """Slice indices ``(dst, src, len)`` for writing each request's new tokens into its pages.

    Returns ``slice_indices`` (int32 ``[3, max_num_slices]``, rows dst/src/len,
    unused columns zero) and ``total_update_slices`` (int32 ``[1]``), on the
    inputs' device. Inputs are integer tensors on one device (CPU or XLA; any
    torch device works). ``num_pages`` (optional) is the number of physical
    pages in the cache, checked on CPU only.

    On CPU raises ``ValueError`` (naming the argument) for negative inputs, a
    batch needing more than ``max_num_slices`` slices, logical pages beyond the
    block table's columns, or block-table entries used outside ``[0, num_pages)``
    (and in any case ``[0, 2**31 // page_size)``: ``jax_kernels.block_table.page_entry_limit``).
    Off CPU it never reads data back; see the module docstring for what it
    returns for such inputs.
    """
    _check_int("page_size", page_size, minimum=1)
    _check_int("max_num_slices", max_num_slices, minimum=0)
    if num_pages is not None:
        _check_int("num_pages", num_pages, minimum=1)
    _check_tensors(block_table, start_positions, num_new_tokens)

    device = block_table.device
    num_reqs, max_pages_per_req = block_table.shape
    if num_reqs and max_pages_per_req == 0 and device.type == "cpu" and int(num_new_tokens.max()) > 0:
        raise ValueError(
            f"block_table has no columns (shape {tuple(block_table.shape)}) but "
            f"num_new_tokens has tokens to write"
        )
    if device.type == "cpu" and num_reqs and max_pages_per_req:
        _check_values_on_host(block_table, start_positions, num_new_tokens, page_size, num_pages)

    slice_indices, total = _block_table_slices(
        block_table, start_positions, num_new_tokens, page_size=page_size, max_num_slices=max_num_slices
    )
    if device.type == "cpu" and int(total[0]) > max_num_slices:
        raise ValueError(
            f"the batch needs {int(total[0])} slices but {max_num_slices=}; raise max_num_slices "
            f"(max_num_slices_bound gives a safe value)"
        )
    return slice_indices, total


def _block_table_slices(
    block_table: torch.Tensor,  # int[B, max_pages_per_req]
    start_positions: torch.Tensor,  # int[B]
    num_new_tokens: torch.Tensor,  # int[B]
    *,
    page_size: int,
    max_num_slices: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (i32[3, max_num_slices], i32[1])
    """The block-table slice math (no checks), shared by every front end here."""
    device = block_table.device
    num_reqs, max_pages_per_req = block_table.shape
    int32 = torch.int32
    if num_reqs == 0 or max_pages_per_req == 0:
        return (
            torch.zeros((3, max_num_slices), dtype=int32, device=device),
            torch.zeros((1,), dtype=int32, device=device),
        )

    table = block_table.to(int32)  # i32[B, max_pages]
    starts = start_positions.to(int32)  # i32[B]
    counts = num_new_tokens.to(int32)  # i32[B]

    first_page = starts // page_size  # i32[B]
    last_page = (starts + counts - 1) // page_size  # i32[B], floor division
    pages_touched = (counts > 0).to(int32) * (last_page - first_page + 1)  # i32[B]
    pages_cum = torch.cumsum(pages_touched, dim=0, dtype=int32)  # i32[B], inclusive
    token_offset = torch.cumsum(counts, dim=0, dtype=int32) - counts  # i32[B], exclusive
    total = pages_cum[-1:]  # i32[1]

    column = torch.arange(max_num_slices, dtype=int32, device=device)  # i32[S]
    # Request of each column: how many requests' slices end at or before it.
    req = (pages_cum[None, :] <= column[:, None]).to(int32).sum(dim=1, dtype=int32)  # i32[S]
    valid = column < total  # bool[S]
    req = torch.clamp(req, max=num_reqs - 1)  # i32[S]; padding columns point at the last request

    page_in_req = column - (pages_cum[req] - pages_touched[req])  # i32[S]
    logical_page = first_page[req] + page_in_req  # i32[S]
    req_start = starts[req]  # i32[S]
    pos = torch.maximum(req_start, logical_page * page_size)  # i32[S]
    end = torch.minimum(req_start + counts[req], (logical_page + 1) * page_size)  # i32[S]
    length = end - pos  # i32[S]
    safe_page = torch.clamp(logical_page, min=0, max=max_pages_per_req - 1)  # i32[S]
    physical_page = table[req, safe_page]  # i32[S]
    dst = physical_page * page_size + pos % page_size  # i32[S]
    src = token_offset[req] + pos - req_start  # i32[S]

    columns = torch.stack([dst, src, length])  # i32[3, S]
    slice_indices = torch.where(valid[None, :], columns, torch.zeros_like(columns))  # i32[3, S]

    return slice_indices, total.clone()


def _check_tensors(block_table, start_positions, num_new_tokens) -> None:
    named = (
        ("block_table", block_table),
        ("start_positions", start_positions),
        ("num_new_tokens", num_new_tokens),
    )
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if block_table.ndim != 2:
        raise ValueError(
            f"block_table must be [num_reqs, max_pages_per_req], got shape {tuple(block_table.shape)}"
        )
    num_reqs = block_table.shape[0]
    for name, t in named[1:]:
        if tuple(t.shape) != (num_reqs,):
            raise ValueError(
                f"{name} must be [num_reqs={num_reqs}] (block_table.shape[0]), got shape "
                f"{tuple(t.shape)}"
            )
    devices = {t.device for _, t in named}
    if len(devices) != 1:
        raise ValueError(
            f"block_table, start_positions and num_new_tokens must be on one device, got "
            f"{sorted(map(str, devices))}"
        )


def _check_values_on_host(block_table, start_positions, num_new_tokens, page_size, num_pages):
    """CPU-only value checks (host data, no sync). Raises ValueError naming the argument."""
    for name, t in (("start_positions", start_positions), ("num_new_tokens", num_new_tokens)):
        if bool((t < 0).any()):
            b = int(torch.argmax((t < 0).to(torch.int8)))
            raise ValueError(f"{name}[{b}]={int(t[b])} must be non-negative")
    starts = start_positions.to(torch.int64)
    counts = num_new_tokens.to(torch.int64)
    active = counts > 0
    last = starts + counts - 1
    if bool((last >= 2**31).any()):
        raise ValueError("start_positions + num_new_tokens must stay below 2**31 (int32 positions)")
    first_page = starts // page_size
    last_page = last // page_size
    max_pages = block_table.shape[1]
    too_far = active & (last_page >= max_pages)
    if bool(too_far.any()):
        b = int(torch.argmax(too_far.to(torch.int8)))
        raise ValueError(
            f"request {b} writes positions up to {int(last[b])}, logical page {int(last_page[b])}, "
            f"but block_table has only {max_pages} columns (shape {tuple(block_table.shape)})"
        )
    # Entries actually used: columns first_page[b]..last_page[b] of active rows.
    col = torch.arange(max_pages)
    used = active[:, None] & (col[None, :] >= first_page[:, None]) & (col[None, :] <= last_page[:, None])
    entries = block_table.to(torch.int64)
    bad = used & ((entries < 0) | (entries >= page_entry_limit(page_size, num_pages)))
    if bool(bad.any()):
        b, p = (int(i) for i in divmod(int(torch.argmax(bad.flatten().to(torch.int8))), max_pages))
        raise ValueError(
            f"block_table[{b}, {p}]={int(entries[b, p])} is used by request {b} but must be "
            f"{page_entry_bound(int(entries[b, p]), page_size, num_pages)}"
        )


def slice_indices_from_slot_mapping(
    slot_mapping: torch.Tensor,  # int[T]
    *,
    page_size: int,
    max_num_slices: int,
    num_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (i32[3, max_num_slices], i32[1])
    """Slice indices for new tokens whose cache rows a slot mapping names.

    ``slot_mapping[t]`` is the flat cache row token ``t`` goes to; ``-1`` marks
    padding, skipped. Consecutive tokens going to consecutive rows of one page
    merge into one slice ``(slot_mapping[t0], t0, len)``, never crossing a page;
    slices in token order, remaining columns zero. Returns int32 tensors on
    ``slot_mapping``'s device. ``max_num_slices = len(slot_mapping)`` always
    suffices. Same checks as ``jax_kernels.slice_indices_from_slot_mapping``
    (``TypeError`` for a non-integer ``slot_mapping``, ``ValueError`` for a
    wrong rank) on every call; on CPU tensors also the value checks (a slot
    below ``-1``, duplicate slots, a slot ``>= num_rows`` when given, more
    slices than ``max_num_slices``). Off CPU nothing is read back: negative
    slots count as padding and ``total_update_slices`` holds the true count.
    """
    _check_int("page_size", page_size, minimum=1)
    _check_int("max_num_slices", max_num_slices, minimum=0)
    if num_rows is not None:
        _check_int("num_rows", num_rows, minimum=1)
    if not isinstance(slot_mapping, torch.Tensor):
        raise TypeError(f"slot_mapping must be a torch.Tensor, got {type(slot_mapping).__name__}")
    _jk_slots.check_slot_mapping_static(tuple(slot_mapping.shape), slot_mapping.dtype)
    on_cpu = slot_mapping.device.type == "cpu"
    if on_cpu:
        _jk_slots.check_slot_mapping_values(slot_mapping.numpy(), num_rows=num_rows)

    device = slot_mapping.device
    int32 = torch.int32
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return (
            torch.zeros((3, max_num_slices), dtype=int32, device=device),
            torch.zeros((1,), dtype=int32, device=device),
        )
    slot = slot_mapping.to(int32)  # i32[T]
    valid = slot >= 0  # bool[T]
    prev = torch.cat([torch.full((1,), -1, dtype=int32, device=device), slot[:-1]])  # i32[T]
    # Token t extends token t-1's slice: both real, the next row, and not the first row of a page.
    continues = valid & (prev >= 0) & (slot == prev + 1) & (slot % page_size != 0)  # bool[T]
    starts = valid & ~continues  # bool[T]
    ends = valid & ~torch.cat([continues[1:], torch.zeros((1,), dtype=torch.bool, device=device)])  # bool[T]
    slice_id = torch.cumsum(starts.to(int32), dim=0, dtype=int32) - 1  # i32[T]
    total = slice_id[-1:] + 1  # i32[1]
    token = torch.arange(num_tokens, dtype=int32, device=device)  # i32[T]
    # Column of each slice's first / last token; everything else goes to a dump column S, dropped below.
    first_col = torch.where(starts, torch.clamp(slice_id, max=max_num_slices), max_num_slices)  # i32[T]
    last_col = torch.where(ends, torch.clamp(slice_id, max=max_num_slices), max_num_slices)  # i32[T]
    dump = torch.zeros((max_num_slices + 1,), dtype=int32, device=device)  # i32[S + 1]
    first = dump.scatter(0, first_col.to(torch.int64), token)[:max_num_slices]  # i32[S]
    last = dump.scatter(0, last_col.to(torch.int64), token)[:max_num_slices]  # i32[S]
    live = torch.arange(max_num_slices, dtype=int32, device=device) < total  # bool[S]
    columns = torch.stack([slot[first], first, last - first + 1])  # i32[3, S]
    slice_indices = torch.where(live[None, :], columns, torch.zeros_like(columns))  # i32[3, S]

    if on_cpu:
        _jk_slots.check_num_slices(int(total[0]), max_num_slices, num_tokens)
    return slice_indices, total


def slice_indices_from_ragged_metadata(
    page_indices: torch.Tensor,  # int[max_num_seqs * pages_per_seq]
    cu_q_lens: torch.Tensor,  # int[max_num_seqs + 1]
    kv_lens: torch.Tensor,  # int[max_num_seqs]
    num_seqs: torch.Tensor,  # int[1]
    *,
    page_size: int,
    pages_per_seq: int,
    max_num_slices: int,
    num_pages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (i32[3, max_num_slices], i32[1])
    """Slice indices from tpu-inference's ragged-paged-attention metadata.

    Request ``i < num_seqs[0]`` owns rows ``[cu_q_lens[i], cu_q_lens[i+1])`` of
    ``new_kv_tokens``, at positions ``kv_lens[i] - q_len ... kv_lens[i] - 1``;
    its logical page ``p`` is physical page ``page_indices[i * pages_per_seq +
    p]``. One slice per (request, touched page); remaining columns zero.
    Returns int32 tensors on the inputs' device. See
    ``jax_kernels.slice_indices_from_ragged_metadata`` for the arrays' meaning
    in tpu-inference and the checks, which run on every call for shapes and
    dtypes and, for CPU tensors, on the values; off CPU nothing is read back
    and ``total_update_slices`` holds the true count.
    """
    _check_int("page_size", page_size, minimum=1)
    _check_int("pages_per_seq", pages_per_seq, minimum=1)
    _check_int("max_num_slices", max_num_slices, minimum=0)
    if num_pages is not None:
        _check_int("num_pages", num_pages, minimum=1)
    named = (("page_indices", page_indices), ("cu_q_lens", cu_q_lens), ("kv_lens", kv_lens), ("num_seqs", num_seqs))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _jk_ragged.check_ragged_metadata_static(
        [tuple(t.shape) for _, t in named], [t.dtype for _, t in named], pages_per_seq=pages_per_seq
    )
    devices = {t.device for _, t in named}
    if len(devices) != 1:
        raise ValueError(
            f"page_indices, cu_q_lens, kv_lens and num_seqs must be on one device, got {sorted(map(str, devices))}"
        )
    device = page_indices.device
    on_cpu = device.type == "cpu"
    if on_cpu:
        _jk_ragged.check_ragged_metadata_values(
            *(t.numpy() for _, t in named), page_size=page_size, pages_per_seq=pages_per_seq, num_pages=num_pages
        )

    int32 = torch.int32
    table = page_indices.to(int32).reshape(-1, pages_per_seq)  # i32[N, pages_per_seq]
    cu = cu_q_lens.to(int32)  # i32[N + 1]
    live = torch.arange(table.shape[0], dtype=int32, device=device) < num_seqs.to(int32)[0]  # bool[N]
    q_lens = torch.where(live, cu[1:] - cu[:-1], 0)  # i32[N]
    starts = torch.where(live, kv_lens.to(int32) - q_lens, 0)  # i32[N]
    indices, total = _block_table_slices(
        table, starts, q_lens, page_size=page_size, max_num_slices=max_num_slices
    )  # i32[3, S], i32[1]; sources count from 0
    used = torch.arange(max_num_slices, dtype=int32, device=device) < total  # bool[S]
    offset = torch.where(used, cu[0], 0)  # i32[S]: the first request's query row
    indices = torch.cat([indices[:1], indices[1:2] + offset, indices[2:]])  # i32[3, S]

    if on_cpu:
        _jk_ragged.check_num_slices(int(total[0]), max_num_slices)
    return indices, total
