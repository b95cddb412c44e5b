"""Merging adapters into the base weights, and taking them back out."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jlora._adapter import LoraAdapter, LoraBiasAdapter, add_delta
from jlora._compress import LowRankWeight
from jlora._paths import leaves_with_paths, path_str
from jlora._tree import match
from jlora._types import Adapters, Array, Params
from jlora._weights import WeightNode, is_weight_node


def bias_path(path: str) -> str:
    """The bias leaf of the layer whose weight is at ``path``: its sibling named ``bias``
    (``dense/kernel`` -> ``dense/bias``; an NNX ``.../kernel/value`` -> ``.../bias/value``)."""
    parts = path.split("/")
    suffix = parts[-1:] if len(parts) > 2 and parts[-1] == "value" else []
    head = parts[: len(parts) - len(suffix)]
    return "/".join([*head[:-1], "bias", *suffix])


def _bias_updates(nodes: dict, params: Params) -> dict[str, tuple[str, Array]]:
    """``{bias path: (weight path, s·b)}`` for the lora_bias adapters, checked to have a
    bias leaf of the right size to go into."""
    updates = {}
    leaves = None
    for path, node in nodes.items():
        if not isinstance(node, LoraBiasAdapter):
            continue
        if leaves is None:
            leaves = dict(leaves_with_paths(params, is_leaf=is_weight_node))
        target = bias_path(path)
        leaf = leaves.get(target)
        delta = node.bias_delta()
        if leaf is None:
            raise ValueError(
                f"merge: the adapter at {path!r} has a lora_bias, which merges into the "
                f"layer's bias, but params has no {target!r}: the layer has no bias (PEFT "
                "refuses this merge too). Run it unmerged with jlora.lora"
            )
        if int(np.prod(leaf.shape)) != int(np.prod(delta.shape)):
            raise ValueError(
                f"merge: the lora_bias of {path!r} has {list(delta.shape)} values but the "
                f"layer's bias {target!r} has shape {list(leaf.shape)}"
            )
        updates[target] = (path, delta)
    return updates


def _apply(params: Params, adapters: Adapters, sign: float, check_finite: bool) -> Params:
    nodes = match(params, adapters)
    biases = _bias_updates(nodes, params)

    def update(key_path, weight):
        path = path_str(key_path)
        if path in biases:  # the layer's bias, under a lora_bias adapter
            node = nodes.get(path)
            bias = node if isinstance(node, jax.Array) and sign > 0 else weight  # trained copy
            out = add_delta(bias, sign * biases[path][1].reshape(bias.shape))
            if check_finite:
                _check_finite(path, out)
            return _keep_sharding(out, bias)
        node = nodes.get(path)
        if node is None:
            return weight
        if not isinstance(node, LoraAdapter):  # a trainable copy replaces the base leaf
            return node if sign > 0 else weight
        if isinstance(weight, LowRankWeight) and type(node) is LoraAdapter:
            return _merge_low_rank(weight, node, sign)
        if isinstance(weight, WeightNode):
            raise ValueError(
                f"merge: the weight at {path!r} is a quantized {weight.KIND} node; merging "
                "into it would lose the adapter's precision. Dequantize first: "
                "jlora.merge(jlora.dequantize(params), adapters)"
            )
        if not jnp.issubdtype(weight.dtype, jnp.floating):
            raise ValueError(
                f"merge: the weight at {path!r} is {weight.dtype}; merging a float update "
                "into an integer weight and casting back would round it away. Merge into "
                "a floating base (dequantize it first)"
            )
        for name, array in node.arrays().items():
            if not jnp.issubdtype(array.dtype, jnp.floating):
                raise ValueError(
                    f"merge: the adapter at {path!r} has {name} of dtype {array.dtype}; "
                    "adapter factors must be floating-point"
                )
        out = node.merge_into(weight) if sign > 0 else node.unmerge_from(weight)
        if check_finite:
            _check_finite(path, out)
        return _keep_sharding(out, weight)

    return jax.tree_util.tree_map_with_path(update, params, is_leaf=is_weight_node)


def _merge_low_rank(weight: LowRankWeight, node: LoraAdapter, sign: float) -> LowRankWeight:
    """``U·V ± s·A·B`` kept low-rank: the factors side by side along the rank axis
    (exact; the rank grows by the adapter's)."""
    u = jnp.concatenate([weight.u, (sign * node.scale * node.lora_a).astype(weight.u.dtype)], -1)
    v = jnp.concatenate([weight.v, node.lora_b.astype(weight.v.dtype)], -2)
    return dataclasses.replace(weight, u=u, v=v)


def _keep_sharding(out: Array, weight: Array) -> Array:
    sharding = getattr(weight, "sharding", None)
    if isinstance(weight, jax.Array) and not isinstance(weight, jax.core.Tracer) and sharding:
        return jax.device_put(out, sharding)
    return out


def _check_finite(path: str, out: Array) -> None:
    if isinstance(out, jax.core.Tracer):
        raise ValueError(
            f"merge(..., check_finite=True) needs concrete arrays; {path!r} is traced. "
            "Call it outside jax.jit."
        )
    if not bool(jnp.all(jnp.isfinite(out))):
        raise FloatingPointError(f"merging the adapter at {path!r} gives NaN or Inf values")


def merge(params: Params, adapters: Adapters, *, check_finite: bool = False) -> Params:
    """``W + scale * B·A`` at every adapted leaf; other leaves returned as they are.

    A DoRA adapter gives ``(m / n) ⊙ (W + scale * A·B)``, with the norm ``n`` detached
    from the gradient as in :func:`jlora.lora`, so ``fn(merge(p, a))`` and
    ``lora(fn)(p, a)`` agree in values and in gradients.

    Each merged leaf keeps its dtype (the sum is formed in float32 or wider) and, for
    concrete arrays, its sharding. A LoRA adapter on a compressed weight
    (:func:`jlora.compress`) is merged exactly and stays low-rank: the factors are set
    side by side, so the rank grows by the adapter's. A :class:`jlora.LoraBiasAdapter`
    also adds ``s·b`` to the layer's bias leaf (the weight's sibling named ``bias``).
    Trainable copies in ``adapters`` replace their
    base leaves.

    Args:
      params: the frozen base.
      adapters: adapters made for ``params``.
      check_finite: raise if a merged leaf holds NaN or Inf (not under ``jit``).

    Returns:
      A new params tree; ``params`` is not modified.

    Raises:
      ValueError: adapters that do not fit ``params`` (names the path and shapes), an
        integer or quantized base weight, or integer factors.
      FloatingPointError: with ``check_finite``, a non-finite merged leaf (names it).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.zeros((3, 2))}
      >>> adapters = jlora.init(jlora.LoraSpec(rank=1, alpha=1.0, targets="w"), params,
      ...                       jax.random.key(0))
      >>> bool((merge(params, adapters)["w"] == 0).all())  # B starts at zero
      True
    """
    return _apply(params, adapters, 1.0, check_finite)


def unmerge(params: Params, adapters: Adapters, *, check_finite: bool = False) -> Params:
    """Subtract the adapters' update: ``unmerge(merge(p, a), a)`` gives back ``p``.

    Trainable copies cannot be un-merged (their base values are gone); those leaves
    are returned unchanged.

    Raises:
      ValueError: a DoRA adapter: its merged weight no longer holds the norm needed to
        take it back out (keep the base instead).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2))}
      >>> spec = jlora.LoraSpec(rank=1, targets="w")
      >>> adapters = jlora.init(spec, params, jax.random.key(0))
      >>> restored = unmerge(merge(params, adapters), adapters)
      >>> bool(jnp.allclose(restored["w"], params["w"]))
      True
    """
    return _apply(params, adapters, -1.0, check_finite)


def delta(adapters: Adapters) -> Adapters:
    """Each adapter's dense update ``scale * B·A`` in its weight's shape (for inspection).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> adapters = jlora.init(jlora.LoraSpec(rank=1, targets="w"),
      ...                       {"w": jnp.ones((3, 2))}, jax.random.key(0))
      >>> delta(adapters)["w"].shape
      (3, 2)
    """
    return jax.tree_util.tree_map(
        lambda node: node.delta() if isinstance(node, LoraAdapter) else node,
        adapters,
        is_leaf=lambda node: isinstance(node, LoraAdapter),
    )
