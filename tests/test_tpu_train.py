"""``tpu_scripts/``: the Llama port against transformers, and ``train.py --simulate 8``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tpu_scripts"))

import llama  # noqa: E402  (tpu_scripts is not a package)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        },
    ],
    ids=["gqa", "tied_llama3_rope"],
)
def test_llama_loads_hf_safetensors_and_matches_transformers(tmp_path, extra):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    tokens = np.random.default_rng(0).integers(0, 96, (2, 12))
    with torch.no_grad():
        expected = reference(torch.as_tensor(tokens)).logits.numpy()

    config = llama.read_config(str(tmp_path))
    model = llama.Llama(config, dtype=jnp.float32, param_dtype=jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    shardings = llama.param_shardings(abstract, mesh)
    params = llama.load_hf(str(tmp_path), abstract, shardings, config)
    q = params["params"]["layers"]["q"]["kernel"]
    assert q.sharding.spec == llama.P(None, "fsdp", "tensor", None)
    with jax.default_matmul_precision("highest"):
        logits = jax.jit(model.apply)(params, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-4)
