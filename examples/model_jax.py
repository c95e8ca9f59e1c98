"""The JAX twin of ``examples/model.py``: the same model, weights and schedule, in JAX.

Imports ``jax_kernels`` only (never torch). One jitted function runs a whole
forward pass — slice indices from the block table
(``jax_kernels.slice_indices_from_block_table``), each layer's cache update
(``jax_kernels.kv_cache_update``), paged attention, the logits — with the caches
donated, so on TPU the Pallas kernel updates them in place.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_kernels as jk
from examples.common import JAX_IMPLS, ModelConfig, Scheduler, StepBatch, rotary_tables

SLICES_PER_PROCESSING_PAGE = 8


def load_params(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The numpy weights (``examples.common.init_weights``) and rotary tables as JAX arrays."""
    params = {name: jnp.asarray(w) for name, w in weights.items()}
    cos, sin = rotary_tables(cfg)
    params["rope_cos"], params["rope_sin"] = jnp.asarray(cos), jnp.asarray(sin)  # f32[max_pos, D]
    return params


def rms_norm(x, weight, eps: float):  # f32[..., size]
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotate_half(x):
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def linear(x, weight):  # weight [out, in], as torch.nn.Linear
    return x @ weight.T


def attend(
    q,  # f32[T, Hq, D]
    k,  # f32[T, L, Hkv, D]
    v,  # f32[T, L, Hkv, D]
    key_mask,  # bool[T, L]
):  # f32[T, Hq * D]
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)  # f32[T, Hkv, G, D]
    scores = jnp.einsum("tkgd,tlkd->tkgl", q, k) * head_dim**-0.5  # f32[T, Hkv, G, L]
    scores = jnp.where(key_mask[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("tkgl,tlkd->tkgd", probs, v)  # f32[T, Hkv, G, D]
    return out.reshape(num_tokens, num_heads * head_dim)


def update_cache(impl: str, new_kv, slice_indices, cache, total_update_slices, *, page_size: int):
    """``cache`` with the slices written, by the update path ``impl``."""
    if impl == "auto":  # the Pallas kernel on TPU, the scatter fallback elsewhere
        return jk.kv_cache_update(
            new_kv, slice_indices, cache, total_update_slices, page_size=page_size,
            slices_per_processing_page=SLICES_PER_PROCESSING_PAGE,
        )
    if impl == "pallas_interpret":  # the kernel's own code in the TPU interpreter
        return jk.kv_cache_update(
            new_kv, slice_indices, cache, total_update_slices, page_size=page_size,
            slices_per_processing_page=SLICES_PER_PROCESSING_PAGE, interpret=True,
        )
    if impl == "jax":
        return jk.kv_cache_update_scatter(new_kv, slice_indices, cache, total_update_slices, page_size=page_size)
    if impl == "scan":
        return jk.kv_cache_update_jax(new_kv, slice_indices, cache, total_update_slices, page_size=page_size)
    raise ValueError(f"impl={impl!r} is not one of {JAX_IMPLS}")


def forward(
    params: dict,
    caches: list,  # per layer f32[num_pages * page_size, 2 * Hkv, D]
    token_ids,  # i32[T]
    positions,  # i32[T]
    token_req,  # i32[T]
    logits_rows,  # i32[B]
    start_positions,  # i32[B]
    num_new_tokens,  # i32[B]
    block_table,  # i32[B, max_pages_per_req]
    *,
    cfg: ModelConfig,
    page_size: int,
    impl: str,
):  # -> (logits f32[B, V], next ids i32[B], updated caches)
    num_tokens, num_reqs = token_ids.shape[0], block_table.shape[0]
    slice_indices, total_update_slices = jk.slice_indices_from_block_table(
        block_table, start_positions, num_new_tokens, page_size=page_size,
        max_num_slices=jk.max_num_slices_bound(num_reqs, num_tokens, page_size),
    )  # i32[3, S], i32[1]
    context_len = block_table.shape[1] * page_size
    key_mask = jnp.arange(context_len)[None, :] <= positions[:, None]  # bool[T, L]
    cos = params["rope_cos"][positions][:, None, :]  # f32[T, 1, D]
    sin = params["rope_sin"][positions][:, None, :]

    x = params["embed_tokens.weight"][token_ids]  # f32[T, hidden]
    new_caches = []
    for i, cache in enumerate(caches):
        p = f"layers.{i}."
        h = rms_norm(x, params[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = linear(h, params[p + "self_attn.q_proj.weight"]).reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = linear(h, params[p + "self_attn.k_proj.weight"]).reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = linear(h, params[p + "self_attn.v_proj.weight"]).reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        new_kv = jnp.stack([k, v], axis=2).reshape(num_tokens, cfg.combined_kv_heads, cfg.head_dim)  # k0, v0, k1, v1
        cache = update_cache(impl, new_kv, slice_indices, cache, total_update_slices, page_size=page_size)
        new_caches.append(cache)
        pages = cache.reshape(-1, page_size, cfg.combined_kv_heads, cfg.head_dim)  # f32[P, page_size, 2 * Hkv, D]
        context = pages[block_table].reshape(num_reqs, context_len, cfg.combined_kv_heads, cfg.head_dim)
        context = context[token_req]  # f32[T, L, 2 * Hkv, D]
        out = attend(q, context[:, :, 0::2], context[:, :, 1::2], key_mask)
        x = x + linear(out, params[p + "self_attn.o_proj.weight"])
        h = rms_norm(x, params[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = jax.nn.silu(linear(h, params[p + "mlp.gate_proj.weight"]))
        x = x + linear(gate * linear(h, params[p + "mlp.up_proj.weight"]), params[p + "mlp.down_proj.weight"])
    last = rms_norm(x[logits_rows], params["norm.weight"], cfg.rms_norm_eps)  # f32[B, hidden]
    logits = linear(last, params["lm_head.weight"])  # f32[B, V]
    return logits, jnp.argmax(logits, axis=-1).astype(jnp.int32), new_caches


_STATIC = ("cfg", "page_size", "impl")
# The caches are donated: XLA may write the updated caches into their buffers
# (the Pallas kernel on TPU does, in place).
forward_donating = jax.jit(forward, static_argnames=_STATIC, donate_argnums=1)
# Not donated: for caches whose memory JAX does not own (zero-copy views of torch tensors).
forward_keeping = jax.jit(forward, static_argnames=_STATIC)


def step_args(batch: StepBatch, token_ids) -> tuple:
    """``forward``'s array arguments after ``caches``, from a step's numpy metadata."""
    return (
        token_ids, batch.positions, batch.token_req, batch.logits_rows,
        batch.start_positions, batch.num_new_tokens, batch.block_table,
    )


def new_caches(cfg: ModelConfig, num_pages: int, page_size: int) -> list[jax.Array]:
    shape = (num_pages * page_size, cfg.combined_kv_heads, cfg.head_dim)
    return [jnp.zeros(shape, jnp.float32) for _ in range(cfg.num_layers)]


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # i32[B, new_tokens]
    logits: np.ndarray  # f32[new_tokens, B, vocab]
    pages: list[list[int]]
    caches: list  # per layer, at the end
    prefill_tokens: int
    prefill_seconds: float
    first_step_seconds: float | None  # the first decode step (None: no decode steps)
    decode_tokens: int  # tokens of the decode steps after the first
    decode_seconds: float  # time of the decode steps after the first


def generate(
    params: dict,
    prompts: list[np.ndarray],
    *,
    cfg: ModelConfig,
    new_tokens: int,
    page_size: int,
    impl: str = "auto",
    progress: bool = True,
) -> Generation:
    """Greedy decoding, step for step as ``examples.model.generate`` (same schedule, pages, shapes)."""
    from tqdm import tqdm

    steps = Scheduler([len(p) for p in prompts], new_tokens, page_size)
    caches = new_caches(cfg, steps.num_pages, page_size)
    statics = dict(cfg=cfg, page_size=page_size, impl=impl)

    start = time.perf_counter()
    batch = steps.prefill(prompts)
    logits, next_ids, caches = forward_donating(
        params, caches, *step_args(batch, batch.token_ids.astype(np.int32)), **statics
    )
    all_ids, all_logits = [next_ids], [logits]
    next_ids.block_until_ready()
    prefill_seconds = time.perf_counter() - start

    first_step_seconds = None
    start = time.perf_counter()
    for i in tqdm(range(steps.num_decode_steps), desc="decode", unit="step", disable=not progress):
        logits, next_ids, caches = forward_donating(params, caches, *step_args(steps.decode(i), next_ids), **statics)
        all_ids.append(next_ids)
        all_logits.append(logits)
        if i == 0:  # time the first step (it compiles the decode step) apart from the rest
            next_ids.block_until_ready()
            first_step_seconds = time.perf_counter() - start
            start = time.perf_counter()
    next_ids.block_until_ready()
    decode_seconds = time.perf_counter() - start

    pages = [list(p) for p in steps.pages]
    steps.release_all()
    return Generation(
        tokens=np.stack([np.asarray(ids) for ids in all_ids], axis=1),
        logits=np.stack([np.asarray(x) for x in all_logits]),
        pages=pages,
        caches=caches,
        prefill_tokens=sum(len(p) for p in prompts),
        prefill_seconds=prefill_seconds,
        first_step_seconds=first_step_seconds,
        decode_tokens=max(steps.num_decode_steps - 1, 0) * steps.num_reqs,
        decode_seconds=decode_seconds,
    )
