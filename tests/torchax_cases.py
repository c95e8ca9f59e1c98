"""torch.ops.paged_kv on torchax tensors (torch code on JAX arrays): every impl
against the reference, in place, the jit pattern, validation, lazy registration.

Run by ``tests/test_torchax.py`` in a process of its own: ``import torchax``
renames PyTorch's PrivateUse1 backend to "jax" for the whole process, after
which torch.compile and opcheck fail elsewhere in the suite (torchax's device
module lacks what they ask of it). To run these directly:
``python -m pytest tests/torchax_cases.py``. Skipped where torchax is not
installed; runs with torchax 0.0.7 (``xla`` environment) and the newest
torchax (``torchax``).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

torchax = pytest.importorskip("torchax", reason="torchax is not installed in this environment")

import jax  # noqa: E402
import jax.export  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torchax.interop  # noqa: E402
from torchax.tensor import Tensor  # noqa: E402

import jax_kernels as jk  # noqa: E402
import torch_ops  # noqa: E402
from bad_inputs import BAD_INPUTS, valid_call  # noqa: E402
from jax_kernels.testing import bits, np_dtype, random_slices, random_tokens, sentinel_cache  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADS, HEAD_DIM, PAGE_SIZE = 2, 128, 16
NUM_PAGES, NUM_TOKENS, NUM_SLICES = 8, 40, 8
RUNNABLE_IMPLS = [i for i in torch_ops.IMPLS if i != "pallas"]  # "pallas" needs a TPU
LAYOUTS = {  # cache shape for NUM_PAGES pages of [HEADS, HEAD_DIM] rows; tokens' row shape
    "flat": ((NUM_PAGES * PAGE_SIZE, HEADS, HEAD_DIM), (HEADS, HEAD_DIM)),
    "paged": ((NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM), (HEADS, HEAD_DIM)),
    "packed": ((NUM_PAGES, PAGE_SIZE, HEADS // 2, 2, HEAD_DIM), (HEADS // 2, 2, HEAD_DIM)),  # bfloat16: pack 2
}


@pytest.fixture(scope="module")
def env():
    return torchax.default_env()


def tx(a, env) -> Tensor:
    """A torchax tensor holding exactly ``a``'s bits."""
    return Tensor(jnp.asarray(a), env)


def case(seed, dtype_name, layout="flat", num_valid=None):
    """``(new [T, *row], idx i32[3, S], cache (layout's shape), total i32[1], expected)`` as numpy."""
    rng = np.random.default_rng(seed)
    cache = sentinel_cache(NUM_PAGES * PAGE_SIZE, HEADS, HEAD_DIM, dtype_name)  # [R, H, D]
    new = random_tokens(rng, NUM_TOKENS, HEADS, HEAD_DIM, dtype_name)  # [T, H, D]
    idx, total = random_slices(
        rng, num_rows=cache.shape[0], num_tokens=NUM_TOKENS, page_size=PAGE_SIZE, num_slices=NUM_SLICES,
        num_valid=num_valid,
    )
    expected = jk.kv_cache_update_reference(new, idx, cache, total)  # [R, H, D]
    cache_shape, row = LAYOUTS[layout]
    return new.reshape(-1, *row), idx, cache.reshape(cache_shape), total, expected.reshape(cache_shape)


def call(op, env, new, idx, cache, total, impl="auto"):
    """``op`` on torchax tensors made from numpy ``new``/``idx``/``total`` and the torchax ``cache``."""
    with env:
        return op(tx(new, env), tx(idx, env), cache, tx(total, env), PAGE_SIZE, 8, impl)


# --------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    "dtype_name, layout",
    [("float32", "flat"), ("float32", "paged"), ("bfloat16", "paged"), ("bfloat16", "packed"), ("float8_e4m3fn", "flat")],
)
@pytest.mark.parametrize("impl", RUNNABLE_IMPLS)
def test_matches_reference(impl, dtype_name, layout, env):
    new, idx, cache_np, total, expected = case(0, dtype_name, layout)
    cache = tx(cache_np, env)
    assert call(torch.ops.paged_kv.kv_cache_update, env, new, idx, cache, total, impl) is None
    assert isinstance(cache, Tensor) and tuple(cache.shape) == cache_np.shape
    np.testing.assert_array_equal(bits(cache.jax()), bits(expected))


@pytest.mark.parametrize("cache_dtype", ["float8_e4m3fn", "int8"])
@pytest.mark.parametrize("impl", RUNNABLE_IMPLS)
def test_quantized_writes_match_the_reference(impl, cache_dtype, env):
    """bfloat16 rows into a float8/int8 cache, quantized on write (even heads by k_scale, odd by v_scale)."""
    new, idx, cache_np, total, _ = case(13, "bfloat16", "paged")
    cache_np = np.zeros(cache_np.shape, np_dtype(cache_dtype))
    expected = jk.kv_cache_update_reference(new, idx, cache_np, total, k_scale=2.0, v_scale=0.0371)
    cache = tx(cache_np, env)
    with env:
        torch_ops.kv_cache_update(
            tx(new, env), tx(idx, env), cache, tx(total, env), page_size=PAGE_SIZE, impl=impl, k_scale=2.0,
            v_scale=0.0371,
        )
        with pytest.raises(ValueError, match=r"k_scale=0.0 must be a positive, finite"):
            torch_ops.kv_cache_update(
                tx(new, env), tx(idx, env), cache, tx(total, env), page_size=PAGE_SIZE, impl=impl, k_scale=0.0,
                v_scale=0.0371,
            )
    np.testing.assert_array_equal(bits(cache.jax()), bits(expected))


@pytest.mark.parametrize("impl", ["auto", "jax", "pallas_interpret"])
def test_functional_op_leaves_its_input_untouched(impl, env):
    new, idx, cache_np, total, expected = case(1, "bfloat16", "paged")
    cache = tx(cache_np, env)
    before = cache.jax()
    out = call(torch.ops.paged_kv.kv_cache_update_functional, env, new, idx, cache, total, impl)
    assert isinstance(out, Tensor) and out.jax() is not before
    np.testing.assert_array_equal(bits(out.jax()), bits(expected))
    assert cache.jax() is before and not before.is_deleted()
    np.testing.assert_array_equal(bits(before), bits(cache_np))


def test_kv_op_updates_both_caches(env):
    """``kv_cache_update_kv``: separate K and V caches, the same slices, both mutated."""
    key, idx, k_np, total, k_want = case(2, "float32", "paged")
    value = np.ascontiguousarray(key[..., ::-1])  # other values, same shapes
    v_np = k_np.copy()
    v_want = jk.kv_cache_update_reference(value, idx, v_np, total)
    k_cache, v_cache = tx(k_np, env), tx(v_np, env)
    with env:
        args = (tx(key, env), tx(value, env), tx(idx, env))
        torch_ops.kv_cache_update_kv(*args, k_cache, v_cache, tx(total, env), page_size=PAGE_SIZE)
        k_out, v_out = torch_ops.kv_cache_update_kv_functional(
            *args, tx(k_np, env), tx(v_np, env), tx(total, env), page_size=PAGE_SIZE, impl="jax"
        )
    for got, want in ((k_cache, k_want), (v_cache, v_want), (k_out, k_want), (v_out, v_want)):
        np.testing.assert_array_equal(bits(got.jax()), bits(want))


def test_python_entry_point_and_keyword_arguments(env):
    new, idx, cache_np, total, expected = case(3, "float32")
    cache, cache2 = tx(cache_np, env), tx(cache_np, env)
    with env:
        torch_ops.kv_cache_update(tx(new, env), tx(idx, env), cache, tx(total, env), page_size=PAGE_SIZE, impl="scan")
        torch.ops.paged_kv.kv_cache_update(
            tx(new, env), tx(idx, env), cache2, tx(total, env), impl="jax", page_size=PAGE_SIZE
        )
    np.testing.assert_array_equal(bits(cache.jax()), bits(expected))
    np.testing.assert_array_equal(bits(cache2.jax()), bits(expected))


# ------------------------------------------------------------------ in place


def _pointer(t) -> int:
    return t.jax().unsafe_buffer_pointer()


@pytest.mark.parametrize("impl", ["auto", "scan"])
def test_eager_update_reuses_the_buffer_when_nothing_else_holds_it(impl, env):
    new, idx, cache_np, total, _ = case(4, "bfloat16", "paged", num_valid=4)
    cache = tx(cache_np, env)
    # The first call may write a new buffer (JAX can alias numpy memory on CPU,
    # which it never donates); from then on the cache owns an XLA buffer.
    call(torch.ops.paged_kv.kv_cache_update, env, new, idx, cache, total, impl)
    want = jk.kv_cache_update_reference(new, idx, cache_np, total)
    new2 = new[::-1].copy()
    for _ in range(2):
        ptr = _pointer(cache)
        call(torch.ops.paged_kv.kv_cache_update, env, new2, idx, cache, total, impl)
        assert _pointer(cache) == ptr  # donated: updated in its own buffer, O(update)
        want = jk.kv_cache_update_reference(new2, idx, want, total)
        np.testing.assert_array_equal(bits(cache.jax()), bits(want))


def test_clones_held_arrays_and_views_survive_the_update(env):
    """torchax's clone and detach share the array object; an update must not
    donate it then. Views (indexing) taken before the update see it."""
    new, idx, cache_np, total, expected = case(5, "float32", num_valid=5)
    cache = tx(cache_np, env)
    call(torch.ops.paged_kv.kv_cache_update, env, new, idx, cache, total)  # own an XLA buffer
    state = cache.jax()
    with env:
        clone, detached, view = cache.clone(), cache.detach(), cache[PAGE_SIZE:]
    assert clone.jax() is state and detached.jax() is state
    held = cache.jax()  # a user's reference to the array
    new2 = new[::-1].copy()
    call(torch.ops.paged_kv.kv_cache_update, env, new2, idx, cache, total)
    want = jk.kv_cache_update_reference(new2, idx, expected, total)
    np.testing.assert_array_equal(bits(cache.jax()), bits(want))
    for old in (clone.jax(), detached.jax(), held):
        assert not old.is_deleted()
        np.testing.assert_array_equal(bits(old), bits(expected))  # the state before this update
    np.testing.assert_array_equal(bits(view.jax()), bits(want[PAGE_SIZE:]))
    # With the clones gone the cache owns its array alone again: in place.
    del clone, detached, held, state
    ptr = _pointer(cache)
    call(torch.ops.paged_kv.kv_cache_update, env, new, idx, cache, total)
    assert _pointer(cache) == ptr


def test_a_view_passed_as_the_cache_writes_through_to_its_source(env):
    new, idx, cache_np, total, expected = case(6, "float32")
    base = tx(np.concatenate([cache_np, cache_np[:PAGE_SIZE]]), env)  # one extra page at the end
    with env:
        view = base[: NUM_PAGES * PAGE_SIZE]
        call(torch.ops.paged_kv.kv_cache_update, env, new, idx, view, total)
    np.testing.assert_array_equal(bits(base.jax()[: NUM_PAGES * PAGE_SIZE]), bits(expected))
    np.testing.assert_array_equal(bits(base.jax()[NUM_PAGES * PAGE_SIZE :]), bits(cache_np[:PAGE_SIZE]))


def test_eager_donation_can_be_switched_off(env):
    new, idx, cache_np, total, expected = case(7, "float32", num_valid=3)
    cache = tx(cache_np, env)
    call(torch.ops.paged_kv.kv_cache_update, env, new, idx, cache, total)
    try:
        torch_ops.enable_torchax(eager_donation=False)
        old = cache.jax()
        ptr = old.unsafe_buffer_pointer()
        del old
        call(torch.ops.paged_kv.kv_cache_update, env, new, idx, cache, total)
        assert _pointer(cache) != ptr  # a new buffer: nothing is ever donated
    finally:
        torch_ops.enable_torchax(eager_donation=True)
    np.testing.assert_array_equal(bits(cache.jax()), bits(expected))
    torch_ops.enable_torchax(eager_donation=False)
    torch_ops.enable_torchax(env)  # None: the setting stays
    try:
        old = cache.jax()
        ptr = old.unsafe_buffer_pointer()
        del old
        call(torch.ops.paged_kv.kv_cache_update, env, new, idx, cache, total)
        assert _pointer(cache) != ptr
    finally:
        torch_ops.enable_torchax(eager_donation=True)
    with pytest.raises(TypeError, match="eager_donation=1 must be a bool or None"):
        torch_ops.enable_torchax(eager_donation=1)


# ---------------------------------------------------------------- jit pattern


def _step(new, idx, cache, total):
    """A model step's update: the op mutates ``cache``, which is returned so
    the jitted function's output carries the mutation."""
    torch.ops.paged_kv.kv_cache_update(new, idx, cache, total, PAGE_SIZE, 8, "auto")
    return cache


def test_jax_jit_with_the_cache_donated_and_returned_updates_in_place(env):
    new, idx, cache_np, total, _ = case(8, "bfloat16", "paged", num_valid=6)
    step = torchax.interop.jax_jit(_step, kwargs_for_jax_jit={"donate_argnums": (2,)})
    cache = tx(cache_np, env)
    args = (tx(new, env), tx(idx, env))
    want = cache_np
    for i in range(3):
        before = cache.jax()
        ptr = before.unsafe_buffer_pointer()
        cache = step(*args, cache, tx(total, env))
        want = jk.kv_cache_update_reference(new, idx, want, total)
        np.testing.assert_array_equal(bits(cache.jax()), bits(want))
        assert before.is_deleted()  # donated: the input tensor must not be used again
        if i:  # the first input may alias numpy memory, which XLA never reuses
            assert _pointer(cache) == ptr
    # The lowered module donates the cache and aliases it to the output.
    lowered = jax.jit(torchax.interop.jax_view(_step), donate_argnums=(2,)).lower(
        *(a.jax() for a in (*args, cache, tx(total, env)))
    )
    text = lowered.as_text()
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    cache_arg = re.search(r"%arg2: tensor<[^>]*>( \{[^}]*\})?", main).group(0)
    assert "tf.aliasing_output = 0" in cache_arg or "jax.buffer_donor = true" in cache_arg, main


@pytest.mark.parametrize("impl", ["auto", "pallas"])
def test_the_jitted_step_lowered_for_tpu_runs_the_pallas_kernel_in_place(impl, env):
    """``impl="auto"`` follows the platform lowered for: exported for TPU from
    this CPU host, the step holds the Pallas kernel, the cache aliased."""
    new, idx, cache_np, total, _ = case(12, "bfloat16", "paged")

    def step(new, idx, cache, total):
        torch.ops.paged_kv.kv_cache_update(new, idx, cache, total, PAGE_SIZE, 8, impl)
        return cache

    specs = [jax.ShapeDtypeStruct(a.shape, jnp.asarray(a).dtype) for a in (new, idx, cache_np, total)]
    fn = jax.jit(torchax.interop.jax_view(step), donate_argnums=(2,))
    text = jax.export.export(fn, platforms=["tpu"])(*specs).mlir_module()
    assert "tpu_custom_call" in text
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    assert re.search(r"%arg2: tensor<[^>]*> \{[^}]*tf.aliasing_output = 0", main), main


def test_jax_jit_without_donation_keeps_the_input(env):
    new, idx, cache_np, total, expected = case(9, "float32")
    step = torchax.interop.jax_jit(_step)
    cache = tx(cache_np, env)
    out = step(tx(new, env), tx(idx, env), cache, tx(total, env))
    np.testing.assert_array_equal(bits(out.jax()), bits(expected))
    np.testing.assert_array_equal(bits(cache.jax()), bits(cache_np))  # the caller's tensor is the old state


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda b: b.name)
def test_bad_inputs_raise_naming_the_argument_and_keep_the_cache(bad, env):
    c = valid_call()
    bad.mutate(c)
    cache = tx(c["kv_cache"], env)
    before = cache.jax()
    with env, pytest.raises(bad.error, match=bad.match):
        torch.ops.paged_kv.kv_cache_update(
            tx(c["new_kv_tokens"], env), tx(c["slice_indices"], env), cache, tx(c["total_update_slices"], env),
            c["page_size"], 8, "auto",
        )
    assert cache.jax() is before and not before.is_deleted()


def test_op_specific_errors(env):
    new, idx, cache_np, total, _ = case(10, "float32")
    cache = tx(cache_np, env)
    before = cache.jax()
    op = torch.ops.paged_kv.kv_cache_update
    with env:
        with pytest.raises(ValueError, match="impl='fast' is not one of"):
            op(tx(new, env), tx(idx, env), cache, tx(total, env), PAGE_SIZE, 8, "fast")
        with pytest.raises(ValueError, match="impl='pallas' needs a TPU, got torchax tensors on cpu"):  # eager only
            op(tx(new, env), tx(idx, env), cache, tx(total, env), PAGE_SIZE, 8, "pallas")
        with pytest.raises(ValueError, match="all tensors must be on one device.*slice_indices on cpu"):
            op(tx(new, env), torch.from_numpy(idx), cache, tx(total, env), PAGE_SIZE, 8, "auto")
        with pytest.raises(TypeError, match="kv_cache must be a torch.Tensor, got ArrayImpl"):
            op(tx(new, env), tx(idx, env), cache.jax(), tx(total, env), PAGE_SIZE, 8, "auto")
        with pytest.raises(TypeError, match="unexpected keyword argument 'page'"):
            op(tx(new, env), tx(idx, env), cache, tx(total, env), page=PAGE_SIZE)
        grad_tokens = tx(new, env).requires_grad_()
        with pytest.raises(ValueError, match="kv_cache_update is not differentiable, but new_kv_tokens requires grad"):
            op(grad_tokens, tx(idx, env), cache, tx(total, env), PAGE_SIZE, 8, "auto")
    assert cache.jax() is before and not before.is_deleted()


def test_slice_data_is_checked_on_host_metadata_only_outside_jit(env):
    new, idx, cache_np, total, _ = case(11, "float32", num_valid=2)
    bad = idx.copy()
    bad[0, 0] = NUM_PAGES * PAGE_SIZE  # out of range
    cache = tx(cache_np, env)
    with env, pytest.raises(ValueError, match=r"slice_indices\[:, 0\].*outside kv_cache"):
        torch.ops.paged_kv.kv_cache_update(tx(new, env), tx(bad, env), cache, tx(total, env), PAGE_SIZE, 8, "auto")
    with torch_ops.validation("never"):  # skipped: the scatter drops the out-of-range slice
        call(torch.ops.paged_kv.kv_cache_update, env, new, bad, cache, total, "jax")
    # Inside jax_jit the metadata are tracers: nothing can be checked (or raised).
    step = torchax.interop.jax_jit(_step)
    step(tx(new, env), tx(bad, env), tx(cache_np, env), tx(total, env))


# --------------------------------------------------------------- registration


def _run(code: str) -> str:
    """``_USE`` then ``code`` in a fresh interpreter; its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    script = textwrap.dedent(_USE) + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


_USE = """
    import numpy as np, torch
    def use(env):
        with env:
            c = torch.zeros(32, 2, 128, device="jax")
            torch.ops.paged_kv.kv_cache_update(torch.ones(4, 2, 128, device="jax"),
                torch.tensor([[0], [0], [4]], dtype=torch.int32, device="jax"), c,
                torch.tensor([1], dtype=torch.int32, device="jax"), 16, 8, "auto")
            return float(np.asarray(c.jax()).sum())
"""


def test_registration_is_lazy_and_follows_import_torchax():
    out = _run("""
        import sys
        import torch_ops
        assert "torchax" not in sys.modules, "import torch_ops imported torchax"
        import torchax, torchax.tensor
        own = torchax.tensor.Environment()  # made after the registration: has the ops
        print(use(torchax.default_env()), use(own))
    """)
    assert out.split() == ["1024.0", "1024.0"]


def test_registration_when_torchax_came_first():
    out = _run("""
        import torchax, torchax.tensor
        early = torchax.tensor.Environment()  # made before torch_ops registered: needs enable_torchax
        torchax.default_env()
        import torch_ops
        print(use(torchax.default_env()))
        try:
            use(early)
        except Exception as e:
            print("early env:", type(e).__name__)
        assert torch_ops.enable_torchax(early) is early
        print(use(early))
    """)
    lines = out.strip().splitlines()
    assert lines[0] == "1024.0" and lines[1].startswith("early env:") and lines[2] == "1024.0", out


def test_benchmark_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_torchax.py"), "--quick", "--out", str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "bench_torchax.md").read_text()
    for path in ("eager, donating", "eager, copying", "jax_jit, donated", "jax_jit, not donated", "JAX, donated"):
        assert path in table, table
    assert "bitwise check: all paths equal the reference" in table
