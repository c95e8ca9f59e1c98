"""Quantize on write in torch: the eager paths' quantize, the math of ``jax_kernels``' quantize.

The math, bit for bit (tested against ``jax_kernels.quantize_reference``):
``q = x.float() / scale`` (a float32 division), even heads by the first scale
and odd heads by the second; float8: clip to the finite range, cast (round to
nearest even), NaN → the canonical quiet NaN set as bits; int8: round half to
even, clip, NaN → 0. On eager tensors the rows are quantized here, then moved
into the cache by the chosen path (``torch``'s row copy, or the JAX paths on a
staging cache), so every eager impl writes the same bits; on PyTorch/XLA the
JAX code quantizes inside the graph (on TPU inside the Pallas kernel).

Two implementations of that math, chosen by size (:func:`quantize_rows`):

* on CPU, runs of whole rows of at least :data:`HOST_PIECE_MIN_ELEMENTS`
  values go to ``jax_kernels``' own quantize (the form the JAX fallbacks run,
  ``quantize(..., integer_convert=True)``) in a jit of its own: one XLA
  fusion, the rows read through numpy views, 2x (512 rows of 16 x 128) to
  3.5x (8,192 rows) faster than torch's ops, which convert float32 to float8
  element by element (measured: :data:`HOST_PIECE_MIN_ELEMENTS`). The runs are
  powers of two rows (at most :data:`HOST_PIECE_MAX_ELEMENTS` values), so a
  row shape compiles a handful of shapes whatever the token counts;
* everything else — the rows left over, and every other device — by torch
  ops (:func:`_quantize_torch`).
"""

from __future__ import annotations

import functools
import math

import bridge  # first: PyTorch/XLA's JAX import guard  # isort: skip
import jax
import ml_dtypes
import numpy as np
import torch

from jax_kernels.kv_cache_update.compiler_options import update_compiler_options
from jax_kernels.kv_cache_update.quantize import CANONICAL_NAN_BITS, QUANTIZED_DTYPES, opaque, quantize

from bridge.dtypes import torch_to_jax_dtype


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(torch_to_jax_dtype(dtype))


#: Elements quantized per step on CPU: the float32 temporary (512 KiB) stays in
#: L2, so the division, clip and cast pass over cached data instead of whole
#: tensors in memory, and the NaN rules' masks are built only where a NaN is
#: (measured on one thread, 2,048 bfloat16 token rows of 16 x 128: 7 ms instead
#: of 49 ms for float8_e4m3fn, 8.5 ms instead of 69 ms for int8).
CPU_CHUNK_ELEMENTS = 1 << 17


@functools.lru_cache(maxsize=64)
def _odd_heads(heads: int, device: torch.device) -> torch.Tensor:  # bool[1, H, 1]: True on odd (V) heads
    return (torch.arange(heads, device=device) % 2 == 1).view(1, heads, 1)


#: On CPU, runs of rows with at least this many values are quantized by the JAX
#: code (module docstring); shorter runs by torch ops. Measured on 2 threads,
#: bfloat16 rows of 16 x 128 into float8_e4m3fn / int8, the two sampled in
#: turns (median µs, JAX / torch ops): 131,072 values 382 / 346 and 390 / 336;
#: 262,144 values 445 / 455 and 389 / 460; 1,048,576 values 799 / 1,568 and
#: 862 / 1,305. Below about 2**18 values a jit call's fixed cost (~60 µs alone),
#: and XLA's thread pool meeting torch's, outweigh the faster conversion. Taken
#: again with the faster float8 conversion of 49855e4, the whole op on a decode
#: step (64 rows, 131,072 values, into float8_e4m3fn) with this limit against
#: 2**17 (the step's rows by JAX): 545 / 646, 640 / 723 and 434 / 434 µs.
HOST_PIECE_MIN_ELEMENTS = 1 << 18
#: The largest run one jit call quantizes (16 MiB of bfloat16 rows).
HOST_PIECE_MAX_ELEMENTS = 1 << 23


def quantize_rows(
    rows: torch.Tensor,  # [T, H, D] float (packed rows seen as [T, H' * pack, D'])
    even_scale: torch.Tensor,  # f32[] (or any float scalar tensor)
    odd_scale: torch.Tensor,
    dtype: torch.dtype,  # float8_e4m3fn, float8_e5m2 or int8
) -> torch.Tensor:  # [T, H, D] of dtype, a new tensor
    """The quantized rows (module docstring), as one new tensor (its memory
    may be an XLA buffer that nothing else holds)."""
    pieces = list(quantized_pieces(rows, even_scale, odd_scale, dtype))
    if len(pieces) == 1:
        return pieces[0][1]
    out = torch.empty(rows.shape, dtype=dtype, device=rows.device)  # [T, H, D]
    bits = out.view(torch.uint8)  # the runs' bytes moved as bytes (torch's float8 copy converts each value)
    for start, piece in pieces:
        bits[start : start + piece.shape[0]].copy_(piece.view(torch.uint8))
    return out


def quantized_pieces(
    rows: torch.Tensor,  # [T, H, D] float
    even_scale: torch.Tensor,
    odd_scale: torch.Tensor,
    dtype: torch.dtype,
):  # -> yields (start, [n, H, D] of dtype): rows[start : start + n] quantized, in order, covering every row
    """:func:`quantize_rows` in runs of rows, in order: the eager row copy
    moves each run into place, so no tensor of all the quantized rows is
    assembled. Each run is a new tensor."""
    num_rows = rows.shape[0]
    row_elems = max(1, math.prod(rows.shape[1:]))
    jax_rows = (
        rows.device.type == "cpu" and rows.dtype in _HOST_TOKEN_DTYPES
        and num_rows * row_elems >= HOST_PIECE_MIN_ELEMENTS
    )
    start = 0
    if jax_rows:
        min_rows = max(1, -(-HOST_PIECE_MIN_ELEMENTS // row_elems))
        max_rows = 1 << max(0, (HOST_PIECE_MAX_ELEMENTS // row_elems).bit_length() - 1)
        scales = np.array([_value(even_scale), _value(odd_scale)], np.float32)  # f32[2]
        while num_rows - start >= min_rows:
            n = min(max_rows, 1 << ((num_rows - start).bit_length() - 1))  # a power of two
            yield start, _quantize_jax(rows[start : start + n], scales, dtype)
            start += n
    if start < num_rows:
        yield start, _quantize_torch(rows[start:], even_scale, odd_scale, dtype)


def _value(scale: torch.Tensor) -> np.float32:  # a CPU scalar tensor's float32 value
    return np.float32(scale.item() if scale.dtype == torch.float32 else scale.to(torch.float32).item())


#: Token dtypes the JAX quantize reads through numpy views (bfloat16 as ml_dtypes').
_HOST_TOKEN_DTYPES = frozenset({torch.bfloat16, torch.float16, torch.float32})


@functools.lru_cache(maxsize=None)
def _jitted_quantize(cache_dtype: np.dtype):
    """``jax_kernels``' quantize of rows into ``cache_dtype``'s bits (uint8 for
    float8: jax 0.7.1's DLPack carries no float8), jitted with the compiler
    options the JAX fallbacks' update uses (``update_compiler_options``)."""
    out_bits = np.int8 if cache_dtype == np.int8 else np.uint8

    def run(x, scales):  # [n, H, D] tokens, f32[2] -> [n, H, D] of out_bits
        q = quantize(x, *opaque(scales), cache_dtype, integer_convert=True)
        return jax.lax.bitcast_convert_type(q, out_bits)

    return jax.jit(run, compiler_options=update_compiler_options(cache_dtype) or None)


def _quantize_jax(rows: torch.Tensor, scales: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """One run of CPU rows by the JAX code: the rows go in as a numpy view
    (jit's own transfer: measured ~70 µs less per call than a DLPack import;
    zero-copy for rows aligned to 64 bytes, as torch allocates them, while
    rows numpy allocated are copied first: 2,048 rows of 16 x 128 took 3.3 ms
    at a 16-byte offset against 1.9 ms aligned), and the bits come back by
    DLPack (8-bit integers: zero-copy in every jax)."""
    t = rows.detach()
    x = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    with jax.default_device(_host_device()):  # on the host even where JAX's default device is a TPU
        bits = _jitted_quantize(_np_dtype(dtype))(x, scales)
    return torch.from_dlpack(bits).view(dtype)


@functools.lru_cache(maxsize=None)
def _host_device():
    return jax.devices("cpu")[0]


def _quantize_torch(
    rows: torch.Tensor,  # [T, H, D] float
    even_scale: torch.Tensor,
    odd_scale: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:  # [T, H, D] of dtype, a new tensor
    """The quantized rows by torch ops, computed ``CPU_CHUNK_ELEMENTS`` at a
    time on CPU (whole rows per step) and in one step elsewhere."""
    num_rows, heads = rows.shape[0], rows.shape[1]
    scale = torch.where(_odd_heads(heads, rows.device), odd_scale.reshape(()), even_scale.reshape(()))  # [1, H, 1]
    scale = scale if scale.dtype == torch.float32 else scale.to(torch.float32)
    low, high = QUANTIZED_DTYPES[_np_dtype(dtype)]
    out = torch.empty(rows.shape, dtype=dtype, device=rows.device)  # [T, H, D]
    on_cpu = rows.device.type == "cpu"
    step = max(1, CPU_CHUNK_ELEMENTS // max(1, math.prod(rows.shape[1:]))) if on_cpu else max(1, num_rows)
    buf = torch.empty((min(step, num_rows), *rows.shape[1:]), dtype=torch.float32, device=rows.device)
    for start in range(0, num_rows, step):
        q = buf[: min(step, num_rows - start)].copy_(rows[start : start + step]).div_(scale)  # f32: true division
        if dtype == torch.int8:
            q.round_()  # half to even
        q.clamp_(low, high)
        # Clipped, q holds no inf, so its sum is NaN exactly when some q is: the
        # NaN rules below run only then on CPU, where reading the sum costs no sync.
        has_nan = not on_cpu or bool(torch.isnan(q.sum()))
        chunk = out[start : start + step]
        if dtype == torch.int8:
            chunk.copy_(q.nan_to_num_(0.0) if has_nan else q)  # NaN → 0
            continue
        chunk.copy_(q)  # round to nearest even; a NaN becomes some NaN code, set canonical next
        if has_nan:
            chunk.view(torch.uint8).masked_fill_(q.isnan(), CANONICAL_NAN_BITS[_np_dtype(dtype)])
    return out


def scale_pairs(num_pairs: int, k_scale: torch.Tensor, v_scale: torch.Tensor):
    """Each cache's (even heads, odd heads) scales: one cache of interleaved
    heads takes ``(k, v)``; a K and a V cache ``(k, k)`` and ``(v, v)``."""
    if num_pairs == 1:
        return [(k_scale, v_scale)]
    return [(k_scale, k_scale), (v_scale, v_scale)]


def scales_tensor(num_pairs: int, k_scale: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:  # f32[n, 2]
    """:func:`scale_pairs` as one float32 tensor, the JAX code's ``scales`` input."""
    return torch.stack(
        [torch.stack([a.reshape(()), b.reshape(())]) for a, b in scale_pairs(num_pairs, k_scale, v_scale)]
    ).to(torch.float32)
