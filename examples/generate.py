"""Generate with a tiny Llama-style PyTorch model whose KV cache is paged.

    python -m examples.generate                       # CPU, eager
    PJRT_DEVICE=CPU python -m examples.generate --device xla   # PyTorch/XLA (TPU on a TPU VM)
    python -m examples.generate --check               # also run a dense cache and compare
    python -m examples.generate --layout packed --dtype bfloat16 --head-dim 64 --check
    python -m examples.generate --kv-cache-dtype float8_e4m3fn --layout packed --dtype bfloat16 --check

Every layer writes its new K/V rows with ``torch.ops.paged_kv.kv_cache_update``
(slice indices from the block table by ``torch_ops.slice_indices_from_block_table``)
and reads its request's pages back through the block table. The cache rows are
``--layout``'s: ``combined`` ``[2*kv_heads, D]`` or ``packed``, tpu-inference's
``[H'/pack, pack, align(D, 128)]`` (``bridge.layouts.merge_kv`` / ``split_kv``);
``--dtype`` is the weights', activations' and cache's, ``--head-dim`` the model's.
All prompts are prefilled as one ragged batch, then each step decodes one token
per prompt (greedy). ``--check`` reruns the same model with a dense
``[B, L, 2*kv_heads, D]`` cache and exits 1 unless the token ids are identical
and the logits equal.

``--kv-cache-dtype float8_e4m3fn|float8_e5m2|int8`` quantizes on write (the op's
``k_scale``/``v_scale``; per layer, ``max |K|`` and ``max |V|`` of the prefill's
tokens over the dtype's largest finite value, :func:`examples.model.prefill_scale`)
and attention reads the dequantized K/V. The example first runs the unquantized
model, then the quantized one fed its ids (teacher forcing: every step has the
same history), and prints the logits' largest change and how many greedy ids
agree; the ids printed are the quantized run's. ``--check``'s dense cache is
quantized alike (``torch_ops._quantize.quantize_rows``, the same scales) and
must still give bit-identical logits.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make `examples` and the packages importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import torch

import torch_ops
from examples.common import (
    add_common_args, add_model_args, check_common_args, check_model_args, format_quantization, format_timing,
    format_tokens, init_weights, make_prompts, model_config, quantization_effect,
)
from examples.model import Generation, TinyLlama, generate

# The paged and the dense run do the same arithmetic on the same values in the same
# shapes, so their logits are expected to be equal bit for bit, for every --layout,
# --dtype and --head-dim (measured: 0 on CPU eager and on XLA:CPU). A nonzero
# difference fails the check.
LOGITS_ATOL = 0.0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "xla"), default="cpu",
                        help="cpu: eager PyTorch; xla: PyTorch/XLA (PJRT_DEVICE picks CPU or TPU)")
    parser.add_argument("--impl", choices=torch_ops.IMPLS, default="auto",
                        help="the op's update path (default auto); see torch_ops.IMPLS")
    add_common_args(parser)
    add_model_args(parser)
    parser.add_argument("--check", action="store_true",
                        help="also run with a dense (non-paged) cache; exit 1 on any difference")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    check_model_args(parser, args)
    if args.device == "cpu" and args.impl == "pallas":
        parser.error("--impl pallas needs --device xla on a TPU; --impl pallas_interpret runs the kernel's code here")
    if args.device == "xla" and args.impl == "torch":
        parser.error("--impl torch runs on eager tensors only; use --device cpu, or another --impl")
    return args


def get_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    try:
        import torch_xla
    except ImportError:
        raise SystemExit("--device xla needs torch_xla (pip install -e '.[xla]')") from None
    return torch_xla.device()


def describe_cache(cache) -> str:
    """``packed rows, 2 x bfloat16[224, 2, 2, 128]``: a PagedKVCache's layout and per-layer tensors."""
    layer = cache.layers[0]
    return f"{cache.layout} rows, {len(cache.layers)} x {str(layer.dtype).removeprefix('torch.')}{list(layer.shape)}"


def report(generation: Generation, prompt_lens: list[int]) -> None:
    for line in format_tokens(prompt_lens, generation.tokens):
        print(line)
    print(f"pages per prompt: {generation.pages}")
    print(f"paged cache: {describe_cache(generation.cache)}")
    on_xla = generation.decode_compilations is not None
    timing = format_timing(
        prefill_tokens=generation.prefill_tokens, prefill_seconds=generation.prefill_seconds,
        first_step_seconds=generation.first_step_seconds, decode_tokens=generation.decode_tokens,
        decode_seconds=generation.decode_seconds, compiles="XLA" if on_xla else None,
    )
    for line in timing:
        print(line)
    if on_xla:
        print(f"XLA graphs compiled: {generation.prefill_compilations} for the prefill, "
              f"{generation.decode_compilations} for all {len(generation.logits) - 1} decode steps")


def compare(paged: Generation, dense: Generation) -> list[str]:
    """The differences between the paged and the dense run (empty: none)."""
    problems = []
    mismatch = np.argwhere(paged.tokens != dense.tokens)  # [n, 2]: (prompt, token)
    if len(mismatch):
        b, t = mismatch[0]
        problems.append(
            f"{len(mismatch)} token ids differ; first: prompt {b} token {t}: paged {paged.tokens[b, t]} "
            f"vs dense {dense.tokens[b, t]}"
        )
    diff = float(np.max(np.abs(paged.logits - dense.logits)))
    if not diff <= LOGITS_ATOL:
        problems.append(f"logits differ: max |paged - dense| = {diff:.3g} > {LOGITS_ATOL}")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    cfg = model_config(args)
    weights = init_weights(cfg, args.seed)
    prompts = make_prompts(args.batch, cfg.vocab_size, args.seed, max_len=args.max_prompt_len)
    prompt_lens = [len(p) for p in prompts]
    model = TinyLlama(cfg, weights).to(device)
    print(f"model: {cfg.describe()}, seed {args.seed}")
    print(f"device: {device}, impl: {args.impl}, torch threads {torch.get_num_threads()}, page size {args.page_size}, "
          f"{args.batch} prompts, {args.new_tokens} new tokens each")
    sys.stdout.flush()

    options = dict(new_tokens=args.new_tokens, page_size=args.page_size, device=device, progress=not args.no_progress)
    quantized = args.kv_cache_dtype != "auto"
    if quantized:  # the unquantized run: the ids the quantized run is fed, and the logits it is measured against
        reference = generate(model, prompts, cache_kind="paged", impl=args.impl, layout=args.layout, **options)
        options.update(kv_cache_dtype=args.kv_cache_dtype, forced_ids=reference.tokens)
    paged = generate(model, prompts, cache_kind="paged", impl=args.impl, layout=args.layout, **options)
    report(paged, prompt_lens)
    if quantized:
        diff, agree = quantization_effect(paged.tokens, paged.logits, reference.tokens, reference.logits)
        print(format_quantization(args.kv_cache_dtype, diff, agree, paged.tokens.size))
    if not args.check:
        return 0

    dense = generate(model, prompts, cache_kind="dense", **options)
    problems = compare(paged, dense)
    if problems:
        for problem in problems:
            print(f"check FAILED: {problem}")
        return 1
    diff = float(np.max(np.abs(paged.logits - dense.logits)))
    print(f"check: paged and dense caches give identical token ids ({paged.tokens.size} ids) "
          f"and logits (max |diff| = {diff:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
