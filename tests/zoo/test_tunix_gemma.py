"""tunix and gemma (gm.nn) models through jlora to PEFT files that transformers 5 loads.

These run in the zoo environment (``pip install -e '.[zoo]'``, see ``.ci/run``): tunix
and gemma need transformers 5 and TensorFlow, which the main test extra cannot hold.
Each family: a small random model on both sides with the same weights, jlora adapters
on every attention and MLP projection (random, so every factor shows), exported with
the family's built-in key map, loaded by ``PeftModel.from_pretrained`` (torch CPU), and
the logits compared to jlora's own, factored, to 1e-4. The weights cross by the
libraries' own converters where they have one (tunix's safetensors loader for Llama 3
and Qwen 3), else by a table in this file that the base logits check first.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.peft

tunix = pytest.importorskip("tunix")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
nnx = pytest.importorskip("flax.nnx")

TOKENS = np.array([[1, 5, 9, 3, 7, 2, 11, 4], [8, 6, 0, 13, 2, 9, 1, 7]])
ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nnx_fn(model):
    """``(fn(state, tokens) -> logits, state)`` for a tunix model: causal, no cache."""
    graphdef, state = nnx.split(model)

    def fn(state, tokens):
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
        return nnx.merge(graphdef, state)(tokens, positions, None, mask)[0]

    return fn, state


def randomized(adapters, seed, scale=0.2):
    """Every factor random (B != 0), so the exported update is seen in the logits."""
    rng = np.random.default_rng(seed)

    def noisy(node):
        if not isinstance(node, jlora.LoraAdapter):
            return node
        a = rng.normal(size=node.lora_a.shape).astype(np.float32) * scale
        b = rng.normal(size=node.lora_b.shape).astype(np.float32) * scale
        return dataclasses.replace(node, lora_a=jnp.asarray(a), lora_b=jnp.asarray(b))

    return jax.tree.map(noisy, adapters, is_leaf=jlora.is_adapter)


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def check_export(tmp_path, fn, state, torch_model, key_map, targets, *, rank=8, alpha=16.0):
    """Export random adapters for ``state`` and compare PEFT's logits with jlora's."""
    tokens = jnp.asarray(TOKENS)
    np.testing.assert_allclose(
        np.asarray(fn(state, tokens)), torch_logits(torch_model, TOKENS), atol=1e-4, rtol=1e-4
    )  # the two bases are the same model
    spec = jlora.LoraSpec(rank=rank, alpha=alpha, targets=targets)
    adapters = randomized(jlora.init(spec, state, jax.random.key(0), fn=fn, args=(tokens,)), 1)
    report = jlora.explain(fn, state, adapters, tokens)
    assert all(entry.materialized == 0 for entry in report.values()), report
    want = np.asarray(jax.jit(jlora.lora(fn))(state, adapters, tokens))
    assert np.max(np.abs(want - np.asarray(fn(state, tokens)))) > 1e-2  # the update shows
    directory = os.fspath(tmp_path / "adapter")
    jlora.peft.save(directory, adapters, spec, key_map=key_map, target="vllm")
    served = peft.PeftModel.from_pretrained(torch_model, directory)
    np.testing.assert_allclose(torch_logits(served, TOKENS), want, atol=1e-4, rtol=1e-4)
    loaded, _ = jlora.peft.load(directory, state, key_map=key_map, fn=fn, args=(tokens,))
    back = np.asarray(jax.jit(jlora.lora(fn))(state, loaded, tokens))
    np.testing.assert_allclose(back, want, atol=1e-5, rtol=1e-5)
    return directory, adapters, loaded


# -- tunix Llama 3 and Qwen 3: the weights cross by tunix's own safetensors loader ------


def _hf_to_tunix(torch_model, tmp_path, create, config):
    directory = tmp_path / "hf"
    torch_model.save_pretrained(directory, safe_serialization=True)
    return create(os.fspath(directory), config, dtype=jnp.float32)


# tunix 0.1.7's Llama 3 and Qwen 3 attention call apply_rope without the config's
# rope_theta, so they always rotate with its default 1e6: the torch twins use 1e6 too.
@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_tunix_decoder_adapters_load_in_peft_with_equal_logits(family, tmp_path):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                  tie_word_embeddings=False)  # fmt: skip
    if family == "llama3":
        from tunix.models.llama3 import model as model_lib
        from tunix.models.llama3 import params as params_lib

        torch_model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, rope_theta=1_000_000.0)
        )
    else:
        from tunix.models.qwen3 import model as model_lib
        from tunix.models.qwen3 import params as params_lib

        torch_model = transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(**common, rope_theta=1_000_000.0)
        )
    torch_model.eval()
    config = model_lib.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=48,
                                   num_heads=4, head_dim=8, num_kv_heads=2, rope_theta=1_000_000,
                                   norm_eps=1e-6)  # fmt: skip
    model = _hf_to_tunix(torch_model, tmp_path, params_lib.create_model_from_safe_tensors, config)
    fn, state = nnx_fn(model)
    check_export(tmp_path, fn, state, torch_model, f"tunix-{family}", ATTENTION_MLP)
