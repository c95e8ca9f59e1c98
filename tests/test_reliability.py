"""Reliability: bad input never corrupts a cache, long runs don't leak, threads,
and caches sharded over devices (JAX shard_map, PyTorch/XLA SPMD)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_kernels as jk
import torch_ops
from bad_inputs import BAD_INPUTS, valid_call
from jax_kernels.testing import bits, random_slices, random_tokens, sentinel_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNABLE_IMPLS = [i for i in torch_ops.IMPLS if i != "pallas"]


def torch_call(c: dict, device="cpu") -> dict:
    return {k: torch.from_numpy(v).to(device) if isinstance(v, np.ndarray) else v for k, v in c.items()}


def call_op(t: dict, impl: str):
    torch_ops.kv_cache_update(
        t["new_kv_tokens"], t["slice_indices"], t["kv_cache"], t["total_update_slices"], page_size=t["page_size"], impl=impl
    )


def cache_bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().view(np.uint32).copy()


# ------------------------------------------------------------------ bad input

TORCH_ONLY = [
    ("unknown_impl", lambda t: t.update(impl="fastest"), ValueError, r"impl='fastest' is not one of"),
    ("pallas_off_tpu", lambda t: t.update(impl="pallas"), ValueError, r"impl='pallas' needs PyTorch/XLA tensors on a TPU"),
    ("different_devices", lambda t: t.update(new_kv_tokens=t["new_kv_tokens"].to("meta")), ValueError, r"new_kv_tokens on meta.*kv_cache on cpu"),
    ("paged_cache_wrong_page_size", lambda t: t.update(kv_cache=t["kv_cache"].view(-1, 8, *t["kv_cache"].shape[1:])), ValueError, r"paged kv_cache.shape\[1\]=8 must equal page_size=16"),
    ("unsupported_dtype", lambda t: t.update(new_kv_tokens=t["new_kv_tokens"].to(torch.complex64), kv_cache=t["kv_cache"].to(torch.complex64)), TypeError, r"complex64"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda b: b.name)
@pytest.mark.parametrize("impl", RUNNABLE_IMPLS)
def test_torch_op_rejects_bad_input_and_leaves_the_cache(impl, case):
    c = valid_call()
    case.mutate(c)
    t = torch_call(c)
    before = cache_bits(t["kv_cache"])
    with pytest.raises(case.error, match=case.match):
        call_op(t, impl)
    np.testing.assert_array_equal(cache_bits(t["kv_cache"]), before)


@pytest.mark.parametrize("name,mutate,error,match", TORCH_ONLY, ids=[c[0] for c in TORCH_ONLY])
def test_torch_op_specific_errors(name, mutate, error, match):
    t = torch_call(valid_call())
    impl = {"impl": "auto"}
    before = cache_bits(t["kv_cache"])
    mutate(t) if name not in ("unknown_impl", "pallas_off_tpu") else mutate(impl)
    kv_cache = t["kv_cache"]
    with pytest.raises(error, match=match):
        call_op(t, impl["impl"])
    if kv_cache.dtype == torch.float32 and kv_cache.device.type == "cpu":
        np.testing.assert_array_equal(cache_bits(kv_cache.reshape(-1, *kv_cache.shape[-2:])), before)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda b: b.name)
def test_xla_op_rejects_bad_input_when_validating(case, xla_device):
    import torch_xla

    c = valid_call()
    case.mutate(c)
    t = torch_call(c, xla_device)
    torch_xla.sync()
    before = cache_bits(t["kv_cache"])
    with torch_ops.validation("always"):
        for impl in ("auto", "scan", "pallas_interpret"):
            with pytest.raises(case.error, match=case.match):
                call_op(t, impl)
    torch_xla.sync()
    np.testing.assert_array_equal(cache_bits(t["kv_cache"]), before)


def test_xla_different_devices_and_pallas_off_tpu(xla_device):
    t = torch_call(valid_call(), xla_device)
    cpu_idx = dict(t, slice_indices=t["slice_indices"].cpu())
    with pytest.raises(ValueError, match=r"slice_indices on cpu.*kv_cache on xla"):
        call_op(cpu_idx, "auto")
    with pytest.raises(ValueError, match=r"impl='pallas' needs PyTorch/XLA tensors on a TPU"):
        call_op(t, "pallas")


PAGE_TABLE_CASES = [
    ("negative_start", dict(start_positions=[0, -1]), r"start_positions\[1\]=-1"),
    ("negative_count", dict(num_new_tokens=[-3, 1]), r"num_new_tokens\[0\]=-3"),
    ("page_beyond_table", dict(num_new_tokens=[9, 1]), r"block_table has only 2 (pages|columns)"),
    ("entry_outside_cache", dict(num_pages=3), r"block_table\[1, 0\]=3 (is not a page|is used by request 1 but must be in \[0, num_pages=3\))"),
    ("negative_entry", dict(block_table=[[-2, 1], [3, 0]]), r"block_table\[0, 0\]=-2"),
    ("too_many_slices", dict(max_num_slices=1), r"max_num_slices=1"),
]


@pytest.mark.parametrize("name,change,match", PAGE_TABLE_CASES, ids=[c[0] for c in PAGE_TABLE_CASES])
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_page_table_helpers_reject_bad_input(framework, name, change, match):
    args = dict(block_table=[[0, 1], [3, 0]], start_positions=[0, 2], num_new_tokens=[5, 1], max_num_slices=8, num_pages=None)
    args.update(change)
    table, starts, counts = (np.array(args[k], np.int32) for k in ("block_table", "start_positions", "num_new_tokens"))
    kw = dict(page_size=4, max_num_slices=args["max_num_slices"], num_pages=args["num_pages"])
    with pytest.raises(ValueError, match=match):
        if framework == "jax":
            jk.slice_indices_from_block_table(table, starts, counts, **kw)
        else:
            torch_ops.slice_indices_from_block_table(torch.from_numpy(table), torch.from_numpy(starts), torch.from_numpy(counts), **kw)


# ------------------------------------------------------------ property tests


def _check_random_layout(seed, impl, page_size, within_pages):
    rng = np.random.default_rng(seed)
    cache_np = sentinel_cache(6 * page_size, 2, 128, "bfloat16")
    new_np = random_tokens(rng, 30, 2, 128, "bfloat16")
    idx, total = random_slices(rng, num_rows=cache_np.shape[0], num_tokens=30, page_size=page_size, num_slices=8, within_pages=within_pages)
    cache = torch.from_numpy(bits(cache_np).copy()).view(torch.bfloat16)
    new = torch.from_numpy(bits(new_np).copy()).view(torch.bfloat16)
    torch_ops.kv_cache_update(new, torch.from_numpy(idx), cache, torch.from_numpy(total), page_size=page_size, impl=impl)
    want = jk.kv_cache_update_reference(new_np, idx, cache_np, total)
    np.testing.assert_array_equal(cache.view(torch.int16).numpy().view(np.uint16), bits(want))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), impl=st.sampled_from(RUNNABLE_IMPLS), page_size=st.sampled_from([16, 32]), within_pages=st.booleans())
def test_torch_op_random_layouts(seed, impl, page_size, within_pages):
    _check_random_layout(seed, impl, page_size, within_pages)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), impl=st.sampled_from(RUNNABLE_IMPLS), page_size=st.sampled_from([16, 32]), within_pages=st.booleans())
def test_torch_op_random_layouts_slow(seed, impl, page_size, within_pages):
    _check_random_layout(seed, impl, page_size, within_pages)


# ------------------------------------------------------------ long runs, threads


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _soak(impl: str, calls: int):
    c = torch_call(valid_call())
    c["kv_cache"].zero_()
    for _ in range(200):  # warm up: traces, allocator pools
        call_op(c, impl)
    gc.collect()
    rss, live = _rss_mib(), len(jax.live_arrays())
    for _ in range(calls):
        call_op(c, impl)
    gc.collect()
    grown = _rss_mib() - rss
    assert grown < 20, f"resident memory grew by {grown:.1f} MiB over {calls} calls of impl={impl!r}"
    assert len(jax.live_arrays()) <= live, "live JAX buffers accumulate"


def test_10000_eager_calls_do_not_leak():
    _soak("auto", 10_000)


def test_jax_path_calls_do_not_leak():
    _soak("jax", 2_000)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["jax", "scan"])
def test_10000_jax_path_calls_do_not_leak(impl):
    _soak(impl, 10_000)


@pytest.mark.parametrize("impl", RUNNABLE_IMPLS)
def test_threads_on_separate_caches(impl):
    rng = np.random.default_rng(0)
    jobs = []
    for _ in range(8):
        cache_np = sentinel_cache(6 * 16, 2, 128, "float32")
        new_np = random_tokens(rng, 30, 2, 128, "float32")
        idx, total = random_slices(rng, num_rows=96, num_tokens=30, page_size=16, num_slices=8)
        jobs.append((new_np, idx, cache_np, total, torch.from_numpy(cache_np.copy())))
    errors = []

    def work(job):
        new_np, idx, _, total, cache = job
        try:
            for _ in range(5):
                torch_ops.kv_cache_update(torch.from_numpy(new_np), torch.from_numpy(idx), cache, torch.from_numpy(total), page_size=16, impl=impl)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for new_np, idx, cache_np, total, cache in jobs:
        np.testing.assert_array_equal(bits(cache.numpy()), bits(jk.kv_cache_update_reference(new_np, idx, cache_np, total)))


@pytest.mark.parametrize("impl", ["auto", "jax", "scan"])
def test_threads_on_one_shared_cache_with_disjoint_slices(impl):
    """Supported: each call writes only its own rows (one index_copy_ of them)."""
    rng = np.random.default_rng(1)
    cache_np = sentinel_cache(64 * 16, 2, 128, "float32")
    idx_all, _ = random_slices(rng, num_rows=cache_np.shape[0], num_tokens=8 * 40, page_size=16, num_slices=64, num_valid=64, garbage_padding=False)
    new_all = random_tokens(rng, 8 * 40, 2, 128, "float32")
    cache = torch.from_numpy(cache_np.copy())
    errors = []

    def work(k):
        cols = idx_all[:, 8 * k : 8 * (k + 1)]
        try:
            torch_ops.kv_cache_update(torch.from_numpy(new_all), torch.from_numpy(np.ascontiguousarray(cols)), cache, torch.tensor([8], dtype=torch.int32), page_size=16, impl=impl)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    want = jk.kv_cache_update_reference(new_all, idx_all, cache_np, np.array([64]))
    np.testing.assert_array_equal(bits(cache.numpy()), bits(want))


# ----------------------------------------------------------------- sharding


def _run(code: str, env: dict):
    env = dict(os.environ, **env)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout[-2000:], out.stderr[-4000:])
    return out.stdout


def test_jax_cache_sharded_over_heads_on_8_devices():
    _run(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import jax_kernels as jk
        from jax_kernels.testing import bits, random_slices, random_tokens, sentinel_cache
        assert len(jax.devices()) == 8
        mesh = Mesh(np.array(jax.devices()), ("h",))
        heads = NamedSharding(mesh, P(None, "h", None))
        rng = np.random.default_rng(0)
        cache = sentinel_cache(8 * 16, 16, 128, "bfloat16"); new = random_tokens(rng, 40, 16, 128, "bfloat16")
        idx, total = random_slices(rng, num_rows=128, num_tokens=40, page_size=16, num_slices=8)
        fn = jax.jit(lambda n, i, c, t: jk.kv_cache_update_sharded(n, i, c, t, mesh=mesh, page_size=16), donate_argnums=2)
        args = (jax.device_put(new, heads), jnp.asarray(idx), jax.device_put(cache, heads), jnp.asarray(total))
        hlo = fn.lower(*args).compile().as_text()
        for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
            assert collective not in hlo, collective
        out = fn(*args)
        assert out.sharding.is_equivalent_to(heads, 3), out.sharding
        unsharded = jk.kv_cache_update(jnp.asarray(new), jnp.asarray(idx), jnp.asarray(cache), jnp.asarray(total), page_size=16)
        assert np.array_equal(bits(out), bits(unsharded))
        assert np.array_equal(bits(out), bits(jk.kv_cache_update_reference(new, idx, cache, total)))
        # The TPU lowering runs the kernel per shard (one Pallas call, no collectives).
        tpu = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in tpu
        print("ok")
        """,
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)], ids=["pages", "heads-and-pages"])
def test_jax_cache_sharded_over_pages_on_8_devices(mesh_shape):
    """EasyDeL 0.3's data-parallel pages: each device writes only the slices in its pages, no collective."""
    _run(
        f"""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import jax_kernels as jk
        from jax_kernels.testing import bits, random_slices
        mesh = Mesh(np.array(jax.devices()).reshape({mesh_shape}), ("h", "dp"))
        # A packed bfloat16 cache [16 pages, 16 rows, 4, 2, 128]: pages over "dp", packed heads over "h".
        shape = jk.kv_cache_shape(16, 16, 4, 64, jnp.bfloat16, layout="packed")
        spec = NamedSharding(mesh, P("dp", None, "h", None, None))
        rng = np.random.default_rng(0)
        cache = np.full(shape, np.nan, jnp.bfloat16)
        k, v = (rng.uniform(-4, 4, (40, 4, 64)).astype(jnp.bfloat16) for _ in "kv")
        new = np.asarray(jk.merge_kv(jnp.asarray(k), jnp.asarray(v), layout="packed"))
        idx, total = random_slices(rng, num_rows=256, num_tokens=40, page_size=16, num_slices=12, num_valid=12)
        fn = jax.jit(lambda n, i, c, t: jk.kv_cache_update_sharded(n, i, c, t, mesh=mesh, heads_axis="h",
                                                                   pages_axis="dp", page_size=16), donate_argnums=2)
        tokens = jax.device_put(new, NamedSharding(mesh, P(None, "h", None, None)))
        args = (tokens, jnp.asarray(idx), jax.device_put(cache, spec), jnp.asarray(total))
        hlo = fn.lower(*args).compile().as_text()
        for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
            assert collective not in hlo, collective
        out = fn(*args)
        assert out.sharding.is_equivalent_to(spec, 5), out.sharding
        assert np.array_equal(bits(out), bits(jk.kv_cache_update_reference(new, idx, cache, total)))
        tpu = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in tpu
        print("ok")
        """,
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )


def test_xla_spmd_cache_sharded_over_heads(tmp_path):
    pytest.importorskip("torch_xla", reason="torch_xla is not installed in this environment")
    dump = tmp_path / "hlo"
    _run(
        f"""
        import glob, numpy as np, torch, torch_xla
        import torch_xla.runtime as xr, torch_xla.distributed.spmd as xs
        import jax_kernels as jk, torch_ops
        from jax_kernels.testing import bits, random_slices, random_tokens, sentinel_cache
        xr.use_spmd()
        assert xr.global_runtime_device_count() == 4
        mesh = xs.Mesh(np.arange(4), (4,), ("h",))
        dev = torch_xla.device()
        rng = np.random.default_rng(0)
        cache_np = sentinel_cache(8 * 16, 8, 128, "float32"); new_np = random_tokens(rng, 40, 8, 128, "float32")
        idx, total = random_slices(rng, num_rows=128, num_tokens=40, page_size=16, num_slices=8)
        want = jk.kv_cache_update_reference(new_np, idx, cache_np, total)
        new = torch.from_numpy(new_np).to(dev); xs.mark_sharding(new, mesh, (None, "h", None))
        for impl in ("auto", "jax", "scan"):
            cache = torch.from_numpy(cache_np).to(dev)
            xs.mark_sharding(cache, mesh, (None, "h", None))
            spec = torch_xla._XLAC._get_xla_sharding_spec(cache)
            torch_ops.kv_cache_update(new, torch.from_numpy(idx).to(dev), cache, torch.from_numpy(total).to(dev), page_size=16, impl=impl)
            torch_xla.sync()
            assert torch_xla._XLAC._get_xla_sharding_spec(cache) == spec, (impl, spec)
            assert np.array_equal(bits(cache.cpu().numpy()), bits(want)), impl
        # The update graphs (not the .cpu() gathers) hold no collective.
        steps = glob.glob("{dump}/*SyncTensorsGraph*after_optimizations.txt")
        assert steps
        for path in steps:
            text = open(path).read()
            assert "all-gather" not in text and "all-reduce" not in text, path
        print("ok")
        """,
        {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4", "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_as_text"},
    )
