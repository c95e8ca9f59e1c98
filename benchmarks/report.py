"""Tables, bars and the plot for ``bench_update.py`` (pure functions of its records)."""

from __future__ import annotations

import json
import pathlib

BACKENDS = {"cpu": "CPU eager", "xla": "PyTorch/XLA (CPU PJRT)"}
FRESH_PATH = "op:auto new metadata"  # bench_update's eager decode with another step's metadata every call
PATH_ORDER = ("memcpy", "index_copy_", "op:auto", FRESH_PATH, "op:auto packed", "op:jax", "op:pallas_interpret", "jax:auto",
              "jax:auto packed", "jax:scatter", "jax:scan")
FLAT_MAX = 1.3

# The bars of the issue, evaluated on one run's ratios.
BAR_TITLES = {
    1: f"every path: time(largest cache) / time(smallest cache holding the update) <= {FLAT_MAX}",
    2: "eager CPU `op:auto`, mixed update: <= 2.5x memcpy of the same bytes and <= 1.2x `index_copy_` of the same rows",
    3: "eager CPU `op:auto`, decode update (the same metadata as the call before, and new metadata): <= 2x `index_copy_`",
    4: f"PyTorch/XLA `op:auto`: <= 3x torch_xla's own `index_copy_` step, and flat (<= {FLAT_MAX})",
    5: "fast JAX fallback (`jax:scatter`) >= 5x faster than the scan fallback (`jax:scan`), mixed update",
}

# A bar's status in a --quick run: its sizes (a few MiB) and small updates are not the ones the
# bars name, so the ratios are shown but judged neither way.
NOT_JUDGED = "not judged in quick mode"


def _order(path):
    return PATH_ORDER.index(path) if path in PATH_ORDER else len(PATH_ORDER)


def fmt_us(seconds) -> str:
    if seconds is None:
        return "—"
    us = seconds * 1e6
    if us >= 100:
        return f"{us:,.0f}"
    return f"{us:.3g}" if us >= 1 else f"{us:.2g}"


def fmt_size(mib) -> str:
    return f"{mib / 1024:g} GiB" if mib >= 1024 else f"{mib:g} MiB"


class Results:
    """Medians indexed by (backend, shape, dtype, page_size, path) → {size_mib: seconds}."""

    def __init__(self, records, skipped=()):
        self.records = records
        self.med: dict[tuple, dict[float, float]] = {}
        self.one_call: set[tuple] = set()  # (key, size) timed once (slower than --max-call-s)
        self.skipped: dict[tuple, dict[float, str]] = {}  # key → {size: why}
        for r in records:
            key = (r["backend"], r["shape"], r["dtype"], r["page_size"], r["path"])
            self.med.setdefault(key, {})[r["size_mib"]] = r["median_s"]
            if r.get("over_budget"):
                self.one_call.add((key, r["size_mib"]))
        for sk in skipped:
            key = (sk["backend"], sk["shape"], sk["dtype"], sk["page_size"], sk["path"])
            self.skipped.setdefault(key, {})[sk["size_mib"]] = sk["why"]

    def cell(self, key, size) -> str:
        if size in self.skipped.get(key, {}):
            return "skip²"
        t = self.med.get(key, {}).get(size)
        return fmt_us(t) + ("¹" if (key, size) in self.one_call else "") if t is not None else "—"

    def get(self, backend, shape, dtype, ps, path, size):
        return self.med.get((backend, shape, dtype, ps, path), {}).get(size)

    def flat(self, key):
        """``(ratio, smallest size, largest size)``; None with fewer than two sizes."""
        sizes = sorted(self.med.get(key, {}))
        if len(sizes) < 2:
            return None
        t = self.med[key]
        return t[sizes[-1]] / t[sizes[0]], sizes[0], sizes[-1]

    def ratios(self, key, baseline_backend, baseline_path):
        """{size: time / baseline time} at the sizes where both ran."""
        backend, shape, dtype, ps, _ = key
        out = {}
        for size, t in self.med.get(key, {}).items():
            base = self.get(baseline_backend, shape, dtype, ps, baseline_path, size)
            if base:
                out[size] = t / base
        return out


def _range(values) -> str:
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}"


# ------------------------------------------------------------------ bars


def _point_bar(res, bar_id, rows, limit, *, at_most=True, num_label, den_label, stalled=None):
    """A bar over sweep points: rows of (shape, dtype, ps, size, num_s, den_s). ``stalled``:
    points whose timings look stalled (marked ⚠)."""
    stalled = stalled or {}
    table = [f"| shape | dtype | page | cache | {num_label} µs | {den_label} µs | ratio | ok |", "|---|---|---|---|---:|---:|---:|---|"]
    ok_all, worst = True, None
    for shape, dtype, ps, size, num, den in rows:
        ratio = num / den
        ok = ratio <= limit if at_most else ratio >= limit
        ok_all &= ok
        if worst is None or (ratio > worst[0] if at_most else ratio < worst[0]):
            worst = (ratio, shape, dtype, ps, size)
        mark = " ⚠ stalled" if (shape, dtype, ps, size) in stalled else ""
        table.append(f"| {shape} | {dtype} | {ps} | {fmt_size(size)} | {fmt_us(num)} | {fmt_us(den)} | {ratio:.2f} "
                     f"| {'✓' if ok else '✗'}{mark} |")
    if not rows:
        return "N/A", ["no sweep point measured both paths"]
    n_ok = sum(1 for *_, num, den in rows if ((num / den <= limit) if at_most else (num / den >= limit)))
    cmp = "<=" if at_most else ">="
    summary = (f"worst {worst[0]:.2f} (want {cmp} {limit}) at {worst[1]} {worst[2]} page {worst[3]} {fmt_size(worst[4])}; "
               f"{n_ok}/{len(rows)} points pass")
    n_stalled = sum(1 for shape, dtype, ps, size, *_ in rows if (shape, dtype, ps, size) in stalled)
    if n_stalled:
        summary += f"; ⚠ {n_stalled} point(s) look stalled (see the noise note): rerun on a quiet machine or with --threads 1"
    return ("PASS" if ok_all else "FAIL"), [summary, "", *table]


def _pairs(res, backend, shapes, num_path, den_backend, den_path):
    rows = []
    for (b, shape, dtype, ps, path), by_size in sorted(res.med.items()):
        if b != backend or path != num_path or shape not in shapes:
            continue
        for size, t in sorted(by_size.items()):
            base = res.get(den_backend, shape, dtype, ps, den_path, size)
            if base:
                rows.append((shape, dtype, ps, size, t, base))
    return rows


def _flat_lines(res, keys):
    """(all ok, lines) for the flatness of ``keys``."""
    evaluated = [(key, res.flat(key)) for key in keys]
    evaluated = [(k, f) for k, f in evaluated if f is not None]
    if not evaluated:
        return None, ["no path ran at two cache sizes"]
    bad = sorted([(f[0], k, f) for k, f in evaluated if f[0] > FLAT_MAX], reverse=True, key=lambda x: x[0])
    worst_ratio, worst_key, worst_f = max((f[0], k, f) for k, f in evaluated)
    b, shape, dtype, ps, path = worst_key
    lines = [
        f"worst {worst_ratio:.2f} (want <= {FLAT_MAX}): {b} `{path}` {shape} {dtype} page {ps}, "
        f"{fmt_us(res.med[worst_key][worst_f[1]])} µs at {fmt_size(worst_f[1])} → "
        f"{fmt_us(res.med[worst_key][worst_f[2]])} µs at {fmt_size(worst_f[2])}; "
        f"{len(evaluated) - len(bad)}/{len(evaluated)} (path, config) pairs pass"
    ]
    stalled = stalled_points(res)
    for ratio, (b, shape, dtype, ps, path), f in bad[:20]:
        torch_eager = b == "cpu" and not path.startswith("jax:")
        ends = {(shape, dtype, ps, f[1]), (shape, dtype, ps, f[2])}
        mark = " ⚠ stalled point" if torch_eager and ends & set(stalled) else ""
        lines.append(f"- ✗ {b} `{path}` {shape} {dtype} page {ps}: {ratio:.2f} "
                     f"({fmt_us(res.med[(b, shape, dtype, ps, path)][f[1]])} → {fmt_us(res.med[(b, shape, dtype, ps, path)][f[2]])} µs)"
                     + mark)
    if len(bad) > 20:
        lines.append(f"- … and {len(bad) - 20} more")
    for key in keys:
        if key in res.skipped:
            b, shape, dtype, ps, path = key
            sizes = ", ".join(fmt_size(x) for x in sorted(res.skipped[key]))
            why = res.skipped[key][max(res.skipped[key])]
            lines.append(f"- {b} `{path}` {shape} {dtype} page {ps}: not run at {sizes}: {why}")
    return not bad, lines


def evaluate_bars(res, env) -> list[dict]:
    bars = []

    def part(status):  # a part of a bar (bars 2 and 4 have two), as its lines name it
        return "not judged" if env.get("quick") and status in ("PASS", "FAIL") else status

    largest = max(env["sizes_mib"]) if env["sizes_mib"] else None
    note = [] if largest == 1024 else [f"(this run's largest cache is {fmt_size(largest)}; the bar names 1 GiB)"]

    ok, lines = _flat_lines(res, list(res.med))
    bars.append(dict(id=1, status="N/A" if ok is None else ("PASS" if ok else "FAIL"), lines=lines + note))

    mixed_mc = _pairs(res, "cpu", {"mixed"}, "op:auto", "cpu", "memcpy")
    mixed_ic = _pairs(res, "cpu", {"mixed"}, "op:auto", "cpu", "index_copy_")
    stalled = stalled_points(res)
    s_mc, l_mc = _point_bar(res, 2, mixed_mc, 2.5, num_label="op:auto", den_label="memcpy", stalled=stalled)
    s_ic, l_ic = _point_bar(res, 2, mixed_ic, 1.2, num_label="op:auto", den_label="index_copy_", stalled=stalled)
    status = "N/A" if "N/A" in (s_mc, s_ic) else ("PASS" if s_mc == s_ic == "PASS" else "FAIL")
    bars.append(dict(id=2, status=status, lines=[f"vs memcpy ({part(s_mc)}): " + l_mc[0], *l_mc[1:], "",
                                                 f"vs index_copy_ ({part(s_ic)}): " + l_ic[0], *l_ic[1:]]))

    decode = _pairs(res, "cpu", {"decode"}, "op:auto", "cpu", "index_copy_")
    decode += [(f"{shape}, new metadata", *rest) for shape, *rest in
               _pairs(res, "cpu", {"decode"}, FRESH_PATH, "cpu", "index_copy_")]
    s, lines = _point_bar(res, 3, decode, 2.0, num_label="op:auto", den_label="index_copy_", stalled=stalled)
    bars.append(dict(id=3, status=s, lines=lines))

    if not env.get("xla"):
        bars.append(dict(id=4, status="N/A", lines=["PyTorch/XLA part not run (torch_xla not installed or --no-xla)"]))
    else:
        s_r, l_r = _point_bar(res, 4, _pairs(res, "xla", {"decode", "mixed", "prefill"}, "op:auto", "xla", "index_copy_"),
                              3.0, num_label="xla op:auto", den_label="xla index_copy_")
        ok_f, l_f = _flat_lines(res, [k for k in res.med if k[0] == "xla" and k[4] == "op:auto"])
        s_f = "N/A" if ok_f is None else ("PASS" if ok_f else "FAIL")
        status = "N/A" if "N/A" in (s_r, s_f) else ("PASS" if s_r == s_f == "PASS" else "FAIL")
        bars.append(dict(id=4, status=status, lines=[f"vs index_copy_ ({part(s_r)}): " + l_r[0], *l_r[1:], "",
                                                     f"flatness ({part(s_f)}): " + l_f[0], *l_f[1:], *note]))

    s, lines = _point_bar(res, 5, _pairs(res, "cpu", {"mixed"}, "jax:scan", "cpu", "jax:scatter"), 5.0, at_most=False,
                          num_label="jax:scan", den_label="jax:scatter")
    bars.append(dict(id=5, status=s, lines=lines))
    for bar in bars:
        bar["title"] = BAR_TITLES[bar["id"]]
        if env.get("quick") and bar["status"] in ("PASS", "FAIL"):
            bar["status"] = NOT_JUDGED
            sizes = ", ".join(fmt_size(x) for x in sorted(env["sizes_mib"]))
            bar["lines"] = [f"Quick mode measured caches of {sizes} and smaller updates than the bar names: the "
                            "ratios below (✓/✗ against the bar's limit) are for reading, not a verdict; run without "
                            "--quick to judge the bar.", "", *bar["lines"]]
    return bars


def bars_markdown(bars, env) -> str:
    quick = "; QUICK mode: tiny sizes, not the sizes the bars name" if env["quick"] else ""
    out = ["## Bars", "", f"From one run ({env['started']}, load average {env['loadavg_start']} → {env.get('loadavg_end')} "
                          f"on {env['cpus']} CPUs{quick}).", ""]
    for bar in bars:
        out.append(f"### {bar['id']}. {bar['status']} — {bar['title']}")
        out.append("")
        out.extend(bar["lines"])
        out.append("")
    if env["quick"]:
        others = ", ".join(f"{b['id']}: {b['status']}" for b in bars if b["status"] != NOT_JUDGED)
        summary = NOT_JUDGED + (f" ({others})" if others else "")
    else:
        summary = ", ".join(f"{b['id']}: {b['status']}" for b in bars)
    out.append(f"Summary: {summary}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ tables


def results_markdown(res, env, batches, checks, bars_md) -> str:
    check_of = {(c["backend"], c["shape"], c["dtype"], c["page_size"], c["path"]): c for c in checks}
    sizes = env["sizes_mib"]
    busy = env["loadavg_start"] and env["loadavg_start"][0] > 0.5 * (env["cpus"] or 1)
    out = [
        "# bench_update results", "",
        f"- run: {env['started']}, {env['wall_s']} s, `bench_update.py {' '.join(env['argv'])}`"
        + (" (**quick**: tiny sizes)" if env["quick"] else ""),
        f"- stack: Python {env['python']}, torch {env['torch']}, torch_xla {env['torch_xla'] or '—'}, jax {env['jax']}, "
        f"numpy {env['numpy']}; PJRT_DEVICE={env['pjrt_device']}",
        f"- machine: {env['system']}, {env['cpus']} CPUs, torch threads {env['torch_threads']}{env.get('threads_note', '')}; "
        f"load average {env['loadavg_start']} at start, {env['loadavg_end']} at end"
        + (" — **busy machine: timings are noisy**" if busy else ""),
        f"- cache rows [H={env['heads']}, D={env['head_dim']}]; each point: warm-up, calibration, median of "
        f"{env['repeats']} samples of >= {env['min_time_s'] * 1e3:g} ms; times in µs per update (step incl. barrier)",
        "- flat = time(largest cache) / time(smallest cache holding the update); × memcpy / × index_copy_: "
        "range over cache sizes (XLA rows: memcpy is the eager one, index_copy_ is torch_xla's step)",
        _noise_line(res),
        f"- ¹ one call only: slower than --max-call-s ({env.get('max_call_s')} s) per call (at a cache after the first "
        "where it was over budget, that call includes compiling); "
        "² not run: over that budget and growing (or possibly growing) with the cache size (see bar 1)",
        "- check: the path's first result compared bitwise with `kv_cache_update_reference` (memcpy: with its source), "
        "at the cache size given; `—` in a size column: the update does not fit that cache (or the path is not run there)",
        "",
    ]
    for backend, title in BACKENDS.items():
        keys = sorted({k for k in res.med if k[0] == backend} | {k for k in check_of if k[0] == backend},
                      key=lambda k: (k[1], k[2], k[3], _order(k[4])))
        if not keys:
            if backend == "xla" and not env.get("xla"):
                out += [f"## {title}", "", "Not run (torch_xla not installed, or --no-xla).", ""]
            continue
        out += [f"## {title}", ""]
        for shape in ("decode", "mixed", "prefill"):
            skeys = [k for k in keys if k[1] == shape]
            if not skeys:
                continue
            out += [f"### {shape}", ""]
            for b in batches.values():
                if b["shape"] == shape:
                    smallest = ", ".join(f"{d} {fmt_size(s) if s else 'none'}" for d, s in b["smallest_size_mib"].items())
                    out.append(f"- page {b['page_size']}: {b['description']}; smallest cache holding it: {smallest}")
            out += ["", "| dtype | page | path | " + " | ".join(fmt_size(s) for s in sizes) + " | flat | × memcpy | × index_copy_ | check |",
                    "|---|---|---|" + "---:|" * len(sizes) + "---:|---:|---:|---|"]
            for key in skeys:
                _, _, dtype, ps, path = key
                cells = [res.cell(key, s) for s in sizes]
                f = res.flat(key)
                mc = res.ratios(key, "cpu", "memcpy")
                ic = res.ratios(key, backend, "index_copy_")
                c = check_of.get(key)
                check = "—" if c is None else (f"✓ {c['kind']} @ {fmt_size(c['size_mib'])}" if c["ok"] else f"✗ {c['why']}")
                flat = f"{f[0]:.2f}" if f else "—"
                out.append(f"| {dtype} | {ps} | `{path}` | " + " | ".join(cells)
                           + f" | {flat} | {_range(list(mc.values()))} | {_range(list(ic.values()))} | {check} |")
            out.append("")
    out.append(bars_md)
    return "\n".join(out)


def _noise_line(res) -> str:
    spreads = [max(r["samples_s"]) / min(r["samples_s"]) for r in res.records if min(r["samples_s"]) > 0]
    noisy = sum(1 for x in spreads if x > 1.5)
    retaken = sum(1 for r in res.records if r.get("attempts", 1) > 1)
    return (f"- noise: {noisy} of {len(spreads)} timings have samples spreading more than 1.5× (max/min) "
            f"after up to 3 attempts ({retaken} were taken again)"
            + ("; on a shared 2-core machine a busy core stalls torch's multi-threaded copies for a "
               "scheduler tick (~4–8 ms): rerun on a quiet machine, or with `--threads 1`" if noisy else "")
            + _memcpy_line(res))


def stalled_points(res) -> dict[tuple, float]:
    """Sweep points ``(shape, dtype, page_size, size)`` whose eager memcpy ran far below its
    bandwidth at the other cache sizes (under a quarter of the best, or under 1 GB/s): the
    eager torch timings there were stalled (a busy core and torch's multi-threaded copies),
    and their ratios are not trustworthy. Value: the memcpy GB/s there."""
    rates: dict[tuple, dict[float, float]] = {}
    for r in res.records:
        if r["backend"] == "cpu" and r["path"] == "memcpy" and r["median_s"] > 0 and r.get("bytes_moved"):
            rates.setdefault((r["shape"], r["dtype"], r["page_size"]), {})[r["size_mib"]] = r["bytes_moved"] / r["median_s"] / 1e9
    out = {}
    for group, by_size in rates.items():
        best = max(by_size.values())
        for size, rate in by_size.items():
            if rate < 0.25 * best or rate < 1.0:
                out[(*group, size)] = rate
    return out


def _memcpy_line(res) -> str:
    rates = [r["bytes_moved"] / r["median_s"] / 1e9 for r in res.records
             if r["backend"] == "cpu" and r["path"] == "memcpy" and r["median_s"] > 0 and r.get("bytes_moved")]
    if not rates:
        return ""
    text = f"; eager memcpy moved {min(rates):.2f}–{max(rates):.2f} GB/s"
    stalled = stalled_points(res)
    if stalled:
        (shape, dtype, ps, size), rate = next(iter(stalled.items()))
        text += (f" — **{len(stalled)} sweep point(s) look stalled** (memcpy far below its rate at the other sizes, "
                 f"e.g. {shape} {dtype} page {ps} {fmt_size(size)}: {rate:.2f} GB/s): their eager ratios are not "
                 "trustworthy (marked ⚠ in the bars)")
    return text


# ------------------------------------------------------------------ plot


def plot(res, env, path: pathlib.Path) -> str | None:
    """time vs cache size, one line per path, a panel per (shape, dtype, page size). Returns
    a reason when no plot could be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    shapes = [s for s in ("decode", "mixed", "prefill") if any(k[1] == s for k in res.med)]
    configs = sorted({(k[2], k[3]) for k in res.med}, key=lambda c: (env["dtypes"].index(c[0]) if c[0] in env["dtypes"] else 9, c[1]))
    if not shapes or not configs:
        return "nothing was timed: no plot"
    fig, axes = plt.subplots(len(shapes), len(configs), figsize=(4.2 * len(configs) + 2.5, 3.4 * len(shapes)),
                             squeeze=False, sharex=True)
    paths = sorted({(k[0], k[4]) for k in res.med}, key=lambda p: (p[0], _order(p[1])))
    colors = {p: plt.cm.tab20(i % 20) for i, p in enumerate(paths)}
    for i, shape in enumerate(shapes):
        for j, (dtype, ps) in enumerate(configs):
            ax = axes[i][j]
            for backend, p in paths:
                by_size = res.med.get((backend, shape, dtype, ps, p))
                if not by_size:
                    continue
                xs = sorted(by_size)
                ax.plot(xs, [by_size[x] * 1e6 for x in xs], marker="o", ms=3, color=colors[(backend, p)],
                        linestyle="-" if backend == "cpu" else "--", label=f"{backend} {p}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(env["sizes_mib"], [f"{x:g}" for x in env["sizes_mib"]])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_title(f"{shape} · {dtype} · page {ps}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(shapes) - 1:
                ax.set_xlabel("cache size (MiB)")
            if j == 0:
                ax.set_ylabel("µs per update")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8)
    fig.suptitle(f"kv_cache_update: time per update vs cache size (H={env['heads']}, D={env['head_dim']})\n"
                 "solid: CPU eager torch and JAX; dashed: PyTorch/XLA (CPU PJRT)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1 - 0.6 / fig.get_figheight()))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# ------------------------------------------------------------------ all files


def write_all(out_dir, env, batches, records, checks, skipped=()) -> dict:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = Results(records, skipped)
    bars = evaluate_bars(res, env)
    bars_md = bars_markdown(bars, env)
    png = out_dir / "bench_update.png"
    if png.exists():
        png.unlink()
    plot_problem = plot(res, env, png)
    if plot_problem:
        env["plot"] = plot_problem
    paths = {"table": out_dir / "bench_update.md", "bars": out_dir / "bars.md", "json": out_dir / "bench_update.json"}
    paths["table"].write_text(results_markdown(res, env, batches, checks, bars_md))
    paths["bars"].write_text("# bench_update bars\n\n" + bars_md)
    paths["json"].write_text(json.dumps(dict(environment=env, batches=batches, checks=checks, records=records,
                                             skipped=list(skipped), bars=bars), indent=1, default=str))
    written = [paths["table"], paths["bars"], paths["json"]] + ([png] if not plot_problem else [])
    return dict(paths=written, bars_text=bars_md, plot_problem=plot_problem)
