"""combine: PEFT's add_weighted_adapter in jlora, checked against PEFT and numpy.

The references are independent of jlora: PEFT itself on torch CPU (a two-layer model
with three LoRA adapters of random factors; the combined update ``scale·B·A`` in
PyTorch's (out, in) orientation must equal ``jlora.delta`` transposed), and numpy
float64 for the SVD and TIES rules on a stacked layout. The DARE masks are random,
so the PEFT comparison records the masks jlora draws and feeds the same ones to
PEFT's ``torch.bernoulli``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import _combine
from jlora._combine import combine
from jlora._tree import adapter_items

ATOL = 1e-5
TORCH_LAYERS = {"l1": (16, 24), "l2": (24, 20)}  # (in, out) of each nn.Linear
TORCH_ADAPTERS = {"first": (4, 8.0), "second": (4, 6.0), "third": (2, 5.0)}  # (r, alpha)


def dense_deltas(adapters) -> dict[str, np.ndarray]:
    """Every adapter's ``scale·A·B`` by path, as numpy."""
    return {path: np.asarray(node.delta(), np.float64) for path, node in adapter_items(adapters)}


def random_adapter(rng, layout: jlora.Layout, rank: int, scale: float) -> jlora.LoraAdapter:
    shape_a, shape_b = layout.a_shape(rank), layout.b_shape(rank)
    return jlora.LoraAdapter(
        lora_a=jnp.asarray(rng.normal(0, 0.4, shape_a).astype(np.float32)),
        lora_b=jnp.asarray(rng.normal(0, 0.4, shape_b).astype(np.float32)),
        scale=scale,
        layout=layout,
    )


DENSE = {"enc/kernel": jlora.Layout.dense((10, 8)), "dec/kernel": jlora.Layout.dense((8, 6))}
# A scanned decoder's (layers, in, heads, head_dim) kernel: one stack and two out axes.
STACKED = jlora.Layout((3, 12, 2, 5), stack_axes=(0,), in_axes=(1,), out_axes=(2, 3))


def dense_tree(seed: int, rank: int = 3, scale: float = 1.5):
    rng = np.random.default_rng(seed)
    enc, dec = (random_adapter(rng, DENSE[p], rank, scale) for p in DENSE)
    return {"enc": {"kernel": enc}, "dec": {"kernel": dec}}


def stacked_tree(seed: int, rank: int, scale: float):
    return {"layers": {"qkv": random_adapter(np.random.default_rng(seed), STACKED, rank, scale)}}


def factors(node: jlora.LoraAdapter) -> tuple[np.ndarray, np.ndarray]:
    """The factors as float64 numpy ``(*stack, in, r)``, ``(*stack, r, out)``."""
    return np.asarray(node.lora_a, np.float64), np.asarray(node.lora_b, np.float64)


# ------------------------------------------------------------------------------------
# against PEFT's add_weighted_adapter (torch CPU)
# ------------------------------------------------------------------------------------


@dataclasses.dataclass
class PeftTwin:
    torch: Any
    model: Any  # the PeftModel holding TORCH_ADAPTERS
    trees: dict[str, Any]  # adapter name -> the same adapters as a jlora tree
    names: Any = dataclasses.field(default_factory=itertools.count)

    def add_weighted(self, adapters, weights, **kwargs) -> str:
        name = f"combined_{next(self.names)}"
        self.model.add_weighted_adapter(adapters, weights, name, **kwargs)
        return name

    def layer(self, path: str):
        return getattr(self.model.base_model.model, path.split("/")[0])

    def delta(self, name: str) -> dict[str, np.ndarray]:
        """PEFT's update ``scaling·B·A`` of adapter ``name``, transposed to (in, out)."""
        out = {}
        for path in (f"{layer}/kernel" for layer in TORCH_LAYERS):
            layer = self.layer(path)
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            out[path] = (b @ a * layer.scaling[name]).detach().numpy().astype(np.float64).T
        return out

    def factors(self, name: str, path: str) -> tuple[np.ndarray, np.ndarray]:
        """``(lora_A.T, lora_B.T)``: jlora's orientation."""
        layer = self.layer(path)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        return a.detach().numpy().T.astype(np.float64), b.detach().numpy().T.astype(np.float64)


@pytest.fixture(scope="module")
def twin() -> PeftTwin:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (n_in, n_out) in TORCH_LAYERS.items():
                setattr(self, name, torch.nn.Linear(n_in, n_out))

        def forward(self, x):
            return self.l2(self.l1(x))

    torch.manual_seed(0)
    model = None
    for name, (rank, alpha) in TORCH_ADAPTERS.items():
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TORCH_LAYERS))
        if model is None:
            model = peft.get_peft_model(TwoLayers(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    rng = np.random.default_rng(0)
    trees = {name: {} for name in TORCH_ADAPTERS}
    with torch.no_grad():
        for layer_name, (n_in, n_out) in TORCH_LAYERS.items():
            layer = getattr(model.base_model.model, layer_name)
            for name, (rank, _) in TORCH_ADAPTERS.items():
                a = rng.normal(0, 0.4, (rank, n_in)).astype(np.float32)
                b = rng.normal(0, 0.4, (n_out, rank)).astype(np.float32)
                layer.lora_A[name].weight.copy_(torch.from_numpy(a))
                layer.lora_B[name].weight.copy_(torch.from_numpy(b))
                trees[name][layer_name] = {
                    "kernel": jlora.LoraAdapter(
                        lora_a=jnp.asarray(a.T),
                        lora_b=jnp.asarray(b.T),
                        scale=float(layer.scaling[name]),
                        layout=jlora.Layout.dense((n_in, n_out)),
                    )
                }
    return PeftTwin(torch, model, trees)


def assert_same_deltas(ours: dict, theirs: dict, atol: float = ATOL) -> None:
    assert ours.keys() == theirs.keys()
    for path in ours:
        np.testing.assert_allclose(ours[path], theirs[path], atol=atol, err_msg=path)


PEFT_CASES = {
    "cat": (["first", "second", "third"], [0.7, -0.4, 1.3], dict(method="cat")),
    "linear": (["first", "second"], [0.7, -0.4], dict(method="linear")),
    "ties-total": (["first", "second"], [0.7, 0.5], dict(method="ties", density=0.6)),
    "ties-frequency": (
        ["first", "second"],
        [0.9, -0.3],
        dict(method="ties", density=0.4, majority_sign_method="frequency"),
    ),
    "magnitude_prune": (
        ["first", "second"],
        [0.6, 0.8],
        dict(method="magnitude_prune", density=0.5),
    ),
    "svd": (["first", "second", "third"], [0.7, -0.4, 1.3], dict(method="svd")),
    "svd-rank": (["first", "third"], [1.0, 0.5], dict(method="svd", rank=5)),
    # PEFT combines a single adapter linearly whatever the method.
    "single-ties": (["second"], [0.8], dict(method="ties", density=0.3)),
}


def peft_kwargs(kwargs: dict) -> dict:
    renamed = {"method": "combination_type", "rank": "svd_rank"}
    return {renamed.get(k, k): v for k, v in kwargs.items()}


@pytest.mark.interop
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_matches_peft(twin, case):
    names, weights, kwargs = PEFT_CASES[case]
    ours = combine([twin.trees[n] for n in names], weights, **kwargs)
    theirs = twin.add_weighted(names, weights, **peft_kwargs(kwargs))
    assert_same_deltas(dense_deltas(ours), twin.delta(theirs))
    for path, node in adapter_items(ours):
        assert node.scale == 1.0
        assert twin.layer(path).scaling[theirs] == 1.0  # PEFT's alpha = r
        if kwargs["method"] != "svd":  # these factors are unique: compare them too
            for mine, peft_factor in zip(factors(node), twin.factors(theirs, path)):
                np.testing.assert_allclose(mine, peft_factor, atol=ATOL, err_msg=path)
    if kwargs["method"] == "svd":  # both are the optimum: equal approximation errors
        inputs = [dense_deltas(twin.trees[n]) for n in names]
        peft_deltas = twin.delta(theirs)
        for path, mine in dense_deltas(ours).items():
            target = sum(w * delta[path] for w, delta in zip(weights, inputs))
            error = np.linalg.norm(target - mine)
            peft_error = np.linalg.norm(target - peft_deltas[path])
            assert error > 1e-3  # a real truncation, not an exact copy
            np.testing.assert_allclose(error, peft_error, rtol=1e-5, err_msg=path)


@pytest.mark.interop
@pytest.mark.parametrize(
    "method, sign_method",
    [("dare_linear", "total"), ("dare_ties", "total"), ("dare_ties", "frequency")],
)
def test_dare_matches_peft_with_the_same_masks(twin, monkeypatch, method, sign_method):
    torch = twin.torch
    drawn = []  # jlora's masks in the order drawn: per path, the A's then the B's

    def recording_mask(key, density, shape):
        mask = original_mask(key, density, shape)
        drawn.append(np.asarray(mask))
        return mask

    original_mask = _combine.keep_mask
    monkeypatch.setattr(_combine, "keep_mask", recording_mask)
    names, weights = ["first", "second"], [0.8, -0.5]
    kwargs = dict(density=0.7, majority_sign_method=sign_method)
    ours = combine(
        [twin.trees[n] for n in names], weights, method=method, key=jax.random.key(3), **kwargs
    )
    assert len(drawn) == 2 * 2 * len(TORCH_LAYERS)  # adapters x (A, B) x layers

    replay = iter(drawn)

    def replayed_bernoulli(probabilities, *args, **kw):
        mask = next(replay).T  # jlora (in, r) / (r, out) -> torch (r, in) / (out, r)
        assert mask.shape == tuple(probabilities.shape), "PEFT drew in another order"
        return torch.from_numpy(mask.astype(np.float32))

    monkeypatch.setattr(torch, "bernoulli", replayed_bernoulli)
    theirs = twin.add_weighted(names, weights, combination_type=method, **kwargs)
    assert next(replay, None) is None
    assert_same_deltas(dense_deltas(ours), twin.delta(theirs))
    for path, node in adapter_items(ours):
        for mine, peft_factor in zip(factors(node), twin.factors(theirs, path)):
            np.testing.assert_allclose(mine, peft_factor, atol=ATOL, err_msg=path)


@pytest.mark.interop
def test_svd_clamp_matches_peft(twin, monkeypatch):
    """The clamp sees the factors' signs, so torch's SVD gets jlora's sign rule."""
    torch = twin.torch
    original_svd = torch.linalg.svd

    def definite_svd(matrix, *args, **kwargs):
        u, s, v_h = original_svd(matrix, *args, **kwargs)
        n = s.shape[-1]
        pivot = v_h[:n].gather(1, v_h[:n].abs().argmax(dim=1, keepdim=True))[:, 0]
        sign = torch.where(pivot < 0, -1.0, 1.0)
        u, v_h = u.clone(), v_h.clone()
        u[:, :n] *= sign
        v_h[:n] *= sign[:, None]
        return u, s, v_h

    monkeypatch.setattr(torch.linalg, "svd", definite_svd)
    names, weights = ["first", "second", "third"], [0.7, -0.4, 1.3]
    ours = combine([twin.trees[n] for n in names], weights, method="svd", rank=3, svd_clamp=0.8)
    unclamped = combine([twin.trees[n] for n in names], weights, method="svd", rank=3)
    theirs = twin.add_weighted(names, weights, combination_type="svd", svd_rank=3, svd_clamp=0.8)
    assert_same_deltas(dense_deltas(ours), twin.delta(theirs))
    for path, node in adapter_items(ours):
        for mine, peft_factor in zip(factors(node), twin.factors(theirs, path)):
            np.testing.assert_allclose(mine, peft_factor, atol=ATOL, err_msg=path)
    changed = [np.abs(dense_deltas(ours)[p] - d).max() for p, d in dense_deltas(unclamped).items()]
    assert min(changed) > 1e-3, "the clamp changed nothing: the test checks nothing"


# ------------------------------------------------------------------------------------
# numpy float64 references
# ------------------------------------------------------------------------------------

STACKED_WEIGHTS = [0.6, -1.1, 0.4]
STACKED_RANKS = [3, 2, 4]
STACKED_SCALES = [2.0, 0.5, 1.25]


@pytest.fixture(scope="module")
def stacked_trees():
    return [
        stacked_tree(seed, rank, scale)
        for seed, rank, scale in zip(range(3), STACKED_RANKS, STACKED_SCALES)
    ]


def stacked_target(trees) -> np.ndarray:
    """``Σ w_i·s_i·A_i·B_i`` per layer, float64, ``(layers, in, out)``."""
    total = 0.0
    for w, tree in zip(STACKED_WEIGHTS, trees):
        node = tree["layers"]["qkv"]
        a, b = factors(node)
        total = total + w * node.scale * (a @ b)
    return total


def grouped_delta(node: jlora.LoraAdapter) -> np.ndarray:
    return np.asarray(node.delta(), np.float64).reshape(3, 12, 10)


def best_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, v_t = np.linalg.svd(matrix, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ v_t[..., :rank, :]


@pytest.mark.parametrize("rank", [None, 2, 9, 12])
def test_svd_matches_float64_reference_on_a_stacked_layout(stacked_trees, rank):
    out = combine(stacked_trees, STACKED_WEIGHTS, method="svd", rank=rank)["layers"]["qkv"]
    kept = rank or max(STACKED_RANKS)  # default: the largest input rank
    assert out.rank == kept and out.scale == 1.0 and out.layout == STACKED
    assert out.delta().shape == STACKED.weight_shape
    target = stacked_target(stacked_trees)
    reference = best_rank(target, kept)
    np.testing.assert_allclose(grouped_delta(out), reference, atol=ATOL)
    errors = np.linalg.norm(target - grouped_delta(out), axis=(1, 2))
    np.testing.assert_allclose(errors, np.linalg.norm(target - reference, axis=(1, 2)), atol=ATOL)
    if kept >= sum(STACKED_RANKS):  # R = 9 components hold the sum exactly
        assert errors.max() < ATOL
    # A has orthonormal columns (the singular values are on B), zero past R.
    a, b = factors(out)
    real = min(kept, sum(STACKED_RANKS))
    gram = np.swapaxes(a, 1, 2) @ a
    np.testing.assert_allclose(
        gram[:, :real, :real], np.broadcast_to(np.eye(real), (3, real, real)), atol=1e-5
    )
    np.testing.assert_array_equal(b[:, real:], 0)
    np.testing.assert_array_equal(np.abs(a).max(axis=1), a.max(axis=1))  # definite signs


def test_svd_under_jit_agrees(stacked_trees):
    run = lambda trees: combine(trees, STACKED_WEIGHTS, method="svd", svd_clamp=0.9)
    eager, jitted = run(stacked_trees), jax.jit(run)(stacked_trees)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_cat_is_exact_on_a_stacked_layout(stacked_trees):
    trees = [*stacked_trees]
    trees[1] = {"layers": {"qkv": dataclasses.replace(trees[1]["layers"]["qkv"], dropout=0.3)}}
    out = combine(trees, STACKED_WEIGHTS, method="cat")["layers"]["qkv"]
    assert out.rank == sum(STACKED_RANKS) and out.scale == 1.0
    assert out.dropout == 0.0 and out.lora_a.dtype == jnp.float32  # from the first adapter
    np.testing.assert_allclose(grouped_delta(out), stacked_target(stacked_trees), atol=ATOL)


def numpy_factorwise(tensors, weights, method, density, sign_method="total"):
    """An independent float64 rendering of PEFT's merges of one side, per matrix."""
    tensors = [np.array(t, np.float64) for t in tensors]
    if method in ("ties", "magnitude_prune"):
        for t in tensors:
            for matrix in t.reshape(-1, *t.shape[-2:]):
                order = np.argsort(-np.abs(matrix), axis=None)
                matrix.flat[order[int(density * matrix.size) :]] = 0.0
    stacked = np.stack(tensors)
    weighted = stacked * np.reshape(weights, (-1,) + (1,) * (stacked.ndim - 1))
    if method == "magnitude_prune" or method == "linear":
        return weighted.sum(0)
    votes = stacked.sum(0) if sign_method == "total" else np.sign(stacked).sum(0)
    agrees = np.sign(stacked) == np.where(votes >= 0, 1.0, -1.0)
    return (weighted * agrees).sum(0) / np.maximum(agrees.sum(0), 1)


@pytest.mark.parametrize(
    "method, density, sign_method",
    [
        ("linear", None, "total"),
        ("magnitude_prune", 0.3, "total"),
        ("ties", 0.5, "total"),
        ("ties", 0.5, "frequency"),
    ],
)
def test_factorwise_methods_match_numpy_on_a_stacked_layout(method, density, sign_method):
    weights, scales = [0.8, -0.6, 0.3], [2.0, 0.5, 1.0]
    trees = [stacked_tree(seed, 3, scale) for seed, scale in zip(range(10, 13), scales)]
    out = combine(trees, weights, method=method, density=density, majority_sign_method=sign_method)[
        "layers"
    ]["qkv"]
    ws = [w * s for w, s in zip(weights, scales)]
    a_weights = [np.sign(x) * np.sqrt(abs(x)) for x in ws]
    b_weights = [np.sqrt(abs(x)) for x in ws]
    nodes = [tree["layers"]["qkv"] for tree in trees]
    a = numpy_factorwise([n.lora_a for n in nodes], a_weights, method, density, sign_method)
    b = numpy_factorwise([n.lora_b for n in nodes], b_weights, method, density, sign_method)
    np.testing.assert_allclose(factors(out)[0], a, atol=ATOL)
    np.testing.assert_allclose(factors(out)[1], b, atol=ATOL)
    if method != "linear":  # the pruning did something
        linear = numpy_factorwise([n.lora_a for n in nodes], a_weights, "linear", None)
        assert (a == 0).any() and not np.allclose(a, linear)


def test_ties_under_jit_agrees_and_leaves_the_inputs_alone():
    trees = [dense_tree(1), dense_tree(2)]
    before = [np.asarray(x).copy() for x in jax.tree.leaves(trees)]
    run = lambda trees: combine(trees, [0.5, 0.9], method="ties", density=0.5)
    for x, y in zip(jax.tree.leaves(run(trees)), jax.tree.leaves(jax.jit(run)(trees))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    for x, y in zip(before, jax.tree.leaves(trees)):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_dare_masks_come_from_the_key(monkeypatch):
    trees = [dense_tree(1), dense_tree(2)]
    drawn = []
    original_mask = _combine.keep_mask

    def recording_mask(*args):
        drawn.append(np.asarray(original_mask(*args)))
        return drawn[-1]

    monkeypatch.setattr(_combine, "keep_mask", recording_mask)
    run = lambda seed: combine(
        trees, [0.5, 0.9], method="dare_ties", density=0.5, key=jax.random.key(seed)
    )
    first = run(7)
    # As documented: split(key, (n_paths, 2, n_trees))[path, side, tree], in path order.
    keys = jax.random.split(jax.random.key(7), (2, 2, 2))
    expected = [
        original_mask(keys[p, side, i], 0.5, getattr(trees[i][name]["kernel"], field).shape)
        for p, name in enumerate(["dec", "enc"])
        for side, field in enumerate(["lora_a", "lora_b"])
        for i in range(2)
    ]
    assert len(drawn) == len(expected)
    for mask, reference in zip(drawn, expected):
        np.testing.assert_array_equal(mask, np.asarray(reference))
    kept = np.concatenate([mask.ravel() for mask in drawn]).mean()
    assert abs(kept - 0.5) < 0.1  # 192 draws
    again, other = run(7), run(8)
    for x, y, z in zip(*(jax.tree.leaves(t) for t in (first, again, other))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert not np.allclose(np.asarray(x), np.asarray(z))
    # density 1 keeps everything: plain linear.
    dense = combine(trees, [0.5, 0.9], method="dare_linear", density=1.0, key=jax.random.key(0))
    linear = combine(trees, [0.5, 0.9], method="linear")
    for x, y in zip(jax.tree.leaves(dense), jax.tree.leaves(linear)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


# ------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------


def with_node(tree, path, node):
    first, second = path.split("/")
    return {**tree, first: {**tree[first], second: node}}


def error_cases():
    one, two = dense_tree(1), dense_tree(2)
    enc = one["enc"]["kernel"]
    dora = jlora.DoraAdapter(
        **{f.name: getattr(enc, f.name) for f in dataclasses.fields(jlora.LoraAdapter)},
        magnitude=jnp.ones(8),
    )
    other_layout = jlora.Layout((10, 8), (), (1,), (0,))  # the transpose: in 8, out 10
    flipped = random_adapter(np.random.default_rng(0), other_layout, 3, 1.5)
    return {
        "empty": (([], []), {}, ValueError, "empty"),
        "one tree": ((one, [1.0]), {}, TypeError, "sequence"),
        "weights": (
            ([one, two], [1.0]),
            {},
            ValueError,
            r"one weight per adapters tree \(2\), found 1",
        ),
        "weight type": (([one, two], [1.0, "x"]), {}, TypeError, r"weights\[1\]"),
        "paths": (([one, {"enc": two["enc"]}], [1, 1]), {}, ValueError, "dec/kernel"),
        "layouts": (
            ([one, with_node(two, "enc/kernel", flipped)], [1, 1]),
            {},
            ValueError,
            "at 'enc/kernel'.*layout",
        ),
        "dora": (([one, with_node(two, "enc/kernel", dora)], [1, 1]), {}, TypeError, "DoRA"),
        "copy": (
            ([one, with_node(two, "enc/bias", jnp.ones(8))], [1, 1]),
            {},
            TypeError,
            "enc/bias",
        ),
        "method": (([one, two], [1, 1]), dict(method="mean"), ValueError, "unknown method"),
        "no density": (([one, two], [1, 1]), dict(method="ties"), ValueError, "needs density"),
        "density 0": (
            ([one, two], [1, 1]),
            dict(method="magnitude_prune", density=0.0),
            ValueError,
            r"\(0, 1\], found 0.0",
        ),
        "density 1.5": (
            ([one, two], [1, 1]),
            dict(method="dare_ties", density=1.5, key=jax.random.key(0)),
            ValueError,
            r"\(0, 1\], found 1.5",
        ),
        "density unused": (
            ([one, two], [1, 1]),
            dict(method="svd", density=0.5),
            ValueError,
            "pruning methods",
        ),
        "no key": (
            ([one, two], [1, 1]),
            dict(method="dare_linear", density=0.5),
            ValueError,
            "key=jax.random.key",
        ),
        "ranks": (
            ([one, dense_tree(3, rank=2)], [1, 1]),
            dict(method="ties", density=0.5),
            ValueError,
            r"at 'dec/kernel' the ranks are \[3, 2\]",
        ),
        "rank unused": (([one, two], [1, 1]), dict(rank=2), ValueError, "method='svd' only"),
        "rank": (([one, two], [1, 1]), dict(method="svd", rank=0), ValueError, "positive int"),
        "clamp": (
            ([one, two], [1, 1]),
            dict(method="svd", svd_clamp=1.5),
            ValueError,
            r"quantile in \[0, 1\]",
        ),
        "sign method": (
            ([one, two], [1, 1]),
            dict(method="ties", density=0.5, majority_sign_method="mean"),
            ValueError,
            "majority_sign_method",
        ),
    }


ERROR_CASES = error_cases()


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors(case):
    args, kwargs, error, message = ERROR_CASES[case]
    with pytest.raises(error, match=message):
        combine(*args, **kwargs)
