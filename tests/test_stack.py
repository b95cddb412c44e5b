"""A stack of adapters chosen per example (``lora_ids``): against each example run alone.

The reference for a mixed batch is the obvious one: run every example by itself with
its own adapter (``jlora.lora`` on a plain adapters tree), or with no adapter for id -1,
and sum the losses; values and gradients (each slot's against its own adapter's) must
agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import checkpoint
from tests.models import Decoder

TARGETS = ["query", "value", "out", "up", "down"]


def _noisy(adapters, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape).astype(np.float32)), adapters
    )


@pytest.fixture(scope="module")
def decoder():
    model = Decoder(scan=True)
    tokens = jax.random.randint(jax.random.key(0), (4, 6), 0, 64)
    params = model.init(jax.random.key(1), tokens)
    trees = []
    for k, (rank, alpha) in enumerate([(2, 4.0), (3, 3.0), (1, 5.0)]):
        spec = jlora.LoraSpec(rank=rank, alpha=alpha, targets=TARGETS)
        made = jlora.init(spec, params, jax.random.key(10 + k), fn=model.apply, args=(tokens,))
        trees.append(_noisy(made, k))
    return model.apply, params, tokens, trees


def _loss(out):
    return jnp.sum(jnp.sin(out))


def test_a_mixed_batch_equals_each_example_alone(decoder):
    fn, params, tokens, trees = decoder
    stacked = jlora.stack(trees)
    ids = jnp.asarray([2, -1, 0, 2])
    lora_fn = jlora.lora(fn)

    def mixed(stacked):
        return _loss(lora_fn(params, stacked, tokens, lora_ids=ids))

    def alone(trees):
        total = 0.0
        for b, k in enumerate(np.asarray(ids)):
            x = tokens[b : b + 1]
            out = fn(params, x) if k < 0 else lora_fn(params, trees[k], x)
            total = total + _loss(out)
        return total

    value, grads = jax.jit(jax.value_and_grad(mixed))(stacked)
    want, want_grads = jax.jit(jax.value_and_grad(alone))(trees)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for k, (got, ref) in enumerate(zip(jlora.unstack(grads), want_grads)):
        for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            scale = float(np.abs(r).max()) or 1.0  # float32 sums of terms of this size
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * scale, err_msg=f"slot {k}")
    # Slot 1 is chosen by no example: its gradient is exactly zero.
    assert all(not np.any(g) for g in jax.tree_util.tree_leaves(jlora.unstack(grads)[1]))
    # Id -1 everywhere is the base exactly.
    none = jnp.full_like(ids, -1)
    np.testing.assert_array_equal(
        lora_fn(params, stacked, tokens, lora_ids=none), fn(params, tokens)
    )
    explanation = jlora.explain(fn, params, stacked, tokens, lora_ids=ids)
    assert all(u.materialized == 0 and u.factored > 0 for u in explanation.values())
    assert {kind for _, kind in explanation.kinds.values()} == {"stack"}
    assert explanation.forms["params/layers/query/kernel"] == {"matmul, per-example": 1}


def test_swapping_stacks_or_ids_compiles_nothing_new(decoder):
    fn, params, tokens, trees = decoder
    traces = []

    @jax.jit
    def step(stacked, ids):
        traces.append(1)  # runs once per trace
        return jax.grad(lambda s: _loss(jlora.lora(fn)(params, s, tokens, lora_ids=ids)))(stacked)

    # Slots padded to one rank (jlora.pad) have one structure: other factors, other
    # scales and other ids reuse the compiled step.
    padded = [jlora.pad(t, rank=3) for t in trees]
    step(jlora.stack(padded), jnp.asarray([0, 1, 2, -1]))
    step(jlora.stack(padded), jnp.asarray([2, 2, -1, 0]))
    step(jlora.stack([padded[1], padded[2], padded[0]]), jnp.asarray([1, 0, 0, 2]))
    assert len(traces) == 1
    step(jlora.stack(trees), jnp.asarray([0, 1, 2, -1]))  # other slot ranks: a new trace
    assert len(traces) == 2


def test_stack_unstack_pad_round_trip(decoder):
    _, _, _, trees = decoder
    stacked = jlora.stack(trees)
    for tree, back in zip(trees, jlora.unstack(stacked)):
        for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back)):
            np.testing.assert_array_equal(a, b)
        assert [n.scale for n in jax.tree_util.tree_leaves(tree, is_leaf=jlora.is_adapter)] == [
            n.scale for n in jax.tree_util.tree_leaves(back, is_leaf=jlora.is_adapter)
        ]
    padded = jlora.pad(trees[2], rank=5)
    for a, b in zip(jax.tree_util.tree_leaves(jlora.delta(trees[2])),
                    jax.tree_util.tree_leaves(jlora.delta(padded))):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_stack_errors(decoder):
    fn, params, tokens, trees = decoder
    with pytest.raises(ValueError, match="at least one"):
        jlora.stack([])
    with pytest.raises(ValueError, match="below the largest"):
        jlora.stack(trees, rank=2)
    with pytest.raises(ValueError, match="needs lora_ids"):
        jlora.lora(fn)(params, jlora.stack(trees), tokens)
    with pytest.raises(ValueError, match="lora_ids has 3 entries"):
        jlora.lora(fn)(params, jlora.stack(trees), tokens, lora_ids=jnp.asarray([0, 1, 2]))
    with pytest.raises(ValueError, match="slot"):
        jlora.merge(params, jlora.stack(trees))
    # A tied head (x·Eᵀ) is not a use where the example axis can be followed: a clear
    # error, never a wrong answer.
    spec = jlora.LoraSpec(rank=2, targets=["embed"])
    embed = jlora.init(spec, params, jax.random.key(0), fn=fn, args=(tokens,))
    with pytest.raises(ValueError, match="cannot give each example its own adapter"):
        jlora.lora(fn)(params, jlora.stack([embed, embed]), tokens, lora_ids=jnp.zeros(4, int))


def test_a_stack_trains_and_checkpoints_whole(decoder, tmp_path):
    fn, params, tokens, trees = decoder
    stacked = jlora.stack(trees)
    tx = jlora.optimizer(optax.adamw(1e-2, weight_decay=0.1), stacked)
    state = tx.init(stacked)
    grads = jax.grad(
        lambda s: _loss(jlora.lora(fn)(params, s, tokens, lora_ids=jnp.asarray([0, 1, 2, 0])))
    )(stacked)
    with jax.numpy_dtype_promotion("standard"):  # optax is not clean under strict promotion
        updates, _ = tx.update(grads, state, stacked)
        new = optax.apply_updates(stacked, updates)
    node = new["params"]["layers"]["query"]["kernel"]
    old = stacked["params"]["layers"]["query"]["kernel"]
    np.testing.assert_array_equal(node.scales, old.scales)  # the scales never train
    assert not np.array_equal(node.lora_a, old.lora_a)
    path = checkpoint.save(tmp_path / "stack", new, jlora.LoraSpec(rank=3, targets=TARGETS))
    loaded, _ = checkpoint.load(path)
    got = loaded["params"]["layers"]["query"]["kernel"]
    assert isinstance(got, type(node)) and got.ranks == node.ranks
    for name in ("lora_a", "lora_b", "scales"):
        np.testing.assert_array_equal(getattr(got, name), getattr(node, name))
