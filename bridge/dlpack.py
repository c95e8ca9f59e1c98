"""torch ⇄ JAX array conversion over DLPack: :func:`to_jax` and :func:`to_torch`.

``copy`` has the array-API meaning:

* ``copy=None``: share memory when possible, else make one explicit copy;
* ``copy=False``: share memory or raise :class:`ZeroCopyError` (a ``BufferError``
  and a ``ValueError``) saying why sharing is impossible;
* ``copy=True``: always return an independent copy.

Zero-copy is verified by comparing buffer pointers (``tensor.data_ptr()`` vs
``array.unsafe_buffer_pointer()``), never assumed. There is no silent numpy
fallback: every copy is one this module decides to make, for a reason it can name.

The JAX device is the tensor's device (CPU tensor → JAX CPU device, ``cuda:i``
→ the JAX GPU device with local hardware id ``i``): DLPack carries the device and
the same code runs for CPU and CUDA. GPU behaviour is written for, not tested
here (no GPU on the development machines).

Measured facts this module works around (x86 CPU; jax 0.7.1 + torch 2.9.0 and
jax 0.10.2 + torch 2.13.0):

* **dtypes.** DLPack carries float32, float16, bfloat16, int8, int16, int32,
  uint8 and bool zero-copy both ways on both stacks (int64 too, with
  ``jax_enable_x64``). float8_e4m3fn and float8_e5m2 are zero-copy both ways on
  jax 0.10.2; on jax 0.7.1 DLPack rejects float8 (``BufferError``), so they travel
  as a ``uint8`` view (zero-copy on the torch side) and JAX re-interprets them
  with ``lax.bitcast_convert_type``, which is a copy: there ``copy=False`` raises
  for float8 and ``copy=None`` copies once. What this process's jax does is
  probed once per dtype (:func:`zero_copy_dtypes`).
* **strides.** jax 0.7.1 imports a transposed/permuted tensor zero-copy with
  *wrong values* (it ignores the strides); jax 0.10.2 imports it correctly,
  zero-copy, as an array with a non-default layout. Both reject other strided
  tensors (slices with steps, ``expand``). A probe measures whether this jax
  honours permuted strides; anything it can't read correctly is made contiguous
  first (``copy=None``) or refused (``copy=False``).
* **alignment.** JAX shares CPU memory only at 64-byte alignment
  (``data_ptr() % 64 == 0``); otherwise it copies behind your back (jax 0.7.1
  logs "DLPack buffer is not aligned ... Creating a copy" on every call; 0.10.2
  logged nothing here). Unaligned CPU tensors (e.g. views whose
  ``storage_offset`` is not a multiple of 64 bytes) are copied explicitly here,
  without the log line, or refused with ``copy=False``.
* **capsules.** jax 0.10.2 rejects raw DLPack capsules (it wants an object with
  ``__dlpack__``); this module only ever hands JAX such objects.
* **XLA tensors.** torch_xla's DLPack export works for XLA:CPU tensors only, and
  only for tensors backed by a device buffer of their own (a pending
  computation or view makes it abort the process, so this module first
  executes the tensor's pending graph, which gives a view its own buffer, and
  checks). "Zero-copy" for an XLA tensor means JAX uses that buffer.
  :func:`to_jax` accepts XLA:CPU tensors; on other XLA devices use
  :func:`bridge.call_jax`, which stages JAX code into the XLA graph instead of
  moving data.

Shared memory, what it means for you: after a zero-copy :func:`to_jax`, the JAX
array and the torch tensor are one buffer. A write through torch (``t[0] = 1``,
``t.add_(1)``) is visible in the JAX array. JAX assumes arrays are immutable and
dispatches work asynchronously, so mutate through torch only when no JAX
computation that reads the array is pending (``jax.block_until_ready`` the
results first) and treat the JAX array as "a view that can change under you".
Likewise the torch tensor from a zero-copy :func:`to_torch` aliases a JAX
buffer: writing to it changes the JAX array, which other JAX code believes
immutable; write only to tensors whose JAX array you drop (or pass ``copy=True``).
XLA:CPU tensors are different: in-place torch ops give the XLA tensor a new
buffer, so the JAX array keeps the values of the moment of conversion.

Autograd: :func:`to_jax` detaches (the JAX array has no autograd history).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from bridge._jax_import import guard_xla, jax
from bridge.dtypes import (
    TORCH_TO_JAX_DTYPE,
    check_jax_can_hold,
    dlpack_carrier_dtype,
    jax_to_torch_dtype,
    torch_to_jax_dtype,
)
import jax.numpy as jnp  # noqa: E402  (after the guarded import above)

# XLA:CPU (and so JAX's CPU client) shares host memory only at this alignment.
CPU_ZERO_COPY_ALIGNMENT = 64


class ZeroCopyError(BufferError, ValueError):
    """``copy=False`` was requested but the data cannot be shared; the message says why."""


# --------------------------------------------------------------------------- probes


@functools.cache
def _dlpack_imports_natively(dtype: torch.dtype) -> bool:
    """Probe: does this jax import a CPU torch ``dtype`` tensor through DLPack, zero-copy?"""
    probe = torch.zeros(16, dtype=dtype)  # fresh allocation: 64-byte aligned
    try:
        array = jax.dlpack.from_dlpack(probe)
    except (BufferError, TypeError, ValueError, RuntimeError):
        return False
    return (
        np.dtype(array.dtype) == torch_to_jax_dtype(dtype)
        and array.unsafe_buffer_pointer() == probe.data_ptr()
    )


@functools.cache
def _dlpack_exports_natively(dtype: torch.dtype) -> bool:
    """Probe: does this jax export a CPU array of torch ``dtype``'s twin to torch, zero-copy?"""
    probe = jnp.zeros(16, dtype=torch_to_jax_dtype(dtype))
    try:
        tensor = torch.from_dlpack(probe)
    except (BufferError, TypeError, ValueError, RuntimeError):
        return False
    return tensor.dtype == dtype and tensor.data_ptr() == probe.unsafe_buffer_pointer()


@functools.cache
def _jax_reads_permuted_strides() -> bool:
    """Probe: does this jax import a transposed tensor with the right values?

    jax 0.7.1 does not (it ignores the strides, values come out wrong);
    jax 0.10.2 does (zero-copy, non-default layout).
    """
    transposed = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # f32[3, 2], strides (1, 3)
    try:
        array = jax.dlpack.from_dlpack(transposed)
    except (BufferError, TypeError, ValueError, RuntimeError):
        return False
    return bool(np.array_equal(np.asarray(array), transposed.numpy()))


def zero_copy_dtypes() -> dict[str, list[torch.dtype]]:
    """The table dtypes that DLPack carries zero-copy in this process, per direction.

    Measured (once per dtype, cached) on CPU. int64 is left out unless
    ``jax_enable_x64`` is on. Dtypes not listed still convert, with one copy.
    """
    dtypes = [d for d in TORCH_TO_JAX_DTYPE if d != torch.int64 or jax.config.jax_enable_x64]
    return {
        "torch_to_jax": [d for d in dtypes if _dlpack_imports_natively(d)],
        "jax_to_torch": [d for d in dtypes if _dlpack_exports_natively(d)],
    }


# --------------------------------------------------------------------------- helpers


def _check_copy_arg(copy) -> None:
    if copy is not None and not isinstance(copy, bool):
        raise ValueError(f"{copy=} must be None, True or False")


def _is_dense_permutation(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """True if the strides describe a dense buffer in some dimension order (no gaps, no overlap)."""
    dims = sorted((s, n) for n, s in zip(shape, strides, strict=True) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _zero_copy_obstacles(tensor: torch.Tensor) -> list[str]:
    """Why JAX could not share (or correctly read) this strided CPU/CUDA tensor's memory."""
    if tensor.numel() == 0:
        return []
    reasons = []
    if not tensor.is_contiguous():
        shape, strides = tuple(tensor.shape), tuple(tensor.stride())
        if not _is_dense_permutation(shape, strides):
            reasons.append(
                f"its strides {strides} for shape {shape} are not dense (gaps or broadcasting); "
                f"DLPack import in JAX accepts only dense, possibly permuted, strides"
            )
        elif not _jax_reads_permuted_strides():
            reasons.append(
                f"its strides {strides} for shape {shape} are permuted and jax "
                f"{jax.__version__} misreads permuted DLPack strides (wrong values)"
            )
    if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ZERO_COPY_ALIGNMENT:
        reasons.append(
            f"its data pointer is {tensor.data_ptr() % CPU_ZERO_COPY_ALIGNMENT} bytes past a "
            f"{CPU_ZERO_COPY_ALIGNMENT}-byte boundary (storage_offset={tensor.storage_offset()}); "
            f"JAX shares CPU memory only at {CPU_ZERO_COPY_ALIGNMENT}-byte alignment"
        )
    return reasons


def _copy_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """A fresh row-major copy (fresh allocations are 64-byte aligned)."""
    return tensor.clone(memory_format=torch.contiguous_format)


def _reinterpret_jax(array, dtype: np.dtype):
    """Re-interpret a same-width integer JAX array as ``dtype``. A JAX computation: a copy."""
    if dtype == np.dtype(bool):
        return array != 0
    return jax.lax.bitcast_convert_type(array, dtype)


def _carrier_jax(array, carrier: torch.dtype):
    """Re-interpret a JAX array as the same-width integer torch ``carrier``. A JAX computation: a copy."""
    carrier_jax = torch_to_jax_dtype(carrier)
    if array.dtype == np.dtype(bool):
        return array.astype(carrier_jax)
    return jax.lax.bitcast_convert_type(array, carrier_jax)


class _CapsuleHolder:
    """Hands a DLPack capsule to JAX as an object with ``__dlpack__`` (jax 0.10.2 rejects raw capsules)."""

    def __init__(self, capsule, device: tuple[int, int]):
        self._capsule = capsule
        self._device = device

    def __dlpack__(self, *args, **kwargs):
        capsule, self._capsule = self._capsule, None
        if capsule is None:
            raise BufferError("this DLPack capsule was already consumed")
        return capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._device


_DLPACK_CPU_DEVICE = (1, 0)  # (kDLCPU, 0)


# --------------------------------------------------------------------------- torch → JAX


def to_jax(tensor: torch.Tensor, *, copy: bool | None = None):
    """Convert a torch tensor to a JAX array on the matching device.

    ``copy=None`` shares memory when possible, else copies once; ``copy=False``
    shares or raises :class:`ZeroCopyError` naming the reason (non-dense or
    misread strides, a CPU pointer not 64-byte aligned, a dtype this jax's
    DLPack does not carry, an XLA tensor without its own device buffer);
    ``copy=True`` always returns an independent copy.

    CPU and CUDA tensors (CUDA needs a JAX GPU backend) and XLA:CPU tensors are
    accepted. XLA tensors are first materialized (their pending graph is
    executed); on other XLA devices this raises: use :func:`bridge.call_jax`.
    Raises ``TypeError`` for dtypes outside the table (and int64 without
    ``jax_enable_x64``). The result is detached from autograd. See the module
    docstring for what shared memory means for writes.
    """
    _check_copy_arg(copy)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"to_jax expects a torch.Tensor, got {type(tensor).__name__}")
    check_jax_can_hold(tensor.dtype)
    if tensor.layout != torch.strided:
        raise ValueError(f"to_jax supports strided (dense) tensors only, got layout {tensor.layout}")
    tensor = tensor.detach()
    if tensor.device.type == "xla":
        return _xla_tensor_to_jax(tensor, copy)
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"to_jax supports cpu, cuda and XLA:CPU tensors, got a tensor on {tensor.device}"
        )

    expected_device = jax_device_for(tensor.device)
    target = torch_to_jax_dtype(tensor.dtype)
    layout_obstacles = _zero_copy_obstacles(tensor)
    native = _dlpack_imports_natively(tensor.dtype)
    obstacles = list(layout_obstacles)
    if not native:
        obstacles.append(
            f"DLPack in jax {jax.__version__} does not carry {tensor.dtype}; it travels as "
            f"{dlpack_carrier_dtype(tensor.dtype)} and JAX re-interprets it with a copy"
        )
    if copy is False and obstacles:
        raise ZeroCopyError(
            f"to_jax(copy=False) cannot share the memory of this {tensor.dtype} tensor on "
            f"{tensor.device}: " + "; ".join(obstacles)
        )

    # The torch-side copy: needed to fix the layout/alignment, or asked for with
    # copy=True (unless the JAX-side re-interpretation below copies anyway).
    source = tensor
    if layout_obstacles or (copy is True and native):
        source = _copy_contiguous(tensor)

    if native:
        try:
            array = jax.dlpack.from_dlpack(source)
        except (BufferError, TypeError, ValueError, RuntimeError) as err:
            refused = (
                f"jax {jax.__version__} refused this {tensor.dtype} tensor on {tensor.device} "
                f"(shape {tuple(source.shape)}, strides {source.stride()}): {err}"
            )
            if source.is_contiguous():
                raise ValueError(f"to_jax: {refused}") from err
            if copy is False:
                raise ZeroCopyError(f"to_jax(copy=False): {refused}") from err
            source = _copy_contiguous(source)  # an unforeseen stride rule: copy, named here
            array = jax.dlpack.from_dlpack(source)
        if copy is False and source.numel() and array.unsafe_buffer_pointer() != source.data_ptr():
            raise ZeroCopyError(
                f"to_jax(copy=False): JAX copied the {tensor.dtype} tensor on {tensor.device} "
                f"although no known obstacle applied (pointers differ)"
            )
    else:
        carrier = source.view(dlpack_carrier_dtype(tensor.dtype))  # zero-copy re-interpretation
        array = _reinterpret_jax(jax.dlpack.from_dlpack(carrier), target)
    if array.devices() != {expected_device}:
        raise ValueError(
            f"to_jax: the JAX array landed on {array.devices()}, not on {expected_device} "
            f"matching {tensor.device}"
        )
    return array


def jax_device_for(device: torch.device):
    """The JAX device that matches a torch CPU or CUDA device; ``ValueError`` if JAX has none.

    ``cpu`` → JAX's first CPU device; ``cuda:i`` → the JAX GPU device whose local
    hardware id is ``i`` (needs a GPU build of jax, e.g. ``jax[cuda12]``).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return jax.devices("cpu")[0]
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        for candidate in gpus:
            if candidate.local_hardware_id == index:
                return candidate
        raise ValueError(
            f"JAX has no GPU device for torch device {device} (JAX GPU devices: {gpus}); "
            f"install a CUDA build of jax (jax[cuda12]) to convert CUDA tensors"
        )
    raise ValueError(f"no JAX device matches torch device {device} (cpu and cuda are supported)")


def _xla_tensor_to_jax(tensor: torch.Tensor, copy: bool | None):
    """XLA:CPU tensor → JAX CPU array through torch_xla's own DLPack export."""
    import torch_xla
    import torch_xla.runtime as xr

    guard_xla()  # before JAX first works on an XLA tensor (see bridge._jax_import)

    device_type = xr.device_type()
    if device_type != "CPU":
        raise ValueError(
            f"to_jax accepts XLA tensors only on XLA:CPU (torch_xla's DLPack export works only "
            f"there), got one on {tensor.device} ({device_type}); use bridge.call_jax to run JAX "
            f"code on XLA tensors inside the XLA graph"
        )
    if copy is True:
        return to_jax(tensor.cpu(), copy=None)  # .cpu() is the copy; the result is fresh and aligned

    torch_xla._XLAC._xla_sync_multi([tensor], [], wait=True)  # execute the tensor's pending graph
    reasons = []
    try:
        pointer = torch_xla._XLAC._unsafe_buffer_pointer(tensor)
    except RuntimeError as err:
        pointer = None
        reasons.append(f"it is not backed by its own device buffer (a pending view?): {err}")
    capsule = None
    if pointer is not None:
        try:
            capsule = torch_xla._XLAC._to_dlpack(tensor)
        except RuntimeError as err:
            reasons.append(f"torch_xla cannot export it through DLPack: {err}")
    if reasons:
        if copy is False:
            raise ZeroCopyError(
                f"to_jax(copy=False) cannot share the memory of this {tensor.dtype} tensor on "
                f"{tensor.device}: " + "; ".join(reasons)
            )
        return to_jax(tensor.cpu(), copy=None)
    try:
        array = jax.dlpack.from_dlpack(_CapsuleHolder(capsule, _DLPACK_CPU_DEVICE))
    except (BufferError, TypeError, ValueError, RuntimeError) as err:
        if copy is False:
            raise ZeroCopyError(
                f"to_jax(copy=False): jax {jax.__version__} cannot import this {tensor.dtype} "
                f"XLA:CPU tensor through DLPack: {err}"
            ) from err
        return to_jax(tensor.cpu(), copy=None)
    if copy is False and tensor.numel() and array.unsafe_buffer_pointer() != pointer:
        raise ZeroCopyError(
            f"to_jax(copy=False): JAX copied the {tensor.dtype} XLA:CPU tensor (pointers differ)"
        )
    return array


# --------------------------------------------------------------------------- JAX → torch


def to_torch(array, *, copy: bool | None = None) -> torch.Tensor:
    """Convert a JAX array to a torch tensor on the matching device (CPU or CUDA).

    ``copy`` as in :func:`to_jax`: ``None`` shares the JAX buffer when possible
    (the tensor then aliases an "immutable" JAX array: see the module docstring
    before writing to it), ``False`` shares or raises :class:`ZeroCopyError`,
    ``True`` returns an independent contiguous copy. Arrays with a non-default
    layout (jax 0.10.2 transposed imports) come back as strided tensors.

    Raises ``TypeError`` for a non-array or a dtype outside the table and
    ``ValueError`` for arrays split over several devices or on a device torch
    cannot import from (TPU: use :func:`bridge.call_jax`).
    """
    _check_copy_arg(copy)
    if not isinstance(array, jax.Array) or isinstance(array, jax.core.Tracer):
        raise TypeError(f"to_torch expects a concrete jax.Array, got {type(array).__name__}")
    dtype = jax_to_torch_dtype(array.dtype)
    if array.is_deleted():
        raise ValueError("to_torch got a deleted (donated) jax.Array")
    devices = array.devices()
    if len(devices) != 1:
        raise ValueError(
            f"to_torch needs an array on one device, got one sharded over {len(devices)} devices; "
            f"gather it first"
        )
    platform = next(iter(devices)).platform
    if platform not in ("cpu", "gpu", "cuda"):
        raise ValueError(
            f"to_torch supports JAX arrays on cpu and gpu, got one on {platform}; "
            f"for TPU use bridge.call_jax with XLA tensors"
        )

    if not _dlpack_exports_natively(dtype):
        if copy is False:
            raise ZeroCopyError(
                f"to_torch(copy=False): DLPack in jax {jax.__version__} does not carry "
                f"{array.dtype}; it travels as {dlpack_carrier_dtype(dtype)} after a JAX-side copy"
            )
        carrier = _carrier_jax(array, dlpack_carrier_dtype(dtype))
        return torch.from_dlpack(carrier).view(dtype)  # the JAX-side bitcast was the copy

    tensor = torch.from_dlpack(array)
    if copy is True:
        return _copy_contiguous(tensor)
    if copy is False and tensor.numel() and tensor.data_ptr() != array.unsafe_buffer_pointer():
        raise ZeroCopyError(
            f"to_torch(copy=False): torch copied the {array.dtype} array (pointers differ)"
        )
    return tensor
