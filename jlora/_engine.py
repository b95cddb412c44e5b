"""The engine: evaluate ``fn``'s jaxpr with targeted weights carried in factored form.

A targeted weight enters the interpreter as a :class:`Target`: a weight kind (what the
leaf of ``params`` is: a dense array, an NF4 node...), an optional adapter kind (what is
added to it: LoRA, DoRA...) and its path. The two are independent axes, and each rule
below asks the weight for its base product and the adapter for its term, so every
combination composes:

* a contraction (``dot_general``, ``conv_general_dilated`` with the target as kernel,
  ``gather`` of rows) is decoded once into a *use* (:class:`DotUse`, :class:`ConvUse`,
  :class:`GatherUse`): which weight axes it contracts, how batch and stack axes map,
  where the output features land. The weight gives ``use.product(weight)``; the
  adapter gives ``adapter.output(use, x, base, weight)`` (LoRA: ``base + term``),
  built from ``use.lowrank`` and ``use.per_output``;
* layout-only operations (casts, reshapes that keep the axis groups, transposes,
  squeezes, copies, slices of stack axes, sharding constraints) go to the weight's
  ``apply`` and to one generic rule for the adapter, driven by the axis signature of
  each of its arrays (``SIGNATURES`` in ``_adapter.py``);
* ``jit``/``closed_call``/``custom_jvp_call``/``custom_vjp_call``: inlined;
  ``remat``: re-issued with ``jax.checkpoint``; ``scan``/``while``/``cond``:
  re-issued with ``jax.lax`` over interpreted bodies (a stacked weight scanned over has
  its encoded arrays and its adapter's arrays scanned with it);
* anything else: the dense merged weight is built for that one use, and counted.

Only public structures are used (``jax.make_jaxpr`` and ``jax.extend.core``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jlora._adapter import Layout, LoraAdapter
from jlora._compress import LowRankWeight
from jlora._lowrank import lowrank, lowrank_shared
from jlora._paths import path_str
from jlora._primitives import (
    bind,
    bind_params,
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
from jlora._trace import trace
from jlora._tree import match
from jlora._types import Adapters, Array, Params, Path
from jlora._weights import DenseWeight, WeightNode, is_weight_node

P = jcore.primitives


# --------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """A targeted weight inside the interpreter: weight kind, adapter kind, path.

    ``adapter`` (or None) holds its arrays in grouped form, and its ``layout`` always
    describes the weight's current view (shape and which axes are stack, input and
    output axes), so layout operations update both together.
    """

    weight: Any
    adapter: LoraAdapter | None
    path: Path

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.adapter.layout.kinds()

    def axes(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]


jax.tree_util.register_dataclass(Target, data_fields=["weight", "adapter"], meta_fields=["path"])


def _layout_from(shape: tuple[int, ...], kinds: list[str] | tuple[str, ...]) -> Layout | None:
    """:meth:`Layout.from_kinds`, or None where no rule fits (no input or output axis)."""
    try:
        return Layout.from_kinds(shape, kinds)
    except ValueError:
        return None


def _token_axes(adapter: LoraAdapter, name: str) -> list[tuple[str, list[int]]]:
    """Each signature token of field ``name`` with the array axes it spans (grouped form)."""
    layout = adapter.layout
    count = {"S": len(layout.stack_axes), "I": len(layout.in_axes), "O": len(layout.out_axes)}
    spans, offset = [], 0
    for token in adapter.SIGNATURES[name]:
        n = count.get(token, 1)
        spans.append((token, list(range(offset, offset + n))))
        offset += n
    return spans


def _relayout(adapter: LoraAdapter, layout: Layout, per_field: Callable) -> LoraAdapter:
    """The adapter for a new view ``layout``; ``per_field(array, spans)`` maps each array."""
    arrays = {
        name: per_field(array, _token_axes(adapter, name))
        for name, array in adapter.arrays().items()
    }
    return dataclasses.replace(adapter.with_arrays(**arrays), layout=layout)


def grouped_target(weight: Any, adapter: LoraAdapter | None, path: Path) -> Target:
    """A params leaf and its adapter node (storage form) as an interpreter value."""
    if isinstance(weight, LowRankWeight):
        weight = weight.engine_form()
    elif not isinstance(weight, WeightNode):
        weight = DenseWeight(weight)
    if adapter is not None:
        adapter = adapter.with_arrays(**adapter.grouped())
    return Target(weight, adapter, path)


# --------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------


class Uses(NamedTuple):
    """How one target's uses ran: in low-rank form, or with ``W + s·B·A`` built."""

    factored: int
    materialized: int


class Explanation(dict):
    """``{path: Uses}`` for every target, printed as a table with each target's kinds.

    ``kinds[path]`` is ``(weight kind, adapter kind)``, e.g. ``("nf4", "dora")``; the
    adapter kind is ``"-"`` for a quantized weight without an adapter. ``forms[path]``
    counts the factored uses by form: ``"matmul"`` (``x·W``), ``"matmul.T"`` (``x·Wᵀ``,
    a tied head), ``"batched"`` (the weight's stack axes batch the contraction, as
    expert kernels in an einsum do), ``"grouped"`` (``ragged_dot`` over expert groups),
    ``"conv"``, ``"lookup"``, ``"base only"`` (a quantized weight without an adapter),
    with ``", per-example"`` for a stack chosen by ``lora_ids`` and ``", routed"`` for a
    mixture of LoRA experts.
    """

    def __init__(
        self,
        *args,
        kinds: dict[Path, tuple[str, str]] | None = None,
        forms: dict[Path, dict[str, int]] | None = None,
    ):
        super().__init__(*args)
        self.kinds = dict(kinds or {})
        self.forms = {path: dict(by_form) for path, by_form in (forms or {}).items()}

    def __str__(self) -> str:
        if not self:
            return "no targets"
        width = max(len(p) for p in self)
        lines = [f"{'target':<{width}}  weight  adapter  factored  materialized  forms"]
        for path, uses in self.items():
            weight, adapter = self.kinds.get(path, ("dense", "lora"))
            forms = "; ".join(f"{form} ×{n}" for form, n in self.forms.get(path, {}).items())
            lines.append(
                f"{path:<{width}}  {weight:<6}  {adapter:<7}  {uses.factored:>8}  "
                f"{uses.materialized:>12}  {forms}".rstrip()
            )
        total = sum(u.factored for u in self.values())
        total_uses = total + sum(u.materialized for u in self.values())
        share = 100.0 * total / total_uses if total_uses else 100.0
        lines.append(f"{len(self)} targets, {total}/{total_uses} uses factored ({share:.0f} %)")
        return "\n".join(lines)

    __repr__ = __str__


def _aux_dtype() -> Any:
    """Auxiliary losses are JAX's default float: float32, or float64 under ``jax_enable_x64``."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


@dataclasses.dataclass
class _Context:
    """Per-call state of the interpreter: use counts, the dropout key, the fast path."""

    counts: dict[Path, list[int]] | None
    key: Array | None
    fast_backward: bool = False
    uses: int = 0
    lora_ids: Array | None = None
    aux: list | None = None  # (sum, count) pairs of balance losses, when collected
    forms: dict[Path, dict[str, int]] | None = None  # factored uses by form, for explain
    # Low-rank terms computed ahead, by equation id, for uses sharing one input (and the
    # group's size): see _shared_input_terms.
    shared: dict[int, Array] = dataclasses.field(default_factory=dict)
    shared_sizes: dict[int, int] = dataclasses.field(default_factory=dict)

    def count(self, path: Path, factored: bool, form: str | None = None) -> None:
        if self.counts is not None:
            self.counts.setdefault(path, [0, 0])[0 if factored else 1] += 1
        if form is not None and self.forms is not None:
            by_form = self.forms.setdefault(path, {})
            by_form[form] = by_form.get(form, 0) + 1

    def next_key(self) -> Array:
        self.uses += 1
        return jax.random.fold_in(self.key, self.uses)

    def child(self, key: Array | None) -> _Context:
        """The context of a traced body (loop, branch, remat): same counts, fast path and
        ids, its own key, and its own auxiliary losses (handed out as body outputs, so
        no tracer of the body leaks into this context)."""
        aux = None if self.aux is None else []
        return _Context(
            self.counts, key, self.fast_backward, lora_ids=self.lora_ids, aux=aux,
            forms=self.forms,
        )  # fmt: skip

    def add_aux(self, loss: Array, count: Array | int = 1) -> None:
        """Record one router's balance loss (ignored unless aux losses are collected)."""
        if self.aux is not None:
            self.aux.append((jnp.asarray(loss, _aux_dtype()), jnp.asarray(count, _aux_dtype())))

    def aux_total(self) -> list[Array]:
        """``[sum, count]`` of the recorded losses (zeros when none): a body's extra outputs."""
        if not self.aux:
            return [jnp.zeros((), _aux_dtype()), jnp.zeros((), _aux_dtype())]
        return [sum(loss for loss, _ in self.aux), sum(count for _, count in self.aux)]

    def materialize(self, value: Any) -> Any:
        if not isinstance(value, Target):
            return value
        self.count(value.path, factored=False)
        return dense_value(value)


def dense_value(target: Target) -> Array:
    """The array ``fn`` sees at ``target``: the merged weight in its current view."""
    weight = target.weight.dense()
    if target.adapter is None:
        return weight
    return target.adapter.flattened().merge_into(weight)


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
    if isinstance(other, Target) or tuple(eqn.outvars[0].aval.shape) != sum_value.base.shape:
        return None
    ordered = [sum_value.base if p else v for v, p in zip(invals, pending)]
    partial = bind(eqn, ordered)[0]
    return [partial + sum_value.u.astype(partial.dtype)]


def evaluate(jaxpr: jcore.Jaxpr, consts: list, args: list, ctx: _Context) -> list:
    """Evaluate ``jaxpr`` on ``args``, which may hold :class:`Target` s."""
    env: dict[Any, Any] = {}

    def read(atom):
        return atom.val if isinstance(atom, jcore.Literal) else env[atom]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    groups = _shared_input_groups(jaxpr) if ctx.fast_backward else {}
    for index, eqn in enumerate(jaxpr.eqns):
        if index in groups:
            _shared_input_terms([jaxpr.eqns[j] for j in groups[index]], env, ctx)
        invals = [read(v) for v in eqn.invars]
        outvals = None
        if any(isinstance(v, _PendingSum) for v in invals):
            outvals = _pending_add(eqn, invals)
            invals = [_resolve(v) for v in invals]
        if outvals is None:
            if any(isinstance(v, Target) for v in invals):
                outvals = _target_eqn(eqn, invals, ctx)
            else:
                outvals = bind(eqn, invals)
        for var, value in zip(eqn.outvars, outvals):
            if not isinstance(var, jcore.DropVar):
                env[var] = value
    return [_resolve(read(v)) for v in jaxpr.outvars]


def _shared_input_groups(jaxpr: jcore.Jaxpr) -> dict[int, list[int]]:
    """``{first index: indices}`` of the ``dot_general`` s that read one activation
    variable as their lhs and a variable as their rhs (q, k, v of one input; gate and
    up), for groups of two or more: the look-ahead of :func:`_shared_input_terms`."""
    by_input: dict[Any, list[int]] = {}
    for index, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive is not P.dot_general_p:
            continue
        lhs, rhs = eqn.invars
        if isinstance(lhs, jcore.Literal) or isinstance(rhs, jcore.Literal):
            continue
        by_input.setdefault(lhs, []).append(index)
    return {indices[0]: indices for indices in by_input.values() if len(indices) > 1}


def _shared_input_terms(eqns: list, env: dict, ctx: _Context) -> None:
    """Compute ahead, in one ``x·[A_1|...|A_k]`` product (:func:`lowrank_shared`), the
    low-rank terms of the plain-LoRA projections among ``eqns`` that read the same
    activation ``x``: the first of them is about to run, and the others' weights are
    already known. Each term is kept for its equation's own :meth:`DotUse.lowrank`."""
    x = env.get(eqns[0].invars[0])
    if not isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return
    members = []
    for eqn in eqns:
        target = env.get(eqn.invars[1])
        if not isinstance(target, Target) or type(target.adapter) is not LoraAdapter:
            continue
        if target.adapter.dropout > 0.0 and ctx.key is not None:
            continue  # each use draws its own dropout mask: no shared input
        use = DotUse.decode(eqn, [x, target], ctx)
        if use is None or not use._is_plain_projection():
            continue
        preferred = eqn.params.get("preferred_element_type")
        if preferred not in (None, x.dtype) or eqn.outvars[0].aval.dtype != x.dtype:
            continue
        members.append((eqn, target.adapter, use))
    precisions = {str(eqn.params.get("precision")) for eqn, _, _ in members}
    if len(members) < 2 or len(precisions) != 1:
        return
    n_in = {len(adapter.layout.in_axes) for _, adapter, _ in members}
    features = {adapter.layout.in_features for _, adapter, _ in members}
    if len(n_in) != 1 or len(features) != 1:
        return
    (n_in,), (in_features,) = n_in, features
    free_shape = x.shape[: x.ndim - n_in]
    a_list, b_list = [], []
    for _, adapter, _ in members:
        rank = adapter.lora_a.shape[-1]
        a_list.append(adapter.lora_a.reshape(in_features, rank).astype(x.dtype))
        b_list.append(adapter.lora_b.reshape(rank, -1).astype(x.dtype))
    terms = lowrank_shared(
        x.reshape(*free_shape, in_features), tuple(a_list), tuple(b_list),
        tuple(adapter.scale for _, adapter, _ in members), members[0][0].params.get("precision"),
    )  # fmt: skip
    for (eqn, adapter, _), term in zip(members, terms):
        ctx.shared[id(eqn)] = term.reshape(*free_shape, *adapter.lora_b.shape[1:])
        ctx.shared_sizes[id(eqn)] = len(members)


def _target_eqn(eqn: jcore.JaxprEqn, invals: list, ctx: _Context) -> list:
    rule = _RULES.get(eqn.primitive)
    if rule is not None:
        out = rule(eqn, invals, ctx)
        if out is not None:
            return out
    return bind(eqn, [ctx.materialize(v) for v in invals])


# -- uses: contractions decoded once -------------------------------------------------


def _dropout(x: Array, adapter: LoraAdapter, ctx: _Context) -> Array:
    if adapter.dropout <= 0.0 or ctx.key is None:
        return x
    keep = 1.0 - adapter.dropout
    mask = jax.random.bernoulli(ctx.next_key(), keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


@dataclasses.dataclass
class DotUse:
    """A ``dot_general`` with the target on one side.

    ``contracted`` is ``"I"`` when the use contracts exactly the weight's input axes
    (``x·W``) and ``"O"`` when it contracts its output axes (a tied head, ``x·Wᵀ``).
    The weight's stack axes are batch axes, in ``w_batch`` order.
    """

    eqn: jcore.JaxprEqn
    x: Array
    layout: Layout
    weight_is_rhs: bool
    w_contract: list[int]
    w_batch: list[int]
    x_contract: list[int]
    x_batch: list[int]
    contracted: str
    ctx: _Context

    @classmethod
    def decode(cls, eqn, invals, ctx) -> DotUse | None:
        lhs, rhs = invals
        if isinstance(lhs, Target) and isinstance(rhs, Target):
            return None
        weight_is_rhs = isinstance(rhs, Target)
        target, x = (rhs, lhs) if weight_is_rhs else (lhs, rhs)
        if target.adapter is None:
            return None
        dims = eqn.params["dimension_numbers"]
        w_side = 1 if weight_is_rhs else 0
        w_contract, w_batch, _ = dot_axes(dims, w_side, len(target.kinds))
        x_contract, x_batch, _ = dot_axes(dims, 1 - w_side, x.ndim)
        stack, ins, outs = target.axes("S"), target.axes("I"), target.axes("O")
        if sorted(w_batch) != stack:
            return None
        if sorted(w_contract) == ins:
            contracted = "I"
        elif sorted(w_contract) == outs:
            contracted = "O"
        else:
            return None
        return cls(
            eqn, x, target.adapter.layout, weight_is_rhs, w_contract, w_batch, x_contract,
            x_batch, contracted, ctx,
        )  # fmt: skip

    def product(self, weight: Any, x: Array | None = None) -> Array:
        """The weight's own product at this use (with another activation ``x``)."""
        x = self.x if x is None else x

        def contract(w, x):
            return bind(self.eqn, [x, w] if self.weight_is_rhs else [w, x])[0]

        return weight.product(contract, x)

    def _is_plain_projection(self) -> bool:
        """``x @ W`` contracting x's last axes with all of W's input axes in order."""
        ins = list(self.layout.in_axes)
        n_in = len(ins)
        return (
            self.weight_is_rhs
            and self.contracted == "I"
            and not self.w_batch
            and not self.layout.stack_axes
            and list(self.w_contract) == ins
            and list(self.x_contract) == list(range(self.x.ndim - n_in, self.x.ndim))
        )

    def lowrank(self, x: Array, a: Array, b: Array, scale: float) -> Array:
        """``s·(x·A)·B`` in this use's output layout (grouped ``a``, ``b``)."""
        eqn, layout = self.eqn, self.layout
        precision = eqn.params.get("precision")
        preferred = eqn.params.get("preferred_element_type")
        out_dtype = eqn.outvars[0].aval.dtype
        same_dtypes = preferred in (None, x.dtype) and out_dtype == x.dtype
        shared = self.ctx.shared.pop(id(eqn), None)
        if shared is not None:  # computed ahead with the other uses of this input
            return shared
        if self.ctx.fast_backward and same_dtypes and self._is_plain_projection():
            # x's trailing axes against W's input axes, in order: the common Dense/Linear
            # case, through the low-rank product whose VJP keeps to XLA's fast GEMM forms.
            n_in = len(layout.in_axes)
            free_shape = x.shape[: x.ndim - n_in]
            rank = a.shape[-1]
            a_IxR = a.reshape(layout.in_features, rank).astype(x.dtype)
            b_RxO = b.reshape(rank, -1).astype(x.dtype)
            u = lowrank(x.reshape(*free_shape, layout.in_features), a_IxR, b_RxO, scale, precision)
            return u.reshape(*free_shape, *b.shape[1:])
        stack, ins, outs = list(layout.stack_axes), list(layout.in_axes), list(layout.out_axes)
        if self.contracted == "I":
            first, second = a, b
            first_pos = {axis: len(stack) + k for k, axis in enumerate(ins)}
            second_rank_axis = len(stack)
        else:
            first, second = b, a
            first_pos = {axis: len(stack) + 1 + k for k, axis in enumerate(outs)}
            second_rank_axis = second.ndim - 1
        first_pos.update({axis: k for k, axis in enumerate(stack)})
        t = jax.lax.dot_general(
            x,
            first.astype(x.dtype),
            (
                (tuple(self.x_contract), tuple(first_pos[a] for a in self.w_contract)),
                (tuple(self.x_batch), tuple(first_pos[a] for a in self.w_batch)),
            ),
            precision=precision,
            preferred_element_type=preferred,
        )
        # t: (*batch, *x_free, r); the scale goes on this small intermediate.
        t = t * jnp.asarray(scale, t.dtype)
        n_batch = len(self.w_batch)
        second_stack = tuple(stack.index(a) for a in self.w_batch)
        u = jax.lax.dot_general(
            t,
            second.astype(t.dtype),
            (((t.ndim - 1,), (second_rank_axis,)), (tuple(range(n_batch)), second_stack)),
            precision=precision,
            preferred_element_type=preferred,
        )
        # u: (*batch, *x_free, *w_free); dot_general's own order puts lhs free axes first.
        if not self.weight_is_rhs:
            n_x_free = t.ndim - 1 - n_batch
            n_w_free = u.ndim - n_batch - n_x_free
            batch_axes = list(range(n_batch))
            x_free = list(range(n_batch, n_batch + n_x_free))
            w_free = list(range(n_batch + n_x_free, n_batch + n_x_free + n_w_free))
            u = jnp.transpose(u, batch_axes + w_free + x_free)
        return u

    def contract_inputs(self, x: Array, piece: Array, in_start: int) -> Array:
        """``x`` contracted with a grouped ``piece`` as this use contracts the weight.

        ``piece`` holds the weight's stack axes first and its input axes from position
        ``in_start`` on; its other axes stay free. Only for a use contracting ``"I"``.
        The result is ``(*batch, *x_free, *piece_free)``.
        """
        position = {axis: k for k, axis in enumerate(self.layout.stack_axes)}
        position.update({axis: in_start + k for k, axis in enumerate(self.layout.in_axes)})
        return jax.lax.dot_general(
            x,
            piece.astype(x.dtype),
            (
                (tuple(self.x_contract), tuple(position[a] for a in self.w_contract)),
                (tuple(self.x_batch), tuple(position[a] for a in self.w_batch)),
            ),
            precision=self.eqn.params.get("precision"),
            preferred_element_type=self.eqn.params.get("preferred_element_type"),
        )

    def project_outputs(self, t: Array, piece: Array, n_contract: int) -> Array:
        """``t (*batch, *x_free, *k)`` contracted over its last ``n_contract`` axes with
        the leading non-stack axes of a grouped ``piece (*stack, *k, *out)``, placed in
        this use's output order."""
        n_stack = len(self.layout.stack_axes)
        n_batch = len(self.w_batch)
        stack = list(self.layout.stack_axes)
        u = jax.lax.dot_general(
            t,
            piece.astype(t.dtype),
            (
                (
                    tuple(range(t.ndim - n_contract, t.ndim)),
                    tuple(range(n_stack, n_stack + n_contract)),
                ),
                (tuple(range(n_batch)), tuple(stack.index(a) for a in self.w_batch)),
            ),
            precision=self.eqn.params.get("precision"),
            preferred_element_type=self.eqn.params.get("preferred_element_type"),
        )
        if not self.weight_is_rhs:  # dot_general puts the weight's free axes first
            n_x_free = t.ndim - n_contract - n_batch
            n_w_free = u.ndim - n_batch - n_x_free
            u = jnp.transpose(
                u,
                list(range(n_batch))
                + list(range(n_batch + n_x_free, n_batch + n_x_free + n_w_free))
                + list(range(n_batch, n_batch + n_x_free)),
            )
        return u

    def per_example(self, x: Array, a: Array, b: Array, scales: Array, ids: Array):
        """``s_k·(x_e·A_k)·B_k`` for each example ``e`` with ``k = ids[e]`` (0 for -1).

        Grouped ``a (N, *in, R)``, ``b (N, R, *out)``, ``scales (N,)``. Only where the
        example axis is the activation's leading free axis and the weight is the rhs,
        contracted over its input axes with no stack axes in the view (a projection,
        per scanned layer); None elsewhere.
        """
        layout = self.layout
        if (
            not self.weight_is_rhs
            or self.contracted != "I"
            or self.w_batch
            or layout.stack_axes
            or self.x_batch
            or x.ndim == 0
            or 0 in self.x_contract
        ):
            return None
        if x.shape[0] != ids.shape[0]:
            raise ValueError(
                f"lora_ids has {ids.shape[0]} entries but an activation reaching a stacked "
                f"adapter has leading (example) axis of size {x.shape[0]}: pass one id per "
                "example"
            )
        eqn = self.eqn
        precision = eqn.params.get("precision")
        preferred = eqn.params.get("preferred_element_type")
        valid = ids >= 0
        safe = jnp.where(valid, ids, 0)
        a_sel = jnp.take(a, safe, axis=0).astype(x.dtype)  # (E, *in, R)
        b_sel = jnp.take(b, safe, axis=0).astype(x.dtype)  # (E, R, *out)
        s = jnp.where(valid, jnp.take(scales, safe, axis=0), 0).astype(x.dtype)
        a_pos = {axis: 1 + k for k, axis in enumerate(layout.in_axes)}
        t = jax.lax.dot_general(
            x,
            a_sel,
            ((tuple(self.x_contract), tuple(a_pos[w] for w in self.w_contract)), ((0,), (0,))),
            precision=precision,
            preferred_element_type=preferred,
        )  # (E, *x_free, R)
        t = t * s.reshape((-1,) + (1,) * (t.ndim - 1)).astype(t.dtype)
        return jax.lax.dot_general(
            t,
            b_sel.astype(t.dtype),
            (((t.ndim - 1,), (1,)), ((0,), (0,))),
            precision=precision,
            preferred_element_type=preferred,
        )  # (E, *x_free, *out): the use's own output order

    def with_x(self, x: Array) -> DotUse:
        return dataclasses.replace(self, x=x)

    def per_input(self, vec: Array) -> Array:
        """A ``(*stack, *out)`` array broadcast against ``x``, for a use contracting "O"."""
        stack, outs = list(self.layout.stack_axes), list(self.layout.out_axes)
        position = {a: i for i, a in enumerate(stack)}
        position.update({a: len(stack) + j for j, a in enumerate(outs)})
        order, shape = [], []
        for axis in range(self.x.ndim):
            if axis in self.x_batch:
                weight_axis = self.w_batch[self.x_batch.index(axis)]
            elif axis in self.x_contract:
                weight_axis = self.w_contract[self.x_contract.index(axis)]
            else:
                shape.append(1)
                continue
            order.append(position[weight_axis])
            shape.append(vec.shape[position[weight_axis]])
        return jnp.transpose(vec, order).reshape(shape)

    def per_output(self, vec: Array) -> Array:
        """A ``(*stack, *out)`` array (grouped) broadcast against this use's output."""
        stack = list(self.layout.stack_axes)
        n_stack = len(stack)
        order = [stack.index(a) for a in self.w_batch] + list(range(n_stack, vec.ndim))
        vec = jnp.transpose(vec, order)
        n_x_free = self.x.ndim - len(self.x_contract) - len(self.x_batch)
        batch_shape, out_shape = vec.shape[:n_stack], vec.shape[n_stack:]
        ones = (1,) * n_x_free
        if self.weight_is_rhs:
            return vec.reshape(batch_shape + ones + out_shape)
        return vec.reshape(batch_shape + out_shape + ones)


@dataclasses.dataclass
class ConvUse:
    """A convolution with the target as its kernel (output features on one kernel axis)."""

    eqn: jcore.JaxprEqn
    x: Array
    layout: Layout
    contracted: str = "I"

    @classmethod
    def decode(cls, eqn, invals, ctx) -> ConvUse | None:
        lhs, kernel = invals
        if isinstance(lhs, Target) or not isinstance(kernel, Target) or kernel.adapter is None:
            return None
        params = eqn.params
        if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
            return None
        out_feature, _ = conv_kernel_axes(params["dimension_numbers"], len(kernel.kinds))
        if kernel.axes("O") != [out_feature] or kernel.axes("S"):
            return None
        return cls(eqn, lhs, kernel.adapter.layout)

    def product(self, weight: Any, x: Array | None = None) -> Array:
        x = self.x if x is None else x
        return weight.product(lambda w, x: bind(self.eqn, [x, w])[0], x)

    def lowrank(self, x: Array, a: Array, b: Array, scale: float) -> Array:
        """Conv with A as a kernel of ``r`` output channels, then a 1x1 projection by B."""
        params = self.eqn.params
        numbers = params["dimension_numbers"]
        out_feature = numbers.rhs_spec[0]
        a_kernel = jnp.moveaxis(a, -1, out_feature).astype(x.dtype)
        subfuns, conv_params = bind_params(self.eqn)
        t = self.eqn.primitive.bind(*subfuns, x, a_kernel, **conv_params)
        t = t * jnp.asarray(scale, t.dtype)
        feature = numbers.out_spec[1]
        u = jax.lax.dot_general(
            t,
            b.astype(t.dtype),
            (((feature,), (0,)), ((), ())),
            precision=params.get("precision"),
            preferred_element_type=params.get("preferred_element_type"),
        )
        return jnp.moveaxis(u, -1, feature)

    def per_output(self, vec: Array) -> Array:
        feature = self.eqn.params["dimension_numbers"].out_spec[1]
        shape = [1] * len(self.eqn.outvars[0].aval.shape)
        shape[feature] = vec.shape[-1]
        return vec.reshape(shape)


@dataclasses.dataclass
class GatherUse:
    """A row lookup (embedding) of the target: indices over its input axes."""

    eqn: jcore.JaxprEqn
    x: Array  # the indices
    layout: Layout
    columns: list[int]
    contracted: str = "I"
    is_lookup: ClassVar[bool] = True

    @classmethod
    def decode(cls, eqn, invals, ctx) -> GatherUse | None:
        target, indices = invals
        if not isinstance(target, Target) or isinstance(indices, Target):
            return None
        if target.adapter is None or target.axes("S"):
            return None
        params = eqn.params
        dims = params["dimension_numbers"]
        ins, outs = target.axes("I"), target.axes("O")
        mapped = list(dims.start_index_map)
        if dims.operand_batching_dims or not set(dims.collapsed_slice_dims) <= set(ins):
            return None
        shape, sizes = target.weight.shape, params["slice_sizes"]
        looked_up = gather_lookup_axes(dims, shape, sizes)
        if not set(ins) <= set(mapped) or not set(looked_up) <= set(ins):
            return None
        if any(sizes[a] != 1 for a in ins) or any(sizes[a] != shape[a] for a in outs):
            return None
        # ``vmap`` of a row lookup (Equinox's Embedding) also gives the output axes a start
        # index; sliced whole, that index is clamped to 0 unless out-of-bounds starts fill.
        if set(mapped) - set(ins) and params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
            return None
        columns = [k for k, axis in enumerate(mapped) if axis in ins]
        return cls(eqn, indices, target.adapter.layout, columns)

    def product(self, weight: Any, x: Array | None = None) -> Array:
        return weight.product(lambda w, i: bind(self.eqn, [w, i])[0], self.x)

    def _kept_axes(self) -> tuple[list[int], int]:
        """The weight axes the lookup keeps (not collapsed), and its output's batch count."""
        dims = self.eqn.params["dimension_numbers"]
        out_ndim = len(self.eqn.outvars[0].aval.shape)
        kept = [
            a for a in range(len(self.layout.weight_shape)) if a not in dims.collapsed_slice_dims
        ]
        return kept, out_ndim - len(kept)

    def _place(self, u: Array) -> Array:
        """``(*batch, *out)`` rows to where the lookup puts its offset axes."""
        layout = self.layout
        dims = self.eqn.params["dimension_numbers"]
        out_ndim = len(self.eqn.outvars[0].aval.shape)
        kept, n_batch = self._kept_axes()
        outs = layout.out_axes
        u = u.reshape(
            u.shape[:n_batch] + tuple(layout.weight_shape[a] if a in outs else 1 for a in kept)
        )
        offset = list(dims.offset_dims)
        perm, batch_k = [], 0
        for position_out in range(out_ndim):
            if position_out in offset:
                perm.append(n_batch + offset.index(position_out))
            else:
                perm.append(batch_k)
                batch_k += 1
        return jnp.transpose(u, perm)

    def lowrank(self, x: Array, a: Array, b: Array, scale: float) -> Array:
        """The same lookup over A's input axes (r kept whole), then B."""
        params = self.eqn.params
        dims = params["dimension_numbers"]
        ins = list(self.layout.in_axes)
        mapped = list(dims.start_index_map)
        indices = self.x
        if len(self.columns) != len(mapped):
            indices = jnp.concatenate([indices[..., k : k + 1] for k in self.columns], axis=-1)
        _, n_batch = self._kept_axes()
        position = {axis: k for k, axis in enumerate(ins)}
        a_dims = jax.lax.GatherDimensionNumbers(
            offset_dims=(n_batch,),
            collapsed_slice_dims=tuple(range(len(ins))),
            start_index_map=tuple(position[mapped[k]] for k in self.columns),
        )
        t = jax.lax.gather(
            a,
            indices,
            a_dims,
            slice_sizes=(1,) * len(ins) + (a.shape[-1],),
            mode=params["mode"],
            fill_value=params.get("fill_value"),
            indices_are_sorted=params.get("indices_are_sorted", False),
            unique_indices=params.get("unique_indices", False),
        )
        t = t * jnp.asarray(scale, t.dtype)
        u = jax.lax.dot_general(t, b.astype(t.dtype), (((t.ndim - 1,), (0,)), ((), ())))
        return self._place(u)

    def per_output(self, vec: Array) -> Array:
        _, n_batch = self._kept_axes()
        return self._place(vec.reshape((1,) * n_batch + vec.shape))


@dataclasses.dataclass
class RaggedUse:
    """A grouped matmul (``jax.lax.ragged_dot``, MoE experts) with the target as its rhs.

    The rows of ``x`` are split by ``group_sizes`` into consecutive groups, group ``g``
    against the weight's slice ``g`` on its group axis, which is the weight's only stack
    axis: each expert has its own adapter slice, and the low-rank term is two ragged
    dots with the same groups, ``x·A_g`` then ``(·)·B_g``.
    """

    eqn: jcore.JaxprEqn
    x: Array
    group_sizes: Array
    layout: Layout
    w_contract: list[int]
    x_contract: list[int]
    ragged: int  # the ragged (row) axis of x
    contracted: str = "I"

    @classmethod
    def decode(cls, eqn, invals, ctx) -> RaggedUse | None:
        x, target, group_sizes = invals
        if isinstance(x, Target) or isinstance(group_sizes, Target):
            return None
        if target.adapter is None or eqn.params.get("group_offset") is not None:
            return None
        numbers = eqn.params["ragged_dot_dimension_numbers"]
        axes = ragged_rhs_axes(numbers, len(target.kinds))
        if axes is None or len(numbers.lhs_ragged_dimensions) != 1:
            return None
        contract, stack, _ = axes
        if stack != list(numbers.rhs_group_dimensions) or stack != target.axes("S"):
            return None
        if sorted(contract) != target.axes("I"):
            return None
        x_contract = list(numbers.dot_dimension_numbers[0][0])
        (ragged,) = numbers.lhs_ragged_dimensions
        return cls(eqn, x, group_sizes, target.adapter.layout, list(contract), x_contract, ragged)

    def _ragged(self, lhs: Array, rhs: Array, lhs_contract, rhs_contract, ragged: int) -> Array:
        subfuns, params = bind_params(self.eqn)
        numbers = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=((tuple(lhs_contract), tuple(rhs_contract)), ((), ())),
            lhs_ragged_dimensions=(ragged,),
            rhs_group_dimensions=(0,),
        )
        params = dict(params, ragged_dot_dimension_numbers=numbers)
        return self.eqn.primitive.bind(*subfuns, lhs, rhs, self.group_sizes, **params)

    def product(self, weight: Any, x: Array | None = None) -> Array:
        x = self.x if x is None else x
        return weight.product(lambda w, x: bind(self.eqn, [x, w, self.group_sizes])[0], x)

    def _x_free(self) -> list[int]:
        return [a for a in range(self.x.ndim) if a not in self.x_contract]

    def lowrank(self, x: Array, a: Array, b: Array, scale: float) -> Array:
        """``s·(x·A_g)·B_g`` per group: grouped ``a (G, *in, r)``, ``b (G, r, *out)``."""
        ins = list(self.layout.in_axes)
        a_contract = [1 + ins.index(axis) for axis in self.w_contract]
        t = self._ragged(x, a.astype(x.dtype), self.x_contract, a_contract, self.ragged)
        t = t * jnp.asarray(scale, t.dtype)  # (*x_free, r)
        ragged_t = self._x_free().index(self.ragged)
        return self._ragged(t, b.astype(t.dtype), [t.ndim - 1], [1], ragged_t)

    def per_output(self, vec: Array) -> Array:
        """A ``(G, *out)`` array, each row of the output taking its group's entry."""
        rows = self.x.shape[self.ragged]
        ends = jnp.cumsum(self.group_sizes)
        group = jnp.searchsorted(ends, jnp.arange(rows, dtype=ends.dtype), side="right")
        per_row = jnp.take(vec, jnp.minimum(group, vec.shape[0] - 1), axis=0)  # (rows, *out)
        x_free = self._x_free()
        shape = [rows if a == self.ragged else 1 for a in x_free] + list(vec.shape[1:])
        return per_row.reshape(shape)


def _form(use: Any, adapter: LoraAdapter) -> str:
    """How a factored use ran, for :func:`jlora.explain`: the contraction, and how the
    adapter's slot was chosen (per example for a stack, by the router for a mixture)."""
    if isinstance(use, RaggedUse):
        form = "grouped"  # ragged_dot: one adapter slice per expert group
    elif isinstance(use, ConvUse):
        form = "conv"
    elif isinstance(use, GatherUse):
        form = "lookup"
    elif use.w_batch:
        form = "batched"  # the weight's stack axes are batch axes (einsum experts)
    else:
        form = "matmul" if use.contracted == "I" else "matmul.T"
    kind = {"stack": "per-example", "mixture": "routed"}.get(adapter.KIND)
    return form if kind is None else f"{form}, {kind}"


def _contraction(decode: Callable) -> Callable:
    """A rule: decode the use, ask the weight for its product and the adapter for its term."""

    def rule(eqn, invals, ctx):
        position = next(k for k, v in enumerate(invals) if isinstance(v, Target))
        target = invals[position]
        pair = target.weight.pair() if isinstance(target.weight, LowRankWeight) else None
        if pair is not None and target.adapter is None:
            # A compressed weight alone: its pair is the whole product, decoded like an
            # adapter's term (the use's axes come from the pair's layout).
            invals = [*invals[:position], Target(target.weight, pair, target.path),
                      *invals[position + 1 :]]  # fmt: skip
            use = decode(eqn, invals, ctx)
            if use is None:
                return None
            base = pair.term(use, use.x, None, target.weight)
            if base is None:
                return None
            ctx.count(target.path, factored=True, form=f"{_form(use, pair)}, low-rank base")
            return [base.astype(eqn.outvars[0].aval.dtype)]
        if target.adapter is None:  # a quantized base without an adapter: decode per use

            def contract(w, *rest):
                return bind(eqn, [*rest[:position], w, *rest[position:]])[0]

            others = invals[:position] + invals[position + 1 :]
            if any(isinstance(v, Target) for v in others):
                return None
            ctx.count(target.path, factored=True, form="base only")
            return [target.weight.product(contract, *others)]
        use = decode(eqn, invals, ctx)
        if use is None:
            return None
        x_scale = target.adapter.input_scale(use, target.weight)
        if x_scale is not None:  # the adapter rescales the activation (DoRA, tied head)
            use = use.with_x(use.x * x_scale.astype(use.x.dtype))
        x_low = use.x if isinstance(use, GatherUse) else _dropout(use.x, target.adapter, ctx)
        if pair is not None:  # a compressed weight's product, factored as its pair's term
            pair = dataclasses.replace(pair, layout=target.adapter.layout)
            base = pair.term(use, use.x, None, target.weight)
            if base is None:
                return None
            base = base.astype(eqn.outvars[0].aval.dtype)
        else:
            base = use.product(target.weight)
        out = target.adapter.output(use, x_low, base, target.weight)
        if out is None:
            return None
        form = _form(use, target.adapter)
        if id(eqn) in ctx.shared_sizes:
            form += f", shared input ×{ctx.shared_sizes[id(eqn)]}"
        ctx.count(target.path, factored=True, form=form)
        y, u = out
        return [y if u is None else _PendingSum(y, u)]

    return rule


# -- layout-only operations ----------------------------------------------------------


def _layout_rule(adapter_rule: Callable) -> Callable:
    """A rule for a layout-only op: the weight's ``apply``, and ``adapter_rule`` for the
    adapter (``adapter_rule(eqn, target, new_shape) -> adapter | None``)."""

    def rule(eqn, invals, ctx):
        target, *rest = invals
        if not isinstance(target, Target) or any(isinstance(v, Target) for v in rest):
            return None
        adapter = target.adapter
        new_shape = tuple(eqn.outvars[0].aval.shape)
        if adapter is not None:
            adapter = adapter_rule(eqn, target, new_shape, rest)
            if adapter is None:
                return None
        weight = target.weight
        if isinstance(weight, LowRankWeight):  # its pair follows the adapter rules
            pair = adapter_rule(eqn, Target(weight, weight.pair(), target.path), new_shape, rest)
            weight = None if pair is None else weight.with_pair(pair, eqn.outvars[0].aval.dtype)
        else:
            weight = weight.apply(eqn, rest)
        if weight is None:
            return None
        return [Target(weight, adapter, target.path)]

    return rule


def _adapter_transpose(eqn, target, new_shape, rest):
    perm = eqn.params["permutation"]
    kinds = target.kinds
    old = {k: target.axes(k) for k in "SIO"}
    order = {k: [old[k].index(p) for p in perm if kinds[p] == k] for k in "SIO"}
    layout = _layout_from(new_shape, [kinds[p] for p in perm])

    def per_field(array, spans):
        permutation = []
        for token, axes in spans:
            permutation.extend([axes[i] for i in order[token]] if token in order else axes)
        return jnp.transpose(array, permutation)

    return _relayout(target.adapter, layout, per_field)


def _adapter_regroup(eqn, target, new_shape, rest):
    old_shape = target.adapter.layout.weight_shape
    segments = reshape_segments(old_shape, new_shape)
    if segments is None:
        return None
    kinds = ["O"] * len(new_shape)
    for old_axes, new_axes in segments:
        old_kinds = {target.kinds[a] for a in old_axes}
        if len(old_kinds) != 1:
            return None
        (kind,) = old_kinds
        for axis in new_axes:
            kinds[axis] = kind
    layout = _layout_from(new_shape, kinds)
    if layout is None:
        return None
    rank = target.adapter.rank
    sizes = {"S": layout.stack_shape, "I": layout.in_shape, "O": layout.out_shape, "R": (rank,)}
    sizes.update({token: (size,) for token, size in target.adapter.extra_sizes.items()})

    def per_field(array, spans):
        return array.reshape(tuple(d for token, _ in spans for d in sizes[token]))

    return _relayout(target.adapter, layout, per_field)


def _adapter_broadcast(eqn, target, new_shape, rest):
    old_shape = target.adapter.layout.weight_shape
    if rest or not is_expand_dims(old_shape, new_shape, eqn.params["broadcast_dimensions"]):
        return None
    return _adapter_regroup(eqn, target, new_shape, rest)


def _adapter_cast(eqn, target, new_shape, rest):
    new_dtype = eqn.params["new_dtype"]
    if not jnp.issubdtype(new_dtype, jnp.floating):
        return None

    def per_field(array, spans):
        # Per-slot data without a feature axis (a stack's scales) keeps its dtype.
        if not {token for token, _ in spans} & {"I", "O", "R"}:
            return array
        return array.astype(new_dtype)

    return _relayout(target.adapter, target.adapter.layout, per_field)


def _adapter_same(eqn, target, new_shape, rest):
    return target.adapter


def _adapter_slice(eqn, target, new_shape, rest):
    """Slices of stack axes only: the same slice of each array's stack axes."""
    layout = target.adapter.layout
    starts, sizes, strides = slice_extent(eqn)
    stack = target.axes("S")
    if not set(cut_axes(layout.weight_shape, starts, sizes, strides)) <= set(stack):
        return None
    static = eqn.primitive is P.slice_p
    limits = eqn.params["limit_indices"] if static else None
    zero = jnp.zeros((), jnp.int32)

    def per_field(array, spans):
        stack_span = next((axes for token, axes in spans if token == "S"), [])
        if static:
            lo, hi, step = [0] * array.ndim, list(array.shape), [1] * array.ndim
            for k, axis in zip(stack, stack_span):
                lo[axis], hi[axis], step[axis] = starts[k], limits[k], strides[k]
            return jax.lax.slice(array, lo, hi, step)
        begin, size = [zero] * array.ndim, list(array.shape)
        for k, axis in zip(stack, stack_span):
            begin[axis], size[axis] = rest[k], sizes[k]
        return jax.lax.dynamic_slice(array, begin, size)

    return _relayout(target.adapter, dataclasses.replace(layout, weight_shape=new_shape), per_field)


# -- higher-order primitives ---------------------------------------------------------


def _inline(eqn, invals, ctx):
    closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return evaluate(closed.jaxpr, closed.consts, invals, ctx)


def _collecting(ctx: _Context, body: Callable) -> Callable:
    """``body`` (traced by a JAX transform, with ``ctx``), returning its outputs followed by
    ``[sum, count]`` of the auxiliary losses it recorded when ``ctx`` collects them."""
    if ctx.aux is None:
        return body

    def collected(*args):
        outer, ctx.aux = ctx.aux, []
        try:
            outs = list(body(*args))
            return outs + ctx.aux_total()
        finally:
            ctx.aux = outer

    return collected


def _gather_aux(ctx: _Context, outs: list) -> list:
    """Strip the ``[sum, count]`` that :func:`_collecting` appended, and record them."""
    if ctx.aux is None:
        return outs
    *outs, loss, count = outs
    ctx.add_aux(loss, count)
    return outs


def _remat(eqn, invals, ctx):
    jaxpr = eqn.params["jaxpr"]

    def body(*args):
        return evaluate(jaxpr, [], list(args), ctx)

    body = _collecting(ctx, body)
    run = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
    return _gather_aux(ctx, list(run(*invals)))


def _passthrough_carry(carry_in: list, carry_out: list) -> set[int]:
    """Carry positions whose body output is the very input (loop-invariant weights)."""
    return {k for k, (var_in, var_out) in enumerate(zip(carry_in, carry_out)) if var_in is var_out}


def _scan_slice(target: Target, ctx: _Context) -> Any:
    """A target scanned over its first axis: every array of both kinds sliced alike.

    ``lax.scan`` slices axis 0 of each array leaf and rebuilds the value with the
    static data given here, so only that static data (shape, layout) is made per slice.
    """
    weight = target.weight.scanned()
    if weight is None or (target.adapter is not None and target.kinds[0] != "S"):
        return ctx.materialize(target)
    if target.adapter is None:
        return Target(weight, None, target.path)
    layout = target.adapter.layout
    inner = _layout_from(layout.weight_shape[1:], layout.kinds()[1:])
    if inner is None:
        return ctx.materialize(target)
    return Target(weight, dataclasses.replace(target.adapter, layout=inner), target.path)


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
    fixed = {k: init[k] for k in range(n_carry) if isinstance(init[k], Target) and k in invariant}
    loop_init = [None if k in fixed else ctx.materialize(v) for k, v in enumerate(init)]
    sliced = [_scan_slice(v, ctx) if isinstance(v, Target) else v for v in xs]
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
        ys = [inner.materialize(o) for o in outs[n_carry:]]
        return new_carry, ys + (inner.aux_total() if inner.aux is not None else [])

    carry, ys = jax.lax.scan(
        body, loop_init, sliced, length=length, reverse=params["reverse"], unroll=params["unroll"]
    )
    carry = [fixed[k] if k in fixed else c for k, c in enumerate(carry)]
    ys = list(ys)
    if ctx.aux is not None:  # each step's [sum, count] of balance losses, summed
        *ys, losses, counts = ys
        ctx.add_aux(jnp.sum(losses), jnp.sum(counts))
    return list(carry) + ys


def _while(eqn, invals, ctx):
    params = eqn.params
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts = invals[:n_cond]
    body_consts = invals[n_cond : n_cond + n_body]
    init = invals[n_cond + n_body :]
    cond_closed, body_closed = params["cond_jaxpr"], params["body_jaxpr"]
    n_carry = len(init)
    invariant = _passthrough_carry(body_closed.jaxpr.invars[n_body:], body_closed.jaxpr.outvars)
    fixed = {k: init[k] for k in range(n_carry) if isinstance(init[k], Target) and k in invariant}
    keyed = ctx.key is not None
    loop_key = ctx.next_key() if keyed else None

    def full(carry):
        return [fixed[k] if k in fixed else c for k, c in enumerate(carry)]

    def cond_fun(state):
        # A loss recorded while deciding whether to loop has no step to belong to.
        quiet = dataclasses.replace(ctx, aux=None)
        return evaluate(
            cond_closed.jaxpr, cond_closed.consts, list(cond_consts) + full(state[0]), quiet
        )[0]

    def body_fun(state):
        carry, step, total = state
        inner = ctx.child(jax.random.fold_in(loop_key, step) if keyed else None)
        outs = evaluate(
            body_closed.jaxpr, body_closed.consts, list(body_consts) + full(carry), inner
        )
        if inner.aux is not None:  # running [sum, count] of balance losses
            total = [t + a for t, a in zip(total, inner.aux_total())]
        new_carry = [None if k in fixed else inner.materialize(o) for k, o in enumerate(outs)]
        return new_carry, step + 1, total

    loop_init = [None if k in fixed else ctx.materialize(v) for k, v in enumerate(init)]
    zero = jnp.zeros((), _aux_dtype())
    total = [zero, zero] if ctx.aux is not None else []
    carry, _, total = jax.lax.while_loop(
        cond_fun, body_fun, (loop_init, jnp.zeros((), jnp.uint32), total)
    )
    if ctx.aux is not None:
        ctx.add_aux(*total)
    return full(carry)


def _cond(eqn, invals, ctx):
    index, *operands = invals
    if isinstance(index, Target):
        return None

    def branch_fn(closed):
        def run(*ops):
            outs = evaluate(closed.jaxpr, closed.consts, list(ops), ctx)
            return [ctx.materialize(o) for o in outs]

        return _collecting(ctx, run)

    branches = [branch_fn(b) for b in eqn.params["branches"]]
    return _gather_aux(ctx, list(jax.lax.switch(index, branches, *operands)))


_RULES: dict[Any, Callable] = {
    P.dot_general_p: _contraction(DotUse.decode),
    **({ragged_dot_primitive(): _contraction(RaggedUse.decode)} if ragged_dot_primitive() else {}),
    P.conv_general_dilated_p: _contraction(ConvUse.decode),
    P.gather_p: _contraction(GatherUse.decode),
    P.transpose_p: _layout_rule(_adapter_transpose),
    P.reshape_p: _layout_rule(_adapter_regroup),
    P.squeeze_p: _layout_rule(_adapter_regroup),
    P.broadcast_in_dim_p: _layout_rule(_adapter_broadcast),
    P.convert_element_type_p: _layout_rule(_adapter_cast),
    P.copy_p: _layout_rule(_adapter_same),
    P.sharding_constraint_p: _layout_rule(_adapter_same),
    P.reduce_precision_p: _layout_rule(_adapter_same),
    P.slice_p: _layout_rule(_adapter_slice),
    P.dynamic_slice_p: _layout_rule(_adapter_slice),
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
    kinds: dict | None = None,
    forms: dict | None = None,
    cache: dict | None = None,
    fast_backward: bool | None = None,
    lora_ids: Array | None = None,
    aux: bool = False,
) -> Any:
    """``fn(merge(params, adapters), *args, **kwargs)``, computed in factored form.

    ``fast_backward`` (default: on for the CPU backend) routes plain projections through
    :func:`jlora._lowrank.lowrank`, whose custom VJP orders the backward products for
    XLA's fast GEMM path; being a ``custom_vjp``, it has no forward-mode derivative.
    ``counts`` and ``kinds``, when given, are filled per target path with the use counts
    and the ``(weight kind, adapter kind)`` pair (for :func:`jlora.explain`). With
    ``aux``, returns ``(outputs, {"balance_loss": mean, "router_uses": count})``.
    """
    if fast_backward is None:
        fast_backward = jax.default_backend() == "cpu"
    nodes = match(params, adapters)
    copies = {p: n for p, n in nodes.items() if not isinstance(n, LoraAdapter)}
    if copies:
        params = _replace_leaves(params, copies)
    traced = trace(fn, params, args, kwargs, cache)
    if lora_ids is not None:
        lora_ids = jnp.asarray(lora_ids)
        if lora_ids.ndim != 1 or not jnp.issubdtype(lora_ids.dtype, jnp.integer):
            raise ValueError(
                f"lora_ids: expected integer ids of shape (batch,), one per example (-1 for "
                f"no adapter); found {lora_ids.dtype}{list(lora_ids.shape)}"
            )
    ctx = _Context(
        counts, key, fast_backward, lora_ids=lora_ids, aux=[] if aux else None, forms=forms
    )
    inputs = []
    for path, leaf in zip(traced.param_paths, traced.param_leaves):
        node = nodes.get(path)
        adapter = node.resolve(nodes, path) if isinstance(node, LoraAdapter) else None
        if adapter is not None or isinstance(leaf, WeightNode):
            target = grouped_target(leaf, adapter, path)
            inputs.append(target)
            if counts is not None:
                counts.setdefault(path, [0, 0])
            if kinds is not None:
                kinds[path] = (target.weight.KIND, adapter.KIND if adapter is not None else "-")
        else:
            inputs.append(leaf)
    outs = evaluate(traced.jaxpr.jaxpr, traced.jaxpr.consts, inputs + traced.arg_leaves, ctx)
    outs = [ctx.materialize(o) for o in outs]
    result = jax.tree_util.tree_unflatten(traced.out_tree, outs)
    if not aux:
        return result
    loss, uses = ctx.aux_total()
    balance = jnp.where(uses > 0, loss / jnp.maximum(uses, 1.0), 0.0)
    return result, {"balance_loss": balance, "router_uses": uses}


def _replace_leaves(params: Params, replacements: dict[Path, Any]) -> Params:
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: replacements.get(path_str(kp), leaf), params, is_leaf=is_weight_node
    )
