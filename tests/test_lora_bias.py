"""LoraSpec(lora_bias=True): a bias on B, against the merged model and PEFT itself (torch CPU)."""

from __future__ import annotations

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.peft
from tests.models import Decoder


def _nonzero(adapters, key):
    """Adapters moved off their init (B and the bias nonzero), as after training."""
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(12, name="up")(x))
        x = nn.DenseGeneral((2, 3), name="heads")(x)
        return nn.Conv(4, (3,), name="conv")(x.reshape(*x.shape[:-2], 6, 1))


def test_lora_bias_equals_the_merged_model_in_values_and_gradients(key):
    model = _Mlp()
    x = jax.random.normal(key, (2, 6, 8))
    params = model.init(key, x)
    spec = jlora.LoraSpec(rank=2, alpha=3.0, targets=["up", "heads", "conv"], lora_bias=True)
    adapters = jlora.init(spec, params, key, fn=model.apply, args=(x,))
    kernels = [n for n in jax.tree.leaves(adapters, is_leaf=jlora.is_adapter)]
    assert all(isinstance(n, jlora.LoraBiasAdapter) for n in kernels)
    assert all(float(jnp.abs(n.lora_bias).max()) == 0 for n in kernels)
    # Fresh: the base output exactly.
    np.testing.assert_array_equal(jlora.lora(model.apply)(params, adapters, x),
                                  model.apply(params, x))  # fmt: skip
    adapters = _nonzero(adapters, key)

    def loss(a):
        return jnp.sum(jax.jit(jlora.lora(model.apply))(params, a, x) ** 2)

    def loss_merged(a):
        return jnp.sum(model.apply(jlora.merge(params, a), x) ** 2)

    value, grads = jax.value_and_grad(loss)(adapters)
    value_ref, grads_ref = jax.value_and_grad(loss_merged)(adapters)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    # The bias moved the output: merging only the weights would not give it.
    merged = jlora.merge(params, adapters)
    moved = merged["params"]["up"]["bias"] - params["params"]["up"]["bias"]
    node = adapters["params"]["up"]["kernel"]
    np.testing.assert_allclose(moved, node.scale * node.lora_bias, rtol=1e-5, atol=1e-7)
    back = jlora.unmerge(merged, adapters)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    report = jlora.explain(model.apply, params, adapters, x)
    assert all(u.materialized == 0 for u in report.values()), report


@pytest.mark.slow
def test_lora_bias_on_the_scanned_decoder_and_refused_on_lookups(key):
    model = Decoder()
    tokens = jax.random.randint(key, (2, 8), 0, 64)
    params = model.init(key, tokens)
    spec = jlora.LoraSpec(rank=2, targets=["query", "out", "up"], lora_bias=True)
    adapters = _nonzero(jlora.init(spec, params, key, fn=model.apply, args=(tokens,)), key)
    assert adapters["params"]["layers"]["query"]["kernel"].lora_bias.shape == (2, 32)
    np.testing.assert_allclose(
        jax.jit(jlora.lora(model.apply))(params, adapters, tokens),
        model.apply(jlora.merge(params, adapters), tokens), rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    tied = jlora.LoraSpec(rank=2, targets=["embed"], lora_bias=True)
    with pytest.raises(ValueError, match=r"applies only where its weight is used as x·W"):
        jlora.lora(model.apply)(params, jlora.init(tied, params, key), tokens)


def test_merge_refuses_a_layer_without_a_bias(key):
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    spec = jlora.LoraSpec(rank=1, targets=["dense"], lora_bias=True)
    adapters = jlora.init(spec, params, key)
    y = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])(params, _nonzero(adapters, key),
                                                          jnp.ones((1, 4)))  # fmt: skip
    assert y.shape == (1, 3)
    with pytest.raises(ValueError, match="params has no 'dense/bias'"):
        jlora.merge(params, adapters)


def test_spec_and_vllm_errors(key, tmp_path):
    with pytest.raises(ValueError, match="lora_bias=True does not combine with dora"):
        jlora.LoraSpec(rank=1, targets="w", lora_bias=True, dora=True)
    with pytest.raises(TypeError, match="lora_bias must be a bool"):
        jlora.LoraSpec(rank=1, targets="w", lora_bias=1)
    params = {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
    spec = jlora.LoraSpec(rank=8, targets=["dense"], lora_bias=True)
    adapters = jlora.init(spec, params, key)
    with pytest.raises(ValueError, match="vLLM has deprecated LoRA biases"):
        jlora.peft.save(tmp_path, adapters, spec, key_map="flax", target="vllm")
    table = {"e": {"embedding": jnp.ones((10, 4))}}
    looked_up = jlora.init(jlora.LoraSpec(rank=1, targets=["e"], lora_bias=True), table, key)
    with pytest.raises(ValueError, match=r"applies only where its weight is used as x·W"):
        jlora.lora(lambda p, i: p["e"]["embedding"][i])(table, looked_up, jnp.array([1]))


def test_checkpoint_round_trip(key, tmp_path):
    params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    spec = jlora.LoraSpec(rank=2, targets=["dense"], lora_bias=True)
    adapters = _nonzero(jlora.init(spec, params, key), key)
    jlora.save(tmp_path / "ckpt", adapters, spec)
    back, back_spec = jlora.load(tmp_path / "ckpt")
    assert back_spec.lora_bias
    node = back["dense"]["kernel"]
    assert isinstance(node, jlora.LoraBiasAdapter)
    np.testing.assert_array_equal(node.lora_bias, adapters["dense"]["kernel"].lora_bias)


# -- PEFT itself --------------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.test_peft_interop import ATOL, make_twins  # noqa: E402
from tests.torch_convert import flax_to_torch_state  # noqa: E402

TARGETS = ["query", "value", "intermediate"]


@pytest.fixture(scope="module")
def bert():
    twins = make_twins("bert")
    return twins.params, twins.fn, twins.torch_model.eval(), twins.input_ids


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.interop
@pytest.mark.slow
def test_jlora_lora_bias_loads_in_peft_and_merges_alike(bert, key, tmp_path):
    params, fn, torch_model, ids = bert
    spec = jlora.LoraSpec(rank=4, alpha=8.0, targets=TARGETS, lora_bias=True)
    jids = jnp.asarray(ids, jnp.int32)
    adapters = _nonzero(jlora.init(spec, params, key, fn=fn, args=(jids,)), key)
    ours = np.asarray(jlora.lora(fn)(params, adapters, jids))
    jlora.peft.save(tmp_path, adapters, spec, key_map="bert")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
    assert peft_model.peft_config["default"].lora_bias
    np.testing.assert_allclose(_torch_logits(peft_model, ids), ours, atol=ATOL)
    # Without the biases the logits differ: the file's biases are used.
    no_bias = jax.tree.map(lambda n: jlora.LoraAdapter(n.lora_a, n.lora_b, n.scale, n.layout),
                           adapters, is_leaf=jlora.is_adapter)  # fmt: skip
    assert np.abs(np.asarray(jlora.lora(fn)(params, no_bias, jids)) - ours).max() > 1e-3
    merged_torch = peft_model.merge_and_unload()
    want = flax_to_torch_state(jlora.merge(params, adapters), merged_torch)
    for name, parameter in merged_torch.named_parameters():
        np.testing.assert_allclose(parameter.detach().numpy(), want[name].numpy(), rtol=1e-5,
                                   atol=1e-5, err_msg=name)  # fmt: skip


@pytest.mark.interop
@pytest.mark.slow
# PEFT 0.21 takes any 1-D lora_B tensor for an ungathered ZeRO-3 shard, lora_B.bias too.
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")
def test_peft_lora_bias_loads_in_jlora(bert, tmp_path):
    params, fn, torch_model, ids = bert
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                             init_lora_weights=False, lora_bias=True)  # fmt: skip
    peft_model = peft.get_peft_model(copy.deepcopy(torch_model), config).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                parameter.normal_(0.0, 0.5)
    theirs = _torch_logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    adapters, spec = jlora.peft.load(tmp_path, params, key_map="bert")
    assert spec.lora_bias
    nodes = jax.tree.leaves(adapters, is_leaf=jlora.is_adapter)
    assert nodes and all(isinstance(n, jlora.LoraBiasAdapter) for n in nodes)
    ours = np.asarray(jlora.lora(fn)(params, adapters, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, theirs, atol=ATOL)


def test_extract_with_lora_bias_recovers_the_tuned_biases(key):
    model = _Mlp()
    x = jax.random.normal(key, (2, 6, 8))
    base = model.init(key, x)
    tuned = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(key, p.shape), base)
    adapters = jlora.extract(base, tuned, energy=1.0, targets=["up", "heads"], fn=model.apply,
                             args=(x,), alpha=2.0, lora_bias=True)  # fmt: skip
    node = adapters["params"]["up"]["kernel"]
    assert isinstance(node, jlora.LoraBiasAdapter)
    merged = jlora.merge(base, adapters)
    for layer in ("up", "heads"):
        np.testing.assert_allclose(merged["params"][layer]["bias"], tuned["params"][layer]["bias"],
                                   atol=1e-5)  # fmt: skip
        np.testing.assert_allclose(merged["params"][layer]["kernel"],
                                   tuned["params"][layer]["kernel"], atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(
        jlora.lora(model.apply)(base, adapters, x),
        model.apply({"params": {**tuned["params"], "conv": base["params"]["conv"]}}, x),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
