"""jlora.peft without torch: the file format, round trips, vLLM checks and bad files.

The format checks use an independent reference: PEFT's update is
``scale * lora_B @ lora_A`` in PyTorch's ``(out_features, in_features)`` orientation, so
it must equal ``jlora.delta`` with the weight's input axes flattened into columns and
its output axes into rows, per layer of a stacked weight.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora
import jlora.peft
from jlora.peft import CONFIG_NAME, WEIGHTS_NAME, KeyMap
from tests.models import Decoder, perturb

# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------


def read(directory):
    with open(os.path.join(directory, CONFIG_NAME)) as handle:
        config = json.load(handle)
    return config, safetensors.numpy.load_file(os.path.join(directory, WEIGHTS_NAME))


def torch_delta(tensors, module, scale, *, embedding=False):
    """PEFT's update of ``module`` in PyTorch's (out, in) orientation."""
    a_key, b_key = (
        ("lora_embedding_A", "lora_embedding_B")
        if embedding
        else (
            "lora_A.weight",
            "lora_B.weight",
        )
    )
    lora_a = tensors[f"base_model.model.{module}.{a_key}"].astype(np.float64)
    lora_b = tensors[f"base_model.model.{module}.{b_key}"].astype(np.float64)
    return scale * lora_b @ lora_a


def jlora_delta_out_in(weight_delta, in_axes, out_axes):
    """A weight-shaped update as (prod(out), prod(in)): inputs to columns, outputs to rows."""
    moved = np.transpose(np.asarray(weight_delta, np.float64), out_axes + in_axes)
    n_out = math.prod(moved.shape[: len(out_axes)])
    return moved.reshape(n_out, -1)


def assert_same_adapters(actual, expected):
    """Bit-exact: same tree, same static data, same factor bytes and dtypes."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------


def dense_params():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "embed": {"embedding": jnp.asarray(rng.normal(size=(11, 6)), jnp.float32)},
            "dense": {
                "kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                "bias": jnp.zeros(5),
            },
        }
    }


def dense_fn(params, tokens):
    p = params["params"]
    x = jnp.take(p["embed"]["embedding"], tokens, axis=0)
    return x @ p["dense"]["kernel"] + p["dense"]["bias"]


TOKENS = jnp.array([[1, 2, 3, 10]], jnp.int32)


def gpt2_like_params():
    """Hugging Face Flax GPT-2 stores Conv1D kernels (out, in)."""
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(12, 4)), jnp.float32)
    return {"transformer": {"h": {"0": {"attn": {"c_attn": {"kernel": kernel}}}}}}


def gpt2_like_fn(params, x):
    kernel = params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    return x @ kernel.T


DECODER_MAP = KeyMap(
    "decoder", modules=r"embed|layers/.*", rename=((r"^layers/", "model/layers/{}/"),)
)


@pytest.fixture(scope="module")
def decoder():
    model = Decoder(vocab=32, d_model=16, heads=2, mlp=32, layers=3)
    tokens = jnp.zeros((1, 5), jnp.int32)
    params = model.init(jax.random.key(0), tokens)
    return model, params, tokens


# ------------------------------------------------------------------------------------
# format: keys, shapes and the update PEFT computes
# ------------------------------------------------------------------------------------


def test_dense_and_embedding_format(tmp_path):
    params = dense_params()
    spec = jlora.LoraSpec(rank=3, alpha=6.0, targets=["dense", "embed"])
    adapters = perturb(jlora.init(spec, params, jax.random.key(1)), 2)
    jlora.peft.save(tmp_path, adapters, spec, key_map="flax")
    config, tensors = read(tmp_path)

    assert sorted(tensors) == [
        "base_model.model.dense.lora_A.weight",
        "base_model.model.dense.lora_B.weight",
        "base_model.model.embed.lora_embedding_A",
        "base_model.model.embed.lora_embedding_B",
    ]
    assert tensors["base_model.model.dense.lora_A.weight"].shape == (3, 6)  # (r, in)
    assert tensors["base_model.model.dense.lora_B.weight"].shape == (5, 3)  # (out, r)
    assert tensors["base_model.model.embed.lora_embedding_A"].shape == (3, 11)  # (r, vocab)
    assert tensors["base_model.model.embed.lora_embedding_B"].shape == (6, 3)  # (dim, r)
    deltas = jlora.delta(adapters)["params"]
    np.testing.assert_allclose(
        torch_delta(tensors, "dense", 2.0), np.asarray(deltas["dense"]["kernel"]).T, rtol=1e-5
    )
    # nn.Embedding's update is (num_embeddings, dim) = (B @ A).T, as Flax stores it.
    np.testing.assert_allclose(
        torch_delta(tensors, "embed", 2.0, embedding=True).T,
        np.asarray(deltas["embed"]["embedding"]),
        rtol=1e-5,
    )
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (3, 6, False)
    assert config["target_modules"] == ["dense", "embed"]
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["fan_in_fan_out"] is False and config["bias"] == "none"


def test_transposed_gpt2_kernel(tmp_path):
    params = gpt2_like_params()
    x = jnp.ones((2, 4))
    spec = jlora.LoraSpec(rank=2, alpha=2.0, targets=["c_attn"])
    adapters = jlora.init(spec, params, jax.random.key(1), fn=gpt2_like_fn, args=(x,))
    adapters = perturb(adapters, 2)
    node = adapters["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert (node.layout.in_axes, node.layout.out_axes) == ((1,), (0,))

    jlora.peft.save(tmp_path, adapters, spec, key_map="gpt2")
    config, tensors = read(tmp_path)
    module = "transformer.h.0.attn.c_attn"
    assert tensors[f"base_model.model.{module}.lora_A.weight"].shape == (2, 4)
    assert tensors[f"base_model.model.{module}.lora_B.weight"].shape == (12, 2)
    # The Flax kernel is (out, in), PyTorch's (out, in) update is the same matrix.
    delta = np.asarray(jlora.delta(adapters)["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"])
    np.testing.assert_allclose(torch_delta(tensors, module, 1.0), delta, rtol=1e-5)
    assert config["fan_in_fan_out"] is True

    # Without fn, the gpt2 key map knows the storage: same adapters, bit for bit.
    loaded, _ = jlora.peft.load(tmp_path, params, key_map="gpt2")
    assert_same_adapters(loaded, adapters)
    np.testing.assert_allclose(
        jlora.lora(gpt2_like_fn)(params, loaded, x),
        gpt2_like_fn(jlora.merge(params, adapters), x),
        rtol=1e-5,
    )


def test_gpt2_adapter_with_wrong_layout_is_refused(tmp_path):
    params = gpt2_like_params()
    spec = jlora.LoraSpec(rank=2, targets=["c_attn"])
    adapters = jlora.init(spec, params, jax.random.key(1))  # no fn: read as (in, out)
    with pytest.raises(ValueError, match=r"c_attn/kernel.*in_axes=\(1,\).*fn="):
        jlora.peft.save(tmp_path, adapters, spec, key_map="gpt2")


def test_stacked_multi_axis_decoder(decoder, tmp_path):
    model, params, tokens = decoder
    spec = jlora.LoraSpec(rank=2, alpha=4.0, targets=["query", "out", "up", "embed"])
    adapters = jlora.init(spec, params, jax.random.key(1), fn=model.apply, args=(tokens,))
    adapters = perturb(adapters, 2)
    jlora.peft.save(tmp_path, adapters, spec, key_map=DECODER_MAP)
    config, tensors = read(tmp_path)

    layers = params["params"]["layers"]
    deltas = jlora.delta(adapters)["params"]["layers"]
    assert len(tensors) == 2 * (3 * 3 + 1)  # three stacked targets x three layers + embed
    for name, in_axes, out_axes in [("query", (0,), (1, 2)), ("out", (0, 1), (2,))]:
        node = adapters["params"]["layers"][name]["kernel"]
        assert node.layout.stack_axes == (0,)
        assert node.layout.in_axes == tuple(a + 1 for a in in_axes)
        for layer in range(3):
            module = f"model.layers.{layer}.{name}"
            expected = jlora_delta_out_in(deltas[name]["kernel"][layer], in_axes, out_axes)
            np.testing.assert_allclose(torch_delta(tensors, module, 2.0), expected, rtol=1e-5)
    assert tensors["base_model.model.model.layers.1.query.lora_B.weight"].shape == (16, 2)
    assert tensors["base_model.model.model.layers.2.out.lora_A.weight"].shape == (2, 16)
    assert layers["out"]["kernel"].shape == (3, 2, 8, 16)
    assert "model.layers.2.up" in config["target_modules"]

    loaded, loaded_spec = jlora.peft.load(
        tmp_path, params, key_map=DECODER_MAP, fn=model.apply, args=(tokens,)
    )
    assert_same_adapters(loaded, adapters)
    assert loaded_spec.rank == 2 and loaded_spec.alpha == 4.0
    # Without fn a 4-D stacked kernel's axes cannot be told apart.
    with pytest.raises(ValueError, match=r"layers/out/kernel.*fn="):
        jlora.peft.load(tmp_path, params, key_map=DECODER_MAP)


def test_stacked_target_needs_a_layer_field(decoder, tmp_path):
    model, params, tokens = decoder
    spec = jlora.LoraSpec(rank=2, targets=["query"])
    adapters = jlora.init(spec, params, jax.random.key(1), fn=model.apply, args=(tokens,))
    with pytest.raises(ValueError, match=r"layers/query/kernel.*1 stack axes.*'\{\}'"):
        jlora.peft.save(tmp_path, adapters, spec, key_map="flax")


def test_missing_layer_is_named(decoder, tmp_path):
    model, params, tokens = decoder
    spec = jlora.LoraSpec(rank=2, targets=["query"])
    adapters = jlora.init(spec, params, jax.random.key(1), fn=model.apply, args=(tokens,))
    jlora.peft.save(tmp_path, adapters, spec, key_map=DECODER_MAP)
    _, tensors = read(tmp_path)
    kept = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    safetensors.numpy.save_file(kept, os.path.join(tmp_path, WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"layer \[1\].*layers/query/kernel"):
        jlora.peft.load(tmp_path, params, key_map=DECODER_MAP, fn=model.apply, args=(tokens,))


# ------------------------------------------------------------------------------------
# config: rank and alpha patterns, rsLoRA, dtypes
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns_round_trip(tmp_path, rslora):
    params = {f"layer_{i}": {"kernel": jnp.ones((8, 8))} for i in range(3)}
    spec = jlora.LoraSpec(
        rank=4,
        alpha=8.0,
        rslora=rslora,
        targets=".*kernel",
        rank_pattern={"layer_1": 2},
        alpha_pattern={"layer_2": 3.0},
    )
    adapters = perturb(jlora.init(spec, params, jax.random.key(0)), 1)
    jlora.peft.save(tmp_path, adapters, spec, key_map="flax")
    config, _ = read(tmp_path)
    assert config["rank_pattern"] == {"layer_1": 2}
    assert config["alpha_pattern"] == {"layer_2": 3}
    assert config["use_rslora"] is rslora

    loaded, loaded_spec = jlora.peft.load(tmp_path, params, key_map="flax")
    assert_same_adapters(loaded, adapters)
    for i in range(3):
        path = f"layer_{i}/kernel"
        assert loaded[f"layer_{i}"]["kernel"].scale == pytest.approx(spec.scale_for(path))
        assert loaded_spec.scale_for(path) == pytest.approx(spec.scale_for(path))
        assert loaded_spec.rank_for(path) == spec.rank_for(path)
    assert loaded_spec.select(params) == spec.select(params)


def test_peft_pattern_semantics_on_load(tmp_path):
    """PEFT's keys match a suffix of the module name at a '.' boundary, first key wins."""
    params = {"h": {str(i): {"attn": {"kernel": jnp.ones((4, 4))}} for i in range(12)}}
    spec = jlora.LoraSpec(rank=2, alpha=2.0, targets=["attn"])
    jlora.peft.save(tmp_path, jlora.init(spec, params, jax.random.key(0)), spec, key_map="flax")
    config, _ = read(tmp_path)
    config["alpha_pattern"] = {"h.1.attn": 4, "attn": 6}
    with open(os.path.join(tmp_path, CONFIG_NAME), "w") as handle:
        json.dump(config, handle)
    loaded, _ = jlora.peft.load(tmp_path, params, key_map="flax")
    assert loaded["h"]["1"]["attn"]["kernel"].scale == 2.0
    assert loaded["h"]["11"]["attn"]["kernel"].scale == 3.0  # "h.1.attn" is not its suffix


def test_bfloat16_factors_are_bit_exact(tmp_path):
    params = dense_params()
    spec = jlora.LoraSpec(rank=2, targets=["dense"])
    adapters = jlora.init(spec, params, jax.random.key(1), dtype=jnp.bfloat16)
    adapters = perturb(adapters, 2)
    jlora.peft.save(tmp_path, adapters, spec, key_map="flax")
    _, tensors = read(tmp_path)
    assert tensors["base_model.model.dense.lora_A.weight"].dtype == jnp.bfloat16
    loaded, _ = jlora.peft.load(tmp_path, params, key_map="flax")
    assert_same_adapters(loaded, adapters)


@settings(max_examples=6, deadline=None)
@given(
    n_in=st.integers(1, 6),
    n_out=st.integers(1, 6),
    rank=st.integers(1, 3),
    transposed=st.booleans(),
)
def test_round_trip_property(tmp_path_factory, n_in, n_out, rank, transposed):
    rank = min(rank, n_in, n_out)
    shape = (n_out, n_in) if transposed else (n_in, n_out)
    params = {"w": {"kernel": jnp.ones(shape)}}
    layout = jlora.Layout(shape, (), (1,) if transposed else (0,), (0,) if transposed else (1,))
    rng = np.random.default_rng(n_in * 7 + n_out)
    node = jlora.LoraAdapter(
        lora_a=jnp.asarray(rng.normal(size=layout.a_shape(rank)), jnp.float32),
        lora_b=jnp.asarray(rng.normal(size=layout.b_shape(rank)), jnp.float32),
        scale=1.5,
        layout=layout,
    )
    adapters = {"w": {"kernel": node}}
    spec = jlora.LoraSpec(rank=rank, alpha=1.5 * rank, targets=["w"])
    key_map = KeyMap("w", transposed="w" if transposed else None)
    directory = tmp_path_factory.mktemp("prop")
    jlora.peft.save(directory, adapters, spec, key_map=key_map)
    _, tensors = read(directory)
    expected = jlora_delta_out_in(
        jlora.delta(adapters)["w"]["kernel"], *(((1,), (0,)) if transposed else ((0,), (1,)))
    )
    np.testing.assert_allclose(torch_delta(tensors, "w", 1.5), expected, rtol=1e-5, atol=1e-6)
    loaded, _ = jlora.peft.load(directory, params, key_map=key_map)
    assert_same_adapters(loaded, adapters)


# ------------------------------------------------------------------------------------
# key maps
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_map, path, name",
    [
        ("gpt2", "params/transformer/h/3/mlp/c_fc/kernel", "transformer.h.3.mlp.c_fc"),
        ("gpt2", "transformer/wte/embedding", "transformer.wte"),
        ("gpt2", "transformer/h/0/ln_1/scale", None),
        ("llama", "model/layers/1/self_attn/q_proj/kernel", "model.layers.1.self_attn.q_proj"),
        ("llama", "params/model/embed_tokens/embedding", "model.embed_tokens"),
        ("llama", "lm_head/kernel", "lm_head"),
        ("llama", "model/layers/1/input_layernorm/weight", None),
        (
            "bert",
            "bert/encoder/layer/0/attention/self/query/kernel",
            "bert.encoder.layer.0.attention.self.query",
        ),
        ("bert", "bert/embeddings/word_embeddings/embedding", "bert.embeddings.word_embeddings"),
        ("flax", "params/block/attn/query/kernel/value", "block.attn.query"),
    ],
)
def test_builtin_key_maps(key_map, path, name):
    assert jlora.peft.KEY_MAPS[key_map](path) == name


def test_custom_callable_key_map(tmp_path):
    params = dense_params()
    spec = jlora.LoraSpec(rank=2, targets=["dense"])
    adapters = jlora.init(spec, params, jax.random.key(1))

    def my_map(path):
        return "model.proj" if path == "params/dense/kernel" else None

    jlora.peft.save(tmp_path, adapters, spec, key_map=my_map)
    _, tensors = read(tmp_path)
    assert "base_model.model.model.proj.lora_A.weight" in tensors
    loaded, _ = jlora.peft.load(tmp_path, params, key_map=my_map)
    assert_same_adapters(loaded, adapters)


def test_unnamed_path_and_unknown_key_map(tmp_path):
    params = dense_params()
    spec = jlora.LoraSpec(rank=2, targets=["dense"])
    adapters = jlora.init(spec, params, jax.random.key(1))
    with pytest.raises(ValueError, match=r"'gpt2' has no PyTorch module name.*params/dense/kernel"):
        jlora.peft.save(tmp_path, adapters, spec, key_map="gpt2")
    with pytest.raises(ValueError, match=r"unknown key_map 'gpt3'.*'bert'"):
        jlora.peft.save(tmp_path, adapters, spec, key_map="gpt3")


# ------------------------------------------------------------------------------------
# vLLM
# ------------------------------------------------------------------------------------


def test_vllm_accepts_a_plain_adapter(tmp_path):
    params = {"w": {"kernel": jnp.ones((16, 16))}}
    spec = jlora.LoraSpec(rank=8, alpha=16.0, targets=["w"])
    jlora.peft.save(
        tmp_path, jlora.init(spec, params, jax.random.key(0)), spec, key_map="flax", target="vllm"
    )
    assert read(tmp_path)[0]["r"] == 8


@pytest.mark.parametrize(
    "spec_kwargs, message",
    [
        (dict(rank=4), r"vLLM supports LoRA ranks \[1, 8, .*'a/kernel' has rank 4"),
        (dict(rank=8, alpha_pattern={"b": 4.0}), r"lora_alpha / r.*'b/kernel' has scale 0.5"),
        (dict(rank=8, trainable=".*bias"), r"biases.*'a/bias'"),
        (dict(rank=8, trainable=["norm"]), r"modules_to_save.*'norm/scale'"),
    ],
)
def test_vllm_constraints(tmp_path, spec_kwargs, message):
    params = {
        "a": {"kernel": jnp.ones((16, 16)), "bias": jnp.zeros(16)},
        "b": {"kernel": jnp.ones((16, 16))},
        "norm": {"scale": jnp.ones(16)},
    }
    spec = jlora.LoraSpec(alpha=16.0, targets=["a", "b"], **spec_kwargs)
    adapters = jlora.init(spec, params, jax.random.key(0))
    with pytest.raises(ValueError, match=message):
        jlora.peft.save(tmp_path, adapters, spec, key_map="flax", target="vllm")
    assert not os.path.exists(os.path.join(tmp_path, WEIGHTS_NAME))


def test_unknown_target_and_trainable_leaves(tmp_path):
    params = {"a": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    spec = jlora.LoraSpec(rank=2, targets=["a"], trainable=".*bias")
    adapters = jlora.init(spec, params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"target must be None or 'vllm'; found 'tgi'"):
        jlora.peft.save(tmp_path, adapters, spec, key_map="flax", target="tgi")
    with pytest.raises(ValueError, match=r"trained base leaves \['a/bias'\].*jlora.checkpoint"):
        jlora.peft.save(tmp_path, adapters, spec, key_map="flax")


# ------------------------------------------------------------------------------------
# bad files
# ------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    params = dense_params()
    spec = jlora.LoraSpec(rank=2, targets=["dense"])
    jlora.peft.save(tmp_path, jlora.init(spec, params, jax.random.key(1)), spec, key_map="flax")
    return tmp_path, params


def test_truncated_weights(saved):
    directory, params = saved
    weights = os.path.join(directory, WEIGHTS_NAME)
    with open(weights, "rb") as handle:
        data = handle.read()
    with open(weights, "wb") as handle:
        handle.write(data[: len(data) - 7])
    with pytest.raises(
        ValueError, match=r"adapter_model.safetensors: not a readable .*truncated"
    ):
        jlora.peft.load(directory, params, key_map="flax")


def test_garbage_weights(saved):
    directory, params = saved
    with open(os.path.join(directory, WEIGHTS_NAME), "wb") as handle:
        handle.write(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable"):
        jlora.peft.load(directory, params, key_map="flax")


def test_malformed_config(saved):
    directory, params = saved
    with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
        handle.write('{"r": 2, "lora_alpha": ')
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid UTF-8 JSON"):
        jlora.peft.load(directory, params, key_map="flax")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, r"'dense': expected a lora_magnitude_vector, found 'none'"),
        ({"use_dora": "false"}, r"'use_dora': expected true or false, found 'false'"),
        ({"bias": "all"}, r"'bias': expected 'none', found 'all'"),
        ({"modules_to_save": ["classifier"]}, r"modules_to_save"),
        ({"peft_type": "IA3"}, r"'peft_type': expected 'LORA', found 'IA3'"),
        ({"r": "eight"}, r"'r': expected a positive integer"),
    ],
)
def test_unsupported_config(saved, change, message):
    directory, params = saved
    config, _ = read(directory)
    config.update(change)
    with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
        json.dump(config, handle)
    with pytest.raises(ValueError, match=message):
        jlora.peft.load(directory, params, key_map="flax")


def test_pickle_file_is_never_read(saved):
    directory, params = saved
    os.rename(os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, "adapter_model.bin"))
    with pytest.raises(ValueError, match=r"adapter_model.bin: a pickle file"):
        jlora.peft.load(directory, params, key_map="flax")


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json does not exist"):
        jlora.peft.load(tmp_path / "nowhere", dense_params(), key_map="flax")


def test_adapter_for_another_model(saved):
    directory, _ = saved
    other = {"params": {"dense": {"kernel": jnp.ones((7, 5))}}}
    with pytest.raises(
        ValueError, match=r"params/dense/kernel.*\[7, 5\].*'dense'.*lora_A \[2, 6\]"
    ):
        jlora.peft.load(directory, other, key_map="flax")
    renamed = {"params": {"proj": {"kernel": jnp.ones((6, 5))}}}
    with pytest.raises(ValueError, match=r"module 'dense', but no leaf of params maps to it"):
        jlora.peft.load(directory, renamed, key_map="flax")


def test_unexpected_tensor(saved):
    directory, params = saved
    _, tensors = read(directory)
    tensors["base_model.model.dense.lora_magnitude_vector"] = np.ones(5, np.float32)
    safetensors.numpy.save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"use_dora=false.*no lora_magnitude_vector, found 'one'"):
        jlora.peft.load(directory, params, key_map="flax")
    tensors["base_model.model.dense.lora_scaling_vector"] = np.ones(5, np.float32)
    del tensors["base_model.model.dense.lora_magnitude_vector"]
    safetensors.numpy.save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"which is not a PEFT LoRA factor"):
        jlora.peft.load(directory, params, key_map="flax")


def test_saved_base_embedding_must_match(tmp_path):
    """PEFT saves the base embedding of embedding targets; it must be the one in params."""
    params = dense_params()
    spec = jlora.LoraSpec(rank=2, targets=["embed"])
    adapters = perturb(jlora.init(spec, params, jax.random.key(1)), 2)
    jlora.peft.save(tmp_path, adapters, spec, key_map="flax")
    _, tensors = read(tmp_path)
    embedding = np.asarray(params["params"]["embed"]["embedding"])
    key = "base_model.model.embed.base_layer.weight"
    safetensors.numpy.save_file({**tensors, key: embedding}, os.path.join(tmp_path, WEIGHTS_NAME))
    loaded, _ = jlora.peft.load(tmp_path, params, key_map="flax")
    assert_same_adapters(loaded, adapters)
    safetensors.numpy.save_file(
        {**tensors, key: embedding + 1.0}, os.path.join(tmp_path, WEIGHTS_NAME)
    )
    with pytest.raises(ValueError, match=r"base weight of 'embed'.*params/embed/embedding"):
        jlora.peft.load(tmp_path, params, key_map="flax")


def test_load_onto_abstract_params(tmp_path):
    """Shapes are enough (``jax.ShapeDtypeStruct``), as ``jlora convert`` uses it."""
    params = dense_params()
    spec = jlora.LoraSpec(rank=2, targets=["dense", "embed"])
    adapters = perturb(jlora.init(spec, params, jax.random.key(1)), 3)
    jlora.peft.save(tmp_path, adapters, spec, key_map="flax")
    _, tensors = read(tmp_path)
    embedding = np.asarray(params["params"]["embed"]["embedding"])
    key = "base_model.model.embed.base_layer.weight"
    safetensors.numpy.save_file({**tensors, key: embedding}, os.path.join(tmp_path, WEIGHTS_NAME))
    shapes = jax.eval_shape(lambda: params)
    loaded, _ = jlora.peft.load(tmp_path, shapes, key_map="flax")
    assert_same_adapters(loaded, adapters)


def test_key_map_with_leaf_names_tells_apart_the_weights_under_one_moe_layer():
    plain = jlora.peft.KeyMap("moe", rename=((r"^layers/(\d+)/", "model/layers/\\1/"),))
    named = dataclasses.replace(plain, leaf_names=True)
    paths = ["layers/0/mlp/gate_proj/value", "layers/0/mlp/up_proj/value"]
    assert [plain(p) for p in paths] == ["model.layers.0.mlp"] * 2  # the old rule: one name
    assert [named(p) for p in paths] == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    # generic leaf names stay off the module name
    assert named("params/layers/0/attn/q_proj/kernel") == "model.layers.0.attn.q_proj"
