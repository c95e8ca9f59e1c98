"""The update on a cache sharded over its heads axis (SPMD, one program per chip).

Every chip holds all rows of its own heads, so the update needs no
communication: each chip applies every slice to its heads. This is how a TPU
pod slice runs it: shard the combined K/V heads axis of the cache and of the
new tokens over the chips' tensor-parallel mesh axis; replicate the (tiny)
slice metadata.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from .api import check_slice_data, kv_cache_update
from .validation import static_validate_inputs


def kv_cache_update_sharded(
    new_kv_tokens,  # [T, H, D], sharded over H like the cache
    slice_indices,  # int[3, S], replicated
    kv_cache_pages,  # [P * page_size, H, D], sharded over H
    total_update_slices,  # int[1], replicated
    *,
    mesh: jax.sharding.Mesh,
    heads_axis: str = "h",
    page_size: int = 32,
    slices_per_processing_page: int = 8,
    interpret=False,
):
    """``kv_cache_update`` with the heads axis split over ``mesh``'s ``heads_axis``.

    Each device runs ``kv_cache_update`` (the Pallas kernel on TPU) on its own
    heads; the result keeps the ``P(None, heads_axis, None)`` sharding and the
    compiled program holds no collective. ``H`` must be divisible by the size
    of ``heads_axis``; per-device ``H / n`` heads are what the kernel's VMEM
    rule sees. Metadata validation is as in ``kv_cache_update``. ``interpret``
    must stay False (the TPU interpreter does not run inside ``shard_map``).
    """
    if interpret is not False:
        # Seen here: the TPU interpreter deadlocks inside shard_map over several
        # CPU devices. The unsharded kv_cache_update(interpret=True) works.
        raise ValueError(
            f"{interpret=} is not supported by kv_cache_update_sharded (the TPU interpreter "
            f"hangs across devices); call kv_cache_update(..., interpret=True) per shard"
        )
    if heads_axis not in mesh.shape:
        raise ValueError(f"{heads_axis=} is not an axis of the mesh (axes: {tuple(mesh.shape)})")
    static_validate_inputs(
        new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page,
    )
    heads, shards = kv_cache_pages.shape[1], mesh.shape[heads_axis]
    if heads % shards:
        raise ValueError(
            f"kv_cache_pages has {heads} heads, not divisible by mesh axis {heads_axis!r} of size {shards}"
        )
    check_slice_data(new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices, page_size=page_size, validate=None)
    local = functools.partial(
        kv_cache_update, page_size=page_size, slices_per_processing_page=slices_per_processing_page, validate=False
    )
    heads_spec = P(None, heads_axis, None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(heads_spec, P(), heads_spec, P()), out_specs=heads_spec, check_vma=False
    )(new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices)
