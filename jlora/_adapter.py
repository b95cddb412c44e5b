"""The adapter node: trainable factors as pytree children, scale and layout static."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jlora._lowrank import _outer_sum
from jlora._types import Array


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which axes of a weight are stack, input and output axes.

    Each group is sorted ascending, and together they cover every axis once. The
    factors are ``lora_a: (*stack, prod(in), r)`` and ``lora_b: (*stack, r, prod(out))``;
    ``delta_w`` is ``A @ B`` reshaped to ``(*stack, *in, *out)`` and moved back to the
    weight's own axis order.

    Example:
      >>> Layout.dense((8, 4))
      Layout(weight_shape=(8, 4), stack_axes=(), in_axes=(0,), out_axes=(1,))
    """

    weight_shape: tuple[int, ...]
    stack_axes: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    def __post_init__(self):
        groups = sorted(self.stack_axes + self.in_axes + self.out_axes)
        if groups != list(range(len(self.weight_shape))) or not self.in_axes or not self.out_axes:
            raise ValueError(
                f"invalid layout for a weight of shape {self.weight_shape}: stack "
                f"{self.stack_axes}, in {self.in_axes}, out {self.out_axes} must cover "
                "each axis once, with at least one input and one output axis"
            )

    @classmethod
    def from_kinds(cls, shape: tuple[int, ...], kinds: tuple[str, ...] | list[str]) -> Layout:
        """The layout whose axis ``i`` is of kind ``kinds[i]`` (``"S"``, ``"I"``, ``"O"``).

        Raises:
          ValueError: as the constructor (no input or no output axis).
        """
        groups = {k: tuple(i for i, kind in enumerate(kinds) if kind == k) for k in "SIO"}
        return cls(tuple(shape), groups["S"], groups["I"], groups["O"])

    @classmethod
    def dense(cls, shape: tuple[int, ...]) -> Layout:
        """The 2-D rule: axis 0 is the input, axis 1 the output (a Flax kernel)."""
        return cls(tuple(shape), (), (0,), (1,))

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[i] for i in self.stack_axes)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[i] for i in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[i] for i in self.out_axes)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.stack_shape, self.in_features, rank)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.stack_shape, rank, self.out_features)

    def to_grouped(self, weight: Array) -> Array:
        """``weight`` with its axes ordered (stack, in, out), reshaped ``(*stack, in, out)``."""
        order = self.stack_axes + self.in_axes + self.out_axes
        moved = jnp.transpose(weight, order)
        return moved.reshape((*self.stack_shape, self.in_features, self.out_features))

    def from_grouped(self, grouped: Array) -> Array:
        """Undo :meth:`to_grouped`: ``(*stack, in, out)`` back to the weight's shape."""
        full = grouped.reshape(self.stack_shape + self.in_shape + self.out_shape)
        order = self.stack_axes + self.in_axes + self.out_axes
        return jnp.transpose(full, inverse_permutation(order))

    def kinds(self) -> tuple[str, ...]:
        """Per weight axis: ``"S"`` (stack), ``"I"`` (input) or ``"O"`` (output)."""
        kinds = [""] * len(self.weight_shape)
        for group, kind in ((self.stack_axes, "S"), (self.in_axes, "I"), (self.out_axes, "O")):
            for axis in group:
                kinds[axis] = kind
        return tuple(kinds)

    def to_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        return cls(**{k: tuple(int(i) for i in v) for k, v in data.items()})


# Per-field axis signatures. In storage form (the adapters tree) each token stands for:
# "S" every stack axis of the weight, "I" the input features flattened to one axis, "O"
# the output features flattened, "R" the rank. Inside the engine (grouped form) "S", "I"
# and "O" stand for all of the weight's axes of that kind, in the weight's current
# order. Sharding specs, checkpoint entries, scan slicing, layout rules and optimizer
# labels all follow from these signatures, so a new kind writes none of them.
Signature = tuple[str, ...]


@dataclasses.dataclass
class LoraAdapter:
    """One targeted weight's adapter: ``delta_w = scale * A @ B`` in its layout.

    The pytree children are exactly the trainable arrays (``lora_a``, ``lora_b``);
    ``scale``, ``layout`` and ``dropout`` are static, so ``jax.grad``, optax and
    ``tree_map`` see only what trains.

    Attributes:
      lora_a: the down-projection, ``(*stack, in_features, r)``.
      lora_b: the up-projection, ``(*stack, r, out_features)``; zero at init.
      scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
      layout: which weight axes are stack, input and output axes.
      dropout: LoRA dropout rate applied to the low-rank path's input.
    """

    lora_a: Array
    lora_b: Array
    scale: float
    layout: Layout
    dropout: float = 0.0

    KIND: ClassVar[str] = "lora"
    SIGNATURES: ClassVar[dict[str, Signature]] = {
        "lora_a": ("S", "I", "R"),
        "lora_b": ("S", "R", "O"),
    }
    # Arrays that are data but never trained (the optimizer leaves them at zero update).
    FROZEN: ClassVar[tuple[str, ...]] = ()
    # Static fields beyond scale, layout and dropout that checkpoints keep.
    EXTRA_META: ClassVar[tuple[str, ...]] = ()

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[-1])

    # -- the kind protocol: arrays, their axes and shapes --------------------------------

    def arrays(self) -> dict[str, Array]:
        """The trainable arrays by field name, in ``SIGNATURES`` order."""
        return {name: getattr(self, name) for name in self.SIGNATURES}

    def with_arrays(self, **arrays: Any) -> LoraAdapter:
        """A copy with some arrays replaced (static data kept)."""
        return dataclasses.replace(self, **arrays)

    @classmethod
    def extra_sizes_from(cls, meta: Any) -> dict[str, int]:
        """Sizes of the kind's own signature tokens (beyond S, I, O, R), from its
        ``EXTRA_META`` fields (``meta[name]``): a checkpoint entry or the node itself."""
        return {}

    def resolve(self, nodes: dict[str, Any], path: str) -> LoraAdapter:
        """The node the engine runs, given every node of the tree by path: itself, or for
        a kind that borrows arrays from another node (a shared router), the full node."""
        return self

    @classmethod
    def meta_problem(cls, meta: Any, rank: int) -> tuple[str, str] | None:
        """What is wrong with the ``EXTRA_META`` fields of a checkpoint entry ``meta``
        (an adapter of ``rank``): ``(field, what was expected)``, or None when sound."""
        return None

    @property
    def extra_sizes(self) -> dict[str, int]:
        """:meth:`extra_sizes_from` this node's own static fields."""
        return self.extra_sizes_from({name: getattr(self, name) for name in self.EXTRA_META})

    @classmethod
    def field_shape(cls, name: str, layout: Layout, rank: int, **extra: int) -> tuple[int, ...]:
        """The storage shape of field ``name`` for a weight of ``layout`` at ``rank``
        (``extra``: sizes of the kind's own tokens, see :meth:`extra_sizes_from`)."""
        sizes = {"I": (layout.in_features,), "O": (layout.out_features,), "R": (rank,)}
        sizes.update({token: (size,) for token, size in extra.items()})
        shape: list[int] = []
        for token in cls.SIGNATURES[name]:
            shape.extend(layout.stack_shape if token == "S" else sizes[token])
        return tuple(shape)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        extra = self.extra_sizes
        return {
            name: self.field_shape(name, self.layout, self.rank, **extra)
            for name in self.SIGNATURES
        }

    def grouped(self) -> dict[str, Array]:
        """The arrays reshaped to grouped form: each token expanded to its weight axes."""
        layout = self.layout
        sizes = {
            "S": layout.stack_shape,
            "I": layout.in_shape,
            "O": layout.out_shape,
            "R": (self.rank,),
            **{token: (size,) for token, size in self.extra_sizes.items()},
        }
        return {
            name: array.reshape(tuple(d for t in self.SIGNATURES[name] for d in sizes[t]))
            for name, array in self.arrays().items()
        }

    def flattened(self) -> LoraAdapter:
        """From grouped form (inside the engine) back to storage form, for ``layout``."""
        shapes = self.expected_shapes()
        return self.with_arrays(
            **{name: array.reshape(shapes[name]) for name, array in self.arrays().items()}
        )

    # -- the engine's term for one use ---------------------------------------------------

    def input_scale(self, use: Any, weight: Any) -> Array | None:
        """A factor the activation is multiplied by before both products (None: none)."""
        return None

    def term(self, use: Any, x: Array, base: Array, weight: Any) -> Array | None:
        """What this adapter adds to ``base``, the weight's own product, at ``use``.

        ``self`` is in grouped form; ``x`` is the activation after LoRA dropout. LoRA
        adds ``s·(x·A)·B``.
        """
        return use.lowrank(x, self.lora_a, self.lora_b, self.scale)

    def output(self, use: Any, x: Array, base: Array, weight: Any) -> tuple | None:
        """``(y, u)``: the use's output is ``y + u`` (``u`` None: ``y`` alone), or None.

        The engine adds ``u`` after a following bias add, as a hand-written layer does;
        a kind whose output is not ``base + term`` returns it whole.
        """
        u = self.term(use, x, base, weight)
        return None if u is None else (base, u)

    # -- dense forms, merge and unmerge ------------------------------------------------

    def delta(self) -> Array:
        """``scale * A @ B`` in the weight's shape and axis order (float32 or wider)."""
        return self.layout.from_grouped(self._grouped_delta())

    def _grouped_delta(self) -> Array:
        """``scale * A @ B`` as ``(*stack, in, out)``, in float32 or wider."""
        a = self.lora_a
        b = self.lora_b
        dtype = wide_float(a.dtype, b.dtype)
        return jnp.matmul(a.astype(dtype), b.astype(dtype)) * jnp.asarray(self.scale, dtype)

    def merge_into(self, weight: Array) -> Array:
        """The merged weight ``W + delta`` in float32 (or wider), cast back to W's dtype."""
        blocked = self._blocked_merge(weight, 1.0)
        return add_delta(weight, self.delta()) if blocked is None else blocked

    def unmerge_from(self, merged: Array) -> Array:
        """The base weight back from ``merge_into``'s result."""
        blocked = self._blocked_merge(merged, -1.0)
        return add_delta(merged, -self.delta()) if blocked is None else blocked

    def _blocked_merge(self, weight: Array, sign: float) -> Array | None:
        """``W ± s·A·B`` by row blocks (:func:`blocked_add_product`) for a plain 2-D
        weight, or None where the one-shot form is used."""
        layout = self.layout
        kind = type(self)
        own = kind.delta is LoraAdapter.delta and kind._grouped_delta is LoraAdapter._grouped_delta
        if not own:
            return None  # a kind whose update is not s·A·B (mixtures, stacks)
        if len(layout.weight_shape) != 2 or layout.stack_axes or self.lora_a.ndim != 2:
            return None
        if layout.in_axes == (0,):  # (in, out): rows of W are rows of A
            left, right = self.lora_a, self.lora_b
        else:  # (out, in): W = ... + s·Bᵀ·Aᵀ
            left, right = self.lora_b.T, self.lora_a.T
        return blocked_add_product(weight, left, right, sign * self.scale)


@dataclasses.dataclass
class DoraAdapter(LoraAdapter):
    """A DoRA adapter: LoRA factors plus a trainable magnitude per output feature.

    The adapted weight is ``(m / n) ⊙ (W + s·A·B)`` with ``n = ‖W + s·A·B‖`` taken over
    the input axes (one value per stack index and output feature) and detached from the
    gradient, as PEFT's DoRA does. ``m`` starts at ``‖W‖``, so fresh adapters (B = 0)
    give the base output.

    Attributes:
      magnitude: ``m``, ``(*stack, out_features)``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> spec = jlora.LoraSpec(rank=1, targets="w", dora=True)
      >>> adapters = jlora.init(spec, {"w": jnp.ones((3, 2))}, jax.random.key(0))
      >>> adapters["w"].magnitude  # the column norms of W
      Array([1.7320508, 1.7320508], dtype=float32)
    """

    magnitude: Array | None = None

    KIND: ClassVar[str] = "dora"
    SIGNATURES: ClassVar[dict[str, Signature]] = {
        "lora_a": ("S", "I", "R"),
        "lora_b": ("S", "R", "O"),
        "magnitude": ("S", "O"),
    }

    def _ratio(self, weight: Any) -> Array:
        """``m / n`` in grouped form ``(*stack, *out)``."""
        n = self.flattened().norm(weight.dense()).reshape(self.magnitude.shape)
        return self.magnitude.astype(n.dtype) / n

    def input_scale(self, use: Any, weight: Any) -> Array | None:
        """Used transposed (a tied head, ``x·W'ᵀ``), the column scale moves onto ``x``:
        ``x·((m/n)⊙(W + s·A·B))ᵀ = (x⊙(m/n))·(W + s·A·B)ᵀ``."""
        if use.contracted == "O":  # only a dot_general use contracts the output axes
            return use.per_input(self._ratio(weight))
        return None

    def output(self, use: Any, x: Array, base: Array, weight: Any) -> tuple | None:
        """``x·W + (m/n − 1)⊙(x·W) + (m/n)⊙s·(x·A)·B = (m/n)⊙(x·W + s·(x·A)·B)``.

        Returned whole (the bias, added later, is not scaled), so the backward pass
        keeps one activation per use, ``x·W + s·(x·A)·B``, for the magnitude's gradient.
        """
        u = use.lowrank(x, self.lora_a, self.lora_b, self.scale)
        if use.contracted == "O":  # x was scaled by input_scale: plain low-rank term
            return base, u
        ratio = use.per_output(self._ratio(weight).astype(base.dtype))
        u = u.astype(base.dtype)
        if x is use.x:
            return ratio * (base + u), None
        # With dropout, PEFT feeds the dropped-out input to the (m/n - 1) term too.
        dropped = use.product(weight, x)
        return base, ratio * (dropped + u) - dropped

    def norm(self, weight: Array) -> Array:
        """``stop_gradient(‖W + s·A·B‖)`` over the input axes: ``(*stack, out_features)``.

        Computed from ``W`` as stored and the factors, never forming ``W + s·A·B``:
        ``colsum(W⊙W) + 2s·colsum((AᵀW)⊙B) + s²·colsum(B⊙((AᵀA)·B))``.
        """
        dtype = wide_float(weight.dtype, self.lora_a.dtype)
        return self._grouped_norm(self.layout.to_grouped(weight.astype(dtype)))

    def _grouped_norm(self, w: Array) -> Array:
        """:meth:`norm` of the grouped weight ``w`` ``(*S, in, out)``, in ``w``'s dtype."""
        dtype = w.dtype
        return column_norm(w, self.lora_a.astype(dtype), self.lora_b.astype(dtype), self.scale)

    def merge_into(self, weight: Array) -> Array:
        """``(m / n) ⊙ (W + s·A·B)``, formed in float32 or wider, cast to W's dtype."""
        layout = self.layout
        dtype = wide_float(weight.dtype, self.lora_a.dtype, self.magnitude.dtype)
        w = layout.to_grouped(weight.astype(dtype))  # (*S, in, out), formed once
        ratio = self.magnitude.astype(dtype) / self._grouped_norm(w)  # (*S, out)
        merged = (w + self._grouped_delta().astype(dtype)) * ratio[..., None, :]
        return layout.from_grouped(merged).astype(weight.dtype)

    def unmerge_from(self, merged: Array) -> Array:
        raise ValueError(
            "unmerge: a DoRA adapter cannot be taken back out of a merged weight: the "
            "merged weight (m/n)·(W + s·A·B) no longer holds the norm n of W + s·A·B. "
            "Keep the base params (DoRA's merge is for export), or merge a plain LoRA."
        )


@dataclasses.dataclass
class LoraBiasAdapter(LoraAdapter):
    """A LoRA adapter whose up-projection has a bias: the layer's output moves by
    ``s·((x·A)·B + b)``, PEFT's ``lora_bias=True`` (``lora_B`` an ``nn.Linear`` with a
    bias), meant for adapters extracted from full fine-tunes whose biases changed.

    ``merge`` adds ``s·b`` to the layer's own bias leaf (the ``bias`` beside the weight),
    and refuses when the layer has none, as PEFT does. The bias applies where the
    weight is used as ``x·W`` (a dense, einsum or convolution layer); an embedding
    lookup or a tied head (``x·Wᵀ``) refuses it.

    Attributes:
      lora_bias: ``b``, ``(*stack, out_features)``; zero at init.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> spec = jlora.LoraSpec(rank=1, alpha=2.0, targets=["dense"], lora_bias=True)
      >>> adapters = jlora.init(spec, params, jax.random.key(0))
      >>> adapters["dense"]["kernel"].lora_bias
      Array([0., 0.], dtype=float32)
    """

    lora_bias: Array | None = None

    KIND: ClassVar[str] = "lora_bias"
    SIGNATURES: ClassVar[dict[str, Signature]] = {
        "lora_a": ("S", "I", "R"),
        "lora_b": ("S", "R", "O"),
        "lora_bias": ("S", "O"),
    }

    def term(self, use: Any, x: Array, base: Array, weight: Any) -> Array | None:
        """``s·(x·A)·B + s·b``, with ``b`` on the use's output features."""
        if getattr(use, "contracted", "I") != "I" or getattr(use, "is_lookup", False):
            raise ValueError(
                "a lora_bias adapter adds a bias to the layer's output, so it applies only "
                "where its weight is used as x·W (dense, einsum or convolution layers), not "
                "to a lookup or a tied head (x·Wᵀ); PEFT supports lora_bias on Linear and "
                "Conv layers only. Leave this weight out of the lora_bias targets."
            )
        u = use.lowrank(x, self.lora_a, self.lora_b, self.scale)
        bias = self.lora_bias.astype(u.dtype) * jnp.asarray(self.scale, u.dtype)
        return u + use.per_output(bias)

    def bias_delta(self) -> Array:
        """``s·b``, ``(*stack, out_features)``, in float32 or wider: what merge adds to the
        layer's bias."""
        dtype = wide_float(self.lora_bias.dtype)
        return self.lora_bias.astype(dtype) * jnp.asarray(self.scale, dtype)


def column_norm(w: Array, a: Array, b: Array, scale: float) -> Array:
    """``stop_gradient(‖W + s·A·B‖)`` per output column, in factored form.

    Args:
      w: ``(*S, in, out)``; a: ``(*S, in, r)``; b: ``(*S, r, out)``, one dtype.

    Returns:
      ``(*S, out)``: the square root of ``colsum(W⊙W) + 2s·colsum((AᵀW)⊙B)
      + s²·colsum(B⊙((AᵀA)·B))``, clamped at 0 before the root. No ``(in, out)``
      temporary but ``W⊙W`` itself, which depends on the frozen base only.
    """
    w, a, b = (jax.lax.stop_gradient(x) for x in (w, a, b))
    s = jnp.asarray(scale, w.dtype)
    n_stack = w.ndim - 2
    batch = tuple(range(n_stack))
    base = jnp.sum(w * w, axis=-2)
    atw = jax.lax.dot_general(a, w, (((n_stack,), (n_stack,)), (batch, batch)))  # (*S, r, out)
    ata = jax.lax.dot_general(a, a, (((n_stack,), (n_stack,)), (batch, batch)))  # (*S, r, r)
    atab = jax.lax.dot_general(ata, b, (((n_stack + 1,), (n_stack,)), (batch, batch)))
    squared = base + 2 * s * jnp.sum(atw * b, axis=-2) + s * s * jnp.sum(b * atab, axis=-2)
    return jnp.sqrt(jnp.maximum(squared, jnp.zeros((), squared.dtype)))


def add_delta(weight: Array, delta: Array) -> Array:
    """``weight + delta`` computed in float32 (or wider) and cast back to weight's dtype."""
    dtype = wide_float(weight.dtype, delta.dtype)
    return (weight.astype(dtype) + delta.astype(dtype)).astype(weight.dtype)


# Row blocks of about this many float32 bytes stay in cache between their product and
# their add (blocked_add_product); weights below _BLOCKED_MIN elements merge in one go.
_BLOCK_BYTES = 4 << 20
_BLOCKED_MIN = 1 << 21
# Weights up to this rank are merged as a sum of rank-1 outer products in one elementwise
# pass (no matmul, no blocks). Side by side on the 1B-shaped layers at rank 8 (2-core CPU,
# python -m benchmarks.merge --layers 16 --dtypes bfloat16 --warmup 4): in place 379 ms
# against 638 ms by row blocks, jitted 718 ms against 1113 ms. float32, in place: on one
# 2-core VM 0.66x a copy's time against 0.50x by row blocks, on another (AMD EPYC, fast
# memory, two layers) 1.41x against 2.58x: the outer products stay within the 0.7-of-copy
# bandwidth on both, the blocks on one only.
_OUTER_MAX_RANK = 8


def _bf16_bits_to_f32(bits: Array) -> Array:
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, jnp.float32)


def _f32_to_bf16_bits(x: Array) -> Array:
    """bfloat16 bits of ``x``, rounded to nearest even as XLA's convert does (NaN kept)."""
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(jnp.uint16)
    return jnp.where(jnp.isnan(x), jnp.uint16(0x7FC0), rounded)


def blocked_add_product(weight: Array, left: Array, right: Array, scale: float) -> Array | None:
    """``weight + scale·left·right`` (``left`` (rows, r), ``right`` (r, cols)), summed in
    float32 and cast back, by row blocks or (low rank) in one elementwise pass; None
    where the one-shot ``add_delta`` is used instead.

    Formed whole, the product is a weight-sized float32 temporary written and read
    again, which on CPU makes a merge 3-4x slower than a copy of the weights. By blocks
    of a few MB it stays in cache, and with the weight donated the blocks are written
    in place. Weights up to rank ``_OUTER_MAX_RANK`` have no blocks: the product is a
    sum of rank-1 outer products in one fused elementwise pass. bfloat16
    is widened and rounded by its bits (the same values as XLA's convert), which XLA's
    CPU backend runs far faster inside the blocks' loop than its bfloat16 converts (in
    the fused pass the two measured alike). Used on the CPU backend only, for float32
    and bfloat16 weights of at least ``_BLOCKED_MIN`` elements (accelerators fuse the
    add into the matmul).
    """
    if (
        jax.default_backend() != "cpu"
        or weight.ndim != 2
        or weight.size < _BLOCKED_MIN
        or jnp.dtype(weight.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
        or wide_float(left.dtype, right.dtype) != jnp.float32
    ):
        return None
    rows, cols = weight.shape
    traced = any(isinstance(x, jax.core.Tracer) for x in (weight, left, right))
    left, right, factor = left.astype(jnp.float32), right.astype(jnp.float32), jnp.float32(scale)
    # Under the caller's jit the update is traced inline (so a donated weight is updated
    # in place); called eagerly it runs jitted, once per shape, not traced anew per weight.
    if left.shape[1] <= _OUTER_MAX_RANK:
        return (_outer_add if traced else _outer_add_jit)(weight, left, right, factor)
    block = max(8, _BLOCK_BYTES // (4 * cols))
    if block >= rows:
        return None
    return (_blocked_add if traced else _blocked_add_jit)(weight, left, right, factor, block=block)


def _outer_add(weight: Array, left: Array, right: Array, factor: Array) -> Array:
    """``weight + Σ_k left[:, k]·(factor·right[k])`` summed in float32 (a bfloat16
    weight rounded once): one elementwise pass that XLA fuses whole, so nothing but the
    result is written (and a donated weight is written in place)."""
    bf16 = jnp.dtype(weight.dtype) == jnp.dtype(jnp.bfloat16)
    wide = _bf16_bits_to_f32(jax.lax.bitcast_convert_type(weight, jnp.uint16)) if bf16 else weight
    product = _outer_sum(left, right * factor, jnp.float32)
    if not bf16:
        return wide + product
    return jax.lax.bitcast_convert_type(_f32_to_bf16_bits(wide + product), jnp.bfloat16)


_outer_add_jit = jax.jit(_outer_add)


def _blocked_add(weight: Array, left: Array, right: Array, factor: Array, *, block: int):
    """The loop of :func:`blocked_add_product`."""
    rows = weight.shape[0]
    bf16 = jnp.dtype(weight.dtype) == jnp.dtype(jnp.bfloat16)
    buffer = jax.lax.bitcast_convert_type(weight, jnp.uint16) if bf16 else weight

    def update(buffer, start, size):
        part = jax.lax.dynamic_slice_in_dim(buffer, start, size, 0)
        wide = _bf16_bits_to_f32(part) if bf16 else part
        rows_of_left = jax.lax.dynamic_slice_in_dim(left, start, size, 0)
        out = wide + jnp.matmul(rows_of_left, right) * factor
        out = _f32_to_bf16_bits(out) if bf16 else out
        return jax.lax.dynamic_update_slice_in_dim(buffer, out, start, 0)

    full = rows // block
    buffer = jax.lax.fori_loop(0, full, lambda i, buf: update(buf, i * block, block), buffer)
    if rows % block:
        buffer = update(buffer, full * block, rows % block)
    return jax.lax.bitcast_convert_type(buffer, jnp.bfloat16) if bf16 else buffer


_blocked_add_jit = functools.partial(jax.jit, static_argnames="block")(_blocked_add)


def scale_denominator(rank: int, rslora: bool) -> float:
    """``r``, or ``sqrt(r)`` with rsLoRA: the LoRA scale is ``alpha / scale_denominator``.

    The one home of the rule; ``LoraSpec``, ``jlora.peft`` and the CLI all call it.

    Example:
      >>> scale_denominator(4, False), scale_denominator(4, True)
      (4, 2.0)
    """
    return math.sqrt(rank) if rslora else rank


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    return alpha / scale_denominator(rank, rslora)


# Leaf names that are never matrices to adapt, even when a scanned model stacks them.
NOT_WEIGHTS = frozenset({"bias", "scale", "b"})


def wide_float(*dtypes: Any) -> Any:
    """float64 if any of ``dtypes`` is 64-bit, else float32: where deltas and merges are summed."""
    return jnp.dtype(jnp.float64 if any(jnp.dtype(d).itemsize > 4 for d in dtypes) else jnp.float32)


def inverse_permutation(order: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """The permutation that undoes ``transpose(x, order)``."""
    inverse = [0] * len(order)
    for position, axis in enumerate(order):
        inverse[axis] = position
    return tuple(inverse)


jax.tree_util.register_dataclass(
    LoraAdapter, data_fields=["lora_a", "lora_b"], meta_fields=["scale", "layout", "dropout"]
)
jax.tree_util.register_dataclass(
    DoraAdapter,
    data_fields=["lora_a", "lora_b", "magnitude"],
    meta_fields=["scale", "layout", "dropout"],
)

jax.tree_util.register_dataclass(
    LoraBiasAdapter,
    data_fields=["lora_a", "lora_b", "lora_bias"],
    meta_fields=["scale", "layout", "dropout"],
)

KINDS: dict[str, type[LoraAdapter]] = {
    cls.KIND: cls for cls in (LoraAdapter, DoraAdapter, LoraBiasAdapter)
}
"""Every adapter kind by the name checkpoints store."""


def is_adapter(node: Any) -> bool:
    """Whether ``node`` is an adapter node (use as ``is_leaf`` in tree functions)."""
    return isinstance(node, LoraAdapter)
