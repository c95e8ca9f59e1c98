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


# ``--dtype`` choices: the dtype of the weights, the activations and the KV cache.
DTYPES = ("float32", "bfloat16")
# ``--layout`` choices: how a paged cache row holds a token's K and V (``jax_kernels.layouts``).
LAYOUTS = ("combined", "packed")
# ``--kv-cache-dtype`` choices: "auto" is ``--dtype``; the others quantize on write.
KV_CACHE_DTYPES = ("auto", "float8_e4m3fn", "float8_e5m2", "int8")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A tiny Llama-style decoder.

    ``head_dim`` (even, for the rotary halves; default 128) sets the projections'
    widths; ``hidden_size`` stays 256. ``dtype`` (a name in :data:`DTYPES`) is the
    dtype of the weights, the activations and the caches: the weights are made in
    float32 (:func:`init_weights`) and rounded to it, identically in both frameworks.
    """

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
    dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int):
            raise TypeError(f"head_dim={self.head_dim!r} must be an int")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even and positive (rotary embeddings rotate halves)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(map(repr, DTYPES))}")

    @property
    def combined_kv_heads(self) -> int:
        """Heads of the cache's combined K/V layout: k0, v0, k1, v1, ..."""
        return 2 * self.num_kv_heads

    def describe(self) -> str:
        return (
            f"{self.num_layers} layers, hidden {self.hidden_size}, {self.num_heads} query / "
            f"{self.num_kv_heads} KV heads, head_dim {self.head_dim}, vocab {self.vocab_size}, {self.dtype}"
        )


def init_weights(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights from ``seed``, named like Hugging Face's Llama.

    Linear weights are ``[out_features, in_features]`` (``y = x @ W.T``), scaled
    by ``1/sqrt(in_features)``; norms start at one. Always float32, whatever
    ``cfg.dtype``: both frameworks load these exact arrays and round them to
    ``cfg.dtype`` (round to nearest even, the same bits in both), so their
    weights are bit-identical.
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
    Float32, like the weights: the models round them to ``cfg.dtype``.
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
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch's intra-op CPU threads, torch.set_num_threads (default 1: the model is tiny, "
                             "and more threads mostly wait on each other, badly so on a busy machine; "
                             "0: torch's default)")


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch", "new_tokens", "page_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_prompt_len < 3:
        parser.error("--max-prompt-len must be at least 3")
    if args.threads < 0:
        parser.error("--threads must be >= 0 (0: torch's default)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--layout``, ``--head-dim`` and ``--dtype``: the generating examples' model and cache."""
    parser.add_argument("--layout", choices=LAYOUTS, default="combined",
                        help="the paged cache's rows (jax_kernels.layouts): combined [2*kv_heads, head_dim], "
                             "heads k0, v0, k1, v1 (default); packed [H'/pack, pack, align(head_dim, 128)], "
                             "tpu-inference's RPA v3 cache")
    parser.add_argument("--head-dim", type=int, default=128,
                        help="the model's head_dim (even; default 128). The Pallas kernel "
                             "(--impl pallas_interpret) needs 128 lanes: a multiple of 128, or --layout packed")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights, activations and caches (default float32); the weights are made in "
                             "float32 and rounded")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="the caches' dtype (default auto: --dtype). The others quantize on write "
                             "(q = x / scale, clipped, cast), with a K and a V scale per layer from its prefill: "
                             "max |K| (|V|) over the prompts' tokens / the dtype's largest finite value "
                             "(448, 57344, 127); attention reads x = q * scale. The run is then fed the ids of "
                             "an unquantized run, to print how far its logits move and how many greedy ids agree")


def check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """:func:`add_model_args`' rules, and the kernel's: ``args.impl`` naming a Pallas
    path needs rows of 128 lanes."""
    if args.head_dim < 2 or args.head_dim % 2:
        parser.error(f"--head-dim must be even and positive (rotary embeddings rotate halves), got {args.head_dim}")
    if args.impl in ("pallas", "pallas_interpret") and args.layout == "combined" and args.head_dim % 128:
        parser.error(f"--impl {args.impl} needs rows of 128 lanes: --head-dim {args.head_dim} works with "
                     "--layout packed (which pads it to 128), or use a --head-dim that is a multiple of 128")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The :class:`ModelConfig` the command line asks for (``--head-dim``, ``--dtype``)."""
    return ModelConfig(head_dim=args.head_dim, dtype=args.dtype)


def quantization_effect(quantized_tokens: np.ndarray, quantized_logits: np.ndarray, tokens: np.ndarray,
                        logits: np.ndarray) -> tuple[float, int]:
    """How a run with a quantized cache, fed the unquantized run's ids (so every step has the
    same history), differs from it: ``(max |logits - unquantized logits|, greedy ids equal)``.
    ``*tokens`` i64[B, N] (each run's argmaxes), ``*logits`` f32[N, B, V]."""
    return float(np.max(np.abs(quantized_logits - logits))), int(np.sum(quantized_tokens == tokens))


def format_quantization(kv_cache_dtype: str, diff: float, agree: int, total: int) -> str:
    """The line a quantized run prints about :func:`quantization_effect`."""
    return (f"kv cache {kv_cache_dtype} (scales per layer: prefill max |K|, max |V| / finite max): logits max "
            f"|quantized - unquantized| = {diff:.3g} over {total} ids, fed the unquantized run's ids; "
            f"greedy ids agree with the unquantized run at {agree} of {total}")


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
