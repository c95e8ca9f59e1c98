"""The ops in namespace ``paged_kv``: schemas, fake kernels, device kernels.

* ``paged_kv::kv_cache_update`` mutates ``kv_cache`` and returns nothing.
* ``paged_kv::kv_cache_update_functional`` returns a new cache.

Kernels: CPU and CUDA (eager), XLA, one at the ``Autograd`` key (the update is
not differentiable: it raises if an input requires grad; for CPU and CUDA the
eager kernels raise themselves and ``AutogradCPU``/``AutogradCUDA`` fall
through, sparing a Python dispatch hop per call), and one at the
``Functionalize`` key: under functionalization (PyTorch/XLA's default mode,
torch.compile) the mutating op runs as the functional op followed by
``kv_cache.copy_``, which XLA turns into an in-place update when the graph is
synced.

The ops are defined with ``torch.library.Library`` rather than
``torch.library.custom_op``: custom_op's Python dispatch layers cost about
30 µs per call (measured here), more than the whole decode-step update.
"""

from __future__ import annotations

import torch

from . import _eager, _validation, _xla

_SIGNATURE = (
    "(Tensor new_kv_tokens, Tensor slice_indices, Tensor{mut} kv_cache, Tensor total_update_slices, "
    "int page_size=32, int slices_per_processing_page=8, str impl='auto')"
)

_lib = torch.library.Library("paged_kv", "DEF")
_lib.define("kv_cache_update" + _SIGNATURE.format(mut="(a!)") + " -> ()")
_lib.define("kv_cache_update_functional" + _SIGNATURE.format(mut="") + " -> Tensor")


def _prepare(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl):
    """All checks that can run here, before any data moves. Returns
    ``(flat cache view, host columns i64[3, total] or None)``."""
    flat = _validation.validate_static(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices,
        page_size=page_size, slices_per_processing_page=slices_per_processing_page, impl=impl,
    )
    mode = _validation.validation_mode()
    cols = None
    # Eager paths (CPU, CUDA) and pallas_interpret read the metadata on the
    # host anyway (on CUDA: a sync), so it is checked there by default; on XLA
    # only under validation("always").
    if slice_indices.device.type != "xla" or impl == "pallas_interpret" or mode == "always":
        cols = _validation.host_columns(slice_indices, total_update_slices)
        if mode != "never":
            _validation.validate_data(new_kv_tokens, cols, flat, page_size=page_size)
    return flat, cols


def _update_eager_(new_kv_tokens, flat, cols, num_slices, page_size, slices_per_processing_page, impl):
    if impl == "pallas":
        raise ValueError(
            f"impl='pallas' needs PyTorch/XLA tensors on a TPU, got {flat.device} tensors; "
            f"use impl='pallas_interpret' to run the kernel's code elsewhere"
        )
    if impl in ("auto", "torch"):
        _eager.update_rows_(new_kv_tokens, cols, flat)
    else:
        _eager.update_staged_(
            new_kv_tokens, cols, num_slices, flat, impl=impl, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page,
        )


def _refuse_grad(op_name, new_kv_tokens, kv_cache):
    if torch.is_grad_enabled() and (new_kv_tokens.requires_grad or kv_cache.requires_grad):
        raise RuntimeError(f"paged_kv::{op_name} is not differentiable; detach its inputs or use torch.no_grad()")


# ------------------------------------------------------------------- eager


def _update_eager(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=32, slices_per_processing_page=8, impl="auto"):
    _refuse_grad("kv_cache_update", new_kv_tokens, kv_cache)  # AutogradCPU/CUDA fall through to here
    flat, cols = _prepare(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl)
    _update_eager_(new_kv_tokens, flat, cols, slice_indices.shape[1], page_size, slices_per_processing_page, impl)
    torch.autograd.graph.increment_version(kv_cache)  # views and autograd see the mutation


def _functional_eager(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=32, slices_per_processing_page=8, impl="auto"):
    """A copy of the cache, updated (O(cache) by nature)."""
    _refuse_grad("kv_cache_update_functional", new_kv_tokens, kv_cache)
    flat, cols = _prepare(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl)
    num_slices = slice_indices.shape[1]
    if impl == "pallas":  # fail before the O(cache) clone
        _update_eager_(new_kv_tokens, flat, cols, num_slices, page_size, slices_per_processing_page, impl)
    out = kv_cache.clone()
    flat_out = _validation.flat_cache(out, page_size)
    _update_eager_(new_kv_tokens, flat_out, cols, num_slices, page_size, slices_per_processing_page, impl)
    return out


for _key in ("CPU", "CUDA"):
    _lib.impl("kv_cache_update", _update_eager, _key)
    _lib.impl("kv_cache_update_functional", _functional_eager, _key)


# --------------------------------------------------------------------- XLA


def _functional_xla(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=32, slices_per_processing_page=8, impl="auto"):
    _, cols = _prepare(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl)
    return _xla.functional_update(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices, impl=impl, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, host_cols=cols,
    )


def _update_by_copy(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=32, slices_per_processing_page=8, impl="auto"):
    # XLA with XLA_DISABLE_FUNCTIONALIZATION=1, and every device under
    # functionalization: the functional op, then copy_ into the cache. The
    # intermediate dies here, so on XLA the synced graph aliases the cache.
    # This kernel runs below the Autograd key, and requires_grad has been
    # checked above it (the Autograd kernel on XLA; the fake kernels when
    # torch.compile traces CPU/CUDA), so the functional op is called below it too.
    with torch._C._AutoDispatchBelowAutograd():
        updated = _FUNCTIONAL(
            new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size, slices_per_processing_page, impl
        )
    kv_cache.copy_(updated)


_FUNCTIONAL = torch.ops.paged_kv.kv_cache_update_functional.default
_lib.impl("kv_cache_update_functional", _functional_xla, "XLA")
_lib.impl("kv_cache_update", _update_by_copy, "XLA")
_lib.impl("kv_cache_update", _update_by_copy, "Functionalize")


# ---------------------------------------------------------- autograd, fake


def _not_differentiable(op_name):
    def kernel(new_kv_tokens, slice_indices, kv_cache, total_update_slices, *static):
        _refuse_grad(op_name, new_kv_tokens, kv_cache)
        with torch._C._AutoDispatchBelowAutograd():
            return op(new_kv_tokens, slice_indices, kv_cache, total_update_slices, *static)

    op = getattr(torch.ops.paged_kv, op_name).default
    return kernel


for _name in ("kv_cache_update", "kv_cache_update_functional"):
    # XLA needs this kernel: under functionalization the XLA kernels see
    # unwrapped tensors, which do not carry requires_grad.
    _lib.impl(_name, _not_differentiable(_name), "Autograd")
    for _key in ("AutogradCPU", "AutogradCUDA"):  # the eager kernels check themselves
        _lib.impl(_name, torch.library.fallthrough_kernel, _key)


# The fake kernels refuse grad inputs too: with AutogradCPU falling through,
# they are what torch.compile traces on CPU.
@torch.library.register_fake("paged_kv::kv_cache_update", lib=_lib)
def _(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=32, slices_per_processing_page=8, impl="auto"):
    _refuse_grad("kv_cache_update", new_kv_tokens, kv_cache)
    _validation.validate_static(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices,
        page_size=page_size, slices_per_processing_page=slices_per_processing_page, impl=impl,
    )
    return None


@torch.library.register_fake("paged_kv::kv_cache_update_functional", lib=_lib)
def _(new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=32, slices_per_processing_page=8, impl="auto"):
    _refuse_grad("kv_cache_update_functional", new_kv_tokens, kv_cache)
    _validation.validate_static(
        new_kv_tokens, slice_indices, kv_cache, total_update_slices,
        page_size=page_size, slices_per_processing_page=slices_per_processing_page, impl=impl,
    )
    return torch.empty_like(kv_cache)
