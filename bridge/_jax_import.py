"""The one place where ``bridge`` code imports JAX, and where PyTorch/XLA's JAX guard runs.

Why a guard: when JAX initializes its PJRT client on a TPU before PyTorch/XLA
has initialized its own, later PyTorch/XLA work on that TPU hangs (pytorch/xla
issue 8793). PyTorch/XLA ships the workaround,
``torch_xla._internal.jax_workarounds`` (read in torch_xla 2.9):

* ``jax_import_guard()`` imports ``torch_xla`` and calls
  ``torch_xla._XLAC._init_computation_client()``, so PyTorch/XLA's runtime
  starts for ``PJRT_DEVICE`` and owns the device before JAX can take it.
  Importing ``torch_xla`` with ``PJRT_DEVICE`` unset picks a device itself and
  says so on the root logger (``WARNING:root:Defaulting to PJRT_DEVICE=CPU``
  on a host without a TPU);
* ``jax_env_context()`` sets ``SKIP_MEGASCALE_PJRT_CLIENT=true`` around JAX
  work (a MegaScale hang workaround).

PyTorch/XLA's own JAX helpers (``maybe_get_jax``, ``call_jax``) run both before
touching JAX. What races is JAX *initializing a backend* (creating an array,
``jax.devices()``, lowering or running a jit); importing jax does not, and
importing ``bridge``, ``torch_ops`` or ``jax_kernels`` initializes no JAX
backend (tested).

The rule here (:func:`guard_wanted_at_import`, :func:`guard_xla`):

1. **At import** (``from bridge._jax_import import jax``, which every
   ``bridge`` module uses) the guard runs only where the process asked for
   PyTorch/XLA or could meet the hang: ``torch_xla`` is installed and

   * ``torch_xla`` is already imported, or
   * ``PJRT_DEVICE`` is set (the user chose a PyTorch/XLA device), or
   * a TPU chip is attached to this host (the PCI scan JAX and torch_xla use
     to find TPUs). There the guard keeps the old protection for any JAX work
     that follows, the user's own included; torch_xla then logs that it
     selected ``PJRT_DEVICE=TPU`` (its own message).

   Otherwise jax is imported plainly and ``torch_xla`` is neither imported nor
   started: eager use on a CPU or GPU host changes and prints nothing. Nothing
   can hang there: the hang needs a TPU.
2. **On XLA tensors** every ``bridge``/``torch_ops`` path that hands them to
   JAX calls :func:`guard_xla` before its first JAX work: ``call_jax``'s XLA
   branch, :class:`bridge.xla_staging.StagedJaxFunction`, the ``torch_ops`` XLA
   kernels and ``to_jax`` of an XLA tensor. An XLA tensor exists, so torch_xla's
   runtime is up already; the call costs a flag check after the first.

Without ``torch_xla`` installed this is a plain ``import jax``. Not guarded: a
program on a TPU host that initializes a JAX backend before it imports
``torch_xla`` or ``bridge`` (e.g. its own ``jax.devices()`` first) can still
meet the hang; import ``bridge`` (or ``torch_xla``) first.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading

_guarded = False  # torch_xla's guard has run in this process
_guard_lock = threading.Lock()


def torch_xla_installed() -> bool:
    """True if ``torch_xla`` can be imported in this process."""
    try:
        return importlib.util.find_spec("torch_xla") is not None
    except ValueError:  # sys.modules["torch_xla"] is None: imports of it are blocked
        return False


def tpu_attached() -> bool:
    """True if a TPU chip is attached to this host through PCI (no runtime is started).

    Uses JAX's own PCI scan (the one torch_xla repeats to pick ``PJRT_DEVICE=TPU``);
    importing jax for it initializes nothing. If this jax lacks the helper, it
    answers True: the guard then keeps protecting, at the price of the log line.
    """
    try:
        from jax._src.hardware_utils import num_available_tpu_chips_and_device_id
    except ImportError:
        return True
    num_chips, _ = num_available_tpu_chips_and_device_id()
    return num_chips > 0


def guard_wanted_at_import() -> bool:
    """Whether importing ``bridge`` runs torch_xla's JAX guard (rule 1 of the module docstring)."""
    if not torch_xla_installed():
        return False
    if sys.modules.get("torch_xla") is not None or "PJRT_DEVICE" in os.environ:
        return True
    return tpu_attached()


def guard_xla() -> None:
    """Run PyTorch/XLA's JAX import guard once per process; a no-op without ``torch_xla``.

    Call it before JAX first works on anything PyTorch/XLA owns. After the
    first call it is a flag check.
    """
    global _guarded
    if _guarded:
        return
    with _guard_lock:
        if _guarded or not torch_xla_installed():
            return
        from torch_xla._internal.jax_workarounds import jax_import_guard

        jax_import_guard()
        _guarded = True


def _import_jax():
    """Import ``jax``, after torch_xla's guard where :func:`guard_wanted_at_import` says so."""
    if guard_wanted_at_import():
        guard_xla()
        from torch_xla._internal.jax_workarounds import jax_env_context

        with jax_env_context():
            import jax
    else:
        import jax
    return jax


jax = _import_jax()
