"""LoraSpec(trainable_token_indices=...): chosen embedding rows train, against the merged
model and PEFT itself (torch CPU), composed with LoRA on the same model."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.peft
from tests.models import Decoder

INDICES = [3, 17, 40]


@pytest.fixture(scope="module")
def decoder():
    model = Decoder()
    tokens = jnp.array([[3, 5, 17, 9, 40, 3, 1, 2], [0, 40, 40, 8, 17, 6, 3, 63]])
    params = model.init(jax.random.key(2), tokens)
    return model, params, tokens


def _moved(adapters, key):
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


def test_tokens_with_lora_equal_the_merged_model_on_a_tied_decoder(decoder, key):
    model, params, tokens = decoder
    spec = jlora.LoraSpec(rank=2, targets=["query", "value"],
                          trainable_token_indices={"embed": INDICES})  # fmt: skip
    adapters = jlora.init(spec, params, key, fn=model.apply, args=(tokens,))
    node = adapters["params"]["embed"]["embedding"]
    assert isinstance(node, jlora.TokensAdapter) and node.indices == tuple(INDICES)
    table = params["params"]["embed"]["embedding"]
    np.testing.assert_array_equal(node.rows, table[jnp.array(INDICES)])
    np.testing.assert_array_equal(jlora.lora(model.apply)(params, adapters, tokens),
                                  model.apply(params, tokens))  # fmt: skip
    adapters = _moved(adapters, key)

    def loss(a):
        return jnp.sum(jax.jit(jlora.lora(model.apply))(params, a, tokens) ** 2)

    def loss_merged(a):
        return jnp.sum(model.apply(jlora.merge(params, a), tokens) ** 2)

    value, grads = jax.value_and_grad(loss)(adapters)
    value_ref, grads_ref = jax.value_and_grad(loss_merged)(adapters)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        # An element of a gradient is a float32 sum of terms as large as the gradient's
        # largest (up to ~200 here), so its rounding is relative to that, not to itself.
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-6 * float(np.max(np.abs(r))))
    merged = jlora.merge(params, adapters)["params"]["embed"]["embedding"]
    others = np.setdiff1d(np.arange(table.shape[0]), INDICES)
    np.testing.assert_array_equal(merged[others], table[others])  # every other row frozen
    np.testing.assert_array_equal(merged[jnp.array(INDICES)],
                                  adapters["params"]["embed"]["embedding"].rows)  # fmt: skip
    report = jlora.explain(model.apply, params, adapters, tokens)
    embed = report["params/embed/embedding"]
    assert embed.materialized == 0 and embed.factored == 2, report  # lookup and tied head
    lora = sum(n.lora_a.size + n.lora_b.size for n in jax.tree.leaves(
        adapters, is_leaf=jlora.is_adapter) if not isinstance(n, jlora.TokensAdapter))
    trainable = len(INDICES) * table.shape[1] + lora
    assert jlora.summary(params, adapters).startswith(f"trainable params: {trainable:,} ")


def test_tokens_alone_list_form_and_checkpoint(decoder, key, tmp_path):
    model, params, tokens = decoder
    spec = jlora.LoraSpec(targets=[], trainable_token_indices=INDICES)
    adapters = _moved(jlora.init(spec, params, key), key)
    assert list(adapters["params"]) == ["embed"]
    jlora.save(tmp_path / "ckpt", adapters, spec)
    back, back_spec = jlora.load(tmp_path / "ckpt")
    assert back_spec.trainable_token_indices == tuple(INDICES)
    node = back["params"]["embed"]["embedding"]
    assert isinstance(node, jlora.TokensAdapter) and node.indices == tuple(INDICES)
    np.testing.assert_array_equal(node.rows, adapters["params"]["embed"]["embedding"].rows)
    np.testing.assert_allclose(jlora.lora(model.apply)(params, back, tokens),
                               model.apply(jlora.merge(params, adapters), tokens),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="no longer holds the base's"):
        jlora.unmerge(jlora.merge(params, adapters), adapters)


def test_errors(decoder, key):
    params = decoder[1]
    with pytest.raises(ValueError, match="names 0 2-D leaves"):
        jlora.init(jlora.LoraSpec(targets=[], trainable_token_indices={"nope": [1]}), params, key)
    with pytest.raises(ValueError, match=r"expected distinct row indices in \[0, 64\)"):
        jlora.init(jlora.LoraSpec(targets=[], trainable_token_indices=[70]), params, key)
    with pytest.raises(ValueError, match="both a LoRA target and a trainable_token_indices"):
        jlora.init(jlora.LoraSpec(targets=["embed"], trainable_token_indices=[1]), params, key)
    with pytest.raises(ValueError, match="non-empty list of non-negative token indices"):
        jlora.LoraSpec(targets=[], trainable_token_indices=[])
    two = {"tok": {"embedding": jnp.ones((8, 4))}, "embed": {"embedding": jnp.ones((8, 4))}}
    with pytest.raises(ValueError, match="found 2 candidates"):
        jlora.init(jlora.LoraSpec(targets=[], trainable_token_indices=[1]), two, key)


# -- PEFT itself --------------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.test_peft_interop import ATOL, make_twins  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    twins = make_twins("llama")
    ids = twins.input_ids.copy()
    ids[:, ::3] = 7  # the trained tokens appear
    ids[0, 1] = 11
    return twins.params, twins.fn, twins.torch_model.eval(), ids


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.interop
@pytest.mark.slow
def test_jlora_tokens_with_lora_load_in_peft(llama, key, tmp_path):
    params, fn, torch_model, ids = llama
    spec = jlora.LoraSpec(rank=4, alpha=8.0, targets=["q_proj", "v_proj"],
                          trainable_token_indices={"embed_tokens": [7, 11]})  # fmt: skip
    jids = jnp.asarray(ids, jnp.int32)
    adapters = _moved(jlora.init(spec, params, key, fn=fn, args=(jids,)), key)
    ours = np.asarray(jlora.lora(fn)(params, adapters, jids))
    assert np.abs(ours - _torch_logits(torch_model, ids)).max() > 1e-2
    jlora.peft.save(tmp_path, adapters, spec, key_map="llama")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
    assert peft_model.peft_config["default"].trainable_token_indices
    np.testing.assert_allclose(_torch_logits(peft_model, ids), ours, atol=ATOL)
    back, back_spec = jlora.peft.load(tmp_path, params, key_map="llama")
    node = back["model"]["embed_tokens"]["embedding"]
    assert isinstance(node, jlora.TokensAdapter) and node.indices == (7, 11)
    assert back_spec.trainable_token_indices == {"embed_tokens": (7, 11)}
    np.testing.assert_allclose(np.asarray(jlora.lora(fn)(params, back, jids)), ours, atol=1e-5)


@pytest.mark.interop
def test_peft_tokens_with_lora_load_in_jlora(llama, tmp_path):
    params, fn, torch_model, ids = llama
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False, trainable_token_indices=[7, 11])  # fmt: skip
    peft_model = peft.get_peft_model(copy.deepcopy(torch_model), config).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.add_(torch.randn_like(parameter))
    theirs = _torch_logits(peft_model, ids)
    assert np.abs(theirs - _torch_logits(torch_model, ids)).max() > 1e-2
    peft_model.save_pretrained(tmp_path)
    adapters, spec = jlora.peft.load(tmp_path, params, key_map="llama")
    assert spec.trainable_token_indices == {"embed_tokens": (7, 11)}
    assert isinstance(adapters["model"]["embed_tokens"]["embedding"], jlora.TokensAdapter)
    ours = np.asarray(jlora.lora(fn)(params, adapters, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, theirs, atol=ATOL)
