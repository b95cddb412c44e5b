"""The fast path's forward ``t·B`` (``jlora._lowrank._expand``): at ranks up to
``OUTER_PRODUCT_MAX_RANK`` a sum of rank-1 outer products that XLA fuses into the
projection's consumer, above it a GEMM. Both must equal a float64 GEMM, the low-precision
form must accumulate in float32 as a GEMM does, and the compiled forward must write no
``(N, out)`` GEMM result at small ranks (one above the threshold), also in a scan body."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import _lowrank
from jlora._lowrank import OUTER_PRODUCT_MAX_RANK, _expand, lowrank


@pytest.fixture(autouse=True)
def outer_form_on_the_test_mesh(monkeypatch):
    """The test run has 8 host devices, where the engine keeps the GEMM form; these
    tests check the outer-product form itself."""
    monkeypatch.setattr(_lowrank, "SINGLE_DEVICE_ONLY", False)


def test_outer_form_is_off_with_several_devices(monkeypatch):
    monkeypatch.setattr(_lowrank, "SINGLE_DEVICE_ONLY", True)
    assert jax.device_count() > 1
    assert not _lowrank._outer_form(jnp.ones((4, 8), jnp.float32))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("rank", [1, 2, 8, OUTER_PRODUCT_MAX_RANK, OUTER_PRODUCT_MAX_RANK + 1, 32])
def test_expand_equals_the_float64_product(rank, x64):
    rng = np.random.default_rng(rank)
    t = rng.normal(size=(3, 5, rank))
    b = rng.normal(size=(rank, 7))
    got = _expand(jnp.asarray(t), 0.75 * jnp.asarray(t), jnp.asarray(b), 0.75, None)
    assert got.dtype == jnp.float64 and got.shape == (3, 5, 7)
    np.testing.assert_allclose(got, 0.75 * (t @ b), rtol=1e-13, atol=1e-13)


def test_expand_accumulates_low_precision_in_float32():
    """1 + 15·2⁻⁹ in bfloat16: a float32 accumulator gives 1.0293 -> 1.03125 (the nearest
    bfloat16); a bfloat16 accumulator rounds every 1 + 2⁻⁹ back to 1 and ends at 1.0."""
    rank = 16
    t = jnp.ones((4, rank), jnp.bfloat16)
    b = jnp.full((rank, 3), 2.0**-9, jnp.bfloat16).at[0].set(1.0)
    got = _expand(t, t, b, 1.0, None)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), 1.03125)
    gemm = jax.lax.dot_general(
        t, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    ).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(gemm, np.float32))


def _dots_by_shape(text: str) -> list[str]:
    return re.findall(r"= f32\[([\d,]+)\]\{[\d,]+\} dot\(", text)


def _compiled(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("rank", [8, OUTER_PRODUCT_MAX_RANK + 1])
def test_compiled_forward_writes_no_low_rank_gemm_result_at_small_ranks(rank):
    x = jnp.ones((64, 32), jnp.float32)
    a = jnp.ones((32, rank), jnp.float32)
    b = jnp.ones((rank, 48), jnp.float32)
    dots = _dots_by_shape(_compiled(lambda x, a, b: lowrank(x, a, b, 0.5), x, a, b))
    assert f"64,{rank}" in dots  # x·A
    assert dots.count("64,48") == (0 if rank <= OUTER_PRODUCT_MAX_RANK else 1), dots


def test_scan_body_sum_reads_a_materialized_scaled_b():
    """In a scan body B is a dynamic-slice of the stacked adapters: it must reach the
    elementwise sum as a computed ``s·B`` (a dot with ``s·I``), not fused into it."""
    layers, rank = 3, 4
    x = jnp.ones((64, 32), jnp.float32)
    a = jnp.ones((layers, 32, rank), jnp.float32)
    b = jnp.ones((layers, rank, 32), jnp.float32)

    def run(x, a, b):
        def body(h, ab):
            return jnp.tanh(h + lowrank(h, ab[0], ab[1], 2.0)), None

        return jax.lax.scan(body, x, (a, b))[0]

    text = _compiled(run, x, a, b)
    assert _dots_by_shape(text).count(f"{rank},32") == 1, _dots_by_shape(text)  # s·I·B
    for computation in re.split(r"\n(?=%\S+ \()", text):
        if computation.count(" multiply(") >= rank:  # the outer-product sum
            assert "dynamic-slice(" not in computation, computation
    np.testing.assert_allclose(
        run(x, a, b), jax.lax.scan(lambda h, ab: (jnp.tanh(h + 2.0 * (h @ ab[0]) @ ab[1]), None),
                                   x, (a, b))[0], rtol=1e-6)  # fmt: skip


def test_outer_and_gemm_forms_agree_through_the_engine(monkeypatch):
    """The whole fast path (values and adapter gradients) with the outer-product form
    and with it off: the same numbers to float32 rounding."""
    rng = np.random.default_rng(0)
    params = {"proj": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(6, 12)), jnp.float32)
    spec = jlora.LoraSpec(rank=4, alpha=8.0, targets=["proj"])
    adapters = jlora.init(spec, params, jax.random.key(0))
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)

    def loss(a):
        out = jlora.lora(lambda p, x: jnp.tanh(x @ p["proj"]), fast_backward=True)(params, a, x)
        return jnp.sum(out**2)

    value, grads = jax.value_and_grad(loss)(adapters)
    monkeypatch.setattr(_lowrank, "OUTER_PRODUCT_MAX_RANK", 0)
    value_gemm, grads_gemm = jax.value_and_grad(loss)(adapters)
    np.testing.assert_allclose(value, value_gemm, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_gemm)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
