"""Framework-free pieces shared by the examples (numpy only).

Everything that must be *identical* between the PyTorch model, its dense-cache
check and the JAX twin lives here, computed once in numpy: the weights, the
prompts, the rotary tables, and the per-step batch metadata (which tokens go
to which request and position, and the block table from the page allocator).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A tiny Llama-style decoder. ``head_dim`` is 128 so the Pallas kernel's
    ``head_dim % 128 == 0`` rule holds (``--impl pallas_interpret`` works)."""

    vocab_size: int = 256
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # grouped-query attention: 2 query heads per KV head
    head_dim: int = 128
    intermediate_size: int = 512  # SwiGLU
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_positions: int = 4096  # rows of the rotary tables

    @property
    def combined_kv_heads(self) -> int:
        """Heads of the cache's combined K/V layout: k0, v0, k1, v1, ..."""
        return 2 * self.num_kv_heads

    def describe(self) -> str:
        return (
            f"{self.num_layers} layers, hidden {self.hidden_size}, {self.num_heads} query / "
            f"{self.num_kv_heads} KV heads, head_dim {self.head_dim}, vocab {self.vocab_size}, float32"
        )


def init_weights(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights from ``seed``, named like Hugging Face's Llama.

    Linear weights are ``[out_features, in_features]`` (``y = x @ W.T``), scaled
    by ``1/sqrt(in_features)``; norms start at one. Both frameworks load these
    exact arrays, so their weights are bit-identical.
    """
    rng = np.random.default_rng([seed, 0])

    def linear(out_features: int, in_features: int) -> np.ndarray:
        scale = 1.0 / np.sqrt(in_features)
        return (rng.standard_normal((out_features, in_features)) * scale).astype(np.float32)

    d, h, kv, hd, ff = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    weights = {"embed_tokens.weight": rng.standard_normal((cfg.vocab_size, d)).astype(np.float32)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        weights[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        weights[p + "self_attn.q_proj.weight"] = linear(h * hd, d)
        weights[p + "self_attn.k_proj.weight"] = linear(kv * hd, d)
        weights[p + "self_attn.v_proj.weight"] = linear(kv * hd, d)
        weights[p + "self_attn.o_proj.weight"] = linear(d, h * hd)
        weights[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
        weights[p + "mlp.gate_proj.weight"] = linear(ff, d)
        weights[p + "mlp.up_proj.weight"] = linear(ff, d)
        weights[p + "mlp.down_proj.weight"] = linear(d, ff)
    weights["norm.weight"] = np.ones(d, np.float32)
    weights["lm_head.weight"] = linear(cfg.vocab_size, d)
    return weights


def rotary_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)``, each f32[max_positions, head_dim], Llama's "rotate half" form.

    Computed once in float64 numpy and shared, so both frameworks rotate by
    bit-identical angles (their own ``cos``/``sin`` could differ in the last bit).
    """
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    angles = np.outer(np.arange(cfg.max_positions, dtype=np.float64), inv_freq)  # f64[max_pos, D/2]
    angles = np.concatenate([angles, angles], axis=-1)  # f64[max_pos, D]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def make_prompts(batch: int, vocab_size: int, seed: int, *, min_len: int = 3, max_len: int = 24) -> list[np.ndarray]:
    """``batch`` prompts of random token ids (i64), of different lengths in ``[min_len, max_len]``
    (all distinct while ``batch`` allows)."""
    if batch < 1:
        raise ValueError(f"{batch=} must be positive")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= {min_len=} <= {max_len=}")
    rng = np.random.default_rng([seed, 1])
    choices = np.arange(min_len, max_len + 1)
    if batch <= len(choices):
        lengths = rng.permutation(choices)[:batch]
    else:
        lengths = rng.integers(min_len, max_len + 1, size=batch)
    return [rng.integers(0, vocab_size, size=int(n)).astype(np.int64) for n in lengths]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def token_bucket(num_tokens: int, minimum: int = 16) -> int:
    """Pad a token count to a power of two (at least ``minimum``), so a server
    compiles one graph per bucket instead of one per batch size."""
    return max(minimum, 1 << (num_tokens - 1).bit_length())


class PageAllocator:
    """Physical pages of the cache, handed out from a free list."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = collections.deque(range(num_pages))

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"out of KV cache pages (all {self.num_pages} in use)")
        return self._free.popleft()

    def release(self, pages: list[int]) -> None:
        self._free.extend(pages)

    @property
    def num_free(self) -> int:
        return len(self._free)


@dataclasses.dataclass
class StepBatch:
    """One forward pass: a flat (ragged) batch of ``T`` tokens from ``B`` requests.

    Token ``t`` belongs to request ``token_req[t]`` at logical position
    ``positions[t]``. Rows ``t >= num_real_tokens`` are padding up to the
    token bucket (``token_valid`` is False; they are never written to a cache
    and their outputs are ignored). Request ``b``'s new tokens are rows
    ``[sum(num_new_tokens[:b]), sum(num_new_tokens[:b+1]))``, written at
    positions ``start_positions[b], ...``: the inputs of
    ``slice_indices_from_block_table``.
    """

    token_ids: np.ndarray | None  # i64[T]; None for decode (the ids come from the previous step)
    positions: np.ndarray  # i32[T]
    token_req: np.ndarray  # i32[T]
    token_valid: np.ndarray  # bool[T]
    logits_rows: np.ndarray  # i32[B]: the row of each request's last token (whose logits sample the next)
    start_positions: np.ndarray  # i32[B]
    num_new_tokens: np.ndarray  # i32[B]
    block_table: np.ndarray  # i32[B, max_pages_per_req]

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


class Scheduler:
    """Prefill all prompts as one ragged batch, then decode one token per request per step.

    Pages are allocated on demand — the prompt's pages at prefill, one more
    whenever a request's next position starts a new page — so requests' pages
    interleave in the cache, as in a server. With ``reserve_upfront`` the
    prefill reserves every page a request will need, so the block table never
    changes afterwards. The pool holds exactly the pages the run needs.
    Block-table entries past a request's pages are 0 (a page of another request
    or none): attention masks those positions out.
    """

    def __init__(self, prompt_lens: list[int], new_tokens: int, page_size: int, *, reserve_upfront: bool = False):
        if new_tokens < 1:
            raise ValueError(f"{new_tokens=} must be positive")
        if page_size < 1:
            raise ValueError(f"{page_size=} must be positive")
        self.prompt_lens = [int(n) for n in prompt_lens]
        self.new_tokens = new_tokens
        self.page_size = page_size
        self.reserve_upfront = reserve_upfront
        # K/V are written for the prompt and every generated token but the last.
        positions_needed = [n + new_tokens - 1 for n in self.prompt_lens]
        self.positions_needed = positions_needed
        self.max_pages_per_req = max(cdiv(n, page_size) for n in positions_needed)
        self.num_pages = sum(cdiv(n, page_size) for n in positions_needed)
        self.allocator = PageAllocator(self.num_pages)
        self.pages: list[list[int]] = [[] for _ in self.prompt_lens]
        self.block_table = np.zeros((len(self.prompt_lens), self.max_pages_per_req), np.int32)

    @property
    def num_reqs(self) -> int:
        return len(self.prompt_lens)

    @property
    def context_len(self) -> int:
        """Positions attention reads per request: the block table's pages, flattened."""
        return self.max_pages_per_req * self.page_size

    @property
    def num_decode_steps(self) -> int:
        return self.new_tokens - 1  # the first new token comes from the prefill

    def _reserve(self, req: int, num_positions: int) -> None:
        """Give request ``req`` pages for positions ``[0, num_positions)``."""
        while len(self.pages[req]) * self.page_size < num_positions:
            page = self.allocator.allocate()
            self.block_table[req, len(self.pages[req])] = page
            self.pages[req].append(page)

    def prefill(self, prompts: list[np.ndarray]) -> StepBatch:
        lens = self.prompt_lens
        for b, n in enumerate(self.positions_needed if self.reserve_upfront else lens):
            self._reserve(b, n)
        num_real = sum(lens)
        num_tokens = token_bucket(num_real)
        pad = num_tokens - num_real
        token_ids = np.concatenate([*prompts, np.zeros(pad, np.int64)]).astype(np.int64)
        positions = np.concatenate([*(np.arange(n) for n in lens), np.zeros(pad, np.int64)]).astype(np.int32)
        token_req = np.concatenate([*(np.full(n, b) for b, n in enumerate(lens)), np.zeros(pad, np.int64)])
        return StepBatch(
            token_ids=token_ids,
            positions=positions,
            token_req=token_req.astype(np.int32),
            token_valid=np.arange(num_tokens) < num_real,
            logits_rows=(np.cumsum(lens) - 1).astype(np.int32),
            start_positions=np.zeros(self.num_reqs, np.int32),
            num_new_tokens=np.asarray(lens, np.int32),
            block_table=self.block_table.copy(),
        )

    def decode(self, step: int) -> StepBatch:
        """Decode step ``step`` (0-based): each request's newest token, at position ``len + step``."""
        positions = np.asarray(self.prompt_lens, np.int32) + step  # i32[B]
        for b, pos in enumerate(positions):
            self._reserve(b, int(pos) + 1)
        num_reqs = self.num_reqs
        return StepBatch(
            token_ids=None,
            positions=positions,
            token_req=np.arange(num_reqs, dtype=np.int32),
            token_valid=np.ones(num_reqs, bool),
            logits_rows=np.arange(num_reqs, dtype=np.int32),
            start_positions=positions.copy(),
            num_new_tokens=np.ones(num_reqs, np.int32),
            block_table=self.block_table.copy(),
        )

    def release_all(self) -> None:
        for b, pages in enumerate(self.pages):
            self.allocator.release(pages)
            self.pages[b] = []
        self.block_table[:] = 0


# ------------------------------------------------------------------ CLI helpers

# The JAX example's update paths (``examples.model_jax.update_cache``), named as torch_ops.IMPLS names them.
JAX_IMPLS = ("auto", "jax", "scan", "pallas_interpret")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=4, help="number of prompts (default 4)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    parser.add_argument("--page-size", type=int, default=16, help="rows per cache page (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the prompts (default 0)")
    parser.add_argument("--max-prompt-len", type=int, default=24, help="prompt lengths are 3..this (default 24)")


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch", "new_tokens", "page_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_prompt_len < 3:
        parser.error("--max-prompt-len must be at least 3")


def format_tokens(prompt_lens: list[int], tokens: np.ndarray) -> list[str]:
    """``prompt <i> (len L): <ids>`` per prompt; ``tokens`` is i64[B, new_tokens]."""
    return [f"prompt {b} (len {n}): {' '.join(map(str, tokens[b]))}" for b, n in enumerate(prompt_lens)]


def format_timing(
    *, prefill_tokens: int, prefill_seconds: float, first_step_seconds: float | None, decode_tokens: int,
    decode_seconds: float, compiles: str | None,
) -> list[str]:
    """The timing lines. ``compiles`` names what compiles on first use ("jit", "XLA") or None (eager).
    The first decode step (which compiles the decode graph under jit/XLA) is timed apart."""
    setup = f"includes {compiles} compilation" if compiles else "first call: includes one-time setup"
    lines = [f"prefill: {prefill_tokens} tokens in {prefill_seconds:.3f} s ({setup})"]
    if first_step_seconds is None:
        return lines + ["decode: no decode steps (--new-tokens 1: the prefill made the only token)"]
    first = f"first decode step {first_step_seconds:.3f} s" + (f" (includes {compiles} compilation)" if compiles else "")
    if not decode_tokens:
        return lines + [f"decode: {first}"]
    rate = decode_tokens / decode_seconds
    return lines + [f"decode: {rate:.1f} tokens/s ({decode_tokens} tokens in {decode_seconds:.3f} s after the first step; {first})"]
