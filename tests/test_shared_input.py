"""Uses that read one activation (q, k, v of a layer's normed input; gate and up) get
one ``x·[A_q|A_k|A_v]`` product (``jlora._lowrank.lowrank_shared``), found by the
engine's look-ahead over the equations, not by layer names. Values and gradients must
be those of the merged weights (a float64 reference), ``explain`` must show the
grouping, and uses that cannot share (dropout, different inputs) must not be grouped."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._lowrank import lowrank_shared


def attention_like(params, x):
    """q, k, v read the same ``h``; ``o`` and ``up`` read others; plain jnp code."""
    h = jnp.tanh(x)
    q, k, v = h @ params["q"], h @ params["k"], h @ params["v"]
    mixed = jnp.tanh(q * k) + v
    return jnp.tanh(mixed @ params["o"]) @ params["up"]


def _setup(dtype=jnp.float64, dropout=0.0):
    rng = np.random.default_rng(0)
    shapes = {"q": (6, 5), "k": (6, 5), "v": (6, 5), "o": (5, 7), "up": (7, 3)}
    params = {n: jnp.asarray(rng.normal(size=s) / 2, dtype) for n, s in shapes.items()}
    x = jnp.asarray(rng.normal(size=(2, 4, 6)), dtype)
    spec = jlora.LoraSpec(rank=2, alpha=3.0, targets=list(shapes), rank_pattern={"k": 3},
                          dropout=dropout)  # fmt: skip
    adapters = jlora.init(spec, params, jax.random.key(0), fn=attention_like, args=(x,))
    adapters = jax.tree.map(lambda a: jnp.asarray(0.4 * rng.normal(size=a.shape), a.dtype),
                            adapters)  # fmt: skip
    return params, adapters, x


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("jit", [False, True])
def test_shared_input_values_and_gradients_equal_the_merged_model(jit, x64):
    params, adapters, x = _setup()
    assert x.dtype == jnp.float64
    run = jlora.lora(attention_like, fast_backward=True)
    if jit:
        run = jax.jit(run)
    want = attention_like(jlora.merge(params, adapters), x)
    np.testing.assert_allclose(run(params, adapters, x), want, rtol=1e-12, atol=1e-12)

    def loss(a, f):
        return jnp.sum(jnp.sin(f(a)))

    got = jax.grad(loss)(adapters, lambda a: run(params, a, x))
    ref = jax.grad(loss)(adapters, lambda a: attention_like(jlora.merge(params, a), x))
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
    gx = jax.grad(lambda x: jnp.sum(jnp.sin(run(params, adapters, x))))(x)
    rx = jax.grad(lambda x: jnp.sum(jnp.sin(attention_like(jlora.merge(params, adapters), x))))(x)
    np.testing.assert_allclose(gx, rx, rtol=1e-10, atol=1e-12)


def test_explain_shows_the_group_and_only_the_group():
    params, adapters, x = _setup(jnp.float32)
    report = jlora.explain(attention_like, params, adapters, x)
    for name in ("q", "k", "v"):
        assert report.forms[name] == {"matmul, shared input ×3": 1}, report
    for name in ("o", "up"):
        assert report.forms[name] == {"matmul": 1}, report
    assert all(uses.materialized == 0 for uses in report.values())


def test_dropout_uses_are_not_grouped():
    """With dropout drawn, each use has its own mask, so its input differs: no group.
    The dropped-out call still equals the merged-free reference of its own masks only
    in distribution; here: it runs, and without a key the group is back."""
    params, adapters, x = _setup(jnp.float32, dropout=0.1)
    fn = jax.jit(jlora.lora(attention_like))
    text = jax.jit(jlora.lora(attention_like)).lower(
        params, adapters, x, lora_key=jax.random.key(1)
    ).as_text()
    grouped = jax.jit(jlora.lora(attention_like)).lower(params, adapters, x).as_text()
    assert text.count("dot_general") > grouped.count("dot_general")  # 3 x·A instead of 1
    assert fn(params, adapters, x, lora_key=jax.random.key(1)).shape == (2, 4, 3)
    report = jlora.explain(attention_like, params, adapters, x)  # no key: no dropout
    assert report.forms["q"] == {"matmul, shared input ×3": 1}


def test_lowrank_shared_gradients_equal_the_separate_products(x64):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 4, 6)))
    a = tuple(jnp.asarray(rng.normal(size=(6, r))) for r in (2, 3))
    b = tuple(jnp.asarray(rng.normal(size=(r, o))) for r, o in ((2, 5), (3, 2)))
    scales = (0.5, 2.0)

    def separate(x, a, b):
        return tuple((s * (x @ ak)) @ bk for ak, bk, s in zip(a, b, scales))

    def loss(f):
        return lambda x, a, b: sum(jnp.sum(jnp.sin(o)) for o in f(x, a, b))

    shared = loss(lambda x, a, b: lowrank_shared(x, a, b, scales))
    for got, want in zip(
        jax.tree.leaves(jax.grad(shared, argnums=(0, 1, 2))(x, a, b)),
        jax.tree.leaves(jax.grad(loss(separate), argnums=(0, 1, 2))(x, a, b)),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
