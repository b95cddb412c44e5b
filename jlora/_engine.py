"""The engine: evaluate ``fn``'s jaxpr with targeted weights carried in factored form.

A targeted weight enters the interpreter as a :class:`LoraValue` (base array plus
factors). Each equation that meets one is handled by a rule:

* ``dot_general`` contracting exactly the adapter's input axes (or exactly its output
  axes): ``x·W + s·((x·A)·B)``, stack axes carried as batch axes;
* ``conv_general_dilated`` with the value as kernel: conv with A as a kernel of ``r``
  output channels, then a 1x1 projection by B;
* ``gather`` of rows (embedding lookup): the rows of A, then B;
* layout-only operations (casts, reshapes that keep the axis groups, transposes,
  squeezes, copies, slices of stack axes, sharding constraints): the same operation
  on the factors;
* ``jit``/``closed_call``/``custom_jvp_call``/``custom_vjp_call``: inlined;
  ``remat``: re-issued with ``jax.checkpoint``; ``scan``/``while``/``cond``:
  re-issued with ``jax.lax`` over interpreted bodies (a stacked weight scanned over has
  its factors scanned with it);
* anything else: ``W + s·B·A`` is built for that one use, and counted.

Only public structures are used (``jax.make_jaxpr`` and ``jax.extend.core``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jlora._adapter import LoraAdapter, inverse_permutation, wide_float
from jlora._layout import reshape_segments
from jlora._lowrank import lowrank
from jlora._paths import path_str
from jlora._trace import trace
from jlora._tree import match
from jlora._types import Adapters, Array, Params, Path

P = jcore.primitives


# --------------------------------------------------------------------------------------
# LoRA values
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoraValue:
    """A weight in factored form inside the interpreter.

    ``kinds[i]`` says whether axis ``i`` of ``w`` is a stack (``"S"``), input (``"I"``)
    or output (``"O"``) axis. ``a`` is ``(*S, *I, r)`` and ``b`` is ``(*S, r, *O)``, each
    group's axes in the order they have in ``w``.
    """

    w: Array
    a: Array
    b: Array
    kinds: tuple[str, ...]
    scale: float
    dropout: float
    path: Path

    @classmethod
    def from_adapter(cls, weight: Array, adapter: LoraAdapter, path: Path) -> LoraValue:
        layout = adapter.layout
        rank = adapter.rank
        a = adapter.lora_a.reshape(layout.stack_shape + layout.in_shape + (rank,))
        b = adapter.lora_b.reshape((*layout.stack_shape, rank, *layout.out_shape))
        return cls(weight, a, b, layout.kinds(), adapter.scale, adapter.dropout, path)

    def axes(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]

    def with_parts(self, w, a, b, kinds=None) -> LoraValue:
        return dataclasses.replace(
            self, w=w, a=a, b=b, kinds=self.kinds if kinds is None else kinds
        )


jax.tree_util.register_dataclass(
    LoraValue, data_fields=["w", "a", "b"], meta_fields=["kinds", "scale", "dropout", "path"]
)


def delta_of(value: LoraValue) -> Array:
    """``scale * A @ B`` in ``w``'s current shape and axis order, float32 or wider."""
    n_stack = len(value.axes("S"))
    dtype = wide_float(value.a.dtype, value.b.dtype)
    stack_dims = tuple(range(n_stack))
    product = jax.lax.dot_general(
        value.a.astype(dtype),
        value.b.astype(dtype),
        (((value.a.ndim - 1,), (n_stack,)), (stack_dims, stack_dims)),
    )
    product = product * jnp.asarray(value.scale, dtype)
    order = value.axes("S") + value.axes("I") + value.axes("O")
    return jnp.transpose(product, inverse_permutation(order))


def add_delta(weight: Array, delta: Array) -> Array:
    """``weight + delta`` computed in float32 (or wider) and cast back to weight's dtype."""
    dtype = wide_float(weight.dtype, delta.dtype)
    return (weight.astype(dtype) + delta.astype(dtype)).astype(weight.dtype)


# --------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------


class Uses(NamedTuple):
    """How one target's uses ran: in low-rank form, or with ``W + s·B·A`` built."""

    factored: int
    materialized: int


class Explanation(dict):
    """``{path: Uses}`` for every target, printed as a table."""

    def __str__(self) -> str:
        if not self:
            return "no targets"
        width = max(len(p) for p in self)
        lines = [f"{'target':<{width}}  factored  materialized"]
        for path, uses in self.items():
            lines.append(f"{path:<{width}}  {uses.factored:>8}  {uses.materialized:>12}")
        total = sum(u.factored for u in self.values())
        total_uses = total + sum(u.materialized for u in self.values())
        share = 100.0 * total / total_uses if total_uses else 100.0
        lines.append(f"{len(self)} targets, {total}/{total_uses} uses factored ({share:.0f} %)")
        return "\n".join(lines)

    __repr__ = __str__


@dataclasses.dataclass
class _Context:
    """Per-call state of the interpreter: use counts and the dropout key."""

    counts: dict[Path, list[int]] | None
    key: Array | None
    fast_backward: bool = False
    uses: int = 0

    def count(self, path: Path, factored: bool) -> None:
        if self.counts is not None:
            self.counts.setdefault(path, [0, 0])[0 if factored else 1] += 1

    def next_key(self) -> Array:
        self.uses += 1
        return jax.random.fold_in(self.key, self.uses)

    def child(self, key: Array | None) -> _Context:
        return _Context(self.counts, key)

    def materialize(self, value: Any) -> Any:
        if not isinstance(value, LoraValue):
            return value
        self.count(value.path, factored=False)
        return add_delta(value.w, delta_of(value))


# --------------------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PendingSum:
    """A factored use's output ``base + u``, with the add of ``u`` held back one step.

    When the next consumer is an ``add`` of a plain array (a bias), the sum is formed as
    ``(base + bias) + u``, the order a hand-written LoRA layer uses.
    """

    base: Array
    u: Array

    def resolve(self) -> Array:
        return self.base + self.u.astype(self.base.dtype)


def _resolve(value: Any) -> Any:
    return value.resolve() if isinstance(value, _PendingSum) else value


def _pending_add(eqn: jcore.JaxprEqn, invals: list) -> list | None:
    """``(base + other) + u`` for an ``add`` of one pending sum and one plain array."""
    if eqn.primitive is not P.add_p or len(invals) != 2:
        return None
    pending = [isinstance(v, _PendingSum) for v in invals]
    if pending.count(True) != 1:
        return None
    sum_value = invals[pending.index(True)]
    other = invals[pending.index(False)]
    if isinstance(other, LoraValue) or tuple(eqn.outvars[0].aval.shape) != sum_value.base.shape:
        return None
    ordered = [sum_value.base if p else v for v, p in zip(invals, pending)]
    partial = bind(eqn, ordered)[0]
    return [partial + sum_value.u.astype(partial.dtype)]


def evaluate(jaxpr: jcore.Jaxpr, consts: list, args: list, ctx: _Context) -> list:
    """Evaluate ``jaxpr`` on ``args``, which may hold :class:`LoraValue` s."""
    env: dict[Any, Any] = {}

    def read(atom):
        return atom.val if isinstance(atom, jcore.Literal) else env[atom]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        outvals = None
        if any(isinstance(v, _PendingSum) for v in invals):
            outvals = _pending_add(eqn, invals)
            invals = [_resolve(v) for v in invals]
        if outvals is None:
            if any(isinstance(v, LoraValue) for v in invals):
                outvals = _lora_eqn(eqn, invals, ctx)
            else:
                outvals = bind(eqn, invals)
        for var, value in zip(eqn.outvars, outvals):
            if not isinstance(var, jcore.DropVar):
                env[var] = value
    return [_resolve(read(v)) for v in jaxpr.outvars]


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


def _lora_eqn(eqn: jcore.JaxprEqn, invals: list, ctx: _Context) -> list:
    rule = _RULES.get(eqn.primitive)
    if rule is not None:
        out = rule(eqn, invals, ctx)
        if out is not None:
            return out
    return bind(eqn, [ctx.materialize(v) for v in invals])


# -- matmul, conv, lookup ------------------------------------------------------------


def _dropout(x: Array, value: LoraValue, ctx: _Context) -> Array:
    if value.dropout <= 0.0 or ctx.key is None:
        return x
    keep = 1.0 - value.dropout
    mask = jax.random.bernoulli(ctx.next_key(), keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def _dot_general(eqn, invals, ctx):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    lhs, rhs = invals
    if isinstance(lhs, LoraValue) and isinstance(rhs, LoraValue):
        return None
    weight_is_rhs = isinstance(rhs, LoraValue)
    value, x = (rhs, lhs) if weight_is_rhs else (lhs, rhs)
    w_contract, w_batch = (rhs_contract, rhs_batch) if weight_is_rhs else (lhs_contract, lhs_batch)
    x_contract, x_batch = (lhs_contract, lhs_batch) if weight_is_rhs else (rhs_contract, rhs_batch)
    stack, ins, outs = value.axes("S"), value.axes("I"), value.axes("O")
    if sorted(w_batch) != stack:
        return None
    if sorted(w_contract) == ins:
        first, second = value.a, value.b
        first_pos = {axis: len(stack) + k for k, axis in enumerate(ins)}
        second_rank_axis = len(stack)
    elif sorted(w_contract) == outs:
        first, second = value.b, value.a
        first_pos = {axis: len(stack) + 1 + k for k, axis in enumerate(outs)}
        second_rank_axis = second.ndim - 1
    else:
        return None
    first_pos.update({axis: k for k, axis in enumerate(stack)})
    precision = eqn.params.get("precision")
    preferred = eqn.params.get("preferred_element_type")
    base = bind(eqn, [v.w if isinstance(v, LoraValue) else v for v in invals])[0]

    x_low = _dropout(x, value, ctx)
    same_dtypes = preferred in (None, x.dtype) and base.dtype == x.dtype
    if (
        ctx.fast_backward
        and same_dtypes
        and _is_plain_projection(x, value, x_contract, w_contract, w_batch, weight_is_rhs)
    ):
        # x's trailing axes against W's input axes, in order: the common Dense/Linear
        # case, through the low-rank product whose VJP keeps to XLA's fast GEMM forms.
        u = _projection(x_low, value, len(ins), precision)
        ctx.count(value.path, factored=True)
        return [_PendingSum(base, u)]
    first = first.astype(x.dtype)
    t = jax.lax.dot_general(
        x_low,
        first,
        (
            (tuple(x_contract), tuple(first_pos[a] for a in w_contract)),
            (tuple(x_batch), tuple(first_pos[a] for a in w_batch)),
        ),
        precision=precision,
        preferred_element_type=preferred,
    )
    # t: (*batch, *x_free, r); the scale goes on this small intermediate.
    t = t * jnp.asarray(value.scale, t.dtype)
    n_batch = len(w_batch)
    second = second.astype(t.dtype)
    second_stack = tuple(stack.index(a) for a in w_batch)
    u = jax.lax.dot_general(
        t,
        second,
        (((t.ndim - 1,), (second_rank_axis,)), (tuple(range(n_batch)), second_stack)),
        precision=precision,
        preferred_element_type=preferred,
    )
    # u: (*batch, *x_free, *w_free); dot_general's own order puts lhs free axes first.
    if not weight_is_rhs:
        n_x_free = t.ndim - 1 - n_batch
        n_w_free = u.ndim - n_batch - n_x_free
        batch_axes = list(range(n_batch))
        x_free_axes = list(range(n_batch, n_batch + n_x_free))
        w_free_axes = list(range(n_batch + n_x_free, n_batch + n_x_free + n_w_free))
        u = jnp.transpose(u, batch_axes + w_free_axes + x_free_axes)
    ctx.count(value.path, factored=True)
    return [_PendingSum(base, u)]


def _is_plain_projection(x, value, x_contract, w_contract, w_batch, weight_is_rhs) -> bool:
    """``x @ W`` contracting x's last axes with all of W's input axes in order, no batch."""
    ins = value.axes("I")
    n_in = len(ins)
    return (
        weight_is_rhs
        and not w_batch
        and not value.axes("S")
        and tuple(w_contract) == tuple(ins)
        and tuple(x_contract) == tuple(range(x.ndim - n_in, x.ndim))
    )


def _projection(x: Array, value: LoraValue, n_in: int, precision: Any) -> Array:
    """``s·(x·A)·B`` by :func:`jlora._lowrank.lowrank` on 2-D factors; W's output axes last."""
    free_shape = x.shape[: x.ndim - n_in]
    rank = value.a.shape[-1]
    in_features = math.prod(value.a.shape[:-1])
    a_IxR = value.a.reshape(in_features, rank).astype(x.dtype)
    b_RxO = value.b.reshape(rank, -1).astype(x.dtype)
    u = lowrank(x.reshape(*free_shape, in_features), a_IxR, b_RxO, value.scale, precision)
    return u.reshape(*free_shape, *value.b.shape[1:])


def _conv(eqn, invals, ctx):
    lhs, kernel = invals
    if isinstance(lhs, LoraValue) or not isinstance(kernel, LoraValue):
        return None
    params = eqn.params
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return None
    numbers = params["dimension_numbers"]
    out_feature = numbers.rhs_spec[0]
    if kernel.axes("O") != [out_feature] or kernel.axes("S"):
        return None
    base = bind(eqn, [lhs, kernel.w])[0]
    # A as a kernel with r output channels: (I axes in kernel order, r) -> r moved in place.
    a_kernel = jnp.moveaxis(kernel.a, -1, out_feature).astype(lhs.dtype)
    subfuns, conv_params = bind_params(eqn)
    t = eqn.primitive.bind(*subfuns, _dropout(lhs, kernel, ctx), a_kernel, **conv_params)
    t = t * jnp.asarray(kernel.scale, t.dtype)
    feature = numbers.out_spec[1]
    u = jax.lax.dot_general(
        t,
        kernel.b.astype(t.dtype),
        (((feature,), (0,)), ((), ())),
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
    )
    u = jnp.moveaxis(u, -1, feature)
    ctx.count(kernel.path, factored=True)
    return [_PendingSum(base, u)]


def _gather(eqn, invals, ctx):
    value, indices = invals
    if not isinstance(value, LoraValue) or isinstance(indices, LoraValue) or value.axes("S"):
        return None
    params = eqn.params
    dims = params["dimension_numbers"]
    ins, outs = value.axes("I"), value.axes("O")
    mapped = list(dims.start_index_map)
    if dims.operand_batching_dims or not set(dims.collapsed_slice_dims) <= set(ins):
        return None
    if not set(ins) <= set(mapped):
        return None
    sizes = params["slice_sizes"]
    if any(sizes[a] != 1 for a in ins) or any(sizes[a] != value.w.shape[a] for a in outs):
        return None
    # ``vmap`` of a row lookup (Equinox's Embedding) also gives the output axes a start
    # index; sliced whole, that index is clamped to 0 unless out-of-bounds starts fill.
    if set(mapped) - set(ins) and params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
        return None
    base = bind(eqn, [value.w, indices])[0]
    kept = [a for a in range(value.w.ndim) if a not in dims.collapsed_slice_dims]
    n_batch = base.ndim - len(kept)
    columns = [k for k, axis in enumerate(mapped) if axis in ins]
    if len(columns) != len(mapped):
        indices = jnp.concatenate([indices[..., k : k + 1] for k in columns], axis=-1)
    # Rows of A: the same lookup over A's input axes, r kept whole at the end.
    position = {axis: k for k, axis in enumerate(ins)}
    a_dims = jax.lax.GatherDimensionNumbers(
        offset_dims=(n_batch,),
        collapsed_slice_dims=tuple(range(len(ins))),
        start_index_map=tuple(position[mapped[k]] for k in columns),
    )
    t = jax.lax.gather(
        value.a,
        indices,
        a_dims,
        slice_sizes=(1,) * len(ins) + (value.a.shape[-1],),
        mode=params["mode"],
        fill_value=params.get("fill_value"),
        indices_are_sorted=params.get("indices_are_sorted", False),
        unique_indices=params.get("unique_indices", False),
    )
    t = t * jnp.asarray(value.scale, t.dtype)
    u = jax.lax.dot_general(t, value.b.astype(t.dtype), (((t.ndim - 1,), (0,)), ((), ())))
    # u: (*batch, *O) -> (*batch, *kept) with the uncollapsed input axes as size 1; then
    # put the kept axes where the lookup puts its offset axes.
    u = u.reshape(u.shape[:n_batch] + tuple(value.w.shape[a] if a in outs else 1 for a in kept))
    offset = list(dims.offset_dims)
    perm, batch_k = [], 0
    for position_out in range(base.ndim):
        if position_out in offset:
            perm.append(n_batch + offset.index(position_out))
        else:
            perm.append(batch_k)
            batch_k += 1
    u = jnp.transpose(u, perm)
    ctx.count(value.path, factored=True)
    return [_PendingSum(base, u)]


# -- layout-only operations ----------------------------------------------------------


def _transpose(eqn, invals, ctx):
    (value,) = invals
    perm = eqn.params["permutation"]
    kinds = tuple(value.kinds[p] for p in perm)
    old = {k: value.axes(k) for k in "SIO"}
    order = {k: [old[k].index(p) for p in perm if value.kinds[p] == k] for k in "SIO"}
    n_s, n_i = len(old["S"]), len(old["I"])
    a_perm = order["S"] + [n_s + i for i in order["I"]] + [n_s + n_i]
    b_perm = order["S"] + [n_s] + [n_s + 1 + o for o in order["O"]]
    w = bind(eqn, [value.w])[0]
    return [
        value.with_parts(w, jnp.transpose(value.a, a_perm), jnp.transpose(value.b, b_perm), kinds)
    ]


def _regroup(eqn, invals, ctx):
    value = invals[0]
    if any(isinstance(v, LoraValue) for v in invals[1:]):
        return None
    w = bind(eqn, [value.w, *list(invals[1:])])[0]
    new_shape = w.shape
    segments = reshape_segments(value.w.shape, new_shape)
    if segments is None:
        return None
    kinds = ["O"] * len(new_shape)
    for old_axes, new_axes in segments:
        old_kinds = {value.kinds[a] for a in old_axes}
        if len(old_kinds) != 1:
            return None
        (kind,) = old_kinds
        for axis in new_axes:
            kinds[axis] = kind
    if "I" not in kinds:
        return None
    sizes = {k: tuple(d for d, kind in zip(new_shape, kinds) if kind == k) for k in "SIO"}
    rank = value.a.shape[-1]
    a = value.a.reshape(sizes["S"] + sizes["I"] + (rank,))
    b = value.b.reshape(sizes["S"] + (rank,) + sizes["O"])
    return [value.with_parts(w, a, b, tuple(kinds))]


def _broadcast_in_dim(eqn, invals, ctx):
    value = invals[0]
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    if len(invals) > 1 or any(value.w.shape[i] != shape[d] for i, d in enumerate(dims)):
        return None
    if any(shape[d] != 1 for d in range(len(shape)) if d not in dims):
        return None  # a real broadcast, not an expand_dims
    return _regroup(eqn, invals, ctx)


def _convert(eqn, invals, ctx):
    (value,) = invals
    new_dtype = eqn.params["new_dtype"]
    if not jnp.issubdtype(new_dtype, jnp.floating):
        return None
    w = bind(eqn, [value.w])[0]
    return [value.with_parts(w, value.a.astype(new_dtype), value.b.astype(new_dtype))]


def _on_weight_only(eqn, invals, ctx):
    (value,) = invals
    w = bind(eqn, [value.w])[0]
    return [value.with_parts(w, value.a, value.b)]


def _slice(eqn, invals, ctx):
    (value,) = invals
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(start)
    for axis, kind in enumerate(value.kinds):
        full = start[axis] == 0 and limit[axis] == value.w.shape[axis] and strides[axis] == 1
        if kind != "S" and not full:
            return None
    stack = value.axes("S")
    w = bind(eqn, [value.w])[0]
    a = jax.lax.slice(
        value.a,
        [start[s] for s in stack] + [0] * (value.a.ndim - len(stack)),
        [limit[s] for s in stack] + list(value.a.shape[len(stack) :]),
        [strides[s] for s in stack] + [1] * (value.a.ndim - len(stack)),
    )
    b = jax.lax.slice(
        value.b,
        [start[s] for s in stack] + [0] * (value.b.ndim - len(stack)),
        [limit[s] for s in stack] + list(value.b.shape[len(stack) :]),
        [strides[s] for s in stack] + [1] * (value.b.ndim - len(stack)),
    )
    return [value.with_parts(w, a, b)]


def _dynamic_slice(eqn, invals, ctx):
    value, *starts = invals
    if any(isinstance(s, LoraValue) for s in starts):
        return None
    sizes = eqn.params["slice_sizes"]
    for axis, kind in enumerate(value.kinds):
        if kind != "S" and sizes[axis] != value.w.shape[axis]:
            return None
    stack = value.axes("S")
    w = bind(eqn, [value.w, *starts])[0]
    zero = jnp.zeros((), jnp.int32)
    stack_starts = [starts[s] for s in stack]
    stack_sizes = [sizes[s] for s in stack]
    a = jax.lax.dynamic_slice(
        value.a,
        stack_starts + [zero] * (value.a.ndim - len(stack)),
        stack_sizes + list(value.a.shape[len(stack) :]),
    )
    b = jax.lax.dynamic_slice(
        value.b,
        stack_starts + [zero] * (value.b.ndim - len(stack)),
        stack_sizes + list(value.b.shape[len(stack) :]),
    )
    return [value.with_parts(w, a, b)]


# -- higher-order primitives ---------------------------------------------------------


def _inline(eqn, invals, ctx):
    closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return evaluate(closed.jaxpr, closed.consts, invals, ctx)


def _remat(eqn, invals, ctx):
    jaxpr = eqn.params["jaxpr"]

    def body(*args):
        return evaluate(jaxpr, [], list(args), ctx)

    run = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
    return list(run(*invals))


def _passthrough_carry(carry_in: list, carry_out: list) -> set[int]:
    """Carry positions whose body output is the very input (loop-invariant weights)."""
    return {k for k, (var_in, var_out) in enumerate(zip(carry_in, carry_out)) if var_in is var_out}


def _scan(eqn, invals, ctx):
    params = eqn.params
    closed = params["jaxpr"]
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts = invals[:n_consts]
    init = invals[n_consts : n_consts + n_carry]
    xs = invals[n_consts + n_carry :]
    body_jaxpr = closed.jaxpr
    invariant = _passthrough_carry(
        body_jaxpr.invars[n_consts : n_consts + n_carry],
        body_jaxpr.outvars[:n_carry],
    )
    fixed = {
        k: init[k] for k in range(n_carry) if isinstance(init[k], LoraValue) and k in invariant
    }
    loop_init = [None if k in fixed else ctx.materialize(v) for k, v in enumerate(init)]
    sliced = []
    for value in xs:
        if isinstance(value, LoraValue):
            if value.kinds[0] != "S":
                value = ctx.materialize(value)
            else:  # scan slices axis 0 of w, a and b alike: the first stack axis.
                value = dataclasses.replace(value, kinds=value.kinds[1:])
        sliced.append(value)
    length = params["length"]
    keyed = ctx.key is not None
    if keyed:
        sliced.append(jnp.arange(length, dtype=jnp.uint32))
        scan_key = ctx.next_key()

    def body(carry, x):
        inner = ctx.child(jax.random.fold_in(scan_key, x[-1]) if keyed else None)
        x = x[:-1] if keyed else x
        carry = [fixed[k] if k in fixed else c for k, c in enumerate(carry)]
        outs = evaluate(body_jaxpr, closed.consts, list(consts) + carry + list(x), inner)
        new_carry = [
            None if k in fixed else inner.materialize(o) for k, o in enumerate(outs[:n_carry])
        ]
        return new_carry, [inner.materialize(o) for o in outs[n_carry:]]

    carry, ys = jax.lax.scan(
        body, loop_init, sliced, length=length, reverse=params["reverse"], unroll=params["unroll"]
    )
    carry = [fixed[k] if k in fixed else c for k, c in enumerate(carry)]
    return list(carry) + list(ys)


def _while(eqn, invals, ctx):
    params = eqn.params
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts = invals[:n_cond]
    body_consts = invals[n_cond : n_cond + n_body]
    init = invals[n_cond + n_body :]
    cond_closed, body_closed = params["cond_jaxpr"], params["body_jaxpr"]
    n_carry = len(init)
    invariant = _passthrough_carry(body_closed.jaxpr.invars[n_body:], body_closed.jaxpr.outvars)
    fixed = {
        k: init[k] for k in range(n_carry) if isinstance(init[k], LoraValue) and k in invariant
    }
    keyed = ctx.key is not None
    loop_key = ctx.next_key() if keyed else None

    def full(carry):
        return [fixed[k] if k in fixed else c for k, c in enumerate(carry)]

    def cond_fun(state):
        carry, _ = state
        return evaluate(
            cond_closed.jaxpr, cond_closed.consts, list(cond_consts) + full(carry), ctx
        )[0]

    def body_fun(state):
        carry, step = state
        inner = ctx.child(jax.random.fold_in(loop_key, step) if keyed else None)
        outs = evaluate(
            body_closed.jaxpr, body_closed.consts, list(body_consts) + full(carry), inner
        )
        return [None if k in fixed else inner.materialize(o) for k, o in enumerate(outs)], step + 1

    loop_init = [None if k in fixed else ctx.materialize(v) for k, v in enumerate(init)]
    carry, _ = jax.lax.while_loop(cond_fun, body_fun, (loop_init, jnp.zeros((), jnp.uint32)))
    return full(carry)


def _cond(eqn, invals, ctx):
    index, *operands = invals
    if isinstance(index, LoraValue):
        return None

    def branch_fn(closed):
        def run(*ops):
            outs = evaluate(closed.jaxpr, closed.consts, list(ops), ctx)
            return [ctx.materialize(o) for o in outs]

        return run

    return list(jax.lax.switch(index, [branch_fn(b) for b in eqn.params["branches"]], *operands))


_RULES: dict[Any, Callable] = {
    P.dot_general_p: _dot_general,
    P.conv_general_dilated_p: _conv,
    P.gather_p: _gather,
    P.transpose_p: _transpose,
    P.reshape_p: _regroup,
    P.squeeze_p: _regroup,
    P.broadcast_in_dim_p: _broadcast_in_dim,
    P.convert_element_type_p: _convert,
    P.copy_p: _on_weight_only,
    P.sharding_constraint_p: _on_weight_only,
    P.reduce_precision_p: _on_weight_only,
    P.slice_p: _slice,
    P.dynamic_slice_p: _dynamic_slice,
    P.jit_p: _inline,
    P.closed_call_p: _inline,
    P.custom_jvp_call_p: _inline,
    P.custom_vjp_call_p: _inline,
    P.remat_p: _remat,
    P.scan_p: _scan,
    P.while_p: _while,
    P.cond_p: _cond,
}


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def run(
    fn: Callable,
    params: Params,
    adapters: Adapters,
    args: tuple,
    kwargs: dict,
    *,
    key: Array | None = None,
    counts: dict | None = None,
    cache: dict | None = None,
    fast_backward: bool | None = None,
) -> Any:
    """``fn(merge(params, adapters), *args, **kwargs)``, computed in factored form.

    ``fast_backward`` (default: on for the CPU backend) routes plain projections through
    :func:`jlora._lowrank.lowrank`, whose custom VJP orders the backward products for
    XLA's fast GEMM path; being a ``custom_vjp``, it has no forward-mode derivative.
    """
    if fast_backward is None:
        fast_backward = jax.default_backend() == "cpu"
    nodes = match(params, adapters)
    copies = {p: n for p, n in nodes.items() if not isinstance(n, LoraAdapter)}
    if copies:
        params = _replace_leaves(params, copies)
    traced = trace(fn, params, args, kwargs, cache)
    ctx = _Context(counts, key, fast_backward)
    inputs = []
    for path, leaf in zip(traced.param_paths, traced.param_leaves):
        node = nodes.get(path)
        inputs.append(
            LoraValue.from_adapter(leaf, node, path) if isinstance(node, LoraAdapter) else leaf
        )
    if counts is not None:
        for path, node in nodes.items():
            if isinstance(node, LoraAdapter):
                counts.setdefault(path, [0, 0])
    outs = evaluate(traced.jaxpr.jaxpr, traced.jaxpr.consts, inputs + traced.arg_leaves, ctx)
    outs = [ctx.materialize(o) for o in outs]
    return jax.tree_util.tree_unflatten(traced.out_tree, outs)


def _replace_leaves(params: Params, replacements: dict[Path, Any]) -> Params:
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: replacements.get(path_str(kp), leaf), params
    )
