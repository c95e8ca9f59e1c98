"""Time every KV cache update path on the same inputs, against the physical limits.

    PJRT_DEVICE=CPU python benchmarks/bench_update.py            # full sweep (< 10 min on 2 cores)
    PJRT_DEVICE=CPU python benchmarks/bench_update.py --quick    # smoke run (~30 s)
    PJRT_DEVICE=CPU python benchmarks/bench_update.py --threads 1  # the whole sweep on one intra-op thread

Threads: the sweep runs at torch's default intra-op thread count (what a user
gets; ``OMP_NUM_THREADS`` sets it) unless ``--threads N`` is given; the table's
header and the log say which. At every eager decode point the op (``op:auto``,
and ``op:auto new metadata``: another step's metadata every call, so none of
the checks is reused) and ``index_copy_`` are also timed at 1 thread and at
the run's thread count, the six sampled in turns (the thread count is set
before every call, ~0.2 µs), in a table of their own: ``index_copy_`` of
float32 rows runs in parallel above 32,768 elements (a decode step's 131,072
do), while the op copies up to 512 KiB of rows on the calling thread, so
their ratio depends on the thread count.

A model's decode step (run when the shapes include decode, for each dtype at
the first page size): 32 layers, each its own 16 MiB cache (``--quick``: 4 of
4 MiB), the op called once per layer with the step's metadata, against
``index_copy_`` of the same rows into each cache, at 1 thread and at the
run's thread count, per layer, in a table of its own. Unlike the sweep's
decode points, which rewrite the same rows of one cache call after call (warm
in the core's caches), a layer here writes rows the other layers' writes have
pushed out of L1 and L2 since it last wrote them, as in a model.

Paths, timed in one run on the same inputs at each sweep point:

* CPU eager (``cpu``): ``torch.ops.paged_kv.kv_cache_update`` with ``impl`` =
  ``auto``, ``jax``, ``pallas_interpret`` (small updates only — the TPU
  interpreter costs several ms per slice —, the first dtype, the smallest and
  largest caches); the ``jax_kernels`` paths on JAX
  arrays, cache donated and fed back so they run in place, each jitted with
  ``jax_kernels.update_compiler_options`` as the README advises: ``jax:auto``
  (``kv_cache_update``), ``jax:scatter`` (the fast fallback), ``jax:scan``
  (the ``lax.scan`` fallback); and two baselines: ``index_copy_``
  (``cache.index_copy_(0, rows, new)``, destination rows precomputed for free)
  and ``memcpy`` (``dst.copy_(src)`` of the same number of contiguous bytes —
  the physical limit on this machine).
* PyTorch/XLA on CPU PJRT (``xla``): the op with ``impl`` = ``auto``, ``jax``,
  ``pallas_interpret``, and torch_xla's own ``index_copy_`` step as the
  baseline. A step is the call, ``torch_xla.sync()`` and
  ``xm.wait_device_ops()``. Skipped when torch_xla is not importable.

Method: one warm-up call (compiles; at a path's first cache size the
correctness check is that call), one calibration call, then ``--repeats``
(>= 5) timed samples, each the mean of enough back-to-back steps to last
``--min-time``; every step ends with a barrier that waits for the work
(``block_until_ready`` / ``sync`` + ``wait_device_ops``; eager CPU torch is
synchronous). The paths of one sweep point and backend are sampled in turns
(sample 1 of each, then sample 2 of each, ...), so load from outside falls on
them alike and the ratios between them stay fair; a path whose single call
lasts over 10 samples is sampled on its own. Reported: the median sample. A
set of samples spreading more than 1.5x is taken again (up to 3 times while
cheap; the steadiest set is kept). A path slower than ``--max-call-s`` per call is timed once, and a path
whose time grows with the cache is not run where it would exceed that budget
(the table says so). Before its first timing, every path is run once on a
zeroed cache and compared bitwise with ``jax_kernels.kv_cache_update_reference``
(``memcpy``: with its source).

Each update shape is swept from the smallest cache size that holds it (a cache
needs a distinct page for each page the update writes), so the flatness ratio
is time(largest) / time(smallest holding it).

Outputs in ``--out`` (default ``benchmarks/results/``): ``bench_update.md``
(tables of medians and ratios, and the bars), ``bars.md`` (the bars alone),
``bench_update.png`` (time vs cache size, one line per path; needs matplotlib)
and ``bench_update.json`` (everything, raw samples included).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.util
import itertools
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_ops  # noqa: E402,F401  (registers torch.ops.paged_kv; imports JAX behind torch_xla's guard)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_kernels as jk  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.report import FLAT_MAX, FRESH_PATH, fmt_size  # noqa: E402
from benchmarks.workloads import (  # noqa: E402
    HEAD_DIM,
    HEADS,
    SHAPES,
    cache_rows,
    fits,
    make_batch,
    make_workload,
)
from jax_kernels.testing import bits  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
SLICES_PER_PROCESSING_PAGE = 8
NOISY = 1.5  # max/min of a path's samples above which they are taken again
SOLO_CALLS = 10  # a path whose one call lasts over this many --min-time samples is sampled alone
DEFAULT_THREADS = torch.get_num_threads()  # torch's default intra-op thread count, before --threads
THREAD_PATHS = ("op:auto", FRESH_PATH, "index_copy_")  # the eager decode paths also timed at 1 thread
THREADS_GOAL = 1.5  # the eager decode's goal at every thread count: op <= 1.5x index_copy_
# A model's decode step (Runner.model_step): one cache per layer, as a model keeps them.
MODEL_STEP = dict(layers=32, cache_mib=16)
MODEL_STEP_QUICK = dict(layers=4, cache_mib=4)
MODEL_STEP_SHAPE = "decode model step"  # its checks' shape (not a sweep shape: the sweep tables leave it out)

FULL = dict(sizes=[16, 64, 256, 1024], shapes=list(SHAPES), dtypes=["float32", "bfloat16"], page_sizes=[16, 32],
            repeats=5, min_time=0.02, max_call_s=2.0, interpret_max_slices=64)
QUICK = dict(sizes=[4, 16], shapes=["decode", "mixed"], dtypes=["float32"], page_sizes=[16],
             repeats=5, min_time=0.001, max_call_s=2.0, interpret_max_slices=8)

CPU_OP_IMPLS = ("auto", "jax", "pallas_interpret")
XLA_OP_IMPLS = ("auto", "jax", "pallas_interpret")
# A JAX engine's donated update step, jitted the way the README says: with
# jax_kernels.update_compiler_options (on XLA:CPU it switches off the whole-cache
# float32 round trip of bfloat16, and on jaxlib < 0.8 the scan's O(cache) loop).
JAX_FNS = {
    "jax:auto": ("auto", lambda ps: functools.partial(
        jk.kv_cache_update, page_size=ps, slices_per_processing_page=SLICES_PER_PROCESSING_PAGE)),
    "jax:scatter": ("scatter", lambda ps: functools.partial(jk.kv_cache_update_scatter, page_size=ps)),
    "jax:scan": ("scan", lambda ps: functools.partial(jk.kv_cache_update_jax, page_size=ps)),
}


# tpu-inference's packed cache (RPA v3) of bfloat16 head_dim 64: kvH = 8 → rows [8, 2, 128], the
# same 4,096 bytes as the combined [16, 128] rows, so a packed path runs on the very same cache,
# viewed as [P, page_size, 8, 2, 128] (a free view): the packed code path, timed side by side.
PACKED_ROW = (8, 2, 128)
PACKED_DTYPES = ("bfloat16",)
PACKED_PATHS = {"jax:auto packed": "jax:auto", "op:auto packed": "op:auto"}


def packed_view(x, page_size=None):
    """``x`` (``[N, 16, 128]`` rows) as packed rows ``[N, 8, 2, 128]``, or paged ``[N / ps, ps, 8, 2, 128]``."""
    shape = (x.shape[0], *PACKED_ROW) if page_size is None else (x.shape[0] // page_size, page_size, *PACKED_ROW)
    return x.reshape(shape) if isinstance(x, jax.Array) else x.view(shape)


def jax_step(path: str, page_size: int, dtype: str):
    """The jitted, cache-donating update of a ``jax:*`` path (a packed path updates the cache's
    packed paged view inside the jit: its reshapes are bitcasts, the donation holds)."""
    impl, make = JAX_FNS[PACKED_PATHS.get(path, path)]
    options = jk.update_compiler_options(jnp.dtype(dtype), impl=impl)
    fn = make(page_size)
    if path in PACKED_PATHS:
        update = fn

        def fn(new, idx, cache, total):
            out = update(packed_view(new), idx, packed_view(cache, page_size), total)
            return out.reshape(cache.shape)

    return jax.jit(fn, donate_argnums=2, compiler_options=options or None)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ timing


def measure(step, *, repeats: int, min_time: float, max_call: float = math.inf, warmup: int = 1,
            max_attempts: int = 3) -> dict:
    """Time ``step`` alone: :func:`measure_interleaved` with one path."""
    return measure_interleaved({"step": (step, max_call, warmup)}, repeats=repeats, min_time=min_time,
                               max_attempts=max_attempts)["step"]


def measure_interleaved(steps: dict, *, repeats: int, min_time: float, max_attempts: int = 3) -> dict:
    """Time several paths side by side: ``{name: (step, max_call, warmup)}`` →
    ``{name: {median_s, samples_s, ...}}``. Each ``step`` must include its own barrier.

    Per path: ``warmup`` untimed calls (the first compiles), one calibration
    call, and ``number`` back-to-back steps per sample so a sample lasts about
    ``min_time``. A calibration call slower than ``max_call`` seconds is
    reported alone (``over_budget``: one call, not ``repeats`` samples; with
    ``warmup=0`` that call includes compiling, ``with_compile``). The other
    paths are then sampled **in turns** — sample 1 of every path, then sample 2
    of every path... — so a burst of outside load (other processes on a
    2-core machine) falls on all of them alike and their ratios stay fair;
    a path whose one call lasts over ``SOLO_CALLS`` samples is sampled on its
    own. A set whose samples spread more than ``NOISY`` (max/min) for some
    path is taken again, up to ``max_attempts`` times while that stays cheap;
    the set whose worst spread is smallest is kept. The garbage collector is
    off while timing.
    """
    out, timed = {}, {}
    for name, (step, max_call, warmup) in steps.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        step()
        single = time.perf_counter() - t0
        if single > max_call:
            out[name] = dict(median_s=single, samples_s=[single], number=1, warmup_s=warm, over_budget=True,
                             attempts=1, with_compile=warmup == 0)
            continue
        number = 1 if single >= min_time else min(10_000, math.ceil(min_time / max(single, 1e-7)))
        timed[name] = (step, number, warm, single)
    # Slow paths (a call over SOLO_CALLS samples' worth) are sampled on their own:
    # in turns they would stretch every round, and a burst of load is small next to them.
    solo = [name for name, (_, _, _, single) in timed.items() if single > SOLO_CALLS * min_time]
    groups = [{n: v for n, v in timed.items() if n not in solo}] + [{n: timed[n]} for n in solo]
    for group in groups:
        if not group:
            continue
        samples, attempts = _sample_in_turns(group, repeats=repeats, max_attempts=max_attempts)
        for name, (_, number, warm, _) in group.items():
            out[name] = dict(median_s=statistics.median(samples[name]), samples_s=samples[name], number=number,
                             warmup_s=warm, over_budget=False, attempts=attempts, with_compile=False)
    return {name: out[name] for name in steps}


def _sample_in_turns(group: dict, *, repeats: int, max_attempts: int):
    """``repeats`` samples of every path in ``group`` (``{name: (step, number,
    warm, single)}``), in turns; retaken while some path's samples spread more
    than ``NOISY``. Returns ``({name: samples}, attempts)``."""
    best, attempts = None, 0
    gc.disable()  # (no gc.collect() here: with JAX and torch loaded it takes ~0.25 s)
    try:
        while True:
            attempts += 1
            samples = {name: [] for name in group}
            t_start = time.perf_counter()
            for _ in range(repeats):
                for name, (step, number, _, _) in group.items():
                    t0 = time.perf_counter()
                    for _ in range(number):
                        step()
                    samples[name].append((time.perf_counter() - t0) / number)
            spread = max(max(v) / min(v) for v in samples.values())
            if best is None or spread < best[0]:
                best = (spread, samples)
            if spread <= NOISY or attempts >= max_attempts or time.perf_counter() - t_start > 1.0 * len(group):
                break
    finally:
        gc.enable()
    return best[1], attempts


# ---------------------------------------------------------------- helpers


def at_threads(n: int, step):
    """``step`` run at ``n`` intra-op threads (set before every call, ~0.2 µs; the caller restores the count)."""
    def run():
        torch.set_num_threads(n)
        step()
    return run


def to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor with ``a``'s exact bits (works for ml_dtypes' bfloat16), in
    memory torch allocated (aligned to 64 bytes, as a model's tensors are: a
    numpy array's data may sit at a 16-byte offset, which makes JAX copy what
    it would share)."""
    return torch.from_numpy(bits(a)).clone().view(dtype)


def torch_bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return bits(t.view(_INT_VIEW[t.element_size()]).numpy())


class Runner:
    """Runs the sweep; collects ``records`` (one per timed path and sweep
    point) and ``checks`` (one per path and (backend, shape, dtype, page size))."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.records: list[dict] = []
        self.checks: dict[tuple, dict] = {}
        self.batches = {(s, ps): make_batch(s, ps, quick=cfg.quick, seed=cfg.seed) for s in cfg.shapes for ps in cfg.page_sizes}
        self._expected = {}
        # key → (size, median) at the first / the last size timed: a path that grows with the cache is
        # not run where it would take more than --max-call-s per call.
        self.first_time: dict[tuple, tuple] = {}
        self.last_time: dict[tuple, tuple] = {}
        self.skipped: list[dict] = []
        # Eager decode, op:auto and index_copy_ at 1 thread and at the run's thread count (one record each).
        self.thread_records: list[dict] = []
        # A model's decode step (model_step): op:auto and index_copy_ per layer, at 1 thread and the run's count.
        self.step_records: list[dict] = []

    # ---- sweep points

    def points(self, dtype: str, size: float):
        """``(page_size, shape, workload)`` for every batch that fits this cache."""
        rows = cache_rows(size, dtype, self.cfg.page_sizes)
        for ps in self.cfg.page_sizes:
            for shape in self.cfg.shapes:
                batch = self.batches[(shape, ps)]
                if fits(batch, rows):
                    yield ps, shape, make_workload(batch, rows, dtype, seed=self.cfg.seed)

    def smallest_size(self, shape: str, dtype: str, ps: int):
        for size in self.cfg.sizes:
            if fits(self.batches[(shape, ps)], cache_rows(size, dtype, self.cfg.page_sizes)):
                return size
        return None

    def runs_interpret(self, w, dtype: str, size: float) -> bool:
        """``pallas_interpret`` (several ms per slice) only on small updates, the
        first dtype, and at the two ends of the sweep (enough for its flatness ratio)."""
        if w.batch.max_num_slices > self.cfg.interpret_max_slices or dtype != self.cfg.dtypes[0]:
            return False
        ps, shape = w.batch.page_size, w.batch.shape
        holding = [s for s in self.cfg.sizes if fits(self.batches[(shape, ps)], cache_rows(s, dtype, self.cfg.page_sizes))]
        return size in (holding[0], holding[-1])

    def expected(self, w, dtype: str) -> np.ndarray:
        """The reference result on a zeroed cache (computed once per workload)."""
        key = (w.batch.shape, w.batch.page_size, dtype, w.num_rows)
        if key not in self._expected:
            self._expected.clear()  # one at a time: these can be large
            zeros = np.zeros((w.num_rows, HEADS, HEAD_DIM), w.new_tokens.dtype)
            self._expected[key] = bits(jk.kv_cache_update_reference(w.new_tokens, w.slice_indices, zeros, w.total))
        return self._expected[key]

    # ---- one path at one point

    def run_paths(self, backend, w, dtype, size, paths: dict) -> None:
        """Check every path of ``paths`` (``{path: (step, check)}``) once per
        config, then time those still in the running side by side
        (:func:`measure_interleaved`)."""
        steps = {}
        for path, (step, check) in paths.items():
            plan = self._plan_path(backend, w, dtype, size, path, check)
            if plan is not None:
                once, checked_now = plan
                steps[path] = (step, 0.0 if once else self.cfg.max_call_s, 0 if once or checked_now else 1)
        try:
            results = measure_interleaved(steps, repeats=self.cfg.repeats, min_time=self.cfg.min_time)
        except Exception as e:  # noqa: BLE001 — a path that raises is reported, not fatal
            log(f"  {backend} {w.batch.shape} {dtype}: timing raised {type(e).__name__}: {e}")
            return
        for path, m in results.items():
            self._record(backend, w, dtype, size, path, m)

    def _plan_path(self, backend, w, dtype, size, path, check):
        """Check ``path`` (if not yet checked for this config); ``None`` if it
        is not to be timed here, else ``(once, checked_now)``."""
        key = (backend, w.batch.shape, dtype, w.batch.page_size, path)
        checked_now = key not in self.checks  # the check call compiles: it is this size's warm-up
        if checked_now:
            t0 = time.perf_counter()
            try:
                ok, kind = check()
                why = "" if ok else "result differs from the reference"
            except Exception as e:  # noqa: BLE001 — a path that raises is reported, not fatal
                ok, kind, why = False, "error", f"{type(e).__name__}: {e}"
            self.checks[key] = dict(backend=backend, shape=w.batch.shape, dtype=dtype, page_size=w.batch.page_size,
                                    path=path, size_mib=size, kind=kind, ok=ok, why=why,
                                    seconds=round(time.perf_counter() - t0, 3))  # includes compiling
            if not ok:
                log(f"  CHECK FAILED {backend} {path} {w.batch.shape} {dtype} ps={w.batch.page_size}: {why}")
        if not self.checks[key]["ok"]:
            return None
        once = False  # time a single call (compile included): the path is over budget already
        if key in self.last_time:
            (s0, t0), (s1, t1) = self.first_time[key], self.last_time[key]
            budget = self.cfg.max_call_s
            projected = t1 * size / s1  # if it is O(cache)
            why = None
            if t1 > FLAT_MAX * t0 and projected > budget:
                why = (f"growing with the cache ({fmt_size(s0)}: {t0:.3g} s, {fmt_size(s1)}: {t1:.3g} s per call) "
                       f"and predicted over --max-call-s ({projected:.3g} s)")
            elif t1 > budget and projected > 5 * budget:
                why = (f"over --max-call-s at {fmt_size(s1)} ({t1:.3g} s per call), up to {projected:.3g} s here "
                       f"if it grows with the cache: flatness not measured")
            if why:
                self.skipped.append(dict(backend=backend, shape=w.batch.shape, dtype=dtype,
                                         page_size=w.batch.page_size, path=path, size_mib=size, why=why))
                log(f"  {backend:3} {w.batch.shape:7} ps={w.batch.page_size:<2} {path:22} skipped: {why}")
                return None
            once = t1 > budget
        return once, checked_now

    def _record(self, backend, w, dtype, size, path, m) -> None:
        key = (backend, w.batch.shape, dtype, w.batch.page_size, path)
        self.records.append(dict(
            backend=backend, shape=w.batch.shape, dtype=dtype, page_size=w.batch.page_size, size_mib=size,
            num_rows=w.num_rows, path=path, **m,
            num_slices=w.num_slices, max_num_slices=w.batch.max_num_slices, num_tokens=w.batch.num_tokens,
            bytes_moved=w.bytes_moved,
        ))
        self.first_time.setdefault(key, (size, m["median_s"]))
        self.last_time[key] = (size, m["median_s"])
        log(f"  {backend:3} {w.batch.shape:7} ps={w.batch.page_size:<2} {path:22} {m['median_s'] * 1e6:11.1f} µs"
            f"  (x{m['number']}; warm-up {m['warmup_s']:.2f} s{'; ONE call: over --max-call-s' if m['over_budget'] else ''})")

    # ---- backends

    def cpu_torch(self, dtype: str, size: float) -> None:
        tdt = TORCH_DTYPES[dtype]
        rows = cache_rows(size, dtype, self.cfg.page_sizes)
        cache = torch.empty((rows, HEADS, HEAD_DIM), dtype=tdt).zero_()  # touched: no page faults timed
        for ps, shape, w in self.points(dtype, size):
            new = to_torch(w.new_tokens, tdt)
            idx, total = torch.from_numpy(w.slice_indices), torch.from_numpy(w.total)
            rows_t = torch.from_numpy(w.dst_rows)
            src, dst = new.clone(), torch.zeros_like(new)

            def check_cache(step, w=w):
                cache.zero_()
                step()
                return np.array_equal(torch_bits(cache), self.expected(w, dtype)), "reference"

            def memcpy_check(src=src, dst=dst):
                dst.zero_()
                dst.copy_(src)
                return np.array_equal(torch_bits(dst), torch_bits(src)), "copy"

            paths = {
                "memcpy": (lambda src=src, dst=dst: dst.copy_(src), memcpy_check),
                "index_copy_": (lambda new=new, rows_t=rows_t: cache.index_copy_(0, rows_t, new), None),
            }
            for impl in CPU_OP_IMPLS:
                if impl == "pallas_interpret" and not self.runs_interpret(w, dtype, size):
                    continue
                paths[f"op:{impl}"] = (
                    lambda impl=impl, new=new, idx=idx, total=total, ps=ps: torch.ops.paged_kv.kv_cache_update(
                        new, idx, cache, total, ps, SLICES_PER_PROCESSING_PAGE, impl),
                    None,
                )
            if shape == "decode":  # a new step's metadata every call (the steps above repeat one: later layers)
                paths[FRESH_PATH] = (self.fresh_metadata_step(w, dtype, new, cache, idx, total), None)
            if dtype in PACKED_DTYPES:
                paths["op:auto packed"] = (
                    lambda new=packed_view(new), idx=idx, total=total, ps=ps, paged=packed_view(cache, ps):
                    torch.ops.paged_kv.kv_cache_update(new, idx, paged, total, ps, SLICES_PER_PROCESSING_PAGE, "auto"),
                    None,
                )
            self.run_paths("cpu", w, dtype, size, {
                path: (step, check or (lambda step=step: check_cache(step))) for path, (step, check) in paths.items()
            })
            if shape == "decode":
                self.thread_compare(w, dtype, size, {p: paths[p][0] for p in THREAD_PATHS})
        del cache
        gc.collect()

    def fresh_metadata_step(self, w, dtype: str, new, cache, idx, total):
        """``op:auto`` with new metadata on every call, as the first layer of
        each model step sees it: calls alternate between ``w``'s slice indices
        and those of the same batch on other pages (another seed), so the
        op's remembered metadata (``torch_ops._validation.checked_columns``:
        the same bytes as the last call, as every later layer of a step
        passes) never matches. The first call — the one checked against the
        reference — is ``w``'s."""
        other = make_workload(w.batch, w.num_rows, dtype, seed=self.cfg.seed + 1)
        assert not np.array_equal(other.slice_indices, w.slice_indices)
        metadata, calls = (idx, torch.from_numpy(other.slice_indices)), itertools.count()

        def step():
            torch.ops.paged_kv.kv_cache_update(
                new, metadata[next(calls) % 2], cache, total, w.batch.page_size, SLICES_PER_PROCESSING_PAGE, "auto")

        return step

    def thread_compare(self, w, dtype: str, size: float, steps: dict) -> None:
        """Time ``steps`` (``op:auto`` and ``index_copy_``) at 1 thread and at the
        run's thread count, the four in turns; skipped when the run is on one
        thread or a path failed its check. The thread count is set before every
        call and restored after."""
        threads = torch.get_num_threads()
        checked = all(self.checks.get(("cpu", w.batch.shape, dtype, w.batch.page_size, p), {}).get("ok") for p in steps)
        if threads == 1 or not checked:
            return

        results = self.time_at_threads(steps, f"{w.batch.shape} {dtype} thread comparison")
        for (n, path), m in results.items():
            self.thread_records.append(dict(
                backend="cpu", shape=w.batch.shape, dtype=dtype, page_size=w.batch.page_size, size_mib=size,
                num_rows=w.num_rows, path=path, threads=n, **m))
            log(f"  cpu {w.batch.shape:7} ps={w.batch.page_size:<2} {path + f' ({n} thread' + ('s)' if n > 1 else ')'):22}"
                f" {m['median_s'] * 1e6:11.1f} µs  (x{m['number']})")

    def time_at_threads(self, steps: dict, what: str) -> dict:
        """``{(threads, path): measurement}`` for every step of ``steps`` at 1
        thread and at the run's thread count, all sampled in turns (the count
        set before every call, restored after); ``{}`` (logged) if timing raised."""
        threads = torch.get_num_threads()
        timed = {(n, path): (at_threads(n, step), self.cfg.max_call_s, 1) for n in sorted({1, threads})
                 for path, step in steps.items()}
        try:
            return measure_interleaved(timed, repeats=self.cfg.repeats, min_time=self.cfg.min_time)
        except Exception as e:  # noqa: BLE001 — reported, not fatal
            log(f"  cpu {what} raised {type(e).__name__}: {e}")
            return {}
        finally:
            torch.set_num_threads(threads)

    def model_step(self, dtype: str) -> None:
        """A decode step of a model, per layer: ``layers`` caches of
        ``cache_mib`` each (``MODEL_STEP``; one per layer, as a model keeps
        them), the op once per layer with the step's metadata (the first
        layer checks it, the later ones reuse the checks), against
        ``index_copy_`` of the same rows into each cache. Calls alternate
        between two steps (another seed's pages), so a layer writes rows it
        last wrote two steps before, the other layers' writes in between: out
        of the core's L1 and L2 (in a model they are new rows every step),
        unlike the sweep's decode points, which rewrite the same rows of one
        cache call after call. Both are checked once on zeroed caches (first
        and last layer against the reference), then timed at 1 thread and at
        the run's thread count, the four in turns, as :meth:`thread_compare`
        does."""
        spec = MODEL_STEP_QUICK if self.cfg.quick else MODEL_STEP
        layers, ps, tdt = spec["layers"], self.cfg.page_sizes[0], TORCH_DTYPES[dtype]
        rows = cache_rows(spec["cache_mib"], dtype, [ps])
        batch = self.batches[("decode", ps)]
        if not fits(batch, rows):
            log(f"  cpu model step {dtype}: a {spec['cache_mib']} MiB cache cannot hold the decode batch")
            return
        steps = [make_workload(batch, rows, dtype, seed=self.cfg.seed + k) for k in (0, 1)]
        caches = [torch.empty((rows, HEADS, HEAD_DIM), dtype=tdt).zero_() for _ in range(layers)]
        new = to_torch(steps[0].new_tokens, tdt)  # one step's K/V rows, written by every layer (the bytes do not matter)
        metadata = [(torch.from_numpy(w.slice_indices), torch.from_numpy(w.total)) for w in steps]
        dst_rows = [torch.from_numpy(w.dst_rows) for w in steps]
        calls = {path: itertools.count() for path in ("op:auto", "index_copy_")}

        def op_step():
            idx, total = metadata[next(calls["op:auto"]) % 2]
            for cache in caches:
                torch.ops.paged_kv.kv_cache_update(new, idx, cache, total, ps, SLICES_PER_PROCESSING_PAGE, "auto")

        def index_copy_step():
            rows_t = dst_rows[next(calls["index_copy_"]) % 2]
            for cache in caches:
                cache.index_copy_(0, rows_t, new)

        paths = {"op:auto": op_step, "index_copy_": index_copy_step}
        expected = self.expected(steps[0], dtype)
        for path, step in paths.items():
            for cache in caches:
                cache.zero_()
            calls[path] = itertools.count()  # the first call writes steps[0]
            try:
                step()
                ok = all(np.array_equal(torch_bits(caches[i]), expected) for i in (0, -1))
                why = "" if ok else "first or last layer differs from the reference"
            except Exception as e:  # noqa: BLE001 — reported, not fatal
                ok, why = False, f"{type(e).__name__}: {e}"
            self.checks[("cpu", MODEL_STEP_SHAPE, dtype, ps, path)] = dict(
                backend="cpu", shape=MODEL_STEP_SHAPE, dtype=dtype, page_size=ps, path=path, size_mib=spec["cache_mib"],
                kind="reference", ok=ok, why=why)
            if not ok:
                log(f"  CHECK FAILED cpu model step {dtype} {path}: {why}")
                return
        results = self.time_at_threads(paths, f"model step {dtype}")
        for (n, path), m in results.items():
            self.step_records.append(dict(
                backend="cpu", dtype=dtype, page_size=ps, layers=layers, size_mib=spec["cache_mib"],
                num_rows=rows, path=path, threads=n, per_layer_s=m["median_s"] / layers, **m))
            log(f"  cpu model step ({layers} layers) {dtype} {path + f' ({n} thread' + ('s)' if n > 1 else ')'):22}"
                f" {m['median_s'] / layers * 1e6:9.1f} µs a layer  (x{m['number']})")

    def cpu_jax(self, dtype: str, size: float) -> None:
        rows = cache_rows(size, dtype, self.cfg.page_sizes)
        jdt = jnp.dtype(dtype)
        state = [jnp.zeros((rows, HEADS, HEAD_DIM), jdt).block_until_ready()]
        fns = {}
        for ps, shape, w in self.points(dtype, size):
            new = jnp.asarray(w.new_tokens)
            idx, total = jnp.asarray(w.slice_indices), jnp.asarray(w.total)
            paths = {}
            for path in (*JAX_FNS, *(["jax:auto packed"] if dtype in PACKED_DTYPES else [])):
                fn = fns.setdefault((path, ps), jax_step(path, ps, dtype))

                def step(fn=fn, new=new, idx=idx, total=total):
                    state[0] = fn(new, idx, state[0], total)  # the donated cache, fed back
                    state[0].block_until_ready()

                def check(fn=fn, new=new, idx=idx, total=total, w=w):
                    state[0] = None  # freed before the zeroed cache is made: caches reach 1 GiB
                    try:
                        state[0] = fn(new, idx, jnp.zeros((rows, HEADS, HEAD_DIM), jdt), total)
                    finally:
                        if state[0] is None:  # the check raised: the next paths need a cache
                            state[0] = jnp.zeros((rows, HEADS, HEAD_DIM), jdt).block_until_ready()
                    return np.array_equal(bits(np.asarray(state[0])), self.expected(w, dtype)), "reference"

                paths[path] = (step, check)
            self.run_paths("cpu", w, dtype, size, paths)
            if state[0].is_deleted():  # a call that raised after donating the cache
                state[0] = jnp.zeros((rows, HEADS, HEAD_DIM), jdt).block_until_ready()
        del state, fns
        gc.collect()

    def xla(self, dtype: str, size: float) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm

        def barrier():
            torch_xla.sync()
            xm.wait_device_ops()

        dev = torch_xla.device()
        tdt = TORCH_DTYPES[dtype]
        rows = cache_rows(size, dtype, self.cfg.page_sizes)
        cache = torch.zeros((rows, HEADS, HEAD_DIM), dtype=tdt, device=dev)
        barrier()
        for ps, shape, w in self.points(dtype, size):
            new = to_torch(w.new_tokens, tdt).to(dev)
            idx, total = torch.from_numpy(w.slice_indices).to(dev), torch.from_numpy(w.total).to(dev)
            rows_x = torch.from_numpy(w.dst_rows).to(dev)
            barrier()

            def check_cache(step, w=w):
                cache.zero_()
                barrier()
                step()
                return np.array_equal(torch_bits(cache), self.expected(w, dtype)), "reference"

            paths = {"index_copy_": lambda new=new, rows_x=rows_x: cache.index_copy_(0, rows_x, new)}
            for impl in XLA_OP_IMPLS:
                if impl == "pallas_interpret" and not self.runs_interpret(w, dtype, size):
                    continue
                paths[f"op:{impl}"] = (
                    lambda impl=impl, new=new, idx=idx, total=total, ps=ps: torch.ops.paged_kv.kv_cache_update(
                        new, idx, cache, total, ps, SLICES_PER_PROCESSING_PAGE, impl)
                )
            steps = {}
            for path, call in paths.items():
                def step(call=call):
                    call()
                    barrier()

                steps[path] = (step, lambda step=step: check_cache(step))
            self.run_paths("xla", w, dtype, size, steps)
        del cache
        gc.collect()

    def run(self) -> None:
        for dtype in self.cfg.dtypes:
            for size in self.cfg.sizes:
                if not any(True for _ in self.points(dtype, size)):
                    continue
                log(f"[{dtype} cache {size:g} MiB = {cache_rows(size, dtype, self.cfg.page_sizes):,} rows]")
                self.cpu_torch(dtype, size)
                self.cpu_jax(dtype, size)
                if self.cfg.xla:
                    self.xla(dtype, size)
                self._expected.clear()
                gc.collect()
        if "decode" in self.cfg.shapes:
            for dtype in self.cfg.dtypes:
                self.model_step(dtype)
                self._expected.clear()
                gc.collect()


# ---------------------------------------------------------------- CLI


def _list(kind):
    def parse(text):
        return [kind(x) for x in text.replace(",", " ").split()]
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (~30 s): caches of 4 and 16 MiB, decode and mixed updates ~8x smaller, "
                        "float32, page size 16")
    p.add_argument("--sizes", type=_list(float), help="cache sizes in MiB (default 16,64,256,1024; quick 4,16)")
    p.add_argument("--shapes", type=_list(str), help=f"update shapes, from {','.join(SHAPES)} (default all; quick decode,mixed)")
    p.add_argument("--dtypes", type=_list(str), help="cache dtypes (default float32,bfloat16; quick float32)")
    p.add_argument("--page-sizes", type=_list(int), help="page sizes (default 16,32; quick 16)")
    p.add_argument("--repeats", type=int, help="timed samples per path, >= 5 (default 5)")
    p.add_argument("--min-time", type=float, help="seconds per sample (default 0.02; quick 0.001)")
    p.add_argument("--max-call-s", type=float,
                   help="a path slower than this per call (after warm-up) is timed once, not --repeats times; a "
                        "path growing with the cache is not run where it would exceed this (default 2)")
    p.add_argument("--interpret-max-slices", type=int,
                   help="run pallas_interpret only on updates with max_num_slices <= this (default 64 = decode; quick 8)")
    p.add_argument("--threads", type=int,
                   help=f"intra-op threads for the whole run, torch.set_num_threads (default: torch's default, "
                        f"{DEFAULT_THREADS} here); the eager decode is also timed at 1 thread unless this is 1")
    p.add_argument("--seed", type=int, default=0, help="seed of the layouts and tokens (default 0)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                   help=f"results folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--no-xla", action="store_true", help="skip the PyTorch/XLA part")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for name, default in base.items():
        if getattr(args, name, None) is None:
            setattr(args, name, list(default) if isinstance(default, list) else default)
    if args.repeats < 5:
        p.error("--repeats must be >= 5 (the median of at least 5 timed runs)")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shapes {bad}; choose from {SHAPES}")
    bad = [d for d in args.dtypes if d not in TORCH_DTYPES]
    if bad:
        p.error(f"unknown dtypes {bad}; choose from {list(TORCH_DTYPES)}")
    args.sizes = sorted(set(args.sizes))
    args.xla = not args.no_xla
    return args


def environment(cfg) -> dict:
    env = dict(
        python=platform.python_version(), torch=torch.__version__, jax=jax.__version__,
        jaxlib=getattr(jax.lib, "__version__", None) or _version("jaxlib"), torch_xla=_version("torch_xla"),
        numpy=np.__version__, cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
        torch_threads_default=DEFAULT_THREADS, threads_note=threads_note(cfg),
        machine=platform.machine(), system=platform.platform(), pjrt_device=os.environ.get("PJRT_DEVICE"),
        heads=HEADS, head_dim=HEAD_DIM, slices_per_processing_page=SLICES_PER_PROCESSING_PAGE,
        argv=sys.argv[1:], quick=cfg.quick, sizes_mib=cfg.sizes, shapes=cfg.shapes, dtypes=cfg.dtypes,
        page_sizes=cfg.page_sizes, repeats=cfg.repeats, min_time_s=cfg.min_time, max_call_s=cfg.max_call_s,
        interpret_max_slices=cfg.interpret_max_slices,
        started=datetime.datetime.now().isoformat(timespec="seconds"), loadavg_start=_loadavg(),
    )
    return env


def threads_note(cfg) -> str:
    """Where the run's thread count comes from, for the headers."""
    if cfg.threads:
        return f" (--threads {cfg.threads}; torch's default here: {DEFAULT_THREADS})"
    omp = os.environ.get("OMP_NUM_THREADS")
    return " (torch's default" + (f", OMP_NUM_THREADS={omp}" if omp else "") + ")"


def threads_markdown(records: list[dict], env: dict) -> str:
    """The eager decode at 1 thread and at the run's thread count: µs and the
    op / ``index_copy_`` ratio per sweep point (medians of samples taken in
    turns), for the op with repeated metadata (every layer after a step's
    first) and with new metadata every call (a step's first layer)."""
    n = env["torch_threads"]
    title = f"## Eager decode at 1 thread and at {n} threads{env.get('threads_note', '')}"
    if not records:
        why = "the run used one thread" if n == 1 else "no eager decode point was timed"
        return f"{title}\n\nNot measured: {why}.\n"
    med = {(r["dtype"], r["page_size"], r["size_mib"], r["path"], r["threads"]): r["median_s"] for r in records}
    points = sorted({(r["dtype"], r["page_size"], r["size_mib"]) for r in records},
                    key=lambda p: (env["dtypes"].index(p[0]) if p[0] in env["dtypes"] else 9, p[1], p[2]))
    out = [title, "",
           f"`op:auto` (the same metadata as the call before: every layer after a step's first), `{FRESH_PATH}` "
           "(another step's metadata every call: a step's first layer) and `index_copy_` of the same rows, "
           f"the six sampled in turns (median µs); × = op / index_copy_ at the same thread count, ✓ when <= "
           f"{THREADS_GOAL}. The tables above are at the run's thread count.", "",
           "| dtype | page | cache | threads | index_copy_ | op | × | op new metadata | × |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for dtype, ps, size in points:
        for t in (1, n):
            ic = med.get((dtype, ps, size, "index_copy_", t))
            cells = [report.fmt_us(ic)]
            for path in ("op:auto", FRESH_PATH):
                op = med.get((dtype, ps, size, path, t))
                cells += [report.fmt_us(op), f"{op / ic:.2f} {'✓' if op / ic <= THREADS_GOAL else '✗'}" if op and ic else "—"]
            out.append(f"| {dtype} | {ps} | {fmt_size(size)} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def model_step_markdown(records: list[dict], env: dict) -> str:
    """A model's decode step (:meth:`Runner.model_step`): µs per layer of the
    op and of ``index_copy_``, at 1 thread and at the run's thread count, and
    their ratio (medians of samples taken in turns)."""
    if not records:
        return ""
    r0 = records[0]
    title = (f"## A model's decode step: {r0['layers']} layers, each its own {fmt_size(r0['size_mib'])} cache"
             f"{env.get('threads_note', '')}")
    med = {(r["dtype"], r["page_size"], r["path"], r["threads"]): r["per_layer_s"] for r in records}
    about = ("Every layer writes the step's rows into its own cache (rows the other layers' writes have pushed out of "
             "L1 and L2, as in a model; the sweep's decode points rewrite the same rows of one cache), `op:auto` with the step's "
             "metadata (checked at the first layer, reused by the others), calls alternating between two steps; "
             f"against `index_copy_` of the same rows. µs per layer (median); × = op / index_copy_, ✓ when <= "
             f"{THREADS_GOAL}.")
    out = [title, "", about, "",
           "| dtype | page | threads | index_copy_ | op | × |", "|---|---|---:|---:|---:|---:|"]
    for dtype, ps, n in sorted({(r["dtype"], r["page_size"], r["threads"]) for r in records},
                               key=lambda k: (env["dtypes"].index(k[0]) if k[0] in env["dtypes"] else 9, k[1], k[2])):
        ic, op = med.get((dtype, ps, "index_copy_", n)), med.get((dtype, ps, "op:auto", n))
        ratio = f"{op / ic:.2f} {'✓' if op / ic <= THREADS_GOAL else '✗'}" if op and ic else "—"
        out.append(f"| {dtype} | {ps} | {n} | {report.fmt_us(ic)} | {report.fmt_us(op)} | {ratio} |")
    return "\n".join(out) + "\n"


def _version(module):
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:  # noqa: BLE001
        return None


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.xla and importlib.util.find_spec("torch_xla") is None:
        log("torch_xla is not installed: skipping the PyTorch/XLA part")
        cfg.xla = False
    env = environment(cfg)
    env["xla"] = cfg.xla
    log(f"bench_update: sizes {cfg.sizes} MiB, shapes {cfg.shapes}, dtypes {cfg.dtypes}, page sizes {cfg.page_sizes}, "
        f"repeats {cfg.repeats}, xla {cfg.xla}; torch threads {env['torch_threads']}{env['threads_note']}; "
        f"load average {env['loadavg_start']} on {env['cpus']} CPUs")
    t0 = time.perf_counter()
    runner = Runner(cfg)
    runner.run()
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    env["loadavg_end"] = _loadavg()
    batches = {f"{s}/{ps}": dict(shape=s, page_size=ps, description=b.describe(),
                                 smallest_size_mib={d: runner.smallest_size(s, d, ps) for d in cfg.dtypes})
               for (s, ps), b in runner.batches.items()}
    files = report.write_all(cfg.out, env, batches, runner.records, list(runner.checks.values()), runner.skipped)
    threads_md = threads_markdown(runner.thread_records, env) if "decode" in cfg.shapes else ""
    step_md = model_step_markdown(runner.step_records, env)
    if threads_md or step_md:
        table = pathlib.Path(cfg.out) / "bench_update.md"
        table.write_text(table.read_text() + "".join("\n" + md for md in (threads_md, step_md) if md))
        data_path = pathlib.Path(cfg.out) / "bench_update.json"
        data = json.loads(data_path.read_text())
        data["thread_records"] = runner.thread_records
        data["step_records"] = runner.step_records
        data_path.write_text(json.dumps(data, indent=1, default=str))
    print(files["bars_text"])
    for md in (threads_md, step_md):
        if md:
            print(md)
    log(f"wrote {', '.join(str(p) for p in files['paths'])} in {env['wall_s']} s")
    failed = [c for c in runner.checks.values() if not c["ok"]]
    if failed:
        log(f"{len(failed)} correctness check(s) FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
