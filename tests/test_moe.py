"""Adapters on MoE expert weights: a per-expert LoRA on ``ragged_dot`` and 3-D einsum kernels.

A small scanned MoE decoder routes each token to its top-2 experts with the model's own
router (not an adapter). The expert kernels ``(layers, E, in, out)`` are used two ways:

* ``ragged``: tokens sorted by expert and multiplied by ``jax.lax.ragged_dot``, the
  grouped matmul of MaxText- and tunix-style MoE layers;
* ``einsum``: every expert applied to every token, ``einsum("etd,edf->etf")``, with
  the experts as a batch axis of the contraction.

Either way each expert gets its own adapter slice (the expert axis is a stack axis),
and ``jlora.lora`` must equal the model run on ``jlora.merge``'d weights, in values and
gradients, with every use factored.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora
import jlora.peft

EXPERTS, TOP_K = 4, 2


def _route(logits):
    """Top-k experts per token and their renormalised gates: ``(T, k)`` each."""
    probs = jax.nn.softmax(logits, axis=-1)
    gates, chosen = jax.lax.top_k(probs, TOP_K)
    return gates / jnp.sum(gates, axis=-1, keepdims=True), chosen


class MoeBlock(nn.Module):
    d_model: int
    mlp: int
    mode: str

    @nn.compact
    def __call__(self, x, _):
        batch, length, d = x.shape
        h = nn.LayerNorm(name="ln")(x).reshape(batch * length, d)
        h = h + nn.Dense(d, name="mix")(h)
        gates, chosen = _route(nn.Dense(EXPERTS, use_bias=False, name="router")(h))
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        wi = self.param("wi", init, (EXPERTS, d, self.mlp))
        wo = self.param("wo", init, (EXPERTS, self.mlp, d))
        if self.mode == "ragged":
            flat = chosen.reshape(-1)  # (T·k,): token t's j-th expert at t·k + j
            order = jnp.argsort(flat)
            tokens = jnp.repeat(h, TOP_K, axis=0)[order]
            sizes = jnp.bincount(flat, length=EXPERTS).astype(jnp.int32)
            y = jax.lax.ragged_dot(jax.nn.gelu(jax.lax.ragged_dot(tokens, wi, sizes)), wo, sizes)
            y = jnp.zeros_like(y).at[order].set(y).reshape(-1, TOP_K, d)
            out = jnp.sum(y * gates[..., None], axis=1)
        else:
            every = jnp.broadcast_to(h, (EXPERTS, *h.shape))
            y = jnp.einsum("etf,efd->etd", jax.nn.gelu(jnp.einsum("etd,edf->etf", every, wi)), wo)
            weights = jnp.sum(jax.nn.one_hot(chosen, EXPERTS) * gates[..., None], axis=1)
            out = jnp.einsum("etd,te->td", y, weights)
        return x + out.reshape(batch, length, d), None


class MoeDecoder(nn.Module):
    mode: str
    vocab: int = 32
    d_model: int = 16
    mlp: int = 24
    layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
        block = nn.scan(
            nn.remat(MoeBlock), variable_axes={"params": 0}, split_rngs={"params": True},
            length=self.layers,
        )(self.d_model, self.mlp, self.mode, name="layers")  # fmt: skip
        x, _ = block(x, None)
        return nn.Dense(self.vocab, name="head")(x)


def _noisy(adapters, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.2 * rng.normal(size=x.shape).astype(np.float32)), adapters
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ragged", "einsum"])
def test_expert_adapters_match_the_merged_weights(mode):
    model = MoeDecoder(mode)
    tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 32)
    params = model.init(jax.random.key(1), tokens)
    spec = jlora.LoraSpec(rank=2, alpha=4.0, targets=r"params/layers/(wi|wo|mix/kernel)")
    made = jlora.init(spec, params, jax.random.key(2), fn=model.apply, args=(tokens,))
    adapters = _noisy(made, 3)
    wi = adapters["params"]["layers"]["wi"]
    # (layers, experts, in, out): the layer and expert axes are stack axes.
    assert wi.layout.stack_axes == (0, 1) and wi.lora_a.shape == (2, EXPERTS, 16, 2)

    explained = jlora.explain(model.apply, params, adapters, tokens)
    assert set(explained) == {f"params/layers/{n}" for n in ("wi", "wo", "mix/kernel")}
    assert all(u.materialized == 0 and u.factored > 0 for u in explained.values()), explained
    expert_form = {"ragged": "grouped", "einsum": "batched"}[mode]
    for name in ("wi", "wo"):
        assert explained.forms[f"params/layers/{name}"] == {expert_form: 1}
    assert explained.forms["params/layers/mix/kernel"] == {"matmul": 1}
    assert f"{expert_form} ×1" in str(explained)

    out = jlora.lora(model.apply)(params, adapters, tokens)
    want = model.apply(jlora.merge(params, adapters), tokens)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)

    def loss(a, run):
        return jnp.sum(jnp.sin(run(a)))

    got = jax.grad(loss)(adapters, lambda a: jlora.lora(model.apply)(params, a, tokens))
    ref = jax.grad(loss)(adapters, lambda a: model.apply(jlora.merge(params, a), tokens))
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))

    grads = got["params"]["layers"]["wi"].lora_b
    assert grads.shape == (2, EXPERTS, 2, 24)
    assert float(jnp.abs(grads).max()) > 0


@pytest.mark.slow  # the default run reaches this rule through tests/test_moe_interop.py
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_ragged_dot_rule_on_its_own_in_float64(dora):
    """Groups of every size, an empty one and rows past the last group."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        params = {"experts": {"wi": jnp.asarray(rng.normal(size=(4, 6, 5))),
                              "wo": jnp.asarray(rng.normal(size=(4, 5, 6)))}}  # fmt: skip
        sizes = jnp.asarray([3, 0, 5, 2], jnp.int32)  # 10 of 11 rows: the last in no group
        x = jnp.asarray(rng.normal(size=(11, 6)))

        def fn(p, x, sizes):
            h = jax.nn.gelu(jax.lax.ragged_dot(x, p["experts"]["wi"], sizes))
            return jax.lax.ragged_dot(h, p["experts"]["wo"], sizes)

        spec = jlora.LoraSpec(rank=2, targets=["experts"], dora=dora)
        adapters = jlora.init(spec, params, jax.random.key(0), fn=fn, args=(x, sizes))
        adapters = jax.tree_util.tree_map(
            lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape)), adapters
        )
        out = jlora.lora(fn)(params, adapters, x, sizes)
        np.testing.assert_allclose(out, fn(jlora.merge(params, adapters), x, sizes),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
        got = jax.grad(lambda a: jnp.sum(jnp.sin(jlora.lora(fn)(params, a, x, sizes))))(
            adapters
        )
        ref = jax.grad(lambda a: jnp.sum(jnp.sin(fn(jlora.merge(params, a), x, sizes))))(
            adapters
        )
        for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
        explained = jlora.explain(fn, params, adapters, x, sizes)
        assert all(u == (1, 0) for u in explained.values()), explained


def test_scanned_expert_weights_write_one_target_parameter_per_layer(tmp_path):
    """``(layers, E, in, out)`` named ``model.layers.{}.mlp.experts``: per layer, the
    file's factors multiply back to jlora's delta of each expert (PEFT's layout)."""
    model = MoeDecoder("ragged")
    tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 32)
    params = model.init(jax.random.key(1), tokens)
    spec = jlora.LoraSpec(rank=2, alpha=4.0, targets=r"params/layers/(wi|wo)")
    made = jlora.init(spec, params, jax.random.key(2), fn=model.apply, args=(tokens,))
    adapters = _noisy(made, 4)
    key_map = jlora.peft.KeyMap("moe", rename=((r"^layers$", "model/layers/{}/mlp/experts"),))
    jlora.peft.save(tmp_path, adapters, spec, key_map=key_map, experts=["layers"],
                    parameter_order=["wi", "wo"])  # fmt: skip
    config = json.loads((tmp_path / jlora.peft.CONFIG_NAME).read_text())
    tensors = safetensors.numpy.load_file(tmp_path / jlora.peft.WEIGHTS_NAME)
    assert config["target_parameters"] == [
        f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1) for n in ("wi", "wo")
    ]
    assert config["target_modules"] == []
    deltas = jlora.delta(adapters)["params"]["layers"]
    prefix = "base_model.model.model.layers.1.mlp.experts."
    for name, depth in (("wi", "base_layer."), ("wo", "")):  # wi registered first: inner
        lora_a = tensors[f"{prefix}{depth}lora_A.weight"]  # (E·r, d1)
        lora_b = tensors[f"{prefix}{depth}lora_B.weight"]  # (d0, E·r)
        rank = spec.rank
        a = lora_a.reshape(EXPERTS, rank, -1)
        b = lora_b.reshape(lora_b.shape[0], rank, EXPERTS)
        for e in range(EXPERTS):
            np.testing.assert_allclose(
                spec.scale_for(name) * b[:, :, e] @ a[e], deltas[name][1, e], rtol=1e-5,
                atol=1e-6,
            )  # fmt: skip
