"""The PyTorch model: a tiny Llama-style decoder with a paged (or dense) KV cache.

Each layer writes its new K/V rows into the cache through
``torch.ops.paged_kv.kv_cache_update`` (slice indices built from the block table
with ``torch_ops.slice_indices_from_block_table``) and attends by reading its
request's pages through the block table. :class:`DenseKVCache` is the same model
with a plain ``[B, L, 2 * kv_heads, D]`` cache, for the ``--check`` comparison:
attention sees the same values in the same shapes, so the logits are equal bit
for bit.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch import nn

from bridge.layouts import to_paged
from torch_ops import max_num_slices_bound, slice_indices_from_block_table  # importing torch_ops registers the ops
from examples.common import ModelConfig, Scheduler, StepBatch, rotary_tables

SLICES_PER_PROCESSING_PAGE = 8


# ------------------------------------------------------------------------ model


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # f32[..., size]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def attend(
    q: torch.Tensor,  # f32[T, Hq, D]
    k: torch.Tensor,  # f32[T, L, Hkv, D]: each token's request context
    v: torch.Tensor,  # f32[T, L, Hkv, D]
    key_mask: torch.Tensor,  # bool[T, L]: True where token t may attend to position l
) -> torch.Tensor:  # f32[T, Hq * D]
    """Grouped-query attention of every token over its own request's context."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)  # f32[T, Hkv, G, D]
    scores = torch.einsum("tkgd,tlkd->tkgl", q, k) * head_dim**-0.5  # f32[T, Hkv, G, L]
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # masked positions get exactly 0
    out = torch.einsum("tkgl,tlkd->tkgd", probs, v)  # f32[T, Hkv, G, D]
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
        """``x`` f32[T, hidden], ``rope`` (cos, sin) f32[T, D] → q f32[T, Hq, D], k, v f32[T, Hkv, D]."""
        cfg = self.cfg
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = rope[0][:, None, :], rope[1][:, None, :]  # f32[T, 1, D]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def forward(self, x: torch.Tensor, step: "StepTensors", cache, layer: int, rope) -> torch.Tensor:
        cfg = self.cfg
        num_tokens = x.shape[0]
        q, k, v = self.project_qkv(x, rope)
        # Combined K/V heads k0, v0, k1, v1, ... (bridge.layouts.merge_kv's layout).
        new_kv = torch.stack([k, v], dim=2).reshape(num_tokens, cfg.combined_kv_heads, cfg.head_dim)
        cache.write(layer, new_kv, step)  # in place, before reading: a token attends to itself
        context = cache.read(layer, step)[step.token_req]  # f32[T, L, 2 * Hkv, D]
        out = attend(q, context[:, :, 0::2], context[:, :, 1::2], step.key_mask)  # split_kv's views
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
    """Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray]):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.load_state_dict({name: torch.from_numpy(w) for name, w in weights.items()}, strict=True)
        self.requires_grad_(False)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)  # f32[max_pos, D]
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)  # f32[max_pos, D]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each f32[T, D], for positions i64[T]."""
        return self.rope_cos[positions], self.rope_sin[positions]

    def forward(self, token_ids: torch.Tensor, step: "StepTensors", cache) -> torch.Tensor:
        """``token_ids`` i64[T] → logits f32[B, vocab] of each request's last token."""
        rope = self.rope(step.positions)
        cache.begin_step(step)
        x = self.embed_tokens(token_ids)  # f32[T, hidden]
        for i, layer in enumerate(self.layers):
            x = layer(x, step, cache, i, rope)
        last = self.norm(x[step.logits_rows])  # f32[B, hidden]
        return self.lm_head(last)  # f32[B, vocab]


# ---------------------------------------------------------------------- caches


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


class PagedKVCache:
    """One flat cache per layer, ``f32[num_pages * page_size, 2 * kv_heads, head_dim]``,
    written with ``torch.ops.paged_kv.kv_cache_update`` and read through the block table."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, *, impl: str, device):
        self.page_size = page_size
        self.impl = impl
        shape = (num_pages * page_size, cfg.combined_kv_heads, cfg.head_dim)
        self.layers = [torch.zeros(shape, device=device) for _ in range(cfg.num_layers)]
        self.slice_indices = self.total_update_slices = None

    def begin_step(self, step: StepTensors) -> None:
        # Once per step, shared by every layer; on XLA it stays in the lazy graph (no host sync).
        # max_num_slices depends only on the shapes (B, T), so each token bucket keeps one graph.
        num_reqs, num_tokens = step.block_table.shape[0], step.positions.shape[0]
        self.slice_indices, self.total_update_slices = slice_indices_from_block_table(
            step.block_table, step.start_positions, step.num_new_tokens, page_size=self.page_size,
            max_num_slices=max_num_slices_bound(num_reqs, num_tokens, self.page_size),
        )  # i32[3, max_num_slices], i32[1]

    def write(self, layer: int, new_kv: torch.Tensor, step: StepTensors) -> None:
        # new_kv f32[T, 2 * Hkv, D]; padding rows (t >= real tokens) are in no slice.
        torch.ops.paged_kv.kv_cache_update(
            new_kv, self.slice_indices, self.layers[layer], self.total_update_slices,
            self.page_size, SLICES_PER_PROCESSING_PAGE, self.impl,
        )

    def read(self, layer: int, step: StepTensors) -> torch.Tensor:  # f32[B, L, 2 * Hkv, D]
        pages = to_paged(self.layers[layer], self.page_size)  # view: f32[P, page_size, 2 * Hkv, D]
        return pages[step.block_table.long()].flatten(1, 2)  # f32[B, pages_per_req * page_size, 2 * Hkv, D]


class DenseKVCache:
    """The check's cache: ``f32[B, L + 1, 2 * kv_heads, head_dim]`` per layer, request
    ``b``'s position ``p`` at ``[b, p]``; position ``L`` is a scratch row that
    bucket-padding tokens write to (never read)."""

    def __init__(self, cfg: ModelConfig, num_reqs: int, context_len: int, *, device):
        self.context_len = context_len
        shape = (num_reqs, context_len + 1, cfg.combined_kv_heads, cfg.head_dim)
        self.layers = [torch.zeros(shape, device=device) for _ in range(cfg.num_layers)]

    def begin_step(self, step: StepTensors) -> None:
        pass  # no per-step metadata: positions index the cache directly

    def write(self, layer: int, new_kv: torch.Tensor, step: StepTensors) -> None:
        rows = torch.where(step.token_valid, step.positions, self.context_len)  # i64[T]
        self.layers[layer].index_put_((step.token_req, rows), new_kv)

    def read(self, layer: int, step: StepTensors) -> torch.Tensor:  # f32[B, L, 2 * Hkv, D]
        return self.layers[layer][:, : self.context_len]


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
) -> tuple[torch.Tensor, torch.Tensor]:  # (next ids i64[B], logits f32[B, V])
    """All prompts as one ragged batch (padded to a token bucket): fills the
    cache with their K/V and returns the first generated id of each."""
    batch = steps.prefill(prompts)
    token_ids = torch.from_numpy(batch.token_ids).to(device)  # i64[T]
    logits = model(token_ids, StepTensors.from_batch(batch, steps.context_len, device), cache)  # f32[B, V]
    return logits.argmax(-1), logits


def decode_step(
    model: TinyLlama, token_ids: torch.Tensor, steps: Scheduler, step: int, cache, device
) -> tuple[torch.Tensor, torch.Tensor]:  # (next ids i64[B], logits f32[B, V])
    """Decode step ``step``: one token per request (``token_ids`` i64[B], the last
    step's ids, left on the device)."""
    batch = StepTensors.from_batch(steps.decode(step), steps.context_len, device)
    logits = model(token_ids, batch, cache)  # f32[B, V]
    return logits.argmax(-1), logits


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # i64[B, new_tokens]: the generated ids
    logits: np.ndarray  # f32[new_tokens, B, vocab]: the logits each id was the argmax of
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
    device=None,
    progress: bool = True,
    reserve_upfront: bool = False,
) -> Generation:
    """Greedy decoding: prefill all prompts as one ragged batch, then
    ``new_tokens - 1`` decode steps of one token per prompt.

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
        cache = PagedKVCache(cfg, steps.num_pages, page_size, impl=impl, device=device)
    elif cache_kind == "dense":
        cache = DenseKVCache(cfg, steps.num_reqs, steps.context_len, device=device)
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
    for i in bar:
        next_ids, logits = decode_step(model, next_ids, steps, i, cache, device)
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
        logits=torch.stack(all_logits).cpu().numpy(),
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
