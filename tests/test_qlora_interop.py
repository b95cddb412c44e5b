"""QLoRA against the real thing: a bitsandbytes 4-bit Llama in transformers + PEFT (torch CPU).

A tiny random Llama is saved by PyTorch, loaded back with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` and saved again in
the bnb-4bit safetensors layout. jlora reads those very codes
(``jlora.peft.load_bnb_4bit``) into its Flax twin.

bitsandbytes 0.50's CPU 4-bit matmul is not exact: ``Linear4bit(x)`` differs from
``x @ dequantize_4bit(W).T`` by about 1e-3 on this model (measured; its decode itself
is exact). So the exact reference is the PyTorch model carrying bitsandbytes' own
decode of each 4-bit layer (:func:`decoded_twin`), where the base logits, a LoRA adapter
that PEFT made on the 4-bit layers, and a jlora-trained adapter loaded back into PEFT
must agree with jlora to 1e-4. Against PEFT running the 4-bit layers themselves only
bitsandbytes' own kernel error is left (up to 3 % of the largest logit after training,
measured); that is checked loosely, as a sanity check that the 4-bit model is the one.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import jlora  # noqa: E402
import jlora.peft  # noqa: E402
from tests.torch_convert import copy_into  # noqa: E402

pytestmark = pytest.mark.interop

ATOL = 1e-4
VOCAB = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(True, id="double_quant"),
        pytest.param(False, id="plain", marks=pytest.mark.slow),  # the same path, 15 s
    ],
)
def twins(request, tmp_path_factory):
    config = transformers.LlamaConfig(
        hidden_size=64,
        # bitsandbytes' native CPU 4-bit matmul fails when in_features is not a multiple
        # of 64 (tests/test_nf4.py covers such shapes against its portable decoder).
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    with jax.numpy_dtype_promotion("standard"):
        flax_model = transformers.FlaxLlamaForCausalLM(config, seed=0)
    torch_model = copy_into(flax_model.params, transformers.LlamaForCausalLM(config))
    float_dir = tmp_path_factory.mktemp("float")
    torch_model.save_pretrained(float_dir)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=request.param,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model_4bit = transformers.LlamaForCausalLM.from_pretrained(
        float_dir, quantization_config=quantization, torch_dtype=torch.float32
    ).eval()
    quant_dir = tmp_path_factory.mktemp("bnb4bit")
    model_4bit.save_pretrained(quant_dir)

    qparams = jlora.peft.load_bnb_4bit(quant_dir, flax_model.params, key_map="llama")
    decoded = decoded_twin(model_4bit, torch_model)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 8)).astype(np.int64)

    def fn(params, ids):
        with jax.numpy_dtype_promotion("standard"):
            return flax_model(ids, params=params).logits

    return dict(
        model_4bit=model_4bit, decoded=decoded, qparams=qparams, fn=fn, ids=ids, flax=flax_model
    )


def decoded_twin(model_4bit, float_model):
    """``float_model`` with each 4-bit layer's weight set to bitsandbytes' decode of it."""
    import bitsandbytes

    twin = copy.deepcopy(float_model)
    modules = dict(twin.named_modules())
    decoded = 0
    for name, module in model_4bit.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            weight = bitsandbytes.functional.dequantize_4bit(
                module.weight.data, module.weight.quant_state
            )
            with torch.no_grad():
                modules[name].weight.copy_(weight.float())
            decoded += 1
    assert decoded == 2 * len(TARGETS)
    return twin.eval()


def assert_close_to_bnb_kernel(ours, theirs):
    """Within bitsandbytes' CPU kernel error: 10 % of the largest logit."""
    assert np.abs(ours - theirs).max() < 0.1 * np.abs(ours).max()


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def jlora_logits(twins, adapters):
    ids = jnp.asarray(twins["ids"], jnp.int32)
    return np.asarray(jax.jit(jlora.lora(twins["fn"]))(twins["qparams"], adapters, ids))


def test_the_file_is_read_into_nf4_nodes_and_gives_the_4bit_models_logits(twins):
    nodes = [
        leaf
        for leaf in jax.tree.leaves(
            twins["qparams"], is_leaf=lambda x: isinstance(x, jlora.QuantizedWeight)
        )
        if isinstance(leaf, jlora.QuantizedWeight)
    ]
    assert len(nodes) == 2 * len(TARGETS)
    assert all(n.codes.dtype == jnp.uint8 for n in nodes)
    ours = jlora_logits(twins, {})
    np.testing.assert_allclose(ours, torch_logits(twins["decoded"], twins["ids"]), atol=ATOL)
    theirs = torch_logits(twins["model_4bit"], twins["ids"])
    assert_close_to_bnb_kernel(ours, theirs)
    # Not the float model's logits: the codes, not the original weights, are in use.
    float_logits = np.asarray(twins["fn"](twins["flax"].params, jnp.asarray(twins["ids"])))
    assert np.abs(float_logits - ours).max() > 1e-4


def test_peft_qlora_adapter_loads_in_jlora_on_the_same_codes(twins, tmp_path):
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(twins["model_4bit"]), config).eval()
    on_4bit = torch_logits(peft_model, twins["ids"])
    assert np.abs(on_4bit - torch_logits(twins["model_4bit"], twins["ids"])).max() > 1e-2
    peft_model.save_pretrained(tmp_path)
    exact = peft.PeftModel.from_pretrained(copy.deepcopy(twins["decoded"]), tmp_path).eval()
    adapters, _ = jlora.peft.load(tmp_path, twins["qparams"], key_map="llama")
    ours = jlora_logits(twins, adapters)
    np.testing.assert_allclose(ours, torch_logits(exact, twins["ids"]), atol=ATOL)
    assert_close_to_bnb_kernel(ours, on_4bit)


def test_jlora_qlora_adapter_loads_in_peft_on_the_4bit_model(twins, tmp_path):
    qparams, fn = twins["qparams"], twins["fn"]
    ids = jnp.asarray(twins["ids"], jnp.int32)
    spec = jlora.LoraSpec(rank=4, alpha=8.0, targets=TARGETS)
    adapters = jlora.init(spec, qparams, jax.random.key(1), fn=fn, args=(ids,))
    shape = jax.eval_shape(jlora.lora(fn), qparams, {}, ids).shape
    target = jax.random.normal(jax.random.key(2), shape)

    def loss(a):
        return jnp.mean((jlora.lora(fn)(qparams, a, ids) - target) ** 2)

    tx = optax.adam(3e-2)
    state = tx.init(adapters)

    @jax.jit
    def step(a, s):
        grads = jax.grad(loss)(a)
        with jax.numpy_dtype_promotion("standard"):
            updates, s = tx.update(grads, s)
        return optax.apply_updates(a, updates), s

    for _ in range(3):
        adapters, state = step(adapters, state)
    ours = jlora_logits(twins, adapters)
    assert np.abs(ours - jlora_logits(twins, {})).max() > 1e-2
    jlora.peft.save(tmp_path, adapters, spec, key_map="llama")
    on_4bit = peft.PeftModel.from_pretrained(copy.deepcopy(twins["model_4bit"]), tmp_path)
    exact = peft.PeftModel.from_pretrained(copy.deepcopy(twins["decoded"]), tmp_path)
    np.testing.assert_allclose(torch_logits(exact.eval(), twins["ids"]), ours, atol=ATOL)
    assert_close_to_bnb_kernel(ours, torch_logits(on_4bit.eval(), twins["ids"]))


def test_bad_4bit_files_are_refused(twins, tmp_path):
    with pytest.raises(FileNotFoundError, match="no safetensors file"):
        jlora.peft.load_bnb_4bit(tmp_path / "missing", twins["flax"].params, key_map="llama")
    import safetensors.numpy

    safetensors.numpy.save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="holds no bitsandbytes NF4 weight"):
        jlora.peft.load_bnb_4bit(tmp_path / "m.safetensors", twins["flax"].params, key_map="llama")
