"""Optimizers over the adapters tree (LoRA+, extra trainable leaves) and ``summary``."""

from __future__ import annotations

import math
from typing import Any

import jax
import optax

from jlora._adapter import KINDS, LoraAdapter, is_adapter
from jlora._paths import leaves_with_paths, path_str
from jlora._spec import _matches
from jlora._types import Adapters, Params, Selector
from jlora._weights import is_weight_node


def labels(adapters: Adapters, trainable: Selector | None = None) -> Adapters:
    """Label every array of the adapters tree for ``optax.partition``.

    Each array of an adapter node is labelled by its field name (``"lora_a"``,
    ``"lora_b"``, and ``"magnitude"`` for DoRA); trainable copies of base leaves get
    ``"trainable"`` if ``trainable`` is None or names them, else ``"frozen"``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> adapters = jlora.init(jlora.LoraSpec(rank=1, targets="w"),
      ...                       {"w": jnp.ones((3, 2))}, jax.random.key(0))
      >>> labels(adapters)["w"].lora_b
      'lora_b'
    """

    def label(key_path, node):
        if node is None:
            return None
        if is_adapter(node):  # each array labelled by its field name
            return node.with_arrays(**{name: name for name in node.SIGNATURES})
        path = path_str(key_path)
        if trainable is None or _matches(trainable, path, node, need_matrix=False):
            return "trainable"
        return "frozen"

    return jax.tree_util.tree_map_with_path(label, adapters, is_leaf=is_adapter)


def optimizer(
    tx: optax.GradientTransformation,
    adapters: Adapters,
    *,
    lora_plus_ratio: float | None = None,
    trainable: Selector | None = None,
) -> optax.GradientTransformation:
    """``optax.partition`` over the adapters tree.

    ``tx`` trains A (and a DoRA magnitude); B gets ``tx`` followed by
    ``optax.scale(lora_plus_ratio)`` (LoRA+: for optimizers whose update is linear in
    the learning rate, Adam and SGD among them, this is B's learning rate times the
    ratio; LoRA+ scales B only). Trainable copies of base
    leaves (``LoraSpec.trainable``) train with ``tx`` when ``trainable`` is None or
    names them; others are frozen.

    Args:
      tx: the base optimizer, e.g. ``optax.adamw(1e-3)``.
      adapters: the adapters tree (its structure fixes the labels).
      lora_plus_ratio: LoRA+ ratio of B's learning rate to A's (PEFT suggests 16).
      trainable: which trainable copies to train (names, regex or predicate).

    Returns:
      An ``optax.GradientTransformation`` for the adapters tree.

    Raises:
      ValueError: ``trainable`` names no trainable copy present in ``adapters``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> adapters = jlora.init(jlora.LoraSpec(rank=1, targets="w"),
      ...                       {"w": jnp.ones((3, 2))}, jax.random.key(0))
      >>> tx = optimizer(optax.adam(1e-3), adapters, lora_plus_ratio=16.0)
      >>> state = tx.init(adapters)
    """
    tree_labels = labels(adapters, trainable)
    if trainable is not None and "trainable" not in jax.tree_util.tree_leaves(tree_labels):
        copies = [
            p for p, n in leaves_with_paths(adapters, is_leaf=is_adapter) if not is_adapter(n)
        ]
        raise ValueError(
            f"optimizer(trainable={trainable!r}) names no trainable leaf of the adapters "
            f"tree (its trainable copies: {copies or 'none'}). Put base leaves in the "
            "adapters with LoraSpec(trainable=...) before jlora.init."
        )
    b_tx = tx if lora_plus_ratio is None else optax.chain(tx, optax.scale(float(lora_plus_ratio)))
    transforms = {name: tx for kind in KINDS.values() for name in kind.SIGNATURES}
    transforms.update({"lora_b": b_tx, "trainable": tx, "frozen": optax.set_to_zero()})
    for kind in KINDS.values():  # data that never trains (a stack's per-slot scales)
        transforms.update({name: optax.set_to_zero() for name in kind.FROZEN})
    # A callable, not the tree itself: optax would call a callable tree (an Equinox
    # module is one) as if it were the labelling function.
    return optax.partition(transforms, lambda _: tree_labels)


def _count(tree: Any) -> int:
    """Parameters held by a tree: a quantized weight counts as the weights it stands for,
    a compressed (low-rank) weight as the ``r·(in + out)`` numbers it holds."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_weight_node)
    return sum(
        x.param_count() if hasattr(x, "param_count") else math.prod(getattr(x, "shape", ()))
        for x in leaves
    )


def summary(params: Params, adapters: Adapters) -> str:
    """PEFT's one-line parameter count: trainable, all, and the trainable share.

    All parameters are the base's plus the adapters' (as PEFT counts a LoRA model).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((100, 100))}
      >>> adapters = jlora.init(jlora.LoraSpec(rank=2, targets="w"), params, jax.random.key(0))
      >>> summary(params, adapters)
      'trainable params: 400 || all params: 10,400 || trainable%: 3.8462'
    """
    trainable = _count(adapters)
    factors = _count(
        [
            n
            for _, n in leaves_with_paths(adapters, is_leaf=is_adapter)
            if isinstance(n, LoraAdapter)
        ]
    )
    total = _count(params) + factors
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"
