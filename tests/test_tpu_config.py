"""How the Pallas kernel is configured on TPU (``jax_kernels.tpu_kernel_config``), checked on CPU.

For every layout, dtype, K/V pair and generation in ``TPU_CHIPS``: the staging buffers plus the
1 MiB kept back fit ``vmem_limit_bytes``, which fits the chip; slices per step are the largest
power of two that fits (at most 64 and at most the slices passed), as tpu-inference 0.32 sizes them
(its rule restated by hand here, on its own test's examples and more); an explicit value is
honoured exactly, or refused with the reason (the interpreter raises, a TPU lowering falls back);
and the TPU lowering made from this host carries the VMEM limit ``tpu_kernel_config`` reports.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_kernels as jk
from benchmarks.bench_tpu import inspect_tpu_lowering, lower_for_tpu, lowering_problems
from jax_kernels.kv_cache_update.tpu_config import MiB, TPU_CHIPS, kernel_config
from jax_kernels.testing import TEST_DTYPES, np_dtype

GENERATIONS = list(TPU_CHIPS)
PAGE_SIZES = (16, 32, 64, 128, 256)
NUM_SLICES = (1, 5, 64, 300, 4096)
KV_HEADS = (1, 2, 3, 8)
# (layout, head dims): combined rows need head_dim % 128 == 0 for the kernel; packed rows pad it.
LAYOUT_HEAD_DIMS = {
    "combined-flat": (128, 256),  # [P * page_size, 2 * kvH, D]
    "combined-paged": (128, 256),  # [P, page_size, 2 * kvH, D]
    "packed": (64, 80, 128, 256),  # [P, page_size, H2 // pack, pack, D128]
    "packed-flat": (64, 128),  # [P * page_size, H2 // pack, pack, D128] (rank 4: row_ndim=3)
    "packed_hd64": (64,),  # [P, page_size, H1 // pack, pack, 128]
    "kv": (128, 256),  # separate K and V caches [P * page_size, kvH, D]: one launch, both rows
}
TPU_INFERENCE_LIMIT = 40 * MiB  # tpu-inference 0.32's default vmem_limit_bytes


def align(x: int, a: int) -> int:
    return -(-x // a) * a


def hand_page_bytes(page_size: int, heads: int, head_dim: int, dtype) -> int:
    """A page of ``[heads, head_dim]`` rows as VMEM holds it, worked out by hand: heads padded to
    the dtype's packing (``4 // itemsize`` per 32-bit word), head_dim to 128 lanes."""
    itemsize = np_dtype(dtype).itemsize
    return page_size * align(heads, 4 // itemsize) * align(head_dim, 128) * itemsize


def tpu_inference_slices_per_block(page_size, num_combined_kv_heads, head_size, dtype, vmem_limit_bytes):
    """tpu-inference 0.32's rule, restated from ``kernels/ragged_paged_attention/v2/
    ragged_kv_cache_update.py`` (``_get_page_size_bytes``, ``_get_num_slices_per_kv_cache_update_block``):
    ``(vmem_limit_bytes - 1 MiB) // page bytes``, the previous power of two, at most 64."""
    fit = (vmem_limit_bytes - MiB) // hand_page_bytes(page_size, num_combined_kv_heads, head_size, dtype)
    return min(1 << (fit.bit_length() - 1), 64)


def layout_config(layout, dtype, kv_heads, head_dim, *, page_size, num_slices, **kwargs):
    """``(KernelConfig, page bytes by hand)`` for a cache of ``layout``."""
    d = np_dtype(dtype)
    if layout == "kv":
        row = (kv_heads, head_dim)
        config = kernel_config([(row, d), (row, d)], page_size=page_size, num_slices=num_slices, **kwargs)
        return config, 2 * hand_page_bytes(page_size, kv_heads, head_dim, dtype)
    base = "combined" if layout.startswith("combined") else layout.removesuffix("-flat")
    shape = jk.kv_cache_shape(16, page_size, kv_heads, head_dim, d, layout=base)
    if layout.endswith("-flat"):
        shape = (shape[0] * shape[1], *shape[2:])
    # A rank-4 cache is read as paged combined rows unless told otherwise (row_ndim).
    row_ndim = 3 if layout == "packed-flat" else None
    config = jk.tpu_kernel_config(shape, d, page_size=page_size, num_slices=num_slices, row_ndim=row_ndim, **kwargs)
    # Packed rows pad heads to the packing and head_dim to 128 explicitly: the same bytes as
    # combined rows padded by VMEM. packed_hd64: kvH heads of 128 lanes (K | V).
    heads, lanes = (kv_heads, 128) if base == "packed_hd64" else (2 * kv_heads, head_dim)
    return config, hand_page_bytes(page_size, heads, lanes, dtype)


# ------------------------------------------------------------------ the default: sized from VMEM


@pytest.mark.parametrize("layout", list(LAYOUT_HEAD_DIMS))
@pytest.mark.parametrize("generation", GENERATIONS)
def test_default_slices_per_step_fit_the_vmem_limit_which_fits_the_chip(generation, layout):
    chip = TPU_CHIPS[generation]
    checked = 0
    for dtype in TEST_DTYPES:
        for kv_heads in KV_HEADS:
            for head_dim in LAYOUT_HEAD_DIMS[layout]:
                for ps in PAGE_SIZES:
                    for num_slices in NUM_SLICES:
                        c, page_bytes = layout_config(layout, dtype, kv_heads, head_dim, page_size=ps,
                                                      num_slices=num_slices, tpu_generation=generation)
                        what = f"{generation} {layout} {dtype} kvH {kv_heads} D {head_dim} page {ps} S {num_slices}: {c}"
                        assert c.problem is None, what
                        assert (c.tpu_generation, c.vmem_capacity_bytes) == (generation, chip.vmem_bytes), what
                        assert c.page_bytes == page_bytes, what
                        spp = c.slices_per_processing_page
                        assert c.staging_bytes == spp * page_bytes, what
                        # The staging buffers + 1 MiB fit the limit, the limit fits the chip and never
                        # asks for more than tpu-inference's default.
                        assert c.staging_bytes + MiB <= c.vmem_limit_bytes <= min(chip.vmem_bytes, 40 * MiB), what
                        assert 1 <= spp <= min(64, num_slices), what
                        if spp < num_slices:  # not capped by the slices passed: the largest power of two that fits
                            assert spp & (spp - 1) == 0, what
                            assert spp == 64 or 2 * spp * page_bytes + MiB > c.vmem_limit_bytes, what
                        checked += 1
    assert checked >= 500


@pytest.mark.parametrize("generation", GENERATIONS)
def test_the_default_vmem_limit_per_generation(generation):
    """40 MiB (tpu-inference's default) where the chip has 64 or 128 MiB of VMEM; 10 MiB on v4's 16 MiB."""
    c = jk.tpu_kernel_config((64 * 16, 4, 128), jnp.bfloat16, page_size=16, num_slices=64, tpu_generation=generation)
    assert c.vmem_limit_bytes == (10 * MiB if TPU_CHIPS[generation].vmem_bytes == 16 * MiB else 40 * MiB)


def test_the_generation_figures_are_jaxs():
    """VMEM, SMEM (per TensorCore) and HBM bandwidth as jax 0.10.2's tpu_info gives them."""
    got = {g: (c.vmem_bytes // MiB, c.smem_bytes // MiB, c.hbm_bytes_per_second / 1e9) for g, c in TPU_CHIPS.items()}
    assert got == {"v4": (16, 1, 615), "v5e": (128, 1, 820), "v5p": (64, 1, 1230), "v6e": (128, 1, 1640),
                   "v7": (64, 1, 3700)}


def test_a_kv_launch_counts_both_rows():
    """K and V of different widths: the page is both rows; the slices per step halve when they double."""
    bf16 = np_dtype("bfloat16")
    k_only = kernel_config([((2, 128), bf16)], page_size=128, num_slices=4096, tpu_generation="v6e")
    both = kernel_config([((2, 128), bf16), ((2, 256), bf16)], page_size=128, num_slices=4096, tpu_generation="v6e")
    assert both.page_bytes == hand_page_bytes(128, 2, 128, "bfloat16") + hand_page_bytes(128, 2, 256, "bfloat16")
    assert both.page_bytes == 3 * k_only.page_bytes == 3 * 64 * 1024
    assert both.slices_per_processing_page == 64  # (40 - 1) MiB // 192 KiB = 208 -> 128 -> at most 64
    tight = kernel_config([((8, 256), bf16)] * 2, page_size=256, num_slices=4096, tpu_generation="v6e")
    assert tight.page_bytes == 2 * 256 * 8 * 256 * 2  # 2 MiB
    assert tight.slices_per_processing_page == 16  # 39 MiB // 2 MiB = 19 -> 16


# ------------------------------------------------------------------ the same rule as tpu-inference

# tpu-inference 0.32's own test (tests/kernels/ragged_kv_cache_update_v2_test.py): bfloat16,
# page_size 32 / 33, combined heads 2 / 16 / 32, head_dim 128 / 256, num_slices_per_block=None.
# Its largest page: 33 * 32 * 256 * 2 = 540,672 B; 40,894,464 // 540,672 = 75 -> 64. Every one: 64.
TPU_INFERENCE_TEST_EXAMPLES = [
    ("bfloat16", ps, heads, hd, TPU_INFERENCE_LIMIT, 64) for ps in (32, 33) for heads in (2, 16, 32) for hd in (128, 256)
]
# More, worked out by hand, where the power-of-two rounding and the packing matter:
# (dtype, page_size, combined heads, head_dim, vmem_limit_bytes, slices per step)
MORE_EXAMPLES = [
    ("bfloat16", 128, 32, 256, 40 * MiB, 16),  # 128*32*256*2 = 2 MiB; 39 MiB // 2 MiB = 19 -> 16
    ("bfloat16", 64, 32, 256, 40 * MiB, 32),  # 1 MiB pages; 39 -> 32
    ("bfloat16", 256, 3, 128, 40 * MiB, 64),  # heads 3 -> 4: 256*4*128*2 = 256 KiB; 156 -> 128 -> 64
    ("float32", 512, 3, 256, 40 * MiB, 16),  # 512*3*256*4 = 1.5 MiB; 26 -> 16
    ("float8_e4m3fn", 1024, 6, 128, 40 * MiB, 32),  # heads 6 -> 8: 1024*8*128 = 1 MiB; 39 -> 32
    ("int8", 4096, 2, 128, 40 * MiB, 16),  # heads 2 -> 4: 4096*4*128 = 2 MiB; 19 -> 16
    ("float16", 512, 9, 128, 40 * MiB, 16),  # heads 9 -> 10: 512*10*128*2 = 1.25 MiB; 31 -> 16
    ("bfloat16", 128, 32, 256, 16 * MiB, 4),  # 2 MiB pages under a 16 MiB limit: 7 -> 4
    ("bfloat16", 128, 32, 256, 80 * MiB, 32),  # under 80 MiB: 39 -> 32
    ("bfloat16", 128, 32, 256, 3 * MiB + 1, 1),  # 2 MiB + 1 B // 2 MiB = 1
]


@pytest.mark.parametrize("generation", ["v5e", "v5p", "v6e", "v7"])  # the chips with >= 40 MiB of VMEM
@pytest.mark.parametrize("example", TPU_INFERENCE_TEST_EXAMPLES + MORE_EXAMPLES, ids=lambda e: "-".join(map(str, e[:5])))
def test_slices_per_step_equal_tpu_inferences_rule(example, generation):
    dtype, ps, heads, hd, limit, want = example
    assert tpu_inference_slices_per_block(ps, heads, hd, dtype, limit) == want  # the hand-worked value
    cache = (4 * ps, heads, hd)  # tpu-inference's flat [num_pages * page_size, combined heads, head_dim]
    explicit = jk.tpu_kernel_config(cache, np_dtype(dtype), page_size=ps, num_slices=4096, tpu_generation=generation,
                                    vmem_limit_bytes=limit)
    if limit > TPU_CHIPS[generation].vmem_bytes:  # 80 MiB asked of a 64 MiB chip: refused, not clipped
        assert explicit.problem and f"vmem_limit_bytes={limit} exceeds" in explicit.problem, explicit
        return
    assert (explicit.slices_per_processing_page, explicit.vmem_limit_bytes, explicit.problem) == (want, limit, None)
    if limit == TPU_INFERENCE_LIMIT:  # the default limit on these chips is tpu-inference's
        default = jk.tpu_kernel_config(cache, np_dtype(dtype), page_size=ps, num_slices=4096, tpu_generation=generation)
        assert default == explicit


def test_v4_sizes_from_its_smaller_default_limit():
    """v4 has 16 MiB of VMEM: the default limit is 10 MiB, and the rule runs on that."""
    for dtype, ps, heads, hd, _, _ in TPU_INFERENCE_TEST_EXAMPLES + MORE_EXAMPLES[:7]:
        c = jk.tpu_kernel_config((4 * ps, heads, hd), np_dtype(dtype), page_size=ps, num_slices=4096, tpu_generation="v4")
        assert c.slices_per_processing_page == tpu_inference_slices_per_block(ps, heads, hd, dtype, 10 * MiB), c
    # 2 MiB pages: 9 MiB // 2 MiB = 4.
    c = jk.tpu_kernel_config((512, 32, 256), jnp.bfloat16, page_size=128, num_slices=4096, tpu_generation="v4")
    assert (c.slices_per_processing_page, c.vmem_limit_bytes) == (4, 10 * MiB)


# ------------------------------------------------------------------ an explicit value


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("spp", [1, 3, 8, 48, 64, 100, 128])
def test_an_explicit_slices_per_step_is_honoured_exactly(spp, generation):
    chip = TPU_CHIPS[generation]
    c = jk.tpu_kernel_config((64 * 16, 4, 128), jnp.bfloat16, page_size=16, num_slices=12,
                             slices_per_processing_page=spp, tpu_generation=generation)
    assert c.problem is None and c.slices_per_processing_page == spp  # even above the 12 slices passed, or 64
    assert c.page_bytes == hand_page_bytes(16, 4, 128, "bfloat16") == 16 * 1024
    assert c.staging_bytes == spp * c.page_bytes and c.staging_bytes + MiB <= c.vmem_limit_bytes <= chip.vmem_bytes


@pytest.mark.parametrize("generation", GENERATIONS)
def test_an_explicit_slices_per_step_too_large_for_the_chip_is_a_problem(generation):
    """The limit grows to hold an explicit value's buffers up to 7/8 of the chip's VMEM; one page more is refused."""
    page = hand_page_bytes(16, 4, 128, "bfloat16")
    largest = (TPU_CHIPS[generation].vmem_bytes * 7 // 8 - MiB) // page
    config = functools.partial(jk.tpu_kernel_config, (64 * 16, 4, 128), jnp.bfloat16, page_size=16, num_slices=12,
                               tpu_generation=generation)
    assert config(slices_per_processing_page=largest).problem is None
    too_many = config(slices_per_processing_page=largest + 1)
    assert too_many.slices_per_processing_page == largest + 1
    assert "slices_per_processing_page" in too_many.problem and str(largest + 1) in too_many.problem


def small_case():
    """A float32 combined cache [64, 2, 128] and one slice writing 8 rows."""
    cache = np.zeros((4 * 16, 2, 128), np.float32)
    tokens = np.arange(8 * 2 * 128, dtype=np.float32).reshape(8, 2, 128)
    return tokens, np.array([[5], [0], [8]], np.int32), cache, np.array([1], np.int32)


@pytest.mark.parametrize("bad", [{"slices_per_processing_page": 10**6}, {"vmem_limit_bytes": 1024 * MiB}],
                         ids=["slices_per_processing_page", "vmem_limit_bytes"])
def test_a_configuration_the_chip_cannot_hold_raises_in_the_interpreter_and_falls_back_on_tpu(bad):
    tokens, idx, cache, total = small_case()
    (name, value), = bad.items()
    config = jk.tpu_kernel_config(cache.shape, cache.dtype, page_size=16, num_slices=1, **bad)  # this host's default chip
    assert config.problem and str(value) in config.problem, config
    with pytest.raises(ValueError, match=name) as err:
        jk.kv_cache_update(tokens, idx, cache, total, page_size=16, interpret=True, **bad)
    assert str(value) in str(err.value)
    fn = jax.jit(functools.partial(jk.kv_cache_update, page_size=16, **bad), donate_argnums=2)
    low = inspect_tpu_lowering(lower_for_tpu(fn, tokens, idx, cache, total))
    assert lowering_problems(low, kernel=False, vmem_limit_bytes=None) == [], low  # the fallback, cache donated
    out = fn(tokens, idx, jnp.asarray(cache), total)  # and here (CPU) the fallback writes the rows
    np.testing.assert_array_equal(np.asarray(out), jk.kv_cache_update_reference(tokens, idx, cache, total))
    good = jax.jit(functools.partial(jk.kv_cache_update, page_size=16), donate_argnums=2)
    assert inspect_tpu_lowering(lower_for_tpu(good, tokens, idx, cache, total)).kernel_calls == 1


# ------------------------------------------------------------------ the TPU lowering carries the limit

LOWERING_CASES = [  # (layout, dtype, kv heads, head_dim)
    ("combined-flat", "float32", 2, 128),
    ("combined-paged", "bfloat16", 3, 256),
    ("packed", "float8_e4m3fn", 3, 80),
    ("packed-flat", "int8", 1, 128),
    ("packed_hd64", "bfloat16", 3, 64),
    ("kv", "float16", 2, 128),
]
LOWERING_PAGE_SIZE, LOWERING_SLICES = 16, 24


def lowering_case(layout, dtype, kv_heads, head_dim, **kwargs):
    """``(jitted update, args as ShapeDtypeStructs, cache argument indices, expected KernelConfig)``."""
    d = jnp.dtype(np_dtype(dtype))
    ps, num_tokens = LOWERING_PAGE_SIZE, 64
    idx, total = jax.ShapeDtypeStruct((3, LOWERING_SLICES), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
    config, _ = layout_config(layout, dtype, kv_heads, head_dim, page_size=ps, num_slices=LOWERING_SLICES, **kwargs)
    if layout == "kv":
        k = jax.ShapeDtypeStruct((num_tokens, kv_heads, head_dim), d)
        cache = jax.ShapeDtypeStruct((16 * ps, kv_heads, head_dim), d)
        fn = jax.jit(functools.partial(jk.kv_cache_update_kv, page_size=ps, **kwargs), donate_argnums=(3, 4))
        return fn, (k, k, idx, cache, cache, total), (3, 4), config
    base = "combined" if layout.startswith("combined") else layout.removesuffix("-flat")
    shape = jk.kv_cache_shape(16, ps, kv_heads, head_dim, d, layout=base)
    if layout.endswith("-flat"):
        shape = (shape[0] * shape[1], *shape[2:])
    row = jk.kv_cache_shape(16, ps, kv_heads, head_dim, d, layout=base)[2:]
    fn = jax.jit(functools.partial(jk.kv_cache_update, page_size=ps, **kwargs), donate_argnums=2)
    return fn, (jax.ShapeDtypeStruct((num_tokens, *row), d), idx, jax.ShapeDtypeStruct(shape, d), total), (2,), config


@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_the_tpu_lowering_carries_the_vmem_limit(case):
    fn, args, cache_args, config = lowering_case(*case)
    assert config.problem is None
    low = inspect_tpu_lowering(lower_for_tpu(fn, *args))
    assert lowering_problems(low, kernel=True, vmem_limit_bytes=config.vmem_limit_bytes, num_caches=len(cache_args),
                             cache_args=cache_args) == [], (low, config)


@pytest.mark.parametrize("kwargs", [{"vmem_limit_bytes": 12 * MiB}, {"slices_per_processing_page": 8},
                                    {"slices_per_processing_page": 3, "vmem_limit_bytes": 5 * MiB}],
                         ids=lambda k: "-".join(f"{n}={v}" for n, v in k.items()))
@pytest.mark.parametrize("case", [LOWERING_CASES[1], LOWERING_CASES[5]], ids=lambda c: f"{c[0]}-{c[1]}")
def test_the_tpu_lowering_carries_an_explicit_configuration(case, kwargs):
    fn, args, cache_args, config = lowering_case(*case, **kwargs)
    assert config.problem is None
    if "vmem_limit_bytes" in kwargs:
        assert config.vmem_limit_bytes == kwargs["vmem_limit_bytes"]  # honoured as given
    if "slices_per_processing_page" in kwargs:
        assert config.slices_per_processing_page == kwargs["slices_per_processing_page"]
    low = inspect_tpu_lowering(lower_for_tpu(fn, *args))
    assert lowering_problems(low, kernel=True, vmem_limit_bytes=config.vmem_limit_bytes, num_caches=len(cache_args),
                             cache_args=cache_args) == [], (low, config)
