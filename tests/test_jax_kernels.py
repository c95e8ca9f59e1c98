"""jax_kernels: every implementation equals the numpy reference bitwise."""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_kernels as jk
from jax_kernels.testing import TEST_DTYPES, bits, np_dtype, random_slices, random_tokens, sentinel_cache

HEADS, HEAD_DIM = 2, 128  # head_dim 128: the TPU kernel's lane rule holds
NUM_PAGES, NUM_TOKENS, NUM_SLICES = 6, 48, 8  # one shape per (dtype, page_size): one compile each

IMPLS = {
    "auto": lambda *a, page_size: jk.kv_cache_update(*a, page_size=page_size),
    "scan": lambda *a, page_size: jk.kv_cache_update_jax(*a, page_size=page_size),
    "scatter": lambda *a, page_size: jk.kv_cache_update_scatter(*a, page_size=page_size),
    "interpret": lambda *a, page_size: jk.kv_cache_update(
        *a, page_size=page_size, slices_per_processing_page=4, interpret=True
    ),
}


def run_and_compare(impl, new, idx, cache, total, page_size):
    expected = jk.kv_cache_update_reference(new, idx, cache, total)
    out = IMPLS[impl](jnp.asarray(new), jnp.asarray(idx), jnp.asarray(cache), jnp.asarray(total), page_size=page_size)
    out = np.asarray(out)
    assert out.shape == cache.shape and out.dtype == cache.dtype
    np.testing.assert_array_equal(bits(out), bits(expected))
    return out


def named_layouts(page_size):
    """(name, slice_indices, total) cases, all in a NUM_PAGES-page cache."""
    rows = NUM_PAGES * page_size
    ps = page_size
    cases = []
    # A slice starting at every offset of the last page (the clamping bug),
    # and at every offset of the first page.
    for base in (0, rows - ps):
        for off in range(0, ps, max(1, ps // 8)):
            n = min(ps, rows - base - off, 7)
            cases.append((f"offset{base + off}", [[base + off], [3], [n]], 1))
    cases.append(("last_row", [[rows - 1], [NUM_TOKENS - 1], [1]], 1))
    cases.append(("full_pages", [[0, 2 * ps, rows - ps], [0, 5, NUM_TOKENS - ps], [ps, ps, ps]], 3))
    cases.append(("cross_page", [[ps - 3], [0], [ps]], 1))
    cases.append(("zero_valid", [[0, ps], [0, 1], [5, 5]], 0))
    cases.append(("zero_length", [[0, 4], [0, 1], [0, 3]], 2))
    # Garbage beyond the total must never be read.
    cases.append(("padded", [[ps, -7, 10**6], [2, -1, 10**6], [4, 99, -3]], 1))
    out = []
    for name, cols, total in cases:
        idx = np.zeros((3, NUM_SLICES), np.int32)
        cols = np.array(cols, np.int32)
        idx[:, : cols.shape[1]] = cols
        out.append((name, idx, np.array([total], np.int32)))
    return out


@pytest.mark.parametrize("page_size", [16, 32, 33])
@pytest.mark.parametrize("dtype", TEST_DTYPES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_named_layouts(impl, dtype, page_size):
    rng = np.random.default_rng(page_size)
    cache = sentinel_cache(NUM_PAGES * page_size, HEADS, HEAD_DIM, dtype)
    new = random_tokens(rng, NUM_TOKENS, HEADS, HEAD_DIM, dtype)
    for name, idx, total in named_layouts(page_size):
        try:
            run_and_compare(impl, new, idx, cache, total, page_size)
        except AssertionError as e:
            raise AssertionError(f"layout {name}: {e}") from None


@pytest.mark.parametrize("page_size", [16, 33])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_random_layouts(impl, page_size):
    rng = np.random.default_rng(7)
    for dtype in ("float32", "bfloat16"):
        cache = sentinel_cache(NUM_PAGES * page_size, HEADS, HEAD_DIM, dtype)
        new = random_tokens(rng, NUM_TOKENS, HEADS, HEAD_DIM, dtype)
        for _ in range(4):
            idx, total = random_slices(
                rng, num_rows=cache.shape[0], num_tokens=NUM_TOKENS, page_size=page_size, num_slices=NUM_SLICES
            )
            run_and_compare(impl, new, idx, cache, total, page_size)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    page_size=st.sampled_from([1, 3, 16, 33]),
    within_pages=st.booleans(),
    impl=st.sampled_from(["auto", "scan", "scatter"]),
)
def test_hypothesis_layouts(seed, page_size, within_pages, impl):
    # Shapes vary with page_size only, keeping compiles bounded. The kernel in
    # the interpreter has the named/random cases above and the slow test below.
    rng = np.random.default_rng(seed)
    cache = sentinel_cache(5 * page_size, 2, 8, "float32")
    new = random_tokens(rng, 20, 2, 8, "float32")
    idx, total = random_slices(
        rng, num_rows=cache.shape[0], num_tokens=20, page_size=page_size, num_slices=6, within_pages=within_pages
    )
    run_and_compare(impl, new, idx, cache, total, page_size)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), within_pages=st.booleans(), impl=st.sampled_from(list(IMPLS)))
def test_hypothesis_layouts_slow(seed, within_pages, impl):
    rng = np.random.default_rng(seed)
    cache = sentinel_cache(NUM_PAGES * 16, HEADS, HEAD_DIM, "bfloat16")
    new = random_tokens(rng, NUM_TOKENS, HEADS, HEAD_DIM, "bfloat16")
    idx, total = random_slices(
        rng, num_rows=cache.shape[0], num_tokens=NUM_TOKENS, page_size=16, num_slices=NUM_SLICES,
        within_pages=within_pages,
    )
    run_and_compare(impl, new, idx, cache, total, 16)


def test_fallbacks_accept_any_head_dim_and_sources_that_overlap():
    # head_dim 8 (not a multiple of 128) and two slices reading the same tokens.
    rng = np.random.default_rng(1)
    cache = sentinel_cache(4 * 16, 3, 8, "float32")
    new = random_tokens(rng, 10, 3, 8, "float32")
    idx = np.array([[0, 16, 40, 0], [0, 0, 2, 0], [10, 10, 8, 0]], np.int32)  # 28 rows > 10 tokens
    total = np.array([3], np.int32)
    for impl in ("auto", "scan", "scatter"):
        run_and_compare(impl, new, idx, cache, total, 16)


@pytest.mark.parametrize(
    "cols",
    [
        [[0, 16, 40], [0, 1, 5], [3, 3, 2]],  # tokens 1, 2 read twice; 8 rows <= 10 tokens
        [[40, 0, 16], [4, 4, 4], [5, 5, 5]],  # three slices read the same 5 tokens
        [[0, 20], [9, 9], [1, 1]],  # the last token read twice
    ],
)
def test_scatter_fallback_redoes_rows_whose_source_another_slice_reads(cols):
    # Fewer rows than tokens, so only the lost-row check sends them to the second pass.
    rng = np.random.default_rng(2)
    cache = sentinel_cache(4 * 16, 3, 8, "float32")
    new = random_tokens(rng, 10, 3, 8, "float32")
    idx = np.array(cols, np.int32)
    total = np.array([idx.shape[1]], np.int32)
    for impl in ("auto", "scatter"):
        run_and_compare(impl, new, idx, cache, total, 16)


def test_kernel_rejects_unaligned_head_dim_and_auto_falls_back():
    cache = jnp.zeros((32, 2, 64), jnp.float32)
    new = jnp.ones((4, 2, 64), jnp.float32)
    idx = jnp.array([[0], [0], [4]], jnp.int32)
    total = jnp.array([1], jnp.int32)
    with pytest.raises(ValueError, match=r"head_dim=64 must be a multiple of 128.*fallbacks accept"):
        jk.kv_cache_update(new, idx, cache, total, page_size=16, interpret=True)
    out = jk.kv_cache_update(new, idx, cache, total, page_size=16)
    np.testing.assert_array_equal(np.asarray(out)[:4], 1.0)
    assert jk.tpu_kernel_problem((32, 2, 64), np.float32, page_size=16, slices_per_processing_page=8)


def _lowered_tpu_text(page_size=32):
    cache = jax.ShapeDtypeStruct((8 * page_size, 4, 128), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((64, 4, 128), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((3, 16), jnp.int32)
    total = jax.ShapeDtypeStruct((1,), jnp.int32)
    fn = jax.jit(jk.kv_cache_update, donate_argnums=2)
    return fn.trace(new, idx, cache, total).lower(lowering_platforms=("tpu",)).as_text()


def test_lowers_for_tpu_with_the_kernel_aliasing_the_cache():
    text = _lowered_tpu_text()
    calls = [line for line in text.splitlines() if "tpu_custom_call" in line]
    assert len(calls) == 1, "expected exactly one Pallas kernel in the TPU lowering"
    call = calls[0]
    alias = re.search(r"output_operand_alias<output_tuple_indices = \[\], operand_index = (\d+)", call)
    assert alias, "the kernel's output is not aliased to an operand"
    signature = re.search(r" : \((tensor<.*)\) -> (tensor<[^>]*>)", call)
    operand_types = re.findall(r"tensor<[^>]*>", signature.group(1))
    # The aliased operand is the cache: same type as the result, 256x4x128 bf16.
    assert operand_types[int(alias.group(1))] == signature.group(2) == "tensor<256x4x128xbf16>"
    assert "paged_kv_cache_update" in text


def test_cpu_lowering_uses_the_fallback_not_the_kernel():
    cache = jnp.zeros((64, 2, 128), jnp.float32)
    args = (jnp.zeros((4, 2, 128), jnp.float32), jnp.zeros((3, 8), jnp.int32), cache, jnp.zeros((1,), jnp.int32))
    text = jax.jit(jk.kv_cache_update).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    assert "tpu_custom_call" not in text
    assert "scatter" in text


@pytest.mark.parametrize("impl", ["auto", "scan", "scatter", "interpret"])
def test_changing_the_slice_count_does_not_retrace(impl):
    traces = []

    def step(new, idx, cache, total):
        traces.append(1)
        return IMPLS[impl](new, idx, cache, total, page_size=16)

    step = jax.jit(step)
    rng = np.random.default_rng(3)
    cache = jnp.asarray(sentinel_cache(NUM_PAGES * 16, HEADS, HEAD_DIM, "float32"))
    new = random_tokens(rng, NUM_TOKENS, HEADS, HEAD_DIM, "float32")
    for num_valid in (0, 1, 5, NUM_SLICES):
        idx, total = random_slices(
            rng, num_rows=cache.shape[0], num_tokens=NUM_TOKENS, page_size=16, num_slices=NUM_SLICES,
            num_valid=num_valid,
        )
        out = step(jnp.asarray(new), jnp.asarray(idx), cache, jnp.asarray(total))
        np.testing.assert_array_equal(bits(out), bits(jk.kv_cache_update_reference(new, idx, np.asarray(cache), total)))
    assert len(traces) == 1


def test_donated_cache_is_updated_in_place_on_cpu():
    cache = jnp.zeros((64 * 16, 4, 128), jnp.float32)
    ptr = cache.unsafe_buffer_pointer()
    new = jnp.ones((8, 4, 128), jnp.float32)
    idx = jnp.array([[16], [0], [8]], jnp.int32)
    fn = jax.jit(jk.kv_cache_update, donate_argnums=2, static_argnames=("page_size",))
    out = fn(new, idx, cache, jnp.array([1], jnp.int32), page_size=16)
    assert out.unsafe_buffer_pointer() == ptr
    assert cache.is_deleted()


UPDATE_FNS = {"auto": jk.kv_cache_update, "scatter": jk.kv_cache_update_scatter, "scan": jk.kv_cache_update_jax}


def _update_step(impl, **options):
    return jax.jit(
        UPDATE_FNS[impl], donate_argnums=2, static_argnames=("page_size",),
        compiler_options=options or None,
    )


@pytest.mark.parametrize("impl", list(UPDATE_FNS))
@pytest.mark.parametrize("dtype", TEST_DTYPES + ("float8_e5m2",))
def test_update_compiler_options_keep_donated_updates_exact_and_in_place(dtype, impl):
    rng = np.random.default_rng(11)
    page_size = 16
    cache = sentinel_cache(NUM_PAGES * page_size, HEADS, HEAD_DIM, dtype)  # NaN payloads must survive
    new = random_tokens(rng, NUM_TOKENS, HEADS, HEAD_DIM, dtype)
    idx, total = random_slices(rng, num_rows=cache.shape[0], num_tokens=NUM_TOKENS, page_size=page_size, num_slices=NUM_SLICES)
    options = jk.update_compiler_options(cache.dtype, impl=impl)
    step = _update_step(impl, **options)
    on_device = jnp.copy(jnp.asarray(cache))  # JAX-owned memory (a numpy-backed array is not donated)
    ptr = on_device.unsafe_buffer_pointer()
    out = step(jnp.asarray(new), jnp.asarray(idx), on_device, jnp.asarray(total), page_size=page_size)
    assert out.unsafe_buffer_pointer() == ptr
    np.testing.assert_array_equal(bits(out), bits(jk.kv_cache_update_reference(new, idx, cache, total)))


@pytest.mark.parametrize("impl", list(UPDATE_FNS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_update_compiler_options_stop_xla_cpu_converting_the_whole_cache(dtype, impl):
    # XLA:CPU float-normalizes these types: without the options the compiled
    # update converts the whole cache to f32 (or f16) and back, an O(cache) step.
    rows = 4096
    args = (
        jax.ShapeDtypeStruct((NUM_TOKENS, HEADS, HEAD_DIM), np_dtype(dtype)),
        jax.ShapeDtypeStruct((3, NUM_SLICES), jnp.int32),
        jax.ShapeDtypeStruct((rows, HEADS, HEAD_DIM), np_dtype(dtype)),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    options = jk.update_compiler_options(np_dtype(dtype), impl=impl)
    xla_type = options["xla_disable_hlo_passes"].removeprefix("float-normalization-")

    def whole_cache_types(**opts):
        text = _update_step(impl, **opts).lower(*args, page_size=16).compile().as_text()
        return set(re.findall(rf"(\w+)\[{rows},{HEADS},{HEAD_DIM}\]", text))

    if whole_cache_types() == {xla_type}:
        pytest.skip(f"this XLA:CPU ({jax.__version__}) updates {dtype} natively: nothing to fix")
    assert whole_cache_types(**options) == {xla_type}


def test_update_compiler_options_by_platform_dtype_and_impl():
    assert jk.update_compiler_options(jnp.float32) == {}
    assert jk.update_compiler_options(jnp.float16) == {}
    assert jk.update_compiler_options(jnp.int8) == {}
    assert jk.update_compiler_options(jnp.bfloat16) == {"xla_disable_hlo_passes": "float-normalization-bf16"}
    assert jk.update_compiler_options(jnp.float8_e4m3fn)["xla_disable_hlo_passes"] == "float-normalization-f8e4m3fn"
    for platform in ("tpu", "gpu", "cuda"):
        assert jk.update_compiler_options(jnp.bfloat16, impl="scan", platform=platform) == {}
    old_jaxlib = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", jax.lib.__version__).groups()) < (0, 8)
    scan = jk.update_compiler_options(jnp.float32, impl="scan")
    assert scan == ({"xla_cpu_use_fusion_emitters": False} if old_jaxlib else {})
    with pytest.raises(ValueError, match="impl='kernel' is not one of"):
        jk.update_compiler_options(jnp.float32, impl="kernel")
    with pytest.raises(TypeError, match="dtype='bf16x' is not a dtype"):
        jk.update_compiler_options("bf16x")
    assert jk.update_compiler_options("bfloat16", platform="CPU") == jk.update_compiler_options(jnp.bfloat16)


def test_cdiv():
    assert [jk.cdiv(a, 4) for a in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert int(jk.cdiv(jnp.int32(9), 4)) == 3


def test_importing_jax_kernels_does_not_import_torch():
    code = "import sys, jax_kernels; sys.exit(1 if 'torch' in sys.modules else 0)"
    subprocess.run([sys.executable, "-c", code], check=True)
