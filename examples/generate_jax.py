"""Generate with the JAX twin of the PyTorch example: same model, weights, prompts and pages.

    python -m examples.generate_jax             # JAX only (jax_kernels; torch is not imported)
    python -m examples.generate_jax --check     # also run examples.generate (PyTorch) and compare

Each layer calls ``jax_kernels.kv_cache_update`` on slice indices from
``jax_kernels.slice_indices_from_block_table``, inside one jitted forward pass
with the caches donated. The token ids equal the PyTorch example's for the same
arguments; the logits agree to float32 rounding (see ``LOGITS_ATOL``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make `examples` and the packages importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from examples.common import JAX_IMPLS, add_common_args, check_common_args  # numpy only

# JAX (XLA:CPU) and PyTorch (oneDNN/MKL) sum float32 products in different orders,
# so the logits differ in the last bits: measured max |diff| 3e-6 to 4e-6 (seeds 0-7,
# defaults, both environments). Greedy ids are equal unless the top two logits of a
# step are closer than that; the smallest gap measured was 1.6e-4. The check wants
# identical ids and logits within this tolerance (25x the largest difference seen).
LOGITS_ATOL = 1e-4


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=JAX_IMPLS, default="auto",
                        help="auto: Pallas kernel on TPU, scatter fallback elsewhere; jax: scatter; "
                             "scan: lax.scan fallback; pallas_interpret: the kernel in the TPU interpreter")
    add_common_args(parser)
    parser.add_argument("--check", action="store_true",
                        help="also run the PyTorch example (CPU) and exit 1 unless the ids are identical "
                             f"and the logits agree within {LOGITS_ATOL:g}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    return args


def compare_with_torch(result, prompts, weights, args) -> tuple[list[str], float | None]:
    """Run the PyTorch example's model (CPU) on the same prompts.

    Returns the differences (empty: none) and the logits' max |JAX - PyTorch|
    (None when the ids differ: past a different id the logits are not comparable).
    """
    from examples import model as torch_model
    from examples.common import ModelConfig

    cfg = ModelConfig()
    reference = torch_model.generate(
        torch_model.TinyLlama(cfg, weights), prompts, new_tokens=args.new_tokens, page_size=args.page_size,
        progress=False,
    )
    mismatch = np.argwhere(result.tokens != reference.tokens)  # [n, 2]: (prompt, token)
    if len(mismatch):
        b, t = mismatch[0]
        top2 = np.sort(reference.logits[t, b])[-2:]
        return [
            f"{len(mismatch)} token ids differ; first: prompt {b} token {t}: JAX {result.tokens[b, t]} vs "
            f"PyTorch {reference.tokens[b, t]} (PyTorch's top-2 logit gap there: {top2[1] - top2[0]:.3g})"
        ], None
    diff = float(np.max(np.abs(result.logits - reference.logits)))
    problems = [] if diff <= LOGITS_ATOL else [f"logits differ: max |JAX - PyTorch| = {diff:.3g} > {LOGITS_ATOL:g}"]
    return problems, diff


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        # The check runs the PyTorch model: import it (and with it torch_xla, where installed)
        # before JAX starts, as PyTorch/XLA's JAX import guard requires (see bridge/_jax_import.py).
        import examples.model  # noqa: F401
    import jax

    from examples.common import ModelConfig, format_timing, format_tokens, init_weights, make_prompts
    from examples.model_jax import generate, load_params

    cfg = ModelConfig()
    weights = init_weights(cfg, args.seed)
    prompts = make_prompts(args.batch, cfg.vocab_size, args.seed, max_len=args.max_prompt_len)
    prompt_lens = [len(p) for p in prompts]
    print(f"model: {cfg.describe()}, seed {args.seed}")
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}, impl: {args.impl}, page size {args.page_size}, "
          f"{args.batch} prompts, {args.new_tokens} new tokens each")
    sys.stdout.flush()

    result = generate(
        load_params(cfg, weights), prompts, cfg=cfg, new_tokens=args.new_tokens, page_size=args.page_size,
        impl=args.impl, progress=not args.no_progress,
    )
    for line in format_tokens(prompt_lens, result.tokens):
        print(line)
    print(f"pages per prompt: {result.pages}")
    for line in format_timing(
        prefill_tokens=result.prefill_tokens, prefill_seconds=result.prefill_seconds,
        first_step_seconds=result.first_step_seconds, decode_tokens=result.decode_tokens,
        decode_seconds=result.decode_seconds, compiles="jit",
    ):
        print(line)
    if not args.check:
        return 0

    problems, diff = compare_with_torch(result, prompts, weights, args)
    if problems:
        for problem in problems:
            print(f"check FAILED: {problem}")
        return 1
    print(f"check: token ids identical to the PyTorch example ({result.tokens.size} ids); "
          f"logits max |JAX - PyTorch| = {diff:.2g} (tolerance {LOGITS_ATOL:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
