"""torch_ops.page_tables: block table → slice indices, vs the reference, on CPU and XLA."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_kernels as jk
from jax_kernels.reference import slice_indices_from_block_table_reference as reference
from torch_ops.page_tables import max_num_slices_bound, slice_indices_from_block_table


def random_batch(rng, *, num_reqs, page_size, pages_per_req, num_pages):
    """Ragged lengths, mid-page starts, multi-page prefills, 1-token decodes and empty requests."""
    capacity = pages_per_req * page_size
    kinds = rng.choice(["prefill", "decode", "empty", "chunk"], num_reqs)
    counts, starts = [], []
    for kind in kinds:
        if kind == "empty":
            n, s = 0, int(rng.integers(0, capacity))
        elif kind == "decode":
            n, s = 1, int(rng.integers(0, capacity))
        elif kind == "prefill":
            n, s = int(rng.integers(1, capacity + 1)), 0
        else:  # a chunk starting mid-page
            n = int(rng.integers(1, capacity))
            s = int(rng.integers(0, capacity - n + 1))
        counts.append(n)
        starts.append(s)
    table = np.stack([rng.permutation(num_pages)[:pages_per_req] for _ in range(num_reqs)])
    return table, np.array(starts), np.array(counts)


def as_torch(table, starts, counts, device="cpu", dtype=torch.int32):
    return tuple(torch.as_tensor(np.asarray(x), dtype=dtype).to(device) for x in (table, starts, counts))


def check_against_reference(table, starts, counts, *, page_size, max_num_slices, device="cpu", dtype=torch.int32):
    want_idx, want_total = reference(table, starts, counts, page_size=page_size, max_num_slices=max_num_slices)
    idx, total = slice_indices_from_block_table(
        *as_torch(table, starts, counts, device, dtype), page_size=page_size, max_num_slices=max_num_slices
    )
    assert idx.dtype == torch.int32 and total.dtype == torch.int32
    assert tuple(idx.shape) == (3, max_num_slices) and tuple(total.shape) == (1,)
    assert idx.device.type == torch.device(device).type
    np.testing.assert_array_equal(idx.cpu().numpy(), want_idx)
    np.testing.assert_array_equal(total.cpu().numpy(), want_total)
    return idx, total


# --------------------------------------------------------------------------- CPU vs reference


@pytest.mark.parametrize("page_size", [1, 3, 4, 16])
def test_random_batches_match_reference(page_size):
    rng = np.random.default_rng(page_size)
    for num_reqs in (1, 2, 5, 9):
        for dtype in (torch.int32, torch.int64):
            table, starts, counts = random_batch(rng, num_reqs=num_reqs, page_size=page_size, pages_per_req=6, num_pages=64)
            bound = max_num_slices_bound(num_reqs, max(int(counts.sum()), 1), page_size)
            for max_num_slices in (bound, bound + 7):
                check_against_reference(table, starts, counts, page_size=page_size, max_num_slices=max_num_slices, dtype=dtype)


@st.composite
def batches(draw):
    page_size = draw(st.sampled_from([1, 2, 3, 4, 8]))
    pages_per_req = draw(st.integers(1, 5))
    num_reqs = draw(st.integers(1, 6))
    capacity = pages_per_req * page_size
    starts, counts = [], []
    for _ in range(num_reqs):
        n = draw(st.integers(0, capacity))
        starts.append(draw(st.integers(0, capacity - n)) if n else draw(st.integers(0, capacity)))
        counts.append(n)
    num_pages = num_reqs * pages_per_req + 3
    table = draw(st.permutations(range(num_pages)))[: num_reqs * pages_per_req]
    table = np.array(table).reshape(num_reqs, pages_per_req)
    extra = draw(st.integers(0, 4))
    return table, np.array(starts), np.array(counts), page_size, extra


@settings(max_examples=150, deadline=None)
@given(batches())
def test_hypothesis_batches_match_reference(batch):
    table, starts, counts, page_size, extra = batch
    needed = int(reference(table, starts, counts, page_size=page_size, max_num_slices=10**4)[1][0])
    check_against_reference(table, starts, counts, page_size=page_size, max_num_slices=needed + extra)


def test_hand_written_cases():
    table = np.array([[7, 3, 9], [2, 5, 1], [4, 6, 8], [0, 10, 11]])
    starts = np.array([3, 4, 0, 8])  # mid-page, page boundary, fresh, a later page
    counts = np.array([6, 1, 0, 2])  # spans three pages, decode, empty, within one page
    idx, total = check_against_reference(table, starts, counts, page_size=4, max_num_slices=7)
    assert total.tolist() == [5]
    assert idx[:, :5].T.tolist() == [
        [7 * 4 + 3, 0, 1],  # request 0: position 3 (page 0 → 7), 1 token
        [3 * 4 + 0, 1, 4],  # request 0: positions 4..7 (page 1 → 3)
        [9 * 4 + 0, 5, 1],  # request 0: position 8 (page 2 → 9)
        [5 * 4 + 0, 6, 1],  # request 1: position 4 (page 1 → 5), decode
        [11 * 4 + 0, 7, 2],  # request 3: positions 8, 9 (page 2 → 11); request 2 is empty
    ]
    assert idx[:, 5:].abs().sum() == 0


def test_all_empty_and_no_requests():
    idx, total = slice_indices_from_block_table(
        torch.zeros(3, 2, dtype=torch.int32), torch.tensor([0, 5, 2]), torch.zeros(3, dtype=torch.int32),
        page_size=4, max_num_slices=5,
    )
    assert total.tolist() == [0] and idx.abs().sum() == 0
    idx, total = slice_indices_from_block_table(
        torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
        page_size=4, max_num_slices=3,
    )
    assert total.tolist() == [0] and idx.shape == (3, 3) and idx.abs().sum() == 0


# --------------------------------------------------------------------------- CPU errors


def test_too_many_slices_raises_naming_max_num_slices():
    table, starts, counts = as_torch([[0, 1, 2], [3, 4, 5]], [3, 3], [6, 6])
    with pytest.raises(ValueError, match=r"needs 6 slices but max_num_slices=5"):
        slice_indices_from_block_table(table, starts, counts, page_size=4, max_num_slices=5)


def test_negative_inputs_raise_naming_the_argument():
    table, starts, counts = as_torch([[0, 1], [2, 3]], [0, 1], [2, 1])
    with pytest.raises(ValueError, match=r"start_positions\[1\]=-3 must be non-negative"):
        slice_indices_from_block_table(table, torch.tensor([0, -3]), counts, page_size=4, max_num_slices=4)
    with pytest.raises(ValueError, match=r"num_new_tokens\[0\]=-1 must be non-negative"):
        slice_indices_from_block_table(table, starts, torch.tensor([-1, 1]), page_size=4, max_num_slices=4)
    with pytest.raises(ValueError, match=r"block_table\[1, 0\]=-2 is used by request 1 but must be non-negative"):
        slice_indices_from_block_table(torch.tensor([[0, 1], [-2, 3]]), starts, counts, page_size=4, max_num_slices=4)
    # Negative padding in columns no request touches is fine.
    slice_indices_from_block_table(torch.tensor([[0, -1], [2, -1]]), starts, counts, page_size=4, max_num_slices=4)


def test_entries_whose_rows_pass_int32_are_refused_not_wrapped():
    # int64 entries cast to int32 wrap: 2**32 + 3 became page 3 (dst 12), and 2**29 * 4 became -2**31.
    starts, counts = torch.tensor([0, 1]), torch.tensor([2, 1])
    limit = 2**31 // 4  # page_size 4
    for entry in (2**32 + 3, limit):
        table = torch.tensor([[0, 1], [entry, 3]], dtype=torch.int64)
        with pytest.raises(ValueError, match=rf"block_table\[1, 0\]={entry} is used by request 1 but must be below "
                                             rf"2\*\*31 // page_size=4 = {limit}, so that its rows fit int32"):
            slice_indices_from_block_table(table, starts, counts, page_size=4, max_num_slices=4)
        with pytest.raises(ValueError, match=rf"block_table\[1, 0\]={entry} is not a page of the cache: it must be below"):
            jk.slice_indices_from_block_table(table.numpy(), starts.numpy(), counts.numpy(), page_size=4, max_num_slices=4)
    table = torch.tensor([[0, 1], [limit - 1, 3]], dtype=torch.int64)  # the last page whose rows fit
    idx, total = slice_indices_from_block_table(table, starts, counts, page_size=4, max_num_slices=4)
    assert idx[0, 1].item() == (limit - 1) * 4 + 1  # request 1 starts at position 1 of its page
    jidx, _ = jk.slice_indices_from_block_table(table.numpy(), starts.numpy(), counts.numpy(), page_size=4, max_num_slices=4)
    assert np.asarray(jidx).tolist() == idx.tolist()


def test_num_pages_violations_name_block_table():
    table, starts, counts = as_torch([[0, 9, 1], [2, 3, 4]], [2, 0], [4, 3])
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]=9 is used by request 0 but must be in \[0, num_pages=8\)"):
        slice_indices_from_block_table(table, starts, counts, page_size=4, max_num_slices=4, num_pages=8)
    # Entry 9 is fine with 10 pages, and unused entries are never checked.
    slice_indices_from_block_table(table, starts, counts, page_size=4, max_num_slices=4, num_pages=10)
    slice_indices_from_block_table(table, starts, torch.tensor([1, 3]), page_size=4, max_num_slices=4, num_pages=5)


def test_positions_beyond_the_block_table_raise():
    table, starts, counts = as_torch([[0, 1]], [6], [3])
    with pytest.raises(ValueError, match=r"logical page 2.*block_table has only 2 columns"):
        slice_indices_from_block_table(table, starts, counts, page_size=4, max_num_slices=4)


def test_argument_validation():
    table, starts, counts = as_torch([[0, 1]], [0], [3])
    kw = dict(page_size=4, max_num_slices=4)
    with pytest.raises(ValueError, match="page_size=0 must be positive"):
        slice_indices_from_block_table(table, starts, counts, page_size=0, max_num_slices=4)
    with pytest.raises(ValueError, match="max_num_slices=-1 must be non-negative"):
        slice_indices_from_block_table(table, starts, counts, page_size=4, max_num_slices=-1)
    with pytest.raises(TypeError, match="max_num_slices=4.0 must be a Python int"):
        slice_indices_from_block_table(table, starts, counts, page_size=4, max_num_slices=4.0)
    with pytest.raises(ValueError, match="num_pages=0 must be positive"):
        slice_indices_from_block_table(table, starts, counts, num_pages=0, **kw)
    with pytest.raises(TypeError, match="block_table must have an integer dtype"):
        slice_indices_from_block_table(table.float(), starts, counts, **kw)
    with pytest.raises(ValueError, match=r"start_positions must be \[num_reqs=1\]"):
        slice_indices_from_block_table(table, torch.zeros(2, dtype=torch.int32), counts, **kw)
    with pytest.raises(ValueError, match="block_table must be"):
        slice_indices_from_block_table(table[0], starts, counts, **kw)
    with pytest.raises(ValueError, match="one device"):
        slice_indices_from_block_table(table, starts, counts.to("meta"), **kw)
    with pytest.raises(TypeError, match="num_new_tokens must be a torch.Tensor"):
        slice_indices_from_block_table(table, starts, [3], **kw)


# --------------------------------------------------------------------------- the bound


@functools.cache
def worst_pages(n: int, page_size: int) -> int:
    """Most pages a request of n tokens touches, over every start offset (via the reference)."""
    best = 0
    for offset in range(page_size):
        table = np.arange(n // page_size + 2)[None, :]
        _, total = reference(table, [offset], [n], page_size=page_size, max_num_slices=n + 2)
        best = max(best, int(total[0]))
    return best


@pytest.mark.parametrize("page_size", [1, 2, 3, 4, 5])
def test_bound_is_a_true_upper_bound(page_size):
    max_reqs, max_tokens = 5, 14
    # most[r][t]: the most slices r requests holding t tokens in total can need.
    most = np.full((max_reqs + 1, max_tokens + 1), -1)
    most[0][0] = 0
    for r in range(1, max_reqs + 1):
        for t in range(max_tokens + 1):
            most[r][t] = max(most[r - 1][t - n] + worst_pages(n, page_size) for n in range(t + 1) if most[r - 1][t - n] >= 0)
    attained = False
    for r in range(max_reqs + 1):
        for t in range(max_tokens + 1):
            worst = max(most[rr][tt] for rr in range(r + 1) for tt in range(t + 1))
            bound = max_num_slices_bound(r, t, page_size)
            assert worst <= bound, (r, t, page_size)
            attained |= worst == bound and t > 0
    assert attained  # the bound is tight somewhere, not merely large


def test_bound_formula_and_validation():
    assert max_num_slices_bound(4, 100, 16) == min(2 * 4 + 100 // 16, 100) == 14
    assert max_num_slices_bound(8, 5, 16) == 5
    with pytest.raises(ValueError, match="page_size=0 must be positive"):
        max_num_slices_bound(1, 1, 0)
    with pytest.raises(ValueError, match="max_num_reqs=-1 must be non-negative"):
        max_num_slices_bound(-1, 1, 1)


# --------------------------------------------------------------------------- torch vs JAX


def test_torch_and_jax_versions_are_identical():
    jk = pytest.importorskip("jax_kernels.block_table", reason="jax_kernels.block_table not importable yet")
    rng = np.random.default_rng(7)
    for page_size in (1, 4, 16):
        for num_reqs in (1, 4, 9):
            table, starts, counts = random_batch(rng, num_reqs=num_reqs, page_size=page_size, pages_per_req=6, num_pages=64)
            table, starts, counts = (x.astype(np.int32) for x in (table, starts, counts))
            bound = max_num_slices_bound(num_reqs, max(int(counts.sum()), 1), page_size)
            idx_t, total_t = slice_indices_from_block_table(
                *as_torch(table, starts, counts), page_size=page_size, max_num_slices=bound
            )
            idx_j, total_j = jk.slice_indices_from_block_table(table, starts, counts, page_size=page_size, max_num_slices=bound)
            assert np.asarray(idx_j).dtype == np.int32
            np.testing.assert_array_equal(idx_t.numpy(), np.asarray(idx_j))
            np.testing.assert_array_equal(total_t.numpy(), np.asarray(total_j))
            assert jk.max_num_slices_bound(num_reqs, int(counts.sum()), page_size) == max_num_slices_bound(
                num_reqs, int(counts.sum()), page_size
            )


# --------------------------------------------------------------------------- XLA

XLA_SHAPE = dict(num_reqs=6, page_size=4, pages_per_req=5, num_pages=40)
XLA_SLICES = max_num_slices_bound(6, 6 * 5 * 4, 4)


def test_xla_matches_reference(xla_device):
    rng = np.random.default_rng(11)
    for _ in range(4):  # one shape: one compile
        table, starts, counts = random_batch(rng, **XLA_SHAPE)
        check_against_reference(table, starts, counts, page_size=4, max_num_slices=XLA_SLICES, device=xla_device)


def test_xla_does_not_sync(xla_device):
    import torch_xla
    import torch_xla.debug.metrics as met

    table, starts, counts = as_torch(*random_batch(np.random.default_rng(3), **XLA_SHAPE), device=xla_device)
    torch_xla.sync()
    met.clear_all()
    idx, total = slice_indices_from_block_table(table, starts, counts, page_size=4, max_num_slices=XLA_SLICES, num_pages=40)
    assert "TransferFromDeviceTime" not in met.metric_names()
    assert "TransferToDeviceTime" not in met.metric_names()
    assert "ExecuteComputation" not in met.counter_names()
    assert not [c for c in met.counter_names() if c.startswith("aten::")]  # no CPU fallbacks
    assert idx.device.type == "xla" and tuple(idx.shape) == (3, XLA_SLICES)


def test_xla_too_many_slices_returns_the_true_count(xla_device):
    table, starts, counts = [[0, 1, 2], [3, 4, 5]], [3, 3], [6, 6]
    want_idx, want_total = reference(table, starts, counts, page_size=4, max_num_slices=10)
    idx, total = slice_indices_from_block_table(*as_torch(table, starts, counts, xla_device), page_size=4, max_num_slices=5)
    assert total.cpu().tolist() == want_total.tolist() == [6]  # > max_num_slices: the update op rejects it
    np.testing.assert_array_equal(idx.cpu().numpy(), want_idx[:, :5])
