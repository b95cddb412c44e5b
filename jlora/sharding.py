"""Adapters on a device mesh: each factor follows its base weight's partitioning.

A weight ``W`` with stack, input and output axes is partitioned by a
``PartitionSpec``; its factors ``A: (*stack, prod(in), r)`` and
``B: (*stack, r, prod(out))`` get:

* stack axes: the weight's entries for them, unchanged;
* A's flattened input axis: the mesh axes of every sharded input axis of the
  weight, in the weight's axis order (major first), e.g. a DenseGeneral output
  projection ``(layers, heads, head_dim, d)`` partitioned ``(None, "tensor", None,
  "fsdp")`` gives ``A: (None, "tensor", None)``. When only the leading input axis is
  sharded (the common case), this is exactly where the weight's own shards lie in
  the flattened axis; otherwise the factor is still split evenly over the same
  devices, and XLA moves the small factor where it needs it;
* B's flattened output axis: likewise, from the output axes;
* the rank axis: replicated.

With ``full=True`` each factor is also split over the mesh axes its weight uses on
the *other* feature group, where they divide it: under pure FSDP (weights split on
one feature axis only) B of an input-split weight would otherwise be replicated on
every device, and so would its optimizer state.

So a factor is never gathered to one device: it is split over the same mesh axes
as the weight it belongs to, and the low-rank matmuls ``x·A`` and ``(x·A)·B``
partition like the base matmul ``x·W`` around them. Entries that are
``PartitionSpec.UNCONSTRAINED`` count as unsharded.

Meshes are expected to have ``AxisType.Auto`` axes (``Mesh(devices, names)``, or
``jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)``; recent JAX makes Explicit
axes by default), as for any model written without explicit-sharding annotations:
XLA then places the collectives, and the tests check that jlora's step gathers no
base weight that the model's own step does not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from jlora._adapter import Layout, LoraAdapter, is_adapter
from jlora._init import init
from jlora._paths import leaves_with_paths, path_str
from jlora._spec import LoraSpec
from jlora._types import Adapters, Array, Params

__all__ = [
    "factor_specs",
    "field_specs",
    "init_sharded",
    "partition_specs",
    "quantized_shardings",
    "shardings",
    "state_shardings",
]


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axis names of one ``PartitionSpec`` entry (None, a name or a tuple)."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _entry(names: tuple[str, ...]) -> Any:
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def factor_specs(
    layout: Layout, spec: PartitionSpec, *, mesh_shape: Mapping[str, int] | None = None
) -> tuple[PartitionSpec, PartitionSpec]:
    """The ``PartitionSpec`` s of ``(lora_a, lora_b)`` for a weight partitioned by ``spec``.

    Args:
      layout: the adapter's layout (which weight axes are stack, input, output axes).
      spec: the weight's partitioning; shorter specs are padded with ``None``.
      mesh_shape: ``{mesh axis: size}`` (``mesh.shape``) to split the factors fully:
        the mesh axes the weight uses on its *other* feature group (the output axes
        for A, the input axes for B) then also split the factor's feature axis,
        after its own, wherever they divide it. Under pure FSDP this keeps the
        factors and their optimizer state from being replicated where the weight is
        not (ZeRO-style); XLA gathers a small factor where a matmul needs it.

    Returns:
      ``(spec_a, spec_b)``: A keeps the stack axes' and the input axes' mesh axes,
      B the stack axes' and the output axes'; the rank axis is replicated.

    Raises:
      ValueError: ``spec`` has more entries than the weight has axes.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> layout = Layout((2, 4, 8, 16), stack_axes=(0,), in_axes=(1, 2), out_axes=(3,))
      >>> spec_a, spec_b = factor_specs(layout, P(None, "tensor", None, "fsdp"))
      >>> spec_a == P(None, "tensor", None), spec_b == P(None, None, "fsdp")
      (True, True)
      >>> spec_a, spec_b = factor_specs(layout, P(None, None, None, "fsdp"),
      ...                               mesh_shape={"fsdp": 4})
      >>> spec_a == P(None, "fsdp", None), spec_b == P(None, None, "fsdp")
      (True, True)
    """
    groups = _group_entries(layout, spec, mesh_shape)
    return (
        PartitionSpec(*groups["S"], groups["I"], None),
        PartitionSpec(*groups["S"], None, groups["O"]),
    )


def field_specs(
    node: LoraAdapter, spec: PartitionSpec, *, mesh_shape: Mapping[str, int] | None = None
) -> dict[str, PartitionSpec]:
    """The ``PartitionSpec`` of every array of an adapter node, from its axis signature.

    Each signature token (``_adapter.Signature``) takes the weight's entries for that
    group: stack axes their own, the flattened input and output axes as in
    :func:`factor_specs`, the rank axis replicated. A DoRA magnitude ``(*stack, out)``
    therefore lies like B's output axis.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> import jax.numpy as jnp
      >>> from jlora import DoraAdapter, Layout
      >>> node = DoraAdapter(jnp.zeros((8, 2)), jnp.zeros((2, 4)), 1.0, Layout.dense((8, 4)),
      ...                    magnitude=jnp.ones(4))
      >>> field_specs(node, P("fsdp", "tensor"))["magnitude"] == P("tensor")
      True
    """
    groups = _group_entries(node.layout, spec, mesh_shape)
    return {name: _signature_spec(sig, groups) for name, sig in node.SIGNATURES.items()}


def _signature_spec(signature: tuple[str, ...], groups: Mapping[str, Any]) -> PartitionSpec:
    """An array's ``PartitionSpec``: each signature token takes its group's entries."""
    entries: list[Any] = []
    for token in signature:
        if token == "S":
            entries.extend(groups["S"])
        else:
            entries.append(groups.get(token))
    return PartitionSpec(*entries)


def _dividing(kept: tuple[str, ...], candidates, size: int, mesh_shape) -> tuple[str, ...]:
    """``kept`` plus each candidate mesh axis that still divides ``size``, in order."""
    ways = math.prod(mesh_shape[name] for name in kept)
    for name in candidates:
        if size % (ways * mesh_shape[name]) == 0:
            kept, ways = (*kept, name), ways * mesh_shape[name]
    return kept


def _group_entries(
    layout: Layout, spec: PartitionSpec, mesh_shape: Mapping[str, int] | None
) -> dict[str, Any]:
    """Per signature token, the partitioning of a weight's factors (see factor_specs)."""
    ndim = len(layout.weight_shape)
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(
            f"expected a PartitionSpec of at most {ndim} entries for a weight of shape "
            f"{list(layout.weight_shape)}; found {spec} with {len(entries)} entries"
        )
    entries = entries + (None,) * (ndim - len(entries))
    stack = [entries[i] for i in layout.stack_axes]

    def names(axes: tuple[int, ...]) -> tuple[str, ...]:
        return tuple(name for i in axes for name in _mesh_axes(entries[i]))

    def flat(own: tuple[int, ...], other: tuple[int, ...], size: int) -> Any:
        if mesh_shape is None:
            return _entry(names(own))
        return _entry(_dividing(names(own), names(other), size, mesh_shape))

    return {
        "S": stack,
        "I": flat(layout.in_axes, layout.out_axes, layout.in_features),
        "O": flat(layout.out_axes, layout.in_axes, layout.out_features),
        "R": None,
    }


def _by_path(tree: Any, is_leaf: Callable[[Any], bool], what: str) -> dict[str, Any]:
    items = leaves_with_paths(tree, is_leaf=is_leaf)
    if not items:
        raise ValueError(f"expected a tree of {what}; found no leaves in {type(tree).__name__}")
    return dict(items)


def _map_nodes(adapters: Adapters, table: dict[str, Any], make: Callable, what: str) -> Adapters:
    def one(key_path, node):
        if node is None:
            return None
        path = path_str(key_path)
        if path not in table:
            raise ValueError(
                f"adapter at {path!r} has no entry in the {what} tree; expected a tree "
                f"with the params' structure (it has {sorted(table)[:6]}...)"
            )
        if isinstance(node, LoraAdapter):
            return node.with_arrays(**make(path, node, table[path]))
        return table[path]  # a trainable copy lies like its base leaf

    return jax.tree_util.tree_map_with_path(one, adapters, is_leaf=is_adapter)


def partition_specs(
    adapters: Adapters, param_specs: Any, *, mesh_shape: Mapping[str, int] | None = None
) -> Adapters:
    """``PartitionSpec`` s for every factor, from a tree of the params' specs.

    Use this with ``jax.sharding.NamedSharding(mesh, spec)``, ``shard_map`` or a
    framework's logical-axis rules; :func:`shardings` does the same from shardings.

    Args:
      adapters: the adapters tree (arrays or ``jax.ShapeDtypeStruct`` s).
      param_specs: a tree with the params' structure whose leaves are
        ``PartitionSpec`` s (``None`` for a replicated leaf).
      mesh_shape: ``mesh.shape``, to split the factors fully (see :func:`factor_specs`).

    Returns:
      A tree like ``adapters`` whose adapter nodes hold ``(spec_a, spec_b)`` in place
      of ``(lora_a, lora_b)``; trainable copies get their base leaf's spec.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> from jax.sharding import PartitionSpec as P
      >>> params = {"w": jnp.zeros((8, 4))}
      >>> adapters = jlora.init(jlora.LoraSpec(rank=2, targets="w"), params,
      ...                       jax.random.key(0))
      >>> specs = partition_specs(adapters, {"w": P("fsdp", "tensor")})
      >>> specs["w"].lora_a == P("fsdp", None), specs["w"].lora_b == P(None, "tensor")
      (True, True)
    """
    table = _by_path(
        param_specs, lambda x: x is None or isinstance(x, PartitionSpec), "PartitionSpecs"
    )

    def make(path, node, spec):
        spec = PartitionSpec() if spec is None else spec
        return field_specs(node, spec, mesh_shape=mesh_shape)

    return _map_nodes(adapters, table, make, "param_specs")


def _sharding_of(leaf: Any) -> Sharding | None:
    if leaf is None or isinstance(leaf, Sharding):
        return leaf
    return getattr(leaf, "sharding", None)


def shardings(adapters: Adapters, param_shardings: Any, *, full: bool = False) -> Adapters:
    """A ``NamedSharding`` for every factor, derived from its base weight's sharding.

    Args:
      adapters: the adapters tree (arrays, or ``jax.ShapeDtypeStruct`` s from
        ``jax.eval_shape``).
      param_shardings: a tree with the params' structure whose leaves are
        ``jax.sharding.Sharding`` s, or the (sharded) params themselves: arrays or
        ``jax.ShapeDtypeStruct`` s with a ``sharding``.
      full: also split each factor over the mesh axes its weight uses on the other
        feature group, where they divide it (see :func:`factor_specs`): nothing of
        the adapters is replicated where its weight is not.

    Returns:
      A tree like ``adapters`` whose adapter nodes hold a ``NamedSharding`` on the
      weight's mesh for ``lora_a`` and ``lora_b`` (see the module docstring for the
      rule); trainable copies get their base leaf's sharding. Use it as
      ``out_shardings`` / ``in_shardings`` of ``jax.jit`` or with ``jax.device_put``.

    Raises:
      ValueError: an adapter's path is missing from ``param_shardings``.
      TypeError: a weight is partitioned by a sharding other than ``NamedSharding``
        (fully replicated shardings of any kind are accepted and reused).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jlora
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
      >>> params = {"w": jnp.zeros((8, 4))}
      >>> adapters = jlora.init(jlora.LoraSpec(rank=2, targets="w"), params,
      ...                       jax.random.key(0))
      >>> out = shardings(adapters, {"w": NamedSharding(mesh, P("fsdp", None))})
      >>> out["w"].lora_a.spec == P("fsdp", None)
      True
    """
    table = _by_path(
        param_shardings,
        lambda x: x is None or isinstance(x, Sharding) or hasattr(x, "sharding"),
        "shardings",
    )
    table = {path: _sharding_of(leaf) for path, leaf in table.items()}

    def make(path, node, sharding):
        if sharding is None:
            return dict.fromkeys(node.SIGNATURES)
        if not isinstance(sharding, NamedSharding):
            if sharding.is_fully_replicated:
                return dict.fromkeys(node.SIGNATURES, sharding)
            raise TypeError(
                f"expected a NamedSharding for the weight at {path!r}; found "
                f"{type(sharding).__name__} {sharding}. Build the params' shardings "
                "with jax.sharding.NamedSharding(mesh, PartitionSpec(...))."
            )
        mesh_shape = dict(sharding.mesh.shape) if full else None
        specs = field_specs(node, sharding.spec, mesh_shape=mesh_shape)
        kind = sharding.memory_kind
        return {
            name: NamedSharding(sharding.mesh, spec, memory_kind=kind)
            for name, spec in specs.items()
        }

    return _map_nodes(adapters, table, make, "param_shardings")


def quantized_shardings(qparams: Params, param_shardings: Any) -> Params:
    """Shardings for params holding quantized weights (``jlora.quantize``), from the
    float weights' own shardings.

    Each encoded array follows its axis signature (``QuantizedWeight.SIGNATURES``): stack
    axes keep the weight's entries; packed codes and block scales (one flat axis) are
    split over the mesh axes the weight is split over, as far as they divide it; int8
    codes keep the weight's feature entries. Other leaves keep their sharding. The step
    then gathers a layer's packed codes (4-bit, not the decoded weight) where a use
    needs them.

    Args:
      qparams: params with ``QuantizedWeight`` nodes (arrays or ``ShapeDtypeStruct`` s).
      param_shardings: the float params' ``NamedSharding`` tree (same structure, an array
        sharding where ``qparams`` has a quantized node).

    Returns:
      A tree like ``qparams`` of ``NamedSharding`` s, for ``jax.jit(...,
      out_shardings=...)`` or ``jax.device_put``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jlora
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:2]), ("fsdp",))
      >>> q = jlora.quantize({"w": jnp.ones((64, 8))}, "w")
      >>> out = quantized_shardings(q, {"w": NamedSharding(mesh, P("fsdp", None))})
      >>> out["w"].codes.spec == P("fsdp"), out["w"].absmax_offset.spec == P()
      (True, True)
    """
    from jlora._quant import QuantizedWeight

    def is_node(x):
        return isinstance(x, QuantizedWeight)

    def one(node, sharding):
        if not is_node(node):
            return sharding
        if not isinstance(sharding, NamedSharding):
            raise TypeError(
                f"quantized_shardings: expected a NamedSharding for a quantized weight; "
                f"found {type(sharding).__name__} {sharding}"
            )
        layout, mesh_shape = node.layout, sharding.mesh.shape
        groups = dict(_group_entries(layout, sharding.spec, None))
        # Packed codes and block scales: every mesh axis of the weight's features that
        # divides the array's flat axis.
        features = _mesh_axes(groups["I"]) + _mesh_axes(groups["O"])
        for token, size in (("I", layout.in_features), ("O", layout.out_features)):
            ways = math.prod(mesh_shape[a] for a in _mesh_axes(groups[token]))
            groups[token] = groups[token] if size % ways == 0 else None
        arrays = {}
        for name, signature in node.SIGNATURES.items():
            array = getattr(node, name)
            if array is not None:
                packed = None  # "P" is the last axis, where a signature has one
                if "P" in signature:
                    packed = _entry(_dividing((), features, array.shape[-1], mesh_shape))
                spec = _signature_spec(signature, {**groups, "P": packed})
                arrays[name] = NamedSharding(sharding.mesh, spec)
        return dataclasses.replace(node, **arrays)

    return jax.tree_util.tree_map(one, qparams, param_shardings, is_leaf=is_node)


def state_shardings(state: Any, adapter_shardings: Adapters, *, default: Any = None) -> Any:
    """Shardings for a tree holding copies of the adapters: optimizer moments, an EMA.

    A leaf of ``state`` whose path ends with the path of a factor (or trainable
    copy) in ``adapter_shardings`` gets that factor's sharding, so
    Adam's moments are split exactly like the factors they follow (left to XLA they
    come out replicated: ``zeros_like`` does not carry a sharding). Every other leaf
    (step counts, scalars) gets ``default``.

    Args:
      state: the tree, e.g. ``jax.eval_shape(tx.init, adapters)``.
      adapter_shardings: from :func:`shardings`, for the same adapters.
      default: the sharding of other leaves; by default replicated on the adapters'
        mesh.

    Returns:
      A tree like ``state`` holding a sharding at every leaf, for ``out_shardings``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, jlora
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
      >>> params = {"w": jnp.zeros((8, 4))}
      >>> adapters = jlora.init(jlora.LoraSpec(rank=2, targets="w"), params,
      ...                       jax.random.key(0))
      >>> placed = shardings(adapters, {"w": NamedSharding(mesh, P("fsdp", None))})
      >>> tx = optax.adam(1e-3)
      >>> tree = state_shardings(jax.eval_shape(tx.init, adapters), placed)
      >>> tree[0].mu["w"].lora_a.spec == P("fsdp", None), tree[0].count.spec == P()
      (True, True)
    """
    factors = {}
    for key_path, sharding in jax.tree_util.tree_flatten_with_path(adapter_shardings)[0]:
        factors[tuple(_key_text(k) for k in key_path)] = sharding
    if default is None:
        meshes = [s.mesh for s in factors.values() if isinstance(s, NamedSharding)]
        if not meshes:
            raise ValueError(
                "state_shardings: expected NamedShardings in adapter_shardings to take "
                "the mesh from; pass default= for the other leaves"
            )
        default = NamedSharding(meshes[0], PartitionSpec())

    def one(key_path, leaf):
        keys = tuple(_key_text(k) for k in key_path)
        for start in range(len(keys)):
            sharding = factors.get(keys[start:])
            if sharding is not None:
                return sharding
        return default

    return jax.tree_util.tree_map_with_path(one, state)


def _key_text(key: Any) -> str:
    return path_str((key,))


def _abstract(leaf: Any) -> Any:
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_sharding_of(leaf))
    return leaf


def init_sharded(
    spec: LoraSpec,
    params: Params,
    key: Array,
    *,
    param_shardings: Any = None,
    full: bool = False,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    dtype: Any = None,
) -> Adapters:
    """:func:`jlora.init`, with every factor created directly on its shards.

    The adapters are made by one ``jax.jit`` whose ``out_shardings`` are
    :func:`shardings`, so each device computes only its own part of each factor
    and no factor is ever gathered onto one device. ``params`` may be sharded
    arrays (only their shapes are read, none is copied) or
    ``jax.ShapeDtypeStruct`` s with shardings (no base weight needs to exist yet).

    Args:
      spec: what to adapt and how.
      params: the frozen base: sharded arrays or ``jax.ShapeDtypeStruct`` s.
      key: a PRNG key for A.
      param_shardings: the params' shardings (a tree of ``Sharding`` s); by default
        each leaf's own ``.sharding``.
      full: split the factors fully, as in :func:`shardings`.
      fn, args, kwargs, dtype: as in :func:`jlora.init` (example args may be
        abstract).

    Returns:
      The adapters tree, each factor a ``jax.Array`` with its derived sharding.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jlora
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
      >>> weight = NamedSharding(mesh, P("fsdp", None))
      >>> params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=weight)}
      >>> adapters = init_sharded(jlora.LoraSpec(rank=2, targets="w"), params,
      ...                         jax.random.key(0))
      >>> adapters["w"].lora_a.sharding.spec == P("fsdp", None)
      True
    """
    if param_shardings is None:
        param_shardings = jax.tree_util.tree_map(_sharding_of, params)
    abstract_params = jax.tree_util.tree_map(_abstract, params)

    def make(params_in: Params, key_in: Array) -> Adapters:
        return init(spec, params_in, key_in, fn=fn, args=args, kwargs=kwargs, dtype=dtype)

    out_shardings = shardings(
        jax.eval_shape(make, abstract_params, key), param_shardings, full=full
    )
    if any(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(params)):
        # Concrete params enter as arguments (for trainable copies); unused ones are
        # dropped by XLA, and none is gathered or copied.
        return jax.jit(make, out_shardings=out_shardings)(params, key)
    return jax.jit(lambda key_in: make(abstract_params, key_in), out_shardings=out_shardings)(key)
