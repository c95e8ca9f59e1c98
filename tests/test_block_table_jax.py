"""jax_kernels.slice_indices_from_block_table against the plain-Python reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_kernels as jk


def random_batch(rng, *, num_reqs, page_size, pages_per_req, num_pages):
    """Ragged lengths, mid-page starts, multi-page prefill, decode and empty requests."""
    kind = rng.choice(["prefill", "decode", "empty", "mixed"], num_reqs)
    counts = np.where(kind == "decode", 1, np.where(kind == "empty", 0, rng.integers(1, 3 * page_size, num_reqs)))
    capacity = pages_per_req * page_size
    starts = np.array([rng.integers(0, capacity - n + 1) for n in counts])
    starts = np.where(kind == "prefill", 0, starts)
    table = np.stack([rng.permutation(num_pages)[:pages_per_req] for _ in range(num_reqs)]).astype(np.int32)
    return table, starts.astype(np.int32), counts.astype(np.int32)


@pytest.mark.parametrize("page_size", [1, 4, 16, 33])
def test_matches_reference_on_random_batches(page_size):
    rng = np.random.default_rng(page_size)
    for num_reqs in (1, 3, 8):
        table, starts, counts = random_batch(rng, num_reqs=num_reqs, page_size=page_size, pages_per_req=6, num_pages=64)
        bound = jk.max_num_slices_bound(num_reqs, int(counts.sum()), page_size)
        for max_num_slices in (bound, bound + 5):
            want_idx, want_total = jk.slice_indices_from_block_table_reference(
                table, starts, counts, page_size=page_size, max_num_slices=max_num_slices
            )
            idx, total = jk.slice_indices_from_block_table(
                table, starts, counts, page_size=page_size, max_num_slices=max_num_slices
            )
            np.testing.assert_array_equal(np.asarray(idx), want_idx)
            np.testing.assert_array_equal(np.asarray(total), want_total)


def test_jit_with_static_shapes_and_no_retrace():
    traces = []

    def fn(table, starts, counts):
        traces.append(1)
        return jk.slice_indices_from_block_table(table, starts, counts, page_size=16, max_num_slices=24)

    fn = jax.jit(fn)
    rng = np.random.default_rng(0)
    for _ in range(3):
        table, starts, counts = random_batch(rng, num_reqs=4, page_size=16, pages_per_req=4, num_pages=32)
        idx, total = fn(jnp.asarray(table), jnp.asarray(starts), jnp.asarray(counts))
        want = jk.slice_indices_from_block_table_reference(table, starts, counts, page_size=16, max_num_slices=24)
        np.testing.assert_array_equal(np.asarray(idx), want[0])
        np.testing.assert_array_equal(np.asarray(total), want[1])
    assert len(traces) == 1


def test_bound_is_sufficient_for_worst_case_layouts():
    # Every request starts at the last row of a page: the most pages per token.
    page_size = 8
    for num_reqs, per_req in ((4, 1), (4, 9), (3, 17), (5, 2)):
        starts = np.full(num_reqs, page_size - 1, np.int32)
        counts = np.full(num_reqs, per_req, np.int32)
        table = np.tile(np.arange(6, dtype=np.int32), (num_reqs, 1))
        bound = jk.max_num_slices_bound(num_reqs, int(counts.sum()), page_size)
        _, total = jk.slice_indices_from_block_table_reference(table, starts, counts, page_size=page_size, max_num_slices=bound)
        assert int(total[0]) <= bound


def test_errors_name_the_argument():
    table = np.array([[0, 1], [2, 3]], np.int32)
    ok = dict(page_size=4, max_num_slices=8)
    with pytest.raises(ValueError, match="max_num_slices=1"):
        jk.slice_indices_from_block_table(table, np.array([0, 0]), np.array([8, 1]), page_size=4, max_num_slices=1)
    with pytest.raises(ValueError, match=r"start_positions\[1\]=-1"):
        jk.slice_indices_from_block_table(table, np.array([0, -1]), np.array([1, 1]), **ok)
    with pytest.raises(ValueError, match=r"num_new_tokens\[0\]=-2"):
        jk.slice_indices_from_block_table(table, np.array([0, 0]), np.array([-2, 1]), **ok)
    with pytest.raises(ValueError, match="block_table has only 2 pages"):
        jk.slice_indices_from_block_table(table, np.array([0, 0]), np.array([9, 1]), **ok)
    with pytest.raises(ValueError, match=r"block_table\[1, 0\]=2 is not a page.*num_pages=2"):
        jk.slice_indices_from_block_table(table, np.array([0, 0]), np.array([1, 1]), num_pages=2, **ok)
    with pytest.raises(ValueError, match=r"block_table\[0, 0\]=-5"):
        jk.slice_indices_from_block_table(np.array([[-5, 1]], np.int32), np.array([0]), np.array([1]), **ok)
    with pytest.raises(ValueError, match="page_size=0 must be positive"):
        jk.slice_indices_from_block_table(table, np.array([0, 0]), np.array([1, 1]), page_size=0, max_num_slices=8)
    with pytest.raises(TypeError, match="block_table must have an integer dtype"):
        jk.slice_indices_from_block_table(table.astype(np.float32), np.array([0, 0]), np.array([1, 1]), **ok)


def test_under_jit_too_many_slices_shows_in_the_total():
    table = jnp.array([[0, 1, 2]], jnp.int32)
    fn = jax.jit(lambda t, s, c: jk.slice_indices_from_block_table(t, s, c, page_size=4, max_num_slices=2))
    idx, total = fn(table, jnp.array([0]), jnp.array([12]))
    assert int(total[0]) == 3  # the true count; kv_cache_update's validation rejects it
    assert idx.shape == (3, 2)


def test_under_jit_no_room_at_all_still_reports_the_needed_count():
    fn = jax.jit(lambda t, s, c: jk.slice_indices_from_block_table(t, s, c, page_size=4, max_num_slices=0))
    idx, total = fn(jnp.array([[0, 1, 2]], jnp.int32), jnp.array([0]), jnp.array([6]))
    assert idx.shape == (3, 0) and int(total[0]) == 2  # not 0: the update's validation must see the overflow
