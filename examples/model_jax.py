"""The JAX twin of ``examples/model.py``: the same model, weights and schedule, in JAX.

Imports ``jax_kernels`` only (never torch). One jitted function runs a whole
forward pass — slice indices from the block table
(``jax_kernels.slice_indices_from_block_table``), each layer's cache update
(``jax_kernels.kv_cache_update``), paged attention, the logits — with the caches
donated, so on TPU the Pallas kernel updates them in place. The cache rows are
in ``layout`` (``jax_kernels.merge_kv`` / ``split_kv``), the weights,
activations and caches in ``cfg.dtype``; RMSNorm and the softmax compute in
float32 and round back, as the PyTorch model does. A cache of another dtype
(``kv_cache_dtype``: float8_e4m3fn, float8_e5m2, int8) is quantized on write
with per-layer scales from the prefill (:func:`prefill_scale`, the PyTorch
model's formula) and dequantized when read; ``cache_kind="dense"`` is the
PyTorch model's dense check cache, in JAX.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_kernels as jk
from jax_kernels.kv_cache_update.quantize import QUANTIZED_DTYPES, opaque, quantize
from examples.common import JAX_IMPLS, ModelConfig, Scheduler, StepBatch, rotary_tables

SLICES_PER_PROCESSING_PAGE = 8


def load_params(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The float32 numpy weights (``examples.common.init_weights``) and rotary tables as
    JAX arrays of ``cfg.dtype`` (rounded to nearest even: the PyTorch model's bits)."""
    params = {name: jnp.asarray(w) for name, w in weights.items()}
    cos, sin = rotary_tables(cfg)
    params["rope_cos"], params["rope_sin"] = jnp.asarray(cos), jnp.asarray(sin)  # f32[max_pos, D]
    return {name: p.astype(cfg.dtype) for name, p in params.items()}


def rms_norm(x, weight, eps: float):  # [..., size], x's dtype
    """Normalized in float32, rounded to ``x``'s dtype, then scaled (as ``examples.model.RMSNorm``)."""
    x32 = x.astype(jnp.float32)  # f32[..., size]
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype) * weight


def rotate_half(x):
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def silu(x):  # [..., size], x's dtype
    """``x * sigmoid(x)`` in float32, rounded once to ``x``'s dtype, as torch's ``silu`` computes it
    (``jax.nn.silu`` in bfloat16 rounds the sigmoid and the product apart: 1/3 of the values differ)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def linear(x, weight):  # weight [out, in], as torch.nn.Linear
    return x @ weight.T


def attend(
    q,  # [T, Hq, D] cfg.dtype
    k,  # [T, L, Hkv, D] cfg.dtype
    v,  # [T, L, Hkv, D] cfg.dtype
    key_mask,  # bool[T, L]
):  # [T, Hq * D] cfg.dtype
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [T, Hkv, G, D]
    scores = jnp.einsum("tkgd,tlkd->tkgl", q, k)  # [T, Hkv, G, L]
    # Scaled in float32 and rounded once, as torch multiplies a bfloat16 tensor by a Python float.
    scores = (scores.astype(jnp.float32) * np.float32(head_dim**-0.5)).astype(q.dtype)
    scores = jnp.where(key_mask[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)  # softmax in float32
    out = jnp.einsum("tkgl,tlkd->tkgd", probs, v)  # [T, Hkv, G, D]
    return out.reshape(num_tokens, num_heads * head_dim)


def update_cache(impl: str, new_kv, slice_indices, cache, total_update_slices, *, page_size: int, scales=None):
    """``cache`` with the slices written, by the update path ``impl``; ``scales`` f32[2]
    (k_scale, v_scale) quantize the rows on write (None: ``cache`` has the rows' dtype)."""
    k_scale, v_scale = (None, None) if scales is None else (scales[0], scales[1])
    quant = dict(k_scale=k_scale, v_scale=v_scale)
    if impl == "auto":  # the Pallas kernel on TPU, the scatter fallback elsewhere
        return jk.kv_cache_update(
            new_kv, slice_indices, cache, total_update_slices, page_size=page_size,
            slices_per_processing_page=SLICES_PER_PROCESSING_PAGE, **quant,
        )
    if impl == "pallas_interpret":  # the kernel's own code in the TPU interpreter
        return jk.kv_cache_update(
            new_kv, slice_indices, cache, total_update_slices, page_size=page_size,
            slices_per_processing_page=SLICES_PER_PROCESSING_PAGE, interpret=True, **quant,
        )
    if impl == "jax":
        return jk.kv_cache_update_scatter(new_kv, slice_indices, cache, total_update_slices, page_size=page_size,
                                          **quant)
    if impl == "scan":
        return jk.kv_cache_update_jax(new_kv, slice_indices, cache, total_update_slices, page_size=page_size, **quant)
    raise ValueError(f"impl={impl!r} is not one of {JAX_IMPLS}")


def prefill_scale(
    x,  # [T, Hkv, D] cfg.dtype: one layer's prefill K (or V)
    token_valid,  # bool[T]: False on bucket-padding rows
    cache_dtype,  # float8_e4m3fn, float8_e5m2 or int8
):  # -> f32[]
    """``examples.model.prefill_scale`` in JAX: ``max |x|`` over the real prefill tokens,
    in float32, at least the smallest normal float32, over the cache dtype's largest
    finite value (448, 57344, 127)."""
    high = QUANTIZED_DTYPES[np.dtype(cache_dtype)][1]
    amax = jnp.max(jnp.where(token_valid[:, None, None], jnp.abs(x), 0)).astype(jnp.float32)  # f32[]
    return jnp.maximum(amax, np.finfo(np.float32).tiny) / np.float32(high)


def dequantized(k, v, scales, dtype):  # k, v [N, Hkv, D] cache dtype -> [N, Hkv, D] dtype each
    """K and V read from a quantized cache (``scales`` f32[2]), as ``x.astype(float32) * scale``
    (``jax_kernels.dequantize_kv``, one scale per array); unchanged when ``scales`` is None."""
    if scales is None:
        return k, v
    return jk.dequantize_kv(k, scales[0], scales[0], dtype), jk.dequantize_kv(v, scales[1], scales[1], dtype)


def forward(
    params: dict,
    caches: list,  # per layer [num_pages * page_size, *row] cfg.dtype (row: layout's, see new_caches)
    token_ids,  # i32[T]
    positions,  # i32[T]
    token_req,  # i32[T]
    logits_rows,  # i32[B]
    start_positions,  # i32[B]
    num_new_tokens,  # i32[B]
    block_table,  # i32[B, max_pages_per_req]
    scales=None,  # f32[num_layers, 2]: each layer's (k_scale, v_scale) of quantized caches; else None
    token_valid=None,  # bool[T]: False on bucket padding; needed by calibrate and the dense cache
    *,
    cfg: ModelConfig,
    page_size: int,
    impl: str,
    layout: str = "combined",
    calibrate: bool = False,
    cache_kind: str = "paged",
):  # -> (logits [B, V] cfg.dtype, next ids i32[B], updated caches, scales f32[num_layers, 2] or None)
    """One forward pass. Caches of a dtype other than ``cfg.dtype`` are quantized on write:
    with ``calibrate`` (the prefill) each layer's scales are computed from its K and V
    before its write (:func:`prefill_scale`) and returned; otherwise ``scales`` are used.
    ``cache_kind="dense"``: caches ``[B, L + 1, 2 * Hkv, D]`` as ``examples.model.DenseKVCache``
    (rows quantized by ``jax_kernels``' ``quantize``, the update's math)."""
    num_tokens, num_reqs = token_ids.shape[0], block_table.shape[0]
    slice_indices, total_update_slices = jk.slice_indices_from_block_table(
        block_table, start_positions, num_new_tokens, page_size=page_size,
        max_num_slices=jk.max_num_slices_bound(num_reqs, num_tokens, page_size),
    )  # i32[3, S], i32[1]
    context_len = block_table.shape[1] * page_size
    key_mask = jnp.arange(context_len)[None, :] <= positions[:, None]  # bool[T, L]
    cos = params["rope_cos"][positions][:, None, :]  # [T, 1, D] cfg.dtype
    sin = params["rope_sin"][positions][:, None, :]
    row = caches[0].shape[1:]  # one token's K and V in layout
    cache_dtype = caches[0].dtype
    quantized = cache_dtype != jnp.dtype(cfg.dtype)
    new_scales = []

    x = params["embed_tokens.weight"][token_ids]  # [T, hidden] cfg.dtype
    new_caches = []
    for i, cache in enumerate(caches):
        p = f"layers.{i}."
        h = rms_norm(x, params[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = linear(h, params[p + "self_attn.q_proj.weight"]).reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = linear(h, params[p + "self_attn.k_proj.weight"]).reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = linear(h, params[p + "self_attn.v_proj.weight"]).reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        layer_scales = None
        if quantized:
            layer_scales = (jnp.stack([prefill_scale(x, token_valid, cache_dtype) for x in (k, v)]) if calibrate
                            else scales[i])  # f32[2]
            new_scales.append(layer_scales)
        if cache_kind == "dense":
            cache, keys, values = dense_write_read(cache, k, v, positions, token_req, token_valid, layer_scales)
        else:
            new_kv = jk.merge_kv(k, v, layout=layout, cache_dtype=cache_dtype)  # [T, *row] cfg.dtype
            cache = update_cache(impl, new_kv, slice_indices, cache, total_update_slices, page_size=page_size,
                                 scales=layer_scales)
            pages = cache.reshape(-1, page_size, *row)  # [P, page_size, *row]
            context = pages[block_table].reshape(num_reqs * context_len, *row)  # [B * L, *row]
            keys, values = jk.split_kv(context, cfg.num_kv_heads, cfg.head_dim, layout=layout)  # [B * L, Hkv, D]
        new_caches.append(cache)
        keys, values = dequantized(keys, values, layer_scales, cfg.dtype)  # [B * L, Hkv, D] cfg.dtype each
        shape = (num_reqs, context_len, cfg.num_kv_heads, cfg.head_dim)
        out = attend(q, keys.reshape(shape)[token_req], values.reshape(shape)[token_req], key_mask)
        x = x + linear(out, params[p + "self_attn.o_proj.weight"])
        h = rms_norm(x, params[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = silu(linear(h, params[p + "mlp.gate_proj.weight"]))
        x = x + linear(gate * linear(h, params[p + "mlp.up_proj.weight"]), params[p + "mlp.down_proj.weight"])
    last = rms_norm(x[logits_rows], params["norm.weight"], cfg.rms_norm_eps)  # [B, hidden]
    logits = linear(last, params["lm_head.weight"])  # [B, V] cfg.dtype
    out_scales = jnp.stack(new_scales) if quantized else None  # f32[num_layers, 2]
    return logits, jnp.argmax(logits, axis=-1).astype(jnp.int32), new_caches, out_scales


def dense_write_read(
    cache,  # [B, L + 1, 2 * Hkv, D] cache dtype
    k,  # [T, Hkv, D] cfg.dtype
    v,  # [T, Hkv, D] cfg.dtype
    positions,  # i32[T]
    token_req,  # i32[T]
    token_valid,  # bool[T]
    scales,  # f32[2] or None
):  # -> (cache, keys [B * L, Hkv, D], values [B * L, Hkv, D]), cache dtype
    """The dense check cache (``examples.model.DenseKVCache``): the tokens' combined rows
    (quantized when ``scales`` are given) written at ``[request, position]`` (padding tokens
    at the scratch position ``L``), then every request's ``L`` positions read back."""
    num_tokens, num_kv_heads, head_dim = k.shape
    num_reqs, context_len = cache.shape[0], cache.shape[1] - 1
    new_kv = jnp.concatenate([k, v], axis=-1).reshape(num_tokens, 2 * num_kv_heads, head_dim)  # [T, 2 * Hkv, D]
    if scales is not None:
        new_kv = quantize(new_kv, *opaque(scales), cache.dtype)  # cache dtype
    rows = jnp.where(token_valid, positions, context_len)  # i32[T]
    cache = cache.at[token_req, rows].set(new_kv)
    context = cache[:, :context_len].reshape(num_reqs * context_len, 2 * num_kv_heads, head_dim)  # [B * L, 2Hkv, D]
    return cache, context[:, 0::2], context[:, 1::2]


_STATIC = ("cfg", "page_size", "impl", "layout", "calibrate", "cache_kind")
# The caches are donated: XLA may write the updated caches into their buffers
# (the Pallas kernel on TPU does, in place).
forward_donating = jax.jit(forward, static_argnames=_STATIC, donate_argnums=1)
# Not donated: for caches whose memory JAX does not own (zero-copy views of torch tensors).
forward_keeping = jax.jit(forward, static_argnames=_STATIC)


def step_args(batch: StepBatch, token_ids, scales=None) -> tuple:
    """``forward``'s array arguments after ``caches``, from a step's numpy metadata
    (and the quantized caches' ``scales``)."""
    return (
        token_ids, batch.positions, batch.token_req, batch.logits_rows,
        batch.start_positions, batch.num_new_tokens, batch.block_table, scales, batch.token_valid,
    )


def cache_dtype_of(cfg: ModelConfig, kv_cache_dtype: str = "auto"):
    """The caches' dtype: ``cfg.dtype``, or ``kv_cache_dtype`` unless it is "auto"."""
    return jnp.dtype(cfg.dtype if kv_cache_dtype == "auto" else kv_cache_dtype)


def new_caches(
    cfg: ModelConfig, num_pages: int, page_size: int, layout: str = "combined", kv_cache_dtype: str = "auto"
) -> list[jax.Array]:
    """Zeroed flat caches ``[num_pages * page_size, *row]`` of ``cfg.dtype`` (or ``kv_cache_dtype``),
    one per layer; ``row`` is ``layout``'s for that dtype (``jax_kernels.kv_cache_shape`` without
    the pages): combined ``[2 * Hkv, D]``, packed ``[H' // pack, pack, align(D, 128)]``."""
    dtype = cache_dtype_of(cfg, kv_cache_dtype)
    row = jk.kv_cache_shape(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, dtype, layout=layout)[2:]
    return [jnp.zeros((num_pages * page_size, *row), dtype) for _ in range(cfg.num_layers)]


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # i32[B, new_tokens]
    logits: np.ndarray  # f32[new_tokens, B, vocab] (exactly, from cfg.dtype)
    pages: list[list[int]]
    caches: list  # per layer, at the end
    prefill_tokens: int
    prefill_seconds: float
    first_step_seconds: float | None  # the first decode step (None: no decode steps)
    decode_tokens: int  # tokens of the decode steps after the first
    decode_seconds: float  # time of the decode steps after the first
    scales: np.ndarray | None = None  # f32[num_layers, 2]: each layer's (k_scale, v_scale); None: not quantized


def generate(
    params: dict,
    prompts: list[np.ndarray],
    *,
    cfg: ModelConfig,
    new_tokens: int,
    page_size: int,
    impl: str = "auto",
    layout: str = "combined",
    kv_cache_dtype: str = "auto",
    cache_kind: str = "paged",
    forced_ids: np.ndarray | None = None,  # i32[B, new_tokens]: teacher forcing, as examples.model.generate
    progress: bool = True,
) -> Generation:
    """Greedy decoding, step for step as ``examples.model.generate`` (same schedule, pages, shapes),
    the caches' rows in ``layout`` and of ``kv_cache_dtype`` (quantized: scales from the prefill).
    ``cache_kind="dense"``: the dense check cache (``layout`` and ``impl`` unused). ``forced_ids``:
    decode step ``i`` is fed ``forced_ids[:, i]``; ``tokens`` are still this run's argmaxes."""
    from tqdm import tqdm

    steps = Scheduler([len(p) for p in prompts], new_tokens, page_size)
    if cache_kind == "paged":
        caches = new_caches(cfg, steps.num_pages, page_size, layout, kv_cache_dtype)
    elif cache_kind == "dense":
        shape = (steps.num_reqs, steps.context_len + 1, cfg.combined_kv_heads, cfg.head_dim)
        caches = [jnp.zeros(shape, cache_dtype_of(cfg, kv_cache_dtype)) for _ in range(cfg.num_layers)]
    else:
        raise ValueError(f"cache_kind={cache_kind!r} must be 'paged' or 'dense'")
    if forced_ids is not None and np.shape(forced_ids) != (len(prompts), new_tokens):
        raise ValueError(f"forced_ids.shape={np.shape(forced_ids)} must be (len(prompts), new_tokens) = "
                         f"{(len(prompts), new_tokens)}")
    statics = dict(cfg=cfg, page_size=page_size, impl=impl, layout=layout, cache_kind=cache_kind)

    start = time.perf_counter()
    batch = steps.prefill(prompts)
    logits, next_ids, caches, scales = forward_donating(
        params, caches, *step_args(batch, batch.token_ids.astype(np.int32)), calibrate=True, **statics
    )
    all_ids, all_logits = [next_ids], [logits]
    next_ids.block_until_ready()
    prefill_seconds = time.perf_counter() - start

    first_step_seconds = None
    start = time.perf_counter()
    for i in tqdm(range(steps.num_decode_steps), desc="decode", unit="step", disable=not progress):
        inputs = next_ids if forced_ids is None else np.asarray(forced_ids[:, i], np.int32)  # i32[B]
        logits, next_ids, caches, _ = forward_donating(
            params, caches, *step_args(steps.decode(i), inputs, scales), **statics
        )
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
        logits=np.stack([np.asarray(x.astype(jnp.float32)) for x in all_logits]),
        pages=pages,
        caches=caches,
        prefill_tokens=sum(len(p) for p in prompts),
        prefill_seconds=prefill_seconds,
        first_step_seconds=first_step_seconds,
        decode_tokens=max(steps.num_decode_steps - 1, 0) * steps.num_reqs,
        decode_seconds=decode_seconds,
        scales=None if scales is None else np.asarray(scales),
    )
