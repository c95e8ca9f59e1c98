"""The one place where ``bridge`` code imports JAX.

Why: when JAX initializes its PJRT client before PyTorch/XLA has initialized
its own, later PyTorch/XLA work on TPU hangs (pytorch/xla issue 8793). PyTorch/XLA
ships the workaround itself, ``torch_xla._internal.jax_workarounds``:

* ``jax_import_guard()`` calls ``torch_xla._XLAC._init_computation_client()``,
  so PyTorch/XLA's runtime owns the device before JAX can take it;
* ``jax_env_context()`` sets ``SKIP_MEGASCALE_PJRT_CLIENT=true`` around the
  import (a MegaScale hang workaround).

PyTorch/XLA's own JAX helpers (``maybe_get_jax``, ``call_jax``) run both before
touching JAX. Every ``bridge`` module gets JAX from here, so the guard always
runs before bridge code first imports JAX: ``from bridge._jax_import import jax``.

When ``torch_xla`` is not installed this is a plain ``import jax``. When it is
installed, importing ``bridge`` imports ``torch_xla`` (about 4 s) and
initializes its runtime for ``PJRT_DEVICE`` (CPU, TPU, CUDA), once per process.

Only imports made through ``bridge`` are guarded: a program that imports and
*uses* JAX (creates arrays, asks for devices) before importing ``torch_xla`` or
``bridge`` can still meet the hang; import ``bridge`` (or ``torch_xla``) first.
"""

from __future__ import annotations

import importlib.util


def torch_xla_installed() -> bool:
    """True if ``torch_xla`` can be imported in this process."""
    try:
        return importlib.util.find_spec("torch_xla") is not None
    except ValueError:  # sys.modules["torch_xla"] is None: imports of it are blocked
        return False


def _import_jax_guarded():
    """Run PyTorch/XLA's import guard (if installed), then import and return ``jax``."""
    if torch_xla_installed():
        from torch_xla._internal.jax_workarounds import jax_env_context, jax_import_guard

        jax_import_guard()
        with jax_env_context():
            import jax
    else:
        import jax
    return jax


jax = _import_jax_guarded()
