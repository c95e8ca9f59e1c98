"""Validation for the torch op: devices, impl, layout, then jax_kernels' checks.

Everything here runs before any data moves, so a rejected call leaves the
cache bitwise unchanged.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import numpy as np
import torch

import jax_kernels as jk
from jax_kernels.kv_cache_update import validation as jk_validation
from bridge.dtypes import torch_to_jax_dtype

from ._impls import check_impl

_MODES = ("host", "always", "never")
_state = threading.local()


def validation_mode() -> str:
    """``"host"`` (default): check the slice data whenever the op reads it on
    the host anyway — eager CPU and CUDA tensors (the eager paths need it
    there) and ``pallas_interpret`` — never adding a device→host sync;
    ``"always"``: also fetch PyTorch/XLA metadata to check it (a sync per call;
    for development); ``"never"``: skip the data checks."""
    return getattr(_state, "mode", "host")


@contextlib.contextmanager
def validation(mode: str):
    """Context manager setting :func:`validation_mode` for this thread."""
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} is not one of {_MODES}")
    old = validation_mode()
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = old


def flat_cache(kv_cache: torch.Tensor, page_size: int) -> torch.Tensor:
    """``kv_cache`` as a flat ``[P * page_size, H, D]`` view (never a copy)."""
    if kv_cache.dim() == 3:
        return kv_cache
    if kv_cache.dim() != 4:
        raise ValueError(
            f"kv_cache must be flat [num_pages * page_size, H, D] or paged "
            f"[num_pages, page_size, H, D], got shape {tuple(kv_cache.shape)}"
        )
    if kv_cache.shape[1] != page_size:
        raise ValueError(f"paged kv_cache.shape[1]={kv_cache.shape[1]} must equal {page_size=}")
    try:
        return kv_cache.view(-1, *kv_cache.shape[2:])
    except RuntimeError as e:
        raise ValueError(
            f"paged kv_cache with strides {kv_cache.stride()} cannot be viewed as a flat cache "
            f"(pages and rows within a page must be evenly strided): {e}"
        ) from None


def _proxy(t: torch.Tensor, name: str) -> jax.ShapeDtypeStruct:
    try:
        dtype = torch_to_jax_dtype(t.dtype)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None
    return jax.ShapeDtypeStruct(tuple(t.shape), dtype)


_STATIC_OK: dict = {}  # signatures that passed validate_static (it depends on nothing else)


def _signature(tensors, page_size, slices_per_processing_page, impl):
    return (
        tuple((t.shape, t.dtype, t.device) for t in tensors),
        tensors[2].stride(),
        page_size,
        slices_per_processing_page,
        impl,
    )


def validate_static(
    new_kv_tokens, slice_indices, kv_cache, total_update_slices, *, page_size, slices_per_processing_page, impl
) -> torch.Tensor:
    """Checks that need no data. Returns the flat cache view.

    The outcome depends only on shapes, dtypes, devices, the cache's strides
    and the static arguments, so a signature that passed once is remembered.
    """
    named = (
        ("new_kv_tokens", new_kv_tokens),
        ("slice_indices", slice_indices),
        ("kv_cache", kv_cache),
        ("total_update_slices", total_update_slices),
    )
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    tensors = (new_kv_tokens, slice_indices, kv_cache, total_update_slices)
    try:
        key = _signature(tensors, page_size, slices_per_processing_page, impl)
        hash(key)
    except TypeError:  # symbolic shapes (fake tensors under torch.compile): not cached
        key = None
    if key in _STATIC_OK:
        return kv_cache if kv_cache.dim() == 3 else kv_cache.view(-1, *kv_cache.shape[2:])
    check_impl(impl)
    devices = {name: t.device for name, t in named}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"{page_size=} must be positive")
    flat = flat_cache(kv_cache, page_size)
    jk.static_validate_inputs(
        _proxy(new_kv_tokens, "new_kv_tokens"),
        _proxy(slice_indices, "slice_indices"),
        _proxy(flat, "kv_cache"),
        _proxy(total_update_slices, "total_update_slices"),
        page_size=page_size,
        slices_per_processing_page=slices_per_processing_page,
        for_tpu_kernel=impl in ("pallas", "pallas_interpret"),
    )
    if key is not None:
        if len(_STATIC_OK) > 4096:  # bounded: shapes are normally bucketed
            _STATIC_OK.clear()
        _STATIC_OK[key] = True
    return flat


def host_columns(slice_indices: torch.Tensor, total_update_slices: torch.Tensor) -> np.ndarray:
    """The valid slice columns ``slice_indices[:, :total]`` as numpy
    ``i64[3, total]`` (a device→host copy off CPU), ``total`` range-checked."""
    # Both are integer tensors (checked by validate_static), which never require grad.
    idx = slice_indices if slice_indices.device.type == "cpu" else slice_indices.cpu()
    return jk_validation.slice_columns(idx.numpy(), total_update_slices.item())


def validate_data(new_kv_tokens, cols: np.ndarray, flat: torch.Tensor, *, page_size: int) -> None:
    """The slice data checks of ``jax_kernels.dynamic_validate_inputs`` on the
    columns from :func:`host_columns`."""
    jk_validation.check_slice_columns(
        cols, num_tokens=new_kv_tokens.shape[0], num_rows=flat.shape[0], page_size=page_size
    )
