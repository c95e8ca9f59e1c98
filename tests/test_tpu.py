"""On a TPU VM: the compiled Pallas kernel on the chip (``python -m pytest -m tpu``).

Every test here is marked ``tpu`` and is skipped, with the reason, where JAX's default device is
not a TPU (the torch op's tests also where torch_xla is missing or its PJRT device is not the TPU).
On a TPU they check:

* the kernel — compiled, not interpreted; the lowering must hold the ``tpu_custom_call`` with the
  VMEM limit ``tpu_kernel_config`` gives for the attached chip, so a silent fallback to the scatter
  fails — equals ``kv_cache_update_reference`` bitwise on every layout (combined flat and paged,
  packed, packed flat, ``packed_hd64``, separate K and V caches through ``kv_cache_update_kv``) and
  dtype, at 8 slices per step and sized from VMEM (``None``), with more slices than one grid step
  holds and garbage in the padding columns; and at page sizes where the slices sized from VMEM
  fill the VMEM limit (Mosaic would refuse a staging buffer larger than the limit);
* in place: under ``jax.jit(..., donate_argnums=...)`` the output has the donated cache's buffer
  pointer and the input is deleted;
* no recompiles across steps whose slice counts change (traces counted, and XLA compiles counted
  through ``jax.monitoring``);
* the torch op on PyTorch/XLA TPU tensors (``impl`` auto and pallas), in place: same buffer
  pointer after ``torch_xla.sync()``, torch_xla's ``InputOutputAliasCount`` grows, one compile.

tests/conftest.py defaults ``PJRT_DEVICE`` to CPU, so the torch op's tests need ``PJRT_DEVICE=TPU``.
JAX initialized before torch_xla has claimed the TPU hangs torch_xla's TPU work (pytorch/xla
issue 8793): ``bridge``, imported first here, runs torch_xla's guard. That JAX then gets the
same TPU in this process is what torch_xla's own ``call_jax`` relies on, but it is unverified
here (no TPU): if under ``PJRT_DEVICE=TPU`` the JAX tests skip saying JAX's device is the CPU,
run them in a second process without ``PJRT_DEVICE``.
"""

from __future__ import annotations

import functools
import os
import sys

import bridge  # noqa: F401  (imports JAX behind torch_xla's guard, before any JAX backend starts)
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_kernels as jk
from benchmarks.bench_tpu import inspect_tpu_lowering, lower_for_tpu, lowering_problems
from jax_kernels.kv_cache_update.prepare import tpu_config
from jax_kernels.kv_cache_update.tpu_config import MiB
from jax_kernels.testing import TEST_DTYPES, bits, np_dtype, random_slices, random_tokens, sentinel_cache

pytestmark = pytest.mark.tpu

PAGE_SIZE, NUM_PAGES, NUM_TOKENS = 16, 64, 512
NUM_SLICES, NUM_VALID = 96, 90  # more than one grid step at 8 and at 64 (the most sized from VMEM)
# layout → (kv heads, head_dim): the head counts pad differently for each dtype's packing.
LAYOUTS = {
    "combined-flat": (2, 128),  # [P * page_size, 2 * kvH, D]
    "combined-paged": (3, 256),  # [P, page_size, 2 * kvH, D]
    "packed": (3, 80),  # [P, page_size, H2 // pack, pack, 128]: zero heads and lanes from merge_kv
    "packed-flat": (1, 128),  # [P * page_size, H2 // pack, pack, 128]
    "packed_hd64": (3, 64),  # [P, page_size, H1 // pack, pack, 128]: K | V lanes per head
    "kv": (2, 128),  # separate K and V caches [P, page_size, kvH, D], one launch
}
SLICES_PER_STEP = [8, None]
# Quantized writes: the kernel quantizes in VMEM between its DMAs (jax_kernels/kv_cache_update/quantize.py).
QUANTIZED = [  # (tokens dtype, cache dtype, k_scale, v_scale)
    ("bfloat16", "float8_e4m3fn", 0.5, 0.25),
    ("bfloat16", "float8_e5m2", 2.0, 0.0371),
    ("bfloat16", "int8", 0.05, 0.03),
    ("float32", "float8_e4m3fn", 0.0371, 3.0),
]


@pytest.fixture(scope="module")
def tpu():
    """JAX's default device, when it is a TPU."""
    device = jax.devices()[0]
    if device.platform != "tpu":
        hint = ""
        if os.environ.get("PJRT_DEVICE") == "TPU" and "torch_xla" in sys.modules:
            hint = "; torch_xla holds the TPU in this process (PJRT_DEVICE=TPU): run the JAX tests without it"
        pytest.skip(f"needs a TPU: JAX's default device is {device.platform} ({device.device_kind}){hint}")
    return device


@pytest.fixture(scope="module")
def xla_tpu():
    """torch_xla's device, when its PJRT device is the TPU."""
    pytest.importorskip("torch_xla", reason="torch_xla is not installed in this environment")
    import torch_xla
    import torch_xla.runtime as xr

    if xr.device_type() != "TPU":
        pytest.skip(f"torch_xla's PJRT device is {xr.device_type()}, not TPU: run with PJRT_DEVICE=TPU "
                    f"(tests/conftest.py defaults it to CPU)")
    return torch_xla.device()


@functools.cache
def compile_log() -> list:
    """A list that grows by one every time XLA compiles a program (``jax.monitoring``; registered once)."""
    compiles = []

    def listener(event, duration_secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration_secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return compiles


# ------------------------------------------------------------------ cases


def sentinel(shape, dtype) -> np.ndarray:
    """A cache of ``shape`` filled with NaN (floats) or the minimum (ints): rows no slice names
    must come back bitwise equal."""
    return sentinel_cache(int(np.prod(shape[:-2])), shape[-2], shape[-1], dtype).reshape(shape)


def make_case(layout, dtype, *, seed=0, num_valid=NUM_VALID, cache_dtype=None, scales=None, page_size=PAGE_SIZE,
              num_pages=NUM_PAGES, num_tokens=NUM_TOKENS, num_slices=NUM_SLICES):
    """``(tokens, slice_indices, caches, total, expected)``: tuples of one (or, for ``kv``, two)
    token arrays and caches; ``expected`` from ``kv_cache_update_reference``."""
    rng = np.random.default_rng(seed)
    kv_heads, head_dim = LAYOUTS[layout]
    cache_dtype = cache_dtype or dtype
    idx, total = random_slices(rng, num_rows=num_pages * page_size, num_tokens=num_tokens, page_size=page_size,
                               num_slices=num_slices, num_valid=num_valid)  # i32[3, S], i32[1]
    k, v = (random_tokens(rng, num_tokens, kv_heads, head_dim, dtype) for _ in "kv")  # [T, kvH, D] each
    if layout == "kv":
        tokens = (k, v)
        caches = tuple(sentinel((num_pages, page_size, kv_heads, head_dim), cache_dtype) for _ in "kv")
        # The reference quantizes a K cache by k_scale and a V cache by v_scale: one scale per cache.
        scale_kw = [dict(k_scale=s, v_scale=s) for s in scales] if scales else [{}, {}]
    else:
        base = "combined" if layout.startswith("combined") else layout.removesuffix("-flat")
        shape = jk.kv_cache_shape(num_pages, page_size, kv_heads, head_dim, np_dtype(cache_dtype), layout=base)
        rows = np.asarray(jk.merge_kv(jnp.asarray(k), jnp.asarray(v), layout=base))  # [T, *row of dtype]
        # Quantized packed rows take the cache's packing: heads (zero-padded) regrouped by it.
        heads = rows.reshape(num_tokens, -1, rows.shape[-1])  # [T, heads, lanes]
        heads = np.pad(heads, ((0, 0), (0, int(np.prod(shape[2:-1])) - heads.shape[1]), (0, 0)))
        tokens = (heads.reshape(num_tokens, *shape[2:]),)  # [T, *row of cache_dtype]
        if layout.endswith("-flat"):
            shape = (shape[0] * shape[1], *shape[2:])
        caches = (sentinel(shape, cache_dtype),)
        scale_kw = [dict(k_scale=scales[0], v_scale=scales[1])] if scales else [{}]
    expected = tuple(jk.kv_cache_update_reference(t, idx, c, total, **kw) for t, c, kw in zip(tokens, caches, scale_kw))
    return tokens, idx, caches, total, expected


def jitted_update(layout, *, slices_per_processing_page=None, scales=None, page_size=PAGE_SIZE):
    """The donated, jitted update of ``layout``: ``(*tokens, idx, *caches, total) -> caches``."""
    kw = dict(page_size=page_size, slices_per_processing_page=slices_per_processing_page)
    if scales:
        kw.update(k_scale=scales[0], v_scale=scales[1])
    if layout == "kv":
        return jax.jit(functools.partial(jk.kv_cache_update_kv, **kw), donate_argnums=(3, 4)), (3, 4)
    return jax.jit(lambda *a: (jk.kv_cache_update(*a, **kw),), donate_argnums=2), (2,)


def run_on_tpu(layout, case, *, slices_per_processing_page=None, scales=None, page_size=PAGE_SIZE):
    """Run the case's update on the TPU: the kernel must be what runs. Returns the updated caches (numpy)."""
    tokens, idx, caches, total, _ = case
    fn, cache_args = jitted_update(layout, slices_per_processing_page=slices_per_processing_page, scales=scales,
                                   page_size=page_size)
    args = (*map(jnp.asarray, tokens), jnp.asarray(idx), *map(jnp.asarray, caches), jnp.asarray(total))
    # What kv_cache_update configures this launch with (tests/test_tpu_config.py checks the rule).
    config = tpu_config(tokens, idx, caches, page_size=page_size, slices_per_processing_page=slices_per_processing_page)
    assert config.problem is None, config
    low = inspect_tpu_lowering(lower_for_tpu(fn, *args))  # on a TPU: the program that runs
    assert lowering_problems(low, kernel=True, vmem_limit_bytes=config.vmem_limit_bytes, num_caches=len(caches),
                             cache_args=cache_args) == [], (low, config)
    return [np.asarray(c) for c in fn(*args)]


# ------------------------------------------------------------------ the kernel on the chip


@pytest.mark.parametrize("spp", SLICES_PER_STEP, ids=lambda s: f"spp{s or 'auto'}")
@pytest.mark.parametrize("dtype", TEST_DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kernel_on_tpu_equals_the_reference_bitwise(tpu, layout, dtype, spp):
    case = make_case(layout, dtype, seed=TEST_DTYPES.index(dtype))
    for got, want in zip(run_on_tpu(layout, case, slices_per_processing_page=spp), case[4]):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("quantized", QUANTIZED or [pytest.param(None, marks=pytest.mark.skip(
    reason="no quantized cases yet: they go in tests/test_tpu.py's QUANTIZED list"))],
    ids=lambda q: f"{q[0]}-to-{q[1]}" if q else "none")
@pytest.mark.parametrize("layout", ["combined-paged", "packed", "kv"])
def test_quantized_kernel_on_tpu_equals_the_reference_bitwise(tpu, layout, quantized):
    token_dtype, cache_dtype, k_scale, v_scale = quantized
    case = make_case(layout, token_dtype, cache_dtype=cache_dtype, scales=(k_scale, v_scale))
    for got, want in zip(run_on_tpu(layout, case, scales=(k_scale, v_scale)), case[4]):
        np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("layout,dtype", [("combined-flat", "bfloat16"), ("combined-flat", "float8_e4m3fn"),
                                          ("packed", "float32"), ("kv", "int8")])
def test_slices_sized_to_fill_the_vmem_limit_compile_and_run(tpu, layout, dtype):
    """Never a VMEM overflow: a page size at which the 64 slices sized from VMEM fill the limit
    (less the 1 MiB kept back) to within one row per slice. Mosaic compiles the kernel against that
    limit, so a staging buffer that takes more VMEM than ``tpu_kernel_config`` counts fails here.
    The head counts are small: the rows' padding to the dtype's packing is all the VMEM counted."""
    tokens, idx, caches, _, _ = make_case(layout, dtype, page_size=1, num_pages=1, num_tokens=1, num_slices=80,
                                          num_valid=1)
    one_row = tpu_config(tokens, idx, caches, page_size=1)  # one row of every buffer, in VMEM
    per_row, limit = one_row.page_bytes, one_row.vmem_limit_bytes  # limit: the attached chip's default
    page_size = (limit - MiB) // (64 * per_row)
    config = tpu_config(tokens, idx, caches, page_size=page_size)
    assert config.slices_per_processing_page == 64 and config.problem is None, config
    assert limit - MiB - 64 * per_row < config.staging_bytes <= limit - MiB, config
    case = make_case(layout, dtype, seed=40, page_size=page_size, num_pages=96, num_tokens=48 * page_size,
                     num_slices=80, num_valid=72)
    for got, want in zip(run_on_tpu(layout, case, page_size=page_size), case[4]):
        np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("layout", ["combined-paged", "packed", "kv"])
def test_donated_update_writes_the_cache_in_place(tpu, layout):
    fn, cache_args = jitted_update(layout)
    case = make_case(layout, "bfloat16", seed=10)
    tokens, idx, caches, total, expected = case
    caches = [jax.device_put(c) for c in caches]
    pointers = [c.unsafe_buffer_pointer() for c in caches]
    for step in range(3):  # the output of one step is the next step's donated cache
        if step:
            tokens, idx, _, total, _ = make_case(layout, "bfloat16", seed=10 + step, num_valid=NUM_VALID - 20 * step)
            expected = [jk.kv_cache_update_reference(t, idx, e, total) for t, e in zip(tokens, expected)]
        out = fn(*map(jnp.asarray, tokens), jnp.asarray(idx), *caches, jnp.asarray(total))
        assert all(c.is_deleted() for c in caches), "the donated cache must be consumed"
        assert [o.unsafe_buffer_pointer() for o in out] == pointers, "the update must write the donated buffer"
        for o, e in zip(out, expected):
            np.testing.assert_array_equal(bits(np.asarray(o)), bits(e))
        caches = list(out)


@pytest.mark.parametrize("spp", SLICES_PER_STEP, ids=lambda s: f"spp{s or 'auto'}")
def test_changing_slice_counts_do_not_recompile(tpu, spp):
    compiles = compile_log()
    traces = []

    def update(tokens, idx, cache, total):
        traces.append(1)
        return jk.kv_cache_update(tokens, idx, cache, total, page_size=PAGE_SIZE, slices_per_processing_page=spp)

    step = jax.jit(update, donate_argnums=2)
    counts = (1, 7, 64, 0, NUM_VALID, 65, 3, NUM_SLICES)
    cases = [make_case("combined-paged", "bfloat16", seed=21 + i, num_valid=n) for i, n in enumerate(counts)]
    on_device = [jax.device_put((tokens, idx, total)) for (tokens,), idx, _, total, _ in cases]
    expected = cases[0][2][0]  # the sentinel cache
    cache = jax.device_put(expected)
    for i, (num_valid, ((tokens,), idx, _, total, _), args) in enumerate(zip(counts, cases, on_device)):
        if i == 1:
            before = len(compiles)
        cache = step(args[0], args[1], cache, args[2])
        expected = jk.kv_cache_update_reference(tokens, idx, expected, total)
        np.testing.assert_array_equal(bits(np.asarray(cache)), bits(expected), err_msg=f"step {i}: {num_valid} slices")
    assert len(traces) == 1, f"traced {len(traces)} times for slice counts {counts}"
    assert len(compiles) == before, f"{len(compiles) - before} compiles after the first step"


# ------------------------------------------------------------------ the torch op on PyTorch/XLA TPU tensors

UINT = {1: "uint8", 2: "int16", 4: "int32"}


def to_xla(a: np.ndarray, device):
    """A torch tensor on ``device`` with ``a``'s exact bits (bfloat16 and float8 through their bits)."""
    import torch

    return torch.from_numpy(bits(a).copy()).view(getattr(torch, a.dtype.name)).to(device)


def xla_bits(t) -> np.ndarray:
    import torch

    cpu = t.detach().cpu().contiguous()
    return bits(cpu.view(getattr(torch, UINT[cpu.element_size()])).numpy())


@pytest.mark.parametrize("impl", ["auto", "pallas"])
@pytest.mark.parametrize("layout,dtype", [("combined-paged", "bfloat16"), ("packed", "float8_e4m3fn"),
                                          ("combined-flat", "float32")])
def test_torch_op_on_xla_tpu_tensors_writes_in_place(xla_tpu, layout, dtype, impl):
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met

    import torch_ops

    def aliases():
        data = met.metric_data("InputOutputAliasCount")
        return 0.0 if data is None else data[1]

    (tokens,), idx, (cache_np,), total, (expected,) = make_case(layout, dtype, seed=30)
    cache = to_xla(cache_np, xla_tpu)
    torch_xla.sync()
    pointer = torch_xla._XLAC._unsafe_buffer_pointer(cache)
    before, compiles = aliases(), []
    for step in range(3):
        if step:
            (tokens,), idx, _, total, _ = make_case(layout, dtype, seed=30 + step, num_valid=NUM_VALID - 30 * step)
            expected = jk.kv_cache_update_reference(tokens, idx, expected, total)
        args = (to_xla(tokens, xla_tpu), to_xla(idx, xla_tpu), cache, to_xla(total, xla_tpu))
        torch_xla.sync()
        compiled = met.counter_value("UncachedCompile") or 0
        torch_ops.kv_cache_update(*args, page_size=PAGE_SIZE, impl=impl)
        torch_xla.sync()
        xm.wait_device_ops()
        compiles.append((met.counter_value("UncachedCompile") or 0) - compiled)
        assert torch_xla._XLAC._unsafe_buffer_pointer(cache) == pointer, "the cache must keep its device buffer"
        np.testing.assert_array_equal(xla_bits(cache), bits(expected), err_msg=f"step {step}")
    assert aliases() >= before + 1, "the compiled step must alias the cache input→output"
    assert compiles[1:] == [0, 0], f"compiles per step: {compiles}"
