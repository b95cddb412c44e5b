"""Tracing a user function over (params, args, kwargs) to one closed jaxpr."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from jlora._paths import path_str
from jlora._types import Path
from jlora._weights import WeightNode, is_weight_node


def is_dynamic(leaf: Any) -> bool:
    """Array-like leaves are traced; anything else (flags, strings, functions) is static.

    An encoded weight (:class:`jlora._weights.WeightNode`) is one traced leaf: ``fn``
    sees an array of the shape and dtype it stands for.
    """
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct, WeightNode))


def _abstract(leaf: Any) -> Any:
    if isinstance(leaf, WeightNode):
        return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
    return leaf


@dataclasses.dataclass
class Traced:
    """``fn`` as a closed jaxpr whose inputs are params' array leaves, then the args'."""

    jaxpr: jcore.ClosedJaxpr
    param_paths: list[Path]
    param_avals: list[Any]
    param_leaves: list[Any]
    arg_leaves: list[Any]
    out_tree: Any


def _aval_key(leaf: Any) -> Any:
    if isinstance(leaf, WeightNode):  # its structure (static data) and its arrays' avals
        flat, tree = jax.tree_util.tree_flatten(leaf)
        return (tree, tuple(jax.typeof(x) for x in flat))
    return jax.typeof(leaf)


def _signature(trees: tuple, masks: tuple, static: tuple, dynamic: list) -> Any:
    """A hashable key of everything a trace depends on, or None if there is none."""
    try:
        avals = tuple(_aval_key(x) for x in dynamic)
        key = (
            trees,
            masks,
            static,
            avals,
            jax.config.jax_enable_x64,
            jax.config.jax_default_matmul_precision,
            jax.config.jax_numpy_dtype_promotion,
        )
        hash(key)
    except TypeError:  # an unhashable static leaf, or an abstract input: trace afresh
        return None
    return key


def trace(
    fn: Callable, params: Any, args: tuple, kwargs: dict, cache: dict | None = None
) -> Traced:
    """Trace ``fn(params, *args, **kwargs)``; non-array leaves are closed over.

    With ``cache``, a trace is reused for inputs of the same structure, avals and static
    leaves (as ``jax.jit`` reuses its traces: ``fn`` must be pure).
    """
    param_flat, param_tree = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_weight_node)
    param_mask = [is_dynamic(leaf) for _, leaf in param_flat]
    param_static = [leaf for _, leaf in param_flat]
    param_dynamic = [leaf for (_, leaf), dyn in zip(param_flat, param_mask) if dyn]
    param_paths = [path_str(kp) for (kp, _), dyn in zip(param_flat, param_mask) if dyn]

    arg_leaves, arg_tree = jax.tree_util.tree_flatten((args, kwargs))
    arg_mask = [is_dynamic(leaf) for leaf in arg_leaves]
    arg_dynamic = [leaf for leaf, dyn in zip(arg_leaves, arg_mask) if dyn]

    key = None
    if cache is not None:
        static = tuple(leaf for (_, leaf), dyn in zip(param_flat, param_mask) if not dyn) + tuple(
            leaf for leaf, dyn in zip(arg_leaves, arg_mask) if not dyn
        )
        key = _signature(
            (param_tree, arg_tree),
            (tuple(param_mask), tuple(arg_mask)),
            static,
            param_dynamic + arg_dynamic,
        )
        hit = cache.get(key) if key is not None else None
        if hit is not None:
            return dataclasses.replace(hit, param_leaves=param_dynamic, arg_leaves=arg_dynamic)

    def fill(static, mask, dynamic):
        it = iter(dynamic)
        return [next(it) if dyn else leaf for leaf, dyn in zip(static, mask)]

    def flat_fn(param_values, arg_values):
        params_tree = jax.tree_util.tree_unflatten(
            param_tree, fill(param_static, param_mask, param_values)
        )
        call_args, call_kwargs = jax.tree_util.tree_unflatten(
            arg_tree, fill(arg_leaves, arg_mask, arg_values)
        )
        return fn(params_tree, *call_args, **call_kwargs)

    abstract_params = [_abstract(x) for x in param_dynamic]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(abstract_params, arg_dynamic)
    out_tree = jax.tree_util.tree_structure(out_shape)
    avals = [jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) for x in param_dynamic]
    traced = Traced(closed, param_paths, avals, param_dynamic, arg_dynamic, out_tree)
    if key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
        if len(cache) >= 32:
            cache.clear()
        cache[key] = dataclasses.replace(traced, param_leaves=[], arg_leaves=[])
    return traced
