"""benchmarks/: the workloads are realistic and valid, the bars are evaluated
right, and ``bench_update.py --quick`` runs end to end (smoke test)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

import jax_kernels as jk
from benchmarks import report
from benchmarks.workloads import SHAPES, cache_rows, fits, make_batch, make_workload

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_XLA = importlib.util.find_spec("torch_xla") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
CPU_PATHS = ("memcpy", "index_copy_", "op:auto", "op:auto new metadata", "op:jax", "op:pallas_interpret", "jax:auto", "jax:scatter", "jax:scan")
XLA_PATHS = ("index_copy_", "op:auto", "op:jax", "op:pallas_interpret")


# ------------------------------------------------------------------ workloads


@pytest.mark.parametrize("page_size", [16, 32])
def test_update_shapes_match_the_issue(page_size):
    decode, mixed, prefill = (make_batch(s, page_size) for s in SHAPES)
    assert decode.num_requests == 64 and decode.num_tokens == 64 and decode.pages_touched == 64
    assert 1900 <= mixed.num_tokens <= 2100 and 200 <= mixed.pages_touched <= 256
    assert prefill.num_tokens == 8192
    for b in (decode, mixed, prefill):
        assert b.max_num_slices == jk.max_num_slices_bound(b.num_requests, b.num_tokens, page_size)
    # Mixed: some decode requests, some chunked prefills starting mid-page.
    chunks = mixed.counts > 1
    assert (mixed.counts == 1).any() and chunks.any() and (mixed.starts[chunks] % page_size != 0).any()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("page_size", [16, 32])
def test_workloads_are_valid_and_the_same_update_at_every_cache_size(shape, page_size):
    batch = make_batch(shape, page_size)
    sizes = [s for s in (16, 64, 256) if fits(batch, cache_rows(s, "float32", (16, 32)))]
    assert sizes, "every shape fits a 256 MiB float32 cache"
    loads = []
    for size in sizes:
        w = make_workload(batch, cache_rows(size, "float32", (16, 32)), "float32")
        n = w.num_slices
        assert n == batch.pages_touched and w.slice_indices.shape == (3, batch.max_num_slices)
        jk.dynamic_validate_inputs(w.new_tokens, w.slice_indices, np.empty((w.num_rows, 1, 1)), w.total, page_size=page_size)
        dst, src, length = w.slice_indices[:, :n].astype(np.int64)
        # Sources packed in order, one slice per page, each request on its own pages.
        assert np.array_equal(src, np.cumsum(length) - length)
        pages = dst // page_size
        assert len(set(pages.tolist())) == n and ((dst + length - 1) // page_size == pages).all()
        assert len(w.dst_rows) == batch.num_tokens == len(set(w.dst_rows.tolist()))
        loads.append((src, length, dst % page_size, w.new_tokens))
    for src, length, offset, new in loads[1:]:  # the same update, only the pages differ
        for a, b in zip(loads[0], (src, length, offset, new)):
            np.testing.assert_array_equal(a, b)


def test_smallest_caches_holding_each_shape():
    """What the tables say: decode fits 16 MiB; mixed needs 64 MiB in float32
    (page 32), prefill (8,192 rows = 64 MiB float32) needs 256 MiB."""
    rows = lambda mib, dt="float32": cache_rows(mib, dt, (16, 32))  # noqa: E731
    assert fits(make_batch("decode", 32), rows(16))
    assert not fits(make_batch("mixed", 32), rows(16)) and fits(make_batch("mixed", 32), rows(64))
    assert not fits(make_batch("prefill", 16), rows(64)) and fits(make_batch("prefill", 16), rows(256))
    assert fits(make_batch("prefill", 16), rows(64, "bfloat16"))


# ------------------------------------------------------------------ bars


def _record(backend, shape, path, size, us):
    return dict(backend=backend, shape=shape, dtype="float32", page_size=16, size_mib=size, path=path,
                median_s=us * 1e-6, samples_s=[us * 1e-6] * 5)


def _env(**kw):
    return dict(sizes_mib=[16, 1024], xla=True, started="now", loadavg_start=[0, 0, 0], loadavg_end=[0, 0, 0],
                cpus=2, quick=False, **kw)


def test_bars_pass_and_fail_on_the_ratios():
    times = {  # (backend, shape, path): (µs at 16 MiB, µs at 1 GiB)
        ("cpu", "mixed", "memcpy"): (100, 100), ("cpu", "mixed", "index_copy_"): (200, 200),
        ("cpu", "mixed", "op:auto"): (230, 240), ("cpu", "mixed", "jax:scatter"): (300, 310),
        ("cpu", "mixed", "jax:scan"): (2000, 2000), ("cpu", "decode", "index_copy_"): (10, 10),
        ("cpu", "decode", "op:auto"): (19, 19), ("xla", "decode", "index_copy_"): (100, 100),
        ("xla", "decode", "op:auto"): (290, 300),
    }
    records = [_record(b, s, p, size, t) for (b, s, p), ts in times.items() for size, t in zip((16, 1024), ts)]
    bars = {b["id"]: b for b in report.evaluate_bars(report.Results(records), _env())}
    assert {i: b["status"] for i, b in bars.items()} == {1: "PASS", 2: "PASS", 3: "PASS", 4: "PASS", 5: "PASS"}

    times[("cpu", "mixed", "op:auto")] = (250, 250)  # 1.25x index_copy_ > 1.2
    times[("cpu", "decode", "op:auto")] = (15, 25)  # flatness 1.67, and 2.5x index_copy_ at 1 GiB
    times[("cpu", "mixed", "jax:scan")] = (1000, 1000)  # 3.3x < 5x
    records = [_record(b, s, p, size, t) for (b, s, p), ts in times.items() for size, t in zip((16, 1024), ts)]
    bars = {b["id"]: b for b in report.evaluate_bars(report.Results(records), _env())}
    assert {i: b["status"] for i, b in bars.items()} == {1: "FAIL", 2: "FAIL", 3: "FAIL", 4: "PASS", 5: "FAIL"}
    assert "1.67" in bars[1]["lines"][0] and "op:auto" in bars[1]["lines"][0]
    assert bars[4]["status"] == "PASS"
    bars = {b["id"]: b for b in report.evaluate_bars(report.Results(records), _env(**{}) | {"xla": False})}
    assert bars[4]["status"] == "N/A"


def test_quick_mode_judges_no_bar():
    """--quick times tiny caches and updates: passing and failing ratios alike are shown, not judged."""
    times = {  # bar 3 passes (1.9x), bar 5 fails (3.3x < 5x); bar 4 has no XLA here
        ("cpu", "decode", "index_copy_"): (10, 10), ("cpu", "decode", "op:auto"): (19, 19),
        ("cpu", "mixed", "jax:scatter"): (300, 300), ("cpu", "mixed", "jax:scan"): (1000, 1000),
    }
    records = [_record(b, s, p, size, t) for (b, s, p), ts in times.items() for size, t in zip((4, 16), ts)]
    env = _env() | {"quick": True, "sizes_mib": [4, 16], "xla": False}
    bars = {b["id"]: b for b in report.evaluate_bars(report.Results(records), env)}
    assert {i: b["status"] for i, b in bars.items()} == {
        1: report.NOT_JUDGED, 2: "N/A", 3: report.NOT_JUDGED, 4: "N/A", 5: report.NOT_JUDGED
    }
    assert "4 MiB, 16 MiB" in bars[5]["lines"][0] and any("3.33" in line for line in bars[5]["lines"])
    text = report.bars_markdown(list(bars.values()), env)
    assert "PASS" not in text and "FAIL" not in text, text
    assert "Summary: not judged in quick mode (2: N/A, 4: N/A)" in text
    env["quick"] = False
    full = {b["id"]: b["status"] for b in report.evaluate_bars(report.Results(records), env)}
    assert (full[3], full[5]) == ("PASS", "FAIL")


# ------------------------------------------------------------------ smoke run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PJRT_DEVICE=os.environ.get("PJRT_DEVICE", "CPU"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_update.py"), "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_quick_run_writes_table_bars_plot_and_json(quick_run):
    out, proc = quick_run
    table = (out / "bench_update.md").read_text()
    bars_md = (out / "bars.md").read_text()
    data = json.loads((out / "bench_update.json").read_text())
    if HAS_MPL:
        assert (out / "bench_update.png").stat().st_size > 10_000
    else:
        assert "matplotlib" in data["environment"]["plot"]
    expected = {("cpu", p) for p in CPU_PATHS} | ({("xla", p) for p in XLA_PATHS} if HAS_XLA else set())
    assert {(r["backend"], r["path"]) for r in data["records"]} == expected
    sections = table.split("## PyTorch/XLA")
    for backend, path in expected:
        assert f"| `{path}` |" in sections[0 if backend == "cpu" else 1], (backend, path)
    for i in range(1, 6):
        assert f"### {i}. " in bars_md and f"### {i}. " in table
    assert "## Bars" in proc.stdout
    statuses = {b["id"]: b["status"] for b in data["bars"]}
    assert set(statuses) == {1, 2, 3, 4, 5} and set(statuses.values()) <= {report.NOT_JUDGED, "N/A"}
    assert (statuses[4] == "N/A") == (not HAS_XLA)
    assert "PASS" not in bars_md and "FAIL" not in bars_md


def test_quick_run_checked_every_path_once_against_the_reference(quick_run):
    out, _ = quick_run
    data = json.loads((out / "bench_update.json").read_text())
    checks = {}
    for c in data["checks"]:
        key = (c["backend"], c["shape"], c["dtype"], c["page_size"], c["path"])
        assert key not in checks, f"checked twice: {key}"
        checks[key] = c
    for r in data["records"]:
        c = checks[(r["backend"], r["shape"], r["dtype"], r["page_size"], r["path"])]
        assert c["ok"], c
        assert c["kind"] == ("copy" if r["path"] == "memcpy" else "reference")
        assert c["size_mib"] <= r["size_mib"]  # checked before (at the first size) it was timed
        assert len(r["samples_s"]) >= 5 or r["over_budget"]
        assert r["median_s"] == pytest.approx(float(np.median(r["samples_s"])))


def test_quick_run_times_a_model_step(quick_run):
    """The model step: the op and index_copy_ per layer, at 1 thread and at the run's count, both
    checked against the reference first; its table in bench_update.md."""
    from benchmarks.bench_update import MODEL_STEP_QUICK, MODEL_STEP_SHAPE

    out, _ = quick_run
    data = json.loads((out / "bench_update.json").read_text())
    threads = data["environment"]["torch_threads"]
    recs = {(r["dtype"], r["path"], r["threads"]): r for r in data["step_records"]}
    assert set(recs) == {("float32", p, n) for p in ("op:auto", "index_copy_") for n in {1, threads}}
    for r in recs.values():
        assert r["layers"] == MODEL_STEP_QUICK["layers"] and r["size_mib"] == MODEL_STEP_QUICK["cache_mib"]
        assert r["per_layer_s"] == pytest.approx(r["median_s"] / r["layers"])
        assert len(r["samples_s"]) >= 5 or r["over_budget"]
    checks = {c["path"]: c for c in data["checks"] if c["shape"] == MODEL_STEP_SHAPE}
    assert set(checks) == {"op:auto", "index_copy_"} and all(c["ok"] for c in checks.values())
    table = (out / "bench_update.md").read_text().split("## A model's decode step: ")[1]
    for n in {1, threads}:
        assert f"| float32 | 16 | {n} | " in table


def test_model_step_table_marks_the_goal():
    from benchmarks.bench_update import model_step_markdown

    def rec(dtype, path, threads, us):
        return dict(dtype=dtype, page_size=16, layers=32, size_mib=16, path=path, threads=threads,
                    per_layer_s=us * 1e-6)

    records = [rec("float32", "index_copy_", 1, 100), rec("float32", "op:auto", 1, 150),
               rec("float32", "index_copy_", 2, 60), rec("float32", "op:auto", 2, 91)]
    md = model_step_markdown(records, dict(dtypes=["float32"], threads_note=" (torch's default)"))
    assert "## A model's decode step: 32 layers, each its own 16 MiB cache (torch's default)" in md
    assert "| float32 | 16 | 1 | 100 | 150 | 1.50 ✓ |" in md
    assert "| float32 | 16 | 2 | 60 | 91 | 1.52 ✗ |" in md
    assert model_step_markdown([], {}) == ""


def test_stalled_points_are_flagged():
    mib = 1 << 20
    records = [dict(_record("cpu", "mixed", "memcpy", size, us), bytes_moved=16 * mib)
               for size, us in ((64, 8000), (256, 800), (1024, 790))]
    assert set(report.stalled_points(report.Results(records))) == {("mixed", "float32", 16, 64)}


def test_measure_times_a_slow_path_once():
    from benchmarks.bench_update import measure

    calls = []
    m = measure(lambda: calls.append(1), repeats=5, min_time=0.0)
    assert not m["over_budget"] and len(m["samples_s"]) == 5 and len(calls) == 2 + 5 * m["number"] * m["attempts"]
    calls.clear()
    m = measure(lambda: calls.append(1), repeats=5, min_time=0.0, max_call=-1.0)
    assert m["over_budget"] and m["samples_s"] == [m["median_s"]] and len(calls) == 2


def test_paths_of_a_point_are_sampled_in_turns_and_slow_ones_alone():
    import itertools

    from benchmarks.bench_update import measure_interleaved

    log = []

    def slow():
        log.append("slow")
        time.sleep(0.02)

    steps = {
        "a": (lambda: log.append("a"), math.inf, 1),
        "b": (lambda: log.append("b"), math.inf, 1),
        "slow": (slow, math.inf, 0),
        "over": (lambda: (log.append("over"), time.sleep(0.01)), 0.001, 0),  # over max_call: one call
    }
    out = measure_interleaved(steps, repeats=5, min_time=0.001)
    assert list(out) == list(steps)
    assert out["over"]["over_budget"] and out["over"]["samples_s"] == [out["over"]["median_s"]]
    assert all(len(out[n]["samples_s"]) == 5 for n in ("a", "b", "slow"))
    assert out["slow"]["number"] == 1 and out["slow"]["median_s"] >= 0.02
    runs = [name for name, _ in itertools.groupby(log)]
    # warm-up + calibration per path, then a and b alternate sample by sample, then the slow path alone
    assert runs[:4] == ["a", "b", "slow", "over"]
    timed = runs[4:]
    attempts = out["a"]["attempts"]
    assert timed[: 10 * attempts] == ["a", "b"] * 5 * attempts
    assert timed[10 * attempts:] == ["slow"]
