"""Validation for the torch op: devices, impl, layout, then jax_kernels' checks.

Everything here runs before any data moves, so a rejected call leaves the
cache bitwise unchanged.
"""

from __future__ import annotations

import contextlib
import math
import threading

import jax
import numpy as np
import torch

from jax_kernels.kv_cache_update import validation as jk_validation
from jax_kernels.kv_cache_update.prepare import static_validate_pairs
from jax_kernels.kv_cache_update.quantize import quantizes
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


#: The torch ops' argument names, for errors: ``kv_cache_update``'s, and
#: ``kv_cache_update_kv``'s two (tokens, cache) pairs.
NAMES = ("new_kv_tokens", "slice_indices", "kv_cache", "total_update_slices")
KV_NAMES = tuple(
    (tok, "slice_indices", cache, "total_update_slices") for tok, cache in (("key", "k_cache"), ("value", "v_cache"))
)


def flat_cache(kv_cache: torch.Tensor, new_kv_tokens: torch.Tensor, name: str = "kv_cache") -> torch.Tensor:
    """``kv_cache``'s rows as a 3-D view ``[R, H, D]`` (never a copy): flat and
    paged caches of ``[H, D]`` rows, and packed ``[H', pack, D']`` rows seen
    as ``[H' * pack, D']`` (the same bytes). Shapes must already be valid."""
    if kv_cache.dim() == 3:
        return kv_cache
    rows = new_kv_tokens.shape[1:]
    try:
        return kv_cache.view(-1, math.prod(rows[:-1]), rows[-1])  # math.prod: ~5 µs less than np.prod
    except RuntimeError as e:
        raise ValueError(
            f"{name} with shape {tuple(kv_cache.shape)} and strides {kv_cache.stride()} cannot be viewed as "
            f"flat rows [num_pages * page_size, *{tuple(rows)}] (pages and rows must be evenly strided, "
            f"each row contiguous): {e}"
        ) from None


def flat_tokens(new_kv_tokens: torch.Tensor) -> torch.Tensor:
    """Packed token rows ``[T, H', pack, D']`` as ``[T, H' * pack, D']`` (a view
    when contiguous, else a copy of the tokens: O(update)); 3-D tokens as is."""
    if new_kv_tokens.dim() == 3:
        return new_kv_tokens
    return new_kv_tokens.reshape(new_kv_tokens.shape[0], -1, new_kv_tokens.shape[-1])


def _proxy(t: torch.Tensor, name: str) -> jax.ShapeDtypeStruct:
    try:
        dtype = torch_to_jax_dtype(t.dtype)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None
    return jax.ShapeDtypeStruct(tuple(t.shape), dtype)


_STATIC_OK: dict = {}  # signatures that passed validate_static (it depends on nothing else)


def _signature(tensors, caches, page_size, slices_per_processing_page, impl):
    # An absent scale is None in the key: its presence is part of the signature.
    return (
        tuple(None if t is None else (t.shape, t.dtype, t.device) for t in tensors),
        tuple(c.stride() for c in caches),  # the rows view depends on them
        page_size,
        slices_per_processing_page,
        impl,
    )


def validate_static(
    new_kv_tokens, slice_indices, kv_cache, total_update_slices, *, page_size, slices_per_processing_page, impl
) -> torch.Tensor:
    """Checks that need no data, for ``kv_cache_update``. Returns the 3-D rows
    view of the cache (:func:`flat_cache`)."""
    return validate_static_pairs(
        (new_kv_tokens,), slice_indices, (kv_cache,), total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, impl=impl, names=(NAMES,),
    )[0]


def validate_static_pairs(
    tokens, slice_indices, caches, total_update_slices, *, page_size, slices_per_processing_page, impl, names,
    k_scale=None, v_scale=None,
) -> list[torch.Tensor]:
    """Checks that need no data, for (tokens, cache) pairs sharing the slices
    (``names``: each pair's argument names). Returns each cache's 3-D rows view.

    The outcome depends only on shapes, dtypes, devices, strides and the
    static arguments, so a signature that passed once is remembered.
    """
    # The hot path (a signature seen before): one tuple of the tensors, one dict lookup.
    try:
        if len(caches) == 1 and k_scale is None and v_scale is None:  # the common call, keyed inline (~2 µs less)
            t, c, i, n = tokens[0], caches[0], slice_indices, total_update_slices
            key = (
                t.shape, t.dtype, t.device, i.shape, i.dtype, i.device, c.shape, c.dtype, c.device, c.stride(),
                n.shape, n.dtype, n.device, page_size, slices_per_processing_page, impl,
            )
        else:
            tensors = (*tokens, slice_indices, *caches, total_update_slices, k_scale, v_scale)
            key = _signature(tensors, caches, page_size, slices_per_processing_page, impl)
        hash(key)
    except (TypeError, AttributeError):  # not tensors, or symbolic shapes (fake tensors under torch.compile)
        key = None
    if key is None or key not in _STATIC_OK:
        named = [(n[0], t) for t, n in zip(tokens, names)] + [(names[0][1], slice_indices)]
        named += [(n[2], c) for c, n in zip(caches, names)] + [(names[0][3], total_update_slices)]
        named += [(name, t) for name, t in (("k_scale", k_scale), ("v_scale", v_scale)) if t is not None]
        for name, t in named:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _validate_static_uncached(
            named, tokens, slice_indices, caches, total_update_slices, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, impl=impl, names=names,
            k_scale=k_scale, v_scale=v_scale,
        )
        if key is not None:
            if len(_STATIC_OK) > 4096:  # bounded: shapes are normally bucketed
                _STATIC_OK.clear()
            _STATIC_OK[key] = True
    if len(caches) == 1:
        return [flat_cache(caches[0], tokens[0], names[0][2])]
    return [flat_cache(c, t, n[2]) for t, c, n in zip(tokens, caches, names)]


def _validate_static_uncached(
    named, tokens, slice_indices, caches, total_update_slices, *, page_size, slices_per_processing_page, impl, names,
    k_scale=None, v_scale=None,
) -> None:
    check_impl(impl)
    devices = {name: t.device for name, t in named}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"{page_size=} must be positive")
    static_validate_pairs(
        [_proxy(t, n[0]) for t, n in zip(tokens, names)],
        _proxy(slice_indices, names[0][1]),
        [_proxy(c, n[2]) for c, n in zip(caches, names)],
        _proxy(total_update_slices, names[0][3]),
        page_size=page_size,
        slices_per_processing_page=slices_per_processing_page,
        for_tpu_kernel=impl in ("pallas", "pallas_interpret"),
        names=names,
        k_scale=None if k_scale is None else _proxy(k_scale, "k_scale"),
        v_scale=None if v_scale is None else _proxy(v_scale, "v_scale"),
    )


def validate_scales(tokens_dtype, cache_dtype, k_scale, v_scale, names=NAMES) -> None:
    """The scales' values (a device→host read off CPU), by ``jax_kernels``'
    own check: positive and finite for a quantized write, None or 1 otherwise."""
    if k_scale is None and v_scale is None:
        return  # the static check has seen the dtypes: nothing of value to read
    values = tuple(None if t is None else float(t.item()) for t in (k_scale, v_scale))  # float32 → float: exact
    key = (tokens_dtype, cache_dtype, *values, names)
    if key in _SCALES_OK:  # the outcome depends on nothing else (NaN never matches: checked, and refused, every time)
        return
    quantizes(
        torch_to_jax_dtype(tokens_dtype), torch_to_jax_dtype(cache_dtype), *values, names=(names[0], names[2])
    )
    if len(_SCALES_OK) > 4096:
        _SCALES_OK.clear()
    _SCALES_OK[key] = True


_SCALES_OK: dict = {}  # (tokens dtype, cache dtype, k_scale, v_scale, names) that passed


def host_columns(slice_indices: torch.Tensor, total_update_slices: torch.Tensor, names=NAMES) -> np.ndarray:
    """The valid slice columns ``slice_indices[:, :total]`` as numpy
    ``i64[3, total]`` (a device→host copy off CPU), ``total`` range-checked."""
    # Both are integer tensors (checked by validate_static), which never require grad.
    idx = slice_indices if slice_indices.is_cpu else slice_indices.cpu()
    return jk_validation.slice_columns(idx.numpy(), total_update_slices.item(), names=names)


#: The last valid metadata seen for each (slice_indices shape and dtype, T, R,
#: page_size): ``(valid columns' bytes, total, cols, the lengths' range)``.
_LAST_VALID: dict = {}


def checked_columns(
    slice_indices: torch.Tensor, total_update_slices: torch.Tensor, new_kv_tokens, flat: torch.Tensor, *,
    page_size: int, names=NAMES,
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`host_columns`, then :func:`validate_data`: ``(cols i64[3,
    total], the lengths' (min, max))`` of valid metadata, else the error.

    The eager paths call this on every update, and a model calls the op once
    per layer with the same ``slice_indices``. So the last valid metadata of
    each shape is remembered *by value*: when the valid columns hold the same
    bytes (and the total, the tokens' and the cache's row counts and the page
    size are the same), the checks' outcome is the same, and it is reused —
    a byte comparison (~2 µs for a decode step) instead of the checks and the
    int64 copy (~10 µs). A changed value, however it was written (torch ops,
    numpy views), is a different key: never a stale result."""
    idx = (slice_indices if slice_indices.is_cpu else slice_indices.cpu()).numpy()  # int[3, S]
    total = total_update_slices.item()
    key = (idx.shape, idx.dtype, new_kv_tokens.shape[0], flat.shape[0], page_size)
    data = idx[:, :total].tobytes() if type(total) is int and 0 <= total <= idx.shape[1] else None
    last = _LAST_VALID.get(key)
    if data is not None and last is not None and last[1] == total and last[0] == data:
        return last[2], last[3]
    cols = jk_validation.slice_columns(idx, total, names=names)
    length_range = validate_data(new_kv_tokens, cols, flat, page_size=page_size, names=names)
    if len(_LAST_VALID) > 4096:  # bounded: shapes are normally bucketed
        _LAST_VALID.clear()
    _LAST_VALID[key] = (data, total, cols, length_range)
    return cols, length_range


def validate_data(
    new_kv_tokens, cols: np.ndarray, flat: torch.Tensor, *, page_size: int, names=NAMES
) -> tuple[int, int]:
    """The slice data checks of ``jax_kernels.dynamic_validate_inputs`` on the
    columns from :func:`host_columns` (``flat``: the cache's rows view).
    Returns the lengths' (min, max), for :class:`torch_ops._eager.RowPlan`."""
    return jk_validation.check_slice_columns(
        cols, num_tokens=new_kv_tokens.shape[0], num_rows=flat.shape[0], page_size=page_size, names=names
    )
