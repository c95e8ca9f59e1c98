"""Block table → slice indices for the KV cache update, in torch (CPU or XLA).

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
block table's columns, and (with ``num_pages``) physical pages outside
``[0, num_pages)`` raise ``ValueError``. On other devices (XLA, CUDA) nothing is
read back: a batch needing more than ``max_num_slices`` slices returns the first
``max_num_slices`` and the *true* count in ``total_update_slices`` (greater than
``max_num_slices``, so the update op's validation rejects it), and out-of-range
pages are clamped into the block table (garbage in, garbage out).
"""

from __future__ import annotations

import torch

from jax_kernels import max_num_slices_bound  # noqa: F401  (re-exported: one implementation)


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
    block table's columns, or block-table entries used outside ``[0, num_pages)``.
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
    int32 = torch.int32
    if num_reqs == 0 or max_pages_per_req == 0:
        if device.type == "cpu" and num_reqs and int(num_new_tokens.max()) > 0:
            raise ValueError(
                f"block_table has no columns (shape {tuple(block_table.shape)}) but "
                f"num_new_tokens has tokens to write"
            )
        return (
            torch.zeros((3, max_num_slices), dtype=int32, device=device),
            torch.zeros((1,), dtype=int32, device=device),
        )

    if device.type == "cpu":
        _check_values_on_host(block_table, start_positions, num_new_tokens, page_size, num_pages)

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

    if device.type == "cpu" and int(total[0]) > max_num_slices:
        raise ValueError(
            f"the batch needs {int(total[0])} slices but {max_num_slices=}; raise max_num_slices "
            f"(max_num_slices_bound gives a safe value)"
        )
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
    bad = used & (entries < 0)
    if num_pages is not None:
        bad |= used & (entries >= num_pages)
    if bool(bad.any()):
        b, p = (int(i) for i in divmod(int(torch.argmax(bad.flatten().to(torch.int8))), max_pages))
        bound = f"in [0, {num_pages=})" if num_pages is not None else "non-negative"
        raise ValueError(
            f"block_table[{b}, {p}]={int(entries[b, p])} is used by request {b} but must be {bound}"
        )
