"""TorchTPU kernels: ``torch.ops.paged_kv.*`` on ``"tpu"`` tensors.

TorchTPU (``torch-tpu``: PyTorch's native TPU backend) puts tensors on device
``"tpu"``, PyTorch's ``PrivateUse1`` dispatch key. For every op of
:data:`torch_ops._library.OPS` (mutating and functional) this module registers
a kernel at ``PrivateUse1`` and a fallthrough at ``AutogradPrivateUse1`` (the
kernels refuse inputs that require grad themselves). **Lazily**: ``import
torch_ops`` never imports torch_tpu; :func:`install` registers at once when
torch_tpu is loaded (it autoloads with ``import torch`` where it is installed)
and otherwise right after ``import torch_tpu``.

**What runs**: ``torch_ops._impls.jax_update_pairs`` through TorchTPU's
JAX-kernel path, ``torch_tpu._internal.pallas.custom_jax_kernel(fn,
donate_argnums=...)``: it exports the function for TPU (``jax.export``,
platform ``tpu``, so ``impl="auto"`` lowers to the Pallas kernel and
``jax``/``scan`` to the fallbacks), registers the StableHLO with TorchTPU's
runtime and runs it on the tensors' device buffers; a donated tensor is left
invalid. JAX only lowers here: run with ``JAX_PLATFORMS=cpu`` so JAX never
claims the TPU TorchTPU owns. ``impl="torch"`` is TorchTPU's own
``index_copy_`` of the named rows; ``pallas_interpret`` runs the kernel's code
in the TPU interpreter on the host (it needs host callbacks, which an exported
TPU program cannot hold) and copies the rows in. A quantized write (tokens
of another dtype than the cache, ``k_scale``/``v_scale``) passes the scales to
the JAX code as ``f32[n, 2]`` (quantized inside the kernel); ``torch`` and
``pallas_interpret`` quantize the rows in torch first, as the eager paths do.

**Write-back** (the mutating ops), chosen per call by :func:`writeback_mode`
(``PAGED_KV_TORCHTPU_WRITEBACK`` or :func:`set_writeback`). In TorchTPU's
design a tensor's storage owns a device buffer; views share the storage, and
in-place ops execute with the base buffer donated, so the storage's buffer is
replaced in place and every view sees it (``execution_mode
.disable_inplace_buffer_donation`` turns that off). Against that:

=========== ================================================================
``set``     donate the cache to the kernel, then ``cache.set_(result)``:
            O(1) on top of the kernel (the result *is* the donated buffer,
            aliased by the kernel). The caller's tensor points at the new
            storage; any other tensor on the old storage — a view taken
            earlier, the flat base of a paged view — is left on the donated,
            invalid buffer.
``copy``    donate, then ``cache.copy_(result)`` (what TorchTPU's docs
            suggest for donated arguments): an in-place op, so views stay
            valid, but it moves the whole cache (read + write: 2x its bytes of
            HBM traffic per call), O(cache).
``rows``    no donation of the cache: the kernel runs on a staging cache of
            just the rows the call writes (as the eager CPU/CUDA paths do),
            then one ``index_copy_`` (in place) puts them in the cache:
            O(update), views stay valid; it reads the slice metadata on the
            host (a device→host sync per call) and sends two small index
            arrays to the device.
``auto``    (default) ``set`` when every cache is the sole user of its storage
            (not a view, no views of it alive: the storage's use count), else
            ``rows``. So the common case (a model's cache buffer passed as
            is) is O(update) with no sync, and views are never broken.
=========== ================================================================

The functional ops never donate (a new cache, O(cache) by nature).

**Validation**: shapes, dtypes, devices and ``impl`` on every call
(``torch_ops._validation``); slice data whenever the call reads the metadata
on the host anyway (``rows``, ``torch``, ``pallas_interpret``) and under
``torch_ops.validation("always")``; a call that reads nothing on the host
adds no sync.

**Safety on hosts without a TPU**: merely importing torch_tpu is harmless,
but initialising its device makes libtpu look for a cloud metadata server;
the tests import it only in a child process with no network (``unshare -n``),
``TPU_SKIP_MDS_QUERY=1`` and ``JAX_PLATFORMS=cpu``, and never create a
``"tpu"`` tensor there.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from . import _eager, _library, _quantize, _validation
from ._impls import jax_update_pairs
from ._torchax import when_imported

WRITEBACK_MODES = ("auto", "set", "copy", "rows")
WRITEBACK_ENV = "PAGED_KV_TORCHTPU_WRITEBACK"
_lib = None
_writeback_override = None


# ------------------------------------------------------------ registration


def install() -> None:
    """Register the kernels now if torch_tpu is loaded, else once ``import torch_tpu`` has run."""
    when_imported("torch_tpu", _register)


def _register() -> None:
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("paged_kv", "IMPL")
    for op in _library.OPS.values():
        for functional in (False, True):
            name = op.name + ("_functional" if functional else "")
            lib.impl(name, _kernel(op, functional), "PrivateUse1")
            lib.impl(name, torch.library.fallthrough_kernel, "AutogradPrivateUse1")
    _lib = lib


def writeback_mode() -> str:
    """The write-back of the mutating ops: :func:`set_writeback`'s mode if
    set, else ``$PAGED_KV_TORCHTPU_WRITEBACK``, else ``"auto"``."""
    mode = _writeback_override or os.environ.get(WRITEBACK_ENV, "auto")
    if mode not in WRITEBACK_MODES:
        raise ValueError(f"{WRITEBACK_ENV}={mode!r} is not one of {', '.join(map(repr, WRITEBACK_MODES))}")
    return mode


def set_writeback(mode: str | None) -> str | None:
    """Set the write-back mode for this process (``None``: back to the
    environment variable). Returns the previous setting."""
    global _writeback_override
    if mode is not None and mode not in WRITEBACK_MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(map(repr, WRITEBACK_MODES))} or None")
    previous, _writeback_override = _writeback_override, mode
    return previous


# ------------------------------------------------------------- JAX kernels


@functools.lru_cache(maxsize=None)
def jax_kernel(impl: str, page_size: int, slices_per_processing_page, donate: bool, quantized: bool = False):
    """TorchTPU's callable for ``jax_update_pairs`` with one static config:
    ``fn(tokens, slice_indices, caches, total_update_slices[, scales])`` (lists
    of tensors for the pairs; ``scales`` f32[n, 2] for a quantized write) ->
    the updated caches; ``caches`` donated if ``donate``. Traced and exported
    once per input signature."""
    from torch_tpu._internal.pallas import custom_jax_kernel

    # Exactly the array arguments: TorchTPU passes every parameter of the
    # signature it sees (a partial's bound keywords included) to the export.
    def paged_kv_update(tokens, slice_indices, caches, total_update_slices):
        return jax_update_pairs(
            tokens, slice_indices, caches, total_update_slices, impl=impl, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page,
        )

    def paged_kv_update_quantized(tokens, slice_indices, caches, total_update_slices, scales):
        return jax_update_pairs(
            tokens, slice_indices, caches, total_update_slices, impl=impl, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, scales=scales,
        )

    name = f"paged_kv_update_{impl}_p{page_size}_s{slices_per_processing_page}"
    return custom_jax_kernel(
        paged_kv_update_quantized if quantized else paged_kv_update,
        name=name + ("_quantized" if quantized else "") + ("_donated" if donate else ""),
        donate_argnums=[2] if donate else None,
        warn_deprecated=False,  # its successor, jax_op, defines a custom op of its own; this is the kernel alone
    )


# ------------------------------------------------------------------ kernels


@functools.cache
def _sole_use_count() -> int:
    """``torch._C._storage_Use_Count`` of a tensor's storage that only it uses."""
    return _storage_use_count(torch.empty(1))


def _storage_use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def sole_user(t: torch.Tensor) -> bool:
    """True if ``t`` is not a view and no other tensor (a view of it) shares its storage."""
    return t._base is None and _storage_use_count(t) == _sole_use_count()


def resolve_writeback(caches) -> str:
    """``set``, ``copy`` or ``rows`` for these caches (see the module docstring)."""
    mode = writeback_mode()
    if mode == "auto":
        return "set" if all(sole_user(c) for c in caches) else "rows"
    return mode


def _index(rows: np.ndarray, device) -> torch.Tensor:
    """A host integer array as a tensor on ``device`` (a host→device copy)."""
    return torch.from_numpy(rows).to(device)


def _rows_for(dtype: torch.dtype, rows, pair_scales):
    """Token rows ``[T, H, D]`` in the cache's ``dtype``: quantized in torch
    (``torch_ops._quantize``, as the eager paths do) when the dtypes differ."""
    if rows.dtype == dtype:
        return rows
    even, odd = pair_scales
    return _quantize.quantize_rows(rows, even, odd, dtype)


class _Call:
    """One call's arguments, as the row-copy helpers and the JAX kernel take them."""

    def __init__(self, op, tokens, idx, caches, total, flats, page_size, spp, impl, k_scale, v_scale):
        self.op, self.tokens, self.idx, self.caches, self.total, self.flats = op, tokens, idx, caches, total, flats
        self.page_size, self.spp, self.impl = page_size, spp, impl
        self.device = caches[0].device
        self.quantized = tokens[0].dtype != caches[0].dtype
        self.pair_scales = _quantize.scale_pairs(op.num_pairs, k_scale, v_scale)
        # f32[n, 2]: each cache's (even heads, odd heads) scales, on the device.
        self.scales = _quantize.scales_tensor(op.num_pairs, k_scale, v_scale) if self.quantized else None

    def kernel(self, tokens, idx, caches, total, *, donate: bool):
        """The JAX update through TorchTPU on these tensors; the new caches."""
        fn = jax_kernel(self.impl, self.page_size, self.spp, donate, self.quantized)
        args = [list(tokens), idx, list(caches), total] + ([self.scales] if self.quantized else [])
        return list(fn(*args))

    def rows(self, plan):
        """Per pair, the rows this call writes, in the cache's dtype and packed order ``[num_rows, H, D]``."""
        rows3 = [_validation.flat_tokens(t) for t in self.tokens]  # [T, H, D] each
        if self.impl == "torch":
            return [plan.source_rows(_rows_for(f.dtype, r, s)) for f, r, s in zip(self.flats, rows3, self.pair_scales)]
        num_staged, staged_idx, staged_total = _eager.staged_rows(plan, self.idx.shape[1], self.page_size)
        if self.impl == "pallas_interpret":  # on the host: the interpreter needs host callbacks
            host_scales = [tuple(None if x is None else x.cpu() for x in s) for s in self.pair_scales]
            return [
                _eager.staged_update(
                    _rows_for(f.dtype, r.cpu(), s), plan, self.idx.shape[1], impl=self.impl,
                    page_size=self.page_size, slices_per_processing_page=self.spp,
                ).to(self.device)
                for f, r, s in zip(self.flats, rows3, host_scales)
            ]
        # The kernel on staging caches of just the written rows (quantizing them if need be).
        staging = [torch.empty((num_staged, *f.shape[1:]), dtype=f.dtype, device=self.device) for f in self.flats]
        outs = self.kernel(rows3, _index(staged_idx, self.device), staging, _index(staged_total, self.device), donate=True)
        return [o[: plan.num_rows] for o in outs]

    def write_rows(self, flats, cols) -> None:
        """The ``rows`` write-back (and ``torch``, ``pallas_interpret``): the
        rows into each flat cache view with one in-place ``index_copy_``."""
        plan = _eager.RowPlan(cols)
        if plan.num_rows == 0:
            return
        dst = _index(plan.dst_rows, self.device)
        for flat, r in zip(flats, self.rows(plan)):
            # In place (TorchTPU donates flat's base buffer); float8 as same-width ints (CPU lacks float8 index_copy_).
            _eager.as_copyable(flat).index_copy_(0, dst, _eager.as_copyable(r))


def _kernel(op, functional: bool):
    """The ``PrivateUse1`` kernel of ``op`` (``_library._Op``), mutating or functional."""
    name = op.name + ("_functional" if functional else "")

    def kernel(*args):
        _library._refuse_grad(name, _library._grad_names(op), _library._grad_tensors(op, args))
        tokens, idx, caches, total, (page_size, spp, impl, k_scale, v_scale) = op.split(args)
        _validation.validate_static_pairs(
            tokens, idx, caches, total, page_size=page_size, slices_per_processing_page=spp, impl=impl,
            names=op.names, k_scale=k_scale, v_scale=v_scale,
        )  # the rows views it returns are dropped: alive, they would count as users of the caches' storage
        on_host = impl in ("torch", "pallas_interpret")
        mode = None if functional or on_host else resolve_writeback(caches)
        flats = [_validation.flat_cache(c, t, n[2]) for c, t, n in zip(caches, tokens, op.names)]  # [R, H, D] views
        cols = None
        vmode = _validation.validation_mode()
        if on_host or mode == "rows" or vmode == "always":
            cols = _validation.host_columns(idx, total, op.names[0])  # a device→host read
            if vmode != "never":
                _validation.validate_data(tokens[0], cols, flats[0], page_size=page_size, names=op.names[0])
                _validation.validate_scales(tokens[0].dtype, caches[0].dtype, k_scale, v_scale, op.names[0])
        call = _Call(op, tokens, idx, caches, total, flats, page_size, spp, impl, k_scale, v_scale)
        idx32, total32 = idx.to(torch.int32), total.to(torch.int32)  # i32[3, S], i32[1]
        if functional:
            if on_host:
                outs = [c.clone() for c in caches]
                call.write_rows([_validation.flat_cache(o, t) for o, t in zip(outs, tokens)], cols)
            else:
                outs = call.kernel(tokens, idx32, caches, total32, donate=False)
            return outs[0] if op.num_pairs == 1 else tuple(outs)
        if on_host or mode == "rows":
            call.write_rows(flats, cols)
        else:
            for cache, out in zip(caches, call.kernel(tokens, idx32, caches, total32, donate=True)):
                if mode == "set":
                    cache.set_(out)
                else:
                    cache.copy_(out)
        for cache in caches:
            torch.autograd.graph.increment_version(cache)

    kernel.__name__ = kernel.__qualname__ = f"paged_kv_{name}_torchtpu"
    return kernel
