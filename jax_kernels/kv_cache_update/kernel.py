"""The Pallas TPU kernel for the paged KV cache update.

Each grid step owns ``slices_per_processing_page`` consecutive slices. For
each slice it DMAs the token rows HBM → VMEM staging buffer, and as soon as
that lands, VMEM → the cache rows in HBM; then it waits for its writes. The
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
    # Inputs (HBM, pl.ANY)
    new_kv_tokens_hbm_ref,  # [T, H, D]
    kv_cache_in_hbm_ref,  # [R, H, D], aliased to the output
    # Outputs (HBM, pl.ANY)
    kv_cache_out_hbm_ref,  # [R, H, D]
    # Scratch
    staging_vmem_ref,  # [slices_per_processing_page, page_size, H, D]
    read_sems,  # DMA semaphores [slices_per_processing_page]
    write_sems,  # DMA semaphores [slices_per_processing_page]
):
    del kv_cache_in_hbm_ref  # same buffer as the output
    slices_per_step = staging_vmem_ref.shape[0]
    first = pl.program_id(0) * slices_per_step
    num_valid = num_valid_ref[0]

    def read(i):
        s = first + i
        n = slice_indices_ref[2, s]
        return pltpu.make_async_copy(
            new_kv_tokens_hbm_ref.at[pl.ds(slice_indices_ref[1, s], n)],
            staging_vmem_ref.at[i, pl.ds(0, n)],
            read_sems.at[i],
        )

    def write(i):
        s = first + i
        n = slice_indices_ref[2, s]
        return pltpu.make_async_copy(
            staging_vmem_ref.at[i, pl.ds(0, n)],
            kv_cache_out_hbm_ref.at[pl.ds(slice_indices_ref[0, s], n)],
            write_sems.at[i],
        )

    def live(i):
        s = first + i
        return jnp.logical_and(s < num_valid, slice_indices_ref[2, s] > 0)

    for i in range(slices_per_step):
        pl.when(live(i))(lambda i=i: read(i).start())
    for i in range(slices_per_step):

        @pl.when(live(i))
        def _(i=i):
            read(i).wait()
            write(i).start()

    for i in range(slices_per_step):
        pl.when(live(i))(lambda i=i: write(i).wait())


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
def kv_cache_update_pallas(
    new_kv_tokens,  # [T, H, D]
    slice_indices,  # int[3, S]
    kv_cache_pages,  # [R, H, D]
    total_update_slices,  # int[1]
    *,
    page_size: int,
    slices_per_processing_page: int,
    interpret=False,
):
    """Run the Pallas kernel (on TPU, or in the TPU interpreter).

    Inputs must already pass ``static_validate_inputs(..., for_tpu_kernel=True)``
    (``kv_cache_update`` does this). ``interpret``: ``False`` (compile for TPU),
    ``True`` (TPU interpreter with default params) or a ``pltpu.InterpretParams``.
    """
    _, heads, head_dim = kv_cache_pages.shape
    num_slices = slice_indices.shape[1]
    spp = slices_per_processing_page
    # i32[3, S_padded]: pad to whole grid steps; padded columns are never live.
    idx = jnp.pad(slice_indices.astype(jnp.int32), [(0, 0), (0, cdiv(num_slices, spp) * spp - num_slices)])
    num_valid = jnp.clip(total_update_slices.reshape(-1)[:1].astype(jnp.int32), 0, num_slices)  # i32[1]
    return pl.pallas_call(
        _kv_cache_update_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec(memory_space=pl.ANY),
            grid=(cdiv(num_valid[0], spp),),
            scratch_shapes=[
                pltpu.VMEM((spp, page_size, heads, head_dim), kv_cache_pages.dtype),
                pltpu.SemaphoreType.DMA((spp,)),
                pltpu.SemaphoreType.DMA((spp,)),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(kv_cache_pages.shape, kv_cache_pages.dtype),
        # Operands: (num_valid, idx, new_kv_tokens, kv_cache_pages) → cache is 3.
        input_output_aliases={3: 0},
        interpret=_interpret_params(interpret),
        name="paged_kv_cache_update",
    )(num_valid, idx, new_kv_tokens, kv_cache_pages)
