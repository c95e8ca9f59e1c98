"""Stage a JAX function into PyTorch/XLA's lazy graph: :class:`StagedJaxFunction`.

This is what ``torch_xla.core.xla_builder.call_jax`` does, with the per-call
work moved to the first call of each input signature. JAX lowers the function
to an HLO module once per signature (shapes, dtypes, JAX's trace-affecting
config); torch_xla turns the module into a computation; every call then only
stages that computation on the input tensors
(``torch_xla._XLAC._xla_user_computation``). Nothing executes and nothing moves:
the outputs are lazy XLA tensors.

torch_xla's ``call_jax`` redoes its argument flattening, dtype mapping, JAX
import checks and environment-variable workarounds on every call: about 90 µs
of Python per call here, against about 10 µs for a cached
:class:`StagedJaxFunction` call (measured on CPU PJRT, torch_xla 2.9). It also
needs ``torchax`` importable; this module does not.

Constructing one (on an XLA path only) runs torch_xla's JAX setup as its
``call_jax`` does: the JAX import guard (:func:`bridge._jax_import.guard_xla`)
and ``jax_use_shardy_partitioner=False``, a process-wide JAX config change
torch_xla expects. Lowerings are keyed by the config after it, so the first
call of a signature compiles one graph and later calls none.

It relies on two torch_xla internals that ``call_jax`` itself uses
(``_xla_op_computation_from_module_proto``, ``_xla_user_computation``). Where a
torch_xla version lacks them, calls go through ``xb.call_jax`` instead
(slower, same result).
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import torch

from bridge._jax_import import guard_xla, jax
from bridge.dtypes import torch_to_jax_dtype


def _trace_context():
    # JAX's own jit cache key part for config that changes tracing (x64, ...).
    from jax._src import config

    return config.trace_context()


def _torch_xla_jax_setup() -> None:
    """What torch_xla's ``call_jax`` does before it lowers: its JAX import guard
    (:func:`bridge._jax_import.guard_xla`), then ``maybe_get_jax()``, which sets
    ``jax_use_shardy_partitioner=False`` (torch_xla expects GSPMD-style
    sharding), a process-wide JAX config change.

    That flag is part of :func:`_trace_context`, so this runs before any
    cache key is computed (in ``StagedJaxFunction.__init__``) and ``_lower``
    keys by the config after it. A first call keyed before the change would
    miss on the second call, lower again, and torch_xla would compile that
    second computation as a new graph: two compiles in a fresh process.
    """
    guard_xla()
    from torch_xla._internal.jax_workarounds import jax_env_context, maybe_get_jax

    with jax_env_context():
        maybe_get_jax()


class StagedJaxFunction:
    """``fn`` (JAX arrays in, a tuple of JAX arrays out), callable on XLA tensors.

    ``staged(*tensors)`` returns a list of lazy XLA tensors, one per output of
    ``fn``. ``fn`` is lowered on the first call of each input signature and
    kept; its output must be a flat tuple or list of arrays. ``name`` (it must
    contain ``::``) names the node in PyTorch/XLA's IR dumps.
    """

    def __init__(self, fn: Callable, *, name: str = "xla::jax_func"):
        if "::" not in name:
            raise ValueError(f"{name=} must contain '::' (PyTorch/XLA op names do)")
        self.fn = fn
        self.name = name
        self._computations: dict = {}
        self._lock = threading.Lock()
        import torch_xla

        self._xlac = torch_xla._XLAC
        self._direct = all(
            hasattr(self._xlac, f) for f in ("_xla_op_computation_from_module_proto", "_xla_user_computation")
        )
        if self._direct:
            # Before the first key is computed: the setup changes JAX's config,
            # which is part of the key (see _torch_xla_jax_setup).
            _torch_xla_jax_setup()

    @property
    def num_lowered(self) -> int:
        """How many input signatures have been lowered (one HLO module each)."""
        return len(self._computations)

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if not self._direct:
            import torch_xla.core.xla_builder as xb

            return list(xb.call_jax(self._flat_fn, tensors))
        signature = tuple((t.shape, t.dtype) for t in tensors)
        computation = self._computations.get((signature, _trace_context()))
        if computation is None:
            computation = self._lower(signature, tensors)
        return self._xlac._xla_user_computation(self.name, list(tensors), computation)

    def _flat_fn(self, *arrays):
        return list(self.fn(*arrays))

    def _lower(self, signature: tuple, tensors: Sequence[torch.Tensor]):
        from torch_xla._internal.jax_workarounds import jax_env_context

        with self._lock:
            _torch_xla_jax_setup()
            # Keyed by the config the lowering runs under: the setup may have
            # just changed it (someone set jax_use_shardy_partitioner again).
            key = (signature, _trace_context())
            computation = self._computations.get(key)
            if computation is not None:
                return computation
            with jax_env_context():
                specs = [jax.ShapeDtypeStruct(tuple(t.shape), torch_to_jax_dtype(t.dtype)) for t in tensors]
                lowered = jax.jit(self._flat_fn, keep_unused=True).lower(*specs)
                proto = lowered.compiler_ir("hlo").as_serialized_hlo_module_proto()
                computation = self._xlac._xla_op_computation_from_module_proto("jax_callable", proto)
            self._computations[key] = computation
            return computation
