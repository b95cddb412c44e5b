"""Leaf paths: the "/"-joined keys that name every leaf of a pytree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jlora._types import Path


def key_str(key: Any) -> str:
    """One component of a path, as text: dict key, attribute name or index."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key).strip(".[]'\"")


def path_str(key_path: tuple) -> Path:
    """The "/"-joined form of a ``tree_flatten_with_path`` key path."""
    return "/".join(key_str(k) for k in key_path)


def leaves_with_paths(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> list[tuple[Path, Any]]:
    """All leaves of ``tree`` with their path strings, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), leaf) for kp, leaf in flat]


def shape_of(leaf: Any) -> tuple[int, ...]:
    """Shape of an array-like leaf (arrays, numpy arrays, ShapeDtypeStructs)."""
    return tuple(getattr(leaf, "shape", ()))


def describe(leaf: Any) -> str:
    """Short ``dtype[shape]`` text of a leaf for error messages."""
    dtype = getattr(leaf, "dtype", type(leaf).__name__)
    return f"{dtype}{list(shape_of(leaf))}"
