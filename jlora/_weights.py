"""Weight kinds: what a targeted leaf of ``params`` is, as the engine sees it.

A weight kind answers three questions for the engine:

* ``dense()``: the weight as the array ``fn`` would have seen (same shape and dtype);
* ``scanned()``: the weight for one slice along axis 0, when ``scan`` runs over it;
* ``apply(eqn, rest)``: the weight after a layout-only equation (transpose, reshape,
  cast, slice of stack axes...), or None when the kind cannot follow it;
* ``product(contract, *operands)``: the base product of one use,
  ``contract(dense_weight, *operands)``. A
  dense weight just calls it; a quantized weight decodes inside a rematerialized block,
  so the backward pass keeps the packed codes and decodes again, never saving the
  decoded weight.

``DenseWeight`` is a plain array. Other kinds (``jlora.quantize``'s NF4 and int8) are
:class:`WeightNode` s: pytree nodes that sit in ``params`` in place of the array and
are their own engine-side weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax

from jlora._primitives import bind
from jlora._types import Array


@dataclasses.dataclass
class DenseWeight:
    """A plain array weight."""

    w: Array

    KIND: ClassVar[str] = "dense"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def dtype(self) -> Any:
        return self.w.dtype

    def dense(self) -> Array:
        return self.w

    def apply(self, eqn: Any, rest: list) -> DenseWeight:
        return DenseWeight(bind(eqn, [self.w, *rest])[0])

    def product(self, contract: Callable[..., Array], *operands: Any) -> Array:
        return contract(self.w, *operands)

    def scanned(self) -> DenseWeight:
        """The weight for one slice along axis 0 (``lax.scan`` slices the array itself)."""
        return self


jax.tree_util.register_dataclass(DenseWeight, data_fields=["w"], meta_fields=[])


class WeightNode:
    """Base class of weight kinds stored in ``params`` in place of an array.

    Subclasses are pytree nodes holding their encoded arrays, with static ``shape``
    and ``dtype`` of the array they stand for, and implement the weight-kind protocol
    (``dense``, ``apply``, ``product``) for the engine.
    """

    KIND: ClassVar[str] = "node"
    shape: tuple[int, ...]
    dtype: Any

    def dense(self) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, eqn: Any, rest: list) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def scanned(self) -> Any:  # pragma: no cover - abstract
        """The node for one slice along axis 0 under ``scan``, or None if it cannot be."""
        raise NotImplementedError

    def product(self, contract: Callable[..., Array], *operands: Any) -> Array:
        """``contract(dense(), *operands)``, decoded again in the backward pass, not saved."""
        return jax.checkpoint(
            lambda node, *ops: contract(node.dense(), *ops),
            policy=jax.checkpoint_policies.nothing_saveable,
        )(self, *operands)


def is_weight_node(node: Any) -> bool:
    """Whether ``node`` is an encoded weight (use as ``is_leaf`` over params)."""
    return isinstance(node, WeightNode)


def dense_of(node: Any) -> Any:
    """The array a params leaf stands for (decoded for weight nodes)."""
    return node.dense() if isinstance(node, WeightNode) else node
