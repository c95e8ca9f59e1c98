"""Generate with the JAX twin of the PyTorch example: same model, weights, prompts and pages.

    python -m examples.generate_jax             # JAX only (jax_kernels; torch is not imported)
    python -m examples.generate_jax --check     # also run examples.generate (PyTorch) and compare
    python -m examples.generate_jax --layout packed --dtype bfloat16 --head-dim 64 --check
    python -m examples.generate_jax --kv-cache-dtype int8 --check

Each layer calls ``jax_kernels.kv_cache_update`` on slice indices from
``jax_kernels.slice_indices_from_block_table``, inside one jitted forward pass
with the caches donated; ``--layout``, ``--dtype`` and ``--head-dim`` as in
``examples.generate``. ``--check`` runs the PyTorch model on the same ids
(teacher forcing): the logits agree to the dtype's rounding (``LOGITS_ATOL``);
the ids are identical in float32, and in bfloat16 too but at near-ties, where
rounding picks either of two logits equal to bfloat16's resolution
(``ID_TIE_ATOL``).

``--kv-cache-dtype`` as in ``examples.generate``: the same per-layer scales
(``examples.model_jax.prefill_scale``, the PyTorch model's formula), the
quantized run fed an unquantized run's ids, the same printed line. ``--check``
then also runs the JAX model with the dense cache, quantized alike
(``jax_kernels``' ``quantize``), and exits 1 unless its ids and logits equal the
paged run's bit for bit; the PyTorch comparison is made on the unquantized run,
where the tolerances above were measured (quantizing to 8 bits turns a last-bit
difference between the frameworks into a whole 8-bit step now and then).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make `examples` and the packages importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from examples.common import (  # numpy only
    JAX_IMPLS, add_common_args, add_model_args, check_common_args, check_model_args, format_quantization,
    model_config, quantization_effect,
)

# The check feeds PyTorch JAX's ids (teacher forcing), so every step's logits have the
# same history and compare step by step.
# float32: JAX (XLA:CPU) and PyTorch (oneDNN/MKL) sum products in different orders, so
# the logits differ in the last bits: measured max |diff| 3e-6 to 4.3e-6 (seeds 0-7,
# defaults, head_dim 64 and 128, both environments). Greedy ids are equal unless the top
# two logits of a step are closer than that; the smallest gap measured was 5.7e-5. The
# check wants identical ids and logits within 1e-4 (23x the largest difference seen).
# bfloat16: the same summation differences, rounded to bfloat16 (8 bits of mantissa: one
# ulp is 0.0156 for logits in [2, 4), 0.031 in [4, 8); the logits reach 4.5), make ~0.2%
# of the activations 1 ulp apart after a layer, and the logits 1-2 ulps: measured max
# |diff| 0.031 to 0.035 (seeds 0-7, defaults, head_dim 64 and 128, both environments).
# At that resolution exact ties are common (the smallest top-2 gap is 0 in every seed),
# so JAX's id differs from PyTorch's argmax at 0-4 of 128 steps per seed, always where
# PyTorch's logit of JAX's id is within 0.031 of its best. The check wants logits within
# 0.125 (4 ulps at the largest logits, 3.5x the largest difference seen) and allows an id
# to differ only where PyTorch's logit of it is within that much of its best (a near-tie).
LOGITS_ATOL = {"float32": 1e-4, "bfloat16": 0.125}
ID_TIE_ATOL = {"float32": 0.0, "bfloat16": 0.125}  # how far below PyTorch's best a differing id may be


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=JAX_IMPLS, default="auto",
                        help="auto: Pallas kernel on TPU, scatter fallback elsewhere; jax: scatter; "
                             "scan: lax.scan fallback; pallas_interpret: the kernel in the TPU interpreter")
    add_common_args(parser)
    add_model_args(parser)
    parser.add_argument("--check", action="store_true",
                        help="also run the PyTorch model (CPU) fed the same ids and exit 1 unless the logits "
                             "agree within " + ", ".join(f"{atol:g} ({dtype})" for dtype, atol in LOGITS_ATOL.items())
                             + " and the ids are identical (bfloat16: but near-ties, see ID_TIE_ATOL)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    check_model_args(parser, args)
    return args


def compare(jax_tokens, jax_logits, torch_tokens, torch_logits, dtype: str) -> tuple[list[str], float, int]:
    """Compare the JAX run with PyTorch's teacher-forced run (fed JAX's ids, so step ``t``'s
    logits of both have the same history): ``jax_tokens``/``torch_tokens`` i64[B, N] (each
    run's argmaxes), ``*_logits`` f32[N, B, V].

    Returns ``(problems, max |JAX - PyTorch| logits, ids that differ)``. Problems: logits
    apart by more than ``LOGITS_ATOL[dtype]``, or an id that differs where PyTorch's
    logit of JAX's id is more than ``ID_TIE_ATOL[dtype]`` below its best (not a near-tie).
    """
    problems = []
    diff = float(np.max(np.abs(jax_logits - torch_logits)))
    if not diff <= LOGITS_ATOL[dtype]:
        problems.append(f"logits differ: max |JAX - PyTorch| = {diff:.3g} > {LOGITS_ATOL[dtype]:g}")
    mismatch = np.argwhere(jax_tokens != torch_tokens)  # [n, 2]: (prompt, token)
    gaps = [float(torch_logits[t, b].max() - torch_logits[t, b, jax_tokens[b, t]]) for b, t in mismatch]
    far = [(b, t, gap) for (b, t), gap in zip(mismatch, gaps) if not gap <= ID_TIE_ATOL[dtype]]
    if far:
        b, t, gap = far[0]
        problems.append(
            f"{len(far)} token ids differ by more than a near-tie (PyTorch's best logit more than "
            f"{ID_TIE_ATOL[dtype]:g} above its logit of JAX's id); first: prompt {b} token {t}: JAX "
            f"{jax_tokens[b, t]} vs PyTorch {torch_tokens[b, t]}, gap {gap:.3g}"
        )
    return problems, diff, len(mismatch)


def compare_with_torch(result, prompts, weights, args) -> tuple[list[str], float, int]:
    """Run the PyTorch example's model (CPU) on the same prompts, fed JAX's ids
    (teacher forcing), and :func:`compare` the two."""
    import torch

    from examples import model as torch_model

    if args.threads:  # --threads is PyTorch's: XLA:CPU's threads are left as they are (no measured difference)
        torch.set_num_threads(args.threads)
    cfg = model_config(args)
    reference = torch_model.generate(
        torch_model.TinyLlama(cfg, weights), prompts, new_tokens=args.new_tokens, page_size=args.page_size,
        layout=args.layout, progress=False, forced_ids=result.tokens,
    )
    return compare(result.tokens, result.logits, reference.tokens, reference.logits, cfg.dtype)


def compare_paged_dense(paged, dense) -> list[str]:
    """The differences between the quantized paged and dense JAX runs (empty: none): any id, any logit bit."""
    problems = []
    mismatch = np.argwhere(paged.tokens != dense.tokens)  # [n, 2]: (prompt, token)
    if len(mismatch):
        b, t = mismatch[0]
        problems.append(f"{len(mismatch)} token ids differ between the paged and the dense cache; first: prompt {b} "
                        f"token {t}: paged {paged.tokens[b, t]} vs dense {dense.tokens[b, t]}")
    diff = float(np.max(np.abs(paged.logits - dense.logits)))
    if not diff == 0:
        problems.append(f"logits differ: max |paged - dense| = {diff:.3g} > 0")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        # The check runs the PyTorch model: import it (and with it torch_xla, where installed)
        # before JAX starts, as PyTorch/XLA's JAX import guard requires (see bridge/_jax_import.py).
        import examples.model  # noqa: F401
    import jax

    from examples.common import format_timing, format_tokens, init_weights, make_prompts
    from examples.model_jax import generate, load_params

    cfg = model_config(args)
    weights = init_weights(cfg, args.seed)
    prompts = make_prompts(args.batch, cfg.vocab_size, args.seed, max_len=args.max_prompt_len)
    prompt_lens = [len(p) for p in prompts]
    print(f"model: {cfg.describe()}, seed {args.seed}")
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}, impl: {args.impl}, page size {args.page_size}, "
          f"{args.batch} prompts, {args.new_tokens} new tokens each")
    sys.stdout.flush()

    params = load_params(cfg, weights)
    options = dict(cfg=cfg, new_tokens=args.new_tokens, page_size=args.page_size, impl=args.impl, layout=args.layout,
                   progress=not args.no_progress)
    quantized = args.kv_cache_dtype != "auto"
    unquantized = result = generate(params, prompts, **options)
    if quantized:  # fed the unquantized run's ids, measured against its logits
        options.update(kv_cache_dtype=args.kv_cache_dtype, forced_ids=unquantized.tokens)
        result = generate(params, prompts, **options)
    for line in format_tokens(prompt_lens, result.tokens):
        print(line)
    print(f"pages per prompt: {result.pages}")
    cache = result.caches[0]
    print(f"paged cache: {args.layout} rows, {len(result.caches)} x {cache.dtype}{list(cache.shape)}")
    for line in format_timing(
        prefill_tokens=result.prefill_tokens, prefill_seconds=result.prefill_seconds,
        first_step_seconds=result.first_step_seconds, decode_tokens=result.decode_tokens,
        decode_seconds=result.decode_seconds, compiles="jit",
    ):
        print(line)
    if quantized:
        diff, agree = quantization_effect(result.tokens, result.logits, unquantized.tokens, unquantized.logits)
        print(format_quantization(args.kv_cache_dtype, diff, agree, result.tokens.size))
    if not args.check:
        return 0

    problems = []
    if quantized:
        problems = compare_paged_dense(result, generate(params, prompts, cache_kind="dense", **options))
        if not problems:
            print(f"check: paged and dense {args.kv_cache_dtype} caches give identical token ids "
                  f"({result.tokens.size} ids) and logits (max |diff| = 0)")
    more_problems, diff, num_differ = compare_with_torch(unquantized, prompts, weights, args)
    problems += more_problems
    if problems:
        for problem in problems:
            print(f"check FAILED: {problem}")
        return 1
    size = unquantized.tokens.size
    ids = f"token ids identical to the PyTorch example ({size} ids)"
    if num_differ:  # bfloat16 only: compare() fails float32 on any
        ids = (f"token ids identical to the PyTorch example's at {size - num_differ} of {size} steps; the other "
               f"{num_differ} are near-ties (PyTorch's logit of JAX's id within {ID_TIE_ATOL[cfg.dtype]:g} "
               "of its best)")
    print(f"check: {'unquantized run: ' if quantized else ''}{ids}; logits max |JAX - PyTorch| = {diff:.2g} (tolerance {LOGITS_ATOL[cfg.dtype]:g}), "
          "PyTorch fed JAX's ids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
