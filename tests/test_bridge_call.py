"""bridge.call_jax on CPU tensors and on PyTorch/XLA tensors; the JAX import guard."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import bridge
import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def add_and_scale(x, y, *, scale):
    return x * scale + y


# --------------------------------------------------------------------------- eager (CPU)


def test_cpu_values_dtype_device():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    y = torch.ones(3, 4)
    out = bridge.call_jax(add_and_scale, x, y, scale=3)
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.dtype == torch.float32
    torch.testing.assert_close(out, x * 3 + y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8, torch.bool], ids=str)
def test_cpu_dtypes_round_trip(dtype):
    t = torch.arange(16).reshape(4, 4).to(dtype)
    out = bridge.call_jax(lambda a: jnp.flip(a, axis=0), t)
    assert out.dtype == dtype
    assert torch.equal(out.float(), t.float().flip(0))


def test_cpu_pytrees_in_and_out():
    def fn(pair, table, *, extra=None, mode):
        a, b = pair
        assert extra is None and mode == "sum"
        return {"sum": a + b, "stack": [table["k"] * 2, (table["v"],)]}

    a, b = torch.ones(4), torch.arange(4.0)
    k, v = torch.full((2, 2), 3.0), torch.zeros(2, 2)
    out = bridge.call_jax(fn, (a, b), {"k": k, "v": v}, extra=None, mode="sum")
    assert set(out) == {"sum", "stack"}
    torch.testing.assert_close(out["sum"], a + b)
    assert isinstance(out["stack"], list) and isinstance(out["stack"][1], tuple)
    torch.testing.assert_close(out["stack"][0], k * 2)
    torch.testing.assert_close(out["stack"][1][0], v)


def test_cpu_static_arguments_and_dtype_leaves():
    def fn(x, n, dtype, label):
        assert isinstance(n, int) and label == "ok"
        assert dtype == jnp.bfloat16  # torch.dtype leaves arrive as JAX dtypes
        return jnp.tile(x, n).astype(dtype)

    out = bridge.call_jax(fn, torch.arange(3.0), 2, torch.bfloat16, "ok")
    assert out.dtype == torch.bfloat16 and out.tolist() == [0, 1, 2, 0, 1, 2]


def test_cpu_tensor_position_is_part_of_the_key():
    def fn(a, b):
        return jnp.asarray(a) - jnp.asarray(b)

    t = torch.tensor([10.0])
    assert bridge.call_jax(fn, t, 1).item() == 9.0
    assert bridge.call_jax(fn, 1, t).item() == -9.0


def test_cpu_inputs_are_shared_not_copied(monkeypatch):
    seen = []
    real = bridge.call.to_jax

    def spy(t, *, copy=None):
        a = real(t, copy=copy)
        seen.append(a.unsafe_buffer_pointer() == t.data_ptr())
        return a

    monkeypatch.setattr(bridge.call, "to_jax", spy)
    x = torch.arange(64, dtype=torch.float32)
    out = bridge.call_jax(lambda a: a + 1, x)
    assert seen == [True]
    torch.testing.assert_close(out, x + 1)
    # The output is a fresh buffer: writing it leaves the input alone.
    out.zero_()
    assert x[5].item() == 5.0


def test_cpu_non_contiguous_and_unaligned_inputs():
    base = torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8)
    out = bridge.call_jax(lambda a, b: (a, b * 1), base.t(), base.view(-1)[1:9])
    torch.testing.assert_close(out[0], base.t())
    torch.testing.assert_close(out[1], base.view(-1)[1:9])


# --------------------------------------------------------------------------- trace cache


def test_trace_counting_per_function_shape_and_static_value():
    traces = []

    def fn(x, *, power):
        traces.append(tuple(x.shape))
        return x**power

    x = torch.arange(4.0)
    for _ in range(3):
        bridge.call_jax(fn, x, power=2)
    assert len(traces) == 1  # cached
    bridge.call_jax(fn, torch.arange(4.0) + 1, power=2)
    assert len(traces) == 1  # new values, same shape/dtype: cached
    bridge.call_jax(fn, torch.arange(5.0), power=2)
    assert len(traces) == 2  # new shape
    bridge.call_jax(fn, x.to(torch.float16), power=2)
    assert len(traces) == 3  # new dtype
    out = bridge.call_jax(fn, x, power=3)
    assert len(traces) == 4  # new static value
    torch.testing.assert_close(out, x**3)
    bridge.call_jax(fn, x, power=2)
    assert len(traces) == 4


def test_closure_redefined_every_call_retraces():
    traces = []

    def step(x, k):
        def local(a):  # a new function object on every call
            traces.append(1)
            return a + k

        return bridge.call_jax(local, x)

    x = torch.zeros(3)
    for k in range(3):
        assert step(x, k).tolist() == [k] * 3
    assert len(traces) == 3

    traces.clear()

    def shared(a, k):  # defined once; k passed as a static argument
        traces.append(1)
        return a + k

    for _ in range(3):
        bridge.call_jax(shared, x, 1)
    assert len(traces) == 1


def test_clear_cache_forces_a_retrace():
    traces = []

    def fn(x):
        traces.append(1)
        return -x

    bridge.call_jax(fn, torch.ones(2))
    bridge.clear_cache()
    bridge.call_jax(fn, torch.ones(2))
    assert len(traces) == 2


def test_output_structure_may_depend_on_shape():
    def fn(x):
        return (x, x + 1) if x.shape[0] == 2 else {"only": x * 10}

    assert isinstance(bridge.call_jax(fn, torch.ones(2)), tuple)
    assert set(bridge.call_jax(fn, torch.ones(3))) == {"only"}
    assert isinstance(bridge.call_jax(fn, torch.ones(2)), tuple)


# --------------------------------------------------------------------------- errors


def test_errors_name_the_problem():
    x = torch.ones(3)
    with pytest.raises(TypeError, match="callable"):
        bridge.call_jax("not a function", x)
    with pytest.raises(ValueError, match="at least one torch.Tensor"):
        bridge.call_jax(lambda n: jnp.zeros(n), 3)
    with pytest.raises(ValueError, match="one device"):
        bridge.call_jax(lambda a, b: a, x, torch.ones(3, device="meta"))
    with pytest.raises(TypeError, match=r"args\[1\].*not hashable"):
        bridge.call_jax(lambda a, b: a, x, np.zeros(3))
    with pytest.raises(TypeError, match="JAX array"):
        bridge.call_jax(lambda a, b: a + b, x, jnp.ones(3))
    with pytest.raises(TypeError, match="float64"):
        bridge.call_jax(lambda a: a, x.double())
    with pytest.raises(RuntimeError, match="no_grad"):
        bridge.call_jax(lambda a: a, torch.ones(3, requires_grad=True))
    with torch.no_grad():
        bridge.call_jax(lambda a: a, torch.ones(3, requires_grad=True))


def test_int64_argument_error_names_the_argument():
    if jax.config.jax_enable_x64:
        pytest.skip("jax_enable_x64 is on in this process")
    with pytest.raises(TypeError, match=r"argument block_table.*jax_enable_x64"):
        bridge.call_jax(lambda x, block_table: x, torch.ones(2), block_table=torch.zeros(2, 3, dtype=torch.int64))


# --------------------------------------------------------------------------- PyTorch/XLA


def test_xla_values_and_device(xla_device):
    x = torch.arange(12, dtype=torch.float32, device=xla_device).reshape(3, 4)
    y = torch.ones(3, 4, device=xla_device)
    out = bridge.call_jax(add_and_scale, x, y, scale=3)
    assert out.device.type == "xla"
    torch.testing.assert_close(out.cpu(), (x.cpu() * 3 + y.cpu()))


def test_xla_is_staged_without_transfer_or_execution(xla_device):
    import torch_xla
    import torch_xla.debug.metrics as met

    x = torch.arange(64, dtype=torch.float32, device=xla_device).reshape(8, 8)
    torch_xla.sync()
    bridge.call_jax(lambda a: jnp.sin(a) @ a, x)  # warm the trace cache
    met.clear_all()
    out = bridge.call_jax(lambda a: jnp.sin(a) @ a, x)  # a new lambda: traced, still staged
    out2 = bridge.call_jax(add_and_scale, out, x, scale=2)
    assert "TransferFromDeviceTime" not in met.metric_names()
    assert "ExecuteComputation" not in met.counter_names()
    assert not [c for c in met.counter_names() if c.startswith("aten::")]
    expected = (np.sin(np.arange(64.0).reshape(8, 8)) @ np.arange(64.0).reshape(8, 8)) * 2 + np.arange(64.0).reshape(8, 8)
    np.testing.assert_allclose(out2.cpu().numpy(), expected, rtol=1e-4)


def test_xla_pytrees_and_trace_counting(xla_device):
    traces = []

    def fn(kv, *, scale, offset):
        traces.append(1)
        k, v = kv
        return {"k": k * scale, "v": v + offset, "both": (k + v,)}

    k = torch.ones(2, 4, device=xla_device)
    v = torch.zeros(2, 4, device=xla_device)
    for _ in range(3):
        out = bridge.call_jax(fn, (k, v), scale=2.0, offset=1)
    assert len(traces) == 1
    assert out["k"].device.type == "xla" and isinstance(out["both"], tuple)
    torch.testing.assert_close(out["k"].cpu(), torch.full((2, 4), 2.0))
    torch.testing.assert_close(out["v"].cpu(), torch.ones(2, 4))
    torch.testing.assert_close(out["both"][0].cpu(), torch.ones(2, 4))
    bridge.call_jax(fn, (k[:1], v[:1]), scale=2.0, offset=1)
    bridge.call_jax(fn, (k, v), scale=3.0, offset=1)
    assert len(traces) == 3


def test_xla_output_structure_may_depend_on_shape(xla_device):
    """torch_xla's call_jax caches the output structure per function, not per shape;
    the bridge gives torch_xla one function per signature so this stays right."""

    def fn(x):
        return (x, x + 1) if x.shape[0] == 2 else {"only": x * 10}

    assert isinstance(bridge.call_jax(fn, torch.ones(2, device=xla_device)), tuple)
    assert set(bridge.call_jax(fn, torch.ones(3, device=xla_device))) == {"only"}
    again = bridge.call_jax(fn, torch.ones(2, device=xla_device))
    assert isinstance(again, tuple) and again[1].cpu().tolist() == [2.0, 2.0]


def test_xla_dtypes(xla_device):
    for dtype in (torch.bfloat16, torch.float8_e5m2, torch.int8, torch.bool):
        t = torch.arange(8).to(dtype)
        out = bridge.call_jax(lambda a: jnp.flip(a), t.to(xla_device))
        assert out.dtype == dtype
        assert torch.equal(out.cpu().float(), t.float().flip(0))


def test_xla_int64_without_x64_is_refused_clearly(xla_device):
    if jax.config.jax_enable_x64:
        pytest.skip("jax_enable_x64 is on in this process")
    with pytest.raises(TypeError, match="jax_enable_x64"):
        bridge.call_jax(lambda a: a, torch.zeros(3, dtype=torch.int64, device=xla_device))


def test_staged_function_lowers_once_per_signature(xla_device):
    from bridge.xla_staging import StagedJaxFunction

    traces = []

    def fn(x, y):
        traces.append(x.shape)
        return (x * 2 + y, jnp.sum(x))

    staged = StagedJaxFunction(fn, name="xla::test_fn")
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    for _ in range(3):
        out, total = staged(x.to(xla_device), torch.ones(2, 3, device=xla_device))
    assert staged.num_lowered == 1 and len(traces) == 1
    torch.testing.assert_close(out.cpu(), x * 2 + 1)
    assert float(total.cpu()) == 15.0
    staged(torch.ones(4, 3, device=xla_device), torch.ones(4, 3, device=xla_device))
    staged(x.to(torch.bfloat16).to(xla_device), torch.ones(2, 3, dtype=torch.bfloat16, device=xla_device))
    assert staged.num_lowered == 3 and len(traces) == 3


def test_staged_function_without_the_internals_goes_through_torch_xla_call_jax(xla_device, monkeypatch):
    import torch_xla.core.xla_builder as xb
    from bridge.xla_staging import StagedJaxFunction

    pytest.importorskip("torchax", reason="torch_xla's call_jax needs torchax")
    calls = []
    real = xb.call_jax
    monkeypatch.setattr(xb, "call_jax", lambda fn, args, *a, **k: calls.append(1) or real(fn, args, *a, **k))
    staged = StagedJaxFunction(lambda x, y: (x - y,))
    staged._direct = False  # as on a torch_xla without _xla_user_computation
    (out,) = staged(torch.full((3,), 5.0, device=xla_device), torch.ones(3, device=xla_device))
    assert calls == [1] and staged.num_lowered == 0
    assert out.cpu().tolist() == [4.0, 4.0, 4.0]


def test_staged_function_name_must_be_namespaced(xla_device):
    from bridge.xla_staging import StagedJaxFunction

    with pytest.raises(ValueError, match="name='plain' must contain '::'"):
        StagedJaxFunction(lambda x: (x,), name="plain")


def test_xla_staging_needs_no_torchax(xla_device):
    code = textwrap.dedent(
        """
        import sys, os
        sys.path.insert(0, os.getcwd())
        sys.modules["torchax"] = None  # any import of torchax now fails
        import torch, torch_xla, bridge
        import jax.numpy as jnp
        x = torch.arange(4.0, device=torch_xla.device())
        print("result", bridge.call_jax(lambda a: jnp.cumsum(a), x).cpu().tolist())
        """
    )
    env = dict(os.environ, PJRT_DEVICE=os.environ.get("PJRT_DEVICE", "CPU"))
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "result [0.0, 1.0, 3.0, 6.0]" in run.stdout


# --------------------------------------------------------------------------- import guard

SPY = textwrap.dedent(
    """
    import sys, os
    sys.path.insert(0, os.getcwd())
    state = {}

    class Spy:
        def find_spec(self, name, path=None, target=None):
            if name == "jax" and "jax" not in state:
                xla = sys.modules.get("torch_xla")
                state["jax"] = bool(xla and xla._XLAC._xla_runtime_is_initialized())
            return None

    sys.meta_path.insert(0, Spy())
    {setup}
    import bridge
    import torch
    print("torch_xla imported:", sys.modules.get("torch_xla") is not None)
    print("runtime ready when jax was imported:", state.get("jax"))
    print(bridge.call_jax(lambda x: x + 1, torch.zeros(2)).tolist())
    """
)


def _run_spy(setup: str = "") -> str:
    out = subprocess.run(
        [sys.executable, "-c", SPY.replace("{setup}", setup)],
        capture_output=True, text=True, cwd=str(ROOT), timeout=180,
        env={**os.environ, "PJRT_DEVICE": os.environ.get("PJRT_DEVICE", "CPU")},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_guard_initializes_torch_xla_before_jax():
    pytest.importorskip("torch_xla", reason="torch_xla is not installed in this environment")
    out = _run_spy()
    assert "torch_xla imported: True" in out
    assert "runtime ready when jax was imported: True" in out
    assert "[1.0, 1.0]" in out


def test_import_guard_is_a_no_op_without_torch_xla():
    out = _run_spy('sys.modules["torch_xla"] = None  # as if not installed')
    assert "torch_xla imported: False" in out
    assert "runtime ready when jax was imported: False" in out
    assert "[1.0, 1.0]" in out
