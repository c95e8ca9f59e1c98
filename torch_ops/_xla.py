"""PyTorch/XLA kernels: the JAX code staged into the lazy graph with ``call_jax``.

The functional op returns the updated cache as a new lazy tensor; the
mutating op ``copy_``s it into the caller's cache. Nothing keeps the
intermediate alive, so when the graph is synced XLA aliases the cache's
buffer input→output and the update runs in place (O(update), measured flat
from 16 MiB to 1 GiB). Keeping the functional op's result referenced across
``torch_xla.sync()`` forces a full copy instead.
"""

from __future__ import annotations

import functools

import torch

from bridge._jax_import import guard_xla

from ._eager import RowPlan, staged_update
from ._impls import jax_update_pairs
from ._quantize import quantize_rows


def is_tpu() -> bool:
    import torch_xla.runtime as xr

    return xr.device_type() == "TPU"


def functional_update_pairs(
    tokens, slice_indices, caches, total_update_slices, *, impl, page_size, slices_per_processing_page,
    host_cols=None, scales=None,
):
    """New XLA tensors: the ``caches`` with the update applied (one per
    (tokens, cache) pair; the pairs share the slices)."""
    guard_xla()  # before JAX first works on these XLA tensors (see bridge._jax_import)
    if impl == "pallas" and not is_tpu():
        raise ValueError(
            f"impl='pallas' needs PyTorch/XLA tensors on a TPU, got {caches[0].device} tensors; "
            f"use impl='pallas_interpret' to run the kernel's code elsewhere"
        )
    if impl == "torch":
        raise ValueError(
            "impl='torch' runs on eager (CPU/CUDA) tensors only; on PyTorch/XLA use impl='auto' "
            "(the update staged into the XLA graph)"
        )
    if impl == "pallas_interpret":
        return [
            _interpret_on_host(
                new_kv_tokens, slice_indices, kv_cache, total_update_slices, page_size=page_size,
                slices_per_processing_page=slices_per_processing_page, host_cols=host_cols,
                scales=None if scales is None else scales[p],
            )
            for p, (new_kv_tokens, kv_cache) in enumerate(zip(tokens, caches))
        ]
    staged = _staged_jax_update(impl, page_size, slices_per_processing_page, len(tokens), scales is not None)
    extra = () if scales is None else (scales,)
    return staged(*tokens, slice_indices.to(torch.int32), *caches, total_update_slices.to(torch.int32), *extra)


@functools.lru_cache(maxsize=None)
def _staged_jax_update(impl: str, page_size: int, slices_per_processing_page, num_pairs: int, quantized: bool):
    """``jax_update_pairs`` for one static config and pair count, lowered once
    per input signature and staged into the lazy graph on every call (no
    per-call tracing or pytree work: the op's Python cost per call is a few
    µs on top). Arguments: the tokens, slice indices, the caches, the total,
    and for a quantized write the scales f32[n, 2] (graph data: new values do
    not recompile)."""
    from bridge.xla_staging import StagedJaxFunction  # here: torch_xla is optional, and loaded by now

    n = num_pairs

    def update(*arrays):
        return jax_update_pairs(
            arrays[:n], arrays[n], arrays[n + 1 : 2 * n + 1], arrays[2 * n + 1], impl=impl, page_size=page_size,
            slices_per_processing_page=slices_per_processing_page, scales=arrays[2 * n + 2] if quantized else None,
        )

    return StagedJaxFunction(update, name="xla::paged_kv_cache_update")


def _interpret_on_host(
    new_kv_tokens, slice_indices, kv_cache, total_update_slices, *, page_size, slices_per_processing_page, host_cols,
    scales=None,
):
    """``pallas_interpret`` on XLA tensors: the TPU interpreter needs host
    callbacks, which an XLA graph cannot hold, so the kernel runs on the host
    on a staging cache of the written rows (a device→host sync for the tokens
    and metadata), and the rows come back with one ``index_copy``."""
    from ._validation import flat_cache, flat_tokens, host_columns

    cols = host_cols if host_cols is not None else host_columns(slice_indices, total_update_slices)
    plan = RowPlan(cols)
    if plan.num_rows == 0:
        return kv_cache.clone()
    tokens = flat_tokens(new_kv_tokens.cpu())
    if scales is not None:  # quantized on the host, as on every eager path
        tokens = quantize_rows(tokens, scales[0].cpu(), scales[1].cpu(), kv_cache.dtype)
    rows = staged_update(
        tokens, plan, slice_indices.shape[1], impl="pallas_interpret", page_size=page_size,
        slices_per_processing_page=slices_per_processing_page,
    )
    flat = flat_cache(kv_cache, new_kv_tokens)
    dst_rows = torch.from_numpy(plan.dst_rows).to(kv_cache.device)
    return flat.index_copy(0, dst_rows, rows.to(kv_cache.device)).view(kv_cache.shape)
