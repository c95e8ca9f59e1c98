"""slice_indices_from_ragged_metadata (JAX and torch): tpu-inference's metadata vs the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_kernels as jk
import torch_ops
from jax_kernels.reference import slice_indices_from_ragged_metadata_reference as reference

MAX_NUM_SEQS, PAGES_PER_SEQ = 6, 4
HEADS, HEAD_DIM = 2, 8


def random_ragged_batch(rng, *, page_size, num_pages, max_num_seqs=MAX_NUM_SEQS, pages_per_seq=PAGES_PER_SEQ):
    """The arrays as tpu-inference's runner builds them: ``num_seqs`` live requests
    (multi-page prefills from 0, chunks resuming mid-page, 1-token decodes,
    zero-token requests), ``cu_q_lens`` repeating its last value past them,
    ``kv_lens`` 0 and ``page_indices`` rows 0 past them; a live request's unused
    page entries are left 0 too."""
    num_seqs = int(rng.integers(0, max_num_seqs + 1))
    capacity = pages_per_seq * page_size
    q_lens, kv_lens = np.zeros(max_num_seqs, np.int64), np.zeros(max_num_seqs, np.int64)
    table = np.zeros((max_num_seqs, pages_per_seq), np.int64)
    pool = rng.permutation(num_pages)
    for i in range(num_seqs):
        kind = rng.choice(["prefill", "chunk", "decode", "empty"])
        if kind == "prefill":
            q, computed = int(rng.integers(1, capacity + 1)), 0
        else:
            q = {"chunk": int(rng.integers(1, capacity + 1)), "decode": 1, "empty": 0}[kind]
            computed = int(rng.integers(0, capacity - q + 1))
        q_lens[i], kv_lens[i] = q, computed + q
        used = -(-(computed + q) // page_size)
        table[i, :used] = pool[i * pages_per_seq : i * pages_per_seq + used]
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)])  # repeats cu_q_lens[num_seqs] past the last request
    args = (table.reshape(-1), cu_q_lens, kv_lens, np.array([num_seqs]))
    return tuple(a.astype(np.int32) for a in args)


def jax_front(args, **kw):
    idx, total = jk.slice_indices_from_ragged_metadata(*args, **kw)
    return np.asarray(idx), np.asarray(total)


def torch_front(args, device="cpu", **kw):
    idx, total = torch_ops.slice_indices_from_ragged_metadata(*(torch.as_tensor(np.asarray(a)).to(device) for a in args), **kw)
    assert idx.dtype == torch.int32 and total.dtype == torch.int32
    assert idx.device.type == torch.device(device).type
    return idx.cpu().numpy(), total.cpu().numpy()


FRONTS = {"jax": jax_front, "torch": torch_front}


def bound(page_size):
    """A max_num_slices that fits any batch of random_ragged_batch."""
    return jk.max_num_slices_bound(MAX_NUM_SEQS, MAX_NUM_SEQS * PAGES_PER_SEQ * page_size, page_size)


def write_each_token(new, args, cache, *, page_size, pages_per_seq=PAGES_PER_SEQ):
    """What tpu-inference's RPA reference does (``kv_cache[indices].at[kv_len - q_len:kv_len]
    .set(new_kv[q_start:q_end])``), token by token."""
    page_indices, cu, kv, num_seqs = args
    out = cache.copy()
    for i in range(int(num_seqs[0])):
        q_len = int(cu[i + 1] - cu[i])
        for k in range(q_len):
            pos = int(kv[i]) - q_len + k
            row = int(page_indices[i * pages_per_seq + pos // page_size]) * page_size + pos % page_size
            out[row] = new[int(cu[i]) + k]
    return out


# --------------------------------------------------------------------------- vs the reference


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_random_batches_match_reference_in_both_frameworks(page_size):
    rng = np.random.default_rng(page_size)
    kw = dict(page_size=page_size, pages_per_seq=PAGES_PER_SEQ)
    for _ in range(12):
        args = random_ragged_batch(rng, page_size=page_size, num_pages=64)
        s = bound(page_size)
        want = reference(*args, max_num_slices=s, **kw)
        got_j = jax_front(args, max_num_slices=s, num_pages=64, **kw)
        got_t = torch_front(args, max_num_slices=s, num_pages=64, **kw)
        for got in (got_j, got_t):
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_it_is_the_block_table_computation():
    rng = np.random.default_rng(9)
    for _ in range(5):
        page_indices, cu, kv, num_seqs = random_ragged_batch(rng, page_size=4, num_pages=40)
        live = np.arange(MAX_NUM_SEQS) < num_seqs[0]
        q = np.where(live, np.diff(cu), 0)
        want = jk.slice_indices_from_block_table(
            page_indices.reshape(MAX_NUM_SEQS, PAGES_PER_SEQ), np.where(live, kv - q, 0), q, page_size=4, max_num_slices=20
        )
        got = jax_front((page_indices, cu, kv, num_seqs), page_size=4, pages_per_seq=PAGES_PER_SEQ, max_num_slices=20)
        np.testing.assert_array_equal(got[0], np.asarray(want[0]))
        np.testing.assert_array_equal(got[1], np.asarray(want[1]))


def test_hand_written_case():
    page_size, pps = 4, 3
    page_indices = np.array([3, 1, 2, 0, 5, 4, 7, 7, 7, 9, 9, 9], np.int32)
    cu_q_lens = np.array([0, 5, 6, 6, 6], np.int32)  # request 2 has no new tokens; 3 is padding
    kv_lens = np.array([7, 9, 3, 0], np.int32)
    num_seqs = np.array([3], np.int32)
    args = (page_indices, cu_q_lens, kv_lens, num_seqs)
    # request 0: positions 2..6 -> page 3 rows 2, 3, then page 1 rows 0..2; request 1: position 8 -> page 4 row 0.
    want = [[3 * 4 + 2, 0, 2], [1 * 4 + 0, 2, 3], [4 * 4 + 0, 5, 1]]
    for front in FRONTS.values():
        idx, total = front(args, page_size=page_size, pages_per_seq=pps, max_num_slices=5)
        assert total.tolist() == [3]
        assert idx[:, :3].T.tolist() == want and not idx[:, 3:].any()
    np.testing.assert_array_equal(reference(*args, page_size=page_size, pages_per_seq=pps, max_num_slices=5)[0], idx)


@pytest.mark.parametrize("name", list(FRONTS))
def test_queries_not_starting_at_row_zero(name):
    # The kernel reads request i's rows at cu_q_lens[i]; nothing requires cu_q_lens[0] == 0.
    args = (np.array([2, 0, 6, 1], np.int32), np.array([3, 5, 8], np.int32), np.array([2, 5], np.int32), np.array([2], np.int32))
    kw = dict(page_size=4, pages_per_seq=2, max_num_slices=4)
    idx, total = FRONTS[name](args, **kw)
    # request 0: positions 0, 1 -> page 2; request 1: positions 2, 3 -> page 6, then 4 -> page 1.
    assert idx[:, : int(total[0])].T.tolist() == [[8, 3, 2], [26, 5, 2], [4, 7, 1]]
    np.testing.assert_array_equal(idx, reference(*args, **kw)[0])


@pytest.mark.parametrize("name", list(FRONTS))
def test_no_requests_and_no_room(name):
    kw = dict(page_size=4, pages_per_seq=2)
    empty = (np.zeros(6, np.int32), np.zeros(4, np.int32), np.zeros(3, np.int32), np.array([0], np.int32))
    idx, total = FRONTS[name](empty, max_num_slices=3, **kw)
    assert idx.shape == (3, 3) and not idx.any() and total.tolist() == [0]
    none = (np.zeros(0, np.int32), np.zeros(1, np.int32), np.zeros(0, np.int32), np.array([0], np.int32))
    idx, total = FRONTS[name](none, max_num_slices=2, **kw)
    assert idx.shape == (3, 2) and total.tolist() == [0]
    zero_tokens = (np.array([1, 2], np.int32), np.array([0, 0], np.int32), np.array([3], np.int32), np.array([1], np.int32))
    idx, total = FRONTS[name](zero_tokens, max_num_slices=0, **kw)
    assert idx.shape == (3, 0) and total.tolist() == [0]


# --------------------------------------------------------------------------- jit / XLA, no host work


def test_jit_matches_reference_without_retracing():
    traces = []
    kw = dict(page_size=8, pages_per_seq=PAGES_PER_SEQ)

    @jax.jit
    def step(*args):
        traces.append(1)
        return jk.slice_indices_from_ragged_metadata(*args, max_num_slices=24, **kw)

    rng = np.random.default_rng(5)
    for _ in range(4):
        args = random_ragged_batch(rng, page_size=8, num_pages=32)
        idx, total = step(*map(jnp.asarray, args))
        want = reference(*args, max_num_slices=24, **kw)
        np.testing.assert_array_equal(np.asarray(idx), want[0])
        np.testing.assert_array_equal(np.asarray(total), want[1])
    assert len(traces) == 1


@pytest.mark.parametrize("max_num_slices", [0, 2])
def test_jit_too_many_slices_shows_in_the_total(max_num_slices):
    args = tuple(map(jnp.asarray, (np.array([0, 1, 2], np.int32), np.array([0, 9], np.int32), np.array([10], np.int32), np.array([1], np.int32))))
    kw = dict(page_size=4, pages_per_seq=3, max_num_slices=max_num_slices)
    idx, total = jax.jit(lambda *a: jk.slice_indices_from_ragged_metadata(*a, **kw))(*args)
    assert int(total[0]) == 3 and idx.shape == (3, max_num_slices)  # the true count: kv_cache_update rejects it
    np.testing.assert_array_equal(np.asarray(idx), np.array([[1, 4, 8], [0, 3, 7], [3, 4, 2]])[:, :max_num_slices])


def test_xla_matches_reference_and_jax(xla_device):
    rng = np.random.default_rng(11)
    kw = dict(page_size=4, pages_per_seq=PAGES_PER_SEQ, max_num_slices=20)
    for _ in range(3):  # one shape: one compile
        args = random_ragged_batch(rng, page_size=4, num_pages=40)
        want = reference(*args, **kw)
        got = torch_front(args, xla_device, **kw)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], jax_front(args, **kw)[0])


def test_xla_does_not_sync(xla_device):
    import torch_xla
    import torch_xla.debug.metrics as met

    args = [torch.from_numpy(a).to(xla_device) for a in random_ragged_batch(np.random.default_rng(3), page_size=4, num_pages=40)]
    torch_xla.sync()
    met.clear_all()
    idx, total = torch_ops.slice_indices_from_ragged_metadata(
        *args, page_size=4, pages_per_seq=PAGES_PER_SEQ, max_num_slices=20, num_pages=40
    )
    assert "TransferFromDeviceTime" not in met.metric_names()
    assert "TransferToDeviceTime" not in met.metric_names()
    assert "ExecuteComputation" not in met.counter_names()
    assert not [c for c in met.counter_names() if c.startswith("aten::")]  # no CPU fallbacks
    assert idx.device.type == "xla" and tuple(idx.shape) == (3, 20)


def test_xla_too_many_slices_returns_the_true_count(xla_device):
    args = [torch.tensor(a, dtype=torch.int32).to(xla_device) for a in ([0, 1, 2], [0, 9], [10], [1])]
    idx, total = torch_ops.slice_indices_from_ragged_metadata(*args, page_size=4, pages_per_seq=3, max_num_slices=2)
    assert total.cpu().tolist() == [3]
    assert idx.cpu().tolist() == [[1, 4], [0, 3], [3, 4]]


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_end_to_end_writes_what_the_kernel_writes(page_size):
    rng = np.random.default_rng(200 + page_size)
    num_pages = MAX_NUM_SEQS * PAGES_PER_SEQ + 4
    cache = rng.standard_normal((num_pages * page_size, HEADS, HEAD_DIM)).astype(np.float32)
    num_tokens = MAX_NUM_SEQS * PAGES_PER_SEQ * page_size
    kw = dict(page_size=page_size, pages_per_seq=PAGES_PER_SEQ, max_num_slices=bound(page_size))
    for _ in range(3):
        args = random_ragged_batch(rng, page_size=page_size, num_pages=num_pages)
        new = rng.standard_normal((num_tokens, HEADS, HEAD_DIM)).astype(np.float32)
        want = write_each_token(new, args, cache, page_size=page_size)
        for front in FRONTS.values():
            idx, total = front(args, num_pages=num_pages, **kw)
            got = jk.kv_cache_update(new, idx, cache, total, page_size=page_size)
            np.testing.assert_array_equal(np.asarray(got), want)
        cache_t = torch.from_numpy(cache.copy())
        idx_t, total_t = torch_ops.slice_indices_from_ragged_metadata(*map(torch.from_numpy, args), **kw)
        torch_ops.kv_cache_update(torch.from_numpy(new), idx_t, cache_t, total_t, page_size=page_size)
        np.testing.assert_array_equal(cache_t.numpy(), want)
        cache = want


# --------------------------------------------------------------------------- bad input


def _good():
    # 2 live requests of max 3, 2 pages of 4 rows each: request 0 writes positions 1..4, request 1 position 2.
    return dict(
        page_indices=np.array([0, 1, 2, 3, 0, 0], np.int32),
        cu_q_lens=np.array([0, 4, 5, 5], np.int32),
        kv_lens=np.array([5, 3, 0], np.int32),
        num_seqs=np.array([2], np.int32),
    )


def _with(**changes):
    args = _good()
    args.update({k: np.asarray(v) for k, v in changes.items()})
    return args


BAD = [
    ("num_seqs_too_big", _with(num_seqs=[4]), {}, ValueError, r"num_seqs\[0\]=4 must be in \[0, 3\]"),
    ("num_seqs_negative", _with(num_seqs=[-1]), {}, ValueError, r"num_seqs\[0\]=-1 must be in \[0, 3\]"),
    ("cu_q_lens_decreasing", _with(cu_q_lens=[0, 4, 3, 3]), {}, ValueError, r"cu_q_lens must not decrease: cu_q_lens\[2\]=3 < cu_q_lens\[1\]=4"),
    ("cu_q_lens_negative", _with(cu_q_lens=[-1, 4, 5, 5]), {}, ValueError, r"cu_q_lens\[0\]=-1 must be non-negative"),
    ("kv_lens_below_q_len", _with(kv_lens=[3, 3, 0]), {}, ValueError, r"kv_lens\[0\]=3 is smaller than request 0's 4 new tokens"),
    ("past_pages_per_seq", _with(kv_lens=[5, 9, 0]), {}, ValueError, r"request 1 writes position 8 \(kv_lens\[1\]=9\), logical page 2, but pages_per_seq=2"),
    ("page_past_the_cache", _good(), dict(num_pages=2), ValueError, r"page_indices\[2\]=2 \(request 1, logical page 0\) must be in \[0, num_pages=2\)"),
    ("page_negative", _with(page_indices=[0, -4, 2, 3, 0, 0]), {}, ValueError, r"page_indices\[1\]=-4 \(request 0, logical page 1\) must be non-negative"),
    # An int64 entry whose rows pass int32 (page_size 4: 2**31 // 4 = 2**29 pages) would wrap to page 3's rows.
    ("page_rows_past_int32", _with(page_indices=np.array([0, 2**32 + 3, 2, 3, 0, 0], np.int64)), {}, ValueError, r"page_indices\[1\]=4294967299 \(request 0, logical page 1\) must be below 2\*\*31 // page_size=4 = 536870912, so that its rows fit int32"),
    ("too_many_slices", _good(), dict(max_num_slices=2), ValueError, r"the batch needs 3 slices but max_num_slices=2; max_num_slices_bound"),
    ("float_kv_lens", _with(kv_lens=np.array([5.0, 3.0, 0.0], np.float32)), {}, TypeError, r"kv_lens must have an integer dtype, got (torch\.)?float32"),
    ("float_page_indices", _with(page_indices=np.zeros(6, np.float64)), {}, TypeError, r"page_indices must have an integer dtype"),
    ("page_indices_2d", _with(page_indices=np.zeros((3, 2), np.int32)), {}, ValueError, r"page_indices must be flat \[max_num_seqs \* pages_per_seq\] = \(6,\)"),
    ("page_indices_wrong_length", _with(page_indices=np.zeros(8, np.int32)), {}, ValueError, r"page_indices must be flat .* got shape \(8,\)"),
    ("cu_q_lens_wrong_length", _with(cu_q_lens=[0, 4, 5]), {}, ValueError, r"cu_q_lens must be \[max_num_seqs \+ 1\] = \(4,\)"),
    ("kv_lens_rank_2", _with(kv_lens=np.zeros((3, 1), np.int32)), {}, ValueError, r"kv_lens must be \[max_num_seqs\], got shape \(3, 1\)"),
    ("num_seqs_shape", _with(num_seqs=[2, 0]), {}, ValueError, r"num_seqs must hold one integer, shape \(1,\), got shape \(2,\)"),
    ("pages_per_seq_zero", _good(), dict(pages_per_seq=0), ValueError, r"pages_per_seq=0 must be positive"),
    ("page_size_zero", _good(), dict(page_size=0), ValueError, r"page_size=0 must be positive"),
    ("num_pages_zero", _good(), dict(num_pages=0), ValueError, r"num_pages=0 must be positive"),
]


@pytest.mark.parametrize("name", list(FRONTS))
@pytest.mark.parametrize("args, extra, error, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(name, args, extra, error, match):
    kw = dict(page_size=4, pages_per_seq=2, max_num_slices=8)
    kw.update(extra)
    with pytest.raises(error, match=match):
        FRONTS[name](tuple(args.values()), **kw)


def test_the_good_call_is_good():
    kw = dict(page_size=4, pages_per_seq=2, max_num_slices=8, num_pages=4)
    for front in FRONTS.values():
        idx, total = front(tuple(_good().values()), **kw)
        assert idx[:, :3].T.tolist() == [[1, 0, 3], [4, 3, 1], [2 * 4 + 2, 4, 1]] and total.tolist() == [3]


def test_torch_front_end_wants_tensors_on_one_device():
    args = [torch.from_numpy(a) for a in _good().values()]
    kw = dict(page_size=4, pages_per_seq=2, max_num_slices=8)
    with pytest.raises(TypeError, match="cu_q_lens must be a torch.Tensor, got list"):
        torch_ops.slice_indices_from_ragged_metadata(args[0], [0, 4, 5, 5], *args[2:], **kw)
    with pytest.raises(ValueError, match="must be on one device"):
        torch_ops.slice_indices_from_ragged_metadata(*args[:3], args[3].to("meta"), **kw)


def test_the_largest_page_whose_rows_fit_int32_is_accepted():
    limit = 2**31 // 4  # page_size 4
    kw = dict(page_size=4, pages_per_seq=2, max_num_slices=8)
    for front in FRONTS.values():
        args = _with(page_indices=np.array([0, limit - 1, 2, 3, 0, 0], np.int64))
        idx, total = front(tuple(args.values()), **kw)
        assert int(idx[0, 1]) == (limit - 1) * 4 and int(idx[0, 1]) + 3 == 2**31 - 1  # the page's last row fits
        args = _with(page_indices=np.array([0, limit, 2, 3, 0, 0], np.int64))
        with pytest.raises(ValueError, match=rf"page_indices\[1\]={limit} .* must be below 2\*\*31 // page_size=4"):
            front(tuple(args.values()), **kw)
