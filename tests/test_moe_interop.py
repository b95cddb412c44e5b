"""Expert-weight adapters written for PEFT's ``target_parameters`` and run by PEFT itself.

A PyTorch experts module holds three 3-D parameters, registered in the order
``gate_up (E, d, f)``, ``down (E, f, d)`` and ``proj_t (E, d, d)`` (stored
``(out, in)``: used as ``x·W_eᵀ``), and applies expert ``e`` to its group of rows. The
JAX twin does the same with ``jax.lax.ragged_dot``. jlora's adapters on the JAX weights
are written with :func:`jlora.peft.save`, loaded with ``PeftModel.from_pretrained`` (which
nests one ``ParamWrapper`` per parameter), and PEFT's output must equal jlora's.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jlora  # noqa: E402
import jlora.peft  # noqa: E402

pytestmark = pytest.mark.interop
E, D, F = 4, 6, 5
ORDER = ["gate_up", "down", "proj_t"]  # the PyTorch module's registration order


class Experts(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        for name in ORDER:
            self.register_parameter(name, torch.nn.Parameter(torch.tensor(weights[name])))

    def forward(self, x, sizes):
        outs, start = [], 0
        for e, size in enumerate(sizes):
            rows = x[start : start + size]
            h = torch.nn.functional.gelu(rows @ self.gate_up[e], approximate="tanh")
            outs.append((h @ self.down[e]) @ self.proj_t[e].T)
            start += size
        return torch.cat(outs)


class Model(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.experts = Experts(weights)

    def forward(self, x, sizes):
        return self.experts(x, sizes)


def jax_fn(params, x, sizes):
    p = params["experts"]
    h = jax.nn.gelu(jax.lax.ragged_dot(x, p["gate_up"], sizes), approximate=True)
    h = jax.lax.ragged_dot(h, p["down"], sizes)
    return jax.lax.ragged_dot(h, jnp.swapaxes(p["proj_t"], 1, 2), sizes)


def test_peft_runs_jlora_expert_adapters(tmp_path):
    rng = np.random.default_rng(0)
    weights = {
        "gate_up": rng.normal(size=(E, D, F)).astype(np.float32) / 2,
        "down": rng.normal(size=(E, F, D)).astype(np.float32) / 2,
        "proj_t": rng.normal(size=(E, D, D)).astype(np.float32) / 2,
    }
    params = {"experts": {k: jnp.asarray(v) for k, v in weights.items()}}
    sizes = [3, 1, 0, 4]
    x = rng.normal(size=(sum(sizes), D)).astype(np.float32)
    args = (jnp.asarray(x), jnp.asarray(sizes, jnp.int32))

    spec = jlora.LoraSpec(rank=2, alpha=3.0, targets=["experts"], rank_pattern={"down": 3},
                          alpha_pattern={"proj_t": 5.0})  # fmt: skip
    adapters = jlora.init(spec, params, jax.random.key(0), fn=jax_fn, args=args)
    assert adapters["experts"]["down"].rank == 3
    adapters = jax.tree_util.tree_map(
        lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape).astype(np.float32)), adapters
    )
    assert adapters["experts"]["proj_t"].layout.in_axes == (2,)  # stored (E, out, in)
    want = np.asarray(jlora.lora(jax_fn)(params, adapters, *args))

    directory = tmp_path / "experts"
    jlora.peft.save(directory, adapters, spec, key_map="flax", experts=["experts"],
                     parameter_order=ORDER)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(f"experts.{n}" for n in ORDER)
    assert config["rank_pattern"] == {"experts.down": 3}  # per parameter, as PEFT reads it
    assert config["alpha_pattern"] == {"experts.proj_t": 5}

    model = Model(weights)
    base = model(torch.tensor(x), sizes).detach().numpy()
    np.testing.assert_allclose(base, jax_fn(params, *args), rtol=1e-5, atol=1e-5)
    served = peft.PeftModel.from_pretrained(model, str(directory))
    with torch.no_grad():
        got = served(torch.tensor(x), sizes).numpy()
    assert np.abs(got - base).max() > 1e-2  # the adapters change the output
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # PEFT's own delta per parameter is jlora's, in the weight's own axis order.
    wrapper = served.base_model.model.experts
    for name in reversed(ORDER):  # outermost wrapper first
        np.testing.assert_allclose(
            wrapper.get_delta_weight("default").detach().numpy(),
            jlora.delta(adapters)["experts"][name],
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip
        assert wrapper.parameter_name == name
        wrapper = wrapper.base_layer


def test_expert_export_refusals(tmp_path):
    params = {"experts": {"w": jnp.ones((E, D, F))}}

    def fn(p, x, sizes):
        return jax.lax.ragged_dot(x, p["experts"]["w"], sizes)

    args = (jnp.ones((3, D)), jnp.asarray([1, 1, 1, 0], jnp.int32))
    for bad, match in (
        (jlora.LoraSpec(rank=2, targets=["experts"], dora=True), "no DoRA"),
        (jlora.LoraSpec(rank=2, targets=["experts"], dropout=0.1), "lora_dropout"),
    ):
        adapters = jlora.init(bad, params, jax.random.key(0), fn=fn, args=args)
        with pytest.raises(ValueError, match=match):
            jlora.peft.save(tmp_path / "x", adapters, bad, key_map="flax", experts=["experts"])
    spec = jlora.LoraSpec(rank=2, targets=["experts"])
    adapters = jlora.init(spec, params, jax.random.key(0), fn=fn, args=args)
    with pytest.raises(ValueError, match="does not list"):
        jlora.peft.save(tmp_path / "y", adapters, spec, key_map="flax", experts=["experts"],
                        parameter_order=["v"])
    assert not (tmp_path / "y").exists()  # nothing written on refusal


# -- a key map's expert parameters: two JAX weights stacked into one PyTorch parameter --

F2 = 3  # each part's output features (gate and up)


class FusedExperts(torch.nn.Module):
    """transformers 5's layout: ``gate_up_proj (E, 2F, D)`` (gate rows, then up) and
    ``down_proj (E, D, F)``, registered in that order, used as ``x @ W[e].T``; with
    ``out_in=False`` the parameters are ``(E, D, 2F)`` / ``(E, F, D)``, used as ``x @ W[e]``."""

    def __init__(self, weights, out_in):
        super().__init__()
        self.out_in = out_in
        for name in ("gate_up_proj", "down_proj"):
            w = torch.tensor(weights[name])
            self.register_parameter(name, torch.nn.Parameter(w.transpose(1, 2) if out_in else w))

    def forward(self, x, sizes):
        outs, start = [], 0
        for e, size in enumerate(sizes):
            rows = x[start : start + size]
            w1, w2 = self.gate_up_proj[e], self.down_proj[e]
            h = rows @ (w1.T if self.out_in else w1)
            gate, up = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
            outs.append(h @ (w2.T if self.out_in else w2))
            start += size
        return torch.cat(outs)


class FusedModel(torch.nn.Module):
    def __init__(self, weights, out_in):
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.experts = FusedExperts(weights, out_in)

    def forward(self, x, sizes):
        return self.mlp.experts(x, sizes)


def fused_jax_fn(params, x, sizes):
    p = params["mlp"]
    gate = jax.lax.ragged_dot(x, p["gate_proj"], sizes)
    up = jax.lax.ragged_dot(x, p["up_proj"], sizes)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, p["down_proj"], sizes)


@pytest.mark.parametrize("out_in", [True, False])
def test_key_map_expert_params_stack_parts_into_one_peft_parameter(out_in, tmp_path):
    """gate_proj and up_proj (E, D, F) with different ranks and scales become one
    ``gate_up_proj`` at the sum of their ranks (rank_pattern / alpha_pattern), which
    PEFT runs with jlora's output; the key map decides the PyTorch orientation."""
    rng = np.random.default_rng(1)
    weights = {
        "gate_proj": rng.normal(size=(E, D, F2)).astype(np.float32) / 2,
        "up_proj": rng.normal(size=(E, D, F2)).astype(np.float32) / 2,
        "down_proj": rng.normal(size=(E, F2, D)).astype(np.float32) / 2,
    }
    params = {"mlp": {k: jnp.asarray(v) for k, v in weights.items()}}
    torch_weights = {
        "gate_up_proj": np.concatenate([weights["gate_proj"], weights["up_proj"]], axis=2),
        "down_proj": weights["down_proj"],
    }
    key_map = jlora.peft.KeyMap(
        "moe",
        modules=r"mlp/(gate|up|down)_proj",
        leaf_names=True,
        expert_params=(
            (r"mlp/gate_proj", "experts.gate_up_proj"),
            (r"mlp/up_proj", "experts.gate_up_proj"),
            (r"mlp/down_proj", "experts.down_proj"),
        ),
        expert_out_in=out_in,
    )
    sizes = [2, 0, 3, 2]
    x = rng.normal(size=(sum(sizes), D)).astype(np.float32)
    args = (jnp.asarray(x), jnp.asarray(sizes, jnp.int32))
    spec = jlora.LoraSpec(
        rank=2, alpha=3.0, targets=["gate_proj", "up_proj", "down_proj"],
        rank_pattern={"up_proj": 3}, alpha_pattern={"gate_proj": 5.0},
    )  # fmt: skip
    adapters = jlora.init(spec, params, jax.random.key(0), fn=fused_jax_fn, args=args)
    adapters = jax.tree_util.tree_map(
        lambda a: jnp.asarray(0.4 * rng.normal(size=a.shape).astype(np.float32)), adapters
    )
    scales = {k: adapters["mlp"][k].scale for k in weights}
    assert len(set(scales.values())) == 3  # three different scales to fold
    want = np.asarray(jlora.lora(fused_jax_fn)(params, adapters, *args))

    directory = tmp_path / "fused"
    jlora.peft.save(directory, adapters, spec, key_map=key_map)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert config["rank_pattern"] == {"mlp.experts.gate_up_proj": 5}
    model = FusedModel(torch_weights, out_in)
    base = model(torch.tensor(x), sizes).detach().numpy()
    np.testing.assert_allclose(base, fused_jax_fn(params, *args), rtol=1e-5, atol=1e-5)
    served = peft.PeftModel.from_pretrained(model, str(directory))
    with torch.no_grad():
        got = served(torch.tensor(x), sizes).numpy()
    assert np.abs(got - base).max() > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # PEFT's delta of the stacked parameter is the parts' deltas side by side.
    deltas = jlora.delta(adapters)["mlp"]
    wrapper = served.base_model.model.mlp.experts  # down_proj registered last: outermost
    assert wrapper.parameter_name == "down_proj"
    inner = wrapper.base_layer
    assert inner.parameter_name == "gate_up_proj"
    stacked = np.concatenate([deltas["gate_proj"], deltas["up_proj"]], axis=2)  # (E, D, 2F)
    got_delta = inner.get_delta_weight("default").detach().numpy()
    np.testing.assert_allclose(got_delta, np.swapaxes(stacked, 1, 2) if out_in else stacked,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
