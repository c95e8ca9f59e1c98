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
from .quantize import quantize
from .tpu_config import kernel_config, vmem_buffers


def _kv_cache_update_kernel(
    # Scalar prefetch (SMEM)
    num_valid_ref,  # i32[1]
    slice_indices_ref,  # i32[3, S_padded]: rows (dst, src, len)
    *refs,
    num_pairs: int,
    quantized: bool,
):
    """``refs``, for ``n = num_pairs`` (token, cache) pairs:

    * inputs: for a quantized write, the scales f32[n, 2] in SMEM (each
      cache's even-head and odd-head scale); then (HBM, ``pl.ANY``) ``n``
      token arrays ``[T, *row_i]`` and ``n`` caches ``[R, *row_i]`` (aliased to
      the outputs);
    * outputs (HBM): the ``n`` caches ``[R, *row_i]``;
    * scratch: ``n`` VMEM staging buffers ``[slices_per_step, page_size,
      *row_i]`` in the tokens' dtype; for a quantized write ``n`` more in the
      caches' dtype, which the quantized rows go through; DMA semaphores
      ``[n, slices_per_step]`` for reads and for writes.

    A quantized write converts the whole staged page (``page_size`` rows, a
    static shape) in VMEM between the two DMAs and writes its first ``len``
    rows: rows past ``len`` hold stale data whose conversion is never written.
    """
    if quantized:
        scales_ref, *refs = refs
    tokens_hbm = refs[:num_pairs]
    caches_out_hbm = refs[2 * num_pairs : 3 * num_pairs]
    staging_vmem = refs[3 * num_pairs : 4 * num_pairs]
    written_vmem = refs[4 * num_pairs : 5 * num_pairs] if quantized else staging_vmem
    read_sems, write_sems = refs[-2:]
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
            written_vmem[p].at[i, pl.ds(0, n)],
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
                if quantized:
                    out = written_vmem[p]
                    out[i] = quantize(staging_vmem[p][i], scales_ref[p, 0], scales_ref[p, 1], out.dtype)
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


@functools.partial(
    jax.jit, static_argnames=("page_size", "slices_per_processing_page", "vmem_limit_bytes", "interpret")
)
def pallas_update(
    tokens,  # tuple of [T, *row_i]
    slice_indices,  # int[3, S]
    caches,  # tuple of [R, *row_i] or [P, page_size, *row_i]
    total_update_slices,  # int[1]
    *,
    page_size: int,
    slices_per_processing_page: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret=False,
    scales=None,  # f32[n, 2] or None: quantize in VMEM (quantize.py)
):  # -> tuple of caches, same shapes
    """One kernel launch updating every (tokens, cache) pair with the same
    slices; slices per step and the VMEM limit from ``tpu_config.kernel_config``
    (``None``: sized from the chip's VMEM)."""
    rows = [c.reshape(-1, *t.shape[1:]) for t, c in zip(tokens, caches)]  # [R, *row_i]: leading dims merged
    n = len(rows)
    quantized = scales is not None
    num_slices = slice_indices.shape[1]
    config = kernel_config(
        vmem_buffers([(t.shape[1:], t.dtype, r.dtype) for t, r in zip(tokens, rows)]), page_size=page_size,
        num_slices=num_slices, slices_per_processing_page=slices_per_processing_page,
        vmem_limit_bytes=vmem_limit_bytes,
    )
    spp = config.slices_per_processing_page
    # i32[3, S_padded]: pad to whole grid steps; padded columns are never live.
    idx = jnp.pad(slice_indices.astype(jnp.int32), [(0, 0), (0, cdiv(num_slices, spp) * spp - num_slices)])
    num_valid = jnp.clip(total_update_slices.reshape(-1)[:1].astype(jnp.int32), 0, num_slices)  # i32[1]
    staging = [pltpu.VMEM((spp, page_size, *t.shape[1:]), t.dtype) for t in tokens]
    if quantized:
        staging += [pltpu.VMEM((spp, page_size, *r.shape[1:]), r.dtype) for r in rows]
    extra = [pl.BlockSpec(memory_space=pltpu.SMEM)] if quantized else []
    out = pl.pallas_call(
        functools.partial(_kv_cache_update_kernel, num_pairs=n, quantized=quantized),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            in_specs=extra + [pl.BlockSpec(memory_space=pl.ANY)] * (2 * n),
            out_specs=[pl.BlockSpec(memory_space=pl.ANY)] * n,
            grid=(cdiv(num_valid[0], spp),),
            scratch_shapes=[*staging, pltpu.SemaphoreType.DMA((n, spp)), pltpu.SemaphoreType.DMA((n, spp))],
        ),
        out_shape=[jax.ShapeDtypeStruct(r.shape, r.dtype) for r in rows],
        # Operands: (num_valid, idx, [scales], *tokens, *caches) → cache p is operand first_cache + p.
        input_output_aliases={2 + len(extra) + n + p: p for p in range(n)},
        compiler_params=pltpu.CompilerParams(vmem_limit_bytes=config.vmem_limit_bytes),
        interpret=_interpret_params(interpret),
        name="paged_kv_cache_update",
    )(num_valid, idx, *([scales.astype(jnp.float32)] if quantized else []), *tokens, *rows)
    return tuple(o.reshape(c.shape) for o, c in zip(out, caches))


def kv_cache_update_pallas(
    new_kv_tokens,  # [T, *row]
    slice_indices,  # int[3, S]
    kv_cache_pages,  # [R, *row] or [P, page_size, *row]
    total_update_slices,  # int[1]
    *,
    page_size: int,
    slices_per_processing_page: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret=False,
):
    """Run the Pallas kernel (on TPU, or in the TPU interpreter) on one cache.

    Inputs must already pass ``static_validate_inputs(..., for_tpu_kernel=True)``
    (``kv_cache_update`` does this). ``interpret``: ``False`` (compile for TPU),
    ``True`` (TPU interpreter with default params) or a ``pltpu.InterpretParams``.
    """
    return pallas_update(
        (new_kv_tokens,), slice_indices, (kv_cache_pages,), total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page, vmem_limit_bytes=vmem_limit_bytes,
        interpret=interpret,
    )[0]
