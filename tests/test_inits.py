"""Spectral and orthogonal inits (``LoraSpec(init=...)``) against PEFT's own, on torch CPU.

PEFT initialises a ``torch.nn.Linear`` with ``init_lora_weights="pissa"``, ``"olora"``
or ``"orthogonal"``; jlora initialises the same weight (as a Flax ``(in, out)`` kernel).
The factors must agree to 1e-5 (singular vectors up to sign), and jlora's residual base
``jlora.unmerge(params, adapters)`` must equal the weight PEFT leaves in the layer. The
randomized ``pissa_niter_K`` is compared by its subspace and its error, not entrywise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.peft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

IN, OUT, RANK, ALPHA = 12, 10, 4, 8.0


def _peft_layer(init: str, weight: np.ndarray):
    """PEFT's init of a Linear whose torch weight is ``weight`` ``(out, in)``, from a
    seeded torch generator (PEFT draws from torch's global one, whose state otherwise
    depends on which tests ran before in the same worker)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential()
    module.add_module("proj", torch.nn.Linear(IN, OUT, bias=False))
    with torch.no_grad():
        module.proj.weight.copy_(torch.tensor(weight))
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"],
                             init_lora_weights=init)  # fmt: skip
    layer = peft.get_peft_model(module, config).base_model.model.proj
    a = layer.lora_A["default"].weight.detach().numpy().T  # (in, r)
    b = layer.lora_B["default"].weight.detach().numpy().T  # (r, out)
    residual = layer.base_layer.weight.detach().numpy().T  # (in, out)
    return a, b, residual


def _signs(got: np.ndarray, want: np.ndarray, axis: int) -> np.ndarray:
    """``got`` with each rank vector's sign flipped to agree with ``want``'s."""
    dots = np.sum(got * want, axis=axis, keepdims=True)
    return got * np.where(dots < 0, -1.0, 1.0)


def _weight(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(OUT, IN)).astype(np.float32)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_spectral_inits_match_peft(init):
    weight = _weight(0)
    want_a, want_b, want_residual = _peft_layer(init, weight)
    params = {"proj": {"kernel": jnp.asarray(weight.T)}}
    spec = jlora.LoraSpec(rank=RANK, alpha=ALPHA, targets=["proj"], init=init)
    adapters = jlora.init(spec, params, jax.random.key(0))
    node = adapters["proj"]["kernel"]
    a, b = np.asarray(node.lora_a), np.asarray(node.lora_b)
    a_signed = _signs(a, want_a, axis=0)
    b_signed = _signs(b.T, want_b.T, axis=0).T
    np.testing.assert_allclose(a_signed, want_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b_signed, want_b, rtol=1e-5, atol=1e-5)
    residual = jlora.unmerge(params, adapters)["proj"]["kernel"]
    np.testing.assert_allclose(residual, want_residual, rtol=1e-5, atol=1e-5)
    # Adapter on the residual is the original weight: training starts at the base.
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, IN)).astype(np.float32))
    out = jlora.lora(lambda p, x: x @ p["proj"]["kernel"])(
        {"proj": {"kernel": residual}}, adapters, x
    )
    np.testing.assert_allclose(out, x @ params["proj"]["kernel"], rtol=1e-5, atol=1e-5)


def test_pissa_on_a_stacked_weight_is_the_svd_of_each_slice():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        w = rng.normal(size=(3, IN, OUT))
        params = {"layers": {"kernel": jnp.asarray(w)}}

        def fn(p, x):
            def body(h, k):
                return jnp.pad(jnp.tanh(h @ k), ((0, 0), (0, IN - OUT))), None

            return jax.lax.scan(body, x, p["layers"]["kernel"])[0]

        spec = jlora.LoraSpec(rank=RANK, alpha=ALPHA, targets=["layers"], init="pissa")
        adapters = jlora.init(spec, params, jax.random.key(0), fn=fn, args=(jnp.ones((2, IN)),))
        delta = np.asarray(jlora.delta(adapters)["layers"]["kernel"])
    for k in range(3):
        u, s, vt = np.linalg.svd(w[k], full_matrices=False)
        np.testing.assert_allclose(delta[k], (u[:, :RANK] * s[:RANK]) @ vt[:RANK],
                                   rtol=1e-10, atol=1e-10)  # fmt: skip


def test_randomized_pissa_finds_the_principal_subspace():
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.normal(size=(IN, IN)))
    v, _ = np.linalg.qr(rng.normal(size=(OUT, OUT)))
    spectrum = 2.0 ** -np.arange(OUT)  # decaying, with a gap after every value
    w = (u[:, :OUT] * spectrum) @ v.T
    params = {"proj": {"kernel": jnp.asarray(w, jnp.float32)}}
    spec = jlora.LoraSpec(rank=RANK, alpha=ALPHA, targets=["proj"], init="pissa_niter_4")
    adapters = jlora.init(spec, params, jax.random.key(0))
    a = np.asarray(adapters["proj"]["kernel"].lora_a, np.float64)
    basis, _ = np.linalg.qr(a)
    # cosines of the principal angles to the exact top-r left singular subspace
    cosines = np.linalg.svd(basis.T @ u[:, :RANK], compute_uv=False)
    assert cosines.min() > 1 - 1e-4, cosines
    error = np.linalg.norm(np.asarray(jlora.unmerge(params, adapters)["proj"]["kernel"]))
    optimal = np.sqrt(np.sum(spectrum[RANK:] ** 2))  # Eckart–Young
    assert optimal <= error * (1 + 1e-4) and error <= 1.01 * optimal, (error, optimal)


def test_orthogonal_init_starts_at_the_base_with_peft_scale():
    weight = _weight(4)
    want_a, want_b, residual = _peft_layer("orthogonal", weight)
    np.testing.assert_allclose(residual, weight.T)  # PEFT keeps the base
    params = {"proj": {"kernel": jnp.asarray(weight.T)}}
    spec = jlora.LoraSpec(rank=RANK, alpha=ALPHA, targets=["proj"], init="orthogonal")
    adapters = jlora.init(spec, params, jax.random.key(0))
    node = adapters["proj"]["kernel"]
    assert float(jnp.abs(node.lora_b).max()) > 0  # B is not zero...
    np.testing.assert_allclose(jlora.delta(adapters)["proj"]["kernel"], 0, atol=1e-7)  # ...A·B is
    assert np.linalg.matrix_rank(np.asarray(node.lora_a)) == RANK // 2
    # Same distribution as PEFT's: entries of A and B have PEFT's spread (one draw each).
    for got, want in ((node.lora_a, want_a), (node.lora_b, want_b)):
        ratio = float(jnp.std(got)) / float(np.std(want))
        assert 0.6 < ratio < 1.6, ratio
    with pytest.raises(ValueError, match="even rank"):
        jlora.init(jlora.LoraSpec(rank=3, targets=["proj"], init="orthogonal"), params,
                   jax.random.key(0))  # fmt: skip


def test_init_refusals():
    with pytest.raises(ValueError, match="pissa_niter_K"):
        jlora.LoraSpec(targets=["proj"], init="pissa_niter_0")
    with pytest.raises(ValueError, match="mixture of experts"):
        jlora.LoraSpec(targets=["proj"], init="pissa", experts=2)
    abstract = {"proj": {"kernel": jax.ShapeDtypeStruct((IN, OUT), jnp.float32)}}
    with pytest.raises(ValueError, match="ShapeDtypeStruct"):
        jlora.init(jlora.LoraSpec(rank=2, targets=["proj"], init="olora"), abstract,
                   jax.random.key(0))  # fmt: skip


def test_a_trained_pissa_adapter_serves_on_the_original_base_in_peft(tmp_path):
    """PEFT's ``path_initial_model_for_weight_conversion``: ``ΔW = s·A·B − s·A₀·B₀`` is a
    plain LoRA of rank 2r, ``jlora.combine([trained, initial], [1, -1], method="cat")``,
    which PEFT loads on the original weights and runs to jlora's output."""
    weight = _weight(5)
    params = {"proj": {"kernel": jnp.asarray(weight.T)}}
    spec = jlora.LoraSpec(rank=RANK, alpha=ALPHA, targets=["proj"], init="pissa")
    initial = jlora.init(spec, params, jax.random.key(0))
    residual = jlora.unmerge(params, initial)
    rng = np.random.default_rng(6)
    trained = jax.tree_util.tree_map(  # a stand-in for training: move both factors
        lambda x: x + jnp.asarray(0.1 * rng.normal(size=x.shape).astype(np.float32)), initial
    )
    converted = jlora.combine([trained, initial], [1.0, -1.0], method="cat")
    node = converted["proj"]["kernel"]
    assert node.rank == 2 * RANK

    def fn(p, x):
        return x @ p["proj"]["kernel"]

    x = rng.normal(size=(3, IN)).astype(np.float32)
    want = np.asarray(jlora.lora(fn)(residual, trained, jnp.asarray(x)))  # as trained
    np.testing.assert_allclose(jlora.lora(fn)(params, converted, jnp.asarray(x)), want,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    out_spec = jlora.LoraSpec(rank=node.rank, alpha=node.scale * node.rank, targets=["proj"])
    jlora.peft.save(tmp_path / "lora", converted, out_spec, key_map="flax")

    module = torch.nn.Sequential()
    module.add_module("proj", torch.nn.Linear(IN, OUT, bias=False))
    with torch.no_grad():
        module.proj.weight.copy_(torch.tensor(weight))  # the original base, not the residual
    served = peft.PeftModel.from_pretrained(module, str(tmp_path / "lora"))
    with torch.no_grad():
        got = served(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("niter", [1, 4])
def test_randomized_pissa_error_matches_torch_svd_lowrank(niter):
    """On a slowly decaying spectrum (where a randomized SVD is least exact), jlora's
    ``pissa_niter_K`` and ``torch.svd_lowrank(W, q=r, niter=K)`` (what PEFT calls) leave
    the same error on average over seeds, both above the Eckart–Young optimum."""
    rng = np.random.default_rng(5)
    m, n, rank = 64, 48, 6
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(n))
    w = ((u[:, :n] * spectrum) @ v.T).astype(np.float32)  # Flax (in, out)
    optimal = np.sqrt(np.sum(spectrum[rank:] ** 2))
    spec = jlora.LoraSpec(rank=rank, alpha=float(rank), targets=["proj"],
                          init=f"pissa_niter_{niter}")  # fmt: skip
    ours, theirs = [], []
    for seed in range(6):
        params = {"proj": {"kernel": jnp.asarray(w)}}
        adapters = jlora.init(spec, params, jax.random.key(seed))
        ours.append(float(np.linalg.norm(jlora.unmerge(params, adapters)["proj"]["kernel"])))
        torch.manual_seed(seed)
        tu, ts, tv = torch.svd_lowrank(torch.tensor(w.T), q=rank, niter=niter)
        approx = (tu * ts) @ tv.T  # torch layout (out, in)
        theirs.append(float(torch.linalg.norm(torch.tensor(w.T) - approx)))
    assert min(ours) >= optimal * (1 - 1e-5) and min(theirs) >= optimal * (1 - 1e-5)
    ratio = np.mean(ours) / np.mean(theirs)
    assert 0.98 < ratio < 1.02, (np.mean(ours), np.mean(theirs), optimal)
