"""DoRA: the adapter kind with a magnitude, against a direct implementation of the formula.

The reference here is written from the paper's formula and shares no code with jlora:
``W' = (m / n) ⊙ (W + s·A·B)`` with ``n = ‖W + s·A·B‖`` over the input axes, built
densely (float64 numpy for values; jnp with ``stop_gradient`` on ``n`` for gradients).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora._paths import leaves_with_paths, path_str
from tests.marks import mode, slow_where
from tests.models import CNN, MLP, Decoder
from tests.test_core import (
    assert_all_factored,
    assert_trees_close,
    perturb,
    projection_loss,
)

# ------------------------------------------------------------------------------------
# the reference
# ------------------------------------------------------------------------------------


def _grouped(xp, weight, layout):
    order = layout.stack_axes + layout.in_axes + layout.out_axes
    return xp.transpose(weight, order).reshape(
        (*layout.stack_shape, layout.in_features, layout.out_features)
    )


def _ungrouped(xp, grouped, layout):
    order = layout.stack_axes + layout.in_axes + layout.out_axes
    full = grouped.reshape(layout.stack_shape + layout.in_shape + layout.out_shape)
    return xp.transpose(full, np.argsort(order))


def dora_weight(xp, weight, node, detach):
    """``(m / ‖W + s·A·B‖) ⊙ (W + s·A·B)``, built densely with ``xp`` (numpy or jnp)."""
    layout = node.layout
    updated = _grouped(xp, weight, layout) + node.scale * (node.lora_a @ node.lora_b)
    norm = xp.sqrt(xp.sum(updated * updated, axis=-2))
    norm = detach(norm)
    return _ungrouped(xp, updated * (node.magnitude / norm)[..., None, :], layout)


def _with_merged(params, adapters, merge):
    """``params`` with each adapted leaf replaced by ``merge(leaf, node)``."""
    nodes = dict(jlora._tree.adapter_items(adapters))

    def one(kp, leaf):
        node = nodes.get(path_str(kp))
        return leaf if node is None else merge(leaf, node)

    return jax.tree_util.tree_map_with_path(one, params)


def reference_params_f64(params, adapters):
    """Every DoRA target merged in float64 numpy, then cast to the weight's dtype."""

    def merge(leaf, node):
        wide = jax.tree.map(lambda x: np.asarray(x, np.float64), node)
        merged = dora_weight(np, np.asarray(leaf, np.float64), wide, detach=lambda n: n)
        return jnp.asarray(merged.astype(np.asarray(leaf).dtype))

    return _with_merged(params, adapters, merge)


def reference_params_jnp(params, adapters):
    """The same formula in jnp, differentiable, with the norm detached as PEFT does."""

    def merge(leaf, node):
        return dora_weight(jnp, leaf, node, detach=jax.lax.stop_gradient).astype(leaf.dtype)

    return _with_merged(params, adapters, merge)


def check_against_reference(fn, params, adapters, args, *, use_jit, rtol=1e-5):
    """lora(fn) on ``params`` (quantized or not) against the formula on their dense weights."""
    lora_fn = jlora.lora(fn)
    out_key = jax.random.key(7)
    base = jlora.dequantize(params)

    def factored(a):
        return lora_fn(params, a, *args)

    def loss_factored(a):
        return projection_loss(factored(a), out_key)

    def loss_reference(a):
        return projection_loss(fn(reference_params_jnp(base, a), *args), out_key)

    if use_jit:
        factored, loss_factored = jax.jit(factored), jax.jit(loss_factored)
    want = jax.jit(fn)(reference_params_f64(base, adapters), *args)
    got = factored(adapters)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.abs(want).max()))
    want_grads = jax.jit(jax.grad(loss_reference))(adapters)  # the reference, compiled
    assert_trees_close(jax.grad(loss_factored)(adapters), want_grads, rtol)


def dora_adapters(params, targets, fn, args, *, rank=4, seed=2):
    spec = jlora.LoraSpec(
        rank=rank, alpha=8.0, targets=targets, dora=True, rank_pattern={"head": 2}
    )
    adapters = jlora.init(spec, params, jax.random.key(seed), fn=fn, args=args)
    # Non-zero B and a magnitude away from the norm, so every term of the formula counts.
    return perturb(adapters, jax.random.key(seed + 1), scale=0.2)


def _case(name):
    key = jax.random.key(0)
    if name == "dense":
        model, x, targets = MLP(), jax.random.normal(key, (3, 8)), ["dense_0", "dense_2"]
    elif name == "conv":
        model, x = CNN(), jax.random.normal(key, (2, 8, 8, 3))
        targets = ["conv_0", "conv_1", "head"]
    elif name == "decoder_scan_remat":  # DenseGeneral, stacked layers, embedding
        model, x = Decoder(scan=True), jax.random.randint(key, (2, 8), 0, 64)
        targets = ["query", "key", "value", "out", "up", "down", "embed"]
    elif name == "decoder_unrolled":
        model, x = Decoder(scan=False), jax.random.randint(key, (2, 8), 0, 64)
        targets = ["query", "out", "up", "embed"]
    else:
        raise KeyError(name)
    params = model.init(jax.random.key(1), x)
    return model.apply, params, dora_adapters(params, targets, model.apply, (x,)), (x,)


CASES = ["dense", "conv", "decoder_scan_remat", "decoder_unrolled"]


# ------------------------------------------------------------------------------------
# values and gradients
# ------------------------------------------------------------------------------------


# Every case under jit; the eager interpreter (the same rules, op by op) on the MLP by
# default, the decoders with -m slow (20-30 s each on 2 cores).
# The scanned decoder (scan over remat) runs DoRA in test_quant's decoder cases.
FORMULA_CASES = slow_where(
    [(name, use_jit) for use_jit in (True, False) for name in CASES],
    ids=lambda name, use_jit: f"{name}-{mode(use_jit)}",
    slow=lambda name, use_jit: (
        name in ("decoder_unrolled", "decoder_scan_remat") if use_jit else name != "dense"
    ),
)


@pytest.mark.parametrize("name, use_jit", FORMULA_CASES)
def test_dora_matches_the_formula(name, use_jit):
    fn, params, adapters, args = _case(name)
    check_against_reference(fn, params, adapters, args, use_jit=use_jit)


@pytest.mark.parametrize("name", CASES)
def test_dora_is_factored(name):
    fn, params, adapters, args = _case(name)
    assert_all_factored(fn, params, adapters, *args)
    report = jlora.explain(fn, params, adapters, *args)
    assert set(report.kinds.values()) == {("dense", "dora")}
    assert "dora" in str(report)


def _transposed_and_einsum():
    """GPT-2-style ``(out, in)`` storage and an einsum kernel, in plain functions."""
    params = {
        "proj": {"weight": jax.random.normal(jax.random.key(0), (5, 7))},  # (out, in)
        "mix": {"kernel": jax.random.normal(jax.random.key(1), (7, 3, 4))},  # (in, h, d)
    }

    def fn(p, x):
        h = x @ p["proj"]["weight"].T  # (.., 5)
        return jnp.einsum("bi,ihd->bhd", jnp.concatenate([h, h[:, :2]], -1), p["mix"]["kernel"])

    x = jax.random.normal(jax.random.key(2), (3, 7))
    adapters = dora_adapters(params, ["proj", "mix"], fn, (x,), rank=2)
    return fn, params, adapters, (x,)


@pytest.mark.parametrize(
    "use_jit", slow_where([(False,), (True,)], ids=mode, slow=lambda use_jit: not use_jit)
)
def test_dora_on_transposed_storage_and_einsum(use_jit):
    fn, params, adapters, args = _transposed_and_einsum()
    node = adapters["proj"]["weight"]
    assert (node.layout.in_axes, node.layout.out_axes) == ((1,), (0,))
    assert node.magnitude.shape == (5,)
    np.testing.assert_allclose(
        jlora.init(
            jlora.LoraSpec(rank=2, targets=["proj"], dora=True),
            params,
            jax.random.key(0),
            fn=fn,
            args=args,
        )["proj"]["weight"].magnitude,
        np.linalg.norm(np.asarray(params["proj"]["weight"]), axis=1),
        rtol=1e-6,
    )
    check_against_reference(fn, params, adapters, args, use_jit=use_jit)
    assert_all_factored(fn, params, adapters, *args)


def test_fresh_dora_gives_the_base_output():
    fn, params, _, args = _case("decoder_scan_remat")
    spec = jlora.LoraSpec(rank=4, targets=["query", "up", "embed"], dora=True)
    adapters = jlora.init(spec, params, jax.random.key(0), fn=fn, args=args)
    np.testing.assert_allclose(
        jlora.lora(fn)(params, adapters, *args), fn(params, *args), rtol=1e-6, atol=1e-6
    )


def test_dora_equals_fn_of_merge_in_values_and_gradients():
    fn, params, adapters, args = _case("dense")
    from tests.test_core import check_equivalence

    check_equivalence(fn, params, adapters, args, use_jit=True)


@settings(max_examples=3, deadline=None)
@given(
    batch=st.integers(1, 3),
    d_in=st.integers(2, 9),
    d_out=st.integers(2, 9),
    rank=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_factored_equals_merged_property(batch, d_in, d_out, rank, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {"w": jax.random.normal(keys[0], (d_in, d_out))}
    spec = jlora.LoraSpec(rank=rank, targets="w", dora=True)
    adapters = perturb(jlora.init(spec, params, keys[1]), keys[2], scale=0.3)
    x = jax.random.normal(keys[2], (batch, d_in))

    def fn(p, x):
        return jnp.tanh(x @ p["w"])

    np.testing.assert_allclose(
        jlora.lora(fn)(params, adapters, x),
        fn(reference_params_f64(params, adapters), x),
        rtol=1e-5,
        atol=1e-5,
    )


# ------------------------------------------------------------------------------------
# no dense (in, out) temporary
# ------------------------------------------------------------------------------------


_ONE_TO_ONE = ("scan", "pjit", "jit", "remat", "remat2", "checkpoint", "closed_call",
               "custom_jvp_call", "custom_vjp_call")  # fmt: skip


def _dependent_shapes(closed, marked):
    """Shapes of values that depend on the marked inputs, followed exactly into the bodies
    of calls and scans (their inner inputs are the outer ones, in order); other nested
    jaxprs are marked whole. The frozen base alone (``W⊙W`` for the norm) is not marked."""
    shapes = []

    def walk(jaxpr, marks):
        dependent = {v for v, m in zip(jaxpr.invars, marks) if m}
        for eqn in jaxpr.eqns:
            ins = [
                not isinstance(v, jax.extend.core.Literal) and v in dependent for v in eqn.invars
            ]
            if not any(ins):
                continue
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else [value]:
                    inner = getattr(item, "jaxpr", item)
                    if not isinstance(inner, jax.extend.core.Jaxpr):
                        continue
                    exact = eqn.primitive.name in _ONE_TO_ONE and len(inner.invars) == len(ins)
                    walk(inner, ins if exact else [True] * len(inner.invars))
            for v in eqn.outvars:
                dependent.add(v)
                shapes.append(tuple(v.aval.shape))

    walk(closed.jaxpr, marked)
    return shapes


def test_no_weight_sized_value_depends_on_the_dora_adapters():
    fn, params, adapters, args = _case("decoder_scan_remat")

    def loss(a, p, x):
        return projection_loss(jlora.lora(fn)(p, a, x), jax.random.key(0))

    closed = jax.make_jaxpr(jax.jit(jax.grad(loss)))(adapters, params, *args)
    n_adapter_leaves = len(jax.tree_util.tree_leaves(adapters))
    marked = [i < n_adapter_leaves for i in range(len(closed.jaxpr.invars))]
    forbidden = set()
    for _, node in jlora._tree.adapter_items(adapters):
        layout = node.layout
        forbidden |= {
            tuple(layout.weight_shape),
            layout.in_shape + layout.out_shape,
            (*layout.stack_shape, layout.in_features, layout.out_features),
            (layout.in_features, layout.out_features),
        }
    shapes = _dependent_shapes(closed, marked)
    assert shapes, "the dependency walk found nothing: the test would be vacuous"
    bad = sorted({s for s in shapes if s in forbidden})
    assert not bad, f"weight-sized values depend on the DoRA adapters: {bad}"

    # The check can fail: the dense reference does build W + s·A·B.
    def loss_ref(a, p, x):
        return projection_loss(fn(reference_params_jnp(p, a), x), jax.random.key(0))

    closed_ref = jax.make_jaxpr(jax.grad(loss_ref))(adapters, params, *args)
    assert set(_dependent_shapes(closed_ref, marked)) & forbidden


def test_dora_step_needs_no_more_temporaries_than_a_weight_less():
    """In the compiled step (XLA's own buffer plan) DoRA adds less than one layer's weight
    to LoRA's temporaries, on layers much larger than their activations: the norm's
    ``W⊙W`` is reduced as it is formed, never stored."""
    d, layers = 256, 3
    params = {"w": jax.random.normal(jax.random.key(0), (layers, d, d)) / 16}
    x = jax.random.normal(jax.random.key(1), (4, d))

    def fn(p, x):
        def layer(h, w):
            return jnp.tanh(h @ w), None

        return jax.lax.scan(layer, x, p["w"])[0]

    def temp_bytes(dora, dense=False):
        spec = jlora.LoraSpec(rank=4, targets="w", dora=dora)
        adapters = perturb(jlora.init(spec, params, jax.random.key(0), fn=fn, args=(x,)),
                           jax.random.key(1))  # fmt: skip

        def loss(a):
            if dense:  # the formula as written: W + s·A·B built for the norm
                return projection_loss(fn(reference_params_jnp(params, a), x), jax.random.key(0))
            return projection_loss(jlora.lora(fn)(params, a, x), jax.random.key(0))

        compiled = jax.jit(jax.grad(loss)).lower(adapters).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one_layer = d * d * 4
    lora_bytes = temp_bytes(False)
    assert temp_bytes(True) - lora_bytes < one_layer // 2
    assert temp_bytes(True, dense=True) - lora_bytes > one_layer  # the check can fail


# ------------------------------------------------------------------------------------
# merge, optimizer, checkpoints, mesh
# ------------------------------------------------------------------------------------


def test_merge_equals_the_float64_formula_and_unmerge_refuses():
    _, params, adapters, _ = _case("decoder_scan_remat")
    merged = jlora.merge(params, adapters)
    want = reference_params_f64(params, adapters)
    assert_trees_close(merged, want, rtol=1e-5)
    with pytest.raises(ValueError, match="DoRA adapter cannot be taken back out"):
        jlora.unmerge(merged, adapters)


def test_optimizer_trains_the_magnitude_and_lora_plus_scales_b_only():
    _, _, adapters, _ = _case("dense")
    labels = jlora.labels(adapters)
    node = labels["params"]["dense_0"]["kernel"]
    assert (node.lora_a, node.lora_b, node.magnitude) == ("lora_a", "lora_b", "magnitude")
    grads = jax.tree.map(jnp.ones_like, adapters)
    plain = jlora.optimizer(optax.sgd(1.0), adapters)
    plus = jlora.optimizer(optax.sgd(1.0), adapters, lora_plus_ratio=4.0)
    u_plain, _ = plain.update(grads, plain.init(adapters), adapters)
    u_plus, _ = plus.update(grads, plus.init(adapters), adapters)
    for a, b in zip(
        jax.tree.leaves(u_plain, is_leaf=jlora.is_adapter),
        jax.tree.leaves(u_plus, is_leaf=jlora.is_adapter),
    ):
        assert float(jnp.abs(a.magnitude).min()) == 1.0  # trained, not frozen
        np.testing.assert_array_equal(b.magnitude, a.magnitude)
        np.testing.assert_array_equal(b.lora_a, a.lora_a)
        np.testing.assert_array_equal(b.lora_b, 4.0 * a.lora_b)


def test_training_lowers_the_loss_and_moves_the_magnitude():
    fn, params, _, (tokens,) = _case("decoder_scan_remat")
    spec = jlora.LoraSpec(rank=4, targets=["query", "value", "up", "down"], dora=True)
    adapters = jlora.init(spec, params, jax.random.key(0), fn=fn, args=(tokens,))
    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    state = tx.init(adapters)

    def loss(a):
        logits = jlora.lora(fn)(params, a, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    @jax.jit
    def step(a, s):
        value, grads = jax.value_and_grad(loss)(a)
        with jax.numpy_dtype_promotion("standard"):
            updates, s = tx.update(grads, s, a)
        return optax.apply_updates(a, updates), s, value

    start = adapters
    losses = []
    for _ in range(25):
        adapters, state, value = step(adapters, state)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0], losses
    m0 = start["params"]["layers"]["up"]["kernel"].magnitude
    m1 = adapters["params"]["layers"]["up"]["kernel"].magnitude
    assert float(jnp.abs(m1 - m0).max()) > 1e-3


def test_checkpoint_round_trip_keeps_the_kind(tmp_path):
    fn, params, adapters, args = _case("decoder_scan_remat")
    spec = jlora.LoraSpec(rank=4, alpha=8.0, targets=".*", dora=True)
    jlora.save(tmp_path / "ckpt", adapters, spec)
    loaded, loaded_spec = jlora.load(tmp_path / "ckpt")
    assert loaded_spec.dora
    got = dict(jlora._tree.adapter_items(loaded))
    for path, node in jlora._tree.adapter_items(adapters):
        assert isinstance(got[path], jlora.DoraAdapter), path
        for name, array in node.arrays().items():
            np.testing.assert_array_equal(np.asarray(got[path].arrays()[name]), array)
    targets = ["query", "key", "value", "out", "up", "down", "embed"]
    plain = jlora.init(jlora.LoraSpec(rank=4, targets=targets), params, jax.random.key(0),
                       fn=fn, args=args)  # fmt: skip
    with pytest.raises(ValueError, match=r"has a dora adapter .* but like has a lora adapter"):
        jlora.load(tmp_path / "ckpt", like=plain)


def assert_mesh_step_equals_one_device(model, params, adapters, tokens, *, base_shardings):
    """One SGD step on the (4, 2) mesh equals the single-device step: loss, updated
    adapters (so gradients) and their shardings. ``base_shardings(mesh)`` places params.
    Returns the adapters' shardings."""
    from tests import test_sharding as ts

    tx = jlora.optimizer(optax.sgd(0.5, momentum=0.9), adapters)
    with jax.numpy_dtype_promotion("standard"):
        ref_loss, ref_adapters, _ = jax.jit(ts.lora_step(model.apply, tx))(
            params, adapters, tx.init(adapters), tokens
        )
    mesh = ts.make_mesh("fsdp4_tp2")
    float_shardings = ts.param_shardings(jlora.dequantize(params), mesh)
    a_shard = jlora.shardings(adapters, float_shardings)
    step = jax.jit(
        ts.lora_step(ts.batch_sharded(model, mesh), tx),
        out_shardings=(NamedSharding(mesh, P()), a_shard, None),
    )
    with jax.numpy_dtype_promotion("standard"):
        s_adapters = jax.device_put(adapters, a_shard)
        loss, new_adapters, _ = step(
            jax.device_put(params, base_shardings(float_shardings)),
            s_adapters,
            tx.init(s_adapters),
            jax.device_put(tokens, NamedSharding(mesh, P("fsdp", None))),
        )
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    want = dict(leaves_with_paths(ref_adapters))
    placements = dict(leaves_with_paths(a_shard))
    for path, leaf in leaves_with_paths(new_adapters):
        assert leaf.sharding == placements[path], path
        np.testing.assert_allclose(
            np.asarray(leaf), np.asarray(want[path]), rtol=1e-5, atol=1e-6, err_msg=path
        )
    return a_shard


def test_dora_spec_is_checked():
    with pytest.raises(TypeError, match="dora must be a bool"):
        jlora.LoraSpec(targets="w", dora="yes")
    spec = jlora.LoraSpec(rank=1, targets="w", dora=True)
    with pytest.raises(ValueError, match="abstract"):
        jlora.init(spec, {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}, jax.random.key(0))
    assert dataclasses.replace(spec, dora=False).dora is False
