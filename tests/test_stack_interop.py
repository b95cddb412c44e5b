"""A stack against PEFT's own mixed batch: ``adapter_names=[...]`` on the PyTorch twin.

Two jlora adapters on a tiny Llama are stacked, written in PEFT's multi-adapter layout
(``<dir>/<name>/``), loaded into PEFT with ``from_pretrained`` + ``load_adapter``, and
run as one batch whose examples name their adapter (``"__base__"``: none). jlora's
mixed batch (``lora_ids``) must give the same logits; the files read back as the stack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jlora  # noqa: E402
import jlora.peft  # noqa: E402
from tests.torch_convert import copy_into  # noqa: E402

pytestmark = pytest.mark.interop
VOCAB = 50


def test_a_stack_serves_in_peft_as_a_mixed_batch(tmp_path):
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    with jax.numpy_dtype_promotion("standard"):
        flax_model = transformers.FlaxLlamaForCausalLM(config, seed=0)
    torch.manual_seed(0)
    torch_model = transformers.LlamaForCausalLM(config)
    copy_into(flax_model.params, torch_model)
    input_ids = np.random.default_rng(0).integers(0, VOCAB, (3, 8)).astype(np.int64)

    def fn(params, ids):
        with jax.numpy_dtype_promotion("standard"):
            return flax_model(ids, params=params).logits

    params = flax_model.params
    trees = []
    for k, (rank, alpha) in enumerate([(4, 8.0), (2, 3.0)]):
        spec = jlora.LoraSpec(rank=rank, alpha=alpha, targets=["q_proj", "v_proj", "down_proj"])
        made = jlora.init(spec, params, jax.random.key(k))
        rng = np.random.default_rng(k)
        trees.append(jax.tree_util.tree_map(
            lambda x, rng=rng: jnp.asarray(0.2 * rng.normal(size=x.shape).astype(np.float32)),
            made,
        ))  # fmt: skip
    stacked = jlora.stack(trees)
    jlora.peft.save(tmp_path, stacked, spec, key_map="llama", adapter_names=["sql", "docs"])

    model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "sql", adapter_name="sql")
    model.load_adapter(tmp_path / "docs", adapter_name="docs")
    model.eval()
    with torch.no_grad():
        want = model(
            torch.from_numpy(input_ids), adapter_names=["docs", "__base__", "sql"]
        ).logits.numpy()
    ids = jnp.asarray([1, -1, 0])
    tokens = jnp.asarray(input_ids, jnp.int32)
    got = jax.jit(lambda s: jlora.lora(fn)(params, s, tokens, lora_ids=ids))(stacked)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # The base example is the base model (bit for bit eagerly, see test_stack.py; here
    # under jit, to XLA's fusion order).
    np.testing.assert_allclose(got[1], fn(params, tokens)[1], atol=1e-6)

    back, names = jlora.peft.load_stack(tmp_path, params, key_map="llama",
                                        adapter_names=["sql", "docs"])  # fmt: skip
    assert names == ["sql", "docs"]
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(stacked)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
