"""Prefill in PyTorch, hand the block table and the paged cache to JAX without a copy, decode on in JAX.

    python -m examples.convert_page_tables

1. An all-PyTorch run (prefill + decode) gives the reference tokens.
2. A second run prefills in PyTorch, then hands the block table and every
   layer's cache to JAX with ``bridge.to_jax(..., copy=False)`` — the JAX arrays
   are the torch tensors' memory (the script compares the pointers) — and
   decodes the remaining tokens in JAX (``examples.model_jax``:
   ``jax_kernels.kv_cache_update``) starting from that memory. The tokens must
   equal the all-PyTorch run's. JAX arrays are immutable, so the JAX updates
   land in new JAX buffers and the torch tensors keep the prefill state; the
   final caches come back with ``bridge.to_torch(..., copy=False)``.
3. The cache layouts of ``bridge.layouts`` on the final cache: vLLM's paged
   ``[pages, page_size, 2*kv_heads, D]`` ⇄ flat ``[pages*page_size, 2*kv_heads, D]``
   (views) ⇄ separate K and V (``split_kv``: views; ``merge_kv``: a copy); the
   combined heads interleave k0, v0, k1, v1.

Exits 1 if any of these checks fails.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make `examples` and the packages importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import torch

import bridge
from bridge.layouts import merge_kv, split_kv, to_flat, to_paged
from examples import model as torch_model
from examples import model_jax
from examples.common import ModelConfig, Scheduler, add_common_args, check_common_args, format_tokens, init_weights, make_prompts
from examples.generate_jax import LOGITS_ATOL as _LOGITS_ATOL

import jax.numpy as jnp  # noqa: E402  (after bridge: PyTorch/XLA's JAX import guard runs first)

# This example's model is ModelConfig()'s, float32 with combined rows: generate_jax's float32 tolerance.
LOGITS_ATOL = _LOGITS_ATOL[ModelConfig().dtype]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    return args


def describe(x) -> str:
    """``float32[224, 4, 128]`` for a torch tensor or a JAX array."""
    return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"


class Checks:
    """Prints each check's outcome and remembers failures."""

    def __init__(self):
        self.failures: list[str] = []

    def __call__(self, ok: bool, message: str) -> None:
        print(f"  [{'ok' if ok else 'FAILED'}] {message}")
        if not ok:
            self.failures.append(message)


@torch.no_grad()
def prefill_in_torch(model, prompts, args):
    """PyTorch prefill on CPU: (scheduler, paged cache, first ids i64[B])."""
    cfg = model.cfg
    # Every page reserved at prefill: the block table handed to JAX stays valid for the whole decode.
    steps = Scheduler([len(p) for p in prompts], args.new_tokens, args.page_size, reserve_upfront=True)
    cache = torch_model.PagedKVCache(cfg, steps.num_pages, args.page_size, impl="auto", device="cpu")
    first_ids, _ = torch_model.prefill(model, prompts, steps, cache, torch.device("cpu"))
    return steps, cache, first_ids


def decode_in_jax(params, caches, block_table, first_ids, steps, cfg, args):
    """The decode steps in JAX, on the arrays handed over. → (ids i32[B, new_tokens-1], logits, caches)."""
    from tqdm import tqdm

    next_ids = jnp.asarray(first_ids, jnp.int32)  # i32[B]
    all_ids, all_logits = [], []
    for i in tqdm(range(steps.num_decode_steps), desc="JAX decode", unit="step", disable=args.no_progress):
        batch = steps.decode(i)
        assert np.array_equal(batch.block_table, np.asarray(block_table))  # reserved upfront: never changes
        batch.block_table = block_table  # the handed-over array, not the scheduler's copy
        # Not donated: the first step's caches are torch's memory, which JAX must not write into.
        logits, next_ids, caches, _ = model_jax.forward_keeping(
            params, caches, *model_jax.step_args(batch, next_ids), cfg=cfg, page_size=args.page_size, impl="auto"
        )
        all_ids.append(next_ids)
        all_logits.append(logits)
    ids = np.stack([np.asarray(x) for x in all_ids], axis=1) if all_ids else np.zeros((steps.num_reqs, 0), np.int32)
    return ids, [np.asarray(x) for x in all_logits], caches


def show_layouts(flat: torch.Tensor, flat_jax, block_table: np.ndarray, model, prompt: np.ndarray, args, check: Checks) -> None:
    """bridge.layouts on one layer's cache: ``flat`` f32[P * page_size, 2 * Hkv, D] and its JAX array."""
    page_size = args.page_size
    itemsize = flat.element_size()
    print(f"layouts of layer 0's cache (bridge.layouts), data_ptr {flat.data_ptr():#x}:")
    paged = to_paged(flat, page_size)  # f32[P, page_size, 2 * Hkv, D]
    check(paged.data_ptr() == flat.data_ptr(),
          f"to_paged(flat, {page_size}): {describe(flat)} -> {describe(paged)} (vLLM's layout), a view")
    check(to_flat(paged).data_ptr() == flat.data_ptr() and torch.equal(to_flat(paged), flat),
          f"to_flat(paged): -> {describe(to_flat(paged))}, a view")
    k, v = split_kv(flat)  # f32[P * page_size, Hkv, D] each, strided views
    head_bytes = flat.shape[2] * itemsize
    check(k.data_ptr() == flat.data_ptr() and v.data_ptr() == flat.data_ptr() + head_bytes,
          f"split_kv(flat): K {describe(k)} and V {describe(v)}, views (V starts {head_bytes} bytes after K)")
    interleaved = all(
        torch.equal(flat[:, 2 * h], k[:, h]) and torch.equal(flat[:, 2 * h + 1], v[:, h]) for h in range(k.shape[1])
    )
    order = ", ".join(f"k{h}, v{h}" for h in range(k.shape[1]))
    check(interleaved, f"combined heads are {order}")
    merged = merge_kv(k, v)
    check(torch.equal(merged, flat) and merged.data_ptr() != flat.data_ptr(), "merge_kv(K, V) == flat, as a new copy")

    # A token's K through the block table equals the model's layer-0 key for it.
    position = len(prompt) - 1  # prompt 0's last token
    page, offset = int(block_table[0, position // page_size]), position % page_size
    with torch.no_grad():
        attn = model.layers[0].self_attn
        hidden = model.layers[0].input_layernorm(model.embed_tokens(torch.from_numpy(prompt)))
        _, keys, _ = attn.project_qkv(hidden, model.rope(torch.arange(len(prompt))))  # f32[len, Hkv, D]
    check(torch.equal(to_paged(k, page_size)[page, offset], keys[position]),
          f"prompt 0's last token (position {position}): page block_table[0, {position // page_size}] = {page}, "
          f"row {offset}: its K equals the model's layer-0 key")

    # The same functions on JAX arrays (new arrays: JAX has no views).
    k_jax, v_jax = split_kv(flat_jax)
    check(np.array_equal(np.asarray(to_paged(flat_jax, page_size)), paged.numpy())
          and np.array_equal(np.asarray(k_jax), k.numpy()) and np.array_equal(np.asarray(merge_kv(k_jax, v_jax)), flat.numpy()),
          "the same on JAX arrays: to_paged, split_kv, merge_kv agree with torch")


def main(argv=None) -> int:
    args = parse_args(argv)
    check = Checks()
    cfg = ModelConfig()
    weights = init_weights(cfg, args.seed)
    prompts = make_prompts(args.batch, cfg.vocab_size, args.seed, max_len=args.max_prompt_len)
    prompt_lens = [len(p) for p in prompts]
    model = torch_model.TinyLlama(cfg, weights)
    print(f"model: {cfg.describe()}, seed {args.seed}")
    print(f"{args.batch} prompts, {args.new_tokens} new tokens each, page size {args.page_size}, CPU")

    reference = torch_model.generate(
        model, prompts, new_tokens=args.new_tokens, page_size=args.page_size, progress=False, reserve_upfront=True
    )
    print(f"all-PyTorch run: prefill + {args.new_tokens - 1} decode steps done")

    steps, cache, first_ids = prefill_in_torch(model, prompts, args)
    prefill_state = [layer.clone() for layer in cache.layers]
    block_table = torch.tensor(steps.block_table, dtype=torch.int32)  # i32[B, pages_per_req], torch-owned
    print(f"PyTorch prefill: {sum(prompt_lens)} tokens; block table {block_table.tolist()}")

    print("to JAX without a copy (bridge.to_jax(..., copy=False)):")
    block_table_jax = bridge.to_jax(block_table, copy=False)
    check(block_table_jax.unsafe_buffer_pointer() == block_table.data_ptr(),
          f"block table {describe(block_table)}: torch {block_table.data_ptr():#x} == JAX "
          f"{block_table_jax.unsafe_buffer_pointer():#x}")
    caches_jax = []
    for i, layer in enumerate(cache.layers):
        array = bridge.to_jax(layer, copy=False)
        check(array.unsafe_buffer_pointer() == layer.data_ptr(),
              f"cache layer {i} {describe(layer)}: torch {layer.data_ptr():#x} == JAX {array.unsafe_buffer_pointer():#x}")
        caches_jax.append(array)

    params = model_jax.load_params(cfg, weights)
    ids, logits, caches_jax = decode_in_jax(params, caches_jax, block_table_jax, first_ids.numpy(), steps, cfg, args)
    tokens = np.concatenate([first_ids.numpy()[:, None], ids], axis=1)  # i64[B, new_tokens]
    print(f"JAX decode: {steps.num_decode_steps} steps from the handed-over memory")
    for line in format_tokens(prompt_lens, tokens):
        print(line)

    print("checks:")
    check(np.array_equal(tokens, reference.tokens),
          f"tokens equal the all-PyTorch run's ({tokens.size} ids: PyTorch prefill + JAX decode)")
    if logits:
        diff = float(np.max(np.abs(np.stack(logits) - reference.logits[1:])))
        check(diff <= LOGITS_ATOL, f"JAX decode logits within {LOGITS_ATOL:g} of PyTorch's (max |diff| {diff:.2g})")
    check(all(torch.equal(a, b) for a, b in zip(cache.layers, prefill_state, strict=True)),
          "the torch cache tensors still hold the prefill state (JAX wrote its updates to new buffers)")
    final = [bridge.to_torch(array, copy=False) for array in caches_jax]
    check(all(t.data_ptr() == a.unsafe_buffer_pointer() for t, a in zip(final, caches_jax, strict=True)),
          "the final JAX caches back in torch without a copy (bridge.to_torch(..., copy=False))")
    cache_diff = max(float((t - r).abs().max()) for t, r in zip(final, reference.cache.layers, strict=True))
    check(cache_diff <= LOGITS_ATOL, f"they equal the all-PyTorch run's cache within {LOGITS_ATOL:g} (max |diff| {cache_diff:.2g})")

    show_layouts(final[0], caches_jax[0], steps.block_table, model, prompts[0], args, check)
    if check.failures:
        print(f"{len(check.failures)} check(s) FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
