"""tunix and gemma (gm.nn) models through jlora to PEFT files that transformers 5 loads.

These run in the zoo environment (``pip install -e '.[zoo]'``, see ``.ci/run``): tunix
and gemma need transformers 5 and TensorFlow, which the main test extra cannot hold.
Each family: a small random model on both sides with the same weights, jlora adapters
on every attention and MLP projection (random, so every factor shows), exported with
the family's built-in key map, loaded by ``PeftModel.from_pretrained`` (torch CPU), and
the logits compared to jlora's own, factored, to 1e-4, after the two bases' logits
are. The weights cross by the libraries' own converters where they have one (tunix's
safetensors loaders for Llama 3, Qwen 3 and Gemma 3), else by a table in this file
(gm.nn).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.peft
from tests.models import perturb

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


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def check_export(
    tmp_path, fn, state, torch_model, key_map, targets, *, rank=8, alpha=16.0, target="vllm",
    read_back=True,
):
    """Export random adapters for ``state`` and compare PEFT's logits with jlora's.

    Returns the adapters and their (jitted, factored) logits."""
    tokens = jnp.asarray(TOKENS)
    base = np.asarray(fn(state, tokens))
    np.testing.assert_allclose(
        base, torch_logits(torch_model, TOKENS), atol=1e-4, rtol=1e-4
    )  # the two bases are the same model
    spec = jlora.LoraSpec(rank=rank, alpha=alpha, targets=targets)
    adapters = perturb(jlora.init(spec, state, jax.random.key(0), fn=fn, args=(tokens,)), 1, 0.2)
    report = jlora.explain(fn, state, adapters, tokens)
    assert all(entry.materialized == 0 for entry in report.values()), report
    adapted = jax.jit(jlora.lora(fn))
    want = np.asarray(adapted(state, adapters, tokens))
    assert np.max(np.abs(want - base)) > 1e-2  # the update shows
    directory = os.fspath(tmp_path / "adapter")
    jlora.peft.save(directory, adapters, spec, key_map=key_map, target=target)
    served = peft.PeftModel.from_pretrained(torch_model, directory)
    np.testing.assert_allclose(torch_logits(served, TOKENS), want, atol=1e-4, rtol=1e-4)
    if not read_back:
        return adapters, want
    loaded, _ = jlora.peft.load(directory, state, key_map=key_map, fn=fn, args=(tokens,))
    back = np.asarray(adapted(state, loaded, tokens))
    np.testing.assert_allclose(back, want, atol=1e-5, rtol=1e-5)
    return adapters, want


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


# -- tunix Qwen 3 MoE: stacked expert weights as PEFT target_parameters -----------------


def _qwen3_moe_pair(tmp_path):
    from tunix.models.qwen3 import model as model_lib
    from tunix.models.qwen3 import params as params_lib

    torch.manual_seed(0)
    torch_model = transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], rope_theta=1_000_000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        )
    ).eval()  # fmt: skip
    config = model_lib.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=16,
                                   num_heads=4, head_dim=8, num_kv_heads=2, rope_theta=1_000_000,
                                   norm_eps=1e-6, num_experts=4, num_experts_per_tok=2)  # fmt: skip
    model = _hf_to_tunix(torch_model, tmp_path, params_lib.create_model_from_safe_tensors, config)
    return model, torch_model


def test_tunix_qwen3_moe_expert_adapters_load_in_peft_with_equal_logits(tmp_path):
    """tunix's gate_proj and up_proj (E, D, F) become transformers 5's one
    ``mlp.experts.gate_up_proj`` (E, 2F, D) at rank 2r (A's stacked, B block-diagonal),
    down_proj (E, F, D) its ``down_proj`` (E, D, F); PEFT runs them as target_parameters."""
    model, torch_model = _qwen3_moe_pair(tmp_path)
    fn, state = nnx_fn(model)
    check_export(tmp_path, fn, state, torch_model, "tunix-qwen3-moe", ATTENTION_MLP,
                 read_back=False)  # fmt: skip

    config = json.loads((tmp_path / "adapter" / jlora.peft.CONFIG_NAME).read_text())
    assert config["target_parameters"] == [
        f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1) for n in ("down_proj", "gate_up_proj")
    ]
    assert config["rank_pattern"] == {
        f"model.layers.{i}.mlp.experts.gate_up_proj": 16 for i in (0, 1)
    }
    assert all(name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")
               for name in config["target_modules"])  # fmt: skip
    # The router is no Linear in transformers (Qwen3MoeTopKRouter): refused, by name.
    spec = jlora.LoraSpec(rank=2, targets=["router"])
    tokens = jnp.asarray(TOKENS)
    routed = jlora.init(spec, state, jax.random.key(0), fn=fn, args=(tokens,))
    with pytest.raises(ValueError, match=r"no PyTorch module name.*router"):
        jlora.peft.save(tmp_path / "router", routed, spec, key_map="tunix-qwen3-moe")
    # The fused rank must be one vLLM serves too: rank 1 (served) gives gate_up_proj rank 2.
    small = jlora.LoraSpec(rank=1, targets=["gate_proj", "up_proj"])
    experts = jlora.init(small, state, jax.random.key(0), fn=fn, args=(tokens,))
    with pytest.raises(ValueError, match="at rank 2"):
        jlora.peft.save(tmp_path / "small", experts, small, key_map="tunix-qwen3-moe",
                        target="vllm")  # fmt: skip
    half = jlora.LoraSpec(rank=8, targets=["gate_proj"])
    gate = jlora.init(half, state, jax.random.key(0), fn=fn, args=(tokens,))
    with pytest.raises(ValueError, match="target every part"):
        jlora.peft.save(tmp_path / "half", gate, half, key_map="tunix-qwen3-moe")


# -- tunix Gemma 3: fused q/k/v (or k/v) einsums and a tied embedding --------------------


def _gemma3_pair(tmp_path, num_kv_heads):
    """A transformers 5 ``Gemma3ForCausalLM`` and tunix's Gemma 3 with its weights.

    Six layers, so tunix's 5-local-1-global pattern shows both rope frequencies, and a
    sliding window (4) shorter than the 8 tokens, so the local mask shows too.
    """
    from tunix.models.gemma3 import model as model_lib
    from tunix.models.gemma3 import params_safetensors as params_lib

    torch.manual_seed(0)
    layers = 6
    hf_config = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=8,
        rms_norm_eps=1e-6, query_pre_attn_scalar=8, sliding_window=4,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, tie_word_embeddings=True,
    )  # fmt: skip
    torch_model = transformers.Gemma3ForCausalLM(hf_config)
    with torch.no_grad():  # Gemma's norms scale by 1 + w: nonzero w so that they show
        for name, weight in torch_model.named_parameters():
            if name.endswith("norm.weight"):
                weight.normal_(0.0, 0.3)
    torch_model.eval()
    config = model_lib.ModelConfig(
        num_layers=layers, num_embed=64, embed_dim=32, hidden_dim=48, num_heads=4,
        head_dim=8, num_kv_heads=num_kv_heads, sliding_window_size=4,
        local_base_frequency=10_000, global_base_frequency=1_000_000,
        param_dtype=jnp.float32,
    )  # fmt: skip
    model = _hf_to_tunix(torch_model, tmp_path, params_lib.create_model_from_safe_tensors, config)
    return torch_model, model


@pytest.mark.parametrize("num_kv_heads", [2, 4], ids=["q-kv-einsum", "qkv-einsum"])
def test_tunix_gemma3_adapters_load_in_peft_with_equal_logits(num_kv_heads, tmp_path):
    torch_model, model = _gemma3_pair(tmp_path, num_kv_heads)
    fn, state = nnx_fn(model)
    fused = "kv_einsum" if num_kv_heads == 2 else "qkv_einsum"
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert any(fused in path for path in paths)
    attention = ["q_einsum", "kv_einsum"] if num_kv_heads == 2 else ["qkv_einsum"]
    targets = [*attention, "attn_vec_einsum", "gate_proj", "up_proj", "down_proj"]
    check_export(tmp_path, fn, state, torch_model, "tunix-gemma3", targets)


def test_tunix_gemma3_tied_embedding_adapter_loads_in_peft_as_embedding_and_head(tmp_path):
    """Gemma ties the head to the embedding: one jlora adapter on the table is PEFT's
    ``embed_tokens`` adapter and, transposed, its ``lm_head`` adapter (PEFT's own
    format; vLLM serves neither for Gemma 3, so ``target="vllm"`` would refuse)."""
    torch_model, model = _gemma3_pair(tmp_path, 2)
    fn, state = nnx_fn(model)
    adapters, want = check_export(
        tmp_path, fn, state, torch_model, "tunix-gemma3", ["input_embedding", "q_einsum"],
        target=None,
    )  # fmt: skip
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)]
    assert any("input_embedding" in path for path in paths), paths
    # Merged for deployment: the one table takes the update once. (PEFT's own
    # merge_and_unload adds it twice to a tied weight, once per module: merge in jlora.)
    merged = np.asarray(fn(jlora.merge(state, adapters), jnp.asarray(TOKENS)))
    np.testing.assert_allclose(merged, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"vLLM serves LoRA for key_map .tunix-gemma3. on"):
        spec = jlora.LoraSpec(rank=8, alpha=16.0, targets=["input_embedding"])
        jlora.peft.save(os.fspath(tmp_path / "vllm"), adapters, spec, key_map="tunix-gemma3",
                        target="vllm")  # fmt: skip


# -- gm.nn (the gemma library): weights copied across by a table, base logits first ------


def _gm_params_from_torch(torch_model, num_layers, num_heads, num_kv_heads):
    """gm.nn Gemma 3 params from a transformers ``Gemma3ForCausalLM``'s state dict.

    The table: PyTorch ``Linear`` weights are ``(out, in)``; gm.nn's einsums keep heads
    apart (``q_einsum`` (N, D, H), ``kv_einsum`` (2, K, D, H) or ``qkv_einsum``
    (3, N, D, H), ``attn_vec_einsum`` (N, H, D)), Gemma 3 stores ``gating_einsum``
    transposed (2, F, D) with gate before up, and ``linear`` is (F, D).
    """
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in torch_model.state_dict().items()}

    def heads(weight, n):  # (n*H, D) -> (n, D, H)
        return weight.reshape(n, -1, weight.shape[1]).transpose(0, 2, 1)

    params = {
        "embedder": {"input_embedding": sd["model.embed_tokens.weight"]},
        "final_norm": {"scale": sd["model.norm.weight"]},
    }
    for i in range(num_layers):
        t = f"model.layers.{i}."
        q = heads(sd[t + "self_attn.q_proj.weight"], num_heads)
        k = heads(sd[t + "self_attn.k_proj.weight"], num_kv_heads)
        v = heads(sd[t + "self_attn.v_proj.weight"], num_kv_heads)
        o = sd[t + "self_attn.o_proj.weight"]  # (D, N*H)
        attn = {
            "attn_vec_einsum": {"w": o.T.reshape(num_heads, -1, o.shape[0])},
            "_query_norm": {"scale": sd[t + "self_attn.q_norm.weight"]},
            "_key_norm": {"scale": sd[t + "self_attn.k_norm.weight"]},
        }
        if num_heads == num_kv_heads:
            attn["qkv_einsum"] = {"w": np.stack([q, k, v])}
        else:
            attn["q_einsum"] = {"w": q}
            attn["kv_einsum"] = {"w": np.stack([k, v])}
        gating = np.stack([sd[t + "mlp.gate_proj.weight"], sd[t + "mlp.up_proj.weight"]])
        params[f"layer_{i}"] = {
            "attn": attn,
            "mlp": {"gating_einsum": gating, "linear": sd[t + "mlp.down_proj.weight"].T},
            "pre_attention_norm": {"scale": sd[t + "input_layernorm.weight"]},
            "post_attention_norm": {"scale": sd[t + "post_attention_layernorm.weight"]},
            "pre_ffw_norm": {"scale": sd[t + "pre_feedforward_layernorm.weight"]},
            "post_ffw_norm": {"scale": sd[t + "post_feedforward_layernorm.weight"]},
        }
    return jax.tree.map(jnp.asarray, {"params": params})


@pytest.mark.parametrize("num_kv_heads", [2, 4], ids=["q-kv-einsum", "qkv-einsum"])
def test_gemma_gm_nn_adapters_load_in_peft_with_equal_logits(num_kv_heads, tmp_path):
    # gm.nn's model classes (gm.nn.Gemma3_1B, ...) import gemma's checkpoint code, which
    # gemma 3.3.0 cannot import with the kauldron that runs on jax 0.10; the Transformer
    # with a config of our own is the same model code.
    from gemma.gm.nn import _config, _modules, _transformer

    torch_model, _ = _gemma3_pair(tmp_path, num_kv_heads)
    local, full = _modules.AttentionType.LOCAL_SLIDING, _modules.AttentionType.GLOBAL
    config = _config.TransformerConfig(
        num_embed=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
        num_kv_heads=num_kv_heads, final_logit_softcap=None, use_post_attn_norm=True,
        use_post_ffw_norm=True, use_qk_norm=True, attention_types=(local,) * 5 + (full,),
        sliding_window_size=4, transpose_gating_einsum=True, local_base_frequency=10_000,
        global_base_frequency=1_000_000,
    )  # fmt: skip
    model = _transformer.Transformer(config=config, dtype=jnp.float32)
    params = _gm_params_from_torch(torch_model, 6, 4, num_kv_heads)
    # the table covers every leaf gm.nn has, in its shapes
    init = model.init(jax.random.key(0), jnp.asarray(TOKENS))
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)

    def fn(params, tokens):
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
        return model.apply(params, tokens, positions=positions, attention_mask=mask).logits

    attention = ["q_einsum", "kv_einsum"] if num_kv_heads == 2 else ["qkv_einsum"]
    targets = [*attention, "attn_vec_einsum", "gating_einsum", "linear"]
    check_export(tmp_path, fn, params, torch_model, "gemma", targets)
