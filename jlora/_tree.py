"""The adapters tree: building it to mirror params, and matching it back to params."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from jlora._adapter import LoraAdapter, is_adapter
from jlora._paths import describe, leaves_with_paths, path_str, shape_of
from jlora._types import Adapters, Params, Path
from jlora._weights import is_weight_node

try:  # FrozenDict trees (older Flax code) are pruned like dicts.
    from flax.core import FrozenDict
except ImportError:  # pragma: no cover - flax is a dependency
    FrozenDict = ()


def build_like(params: Params, nodes: Mapping[Path, Any]) -> Adapters:
    """A tree with ``params``' structure holding ``nodes[path]`` at each named leaf.

    Other leaves become ``None`` (an empty pytree), and dict branches left empty are
    pruned, so a Flax/Hugging Face tree keeps only the targeted branches.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_weight_node)
    leaves = [nodes.get(path_str(kp)) for kp, _ in flat]
    return _prune(jax.tree_util.tree_unflatten(treedef, leaves))


def _prune(node: Any) -> Any:
    if isinstance(node, (dict, FrozenDict)):
        kept = {}
        for key, child in node.items():
            child = _prune(child)
            if child is None or (isinstance(child, (dict, FrozenDict)) and not child):
                continue
            kept[key] = child
        return type(node)(kept) if isinstance(node, FrozenDict) else kept
    return node


def adapter_items(adapters: Adapters) -> list[tuple[Path, Any]]:
    """``(path, node)`` for every adapter node and trainable base copy in the tree."""
    return leaves_with_paths(adapters, is_leaf=is_adapter)


def match(params: Params, adapters: Adapters) -> dict[Path, Any]:
    """Map each params path to its adapter node or trainable copy, checking shapes.

    Raises:
      ValueError: an adapter's path is not in ``params``, or its weight has another
        shape than the adapter was made for; the message names the path and both
        shapes.
    """
    param_leaves = dict(leaves_with_paths(params, is_leaf=is_weight_node))
    nodes = {}
    for path, node in adapter_items(adapters):
        if path not in param_leaves:
            near = [p for p in param_leaves if p.rsplit("/", 1)[-1] == path.rsplit("/", 1)[-1]]
            hint = f" Params paths with the same leaf name: {near[:5]}" if near else ""
            raise ValueError(
                f"adapter at {path!r} has no matching leaf in params: these adapters "
                f"were made for another model or another params structure.{hint}"
            )
        weight = param_leaves[path]
        if isinstance(node, LoraAdapter):
            expected = node.layout.weight_shape
            if shape_of(weight) != tuple(expected):
                raise ValueError(
                    f"adapter at {path!r} was made for a weight of shape {list(expected)} "
                    f"but params has {describe(weight)} there: these adapters belong to "
                    "another model"
                )
            expected_shapes = node.expected_shapes()
            for name, array in node.arrays().items():
                if shape_of(array) != expected_shapes[name]:
                    found = ", ".join(f"{k} {describe(v)}" for k, v in node.arrays().items())
                    need = ", ".join(f"{k} {list(v)}" for k, v in expected_shapes.items())
                    raise ValueError(f"adapter at {path!r} has {found}; its layout needs {need}")
        elif shape_of(node) != shape_of(weight):
            raise ValueError(
                f"trainable leaf at {path!r} has shape {describe(node)} but params has "
                f"{describe(weight)} there"
            )
        nodes[path] = node
    return nodes
