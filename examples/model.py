"""The PyTorch model: a tiny Llama-style decoder with a paged (or dense) KV cache.

Each layer writes its new K/V rows into the cache through
``torch.ops.paged_kv.kv_cache_update`` (slice indices built from the block table
with ``torch_ops.slice_indices_from_block_table``) and attends by reading its
request's pages through the block table. The paged cache's rows are in one of
``jax_kernels.layouts``' layouts (``combined`` or tpu-inference's ``packed``),
built with ``bridge.layouts.merge_kv`` and taken apart with ``split_kv``.
:class:`DenseKVCache` is the same model with a plain ``[B, L, 2 * kv_heads, D]``
cache, for the ``--check`` comparison: both caches hand attention contiguous K
and V of the same shapes, equal at every position a token attends to (the
others, masked, get probability exactly 0), so the logits are equal bit for bit.

Weights, activations and caches are in ``cfg.dtype``; as in Hugging Face's
Llama, RMSNorm and the softmax compute in float32 and round back.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch import nn

from bridge.layouts import dequantize_kv, kv_cache_shape, merge_kv, split_kv
from jax_kernels.kv_cache_update.quantize import QUANTIZED_DTYPES
from torch_ops import max_num_slices_bound, slice_indices_from_block_table  # importing torch_ops registers the ops
from torch_ops._quantize import _np_dtype, quantize_rows
from examples.common import ModelConfig, Scheduler, StepBatch, rotary_tables

SLICES_PER_PROCESSING_PAGE = 8


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    """``cfg.dtype`` ("float32", "bfloat16") as a torch dtype."""
    return getattr(torch, cfg.dtype)


# ------------------------------------------------------------------------ model


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., size], x's dtype
        """Normalized in float32, rounded to ``x``'s dtype, then scaled (Hugging Face's Llama)."""
        x32 = x.float()  # f32[..., size]
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def attend(
    q: torch.Tensor,  # [T, Hq, D] cfg.dtype
    k: torch.Tensor,  # [T, L, Hkv, D] cfg.dtype: each token's request context
    v: torch.Tensor,  # [T, L, Hkv, D] cfg.dtype
    key_mask: torch.Tensor,  # bool[T, L]: True where token t may attend to position l
) -> torch.Tensor:  # [T, Hq * D] cfg.dtype
    """Grouped-query attention of every token over its own request's context
    (softmax in float32, rounded back, as Hugging Face's Llama)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [T, Hkv, G, D]
    scores = torch.einsum("tkgd,tlkd->tkgl", q, k) * head_dim**-0.5  # [T, Hkv, G, L]
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # masked positions get exactly 0
    out = torch.einsum("tkgl,tlkd->tkgd", probs, v)  # [T, Hkv, G, D]
    return out.reshape(num_tokens, num_heads * head_dim)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def project_qkv(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [T, hidden], ``rope`` (cos, sin) [T, D] → q [T, Hq, D], k, v [T, Hkv, D], all cfg.dtype."""
        cfg = self.cfg
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = rope[0][:, None, :], rope[1][:, None, :]  # [T, 1, D] cfg.dtype
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def forward(self, x: torch.Tensor, step: "StepTensors", cache, layer: int, rope) -> torch.Tensor:
        q, k, v = self.project_qkv(x, rope)
        cache.write(layer, k, v, step)  # in place, before reading: a token attends to itself
        keys, values = cache.read(layer, step)  # [B, L, Hkv, D] each, contiguous
        out = attend(q, keys[step.token_req], values[step.token_req], step.key_mask)  # K, V [T, L, Hkv, D]
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, step, cache, layer: int, rope):
        x = x + self.self_attn(self.input_layernorm(x), step, cache, layer, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

    ``weights`` are the float32 arrays of ``examples.common.init_weights``; the
    parameters and rotary tables are them rounded to ``cfg.dtype``."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray]):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.load_state_dict({name: torch.from_numpy(w) for name, w in weights.items()}, strict=True)
        self.requires_grad_(False)
        cos, sin = rotary_tables(cfg)  # f32[max_pos, D] each
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)
        self.to(torch_dtype(cfg))  # parameters and buffers: float32 → cfg.dtype, round to nearest even

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [T, D] cfg.dtype, for positions i64[T]."""
        return self.rope_cos[positions], self.rope_sin[positions]

    def forward(self, token_ids: torch.Tensor, step: "StepTensors", cache) -> torch.Tensor:
        """``token_ids`` i64[T] → logits [B, vocab] cfg.dtype of each request's last token."""
        rope = self.rope(step.positions)
        cache.begin_step(step)
        x = self.embed_tokens(token_ids)  # [T, hidden] cfg.dtype
        for i, layer in enumerate(self.layers):
            x = layer(x, step, cache, i, rope)
        last = self.norm(x[step.logits_rows])  # [B, hidden]
        return self.lm_head(last)  # [B, vocab] cfg.dtype


# ---------------------------------------------------------------------- caches


def cache_torch_dtype(cfg: ModelConfig, kv_cache_dtype: str) -> torch.dtype:
    """The cache's dtype: ``kv_cache_dtype`` ("auto": ``cfg.dtype``; "float8_e4m3fn", "float8_e5m2", "int8")."""
    return torch_dtype(cfg) if kv_cache_dtype == "auto" else getattr(torch, kv_cache_dtype)


def as_bits(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or a float8 CPU tensor as its uint8 bits (a view): PyTorch 2.9's CPU
    indexing and ``index_put_`` have no float8 kernels; moving bits moves the same values.
    (On XLA the bitcast views would split the step's graph: there ``x`` itself.)"""
    float8 = x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    return x.view(torch.uint8) if float8 and x.device.type == "cpu" else x  # XLA indexes float8 itself


def prefill_scale(
    x: torch.Tensor,  # [T, Hkv, D] cfg.dtype: one layer's prefill K (or V)
    token_valid: torch.Tensor,  # bool[T]: False on bucket-padding rows
    cache_dtype: torch.dtype,  # float8_e4m3fn, float8_e5m2 or int8
) -> torch.Tensor:  # f32[]
    """The per-tensor scale of one layer's K (or V) cache: ``max |x|`` over the real
    prefill tokens, in float32, over the cache dtype's largest finite value
    (448, 57344, 127), so the prefill's largest value maps to it. At least the
    smallest normal float32 (a scale must be positive). ``examples.model_jax.prefill_scale``
    computes the same, in JAX."""
    high = QUANTIZED_DTYPES[_np_dtype(cache_dtype)][1]
    # .max(), not .amax(): PyTorch/XLA 2.9 reads amax's empty dim list as "reduce nothing".
    amax = torch.where(token_valid[:, None, None], x.abs(), 0).max().to(torch.float32)  # f32[]
    return amax.clamp_min(torch.finfo(torch.float32).tiny) / high


class _Scales:
    """The quantized caches' per-layer ``(k_scale, v_scale)`` (f32[] each), set from each
    layer's prefill K and V (:func:`prefill_scale`) before that layer's first write, then
    fixed; ``None`` for a cache in ``cfg.dtype``."""

    def __init__(self, cfg: ModelConfig, cache_dtype: torch.dtype):
        self.quantized = cache_dtype != torch_dtype(cfg)
        self.cache_dtype = cache_dtype
        self.scales: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.num_layers

    def scales_for(self, layer: int, k, v, step: "StepTensors"):
        """Layer ``layer``'s scales, computed from ``k``/``v`` [T, Hkv, D] on its first write."""
        if self.scales[layer] is None:
            self.scales[layer] = tuple(prefill_scale(x, step.token_valid, self.cache_dtype) for x in (k, v))
        return self.scales[layer]

    def dequantized(self, layer: int, k, v, dtype: torch.dtype):
        """``k``, ``v`` [N, Hkv, D] read from the cache, as ``dtype`` (``x.float() * scale``)."""
        if not self.quantized:
            return k, v
        k_scale, v_scale = self.scales[layer]
        return dequantize_kv(k, k_scale, k_scale, dtype), dequantize_kv(v, v_scale, v_scale, dtype)



@dataclasses.dataclass
class StepTensors:
    """:class:`examples.common.StepBatch` as tensors on the model's device."""

    positions: torch.Tensor  # i64[T]
    token_req: torch.Tensor  # i64[T]
    token_valid: torch.Tensor  # bool[T]
    logits_rows: torch.Tensor  # i64[B]
    start_positions: torch.Tensor  # i32[B]
    num_new_tokens: torch.Tensor  # i32[B]
    block_table: torch.Tensor  # i32[B, max_pages_per_req]
    key_mask: torch.Tensor  # bool[T, L]: position l <= the token's position

    @classmethod
    def from_batch(cls, batch: StepBatch, context_len: int, device) -> "StepTensors":
        def put(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(array).to(device=device, dtype=dtype)

        positions = put(batch.positions, torch.int64)
        key_positions = torch.arange(context_len, device=device)  # i64[L]
        return cls(
            positions=positions,
            token_req=put(batch.token_req, torch.int64),
            token_valid=put(batch.token_valid, torch.bool),
            logits_rows=put(batch.logits_rows, torch.int64),
            start_positions=put(batch.start_positions, torch.int32),
            num_new_tokens=put(batch.num_new_tokens, torch.int32),
            block_table=put(batch.block_table, torch.int32),
            key_mask=key_positions[None, :] <= positions[:, None],
        )


class PagedKVCache(_Scales):
    """One flat cache per layer, ``[num_pages * page_size, *row]`` in ``cfg.dtype``
    (or ``kv_cache_dtype``: quantized on write, K by ``k_scale`` and V by ``v_scale``
    of :class:`_Scales`, and dequantized when read), written with
    ``torch.ops.paged_kv.kv_cache_update`` and read through the block table.

    ``row`` is ``layout``'s (``bridge.layouts.kv_cache_shape`` without the pages):
    ``combined`` ``[2 * kv_heads, head_dim]``, heads k0, v0, k1, v1; ``packed``
    ``[H' // pack, pack, align(head_dim, 128)]``, tpu-inference's RPA v3 rows
    (zero heads up to the cache dtype's packing, zero lanes up to 128). New K/V rows
    come from ``merge_kv`` and go back to K and V with ``split_kv``."""

    def __init__(
        self, cfg: ModelConfig, num_pages: int, page_size: int, *, impl: str, device, layout: str = "combined",
        kv_cache_dtype: str = "auto",
    ):
        dtype = cache_torch_dtype(cfg, kv_cache_dtype)
        super().__init__(cfg, dtype)
        self.cfg = cfg
        self.page_size = page_size
        self.impl = impl
        self.layout = layout
        self.row = kv_cache_shape(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, dtype, layout=layout)[2:]
        shape = (num_pages * page_size, *self.row)
        self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.slice_indices = self.total_update_slices = None

    def begin_step(self, step: StepTensors) -> None:
        # Once per step, shared by every layer; on XLA it stays in the lazy graph (no host sync).
        # max_num_slices depends only on the shapes (B, T), so each token bucket keeps one graph.
        num_reqs, num_tokens = step.block_table.shape[0], step.positions.shape[0]
        self.slice_indices, self.total_update_slices = slice_indices_from_block_table(
            step.block_table, step.start_positions, step.num_new_tokens, page_size=self.page_size,
            max_num_slices=max_num_slices_bound(num_reqs, num_tokens, self.page_size),
        )  # i32[3, max_num_slices], i32[1]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: StepTensors) -> None:
        # k, v [T, Hkv, D]; padding rows (t >= real tokens) are in no slice.
        new_kv = merge_kv(k, v, layout=self.layout, cache_dtype=self.cache_dtype)  # [T, *row] cfg.dtype
        scales = self.scales_for(layer, k, v, step) if self.quantized else (None, None)  # f32[] each
        torch.ops.paged_kv.kv_cache_update(
            new_kv, self.slice_indices, self.layers[layer], self.total_update_slices,
            self.page_size, SLICES_PER_PROCESSING_PAGE, self.impl, *scales,
        )

    def read(self, layer: int, step: StepTensors) -> tuple[torch.Tensor, torch.Tensor]:  # [B, L, Hkv, D] each
        cfg = self.cfg
        pages = self.layers[layer].view(-1, self.page_size, *self.row)  # view: [P, page_size, *row]
        rows = as_bits(pages)[step.block_table.long()]  # [B, pages_per_req, page_size, *row]
        rows = rows.view(pages.dtype) if rows.dtype != pages.dtype else rows
        num_reqs, context_len = rows.shape[0], rows.shape[1] * self.page_size
        k, v = split_kv(rows.reshape(num_reqs * context_len, *self.row), cfg.num_kv_heads, cfg.head_dim,
                        layout=self.layout)  # [B * L, Hkv, D] each, strided views, cache dtype
        k, v = self.dequantized(layer, k, v, torch_dtype(cfg))  # cfg.dtype
        # Contiguous, as the dense cache's: attention gets identical tensors (values, shapes, strides).
        shape = (num_reqs, context_len, cfg.num_kv_heads, cfg.head_dim)
        return k.reshape(shape).contiguous(), v.reshape(shape).contiguous()


class DenseKVCache(_Scales):
    """The check's cache: ``[B, L + 1, 2 * kv_heads, head_dim]`` in ``cfg.dtype`` (or
    ``kv_cache_dtype``, quantized with ``torch_ops._quantize.quantize_rows``: the op's
    math, the paged cache's scales) per layer, request ``b``'s position ``p`` at
    ``[b, p]``, heads k0, v0, k1, v1 (whatever the paged cache's layout); position
    ``L`` is a scratch row that bucket-padding tokens write to (never read)."""

    def __init__(self, cfg: ModelConfig, num_reqs: int, context_len: int, *, device, kv_cache_dtype: str = "auto"):
        dtype = cache_torch_dtype(cfg, kv_cache_dtype)
        super().__init__(cfg, dtype)
        self.cfg = cfg
        self.context_len = context_len
        shape = (num_reqs, context_len + 1, cfg.combined_kv_heads, cfg.head_dim)
        self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]

    def begin_step(self, step: StepTensors) -> None:
        pass  # no per-step metadata: positions index the cache directly

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: StepTensors) -> None:
        num_tokens, num_kv_heads, head_dim = k.shape
        # Heads k0, v0, k1, v1 as vLLM builds them. Joined with cat like merge_kv (every layout starts with
        # this cat), not stack: XLA:CPU then computes k and v alike in both graphs (with stack its fusion
        # emitters rounded the rotary keys 1 ulp apart, head_dim 64 float32).
        new_kv = torch.cat([k, v], dim=-1).reshape(num_tokens, 2 * num_kv_heads, head_dim)  # [T, 2 * Hkv, D]
        if self.quantized:
            new_kv = quantize_rows(new_kv, *self.scales_for(layer, k, v, step), self.cache_dtype)  # cache dtype
        rows = torch.where(step.token_valid, step.positions, self.context_len)  # i64[T]
        as_bits(self.layers[layer]).index_put_((step.token_req, rows), as_bits(new_kv))

    def read(self, layer: int, step: StepTensors) -> tuple[torch.Tensor, torch.Tensor]:  # [B, L, Hkv, D] each
        context = self.layers[layer][:, : self.context_len]  # [B, L, 2 * Hkv, D] cache dtype
        k, v = self.dequantized(layer, context[:, :, 0::2], context[:, :, 1::2], torch_dtype(self.cfg))
        return k.contiguous(), v.contiguous()


# ------------------------------------------------------------------ generation


def sync(device: torch.device) -> None:
    """End a step: on XLA, compile (first time) and launch the pending graph; eager: nothing."""
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


def xla_compile_count() -> int:
    """XLA graphs PyTorch/XLA compiled so far in this process."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return 0 if data is None else int(data[0])


def prefill(
    model: TinyLlama, prompts: list[np.ndarray], steps: Scheduler, cache, device
) -> tuple[torch.Tensor, torch.Tensor]:  # (next ids i64[B], logits [B, V] cfg.dtype)
    """All prompts as one ragged batch (padded to a token bucket): fills the
    cache with their K/V and returns the first generated id of each."""
    batch = steps.prefill(prompts)
    token_ids = torch.from_numpy(batch.token_ids).to(device)  # i64[T]
    logits = model(token_ids, StepTensors.from_batch(batch, steps.context_len, device), cache)  # [B, V] cfg.dtype
    return logits.argmax(-1), logits


def decode_step(
    model: TinyLlama, token_ids: torch.Tensor, steps: Scheduler, step: int, cache, device
) -> tuple[torch.Tensor, torch.Tensor]:  # (next ids i64[B], logits [B, V] cfg.dtype)
    """Decode step ``step``: one token per request (``token_ids`` i64[B], the last
    step's ids, left on the device)."""
    batch = StepTensors.from_batch(steps.decode(step), steps.context_len, device)
    logits = model(token_ids, batch, cache)  # [B, V] cfg.dtype
    return logits.argmax(-1), logits


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # i64[B, new_tokens]: the generated ids
    logits: np.ndarray  # f32[new_tokens, B, vocab]: the logits each id was the argmax of (exactly, from cfg.dtype)
    pages: list[list[int]]  # physical pages of each request
    cache: object  # the PagedKVCache / DenseKVCache at the end
    prefill_tokens: int
    prefill_seconds: float
    first_step_seconds: float | None  # the first decode step (None: no decode steps)
    decode_tokens: int  # tokens of the decode steps after the first
    decode_seconds: float  # time of the decode steps after the first
    prefill_compilations: int | None = None  # XLA only: graphs compiled by the prefill
    decode_compilations: int | None = None  # XLA only: graphs compiled by all decode steps together


@torch.no_grad()
def generate(
    model: TinyLlama,
    prompts: list[np.ndarray],
    *,
    new_tokens: int,
    page_size: int,
    cache_kind: str = "paged",  # "paged" | "dense"
    impl: str = "auto",
    layout: str = "combined",  # the paged cache's rows: "combined" | "packed"
    kv_cache_dtype: str = "auto",  # "auto" (cfg.dtype) | "float8_e4m3fn" | "float8_e5m2" | "int8"
    device=None,
    progress: bool = True,
    reserve_upfront: bool = False,
    forced_ids: np.ndarray | None = None,  # i64[B, new_tokens]: teacher forcing (see below)
) -> Generation:
    """Greedy decoding: prefill all prompts as one ragged batch, then
    ``new_tokens - 1`` decode steps of one token per prompt. ``impl`` and
    ``layout`` are the paged cache's (the dense one ignores them);
    ``kv_cache_dtype`` both caches' (quantized: each layer's scales from its
    prefill K and V, :func:`prefill_scale`).

    ``forced_ids`` (another run's tokens): decode step ``i`` is fed
    ``forced_ids[:, i]`` instead of the id this run sampled, so every step's
    logits have that run's history and compare with its logits step by step;
    ``tokens`` are still this run's own argmaxes.

    On XLA the host does not wait inside a decode step: the step's metadata
    goes to the device, the sampled ids stay there (the next step's input),
    ``torch_xla.sync()`` ends the step, and the ids come back at the end.
    Every decode step has the same shapes, so they all run one compiled graph.
    """
    from tqdm import tqdm

    device = torch.device(device) if device is not None else torch.device("cpu")
    on_xla = device.type == "xla"
    cfg = model.cfg
    steps = Scheduler([len(p) for p in prompts], new_tokens, page_size, reserve_upfront=reserve_upfront)
    if cache_kind == "paged":
        cache = PagedKVCache(cfg, steps.num_pages, page_size, impl=impl, device=device, layout=layout,
                             kv_cache_dtype=kv_cache_dtype)
    elif cache_kind == "dense":
        cache = DenseKVCache(cfg, steps.num_reqs, steps.context_len, device=device, kv_cache_dtype=kv_cache_dtype)
    else:
        raise ValueError(f"cache_kind={cache_kind!r} must be 'paged' or 'dense'")

    compiled = xla_compile_count() if on_xla else 0
    start = time.perf_counter()
    next_ids, logits = prefill(model, prompts, steps, cache, device)
    all_ids, all_logits = [next_ids], [logits]
    sync(device)
    next_ids.cpu()  # wait for the prefill, to time it
    prefill_seconds = time.perf_counter() - start
    prefill_compilations = xla_compile_count() - compiled if on_xla else None

    compiled = xla_compile_count() if on_xla else 0
    first_step_seconds = None
    start = time.perf_counter()
    bar = tqdm(range(steps.num_decode_steps), desc=f"decode ({cache_kind} cache)", unit="step", disable=not progress)
    if forced_ids is not None:
        forced_ids = np.asarray(forced_ids)
        if forced_ids.shape != (len(prompts), new_tokens):
            raise ValueError(f"forced_ids.shape={forced_ids.shape} must be (len(prompts), new_tokens) = "
                             f"{(len(prompts), new_tokens)}")
        forced_ids = forced_ids.astype(np.int64)  # i64[B, new_tokens]
    for i in bar:
        # Each step's forced ids go to the device as data (a slice of a device tensor by i would put
        # the step number into the XLA graph: one compilation per step).
        inputs = next_ids if forced_ids is None else torch.from_numpy(forced_ids[:, i].copy()).to(device)  # i64[B]
        next_ids, logits = decode_step(model, inputs, steps, i, cache, device)
        all_ids.append(next_ids)
        all_logits.append(logits)
        sync(device)
        if i == 0:  # time the first step (it compiles the decode graph on XLA) apart from the rest
            next_ids.cpu()
            first_step_seconds = time.perf_counter() - start
            start = time.perf_counter()
    next_ids.cpu()  # wait for the last step
    decode_seconds = time.perf_counter() - start
    decode_compilations = xla_compile_count() - compiled if on_xla else None

    pages = [list(p) for p in steps.pages]
    steps.release_all()
    return Generation(
        tokens=torch.stack(all_ids, dim=1).cpu().numpy(),
        logits=torch.stack(all_logits).float().cpu().numpy(),  # numpy has no bfloat16; float32 holds it exactly
        pages=pages,
        cache=cache,
        prefill_tokens=sum(len(p) for p in prompts),
        prefill_seconds=prefill_seconds,
        first_step_seconds=first_step_seconds,
        decode_tokens=max(steps.num_decode_steps - 1, 0) * steps.num_reqs,
        decode_seconds=decode_seconds,
        prefill_compilations=prefill_compilations,
        decode_compilations=decode_compilations,
    )
