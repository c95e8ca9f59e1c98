"""Realistic update layouts for the benchmarks, built from block tables.

A *batch* is the request structure a model step produces — how many new tokens
each request has and at which logical position they start — and does not
depend on the cache. A *workload* places a batch in a cache of a given size:
every request gets disjoint random physical pages for the pages it writes, the
block table → slice indices conversion is the library's own reference
(``jax_kernels.slice_indices_from_block_table_reference``), and the new tokens
are packed in request order, as a model produces them. ``max_num_slices`` is
padded to ``jax_kernels.max_num_slices_bound``, as an engine would.

So every cache size in a sweep sees *the same update* (same counts, positions,
in-page offsets, sources); only which physical pages it lands on changes, and
those are spread over the whole cache.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import jax_kernels as jk
from jax_kernels.testing import np_dtype, random_tokens

HEADS, HEAD_DIM = 16, 128  # combined K+V heads, head dim
MIB = 1 << 20
SHAPES = ("decode", "mixed", "prefill")


@dataclasses.dataclass(frozen=True)
class Batch:
    """One model step's update: request ``b`` writes ``counts[b]`` new tokens
    at logical positions ``starts[b], starts[b] + 1, ...``."""

    shape: str
    page_size: int
    counts: np.ndarray  # i64[B]
    starts: np.ndarray  # i64[B]

    @property
    def num_requests(self) -> int:
        return len(self.counts)

    @property
    def num_tokens(self) -> int:
        return int(self.counts.sum())

    @property
    def first_pages(self) -> np.ndarray:  # i64[B]
        return self.starts // self.page_size

    @property
    def last_pages(self) -> np.ndarray:  # i64[B]: -1 for requests with no tokens
        return np.where(self.counts > 0, (self.starts + self.counts - 1) // self.page_size, -1)

    @property
    def pages_touched(self) -> int:
        """Pages the update writes = its slice count (one slice per (request, page))."""
        live = self.counts > 0
        return int(np.sum((self.last_pages - self.first_pages + 1)[live]))

    @property
    def max_num_slices(self) -> int:
        return jk.max_num_slices_bound(self.num_requests, self.num_tokens, self.page_size)

    def describe(self) -> str:
        return (
            f"{self.num_requests} requests, {self.num_tokens:,} tokens, {self.pages_touched} slices "
            f"(max_num_slices {self.max_num_slices})"
        )


def make_batch(shape: str, page_size: int, *, quick: bool = False, seed: int = 0) -> Batch:
    """The update shapes of the sweep (deterministic for a seed).

    * ``decode``: 64 requests × 1 token at random positions (contexts < 4K).
    * ``mixed``: about 2,000 tokens over about 240 slices — half the requests
      decode one token, the rest are chunked prefills of varied length
      starting mid-page.
    * ``prefill``: 8,192 tokens over 4 prompts (one resumes mid-page after a
      prefix-cache hit).

    ``quick`` shrinks each shape about 8× for the smoke run.
    """
    rng = np.random.default_rng([seed, page_size, SHAPES.index(shape)])
    if shape == "decode":
        n = 8 if quick else 64
        counts = np.ones(n, np.int64)
        starts = rng.integers(0, 4096, n)
    elif shape == "mixed":
        tokens, target_slices, cap = (128, 24, 28) if quick else (2048, 240, 256)
        # A request of n tokens starting at a random in-page offset spans
        # about 1 + (n - 1) / page_size pages.
        num_reqs = round((target_slices - tokens / page_size) / (1 - 1 / page_size))
        num_decode = num_reqs // 2
        num_chunks = num_reqs - num_decode
        while True:  # redraw (deterministically) until the slice count is near the target
            chunk = 2 + rng.multinomial(tokens - num_decode - 2 * num_chunks, rng.dirichlet(np.ones(num_chunks)))
            counts = np.concatenate([np.ones(num_decode, np.int64), chunk.astype(np.int64)])
            order = rng.permutation(num_reqs)
            counts = counts[order]
            starts = np.where(counts == 1, rng.integers(0, 4096, num_reqs), rng.integers(0, 2048, num_reqs))
            batch = Batch(shape, page_size, counts, starts)
            if batch.pages_touched <= cap:
                return batch
    elif shape == "prefill":
        counts = np.array([128, 96, 32] if quick else [3072, 2048, 2048, 1024], np.int64)
        starts = np.array([0, 0, 21] if quick else [0, 0, 0, 1000], np.int64)
    else:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")
    return Batch(shape, page_size, counts, starts)


def row_bytes(dtype: str, heads: int = HEADS, head_dim: int = HEAD_DIM) -> int:
    return heads * head_dim * np_dtype(dtype).itemsize


def cache_rows(size_mib: float, dtype: str, page_sizes) -> int:
    """Rows of a cache of ``size_mib`` MiB, a whole number of pages for every page size."""
    step = math.lcm(*page_sizes)
    return int(size_mib * MIB) // row_bytes(dtype) // step * step


@dataclasses.dataclass
class Workload:
    """A batch placed in a cache of ``num_rows`` rows, and the inputs every path gets."""

    batch: Batch
    num_rows: int
    block_table: np.ndarray  # i32[B, max_pages_per_req]
    slice_indices: np.ndarray  # i32[3, max_num_slices]
    total: np.ndarray  # i32[1]
    dst_rows: np.ndarray  # i64[num_tokens]: the cache row of every new token, in order
    new_tokens: np.ndarray  # [num_tokens, H, D] of the dtype

    @property
    def num_slices(self) -> int:
        return int(self.total[0])

    @property
    def bytes_moved(self) -> int:
        """Bytes of the rows the update writes (what the memcpy baseline copies)."""
        return self.new_tokens.nbytes


def fits(batch: Batch, num_rows: int) -> bool:
    """Whether a cache of ``num_rows`` rows has a distinct page for every page the batch writes."""
    return batch.pages_touched <= num_rows // batch.page_size


def make_workload(batch: Batch, num_rows: int, dtype: str, *, seed: int = 0) -> Workload:
    """Place ``batch`` in a cache of ``num_rows`` rows: disjoint random pages
    for the pages it writes; the block table's other entries (earlier context,
    never written by this step) name random pages. Tokens are random (seeded
    by the batch only, so every cache size gets the same tokens)."""
    ps = batch.page_size
    num_pages = num_rows // ps
    if not fits(batch, num_rows):
        raise ValueError(
            f"{batch.shape} writes {batch.pages_touched} pages but a {num_rows}-row cache has {num_pages}"
        )
    rng = np.random.default_rng([seed, num_rows, ps])
    width = int(batch.last_pages.max()) + 1
    table = rng.integers(0, num_pages, (batch.num_requests, width)).astype(np.int32)
    free = iter(rng.permutation(num_pages))
    for b in range(batch.num_requests):
        for p in range(int(batch.first_pages[b]), int(batch.last_pages[b]) + 1):
            table[b, p] = next(free)
    idx, total = jk.slice_indices_from_block_table_reference(
        table, batch.starts, batch.counts, page_size=ps, max_num_slices=batch.max_num_slices
    )
    dst, src, length = (idx[r, : int(total[0])].astype(np.int64) for r in range(3))
    first_row = np.cumsum(length) - length
    within = np.arange(int(length.sum())) - np.repeat(first_row, length)
    dst_rows = np.repeat(dst, length) + within
    # The sources are packed in request order: token k goes to dst_rows[k].
    assert np.array_equal(np.repeat(src, length) + within, np.arange(batch.num_tokens))
    token_rng = np.random.default_rng([seed, ps, SHAPES.index(batch.shape), batch.num_tokens])
    new = random_tokens(token_rng, batch.num_tokens, HEADS, HEAD_DIM, dtype)
    return Workload(batch, num_rows, table, idx, total, dst_rows, new)
