"""Core engine tests: lora(fn) equals fn(merge(...)) on the Linen reference models."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora
from jlora._paths import leaves_with_paths
from tests.marks import mode, slow_where
from tests.models import CNN, MLP, Decoder

# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------


def perturb(adapters, key, scale=0.1):
    """Give every factor random values, so B != 0 and the update is visible."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def projection_loss(out, key):
    """A loss with O(1) gradients everywhere: <out, random direction>."""
    direction = jax.random.normal(key, out.shape, out.dtype)
    return jnp.sum(out * direction)


def assert_trees_close(actual, expected, rtol=1e-5):
    flat_a = leaves_with_paths(actual)
    flat_e = leaves_with_paths(expected)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_e]
    for (path, a), (_, e) in zip(flat_a, flat_e):
        e = np.asarray(e)
        atol = rtol * max(float(np.abs(e).max()), 1e-30)
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol, err_msg=path)


def check_equivalence(fn, params, adapters, args, *, use_jit, rtol=1e-5, grads=True):
    """Values and adapter gradients of lora(fn) against fn(merge(...))."""
    lora_fn = jlora.lora(fn)

    def factored(a):
        return lora_fn(params, a, *args)

    def merged(a):
        return fn(jlora.merge(params, a), *args)

    out_key = jax.random.key(7)

    def loss_factored(a):
        return projection_loss(factored(a), out_key)

    def loss_merged(a):
        return projection_loss(merged(a), out_key)

    if use_jit:
        factored, loss_factored = jax.jit(factored), jax.jit(loss_factored)
    y_factored = factored(adapters)
    y_merged = merged(adapters)
    np.testing.assert_allclose(
        y_factored, y_merged, rtol=rtol, atol=rtol * float(jnp.abs(y_merged).max())
    )
    if not grads:
        return
    g_factored = jax.grad(loss_factored)(adapters)
    g_merged = jax.grad(loss_merged)(adapters)
    assert_trees_close(g_factored, g_merged, rtol=rtol)


def assert_all_factored(fn, params, adapters, *args):
    report = jlora.explain(fn, params, adapters, *args)
    assert set(report) == {p for p, _ in jlora._tree.adapter_items(adapters)}
    for path, uses in report.items():
        assert uses.materialized == 0, f"{path} materialized:\n{report}"
        assert uses.factored >= 1, f"{path} never used:\n{report}"


# ------------------------------------------------------------------------------------
# the Linen reference models
# ------------------------------------------------------------------------------------

DECODER_TARGETS = ["query", "key", "value", "out", "up", "down", "embed"]


@functools.cache
def linen_case(name):
    key = jax.random.key(0)
    if name == "mlp":
        model = MLP()
        x = jax.random.normal(key, (3, 8))
        targets = ["dense_0", "dense_1", "dense_2"]
    elif name == "cnn":
        model = CNN()
        x = jax.random.normal(key, (2, 8, 8, 3))
        targets = ["conv_0", "conv_1", "head"]
    elif name in ("decoder_scan", "decoder_unrolled"):
        model = Decoder(scan=name == "decoder_scan")
        x = jax.random.randint(key, (2, 8), 0, 64)
        targets = DECODER_TARGETS
    else:
        raise KeyError(name)
    params = model.init(jax.random.key(1), x)
    spec = jlora.LoraSpec(rank=4, alpha=8.0, targets=targets, rank_pattern={"head": 2})
    adapters = jlora.init(spec, params, jax.random.key(2), fn=model.apply, args=(x,))
    return model.apply, params, adapters, x


CASES = ["mlp", "cnn", "decoder_scan", "decoder_unrolled"]


EQUIVALENCE = [(case, use_jit) for case in CASES for use_jit in (False, True)]
EQUIVALENCE.remove(("decoder_unrolled", False))  # same rules as decoder_scan's eager run
# Eager runs use the same rules as jit, op by op; mlp-eager (and test_kinds' eager run of
# the scanned decoder) stay in the default run, the long ones run with -m slow, as does
# the unrolled decoder under jit (its rules are the mlp's and the scanned decoder's).
_LONG = {("cnn", False), ("decoder_scan", False), ("decoder_unrolled", True)}


@pytest.mark.parametrize(
    ("case", "use_jit"),
    slow_where(EQUIVALENCE, ids=lambda c, j: f"{c}-{mode(j)}", slow=lambda *c: c in _LONG),
)
def test_linen_equivalence(case, use_jit):
    fn, params, adapters, x = linen_case(case)
    adapters = perturb(adapters, jax.random.key(3))
    check_equivalence(fn, params, adapters, (x,), use_jit=use_jit)


@pytest.mark.parametrize("case", CASES)
def test_linen_all_factored(case):
    fn, params, adapters, x = linen_case(case)
    assert_all_factored(fn, params, adapters, x)


@pytest.mark.parametrize("case", CASES)
def test_fresh_adapters_give_base_output_exactly(case):
    fn, params, adapters, x = linen_case(case)
    for leaf in jax.tree_util.tree_leaves(jlora.delta(adapters)):
        assert not np.any(np.asarray(leaf))  # B = 0
    np.testing.assert_array_equal(jlora.lora(fn)(params, adapters, x), fn(params, x))
    # Under jit, XLA fuses the two programs differently: equal to float rounding.
    jitted = jax.jit(jlora.lora(fn))(params, adapters, x)
    np.testing.assert_allclose(jitted, jax.jit(fn)(params, x), rtol=2e-6, atol=1e-6)


def test_decoder_layouts_are_learned():
    _, _, adapters, _ = linen_case("decoder_scan")
    layers = adapters["params"]["layers"]
    query = layers["query"]["kernel"].layout  # (L, d, heads, head_dim)
    assert (query.stack_axes, query.in_axes, query.out_axes) == ((0,), (1,), (2, 3))
    out = layers["out"]["kernel"].layout  # (L, heads, head_dim, d)
    assert (out.stack_axes, out.in_axes, out.out_axes) == ((0,), (1, 2), (3,))
    assert layers["query"]["kernel"].lora_a.shape == (2, 32, 4)
    assert layers["query"]["kernel"].lora_b.shape == (2, 4, 32)
    embed = adapters["params"]["embed"]["embedding"].layout  # lookup wins: vocab is input
    assert (embed.in_axes, embed.out_axes) == ((0,), (1,))
    assert "bias" not in layers["query"]  # stacked biases are 3-D but never targets


# ------------------------------------------------------------------------------------
# engine rules on plain functions, against the merged reference
# ------------------------------------------------------------------------------------


def _plain_cases():
    k = jax.random.split(jax.random.key(11), 6)
    w = jax.random.normal(k[0], (6, 5))
    stacked = jax.random.normal(k[1], (3, 5, 5))
    table = jax.random.normal(k[2], (10, 6))
    x = jax.random.normal(k[3], (4, 6))
    ids = jnp.array([[1, 2, 9], [0, 0, 3]])

    def transposed(p, x):  # weight stored (out, in), used as x @ W.T
        return jnp.tanh(x @ p["w_t"].T)

    def loops(p, x):
        h = x @ p["w"]

        def body(i, h):
            return jnp.tanh(h @ p["stack"][i])

        h = jax.lax.fori_loop(0, 3, body, h)  # a scan with a dynamic index
        h = jax.lax.cond(h.sum() > 0, lambda h: h @ p["stack"][0], lambda h: -h, h)
        return h

    def while_loop(p, x):
        def cond(state):
            i, _ = state
            return i < jnp.asarray(2) + x.shape[0] * 0

        def body(state):
            i, h = state
            return i + 1, jnp.sin(h @ p["sq"])

        return jax.lax.while_loop(cond, body, (jnp.asarray(0), x @ p["w"]))[1]

    @jax.custom_vjp
    def custom_matmul(x, w):
        return x @ w

    custom_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    def custom(p, x):
        return jax.nn.relu(custom_matmul(x, p["w"])) @ jax.nn.gelu(p["sq"]).T * 0 + jax.jit(
            lambda w, x: jnp.einsum("bi,io->bo", x, w)
        )(p["w"], x)

    def embedding(p, ids):
        vectors = jnp.take(p["table"], ids, axis=0)
        logits = vectors @ p["table"].T  # tied output head: contracts the output axis
        return logits

    def checkpointed(p, x):
        f = jax.checkpoint(
            lambda h: jnp.tanh(h @ p["w"]), policy=jax.checkpoint_policies.nothing_saveable
        )
        return f(x) @ p["sq"]

    def stacked_python_loop(p, x):
        h = x @ p["w"]
        for i in range(3):
            h = jnp.tanh(h @ p["stack"][i])
        return h

    base = {
        "w": w,
        "w_t": w.T,
        "sq": jax.random.normal(k[4], (5, 5)),
        "stack": stacked,
        "table": table,
    }
    return {
        "transposed": (transposed, base, ["w_t"], (x,)),
        "fori_cond": (loops, base, ["w", "stack"], (x,)),
        "while": (while_loop, base, ["w", "sq"], (x,)),
        "custom_vjp_jit_einsum": (custom, base, ["w"], (x,)),
        "embedding_tied": (embedding, base, ["table"], (ids,)),
        "checkpoint": (checkpointed, base, ["w", "sq"], (x,)),
        "stacked_python_loop": (stacked_python_loop, base, ["w", "stack"], (x,)),
    }


PLAIN = _plain_cases()


def _plain_setup(name):
    fn, params, names, args = PLAIN[name]
    spec = jlora.LoraSpec(rank=2, alpha=3.0, targets="|".join(names))
    adapters = jlora.init(spec, params, jax.random.key(5), fn=fn, args=args)
    return fn, params, perturb(adapters, jax.random.key(6), 0.3), args


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(PLAIN))
def test_rules_match_merged_reference(name, use_jit):
    fn, params, adapters, args = _plain_setup(name)
    # reverse-mode differentiation of a while loop is not defined: values only
    check_equivalence(fn, params, adapters, args, use_jit=use_jit, grads=name != "while")


@pytest.mark.parametrize("name", sorted(set(PLAIN) - {"custom_vjp_jit_einsum"}))
def test_rules_are_factored(name):
    fn, params, adapters, args = _plain_setup(name)
    assert_all_factored(fn, params, adapters, *args)


def test_fallback_is_correct_and_counted():
    params = {"w": jax.random.normal(jax.random.key(0), (4, 3))}

    def fn(p, x):  # the weight goes through an elementwise op: no low-rank rule fits
        return x @ jnp.sin(p["w"])

    adapters = perturb(
        jlora.init(jlora.LoraSpec(rank=2, targets="w"), params, jax.random.key(1)),
        jax.random.key(2),
    )
    x = jnp.ones((2, 4))
    check_equivalence(fn, params, adapters, (x,), use_jit=False)
    report = jlora.explain(fn, params, adapters, x)
    assert report["w"] == jlora.Uses(factored=0, materialized=1)
    assert "0/1 uses factored" in str(report)


def test_transposed_layout_learned():
    _, _, adapters, _ = _plain_setup("transposed")
    layout = adapters["w_t"].layout
    assert (layout.in_axes, layout.out_axes) == ((1,), (0,))
    assert adapters["w_t"].lora_a.shape == (6, 2)  # A maps the 6 input features to r


# ------------------------------------------------------------------------------------
# no materialization, and FLOPs equal to a hand-written LoRA model
# ------------------------------------------------------------------------------------


def _params_jaxprs(params):
    """The jaxprs an equation holds in its params (scan bodies, branches, calls)."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _dependent_shapes(closed, dependent_inputs):
    """Shapes of every value (in every nested jaxpr) that depends on the marked inputs."""
    shapes = []

    def walk(jaxpr, marked):
        dependent = {v for v, m in zip(jaxpr.invars, marked) if m}
        for eqn in jaxpr.eqns:
            ins = [
                not isinstance(v, jax.extend.core.Literal) and v in dependent for v in eqn.invars
            ]
            if not any(ins):
                continue
            for inner in _params_jaxprs(eqn.params):
                walk(inner, [True] * len(inner.invars))
            for v in eqn.outvars:
                dependent.add(v)
                shapes.append(tuple(v.aval.shape))

    walk(closed.jaxpr, dependent_inputs)
    return shapes


def test_no_weight_sized_value_depends_on_adapters():
    fn, params, adapters, x = linen_case("decoder_scan")
    adapters = perturb(adapters, jax.random.key(3))

    def loss(a, p, x):
        return projection_loss(jlora.lora(fn)(p, a, x), jax.random.key(0))

    closed = jax.make_jaxpr(jax.grad(loss))(adapters, params, x)
    n_adapter_leaves = len(jax.tree_util.tree_leaves(adapters))
    n_inputs = len(closed.jaxpr.invars)
    marked = [i < n_adapter_leaves for i in range(n_inputs)]
    forbidden = set()
    for _, node in jlora._tree.adapter_items(adapters):
        layout = node.layout
        forbidden.add(tuple(layout.weight_shape))
        forbidden.add(layout.in_shape + layout.out_shape)  # one layer of a stacked weight
    shapes = _dependent_shapes(closed, marked)
    assert shapes, "the dependency walk found nothing: the test would be vacuous"
    bad = sorted({s for s in shapes if s in forbidden})
    assert not bad, f"weight-sized values depend on the adapters: {bad}"


def test_merged_reference_does_build_weight_sized_values():
    """The check above can fail: on fn(merge(...)) it finds the dense W + s·B·A."""
    fn, params, adapters, x = linen_case("decoder_scan")

    def loss(a, p, x):
        return projection_loss(fn(jlora.merge(p, a), x), jax.random.key(0))

    closed = jax.make_jaxpr(jax.grad(loss))(adapters, params, x)
    n_adapter_leaves = len(jax.tree_util.tree_leaves(adapters))
    marked = [i < n_adapter_leaves for i in range(len(closed.jaxpr.invars))]
    weight_shape = adapters["params"]["layers"]["up"]["kernel"].layout.weight_shape
    assert tuple(weight_shape) in set(_dependent_shapes(closed, marked))


def _flops(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


@pytest.mark.slow  # 27 s; benchmarks/train_step.py prints the same ratio
def test_flops_match_hand_written_lora():
    from tests.models import HandLoraDecoder

    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    targets = ["query", "key", "value", "out", "up", "down"]
    model = Decoder()
    params = model.init(jax.random.key(1), tokens)
    spec = jlora.LoraSpec(rank=4, alpha=8.0, targets=targets)
    adapters = jlora.init(spec, params, jax.random.key(2), fn=model.apply, args=(tokens,))

    hand = HandLoraDecoder(rank=4, scale=2.0)
    hand_vars = hand.init(jax.random.key(1), tokens)

    def jlora_loss(a, p, t, fast_backward=False):
        lora_fn = jlora.lora(model.apply, fast_backward=fast_backward)
        return projection_loss(lora_fn(p, a, t), jax.random.key(0))

    def hand_loss(lora_vars, p, t):
        return projection_loss(hand.apply({"params": p, "lora": lora_vars}, t), jax.random.key(0))

    jlora_flops = _flops(jax.grad(jlora_loss), adapters, params, tokens)
    hand_flops = _flops(jax.grad(hand_loss), hand_vars["lora"], hand_vars["params"], tokens)
    full_flops = _flops(
        jax.grad(lambda p, t: projection_loss(model.apply(p, t), jax.random.key(0))),
        params,
        tokens,
    )
    assert abs(jlora_flops - hand_flops) <= 0.01 * hand_flops, (jlora_flops, hand_flops)
    assert jlora_flops < full_flops  # no weight-gradient matmuls for the frozen base
    # The fast backward (on in scan bodies too) puts the scale on the rank-sized
    # intermediate of the backward: never more work than the hand-written model.
    fast = functools.partial(jlora_loss, fast_backward=True)
    fast_flops = _flops(jax.grad(fast), adapters, params, tokens)
    assert fast_flops <= 1.001 * hand_flops, (fast_flops, hand_flops)


# ------------------------------------------------------------------------------------
# merge laws
# ------------------------------------------------------------------------------------


@settings(max_examples=5, deadline=None)
@given(
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    stack=st.integers(0, 3),
    rank=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_unmerge_inverts_merge(d_in, d_out, stack, rank, seed):
    rank = min(rank, d_in, d_out)
    key = jax.random.key(seed)
    shape = (stack, d_in, d_out) if stack else (d_in, d_out)
    params = {"layer": {"kernel": jax.random.normal(key, shape)}}
    if stack:  # a stacked weight: learn its layout from a scan over it

        def fn(p, x):
            return jax.lax.scan(
                lambda h, w: (h @ w[:, :d_in] if False else h, x @ w), x, p["layer"]["kernel"]
            )[1]

        kw = {"fn": fn, "args": (jnp.ones((2, d_in)),)}
    else:
        kw = {}
    spec = jlora.LoraSpec(rank=rank, alpha=2.0 * rank, targets=["layer"])
    adapters = perturb(jlora.init(spec, params, jax.random.key(seed + 1), **kw), key)
    merged = jlora.merge(params, adapters)
    restored = jlora.unmerge(merged, adapters)
    np.testing.assert_allclose(restored["layer"]["kernel"], params["layer"]["kernel"], atol=1e-5)
    delta = jlora.delta(adapters)["layer"]["kernel"]
    np.testing.assert_allclose(
        merged["layer"]["kernel"] - params["layer"]["kernel"], delta, atol=1e-5
    )


@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 4),
    d_in=st.integers(1, 7),
    d_hidden=st.integers(1, 7),
    rank=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_factored_equals_merged_property(batch, d_in, d_hidden, rank, seed):
    rank = min(rank, d_in, d_hidden)
    model = MLP(features=(d_hidden, 3))
    x = jax.random.normal(jax.random.key(seed), (batch, d_in))
    params = model.init(jax.random.key(seed + 1), x)
    spec = jlora.LoraSpec(rank=rank, targets=["dense_0"])
    adapters = perturb(jlora.init(spec, params, jax.random.key(seed + 2)), jax.random.key(seed))
    np.testing.assert_allclose(
        jlora.lora(model.apply)(params, adapters, x),
        model.apply(jlora.merge(params, adapters), x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_merge_keeps_dtype_and_checks_finite():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.bfloat16)}
    adapters = perturb(
        jlora.init(jlora.LoraSpec(rank=2, targets="w"), params, jax.random.key(0)),
        jax.random.key(1),
    )
    assert adapters["w"].lora_a.dtype == jnp.float32  # 16-bit weights get float32 factors
    merged = jlora.merge(params, adapters)
    assert merged["w"].dtype == jnp.bfloat16 and merged["b"] is params["b"]
    bad = jax.tree_util.tree_map(lambda x: x * jnp.nan, adapters)
    with pytest.raises(FloatingPointError, match="'w'"):
        jlora.merge(params, bad, check_finite=True)


def test_merge_does_not_mutate_inputs():
    params = {"w": jnp.ones((4, 3))}
    adapters = perturb(
        jlora.init(jlora.LoraSpec(rank=2, targets="w"), params, jax.random.key(0)),
        jax.random.key(1),
    )
    before = np.asarray(params["w"]).copy()
    jlora.merge(params, adapters)
    np.testing.assert_array_equal(params["w"], before)


# ------------------------------------------------------------------------------------
# spec features
# ------------------------------------------------------------------------------------


def test_scale_rslora_and_patterns():
    params = {
        "enc": {"query": {"kernel": jnp.ones((16, 16))}, "value": {"kernel": jnp.ones((16, 16))}}
    }
    spec = jlora.LoraSpec(
        rank=4,
        alpha=8.0,
        targets=["query", "value"],
        rank_pattern={"value": 2},
        alpha_pattern={"query": 16.0},
    )
    adapters = jlora.init(spec, params, jax.random.key(0))
    assert adapters["enc"]["query"]["kernel"].rank == 4
    assert adapters["enc"]["query"]["kernel"].scale == 16.0 / 4
    assert adapters["enc"]["value"]["kernel"].rank == 2
    assert adapters["enc"]["value"]["kernel"].scale == 8.0 / 2
    rs = jlora.LoraSpec(rank=4, alpha=8.0, targets=["query"], rslora=True)
    assert jlora.init(rs, params, jax.random.key(0))["enc"]["query"]["kernel"].scale == 8.0 / 2.0


def test_targets_regex_names_callable_and_exclude():
    params = {
        "a": {"query": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}},
        "b": {"query": {"kernel": jnp.ones((4, 4))}, "mlp": {"kernel": jnp.ones((4, 4))}},
    }

    def targeted(spec):
        return sorted(
            p for p, _ in jlora._tree.adapter_items(jlora.init(spec, params, jax.random.key(0)))
        )

    assert targeted(jlora.LoraSpec(targets=["query"], rank=2)) == [
        "a/query/kernel",
        "b/query/kernel",
    ]
    assert targeted(jlora.LoraSpec(targets=r"b/.*/kernel", rank=2)) == [
        "b/mlp/kernel",
        "b/query/kernel",
    ]
    assert targeted(
        jlora.LoraSpec(targets=lambda p, x: p.startswith("a/") and x.ndim == 2, rank=2)
    ) == ["a/query/kernel"]
    assert targeted(jlora.LoraSpec(targets=["query", "mlp"], exclude=r"a/.*", rank=2)) == [
        "b/mlp/kernel",
        "b/query/kernel",
    ]


def test_target_names_match_non_generic_leaf_names_and_every_name_must_match():
    params = {
        "mlp": {"gating_einsum": jnp.ones((2, 4, 6)), "linear": jnp.ones((6, 4))},
        "attn": {"q_einsum": {"w": jnp.ones((4, 2, 3))}},
        "experts": {"w_in": jnp.ones((3, 4, 5)), "bias": jnp.ones((3, 5))},
        "norm": {"scale": jnp.ones(4)},
    }

    def targeted(**kwargs):
        return sorted(p for p, _ in jlora.LoraSpec(rank=1, **kwargs).select(params))

    # the gm.nn weights that are leaves themselves, and a plain dict's expert weight
    assert targeted(targets=["gating_einsum", "linear"]) == ["mlp/gating_einsum", "mlp/linear"]
    assert targeted(targets=["w_in"]) == ["experts/w_in"]
    assert targeted(targets=["mlp", "q_einsum"], exclude=["linear"]) == [
        "attn/q_einsum/w", "mlp/gating_einsum"]
    # a name that matches in part of the list is an error, with the near names
    with pytest.raises(ValueError, match=r"1 of 2 listed names.*'gating'.*near: gating_einsum"):
        targeted(targets=["gating", "linear"])
    with pytest.raises(ValueError, match=r"LoraSpec.exclude: 1 of 1.*'lineer'.*near: linear"):
        targeted(targets=["mlp"], exclude=["lineer"])
    # a generic leaf name never matches by list, and the message says so
    with pytest.raises(ValueError, match=r"'w' \(a generic leaf name"):
        targeted(targets=["q_einsum", "w"])
    # a bias or norm scale is no weight, even when named
    with pytest.raises(ValueError, match=r"'scale'"):
        targeted(targets=["linear", "scale"])
    # nothing matching at all still lists the candidate paths, with the near names
    with pytest.raises(ValueError, match=r"(?s)matches no leaf.*'linar'.*near: linear.*mlp/linear"):
        targeted(targets=["linar"])


def test_nnx_variable_paths_follow_the_same_name_rule():
    spec = jlora.LoraSpec(rank=1, targets=["gate_proj"])
    assert spec.is_target("layers/0/mlp/gate_proj/value", jnp.ones((3, 4, 5)))
    assert spec.is_target("layers/0/mlp/gate_proj/kernel/value", jnp.ones((4, 5)))
    assert not jlora.LoraSpec(rank=1, targets=["kernel"]).is_target(
        "layers/0/mlp/gate_proj/kernel/value", jnp.ones((4, 5)))


def test_gaussian_and_kaiming_init_statistics():
    params = {"w": jnp.ones((400, 300))}
    kaiming = jlora.init(jlora.LoraSpec(rank=8, targets="w"), params, jax.random.key(0))["w"]
    bound = 1.0 / np.sqrt(400)
    a = np.asarray(kaiming.lora_a)
    assert a.max() <= bound and a.min() >= -bound and a.std() > 0.5 * bound / np.sqrt(3)
    gaussian = jlora.init(
        jlora.LoraSpec(rank=8, targets="w", init="gaussian"), params, jax.random.key(0)
    )
    assert abs(float(np.asarray(gaussian["w"].lora_a).std()) - 1.0 / 8) < 0.01
    assert not np.any(np.asarray(kaiming.lora_b))


def test_dropout_only_with_key_and_only_on_low_rank_path():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (16, 8))
    params = model.init(jax.random.key(1), x)
    spec = jlora.LoraSpec(rank=4, targets=["dense_0", "dense_1"], dropout=0.5)
    fresh = jlora.init(spec, params, jax.random.key(2))
    lora_fn = jlora.lora(model.apply)
    # B = 0: dropout on the low-rank path cannot change the output
    np.testing.assert_array_equal(
        lora_fn(params, fresh, x, lora_key=jax.random.key(3)), model.apply(params, x)
    )
    adapters = perturb(fresh, jax.random.key(4))
    no_key = lora_fn(params, adapters, x)
    np.testing.assert_allclose(
        no_key, model.apply(jlora.merge(params, adapters), x), rtol=1e-5, atol=1e-5
    )
    drop_1 = lora_fn(params, adapters, x, lora_key=jax.random.key(5))
    drop_2 = lora_fn(params, adapters, x, lora_key=jax.random.key(6))
    assert not np.allclose(drop_1, no_key) and not np.allclose(drop_1, drop_2)
    again = jax.jit(lora_fn)(params, adapters, x, lora_key=jax.random.key(5))
    np.testing.assert_allclose(again, drop_1, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------
# training and the optimizer
# ------------------------------------------------------------------------------------


def test_training_lowers_loss_and_only_adapters_change():
    model = MLP(features=(32, 32, 4))
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (64, 8))
    teacher = jax.random.normal(key_w, (8, 4))
    y = jnp.tanh(x @ teacher)
    params = model.init(jax.random.key(1), x)
    base_bytes = [np.asarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(params)]
    spec = jlora.LoraSpec(rank=4, alpha=8.0, targets=["dense_0", "dense_1", "dense_2"])
    adapters = jlora.init(spec, params, jax.random.key(2))
    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    opt_state = tx.init(adapters)
    lora_apply = jlora.lora(model.apply)

    def loss(a, p):
        return jnp.mean((lora_apply(p, a, x) - y) ** 2)

    @jax.jit
    def step(a, s, p):
        value, grads = jax.value_and_grad(loss)(a, p)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam: float ** int32 count
            updates, s = tx.update(grads, s, a)
        return optax.apply_updates(a, updates), s, value

    first = float(loss(adapters, params))
    for _ in range(100):
        adapters, opt_state, _ = step(adapters, opt_state, params)
    last = float(loss(adapters, params))
    assert last < 0.5 * first, (first, last)
    assert [np.asarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(params)] == base_bytes
    # the optimizer state holds only adapter-shaped arrays
    adapter_shapes = {leaf.shape for leaf in jax.tree_util.tree_leaves(adapters)}
    state_shapes = {leaf.shape for leaf in jax.tree_util.tree_leaves(opt_state) if leaf.ndim}
    assert state_shapes <= adapter_shapes


def test_lora_plus_scales_b_updates():
    params = {"w": jnp.ones((4, 3))}
    adapters = perturb(
        jlora.init(jlora.LoraSpec(rank=2, targets="w"), params, jax.random.key(0)),
        jax.random.key(1),
    )
    grads = jax.tree_util.tree_map(jnp.ones_like, adapters)
    tx = jlora.optimizer(optax.sgd(0.1), adapters, lora_plus_ratio=16.0)
    updates, _ = tx.update(grads, tx.init(adapters), adapters)
    np.testing.assert_allclose(updates["w"].lora_a, -0.1 * np.ones((4, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["w"].lora_b, -1.6 * np.ones((2, 3)), rtol=1e-6)


def test_trainable_head_is_copied_trained_and_merged():
    params = {
        "body": {"kernel": jnp.ones((4, 4))},
        "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
    }
    spec = jlora.LoraSpec(rank=2, targets=["body"], trainable=["head"])
    adapters = jlora.init(spec, params, jax.random.key(0))
    assert set(adapters["head"]) == {"kernel", "bias"}
    assert adapters["head"]["kernel"] is not params["head"]["kernel"]

    def fn(p, x):
        return (x @ p["body"]["kernel"]) @ p["head"]["kernel"] + p["head"]["bias"]

    x = jnp.ones((3, 4))
    grads = jax.grad(lambda a: jlora.lora(fn)(params, a, x).sum())(adapters)
    assert float(jnp.abs(grads["head"]["bias"]).sum()) > 0
    tx = jlora.optimizer(optax.sgd(1.0), adapters, trainable=["head"])
    updates, _ = tx.update(grads, tx.init(adapters), adapters)
    new = optax.apply_updates(adapters, updates)
    merged = jlora.merge(params, new)
    np.testing.assert_array_equal(merged["head"]["bias"], new["head"]["bias"])
    np.testing.assert_allclose(jlora.lora(fn)(params, new, x), fn(merged, x), rtol=1e-6)
    frozen = jlora.optimizer(optax.sgd(1.0), adapters, trainable="head/bias")
    updates, _ = frozen.update(grads, frozen.init(adapters), adapters)
    assert not np.any(np.asarray(updates["head"]["kernel"]))
    with pytest.raises(ValueError, match="names no trainable leaf"):
        jlora.optimizer(optax.sgd(1.0), adapters, trainable=["nothing"])


def test_summary_counts_like_peft():
    params = {"w": jnp.ones((10, 10)), "b": jnp.ones(10)}
    adapters = jlora.init(jlora.LoraSpec(rank=1, targets="w"), params, jax.random.key(0))
    assert jlora.summary(params, adapters) == (
        "trainable params: 20 || all params: 130 || trainable%: 15.3846"
    )


# ------------------------------------------------------------------------------------
# errors for people
# ------------------------------------------------------------------------------------


def test_spec_matching_nothing_lists_candidates():
    params = {"encoder": {"attention": {"query": {"kernel": jnp.ones((4, 4))}}}}
    with pytest.raises(ValueError, match="encoder/attention/query/kernel"):
        jlora.init(jlora.LoraSpec(targets=["qproj"], rank=2), params, jax.random.key(0))


@pytest.mark.parametrize("rank", [0, -1])
def test_non_positive_rank_is_refused(rank):
    with pytest.raises(ValueError, match="rank"):
        jlora.LoraSpec(rank=rank, targets=["x"])


def test_rank_above_min_dimension_is_refused():
    params = {"w": jnp.ones((4, 3))}
    with pytest.raises(ValueError, match=r"rank 5 at 'w' exceeds min\(in, out\)"):
        jlora.init(jlora.LoraSpec(rank=5, targets="w"), params, jax.random.key(0))


def test_adapters_for_another_model_are_refused():
    params = {"w": jnp.ones((4, 3))}
    adapters = jlora.init(jlora.LoraSpec(rank=2, targets="w"), params, jax.random.key(0))
    other = {"w": jnp.ones((5, 3))}
    with pytest.raises(ValueError, match=r"'w'.*\[4, 3\].*float32\[5, 3\]"):
        jlora.lora(lambda p, x: x @ p["w"])(other, adapters, jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="'w'"):
        jlora.merge(other, adapters)
    with pytest.raises(ValueError, match="no matching leaf"):
        jlora.merge({"v": jnp.ones((4, 3))}, adapters)


def test_integer_leaf_is_refused():
    params = {"w": jnp.ones((4, 3), jnp.int8)}
    with pytest.raises(ValueError, match="int8"):
        jlora.init(jlora.LoraSpec(rank=2, targets=lambda p, x: True), params, jax.random.key(0))


def test_nd_leaf_without_fn_asks_for_fn():
    params = {"attn": {"kernel": jnp.ones((8, 2, 4))}}
    with pytest.raises(ValueError, match="Pass fn="):
        jlora.init(jlora.LoraSpec(rank=2, targets=["attn"]), params, jax.random.key(0))


def test_missing_targets_is_an_error():
    with pytest.raises(ValueError, match="targets is required"):
        jlora.LoraSpec(rank=2)


# ------------------------------------------------------------------------------------
# the public surface
# ------------------------------------------------------------------------------------


def test_every_public_name_imports():
    for name in jlora.__all__:
        assert getattr(jlora, name) is not None, name


def test_works_with_flax_apply_kwargs_and_static_args():
    class Flagged(nn.Module):
        @nn.compact
        def __call__(self, x, *, double: bool):
            y = nn.Dense(3, name="dense")(x)
            return 2 * y if double else y

    model = Flagged()
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x, double=False)
    adapters = perturb(
        jlora.init(jlora.LoraSpec(rank=2, targets=["dense"]), params, jax.random.key(1)),
        jax.random.key(2),
    )
    out = jlora.lora(model.apply)(params, adapters, x, double=True)
    np.testing.assert_allclose(
        out, model.apply(jlora.merge(params, adapters), x, double=True), rtol=1e-6
    )


def test_optimizer_on_a_callable_adapters_tree():
    """An Equinox adapters tree is a callable module: optax must not call it."""
    import equinox as eqx

    model = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)

    def fn(p, x):
        return eqx.combine(p, static)(x)

    spec = jlora.LoraSpec(rank=2, targets="weight")
    adapters = jlora.init(spec, params, jax.random.key(1), fn=fn, args=(jnp.ones(4),))
    tx = jlora.optimizer(optax.sgd(0.5), adapters, lora_plus_ratio=2.0)
    grads = jax.tree_util.tree_map(jnp.ones_like, adapters)
    updates, _ = tx.update(grads, tx.init(adapters), adapters)
    np.testing.assert_allclose(updates.weight.lora_a, -0.5 * np.ones((4, 2)))
    np.testing.assert_allclose(updates.weight.lora_b, -1.0 * np.ones((2, 3)))


@pytest.mark.parametrize("fast_backward", [False, True], ids=["autodiff", "fast"])
def test_fast_backward_matches_plain_autodiff(fast_backward):
    fn, params, adapters, x = linen_case("decoder_scan")
    adapters = perturb(adapters, jax.random.key(3))

    def loss(a, fast):
        out = jlora.lora(fn, fast_backward=fast)(params, a, x)
        return projection_loss(out, jax.random.key(0))

    g_switch = jax.jit(jax.grad(lambda a: loss(a, fast_backward)))(adapters)
    g_merged = jax.grad(
        lambda a: projection_loss(fn(jlora.merge(params, a), x), jax.random.key(0))
    )(adapters)
    assert_trees_close(g_switch, g_merged)


def test_forward_mode_needs_fast_backward_off():
    params = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
    adapters = perturb(
        jlora.init(jlora.LoraSpec(rank=2, targets="w"), params, jax.random.key(1)),
        jax.random.key(2),
    )
    x = jnp.ones((2, 4))

    def f(a, fast):
        return jlora.lora(lambda p, x: x @ p["w"], fast_backward=fast)(params, a, x)

    tangent = jax.tree_util.tree_map(jnp.ones_like, adapters)
    _, jvp_out = jax.jvp(lambda a: f(a, False), (adapters,), (tangent,))
    _, jvp_ref = jax.jvp(lambda a: x @ jlora.merge(params, a)["w"], (adapters,), (tangent,))
    np.testing.assert_allclose(jvp_out, jvp_ref, rtol=1e-5)
    with pytest.raises(TypeError):
        jax.jvp(lambda a: f(a, True), (adapters,), (tangent,))
