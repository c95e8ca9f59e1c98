"""KV cache layouts: combined K/V heads, and flat ⇄ paged caches.

Combined heads. The kernel writes K and V of ``num_kv_heads`` heads as one
array of ``2 * num_kv_heads`` heads, interleaved ``k0, v0, k1, v1, ...`` (the
layout of vLLM's TPU backend: ``torch.cat([k, v], -1).reshape(-1, 2 * H, D)``):

* :func:`merge_kv` builds it from separate K and V: always a **copy**;
* :func:`split_kv` takes it apart: for torch tensors two strided **views**
  (``kv[:, 0::2]``, ``kv[:, 1::2]``) of the same storage, no copy.

Paged caches. A flat cache ``[P * page_size, H, D]`` and a paged cache
``[P, page_size, H, D]`` are the same memory: :func:`to_paged` and
:func:`to_flat` return torch **views** (``Tensor.view``; a tensor whose strides
don't allow the view raises ``ValueError`` instead of copying).

All four accept torch tensors and JAX arrays. JAX arrays are immutable values:
for them every function returns a new array (XLA decides whether memory is
shared), so "view" and "copy" describe the torch behaviour.
"""

from __future__ import annotations

import torch

from bridge._jax_import import jax
import jax.numpy as jnp  # noqa: E402  (after the guarded import above)


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
):  # -> [T, 2 * num_kv_heads, D], heads k0, v0, k1, v1, ...
    """Copy separate K and V ``[T, H, D]`` into the combined-heads layout ``[T, 2H, D]``.

    Head ``2h`` of the result is ``k[:, h]`` and head ``2h + 1`` is ``v[:, h]``.
    Always a new tensor/array (a copy). ``k`` and ``v`` must be both torch
    tensors or both JAX arrays, with equal shapes and dtypes.
    """
    _check_array("k", k)
    _check_array("v", v)
    if _is_torch(k) != _is_torch(v):
        raise TypeError(
            f"k and v must be both torch tensors or both JAX arrays, got "
            f"{type(k).__name__} and {type(v).__name__}"
        )
    if k.ndim != 3:
        raise ValueError(f"k must be [num_tokens, num_kv_heads, head_dim], got shape {tuple(k.shape)}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k.shape={tuple(k.shape)} must equal v.shape={tuple(v.shape)}")
    if k.dtype != v.dtype:
        raise TypeError(f"k.dtype={k.dtype} must equal v.dtype={v.dtype}")
    num_tokens, num_kv_heads, head_dim = k.shape
    if _is_torch(k):
        return torch.stack([k, v], dim=2).reshape(num_tokens, 2 * num_kv_heads, head_dim)
    return jnp.stack([k, v], axis=2).reshape(num_tokens, 2 * num_kv_heads, head_dim)


def split_kv(
    kv,  # [T, 2 * num_kv_heads, D], heads k0, v0, k1, v1, ...
):  # -> (k [T, num_kv_heads, D], v [T, num_kv_heads, D])
    """Split the combined-heads layout ``[T, 2H, D]`` into K and V ``[T, H, D]``.

    For torch tensors ``(kv[:, 0::2], kv[:, 1::2])``: strided views sharing
    ``kv``'s storage (no copy; writes through them change ``kv``). Not
    contiguous, so :func:`bridge.to_jax` copies them (JAX's DLPack rejects
    stepped strides). For JAX arrays, two new arrays.
    """
    _check_array("kv", kv)
    if kv.ndim != 3:
        raise ValueError(
            f"kv must be [num_tokens, 2 * num_kv_heads, head_dim], got shape {tuple(kv.shape)}"
        )
    if kv.shape[1] % 2:
        raise ValueError(
            f"kv.shape[1]={kv.shape[1]} must be even (2 * num_kv_heads, heads k0, v0, k1, v1, ...)"
        )
    return kv[:, 0::2], kv[:, 1::2]


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


def _view(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        return tensor.view(shape)
    except RuntimeError as err:
        raise ValueError(
            f"cache with shape {tuple(tensor.shape)} and strides {tuple(tensor.stride())} cannot be "
            f"viewed as {shape} without a copy; call .contiguous() on it first if a copy is "
            f"acceptable ({err})"
        ) from None
