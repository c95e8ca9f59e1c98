"""Quantize on write in torch: the eager paths' twin of ``jax_kernels``' quantize.

The same math, bit for bit (tested against ``jax_kernels.quantize_reference``):
``q = x.float() / scale`` (a float32 division; torch does not rewrite it), even
heads by the first scale and odd heads by the second; float8: clip to the
finite range, cast (round to nearest even), NaN → the canonical quiet NaN set
as bits; int8: round half to even, clip, NaN → 0. On eager tensors the rows
are quantized here, then moved into the cache by the chosen path (``torch``'s
row copy, or the JAX paths on a staging cache), so every eager impl writes
the same bits; on PyTorch/XLA the JAX code quantizes inside the graph (on TPU
inside the Pallas kernel).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from jax_kernels.kv_cache_update.quantize import CANONICAL_NAN_BITS, QUANTIZED_DTYPES

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


def quantize_rows(
    rows: torch.Tensor,  # [T, H, D] float (packed rows seen as [T, H' * pack, D'])
    even_scale: torch.Tensor,  # f32[] (or any float scalar tensor)
    odd_scale: torch.Tensor,
    dtype: torch.dtype,  # float8_e4m3fn, float8_e5m2 or int8
) -> torch.Tensor:  # [T, H, D] of dtype, a new tensor
    """The quantized rows (module docstring), computed ``CPU_CHUNK_ELEMENTS``
    at a time on CPU (whole rows per step) and in one step elsewhere."""
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
