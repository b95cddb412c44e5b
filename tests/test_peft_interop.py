"""jlora.peft against the real thing: PEFT + PyTorch on GPT-2, Llama and BERT.

For each family a tiny random Hugging Face Flax model and its PyTorch twin get the same
weights (``tests/torch_convert.py``); base logits must agree first. Then adapters
trained a few steps in jlora are exported and loaded with ``PeftModel.from_pretrained``,
and a PEFT adapter made in PyTorch (random, non-zero ``lora_B``) is loaded into jlora;
in both directions the logits must agree to 1e-4.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jlora  # noqa: E402
import jlora.peft  # noqa: E402
from tests.torch_convert import copy_into  # noqa: E402

pytestmark = pytest.mark.interop

ATOL = 1e-4
SEQ = 8
VOCAB = 50


@dataclasses.dataclass(frozen=True)
class Family:
    key_map: str
    config: Callable[[], Any]
    flax_class: str
    torch_class: str
    spec: jlora.LoraSpec  # what jlora trains and exports
    peft_config: dict[str, Any]  # what PEFT makes in PyTorch for the reverse direction


FAMILIES = {
    "gpt2": Family(
        key_map="gpt2",
        config=lambda: transformers.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32
        ),
        flax_class="FlaxGPT2LMHeadModel",
        torch_class="GPT2LMHeadModel",
        # wte is tied to the LM head (a jlora adapter there changes both uses, PEFT's
        # only the lookup), so the embedding target is the position table wpe.
        spec=jlora.LoraSpec(
            rank=4,
            alpha=8.0,
            targets=["c_attn", "c_proj", "c_fc", "wpe"],
            rank_pattern={"h/1/attn/c_attn": 2},
            alpha_pattern={"c_fc": 4.0},
        ),
        peft_config=dict(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_proj", "c_fc", "wpe"],
            rank_pattern={"h.0.mlp.c_proj": 2},
            alpha_pattern={"c_attn": 3},
            fan_in_fan_out=True,
        ),
    ),
    "llama": Family(
        key_map="llama",
        config=lambda: transformers.LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            tie_word_embeddings=False,
        ),
        flax_class="FlaxLlamaForCausalLM",
        torch_class="LlamaForCausalLM",
        spec=jlora.LoraSpec(
            rank=4,
            alpha=6.0,
            rslora=True,
            targets=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "embed_tokens",
            ],
        ),
        peft_config=dict(
            r=4,
            lora_alpha=6,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "embed_tokens"],
        ),
    ),
    "bert": Family(
        key_map="bert",
        config=lambda: transformers.BertConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            num_labels=3,
        ),
        flax_class="FlaxBertForSequenceClassification",
        torch_class="BertForSequenceClassification",
        spec=jlora.LoraSpec(
            rank=4, alpha=8.0, targets=["query", "value", "intermediate", "word_embeddings"]
        ),
        peft_config=dict(
            r=4,
            lora_alpha=16,
            target_modules=["query", "key", "dense", "word_embeddings"],
            rank_pattern={"pooler.dense": 2},
        ),
    ),
}


@dataclasses.dataclass
class Twins:
    family: Family
    params: Any
    fn: Callable  # fn(params, input_ids) -> logits, the Flax model
    torch_model: Any
    input_ids: np.ndarray

    def torch_logits(self, model) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(self.input_ids)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def twins(request) -> Twins:
    return make_twins(request.param)


def make_twins(name: str) -> Twins:
    """A random Flax model of family ``name`` and its PyTorch copy, on the same ids."""
    family = FAMILIES[name]
    config = family.config()
    with jax.numpy_dtype_promotion("standard"):  # Hugging Face's Flax code is not strict
        flax_model = getattr(transformers, family.flax_class)(config, seed=0)
    torch.manual_seed(0)
    torch_model = getattr(transformers, family.torch_class)(config)
    copy_into(flax_model.params, torch_model)
    input_ids = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int64)

    def fn(params, ids):
        with jax.numpy_dtype_promotion("standard"):
            return flax_model(ids, params=params).logits

    return Twins(family, flax_model.params, fn, torch_model, input_ids)


def jlora_logits(twins: Twins, adapters) -> np.ndarray:
    ids = jnp.asarray(twins.input_ids, jnp.int32)
    return np.asarray(jax.jit(jlora.lora(twins.fn))(twins.params, adapters, ids))


def test_base_logits_agree(twins):
    flax_logits = np.asarray(twins.fn(twins.params, jnp.asarray(twins.input_ids, jnp.int32)))
    np.testing.assert_allclose(flax_logits, twins.torch_logits(twins.torch_model), atol=ATOL)


def test_jlora_trained_adapters_load_in_peft(twins, tmp_path):
    family, ids = twins.family, jnp.asarray(twins.input_ids, jnp.int32)
    adapters = jlora.init(family.spec, twins.params, jax.random.key(1), fn=twins.fn, args=(ids,))
    shape = jax.eval_shape(twins.fn, twins.params, ids).shape
    target = jax.random.normal(jax.random.key(2), shape)

    def loss(adapters):
        return jnp.mean((jlora.lora(twins.fn)(twins.params, adapters, ids) - target) ** 2)

    tx = optax.adam(3e-2)
    state = tx.init(adapters)

    @jax.jit
    def step(adapters, state):
        grads = jax.grad(loss)(adapters)
        with jax.numpy_dtype_promotion("standard"):  # adam's bias correction: f32 ** i32
            updates, state = tx.update(grads, state)
        return optax.apply_updates(adapters, updates), state

    for _ in range(3):
        adapters, state = step(adapters, state)
    ours = jlora_logits(twins, adapters)
    base = twins.torch_logits(twins.torch_model)
    assert np.abs(ours - base).max() > 1e-2, "training did not move the logits"

    jlora.peft.save(tmp_path, adapters, family.spec, key_map=family.key_map)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(twins.torch_model), tmp_path)
    np.testing.assert_allclose(twins.torch_logits(peft_model.eval()), ours, atol=ATOL)


def test_peft_adapter_loads_in_jlora(twins, tmp_path):
    family = twins.family
    torch.manual_seed(3)
    config = peft.LoraConfig(init_lora_weights=False, **family.peft_config)
    peft_model = peft.get_peft_model(copy.deepcopy(twins.torch_model), config).eval()
    theirs = twins.torch_logits(peft_model)
    assert np.abs(theirs - twins.torch_logits(twins.torch_model)).max() > 1e-2
    # With embedding targets PEFT also saves the base embedding: jlora checks it is ours.
    peft_model.save_pretrained(tmp_path, save_embedding_layers=True)

    ids = jnp.asarray(twins.input_ids, jnp.int32)
    adapters, spec = jlora.peft.load(tmp_path, twins.params, key_map=family.key_map)
    np.testing.assert_allclose(jlora_logits(twins, adapters), theirs, atol=ATOL)
    # The layouts learned from the model agree with the ones the key map gave.
    learned = jlora.init(spec, twins.params, jax.random.key(0), fn=twins.fn, args=(ids,))
    assert jax.tree.structure(learned) == jax.tree.structure(adapters)
