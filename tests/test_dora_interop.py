"""DoRA files against the real thing: PEFT's ``use_dora`` on GPT-2, Llama and BERT (torch CPU).

The twins (a tiny random Hugging Face Flax model and its PyTorch copy) come from
``tests/test_peft_interop.py``. In both directions the logits must agree to 1e-4, and
PEFT's ``merge_and_unload()`` must give the weights ``jlora.merge`` gives.
"""

from __future__ import annotations

import copy
import dataclasses

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
from tests import test_peft_interop  # noqa: E402
from tests.test_peft_interop import ATOL, Twins, jlora_logits  # noqa: E402
from tests.torch_convert import flax_to_torch_state  # noqa: E402

pytestmark = pytest.mark.interop

twins = test_peft_interop.twins  # the same module-scoped fixture: one pair per family


def _trained_dora(twins: Twins, spec: jlora.LoraSpec):
    ids = jnp.asarray(twins.input_ids, jnp.int32)
    adapters = jlora.init(spec, twins.params, jax.random.key(1), fn=twins.fn, args=(ids,))
    shape = jax.eval_shape(twins.fn, twins.params, ids).shape
    target = jax.random.normal(jax.random.key(2), shape)

    def loss(adapters):
        return jnp.mean((jlora.lora(twins.fn)(twins.params, adapters, ids) - target) ** 2)

    tx = jlora.optimizer(optax.adam(3e-2), adapters)
    state = tx.init(adapters)

    @jax.jit
    def step(adapters, state):
        grads = jax.grad(loss)(adapters)
        with jax.numpy_dtype_promotion("standard"):  # adam's bias correction: f32 ** i32
            updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state

    start = adapters
    for _ in range(3):
        adapters, state = step(adapters, state)
    moved = [
        float(jnp.abs(a.magnitude - b.magnitude).max())
        for a, b in zip(
            jax.tree.leaves(adapters, is_leaf=jlora.is_adapter),
            jax.tree.leaves(start, is_leaf=jlora.is_adapter),
        )
    ]
    assert min(moved) > 0, "the optimizer left a DoRA magnitude untrained"
    return adapters


def test_jlora_dora_loads_in_peft_and_merges_alike(twins, tmp_path):
    family = twins.family
    spec = dataclasses.replace(family.spec, dora=True)
    adapters = _trained_dora(twins, spec)
    ours = jlora_logits(twins, adapters)
    assert np.abs(ours - twins.torch_logits(twins.torch_model)).max() > 1e-2

    jlora.peft.save(tmp_path, adapters, spec, key_map=family.key_map)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(twins.torch_model), tmp_path)
    assert peft_model.peft_config["default"].use_dora
    np.testing.assert_allclose(twins.torch_logits(peft_model.eval()), ours, atol=ATOL)

    merged_torch = peft_model.merge_and_unload()
    want = flax_to_torch_state(jlora.merge(twins.params, adapters), merged_torch)
    for name, parameter in merged_torch.named_parameters():
        np.testing.assert_allclose(
            parameter.detach().numpy(), want[name].numpy(), rtol=1e-5, atol=1e-5, err_msg=name
        )

    # The CLI merges the same file into PyTorch-named weights, by the library's merge.
    import safetensors.numpy

    from jlora.cli import main

    base_file = tmp_path / "base.safetensors"
    state = {k: v.numpy() for k, v in flax_to_torch_state(twins.params, merged_torch).items()}
    safetensors.numpy.save_file(state, str(base_file))
    out = tmp_path / "merged.safetensors"
    argv = ["merge", "--base", str(base_file), "--adapter", str(tmp_path), "--out", str(out)]
    assert main(argv) == 0
    by_cli = safetensors.numpy.load_file(str(out))
    for name, parameter in merged_torch.named_parameters():
        np.testing.assert_allclose(
            by_cli[name], parameter.detach().numpy(), rtol=1e-5, atol=1e-5, err_msg=name
        )


def test_peft_dora_loads_in_jlora(twins, tmp_path):
    family = twins.family
    torch.manual_seed(3)
    config = peft.LoraConfig(init_lora_weights=False, use_dora=True, **family.peft_config)
    peft_model = peft.get_peft_model(copy.deepcopy(twins.torch_model), config).eval()
    with torch.no_grad():  # magnitudes away from their initial norms
        for name, parameter in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.0 + 0.2 * torch.rand_like(parameter))
    theirs = twins.torch_logits(peft_model)
    assert np.abs(theirs - twins.torch_logits(twins.torch_model)).max() > 1e-2
    peft_model.save_pretrained(tmp_path, save_embedding_layers=True)

    adapters, spec = jlora.peft.load(tmp_path, twins.params, key_map=family.key_map)
    assert spec.dora
    kinds = {type(n).__name__ for n in jax.tree.leaves(adapters, is_leaf=jlora.is_adapter)}
    assert kinds == {"DoraAdapter"}
    np.testing.assert_allclose(jlora_logits(twins, adapters), theirs, atol=ATOL)


def test_vllm_target_refuses_dora(tmp_path):
    params = {"dense": {"kernel": jnp.ones((8, 4))}}
    spec = jlora.LoraSpec(rank=8 // 2, targets=["dense"], dora=True)
    adapters = jlora.init(spec, params, jax.random.key(0))
    with pytest.raises(ValueError, match="vLLM does not load DoRA"):
        jlora.peft.save(tmp_path, adapters, spec, key_map="flax", target="vllm")
