"""How the Pallas kernel is configured on TPU: slices per grid step sized from VMEM.

More slices per kernel step means more DMAs in flight: vLLM's PR #20415 took
this kernel from 28 to 92 GB/s on v6e by going from 8 to up to 64 slices per
step, sized from VMEM; tpu-inference 0.32 sizes it the same way. The rule here
(``slices_per_processing_page=None``, the default):

* ``page_bytes`` = ``page_size`` × one row's bytes as VMEM holds it — the
  row's second-minor dim rounded up to the dtype's packing (``32 // bits``:
  XLA's implicit padding) and its last dim to 128 lanes —, summed over the
  buffers one launch holds (K and V: both; a quantized write: the token-dtype
  rows and the quantized rows);
* ``vmem_limit_bytes`` (the kernel's scoped VMEM, passed to Mosaic) defaults
  to ``min(40 MiB, 5/8 of the chip's VMEM)`` (tpu-inference's 40 MiB, capped
  so that a 16 MiB chip keeps 6 MiB of headroom);
* slices per step = ``(vmem_limit_bytes - 1 MiB) // page_bytes`` (1 MiB kept
  for register spills and the rest, as tpu-inference does), rounded down to a
  power of two, at most 64 (tpu-inference measured a regression at 128 on
  v6e: scalar registers), and never more than the slices passed;
* SMEM holds the slice metadata, ``12 * num_slices + 4`` bytes, which must fit
  in the chip's SMEM.

An explicit ``slices_per_processing_page`` is honoured exactly (EasyDeL's
callers pass 8); its staging buffer must then fit in ``vmem_limit_bytes``,
whose default grows to hold it, up to 7/8 of the chip's VMEM.

Per-generation figures (per TensorCore), from jax 0.10.2's
``jax._src.pallas.mosaic.tpu_info.get_tpu_info_for_chip``: see :data:`TPU_CHIPS`.
With no TPU attached (lowering or exporting for TPU from a CPU host) and no
``tpu_generation`` given, :data:`DEFAULT_GENERATION` — the smallest VMEM of the
table, so an exported kernel fits every generation listed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MiB = 1024 * 1024
TPU_LANES = 128
MAX_SLICES_PER_STEP = 64
VMEM_RESERVED_BYTES = 1 * MiB  # register spills and the kernel's own bookkeeping
DEFAULT_VMEM_LIMIT_BYTES = 40 * MiB  # tpu-inference's default


@dataclasses.dataclass(frozen=True)
class TpuChip:
    """One TPU generation's figures, per TensorCore."""

    generation: str
    vmem_bytes: int
    smem_bytes: int
    hbm_bytes_per_second: float  # for the TPU benchmark's bandwidth ratio


#: Source: jax 0.10.2, ``jax/_src/pallas/mosaic/tpu_info.py`` (``get_tpu_info_for_chip``).
TPU_CHIPS = {
    "v4": TpuChip("v4", 16 * MiB, 1 * MiB, 615e9),
    "v5e": TpuChip("v5e", 128 * MiB, 1 * MiB, 820e9),
    "v5p": TpuChip("v5p", 64 * MiB, 1 * MiB, 1230e9),
    "v6e": TpuChip("v6e", 128 * MiB, 1 * MiB, 1640e9),
    "v7": TpuChip("v7", 64 * MiB, 1 * MiB, 3700e9),
}
DEFAULT_GENERATION = "v4"  # smallest VMEM: what is used when no TPU is attached

# jax's device_kind strings → generation (e.g. "TPU v5 lite", "TPU v6e", "TPU7x").
_DEVICE_KINDS = (
    ("v5 lite", "v5e"), ("v5e", "v5e"), ("v6 lite", "v6e"), ("v6e", "v6e"), ("v5p", "v5p"), ("v5", "v5p"),
    ("v4", "v4"), ("7x", "v7"), ("tpu7", "v7"), ("v7", "v7"),
)


def attached_generation() -> str | None:
    """The generation of the attached TPU (JAX's default backend), or None."""
    import jax

    try:
        devices = jax.devices()
    except RuntimeError:
        return None
    if not devices or devices[0].platform != "tpu":
        return None
    kind = devices[0].device_kind.lower()
    for needle, generation in _DEVICE_KINDS:
        if needle in kind:
            return generation
    return None


def chip(tpu_generation: str | None) -> TpuChip:
    """The figures for ``tpu_generation``; ``None``: the attached chip, else :data:`DEFAULT_GENERATION`."""
    if tpu_generation is None:
        tpu_generation = attached_generation() or DEFAULT_GENERATION
    if tpu_generation not in TPU_CHIPS:
        raise ValueError(f"tpu_generation={tpu_generation!r} is not one of {', '.join(map(repr, TPU_CHIPS))}")
    return TPU_CHIPS[tpu_generation]


def vmem_row_bytes(row, dtype) -> int:
    """Bytes of one row ``[..., second_minor, minor]`` in VMEM: the second-minor
    dim padded to the dtype's packing, the minor to 128 lanes."""
    itemsize = np.dtype(dtype).itemsize
    pack = max(1, 4 // itemsize)
    *major, second, minor = (1, *row) if len(row) == 1 else row
    return int(np.prod(major, dtype=np.int64)) * (-(-second // pack) * pack) * (-(-minor // TPU_LANES) * TPU_LANES) * itemsize


def vmem_buffers(pairs):  # -> [(row shape, dtype)]: the kernel's VMEM buffers per slice
    """The staging buffers one launch holds for ``(row, tokens dtype, cache
    dtype)`` pairs: one in the cache dtype each, and for a quantized write a
    second one the token rows land in before they are quantized."""
    out = []
    for row, tokens_dtype, cache_dtype in pairs:
        out.append((tuple(row), np.dtype(cache_dtype)))
        if np.dtype(tokens_dtype) != np.dtype(cache_dtype):
            out.append((tuple(row), np.dtype(tokens_dtype)))
    return out


def _prev_power_of_two(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """What the Pallas kernel uses (see the module docstring for the rule)."""

    slices_per_processing_page: int
    vmem_limit_bytes: int
    staging_bytes: int  # the VMEM staging buffers: slices per step × page_bytes
    page_bytes: int  # page_size rows of every cache, as VMEM holds them
    tpu_generation: str
    vmem_capacity_bytes: int
    problem: str | None = None  # why the kernel cannot run this configuration (None: it can)


def kernel_config(
    rows, *, page_size: int, num_slices: int, slices_per_processing_page: int | None = None,
    vmem_limit_bytes: int | None = None, tpu_generation: str | None = None,
) -> KernelConfig:
    """The kernel's configuration for caches with these ``(row shape, dtype)``
    rows written in one launch (see the module docstring)."""
    tpu = chip(tpu_generation)
    if vmem_limit_bytes is not None and (
        isinstance(vmem_limit_bytes, bool) or not isinstance(vmem_limit_bytes, (int, np.integer))
        or vmem_limit_bytes <= VMEM_RESERVED_BYTES
    ):
        raise ValueError(
            f"vmem_limit_bytes={vmem_limit_bytes!r} must be None or an int above the "
            f"{VMEM_RESERVED_BYTES} bytes the kernel keeps in reserve"
        )
    page_bytes = page_size * sum(vmem_row_bytes(row, dtype) for row, dtype in rows)
    default_limit = min(DEFAULT_VMEM_LIMIT_BYTES, tpu.vmem_bytes * 5 // 8)
    problem = None
    for row, _ in rows:
        if row[-1] % TPU_LANES:
            problem = (
                f"head_dim={row[-1]} must be a multiple of {TPU_LANES} for the Pallas TPU kernel (TPU lane "
                f"width; the packed layout pads head_dim to 128); the JAX fallbacks accept any head_dim"
            )
    if slices_per_processing_page is None:
        limit = vmem_limit_bytes or default_limit
        fit = (limit - VMEM_RESERVED_BYTES) // page_bytes
        spp = max(1, min(_prev_power_of_two(fit), MAX_SLICES_PER_STEP, max(num_slices, 1)))
    else:
        spp = slices_per_processing_page
        needed = spp * page_bytes + VMEM_RESERVED_BYTES
        limit = vmem_limit_bytes or min(max(default_limit, needed), tpu.vmem_bytes * 7 // 8)
    staging = spp * page_bytes
    if problem is None and limit > tpu.vmem_bytes:
        problem = (
            f"vmem_limit_bytes={limit} exceeds the {tpu.vmem_bytes} bytes of VMEM of a TPU {tpu.generation}"
        )
    if problem is None and staging + VMEM_RESERVED_BYTES > limit:
        problem = (
            f"slices_per_processing_page={spp}: the kernel's VMEM staging buffers would take {staging} bytes ({spp} x "
            f"page_size={page_size} rows x {page_bytes // page_size} bytes per row"
            f"{' over ' + str(len(rows)) + ' caches' if len(rows) > 1 else ''}), more than "
            f"vmem_limit_bytes={limit} less {VMEM_RESERVED_BYTES} reserved on a TPU {tpu.generation}; lower "
            f"slices_per_processing_page (or pass None to size it from VMEM)"
        )
    smem = 12 * (-(-max(num_slices, 1) // spp) * spp) + 4
    if problem is None and smem > tpu.smem_bytes:
        problem = (
            f"the slice metadata takes {smem} bytes of SMEM ({num_slices} slices), more than the "
            f"{tpu.smem_bytes} of a TPU {tpu.generation}; pass fewer slices per call"
        )
    return KernelConfig(spp, limit, staging, page_bytes, tpu.generation, tpu.vmem_bytes, problem)


def tpu_kernel_config(
    kv_cache_shape, dtype, *, page_size: int, num_slices: int, tpu_generation: str | None = None,
    slices_per_processing_page: int | None = None, vmem_limit_bytes: int | None = None, row_ndim: int | None = None,
    tokens_dtype=None,
) -> KernelConfig:
    """What ``kv_cache_update`` runs the Pallas kernel with on a cache of this
    shape and dtype (``row_ndim``: trailing dims that make a row, 2 or 3; by
    default 3 for a rank-5 cache, else 2 — pass 3 for a *flat* packed cache
    ``[R, H', pack, D']``, which by shape alone reads as a paged one). ``tpu_generation``: ``"v4"``,
    ``"v5e"``, ``"v5p"``, ``"v6e"``, ``"v7"``; ``None``: the attached chip, or
    :data:`DEFAULT_GENERATION` on a host without one. ``problem`` says why the
    kernel cannot run it (``kv_cache_update`` then uses the fallback).
    ``tokens_dtype``: the rows' dtype when it differs (a quantized write:
    the kernel then holds both a token-dtype and a cache-dtype buffer)."""
    shape = tuple(int(d) for d in kv_cache_shape)
    if row_ndim is None:
        row_ndim = 3 if len(shape) == 5 else 2
    row = shape[len(shape) - row_ndim :]
    return kernel_config(
        vmem_buffers([(row, tokens_dtype or dtype, dtype)]), page_size=page_size, num_slices=num_slices,
        slices_per_processing_page=slices_per_processing_page, vmem_limit_bytes=vmem_limit_bytes,
        tpu_generation=tpu_generation,
    )
