"""Quantized weight kinds (QLoRA): NF4 as bitsandbytes stores it, and per-feature int8.

``jlora.quantize(params, targets)`` replaces each targeted leaf by a :class:`QuantizedWeight`
node; ``jlora.lora(fn)`` runs on such params with or without adapters (``fn`` still
sees arrays of the original shape and dtype), decoding each weight inside the step
for each use only, in a rematerialized block so that the backward pass keeps the
packed codes and decodes again instead of saving the decoded weight. Under ``scan``
one layer is decoded at a time.

The codes follow bitsandbytes: each output feature's row of the PyTorch-layout
``(out, in)`` weight, flattened row-major, is cut into blocks of ``block_size`` along
the input features, each with its float32 absmax (NF4), or one absmax per output
feature (int8). Stack axes (scanned layers) lead every array, one layer per index.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora import _nf4
from jlora._adapter import Layout
from jlora._paths import leaves_with_paths, path_str
from jlora._primitives import P, bind, cut_axes, slice_extent
from jlora._types import Array, Params, Selector
from jlora._weights import WeightNode, is_weight_node

KINDS = ("nf4", "int8")
ARRAYS = ("codes", "absmax", "absmax_codes", "absmax_scales", "absmax_offset")
"""The encoded arrays of a :class:`QuantizedWeight` (the ones a kind does not use: None)."""


def per_layer(fn: Callable, n_stack: int) -> Callable:
    """``fn`` of one layer's arrays, mapped over ``n_stack`` leading stack axes."""
    for _ in range(n_stack):
        fn = jax.vmap(fn)
    return fn


@dataclasses.dataclass(frozen=True)
class _Deferred:
    """A layout-only equation to replay on the decoded weight (compared by identity)."""

    eqn: Any

    def __hash__(self) -> int:
        return id(self.eqn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Deferred) and other.eqn is self.eqn


@dataclasses.dataclass
class QuantizedWeight(WeightNode):
    """A weight stored quantized: NF4 (4-bit codes, two per byte) or int8.

    Attributes:
      codes: NF4: ``(*stack, ceil(out·in / 2))`` uint8; int8: ``(*stack, out, in)`` int8.
      absmax: NF4 without double quantization: ``(*stack, n_blocks)`` float32; int8:
        ``(*stack, out)`` float32. None with double quantization.
      absmax_codes: double quantization: the absmaxes as 8-bit codes,
        ``(*stack, n_blocks)`` uint8, in blocks of 256 around their mean.
      absmax_scales: double quantization: ``(*stack, ceil(n_blocks / 256))`` float32.
      absmax_offset: double quantization: the mean, ``(*stack,)`` float32.
      kind: ``"nf4"`` or ``"int8"``.
      layout: which axes of the original weight are stack, input and output axes.
      dtype: the original weight's dtype (what ``fn`` sees).
      block_size: NF4 block length along the input features.
      ops: layout-only operations the engine met on this weight, replayed after decoding.
      quant_dtype: the dtype bitsandbytes decodes to (its ``quant_state.dtype``: the
        dtype of the weight it quantized); decoded values are rounded to it before the
        cast to ``dtype``. Default: ``dtype``.
    """

    codes: Array
    absmax: Array | None
    absmax_codes: Array | None
    absmax_scales: Array | None
    absmax_offset: Array | None
    kind: str
    layout: Layout
    dtype: Any
    block_size: int = 64
    ops: tuple = ()
    shape: tuple[int, ...] = ()
    quant_dtype: Any = None

    def __post_init__(self):
        if not self.shape:
            self.shape = tuple(self.layout.weight_shape)

    @property
    def KIND(self) -> str:
        return self.kind

    @property
    def SIGNATURES(self) -> dict[str, tuple[str, ...]]:
        """Per encoded array, what its axes are: ``"S"`` the weight's stack axes, ``"P"``
        packed codes or blocks (flattened ``(out, in)``), ``"O"``/``"I"`` features."""
        if self.kind == "int8":
            return {"codes": ("S", "O", "I"), "absmax": ("S", "O")}
        return {
            "codes": ("S", "P"),
            "absmax": ("S", "P"),
            "absmax_codes": ("S", "P"),
            "absmax_scales": ("S", "P"),
            "absmax_offset": ("S",),
        }

    # -- decoding ---------------------------------------------------------------------

    def _absmax(self) -> Array:
        if self.absmax is not None:
            return self.absmax
        decode = per_layer(_nf4.dequantize_absmax, len(self.layout.stack_axes))
        return decode(self.absmax_codes, self.absmax_scales, self.absmax_offset)

    def decoded(self) -> Array:
        """The original weight (before any deferred operation), in ``dtype``."""
        layout = self.layout
        torch_shape = (layout.out_features, layout.in_features)
        if self.kind == "nf4":

            def one(codes, absmax):
                return _nf4.dequantize_nf4(codes, absmax, torch_shape, self.block_size, jnp.float32)
        else:

            def one(codes, absmax):
                return codes.astype(jnp.float32) * (absmax / 127.0)[:, None]

        w_OxI = per_layer(one, len(layout.stack_axes))(
            self.codes, self._absmax()
        )  # (*stack, out, in)
        if self.quant_dtype is not None:
            w_OxI = w_OxI.astype(self.quant_dtype)
        grouped = jnp.swapaxes(w_OxI, -1, -2)  # (*stack, in, out)
        return layout.from_grouped(grouped).astype(self.dtype)

    def dense(self) -> Array:
        weight = self.decoded()
        for op in self.ops:
            weight = bind(op.eqn, [weight])[0]
        return weight

    # -- the weight-kind protocol -----------------------------------------------------

    def apply(self, eqn: Any, rest: list) -> QuantizedWeight | None:
        out = eqn.outvars[0].aval
        if eqn.primitive in (P.slice_p, P.dynamic_slice_p) and not self.ops:
            sliced = self._slice_leading(eqn, rest)
            if sliced is not None:
                return sliced
        if rest:  # operands only known at run time: decode, then apply
            return None
        return dataclasses.replace(
            self, ops=(*self.ops, _Deferred(eqn)), shape=tuple(out.shape), dtype=out.dtype
        )

    def _slice_leading(self, eqn: Any, rest: list) -> QuantizedWeight | None:
        """One index of the leading stack axis (``w[i]`` of stacked layers), on the codes."""
        stack = self.layout.stack_axes
        shape = self.layout.weight_shape
        starts, sizes, strides = slice_extent(eqn)
        if not stack or stack[0] != 0 or set(cut_axes(shape, starts, sizes, strides)) - {0}:
            return None
        static = eqn.primitive is P.slice_p
        if static and strides[0] != 1:
            return None
        begin, size = (starts[0] if static else rest[0]), sizes[0]

        def cut(array):
            if array is None:
                return None
            if static:
                return jax.lax.slice_in_dim(array, begin, begin + size, axis=0)
            return jax.lax.dynamic_slice_in_dim(array, begin, size, axis=0)

        layout = dataclasses.replace(self.layout, weight_shape=(size, *shape[1:]))
        return dataclasses.replace(
            self,
            **{name: cut(getattr(self, name)) for name in ARRAYS},
            layout=layout,
            shape=tuple(layout.weight_shape),
        )

    def scanned(self) -> QuantizedWeight | None:
        """The node for one slice along axis 0 (``scan`` over stacked layers)."""
        layout = self.layout
        if self.ops or not layout.stack_axes or layout.stack_axes[0] != 0:
            return None
        inner = Layout.from_kinds(layout.weight_shape[1:], layout.kinds()[1:])
        return dataclasses.replace(self, layout=inner, shape=tuple(inner.weight_shape))

    # -- size -------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes held by the encoded arrays."""
        arrays = [getattr(self, name) for name in ARRAYS]
        return sum(
            math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays if a is not None
        )


jax.tree_util.register_dataclass(
    QuantizedWeight,
    data_fields=list(ARRAYS),
    meta_fields=["kind", "layout", "dtype", "block_size", "ops", "shape", "quant_dtype"],
)


def encode(
    weight: Array,
    layout: Layout,
    *,
    kind: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
) -> QuantizedWeight:
    """Quantize one weight of ``layout`` (see :func:`quantize`)."""
    if kind not in KINDS:
        raise ValueError(f"quantize: kind must be one of {KINDS}; found {kind!r}")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(
            f"quantize: block_size must be a positive even integer; found {block_size!r}"
        )
    grouped = layout.to_grouped(jnp.asarray(weight).astype(jnp.float32))  # (*S, in, out)
    w_OxI = jnp.swapaxes(grouped, -1, -2)
    n_stack = len(layout.stack_axes)
    if kind == "int8":

        def one(w):
            absmax = jnp.max(jnp.abs(w), axis=1)
            safe = jnp.where(absmax > 0, absmax, jnp.ones((), absmax.dtype))
            codes = jnp.round(w / safe[:, None] * 127.0).astype(jnp.int8)
            return codes, absmax

        codes, absmax = per_layer(one, n_stack)(w_OxI)
        return QuantizedWeight(
            codes, absmax, None, None, None, "int8", layout, weight.dtype, block_size
        )

    codes, absmax = per_layer(lambda w: _nf4.quantize_nf4(w, block_size), n_stack)(w_OxI)
    if not double_quant:
        return QuantizedWeight(
            codes, absmax, None, None, None, "nf4", layout, weight.dtype, block_size
        )
    absmax_codes, absmax_scales, absmax_offset = per_layer(_nf4.quantize_absmax, n_stack)(absmax)
    return QuantizedWeight(
        codes, None, absmax_codes, absmax_scales, absmax_offset, "nf4", layout, weight.dtype,
        block_size,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _encode_jit(weight, layout, kind, block_size, double_quant):
    """:func:`encode` compiled once per shape: op by op, each of the codec's integer
    steps would compile a kernel of its own."""
    return encode(weight, layout, kind=kind, block_size=block_size, double_quant=double_quant)


def quantize(
    params: Params,
    targets: Selector,
    *,
    kind: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
) -> Params:
    """Quantize the targeted weights of ``params`` for QLoRA (the base stays frozen).

    NF4 is bitsandbytes' ``quantize_4bit(W_t, blocksize=block_size, quant_type="nf4",
    compress_statistics=double_quant)`` on each layer's PyTorch-layout ``(out, in)``
    weight, bit for bit in the codes. ``kind="int8"`` keeps one absmax per output
    feature and rounds to the nearest of 255 levels. The layout of weights of more than
    two axes (stacked layers, multi-axis kernels, transposed storage) is learned from
    ``fn`` as in :func:`jlora.init`.

    Args:
      params: the base params (arrays).
      targets: which leaves, in any of the forms ``LoraSpec.targets`` takes.
      kind: ``"nf4"`` or ``"int8"``.
      block_size: NF4 block length along the input features (bitsandbytes: 64).
      double_quant: NF4 only: store the block absmaxes as 8-bit codes in blocks of 256
        (bitsandbytes' ``compress_statistics``), about 4.127 bits per weight.
      fn: the model function, to learn layouts; ``args``, ``kwargs``: example inputs.

    Returns:
      params with a :class:`QuantizedWeight` at each target; other leaves as they are.

    Raises:
      ValueError: nothing matches, a bad kind or block size, or an N-D target whose
        layout cannot be learned.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 8))}
      >>> q = jlora.quantize(params, "w")
      >>> q["w"].codes.shape, q["w"].codes.dtype
      ((256,), dtype('uint8'))
      >>> y = jlora.lora(lambda p, x: x @ p["w"])(q, {}, jnp.ones((1, 64)))
      >>> bool(jnp.allclose(y, jnp.ones((1, 64)) @ jlora.dequantize(q)["w"]))
      True
    """
    from jlora._init import _layouts
    from jlora._spec import LoraSpec

    spec = LoraSpec(targets=targets)
    chosen = spec.select(params)
    layouts = _layouts(chosen, params, fn, args, kwargs, spec.targets)
    chosen = [(path, leaf) for path, leaf in chosen if path in layouts]
    nodes = {
        path: _encode_jit(leaf, layouts[path], kind, block_size, double_quant)
        for path, leaf in chosen
        if not is_weight_node(leaf)
    }
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: nodes.get(path_str(kp), leaf), params, is_leaf=is_weight_node
    )


def dequantize(params: Params) -> Params:
    """Every :class:`QuantizedWeight` of ``params`` decoded to an array of its dtype.

    Example:
      >>> import jax, jlora
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 8))}
      >>> back = jlora.dequantize(jlora.quantize(params, "w", kind="int8"))
      >>> back["w"].shape, bool(abs(back["w"] - params["w"]).max() < 0.05)
      ((64, 8), True)
    """
    return jax.tree_util.tree_map(
        lambda leaf: leaf.dense() if isinstance(leaf, WeightNode) else leaf,
        params,
        is_leaf=is_weight_node,
    )


def quantized_paths(params: Params) -> list[str]:
    """Paths of the quantized leaves of ``params``."""
    return [
        p for p, leaf in leaves_with_paths(params, is_leaf=is_weight_node) if is_weight_node(leaf)
    ]
