"""torchax kernels: ``torch.ops.paged_kv.*`` on torchax tensors.

torchax runs PyTorch code on JAX: a ``torchax.tensor.Tensor`` wraps a
``jax.Array``, and inside a torchax environment (``with
torchax.default_env():``, ``torchax.enable_globally()``, or a function under
``torchax.interop.jax_jit``) each torch call is looked up in torchax's op
registry. This module registers a JAX implementation there for every op of
:data:`torch_ops._library.OPS` (mutating and functional), so a new op pair
defined there works on torchax with no change here.

**Registration is lazy**: ``import torch_ops`` never imports torchax.
:func:`install` (run by ``torch_ops/__init__``) registers at once when
torchax is already imported, and otherwise leaves an import hook that
registers right after ``import torchax`` completes. torchax environments copy
the registry when they are created, so an environment that already exists is
reloaded (``Environment.load_ops()``): torchax's default one automatically,
any other through :func:`enable_torchax` (``torch_ops.enable_torchax(env)``).

**What runs**: ``torch_ops._impls.jax_update_pairs`` for ``impl`` — ``auto``
picks the Pallas kernel when lowered for TPU and the scatter fallback
elsewhere; ``jax``, ``scan``, ``pallas`` (TPU only), ``pallas_interpret`` as on
the other runtimes; ``torch`` runs the scatter fallback (``jax``): on torchax
torch's own ``index_copy_`` is that same JAX scatter. A quantized write (tokens
of another dtype than the cache, ``k_scale``/``v_scale``) hands the JAX code
the scales as ``f32[n, 2]``; it quantizes.

**Mutation**: a torchax tensor is a mutable wrapper around an immutable
``jax.Array``; the mutating ops rebind the wrapper's array, as torchax's own
in-place ops do. ``torchax.view.View`` s of the cache taken earlier (from
indexing) read their parent's array, so they see the update; a ``View``
passed as the cache is written through to its source (``View.update``).

**Cost of an eager call**: JAX writes into an existing buffer only when it is
donated, and donating kills every array on that buffer — torchax's
``clone``/``detach`` return the *same* ``jax.Array`` object. So an eager call
donates a cache's buffer only when nothing else references its array object
(``sys.getrefcount``): then the update is O(update), in place (same buffer).
Otherwise (a clone, or a ``tensor.jax()`` someone holds) it writes a new
buffer, O(cache), once: the cache then owns a fresh array, and the next call
donates again. A ``View`` passed as the cache costs O(its source) every call
(``View.update`` rewrites the source). The check cannot see a *different* array
object on the same buffer, which only JAX code makes (``jax.device_put`` to
the device the array is on, an addressable shard's ``.data`` on jax 0.7):
code that does that should pass ``eager_donation=False`` to
:func:`enable_torchax`. Under ``jax_jit`` nothing is donated here: donate the
cache with ``kwargs_for_jax_jit={"donate_argnums": ...}`` and return it from
the jitted function (see the README); XLA then aliases it in place.

**Validation**: shapes, dtypes, devices, ``impl`` and the scales' presence on
every call (the torch-side checks of ``torch_ops._validation``, on the
tensors' metadata only); slice data and scale values when they are concrete
and on the host (JAX CPU arrays), or under ``torch_ops.validation("always")``
(a device→host read on TPU); never inside ``jax_jit`` (tracers have no
values: validate first).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import sys
import threading

import bridge  # noqa: F401  (first: PyTorch/XLA's JAX import guard)  # isort: skip
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.utils._mode_utils as _mode_utils

from jax_kernels._utils import is_on_host, is_traced
from jax_kernels.kv_cache_update.compiler_options import update_compiler_options
from jax_kernels.kv_cache_update.kernel import INTERPRETER_LOCK

from . import _library, _quantize, _validation
from ._impls import jax_update_pairs

_lock = threading.Lock()
_registered = False
_eager_donation = True

# The op's impl -> update_compiler_options' impl (the Pallas paths need none).
_OPTION_IMPLS = {"auto": "auto", "jax": "scatter", "scan": "scan"}


# ------------------------------------------------------------ registration


def install() -> None:
    """Register now if torchax is imported, else once ``import torchax`` has run."""
    when_imported("torchax", _register)


def enable_torchax(env=None, *, eager_donation: bool | None = None):
    """Make ``torch.ops.paged_kv.*`` work on torchax tensors in ``env``.

    Imports torchax, registers the ops' JAX implementations (once) and reloads
    ``env``'s op table — default: torchax's default environment, created if
    needed. Only needed for environments created before the registration
    (e.g. before ``import torch_ops``); the default environment is handled
    automatically. ``eager_donation=False`` makes eager calls never donate the
    cache's buffer (each call then copies the whole cache; see the module
    docstring for when that is needed), ``True`` restores the default, ``None``
    leaves the setting as it is. Returns ``env``.
    """
    global _eager_donation
    if eager_donation is not None and not isinstance(eager_donation, bool):
        raise TypeError(f"eager_donation={eager_donation!r} must be a bool or None")
    import torchax

    if eager_donation is not None:
        _eager_donation = eager_donation
    _register()
    if env is None:
        env = torchax.default_env()
    if not hasattr(env, "load_ops"):
        raise TypeError(f"env={env!r} is not a torchax environment (it has no load_ops)")
    env.load_ops()
    return env


def _register() -> None:
    global _registered
    import torchax
    from torchax.ops import ops_registry

    with _lock:
        if _registered:
            return
        for op in _library.OPS.values():
            for functional in (False, True):
                name = op.name + ("_functional" if functional else "")
                ops_registry.register_torch_function_op(
                    getattr(torch.ops.paged_kv, name).default,
                    _kernel(op, functional),
                    is_jax_function=False,  # it gets the torchax tensors, to rebind the caches
                    is_user_defined=True,
                    is_view_op=True,  # View arguments reach it as Views (torchax would copy them)
                )
        _registered = True
    # torchax's default environment copied the registry when it was made;
    # 0.0.7 keeps it in `torchax.env`, 0.0.13 in `torchax._env`.
    env = getattr(torchax, "_env", None) or getattr(torchax, "env", None)
    if env is not None and hasattr(env, "load_ops"):
        env.load_ops()


def when_imported(name: str, callback) -> None:
    """Run ``callback()`` now if module ``name`` is imported, else right after
    its import completes (a ``sys.meta_path`` hook; nothing is imported here).
    A failed import leaves the hook in place for the next attempt."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _PostImportHook) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook(name, callback))


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds module ``name`` through the other finders and wraps its loader so
    that ``callback()`` runs as soon as the module has executed."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _PostImportHook) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader, self)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, hook: _PostImportHook):
        self._loader, self._hook = loader, hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)  # a failing import raises here, and the hook stays
        if self._hook in sys.meta_path:
            sys.meta_path.remove(self._hook)
        self._hook.callback()

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


# ------------------------------------------------------------------ kernels


@contextlib.contextmanager
def _native_torch():
    """Plain torch inside a torchax environment (torchax's own idiom): the
    checks below read the tensors' metadata through meta-device ops."""
    with _mode_utils.no_dispatch(), torch._C.DisableTorchFunction():
        yield


def _bind(schema, args, kwargs) -> tuple:
    """All of the op's arguments, positionally, defaults filled in."""
    out = list(args)
    if len(out) > len(schema.arguments):
        raise TypeError(f"{schema.name}() takes {len(schema.arguments)} arguments, got {len(out)}")
    kwargs = dict(kwargs)
    for arg in schema.arguments[len(out) :]:
        if arg.name in kwargs:
            out.append(kwargs.pop(arg.name))
        elif arg.has_default_value():
            out.append(arg.default_value)
        else:
            raise TypeError(f"{schema.name}() missing argument {arg.name!r}")
    if kwargs:
        raise TypeError(f"{schema.name}() got an unexpected keyword argument {next(iter(kwargs))!r}")
    return tuple(out)


def _check_static(op, tokens, idx, caches, total, page_size, spp, impl, k_scale, v_scale) -> list:
    """The torch-side static checks (``torch_ops._validation``) on the
    tensors' metadata; torchax tensors report device ``jax:0``, so a mix with
    other tensors is refused naming the devices. Returns the rows views
    (meta tensors)."""
    with _native_torch():
        return _validation.validate_static_pairs(
            tokens, idx, caches, total, page_size=page_size, slices_per_processing_page=spp, impl=impl,
            names=op.names, k_scale=k_scale, v_scale=v_scale,
        )


def _host(t) -> torch.Tensor | None:
    """A CPU copy of a torchax tensor's values (a device→host read off CPU)."""
    return None if t is None else torch.from_numpy(np.array(t.jax()))


def _check_data(op, tokens, caches, flats, page_size, idx, total, k_scale, v_scale) -> None:
    """The slice data and scale checks, where the module docstring says they run."""
    mode = _validation.validation_mode()
    arrays = [t.jax() for t in (idx, total, k_scale, v_scale) if t is not None]
    if mode == "never" or is_traced(*arrays):
        return
    if mode == "always" or all(is_on_host(a) for a in arrays):
        with _native_torch():
            cols = _validation.host_columns(_host(idx), _host(total), op.names[0])
            _validation.validate_data(tokens[0], cols, flats[0], page_size=page_size, names=op.names[0])
            _validation.validate_scales(tokens[0].dtype, caches[0].dtype, _host(k_scale), _host(v_scale), op.names[0])


def _platform(arrays) -> str:
    """The platform of the first concrete array (JAX's default backend if none is)."""
    for a in arrays:
        if isinstance(a, jax.Array) and not is_traced(a):
            return next(iter(a.devices())).platform
    return jax.default_backend()


@functools.cache
def _sole_owner_refcount() -> int:
    """``sys.getrefcount(holder._elem)`` when ``holder`` alone references the array."""

    class Holder:
        pass

    holder = Holder()
    holder._elem = jnp.zeros((), jnp.int8)
    return sys.getrefcount(holder._elem)


def _donatable(cache) -> bool:
    """True if donating ``cache``'s array kills nothing else: a torchax Tensor
    (not a View) whose array object only it references (see module docstring)."""
    return (
        _eager_donation
        and not isinstance(cache, _torchax_types()[1])
        and not is_traced(cache._elem)
        and sys.getrefcount(cache._elem) == _sole_owner_refcount()
    )


def _merged_options(dtypes, impl: str, platform: str) -> tuple:
    """``update_compiler_options`` for every cache dtype, as a hashable tuple."""
    options: dict = {}
    if impl in _OPTION_IMPLS:
        for dtype in dtypes:
            for key, value in update_compiler_options(dtype, impl=_OPTION_IMPLS[impl], platform=platform).items():
                if key == "xla_disable_hlo_passes" and key in options and value not in options[key].split(","):
                    value = f"{options[key]},{value}"
                options[key] = value
    return tuple(sorted(options.items()))


@functools.lru_cache(maxsize=None)
def _eager_update(impl: str, page_size: int, spp, donate: tuple, options: tuple):
    """A top-level jit of ``jax_update_pairs`` for eager calls:
    ``fn(tokens, slice_indices, total, scales, *caches)``, caches ``i`` for
    ``i`` in ``donate`` donated, with ``update_compiler_options`` (XLA:CPU)."""

    def update(tokens, slice_indices, total_update_slices, scales, *caches):
        return jax_update_pairs(
            tokens, slice_indices, caches, total_update_slices, impl=impl, page_size=page_size,
            slices_per_processing_page=spp, scales=scales,
        )

    return jax.jit(update, donate_argnums=tuple(4 + i for i in donate), compiler_options=dict(options) or None)


def _kernel(op, functional: bool):
    """The torchax implementation of ``op`` (``_library._Op``), mutating or functional."""
    name = op.name + ("_functional" if functional else "")
    schema = getattr(torch.ops.paged_kv, name).default._schema

    def kernel(*args, **kwargs):
        args = _bind(schema, args, kwargs)
        tokens, idx, caches, total, (page_size, spp, impl, k_scale, v_scale) = op.split(args)
        flats = _check_static(op, tokens, idx, caches, total, page_size, spp, impl, k_scale, v_scale)
        with _native_torch():
            _library._refuse_grad(name, _library._grad_names(op), _library._grad_tensors(op, args))
        # Past the device check every tensor is a torchax Tensor or View.
        _check_data(op, tokens, caches, flats, page_size, idx, total, k_scale, v_scale)
        idx_array, total_array = idx.jax(), total.jax()  # int[3, S], int[1]
        token_arrays = tuple(t.jax() for t in tokens)  # [T, *row] each
        # f32[n, 2] (each cache's even- and odd-head scales) for a quantized write, built by torchax.
        quantized = tokens[0].dtype != caches[0].dtype
        scales = _quantize.scales_tensor(op.num_pairs, k_scale, v_scale).jax() if quantized else None
        # Decided before this function holds the caches' arrays itself.
        donate = () if functional else tuple(i for i, c in enumerate(caches) if _donatable(c))
        cache_arrays = tuple(c.jax() for c in caches)  # each cache's own shape
        traced = is_traced(*token_arrays, idx_array, *cache_arrays, total_array, scales)
        platform = None if traced else _platform((*cache_arrays, *token_arrays))
        # Traced, the platform is the one lowered for (an export for TPU from
        # a CPU host is fine); Pallas itself refuses a CPU lowering.
        if impl == "pallas" and not traced and platform != "tpu":
            raise ValueError(
                f"impl='pallas' needs a TPU, got torchax tensors on {platform}; "
                f"use impl='pallas_interpret' to run the kernel's code elsewhere"
            )
        run_impl = "jax" if impl == "torch" else impl
        if traced:
            outs = jax_update_pairs(
                token_arrays, idx_array, cache_arrays, total_array, impl=run_impl, page_size=page_size,
                slices_per_processing_page=spp, scales=scales,
            )
        else:
            options = _merged_options({a.dtype for a in cache_arrays}, run_impl, platform)
            run = functools.partial(
                _eager_update(run_impl, page_size, spp, donate, options), token_arrays, idx_array, total_array,
                scales, *cache_arrays,
            )
            if run_impl == "pallas_interpret":
                with INTERPRETER_LOCK:  # the TPU interpreter is not thread-safe
                    outs = jax.block_until_ready(run())
            else:
                outs = run()
        if functional:
            wrapped = tuple(_torchax_types()[0](out, c._env) for out, c in zip(outs, caches))
            return wrapped[0] if op.num_pairs == 1 else wrapped
        view_type = _torchax_types()[1]
        for cache, out in zip(caches, outs):
            if isinstance(cache, view_type):
                cache.update(out)  # through the View to its source
            else:
                cache._elem = out
            torch.autograd.graph.increment_version(cache)
        return None

    kernel.__name__ = kernel.__qualname__ = f"paged_kv_{name}_torchax"
    return kernel


@functools.cache
def _torchax_types():
    """``(torchax.tensor.Tensor, torchax.view.View)``; torchax is imported by the time a kernel runs."""
    from torchax.tensor import Tensor
    from torchax.view import View

    return Tensor, View
