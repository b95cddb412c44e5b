"""DoRA on every model family (NNX, Equinox, Hugging Face GPT-2 / Llama / BERT), alone and
on an NF4 base, against the formula on the dequantized weights (``tests/test_dora.py``)."""

from __future__ import annotations

import jax
import pytest

import jlora
from tests.marks import slow_where
from tests.test_core import assert_all_factored, perturb
from tests.test_dora import check_against_reference

# ------------------------------------------------------------------------------------
# the model families: NNX, Equinox, Hugging Face GPT-2 / Llama / BERT
# ------------------------------------------------------------------------------------


NAMES = ("nnx", "equinox", "gpt2", "llama", "bert")
# NF4 on one family by default (the same rules, 20-30 s each); all five with -m slow.
# gpt2 and bert share llama's Hugging Face Flax code paths: with -m slow.
FAMILY_CASES = slow_where(
    [(name, quantized) for quantized in (False, True) for name in NAMES],
    ids=lambda name, quantized: f"{name}-{'nf4' if quantized else 'dense'}",
    slow=lambda name, quantized: name != "llama",  # DoRA's rules are the same on every family
)


@pytest.mark.parametrize("name, quantized", FAMILY_CASES)
def test_dora_on_every_family(name, quantized):
    """DoRA, alone and on an NF4 base, against the formula on the dequantized weights."""
    from tests.families import BUILDERS

    family = BUILDERS[name]()
    params = family.params
    if quantized:
        params = jlora.quantize(params, family.targets, fn=family.fn, args=family.args)
    spec = jlora.LoraSpec(rank=2, alpha=4.0, targets=family.targets, dora=True)
    adapters = jlora.init(spec, params, jax.random.key(1), fn=family.fn, args=family.args)
    adapters = perturb(adapters, jax.random.key(2), scale=0.2)
    check_against_reference(family.fn, params, adapters, family.args, use_jit=True)
    assert_all_factored(family.fn, params, adapters, *family.args)
