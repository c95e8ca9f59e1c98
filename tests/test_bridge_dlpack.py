"""bridge.to_jax / bridge.to_torch: zero-copy proven by buffer pointers, copies where promised."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import bridge
from bridge import dlpack as bdl
from bridge.dtypes import dlpack_carrier_dtype, torch_to_jax_dtype
import jax
import jax.numpy as jnp

# Facts measured on the two supported stacks (x86 CPU). Other versions fall
# back to this process's probes, so the remaining assertions still apply.
MEASURED = {
    "0.7.1": {"float8_over_dlpack": False, "reads_permuted_strides": False},
    "0.10.2": {"float8_over_dlpack": True, "reads_permuted_strides": True},
}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.uint8,
    torch.bool,
]


def measured(fact: str) -> bool:
    if jax.__version__ in MEASURED:
        return MEASURED[jax.__version__][fact]
    if fact == "float8_over_dlpack":
        return bdl._dlpack_imports_natively(torch.float8_e4m3fn)
    return bdl._jax_reads_permuted_strides()


def zero_copy_expected(dtype: torch.dtype) -> bool:
    return dtype not in FLOAT8 or measured("float8_over_dlpack")


def random_tensor(dtype: torch.dtype, shape=(4, 8, 16), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    carrier = dlpack_carrier_dtype(dtype)
    info = torch.iinfo(carrier)
    raw = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(carrier)
    return raw.view(dtype)  # any bit pattern, NaNs included


def bits_of_tensor(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(dlpack_carrier_dtype(t.dtype)).numpy()


def bits_of_array(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a.view(np.uint8)
    return a.view(np.dtype(f"i{a.dtype.itemsize}") if a.dtype.itemsize > 1 else np.uint8)


def same_bits(t: torch.Tensor, a) -> bool:
    tb, ab = bits_of_tensor(t), bits_of_array(a)
    return tb.shape == ab.shape and np.array_equal(tb.view(ab.dtype), ab)


def shares(t: torch.Tensor, a) -> bool:
    return t.data_ptr() == a.unsafe_buffer_pointer()


# --------------------------------------------------------------------------- measured facts


def test_zero_copy_dtypes_match_measurements():
    table = bridge.zero_copy_dtypes()
    expected = [d for d in DTYPES if zero_copy_expected(d)]
    assert table["torch_to_jax"] == expected
    assert table["jax_to_torch"] == expected


def test_trap_jax_misreads_permuted_strides():
    """The raw jax import of a transposed tensor: wrong values on jax 0.7.1, right on 0.10.2."""
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    raw = jax.dlpack.from_dlpack(t)
    assert shares(t, raw)  # zero-copy either way
    assert np.array_equal(np.asarray(raw), t.numpy()) == measured("reads_permuted_strides")


def test_trap_raw_capsules():
    """jax 0.10.2 rejects raw DLPack capsules; the bridge's holder object works everywhere."""
    t = torch.arange(64, dtype=torch.float32)
    if jax.__version__ == "0.10.2":
        with pytest.raises(TypeError, match="__dlpack__"):
            jax.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t))
    holder = bdl._CapsuleHolder(torch.utils.dlpack.to_dlpack(t), bdl._DLPACK_CPU_DEVICE)
    a = jax.dlpack.from_dlpack(holder)
    assert shares(t, a)
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    with pytest.raises(BufferError, match="consumed"):
        holder.__dlpack__()


# --------------------------------------------------------------------------- every dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_to_jax_every_dtype(dtype):
    t = random_tensor(dtype)
    a = bridge.to_jax(t)
    assert np.dtype(a.dtype) == torch_to_jax_dtype(dtype)
    assert same_bits(t, a)
    assert shares(t, a) == zero_copy_expected(dtype)

    if zero_copy_expected(dtype):
        assert shares(t, bridge.to_jax(t, copy=False))
    else:
        with pytest.raises(bridge.ZeroCopyError, match="does not carry"):
            bridge.to_jax(t, copy=False)

    c = bridge.to_jax(t, copy=True)
    assert not shares(t, c) and same_bits(t, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_to_torch_every_dtype(dtype):
    a = bridge.to_jax(random_tensor(dtype, seed=1), copy=True)
    t = bridge.to_torch(a)
    assert t.dtype == dtype and t.device.type == "cpu"
    assert same_bits(t, a)
    assert shares(t, a) == zero_copy_expected(dtype)

    if zero_copy_expected(dtype):
        assert shares(bridge.to_torch(a, copy=False), a)
    else:
        with pytest.raises(bridge.ZeroCopyError, match="does not carry"):
            bridge.to_torch(a, copy=False)

    c = bridge.to_torch(a, copy=True)
    assert not shares(c, a) and same_bits(c, a)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_dtype(dtype):
    t = random_tensor(dtype, seed=2)
    back = bridge.to_torch(bridge.to_jax(t))
    assert back.dtype == dtype and torch.equal(back.view(dlpack_carrier_dtype(dtype)), t.view(dlpack_carrier_dtype(dtype)))
    # Both directions zero-copy: the round trip lands on the original buffer.
    assert (back.data_ptr() == t.data_ptr()) == zero_copy_expected(dtype)


def test_int64_round_trip_with_x64(jax_x64):
    t = torch.arange(-5, 59, dtype=torch.int64) * (2**40)
    a = bridge.to_jax(t, copy=False)
    assert a.dtype == jnp.int64 and shares(t, a)
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    back = bridge.to_torch(a, copy=False)
    assert back.dtype == torch.int64 and back.data_ptr() == t.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16], ids=str)
def test_carrier_path_when_dlpack_lacks_a_dtype(monkeypatch, dtype):
    """The same-width integer transport, forced for dtypes this stack carries natively."""
    monkeypatch.setattr(bdl, "_dlpack_imports_natively", lambda d: False)
    monkeypatch.setattr(bdl, "_dlpack_exports_natively", lambda d: False)
    t = random_tensor(dtype, seed=3)
    a = bridge.to_jax(t)
    assert np.dtype(a.dtype) == torch_to_jax_dtype(dtype) and same_bits(t, a) and not shares(t, a)
    with pytest.raises(bridge.ZeroCopyError, match="does not carry"):
        bridge.to_jax(t, copy=False)
    back = bridge.to_torch(a)
    assert back.dtype == dtype and same_bits(back, a) and not shares(back, a)
    with pytest.raises(bridge.ZeroCopyError, match="does not carry"):
        bridge.to_torch(a, copy=False)
    # Non-contiguous input on the carrier path: layout copy, then re-interpretation.
    tt = t.transpose(0, 2)
    assert same_bits(tt, bridge.to_jax(tt))


# --------------------------------------------------------------------------- strides


def _strided_cases():
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    return {
        "transposed": (base[0, 0].t(), True),
        "permuted": (base.permute(3, 1, 0, 2), True),
        "stepped": (base[:, :, ::2], False),
        "expanded": (torch.arange(5.0).expand(4, 5), False),
        "split_kv_view": (bridge.split_kv(base.reshape(6, 4, 5))[1], False),
        "narrowed_inner": (base[..., 1:4], False),
    }


@pytest.mark.parametrize("case", list(_strided_cases()))
def test_non_contiguous_values_are_right(case):
    t, dense = _strided_cases()[case]
    assert not t.is_contiguous()
    a = bridge.to_jax(t)
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    zero_copy = dense and measured("reads_permuted_strides")
    assert shares(t, a) == zero_copy
    if zero_copy:
        b = bridge.to_jax(t, copy=False)
        assert shares(t, b)
        np.testing.assert_array_equal(np.asarray(b), t.numpy())
        # Non-default layouts come back to torch as strided tensors, zero-copy.
        back = bridge.to_torch(b, copy=False)
        assert back.data_ptr() == t.data_ptr() and torch.equal(back, t)
    else:
        why = "misreads permuted" if dense else "not dense"
        with pytest.raises(bridge.ZeroCopyError, match=why):
            bridge.to_jax(t, copy=False)
    # jit on the result computes with the right values too.
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: x * 2)(a)), (t * 2).numpy())


def test_strides_jax_refuses_unexpectedly_are_copied_or_refused(monkeypatch):
    """A stride rule the bridge does not know about (e.g. on another jax or device)."""
    real = jax.dlpack.from_dlpack

    def strict(x, *args, **kwargs):
        if not x.is_contiguous():
            raise RuntimeError("UNIMPLEMENTED: pretend this layout is unsupported")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(jax.dlpack, "from_dlpack", strict)
    monkeypatch.setattr(bdl, "_jax_reads_permuted_strides", lambda: True)
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    a = bridge.to_jax(t)
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    assert not shares(t, a)
    with pytest.raises(bridge.ZeroCopyError, match="pretend"):
        bridge.to_jax(t, copy=False)


def test_non_contiguous_float8():
    t = random_tensor(torch.float8_e5m2, (8, 16)).t()
    assert same_bits(t, bridge.to_jax(t))


# --------------------------------------------------------------------------- offsets, alignment


def test_aligned_offset_view_is_zero_copy():
    base = torch.arange(256, dtype=torch.float32)
    assert base.data_ptr() % 64 == 0
    t = base[16:80]  # 16 floats = 64 bytes in
    assert t.storage_offset() == 16 and t.data_ptr() % 64 == 0
    a = bridge.to_jax(t, copy=False)
    assert shares(t, a)
    np.testing.assert_array_equal(np.asarray(a), t.numpy())


@pytest.mark.parametrize("offset", [1, 3, 8])
def test_unaligned_offset_view_is_copied_explicitly(offset, monkeypatch, capfd):
    base = torch.arange(256, dtype=torch.float32)
    t = base[offset : offset + 64]
    assert t.data_ptr() % 64 != 0
    with pytest.raises(bridge.ZeroCopyError, match="64-byte"):
        bridge.to_jax(t, copy=False)

    handed_to_jax = []
    real = jax.dlpack.from_dlpack

    def spy(x, *args, **kwargs):
        handed_to_jax.append(x.data_ptr() % 64)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(jax.dlpack, "from_dlpack", spy)
    a = bridge.to_jax(t)
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    assert not shares(t, a)
    assert handed_to_jax == [0]  # only the aligned copy reached JAX
    assert "not aligned" not in capfd.readouterr().err


def test_trap_jax_copies_unaligned_silently(capfd):
    """The raw import of an unaligned tensor copies (jax 0.7.1 logs a warning each time)."""
    base = torch.arange(256, dtype=torch.float32)
    t = base[1:65]
    a = jax.dlpack.from_dlpack(t)
    assert not shares(t, a)
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    if jax.__version__ == "0.7.1":
        assert "not aligned" in capfd.readouterr().err


def test_offset_view_of_2d_tensor_with_stride():
    base = torch.arange(40 * 16, dtype=torch.float16).reshape(40, 16)
    t = base[4:36]  # rows 4.. at 4*16*2 = 128 bytes: aligned, contiguous
    assert shares(t, bridge.to_jax(t, copy=False))
    u = base[1:33]  # 32 bytes in: unaligned
    a = bridge.to_jax(u)
    assert not shares(u, a)
    np.testing.assert_array_equal(np.asarray(a).astype(np.float32), u.float().numpy())


# --------------------------------------------------------------------------- shared memory


def test_torch_write_after_import_is_visible_in_jax():
    t = torch.zeros(64, dtype=torch.float32)
    shared = bridge.to_jax(t)
    copied = bridge.to_jax(t, copy=True)
    t[3] = 7.0
    t.add_(1.0)
    assert float(shared[3]) == 8.0 and float(shared[0]) == 1.0
    assert float(copied[3]) == 0.0


def test_write_to_zero_copy_to_torch_result_changes_the_jax_array():
    a = jnp.arange(64, dtype=jnp.float32) * 1
    t = bridge.to_torch(a)
    t[0] = 100.0
    assert float(a[0]) == 100.0  # why the docstring says: write only to tensors whose array you drop
    c = bridge.to_torch(a, copy=True)
    c[1] = -1.0
    assert float(a[1]) == 1.0


def test_requires_grad_tensor_is_detached_and_shared():
    p = torch.nn.Parameter(torch.ones(64))
    a = bridge.to_jax(p, copy=False)
    assert shares(p, a)


def test_zero_size_and_scalar():
    for t in (torch.zeros(0, 3), torch.tensor(2.5)):
        a = bridge.to_jax(t, copy=False)
        assert a.shape == tuple(t.shape)
        back = bridge.to_torch(a)
        assert back.shape == t.shape and torch.equal(back, t)


# --------------------------------------------------------------------------- argument errors


def test_bad_arguments():
    with pytest.raises(ValueError, match="copy="):
        bridge.to_jax(torch.zeros(4), copy="yes")
    with pytest.raises(ValueError, match="copy="):
        bridge.to_torch(jnp.zeros(4), copy=1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        bridge.to_jax(np.zeros(4))
    with pytest.raises(TypeError, match="jax.Array"):
        bridge.to_torch(np.zeros(4))
    with pytest.raises(ValueError, match="meta"):
        bridge.to_jax(torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="strided"):
        bridge.to_jax(torch.zeros(4, 4).to_sparse())


def test_jax_device_for():
    assert bdl.jax_device_for(torch.device("cpu")) == jax.devices("cpu")[0]
    if not _jax_has_gpu():
        with pytest.raises(ValueError, match=r"no GPU device for torch device cuda:0"):
            bdl.jax_device_for(torch.device("cuda", 0))
    with pytest.raises(ValueError, match="mps"):
        bdl.jax_device_for(torch.device("mps"))


def test_to_torch_rejects_tracers_and_deleted_arrays():
    def f(x):
        bridge.to_torch(x)
        return x

    with pytest.raises(TypeError, match="concrete"):
        jax.jit(f)(jnp.zeros(3))
    a = jnp.zeros(3) + 1
    a.delete()
    with pytest.raises(ValueError, match="deleted"):
        bridge.to_torch(a)


def test_to_torch_rejects_sharded_arrays():
    code = textwrap.dedent(
        """
        import sys, os
        sys.path.insert(0, os.getcwd())
        sys.modules["torch_xla"] = None  # not needed here; skips its 4 s import
        import bridge, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec, Mesh
        mesh = Mesh(np.array(jax.devices("cpu")[:2]), ("x",))
        a = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, PartitionSpec("x")))
        try:
            bridge.to_torch(a)
        except ValueError as e:
            print("RAISED", e)
        """
    )
    env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]), timeout=120,
    )
    assert "RAISED" in out.stdout and "2 devices" in out.stdout, out.stderr[-2000:]


# --------------------------------------------------------------------------- XLA:CPU tensors


def _xla_pointer(t):
    import torch_xla

    return torch_xla._XLAC._unsafe_buffer_pointer(t)


def test_xla_cpu_tensor_to_jax_is_zero_copy(xla_device):
    x = torch.arange(64, dtype=torch.float32, device=xla_device) * 2  # pending graph
    a = bridge.to_jax(x, copy=False)
    assert a.unsafe_buffer_pointer() == _xla_pointer(x)
    np.testing.assert_array_equal(np.asarray(a), np.arange(64) * 2)
    c = bridge.to_jax(x, copy=True)
    assert c.unsafe_buffer_pointer() != _xla_pointer(x)
    np.testing.assert_array_equal(np.asarray(c), np.arange(64) * 2)


def test_xla_inplace_update_after_import_is_not_visible(xla_device):
    x = torch.arange(64, dtype=torch.float32, device=xla_device) + 0
    a = bridge.to_jax(x, copy=False)
    x.add_(1)
    import torch_xla

    torch_xla.sync()
    assert float(x[0].cpu()) == 1.0
    assert float(a[0]) == 0.0  # XLA gave x a new buffer; JAX keeps the old one


def test_xla_view_is_materialized_into_its_own_buffer(xla_device):
    import torch_xla

    x = torch.arange(64, dtype=torch.float32, device=xla_device) + 0
    torch_xla.sync()
    view = x.reshape(8, 8)[:, ::2]
    a = bridge.to_jax(view, copy=False)
    assert a.unsafe_buffer_pointer() == _xla_pointer(view) != _xla_pointer(x)
    np.testing.assert_array_equal(np.asarray(a), np.arange(64).reshape(8, 8)[:, ::2])


def test_xla_tensor_without_own_buffer_is_refused_not_crashed(xla_device, monkeypatch):
    """Without materialization torch_xla's DLPack export aborts the process; the bridge checks first."""
    import torch_xla

    x = torch.arange(64, dtype=torch.float32, device=xla_device) + 0
    torch_xla.sync()
    view = x.reshape(8, 8)
    monkeypatch.setattr(torch_xla._XLAC, "_xla_sync_multi", lambda *args, **kwargs: None)
    with pytest.raises(bridge.ZeroCopyError, match="own device buffer"):
        bridge.to_jax(view, copy=False)
    np.testing.assert_array_equal(np.asarray(bridge.to_jax(view)), np.arange(64).reshape(8, 8))


def test_xla_float8_is_copied(xla_device):
    t = random_tensor(torch.float8_e4m3fn, (4, 16))
    x = t.to(xla_device)
    with pytest.raises(bridge.ZeroCopyError):
        bridge.to_jax(x, copy=False)
    assert same_bits(t, bridge.to_jax(x))


def test_xla_on_non_cpu_device_points_to_call_jax(xla_device, monkeypatch):
    import torch_xla.runtime as xr

    monkeypatch.setattr(xr, "device_type", lambda: "TPU")
    with pytest.raises(ValueError, match="call_jax"):
        bridge.to_jax(torch.zeros(4, device=xla_device))


# --------------------------------------------------------------------------- CUDA


def _jax_has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _jax_has_gpu()),
    reason="needs a CUDA GPU visible to both torch and JAX (none on this machine)",
)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_round_trip(dtype):
    t = random_tensor(dtype).cuda()
    a = bridge.to_jax(t)
    (device,) = a.devices()
    assert device.platform == "gpu" and device.local_hardware_id == t.device.index
    assert shares(t, a) == zero_copy_expected(dtype)
    back = bridge.to_torch(a)
    assert back.device == t.device and torch.equal(back.view(dlpack_carrier_dtype(dtype)), t.view(dlpack_carrier_dtype(dtype)))
    tt = t.view(-1)[:64].view(8, 8).t()
    np.testing.assert_array_equal(bits_of_array(bridge.to_jax(tt)), bits_of_tensor(tt.cpu()))
