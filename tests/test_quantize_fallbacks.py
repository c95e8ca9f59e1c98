"""The scatter fallback's quantized write: bitwise equal to the reference when
sources overlap (pass 2 copies rows within the cache), and compiled on XLA:CPU
into a single quantize of the rows, nothing materialized beside them, that
divides every value (no multiply by a reciprocal)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_kernels as jk
from jax_kernels.testing import bits

PAGE_SIZE, NUM_ROWS, NUM_TOKENS = 16, 8 * 16, 24
IMPLS = {"auto": jk.kv_cache_update, "scatter": jk.kv_cache_update_scatter, "scan": jk.kv_cache_update_jax}
K_SCALE, V_SCALE = 0.07, 0.3


def overlapping_slices(rng, num_slices: int, num_valid: int):  # -> (i32[3, S], i32[1])
    """Disjoint destinations, sources anywhere in the tokens (read any number of
    times), lengths 0..page_size; padding columns hold garbage."""
    lengths = rng.integers(0, PAGE_SIZE + 1, num_valid)
    starts = np.sort(rng.choice(NUM_ROWS // PAGE_SIZE, num_valid, replace=False)) * PAGE_SIZE
    dst = starts + rng.integers(0, PAGE_SIZE - lengths + 1)  # inside one page each: disjoint
    src = rng.integers(0, NUM_TOKENS - lengths + 1)
    idx = np.stack([dst, src, lengths])[:, rng.permutation(num_valid)].astype(np.int32)  # in any order
    garbage = rng.integers(-50, 500, (3, num_slices - num_valid)).astype(np.int32)
    return np.concatenate([idx, garbage], axis=1), np.array([num_valid], np.int32)


def _tokens(rng, dtype):
    x = (rng.standard_normal((NUM_TOKENS, 4, 128)) * 30).astype(np.float32)
    x.reshape(-1)[:5] = [np.nan, np.inf, -np.inf, -0.0, 1e-30]
    return x.astype(dtype)


CASES = [("bfloat16", "float8_e4m3fn"), ("float16", "float8_e5m2"), ("bfloat16", "int8"), ("float32", "float32")]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("token_dtype,cache_dtype", CASES)
def test_overlapping_sources_bitwise(impl, token_dtype, cache_dtype):
    rng = np.random.default_rng(0)
    td, cd = np.dtype(jnp.dtype(token_dtype)), np.dtype(jnp.dtype(cache_dtype))
    scales = {"k_scale": K_SCALE, "v_scale": V_SCALE} if td != cd else {}
    opts = jk.update_compiler_options(cd) or None
    fn = jax.jit(functools.partial(IMPLS[impl], page_size=PAGE_SIZE, **scales), compiler_options=opts)
    new = _tokens(rng, td)
    for trial in range(12):
        idx, total = overlapping_slices(rng, 8, int(rng.integers(1, 9)))
        cache = np.full((NUM_ROWS, 4, 128), 3, cd)
        want = jk.kv_cache_update_reference(new, idx, cache, total, **scales)
        np.testing.assert_array_equal(bits(np.asarray(fn(new, idx, cache, total))), bits(want), err_msg=str(idx))


@pytest.mark.parametrize("cache_dtype", ["float8_e4m3fn", "int8"])
def test_tokens_read_only_past_the_first_num_tokens_packed_rows(cache_dtype):
    """Slices 0-2 read tokens 0..7 three times (24 packed rows = num_tokens); only
    slice 3, whose rows come after those 24, reads tokens 8..23."""
    rng = np.random.default_rng(1)
    new = _tokens(rng, ml_dtypes.bfloat16)
    idx = np.array([[0, 16, 32, 48, 70], [0, 0, 0, 8, 0], [8, 8, 8, 16, 0]], np.int32)
    cd = np.dtype(jnp.dtype(cache_dtype))
    cache = np.zeros((NUM_ROWS, 4, 128), cd)
    total = np.array([4], np.int32)
    want = jk.kv_cache_update_reference(new, idx, cache, total, k_scale=K_SCALE, v_scale=V_SCALE)
    for impl in ("auto", "scatter"):
        out = IMPLS[impl](new, idx, cache, total, page_size=PAGE_SIZE, k_scale=K_SCALE, v_scale=V_SCALE)
        np.testing.assert_array_equal(bits(np.asarray(out)), bits(want))


@pytest.mark.parametrize("cache_dtype", ["float8_e4m3fn", "float8_e5m2", "int8"])
def test_cpu_compiles_one_quantize_and_no_float32_rows(cache_dtype):
    """In the donated update jit (as bench_quantized runs it), the only full-size
    values besides the cache are the tokens and one fusion's quantized rows: no
    float32 quotient, no second quantize for the overlap loop, nothing hoisted
    out of it."""
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU's compiled HLO")
    cd = jnp.dtype(cache_dtype)
    num_tokens, heads, dim = 64, 16, 128
    fn = jax.jit(functools.partial(jk.kv_cache_update, page_size=16), donate_argnums=2,
                 compiler_options=jk.update_compiler_options(cd) or None)
    specs = (jax.ShapeDtypeStruct((num_tokens, heads, dim), jnp.bfloat16), jax.ShapeDtypeStruct((3, 64), jnp.int32),
             jax.ShapeDtypeStruct((4096, heads, dim), cd), jax.ShapeDtypeStruct((1,), jnp.int32))
    text = fn.lower(*specs, k_scale=jnp.float32(1), v_scale=jnp.float32(2)).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    entry = entry[: entry.index("\n}")]
    rows = re.compile(rf"= \w+\[{num_tokens},(1,)?{heads},{dim}\]")
    big = [line.strip().split(", metadata")[0] for line in entry.splitlines()
           if rows.search(line) and "parameter(" not in line and " bitcast(" not in line]  # values computed
    xla_name = {"float8_e4m3fn": "f8e4m3fn", "float8_e5m2": "f8e5m2", "int8": "s8"}[cache_dtype]
    # One fusion (jaxlib 0.7 wraps it in a `call` of its parallel form).
    assert len(big) == 1 and f"= {xla_name}[" in big[0] and re.search(r" (fusion|call)\(", big[0]), big


def _full_size_divides(text: str, num_values: int) -> list[str]:
    """The ``divide`` instructions of compiled HLO whose float32 result has
    ``num_values`` elements (the token rows), wherever they are fused."""
    found = []
    for line in text.splitlines():
        m = re.search(r"= f32\[([\d,]*)\]\{[^}]*\} divide\(", line)
        if m and np.prod([int(d) for d in m.group(1).split(",") if d]) == num_values:
            found.append(line.strip().split(", metadata")[0])
    return found


@pytest.mark.parametrize("layout", ["combined", "packed", "kv"])
@pytest.mark.parametrize("cache_dtype", ["float8_e4m3fn", "int8"])
def test_cpu_quantize_divides_every_value(layout, cache_dtype):
    """XLA's algebraic simplifier rewrites ``x / broadcast(s)`` as ``x *
    broadcast(1 / s)`` (an ulp off for ~15% of float32 quotients) whenever it
    can see that the divisor is one value per head: with ``head_parity`` as
    ``(head & 1) == 1`` it could (measured on jaxlib 0.10.2). The compiled
    quantized update must still divide every token value."""
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU's compiled HLO")
    cd = jnp.dtype(cache_dtype)
    num_tokens = 64
    row = {"combined": (16, 128), "packed": (4, 4, 128), "kv": (8, 128)}[layout]
    tokens = jax.ShapeDtypeStruct((num_tokens, *row), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4096, *row), cd)
    meta = (jax.ShapeDtypeStruct((3, 64), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    opts = jk.update_compiler_options(cd) or None
    if layout == "kv":
        fn = jax.jit(functools.partial(jk.kv_cache_update_kv, page_size=16), donate_argnums=(3, 4),
                     compiler_options=opts)
        lowered = fn.lower(tokens, tokens, meta[0], cache, cache, meta[1], k_scale=jnp.float32(1),
                           v_scale=jnp.float32(2))
        want = 2  # one per cache
    else:
        fn = jax.jit(functools.partial(jk.kv_cache_update, page_size=16), donate_argnums=2, compiler_options=opts)
        lowered = fn.lower(tokens, meta[0], cache, meta[1], k_scale=jnp.float32(1), v_scale=jnp.float32(2))
        want = 1
    divides = _full_size_divides(lowered.compile().as_text(), int(np.prod(tokens.shape)))
    assert len(divides) == want, divides
