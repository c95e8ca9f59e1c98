"""The update on every layout: packed rows, separate K and V caches, page shards.

Every implementation (the kernel in the TPU interpreter, scan, scatter, auto;
the torch op's impls on CPU and PyTorch/XLA) against the one reference.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_kernels as jk
import torch_ops
from jax_kernels.testing import TEST_DTYPES, bits, np_dtype, random_slices

PAGE_SIZE, NUM_PAGES, NUM_TOKENS, NUM_SLICES = 16, 4, 24, 8
KV_HEADS = (1, 2, 3, 8)
HEAD_DIMS = (64, 80, 128, 256)
# Each dtype with each head_dim, the head counts cycling so each meets every
# dtype; the full product runs with -m slow.
# (float32 with kvH 8 at head_dim 256, the largest row, takes 27 s to compile
# the scan on jax 0.7.1's XLA:CPU: it runs in the slow set; float32 packs 1,
# so its head counts pad nothing anyway.)
CONFIGS = [
    (dt, 2 if (dt, KV_HEADS[(i + j) % 4], hd) == ("float32", 8, 256) else KV_HEADS[(i + j) % 4], hd)
    for i, dt in enumerate(TEST_DTYPES)
    for j, hd in enumerate(HEAD_DIMS)
]
ALL_CONFIGS = [(dt, kvh, hd) for dt in TEST_DTYPES for kvh in KV_HEADS for hd in HEAD_DIMS]
JAX_IMPLS = {
    "auto": lambda *a, **k: jk.kv_cache_update(*a, **k),
    "scan": lambda *a, **k: jk.kv_cache_update_jax(*a, **k),
    "scatter": lambda *a, **k: jk.kv_cache_update_scatter(*a, **k),
    "interpret": lambda *a, **k: jk.kv_cache_update(*a, slices_per_processing_page=4, interpret=True, **k),
}
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8,
         "float8_e4m3fn": torch.float8_e4m3fn}
UINT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def packed_case(seed, dtype, kv_heads, head_dim, *, paged, layout="packed"):
    """``(tokens [T, H', pack, D'], slice_indices, cache, total, expected)``: rows
    from ``merge_kv`` (zero padding heads and lanes) into a NaN/min-filled cache."""
    rng = np.random.default_rng(seed)
    d = np_dtype(dtype)
    shape = jk.kv_cache_shape(NUM_PAGES, PAGE_SIZE, kv_heads, head_dim, d, layout=layout)
    if np.issubdtype(d, np.integer):
        k, v = (rng.integers(-100, 100, (NUM_TOKENS, kv_heads, head_dim)).astype(d) for _ in "kv")
        cache = np.full(shape, np.iinfo(d).min, d)
    else:
        k, v = (rng.uniform(-4, 4, (NUM_TOKENS, kv_heads, head_dim)).astype(d) for _ in "kv")
        cache = np.full(shape, np.nan, d)
    new = np.asarray(jk.merge_kv(jnp.asarray(k), jnp.asarray(v), layout=layout))
    if not paged:
        cache = cache.reshape(-1, *shape[2:])
    idx, total = random_slices(
        rng, num_rows=NUM_PAGES * PAGE_SIZE, num_tokens=NUM_TOKENS, page_size=PAGE_SIZE, num_slices=NUM_SLICES
    )
    return new, idx, cache, total, jk.kv_cache_update_reference(new, idx, cache, total)


def check_written_rows_hold_k_and_v(out, new, idx, total, kv_heads, head_dim, layout="packed"):
    """Independently of the reference: the written rows are the tokens' rows, padding heads and lanes zero."""
    rows = out.reshape(-1, *out.shape[-3:])
    cols = [idx[:, s] for s in range(int(total[0])) if idx[2, s] > 0]
    if not cols:
        return
    got = np.concatenate([rows[d : d + n] for d, _, n in cols])  # [W, H', pack, D']
    src = np.concatenate([new[s : s + n] for _, s, n in cols])
    np.testing.assert_array_equal(bits(got), bits(src))
    flat = got.reshape(len(got), -1, got.shape[-1])  # [W, padded heads, lanes]
    padding = np.ones(flat.shape[1:], bool)
    padding[: 2 * kv_heads if layout == "packed" else kv_heads, : head_dim if layout == "packed" else 128] = False
    assert not bits(flat[:, padding]).any(), "padding heads/lanes must stay zero"


def _jax_update(impl, config, paged, seed=0, layout="packed"):
    dtype, kv_heads, head_dim = config
    new, idx, cache, total, expected = packed_case(seed, dtype, kv_heads, head_dim, paged=paged, layout=layout)
    out = np.asarray(JAX_IMPLS[impl](new, idx, cache, total, page_size=PAGE_SIZE))
    assert out.shape == cache.shape and out.dtype == cache.dtype
    np.testing.assert_array_equal(bits(out), bits(expected))
    return out, new, idx, total


@pytest.mark.parametrize("impl", list(JAX_IMPLS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-kvh{c[1]}-d{c[2]}")
def test_jax_writes_packed_caches_bitwise(impl, config):
    paged = CONFIGS.index(config) % 2 == 0  # flat [R, H', pack, D'] and paged [P, ps, H', pack, D'] alternate
    out, new, idx, total = _jax_update(impl, config, paged)
    check_written_rows_hold_k_and_v(out, new, idx, total, config[1], config[2])


@pytest.mark.slow
@pytest.mark.parametrize("impl", list(JAX_IMPLS))
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: f"{c[0]}-kvh{c[1]}-d{c[2]}")
def test_jax_writes_packed_caches_bitwise_every_config(impl, config):
    for paged in (False, True):
        _jax_update(impl, config, paged)


@pytest.mark.parametrize("impl", ["auto", "interpret"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_jax_writes_head_dim_64_rows_of_tpu_inference(impl, dtype):
    out, new, idx, total = _jax_update(impl, (dtype, 3, 64), paged=True, layout="packed_hd64")
    check_written_rows_hold_k_and_v(out, new, idx, total, 3, 64, layout="packed_hd64")


def _tpu_lowering(fn, *args):
    specs = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in args]
    return fn.trace(*specs).lower(lowering_platforms=("tpu",)).as_text()


def _kernel_calls(text):
    return [line for line in text.splitlines() if "tpu_custom_call" in line]


def test_packed_bf16_head_dim_64_lowers_to_the_kernel_with_the_cache_aliased():
    shape = jk.kv_cache_shape(8, 16, 4, 64, jnp.bfloat16, layout="packed")  # (8, 16, 4, 2, 128)
    cache = jnp.zeros(shape, jnp.bfloat16)
    new = jnp.zeros((64, *shape[2:]), jnp.bfloat16)
    idx, total = jnp.zeros((3, 16), jnp.int32), jnp.zeros((1,), jnp.int32)
    text = _tpu_lowering(jax.jit(lambda *a: jk.kv_cache_update(*a, page_size=16), donate_argnums=2), new, idx, cache, total)
    calls = _kernel_calls(text)
    assert len(calls) == 1, "expected exactly one Pallas kernel in the TPU lowering"
    alias = re.search(r"output_operand_alias<output_tuple_indices = \[\], operand_index = (\d+)", calls[0])
    signature = re.search(r" : \((tensor<.*)\) -> (tensor<[^>]*>)", calls[0])
    operand_types = re.findall(r"tensor<[^>]*>", signature.group(1))
    # The kernel sees the cache's rows [P * page_size, H', pack, D'] (a bitcast of the donated cache).
    assert operand_types[int(alias.group(1))] == signature.group(2) == "tensor<128x4x2x128xbf16>"
    main = re.search(r"func.func public @main\((.*?)\) ->", text).group(1)
    assert re.search(r"%arg2: tensor<8x16x4x2x128xbf16> \{[^}]*tf.aliasing_output = 0", main), main


def test_kv_update_is_one_kernel_launch_aliasing_both_caches():
    k_cache = jnp.zeros((8, 16, 2, 128), jnp.bfloat16)
    key = jnp.zeros((64, 2, 128), jnp.bfloat16)
    idx, total = jnp.zeros((3, 16), jnp.int32), jnp.zeros((1,), jnp.int32)
    fn = jax.jit(lambda *a: jk.kv_cache_update_kv(*a, page_size=16), donate_argnums=(3, 4))
    text = _tpu_lowering(fn, key, key, idx, k_cache, k_cache, total)
    calls = _kernel_calls(text)
    assert len(calls) == 1, "K and V must be written by one kernel launch"
    aliases = re.findall(r"output_operand_alias<output_tuple_indices = \[(\d)\], operand_index = (\d+)", calls[0])
    assert sorted(aliases) == [("0", "5"), ("1", "6")], aliases  # (num_valid, idx, key, value, k_rows, v_rows)
    assert len(re.findall(r"tf.aliasing_output = [01]", text)) == 2


KV_JAX_IMPLS = {
    "auto": lambda *a: jk.kv_cache_update_kv(*a, page_size=PAGE_SIZE),
    "interpret": lambda *a: jk.kv_cache_update_kv(*a, page_size=PAGE_SIZE, slices_per_processing_page=4, interpret=True),
}


def kv_case(seed, dtype, *, paged, head_dims=(128, 128)):
    rng = np.random.default_rng(seed)
    d = np_dtype(dtype)
    key, value = (rng.uniform(-4, 4, (NUM_TOKENS, 2, hd)).astype(d) for hd in head_dims)
    caches = [np.full((NUM_PAGES * PAGE_SIZE, 2, hd), np.nan, d) for hd in head_dims]
    if paged:
        caches = [c.reshape(NUM_PAGES, PAGE_SIZE, *c.shape[1:]) for c in caches]
    idx, total = random_slices(
        rng, num_rows=NUM_PAGES * PAGE_SIZE, num_tokens=NUM_TOKENS, page_size=PAGE_SIZE, num_slices=NUM_SLICES,
        num_valid=6,
    )
    want = [jk.kv_cache_update_reference(t, idx, c, total) for t, c in zip((key, value), caches)]
    return key, value, idx, caches, total, want


@pytest.mark.parametrize("impl", list(KV_JAX_IMPLS))
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
def test_jax_kv_update_writes_both_caches(impl, paged, dtype):
    key, value, idx, (k_cache, v_cache), total, want = kv_case(1, dtype, paged=paged)
    k_out, v_out = KV_JAX_IMPLS[impl](key, value, idx, k_cache, v_cache, total)
    np.testing.assert_array_equal(bits(np.asarray(k_out)), bits(want[0]))
    np.testing.assert_array_equal(bits(np.asarray(v_out)), bits(want[1]))


def test_jax_kv_update_takes_k_and_v_of_different_widths_and_checks_they_agree():
    key, value, idx, (k_cache, v_cache), total, want = kv_case(2, "bfloat16", paged=False, head_dims=(128, 64))
    k_out, v_out = jk.kv_cache_update_kv(key, value, idx, k_cache, v_cache, total, page_size=PAGE_SIZE)
    np.testing.assert_array_equal(bits(np.asarray(k_out)), bits(want[0]))
    np.testing.assert_array_equal(bits(np.asarray(v_out)), bits(want[1]))
    with pytest.raises(ValueError, match="value has 23 tokens but key has 24"):
        jk.kv_cache_update_kv(key, value[:-1], idx, k_cache, v_cache, total, page_size=PAGE_SIZE)
    with pytest.raises(ValueError, match="v_cache has 48 rows but k_cache has 64"):
        jk.kv_cache_update_kv(key, value, idx, k_cache, v_cache[:48], total, page_size=PAGE_SIZE)
    with pytest.raises(ValueError, match=r"value rows \(2, 64\) do not match v_cache rows \(2, 128\)"):
        jk.kv_cache_update_kv(key, value, idx, k_cache, k_cache, total, page_size=PAGE_SIZE)
    bad = idx.copy()
    bad[0, 0] = 10**6
    with pytest.raises(ValueError, match=r"slice_indices\[:, 0\].*outside k_cache"):
        jk.kv_cache_update_kv(key, value, bad, k_cache, v_cache, total, page_size=PAGE_SIZE)


# ------------------------------------------------------------------ page shards


@pytest.mark.parametrize("impl", ["auto", "scan", "scatter", "interpret"])
def test_page_shard_index_writes_only_the_shards_rows(impl):
    rng = np.random.default_rng(5)
    shards, local_pages = 4, 2
    rows = shards * local_pages * PAGE_SIZE
    whole = np.full((rows, 2, 128), np.nan, np.float32)
    new = rng.uniform(-4, 4, (40, 2, 128)).astype(np.float32)
    # Slices in every shard, one crossing from shard 0 into shard 1 (rows 29..34), padding garbage.
    idx = np.array([[3, 29, 40, 70, 100, 127, -5, 10**6], [0, 5, 11, 27, 0, 39, -1, 7], [5, 6, 16, 10, 4, 1, 99, -2]], np.int32)
    total = np.array([6], np.int32)
    want = jk.kv_cache_update_reference(new, idx, whole, total).reshape(shards, -1, 2, 128)
    for shard in range(shards):
        local = whole.reshape(shards, -1, 2, 128)[shard]
        out = JAX_IMPLS[impl](new, idx, local, total, page_size=PAGE_SIZE, page_shard_index=shard)
        np.testing.assert_array_equal(bits(np.asarray(out)), bits(want[shard]), err_msg=f"shard {shard}")


def test_page_shard_index_traced_and_checked():
    local = jnp.zeros((2 * PAGE_SIZE, 2, 128))
    new = jnp.ones((4, 2, 128))
    idx, total = np.array([[2 * PAGE_SIZE + 1], [0], [4]], np.int32), np.array([1], np.int32)
    step = jax.jit(lambda s, c: jk.kv_cache_update(new, idx, c, total, page_size=PAGE_SIZE, page_shard_index=s))
    assert not np.asarray(step(jnp.int32(0), local)).any()
    np.testing.assert_array_equal(np.asarray(step(jnp.int32(1), local))[1:5], 1.0)
    with pytest.raises(ValueError, match="page_shard_index=-1 is out of range"):
        jk.kv_cache_update(new, idx, local, total, page_size=PAGE_SIZE, page_shard_index=-1)
    with pytest.raises(TypeError, match="page_shard_index=1.5 must be one integer"):
        jk.kv_cache_update(new, idx, local, total, page_size=PAGE_SIZE, page_shard_index=1.5)
    bad = idx.copy()
    bad[0, 0] = -3  # a negative global row is still an error, whatever the shard
    with pytest.raises(ValueError, match=r"slice_indices\[:, 0\].*negative"):
        jk.kv_cache_update(new, bad, local, total, page_size=PAGE_SIZE, page_shard_index=0)


# ------------------------------------------------------------------ torch op


def to_torch(a: np.ndarray, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    return torch.from_numpy(bits(a).copy()).view(dtype).to(device)


def torch_bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(UINT[t.element_size()]).numpy().view(f"u{t.element_size()}")


TORCH_IMPLS = [i for i in torch_ops.IMPLS if i != "pallas"]
TORCH_CONFIGS = [("bfloat16", 3, 64), ("float8_e4m3fn", 1, 80), ("float32", 2, 128), ("int8", 8, 256), ("float16", 3, 80)]


def _torch_packed(impl, config, device, paged):
    dtype, kv_heads, head_dim = config
    new, idx, cache_np, total, expected = packed_case(3, dtype, kv_heads, head_dim, paged=paged)
    cache = to_torch(cache_np, TORCH[dtype], device)
    ptr = cache.data_ptr() if device == "cpu" else None
    torch_ops.kv_cache_update(
        to_torch(new, TORCH[dtype], device), torch.from_numpy(idx).to(device), cache,
        torch.from_numpy(total).to(device), page_size=PAGE_SIZE, impl=impl,
    )
    return cache, ptr, expected


@pytest.mark.parametrize("impl", TORCH_IMPLS)
@pytest.mark.parametrize("config", TORCH_CONFIGS, ids=lambda c: f"{c[0]}-kvh{c[1]}-d{c[2]}")
def test_torch_op_writes_packed_caches_in_place(impl, config):
    paged = TORCH_CONFIGS.index(config) % 2 == 0
    cache, ptr, expected = _torch_packed(impl, config, "cpu", paged)
    assert cache.data_ptr() == ptr and tuple(cache.shape) == expected.shape
    np.testing.assert_array_equal(torch_bits(cache), bits(expected))


@pytest.mark.parametrize("impl", [i for i in TORCH_IMPLS if i != "torch"])
@pytest.mark.parametrize("config", TORCH_CONFIGS[:3], ids=lambda c: f"{c[0]}-kvh{c[1]}-d{c[2]}")
def test_xla_op_writes_packed_caches(impl, config, xla_device):
    import torch_xla

    cache, _, expected = _torch_packed(impl, config, xla_device, paged=True)
    torch_xla.sync()
    np.testing.assert_array_equal(torch_bits(cache), bits(expected))


def _torch_kv(impl, dtype, device, paged, functional=False):
    key, value, idx, caches, total, want = kv_case(4, dtype, paged=paged)
    t = TORCH[dtype]
    k_cache, v_cache = (to_torch(c, t, device) for c in caches)
    args = (to_torch(key, t, device), to_torch(value, t, device), torch.from_numpy(idx).to(device),
            k_cache, v_cache, torch.from_numpy(total).to(device))
    if functional:
        k_cache, v_cache = torch_ops.kv_cache_update_kv_functional(*args, page_size=PAGE_SIZE, impl=impl)
        np.testing.assert_array_equal(torch_bits(args[3]), bits(caches[0]))  # inputs untouched
    else:
        torch_ops.kv_cache_update_kv(*args, page_size=PAGE_SIZE, impl=impl)
    return k_cache, v_cache, want


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("impl", TORCH_IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_kv_op_updates_both_caches(dtype, impl, functional):
    k_cache, v_cache, want = _torch_kv(impl, dtype, "cpu", paged=impl in ("torch", "scan"), functional=functional)
    np.testing.assert_array_equal(torch_bits(k_cache), bits(want[0]))
    np.testing.assert_array_equal(torch_bits(v_cache), bits(want[1]))


@pytest.mark.parametrize("impl", ["auto", "jax", "pallas_interpret"])
def test_xla_kv_op_updates_both_caches(impl, xla_device):
    import torch_xla

    k_cache, v_cache, want = _torch_kv(impl, "bfloat16", xla_device, paged=True)
    torch_xla.sync()
    np.testing.assert_array_equal(torch_bits(k_cache), bits(want[0]))
    np.testing.assert_array_equal(torch_bits(v_cache), bits(want[1]))


def test_torch_kv_op_names_its_arguments_and_keeps_the_caches():
    key, value, idx, caches, total, _ = kv_case(6, "float32", paged=False)
    k_cache, v_cache = (torch.from_numpy(c.copy()) for c in caches)
    bad = idx.copy()
    bad[1, 2] = NUM_TOKENS + 5
    args = [torch.from_numpy(key), torch.from_numpy(value), torch.from_numpy(bad), k_cache, v_cache, torch.from_numpy(total)]
    with pytest.raises(ValueError, match=r"slice_indices\[:, 2\].*outside key"):
        torch_ops.kv_cache_update_kv(*args, page_size=PAGE_SIZE)
    args[2] = torch.from_numpy(idx)
    args[4] = v_cache[:, :1]
    with pytest.raises(ValueError, match=r"value rows \(2, 128\) do not match v_cache rows \(1, 128\)"):
        torch_ops.kv_cache_update_kv(*args, page_size=PAGE_SIZE)
    args[4] = v_cache
    args[1] = args[1].requires_grad_()
    with pytest.raises(ValueError, match="kv_cache_update_kv is not differentiable, but value requires grad"):
        torch_ops.kv_cache_update_kv(*args, page_size=PAGE_SIZE)
    np.testing.assert_array_equal(k_cache.numpy().view(np.uint32), caches[0].view(np.uint32))
    np.testing.assert_array_equal(v_cache.numpy().view(np.uint32), caches[1].view(np.uint32))


def test_torch_op_errors_name_kv_cache_not_the_jax_argument():
    cache = torch.zeros(4 * PAGE_SIZE, 2, 128)
    idx = torch.tensor([[60], [0], [8]], dtype=torch.int32)
    with pytest.raises(ValueError) as err:
        torch_ops.kv_cache_update(torch.ones(8, 2, 128), idx, cache, torch.tensor([1], dtype=torch.int32), page_size=PAGE_SIZE)
    assert "outside kv_cache (64 rows)" in str(err.value) and "kv_cache_pages" not in str(err.value)
    with pytest.raises(ValueError) as err:
        torch_ops.kv_cache_update(torch.ones(8, 3, 128), idx, cache, torch.tensor([1], dtype=torch.int32), page_size=PAGE_SIZE)
    assert "do not match kv_cache rows" in str(err.value) and "kv_cache_pages" not in str(err.value)


def test_torch_kv_ops_under_opcheck():
    key, value, idx, caches, total, _ = kv_case(7, "float32", paged=True)
    # A finite fill: opcheck compares outputs with assert_close, where NaN != NaN.
    args = (torch.from_numpy(key), torch.from_numpy(value), torch.from_numpy(idx), *(torch.zeros(c.shape) for c in caches),
            torch.from_numpy(total), PAGE_SIZE, 8, "auto")
    for op in (torch.ops.paged_kv.kv_cache_update_kv.default, torch.ops.paged_kv.kv_cache_update_kv_functional.default):
        torch.library.opcheck(op, args)
