"""Call a JAX function on torch tensors: :func:`call_jax`.

Two paths, chosen by the tensors' device:

* **XLA tensors** (PyTorch/XLA): the function is lowered by JAX to HLO once
  per signature and staged into PyTorch/XLA's lazy graph
  (:class:`bridge.xla_staging.StagedJaxFunction`, what
  ``torch_xla.core.xla_builder.call_jax`` does, without its per-call cost).
  No data moves, nothing executes and the host does not wait: the result is a
  lazy XLA tensor like any other.
* **eager tensors** (CPU, CUDA): inputs go to JAX with :func:`bridge.to_jax`
  (zero-copy where possible), a ``jax.jit`` of the function runs on the
  tensors' device, outputs come back with :func:`bridge.to_torch` (zero-copy;
  jit outputs are fresh buffers, never the inputs'). Exporting a JAX array to
  torch waits until it is computed (measured on CPU; on CUDA the wait is
  stream-ordered), so when ``call_jax`` returns the inputs are no longer read
  and may be modified.

Arguments are pytrees (tuples, lists, dicts) whose tensor leaves become JAX
arrays; every other leaf (int, float, str, bool, enum, ``torch.dtype``...) is a
*static* value baked into the trace (``torch.dtype`` leaves are handed to the
function as the matching JAX dtype); ``None`` is an empty subtree. Outputs may
be any pytree of arrays.

Tracing cache: one trace per (function object, argument structure, static
values, tensor shapes and dtypes), kept in a bounded LRU (:data:`CACHE_SIZE`
entries) that holds the function alive. The key is the function *object*: a
closure, lambda or ``functools.partial`` created anew on every call is a new
key and is traced (and compiled) again on every call. Define the function once
(module level, or once per model) and pass changing values as arguments.

On XLA each entry holds its lowered computation, so a dropped entry frees it
(torch_xla's own ``call_jax`` cache, which this module does not use, keeps
every function it has seen for the life of the process).

Not differentiable: inputs that require grad raise while grad mode is on
(wrap the call in ``torch.no_grad()`` or detach them).
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable

import torch

from bridge._jax_import import jax
from bridge.dlpack import to_jax, to_torch
from bridge.dtypes import check_jax_can_hold, torch_to_jax_dtype

# Most traces kept; the least recently used one is dropped (and retraced if called again).
CACHE_SIZE = 1024


class _TracedCall:
    """One cache entry: a flat function of the tensor leaves for one call signature."""

    def __init__(self, fn: Callable, in_treedef, static_leaves: tuple, tensor_slots: tuple[int, ...]):
        self.fn = fn
        self.in_treedef = in_treedef
        self.static_leaves = static_leaves  # leaves with None at the tensor slots
        self.tensor_slots = tensor_slots
        self.out_treedef = None  # set when the flat function is traced
        self.jitted = None  # eager path: jax.jit(self.flat_fn), made on first use
        self.staged = None  # XLA path: a StagedJaxFunction of self.flat_fn, made on first use
        # One function object per entry: torch_xla caches by id(function).
        self.flat_fn = self._make_flat_fn()

    def _make_flat_fn(self) -> Callable:
        def flat_fn(*arrays):
            leaves = list(self.static_leaves)
            for slot, array in zip(self.tensor_slots, arrays, strict=True):
                leaves[slot] = array
            args, kwargs = jax.tree_util.tree_unflatten(self.in_treedef, leaves)
            out = self.fn(*args, **kwargs)
            out_leaves, self.out_treedef = jax.tree_util.tree_flatten(out)
            return tuple(out_leaves)

        flat_fn.__name__ = f"call_jax[{getattr(self.fn, '__name__', type(self.fn).__name__)}]"
        return flat_fn


_cache: collections.OrderedDict[Any, _TracedCall] = collections.OrderedDict()
_cache_lock = threading.Lock()


def _lookup(key, make: Callable[[], _TracedCall]) -> _TracedCall:
    with _cache_lock:
        entry = _cache.get(key)
        if entry is None:
            entry = _cache[key] = make()
            if len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
        else:
            _cache.move_to_end(key)
        return entry


def clear_cache() -> None:
    """Drop every cached trace held by :func:`call_jax` (torch_xla's own cache is untouched)."""
    with _cache_lock:
        _cache.clear()


def _split_leaves(args: tuple, kwargs: dict):
    """Flatten ``(args, kwargs)``; return treedef, tensors, their slots, static leaves, the key part."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs))
    tensors, slots, static_leaves, static_key = [], [], [], []
    for slot, (path, leaf) in enumerate(with_paths):
        where = _describe_path(path)
        if isinstance(leaf, torch.Tensor):
            try:
                check_jax_can_hold(leaf.dtype)
            except TypeError as err:
                raise TypeError(f"call_jax argument {where}: {err}") from None
            tensors.append(leaf)
            slots.append(slot)
            static_leaves.append(None)
            continue
        if isinstance(leaf, (jax.Array, jax.core.Tracer)):
            raise TypeError(
                f"call_jax argument {where} is a JAX array; pass torch tensors (non-tensor "
                f"arguments are static and must be hashable)"
            )
        try:
            hash(leaf)
        except TypeError:
            raise TypeError(
                f"call_jax argument {where} of type {type(leaf).__name__} is not hashable; "
                f"non-tensor arguments are static (part of the trace cache key) and must be hashable"
            ) from None
        static_key.append((type(leaf), leaf))
        static_leaves.append(torch_to_jax_dtype(leaf) if isinstance(leaf, torch.dtype) else leaf)
    return treedef, tensors, tuple(slots), tuple(static_leaves), tuple(static_key)


def _describe_path(path) -> str:
    # path[0] is 0 (positional args) or 1 (kwargs); the rest indexes into them.
    head, rest = path[0], path[1:]
    if getattr(head, "idx", None) == 1 and rest:
        name = f"{rest[0].key}" if hasattr(rest[0], "key") else jax.tree_util.keystr(rest[:1])
        return name + jax.tree_util.keystr(tuple(rest[1:]))
    if rest and hasattr(rest[0], "idx"):
        return f"args[{rest[0].idx}]" + jax.tree_util.keystr(tuple(rest[1:]))
    return jax.tree_util.keystr(tuple(path))


def _common_device(tensors: list[torch.Tensor]) -> torch.device:
    if not tensors:
        raise ValueError(
            "call_jax needs at least one torch.Tensor argument (it picks the device from them)"
        )
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            f"call_jax needs all tensor arguments on one device, got {sorted(map(str, devices))}"
        )
    return tensors[0].device


def call_jax(fn: Callable, *args, **kwargs):
    """Run the JAX function ``fn(*args, **kwargs)`` on torch tensors; return torch tensors.

    Tensor leaves of ``args``/``kwargs`` (pytrees: tuples, lists, dicts) become
    JAX arrays; other leaves are static. All tensors must be on one device; the
    outputs (``fn``'s output pytree with arrays replaced by tensors) are on that
    device. XLA tensors are staged lazily into the XLA graph (no transfer, no
    sync); CPU/CUDA tensors run through a cached ``jax.jit`` with zero-copy
    conversion where possible. See the module docstring for the tracing cache
    (per function object: don't create ``fn`` anew on every call).

    Raises ``TypeError`` for unsupported dtypes (int64 without
    ``jax_enable_x64``), JAX arrays or unhashable static arguments;
    ``ValueError`` for no tensors or tensors on several devices;
    ``RuntimeError`` if an input requires grad while grad mode is on.
    """
    if not callable(fn):
        raise TypeError(f"call_jax expects a callable, got {type(fn).__name__}")
    treedef, tensors, slots, static_leaves, static_key = _split_leaves(args, kwargs)
    device = _common_device(tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "call_jax is not differentiable and an input requires grad; call it under "
            "torch.no_grad() or pass detached tensors"
        )
    signature = tuple((tuple(t.shape), t.dtype) for t in tensors)
    path = "xla" if device.type == "xla" else "eager"
    key = (fn, path, treedef, slots, static_key, signature)
    entry = _lookup(key, lambda: _TracedCall(fn, treedef, static_leaves, slots))
    if path == "xla":
        flat_out = _run_staged_in_xla(entry, tensors)
    else:
        flat_out = _run_eager(entry, tensors)
    return jax.tree_util.tree_unflatten(entry.out_treedef, list(flat_out))


def _run_eager(entry: _TracedCall, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if entry.jitted is None:
        entry.jitted = jax.jit(entry.flat_fn)
    arrays = [to_jax(t, copy=None) for t in tensors]
    outputs = entry.jitted(*arrays)
    return [to_torch(o, copy=None) for o in outputs]


def _run_staged_in_xla(entry: _TracedCall, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if entry.staged is None:
        from bridge.xla_staging import StagedJaxFunction

        entry.staged = StagedJaxFunction(entry.flat_fn)
    return entry.staged(*tensors)
