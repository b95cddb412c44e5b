"""Trainable tokens: train only chosen rows of an embedding (PEFT's ``trainable_token_indices``).

A :class:`TokensAdapter` holds the new values of rows ``indices`` of an embedding
``W (vocab, d)``; the adapted weight is ``W`` with those rows replaced. Replacing rows
is a low-rank update, exactly: ``W' = W + A·B`` with ``A = onehot(indices)ᵀ``
``(vocab, k)`` and ``B = rows - W[indices]`` ``(k, d)``, so the engine runs it as a
LoRA term of scale 1 at every use the engine factors (the row lookup and a tied head
``x·Wᵀ`` alike), without building ``W'``. Only ``rows`` is trained; the base rows
are read from ``W`` at each use, so the gradient reaches ``rows`` alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jlora._adapter import KINDS, Layout, LoraAdapter, Signature
from jlora._types import Array, is_int


@dataclasses.dataclass(kw_only=True)
class TokensAdapter(LoraAdapter):
    """New values for rows ``indices`` of an embedding, the rest of it frozen.

    PEFT's ``trainable_token_indices`` (its ``trainable_tokens_delta`` holds the rows'
    values, not a difference, and so does ``rows``). For new special tokens: their
    rows train while the vocabulary stays as it was. On a tied embedding both uses
    (the lookup and the output head) see the new rows, as in PEFT.

    Attributes:
      rows: ``(k, d)``, the rows' values; they start at the base's rows.
      indices: the ``k`` row indices (distinct, static).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"embed": {"embedding": jnp.zeros((10, 4))}}
      >>> spec = jlora.LoraSpec(targets=[], trainable_token_indices={"embed": [3, 7]})
      >>> adapters = jlora.init(spec, params, jax.random.key(0))
      >>> node = adapters["embed"]["embedding"]
      >>> node.indices, node.rows.shape
      ((3, 7), (2, 4))
      >>> node = node.with_arrays(rows=jnp.ones((2, 4)))
      >>> lookup = lambda p, ids: p["embed"]["embedding"][ids]
      >>> jlora.lora(lookup)(params, {"embed": {"embedding": node}}, jnp.array([3, 4]))[:, 0]
      Array([1., 0.], dtype=float32)
    """

    rows: Array | None = None
    indices: tuple[int, ...] = ()
    # No factors of its own: A and B are derived at each use.
    lora_a: Any = None
    lora_b: Any = None

    KIND: ClassVar[str] = "tokens"
    SIGNATURES: ClassVar[dict[str, Signature]] = {"rows": ("S", "R", "O")}
    EXTRA_META: ClassVar[tuple[str, ...]] = ("indices",)

    @property
    def rank(self) -> int:
        return len(self.indices)

    @classmethod
    def meta_problem(cls, meta: Any, rank: int) -> tuple[str, str] | None:
        indices = meta.get("indices")
        if (
            not isinstance(indices, (list, tuple))
            or len(indices) != rank
            or not all(is_int(i) and i >= 0 for i in indices)
            or len(set(indices)) != len(indices)
        ):
            return "indices", f"{rank} distinct non-negative integers (the rank)"
        return None

    # -- the engine's term -------------------------------------------------------------

    def _factors(self, weight: Any) -> tuple[Array, Array]:
        """Grouped ``A = onehot(indices)ᵀ (*in, k)`` and ``B = rows - W[indices]``."""
        layout = self.layout
        axis = layout.in_axes[0]
        dense = weight.dense()
        idx = jnp.asarray(self.indices, jnp.int32)
        base_rows = jnp.take(dense, idx, axis=axis)  # the input axis now holds k rows
        base_rows = jnp.transpose(base_rows, [axis, *layout.out_axes])  # (k, *out)
        b = self.rows.astype(dense.dtype) - jax.lax.stop_gradient(base_rows)
        a = jax.nn.one_hot(idx, layout.weight_shape[axis], dtype=dense.dtype).T  # (vocab, k)
        return a, b

    def term(self, use: Any, x: Array, base: Array, weight: Any) -> Array | None:
        """``x`` against ``A·B``: the rows' change where the use reads them."""
        a, b = self._factors(weight)
        return use.lowrank(x, a, b, 1.0)

    # -- dense forms -------------------------------------------------------------------

    def delta(self) -> Array:
        raise ValueError(
            "a trainable-tokens adapter replaces rows, so its update depends on the base "
            "rows: use jlora.merge(params, adapters), which writes the rows in"
        )

    def merge_into(self, weight: Array) -> Array:
        """``weight`` with rows ``indices`` (along its input axis) set to ``rows``."""
        layout = self.layout
        grouped = layout.to_grouped(weight)  # (vocab, out)
        rows = self.rows.reshape(len(self.indices), layout.out_features).astype(weight.dtype)
        merged = grouped.at[jnp.asarray(self.indices, jnp.int32)].set(rows)
        return layout.from_grouped(merged)

    def unmerge_from(self, merged: Array) -> Array:
        raise ValueError(
            "unmerge: a trainable-tokens adapter overwrote its rows, and the merged weight "
            "no longer holds the base's: keep the base params (PEFT keeps a copy of the "
            "original rows for this)"
        )


jax.tree_util.register_dataclass(
    TokensAdapter,
    data_fields=["rows"],
    meta_fields=["lora_a", "lora_b", "scale", "layout", "dropout", "indices"],
)
KINDS[TokensAdapter.KIND] = TokensAdapter


def tokens_adapter(path: str, leaf: Any, layout: Layout, indices: Any, dtype: Any) -> TokensAdapter:
    """A fresh :class:`TokensAdapter` for the embedding ``leaf`` at ``path``: ``rows`` are
    its current rows ``indices``."""
    if layout.stack_axes or len(layout.in_axes) != 1:
        raise ValueError(
            f"trainable_token_indices: {path!r} (shape {list(layout.weight_shape)}) is not a "
            "(vocab, features) embedding with one row axis"
        )
    vocab = layout.weight_shape[layout.in_axes[0]]
    indices = tuple(int(i) for i in indices)
    if not indices or len(set(indices)) != len(indices) or not all(
        is_int(i) and 0 <= i < vocab for i in indices
    ):
        raise ValueError(
            f"trainable_token_indices for {path!r}: expected distinct row indices in "
            f"[0, {vocab}); found {list(indices)}"
        )
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ValueError(
            f"trainable_token_indices: the rows of {path!r} start at the base's; jlora.init "
            "got an abstract jax.ShapeDtypeStruct"
        )
    from jlora._weights import dense_of

    grouped = layout.to_grouped(jnp.asarray(dense_of(leaf)))
    rows = grouped[jnp.asarray(indices, jnp.int32)].astype(dtype)
    return TokensAdapter(scale=1.0, layout=layout, rows=rows, indices=indices)
