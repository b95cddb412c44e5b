"""The fast path's backward input gradient ``gt·Aᵀ`` (``jlora._lowrank._expand_grad_x``):
at ranks up to ``OUTER_BACKWARD_MAX_RANK`` a sum of rank-1 outer products that XLA fuses
into the add with the base weight's input gradient, above it a GEMM. Both must equal a
float64 product, low precision must accumulate in float32, gradients through ``lowrank``,
``lowrank_shared`` and the engine must be autodiff's, and the compiled backward must
run no ``(N, in)`` GEMM for it at small ranks (one above the threshold)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import _lowrank
from jlora._lowrank import OUTER_BACKWARD_MAX_RANK, _expand_grad_x, lowrank, lowrank_shared


@pytest.fixture(autouse=True)
def outer_form_on_the_test_mesh(monkeypatch):
    """The test run has 8 host devices, where the engine keeps the GEMM form; these
    tests check the outer-product form itself."""
    monkeypatch.setattr(_lowrank, "SINGLE_DEVICE_ONLY", False)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


RANKS = [1, 8, OUTER_BACKWARD_MAX_RANK, OUTER_BACKWARD_MAX_RANK + 1, 32]


@pytest.mark.parametrize("rank", RANKS)
def test_expand_grad_x_equals_the_float64_product(rank, x64):
    rng = np.random.default_rng(rank)
    gt = rng.normal(size=(15, rank))
    a = rng.normal(size=(7, rank))
    got = _expand_grad_x(jnp.asarray(gt), jnp.asarray(a), None)
    assert got.dtype == jnp.float64 and got.shape == (15, 7)
    np.testing.assert_allclose(got, gt @ a.T, rtol=1e-13, atol=1e-13)


def test_expand_grad_x_accumulates_low_precision_in_float32():
    """1 + 15·2⁻⁹ in bfloat16: a float32 accumulator ends at 1.03125 (the nearest
    bfloat16 to 1.0293), one in bfloat16 rounds each 1 + 2⁻⁹ back to 1 and ends at 1."""
    rank = 16
    gt = jnp.ones((4, rank), jnp.bfloat16)
    a = jnp.full((3, rank), 2.0**-9, jnp.bfloat16).at[:, 0].set(1.0)
    got = _expand_grad_x(gt, a, None)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), 1.03125)


def _plain(x, a, b, scale):
    return (scale * (x @ a)) @ b


@pytest.mark.parametrize("rank", RANKS)
def test_lowrank_gradients_are_autodiffs(rank, x64):
    """All three gradients (x's through the outer-product sum at small ranks) against
    autodiff of the plain float64 product."""
    rng = np.random.default_rng(10 + rank)
    x = jnp.asarray(rng.normal(size=(2, 5, 9)))
    a = jnp.asarray(rng.normal(size=(9, rank)))
    b = jnp.asarray(rng.normal(size=(rank, 6)))

    def loss(f):
        return lambda x, a, b: jnp.sum(jnp.sin(f(x, a, b, 0.75)))

    got = jax.grad(loss(lowrank), argnums=(0, 1, 2))(x, a, b)
    want = jax.grad(loss(_plain), argnums=(0, 1, 2))(x, a, b)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ranks", [(2, 3), (8, 8), (8, 9)])
def test_lowrank_shared_gradients_are_autodiffs(ranks, x64):
    """The shared product's input gradient is one sum over the concatenated ranks: the
    outer form up to a total of OUTER_BACKWARD_MAX_RANK, a GEMM above (8 + 9)."""
    rng = np.random.default_rng(sum(ranks))
    x = jnp.asarray(rng.normal(size=(3, 4, 6)))
    a = tuple(jnp.asarray(rng.normal(size=(6, r))) for r in ranks)
    b = tuple(jnp.asarray(rng.normal(size=(r, 5))) for r in ranks)
    scales = (0.5, 2.0)

    def loss(f):
        return lambda x, a, b: sum(jnp.sum(jnp.sin(o)) for o in f(x, a, b))

    def separate(x, a, b):
        return tuple(_plain(x, ak, bk, s) for ak, bk, s in zip(a, b, scales))

    shared = loss(lambda x, a, b: lowrank_shared(x, a, b, scales))
    for got, want in zip(
        jax.tree.leaves(jax.grad(shared, argnums=(0, 1, 2))(x, a, b)),
        jax.tree.leaves(jax.grad(loss(separate), argnums=(0, 1, 2))(x, a, b)),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _input_gradient_dots(rank: int) -> list[str]:
    """Shapes of the float32 dots in the compiled gradient of ``x·W + lowrank(x)``."""
    x = jnp.ones((64, 32), jnp.float32)
    w = jnp.ones((32, 48), jnp.float32)
    a = jnp.ones((32, rank), jnp.float32)
    b = jnp.ones((rank, 48), jnp.float32)

    def loss(x, a, b):
        return jnp.sum(jnp.tanh(x @ w + lowrank(x, a, b, 0.5)))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, a, b).compile().as_text()
    return re.findall(r"= f32\[([\d,]+)\]\{[\d,]+\} dot\(", text)


@pytest.mark.parametrize("rank", [8, OUTER_BACKWARD_MAX_RANK + 1])
def test_compiled_backward_runs_no_rank_r_input_gradient_gemm_at_small_ranks(rank):
    """``x``'s gradient: one ``g·Wᵀ`` GEMM for the base, and for the adapter a GEMM
    only above the threshold (else the outer-product sum, fused into the add)."""
    dots = _input_gradient_dots(rank)
    assert dots.count("64,32") == (1 if rank <= OUTER_BACKWARD_MAX_RANK else 2), dots


def test_engine_gradients_through_two_layers_equal_the_merged_float64_model(x64):
    """The first layer's adapters get their gradient through the second layer's input
    gradient, so the outer form is on the path; against the merged weights by hand."""
    rng = np.random.default_rng(0)
    params = {n: jnp.asarray(rng.normal(size=(8, 8)) / 3) for n in ("l1", "l2")}
    x = jnp.asarray(rng.normal(size=(5, 8)))
    spec = jlora.LoraSpec(rank=4, alpha=8.0, targets=["l1", "l2"])
    adapters = jlora.init(spec, params, jax.random.key(0))
    adapters = jax.tree.map(lambda t: jnp.asarray(0.3 * rng.normal(size=t.shape)), adapters)

    def model(p, x):
        return jnp.tanh(jnp.tanh(x @ p["l1"]) @ p["l2"])

    def loss(ad):
        return jnp.sum(jlora.lora(model, fast_backward=True)(params, ad, x) ** 2)

    def merged_loss(ad):
        merged = {n: params[n] + 2.0 * ad[n].lora_a @ ad[n].lora_b for n in ("l1", "l2")}
        return jnp.sum(model(merged, x) ** 2)

    got = jax.grad(loss)(adapters)
    want = jax.grad(merged_loss)(adapters)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-11)
