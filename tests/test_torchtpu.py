"""torch.ops.paged_kv on TorchTPU (``torch-tpu``, device ``"tpu"`` = PrivateUse1).

Three kinds of test:

* The kernels' own Python, on CPU tensors, in this process (no torch_tpu): the
  paths that run no TorchTPU code (``impl="torch"``, ``pallas_interpret``, the
  write-back choice, validation).
* With torch_tpu loaded, in a **child process without network** (``unshare
  -n``, ``TPU_SKIP_MDS_QUERY=1``, ``JAX_PLATFORMS=cpu``) that never creates a
  ``"tpu"`` tensor: on a host without a TPU, initialising TorchTPU's device
  makes libtpu look for a cloud metadata server. They check the import, the
  registration at ``PrivateUse1``/``AutogradPrivateUse1``, the fake kernels,
  ``torch.export``, and the StableHLO TorchTPU's JAX-kernel path exports for
  TPU (the Pallas ``tpu_custom_call``, the caches aliased input→output).
  Skipped where torch_tpu is not installed or ``unshare -n`` is unavailable.
* ``@pytest.mark.tpu``: the op on ``"tpu"`` tensors, on a TPU VM only
  (``python -m pytest -m tpu tests/test_torchtpu.py``): against the
  reference, in place by memory statistics, timed against ``index_copy_``.

This process never imports torch_tpu itself off TPU. Where torch_tpu is
installed, ``import torch`` autoloads it unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``
(``.ci/run`` sets it for the ``tpu`` environment).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import jax_kernels as jk
import torch_ops
from bad_inputs import BAD_INPUTS, valid_call
from jax_kernels.testing import bits, np_dtype, random_slices, random_tokens, sentinel_cache
from torch_ops import _library, _torchtpu

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADS, HEAD_DIM, PAGE_SIZE = 2, 128, 16
NUM_PAGES, NUM_TOKENS, NUM_SLICES = 8, 40, 8
UINT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
GOOGLE_PCI_VENDOR = "0x1ae0"


def has_tpu() -> bool:
    """A Google TPU on the PCI bus (what torch_tpu itself scans), without importing torch_tpu."""
    try:
        return any((d / "vendor").read_text().strip() == GOOGLE_PCI_VENDOR for d in pathlib.Path("/sys/bus/pci/devices").iterdir())
    except OSError:
        return False


TORCH_TPU = importlib.util.find_spec("torch_tpu") is not None
HAS_TPU = has_tpu()


@functools.cache
def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


def to_torch(a: np.ndarray, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    return torch.from_numpy(bits(a).copy()).view(dtype).to(device)


def torch_bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(UINT[t.element_size()]).numpy().view(f"u{t.element_size()}")


def case(seed, dtype_name="float32", num_valid=None, num_pages=NUM_PAGES):
    rng = np.random.default_rng(seed)
    cache = sentinel_cache(num_pages * PAGE_SIZE, HEADS, HEAD_DIM, dtype_name)  # [R, H, D]
    new = random_tokens(rng, NUM_TOKENS, HEADS, HEAD_DIM, dtype_name)  # [T, H, D]
    idx, total = random_slices(
        rng, num_rows=cache.shape[0], num_tokens=NUM_TOKENS, page_size=PAGE_SIZE, num_slices=NUM_SLICES,
        num_valid=num_valid,
    )
    return new, idx, cache, total, jk.kv_cache_update_reference(new, idx, cache, total)


# ------------------------------------------- the kernels' Python, on CPU tensors


def _tpu_kernel(name: str):
    """The PrivateUse1 kernel of ``name`` (called directly on CPU tensors here)."""
    op = _library.OPS[name.removesuffix("_functional")]
    return _torchtpu._kernel(op, name.endswith("_functional"))


@pytest.mark.parametrize("layout", ["flat", "paged"])
@pytest.mark.parametrize("impl", ["torch", "pallas_interpret"])
def test_host_paths_of_the_kernel_match_the_reference(impl, layout):
    """``torch`` (index_copy_ of the rows) and ``pallas_interpret`` (the kernel's
    code on the host, rows copied in) are device-generic: run them on CPU."""
    new, idx, cache_np, total, expected = case(0, "bfloat16")
    cache = to_torch(cache_np, torch.bfloat16)
    target = cache.view(NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM) if layout == "paged" else cache
    args = (to_torch(new, torch.bfloat16), torch.from_numpy(idx), target, torch.from_numpy(total), PAGE_SIZE, 8, impl)
    out = _tpu_kernel("kv_cache_update_functional")(*args)
    np.testing.assert_array_equal(torch_bits(out).reshape(expected.shape), bits(expected))
    np.testing.assert_array_equal(torch_bits(cache), bits(cache_np))  # the functional op leaves it
    ptr = cache.data_ptr()
    _tpu_kernel("kv_cache_update")(*args)
    assert cache.data_ptr() == ptr
    np.testing.assert_array_equal(torch_bits(cache), bits(expected))


@pytest.mark.parametrize("impl", ["torch", "pallas_interpret"])
def test_host_paths_of_the_kernel_quantize_on_write(impl):
    """bfloat16 rows into a float8 cache: quantized in torch first, as on the eager paths."""
    new, idx, cache_np, total, _ = case(3, "bfloat16")
    cache_np = np.zeros(cache_np.shape, np_dtype("float8_e4m3fn"))
    expected = jk.kv_cache_update_reference(new, idx, cache_np, total, k_scale=2.0, v_scale=0.0371)
    cache = torch.from_numpy(cache_np.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    scales = (torch.tensor(2.0), torch.tensor(0.0371))
    _tpu_kernel("kv_cache_update")(
        to_torch(new, torch.bfloat16), torch.from_numpy(idx), cache, torch.from_numpy(total), PAGE_SIZE, 8, impl, *scales,
    )
    np.testing.assert_array_equal(cache.view(torch.uint8).numpy(), bits(expected))
    with pytest.raises(ValueError, match=r"k_scale=0.0 must be a positive, finite"):
        _tpu_kernel("kv_cache_update")(
            to_torch(new, torch.bfloat16), torch.from_numpy(idx), cache, torch.from_numpy(total), PAGE_SIZE, 8, impl,
            torch.tensor(0.0), scales[1],
        )


def test_host_paths_of_the_kv_kernel_update_both_caches():
    key, idx, k_np, total, k_want = case(1)
    value = np.ascontiguousarray(key[..., ::-1])
    v_want = jk.kv_cache_update_reference(value, idx, k_np, total)
    k_cache, v_cache = torch.from_numpy(k_np.copy()), torch.from_numpy(k_np.copy())
    _tpu_kernel("kv_cache_update_kv")(
        torch.from_numpy(key), torch.from_numpy(value), torch.from_numpy(idx), k_cache, v_cache, torch.from_numpy(total),
        PAGE_SIZE, 8, "torch",
    )
    np.testing.assert_array_equal(bits(k_cache.numpy()), bits(k_want))
    np.testing.assert_array_equal(bits(v_cache.numpy()), bits(v_want))


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda b: b.name)
def test_the_kernel_refuses_bad_inputs_naming_them_and_keeps_the_cache(bad):
    c = valid_call()
    bad.mutate(c)
    cache = torch.from_numpy(np.ascontiguousarray(c["kv_cache"]).copy())
    before = cache.clone()
    with pytest.raises(bad.error, match=bad.match):
        _tpu_kernel("kv_cache_update")(
            torch.from_numpy(np.ascontiguousarray(c["new_kv_tokens"])), torch.from_numpy(c["slice_indices"]), cache,
            torch.from_numpy(c["total_update_slices"]), c["page_size"], 8, "torch",
        )
    assert torch.equal(cache.view(torch.int32), before.view(torch.int32))


def test_the_kernel_refuses_inputs_that_require_grad():
    new, idx, cache_np, total, _ = case(2)
    cache = torch.from_numpy(cache_np).requires_grad_()
    with pytest.raises(ValueError, match="kv_cache_update is not differentiable, but kv_cache requires grad"):
        _tpu_kernel("kv_cache_update")(torch.from_numpy(new), torch.from_numpy(idx), cache, torch.from_numpy(total), PAGE_SIZE, 8, "torch")


def test_writeback_is_set_for_a_sole_user_and_rows_when_views_share_the_storage(monkeypatch):
    monkeypatch.delenv(_torchtpu.WRITEBACK_ENV, raising=False)
    cache = torch.zeros(4 * PAGE_SIZE, HEADS, HEAD_DIM)
    assert _torchtpu.writeback_mode() == "auto"
    assert _torchtpu.resolve_writeback([cache]) == "set"
    paged = cache.view(4, PAGE_SIZE, HEADS, HEAD_DIM)  # set_ on either would strand the other
    assert _torchtpu.resolve_writeback([cache]) == "rows" and _torchtpu.resolve_writeback([paged]) == "rows"
    del paged
    assert _torchtpu.resolve_writeback([cache]) == "set"
    with torch.no_grad():
        detached = cache.detach()  # shares the storage too
    assert _torchtpu.resolve_writeback([cache, torch.zeros(1)]) == "rows"
    del detached
    assert _torchtpu.resolve_writeback([cache, torch.zeros(1)]) == "set"
    for mode in ("set", "copy", "rows"):
        monkeypatch.setenv(_torchtpu.WRITEBACK_ENV, mode)
        assert _torchtpu.resolve_writeback([cache]) == mode
    previous = _torchtpu.set_writeback("copy")
    try:
        assert previous is None and _torchtpu.writeback_mode() == "copy"  # the function beats the variable
    finally:
        _torchtpu.set_writeback(previous)
    monkeypatch.setenv(_torchtpu.WRITEBACK_ENV, "fast")
    with pytest.raises(ValueError, match="PAGED_KV_TORCHTPU_WRITEBACK='fast' is not one of"):
        _torchtpu.writeback_mode()
    with pytest.raises(ValueError, match="mode='fast' is not one of"):
        _torchtpu.set_writeback("fast")


def test_torch_ops_does_not_register_privateuse1_kernels_without_torch_tpu():
    if "torch_tpu" in sys.modules:
        pytest.skip("torch_tpu is loaded in this process")
    for name in _library.OPS:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"paged_kv::{name}", "PrivateUse1")


# ------------------------------------- torch_tpu loaded, in a child with no network


def run_child(code: str, *, autoload: bool = True) -> dict:
    """Run ``code`` under ``unshare -n`` with TorchTPU's safety settings; it
    prints one JSON object last, which is returned."""
    if not TORCH_TPU:
        pytest.skip("torch_tpu is not installed in this environment")
    if not unshare_works():
        pytest.skip("`unshare -n` is not available: torch_tpu is imported only in a process without network")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    env.update(
        TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu", TORCH_DEVICE_BACKEND_AUTOLOAD="1" if autoload else "0",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PYTHONWARNINGS="ignore:<TorchTpu/Performance/TcMalloc/",
    )
    epilogue = textwrap.dedent("""
        import torch_tpu._loader
        assert not torch_tpu._loader._DEVICE_INITIALIZED, "the TPU device was initialised"
    """)
    out = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", textwrap.dedent(code) + epilogue],
        env=env, capture_output=True, text=True, timeout=420, cwd=str(ROOT),
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torch_tpu_imports_and_the_kernels_are_registered_at_privateuse1():
    res = run_child("""
        import json, sys
        import torch  # autoloads torch_tpu
        import torch_ops
        from torch_ops import _library
        keys = ("PrivateUse1", "AutogradPrivateUse1")
        print(json.dumps({
            "autoloaded": "torch_tpu" in sys.modules,
            "registered": {f"{n}{s}": [torch._C._dispatch_has_kernel_for_dispatch_key(f"paged_kv::{n}{s}", k) for k in keys]
                           for n in _library.OPS for s in ("", "_functional")},
            "fallthrough": "AutogradPrivateUse1: registered at" in torch._C._dispatch_dump("paged_kv::kv_cache_update")
                           and "fallthrough" in torch._C._dispatch_dump("paged_kv::kv_cache_update").split("AutogradPrivateUse1")[1].splitlines()[0],
            "backend": torch._C._get_privateuse1_backend_name(),
        }))
    """)
    assert res["autoloaded"]
    assert len(res["registered"]) == 2 * len(_library.OPS) and all(v == [True, True] for v in res["registered"].values()), res
    assert res["fallthrough"]
    assert res["backend"] == "privateuseone"  # renamed to "tpu" only where a TPU is present


def test_registration_follows_an_explicit_import_of_torch_tpu():
    res = run_child("""
        import json, sys
        import torch
        import torch_ops
        before = "torch_tpu" in sys.modules, torch._C._dispatch_has_kernel_for_dispatch_key("paged_kv::kv_cache_update", "PrivateUse1")
        import torch_tpu
        after = torch._C._dispatch_has_kernel_for_dispatch_key("paged_kv::kv_cache_update", "PrivateUse1")
        print(json.dumps({"before": before, "after": after}))
    """, autoload=False)
    assert res == {"before": [False, False], "after": True}


def test_export_fake_kernels_and_the_tpu_stablehlo():
    """In one child (torch_tpu takes ~15 s to import): fake kernels on fake
    TPU tensors; ``torch.export`` of a model whose cache buffer the op
    updates; and the StableHLO TorchTPU's JAX-kernel path exports for TPU."""
    res = run_child(f"""
        import json, re
        import numpy as np, torch
        import torch_ops, jax_kernels as jk
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
        from torch_ops import _torchtpu
        P, H, D = 16, {HEADS}, {HEAD_DIM}
        out = {{}}

        # Fake kernels, on fake tensors of the TPU device (index given: no device query).
        dev = torch.device("privateuseone", 0)
        mode = FakeTensorMode()
        def fake(shape, dtype=torch.bfloat16):
            return FakeTensor(mode, torch.empty(shape, dtype=dtype, device="meta"), dev)
        with mode:
            new, idx, cache, total = fake((8, H, D)), fake((3, 4), torch.int32), fake((8 * P, H, D)), fake((1,), torch.int32)
            res = torch.ops.paged_kv.kv_cache_update_functional(new, idx, cache, total, P, 8, "auto")
            k2, v2 = torch.ops.paged_kv.kv_cache_update_kv_functional(new, new, idx, cache, cache, total, P, 8, "auto")
            torch.ops.paged_kv.kv_cache_update(new, idx, cache, total, P, 8, "auto")
            try:
                torch.ops.paged_kv.kv_cache_update(new, idx, fake((8 * P, H, 64)), total, P, 8, "auto")
                out["fake_bad"] = None
            except Exception as e:
                out["fake_bad"] = str(e)
        out["fake"] = [str(res.device), list(res.shape), str(res.dtype), str(k2.device), list(v2.shape)]

        # torch.export of a model that updates its cache buffer through the op.
        class Layer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("cache", torch.zeros(8 * P, H, D))
            def forward(self, new, idx, total):
                torch.ops.paged_kv.kv_cache_update(new, idx, self.cache, total, P, 8, "auto")
                return self.cache.sum()
        rng = np.random.default_rng(0)
        new_np = rng.standard_normal((20, H, D)).astype(np.float32)
        idx_np = np.array([[0, 20, 40, 0], [0, 5, 12, 0], [5, 7, 8, 0]], np.int32)
        total_np = np.array([3], np.int32)
        args = (torch.from_numpy(new_np), torch.from_numpy(idx_np), torch.from_numpy(total_np))
        ep = torch.export.export(Layer(), args)
        ops = lambda ep: sorted({{str(n.target) for n in ep.graph.nodes if n.op == "call_function"}})
        out["graph_ops"] = ops(ep)
        functional = ep.run_decompositions({{}})  # the functional IR a backend compiles
        out["functional_ops"] = ops(functional)
        out["mutated_buffers"] = sorted(functional.graph_signature.buffers_to_mutate.values())
        layer = Layer()
        ep.module()(*args)  # the exported program runs (CPU kernels) and mutates its own buffer
        layer(*args)
        want = jk.kv_cache_update_reference(new_np, idx_np, np.zeros((8 * P, H, D), np.float32), total_np)
        out["eager_ok"] = bool(np.array_equal(layer.cache.numpy(), want))

        # The StableHLO TorchTPU's custom_jax_kernel exports for TPU (what its call registers and runs).
        def lower(impl, donate, pairs, head_dim=D, quantized=False):
            k = _torchtpu.jax_kernel(impl, P, 8, donate, quantized)
            toks = [torch.empty(8, H, head_dim, dtype=torch.bfloat16) for _ in range(pairs)]
            cache_dtype = torch.float8_e4m3fn if quantized else torch.bfloat16
            caches = [torch.empty(8 * P, H, head_dim, dtype=cache_dtype) for _ in range(pairs)]
            call = [toks, torch.empty(3, 4, dtype=torch.int32), caches, torch.empty(1, dtype=torch.int32)]
            if quantized:
                call.append(torch.empty(pairs, 2, dtype=torch.float32))
            a, kw = k._normalize_invocation_args(tuple(call), {{}})
            lowered = k.exported(*k._get_jax_placeholders(a, kw)[0])
            text = lowered.mlir_module()
            main = next(l for l in text.splitlines() if "func.func public @main" in l)
            args = re.findall(r"%arg\\d+: tensor<[^>]*>(?: \\{{[^}}]*\\}})?", main)
            return {{"platforms": list(lowered.platforms), "custom_call": "tpu_custom_call" in text,
                     "aliased": [i for i, a in enumerate(args) if "tf.aliasing_output" in a or "jax.buffer_donor" in a]}}
        out["hlo"] = {{f"{{impl}},{{donate}},{{pairs}},{{hd}}": lower(impl, donate, pairs, hd)
                       for impl, donate, pairs, hd in [("auto", True, 1, D), ("pallas", True, 2, D), ("jax", True, 1, D),
                                                       ("auto", False, 1, D), ("auto", True, 1, 64)]}}
        out["hlo_quantized"] = lower("auto", True, 1, D, quantized=True)
        print(json.dumps(out))
    """)
    assert res["fake"] == ["privateuseone:0", [8 * PAGE_SIZE, HEADS, HEAD_DIM], "torch.bfloat16", "privateuseone:0", [8 * PAGE_SIZE, HEADS, HEAD_DIM]]
    assert res["fake_bad"] and "kv_cache" in res["fake_bad"]
    assert res["graph_ops"] == ["aten.sum.default", "paged_kv.kv_cache_update.default"], res["graph_ops"]
    assert "paged_kv.kv_cache_update_functional.default" in res["functional_ops"], res["functional_ops"]
    assert "paged_kv.kv_cache_update.default" not in res["functional_ops"], res["functional_ops"]
    assert res["mutated_buffers"] == ["cache"]
    assert res["eager_ok"]
    hlo = res["hlo"]
    assert all(h["platforms"] == ["tpu"] for h in hlo.values())
    # Tokens first, then slice_indices, the caches, total: one pair -> cache is arg 2; two -> 3 and 4.
    assert hlo[f"auto,True,1,{HEAD_DIM}"] == {"platforms": ["tpu"], "custom_call": True, "aliased": [2]}
    assert hlo[f"pallas,True,2,{HEAD_DIM}"] == {"platforms": ["tpu"], "custom_call": True, "aliased": [3, 4]}
    assert hlo[f"jax,True,1,{HEAD_DIM}"] == {"platforms": ["tpu"], "custom_call": False, "aliased": [2]}
    assert hlo[f"auto,False,1,{HEAD_DIM}"]["custom_call"] and hlo[f"auto,False,1,{HEAD_DIM}"]["aliased"] == []
    # Quantized: bfloat16 rows into a float8 cache, the scales a fifth argument; quantized in the kernel.
    assert res["hlo_quantized"] == {"platforms": ["tpu"], "custom_call": True, "aliased": [2]}, res["hlo_quantized"]
    # head_dim 64 is not a multiple of 128: auto lowers the scatter fallback on TPU too.
    assert hlo["auto,True,1,64"] == {"platforms": ["tpu"], "custom_call": False, "aliased": [2]}


# ------------------------------------------------------ on a TPU VM (-m tpu)

tpu = pytest.mark.skipif(
    not (HAS_TPU and TORCH_TPU), reason="needs a TPU and torch_tpu (run on a TPU VM: python -m pytest -m tpu tests/test_torchtpu.py)"
)
TPU_IMPLS = ["auto", "jax", "scan", "pallas", "torch", "pallas_interpret"]


@pytest.fixture
def tpu_device():
    import jax

    if jax.config.jax_platforms != "cpu":
        pytest.skip("run with JAX_PLATFORMS=cpu: TorchTPU owns the TPU, JAX only lowers (and interprets on the host)")
    import torch_tpu  # noqa: F401  (autoloaded already where installed)

    return torch.device("tpu")


def _sync():
    torch.tpu.synchronize()


@pytest.mark.tpu
@tpu
@pytest.mark.parametrize("writeback", ["auto", "set", "copy", "rows"])
@pytest.mark.parametrize("layout", ["flat", "paged"])
@pytest.mark.parametrize("impl", TPU_IMPLS)
def test_tpu_op_matches_the_reference(impl, layout, writeback, tpu_device):
    if impl in ("torch", "pallas_interpret") and writeback != "auto":
        pytest.skip("these impls always copy rows")
    new, idx, cache_np, total, expected = case(20, "bfloat16")
    cache = to_torch(cache_np, torch.bfloat16, tpu_device)
    target = cache.view(NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM) if layout == "paged" else cache
    previous = _torchtpu.set_writeback(writeback)
    try:
        torch_ops.kv_cache_update(
            to_torch(new, torch.bfloat16, tpu_device), torch.from_numpy(idx).to(tpu_device), target,
            torch.from_numpy(total).to(tpu_device), page_size=PAGE_SIZE, impl=impl,
        )
    finally:
        _torchtpu.set_writeback(previous)
    np.testing.assert_array_equal(torch_bits(target).reshape(expected.shape), bits(expected))
    if writeback != "set" or layout == "flat":  # set_ re-points the view only (documented)
        np.testing.assert_array_equal(torch_bits(cache), bits(expected))
    out = torch_ops.kv_cache_update_functional(
        to_torch(new, torch.bfloat16, tpu_device), torch.from_numpy(idx).to(tpu_device),
        to_torch(cache_np, torch.bfloat16, tpu_device), torch.from_numpy(total).to(tpu_device), page_size=PAGE_SIZE,
        impl=impl,
    )
    np.testing.assert_array_equal(torch_bits(out), bits(expected))


@pytest.mark.tpu
@tpu
@pytest.mark.parametrize("writeback", ["auto", "rows"])
@pytest.mark.parametrize("impl", ["auto", "jax", "torch"])
def test_tpu_quantized_write_matches_the_reference(impl, writeback, tpu_device):
    new, idx, cache_np, total, _ = case(22, "bfloat16")
    cache_np = np.zeros(cache_np.shape, np_dtype("float8_e4m3fn"))
    expected = jk.kv_cache_update_reference(new, idx, cache_np, total, k_scale=2.0, v_scale=0.0371)
    cache = torch.zeros(cache_np.shape, dtype=torch.float8_e4m3fn, device=tpu_device)
    previous = _torchtpu.set_writeback(writeback)
    try:
        torch_ops.kv_cache_update(
            to_torch(new, torch.bfloat16, tpu_device), torch.from_numpy(idx).to(tpu_device), cache,
            torch.from_numpy(total).to(tpu_device), page_size=PAGE_SIZE, impl=impl, k_scale=2.0, v_scale=0.0371,
        )
    finally:
        _torchtpu.set_writeback(previous)
    np.testing.assert_array_equal(cache.cpu().view(torch.uint8).numpy(), bits(expected))


@pytest.mark.tpu
@tpu
def test_tpu_kv_op_matches_the_reference(tpu_device):
    key, idx, k_np, total, k_want = case(21)
    value = np.ascontiguousarray(key[..., ::-1])
    v_want = jk.kv_cache_update_reference(value, idx, k_np, total)
    k_cache, v_cache = (torch.from_numpy(k_np).to(tpu_device) for _ in range(2))
    torch_ops.kv_cache_update_kv(
        torch.from_numpy(key).to(tpu_device), torch.from_numpy(value).to(tpu_device), torch.from_numpy(idx).to(tpu_device),
        k_cache, v_cache, torch.from_numpy(total).to(tpu_device), page_size=PAGE_SIZE,
    )
    np.testing.assert_array_equal(bits(k_cache.cpu().numpy()), bits(k_want))
    np.testing.assert_array_equal(bits(v_cache.cpu().numpy()), bits(v_want))


def _big_case(device, num_pages):
    """A decode-like update (64 one-row slices) into a cache of ``num_pages`` pages, on ``device``."""
    rng = np.random.default_rng(0)
    rows = num_pages * PAGE_SIZE
    new = torch.from_numpy(rng.standard_normal((64, 8, 128)).astype(np.float32)).to(torch.bfloat16).to(device)
    dst = rng.permutation(num_pages)[:64] * PAGE_SIZE  # i64[64]
    idx = torch.from_numpy(np.stack([dst, np.arange(64), np.ones(64, np.int64)]).astype(np.int32)).to(device)
    total = torch.tensor([64], dtype=torch.int32).to(device)
    cache = torch.zeros(rows, 8, 128, dtype=torch.bfloat16, device=device)
    return new, idx, cache, total, torch.from_numpy(dst).to(device)


@pytest.mark.tpu
@tpu
@pytest.mark.parametrize("writeback", ["auto", "set", "rows"])
def test_tpu_update_is_in_place_by_memory_statistics(writeback, tpu_device):
    """A 256 MiB cache: an in-place update allocates nothing close to a second cache."""
    new, idx, cache, total, _ = _big_case(tpu_device, num_pages=256 * 1024 * 1024 // (PAGE_SIZE * 8 * 128 * 2))
    cache_bytes = cache.numel() * cache.element_size()
    previous = _torchtpu.set_writeback(writeback)
    try:
        torch_ops.kv_cache_update(new, idx, cache, total, page_size=PAGE_SIZE)  # compile outside the measurement
        _sync()
        try:
            torch.accelerator.reset_peak_memory_stats()
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"TorchTPU has no peak memory statistics here: {e}")
        before = torch.accelerator.memory_allocated()
        for _ in range(3):
            torch_ops.kv_cache_update(new, idx, cache, total, page_size=PAGE_SIZE)
        _sync()
        peak, after = torch.accelerator.max_memory_allocated(), torch.accelerator.memory_allocated()
    finally:
        _torchtpu.set_writeback(previous)
    print(f"\n{writeback}: cache {cache_bytes >> 20} MiB, allocated before {before >> 20} MiB, "
          f"peak {peak >> 20} MiB, after {after >> 20} MiB")
    assert peak - before < cache_bytes // 4, (before, peak)
    assert after - before < cache_bytes // 4, (before, after)


@pytest.mark.tpu
@tpu
def test_tpu_update_time_against_index_copy(tpu_device):
    """Decode step (64 rows) at 64 MiB and 1 GiB: µs per call for every write-back and
    for ``index_copy_`` of the same rows; ``auto`` and ``set`` stay flat as the cache grows."""
    results = {}
    for mib in (64, 1024):
        new, idx, cache, total, dst = _big_case(tpu_device, num_pages=mib * 1024 * 1024 // (PAGE_SIZE * 8 * 128 * 2))
        steps = {"index_copy_": lambda: cache.index_copy_(0, dst, new)}
        for mode in ("auto", "set", "copy", "rows"):
            def step(mode=mode):
                previous = _torchtpu.set_writeback(mode)
                try:
                    torch_ops.kv_cache_update(new, idx, cache, total, page_size=PAGE_SIZE)
                finally:
                    _torchtpu.set_writeback(previous)
            steps[mode] = step
        for name, step in steps.items():
            for _ in range(3):
                step()
            _sync()
            samples = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(20):
                    step()
                _sync()
                samples.append((time.perf_counter() - t0) / 20)
            results[(name, mib)] = float(np.median(samples))
    print("\nµs per decode update (64 rows, bfloat16 [R, 8, 128]):")
    for name in ("index_copy_", "auto", "set", "copy", "rows"):
        print(f"  {name:<12} 64 MiB {results[(name, 64)] * 1e6:9.1f}   1 GiB {results[(name, 1024)] * 1e6:9.1f}")
    for mode in ("auto", "set"):
        assert results[(mode, 1024)] < 2 * results[(mode, 64)], results
