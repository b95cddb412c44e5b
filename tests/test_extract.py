"""extract / spectrum: adapters from a full fine-tune by truncated SVD of tuned - base.

The reference is numpy's float64 SVD of the same differences (independent of jlora):
the truncated reconstruction, the Eckart–Young residual and the energy rule. A small
Flax MLP trained in full shows the rank/accuracy curve, and a scanned decoder checks
that N-D stacked kernels are factored per layer in the layout ``fn`` reveals.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora._extract import extract, spectrum
from jlora._tree import adapter_items
from tests.models import MLP, Decoder

RTOL = 1e-5
DENSE_SHAPE = (12, 9)
STACK_SHAPE = (3, 10, 14)  # (layers, in, out)


def _orthonormal(rng, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return q


def _with_spectrum(rng, shape, sigma) -> np.ndarray:
    """A random ``shape`` matrix whose singular values are ``sigma``."""
    k = len(sigma)
    return (_orthonormal(rng, shape[0], k) * np.asarray(sigma)) @ _orthonormal(rng, shape[1], k).T


@pytest.fixture(scope="module")
def pair():
    """Base and tuned params: a 2-D kernel with a random delta, and a stacked one whose
    three slices have very different spectra (fast decay, flat, linear), plus a bias and
    an unchanged kernel."""
    rng = np.random.default_rng(0)
    dense_delta = rng.normal(size=DENSE_SHAPE)
    k = min(STACK_SHAPE[1:])
    spectra = [2.0 * 0.5 ** np.arange(k), np.ones(k) + 0.01 * np.arange(k)[::-1],
               np.arange(k, 0, -1, dtype=float)]
    stack_delta = np.stack([_with_spectrum(rng, STACK_SHAPE[1:], s) for s in spectra])
    base = {
        "dense": {"kernel": rng.normal(size=DENSE_SHAPE), "bias": rng.normal(size=9)},
        "stack": {"kernel": rng.normal(size=STACK_SHAPE)},
        "frozen": {"kernel": rng.normal(size=(9, 4))},
    }
    tuned = {
        "dense": {"kernel": base["dense"]["kernel"] + dense_delta,
                  "bias": base["dense"]["bias"] + 0.1},
        "stack": {"kernel": base["stack"]["kernel"] + stack_delta},
        "frozen": {"kernel": base["frozen"]["kernel"]},
    }
    to_jax = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
    base, tuned = to_jax(base), to_jax(tuned)

    def fn(p, x):  # the stacked kernel is indexed per layer: axis 0 is a stack axis
        h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
        h = h[:, :1] * jnp.ones((1, STACK_SHAPE[1]), h.dtype)
        outs = [h @ p["stack"]["kernel"][i] for i in range(STACK_SHAPE[0])]
        return sum(outs) @ jnp.ones((STACK_SHAPE[2], 9), h.dtype) @ p["frozen"]["kernel"]

    args = (jnp.ones((2, DENSE_SHAPE[0])),)
    # numpy float64 differences of the float32 weights actually passed
    deltas = {
        path: np.asarray(tuned_leaf, np.float64) - np.asarray(base_leaf, np.float64)
        for path, base_leaf, tuned_leaf in (
            ("dense/kernel", base["dense"]["kernel"], tuned["dense"]["kernel"]),
            ("stack/kernel", base["stack"]["kernel"], tuned["stack"]["kernel"]),
        )
    }
    return base, tuned, fn, args, deltas


def _node(adapters, path):
    node = adapters
    for part in path.split("/"):
        node = node[part]
    return node


def _reference(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's truncated reconstruction (per slice) and singular values of ``delta``."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[..., :, :rank] * s[..., None, :rank]) @ vt[..., :rank, :], s


def _numpy_energy_rank(s: np.ndarray, energy: float) -> tuple[int, list[int]]:
    power = np.square(s).reshape(-1, s.shape[-1])
    ratio = np.cumsum(power, axis=-1) / power.sum(axis=-1, keepdims=True)
    # the test's energies must not sit on a boundary, where float32 could round either way
    assert np.min(np.abs(ratio - energy)) > 1e-4
    per_slice = [int(np.argmax(row >= energy)) + 1 for row in ratio]
    return max(per_slice), per_slice


def _rel(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


# ------------------------------------------------------------------------------------
# against numpy's SVD
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 9])
def test_truncated_delta_matches_numpy_and_eckart_young(pair, rank):
    base, tuned, fn, args, deltas = pair
    adapters = extract(base, tuned, rank=rank, fn=fn, args=args, trainable=["bias"])
    assert "frozen" not in adapters  # unchanged: no adapter
    np.testing.assert_array_equal(adapters["dense"]["bias"], tuned["dense"]["bias"])
    got = jlora.delta(adapters)
    merged = jlora.merge(base, adapters)
    for path, delta in deltas.items():
        node = _node(adapters, path)
        assert node.rank == rank and node.scale == 1.0
        want, s = _reference(delta, rank)
        assert _rel(_node(got, path), want) < RTOL, path
        # Eckart–Young: the residual is the discarded part of the spectrum
        residual = np.linalg.norm(delta - np.asarray(_node(got, path), np.float64))
        np.testing.assert_allclose(residual, np.sqrt(np.sum(s[..., rank:] ** 2)), rtol=1e-4,
                                   atol=1e-5)
        base_w = np.asarray(_node(base, path), np.float64)
        assert _rel(np.asarray(_node(merged, path), np.float64) - base_w, want) < RTOL
        # balanced factors: AᵀA = BBᵀ = Σ_r in every slice
        a, b = np.asarray(node.lora_a, np.float64), np.asarray(node.lora_b, np.float64)
        sigma_r = np.eye(rank) * s[..., None, :rank]
        np.testing.assert_allclose(np.swapaxes(a, -1, -2) @ a, sigma_r, atol=1e-4)
        np.testing.assert_allclose(b @ np.swapaxes(b, -1, -2), sigma_r, atol=1e-4)


def test_spectrum_matches_numpy(pair):
    base, tuned, fn, args, deltas = pair
    sigmas = spectrum(base, tuned, fn=fn, args=args)
    assert list(sigmas) == list(deltas)
    for path, delta in deltas.items():
        want = np.linalg.svd(delta, compute_uv=False)
        assert sigmas[path].shape == want.shape
        assert np.all(np.diff(sigmas[path], axis=-1) <= 0)
        np.testing.assert_allclose(sigmas[path], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("energy", [0.3, 0.8, 0.95, 0.99, 0.998, 1.0])
def test_energy_picks_the_smallest_rank_of_every_slice(pair, energy):
    base, tuned, fn, args, deltas = pair
    adapters = extract(base, tuned, energy=energy, fn=fn, args=args, trainable=["bias"])
    spread = False
    for path, delta in deltas.items():
        _, s = _reference(delta, 1)
        if energy == 1.0:
            want, per_slice = s.shape[-1], [s.shape[-1]]
        else:
            want, per_slice = _numpy_energy_rank(s, energy)
        spread |= len(set(per_slice)) > 1
        node = _node(adapters, path)
        assert node.rank == want, (path, per_slice)
        assert _rel(node.delta(), _reference(delta, want)[0]) < RTOL
    assert spread or energy == 1.0  # the stacked slices need different ranks: max is used


def test_alpha_sets_the_scale_and_keeps_the_delta(pair):
    base, tuned, fn, args, _ = pair
    plain = extract(base, tuned, rank=4, targets=["dense", "stack"], fn=fn, args=args)
    scaled = extract(base, tuned, rank=4, targets=["dense", "stack"], fn=fn, args=args,
                     alpha=16.0)
    node = scaled["stack"]["kernel"]
    assert node.scale == 4.0
    np.testing.assert_allclose(node.lora_b * 4.0, plain["stack"]["kernel"].lora_b, rtol=1e-6)
    for path in ("dense/kernel", "stack/kernel"):
        np.testing.assert_allclose(_node(scaled, path).delta(), _node(plain, path).delta(),
                                   rtol=1e-5, atol=1e-6)


def test_unchanged_and_untargeted_leaves():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    base = {"a": {"kernel": w, "bias": jnp.zeros(5)}, "b": {"kernel": w}}
    tuned = {"a": {"kernel": w + 1.0, "bias": jnp.ones(5)}, "b": {"kernel": w}}
    with pytest.warns(UserWarning, match="a/bias"):  # a change the result does not hold
        adapters = extract(base, tuned, rank=1)
    assert set(adapters) == {"a"} and set(adapters["a"]) == {"kernel"}
    # the delta (all ones) is rank one: exact
    np.testing.assert_allclose(jlora.merge(base, adapters)["a"]["kernel"], w + 1.0, atol=1e-5)
    # targeted explicitly, an unchanged leaf gets a zero adapter (no warning then)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = extract(base, tuned, energy=0.9, targets=["a", "b"])
    assert explicit["b"]["kernel"].rank == 1
    assert not np.any(np.asarray(explicit["b"]["kernel"].delta()))
    # 16-bit weights give float32 factors
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), (base, tuned))
    node = extract(*half, rank=1, trainable=["bias"])["a"]["kernel"]
    assert node.lora_a.dtype == node.lora_b.dtype == jnp.float32


# ------------------------------------------------------------------------------------
# a full fine-tune of a small MLP, extracted at growing ranks
# ------------------------------------------------------------------------------------


def test_mlp_fine_tune_curve():
    model = MLP(features=(32, 16))
    k_init, k_teacher = jax.random.split(jax.random.key(0))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(128, 24)), jnp.float32)
    x_test = jnp.asarray(rng.normal(size=(64, 24)), jnp.float32)  # held out
    init = jax.jit(model.init)
    base, teacher = init(k_init, x), init(k_teacher, x)
    y = model.apply(teacher, x)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

    tuned, state = base, tx.init(base)
    for _ in range(50):
        tuned, state = step(tuned, state)

    want = model.apply(tuned, x_test)
    moved = float(jnp.linalg.norm(want - model.apply(base, x_test)))
    run = jax.jit(jlora.lora(model.apply))
    curve = []
    for choice in [{"rank": r} for r in (1, 2, 4, 8)] + [{"energy": 1.0}]:
        adapters = extract(base, tuned, trainable=["bias"], **choice)
        ranks = {p: n.rank for p, n in adapter_items(adapters) if jlora.is_adapter(n)}
        got = run(base, adapters, x_test)
        curve.append((ranks, float(jnp.linalg.norm(got - want)) / moved))
    # the energy each extraction keeps, from the spectrum of every delta
    energy = {path: np.cumsum(sigma.astype(np.float64) ** 2) / np.sum(sigma.astype(np.float64) ** 2)
              for path, sigma in spectrum(base, tuned).items()}
    assert list(energy) == ["params/dense_0/kernel", "params/dense_1/kernel"]
    print("\nranks (dense_0, dense_1) | energy kept (dense_0, dense_1) | "
          "‖f_r - f_tuned‖ / ‖f_tuned - f_base‖ on held-out inputs")
    for ranks, error in curve:
        kept = [energy[path][r - 1] for path, r in ranks.items()]
        print(f"  {tuple(ranks.values())!s:9} | {kept[0]:.4f}, {kept[1]:.4f} | {error:.3e}")
    assert curve[-1][0] == {"params/dense_0/kernel": 24, "params/dense_1/kernel": 16}
    errors = [error for _, error in curve]
    assert np.all(np.diff(errors) < 0), errors  # every added component helps
    assert errors[0] > 0.05  # rank 1 is far from the fine-tune
    np.testing.assert_allclose(run(base, adapters, x_test), want, atol=1e-4)


def test_scanned_decoder_kernels_are_factored_per_layer():
    model = Decoder(layers=2)
    tokens = jnp.zeros((1, 4), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), tokens)
    rng = np.random.default_rng(2)
    tuned = jax.tree_util.tree_map(
        lambda w: w + jnp.asarray(0.01 * rng.normal(size=w.shape), w.dtype), base
    )
    adapters = extract(base, tuned, rank=3, targets=["query", "out"], fn=model.apply,
                       args=(tokens,))
    query = adapters["params"]["layers"]["query"]["kernel"]  # (layers, d, heads, head_dim)
    assert query.layout.stack_axes == (0,) and query.lora_a.shape == (2, 32, 3)
    out = adapters["params"]["layers"]["out"]["kernel"]  # (layers, heads, head_dim, d)
    assert out.layout.in_axes == (1, 2) and out.lora_b.shape == (2, 3, 32)
    for name, node in (("query", query), ("out", out)):
        layout = node.layout
        diff = (tuned["params"]["layers"][name]["kernel"]
                - base["params"]["layers"][name]["kernel"])
        grouped = np.asarray(layout.to_grouped(diff), np.float64)
        want, _ = _reference(grouped, 3)
        assert _rel(layout.to_grouped(node.delta()), want) < RTOL, name


# ------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------


def test_mismatched_trees_name_the_path():
    base = {"enc": {"kernel": jnp.zeros((4, 3))}}
    with pytest.raises(ValueError, match=r"'enc/kernel'.*float32\[4, 3\].*float32\[3, 4\]"):
        extract(base, {"enc": {"kernel": jnp.ones((3, 4))}}, rank=1)
    extra = {"enc": {"kernel": jnp.ones((4, 3))}, "head": {"kernel": jnp.ones((3, 2))}}
    with pytest.raises(ValueError, match=r"tuned_params has a leaf at 'head/kernel'"):
        extract(base, extra, rank=1)
    with pytest.raises(ValueError, match=r"base_params has a leaf at 'enc/kernel'"):
        spectrum(base, {"dec": {"kernel": jnp.ones((4, 3))}})


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ({}, "exactly one of rank= .* and energy="),
        ({"rank": 2, "energy": 0.9}, "exactly one of rank="),
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"rank": 1.5}, "rank must be an integer >= 1"),
        ({"energy": 0.0}, r"energy must be a number in \(0, 1\]"),
        ({"energy": 1.5}, r"energy must be a number in \(0, 1\]"),
        ({"energy": float("nan")}, r"energy must be a number in \(0, 1\]"),
        ({"rank": 1, "alpha": 0.0}, "alpha must be a finite positive number"),
        ({"rank": 4}, r"rank 4 at 'w' exceeds min\(in, out\) = min\(5, 3\) = 3"),
    ],
)
def test_bad_choices_are_refused(choice, message):
    base = {"w": jnp.zeros((5, 3))}
    with pytest.raises(ValueError, match=message):
        extract(base, {"w": jnp.ones((5, 3))}, **choice)


def test_nothing_changed_or_unknown_layout():
    params = {"w": jnp.ones((5, 3)), "stack": jnp.ones((2, 5, 3))}
    with pytest.raises(ValueError, match="no weight changed"):
        extract(params, params, rank=1)
    tuned = {"w": jnp.ones((5, 3)), "stack": jnp.zeros((2, 5, 3))}
    with pytest.raises(ValueError, match=r"'stack'.*Pass fn=<the model function>"):
        extract(params, tuned, rank=1)
