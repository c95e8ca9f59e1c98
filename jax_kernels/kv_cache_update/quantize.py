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
"""

from __future__ import annotations

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
    ``[N, H', pack, D']`` it is ``h' * pack + p``."""
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


def quantize(
    x,  # [N, *row] bfloat16 / float16 / float32
    even_scale,  # f32[]: the scale of heads 0, 2, 4, ... (K in interleaved rows)
    odd_scale,  # f32[]: the scale of heads 1, 3, 5, ... (V)
    dtype,  # the cache dtype: float8_e4m3fn, float8_e5m2 or int8
):  # -> [N, *row] of dtype
    """The quantized rows (module docstring). Outside the Pallas kernel pass
    the scales through :func:`opaque`; inside it they are SMEM loads."""
    q = x.astype(jnp.float32) / jnp.where(head_parity(x.shape), odd_scale, even_scale)
    low, high = QUANTIZED_DTYPES[np.dtype(dtype)]
    if np.dtype(dtype) == np.int8:
        q = jnp.where(jnp.isnan(q), 0.0, jnp.clip(jnp.round(q), low, high))
        return q.astype(dtype)
    # NaN → the canonical quiet NaN, set as bits: XLA's f32 → float8 conversion
    # of NaN differs between its emitters (0x7F or 0x7E for e5m2).
    nan = jnp.isnan(q)
    finite = jnp.where(nan, 0.0, jnp.clip(q, low, high)).astype(dtype)
    bits = jnp.where(nan, jnp.uint8(CANONICAL_NAN_BITS[np.dtype(dtype)]), jax.lax.bitcast_convert_type(finite, jnp.uint8))
    return jax.lax.bitcast_convert_type(bits, dtype)


def quantize_tokens(tokens, caches, scales):  # -> tokens in the caches' dtypes
    """Each pair's token rows quantized for its cache (``scales`` f32[n, 2]),
    or the tokens as they are when ``scales`` is None."""
    if scales is None:
        return tuple(tokens)
    return tuple(quantize(t, *opaque(scales[p]), c.dtype) for p, (t, c) in enumerate(zip(tokens, caches)))


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
