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

It relies on two torch_xla internals that ``call_jax`` itself uses
(``_xla_op_computation_from_module_proto``, ``_xla_user_computation``). Where a
torch_xla version lacks them, calls go through ``xb.call_jax`` instead
(slower, same result).
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import torch

from bridge._jax_import import jax
from bridge.dtypes import torch_to_jax_dtype


def _trace_context():
    # JAX's own jit cache key part for config that changes tracing (x64, ...).
    from jax._src import config

    return config.trace_context()


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

    @property
    def num_lowered(self) -> int:
        """How many input signatures have been lowered (one HLO module each)."""
        return len(self._computations)

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if not self._direct:
            import torch_xla.core.xla_builder as xb

            return list(xb.call_jax(self._flat_fn, tensors))
        key = (tuple((t.shape, t.dtype) for t in tensors), _trace_context())
        computation = self._computations.get(key)
        if computation is None:
            computation = self._lower(key, tensors)
        return self._xlac._xla_user_computation(self.name, list(tensors), computation)

    def _flat_fn(self, *arrays):
        return list(self.fn(*arrays))

    def _lower(self, key, tensors: Sequence[torch.Tensor]):
        from torch_xla._internal.jax_workarounds import jax_env_context, maybe_get_jax

        with self._lock:
            computation = self._computations.get(key)
            if computation is not None:
                return computation
            with jax_env_context():
                maybe_get_jax()  # torch_xla's JAX setup (its import guard, GSPMD-style sharding config)
                specs = [jax.ShapeDtypeStruct(tuple(t.shape), torch_to_jax_dtype(t.dtype)) for t in tensors]
                lowered = jax.jit(self._flat_fn, keep_unused=True).lower(*specs)
                proto = lowered.compiler_ir("hlo").as_serialized_hlo_module_proto()
                computation = self._xlac._xla_op_computation_from_module_proto("jax_callable", proto)
            self._computations[key] = computation
            return computation
