"""torch.ops.paged_kv: every impl, on CPU eager and PyTorch/XLA, against the reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import jax_kernels as jk
import torch_ops
from jax_kernels.testing import bits, random_slices, random_tokens, sentinel_cache
from torch_ops import _eager

HEADS, HEAD_DIM, PAGE_SIZE = 2, 128, 16
NUM_PAGES, NUM_TOKENS, NUM_SLICES = 8, 40, 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}
RUNNABLE_IMPLS = [i for i in torch_ops.IMPLS if i != "pallas"]  # "pallas" needs a TPU
UINT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def to_torch(a: np.ndarray, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    return torch.from_numpy(bits(a).copy()).view(dtype).to(device)


def torch_bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(UINT[t.element_size()]).numpy().view(f"u{t.element_size()}")


def case(seed, dtype_name, num_valid=None):
    rng = np.random.default_rng(seed)
    cache = sentinel_cache(NUM_PAGES * PAGE_SIZE, HEADS, HEAD_DIM, dtype_name)
    new = random_tokens(rng, NUM_TOKENS, HEADS, HEAD_DIM, dtype_name)
    idx, total = random_slices(
        rng, num_rows=cache.shape[0], num_tokens=NUM_TOKENS, page_size=PAGE_SIZE, num_slices=NUM_SLICES,
        num_valid=num_valid,
    )
    return new, idx, cache, total, jk.kv_cache_update_reference(new, idx, cache, total)


def run_op(impl, dtype_name, layout, device, seed=0):
    new, idx, cache_np, total, expected = case(seed, dtype_name)
    dtype = DTYPES[dtype_name]
    cache = to_torch(cache_np, dtype, device)
    target = cache.view(NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM) if layout == "paged" else cache
    torch_ops.kv_cache_update(
        to_torch(new, dtype, device), torch.from_numpy(idx).to(device), target,
        torch.from_numpy(total).to(device), page_size=PAGE_SIZE, impl=impl,
    )
    return cache, target, expected


@pytest.mark.parametrize("layout", ["flat", "paged"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", RUNNABLE_IMPLS)
def test_cpu_eager_matches_reference(impl, dtype_name, layout):
    cache, target, expected = run_op(impl, dtype_name, layout, "cpu")
    np.testing.assert_array_equal(torch_bits(cache), bits(expected))
    np.testing.assert_array_equal(torch_bits(target).reshape(expected.shape), bits(expected))


@pytest.mark.parametrize("layout", ["flat", "paged"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", [i for i in RUNNABLE_IMPLS if i != "torch"])
def test_xla_matches_reference(impl, dtype_name, layout, xla_device):
    import torch_xla

    cache, target, expected = run_op(impl, dtype_name, layout, xla_device)
    torch_xla.sync()
    np.testing.assert_array_equal(torch_bits(cache), bits(expected))
    np.testing.assert_array_equal(torch_bits(target).reshape(expected.shape), bits(expected))


def test_xla_torch_impl_is_eager_only(xla_device):
    with pytest.raises(ValueError, match="impl='torch' runs on eager"):
        run_op("torch", "float32", "flat", xla_device)


def test_xla_without_functionalization():
    pytest.importorskip("torch_xla", reason="torch_xla is not installed in this environment")
    code = textwrap.dedent(
        """
        import numpy as np, torch, torch_xla
        import jax_kernels as jk, torch_ops
        from jax_kernels.testing import bits, random_slices, random_tokens, sentinel_cache
        rng = np.random.default_rng(0)
        cache = sentinel_cache(64, 2, 128, "float32"); new = random_tokens(rng, 20, 2, 128, "float32")
        idx, total = random_slices(rng, num_rows=64, num_tokens=20, page_size=16, num_slices=6)
        dev = torch_xla.device()
        c = torch.from_numpy(cache).to(dev)
        for impl in ("auto", "jax", "scan", "pallas_interpret"):
            c = torch.from_numpy(cache).to(dev)
            torch.ops.paged_kv.kv_cache_update(torch.from_numpy(new).to(dev), torch.from_numpy(idx).to(dev), c,
                                               torch.from_numpy(total).to(dev), 16, 8, impl)
            torch_xla.sync()
            want = jk.kv_cache_update_reference(new, idx, cache, total)
            assert np.array_equal(bits(c.cpu().numpy()), bits(want)), impl
        print("ok")
        """
    )
    env = dict(os.environ, XLA_DISABLE_FUNCTIONALIZATION="1", PJRT_DEVICE="CPU")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ------------------------------------------------------------------ in place


@pytest.mark.parametrize("impl", RUNNABLE_IMPLS)
def test_eager_update_is_in_place_and_views_see_it(impl):
    new, idx, cache_np, total, expected = case(3, "float32", num_valid=5)
    cache = torch.from_numpy(cache_np.copy())
    ptr, version = cache.data_ptr(), cache._version
    paged_view = cache.view(NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM)
    row_view = cache[PAGE_SIZE:]
    torch_ops.kv_cache_update(
        torch.from_numpy(new), torch.from_numpy(idx), cache, torch.from_numpy(total), page_size=PAGE_SIZE, impl=impl
    )
    assert cache.data_ptr() == ptr
    assert cache._version > version  # autograd's view/version tracking sees the mutation
    np.testing.assert_array_equal(bits(cache.numpy()), bits(expected))
    np.testing.assert_array_equal(bits(paged_view.reshape(-1, HEADS, HEAD_DIM).numpy()), bits(expected))
    np.testing.assert_array_equal(bits(row_view.numpy()), bits(expected[PAGE_SIZE:]))


def test_paged_view_updates_its_flat_base():
    new, idx, cache_np, total, expected = case(4, "bfloat16")
    base = to_torch(cache_np, torch.bfloat16)
    paged = base.view(NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM)
    ptr = paged.data_ptr()
    torch.ops.paged_kv.kv_cache_update(
        to_torch(new, torch.bfloat16), torch.from_numpy(idx), paged, torch.from_numpy(total), PAGE_SIZE, 8, "auto"
    )
    assert paged.data_ptr() == ptr
    np.testing.assert_array_equal(torch_bits(base), bits(expected))


def test_xla_step_aliases_the_cache(xla_device):
    """In place on XLA: the compiled step aliases the cache buffer input→output.

    torch_xla records InputOutputAliasCount when it compiles a graph, so the
    cache here has a shape no other test uses (a fresh compile). That the step
    time stays flat as the cache grows is measured in benchmarks/.
    """
    import torch_xla
    import torch_xla.debug.metrics as met

    def aliases():
        data = met.metric_data("InputOutputAliasCount")
        return 0.0 if data is None else data[1]

    cache_np = sentinel_cache(11 * PAGE_SIZE, HEADS, HEAD_DIM, "float32")
    rng = np.random.default_rng(5)
    new = random_tokens(rng, NUM_TOKENS, HEADS, HEAD_DIM, "float32")
    idx, total = random_slices(rng, num_rows=cache_np.shape[0], num_tokens=NUM_TOKENS, page_size=PAGE_SIZE, num_slices=NUM_SLICES)
    cache = torch.from_numpy(cache_np).to(xla_device)
    args = (torch.from_numpy(new).to(xla_device), torch.from_numpy(idx).to(xla_device))
    total_t = torch.from_numpy(total).to(xla_device)
    torch_xla.sync()
    before = aliases()
    for _ in range(2):
        torch_ops.kv_cache_update(*args, cache, total_t, page_size=PAGE_SIZE)
        torch_xla.sync()
    assert aliases() >= before + 1
    np.testing.assert_array_equal(bits(cache.cpu().numpy()), bits(jk.kv_cache_update_reference(new, idx, cache_np, total)))


# ---------------------------------------------------------------- functional


@pytest.mark.parametrize("impl", RUNNABLE_IMPLS)
def test_functional_op_leaves_its_input_untouched(impl):
    new, idx, cache_np, total, expected = case(6, "bfloat16")
    cache = to_torch(cache_np, torch.bfloat16)
    out = torch_ops.kv_cache_update_functional(
        to_torch(new, torch.bfloat16), torch.from_numpy(idx), cache, torch.from_numpy(total),
        page_size=PAGE_SIZE, impl=impl,
    )
    assert out.data_ptr() != cache.data_ptr()
    np.testing.assert_array_equal(torch_bits(out), bits(expected))
    np.testing.assert_array_equal(torch_bits(cache), bits(cache_np))


def test_functional_op_on_xla_leaves_its_input_untouched(xla_device):
    import torch_xla

    new, idx, cache_np, total, expected = case(7, "float32")
    cache = torch.from_numpy(cache_np).to(xla_device)
    out = torch_ops.kv_cache_update_functional(
        torch.from_numpy(new).to(xla_device), torch.from_numpy(idx).to(xla_device), cache,
        torch.from_numpy(total).to(xla_device), page_size=PAGE_SIZE,
    )
    torch_xla.sync()
    np.testing.assert_array_equal(bits(out.cpu().numpy()), bits(expected))
    np.testing.assert_array_equal(bits(cache.cpu().numpy()), bits(cache_np))


# -------------------------------------------------------------- conventions


OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck_samples():
    samples = []
    for dtype_name in [*DTYPES, "float16", "int8"]:
        new, idx, cache_np, total, _ = case(8, dtype_name)
        dtype = DTYPES.get(dtype_name) or getattr(torch, dtype_name)
        # A finite fill: opcheck compares outputs with assert_close, where NaN != NaN.
        cache = torch.full(cache_np.shape, -3.0).to(dtype)
        samples.append((to_torch(new, dtype), torch.from_numpy(idx), cache, torch.from_numpy(total)))
    # An empty update.
    new, idx, cache_np, _, _ = case(9, "float32")
    samples.append((torch.from_numpy(new), torch.from_numpy(idx), torch.zeros(cache_np.shape), torch.zeros(1, dtype=torch.int32)))
    # No tokens at all.
    samples.append((torch.zeros(0, HEADS, HEAD_DIM), torch.zeros(3, 4, dtype=torch.int32), torch.zeros(4 * PAGE_SIZE, HEADS, HEAD_DIM), torch.zeros(1, dtype=torch.int32)))
    # Non-contiguous new_kv_tokens (every other token of a bigger tensor).
    new, idx, cache_np, total, _ = case(10, "float32")
    wide = torch.from_numpy(np.repeat(new, 2, axis=0))[::2]
    assert not wide.is_contiguous()
    samples.append((wide, torch.from_numpy(idx), torch.zeros(cache_np.shape), torch.from_numpy(total)))
    return samples


@pytest.mark.parametrize("impl", ["auto", "jax"])
@pytest.mark.parametrize("op_name", ["kv_cache_update", "kv_cache_update_functional"])
def test_opcheck(op_name, impl):
    op = getattr(torch.ops.paged_kv, op_name).default
    for sample in _opcheck_samples():
        checks = OPCHECK_TESTS
        if sample[2].dtype == torch.float8_e4m3fn:
            # torch's SchemaCheckMode compares tensors with ops CPU float8 lacks
            # ("mul_cpu_reduced_float" not implemented); every other check runs.
            checks = tuple(t for t in checks if t != "test_schema")
        results = torch.library.opcheck(op, (*sample, PAGE_SIZE, 8, impl), test_utils=checks)
        assert set(results) == set(checks) and all(v == "SUCCESS" for v in results.values()), results


class _UpdateThenSum(torch.nn.Module):
    """A layer that updates its cache through the op, then reads it (for torch.compile)."""

    def forward(self, new, idx, cache, total):
        torch.ops.paged_kv.kv_cache_update(new * 2, idx, cache, total, PAGE_SIZE, 8, "auto")
        return cache.sum(dim=(1, 2))


def test_torch_compile_fullgraph():
    new, idx, cache_np, total, _ = case(11, "float32", num_valid=4)
    cache_np = np.nan_to_num(cache_np)
    eager_cache = torch.from_numpy(cache_np.copy())
    compiled_cache = torch.from_numpy(cache_np.copy())
    args = (torch.from_numpy(new), torch.from_numpy(idx))
    want = _UpdateThenSum()(*args, eager_cache, torch.from_numpy(total))
    got = torch.compile(_UpdateThenSum(), fullgraph=True, backend="aot_eager")(*args, compiled_cache, torch.from_numpy(total))
    torch.testing.assert_close(got, want)
    np.testing.assert_array_equal(compiled_cache.numpy(), eager_cache.numpy())
    got = torch.compile(_UpdateThenSum(), fullgraph=True)(*args, torch.from_numpy(cache_np.copy()), torch.from_numpy(total))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", ["jax", "scan", "pallas_interpret"])
def test_eager_jax_paths_do_not_retrace(impl):
    fn = _eager.jitted_update(impl, PAGE_SIZE, None)  # the op's default slices_per_processing_page
    new, _, cache_np, _, _ = case(12, "float32")
    cache = torch.from_numpy(cache_np)
    rng = np.random.default_rng(0)
    sizes = []
    for num_valid in (1, 3, 1, 2, 3):
        idx, total = random_slices(
            rng, num_rows=cache.shape[0], num_tokens=NUM_TOKENS, page_size=PAGE_SIZE, num_slices=NUM_SLICES,
            num_valid=num_valid, within_pages=True,
        )
        # Each slice here is short, so the staged rows always fit one bucket.
        idx[2, :num_valid] = np.minimum(idx[2, :num_valid], 4)
        torch_ops.kv_cache_update(torch.from_numpy(new), torch.from_numpy(idx), cache, torch.from_numpy(total), page_size=PAGE_SIZE, impl=impl)
        sizes.append(fn._cache_size())
    assert sizes[0] >= 1 and len(set(sizes)) == 1, sizes


def test_xla_does_not_recompile(xla_device):
    import torch_xla
    import torch_xla.debug.metrics as met

    new, _, cache_np, _, _ = case(13, "float32")
    cache = torch.from_numpy(cache_np).to(xla_device)
    new_t = torch.from_numpy(new).to(xla_device)
    rng = np.random.default_rng(1)
    compiles = []
    for num_valid in (1, 5, 2, 8, 3):
        idx, total = random_slices(
            rng, num_rows=cache.shape[0], num_tokens=NUM_TOKENS, page_size=PAGE_SIZE, num_slices=NUM_SLICES, num_valid=num_valid
        )
        torch_ops.kv_cache_update(new_t, torch.from_numpy(idx).to(xla_device), cache, torch.from_numpy(total).to(xla_device), page_size=PAGE_SIZE)
        torch_xla.sync()
        compiles.append(met.metric_data("CompileTime")[0])
    assert len(set(compiles[1:])) == 1, compiles


def test_jax_kernels_validation_applies_to_the_op():
    # Wrong impl name, "pallas" off TPU, devices: the op-specific checks.
    new, idx, cache_np, total, _ = case(14, "float32")
    cache = torch.from_numpy(cache_np.copy())
    args = (torch.from_numpy(new), torch.from_numpy(idx), cache, torch.from_numpy(total))
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        torch_ops.kv_cache_update(*args, page_size=PAGE_SIZE, impl="fast")
    with pytest.raises(ValueError, match="impl='pallas' needs PyTorch/XLA tensors on a TPU"):
        torch_ops.kv_cache_update(*args, page_size=PAGE_SIZE, impl="pallas")
    with pytest.raises(ValueError, match=r"paged kv_cache.shape\[1\]=16 must equal page_size=8"):
        torch_ops.kv_cache_update(args[0], args[1], cache.view(NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM), args[3], page_size=8)
    np.testing.assert_array_equal(bits(cache.numpy()), bits(cache_np))


def test_metadata_rewritten_in_place_is_checked_and_applied_again():
    """The eager paths remember the last valid metadata by value: rewriting
    the same ``slice_indices`` tensor in place — through torch or a numpy
    view, which bumps no version counter — is seen, applied and checked anew,
    and an invalid rewrite raises every time with the cache unchanged."""
    new, idx_np, cache_np, total_np, _ = case(21, "float32", num_valid=4)
    cache = torch.from_numpy(cache_np.copy())
    idx, total, tokens = torch.from_numpy(idx_np.copy()), torch.from_numpy(total_np.copy()), torch.from_numpy(new)
    ref = cache_np.copy()
    for step in range(4):
        if step:  # new destinations written into the same tensor: torch on odd steps, numpy on even ones
            fresh = case(21 + step, "float32", num_valid=4)[1]
            if step % 2:
                idx.copy_(torch.from_numpy(fresh))
            else:
                idx.numpy()[...] = fresh
        for _ in range(2):  # each step twice, as two layers would (the second call reuses the checks)
            torch_ops.kv_cache_update(tokens, idx, cache, total, page_size=PAGE_SIZE)
        ref = jk.kv_cache_update_reference(new, idx.numpy().copy(), ref, total_np)
        np.testing.assert_array_equal(bits(cache.numpy()), bits(ref))
    before = cache.clone()
    a, b = np.flatnonzero(idx.numpy()[2, : int(total_np[0])] > 0)[:2]
    idx.numpy()[0, b] = idx.numpy()[0, a]  # two slices now write the same rows
    for _ in range(2):
        with pytest.raises(ValueError, match="slice_indices"):
            torch_ops.kv_cache_update(tokens, idx, cache, total, page_size=PAGE_SIZE)
    np.testing.assert_array_equal(bits(cache.numpy()), bits(before.numpy()))


def test_remembered_metadata_is_checked_against_each_cache():
    """The same valid metadata is checked again for a cache with fewer rows
    (the remembered outcome is per shape): out of range there, it raises."""
    new, idx_np, cache_np, total_np, _ = case(22, "float32", num_valid=4)
    args = (torch.from_numpy(new), torch.from_numpy(idx_np))
    torch_ops.kv_cache_update(*args, torch.from_numpy(cache_np.copy()), torch.from_numpy(total_np), page_size=PAGE_SIZE)
    small = torch.zeros(int(idx_np[0, : int(total_np[0])].max()), HEADS, HEAD_DIM)  # the last slice does not fit
    with pytest.raises(ValueError, match="kv_cache"):
        torch_ops.kv_cache_update(*args, small, torch.from_numpy(total_np), page_size=PAGE_SIZE)
    assert not small.any()


def test_torch_compile_openxla_backend(xla_device):
    import torch_xla

    new, idx, cache_np, total, _ = case(15, "float32", num_valid=5)
    cache_np = np.zeros_like(cache_np)
    cache = torch.from_numpy(cache_np).to(xla_device)
    step = torch.compile(_UpdateThenSum(), backend="openxla", fullgraph=True)
    want = cache_np
    for _ in range(2):  # the second step runs on the first one's result
        out = step(torch.from_numpy(new).to(xla_device), torch.from_numpy(idx).to(xla_device), cache, torch.from_numpy(total).to(xla_device))
        torch_xla.sync()
        want = jk.kv_cache_update_reference(new * 2, idx, want, total)
        np.testing.assert_array_equal(cache.cpu().numpy(), want)
        np.testing.assert_allclose(out.cpu().numpy(), want.sum(axis=(1, 2)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("grad_input", ["kv_cache", "new_kv_tokens"])
def test_torch_compile_refuses_inputs_that_require_grad(grad_input):
    # AutogradCPU falls through to the eager kernels; what torch.compile traces
    # are the fake kernels, which must refuse too.
    cache = torch.zeros(4 * PAGE_SIZE, 2, 128)
    new = torch.ones(4, 2, 128)
    {"kv_cache": cache, "new_kv_tokens": new}[grad_input].requires_grad_()
    idx = torch.tensor([[0], [0], [4]], dtype=torch.int32)
    total = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(Exception, match=f"paged_kv::kv_cache_update is not differentiable, but {grad_input} requires"):
        torch.compile(_UpdateThenSum(), fullgraph=True, backend="aot_eager")(new, idx, cache, total)
    assert not cache.detach().any()


def _copy_host(cache, dst, new):
    _eager.host_rows(cache)[dst] = _eager.host_rows(new)


@pytest.mark.parametrize("copy", [_eager.copy_rows_, _eager.copy_words_, _copy_host], ids=["auto", "words", "host"])
@pytest.mark.parametrize("flush_denormal", [False, True])
def test_row_copies_move_every_bit_pattern(flush_denormal, copy):
    """Both eager row copies — numpy void items and 16- or 8-byte words
    (complex128 / float64 views) — move every bfloat16 bit pattern (NaN
    payloads, signalling NaNs, denormals) and random 64-bit words unchanged,
    with or without flush-to-zero."""
    rng = np.random.default_rng(0)
    patterns = np.concatenate([np.arange(2**16, dtype=np.uint16), rng.integers(0, 2**16, 2**16, dtype=np.uint16)])
    new = torch.from_numpy(patterns.view(np.int16).copy()).view(torch.bfloat16).view(-1, 2, 128)  # [512, 2, 128]
    cache = torch.zeros(1024, 2, 128, dtype=torch.bfloat16)
    dst = rng.permutation(1024)[: new.shape[0]]
    torch.set_flush_denormal(flush_denormal)
    try:
        copy(cache, dst, new)
    finally:
        torch.set_flush_denormal(False)
    assert _eager.as_rows(cache).dtype in (torch.complex128, torch.float64)  # the words path has words to move
    np.testing.assert_array_equal(cache[torch.from_numpy(dst)].view(torch.int16).numpy(), new.view(torch.int16).numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("strided", ["rows", "heads", "dim"])
def test_host_row_copy_writes_in_place_into_strided_views(dtype, strided):
    """The numpy copy writes into the cache's own memory through any view the
    cache can be (strided rows, strided heads) and nowhere else, and refuses a
    strided last dimension, which the words copy then takes."""
    bits = _eager.as_copyable  # float8 as uint8 (CPU float8 lacks index_put_)
    view = {"rows": lambda b: b[::2, :, :16], "heads": lambda b: b[:, ::2, :16], "dim": lambda b: b[:, :, ::2]}[strided]
    base = torch.zeros(64, 4, 32).to(dtype)
    cache = view(base)  # [.., .., 16]
    new = torch.randn(5, cache.shape[1], 16).to(dtype)
    dst = np.array([3, 0, 31, 7, 12])
    expected = bits(base.clone())
    view(expected)[torch.from_numpy(dst)] = bits(new)
    if strided == "dim":
        with pytest.raises(ValueError):
            _eager.host_rows(cache)
    _eager.copy_rows_(cache, dst, new)
    assert torch.equal(bits(base), expected)


@pytest.mark.parametrize(
    "heads, head_dim, offset, word_dtype, word_shape",
    [
        (2, 128, 0, torch.complex128, (32,)),  # a row of contiguous heads as 16-byte words (2-D: see as_rows)
        (2, 4, 0, torch.complex128, (1,)),  # 8 bytes a head, 16 a row: words span the heads
        (2, 2, 0, torch.float64, (1,)),  # 8 bytes a row
        (3, 1, 0, torch.bfloat16, (3, 1)),  # 6 bytes a row: no word fits, copied as itself
        (2, 128, 1, torch.bfloat16, (2, 128)),  # storage offset not a whole word
    ],
)
def test_row_words_follow_the_layout_and_copies_stay_exact(heads, head_dim, offset, word_dtype, word_shape):
    rows = 64
    base = torch.zeros(rows * heads * head_dim + offset, dtype=torch.bfloat16)
    cache = base[offset:].view(rows, heads, head_dim)
    words = _eager.as_rows(cache)
    assert words.dtype == word_dtype and tuple(words.shape) == (rows, *word_shape)
    assert words.data_ptr() == cache.data_ptr()  # a view, never a copy
    new = torch.randn(8, heads, head_dim).to(torch.bfloat16)
    dst = np.array([5, 0, 63, 17, 2, 40, 41, 9])
    expected = cache.clone()
    expected[torch.from_numpy(dst)] = new
    _eager.copy_rows_(cache, dst, new)
    assert torch.equal(cache.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("device", ["cpu", "xla"])
@pytest.mark.parametrize("op_name", ["kv_cache_update", "kv_cache_update_functional"])
@pytest.mark.parametrize("grad_input", ["kv_cache", "new_kv_tokens"])
def test_inputs_that_require_grad_are_refused_and_the_cache_kept(device, op_name, grad_input, request):
    if device == "xla":
        device = request.getfixturevalue("xla_device")  # skips without torch_xla
    op = getattr(torch.ops.paged_kv, op_name)
    cache = torch.zeros(32, 2, 128, device=device)
    new = torch.ones(4, 2, 128, device=device)
    {"kv_cache": cache, "new_kv_tokens": new}[grad_input].requires_grad_()
    idx = torch.tensor([[0], [0], [4]], dtype=torch.int32, device=device)
    total = torch.tensor([1], dtype=torch.int32, device=device)
    # ValueError naming the tensor, like every rejected call (issue 16).
    with pytest.raises(ValueError, match=f"paged_kv::{op_name} is not differentiable, but {grad_input} requires grad"):
        op(new, idx, cache, total, 16, 8, "auto")
    assert not cache.detach().cpu().any()
    with torch.no_grad():  # the documented way out
        op(new, idx, cache, total, 16, 8, "auto")
