"""Many adapters in one tree: a stack, with each example choosing its slot (``lora_ids``).

``stack([a_1, ..., a_n])`` puts ``n`` adapters trees into one whose nodes hold every
slot: ``lora_a (*stack, n, in, R)``, ``lora_b (*stack, n, R, out)`` and the per-slot
scales ``(*stack, n)`` as array data. Ranks below the largest are padded with zeros at
the end of the rank axis, which changes no product. ``jlora.lora(fn)(params, stacked,
x, lora_ids=ids)`` then gives example ``b`` the adapter ``ids[b]`` (``-1``: none) at
every targeted matmul, in one program: swapping in another stack of the same shapes,
or other ids, compiles nothing new.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jlora._adapter import KINDS, DoraAdapter, LoraAdapter, Signature, is_adapter
from jlora._paths import path_str
from jlora._tree import adapter_items
from jlora._types import Adapters, Array, is_int

__all__ = ["StackedAdapter", "pad", "stack", "unstack"]


@dataclasses.dataclass
class StackedAdapter(LoraAdapter):
    """``n`` LoRA adapters of one weight, chosen per example by ``lora_ids``.

    Attributes:
      lora_a: ``(*stack, n, in_features, R)``, each slot's A zero-padded to rank ``R``.
      lora_b: ``(*stack, n, R, out_features)``.
      scales: ``(*stack, n)``: each slot's ``alpha / r``, as data (not trained: the
        optimizer from :func:`jlora.optimizer` leaves it alone, and the engine stops
        its gradient), so a stack with other scales reuses the compiled program.
      ranks: each slot's own rank, for :func:`unstack` (static).

    ``scale`` is unused (1.0). Example ``b`` of a batch gets ``x_b·W + s_k·(x_b·A_k)·B_k``
    with ``k = lora_ids[b]``, and ``x_b·W`` alone for ``k = -1``.
    """

    scales: Array | None = None
    ranks: tuple[int, ...] = ()

    KIND: ClassVar[str] = "stack"
    SIGNATURES: ClassVar[dict[str, Signature]] = {
        "lora_a": ("S", "N", "I", "R"),
        "lora_b": ("S", "N", "R", "O"),
        "scales": ("S", "N"),
    }
    FROZEN: ClassVar[tuple[str, ...]] = ("scales",)
    EXTRA_META: ClassVar[tuple[str, ...]] = ("ranks",)

    @property
    def slots(self) -> int:
        return len(self.ranks)

    @classmethod
    def extra_sizes_from(cls, meta: Any) -> dict[str, int]:
        return {"N": len(meta["ranks"])}  # the slot axis

    @classmethod
    def meta_problem(cls, meta: Any, rank: int) -> tuple[str, str] | None:
        ranks = meta.get("ranks")
        if not isinstance(ranks, list) or not ranks or not all(
            is_int(r) and 0 < r <= rank for r in ranks
        ):
            return "ranks", f"a non-empty list of integers in [1, {rank}]"
        return None

    def output(self, use: Any, x: Array, base: Array, weight: Any) -> tuple | None:
        per_example = getattr(use, "per_example", None)  # only a dot_general use has one
        u = None
        if per_example is not None:
            if use.ctx.lora_ids is None:
                raise ValueError(
                    "a stacked adapter (jlora.stack) needs lora_ids: call "
                    "jlora.lora(fn)(params, stacked, *args, lora_ids=ids) with ids of shape "
                    "(batch,), -1 for no adapter"
                )
            scales = jax.lax.stop_gradient(self.scales)
            u = per_example(x, self.lora_a, self.lora_b, scales, use.ctx.lora_ids)
        if u is None:
            raise ValueError(
                "a stacked adapter is used where the example axis does not reach the matmul "
                "as the leading axis of the activation (a convolution, a lookup, a "
                "transposed use or a contraction over stack axes); jlora cannot give each "
                "example its own adapter there"
            )
        return base, u

    def delta(self) -> Array:
        raise ValueError(
            "a stacked adapter holds several adapters: merge or take the delta of one "
            "slot (jlora.unstack(stacked)[k]), not of the stack"
        )


jax.tree_util.register_dataclass(
    StackedAdapter,
    data_fields=["lora_a", "lora_b", "scales"],
    meta_fields=["scale", "layout", "dropout", "ranks"],
)
KINDS[StackedAdapter.KIND] = StackedAdapter


def _pad_rank(array: Array, rank: int, axis: int) -> Array:
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, rank - array.shape[axis])
    return jnp.pad(array, widths)


def stack(adapters_list: Sequence[Adapters], *, rank: int | None = None) -> Adapters:
    """One adapters tree holding every tree of ``adapters_list`` as a slot, for ``lora_ids``.

    Every tree must hold plain LoRA adapters at the same paths, with the same layouts;
    ranks may differ (each slot is zero-padded to ``rank``, default the largest). Slot
    ``k`` keeps tree ``k``'s factors unchanged and its scale as data.

    Raises:
      ValueError: an empty list, trees with other paths or layouts, DoRA or stacked
        adapters, or a ``rank`` below a slot's.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2))}
      >>> one = jlora.init(jlora.LoraSpec(rank=1, targets="w"), params, jax.random.key(0))
      >>> two = jlora.init(jlora.LoraSpec(rank=2, targets="w"), params, jax.random.key(1))
      >>> stacked = jlora.stack([one, two])
      >>> stacked["w"].lora_a.shape, stacked["w"].ranks
      ((2, 3, 2), (1, 2))
    """
    trees = list(adapters_list)
    if not trees:
        raise ValueError("stack: expected at least one adapters tree; found none")
    items = [adapter_items(tree) for tree in trees]
    paths = [path for path, _ in items[0]]
    for k, tree_items in enumerate(items):
        found = [path for path, _ in tree_items]
        if found != paths:
            raise ValueError(
                f"stack: tree {k} adapts {found[:4]}, tree 0 adapts {paths[:4]}; every tree "
                "must adapt the same paths"
            )
    nodes = {}
    for index, path in enumerate(paths):
        column = [tree_items[index][1] for tree_items in items]
        for k, node in enumerate(column):
            if type(node) is not LoraAdapter:
                kind = "DoRA" if isinstance(node, DoraAdapter) else type(node).__name__
                raise ValueError(
                    f"stack: tree {k} has a {kind} node at {path!r}; stack takes plain LoRA "
                    "adapters (unstack a stack first)"
                )
            if node.layout != column[0].layout:
                raise ValueError(
                    f"stack: the adapters at {path!r} have layouts {column[0].layout} (tree "
                    f"0) and {node.layout} (tree {k}); they are for different weights"
                )
        ranks = tuple(node.rank for node in column)
        width = max(ranks) if rank is None else rank
        if width < max(ranks):
            raise ValueError(f"stack: rank={rank} is below the largest slot rank {max(ranks)}")
        first = column[0]
        n_stack = len(first.layout.stack_axes)
        a = jnp.stack([_pad_rank(n.lora_a, width, n_stack + 1) for n in column], axis=n_stack)
        b = jnp.stack([_pad_rank(n.lora_b, width, n_stack) for n in column], axis=n_stack)
        scales = jnp.broadcast_to(
            jnp.asarray([n.scale for n in column], jnp.float32),
            (*first.layout.stack_shape, len(column)),
        )
        nodes[path] = StackedAdapter(
            lora_a=a, lora_b=b, scale=1.0, layout=first.layout, dropout=first.dropout,
            scales=scales, ranks=ranks,
        )

    def place(key_path, node):
        return nodes[path_str(key_path)] if is_adapter(node) else node

    return jax.tree_util.tree_map_with_path(place, trees[0], is_leaf=is_adapter)


def unstack(stacked: Adapters) -> list[Adapters]:
    """The adapters trees :func:`stack` was given, each at its own rank and scale.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2))}
      >>> one = jlora.init(jlora.LoraSpec(rank=1, targets="w"), params, jax.random.key(0))
      >>> back = jlora.unstack(jlora.stack([one, one]))
      >>> len(back), back[1]["w"].lora_a.shape
      (2, (3, 1))
    """
    items = adapter_items(stacked)
    stacks = [node for _, node in items if isinstance(node, StackedAdapter)]
    if not stacks:
        raise ValueError("unstack: the tree holds no stacked adapter (from jlora.stack)")
    slots = {node.slots for node in stacks}
    if len(slots) != 1:
        raise ValueError(f"unstack: the stacked adapters hold different slot counts {slots}")
    (n,) = slots
    out = []
    for k in range(n):

        def pick(node, k=k):
            if not isinstance(node, StackedAdapter):
                return node
            n_stack = len(node.layout.stack_axes)
            r = node.ranks[k]
            a = jnp.take(node.lora_a, k, axis=n_stack)[..., :r]
            b = jax.lax.slice_in_dim(jnp.take(node.lora_b, k, axis=n_stack), 0, r, axis=n_stack)
            scales = jnp.reshape(jnp.take(node.scales, k, axis=n_stack), (-1,))
            scale = float(scales[0]) if scales.size else 1.0
            return LoraAdapter(lora_a=a, lora_b=b, scale=scale, layout=node.layout,
                               dropout=node.dropout)

        out.append(jax.tree_util.tree_map(pick, stacked, is_leaf=is_adapter))
    return out


def pad(adapters: Adapters, *, rank: int) -> Adapters:
    """Adapters zero-padded to ``rank`` (same deltas), to hot-swap into a compiled step.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2))}
      >>> one = jlora.init(jlora.LoraSpec(rank=1, alpha=2.0, targets="w"), params,
      ...                  jax.random.key(0))
      >>> padded = jlora.pad(one, rank=4)
      >>> padded["w"].lora_a.shape, padded["w"].scale
      ((3, 4), 2.0)
    """

    def grow(node):
        if not isinstance(node, LoraAdapter):
            return node
        if isinstance(node, (DoraAdapter, StackedAdapter)):
            raise ValueError(f"pad: takes plain LoRA adapters; found a {node.KIND} adapter")
        if rank < node.rank:
            raise ValueError(f"pad: rank={rank} is below the adapter's rank {node.rank}")
        n_stack = len(node.layout.stack_axes)
        return dataclasses.replace(
            node,
            lora_a=_pad_rank(node.lora_a, rank, n_stack + 1),
            lora_b=_pad_rank(node.lora_b, rank, n_stack),
        )

    return jax.tree_util.tree_map(grow, adapters, is_leaf=is_adapter)
