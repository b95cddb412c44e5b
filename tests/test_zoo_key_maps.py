"""The tunix/gemma key maps' hard parts, on a gm.nn-shaped function (no zoo packages).

Fused kernels (``kv_einsum`` (2, K, D, H), ``gating_einsum`` (2, F, D)) are written as
their PyTorch modules with one shared A and slices of B; a file whose parts have their
own A's loads as one adapter of the summed rank; a tied embedding is written to both
the embedding and the head. References: the adapters' own deltas (``node.delta()``)
and a float64 merge written here from the file's tensors.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora
import jlora.peft
from jlora.errors import FileFormatError
from tests.test_peft import perturb, read

V, D, N, H, F = 16, 8, 2, 4, 6
TOKENS = jnp.array([[1, 5, 9, 3], [7, 2, 11, 4]])


def gemma_like(key):
    keys = jax.random.split(key, 6)
    w = lambda k, shape: 0.3 * jax.random.normal(k, shape)
    return {"params": {
        "embedder": {"input_embedding": w(keys[0], (V, D))},
        "layer_0": {
            "attn": {"q_einsum": {"w": w(keys[1], (N, D, H))},
                     "kv_einsum": {"w": w(keys[2], (2, N, D, H))},
                     "attn_vec_einsum": {"w": w(keys[3], (N, H, D))}},
            "mlp": {"gating_einsum": w(keys[4], (2, F, D)), "linear": w(keys[5], (F, D))},
        },
    }}  # fmt: skip


def fn(params, tokens):
    p = params["params"]
    table = p["embedder"]["input_embedding"]
    x = table[tokens]
    attn, mlp = p["layer_0"]["attn"], p["layer_0"]["mlp"]
    q = jnp.einsum("btd,ndh->btnh", x, attn["q_einsum"]["w"])
    k, v = jnp.einsum("btd,cndh->cbtnh", x, attn["kv_einsum"]["w"])
    x = x + jnp.einsum("btnh,nhd->btd", jnp.tanh(q * k) + v, attn["attn_vec_einsum"]["w"])
    gate = jnp.einsum("btd,nfd->btnf", x, mlp["gating_einsum"])
    x = x + jnp.einsum("btf,fd->btd", jax.nn.gelu(gate[:, :, 0]) * gate[:, :, 1], mlp["linear"])
    return jnp.einsum("btd,vd->btv", x, table)  # the tied head


TARGETS = ["input_embedding", "q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum",
           "linear"]  # fmt: skip


def random_adapters(params, spec, seed=0):
    adapters = jlora.init(spec, params, jax.random.key(seed), fn=fn, args=(TOKENS,))
    return perturb(adapters, seed, scale=1.0)


def test_fused_kernels_become_their_modules_with_a_shared_a_and_sliced_b(tmp_path):
    params = gemma_like(jax.random.key(0))
    spec = jlora.LoraSpec(rank=2, alpha=6.0, targets=TARGETS)
    adapters = random_adapters(params, spec)
    jlora.peft.save(tmp_path, adapters, spec, key_map="gemma")
    config, tensors = read(tmp_path)
    prefix = "base_model.model.model.layers.0."
    assert sorted(config["target_modules"]) == sorted(
        [f"model.layers.0.self_attn.{m}_proj" for m in "qkvo"]
        + [f"model.layers.0.mlp.{m}_proj" for m in ("gate", "up", "down")]
        + ["model.embed_tokens", "lm_head"]
    )
    scale = 6.0 / 2
    layer = adapters["params"]["layer_0"]
    fused = [(layer["attn"]["kv_einsum"]["w"], ["self_attn.k_proj", "self_attn.v_proj"]),
             (layer["mlp"]["gating_einsum"], ["mlp.gate_proj", "mlp.up_proj"])]  # fmt: skip
    for node, parts in fused:
        grouped = np.asarray(node.layout.to_grouped(node.delta()))  # (in, out), out = (2, ...)
        width = grouped.shape[1] // 2
        for k, part in enumerate(parts):
            a = tensors[f"{prefix}{part}.lora_A.weight"]
            b = tensors[f"{prefix}{part}.lora_B.weight"]
            np.testing.assert_array_equal(a, np.asarray(node.lora_a).T)  # one A for both
            np.testing.assert_allclose(scale * b @ a, grouped[:, k * width : (k + 1) * width].T,
                                       rtol=1e-5, atol=1e-5)  # fmt: skip
    # The tied table: its update reaches the lookup and, transposed, the head.
    table = adapters["params"]["embedder"]["input_embedding"]
    delta = np.asarray(table.delta())  # (V, D)
    emb = scale * tensors["base_model.model.model.embed_tokens.lora_embedding_B"] @ tensors[
        "base_model.model.model.embed_tokens.lora_embedding_A"]  # fmt: skip
    head = scale * tensors["base_model.model.lm_head.lora_B.weight"] @ tensors[
        "base_model.model.lm_head.lora_A.weight"]  # fmt: skip
    np.testing.assert_allclose(emb.T, delta, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head, delta, rtol=1e-5, atol=1e-5)
    # Back in, the same adapters at the same rank, bit for bit.
    loaded, loaded_spec = jlora.peft.load(tmp_path, params, key_map="gemma", fn=fn, args=(TOKENS,))
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(got, want)
    assert loaded_spec.rank == 2 and not loaded_spec.rank_pattern


def test_parts_with_their_own_a_load_as_one_adapter_of_the_summed_rank(tmp_path):
    params = gemma_like(jax.random.key(1))
    rng = np.random.default_rng(2)
    r_k, r_v, alpha_k, alpha_v = 2, 3, 4.0, 9.0  # different ranks and scales
    in_f, out_f = D, N * H
    factors = {
        "k_proj": (rng.normal(size=(r_k, in_f)), rng.normal(size=(out_f, r_k)), alpha_k / r_k),
        "v_proj": (rng.normal(size=(r_v, in_f)), rng.normal(size=(out_f, r_v)), alpha_v / r_v),
    }
    tensors = {}
    for name, (a, b, _) in factors.items():
        key = f"base_model.model.model.layers.0.self_attn.{name}"
        tensors[f"{key}.lora_A.weight"] = a.astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = b.astype(np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / jlora.peft.WEIGHTS_NAME)
    config = {"peft_type": "LORA", "r": r_k, "lora_alpha": alpha_k,
              "target_modules": ["k_proj", "v_proj"], "rank_pattern": {"v_proj": r_v},
              "alpha_pattern": {"v_proj": alpha_v}}  # fmt: skip
    (tmp_path / jlora.peft.CONFIG_NAME).write_text(json.dumps(config))
    adapters, _ = jlora.peft.load(tmp_path, params, key_map="gemma", fn=fn, args=(TOKENS,))
    node = adapters["params"]["layer_0"]["attn"]["kv_einsum"]["w"]
    assert node.rank == r_k + r_v
    # The reference: the file's updates merged in float64 into the (2, N, D, H) kernel.
    merged = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    kv = merged["params"]["layer_0"]["attn"]["kv_einsum"]["w"]
    for c, (a, b, s) in enumerate(factors.values()):
        update = (s * b.astype(np.float32) @ a.astype(np.float32)).T  # (D, N·H)
        kv[c] += update.reshape(D, N, H).transpose(1, 0, 2)
    want = fn(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), merged), TOKENS)
    got = jlora.lora(fn)(params, adapters, TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(np.asarray(got - fn(params, TOKENS)))) > 1e-2  # the update shows


def test_a_head_that_disagrees_with_its_tied_embedding_is_refused(tmp_path):
    params = gemma_like(jax.random.key(0))
    spec = jlora.LoraSpec(rank=2, alpha=2.0, targets=["input_embedding"])
    jlora.peft.save(tmp_path, random_adapters(params, spec), spec, key_map="gemma")
    path = tmp_path / jlora.peft.WEIGHTS_NAME
    tensors = safetensors.numpy.load_file(path)
    tensors["base_model.model.lm_head.lora_A.weight"] *= 2  # trained apart
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(FileFormatError, match="tied"):
        jlora.peft.load(tmp_path, params, key_map="gemma", fn=fn, args=(TOKENS,))


def test_vllm_target_refuses_the_embedding_of_these_families(tmp_path):
    params = gemma_like(jax.random.key(0))
    spec = jlora.LoraSpec(rank=8, alpha=16.0, targets=TARGETS, rank_pattern={"linear": 1},
                          alpha_pattern={"linear": 2.0})  # fmt: skip
    adapters = random_adapters(params, spec)
    with pytest.raises(ValueError, match="embedder/input_embedding"):
        jlora.peft.save(tmp_path / "a", adapters, spec, key_map="gemma", target="vllm")
    spec = jlora.LoraSpec(rank=8, alpha=16.0, targets=TARGETS[1:-1])
    jlora.peft.save(tmp_path / "b", random_adapters(params, spec), spec, key_map="gemma",
                    target="vllm")  # fmt: skip
    assert "lm_head" not in read(tmp_path / "b")[0]["target_modules"]


def test_tunix_names_map_to_hugging_face_modules():
    maps = jlora.peft.KEY_MAPS
    assert maps["tunix-qwen3"]("layers/3/attn/q_proj/w/value") == "model.layers.3.self_attn.q_proj"
    assert maps["tunix-llama3"]("layers/0/mlp/down_proj/kernel/value") == (
        "model.layers.0.mlp.down_proj")  # fmt: skip
    assert maps["tunix-llama3"]("embedder/input_embedding/value") == "model.embed_tokens"
    assert maps["tunix-qwen3"]("layers/0/attn/q_norm/w/value") is None
    assert maps["tunix-gemma3"].parts("layers/1/attn/qkv_einsum/w/value") == tuple(
        f"model.layers.1.self_attn.{m}_proj" for m in "qkv")  # fmt: skip
    assert maps["tunix-gemma3"]("layers/1/attn/attn_vec_einsum/w/value") == (
        "model.layers.1.self_attn.o_proj")  # fmt: skip
