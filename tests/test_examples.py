"""Smoke tests of examples/: each script's main() at small sizes, plus the claims the
README makes about them (paged == dense, torch == JAX, one decode graph on XLA)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import bridge  # noqa: F401  (torch_xla, where installed, owns the runtime before JAX starts)
from examples import convert_page_tables, generate, generate_jax
from examples import model as torch_model
from examples.common import ModelConfig, Scheduler, cdiv, init_weights, make_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch", "3", "--new-tokens", "5", "--page-size", "8", "--max-prompt-len", "12", "--no-progress"]


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


# ----------------------------------------------------------------- generate_jax.py


def test_generate_jax_gives_the_pytorch_tokens(capsys):
    code, jax_out = run_main(generate_jax, [*SMALL, "--check"], capsys)
    assert code == 0, jax_out
    assert re.search(r"^check: token ids identical to the PyTorch example \(15 ids\); logits max", jax_out, re.M)
    code, torch_out = run_main(generate, SMALL, capsys)
    assert code == 0
    assert token_lines(jax_out) == token_lines(torch_out)
    assert len(token_lines(jax_out)) == 3


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
