"""Binding primitives and the axis map of each primitive the engine and ``init`` read.

The engine (``_engine.py``) and layout discovery (``_layout.py``) both ask the same
questions of an equation: which operand axes a ``dot_general`` contracts, batches or
leaves free; which kernel axis a convolution maps to its output features; which axes a
``gather`` looks up; which axes a ``slice`` cuts. Each answer is written once, here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

P = jcore.primitives


def bind_params(eqn: jcore.JaxprEqn) -> tuple[list, dict]:
    """``eqn``'s params as its primitive's ``bind`` takes them (older JAX: plus subfuns)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):
        subfuns, params = params
        return list(subfuns), params
    return [], params


def bind(eqn: jcore.JaxprEqn, invals: list) -> list:
    """Apply ``eqn``'s primitive to plain values, as ``jax.core.eval_jaxpr`` does."""
    subfuns, params = bind_params(eqn)
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


# -- axis maps ----------------------------------------------------------------------


def dot_axes(dimension_numbers: Any, side: int, ndim: int) -> tuple[list, list, list]:
    """``(contracted, batch, free)`` axes of operand ``side`` (0: lhs, 1: rhs)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    contract = list((lhs_contract, rhs_contract)[side])
    batch = list((lhs_batch, rhs_batch)[side])
    free = [a for a in range(ndim) if a not in contract and a not in batch]
    return contract, batch, free


@functools.cache
def ragged_dot_primitive() -> Any:
    """The primitive ``jax.lax.ragged_dot`` binds, found by tracing it once (``jax.extend``
    does not export it); None where this JAX has no ragged dot."""
    ragged_dot = getattr(jax.lax, "ragged_dot", None)
    if ragged_dot is None:
        return None
    spec = jax.ShapeDtypeStruct
    jaxpr = jax.make_jaxpr(ragged_dot)(
        spec((2, 1), jnp.float32), spec((1, 1, 1), jnp.float32), spec((1,), jnp.int32)
    )
    return jaxpr.jaxpr.eqns[0].primitive


def ragged_rhs_axes(dimension_numbers: Any, ndim: int) -> tuple[list, list, list] | None:
    """``(contracted, group and batch, free)`` axes of a ``ragged_dot_general``'s rhs, for
    the grouped matmul of MoE layers (rows of the lhs split into groups, each group
    against its own slice of the rhs); None for the other ragged modes (a ragged
    contraction or batch, as autodiff's transposes make)."""
    groups = list(dimension_numbers.rhs_group_dimensions)
    if len(groups) != 1:
        return None
    contract, batch, _ = dot_axes(dimension_numbers.dot_dimension_numbers, 1, ndim)
    stack = batch + groups
    free = [a for a in range(ndim) if a not in contract and a not in stack]
    return contract, stack, free


def conv_kernel_axes(dimension_numbers: Any, ndim: int) -> tuple[int, list[int]]:
    """``(output-feature axis, other axes)`` of a convolution's kernel."""
    out_feature = dimension_numbers.rhs_spec[0]
    return out_feature, [a for a in range(ndim) if a != out_feature]


def gather_lookup_axes(dims: Any, shape: Sequence[int], slice_sizes: Sequence[int]) -> list[int]:
    """The operand axes a ``gather`` looks up (indexes into) rather than slices whole.

    An axis sliced whole is not looked up even when it has a start index (``vmap`` of a
    row lookup, as in Equinox's Embedding, indexes every axis).
    """
    collapsed = set(dims.collapsed_slice_dims)
    return [a for a in dims.start_index_map if slice_sizes[a] != shape[a] or a in collapsed]


def cut_axes(shape: Sequence[int], starts: Sequence[Any], sizes: Sequence[int], strides=None):
    """The axes a ``slice`` / ``dynamic_slice`` does not keep whole.

    ``starts`` may hold tracers (``dynamic_slice``): an axis is kept whole only when its
    size equals the operand's (so its start can only be 0 after clamping) and, for a
    static ``slice``, its start is 0 and its stride 1.
    """
    cut = []
    for axis, dim in enumerate(shape):
        whole = sizes[axis] == dim
        if strides is not None:
            whole = whole and starts[axis] == 0 and (strides[axis] or 1) == 1
        if not whole:
            cut.append(axis)
    return cut


def slice_extent(eqn: jcore.JaxprEqn) -> tuple[list, list[int], Any]:
    """``(starts, sizes, strides)`` of a ``slice`` (static) or ``dynamic_slice`` equation."""
    params = eqn.params
    if eqn.primitive is P.slice_p:
        start, limit = params["start_indices"], params["limit_indices"]
        strides = params["strides"] or (1,) * len(start)
        sizes = [(hi - lo + st - 1) // st for lo, hi, st in zip(start, limit, strides)]
        return list(start), sizes, strides
    return [None] * len(params["slice_sizes"]), list(params["slice_sizes"]), None


def reshape_segments(
    old_shape: Sequence[int], new_shape: Sequence[int]
) -> list[tuple[list[int], list[int]]] | None:
    """Pair groups of non-unit old axes with the new axes a reshape turns them into.

    Returns ``[(old_axes, new_axes), ...]`` covering every axis of size > 1, or None
    when the shapes do not factor into such groups.
    """
    old = [(i, d) for i, d in enumerate(old_shape) if d != 1]
    new = [(j, d) for j, d in enumerate(new_shape) if d != 1]
    segments, i, j = [], 0, 0
    while i < len(old) and j < len(new):
        old_axes, new_axes = [old[i][0]], [new[j][0]]
        old_size, new_size = old[i][1], new[j][1]
        while old_size != new_size:
            if old_size < new_size:
                i += 1
                if i >= len(old):
                    return None
                old_axes.append(old[i][0])
                old_size *= old[i][1]
            else:
                j += 1
                if j >= len(new):
                    return None
                new_axes.append(new[j][0])
                new_size *= new[j][1]
        segments.append((old_axes, new_axes))
        i, j = i + 1, j + 1
    if i != len(old) or j != len(new):
        return None
    return segments


def is_expand_dims(old_shape: Sequence[int], new_shape: Sequence[int], dims: Sequence[int]) -> bool:
    """Whether a ``broadcast_in_dim`` only inserts unit axes (no real broadcast)."""
    if any(old_shape[i] != new_shape[d] for i, d in enumerate(dims)):
        return False
    return all(new_shape[d] == 1 for d in range(len(new_shape)) if d not in dims)
