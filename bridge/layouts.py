"""KV cache layouts (torch side of ``jax_kernels.layouts``, same names, same bits).

Rows. A cache row holds one token's K and V; ``layout`` says how
(``jax_kernels.layouts`` has the table): ``combined`` — ``2 * kvH`` heads
interleaved ``k0, v0, k1, v1, ...`` (vLLM's 2025 TPU backend:
``torch.cat([k, v], -1).reshape(-1, 2 * H, D)``); ``packed`` — the same heads
padded to the dtype's packing and 128 lanes, ``[H2 // pack, pack, D128]``
(tpu-inference's RPA v3 cache); ``packed_hd64`` — tpu-inference's head_dim-64
rows, K and V side by side in 128 lanes:

* :func:`merge_kv` builds rows from separate K and V: always a **copy**;
* :func:`split_kv` takes them apart: for torch tensors two strided **views**
  of the same storage, no copy;
* :func:`kv_cache_shape` gives the paged cache shape to allocate.

Paged caches. A flat cache ``[P * page_size, H, D]`` and a paged cache
``[P, page_size, H, D]`` are the same memory: :func:`to_paged` and
:func:`to_flat` return torch **views** (``Tensor.view``; a tensor whose strides
don't allow the view raises ``ValueError`` instead of copying).

All of them accept torch tensors and JAX arrays. JAX arrays are immutable values:
for them every function returns a new array (XLA decides whether memory is
shared), so "view" and "copy" describe the torch behaviour.
"""

from __future__ import annotations

import torch

from bridge._jax_import import jax
from jax_kernels import layouts as jk_layouts  # noqa: E402  (after the guarded import above): the shape math
from jax_kernels.kv_cache_update.quantize import dequantize_kv as jk_layouts_dequantize  # noqa: E402


def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def _check_array(name: str, x) -> None:
    if not (_is_torch(x) or isinstance(x, (jax.Array, jax.core.Tracer))):
        raise TypeError(f"{name} must be a torch.Tensor or a JAX array, got {type(x).__name__}")


def _check_page_size(page_size) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"{page_size=} must be a Python int")
    if page_size < 1:
        raise ValueError(f"{page_size=} must be positive")


def merge_kv(
    k,  # [T, num_kv_heads, D]
    v,  # [T, num_kv_heads, D]
    *,
    layout: str = "combined",
    cache_dtype=None,
):  # -> [T, *jax_kernels.layouts.row_shape(num_kv_heads, D, cache_dtype or dtype, layout=layout)]
    """Copy separate K and V ``[T, kvH, D]`` into cache rows of ``layout``.

    ``combined`` (default): ``[T, 2 * kvH, D]``, head ``2h`` is ``k[:, h]`` and
    head ``2h + 1`` is ``v[:, h]``. ``packed``: those heads padded with zero
    heads to a multiple of ``pack`` and zero lanes to 128, as ``[T, H2 // pack,
    pack, D128]`` (tpu-inference's RPA v3 rows). ``packed_hd64``: per head K
    then V in 128 lanes. Always a new tensor/array (a copy), bitwise equal to
    ``jax_kernels.merge_kv``. ``k`` and ``v`` must be both torch tensors or both
    JAX arrays, with equal shapes and dtypes. ``cache_dtype``: pack for a
    cache of that dtype (a quantized write: see ``jax_kernels.merge_kv``).
    """
    _check_array("k", k)
    _check_array("v", v)
    if _is_torch(k) != _is_torch(v):
        raise TypeError(
            f"k and v must be both torch tensors or both JAX arrays, got "
            f"{type(k).__name__} and {type(v).__name__}"
        )
    if not _is_torch(k):
        return jk_layouts.merge_kv(k, v, layout=layout, cache_dtype=cache_dtype)
    jk_layouts.check_kv(k, v)
    num_tokens, num_kv_heads, head_dim = k.shape
    heads, lanes, (pad_heads, pad_lanes), row = jk_layouts.merge_plan(
        num_kv_heads, head_dim, cache_dtype or k.dtype, layout
    )
    rows = torch.cat([k, v], dim=-1).reshape(num_tokens, heads, lanes)  # [T, heads, lanes]
    if pad_heads or pad_lanes:
        padded = rows.new_zeros((num_tokens, heads + pad_heads, lanes + pad_lanes))
        padded[:, :heads, :lanes] = rows
        rows = padded
    return rows.reshape(num_tokens, *row)


def split_kv(
    kv,  # [T, *row] in ``layout``
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    *,
    layout: str = "combined",
    cache_dtype=None,
):  # -> (k [T, num_kv_heads, D], v [T, num_kv_heads, D])
    """Split cache rows of ``layout`` into K and V ``[T, kvH, D]``, padding dropped.

    For torch tensors two strided **views** sharing ``kv``'s storage (no copy;
    writes through them change ``kv``); combined: ``(kv[:, 0::2], kv[:, 1::2])``.
    Not contiguous, so :func:`bridge.to_jax` copies them (JAX's DLPack rejects
    stepped strides). For JAX arrays, ``jax_kernels.split_kv`` (two new arrays).
    ``num_kv_heads`` and ``head_dim`` are read off combined rows when not
    given; the padded layouts need them.
    """
    _check_array("kv", kv)
    if not _is_torch(kv):
        return jk_layouts.split_kv(kv, num_kv_heads, head_dim, layout=layout, cache_dtype=cache_dtype)
    num_tokens, (row, heads, k_at, v_at) = jk_layouts.split_args(
        kv, num_kv_heads, head_dim, layout, name="kv", cache_dtype=cache_dtype
    )
    rows = _view(kv, (num_tokens, heads, row[-1]), what="kv")  # [T, heads, lanes]
    return rows[:, k_at[0], k_at[1]], rows[:, v_at[0], v_at[1]]


def kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype, *, layout: str = "combined"):
    """``jax_kernels.kv_cache_shape``, taking torch dtypes too: the paged cache
    shape ``[num_pages, page_size, *row]`` of ``layout`` (for ``packed``,
    tpu-inference's ``get_kv_cache_shape``). Allocate it with ``torch.zeros``."""
    return jk_layouts.kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim, dtype, layout=layout)


def to_paged(
    cache,  # [P * page_size, H, D]
    page_size: int,
):  # -> [P, page_size, H, D]
    """View a flat cache ``[P * page_size, H, D]`` as pages ``[P, page_size, H, D]``.

    torch: a view of the same storage (``Tensor.view``), never a copy; raises
    ``ValueError`` if ``cache``'s strides do not allow it. JAX: a reshape.
    """
    _check_array("cache", cache)
    _check_page_size(page_size)
    if cache.ndim != 3:
        raise ValueError(
            f"cache must be flat [num_pages * page_size, num_heads, head_dim], got shape "
            f"{tuple(cache.shape)}"
        )
    rows, heads, head_dim = cache.shape
    if rows % page_size:
        raise ValueError(f"{page_size=} must divide cache.shape[0]={rows}")
    shape = (rows // page_size, page_size, heads, head_dim)
    return _view(cache, shape) if _is_torch(cache) else cache.reshape(shape)


def to_flat(
    cache,  # [P, page_size, H, D]
):  # -> [P * page_size, H, D]
    """View a paged cache ``[P, page_size, H, D]`` as flat rows ``[P * page_size, H, D]``.

    torch: a view of the same storage (``Tensor.view``), never a copy; raises
    ``ValueError`` if ``cache``'s strides do not allow it (e.g. pages and rows
    transposed). JAX: a reshape.
    """
    _check_array("cache", cache)
    if cache.ndim != 4:
        raise ValueError(
            f"cache must be paged [num_pages, page_size, num_heads, head_dim], got shape "
            f"{tuple(cache.shape)}"
        )
    pages, page_size, heads, head_dim = cache.shape
    shape = (pages * page_size, heads, head_dim)
    return _view(cache, shape) if _is_torch(cache) else cache.reshape(shape)


def _view(tensor: torch.Tensor, shape: tuple[int, ...], what: str = "cache") -> torch.Tensor:
    try:
        return tensor.view(shape)
    except RuntimeError as err:
        raise ValueError(
            f"{what} with shape {tuple(tensor.shape)} and strides {tuple(tensor.stride())} cannot be "
            f"viewed as {shape} without a copy; call .contiguous() on it first if a copy is "
            f"acceptable ({err})"
        ) from None


def dequantize_kv(
    rows,  # [N, *row] 8-bit, heads k0, v0, k1, v1, ... (packed rows: h' * pack + p)
    k_scale,
    v_scale,
    dtype,
):  # -> [N, *row] of dtype
    """Quantized cache rows back to ``dtype``: ``rows.float() * scale``, K
    heads (even) by ``k_scale`` and V heads by ``v_scale`` — for torch tensors
    and JAX arrays (``jax_kernels.dequantize_kv``), bit for bit alike. For a
    K or a V cache alone pass its scale twice."""
    _check_array("rows", rows)
    if not _is_torch(rows):
        return jk_layouts_dequantize(rows, k_scale, v_scale, dtype)
    heads = rows.reshape(rows.shape[0], -1, rows.shape[-1])  # [N, H, D]: packed heads in order
    odd = (torch.arange(heads.shape[1], device=rows.device) % 2 == 1).view(1, -1, 1)
    k, v = (torch.as_tensor(s, dtype=torch.float32, device=rows.device).reshape(()) for s in (k_scale, v_scale))
    return (heads.to(torch.float32) * torch.where(odd, v, k)).to(dtype).reshape(rows.shape)
