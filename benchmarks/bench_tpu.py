"""GB/s of the KV cache update on a TPU: the Pallas kernel at 8 / 16 / 32 / 64 / auto slices per
step, against XLA's scatter of the same rows and the chip's HBM bandwidth.

    python benchmarks/bench_tpu.py                     # on a TPU VM: the sweep (estimated 10 minutes; never run yet)
    python benchmarks/bench_tpu.py --quick             # on a TPU VM: smoke run (estimated a minute)
    python benchmarks/bench_tpu.py --dry-run           # any host: lower every configuration for TPU, print the plan
    python benchmarks/bench_tpu.py --dry-run --quick   # the same on a small subset (its test runs this)

Off TPU (JAX's default device is not a TPU) it says so and exits 0, unless ``--dry-run``.

Sweep: the update shapes of ``benchmarks/workloads.py`` (block-table workloads: ``decode`` 64 requests
x 1 token, ``mixed`` ~2,000 tokens over ~240 slices, ``prefill`` 8,192 tokens), dtypes bfloat16 and
float8_e4m3fn, layouts ``combined`` (``[P, page_size, 16, 128]``: 16 combined K+V heads) and ``packed``
(``[P, page_size, 16 // pack, pack, 128]``: tpu-inference's RPA v3 cache of the same 8 KV heads; for
these heads a packed row holds exactly the combined row's bytes), page sizes 32 and 128, in a
``--cache-mib`` cache (1 GiB). Paths, on the same inputs:

* ``kernel:8``, ``kernel:16``, ``kernel:32``, ``kernel:64``: ``jax_kernels.kv_cache_update`` with
  that ``slices_per_processing_page``; a value whose staging buffer does not fit the chip's VMEM is
  listed, not run (``kv_cache_update`` would fall back to the scatter);
* ``kernel:auto``: ``slices_per_processing_page=None``, sized from VMEM (what a user gets);
* ``scatter``: ``jax_kernels.kv_cache_update_scatter``, XLA's scatter of the same rows.

Method: each path is a ``jax.jit`` of ``--inner`` updates in a ``lax.fori_loop`` (the cache carried
and donated: in place), so the host's per-call dispatch is paid once per ``--inner`` updates, as
inside a model step. Before timing, each path runs once on a NaN-filled cache and must equal
``jax_kernels.kv_cache_update_reference`` bitwise (compared on the device), and its lowering must
hold the Pallas kernel (``tpu_custom_call``) with the cache aliased and the VMEM limit of
``jax_kernels.tpu_kernel_config`` (the scatter: no kernel). Then ``--warmup`` untimed calls, one
calibration call, and ``--repeats`` (>= 5) samples of each path, the paths sampled in turns
(sample 1 of every path, then sample 2, ...: load from outside falls on all alike; the same
scheme as ``bench_update.measure_interleaved``, which cannot be imported here without torch and
``torch_ops`` — on a TPU VM with torch_xla, importing ``bridge`` hands the TPU to torch_xla);
a sample is ``number`` back-to-back calls, one ``block_until_ready`` at the end, lasting about
``--min-time``. Reported: the median sample, per update.

GB/s = (bytes read + bytes written) / time = 2 x rows written x row bytes / time (the token rows
are read, the cache rows written; the slice metadata is ignored). The HBM figure is
``TPU_CHIPS[generation].hbm_bytes_per_second`` (per TensorCore, from jax's ``tpu_info``).

Outputs in ``--out`` (default ``benchmarks/results/``): ``bench_tpu.md`` (tables), ``bench_tpu.json``
(everything, raw samples included) and ``bench_tpu.png`` (GB/s vs slices per step; needs matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import pathlib
import platform
import re
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_kernels as jk  # noqa: E402
from benchmarks.workloads import HEAD_DIM, HEADS, SHAPES, cache_rows, fits, make_batch, make_workload  # noqa: E402
from jax_kernels.kv_cache_update.tpu_config import (  # noqa: E402
    DEFAULT_GENERATION,
    MiB,
    TPU_CHIPS,
    attached_generation,
)
from jax_kernels.testing import np_dtype  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
KERNEL_CALL = "tpu_custom_call"
LAYOUTS = ("combined", "packed")
DTYPES = ("bfloat16", "float8_e4m3fn")
PATHS = ("kernel:8", "kernel:16", "kernel:32", "kernel:64", "kernel:auto", "scatter")
CACHE_ARG = 2  # the cache's position in (tokens, slice_indices, cache, total)
FULL = dict(shapes=list(SHAPES), dtypes=list(DTYPES), layouts=list(LAYOUTS), page_sizes=[32, 128], paths=list(PATHS),
            cache_mib=1024.0, repeats=7, min_time=0.05, inner=32, warmup=2)
QUICK = dict(shapes=["decode", "mixed"], dtypes=list(DTYPES), layouts=list(LAYOUTS), page_sizes=[32],
             paths=["kernel:8", "kernel:auto", "scatter"], cache_mib=64.0, repeats=5, min_time=0.01, inner=8, warmup=1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ TPU lowerings


@dataclasses.dataclass(frozen=True)
class TpuLowering:
    """What a TPU lowering (StableHLO text) says about the update."""

    kernel_calls: int  # tpu_custom_call ops (Pallas kernels)
    vmem_limits: tuple[int, ...]  # each kernel's scoped VMEM limit in bytes (scoped_memory_configs size)
    kernel_aliases: tuple[tuple[int, int], ...]  # each kernel output aliased to an operand: (output, operand)
    donated: dict[int, int]  # main's argument index -> the output it is aliased to (tf.aliasing_output)


_ALIAS = re.compile(r"output_operand_alias<output_tuple_indices = \[(\d*)\], operand_index = (\d+)")
_SCOPED = re.compile(r"scoped_memory_configs\\22: \[([^\]]*)\]")
_SIZE = re.compile(r"size\\22: (\d+)")
_MAIN = re.compile(r"func\.func public @main\((.*?)\) ->")
_ARG = re.compile(r"%arg(\d+): ([^%]*)")
_DONATED = re.compile(r"tf\.aliasing_output = (\d+)")


def lower_for_tpu(fn, *args) -> str:
    """The StableHLO text of jitted ``fn`` lowered for TPU, from any host (``args``: arrays or
    ``jax.ShapeDtypeStruct``s)."""
    specs = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in args]
    return fn.trace(*specs).lower(lowering_platforms=("tpu",)).as_text()


def inspect_tpu_lowering(text: str) -> TpuLowering:
    """Parse a TPU lowering: its Pallas kernels (one ``tpu_custom_call`` line each), their VMEM
    limits and input→output aliases, and which of ``main``'s arguments are donated into outputs."""
    calls = [line for line in text.splitlines() if KERNEL_CALL in line]
    limits, aliases = [], []
    for call in calls:
        scoped = _SCOPED.search(call)
        if scoped:
            limits.extend(int(size) for size in _SIZE.findall(scoped.group(1)))
        aliases.extend((int(out or 0), int(operand)) for out, operand in _ALIAS.findall(call))
    main = _MAIN.search(text)
    donated = {}
    for index, attrs in _ARG.findall(main.group(1) if main else ""):
        found = _DONATED.search(attrs)
        if found:
            donated[int(index)] = int(found.group(1))
    return TpuLowering(len(calls), tuple(limits), tuple(aliases), donated)


def lowering_problems(low: TpuLowering, *, kernel: bool, vmem_limit_bytes: int | None, num_caches: int = 1,
                      cache_args=(CACHE_ARG,)) -> list[str]:
    """What is wrong with a lowering of the update ([] = nothing): with ``kernel``, exactly one
    Pallas kernel whose ``num_caches`` outputs are aliased to operands and whose VMEM limit is
    ``vmem_limit_bytes``; without, no kernel. Either way every cache argument is donated."""
    problems = []
    if kernel:
        if low.kernel_calls != 1:
            problems.append(f"expected one {KERNEL_CALL}, found {low.kernel_calls}")
        elif len(low.kernel_aliases) != num_caches:
            problems.append(f"the kernel aliases {len(low.kernel_aliases)} outputs to inputs, expected {num_caches}")
        if low.kernel_calls == 1 and low.vmem_limits != (vmem_limit_bytes,):
            problems.append(f"VMEM limit {low.vmem_limits} in the lowering, expected ({vmem_limit_bytes},)")
    elif low.kernel_calls:
        problems.append(f"expected no {KERNEL_CALL} (the fallback), found {low.kernel_calls}")
    missing = [a for a in cache_args if a not in low.donated]
    if missing:
        problems.append(f"cache argument(s) {missing} not aliased to an output (donated: {low.donated})")
    return problems


# ------------------------------------------------------------------ the plan


def spp_of(path: str) -> int | None:
    """``slices_per_processing_page`` of a ``kernel:*`` path (``None`` for ``kernel:auto``)."""
    value = path.split(":", 1)[1]
    return None if value == "auto" else int(value)


def row_shape(layout: str, dtype: str) -> tuple[int, ...]:
    """One token's row: ``HEADS`` combined heads (``HEADS // 2`` KV heads) of ``HEAD_DIM``."""
    return jk.kv_cache_shape(1, 1, HEADS // 2, HEAD_DIM, np_dtype(dtype), layout=layout)[2:]


def row_bytes(layout: str, dtype: str) -> int:
    return math.prod(row_shape(layout, dtype)) * np_dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: an update shape placed in a cache of one dtype, layout and page size."""

    shape: str
    dtype: str
    layout: str
    page_size: int
    num_rows: int  # cache rows (a whole number of pages)
    num_tokens: int
    num_slices: int  # slices this update applies (pages it writes)
    max_num_slices: int  # the padded slice count (slice_indices' width)

    @property
    def cache_shape(self) -> tuple[int, ...]:
        return (self.num_rows // self.page_size, self.page_size, *row_shape(self.layout, self.dtype))

    @property
    def bytes_moved(self) -> int:
        """Bytes read + written: every token row read once, written once into the cache."""
        return 2 * self.num_tokens * row_bytes(self.layout, self.dtype)

    def specs(self):
        """``(tokens, slice_indices, cache, total)`` as ``jax.ShapeDtypeStruct``s."""
        dt = jnp.dtype(np_dtype(self.dtype))
        return (jax.ShapeDtypeStruct((self.num_tokens, *row_shape(self.layout, self.dtype)), dt),
                jax.ShapeDtypeStruct((3, self.max_num_slices), jnp.int32),
                jax.ShapeDtypeStruct(self.cache_shape, dt), jax.ShapeDtypeStruct((1,), jnp.int32))

    def label(self) -> str:
        return f"{self.shape} {self.dtype} {self.layout} page {self.page_size}"


@dataclasses.dataclass
class Planned:
    """A path at a sweep point and the kernel configuration it gets."""

    point: Point
    path: str
    config: jk.KernelConfig | None  # None for the scatter

    @property
    def runs_kernel(self) -> bool:
        return self.config is not None and self.config.problem is None


def kernel_config(point: Point, path: str, tpu_generation: str | None = None) -> jk.KernelConfig:
    return jk.tpu_kernel_config(point.cache_shape, np_dtype(point.dtype), page_size=point.page_size,
                                num_slices=point.max_num_slices, slices_per_processing_page=spp_of(path),
                                tpu_generation=tpu_generation)


def make_plan(cfg) -> tuple[list[Planned], list[dict]]:
    """Every (sweep point, path) of ``cfg``, and the points skipped (cache too small)."""
    plan, skipped = [], []
    for shape in cfg.shapes:
        for ps in cfg.page_sizes:
            batch = make_batch(shape, ps, quick=cfg.quick, seed=cfg.seed)
            for dtype in cfg.dtypes:
                rows = cache_rows(cfg.cache_mib, dtype, cfg.page_sizes)
                if not fits(batch, rows):
                    skipped.append(dict(shape=shape, dtype=dtype, page_size=ps,
                                        why=f"{batch.pages_touched} pages written, a {cfg.cache_mib:g} MiB cache has "
                                            f"{rows // ps}"))
                    continue
                for layout in cfg.layouts:
                    point = Point(shape, dtype, layout, ps, rows, batch.num_tokens, batch.pages_touched,
                                  batch.max_num_slices)
                    for path in cfg.paths:
                        plan.append(Planned(point, path, None if path == "scatter" else kernel_config(point, path)))
    return plan, skipped


def update_fn(path: str, page_size: int):
    if path == "scatter":
        return functools.partial(jk.kv_cache_update_scatter, page_size=page_size)
    return functools.partial(jk.kv_cache_update, page_size=page_size, slices_per_processing_page=spp_of(path))


def make_step(path: str, page_size: int, inner: int):
    """``(tokens, slice_indices, cache, total) -> cache``: ``inner`` updates of ``path`` in one
    program, the cache carried through a ``fori_loop`` and donated."""
    update = update_fn(path, page_size)

    def step(tokens, slice_indices, cache, total):
        return jax.lax.fori_loop(0, inner, lambda _, c: update(tokens, slice_indices, c, total), cache)

    return jax.jit(step, donate_argnums=CACHE_ARG)


def check_planned(item: Planned, text: str) -> list[str]:
    """The lowering problems of one planned path (see :func:`lowering_problems`)."""
    return lowering_problems(inspect_tpu_lowering(text), kernel=item.runs_kernel,
                             vmem_limit_bytes=item.config.vmem_limit_bytes if item.runs_kernel else None)


def describe(item: Planned) -> str:
    """What a planned path runs with: ``spp``, VMEM limit and staging bytes (or why it falls back)."""
    if item.config is None:
        return "XLA scatter"
    c = item.config
    text = (f"spp {c.slices_per_processing_page:>2}  vmem limit {c.vmem_limit_bytes / MiB:5.1f} MiB  "
            f"staging {c.staging_bytes / MiB:6.2f} MiB  page {c.page_bytes // 1024} KiB")
    if item.path == "kernel:auto":
        per_gen = " ".join(f"{g} {kernel_config(item.point, item.path, g).slices_per_processing_page}" for g in TPU_CHIPS)
        text += f"  (auto by generation: {per_gen})"
    if c.problem:
        text += f"  NOT RUN (kv_cache_update would fall back to the scatter): {c.problem.split('; ')[0]}"
    return text


# ------------------------------------------------------------------ dry run


def dry_run(cfg, plan: list[Planned], skipped: list[dict]) -> int:
    """Lower every planned path for TPU, check each lowering, print the plan. 0 if all pass."""
    generation = attached_generation()
    where = generation or f"{DEFAULT_GENERATION} (no TPU attached: tpu_config.DEFAULT_GENERATION, what an export from here gets)"
    print(f"bench_tpu --dry-run: {len(plan)} configurations, lowered for TPU {where}; jax {jax.__version__}")
    for s in skipped:
        print(f"skipped {s['shape']} {s['dtype']} page {s['page_size']}: {s['why']}")
    failures = 0
    for item in plan:
        p = item.point
        text = lower_for_tpu(make_step(item.path, p.page_size, cfg.inner), *p.specs())
        problems = check_planned(item, text)
        failures += bool(problems)
        if problems:
            verdict = "FAIL: " + "; ".join(problems)
        elif item.runs_kernel:
            verdict = f"ok: {KERNEL_CALL}, cache aliased, vmem limit {item.config.vmem_limit_bytes}"
        else:
            verdict = f"ok: no {KERNEL_CALL}, cache aliased"
        print(f"{p.shape:<8} {p.dtype:<14} {p.layout:<9} page {p.page_size:<4} {p.num_slices:>4}/{p.max_num_slices:<4} slices "
              f"{item.path:<12} {describe(item)}  [{verdict}]")
    print(f"dry run: {len(plan) - failures} of {len(plan)} lowerings as expected"
          + (f", {failures} FAILED" if failures else ""))
    return 1 if failures else 0


# ------------------------------------------------------------------ timing (TPU)


def sample_in_turns(steps: dict, cache, *, repeats: int, min_time: float, warmup: int):
    """Time ``{name: step}`` (each ``cache -> cache``, donating it) on one cache passed along.

    Per path: ``warmup`` calls, one calibration call, then ``number`` back-to-back calls per
    sample (about ``min_time``, one ``block_until_ready`` at the end). The paths are sampled in
    turns. Returns ``({name: [seconds per call]}, {name: number}, cache)``."""
    numbers = {}
    for name, step in steps.items():
        for _ in range(warmup):
            cache = step(cache)
        cache.block_until_ready()
        t0 = time.perf_counter()
        cache = step(cache)
        cache.block_until_ready()
        single = time.perf_counter() - t0
        numbers[name] = max(1, min(10_000, math.ceil(min_time / max(single, 1e-7))))
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(numbers[name]):
                cache = step(cache)
            cache.block_until_ready()
            samples[name].append((time.perf_counter() - t0) / numbers[name])
    return samples, numbers, cache


@jax.jit
def _bit_mismatches(out, expected):  # -> i32[]: elements whose bits differ
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[out.dtype.itemsize]
    a, b = jax.lax.bitcast_convert_type(out, width), jax.lax.bitcast_convert_type(expected, width)
    return jnp.sum(a != b, dtype=jnp.int32)


def nan_cache(point: Point):
    """A NaN-filled cache on the device (rows no slice names must stay NaN)."""
    return jnp.full(point.cache_shape, jnp.nan, jnp.dtype(np_dtype(point.dtype)))


def run_point(cfg, items: list[Planned], peak: float | None) -> tuple[list[dict], list[dict]]:
    """Check and time every path of one sweep point; returns (records, checks)."""
    p = items[0].point
    batch = make_batch(p.shape, p.page_size, quick=cfg.quick, seed=cfg.seed)
    w = make_workload(batch, p.num_rows, p.dtype, seed=cfg.seed)
    tokens_np = w.new_tokens.reshape(p.num_tokens, *row_shape(p.layout, p.dtype))  # [T, *row]
    expected_np = jk.kv_cache_update_reference(  # [P, page_size, *row]: NaN but the rows written
        tokens_np, w.slice_indices, np.full(p.cache_shape, np.nan, np_dtype(p.dtype)), w.total)
    # [T, *row], i32[3, max_num_slices], i32[1] on the device
    tokens, idx, total = (jax.device_put(a) for a in (tokens_np, w.slice_indices, w.total))
    expected = jax.device_put(expected_np)
    del expected_np
    checks, steps = [], {}
    for item in items:
        if item.config is not None and item.config.problem:
            checks.append(dict(point=dataclasses.asdict(p), path=item.path, ok=None, why=item.config.problem))
            continue
        step = make_step(item.path, p.page_size, cfg.inner)
        problems = check_planned(item, lower_for_tpu(step, *p.specs()))
        out = step(tokens, idx, nan_cache(p), total)
        bad = int(_bit_mismatches(out, expected))
        del out
        if bad:
            problems.append(f"{bad} elements differ from kv_cache_update_reference")
        checks.append(dict(point=dataclasses.asdict(p), path=item.path, ok=not problems, why="; ".join(problems)))
        if problems:
            log(f"  {item.path}: FAILED: {'; '.join(problems)}")
            continue
        steps[item.path] = lambda cache, step=step: step(tokens, idx, cache, total)  # donates the cache
    del expected
    records = []
    if steps:
        samples, numbers, cache = sample_in_turns(steps, nan_cache(p), repeats=cfg.repeats, min_time=cfg.min_time,
                                                  warmup=cfg.warmup)
        del cache
        by_path = {item.path: item for item in items}
        for name, s in samples.items():
            per_update = statistics.median(s) / cfg.inner
            c = by_path[name].config
            records.append(dict(
                shape=p.shape, dtype=p.dtype, layout=p.layout, page_size=p.page_size, path=name,
                num_tokens=p.num_tokens, num_slices=p.num_slices, max_num_slices=p.max_num_slices,
                cache_mib=p.num_rows * row_bytes(p.layout, p.dtype) / MiB, bytes_moved=p.bytes_moved,
                spp=c.slices_per_processing_page if c else None, vmem_limit_bytes=c.vmem_limit_bytes if c else None,
                staging_bytes=c.staging_bytes if c else None, median_s=per_update,
                samples_s=[x / cfg.inner for x in s], number=numbers[name], inner=cfg.inner,
                spread=max(s) / min(s), gbps=p.bytes_moved / per_update / 1e9,
                hbm_fraction=p.bytes_moved / per_update / peak if peak else None,
            ))
        scatter = next((r for r in records if r["path"] == "scatter"), None)
        for r in records:
            r["vs_scatter"] = scatter["median_s"] / r["median_s"] if scatter else None
    return records, checks


# ------------------------------------------------------------------ report


def _gbps(r) -> str:
    return f"{r['gbps']:.1f}" if r else "—"


def results_markdown(env: dict, records: list[dict], checks: list[dict], skipped) -> str:
    """The tables: GB/s per sweep point and path, then µs per update with the configuration."""
    peak = env.get("hbm_bytes_per_second")
    lines = [
        "# bench_tpu: the KV cache update on TPU",
        "",
        f"{env['device_kind']} (generation {env['generation']}), jax {env['jax']}, {env['started']}"
        + (" — **quick run**" if env["quick"] else ""),
        f"Cache {env['cache_mib']:g} MiB, {HEADS} combined heads x {HEAD_DIM}; {env['inner']} updates per call "
        f"(fori_loop), median of {env['repeats']} samples in turns. GB/s = (bytes read + written) / time.",
        f"HBM bandwidth: {peak / 1e9:,.0f} GB/s per TensorCore (jax tpu_info)" if peak else
        "HBM bandwidth: unknown for this device kind",
        "",
    ]
    paths = [p for p in PATHS if any(r["path"] == p for r in records)]
    by_key = {(r["shape"], r["dtype"], r["layout"], r["page_size"], r["path"]): r for r in records}
    points = sorted({(r["shape"], r["dtype"], r["layout"], r["page_size"], r["num_slices"], r["bytes_moved"])
                     for r in records}, key=lambda k: (SHAPES.index(k[0]), k[1], k[2], k[3]))
    lines += ["## GB/s", "",
              "| update | dtype | layout | page | slices | MiB moved | " + " | ".join(paths)
              + " | best kernel / scatter | best / HBM |",
              "|" + "---|" * (8 + len(paths))]
    for shape, dtype, layout, ps, slices, moved in points:
        cells = []
        for path in paths:
            r = by_key.get((shape, dtype, layout, ps, path))
            cell = _gbps(r)
            if r and path == "kernel:auto":
                cell += f" (spp {r['spp']})"
            cells.append(cell)
        kernels = [by_key[k] for k in by_key if k[:4] == (shape, dtype, layout, ps) and k[4] != "scatter"]
        best = max(kernels, key=lambda r: r["gbps"], default=None)
        scatter = by_key.get((shape, dtype, layout, ps, "scatter"))
        ratio = f"{best['gbps'] / scatter['gbps']:.2f}x ({best['path']})" if best and scatter else "—"
        hbm = f"{best['hbm_fraction']:.0%}" if best and best["hbm_fraction"] is not None else "—"
        lines.append(f"| {shape} | {dtype} | {layout} | {ps} | {slices} | {moved / MiB:.2f} | " + " | ".join(cells)
                     + f" | {ratio} | {hbm} |")
    lines += ["", "## Per path", "",
              "| update | dtype | layout | page | path | spp | vmem limit MiB | staging MiB | µs per update | GB/s | "
              "vs scatter | spread |",
              "|" + "---|" * 12]
    for r in sorted(records, key=lambda r: (SHAPES.index(r["shape"]), r["dtype"], r["layout"], r["page_size"],
                                            PATHS.index(r["path"]))):
        mib = (lambda b: f"{b / MiB:.2f}" if b is not None else "—")
        vs = f"{r['vs_scatter']:.2f}x" if r.get("vs_scatter") else "—"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['layout']} | {r['page_size']} | {r['path']} | "
                     f"{r['spp'] if r['spp'] is not None else '—'} | {mib(r['vmem_limit_bytes'])} | "
                     f"{mib(r['staging_bytes'])} | {r['median_s'] * 1e6:.2f} | {r['gbps']:.1f} | {vs} | "
                     f"{r['spread']:.2f} |")
    not_run = [c for c in checks if c["ok"] is None]
    failed = [c for c in checks if c["ok"] is False]
    if not_run or failed or skipped:
        lines += ["", "## Not timed", ""]
        for c in not_run:
            pt = c["point"]
            lines.append(f"- {pt['shape']} {pt['dtype']} {pt['layout']} page {pt['page_size']} `{c['path']}`: "
                         f"does not fit the kernel here ({c['why']})")
        for c in failed:
            pt = c["point"]
            lines.append(f"- {pt['shape']} {pt['dtype']} {pt['layout']} page {pt['page_size']} `{c['path']}`: "
                         f"**check FAILED**: {c['why']}")
        for s in skipped:
            lines.append(f"- {s['shape']} {s['dtype']} page {s['page_size']}: {s['why']}")
    return "\n".join(lines) + "\n"


def plot(env: dict, records: list[dict], path: pathlib.Path) -> str | None:
    """GB/s vs slices per step, a panel per update shape (columns) and page size (rows): one line
    per (dtype, layout), ``kernel:auto`` as a star at the spp it picked, the scatter dashed, HBM
    black. Returns why no plot was drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    shapes = [s for s in SHAPES if any(r["shape"] == s for r in records)]
    page_sizes = sorted({r["page_size"] for r in records})
    if not shapes:
        return "nothing was timed: no plot"
    fig, axes = plt.subplots(len(page_sizes), len(shapes), figsize=(4.2 * len(shapes) + 2.5, 3.4 * len(page_sizes) + 0.6),
                             squeeze=False)
    panels = {(shape, ps): axes[i][j] for i, ps in enumerate(page_sizes) for j, shape in enumerate(shapes)}
    series = sorted({(r["dtype"], r["layout"]) for r in records})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(series)}
    peak = env.get("hbm_bytes_per_second")
    for (shape, ps), ax in panels.items():
        for s in series:
            rs = [r for r in records if (r["shape"], r["page_size"], r["dtype"], r["layout"]) == (shape, ps, *s)]
            fixed = sorted((r["spp"], r["gbps"]) for r in rs if r["path"].startswith("kernel:") and r["path"] != "kernel:auto")
            if fixed:
                ax.plot(*zip(*fixed), marker="o", ms=3, color=colors[s], label=f"{s[0]} {s[1]}")
            for r in rs:
                if r["path"] == "kernel:auto":
                    ax.plot([r["spp"]], [r["gbps"]], marker="*", ms=11, color=colors[s], linestyle="none")
                elif r["path"] == "scatter":
                    ax.axhline(r["gbps"], color=colors[s], linestyle="--", linewidth=1)
        if peak:
            ax.axhline(peak / 1e9, color="black", linewidth=1, label="HBM (per TensorCore)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([8, 16, 32, 64], ["8", "16", "32", "64"])
        ax.set_title(f"{shape} · page {ps}", fontsize=9)
        ax.set_xlabel("slices per kernel step")
        ax.set_ylabel("GB/s (read + written)")
        ax.grid(True, alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8)
    fig.suptitle(f"kv_cache_update on {env['device_kind']}: GB/s vs slices per step "
                 "(star: auto; dashed: XLA scatter)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def write_results(out_dir, env: dict, records: list[dict], plan: list[Planned], checks: list[dict],
                  skipped) -> list[pathlib.Path]:
    """Write ``bench_tpu.md``, ``bench_tpu.json`` and ``bench_tpu.png`` into ``out_dir``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench_tpu.md", out / "bench_tpu.json"]
    png = out / "bench_tpu.png"
    if png.exists():
        png.unlink()
    why = plot(env, records, png)
    if why:
        env["plot"] = why
    else:
        paths.append(png)
    paths[0].write_text(results_markdown(env, records, checks, skipped))
    configs = [dict(point=dataclasses.asdict(i.point), path=i.path,
                    config=dataclasses.asdict(i.config) if i.config else None) for i in plan]
    paths[1].write_text(json.dumps(dict(environment=env, records=records, checks=checks, skipped=list(skipped),
                                        plan=configs), indent=1, default=str))
    return paths


# ------------------------------------------------------------------ main


def _list(kind):
    def parse(text):
        return [kind(x) for x in text.replace(",", " ").split()]
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="lower every configuration for TPU (works on any host), check each lowering and print the plan")
    p.add_argument("--quick", action="store_true",
                   help="small subset: decode and mixed updates ~8x smaller, page size 32, paths kernel:8, "
                        "kernel:auto and scatter, a 64 MiB cache")
    p.add_argument("--shapes", type=_list(str), help=f"update shapes, from {','.join(SHAPES)} (default all)")
    p.add_argument("--dtypes", type=_list(str), help=f"cache dtypes, from {','.join(DTYPES)} (default both)")
    p.add_argument("--layouts", type=_list(str), help=f"layouts, from {','.join(LAYOUTS)} (default both)")
    p.add_argument("--page-sizes", type=_list(int), help="page sizes (default 32,128; quick 32)")
    p.add_argument("--paths", type=_list(str), help=f"paths, from {','.join(PATHS)} (default all)")
    p.add_argument("--cache-mib", type=float, help="cache size in MiB (default 1024; quick 64)")
    p.add_argument("--repeats", type=int, help="timed samples per path, >= 5 (default 7; quick 5)")
    p.add_argument("--min-time", type=float, help="seconds per sample (default 0.05; quick 0.01)")
    p.add_argument("--inner", type=int, help="updates per jitted call, in a fori_loop (default 32; quick 8)")
    p.add_argument("--warmup", type=int, help="untimed calls per path before timing (default 2; quick 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workloads (default 0)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                   help=f"results folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for name, default in base.items():
        if getattr(args, name, None) is None:
            setattr(args, name, list(default) if isinstance(default, list) else default)
    for name, allowed in (("shapes", SHAPES), ("dtypes", DTYPES), ("layouts", LAYOUTS), ("paths", PATHS)):
        bad = [v for v in getattr(args, name) if v not in allowed]
        if bad:
            p.error(f"unknown --{name} {bad}; choose from {list(allowed)}")
    if args.repeats < 5:
        p.error(f"--repeats must be >= 5 (the median of at least 5 samples), got {args.repeats}")
    if args.inner < 1 or args.warmup < 0 or args.min_time <= 0 or args.cache_mib <= 0:
        p.error(f"--inner must be >= 1, --warmup >= 0, --min-time and --cache-mib > 0; got {args.inner}, "
                f"{args.warmup}, {args.min_time}, {args.cache_mib}")
    bad = [ps for ps in args.page_sizes if ps < 1]
    if bad:
        p.error(f"--page-sizes must be positive, got {bad}")
    return args


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(cfg, device) -> dict:
    generation = attached_generation()
    chip = TPU_CHIPS.get(generation)
    return dict(
        python=platform.python_version(), jax=jax.__version__, jaxlib=_version("jaxlib"), libtpu=_version("libtpu"),
        numpy=np.__version__, device_kind=device.device_kind, platform=device.platform,
        num_devices=jax.device_count(), generation=generation,
        hbm_bytes_per_second=chip.hbm_bytes_per_second if chip else None,
        vmem_bytes=chip.vmem_bytes if chip else None, argv=sys.argv[1:], quick=cfg.quick, shapes=cfg.shapes,
        dtypes=cfg.dtypes, layouts=cfg.layouts, page_sizes=cfg.page_sizes, paths=cfg.paths,
        cache_mib=cfg.cache_mib, repeats=cfg.repeats, min_time_s=cfg.min_time, inner=cfg.inner,
        warmup=cfg.warmup, heads=HEADS, head_dim=HEAD_DIM,
        started=datetime.datetime.now().isoformat(timespec="seconds"),
    )


def main(argv=None) -> int:
    cfg = parse_args(argv)
    device = jax.devices()[0]
    if not cfg.dry_run and device.platform != "tpu":
        print(f"bench_tpu: no TPU here (JAX's default device is {device.platform}: {device.device_kind}), so "
              f"nothing to time. On a TPU VM run it again; here `--dry-run` lowers every configuration for TPU "
              f"and prints what would run.")
        return 0
    plan, skipped = make_plan(cfg)
    if cfg.dry_run:
        return dry_run(cfg, plan, skipped)
    env = environment(cfg, device)
    peak = env["hbm_bytes_per_second"]
    log(f"bench_tpu: {device.device_kind} (generation {env['generation']}), {len(plan)} configurations, "
        f"cache {cfg.cache_mib:g} MiB, {cfg.inner} updates per call, {cfg.repeats} samples each")
    t0 = time.perf_counter()
    records, checks = [], []
    groups: dict[Point, list[Planned]] = {}
    for item in plan:
        groups.setdefault(item.point, []).append(item)
    for point, items in groups.items():
        log(f"{point.label()}: {point.num_tokens} tokens, {point.num_slices} slices")
        r, c = run_point(cfg, items, peak)
        records += r
        checks += c
        for rec in r:
            log(f"  {rec['path']:<12} {rec['median_s'] * 1e6:9.2f} µs  {rec['gbps']:8.1f} GB/s"
                + (f"  spp {rec['spp']}" if rec["spp"] else ""))
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    files = write_results(cfg.out, env, records, plan, checks, skipped)
    print((cfg.out / "bench_tpu.md").read_text())
    log(f"wrote {', '.join(map(str, files))} in {env['wall_s']} s")
    failed = [c for c in checks if c["ok"] is False]
    if failed:
        log(f"{len(failed)} check(s) FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
