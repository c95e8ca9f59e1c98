"""slice_indices_from_slot_mapping (JAX and torch) against the plain-Python reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_kernels as jk
import torch_ops
from jax_kernels.reference import slice_indices_from_slot_mapping_reference as reference

NUM_TOKENS = 48  # one token count for every random batch: one compile per page size
HEADS, HEAD_DIM = 2, 8


def random_slot_mapping(rng, *, page_size, num_pages, num_tokens=NUM_TOKENS):
    """A step of an engine: requests in order (multi-page prefills from 0, chunks
    starting mid-page, 1-token decodes, zero-token requests), each writing the
    next positions of its own pages, padding (-1) between some requests and at
    the end. Pages come from one shuffled pool, some of them physically
    consecutive, so runs of consecutive rows cross page boundaries too."""
    pool = list(rng.permutation(num_pages))
    if rng.random() < 0.5:  # physically consecutive pages: rows stay consecutive across a boundary
        pool = pool[num_pages // 2 :] + sorted(pool[: num_pages // 2], reverse=True)  # pop() takes them ascending
    slots = []
    while True:
        kind = rng.choice(["prefill", "chunk", "decode", "empty", "pad"])
        pages = [pool.pop() for _ in range(min(3, len(pool)))]
        if kind == "pad":
            run = [-1] * int(rng.integers(1, 4))
        elif kind == "empty" or not pages:
            run = []
        else:
            capacity = len(pages) * page_size
            if kind == "prefill":
                n, start = int(rng.integers(1, capacity + 1)), 0
            else:  # a decode or a chunk, anywhere in the pages
                n = 1 if kind == "decode" else int(rng.integers(1, capacity + 1))
                start = int(rng.integers(0, capacity - n + 1))
            run = [pages[p // page_size] * page_size + p % page_size for p in range(start, start + n)]
        if len(slots) + len(run) > num_tokens or not pool:
            break
        slots += run
    slots += [-1] * (num_tokens - len(slots))
    return np.array(slots, np.int32)


def jax_front(slots, **kw):
    idx, total = jk.slice_indices_from_slot_mapping(slots, **kw)
    return np.asarray(idx), np.asarray(total)


def torch_front(slots, device="cpu", **kw):
    idx, total = torch_ops.slice_indices_from_slot_mapping(torch.as_tensor(np.asarray(slots)).to(device), **kw)
    assert idx.dtype == torch.int32 and total.dtype == torch.int32
    assert idx.device.type == torch.device(device).type
    return idx.cpu().numpy(), total.cpu().numpy()


FRONTS = {"jax": jax_front, "torch": torch_front}


def write_each_token(new, slots, cache):
    """What an engine does with a slot mapping: token t to row slots[t], padding skipped."""
    out = cache.copy()
    for t, s in enumerate(slots):
        if s != -1:
            out[s] = new[t]
    return out


# --------------------------------------------------------------------------- vs the reference


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_random_batches_match_reference_in_both_frameworks(page_size):
    rng = np.random.default_rng(page_size)
    for _ in range(12):
        slots = random_slot_mapping(rng, page_size=page_size, num_pages=64)
        want = reference(slots, page_size=page_size, max_num_slices=NUM_TOKENS)
        got_j = jax_front(slots, page_size=page_size, max_num_slices=NUM_TOKENS, num_rows=64 * page_size)
        got_t = torch_front(slots, page_size=page_size, max_num_slices=NUM_TOKENS, num_rows=64 * page_size)
        for got in (got_j, got_t):
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        assert got_j[0].dtype == got_t[0].dtype == np.int32


def test_hand_written_case():
    # page_size 4: rows 5..9 cross from page 1 into page 2; padding breaks 20, 21 from 22;
    # 3 -> 4 crosses into page 1 even though the rows are consecutive; 0, 1 follow a pad.
    slots = np.array([5, 6, 7, 8, 9, -1, 20, 21, -1, 22, 3, 4, -1, 0, 1, -1], np.int32)
    want = [[5, 0, 3], [8, 3, 2], [20, 6, 2], [22, 9, 1], [3, 10, 1], [4, 11, 1], [0, 13, 2]]
    for front in FRONTS.values():
        idx, total = front(slots, page_size=4, max_num_slices=9)
        assert total.tolist() == [7]
        assert idx[:, :7].T.tolist() == want
        assert not idx[:, 7:].any()
    np.testing.assert_array_equal(reference(slots, page_size=4, max_num_slices=9)[0], idx)


@pytest.mark.parametrize("name", list(FRONTS))
def test_empty_all_padding_and_int64(name):
    front = FRONTS[name]
    idx, total = front(np.zeros((0,), np.int32), page_size=4, max_num_slices=3)
    assert idx.shape == (3, 3) and not idx.any() and total.tolist() == [0]
    idx, total = front(np.full((5,), -1, np.int64), page_size=4, max_num_slices=0)
    assert idx.shape == (3, 0) and total.tolist() == [0]
    slots = np.array([2**20, 2**20 + 1, -1, 7], np.int64)
    idx, total = front(slots, page_size=16, max_num_slices=4)
    np.testing.assert_array_equal(idx, reference(slots, page_size=16, max_num_slices=4)[0])
    assert total.tolist() == [2]


# --------------------------------------------------------------------------- jit / XLA, no host work


def test_jit_matches_reference_without_retracing():
    traces = []

    @jax.jit
    def step(slots):
        traces.append(1)
        return jk.slice_indices_from_slot_mapping(slots, page_size=8, max_num_slices=NUM_TOKENS)

    rng = np.random.default_rng(5)
    for _ in range(4):
        slots = random_slot_mapping(rng, page_size=8, num_pages=32)
        idx, total = step(jnp.asarray(slots))
        want = reference(slots, page_size=8, max_num_slices=NUM_TOKENS)
        np.testing.assert_array_equal(np.asarray(idx), want[0])
        np.testing.assert_array_equal(np.asarray(total), want[1])
    assert len(traces) == 1


def test_jit_too_many_slices_shows_in_the_total():
    slots = jnp.array([0, 4, 8, 12, -1], jnp.int32)  # 4 one-row slices
    idx, total = jax.jit(lambda s: jk.slice_indices_from_slot_mapping(s, page_size=4, max_num_slices=2))(slots)
    assert int(total[0]) == 4 and idx.shape == (3, 2)  # the true count: kv_cache_update's validation rejects it
    np.testing.assert_array_equal(np.asarray(idx), [[0, 4], [0, 1], [1, 1]])


def test_xla_matches_reference_and_jax(xla_device):
    rng = np.random.default_rng(11)
    for _ in range(3):  # one shape: one compile
        slots = random_slot_mapping(rng, page_size=4, num_pages=40)
        want = reference(slots, page_size=4, max_num_slices=NUM_TOKENS)
        got = torch_front(slots, xla_device, page_size=4, max_num_slices=NUM_TOKENS)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], jax_front(slots, page_size=4, max_num_slices=NUM_TOKENS)[0])


def test_xla_does_not_sync(xla_device):
    import torch_xla
    import torch_xla.debug.metrics as met

    slots = torch.from_numpy(random_slot_mapping(np.random.default_rng(3), page_size=4, num_pages=40)).to(xla_device)
    torch_xla.sync()
    met.clear_all()
    idx, total = torch_ops.slice_indices_from_slot_mapping(slots, page_size=4, max_num_slices=NUM_TOKENS, num_rows=160)
    assert "TransferFromDeviceTime" not in met.metric_names()
    assert "TransferToDeviceTime" not in met.metric_names()
    assert "ExecuteComputation" not in met.counter_names()
    assert not [c for c in met.counter_names() if c.startswith("aten::")]  # no CPU fallbacks
    assert idx.device.type == "xla" and tuple(idx.shape) == (3, NUM_TOKENS)


def test_xla_bad_values_are_not_read_back(xla_device):
    # Off CPU nothing is checked: too many slices shows in the total, a slot below -1 is padding.
    slots = torch.tensor([0, 4, 8, -7, 12], dtype=torch.int32).to(xla_device)
    idx, total = torch_ops.slice_indices_from_slot_mapping(slots, page_size=4, max_num_slices=2)
    assert total.cpu().tolist() == [4]
    assert idx.cpu().tolist() == [[0, 4], [0, 1], [1, 1]]


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_end_to_end_writes_what_the_slot_mapping_says(page_size):
    rng = np.random.default_rng(100 + page_size)
    num_pages = 48
    cache = rng.standard_normal((num_pages * page_size, HEADS, HEAD_DIM)).astype(np.float32)
    for _ in range(3):
        slots = random_slot_mapping(rng, page_size=page_size, num_pages=num_pages)
        new = rng.standard_normal((NUM_TOKENS, HEADS, HEAD_DIM)).astype(np.float32)
        want = write_each_token(new, slots, cache)
        for front in FRONTS.values():
            idx, total = front(slots, page_size=page_size, max_num_slices=NUM_TOKENS, num_rows=cache.shape[0])
            got = jk.kv_cache_update(new, idx, cache, total, page_size=page_size)
            np.testing.assert_array_equal(np.asarray(got), want)
        # and the torch op, in place, from the torch front end's tensors
        cache_t = torch.from_numpy(cache.copy())
        idx_t, total_t = torch_ops.slice_indices_from_slot_mapping(
            torch.from_numpy(slots), page_size=page_size, max_num_slices=NUM_TOKENS
        )
        torch_ops.kv_cache_update(torch.from_numpy(new), idx_t, cache_t, total_t, page_size=page_size)
        np.testing.assert_array_equal(cache_t.numpy(), want)
        cache = want


# --------------------------------------------------------------------------- bad input


BAD = [
    ("past_the_cache", np.array([0, 1, 64, -1]), dict(num_rows=64), ValueError, r"slot_mapping\[2\]=64 is outside the cache \(num_rows=64\)"),
    ("below_minus_one", np.array([0, -2, 5]), {}, ValueError, r"slot_mapping\[1\]=-2 is negative; only -1 marks a padding token"),
    ("duplicate", np.array([3, 9, -1, 4, 9]), {}, ValueError, r"slot_mapping\[1\] and slot_mapping\[4\] both write cache row 9"),
    ("beyond_int32", np.array([0, 2**31], np.int64), {}, ValueError, r"slot_mapping\[1\]=2147483648 is beyond int32"),
    ("too_many_slices", np.array([0, 4, 8, 9, -1]), dict(max_num_slices=2), ValueError,
     r"slot_mapping needs 3 slices but max_num_slices=2; max_num_slices=len\(slot_mapping\)=5 always suffices"),
    ("float", np.array([0.0, 1.0], np.float32), {}, TypeError, r"slot_mapping must have an integer dtype, got (torch\.)?float32"),
    ("bool", np.array([True, False]), {}, TypeError, r"slot_mapping must have an integer dtype, got (torch\.)?bool"),
    ("rank_2", np.array([[0, 1], [2, 3]]), {}, ValueError, r"slot_mapping must be \[num_tokens\], got shape \(2, 2\)"),
    ("page_size_zero", np.array([0]), dict(page_size=0), ValueError, r"page_size=0 must be positive"),
    ("max_num_slices_negative", np.array([0]), dict(max_num_slices=-1), ValueError, r"max_num_slices=-1 must be non-negative"),
    ("num_rows_zero", np.array([0]), dict(num_rows=0), ValueError, r"num_rows=0 must be positive"),
    ("max_num_slices_float", np.array([0]), dict(max_num_slices=4.0), TypeError, r"max_num_slices=4.0 must be a Python int"),
]


@pytest.mark.parametrize("name", list(FRONTS))
@pytest.mark.parametrize("slots, extra, error, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(name, slots, extra, error, match):
    kw = dict(page_size=4, max_num_slices=8)
    kw.update(extra)
    with pytest.raises(error, match=match):
        FRONTS[name](slots, **kw)


def test_torch_front_end_wants_a_tensor():
    with pytest.raises(TypeError, match="slot_mapping must be a torch.Tensor, got list"):
        torch_ops.slice_indices_from_slot_mapping([0, 1], page_size=4, max_num_slices=2)
    with pytest.raises(TypeError, match="slot_mapping must have an integer dtype, got torch.bfloat16"):
        torch_ops.slice_indices_from_slot_mapping(torch.zeros(3, dtype=torch.bfloat16), page_size=4, max_num_slices=2)

