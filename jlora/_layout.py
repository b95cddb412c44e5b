"""Layout discovery: learn each target's stack/input/output axes from how ``fn`` uses it.

``fn`` is traced once to a jaxpr (abstract inputs are enough) and walked. Every value
derived from a target by layout-only operations carries a *view*: for each of its axes,
the set of the original weight's axes it came from. The first factorizable use decides
the layout (an embedding lookup wins over a matmul, so a tied embedding keeps its
vocabulary axis as the input axis, as PEFT's ``lora_embedding_A`` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from jax.extend import core as jcore

from jlora._adapter import Layout
from jlora._primitives import (
    conv_kernel_axes,
    cut_axes,
    dot_axes,
    gather_lookup_axes,
    is_expand_dims,
    ragged_dot_primitive,
    ragged_rhs_axes,
    reshape_segments,
    slice_extent,
)
from jlora._types import Path

P = jcore.primitives


@dataclasses.dataclass(frozen=True)
class _View:
    path: Path
    axes: tuple[frozenset, ...]  # per current axis: original weight axes it holds
    stacked: frozenset = frozenset()  # original axes sliced away (scan, indexing)
    cut: frozenset = frozenset()  # original axes a slice cut: these must be stack axes


@dataclasses.dataclass
class _Proposal:
    kind: str  # "gather", "dot" or "conv"
    stack: frozenset
    inputs: frozenset
    outputs: frozenset


_PASS_THROUGH = {
    P.convert_element_type_p,
    P.copy_p,
    P.sharding_constraint_p,
    P.reduce_precision_p,
}


class _Walker:
    def __init__(self):
        self.proposals: dict[Path, list[_Proposal]] = {}

    def propose(self, view: _View, kind: str, inputs, outputs, stack=frozenset()):
        inputs, outputs = frozenset(inputs), frozenset(outputs)
        stack = frozenset(stack) | view.stacked
        if view.cut - stack:  # a slice cut an axis this use does not batch: no rule fits
            return
        if inputs & outputs or inputs & stack or outputs & stack or not inputs or not outputs:
            return
        self.proposals.setdefault(view.path, []).append(_Proposal(kind, stack, inputs, outputs))

    def walk(self, jaxpr: jcore.Jaxpr, in_views: Sequence[_View | None]) -> list[_View | None]:
        env: dict[Any, _View] = {}
        for var, view in zip(jaxpr.invars, in_views):
            if view is not None:
                env[var] = view

        def read(atom):
            return None if isinstance(atom, jcore.Literal) else env.get(atom)

        for eqn in jaxpr.eqns:
            views = [read(v) for v in eqn.invars]
            if not any(views):
                continue
            outs = self.eqn(eqn, views)
            for var, view in zip(eqn.outvars, outs):
                if view is not None and not isinstance(var, jcore.DropVar):
                    env[var] = view
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, views) -> list[_View | None]:
        prim, params = eqn.primitive, eqn.params
        none = [None] * len(eqn.outvars)
        view = views[0]
        if prim in _PASS_THROUGH:
            return [view]
        if prim is P.transpose_p:
            return [
                dataclasses.replace(view, axes=tuple(view.axes[p] for p in params["permutation"]))
            ]
        if prim is P.reshape_p or prim is P.squeeze_p:
            old_shape = eqn.invars[0].aval.shape
            new_shape = eqn.outvars[0].aval.shape
            segments = reshape_segments(old_shape, new_shape)
            if segments is None:
                return none
            axes = [frozenset()] * len(new_shape)
            for old_axes, new_axes in segments:
                merged = frozenset().union(*(view.axes[a] for a in old_axes))
                for a in new_axes:
                    axes[a] = merged
            dropped = frozenset().union(*(view.axes[a] for a, d in enumerate(old_shape) if d == 1))
            return [
                _View(
                    view.path,
                    tuple(axes),
                    view.stacked | (dropped - frozenset().union(*axes)),
                    view.cut,
                )
            ]
        if prim is P.broadcast_in_dim_p:
            old_shape = eqn.invars[0].aval.shape
            new_shape = eqn.outvars[0].aval.shape
            dims = params["broadcast_dimensions"]
            if not is_expand_dims(old_shape, new_shape, dims):
                return none
            axes = [frozenset()] * len(new_shape)
            for i, d in enumerate(dims):
                axes[d] = view.axes[i]
            return [dataclasses.replace(view, axes=tuple(axes))]
        if prim in (P.slice_p, P.dynamic_slice_p):
            if view is None:
                return none
            # As in the engine: only stack axes may be cut (indexing a layer of a stacked
            # weight); an axis cut here is a stack axis of the weight.
            starts, sizes, strides = slice_extent(eqn)
            cut = cut_axes(eqn.invars[0].aval.shape, starts, sizes, strides)
            cut_original = frozenset().union(*(view.axes[a] for a in cut))
            return [dataclasses.replace(view, cut=view.cut | cut_original)]
        if prim is P.dot_general_p:
            for side in (0, 1):
                if views[side] is not None:
                    v = views[side]
                    contract, batch, free = dot_axes(params["dimension_numbers"], side, len(v.axes))
                    ins = frozenset().union(*(v.axes[a] for a in contract))
                    stack = frozenset().union(*(v.axes[a] for a in batch))
                    outs = frozenset().union(*(v.axes[a] for a in free))
                    self.propose(v, "dot", ins, outs, stack)
            return none
        if prim is ragged_dot_primitive():
            if len(views) > 1 and views[1] is not None and views[0] is None:
                v = views[1]
                axes = ragged_rhs_axes(params["ragged_dot_dimension_numbers"], len(v.axes))
                if axes is not None:
                    contract, stack, free = axes
                    ins = frozenset().union(*(v.axes[a] for a in contract))
                    stack_axes = frozenset().union(*(v.axes[a] for a in stack))
                    outs = frozenset().union(*(v.axes[a] for a in free))
                    self.propose(v, "dot", ins, outs, stack_axes)
            return none
        if prim is P.conv_general_dilated_p:
            if len(views) > 1 and views[1] is not None:
                v = views[1]
                out_feature, others = conv_kernel_axes(params["dimension_numbers"], len(v.axes))
                outs = v.axes[out_feature]
                ins = frozenset().union(*(v.axes[a] for a in others))
                self.propose(v, "conv", ins, outs)
            return none
        if prim is P.gather_p:
            if view is not None:
                dims = params["dimension_numbers"]
                shape, sizes = eqn.invars[0].aval.shape, params["slice_sizes"]
                looked_up = gather_lookup_axes(dims, shape, sizes)
                ins = frozenset().union(*(view.axes[a] for a in looked_up))
                rest = [a for a in range(len(view.axes)) if a not in looked_up]
                outs = frozenset().union(*(view.axes[a] for a in rest))
                self.propose(view, "gather", ins, outs)
            return none
        return self.higher_order(eqn, views) or none

    def higher_order(self, eqn, views) -> list[_View | None] | None:
        prim, params = eqn.primitive, eqn.params
        if prim in (P.jit_p, P.closed_call_p):
            inner = params.get("jaxpr", params.get("call_jaxpr"))
            return self.walk(inner.jaxpr, views)
        if prim in (P.custom_jvp_call_p, P.custom_vjp_call_p):
            return self.walk(params["call_jaxpr"].jaxpr, views)
        if prim is P.remat_p:
            return self.walk(params["jaxpr"], views)
        if prim is P.scan_p:
            n_fixed = params["num_consts"] + params["num_carry"]
            inner = []
            for i, view in enumerate(views):
                if view is not None and i >= n_fixed:
                    view = _View(view.path, view.axes[1:], view.stacked | view.axes[0], view.cut)
                inner.append(view)
            self.walk(params["jaxpr"].jaxpr, inner)
            return None
        if prim is P.while_p:
            n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
            self.walk(params["cond_jaxpr"].jaxpr, views[:n_cond] + views[n_cond + n_body :])
            self.walk(params["body_jaxpr"].jaxpr, views[n_cond:])
            return None
        if prim is P.cond_p:
            for branch in params["branches"]:
                self.walk(branch.jaxpr, views[1:])
            return None
        return None


def discover(
    fn: Callable,
    params: Any,
    target_paths: Sequence[Path],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
) -> dict[Path, Layout]:
    """Learn the layout of each target path from how ``fn(params, *args, **kwargs)`` uses it.

    Targets that ``fn`` never uses in a matmul, convolution or row lookup get no entry.
    """
    from jlora._trace import trace  # local: _trace imports the engine's helpers

    traced = trace(fn, params, tuple(args), dict(kwargs or {}))
    wanted = set(target_paths)
    in_views = []
    for path, aval in zip(traced.param_paths, traced.param_avals):
        if path in wanted:
            in_views.append(_View(path, tuple(frozenset([i]) for i in range(len(aval.shape)))))
        else:
            in_views.append(None)
    walker = _Walker()
    all_views = in_views + [None] * (len(traced.jaxpr.jaxpr.invars) - len(in_views))
    walker.walk(traced.jaxpr.jaxpr, all_views)

    layouts = {}
    shapes = dict(zip(traced.param_paths, (a.shape for a in traced.param_avals)))
    for path, proposals in walker.proposals.items():
        best = next((p for p in proposals if p.kind == "gather"), proposals[0])
        shape = shapes[path]
        unit_axes = {a for a, d in enumerate(shape) if d == 1} - best.stack - best.outputs
        inputs = best.inputs | unit_axes
        try:
            layouts[path] = Layout(
                tuple(shape),
                tuple(sorted(best.stack)),
                tuple(sorted(inputs)),
                tuple(sorted(best.outputs)),
            )
        except ValueError:
            continue  # axes the use did not account for: leave it to the caller
    return layouts
