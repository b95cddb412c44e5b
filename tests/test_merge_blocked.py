"""The blocked merge (``jlora._adapter.blocked_add_product``): large 2-D weights on CPU
are merged row block by row block or, for bfloat16 up to rank ``_OUTER_MAX_RANK``, in
one elementwise pass of rank-1 outer products; bfloat16 is rounded by its bits. It
must give the values of the one-shot ``W + s·A·B`` (summed in float32, rounded once),
whatever the layout and the remainder rows, and a donated merge must hold no
weight-sized temporary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._adapter import _BLOCKED_MIN, _OUTER_MAX_RANK, _f32_to_bf16_bits, blocked_add_product

ROWS, COLS = 2100, 1030  # > _BLOCKED_MIN elements; the rows are not a multiple of a block


# A rank on each side of _OUTER_MAX_RANK: bfloat16 takes the outer-product pass at the
# first and row blocks at the second; float32 takes row blocks at both.
RANKS = [pytest.param(4, id="low-rank"), pytest.param(_OUTER_MAX_RANK + 4, id="high-rank")]


def _adapters(params, fn=None, args=(), rank=4):
    spec = jlora.LoraSpec(rank=rank, alpha=2.0 * rank, targets="w")
    adapters = jlora.init(spec, params, jax.random.key(0), fn=fn, args=args)
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), adapters)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["in-out", "out-in"])
def test_blocked_merge_equals_the_float64_sum_rounded_once(dtype, transposed, rank):
    assert ROWS * COLS >= _BLOCKED_MIN
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(ROWS, COLS)), dtype)
    params = {"w": w}
    if transposed:  # stored (out, in), used as x @ w.T: the layout comes from the model
        fn, args = (lambda p, x: x @ p["w"].T), (jnp.ones((1, COLS), dtype),)
    else:
        fn, args = None, ()
    adapters = _adapters(params, fn, args, rank)
    node = adapters["w"]
    assert node.rank == rank
    assert node.layout.in_axes == ((1,) if transposed else (0,))
    a64 = np.asarray(node.lora_a, np.float64)
    b64 = np.asarray(node.lora_b, np.float64)
    delta = node.scale * (a64 @ b64)
    want = np.asarray(w, np.float64) + (delta.T if transposed else delta)
    for merged in (jlora.merge(params, adapters)["w"], jax.jit(jlora.merge)(params, adapters)["w"]):
        assert merged.dtype == dtype and merged.shape == w.shape
        got = np.asarray(merged, np.float64)
        # one rounding to dtype of a float32 sum: within one unit in the last place
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        if dtype == jnp.bfloat16:
            ulp = ulp * 2.0**16
        assert np.all(np.abs(got - want) <= ulp + 1e-6), np.max(np.abs(got - want) / ulp)
        assert np.abs(got - np.asarray(w, np.float64)).max() > 0.1  # the update is there
    back = jax.jit(jlora.unmerge)(jax.jit(jlora.merge)(params, adapters), adapters)["w"]
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(back, np.float32), np.asarray(w, np.float32),
                               atol=tolerance * 4, rtol=tolerance)  # fmt: skip


def test_bf16_rounding_by_bits_equals_xla_convert():
    """Every class of float32 (normals, subnormals, ties, ±0, ±inf, NaNs with any
    payload, values that round up to inf) rounds to the bfloat16 XLA's convert gives."""
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
                        0xFF800001, 0x7F7FFFFF, 0x3F808000, 0x3F818000, 0x00000001,
                        0x00008000, 0x00018000], np.uint32)  # fmt: skip
    x = jnp.asarray(np.concatenate([bits, special]).view(np.float32))
    got = np.asarray(_f32_to_bf16_bits(x))
    want = np.asarray(jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16))
    nan = np.isnan(np.asarray(x))
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.all((got[nan] & 0x7F80) == 0x7F80) and np.all(got[nan] & 0x7F)  # NaN stays NaN


def test_small_weights_and_other_backends_take_the_one_shot_path():
    small = jnp.ones((64, 32))
    assert blocked_add_product(small, jnp.ones((64, 2)), jnp.ones((2, 32)), 1.0) is None
    big = jnp.ones((ROWS, COLS))
    out = blocked_add_product(big, jnp.ones((ROWS, 2)), jnp.ones((2, COLS)), 0.5)
    np.testing.assert_array_equal(np.asarray(out), np.full((ROWS, COLS), 2.0, np.float32))


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_donated_merge_has_no_weight_sized_temporary(dtype, rank):
    """XLA's own count: merged in place, the step's temporaries are one row block's
    product (about 4 MB), not the float32 product of the whole weight, 8.7 MB here,
    which the one-shot form holds (measured: 8,652,000 bytes donated)."""
    params = {"w": jnp.ones((ROWS, COLS), dtype)}
    adapters = _adapters(params, rank=rank)
    compiled = jax.jit(jlora.merge, donate_argnums=0).lower(params, adapters).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 0.6 * ROWS * COLS * 4, temp  # the float32 product is not formed whole


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_low_rank_merge_is_one_elementwise_pass(dtype):
    """Up to ``_OUTER_MAX_RANK`` a weight merges with no matmul and no loop, and holds no
    temporary of even a row block (the one-shot form: 8.7 MB, a block: about 4 MB);
    above it the row blocks run."""

    def compiled(dtype, rank):
        params = {"w": jnp.ones((ROWS, COLS), dtype)}
        adapters = _adapters(params, rank=rank)
        return jax.jit(jlora.merge, donate_argnums=0).lower(params, adapters).compile()

    outer = compiled(dtype, _OUTER_MAX_RANK)
    hlo = outer.as_text()
    assert " dot(" not in hlo and " while(" not in hlo
    assert outer.memory_analysis().temp_size_in_bytes < 0.05 * ROWS * COLS * 4
    assert " while(" in compiled(dtype, _OUTER_MAX_RANK + 1).as_text()
