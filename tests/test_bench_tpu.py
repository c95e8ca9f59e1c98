"""benchmarks/bench_tpu.py on CPU: ``--dry-run --quick`` lowers every configuration for TPU and
prints the plan; off TPU the script says so and exits 0; and the timing and report code runs end
to end on a tiny sweep point (on CPU the kernel paths run the fallback: the numbers mean nothing,
the checks and the files are what is tested)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_kernels as jk
from benchmarks import bench_tpu
from benchmarks.workloads import HEAD_DIM, HEADS, make_batch
from jax_kernels.kv_cache_update.tpu_config import MiB, TPU_CHIPS
from jax_kernels.testing import np_dtype

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^(\w+) +(\w+) +(\w+) +page (\d+) +(\d+)/(\d+) +slices (\S+) +(.*)\[(ok|FAIL)[^\]]*\]$")
KERNEL = re.compile(r"spp +(\d+) +vmem limit +([\d.]+) MiB +staging +([\d.]+) MiB +page (\d+) KiB")


def test_off_tpu_it_says_so_and_exits_0():
    if jax.devices()[0].platform == "tpu":
        pytest.skip("a TPU is attached: the script would run the sweep")
    out = subprocess.run([sys.executable, "benchmarks/bench_tpu.py", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no TPU here" in out.stdout and "--dry-run" in out.stdout


def test_dry_run_quick_lowers_every_configuration_for_tpu(capsys):
    assert bench_tpu.main(["--dry-run", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = [LINE.match(line) for line in out.splitlines() if LINE.match(line)]
    quick = bench_tpu.QUICK
    want = len(quick["shapes"]) * len(quick["dtypes"]) * len(quick["layouts"]) * len(quick["paths"])
    assert len(rows) == want and f"{want} of {want} lowerings as expected" in out, out
    seen = set()
    for m in rows:
        shape, dtype, layout, ps, slices, max_slices, path, config, verdict = m.groups()
        assert verdict == "ok", m.group(0)
        seen.add((shape, dtype, layout, path))
        batch = make_batch(shape, int(ps), quick=True)
        assert (int(slices), int(max_slices)) == (batch.pages_touched, batch.max_num_slices)
        if path == "scatter":
            assert "no tpu_custom_call" in m.group(0)
            continue
        spp, vmem, staging, page_kib = KERNEL.search(config).groups()
        page = int(ps) * HEADS * HEAD_DIM * np_dtype(dtype).itemsize  # a page of 16 x 128 rows: no padding
        assert int(page_kib) * 1024 == page
        assert float(staging) == pytest.approx(int(spp) * page / MiB, abs=0.006)
        limit = int(re.search(r"vmem limit (\d+)\]", m.group(0)).group(1))  # checked against the lowering
        assert float(vmem) == pytest.approx(limit / MiB, abs=0.06)
        assert int(spp) * page + MiB <= limit
        if path == "kernel:auto":
            assert int(spp) <= min(64, int(max_slices)) and "auto by generation:" in config
        else:
            assert int(spp) == bench_tpu.spp_of(path)
    assert seen == {(s, d, lay, p) for s in quick["shapes"] for d in quick["dtypes"] for lay in quick["layouts"]
                    for p in quick["paths"]}


def test_the_lowering_checks_catch_a_missing_kernel_a_wrong_limit_and_a_copied_cache():
    spec = (jax.ShapeDtypeStruct((8, 2, 128), jnp.bfloat16), jax.ShapeDtypeStruct((3, 4), jnp.int32),
            jax.ShapeDtypeStruct((4, 16, 2, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1,), jnp.int32))
    kernel = bench_tpu.inspect_tpu_lowering(bench_tpu.lower_for_tpu(bench_tpu.make_step("kernel:8", 16, 2), *spec))
    limit = jk.tpu_kernel_config(spec[2].shape, jnp.bfloat16, page_size=16, num_slices=4,
                                 slices_per_processing_page=8).vmem_limit_bytes
    assert bench_tpu.lowering_problems(kernel, kernel=True, vmem_limit_bytes=limit) == []
    assert kernel.kernel_calls == 1 and kernel.vmem_limits == (limit,) and kernel.donated == {2: 0}
    assert "VMEM limit" in bench_tpu.lowering_problems(kernel, kernel=True, vmem_limit_bytes=limit + 1)[0]
    assert "expected no tpu_custom_call" in bench_tpu.lowering_problems(kernel, kernel=False, vmem_limit_bytes=None)[0]
    scatter = bench_tpu.inspect_tpu_lowering(bench_tpu.lower_for_tpu(bench_tpu.make_step("scatter", 16, 2), *spec))
    assert "expected one tpu_custom_call, found 0" in bench_tpu.lowering_problems(scatter, kernel=True,
                                                                                vmem_limit_bytes=limit)[0]
    undonated = jax.jit(lambda t, i, c, n: jk.kv_cache_update(t, i, c, n, page_size=16))
    low = bench_tpu.inspect_tpu_lowering(bench_tpu.lower_for_tpu(undonated, *spec))
    assert "not aliased to an output" in bench_tpu.lowering_problems(low, kernel=True, vmem_limit_bytes=low.vmem_limits[0])[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_packed_rows_of_these_heads_are_the_combined_rows_regrouped(dtype):
    """The benchmark writes the workloads' combined rows as packed rows by a reshape: for 8 KV heads
    of 128 lanes, merge_kv's packed rows are exactly that (no padding heads or lanes)."""
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.uniform(-4, 4, (5, HEADS // 2, HEAD_DIM)).astype(np_dtype(dtype))) for _ in "kv")
    combined = np.asarray(jk.merge_kv(k, v, layout="combined"))
    packed = np.asarray(jk.merge_kv(k, v, layout="packed"))
    assert packed.shape[1:] == bench_tpu.row_shape("packed", dtype)
    np.testing.assert_array_equal(combined.reshape(packed.shape).view(np.uint8), packed.view(np.uint8))
    assert bench_tpu.row_bytes("packed", dtype) == bench_tpu.row_bytes("combined", dtype) == combined[0].nbytes


def test_a_sweep_point_is_checked_timed_and_reported(tmp_path):
    cfg = bench_tpu.parse_args(["--quick", "--cache-mib", "4", "--shapes", "decode", "--dtypes", "bfloat16",
                                "--layouts", "packed", "--min-time", "0.001", "--inner", "2"])
    plan, skipped = bench_tpu.make_plan(cfg)
    assert [item.path for item in plan] == cfg.paths and not skipped
    peak = TPU_CHIPS["v6e"].hbm_bytes_per_second
    records, checks = bench_tpu.run_point(cfg, plan, peak)
    assert [c["ok"] for c in checks] == [True] * len(plan), checks
    assert [r["path"] for r in records] == cfg.paths
    point = plan[0].point
    for r in records:
        assert len(r["samples_s"]) == cfg.repeats and r["median_s"] == pytest.approx(np.median(r["samples_s"]))
        assert r["bytes_moved"] == 2 * point.num_tokens * HEADS * HEAD_DIM * 2  # read + written, bfloat16
        assert r["gbps"] == pytest.approx(r["bytes_moved"] / r["median_s"] / 1e9)
        assert r["hbm_fraction"] == pytest.approx(r["bytes_moved"] / r["median_s"] / peak)
    env = bench_tpu.environment(cfg, jax.devices()[0])
    env["hbm_bytes_per_second"] = peak
    files = bench_tpu.write_results(tmp_path, env, records, plan, checks, skipped)
    table = (tmp_path / "bench_tpu.md").read_text()
    scatter = next(r for r in records if r["path"] == "scatter")
    assert f"| decode | bfloat16 | packed | 32 | {point.num_slices} |" in table and f"{scatter['gbps']:.1f}" in table
    data = json.loads((tmp_path / "bench_tpu.json").read_text())
    assert len(data["records"]) == len(records) and len(data["plan"]) == len(plan)
    has_png = (tmp_path / "bench_tpu.png").exists()
    assert has_png == (importlib.util.find_spec("matplotlib") is not None) == (tmp_path / "bench_tpu.png" in files)
