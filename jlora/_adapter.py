"""The adapter node: trainable factors as pytree children, scale and layout static."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

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

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[-1])

    def delta(self) -> Array:
        """``scale * A @ B`` in the weight's shape and axis order (float32 or wider)."""
        layout = self.layout
        a = self.lora_a
        b = self.lora_b
        dtype = wide_float(a.dtype, b.dtype)
        product = jnp.matmul(a.astype(dtype), b.astype(dtype)) * jnp.asarray(self.scale, dtype)
        grouped = product.reshape(layout.stack_shape + layout.in_shape + layout.out_shape)
        order = layout.stack_axes + layout.in_axes + layout.out_axes
        return jnp.transpose(grouped, inverse_permutation(order))


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


def is_adapter(node: Any) -> bool:
    """Whether ``node`` is an adapter node (use as ``is_leaf`` in tree functions)."""
    return isinstance(node, LoraAdapter)
