"""Bad input to the JAX API raises a clear error naming the argument."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jax_kernels as jk
from bad_inputs import BAD_INPUTS, valid_call

JAX_APIS = {
    "auto": jk.kv_cache_update,
    "interpret": lambda *a, **k: jk.kv_cache_update(*a, interpret=True, **k),
    "scan": jk.kv_cache_update_jax,
    "scatter": jk.kv_cache_update_scatter,
}


def call(api, c):
    return JAX_APIS[api](
        c["new_kv_tokens"], c["slice_indices"], c["kv_cache"], c["total_update_slices"], page_size=c["page_size"]
    )


@pytest.mark.parametrize("api", ["auto", "interpret"])
def test_valid_baseline_runs(api):
    c = valid_call()
    out = call(api, c)
    want = jk.kv_cache_update_reference(c["new_kv_tokens"], c["slice_indices"], c["kv_cache"], c["total_update_slices"])
    np.testing.assert_array_equal(np.asarray(out), want)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda b: b.name)
@pytest.mark.parametrize("api", ["auto", "interpret"])
def test_bad_input_raises_naming_the_argument(api, case):
    c = valid_call()
    case.mutate(c)
    before = c["kv_cache"].copy()
    with pytest.raises(case.error, match=case.match):
        call(api, c)
    np.testing.assert_array_equal(c["kv_cache"].view(np.uint32), before.view(np.uint32))


def test_the_fallbacks_check_shapes_and_dtypes_at_trace_time():
    # Data checks are kv_cache_update's job (host metadata); the fallbacks
    # themselves still reject bad shapes and dtypes.
    for case in BAD_INPUTS:
        if case.error is TypeError or "rank" in case.name or "mismatch" in case.name:
            for api in ("scan", "scatter"):
                c = valid_call()
                case.mutate(c)
                with pytest.raises(case.error, match=case.match):
                    call(api, c)


def test_validate_flag():
    c = valid_call()
    c["slice_indices"][2, 0] = 99  # too long
    args = (jnp.asarray(c["new_kv_tokens"]), jnp.asarray(c["slice_indices"]), jnp.asarray(c["kv_cache"]), jnp.asarray(c["total_update_slices"]))
    with pytest.raises(ValueError, match="exceeds page_size"):
        jk.kv_cache_update(*args, page_size=16)  # CPU arrays: checked by default
    with pytest.raises(ValueError, match="exceeds page_size"):
        jk.kv_cache_update(*args, page_size=16, validate=True)
    jk.kv_cache_update(*args, page_size=16, validate=False)  # the caller's responsibility


def test_dynamic_validation_is_public_and_accepts_padding_garbage():
    c = valid_call()
    c["slice_indices"][:, 3] = [-5, 10**6, 99]  # beyond the total: never read
    jk.dynamic_validate_inputs(c["new_kv_tokens"], c["slice_indices"], c["kv_cache"], c["total_update_slices"], page_size=16)


@pytest.mark.parametrize(
    "cols, error",
    [
        # max(dst) + max(len) passes the end, yet every slice fits: the exact ends decide.
        ([[63, 0], [0, 1], [1, 16]], None),
        ([[0, 48], [16, 0], [16, 16]], None),  # ends exactly at the last row and token
        ([[63, 0], [0, 1], [2, 16]], r"slice_indices\[:, 0\].*destination rows \[63, 65\) fall outside"),
        ([[0, 20], [31, 0], [2, 16]], r"slice_indices\[:, 0\].*source rows \[31, 33\) fall outside"),
        ([[8, 8], [0, 4], [4, 4]], r"slice_indices\[:, 0\] and slice_indices\[:, 1\] write overlapping"),
        ([[8, 0, 10], [0, 4, 8], [4, 0, 3]], r"slice_indices\[:, 0\] and slice_indices\[:, 2\] write overlapping"),  # the empty slice 1 is skipped
    ],
)
def test_slice_checks_near_the_ends_and_overlaps(cols, error):
    new = np.zeros((32, 2, 8), np.float32)  # 32 tokens
    cache = np.zeros((64, 2, 8), np.float32)  # 64 rows
    idx = np.array(cols, np.int32)
    total = np.array([idx.shape[1]], np.int32)
    if error is None:
        jk.dynamic_validate_inputs(new, idx, cache, total, page_size=16)
    else:
        with pytest.raises(ValueError, match=error):
            jk.dynamic_validate_inputs(new, idx, cache, total, page_size=16)


def _brute_force_check(cols, num_tokens, num_rows, page_size):
    """Whether every slice is in bounds and no cache row is written twice, slice by slice."""
    written = set()
    for dst, src, length in cols.T.tolist():
        if min(dst, src, length) < 0 or length > page_size or dst + length > num_rows or src + length > num_tokens:
            return False
        rows = set(range(dst, dst + length))
        if rows & written:
            return False
        written |= rows
    return True


@pytest.mark.parametrize("total", [1, 2, 3, 64, 512, 513, 1500])
@pytest.mark.parametrize("kind", ["decode", "decode_with_empty", "equal", "mixed"])
def test_slice_checks_agree_with_a_brute_force_check(kind, total):
    # Every branch of check_slice_columns (one sort of all rows up to 512
    # slices, min/max above; equal lengths by sorted starts, mixed by argsort),
    # valid columns and the same columns with one destination moved onto another.
    from jax_kernels.kv_cache_update.validation import check_slice_columns

    rng = np.random.default_rng(total * 7 + len(kind))
    page_size, num_rows = 16, 16 * 4096
    lengths = {
        "decode": np.ones(total, np.int64),
        "decode_with_empty": rng.integers(0, 2, total),
        "equal": np.full(total, 5),
        "mixed": rng.integers(0, page_size + 1, total),
    }[kind]
    dst = rng.permutation(num_rows // page_size)[:total] * page_size + rng.integers(0, page_size - lengths + 1)
    src = np.cumsum(lengths) - lengths
    num_tokens = int(lengths.sum()) + 1
    valid = np.stack([dst, src, lengths]).astype(np.int64)  # i64[3, total]
    assert _brute_force_check(valid, num_tokens, num_rows, page_size)
    got = check_slice_columns(valid, num_tokens=num_tokens, num_rows=num_rows, page_size=page_size)
    assert got == (int(lengths.min()), int(lengths.max()))
    if total < 2:
        return
    for trial in range(6):
        bad = valid.copy()
        a, b = rng.choice(total, 2, replace=False)
        bad[0, a] = bad[0, b] + int(rng.integers(0, max(1, bad[2, b])))  # onto (or into) slice b
        if trial == 5:
            bad[0, a] = num_rows - 1  # past the end unless empty or one row
        ok = _brute_force_check(bad, num_tokens, num_rows, page_size)
        if ok:
            check_slice_columns(bad, num_tokens=num_tokens, num_rows=num_rows, page_size=page_size)
        else:
            with pytest.raises(ValueError, match=r"slice_indices\[:, \d+\]"):
                check_slice_columns(bad, num_tokens=num_tokens, num_rows=num_rows, page_size=page_size)


@pytest.mark.parametrize("row, where", [(0, "destination"), (1, "source")])
def test_int64_slices_near_the_top_of_int64_are_refused_not_wrapped(row, where):
    # dst + len (or src + len) overflows int64 here: a check that adds wraps to a
    # small negative end and passes, and the int32 update then writes wrapped rows
    # (measured before the fix: rows 1019-1023 and 0-10 of a 1,024-row cache).
    import torch

    import torch_ops  # noqa: F401  (registers torch.ops.paged_kv)

    idx = np.array([[0, 16], [0, 16], [16, 16]], np.int64)  # two valid slices of 16 rows
    idx[row, 1] = 2**63 - 5  # the second slice's start, 16 rows from the top of int64
    total = np.array([2], np.int32)
    new = np.ones((64, 2, 8), np.float32)
    cache = np.zeros((1024, 2, 8), np.float32)
    match = rf"slice_indices\[:, 1\] = \(dst=.*\): {where} rows \[{2**63 - 5}, {2**63 + 11}\) fall outside"
    with pytest.raises(ValueError, match=match):
        jk.kv_cache_update(new, idx, cache, total, page_size=16)
    np.testing.assert_array_equal(cache, 0)
    t_cache = torch.zeros(1024, 2, 8)
    with pytest.raises(ValueError, match=match):
        torch.ops.paged_kv.kv_cache_update(torch.from_numpy(new), torch.from_numpy(idx), t_cache, torch.from_numpy(total), 16)
    assert not t_cache.any()
