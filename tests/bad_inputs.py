"""The table of bad inputs, shared by the JAX and torch validation tests.

Each case starts from a valid call (numpy arrays) and breaks one thing. The
expected message must name the argument at fault.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

PAGE_SIZE = 16
HEADS, HEAD_DIM = 2, 128
NUM_PAGES, NUM_TOKENS, NUM_SLICES = 4, 24, 4


def valid_call() -> dict:
    rng = np.random.default_rng(0)
    return dict(
        new_kv_tokens=rng.standard_normal((NUM_TOKENS, HEADS, HEAD_DIM)).astype(np.float32),
        slice_indices=np.array([[0, 20, 40, 0], [0, 5, 12, 0], [5, 7, 9, 0]], np.int32),
        kv_cache=np.full((NUM_PAGES * PAGE_SIZE, HEADS, HEAD_DIM), np.nan, np.float32),
        total_update_slices=np.array([3], np.int32),
        page_size=PAGE_SIZE,
    )


def _set_idx(row, col, value):
    def f(c):
        c["slice_indices"] = c["slice_indices"].copy()
        c["slice_indices"][row, col] = value

    return f


def _set(key, value):
    def f(c):
        c[key] = value(c) if callable(value) else value

    return f


def _packed(pack):
    """Tokens and cache as packed rows ``[.., HEADS // pack, pack, HEAD_DIM]``."""

    def f(c):
        for key in ("new_kv_tokens", "kv_cache"):
            c[key] = c[key].reshape(c[key].shape[0], HEADS // pack, pack, HEAD_DIM)

    return f


@dataclasses.dataclass(frozen=True)
class BadInput:
    name: str
    mutate: Callable[[dict], None]
    error: type
    match: str


BAD_INPUTS = [
    BadInput("dst_out_of_range", _set_idx(0, 2, NUM_PAGES * PAGE_SIZE - 3), ValueError, r"slice_indices\[:, 2\].*outside kv_cache"),
    BadInput("src_out_of_range", _set_idx(1, 1, NUM_TOKENS - 2), ValueError, r"slice_indices\[:, 1\].*outside new_kv_tokens"),
    BadInput("length_above_page_size", _set_idx(2, 0, PAGE_SIZE + 1), ValueError, r"slice_indices\[:, 0\].*exceeds page_size=16"),
    BadInput("negative_dst", _set_idx(0, 1, -1), ValueError, r"slice_indices\[:, 1\].*negative"),
    BadInput("negative_length", _set_idx(2, 2, -4), ValueError, r"slice_indices\[:, 2\].*negative"),
    BadInput("overlapping_dst", _set_idx(0, 1, 3), ValueError, r"slice_indices\[:, 0\] and slice_indices\[:, 1\].*overlap"),
    BadInput("total_above_num_slices", _set("total_update_slices", np.array([5], np.int32)), ValueError, r"total_update_slices=5"),
    BadInput("total_negative", _set("total_update_slices", np.array([-1], np.int32)), ValueError, r"total_update_slices=-1"),
    BadInput("float_indices", _set("slice_indices", lambda c: c["slice_indices"].astype(np.float32)), TypeError, r"slice_indices must have an integer dtype"),
    BadInput("dtype_mismatch", _set("new_kv_tokens", lambda c: c["new_kv_tokens"].astype(np.float16)), TypeError, r"new_kv_tokens.dtype=float16.*kv_cache"),
    BadInput("heads_mismatch", _set("new_kv_tokens", lambda c: c["new_kv_tokens"][:, :1]), ValueError, r"new_kv_tokens rows \(1, 128\) do not match kv_cache"),
    BadInput("head_dim_mismatch", _set("new_kv_tokens", lambda c: np.ascontiguousarray(c["new_kv_tokens"][..., :64])), ValueError, r"new_kv_tokens rows \(2, 64\) do not match kv_cache"),
    BadInput("packed_row_shape_mismatch", _set("new_kv_tokens", lambda c: c["new_kv_tokens"].reshape(NUM_TOKENS, 2, 1, HEAD_DIM)), ValueError, r"kv_cache\w* must be packed flat"),
    BadInput("pack_does_not_match_dtype", _packed(pack=2), ValueError, r"kv_cache\w* is packed .*pack=2.*float32 cache packs 1"),
    BadInput("tokens_rank", _set("new_kv_tokens", lambda c: c["new_kv_tokens"][0]), ValueError, r"new_kv_tokens must be \[num_tokens"),
    BadInput("indices_rank", _set("slice_indices", lambda c: c["slice_indices"][:2]), ValueError, r"slice_indices must be \[3, num_slices\]"),
    BadInput("total_shape", _set("total_update_slices", np.array([1, 2], np.int32)), ValueError, r"total_update_slices must hold one integer"),
    BadInput("page_size_zero", _set("page_size", 0), ValueError, r"page_size=0 must be positive"),
    BadInput("page_size_not_dividing_cache", _set("page_size", 24), ValueError, r"kv_cache\w*.shape\[0\]=64 is not a multiple of page_size=24"),
]
