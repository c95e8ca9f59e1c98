"""The Pallas TPU kernel for the paged KV cache update.

Each grid step owns ``slices_per_processing_page`` consecutive slices. For
each slice it DMAs the token rows HBM → VMEM staging buffer, and as soon as
that lands, VMEM → the cache rows in HBM; then it waits for its writes. A
row is whatever one token stores (``[H, D]``, or packed ``[H', pack, D']``):
the DMAs move whole rows of a cache whose leading dims are merged into one
(free under TPU tiling, which tiles the two minor dims). One launch can
update several caches with the same slices (K and V: one staging buffer and
one pair of semaphores each). The
cache is aliased input→output (``input_output_aliases``), so under a donating
``jit`` it is updated in place. The grid is ``cdiv(total_update_slices[0],
slices_per_processing_page)`` steps, computed at run time: changing the count
does not recompile, and padding columns are never read.

Every slice has its own DMA semaphore: waits count bytes per semaphore, so
waiting on a shared semaphore for one copy could return when a *different*,
larger copy finished (the TPU interpreter's default ``on_wait`` DMA mode
exposes this).
"""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .._utils import cdiv


def _kv_cache_update_kernel(
    # Scalar prefetch (SMEM)
    num_valid_ref,  # i32[1]
    slice_indices_ref,  # i32[3, S_padded]: rows (dst, src, len)
    *refs,
    num_pairs: int,
):
    """``refs``, for ``n = num_pairs`` (token, cache) pairs:

    * inputs (HBM, ``pl.ANY``): ``n`` token arrays ``[T, *row_i]``, then ``n``
      caches ``[R, *row_i]`` (aliased to the outputs);
    * outputs (HBM): the ``n`` caches ``[R, *row_i]``;
    * scratch: ``n`` VMEM staging buffers ``[slices_per_step, page_size, *row_i]``,
      DMA semaphores ``[n, slices_per_step]`` for reads and for writes.
    """
    tokens_hbm = refs[:num_pairs]
    caches_out_hbm = refs[2 * num_pairs : 3 * num_pairs]
    staging_vmem = refs[3 * num_pairs : 4 * num_pairs]
    read_sems, write_sems = refs[4 * num_pairs :]
    slices_per_step = staging_vmem[0].shape[0]
    first = pl.program_id(0) * slices_per_step
    num_valid = num_valid_ref[0]

    def read(p, i):
        s = first + i
        n = slice_indices_ref[2, s]
        return pltpu.make_async_copy(
            tokens_hbm[p].at[pl.ds(slice_indices_ref[1, s], n)],
            staging_vmem[p].at[i, pl.ds(0, n)],
            read_sems.at[p, i],
        )

    def write(p, i):
        s = first + i
        n = slice_indices_ref[2, s]
        return pltpu.make_async_copy(
            staging_vmem[p].at[i, pl.ds(0, n)],
            caches_out_hbm[p].at[pl.ds(slice_indices_ref[0, s], n)],
            write_sems.at[p, i],
        )

    def live(i):
        s = first + i
        return jnp.logical_and(s < num_valid, slice_indices_ref[2, s] > 0)

    pairs = range(num_pairs)
    for i in range(slices_per_step):

        @pl.when(live(i))
        def _(i=i):
            for p in pairs:
                read(p, i).start()

    for i in range(slices_per_step):

        @pl.when(live(i))
        def _(i=i):
            for p in pairs:
                read(p, i).wait()
                write(p, i).start()

    for i in range(slices_per_step):

        @pl.when(live(i))
        def _(i=i):
            for p in pairs:
                write(p, i).wait()


#: The TPU interpreter keeps process-global state and is not thread-safe (seen
#: here: concurrent interpreted calls fail inside its shared-memory bookkeeping).
#: Eager callers hold this lock until the interpreted kernel has finished.
INTERPRETER_LOCK = threading.Lock()


def _interpret_params(interpret):
    if interpret is True:
        # Plain interpret=True cannot run a dynamic-length DMA; the TPU
        # interpreter can.
        return pltpu.InterpretParams()
    return interpret or False


@functools.partial(jax.jit, static_argnames=("page_size", "slices_per_processing_page", "interpret"))
def pallas_update(
    tokens,  # tuple of [T, *row_i]
    slice_indices,  # int[3, S]
    caches,  # tuple of [R, *row_i] or [P, page_size, *row_i]
    total_update_slices,  # int[1]
    *,
    page_size: int,
    slices_per_processing_page: int,
    interpret=False,
):  # -> tuple of caches, same shapes
    """One kernel launch updating every (tokens, cache) pair with the same slices."""
    rows = [c.reshape(-1, *t.shape[1:]) for t, c in zip(tokens, caches)]  # [R, *row_i]: leading dims merged
    n = len(rows)
    num_slices = slice_indices.shape[1]
    spp = slices_per_processing_page
    # i32[3, S_padded]: pad to whole grid steps; padded columns are never live.
    idx = jnp.pad(slice_indices.astype(jnp.int32), [(0, 0), (0, cdiv(num_slices, spp) * spp - num_slices)])
    num_valid = jnp.clip(total_update_slices.reshape(-1)[:1].astype(jnp.int32), 0, num_slices)  # i32[1]
    out = pl.pallas_call(
        functools.partial(_kv_cache_update_kernel, num_pairs=n),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * (2 * n),
            out_specs=[pl.BlockSpec(memory_space=pl.ANY)] * n,
            grid=(cdiv(num_valid[0], spp),),
            scratch_shapes=[
                *(pltpu.VMEM((spp, page_size, *r.shape[1:]), r.dtype) for r in rows),
                pltpu.SemaphoreType.DMA((n, spp)),
                pltpu.SemaphoreType.DMA((n, spp)),
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct(r.shape, r.dtype) for r in rows],
        # Operands: (num_valid, idx, *tokens, *caches) → cache p is operand 2 + n + p.
        input_output_aliases={2 + n + p: p for p in range(n)},
        interpret=_interpret_params(interpret),
        name="paged_kv_cache_update",
    )(num_valid, idx, *tokens, *rows)
    return tuple(o.reshape(c.shape) for o, c in zip(out, caches))


def kv_cache_update_pallas(
    new_kv_tokens,  # [T, *row]
    slice_indices,  # int[3, S]
    kv_cache_pages,  # [R, *row] or [P, page_size, *row]
    total_update_slices,  # int[1]
    *,
    page_size: int,
    slices_per_processing_page: int,
    interpret=False,
):
    """Run the Pallas kernel (on TPU, or in the TPU interpreter) on one cache.

    Inputs must already pass ``static_validate_inputs(..., for_tpu_kernel=True)``
    (``kv_cache_update`` does this). ``interpret``: ``False`` (compile for TPU),
    ``True`` (TPU interpreter with default params) or a ``pltpu.InterpretParams``.
    """
    return pallas_update(
        (new_kv_tokens,), slice_indices, (kv_cache_pages,), total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, interpret=interpret,
    )[0]
