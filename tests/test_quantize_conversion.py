"""The fallbacks' quantize (``quantize(..., integer_convert=True)``: NaN mask
from the input, float32 → float8 in integer operations) against the numpy
(ml_dtypes) reference, exhaustively: every bfloat16 and float16 bit pattern,
and float32 at every float8 rounding boundary ± 1 ulp plus a large random set
of bit patterns (NaNs, infinities, subnormals included); under ``jax.jit``,
with and without ``update_compiler_options`` (float normalization off)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_kernels as jk
from jax_kernels.kv_cache_update import quantize as Q
from jax_kernels.testing import bits

CACHE_DTYPES = (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, np.int8)
#: (k_scale, v_scale): exact (q = x), a typical pair, and one that sends most values past the range.
SCALES = ((1.0, 1.0), (0.0371, 3.0), (2.0**-20, 1e-30))


def _jitted(cache_dtype, options: bool, integer_convert: bool = True):
    opts = jk.update_compiler_options(cache_dtype) if options else {}

    def f(x, scales):  # x [N, H, D], scales f32[2] -> [N, H, D] of cache_dtype
        return Q.quantize(x, *Q.opaque(scales), np.dtype(cache_dtype), integer_convert=integer_convert)

    return jax.jit(f, compiler_options=opts or None)


def _assert_bitwise(x, cache_dtype, scales, fn):
    want = jk.quantize_reference(x, *scales, cache_dtype)
    got = np.asarray(fn(jnp.asarray(x), jnp.asarray(scales, jnp.float32)))
    assert got.dtype == want.dtype
    differ = bits(got) != bits(want)
    if differ.any():
        i = np.flatnonzero(differ.reshape(-1))[:8]
        pytest.fail(f"{differ.sum()} of {differ.size} differ; x={x.reshape(-1)[i]!r} got={bits(got).reshape(-1)[i]} "
                    f"want={bits(want).reshape(-1)[i]}")


def _rows(flat):  # [n] -> [n // 256, 2, 128]: even heads (K) and odd heads (V)
    pad = (-flat.size) % 256
    return np.concatenate([flat, np.zeros(pad, flat.dtype)]).reshape(-1, 2, 128)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference divides infinities and NaNs
@pytest.mark.parametrize("options", [False, True], ids=["plain", "update_options"])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("token_dtype", [ml_dtypes.bfloat16, np.float16], ids=lambda d: np.dtype(d).name)
def test_every_16_bit_pattern(token_dtype, cache_dtype, options):
    x = _rows(np.arange(1 << 16, dtype=np.uint16).view(token_dtype))
    for integer_convert in (True, False):
        fn = _jitted(cache_dtype, options, integer_convert)
        for scales in SCALES:
            _assert_bitwise(x, cache_dtype, scales, fn)


def float8_boundaries(dtype) -> np.ndarray:  # f32[n]
    """Every float8 value, every midpoint between neighbours (the round-to-even
    ties) and the midpoint past the largest finite value, each ± 1 float32 ulp,
    both signs; and the float32 subnormal, smallest-normal and infinity edges."""
    grid = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)
    grid = np.unique(np.abs(grid[np.isfinite(grid)]))  # 0 .. max
    top = np.float32(ml_dtypes.finfo(dtype).max)
    step = grid[-1] - grid[-2]
    mids = np.concatenate([(grid[:-1] + grid[1:]) / 2, [top + step / 2, top + step], grid])
    around = [mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))]
    edges = np.array([1e-45, 1.1754942e-38, 1.1754944e-38, 3.4028235e38, np.inf, 2.0**-30], np.float32)
    out = np.concatenate(around + [edges]).astype(np.float32)
    return np.concatenate([out, -out])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("options", [False, True], ids=["plain", "update_options"])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=lambda d: np.dtype(d).name)
def test_float32_boundaries_and_random_bit_patterns(cache_dtype, options):
    rng = np.random.default_rng(13)
    boundaries = float8_boundaries(ml_dtypes.float8_e5m2 if cache_dtype == np.int8 else cache_dtype)
    if cache_dtype == np.int8:  # int8's ties are the halves
        halves = np.arange(-140, 141, dtype=np.float32) + np.float32(0.5)
        boundaries = np.concatenate([boundaries, halves, np.nextafter(halves, np.float32(np.inf)),
                                     np.nextafter(halves, np.float32(-np.inf))])
    random_bits = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # Random magnitudes where the float8 values are (exponents near 0), where the bit patterns rarely go.
    near = (rng.standard_normal(1 << 18) * np.exp2(rng.integers(-24, 20, 1 << 18))).astype(np.float32)
    x = _rows(np.concatenate([boundaries, random_bits, near]))
    fn = _jitted(cache_dtype, options)
    _assert_bitwise(_rows(boundaries), cache_dtype, (1.0, 1.0), fn)  # q = x: the boundaries exactly
    for scales in SCALES:
        _assert_bitwise(x, cache_dtype, scales, fn)


@pytest.mark.parametrize("cache_dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2], ids=lambda d: np.dtype(d).name)
def test_float32_to_float8_bits_is_ml_dtypes_clip_and_cast(cache_dtype):
    """The conversion alone on finite values, infinities included (NaN is the caller's)."""
    q = float8_boundaries(cache_dtype)
    top = np.float32(ml_dtypes.finfo(cache_dtype).max)
    got = np.asarray(jax.jit(lambda q: Q.float32_to_float8_bits(q, cache_dtype))(q))
    assert got.dtype == np.uint32 and (got >> 8 == 0).all()
    want = np.clip(q, -top, top).astype(cache_dtype).view(np.uint8)
    np.testing.assert_array_equal(got.astype(np.uint8), want)


def test_nan_of_any_sign_and_payload_is_canonical():
    x = np.array([np.nan, -np.nan, 1.0], np.float32)
    payloads = np.array([0x7FC00001, 0xFFC00000, 0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32)
    x = _rows(np.concatenate([x, payloads]))
    for dtype in CACHE_DTYPES:
        out = bits(np.asarray(_jitted(dtype, True)(jnp.asarray(x), jnp.asarray([0.5, 3.0], jnp.float32))))
        nan_bits = Q.CANONICAL_NAN_BITS.get(np.dtype(dtype), 0)
        assert (out.reshape(-1)[[0, 1, 3, 4, 5, 6]] == nan_bits).all(), np.dtype(dtype).name
