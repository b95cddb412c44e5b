"""The engine's two axes: a new adapter kind is a class, not a new branch in the rules.

A toy kind defined here (a LoRA whose rank components are gated by a trainable vector)
runs through every layout rule, scan slicing, sharding specs, optimizer labels and
checkpoints with no change to jlora: all of them follow its axis signatures.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from jlora import _adapter
from jlora.sharding import field_specs
from tests.models import Decoder
from tests.test_core import assert_all_factored, check_equivalence, perturb, projection_loss


@dataclasses.dataclass
class GatedAdapter(jlora.LoraAdapter):
    """``W + s·(A·diag(g))·B``: one trainable gate per rank component and stack index."""

    gate: jax.Array | None = None

    KIND: ClassVar[str] = "gated"
    SIGNATURES: ClassVar[dict] = {
        "lora_a": ("S", "I", "R"),
        "lora_b": ("S", "R", "O"),
        "gate": ("S", "R"),
    }

    def _gated_b(self):
        # gate (*S, r) against B (*S, r, *O) in either form: insert one axis per B axis
        # after the rank.
        extra = self.lora_b.ndim - self.gate.ndim
        return self.lora_b * self.gate.reshape(self.gate.shape + (1,) * extra)

    def term(self, use, x, base, weight):
        return use.lowrank(x, self.lora_a, self._gated_b(), self.scale)

    def delta(self):
        return jlora.LoraAdapter(self.lora_a, self._gated_b(), self.scale, self.layout).delta()


jax.tree_util.register_dataclass(
    GatedAdapter,
    data_fields=["lora_a", "lora_b", "gate"],
    meta_fields=["scale", "layout", "dropout"],
)


@pytest.fixture
def gated_kind(monkeypatch):
    monkeypatch.setitem(_adapter.KINDS, "gated", GatedAdapter)
    return GatedAdapter


def _gated(adapters, key):
    def one(node):
        gate = jax.random.uniform(key, (*node.layout.stack_shape, node.rank), minval=0.5)
        return GatedAdapter(**vars(node), gate=gate)

    return jax.tree.map(one, adapters, is_leaf=jlora.is_adapter)


def _decoder_case():
    model = Decoder(scan=True)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    params = model.init(jax.random.key(1), tokens)
    spec = jlora.LoraSpec(rank=3, targets=["query", "out", "up", "down", "embed"])
    adapters = jlora.init(spec, params, jax.random.key(2), fn=model.apply, args=(tokens,))
    adapters = _gated(perturb(adapters, jax.random.key(3)), jax.random.key(4))
    return model.apply, params, adapters, tokens


@pytest.mark.parametrize("use_jit", [True], ids=["jit"])
def test_a_new_adapter_kind_runs_everywhere_unchanged(gated_kind, use_jit):
    fn, params, adapters, tokens = _decoder_case()
    check_equivalence(fn, params, adapters, (tokens,), use_jit=use_jit)
    assert_all_factored(fn, params, adapters, tokens)
    assert set(jlora.explain(fn, params, adapters, tokens).kinds.values()) == {("dense", "gated")}


def test_a_new_kind_gets_labels_specs_and_checkpoints(gated_kind, tmp_path):
    adapters = _decoder_case()[2]
    labels = jlora.labels(adapters)
    assert labels["params"]["layers"]["up"]["kernel"].gate == "gate"
    tx = jlora.optimizer(optax.sgd(1.0), adapters, lora_plus_ratio=2.0)
    ones = jax.tree.map(jnp.ones_like, adapters)
    updates, _ = tx.update(ones, tx.init(adapters), adapters)
    up = updates["params"]["layers"]["up"]["kernel"]
    assert float(up.gate.min()) == -1.0 and float(up.lora_b.min()) == -2.0  # gate trained
    node = adapters["params"]["layers"]["up"]["kernel"]
    specs = field_specs(node, P(None, "fsdp", "tensor"))
    assert specs["gate"] == P(None, None) and specs["lora_b"] == P(None, None, "tensor")
    spec = jlora.LoraSpec(rank=3, targets=".*")
    jlora.save(tmp_path / "gated", adapters, spec)
    loaded, _ = jlora.load(tmp_path / "gated")
    got = loaded["params"]["layers"]["up"]["kernel"]
    assert isinstance(got, GatedAdapter)
    np.testing.assert_array_equal(got.gate, node.gate)


# -- the fast backward in loop bodies ---------------------------------------------------


def _custom_vjp_in_scan_bodies(closed) -> int:
    found = 0

    def walk(jaxpr, in_scan):
        nonlocal found
        for eqn in jaxpr.eqns:
            if in_scan and eqn.primitive.name == "custom_vjp_call":
                found += 1
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else [value]:
                    inner = getattr(item, "jaxpr", item)
                    if isinstance(inner, jax.extend.core.Jaxpr):
                        walk(inner, in_scan or eqn.primitive.name == "scan")

    walk(closed.jaxpr, False)
    return found


@pytest.mark.parametrize("fast_backward", [False, True], ids=["autodiff", "fast"])
def test_the_fast_backward_reaches_scan_bodies(fast_backward):
    model = Decoder(scan=True)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    params = model.init(jax.random.key(1), tokens)
    spec = jlora.LoraSpec(rank=4, targets=["query", "key", "value", "out", "up", "down"])
    adapters = perturb(
        jlora.init(spec, params, jax.random.key(2), fn=model.apply, args=(tokens,)),
        jax.random.key(3),
    )
    lora_fn = jlora.lora(model.apply, fast_backward=fast_backward)
    closed = jax.make_jaxpr(lora_fn)(params, adapters, tokens)
    uses = _custom_vjp_in_scan_bodies(closed)
    # up and down are plain projections (the attention kernels are DenseGeneral, whose
    # x·W contracts the trailing axis too): each runs through the low-rank custom VJP.
    assert (uses >= 2) if fast_backward else (uses == 0), uses

    def loss(a, fn):
        return projection_loss(fn(params, a, tokens), jax.random.key(5))

    plain = jlora.lora(model.apply, fast_backward=False)
    got = jax.grad(loss)(adapters, lora_fn)
    want = jax.grad(loss)(adapters, plain)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(jnp.abs(w).max()))


# -- one axis map for the engine and init -------------------------------------------------


def test_init_and_the_engine_agree_on_slices():
    """A weight sliced on a feature axis cannot be factored: init does not target it (it
    used to propose a layout that the engine then had to materialize every step)."""
    params = {"fused": {"kernel": jnp.ones((4, 6))}, "other": {"kernel": jnp.ones((4, 2))}}

    def fn(p, x):
        q, k = p["fused"]["kernel"][:, :3], p["fused"]["kernel"][:, 3:]
        return (x @ q) * (x @ k) + (x @ p["other"]["kernel"]).sum()

    x = jnp.ones((2, 4))
    spec = jlora.LoraSpec(rank=1, targets=["fused", "other"])
    with pytest.warns(UserWarning, match="fused"):
        adapters = jlora.init(spec, params, jax.random.key(0), fn=fn, args=(x,))
    assert list(adapters) == ["other"]

    def stacked(p, x):  # a slice of a stack axis is a layer index: both accept it
        return x @ p["fused"]["kernel"][1]

    params3 = {"fused": {"kernel": jnp.ones((3, 4, 6))}}
    spec3 = jlora.LoraSpec(rank=1, targets=["fused"])
    adapters3 = jlora.init(spec3, params3, jax.random.key(0), fn=stacked, args=(x,))
    assert adapters3["fused"]["kernel"].layout.stack_axes == (0,)
    assert_all_factored(stacked, params3, adapters3, x)
