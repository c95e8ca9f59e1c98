"""Smoke tests of examples/: each script's main() at small sizes, plus the claims the
README makes about them (paged == dense, torch == JAX, one decode graph on XLA)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import bridge  # noqa: F401  (torch_xla, where installed, owns the runtime before JAX starts)
from bridge.layouts import split_kv
from examples import common, convert_page_tables, generate, generate_jax
from examples import model as torch_model
from examples.common import ModelConfig, Scheduler, cdiv, init_weights, make_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch", "3", "--new-tokens", "5", "--page-size", "8", "--max-prompt-len", "12", "--no-progress"]
# (--layout, --dtype, --head-dim, the cache row they give): packed rows with padding lanes
# (64 -> 128) and pack 2 (bfloat16), packed rows without padding (float32: pack 1), combined rows of 64 lanes.
MATRIX = [
    ("packed", "bfloat16", 64, [2, 2, 128]),
    ("packed", "float32", 128, [4, 1, 128]),
    ("combined", "bfloat16", 64, [4, 64]),
]
TINY = ["--batch", "2", "--new-tokens", "3", "--page-size", "8", "--max-prompt-len", "10", "--no-progress"]


def matrix_args(layout: str, dtype: str, head_dim: int) -> list[str]:
    return ["--layout", layout, "--dtype", dtype, "--head-dim", str(head_dim)]


def check_cache_line(out: str, layout: str, dtype: str, row: list[int], page_size: int) -> None:
    """The ``paged cache:`` line names the layout and a per-layer ``[pages * page_size, *row]``
    tensor whose pages are the ones the ``pages per prompt:`` line lists."""
    match = re.search(rf"^paged cache: {layout} rows, 2 x {dtype}\[(\d+), {', '.join(map(str, row))}\]$", out, re.M)
    assert match, out
    pages = re.search(r"^pages per prompt: (.*)$", out, re.M).group(1)
    num_pages = len(re.findall(r"\d+", pages))
    assert int(match.group(1)) == num_pages * page_size


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: the model is tiny, and on a busy 2-core machine two OpenMP
    threads spin-wait on each other (decode steps 50x slower). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def token_lines(output: str) -> list[tuple[int, int, list[int]]]:
    """``(prompt, length, ids)`` for every ``prompt <i> (len L): <ids>`` line."""
    return [
        (int(b), int(n), [int(t) for t in ids.split()])
        for b, n, ids in re.findall(r"^prompt (\d+) \(len (\d+)\): ([\d ]+)$", output, re.M)
    ]


def run_main(module, argv, capsys) -> tuple[int, str]:
    code = module.main(argv)
    return code, capsys.readouterr().out


# --------------------------------------------------------------------- generate.py


def test_generate_cpu_check_passes(capsys):
    code, out = run_main(generate, [*SMALL, "--check"], capsys)
    assert code == 0, out
    lines = token_lines(out)
    assert [b for b, _, _ in lines] == [0, 1, 2]
    assert all(len(ids) == 5 and all(0 <= t < 256 for t in ids) for _, _, ids in lines)
    assert len({n for _, n, _ in lines}) == 3  # prompts of different lengths
    assert "check: paged and dense caches give identical token ids (15 ids)" in out
    assert re.search(r"^decode: [\d.]+ tokens/s \(9 tokens", out, re.M)


def test_generate_check_fails_on_any_difference():
    cfg = ModelConfig()
    model = torch_model.TinyLlama(cfg, init_weights(cfg, 1))
    prompts = make_prompts(2, cfg.vocab_size, 1, max_len=10)
    paged = torch_model.generate(model, prompts, new_tokens=3, page_size=8, progress=False)
    dense = torch_model.generate(model, prompts, new_tokens=3, page_size=8, cache_kind="dense", progress=False)
    assert generate.compare(paged, dense) == []
    np.testing.assert_array_equal(paged.logits, dense.logits)  # bit for bit, as LOGITS_ATOL = 0 claims

    other_id = dataclasses.replace(dense, tokens=dense.tokens.copy())
    other_id.tokens[1, 2] += 1
    assert "1 token ids differ; first: prompt 1 token 2" in generate.compare(paged, other_id)[0]
    nudged = dataclasses.replace(dense, logits=np.nextafter(dense.logits, np.inf))
    assert "logits differ" in generate.compare(paged, nudged)[0]


def test_every_eager_impl_gives_the_same_logits():
    """--impl changes only how the op writes the cache: all paths write identical bits."""
    cfg = ModelConfig()
    model = torch_model.TinyLlama(cfg, init_weights(cfg, 2))
    prompts = make_prompts(2, cfg.vocab_size, 2, max_len=10)
    runs = {
        impl: torch_model.generate(model, prompts, new_tokens=2, page_size=8, impl=impl, progress=False)
        for impl in ("auto", "jax", "scan", "pallas_interpret")
    }
    for impl, run in runs.items():
        np.testing.assert_array_equal(run.logits, runs["auto"].logits, err_msg=impl)


def test_generate_on_xla_matches_cpu_and_compiles_one_decode_graph(xla_device, capsys):
    code, out = run_main(generate, [*SMALL, "--device", "xla", "--check"], capsys)
    assert code == 0, out
    assert "XLA graphs compiled: 1 for the prefill, 1 for all 4 decode steps" in out
    assert "check: paged and dense caches give identical token ids" in out
    code, cpu_out = run_main(generate, SMALL, capsys)
    assert code == 0
    assert token_lines(out) == token_lines(cpu_out)


@pytest.mark.parametrize("layout,dtype,head_dim,row", MATRIX)
def test_generate_check_passes_for_layouts_dtypes_and_head_dims(layout, dtype, head_dim, row, capsys):
    code, out = run_main(generate, [*TINY, *matrix_args(layout, dtype, head_dim), "--check"], capsys)
    assert code == 0, out
    assert f"head_dim {head_dim}, vocab 256, {dtype}, seed 0" in out
    check_cache_line(out, layout, dtype, row, page_size=8)
    assert "check: paged and dense caches give identical token ids (6 ids) and logits (max |diff| = 0)" in out


@pytest.mark.parametrize("layout,dtype,head_dim", [m[:3] for m in MATRIX])
def test_paged_cache_holds_the_dense_caches_rows_in_its_layout(layout, dtype, head_dim):
    """Row by row through the block table, the paged cache's K and V (split_kv) are the dense
    cache's, bit for bit; the packed padding lanes stay zero; unused rows stay zero."""
    cfg = ModelConfig(head_dim=head_dim, dtype=dtype)
    model = torch_model.TinyLlama(cfg, init_weights(cfg, 3))
    prompts = make_prompts(2, cfg.vocab_size, 3, max_len=10)
    options = dict(new_tokens=3, page_size=4, progress=False)
    paged = torch_model.generate(model, prompts, layout=layout, **options)
    dense = torch_model.generate(model, prompts, cache_kind="dense", **options)
    page_size = options["page_size"]
    for layer, dense_layer in zip(paged.cache.layers, dense.cache.layers, strict=True):
        assert layer.dtype == getattr(torch, dtype)
        written = torch.zeros(layer.shape[0], dtype=torch.bool)
        for b, prompt in enumerate(prompts):
            num_positions = len(prompt) + options["new_tokens"] - 1  # the last id is never fed back
            positions = torch.arange(num_positions)
            pages = torch.tensor(paged.pages[b])[positions // page_size]
            rows = pages * page_size + positions % page_size  # i64[num_positions]
            written[rows] = True
            k, v = split_kv(layer[rows], cfg.num_kv_heads, head_dim, layout=layout)  # [n, Hkv, D] each
            assert torch.equal(k, dense_layer[b, :num_positions, 0::2])
            assert torch.equal(v, dense_layer[b, :num_positions, 1::2])
            assert k.abs().sum() > 0
        assert not layer[~written].any()  # rows of no position were never written
        if layout == "packed" and head_dim % 128:
            assert not layer[..., head_dim:].any()  # the padding lanes up to 128


def test_bfloat16_weights_are_the_float32_weights_rounded_in_both_frameworks():
    import jax.numpy as jnp

    from examples import model_jax

    cfg = ModelConfig(head_dim=64, dtype="bfloat16")
    weights = init_weights(cfg, 4)
    assert all(w.dtype == np.float32 for w in weights.values())
    state = torch_model.TinyLlama(cfg, weights).state_dict()
    params = model_jax.load_params(cfg, weights)
    for name, w in weights.items():
        assert state[name].dtype == torch.bfloat16 and params[name].dtype == jnp.bfloat16
        torch_bits = state[name].view(torch.int16).numpy()
        assert np.array_equal(torch_bits, np.asarray(params[name]).view(np.int16)), name
        assert np.array_equal(state[name].float().numpy(), w.astype(jnp.bfloat16).astype(np.float32)), name


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--head-dim", "63"], "--head-dim must be even and positive"),
        (["--head-dim", "0"], "--head-dim must be even and positive"),
        (["--impl", "pallas_interpret", "--head-dim", "64"], "--impl pallas_interpret needs rows of 128 lanes"),
        (["--dtype", "float16"], "invalid choice: 'float16'"),
        (["--layout", "packed_hd64"], "invalid choice: 'packed_hd64'"),
        (["--kv-cache-dtype", "float16"], "invalid choice: 'float16'"),
    ],
)
@pytest.mark.parametrize("module", [generate, generate_jax])
def test_bad_model_arguments_are_rejected(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        module.parse_args(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    module.parse_args(["--impl", "pallas_interpret", "--head-dim", "64", "--layout", "packed"])  # padded to 128


@pytest.mark.parametrize("kwargs,message", [(dict(head_dim=63), "head_dim=63 must be even"),
                                            (dict(head_dim=-2), "head_dim=-2 must be even"),
                                            (dict(dtype="float16"), "dtype='float16' is not one of")])
def test_model_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_forced_ids_feed_the_decode_steps():
    """Fed its own ids, a run is unchanged; fed other ids, its logits follow them."""
    cfg = ModelConfig(head_dim=64, dtype="bfloat16")
    model = torch_model.TinyLlama(cfg, init_weights(cfg, 5))
    prompts = make_prompts(2, cfg.vocab_size, 5, max_len=10)
    options = dict(new_tokens=3, page_size=8, progress=False)
    free = torch_model.generate(model, prompts, **options)
    own = torch_model.generate(model, prompts, forced_ids=free.tokens, **options)
    np.testing.assert_array_equal(own.tokens, free.tokens)
    np.testing.assert_array_equal(own.logits, free.logits)
    other = free.tokens.copy()
    other[:, 1] = (other[:, 1] + 1) % cfg.vocab_size
    forced = torch_model.generate(model, prompts, forced_ids=other, **options)
    np.testing.assert_array_equal(forced.logits[:2], free.logits[:2])  # the prefill and the first step's input agree
    assert not np.array_equal(forced.logits[2], free.logits[2])
    with pytest.raises(ValueError, match=r"forced_ids.shape=\(2, 2\) must be"):
        torch_model.generate(model, prompts, forced_ids=free.tokens[:, :2], **options)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_generate_on_xla_packed_head_dim_64_matches_the_dense_cache(dtype, xla_device, capsys):
    """Under XLA, which fuses (and rounds) differently per graph, the paged and the dense cache
    still give identical bits. float32 head_dim 64 is where the dense cache once joined K and V
    with stack and XLA:CPU's fusion rounded its keys apart; one prefill (no decode graph) keeps it short."""
    argv = [*TINY, "--new-tokens", "1", *matrix_args("packed", dtype, 64), "--device", "xla", "--check"]
    code, out = run_main(generate, argv, capsys)
    assert code == 0, out
    check_cache_line(out, "packed", dtype, [2, 2, 128] if dtype == "bfloat16" else [4, 1, 128], page_size=8)
    assert "XLA graphs compiled: 1 for the prefill, 0 for all 0 decode steps" in out
    assert "check: paged and dense caches give identical token ids (2 ids) and logits (max |diff| = 0)" in out


# (--layout, --dtype, --head-dim, --kv-cache-dtype, the quantized cache's row): packed float8 rows
# from bfloat16 (4 heads of 8 bits per 32-bit word, lanes 64 -> 128), combined int8 rows from float32.
QUANTIZED = [
    ("packed", "bfloat16", 64, "float8_e4m3fn", [1, 4, 128]),
    ("combined", "float32", 128, "int8", [4, 128]),
]
QUANTIZATION_LINE = (r"^kv cache {} \(scales per layer: prefill max \|K\|, max \|V\| / finite max\): logits max "
                     r"\|quantized - unquantized\| = (\S+) over (\d+) ids, fed the unquantized run's ids; "
                     r"greedy ids agree with the unquantized run at (\d+) of (\d+)$")


def check_quantization_line(out: str, kv_cache_dtype: str, num_ids: int) -> None:
    """The quantized run's logits moved (it did quantize), but not far (it dequantized with
    the right scales: the logits reach about 4.5); most greedy ids agree."""
    match = re.search(QUANTIZATION_LINE.format(kv_cache_dtype), out, re.M)
    assert match, out
    diff, total, agree, total_again = float(match.group(1)), *map(int, match.groups()[1:])
    assert total == total_again == num_ids
    assert 0 < diff < 0.5, out
    assert num_ids // 2 < agree <= num_ids, out


@pytest.mark.parametrize("layout,dtype,head_dim,kv_cache_dtype,row", QUANTIZED)
def test_generate_quantized_cache_check_passes(layout, dtype, head_dim, kv_cache_dtype, row, capsys):
    argv = [*TINY, *matrix_args(layout, dtype, head_dim), "--kv-cache-dtype", kv_cache_dtype, "--check"]
    code, out = run_main(generate, argv, capsys)
    assert code == 0, out
    check_cache_line(out, layout, kv_cache_dtype, row, page_size=8)
    check_quantization_line(out, kv_cache_dtype, num_ids=6)
    assert "check: paged and dense caches give identical token ids (6 ids) and logits (max |diff| = 0)" in out


@pytest.mark.parametrize("layout,dtype,head_dim,kv_cache_dtype", [q[:4] for q in QUANTIZED])
def test_quantized_caches_hold_the_same_bits_and_use_the_full_range(layout, dtype, head_dim, kv_cache_dtype):
    """The paged cache's K and V (split_kv) are the dense cache's bit for bit, both quantized
    with the same per-layer scales; each layer's largest prefill |K| and |V| map to the dtype's
    largest finite value (the scales are max / finite max), so exactly that value occurs."""
    from torch_ops._quantize import _np_dtype
    from jax_kernels.kv_cache_update.quantize import QUANTIZED_DTYPES

    cfg = ModelConfig(head_dim=head_dim, dtype=dtype)
    model = torch_model.TinyLlama(cfg, init_weights(cfg, 3))
    prompts = make_prompts(2, cfg.vocab_size, 3, max_len=10)
    options = dict(new_tokens=3, page_size=4, progress=False, kv_cache_dtype=kv_cache_dtype)
    paged = torch_model.generate(model, prompts, layout=layout, **options)
    dense = torch_model.generate(model, prompts, cache_kind="dense", **options)
    cache_dtype = getattr(torch, kv_cache_dtype)
    high = QUANTIZED_DTYPES[_np_dtype(cache_dtype)][1]
    for layer in range(cfg.num_layers):
        assert [float(s) for s in paged.cache.scales[layer]] == [float(s) for s in dense.cache.scales[layer]]
        paged_layer, dense_layer = paged.cache.layers[layer], dense.cache.layers[layer]
        assert paged_layer.dtype == dense_layer.dtype == cache_dtype
        for b, prompt in enumerate(prompts):
            positions = torch.arange(len(prompt) + options["new_tokens"] - 1)
            rows = torch.tensor(paged.pages[b])[positions // 4] * 4 + positions % 4  # i64[n]
            # Indexed as bits (torch_model.as_bits: PyTorch 2.9's CPU indexing has no float8 kernel).
            paged_rows = torch_model.as_bits(paged_layer)[rows].view(torch.uint8)  # u8[n, *row]
            k, v = split_kv(paged_rows, cfg.num_kv_heads, head_dim, layout=layout)  # u8[n, Hkv, D] each
            dense_rows = dense_layer[b, : len(positions)].view(torch.uint8)  # u8[n, 2 * Hkv, D]
            assert torch.equal(k, dense_rows[:, 0::2]) and torch.equal(v, dense_rows[:, 1::2])
        prefill_lens = [len(p) for p in prompts]
        k_max = max(float(dense_layer[b, :n, 0::2].float().abs().max()) for b, n in enumerate(prefill_lens))
        v_max = max(float(dense_layer[b, :n, 1::2].float().abs().max()) for b, n in enumerate(prefill_lens))
        assert k_max == v_max == high


def test_quantized_run_fed_the_unquantized_ids_moves_its_logits():
    """With a quantized cache the logits differ from the unquantized run's (a little), and
    the dense quantized cache gives the paged one's bits, not the unquantized ones."""
    cfg = ModelConfig(head_dim=64, dtype="float32")
    model = torch_model.TinyLlama(cfg, init_weights(cfg, 6))
    prompts = make_prompts(2, cfg.vocab_size, 6, max_len=10)
    options = dict(new_tokens=3, page_size=8, progress=False)
    plain = torch_model.generate(model, prompts, **options)
    fed = dict(options, forced_ids=plain.tokens, kv_cache_dtype="float8_e5m2")
    paged = torch_model.generate(model, prompts, **fed)
    dense = torch_model.generate(model, prompts, cache_kind="dense", **fed)
    assert generate.compare(paged, dense) == []
    assert "logits differ" in generate.compare(paged, plain)[-1]
    diff, agree = common.quantization_effect(paged.tokens, paged.logits, plain.tokens, plain.logits)
    assert diff == float(np.max(np.abs(paged.logits - plain.logits))) > 0
    assert agree == int(np.sum(paged.tokens == plain.tokens))


def test_generate_quantized_cache_on_xla_compiles_one_decode_graph(xla_device, capsys):
    argv = [*TINY, *matrix_args("packed", "bfloat16", 64), "--kv-cache-dtype", "float8_e5m2", "--device", "xla",
            "--check"]
    code, out = run_main(generate, argv, capsys)
    assert code == 0, out
    assert "XLA graphs compiled: 1 for the prefill, 1 for all 2 decode steps" in out
    check_quantization_line(out, "float8_e5m2", num_ids=6)
    assert "check: paged and dense caches give identical token ids (6 ids) and logits (max |diff| = 0)" in out


# ----------------------------------------------------------------- generate_jax.py


def test_generate_jax_quantized_cache_check_passes(capsys):
    layout, dtype, head_dim, kv_cache_dtype, row = QUANTIZED[0]
    argv = [*TINY, *matrix_args(layout, dtype, head_dim), "--kv-cache-dtype", kv_cache_dtype, "--check"]
    code, out = run_main(generate_jax, argv, capsys)
    assert code == 0, out
    check_cache_line(out, layout, kv_cache_dtype, row, page_size=8)
    check_quantization_line(out, kv_cache_dtype, num_ids=6)
    assert (f"check: paged and dense {kv_cache_dtype} caches give identical token ids (6 ids) and logits "
            "(max |diff| = 0)") in out
    assert re.search(r"^check: unquantized run: token ids .*; logits max \|JAX - PyTorch\|", out, re.M), out


def test_generate_jax_paged_dense_compare_fails_on_any_difference():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 2, 16)).astype(np.float32)  # f32[N, B, V]
    run = types.SimpleNamespace(tokens=logits.argmax(-1).T.copy(), logits=logits)
    assert generate_jax.compare_paged_dense(run, run) == []
    other = types.SimpleNamespace(tokens=run.tokens.copy(), logits=np.nextafter(logits, np.inf))
    other.tokens[1, 2] += 1
    problems = generate_jax.compare_paged_dense(run, other)
    assert "1 token ids differ between the paged and the dense cache; first: prompt 1 token 2" in problems[0]
    assert problems[1].startswith("logits differ: max |paged - dense|")


def test_generate_jax_gives_the_pytorch_tokens(capsys):
    code, jax_out = run_main(generate_jax, [*SMALL, "--check"], capsys)
    assert code == 0, jax_out
    assert re.search(r"^check: token ids identical to the PyTorch example \(15 ids\); logits max", jax_out, re.M)
    code, torch_out = run_main(generate, SMALL, capsys)
    assert code == 0
    assert token_lines(jax_out) == token_lines(torch_out)
    assert len(token_lines(jax_out)) == 3


@pytest.mark.parametrize("layout,dtype,head_dim,row", MATRIX)
def test_generate_jax_check_passes_for_layouts_dtypes_and_head_dims(layout, dtype, head_dim, row, capsys):
    code, out = run_main(generate_jax, [*TINY, *matrix_args(layout, dtype, head_dim), "--check"], capsys)
    assert code == 0, out
    assert f"head_dim {head_dim}, vocab 256, {dtype}, seed 0" in out
    check_cache_line(out, layout, dtype, row, page_size=8)
    tolerance = generate_jax.LOGITS_ATOL[dtype]
    pattern = rf"^check: token ids .*; logits max \|JAX - PyTorch\| = (\S+) \(tolerance {tolerance:g}\)"
    match = re.search(pattern, out, re.M)
    assert match, out
    assert float(match.group(1)) <= tolerance


def test_generate_jax_compare_allows_only_near_ties():
    """ids may differ only where PyTorch's logit of JAX's id is within ID_TIE_ATOL of its best
    (bfloat16 only: float32 ids must be identical); logits must be within LOGITS_ATOL."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 2, 16)).astype(np.float32)  # f32[N, B, V]
    tokens = logits.argmax(-1).T.copy()  # i64[B, N]
    for dtype in ("float32", "bfloat16"):
        assert generate_jax.compare(tokens, logits, tokens, logits, dtype) == ([], 0.0, 0)

    tie = generate_jax.ID_TIE_ATOL["bfloat16"]
    near = logits.copy()
    runner_up = np.argsort(near[1, 0])[-2]
    near[1, 0, runner_up] = near[1, 0].max() - tie / 2  # PyTorch's second best, half the tie tolerance below
    jax_tokens = tokens.copy()
    jax_tokens[0, 1] = runner_up  # JAX picked it
    jax_logits = near.copy()
    jax_logits[1, 0, runner_up] += 0.75 * tie  # JAX's best there; within LOGITS_ATOL (ID_TIE_ATOL <= it)
    problems, _, differ = generate_jax.compare(jax_tokens, jax_logits, tokens, near, "bfloat16")
    assert problems == [] and differ == 1
    problems, _, _ = generate_jax.compare(jax_tokens, jax_logits, tokens, near, "float32")
    assert any("1 token ids differ by more than a near-tie" in p for p in problems)

    far = near.copy()
    far[1, 0, runner_up] = far[1, 0].max() - 2 * tie
    problems, _, _ = generate_jax.compare(jax_tokens, far, tokens, far, "bfloat16")
    assert problems and "first: prompt 0 token 1" in problems[0]

    nudged = logits.copy()
    nudged[2, 1, 3] += 2 * generate_jax.LOGITS_ATOL["bfloat16"]
    problems, diff, _ = generate_jax.compare(tokens, nudged, tokens, logits, "bfloat16")
    assert problems == [f"logits differ: max |JAX - PyTorch| = {diff:.3g} > {generate_jax.LOGITS_ATOL['bfloat16']:g}"]


def test_generate_jax_runs_as_a_file_without_torch():
    """`python examples/generate_jax.py` works (path bootstrap) and never imports torch."""
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['generate_jax.py', {', '.join(map(repr, SMALL[:4]))}, '--no-progress']\n"
        "try:\n"
        "    runpy.run_path('examples/generate_jax.py', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "assert 'torch' not in sys.modules, 'generate_jax imported torch'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(token_lines(result.stdout)) == 3


# ----------------------------------------------------------- convert_page_tables.py


def test_convert_page_tables_checks_pass(capsys):
    code, out = run_main(convert_page_tables, SMALL, capsys)
    assert code == 0, out
    assert "FAILED" not in out
    assert len(re.findall(r"^  \[ok\] ", out, re.M)) == 15
    # The pointers printed for the hand-over are equal pairs.
    pairs = re.findall(r"torch (0x[0-9a-f]+) == JAX (0x[0-9a-f]+)", out)
    assert len(pairs) == 3 and all(a == b for a, b in pairs)


# --------------------------------------------------------------------- scheduler


def test_scheduler_allocates_pages_on_demand():
    lens, new_tokens, page_size = [5, 9, 3], 12, 4
    steps = Scheduler(lens, new_tokens, page_size)
    assert steps.num_pages == sum(cdiv(n + new_tokens - 1, page_size) for n in lens)
    prefill = steps.prefill([np.arange(n) for n in lens])
    assert [len(p) for p in steps.pages] == [2, 3, 1]
    assert prefill.num_tokens == 32 and prefill.token_valid.sum() == 17  # 17 tokens padded to the 32 bucket
    assert list(prefill.logits_rows) == [4, 13, 16]
    for step in range(new_tokens - 1):
        batch = steps.decode(step)
        for b, n in enumerate(lens):
            assert len(steps.pages[b]) == cdiv(n + step + 1, page_size)  # a new page exactly at a boundary
            assert list(batch.block_table[b, : len(steps.pages[b])]) == steps.pages[b]
    used = [p for pages in steps.pages for p in pages]
    assert sorted(used) == list(range(steps.num_pages))  # disjoint, and the pool is used up
    assert steps.pages[0][:3] == [0, 1, 7] and steps.pages[2][:2] == [5, 6]  # interleaved: allocated on demand
    assert steps.allocator.num_free == 0
    with pytest.raises(RuntimeError, match="out of KV cache pages"):
        steps.allocator.allocate()
