"""The ops in namespace ``paged_kv``: schemas, fake kernels, device kernels.

* ``paged_kv::kv_cache_update`` mutates ``kv_cache`` and returns nothing;
  ``paged_kv::kv_cache_update_functional`` returns a new cache.
* ``paged_kv::kv_cache_update_kv`` mutates separate ``k_cache`` and ``v_cache``
  with the same slices; ``paged_kv::kv_cache_update_kv_functional`` returns
  ``(k_cache, v_cache)`` anew.

Each op pair is one *spec* (:class:`_Op`): its argument names, which tensors
are (token rows, cache) pairs; every kernel below is written once over the
pairs. Kernels: CPU and CUDA (eager), XLA, one at the ``Autograd`` key (the
update is not differentiable: it raises if an input requires grad; for CPU
and CUDA the eager kernels raise themselves and ``AutogradCPU``/``AutogradCUDA``
fall through, sparing a Python dispatch hop per call), and one at the
``Functionalize`` key: under functionalization (PyTorch/XLA's default mode,
torch.compile) a mutating op runs as its functional twin followed by
``cache.copy_``, which XLA turns into an in-place update when the graph is
synced. Other runtimes (torchax, TorchTPU) register their own kernels from
their modules, using :data:`OPS`.

The ops are defined with ``torch.library.Library`` rather than
``torch.library.custom_op``: custom_op's Python dispatch layers cost about
30 µs per call (measured here), more than the whole decode-step update.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import _eager, _quantize, _validation, _xla

# Scales are scalar tensors, not floats: a float would be a constant of the
# traced graph (PyTorch/XLA and torch.compile would specialize on its value,
# recompiling when it changes, and XLA may fold a division by a constant into
# an inexact multiply); a tensor is data, so new values reuse the graph.
_STATIC = (
    "int page_size=32, int? slices_per_processing_page=None, str impl='auto', "
    "Tensor? k_scale=None, Tensor? v_scale=None"
)
# page_size, slices_per_processing_page (None: sized from VMEM), impl, k_scale, v_scale
_DEFAULTS = (32, None, "auto", None, None)


@dataclasses.dataclass(frozen=True)
class _Op:
    """One op pair: ``name`` (mutating) and ``name + "_functional"``.

    Positional arguments: ``len(names)`` token tensors, ``slice_indices``,
    the caches (one per token tensor), ``total_update_slices``, then
    ``page_size, slices_per_processing_page, impl, k_scale, v_scale``."""

    name: str
    names: tuple  # per pair: (tokens, "slice_indices", cache, "total_update_slices") argument names

    @property
    def num_pairs(self) -> int:
        return len(self.names)

    @functools.cached_property
    def grad_names(self) -> tuple:
        """The tokens' and the caches' argument names (the tensors that must not require grad)."""
        return tuple(n[0] for n in self.names) + tuple(n[2] for n in self.names)

    def schema(self, functional: bool) -> str:
        tokens = ", ".join(f"Tensor {n[0]}" for n in self.names)
        caches = ", ".join(
            f"Tensor{'' if functional else '(' + chr(ord('a') + i) + '!)'} {n[2]}" for i, n in enumerate(self.names)
        )
        out = ("Tensor" if self.num_pairs == 1 else "(" + ", ".join(["Tensor"] * self.num_pairs) + ")") if functional else "()"
        return f"({tokens}, Tensor slice_indices, {caches}, Tensor total_update_slices, {_STATIC}) -> {out}"

    def split(self, args):
        """``(tokens, slice_indices, caches, total, static)`` from positional
        args. The dispatcher leaves out trailing arguments that equal their
        defaults, so ``static`` is completed from :data:`_DEFAULTS`."""
        n = self.num_pairs
        static = tuple(args[2 * n + 2 :])
        return args[:n], args[n], args[n + 1 : 2 * n + 1], args[2 * n + 1], static + _DEFAULTS[len(static) :]


#: The op pairs, by mutating name.
OPS = {
    "kv_cache_update": _Op("kv_cache_update", (_validation.NAMES,)),
    "kv_cache_update_kv": _Op("kv_cache_update_kv", _validation.KV_NAMES),
}

_lib = torch.library.Library("paged_kv", "DEF")
for _op in OPS.values():
    _lib.define(_op.name + _op.schema(functional=False))
    _lib.define(_op.name + "_functional" + _op.schema(functional=True))


def _prepare(
    op, tokens, slice_indices, caches, total_update_slices, page_size, slices_per_processing_page, impl,
    k_scale=None, v_scale=None,
):
    """All checks that can run here, before any data moves. Returns ``(3-D
    rows views of the caches, host columns i64[3, total] or None, the lengths'
    (min, max) or None when unchecked)``."""
    flats = _validation.validate_static_pairs(
        tokens, slice_indices, caches, total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, impl=impl, names=op.names,
        k_scale=k_scale, v_scale=v_scale,
    )
    mode = _validation.validation_mode()
    cols = length_range = None
    # Eager paths (CPU, CUDA) and pallas_interpret read the metadata on the
    # host anyway (on CUDA: a sync), so it is checked there by default; on XLA
    # only under validation("always").
    if not slice_indices.is_xla or impl == "pallas_interpret" or mode == "always":
        if mode == "never":
            cols = _validation.host_columns(slice_indices, total_update_slices, op.names[0])
        else:
            cols, length_range = _validation.checked_columns(
                slice_indices, total_update_slices, tokens[0], flats[0], page_size=page_size, names=op.names[0]
            )
            if k_scale is not None or v_scale is not None:
                _validation.validate_scales(tokens[0].dtype, caches[0].dtype, k_scale, v_scale, op.names[0])
    return flats, cols, length_range


def _write_eager(
    tokens, flats, cols, length_range, num_slices, page_size, slices_per_processing_page, impl, k_scale=None,
    v_scale=None,
):
    if impl == "pallas":
        raise ValueError(
            f"impl='pallas' needs PyTorch/XLA tensors on a TPU, got {flats[0].device} tensors; "
            f"use impl='pallas_interpret' to run the kernel's code elsewhere"
        )
    plan = _eager.RowPlan.of(cols, length_range)
    if plan.num_rows == 0:
        return
    scales = _quantize.scale_pairs(len(tokens), k_scale, v_scale) if k_scale is not None else (None, None)
    for new_kv_tokens, flat, pair in zip(tokens, flats, scales):
        rows = _validation.flat_tokens(new_kv_tokens)  # [T, H, D], like flat's rows
        quantized = pair is not None and rows.dtype != flat.dtype
        if impl in ("auto", "torch"):  # a quantized write quantizes just the rows it copies, in runs
            convert = functools.partial(_quantize.quantized_pieces, even_scale=pair[0], odd_scale=pair[1],
                                        dtype=flat.dtype) if quantized else None
            _eager.update_rows_(rows, plan, flat, convert)
        else:
            if quantized:  # the rows in the cache's dtype first
                rows = _quantize.quantize_rows(rows, *pair, flat.dtype)
            _eager.update_staged_(
                rows, plan, num_slices, flat, impl=impl, page_size=page_size,
                slices_per_processing_page=slices_per_processing_page,
            )


def _refuse_grad(op_name, names, tensors):
    if torch.is_grad_enabled():
        for name, t in zip(names, tensors):
            if t.requires_grad:
                raise ValueError(
                    f"paged_kv::{op_name} is not differentiable, but {name} requires grad; "
                    f"pass {name}.detach() or call it under torch.no_grad()"
                )


def _grad_names(op):
    """The float tensors' argument names, in the order of :func:`_grad_tensors`."""
    return op.grad_names


def _grad_tensors(op, args):
    n = op.num_pairs
    return (*args[:n], *args[n + 1 : 2 * n + 1])  # the tokens and the caches


# ------------------------------------------------------------------- eager


def _eager_kernels(op):
    def mutating(*args):
        if torch.is_grad_enabled():  # AutogradCPU/CUDA fall through to here
            _refuse_grad(op.name, _grad_names(op), _grad_tensors(op, args))
        tokens, idx, caches, total, static = op.split(args)
        flats, cols, length_range = _prepare(op, tokens, idx, caches, total, *static)
        _write_eager(tokens, flats, cols, length_range, idx.shape[1], *static)
        for cache in caches:
            torch.autograd.graph.increment_version(cache)  # views and autograd see the mutation

    def functional(*args):
        """Copies of the caches, updated (O(cache) by nature)."""
        _refuse_grad(op.name + "_functional", _grad_names(op), _grad_tensors(op, args))
        tokens, idx, caches, total, static = op.split(args)
        _, cols, length_range = _prepare(op, tokens, idx, caches, total, *static)
        if static[2] == "pallas":  # fail before the O(cache) clone
            _write_eager(tokens, caches, cols, length_range, idx.shape[1], *static)
        outs = [c.clone() for c in caches]
        flats = [_validation.flat_cache(o, t) for o, t in zip(outs, tokens)]
        _write_eager(tokens, flats, cols, length_range, idx.shape[1], *static)
        return outs[0] if op.num_pairs == 1 else tuple(outs)

    return mutating, functional


# --------------------------------------------------------------------- XLA


def _xla_functional(op):
    def functional(*args):
        tokens, idx, caches, total, static = op.split(args)
        _, cols, _ = _prepare(op, tokens, idx, caches, total, *static)
        page_size, spp, impl, k_scale, v_scale = static
        quantized = tokens[0].dtype != caches[0].dtype
        outs = _xla.functional_update_pairs(
            tokens, idx, caches, total, impl=impl, page_size=page_size, slices_per_processing_page=spp, host_cols=cols,
            scales=_quantize.scales_tensor(op.num_pairs, k_scale, v_scale) if quantized else None,
        )
        return outs[0] if op.num_pairs == 1 else tuple(outs)

    return functional


def _update_by_copy(op):
    # XLA with XLA_DISABLE_FUNCTIONALIZATION=1, and every device under
    # functionalization: the functional op, then copy_ into the caches. The
    # intermediates die here, so on XLA the synced graph aliases the caches.
    # This kernel runs below the Autograd key, and requires_grad has been
    # checked above it (the Autograd kernel on XLA; the fake kernels when
    # torch.compile traces CPU/CUDA), so the functional op is called below it too.
    functional = getattr(torch.ops.paged_kv, op.name + "_functional").default

    def mutating(*args):
        with torch._C._AutoDispatchBelowAutograd():
            updated = functional(*args)
        _, _, caches, _, _ = op.split(args)
        for cache, new in zip(caches, (updated,) if op.num_pairs == 1 else updated):
            cache.copy_(new)

    return mutating


# ---------------------------------------------------------- autograd, fake


def _not_differentiable(op, name):
    overload = getattr(torch.ops.paged_kv, name).default

    def kernel(*args):
        _refuse_grad(name, _grad_names(op), _grad_tensors(op, args))
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args)

    return kernel


def _fake(op, functional: bool):
    # The fake kernels refuse grad inputs too: with AutogradCPU falling through,
    # they are what torch.compile traces on CPU.
    name = op.name + ("_functional" if functional else "")

    def fake(*args):
        _refuse_grad(name, _grad_names(op), _grad_tensors(op, args))
        tokens, idx, caches, total, (page_size, spp, impl, k_scale, v_scale) = op.split(args)
        _validation.validate_static_pairs(
            tokens, idx, caches, total, page_size=page_size, slices_per_processing_page=spp, impl=impl,
            names=op.names, k_scale=k_scale, v_scale=v_scale,
        )
        if not functional:
            return None
        outs = [torch.empty_like(c) for c in caches]
        return outs[0] if op.num_pairs == 1 else tuple(outs)

    return fake


for _op in OPS.values():
    _mutating, _functional = _eager_kernels(_op)
    for _key in ("CPU", "CUDA"):
        _lib.impl(_op.name, _mutating, _key)
        _lib.impl(_op.name + "_functional", _functional, _key)
    _lib.impl(_op.name + "_functional", _xla_functional(_op), "XLA")
    _lib.impl(_op.name, _update_by_copy(_op), "XLA")
    _lib.impl(_op.name, _update_by_copy(_op), "Functionalize")
    for _name in (_op.name, _op.name + "_functional"):
        # XLA needs this kernel: under functionalization the XLA kernels see
        # unwrapped tensors, which do not carry requires_grad.
        _lib.impl(_name, _not_differentiable(_op, _name), "Autograd")
        for _key in ("AutogradCPU", "AutogradCUDA"):  # the eager kernels check themselves
            _lib.impl(_name, torch.library.fallthrough_kernel, _key)
    torch.library.register_fake("paged_kv::" + _op.name, _fake(_op, functional=False), lib=_lib)
    torch.library.register_fake("paged_kv::" + _op.name + "_functional", _fake(_op, functional=True), lib=_lib)
