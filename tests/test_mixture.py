"""Mixtures of LoRA experts (``LoraSpec(experts=E)``) against references written here.

Two independent references:

* a float64 formula written out by hand for a plain scanned function: per layer
  ``y = h·W + Σ_e g_e(h)·s·(h·A_e)·B_e`` with the softmax / renormalised top-k gates and
  the Switch balance loss ``E·Σ_e f_e·P_e``, values and gradients (router included);
* the merged weights of plain LoRA adapters on the reference decoder, where the
  routing is fixed by construction: a zero router gives uniform gates ``1/E`` (the
  mixture is then the LoRA of rank ``E·r`` with ``A = [A_1 .. A_E]``,
  ``B = [B_1 .. B_E]/E``), and with ``top_k=1`` every tie goes to expert 0 with its
  probability ``1/E`` as the gate (the mixture is then expert 0's LoRA, B scaled by 1/E).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import checkpoint
from tests.marks import slow_where
from tests.models import Decoder

TARGETS = ["query", "value", "out", "up", "down"]


def _noisy(adapters, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray((scale * rng.normal(size=x.shape)).astype(x.dtype)), adapters
    )


# -- a plain scanned function against the float64 formula ---------------------------------


def _scanned(p, x):
    def body(h, w):
        y = h @ w
        return jnp.tanh(y) + 0.5 * h, None

    return jax.lax.scan(body, x, p["w"])[0]


def _reference(params, node, x, top_k):
    """The mixture's output and mean balance loss, written out per layer and expert."""
    experts = node.experts

    def body(h, layer):
        w, a, b, router = layer
        probs = jax.nn.softmax(h @ router, axis=-1)
        if top_k:
            _, chosen = jax.lax.top_k(probs, top_k)
            mask = jax.nn.one_hot(chosen, experts, dtype=h.dtype).sum(-2)
            gates = probs * mask
            if top_k > 1:
                gates = gates / jnp.sum(gates, -1, keepdims=True)
            share = mask / top_k
        else:
            gates = probs
            share = jax.nn.one_hot(jnp.argmax(probs, -1), experts, dtype=h.dtype)
        y = h @ w
        for e in range(experts):
            y = y + gates[..., e : e + 1] * node.scale * ((h @ a[e]) @ b[e])
        f = share.reshape(-1, experts).mean(0)
        big_p = probs.reshape(-1, experts).mean(0)
        return jnp.tanh(y) + 0.5 * h, experts * jnp.sum(f * big_p)

    layers = (params["w"], node.lora_a, node.lora_b, node.router)
    out, losses = jax.lax.scan(body, x, layers)
    return out, jnp.mean(losses)


@pytest.fixture
def float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize(
    "top_k", slow_where([(0,), (1,), (2,)], ids=lambda k: f"top{k}", slow=lambda k: k == 1)
)
def test_values_gradients_and_balance_loss_match_the_formula(float64, top_k):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 6, 6)) / 3)}
    x = jnp.asarray(rng.normal(size=(2, 5, 6)))
    spec = jlora.LoraSpec(rank=2, alpha=3.0, targets="w", experts=4, top_k=top_k)
    adapters = _noisy(jlora.init(spec, params, jax.random.key(1), fn=_scanned, args=(x,)), 2)
    node = adapters["w"]
    assert node.lora_a.shape == (3, 4, 6, 2) and node.router.shape == (3, 6, 4)
    assert node.lora_a.dtype == jnp.float64

    fn = jlora.lora(_scanned, aux=True)
    out, aux = fn(params, adapters, x)
    want, want_loss = _reference(params, node, x, top_k)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(aux["balance_loss"], want_loss, rtol=1e-6)
    assert float(aux["router_uses"]) == 3  # one routed use per scanned layer

    def loss(adapters):
        out, aux = fn(params, adapters, x)
        return jnp.sum(out**2) + 0.1 * aux["balance_loss"]

    def reference_loss(adapters):
        out, balance = _reference(params, adapters["w"], x, top_k)
        return jnp.sum(out**2) + 0.1 * balance

    got, want = jax.grad(loss)(adapters)["w"], jax.grad(reference_loss)(adapters)["w"]
    for name in ("lora_a", "lora_b", "router"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(got.router).max()) > 0  # the router trains


def test_a_fresh_mixture_is_the_base_and_balanced_routing_scores_one():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(3, 6, 6)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    spec = jlora.LoraSpec(rank=2, targets="w", experts=3)
    adapters = jlora.init(spec, params, jax.random.key(0), fn=_scanned, args=(x,))
    out, _ = jlora.lora(_scanned, aux=True)(params, adapters, x)
    np.testing.assert_array_equal(out, _scanned(params, x))  # B = 0: exactly the base
    # A zero router gives P_e = 1/E for every expert: E·Σ f_e/E = 1 whatever f is.
    flat = jax.tree_util.tree_map(jnp.zeros_like, adapters)
    _, aux = jlora.lora(_scanned, aux=True)(params, flat, x)
    np.testing.assert_allclose(aux["balance_loss"], 1.0, rtol=1e-6)


def test_aux_is_collected_through_while_cond_and_remat():
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.normal(size=(6, 6)) / 3, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    spec = jlora.LoraSpec(rank=2, targets="w", experts=2, top_k=1)
    adapters = _noisy(jlora.init(spec, params, jax.random.key(0)), 5)

    def one(p, h):
        return jnp.tanh(h @ p["w"])

    def looped(p, h, n):
        body = jax.checkpoint(lambda i, h: one(p, h))
        h = jax.lax.fori_loop(0, n, body, h)  # a while loop: n is traced
        return jax.lax.cond(n > 2, lambda h: one(p, h), lambda h: h, h)

    _, single = jlora.lora(one, aux=True)(params, adapters, x)
    fn = jax.jit(jlora.lora(looped, aux=True))
    for n in (1, 3):
        out, aux = fn(params, adapters, x, jnp.asarray(n))
        h = x
        losses = []
        for _ in range(n + (n > 2)):
            _, step = jlora.lora(one, aux=True)(params, adapters, h)
            losses.append(step["balance_loss"])
            h = jlora.lora(one)(params, adapters, h)
        np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)
        assert float(aux["router_uses"]) == n + (n > 2)
        np.testing.assert_allclose(aux["balance_loss"], np.mean(losses), rtol=1e-5)
    assert float(single["router_uses"]) == 1
    _, none = jlora.lora(one, aux=True)(params, {}, x)  # no mixture: zero, not NaN
    assert float(none["balance_loss"]) == 0.0 and float(none["router_uses"]) == 0


# -- the reference decoder against merged plain LoRA ----------------------------------


@pytest.fixture(scope="module")
def decoder():
    model = Decoder(scan=True)
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 64)
    params = model.init(jax.random.key(1), tokens)
    return model.apply, params, tokens


def _lora_of(mixture, experts: list[int], weights: list[float]):
    """The plain LoRA tree ``Σ_k weights[k]·expert[experts[k]]`` (concatenated ranks)."""

    def one(node):
        if not isinstance(node, jlora.MixtureAdapter):
            return node
        n_stack = len(node.layout.stack_axes)
        a = jnp.concatenate([jnp.take(node.lora_a, e, axis=n_stack) for e in experts], -1)
        b = jnp.concatenate(
            [w * jnp.take(node.lora_b, e, axis=n_stack) for e, w in zip(experts, weights)],
            n_stack,
        )
        return jlora.LoraAdapter(a, b, node.scale, node.layout)

    return jax.tree_util.tree_map(one, mixture, is_leaf=jlora.is_adapter)


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [0, 1], ids=["top0", "top1"])
def test_decoder_with_fixed_routing_equals_merged_lora(decoder, top_k):
    fn, params, tokens = decoder
    spec = jlora.LoraSpec(rank=2, alpha=4.0, targets=TARGETS, experts=3, top_k=top_k)
    mixture = _noisy(jlora.init(spec, params, jax.random.key(2), fn=fn, args=(tokens,)), 6)
    mixture = jax.tree_util.tree_map(
        lambda n: n.with_arrays(router=jnp.zeros_like(n.router)), mixture, is_leaf=jlora.is_adapter
    )
    explained = jlora.explain(fn, params, mixture, tokens)
    assert all(u.materialized == 0 and u.factored > 0 for u in explained.values()), explained
    assert {kinds[1] for kinds in explained.kinds.values()} == {"mixture"}
    assert explained.forms["params/layers/up/kernel"] == {"matmul, routed": 1}

    # top_k=1 keeps the top probability (1/3 here) as the gate, as Switch does.
    experts, weights = ([0, 1, 2], [1 / 3] * 3) if top_k == 0 else ([0], [1 / 3])
    plain = _lora_of(mixture, experts, weights)
    out, aux = jlora.lora(fn, aux=True)(params, mixture, tokens)
    want = fn(jlora.merge(params, plain), tokens)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    assert float(aux["router_uses"]) == 2 * len(TARGETS)  # every target, in both layers

    def loss(tree, run):
        return jnp.sum(jnp.sin(run(tree)))

    got = jax.grad(loss)(mixture, lambda t: jlora.lora(fn)(params, t, tokens))
    ref = jax.grad(loss)(plain, lambda t: fn(jlora.merge(params, t), tokens))
    path = ("params", "layers", "up", "kernel")
    g, r = got, ref
    for key in path:
        g, r = g[key], r[key]
    n_stack = len(g.layout.stack_axes)
    for k, e in enumerate(experts):  # expert e's B sits at rank block k of the plain B
        rank = g.rank
        block = jax.lax.slice_in_dim(r.lora_b, k * rank, (k + 1) * rank, axis=n_stack)
        want_b = weights[k] * block
        np.testing.assert_allclose(jnp.take(g.lora_b, e, axis=n_stack), want_b,
                                   rtol=1e-4, atol=1e-5 * float(jnp.abs(want_b).max()))
        want_a = r.lora_a[..., k * rank : (k + 1) * rank]
        np.testing.assert_allclose(jnp.take(g.lora_a, e, axis=n_stack), want_a,
                                   rtol=1e-4, atol=1e-5 * float(jnp.abs(want_a).max()))


@pytest.mark.slow  # the router's gradient is checked in float64 above; this trains it
def test_training_moves_the_router_and_checkpoints_keep_the_mixture(decoder, tmp_path):
    fn, params, tokens = decoder
    spec = jlora.LoraSpec(rank=2, targets=["up", "down"], experts=2, top_k=1)
    adapters = jlora.init(spec, params, jax.random.key(3), fn=fn, args=(tokens,))
    tx = jlora.optimizer(optax.adam(1e-2), adapters)
    state = tx.init(adapters)
    lora_fn = jlora.lora(fn, aux=True)

    def loss(adapters):
        logits, aux = lora_fn(params, adapters, tokens)
        nll = -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return nll + 0.01 * aux["balance_loss"]

    start = adapters
    for _ in range(2):
        grads = jax.grad(loss)(adapters)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam: float ** int32 count
            updates, state = tx.update(grads, state, adapters)
        adapters = optax.apply_updates(adapters, updates)
    node = adapters["params"]["layers"]["up"]["kernel"]
    before = start["params"]["layers"]["up"]["kernel"]
    assert float(jnp.abs(node.router - before.router).max()) > 0

    path = checkpoint.save(tmp_path / "ckpt", adapters, spec)
    loaded, loaded_spec = checkpoint.load(path)
    assert (loaded_spec.experts, loaded_spec.top_k) == (2, 1)
    got = loaded["params"]["layers"]["up"]["kernel"]
    assert isinstance(got, jlora.MixtureAdapter)
    assert (got.experts, got.top_k, got.layout) == (2, 1, node.layout)
    np.testing.assert_array_equal(got.router, node.router)
    np.testing.assert_array_equal(
        lora_fn(params, loaded, tokens)[0], lora_fn(params, adapters, tokens)[0]
    )


def test_mixture_refusals(decoder, tmp_path):
    fn, params, tokens = decoder
    with pytest.raises(ValueError, match="top_k must be an integer in \\[0, experts=2\\]"):
        jlora.LoraSpec(targets="w", experts=2, top_k=3)
    with pytest.raises(ValueError, match="do not combine"):
        jlora.LoraSpec(targets="w", experts=2, dora=True)
    spec = jlora.LoraSpec(rank=2, targets=["embed"], experts=2)
    adapters = jlora.init(spec, params, jax.random.key(0), fn=fn, args=(tokens,))
    with pytest.raises(ValueError, match="router cannot read the activation"):
        jlora.lora(fn)(params, adapters, tokens)  # a lookup and a tied head
    with pytest.raises(ValueError, match="no single delta"):
        jlora.merge(params, adapters)
    with pytest.raises(ValueError, match="mixture"):
        jlora.peft.save(tmp_path / "peft", adapters, spec, key_map="flax")


def test_a_shared_router_is_one_array_whose_gradient_sums_its_uses(decoder, tmp_path):
    fn, params, tokens = decoder
    targets = ["key", "value"]  # both read inputs of width d_model
    spec = jlora.LoraSpec(rank=2, targets=targets, experts=3, top_k=2, share_router=True)
    shared = _noisy(jlora.init(spec, params, jax.random.key(4), fn=fn, args=(tokens,)), 7)
    layer = shared["params"]["layers"]
    owner = "params/layers/key/kernel"  # the first target of the layer in tree order
    assert type(layer["key"]["kernel"]) is jlora.MixtureAdapter
    for name in targets[1:]:
        assert type(layer[name]["kernel"]) is jlora.SharedRouterMixture
        assert layer[name]["kernel"].router_of == owner

    # The reference: every target its own mixture, with a copy of the owner's router.
    router = layer["key"]["kernel"].router

    def unshared(tree):
        def full(node):
            if not isinstance(node, jlora.SharedRouterMixture):
                return node
            return jlora.MixtureAdapter(node.lora_a, node.lora_b, node.scale, node.layout,
                                        router=router, experts=3, top_k=2)  # fmt: skip

        return jax.tree_util.tree_map(full, tree, is_leaf=jlora.is_adapter)

    copies = unshared(shared)
    lora_fn = jlora.lora(fn, aux=True)

    def loss(tree):
        out, aux = lora_fn(params, tree, tokens)
        return jnp.sum(jnp.sin(out)) + aux["balance_loss"]

    np.testing.assert_allclose(loss(shared), loss(copies), rtol=1e-6)
    got = jax.grad(loss)(shared)["params"]["layers"]
    ref = jax.grad(loss)(copies)["params"]["layers"]
    summed = sum(ref[name]["kernel"].router for name in targets)
    np.testing.assert_allclose(got["key"]["kernel"].router, summed, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["value"]["kernel"].lora_b, ref["value"]["kernel"].lora_b,
                               rtol=1e-4, atol=1e-6)  # fmt: skip

    path = checkpoint.save(tmp_path / "shared", shared, spec)
    loaded, _ = checkpoint.load(path)
    assert loaded["params"]["layers"]["value"]["kernel"].router_of == owner
    np.testing.assert_allclose(loss(loaded), loss(shared), rtol=1e-6)

    no_owner = jax.tree_util.tree_map(lambda x: x, shared)
    del no_owner["params"]["layers"]["key"]
    with pytest.raises(ValueError, match="shares the router of 'params/layers/key/kernel'"):
        lora_fn(params, no_owner, tokens)
    wider = jlora.LoraSpec(rank=2, targets=["query", "down"], experts=3, share_router=True)
    with pytest.raises(ValueError, match="inputs of other widths"):
        jlora.init(wider, params, jax.random.key(0), fn=fn, args=(tokens,))
