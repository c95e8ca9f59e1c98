"""The update on a sharded cache (SPMD, one program per chip, no communication).

Two axes can be sharded, alone or together:

* the **heads** axis (tensor parallelism): every chip holds all rows of its
  own heads and applies every slice to them;
* the **pages** axis (data parallelism, EasyDeL 0.3's ``page_shard_index``):
  chip ``i`` holds pages ``[i * P / n, (i + 1) * P / n)``, and applies only the
  slices (or parts of slices) that land in its pages.

Shard the cache and the new tokens alike over heads; shard only the cache over
pages (every chip reads the tokens its slices name); replicate the (tiny)
slice metadata.
"""

from __future__ import annotations


import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from .api import kv_cache_update
from .prepare import check_slice_data, static_validate_pairs


def _cache_spec(ndim: int, row_ndim: int, *, pages_axis, heads_axis):
    # The heads dim of a row: H of [H, D], H' of packed [H', pack, D'].
    spec = [None] * ndim
    spec[0] = pages_axis
    spec[ndim - row_ndim] = heads_axis
    return P(*spec)


def kv_cache_update_sharded(
    new_kv_tokens,  # [T, *row], sharded over the row's heads dim like the cache
    slice_indices,  # int[3, S], replicated
    kv_cache_pages,  # [P * page_size, *row] or [P, page_size, *row]
    total_update_slices,  # int[1], replicated
    *,
    mesh: jax.sharding.Mesh,
    heads_axis: str | None = "h",
    pages_axis: str | None = None,
    page_size: int = 32,
    slices_per_processing_page: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret=False,
):
    """``kv_cache_update`` on a cache sharded over ``mesh``'s ``heads_axis``
    (the row's heads dim: ``H`` of ``[H, D]``, ``H'`` of packed rows) and/or
    ``pages_axis`` (the cache's first dim); ``None`` leaves an axis whole.

    Each device runs ``kv_cache_update`` (the Pallas kernel on TPU) on its own
    heads and pages — with ``page_shard_index = axis_index(pages_axis)``, so
    it writes only the slices that land in its pages; the result keeps the
    input's sharding and the compiled program holds no collective. The sharded
    dims must divide by their axis sizes; per-device rows are what the
    kernel's VMEM rule sees. Slice data is validated on the host against the
    whole cache, as in ``kv_cache_update``. ``interpret`` must stay False (the
    TPU interpreter does not run inside ``shard_map``).
    """
    if interpret is not False:
        # Seen here: the TPU interpreter deadlocks inside shard_map over several
        # CPU devices. The unsharded kv_cache_update(interpret=True) works.
        raise ValueError(
            f"{interpret=} is not supported by kv_cache_update_sharded (the TPU interpreter "
            f"hangs across devices); call kv_cache_update(..., interpret=True) per shard"
        )
    for name, axis in (("heads_axis", heads_axis), ("pages_axis", pages_axis)):
        if axis is not None and axis not in mesh.shape:
            raise ValueError(f"{name}={axis!r} is not an axis of the mesh (axes: {tuple(mesh.shape)})")
    if heads_axis is None and pages_axis is None:
        raise ValueError("kv_cache_update_sharded needs heads_axis or pages_axis (both are None)")
    static_validate_pairs(
        (new_kv_tokens,), slice_indices, (kv_cache_pages,), total_update_slices, page_size=page_size,
        slices_per_processing_page=slices_per_processing_page,
    )
    row_ndim = np.ndim(new_kv_tokens) - 1
    cache_shape = np.shape(kv_cache_pages)
    sharded_dims = (("heads", cache_shape[len(cache_shape) - row_ndim], heads_axis), ("pages", cache_shape[0], pages_axis))
    for what, size, axis in sharded_dims:
        if axis is not None and size % mesh.shape[axis]:
            raise ValueError(
                f"kv_cache_pages has {size} {what} (shape {cache_shape}), not divisible by mesh axis "
                f"{axis!r} of size {mesh.shape[axis]}"
            )
    if pages_axis is not None and len(cache_shape) == row_ndim + 1 and (cache_shape[0] // mesh.shape[pages_axis]) % page_size:
        raise ValueError(
            f"a flat kv_cache_pages of {cache_shape[0]} rows split {mesh.shape[pages_axis]} ways over "
            f"{pages_axis!r} does not give whole pages of {page_size=}"
        )
    check_slice_data(
        (new_kv_tokens,), slice_indices, (kv_cache_pages,), total_update_slices, page_size=page_size, validate=None
    )

    def local(new, idx, cache, total):
        shard = None if pages_axis is None else jax.lax.axis_index(pages_axis)
        return kv_cache_update(
            new, idx, cache, total, page_size=page_size, slices_per_processing_page=slices_per_processing_page,
            vmem_limit_bytes=vmem_limit_bytes, validate=False, page_shard_index=shard,
        )

    cache_spec = _cache_spec(len(cache_shape), row_ndim, pages_axis=pages_axis, heads_axis=heads_axis)
    tokens_spec = _cache_spec(row_ndim + 1, row_ndim, pages_axis=None, heads_axis=heads_axis)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(tokens_spec, P(), cache_spec, P()), out_specs=cache_spec, check_vma=False
    )(new_kv_tokens, slice_indices, kv_cache_pages, total_update_slices)
