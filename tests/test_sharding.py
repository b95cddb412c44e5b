"""Adapters on a mesh of 8 simulated CPU devices: shardings, equivalence, collectives.

The reference for every sharded run is the same computation on one device.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora._paths import leaves_with_paths, path_str
from jlora.sharding import (
    factor_specs,
    init_sharded,
    partition_specs,
    shardings,
    state_shardings,
)
from tests.models import Decoder

MESHES = {
    "fsdp8": ((8,), ("fsdp",)),
    "fsdp4_tp2": ((4, 2), ("fsdp", "tensor")),
    "fsdp2_tp4": ((2, 4), ("fsdp", "tensor")),
}
FULL = {"fsdp8"}  # meshes whose adapters are split with shardings(..., full=True)
TARGETS = ["query", "key", "value", "out", "up", "down", "embed"]
BATCH, LENGTH = 8, 16


def make_mesh(name: str) -> Mesh:
    shape, axes = MESHES[name]
    return Mesh(np.array(jax.devices()[: math.prod(shape)]).reshape(shape), axes)


def partition(path: str, ndim: int, axes: tuple[str, ...]) -> P:
    """FSDP over "fsdp" and Megatron-style tensor parallelism over "tensor" (if present)."""
    tp = "tensor" if "tensor" in axes else None
    leaf = path.split("/")
    if leaf[-1] == "embedding":
        return P(tp, "fsdp")
    if leaf[-1] != "kernel":  # biases and norm scales: heads split like their kernel
        return P(None, tp, None) if leaf[-2] in ("query", "key", "value") else P()
    return {
        "query": P(None, "fsdp", tp, None),
        "key": P(None, "fsdp", tp, None),
        "value": P(None, "fsdp", tp, None),
        "out": P(None, tp, None, "fsdp"),
        "up": P(None, "fsdp", tp),
        "down": P(None, tp, "fsdp"),
    }[leaf[-2]]


def param_shardings(params, mesh: Mesh):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: NamedSharding(mesh, partition(path_str(kp), x.ndim, mesh.axis_names)),
        params,
    )


@functools.cache
def setup():
    """The model, base params, adapters with a non-zero B, tokens and the optimizer."""
    model = Decoder()
    tokens = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, model.vocab)
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    # Rank 3: no factor (or factor shard) has the shape of a weight shard, which keeps
    # the HLO check below from mistaking a factor gather for a weight gather.
    spec = jlora.LoraSpec(rank=3, alpha=6.0, targets=TARGETS)
    adapters = jlora.init(spec, params, jax.random.key(2), fn=model.apply, args=(tokens,))
    # A non-zero B, so that one step moves both factors.
    keys = iter(jax.random.split(jax.random.key(3), 64))
    adapters = jax.tree_util.tree_map(
        lambda n: dataclasses.replace(
            n, lora_b=0.1 * jax.random.normal(next(keys), n.lora_b.shape, n.lora_b.dtype)
        ),
        adapters,
        is_leaf=jlora.is_adapter,
    )
    # SGD with momentum: its state mirrors the adapters (placed by state_shardings), and
    # after one step the momentum is the gradient itself, compared below. (Adam's first
    # step, about lr·sign(g), would turn round-off in near-zero gradients into
    # lr-sized differences.)
    tx = jlora.optimizer(optax.sgd(0.5, momentum=0.9), adapters)
    return model, spec, params, adapters, tokens, tx


def batch_sharded(model, mesh: Mesh | None):
    """``model.apply`` with every module's output kept split over "fsdp" on its batch axis.

    This is what makes FSDP gather weights rather than activations (MaxText and the
    like do it with logical-axis constraints); the other axes are left to XLA.
    """

    def constrain(y):
        if not isinstance(y, jax.Array) or y.ndim < 2 or y.shape[0] != BATCH:
            return y
        spec = P("fsdp", *[P.UNCONSTRAINED] * (y.ndim - 1))
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        return jax.tree_util.tree_map(constrain, out) if mesh is not None else out

    def apply(params, tokens):
        with nn.intercept_methods(interceptor):
            return model.apply(params, tokens)

    return apply


def loss_of(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def lora_step(apply, tx):
    def step(params, adapters, opt_state, tokens):
        def loss_fn(adapters):
            return loss_of(jlora.lora(apply)(params, adapters, tokens), tokens)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return loss, optax.apply_updates(adapters, updates), opt_state

    return step


def plain_step(apply):
    def step(params, tokens):
        return jax.value_and_grad(lambda p: loss_of(apply(p, tokens), tokens))(params)

    return step


@functools.cache
def reference():
    """One optimizer step on a single device."""
    model, _, params, adapters, tokens, tx = setup()
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
        return jax.jit(lora_step(model.apply, tx))(params, adapters, tx.init(adapters), tokens)


@functools.cache
def sharded_run(mesh_name: str):
    """The same step on a mesh: placed inputs, the compiled step and its outputs."""
    model, _, params, adapters, tokens, tx = setup()
    mesh = make_mesh(mesh_name)
    p_shard = param_shardings(params, mesh)
    a_shard = shardings(adapters, p_shard, full=mesh_name in FULL)
    batch = NamedSharding(mesh, P("fsdp", None))
    replicated = NamedSharding(mesh, P())
    s_params = jax.device_put(params, p_shard)
    s_adapters = jax.device_put(adapters, a_shard)
    s_tokens = jax.device_put(tokens, batch)
    step = jax.jit(
        lora_step(batch_sharded(model, mesh), tx), out_shardings=(replicated, a_shard, None)
    )
    with jax.numpy_dtype_promotion("standard"):
        opt_shardings = state_shardings(jax.eval_shape(tx.init, adapters), a_shard)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(s_adapters)
        compiled = step.lower(s_params, s_adapters, opt_state, s_tokens).compile()
    loss, new_adapters, new_opt_state = compiled(s_params, s_adapters, opt_state, s_tokens)
    return dict(
        mesh=mesh,
        param_shardings=p_shard,
        adapter_shardings=a_shard,
        params=s_params,
        tokens=s_tokens,
        compiled=compiled,
        loss=loss,
        adapters=new_adapters,
        opt_state=new_opt_state,
        opt_shardings=opt_shardings,
    )


# -- the rule ------------------------------------------------------------------------


def test_factor_specs_follow_the_weight_axes():
    layout = jlora.Layout((2, 32, 4, 8), stack_axes=(0,), in_axes=(1,), out_axes=(2, 3))
    assert factor_specs(layout, P("stage", "fsdp", "tensor", None)) == (
        P("stage", "fsdp", None),
        P("stage", None, "tensor"),
    )
    # Transposed storage (out, in): A still takes the input axis' mesh axes.
    transposed = jlora.Layout((16, 8), stack_axes=(), in_axes=(1,), out_axes=(0,))
    assert factor_specs(transposed, P("tensor", "fsdp")) == (P("fsdp", None), P(None, "tensor"))
    # Several sharded input axes: their mesh axes in the weight's order, major first.
    multi = jlora.Layout((4, 8, 16), stack_axes=(), in_axes=(0, 1), out_axes=(2,))
    assert factor_specs(multi, P("tensor", ("fsdp", "data"))) == (
        P(("tensor", "fsdp", "data"), None),
        P(None, None),
    )
    # full: the mesh axes of the other group split the factor too, where they divide it.
    query = jlora.Layout((2, 32, 4, 8), stack_axes=(0,), in_axes=(1,), out_axes=(2, 3))
    assert factor_specs(query, P(None, "fsdp"), mesh_shape={"fsdp": 8}) == (
        P(None, "fsdp", None),
        P(None, None, "fsdp"),
    )
    assert factor_specs(query, P(None, ("fsdp", "data")), mesh_shape={"fsdp": 8, "data": 8}) == (
        P(None, ("fsdp", "data"), None),
        P(None, None, "fsdp"),  # 32 outputs split 8 ways, not 64
    )
    # Short specs are padded; unsharded weights give unsharded factors.
    assert factor_specs(multi, P()) == (P(None, None), P(None, None))
    with pytest.raises(ValueError, match=r"at most 3 entries .* shape \[4, 8, 16\]"):
        factor_specs(multi, P(None, None, None, "x"))


def test_decoder_factor_shardings():
    _, _, params, adapters, _, _ = setup()
    mesh = make_mesh("fsdp4_tp2")
    tree = shardings(adapters, param_shardings(params, mesh))
    layers = tree["params"]["layers"]
    assert layers["query"]["kernel"].lora_a.spec == P(None, "fsdp", None)
    assert layers["query"]["kernel"].lora_b.spec == P(None, None, "tensor")
    assert layers["out"]["kernel"].lora_a.spec == P(None, "tensor", None)
    assert layers["out"]["kernel"].lora_b.spec == P(None, None, "fsdp")
    assert layers["down"]["kernel"].lora_a.spec == P(None, "tensor", None)
    embed = tree["params"]["embed"]["embedding"]  # a lookup table: vocab is the input
    assert (embed.lora_a.spec, embed.lora_b.spec) == (P("tensor", None), P(None, "fsdp"))
    assert all(s.mesh is mesh for s in jax.tree_util.tree_leaves(tree))
    # Pure FSDP: B of an input-split weight follows its (unsplit) outputs, unless full.
    fsdp = param_shardings(params, make_mesh("fsdp8"))
    query_b = shardings(adapters, fsdp)["params"]["layers"]["query"]["kernel"].lora_b
    assert query_b.is_fully_replicated
    full = shardings(adapters, fsdp, full=True)
    assert not any(s.is_fully_replicated for s in jax.tree_util.tree_leaves(full))
    # The same from specs alone, and from the sharded params themselves.
    specs = partition_specs(
        adapters, jax.tree_util.tree_map(lambda s: s.spec, param_shardings(params, mesh))
    )
    assert jax.tree_util.tree_leaves(specs) == [s.spec for s in jax.tree_util.tree_leaves(tree)]
    placed = jax.device_put(params, param_shardings(params, mesh))
    assert jax.tree_util.tree_leaves(shardings(adapters, placed)) == jax.tree_util.tree_leaves(tree)


def test_trainable_copies_and_replicated_weights():
    params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    spec = jlora.LoraSpec(rank=2, targets=["dense"], trainable=["bias"])
    adapters = jlora.init(spec, params, jax.random.key(0))
    mesh = make_mesh("fsdp8")
    bias = NamedSharding(mesh, P(None))
    tree = shardings(adapters, {"dense": {"kernel": NamedSharding(mesh, P()), "bias": bias}})
    assert tree["dense"]["bias"] is bias
    assert tree["dense"]["kernel"].lora_a.spec == P(None, None)
    one = SingleDeviceSharding(jax.devices()[0])
    tree = shardings(adapters, {"dense": {"kernel": one, "bias": one}})
    assert tree["dense"]["kernel"].lora_b is one


def test_errors_name_the_path():
    params = {"dense": {"kernel": jnp.ones((8, 4))}}
    adapters = jlora.init(jlora.LoraSpec(rank=2, targets="dense/kernel"), params, jax.random.key(0))
    mesh = make_mesh("fsdp8")
    with pytest.raises(ValueError, match="'dense/kernel' has no entry"):
        shardings(adapters, {"other": {"kernel": NamedSharding(mesh, P())}})

    class Odd(SingleDeviceSharding):
        is_fully_replicated = False

    with pytest.raises(TypeError, match="NamedSharding for the weight at 'dense/kernel'"):
        shardings(adapters, {"dense": {"kernel": Odd(jax.devices()[0])}})


# -- creating adapters on their shards ----------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["arrays", "abstract"])
def test_init_sharded_places_each_factor_on_its_shards(abstract):
    model, spec, params, _, tokens, _ = setup()
    mesh = make_mesh("fsdp2_tp4")
    p_shard = param_shardings(params, mesh)
    if abstract:
        base = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, p_shard
        )
        example = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)
    else:
        base, example = jax.device_put(params, p_shard), tokens
    adapters = init_sharded(spec, base, jax.random.key(2), fn=model.apply, args=(example,))
    expected = jlora.init(spec, params, jax.random.key(2), fn=model.apply, args=(tokens,))
    want = shardings(expected, p_shard)
    for (path, got), (_, ref), (_, sharding) in zip(
        leaves_with_paths(adapters), leaves_with_paths(expected), leaves_with_paths(want)
    ):
        assert got.sharding == sharding, path
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, err_msg=path)
    # A is split over the mesh, never whole on one device.
    query_a = adapters["params"]["layers"]["query"]["kernel"].lora_a
    assert query_a.addressable_shards[0].data.shape == (2, 32 // 2, 3)


def test_optimizer_state_follows_the_factors():
    _, _, params, adapters, _, _ = setup()
    mesh = make_mesh("fsdp4_tp2")
    placed = shardings(adapters, param_shardings(params, mesh))
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        jlora.optimizer(optax.adam(1e-3), adapters, lora_plus_ratio=4.0),
    )
    tree = state_shardings(jax.eval_shape(tx.init, adapters), placed)
    factors = {path: s for path, s in leaves_with_paths(placed)}
    moments = 0
    for path, sharding in leaves_with_paths(tree):
        owner = [p for p in factors if path.endswith("/" + p)]
        if owner:
            assert sharding == factors[owner[0]], path
            moments += 1
        else:
            assert sharding.spec == P() and sharding.mesh is mesh, path
    assert moments == 2 * len(factors)  # Adam's mu and nu for every factor
    with jax.numpy_dtype_promotion("standard"):
        state = jax.jit(tx.init, out_shardings=tree)(jax.device_put(adapters, placed))
    assert [x.sharding for x in jax.tree_util.tree_leaves(state)] == jax.tree_util.tree_leaves(tree)


# -- one training step on a mesh equals the single-device step -----------------------


# fsdp8 (pure data parallel) runs with -m slow; the mixed meshes cover its shardings too.
@pytest.mark.parametrize(
    "mesh_name",
    [pytest.param(m, marks=pytest.mark.slow) if m == "fsdp8" else m for m in MESHES],
)
def test_sharded_step_equals_single_device(mesh_name):
    ref_loss, ref_adapters, ref_opt_state = reference()
    run = sharded_run(mesh_name)
    np.testing.assert_allclose(float(run["loss"]), float(ref_loss), rtol=1e-5)
    got = leaves_with_paths(run["adapters"])
    want = dict(leaves_with_paths(ref_adapters))
    placements = dict(leaves_with_paths(run["adapter_shardings"]))
    assert [p for p, _ in got] == list(want)
    for path, leaf in got:
        assert leaf.sharding == placements[path], path
        np.testing.assert_allclose(
            np.asarray(leaf), np.asarray(want[path]), rtol=1e-5, atol=1e-7, err_msg=path
        )
    # The momentum after one step is the gradient: equal too, and split like the factor.
    momentum = leaves_with_paths(run["opt_state"])
    ref_momentum = dict(leaves_with_paths(ref_opt_state))
    opt_placements = dict(leaves_with_paths(run["opt_shardings"]))
    assert len(momentum) == len(got)
    for path, leaf in momentum:
        assert leaf.sharding.is_equivalent_to(opt_placements[path], leaf.ndim), path
        expected = np.asarray(ref_momentum[path])
        scale = np.abs(expected).max()
        np.testing.assert_allclose(
            np.asarray(leaf), expected, rtol=1e-5, atol=1e-6 * scale, err_msg=path
        )
        assert np.abs(expected).max() > 0, path  # every factor has a gradient


def test_merge_keeps_shardings():
    params = setup()[2]
    run = sharded_run("fsdp4_tp2")
    merged = jlora.merge(run["params"], run["adapters"])
    for (path, leaf), (_, before) in zip(
        leaves_with_paths(merged), leaves_with_paths(run["params"])
    ):
        assert leaf.sharding == before.sharding, path
        assert leaf.dtype == before.dtype, path
    reference_merge = jlora.merge(params, jax.device_get(run["adapters"]))
    for (path, leaf), (_, ref) in zip(
        leaves_with_paths(merged), leaves_with_paths(reference_merge)
    ):
        np.testing.assert_allclose(
            np.asarray(leaf), np.asarray(ref), rtol=1e-5, atol=1e-6, err_msg=path
        )


# -- collectives: jlora adds no all-gather of a base weight ---------------------------

_COLLECTIVE = re.compile(
    r"= (\(.*?\)|\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def collectives(hlo: str) -> collections.Counter:
    """``{(kind, shape): count}`` over the compiled module's collective ops."""
    found = collections.Counter()
    for match in _COLLECTIVE.finditer(hlo):
        kind = match.group(2)
        for dims in _SHAPE.findall(match.group(1)):
            found[(kind, tuple(int(d) for d in dims.split(",") if d))] += 1
    return found


def weight_shard_shapes(params, mesh: Mesh) -> set[tuple[int, ...]]:
    """Every per-device shape a base weight (or one layer of it) can take when some of
    its mesh axes are gathered: the shapes a base-weight all-gather produces."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    shapes = set()
    for path, leaf in leaves_with_paths(params):
        if leaf.ndim < 2:
            continue
        spec = tuple(partition(path, leaf.ndim, mesh.axis_names))
        spec += (None,) * (leaf.ndim - len(spec))
        options = []
        for dim, entry in zip(leaf.shape, spec):
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            options.append({dim // math.prod(sizes[n] for n in kept) for kept in _subsets(names)})
        for shape in itertools.product(*options):
            shapes.add(shape)
            if "layers" in path:
                shapes.add(shape[1:])  # one layer, inside the scan
    return shapes


def _subsets(names):
    return [c for k in range(len(names) + 1) for c in itertools.combinations(names, k)]


def base_weight_gathers(hlo: str, params, mesh: Mesh) -> collections.Counter:
    shapes = weight_shard_shapes(params, mesh)
    return collections.Counter(
        {
            shape: n
            for (kind, shape), n in collectives(hlo).items()
            if kind == "all-gather" and shape in shapes
        }
    )


@pytest.mark.parametrize("mesh_name", ["fsdp8", "fsdp2_tp4"])
def test_lora_step_gathers_no_more_base_weights_than_the_base_model(mesh_name):
    model, _, params, adapters, _, _ = setup()
    run = sharded_run(mesh_name)
    plain = (
        jax.jit(
            plain_step(batch_sharded(model, run["mesh"])),
            out_shardings=(None, run["param_shardings"]),
        )
        .lower(run["params"], run["tokens"])
        .compile()
    )
    lora_hlo, plain_hlo = run["compiled"].as_text(), plain.as_text()
    lora_gathers = base_weight_gathers(lora_hlo, params, run["mesh"])
    plain_gathers = base_weight_gathers(plain_hlo, params, run["mesh"])
    assert lora_gathers, "expected FSDP to gather the layers' weights"
    extra = lora_gathers - plain_gathers
    assert not extra, f"all-gathers of base-weight shape only jlora's step does: {dict(extra)}"
    # What jlora's step gathers beyond the base model's is adapter-sized at most.
    largest_factor = max(x.size for x in jax.tree_util.tree_leaves(adapters))
    only_lora = collectives(lora_hlo) - collectives(plain_hlo)
    for (kind, shape), _ in only_lora.items():
        if kind == "all-gather":
            assert math.prod(shape) <= largest_factor, (shape, dict(only_lora))


def test_gather_check_sees_a_gathered_weight():
    """The check above can fail: a step that gathers the query kernel is caught."""
    _, _, params, _, _, _ = setup()
    mesh = make_mesh("fsdp8")
    p_shard = param_shardings(params, mesh)
    placed = jax.device_put(params, p_shard)
    replicated = NamedSharding(mesh, P())

    def gathers_a_weight(params):
        kernel = params["params"]["layers"]["query"]["kernel"]
        return jax.lax.with_sharding_constraint(kernel, replicated) * 2.0

    hlo = jax.jit(gathers_a_weight).lower(placed).compile().as_text()
    assert base_weight_gathers(hlo, params, mesh) == {(2, 32, 4, 8): 1}


# -- checkpoints move between meshes --------------------------------------------------


def test_checkpoint_from_one_mesh_restores_onto_another_and_onto_one_device(tmp_path):
    from jlora import checkpoint

    _, spec, params, _, _, _ = setup()
    saved = sharded_run("fsdp4_tp2")["adapters"]
    path = checkpoint.save(tmp_path / "adapters", saved, spec)
    expected = dict(leaves_with_paths(jax.device_get(saved)))

    other = shardings(saved, param_shardings(params, make_mesh("fsdp2_tp4")))
    one_device = jax.tree_util.tree_map(lambda _: SingleDeviceSharding(jax.devices()[0]), saved)
    for placements in (other, one_device):
        like = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved, placements
        )
        loaded, loaded_spec = checkpoint.load(path, like=like)
        assert loaded_spec == spec
        wanted = dict(leaves_with_paths(placements))
        for leaf_path, leaf in leaves_with_paths(loaded):
            assert leaf.sharding == wanted[leaf_path], leaf_path
            np.testing.assert_array_equal(np.asarray(leaf), expected[leaf_path], leaf_path)
        assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(saved)
