"""Quantize on write: 8-bit caches written from wider rows, one mode of the update.

When the cache's dtype differs from the tokens', the update writes quantized
rows: ``float8_e4m3fn``, ``float8_e5m2`` or ``int8`` caches from ``bfloat16``,
``float16`` or ``float32`` tokens, with a K scale and a V scale. The math, the
same on every path (the numpy reference is ``reference.quantize_reference``):

* ``q = x.astype(float32) / scale`` — a true float32 division (see below);
* float8: clip to the type's finite range (±448 e4m3fn, ±57344 e5m2), then
  cast, rounding to nearest even; ±inf becomes ±max; NaN (any sign or
  payload) becomes the type's canonical quiet NaN (``0x7F`` e4m3fn, ``0x7E``
  e5m2): the payload XLA leaves after a division differs between fusions
  (measured: XLA:CPU's convert gives ``0x7F`` or ``0x7E`` for e5m2 depending
  on the fusion), so NaNs are set as bits;
* int8: round half to even, clip to [-128, 127], cast; **NaN is written as 0**
  (the cast of NaN to an integer is undefined in XLA and differs between
  backends; 0 is what a dequantized NaN-free reader expects least harm from);
* K heads use ``k_scale`` and V heads ``v_scale``. In combined and packed rows
  the heads alternate k0, v0, k1, v1, ... (zero padding heads stay zero); in
  ``kv_cache_update_kv`` the K cache uses ``k_scale`` and the V cache
  ``v_scale``. (tpu-inference's ``packed_hd64`` rows hold K and V of a head in
  one row: give them one scale, ``k_scale == v_scale``.)

How it differs from tpu-inference's ``static_per_tensor_quantize_tensor``
(``layers/common/quantization``: ``clip(x / scale, min, max).astype(dtype)``
in the token dtype): it divides in bfloat16 when the tokens are bfloat16 (the
quotient rounded to bfloat16 first, then to float8: a double rounding), and its
int8 cast truncates toward zero instead of rounding. Wherever the bfloat16
quotient rounds to the same float8 value as the float32 one (it does unless
the float32 quotient lies next to a float8 rounding boundary), the float8
results are equal (tested).

Exact division is not automatic under XLA: its algebraic simplifier rewrites
``x / broadcast(s)`` as ``x * broadcast(1 / s)`` (measured on jaxlib 0.10.2's
XLA:CPU, even for a runtime ``s``: 575 of 4,000 float32 quotients off by an
ulp) and ``x / constant`` likewise. :func:`quantize` therefore divides by a
full-shape select of the two scales, taken from an ``optimization_barrier`` so
that neither folds into a broadcast or a constant.

Two variants of the same math, bit for bit (``integer_convert``):

* the default, written with XLA's own ``clip`` / ``round`` / ``convert``: what
  the Pallas kernel runs (Mosaic lowers it) and the engines' way;
* ``integer_convert=True``, what the JAX fallbacks run (XLA:CPU): the NaN mask
  is taken from the input (``x / scale`` is NaN exactly where ``x`` is, the
  scale being positive and finite), so nothing but the conversion reads the
  float32 quotient and XLA need not materialize it; and float32 → float8 is
  integer arithmetic on the quotient's bits (:func:`float32_to_float8_bits`)
  instead of XLA:CPU's ``convert``, which it emulates element by element
  (and 2.6× slower still when ``update_compiler_options`` switches float
  normalization off, as the fallbacks' jits do). Measured on jaxlib 0.10.2's
  XLA:CPU, 8,192 bfloat16 rows of 16 × 128 into float8_e4m3fn: 9 ms instead
  of 54 ms (the int8 form gains less: only the NaN mask differs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .._utils import is_traced

#: Cache dtypes a quantized write produces, with their clip range.
QUANTIZED_DTYPES = {
    np.dtype(ml_dtypes.float8_e4m3fn): (-448.0, 448.0),
    np.dtype(ml_dtypes.float8_e5m2): (-57344.0, 57344.0),
    np.dtype(np.int8): (-128.0, 127.0),
}
#: The float8 types' canonical quiet NaN (what ml_dtypes makes of ``np.nan``).
CANONICAL_NAN_BITS = {np.dtype(ml_dtypes.float8_e4m3fn): 0x7F, np.dtype(ml_dtypes.float8_e5m2): 0x7E}
TOKEN_DTYPES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32))


def _dtype(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _abstract(x) -> bool:
    """No value to read: a tracer, or a shape-and-dtype stand-in."""
    return is_traced(x) or isinstance(x, jax.ShapeDtypeStruct)


def quantizes(tokens_dtype, cache_dtype, k_scale, v_scale, *, names=("new_kv_tokens", "kv_cache_pages")) -> bool:
    """Whether an update of ``tokens_dtype`` rows into a ``cache_dtype`` cache
    quantizes, after checking the combination and the scales (``TypeError`` /
    ``ValueError`` naming the argument). Scale values are checked when concrete."""
    tok_name, cache_name = names
    tokens_dtype, cache_dtype = np.dtype(tokens_dtype), np.dtype(cache_dtype)
    scales = (("k_scale", k_scale), ("v_scale", v_scale))
    if tokens_dtype == cache_dtype:
        for name, scale in scales:
            if scale is not None and not _abstract(scale) and _value(name, scale) != 1.0:
                raise ValueError(
                    f"{name}={_value(name, scale)} is given, but {tok_name} and {cache_name} are both "
                    f"{cache_dtype}: nothing is quantized (pass None, or 1)"
                )
        return False
    if cache_dtype not in QUANTIZED_DTYPES:
        raise TypeError(
            f"{tok_name}.dtype={tokens_dtype} must equal {cache_name}.dtype={cache_dtype}, or {cache_name} "
            f"must be one of {', '.join(str(d) for d in QUANTIZED_DTYPES)} to quantize on write"
        )
    if tokens_dtype not in TOKEN_DTYPES:
        raise TypeError(
            f"{tok_name}.dtype={tokens_dtype} cannot be quantized into a {cache_dtype} {cache_name}: "
            f"quantized writes take {', '.join(str(d) for d in TOKEN_DTYPES)} rows"
        )
    for name, scale in scales:
        if scale is None:
            raise TypeError(f"{name} is None, but writing {tokens_dtype} rows into a {cache_dtype} cache needs it")
        number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if np.shape(scale) not in ((), (1,)) or not (number or jnp.issubdtype(_dtype(scale), jnp.floating)):
            raise TypeError(f"{name} must be one float, got {type(scale).__name__} of shape {np.shape(scale)}")
        if not _abstract(scale):
            value = _value(name, scale)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value} must be a positive, finite float32")
    return True


def _value(name, scale) -> float:
    try:
        return float(np.float32(np.asarray(scale).reshape(-1)[0]))
    except (TypeError, ValueError):
        raise TypeError(f"{name}={scale!r} must be one float") from None


def scale_pairs(k_scale, v_scale, pairs: str):  # -> f32[n, 2]: (even heads, odd heads) per cache
    """The scales each cache of a launch applies: ``pairs="interleaved"`` —
    one cache whose heads alternate K, V (``[[k, v]]``); ``"separate"`` — a K
    cache and a V cache (``[[k, k], [v, v]]``)."""
    k = jnp.asarray(k_scale, jnp.float32).reshape(())
    v = jnp.asarray(v_scale, jnp.float32).reshape(())
    if pairs == "interleaved":
        return jnp.stack([k, v])[None]
    return jnp.stack([jnp.stack([k, k]), jnp.stack([v, v])])


def head_parity(shape) -> jax.Array:  # bool[shape]: True on odd (V) heads
    """For rows ``[N, H, D]`` the head index is axis 1; for packed rows
    ``[N, H', pack, D']`` it is ``h' * pack + p``.

    Keep ``% 2``: with ``(head & 1) == 1`` instead, jaxlib 0.10.2's XLA:CPU
    saw that the select of the two scales is a broadcast of one value per
    head and rewrote ``x / scale`` as ``x * (1 / scale)`` (measured: the
    quantize 20% faster and no longer exact: ``test_quantize_conversion``
    and ``test_cpu_quantize_divides_every_value`` fail)."""
    if len(shape) == 3:
        head = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    else:
        head = jax.lax.broadcasted_iota(jnp.int32, shape, 1) * shape[2] + jax.lax.broadcasted_iota(jnp.int32, shape, 2)
    return head % 2 == 1


def opaque(scales):  # f32[2] -> (f32[], f32[])
    """The two scales of one cache, through an ``optimization_barrier`` so XLA
    can fold neither into a constant nor the select into a broadcast."""
    s = jax.lax.optimization_barrier(scales)
    return s[0], s[1]


def float32_to_float8_bits(
    q,  # f32[...]: the quotients, NaN already masked by the caller (any bits there are ignored)
    dtype,  # float8_e4m3fn or float8_e5m2
):  # -> u32[...]: the float8 bits of clip(q, -max, max) rounded to nearest even, in the low byte
    """Float32 → float8 with integer operations on the float32 bits (and one
    float multiply-add below the float8 normals): exact
    (what ``clip(q, -max, max).astype(dtype)`` gives, ml_dtypes' rounding),
    subnormals and ±0 included; ±inf and values beyond the range give ±max.
    NaN inputs give some finite bits: the caller overwrites them.

    With ``a = |q|``'s bits (exponent ``e``, mantissa ``m``):

    * ``|q| >= 2**(1 - bias)`` (a float8 normal): drop the ``23 - nmant`` low
      mantissa bits rounding to nearest even (add ``half - 1`` plus the kept
      lowest bit; a carry moves into the exponent), rebias the exponent, and
      saturate at the largest finite code (``0x7E`` e4m3fn, ``0x7B`` e5m2);
    * below (a float8 subnormal or 0): the code is ``|q| / 2**(1 - bias -
      nmant)`` rounded to nearest even, an integer below ``2**nmant``. The
      scaling by a power of two is exact, and adding ``2**23`` leaves that
      integer, rounded by the float unit (round to nearest even), in the low
      mantissa bits of a float32 whose exponent is 23: a multiply, an add and
      an integer subtract, instead of a shift by a per-element amount. (The
      whole quantize of 2,048 bfloat16 rows of 16 x 128 into float8, measured
      on XLA:CPU, 2 threads: 0.25 instead of 0.39 ns a value on jaxlib 0.10.2,
      0.28 instead of 0.41 on 0.7.1.) A float32 ``|q|`` below the float32
      normals (flushed to zero where XLA:CPU flushes denormals) gives 0, as it
      should; XLA:CPU fuses the multiply and add into an FMA, which gives the
      same bits, the product being exact.
    """
    info = ml_dtypes.finfo(dtype)
    nmant = int(info.nmant)  # 3 e4m3fn, 2 e5m2
    bias = 1 - int(info.minexp)  # 7 e4m3fn, 15 e5m2
    max_code = int(np.array(info.max, dtype).view(np.uint8))  # 0x7E e4m3fn, 0x7B e5m2
    drop = 23 - nmant  # float32 mantissa bits the float8 has not
    u32 = functools.partial(jnp.asarray, dtype=jnp.uint32)

    bits = jax.lax.bitcast_convert_type(q, jnp.uint32)  # u32[...]
    sign = (bits >> 24) & u32(0x80)  # u32[...]: the float8 sign bit
    a = bits & u32(0x7FFFFFFF)  # u32[...]: |q|'s bits
    # u32[...]: a >> drop rounded to nearest even, rebiased; valid where |q| >= 2**(1 - bias)
    normal = ((a + u32((1 << (drop - 1)) - 1) + ((a >> drop) & 1)) >> drop) - u32((127 - bias) << nmant)
    normal = jnp.minimum(normal, u32(max_code))
    magic = np.float32(2.0**23)  # a float32 whose mantissa's last bit weighs 1
    scaled = jax.lax.bitcast_convert_type(a, jnp.float32) * np.float32(2.0 ** (bias - 1 + nmant)) + magic  # f32[...]
    subnormal = jax.lax.bitcast_convert_type(scaled, jnp.uint32) - u32(int(np.array(magic).view(np.uint32)))
    return jnp.where(a < u32((128 - bias) << 23), subnormal, normal) | sign


def quantize(
    x,  # [N, *row] bfloat16 / float16 / float32
    even_scale,  # f32[]: the scale of heads 0, 2, 4, ... (K in interleaved rows)
    odd_scale,  # f32[]: the scale of heads 1, 3, 5, ... (V)
    dtype,  # the cache dtype: float8_e4m3fn, float8_e5m2 or int8
    *,
    integer_convert: bool = False,
):  # -> [N, *row] of dtype
    """The quantized rows (module docstring). Outside the Pallas kernel pass
    the scales through :func:`opaque`; inside it they are SMEM loads.

    ``integer_convert=False`` (the default) is the form the Pallas kernel
    lowers; ``True`` is the XLA:CPU form the fallbacks use (the NaN mask from
    ``x``, float8 by :func:`float32_to_float8_bits`). The two give the same
    bits for positive, finite scales, the only ones the API accepts (a scale
    that is traced is not checked: with a zero, infinite or NaN one they may
    differ where ``x / scale`` is NaN but ``x`` is not)."""
    dtype = np.dtype(dtype)
    q = x.astype(jnp.float32) / jnp.where(head_parity(x.shape), odd_scale, even_scale)  # f32[N, *row]
    nan = jnp.isnan(x) if integer_convert else jnp.isnan(q)  # bool[N, *row]
    low, high = QUANTIZED_DTYPES[dtype]
    if dtype == np.int8:
        return jnp.where(nan, 0.0, jnp.clip(jnp.round(q), low, high)).astype(dtype)
    canonical = CANONICAL_NAN_BITS[dtype]
    if integer_convert:
        bits = jnp.where(nan, jnp.uint32(canonical), float32_to_float8_bits(q, dtype)).astype(jnp.uint8)
        return jax.lax.bitcast_convert_type(bits, dtype)
    # NaN → the canonical quiet NaN, set as bits: XLA's f32 → float8 conversion
    # of NaN differs between its emitters (0x7F or 0x7E for e5m2).
    finite = jnp.where(nan, 0.0, jnp.clip(q, low, high)).astype(dtype)
    bits = jnp.where(nan, jnp.uint8(canonical), jax.lax.bitcast_convert_type(finite, jnp.uint8))
    return jax.lax.bitcast_convert_type(bits, dtype)


def quantize_tokens(tokens, caches, scales):  # -> tokens in the caches' dtypes
    """Each pair's token rows quantized for its cache (``scales`` f32[n, 2]),
    as the fallbacks quantize (``integer_convert=True``), or the tokens as
    they are when ``scales`` is None."""
    if scales is None:
        return tuple(tokens)
    return tuple(
        quantize(t, *opaque(scales[p]), c.dtype, integer_convert=True) for p, (t, c) in enumerate(zip(tokens, caches))
    )


def dequantize_kv(
    rows,  # [N, *row] 8-bit, heads k0, v0, k1, v1, ...
    k_scale,
    v_scale,
    dtype,
):  # -> [N, *row] of dtype
    """Quantized rows back to ``dtype``: ``rows.astype(float32) * scale``, K
    heads by ``k_scale`` and V heads by ``v_scale`` (alternating heads, as
    :func:`quantize` writes them; for a K or a V cache alone pass its scale
    twice). A reader's reference, not a fused attention read."""
    even, odd = opaque(scale_pairs(k_scale, v_scale, "interleaved")[0])
    return (rows.astype(jnp.float32) * jnp.where(head_parity(rows.shape), odd, even)).astype(dtype)
