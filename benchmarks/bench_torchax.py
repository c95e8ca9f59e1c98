"""Time ``torch.ops.paged_kv.kv_cache_update`` on torchax tensors as the cache grows.

    python benchmarks/bench_torchax.py            # 16, 64, 256, 512 MiB; decode + mixed; float32 + bfloat16 (~5 min)
    python benchmarks/bench_torchax.py --quick    # smoke run (tiny caches, ~20 s)

Paths, on the same update (``benchmarks.workloads``: decode = 64 requests x 1
token, mixed = ~2,000 tokens over ~240 slices) at every cache size:

* ``eager, donating``: the op in ``with torchax.default_env():``, the default
  (an eager call donates the cache's buffer when nothing else holds its array).
* ``eager, copying``: the same with ``torch_ops.enable_torchax(eager_donation=False)``:
  every call writes a new cache (what torchax's own in-place ops cost).
* ``jax_jit, donated``: ``torchax.interop.jax_jit(step, kwargs_for_jax_jit=
  {"donate_argnums": (2,), "compiler_options": ...})`` where ``step`` calls the
  op and returns the cache, fed back each call — the pattern the README gives.
  ``compiler_options`` are ``jax_kernels.update_compiler_options(dtype)`` (on
  XLA:CPU they stop bfloat16's whole-cache float32 round trip).
* ``jax_jit, not donated``: the same jit without donation (a new cache per call).
* ``JAX, donated``: the baseline without torch — ``jax_kernels.kv_cache_update``
  on JAX arrays, jitted the same way (cache donated and fed back).

Method: one call on a zeroed cache, compared bitwise with
``jax_kernels.kv_cache_update_reference``; one calibration call; then
``--repeats`` samples, each the mean of enough calls to last ``--min-time``
(one call for paths slower than that), each call ending in
``block_until_ready``. Reported: the median sample, and per path
time(largest) / time(smallest) — "flat" when <= 1.3. Output: a table on
stdout, ``bench_torchax.md`` and ``bench_torchax.json`` in ``--out``
(default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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

import torch_ops  # noqa: E402  (before torchax: its import hook registers the ops)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torchax  # noqa: E402
import torchax.interop  # noqa: E402
from torchax.tensor import Tensor  # noqa: E402

import jax_kernels as jk  # noqa: E402
from benchmarks.workloads import cache_rows, make_batch, make_workload  # noqa: E402
from jax_kernels.testing import bits, np_dtype  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
PATHS = ("eager, donating", "eager, copying", "jax_jit, donated", "jax_jit, not donated", "JAX, donated")
SPP = 8  # slices_per_processing_page
FLAT = 1.3


def _step_fn(page_size: int):
    def step(new, idx, cache, total):
        torch.ops.paged_kv.kv_cache_update(new, idx, cache, total, page_size, SPP, "auto")
        return cache

    return step


class Path:
    """One timed path: ``call()`` runs one update on ``self.cache`` and waits for it."""

    def __init__(self, name: str, env, w, dtype: str):
        self.name, self.env = name, env
        ps = w.batch.page_size
        self.args = (Tensor(jnp.asarray(w.new_tokens), env), Tensor(jnp.asarray(w.slice_indices), env))
        self.total = Tensor(jnp.asarray(w.total), env)
        self.cache = Tensor(jnp.zeros((w.num_rows, *w.new_tokens.shape[1:]), np_dtype(dtype)), env)
        options = jk.update_compiler_options(np_dtype(dtype)) or None
        if name.startswith("jax_jit"):
            kwargs = {"compiler_options": options}
            if name == "jax_jit, donated":
                kwargs["donate_argnums"] = (2,)
            self.step = torchax.interop.jax_jit(_step_fn(ps), kwargs_for_jax_jit=kwargs)
        elif name == "JAX, donated":
            update = functools.partial(jk.kv_cache_update, page_size=ps, slices_per_processing_page=SPP)
            self.step = jax.jit(update, donate_argnums=2, compiler_options=options)
            self.args = tuple(a.jax() for a in self.args)
            self.total, self.cache = self.total.jax(), self.cache.jax()
        self.page_size = ps

    def result(self) -> jax.Array:
        return self.cache if isinstance(self.cache, jax.Array) else self.cache.jax()

    def call(self) -> None:
        if self.name == "JAX, donated":
            self.cache = self.step(self.args[0], self.args[1], self.cache, self.total)
        elif self.name.startswith("jax_jit"):
            self.cache = self.step(*self.args, self.cache, self.total)
        else:
            with self.env:
                torch.ops.paged_kv.kv_cache_update(*self.args, self.cache, self.total, self.page_size, SPP, "auto")
        self.result().block_until_ready()


def time_path(path: Path, *, repeats: int, min_time: float) -> dict:
    t0 = time.perf_counter()
    path.call()  # calibration (compiled by the checked first call)
    single = time.perf_counter() - t0
    n = max(1, math.ceil(min_time / max(single, 1e-9)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            path.call()
        samples.append((time.perf_counter() - t0) / n)
    return {"median_s": statistics.median(samples), "samples_s": samples, "calls_per_sample": n}


def run(cfg) -> dict:
    env = torchax.default_env()
    results = []
    all_ok = True
    for dtype in cfg.dtypes:
        for shape in cfg.shapes:
            batch = make_batch(shape, cfg.page_size, quick=cfg.quick, seed=cfg.seed)
            for size in cfg.sizes:
                num_rows = cache_rows(size, dtype, [cfg.page_size])
                if batch.pages_touched > num_rows // cfg.page_size:
                    print(f"skip {shape} {dtype} {size} MiB: the update needs more pages", file=sys.stderr)
                    continue
                w = make_workload(batch, num_rows, dtype, seed=cfg.seed)
                want = jk.kv_cache_update_reference(
                    w.new_tokens, w.slice_indices, np.zeros((num_rows, *w.new_tokens.shape[1:]), np_dtype(dtype)), w.total
                )
                for name in PATHS:
                    torch_ops.enable_torchax(env, eager_donation=name != "eager, copying")
                    path = Path(name, env, w, dtype)
                    path.call()  # compiles; checked
                    ok = bool(np.array_equal(bits(path.result()), bits(want)))
                    all_ok &= ok
                    m = time_path(path, repeats=cfg.repeats, min_time=cfg.min_time)
                    results.append({"dtype": dtype, "shape": shape, "size_mib": size, "path": name, "check": ok, **m})
                    print(f"{dtype} {shape} {size:>6} MiB  {name:<22} {m['median_s'] * 1e6:>12,.1f} us"
                          f"{'' if ok else '  CHECK FAILED'}", file=sys.stderr, flush=True)
                    del path
    torch_ops.enable_torchax(env, eager_donation=True)
    return {"results": results, "all_ok": all_ok}


def report(cfg, data) -> str:
    sizes = cfg.sizes
    lines = [
        "# torch.ops.paged_kv on torchax",
        "",
        f"torchax {torchax.__version__}, jax {jax.__version__}, torch {torch.__version__}, "
        f"{jax.default_backend()} ({platform.machine()}), page size {cfg.page_size}; µs per update (median)",
        "",
        "| update | path | " + " | ".join(f"{s:g} MiB" for s in sizes) + " | largest / smallest |",
        "|---|---|" + "---:|" * len(sizes) + "---|",
    ]
    for dtype in cfg.dtypes:
        for shape in cfg.shapes:
            for name in PATHS:
                rows = {r["size_mib"]: r for r in data["results"]
                        if (r["dtype"], r["shape"], r["path"]) == (dtype, shape, name)}
                if not rows:
                    continue
                cells = [f"{rows[s]['median_s'] * 1e6:,.1f}" if s in rows else "—" for s in sizes]
                have = sorted(rows)
                ratio = rows[have[-1]]["median_s"] / rows[have[0]]["median_s"]
                verdict = f"{ratio:.2f}x" + (" flat" if ratio <= FLAT else "")
                lines.append(f"| {shape}, {dtype} | {name} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "bitwise check: all paths equal the reference" if data["all_ok"]
              else "bitwise check: FAILED (see bench_torchax.json)", ""]
    return "\n".join(lines)


def _list(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 and 8 MiB, decode, float32, 3 samples")
    p.add_argument("--sizes", type=_list(float), help="cache sizes in MiB (default 16,64,256,512)")
    p.add_argument("--shapes", type=_list(str), help="decode and/or mixed (default both)")
    p.add_argument("--dtypes", type=_list(str), help="cache dtypes (default float32,bfloat16)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--repeats", type=int, help="samples per path (default 5)")
    p.add_argument("--min-time", type=float, help="seconds per sample (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    cfg = p.parse_args(argv)
    quick = dict(sizes=[2, 8], shapes=["decode"], dtypes=["float32"], repeats=3, min_time=0.005)
    full = dict(sizes=[16, 64, 256, 512], shapes=["decode", "mixed"], dtypes=["float32", "bfloat16"], repeats=5,
                min_time=0.05)
    for key, value in (quick if cfg.quick else full).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.repeats < 1:
        p.error(f"--repeats={cfg.repeats} must be >= 1")
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    data = run(cfg)
    text = report(cfg, data)
    print(text)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "bench_torchax.md").write_text(text)
    (cfg.out / "bench_torchax.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(cfg).items()}, **data}, indent=1))
    return 0 if data["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
