"""SVD-compressed weights: a weight kind holding a low-rank pair and no dense base.

``jlora.compress(params, targets, rank=r)`` replaces each targeted weight ``W`` by a
:class:`LowRankWeight` holding ``U_r·Σ_r^{1/2}`` and ``Σ_r^{1/2}·V_rᵀ`` of its
grouped form ``(*stack, in, out)``: the best rank-``r`` approximation (Eckart–Young),
``r·(in + out)`` numbers per stack slice instead of ``in·out``.

Inside :func:`jlora.lora` the pair runs in factored form: every use the engine
factors for an adapter (matmuls, einsums, convolutions, lookups, under ``scan`` and
the other control flow) computes the base product as ``(x·U)·V``, through the same
low-rank product and layout rules as a LoRA term with scale 1, so no weight-sized
array is built. An adapter on the compressed weight adds its own term, so the pair
can be distilled by training a LoRA on top of it (or by differentiating with respect
to the pair itself, which is a pytree node of ``params``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jlora._adapter import Layout, LoraAdapter, wide_float
from jlora._paths import describe, path_str
from jlora._types import Array, Params, Selector
from jlora._weights import WeightNode, is_weight_node


@dataclasses.dataclass
class LowRankWeight(WeightNode):
    """A weight stored as a low-rank pair ``W ≈ U·V``, with no dense base.

    In ``params`` the arrays are in the flattened form of a LoRA adapter's factors
    (``u`` like ``lora_a``, ``v`` like ``lora_b``); inside the engine they are in
    grouped form (``grouped=True``), each feature axis of the weight its own axis.

    Attributes:
      u: ``(*stack, in_features, r)``, the input side, ``U_r·Σ_r^{1/2}``.
      v: ``(*stack, r, out_features)``, the output side, ``Σ_r^{1/2}·V_rᵀ``.
      layout: which axes of the weight it stands for are stack, input and output axes.
      dtype: the dtype ``fn`` sees (the original weight's).
      shape: the shape ``fn`` sees.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> w = jax.random.normal(jax.random.key(0), (8, 2)) @ jax.random.normal(
      ...     jax.random.key(1), (2, 6))
      >>> c = jlora.compress({"w": w}, "w", rank=2)["w"]
      >>> c.u.shape, c.v.shape, c.param_count()
      ((8, 2), (2, 6), 28)
      >>> bool(jnp.allclose(c.dense(), w, atol=1e-5))
      True
    """

    u: Array
    v: Array
    layout: Layout
    dtype: Any
    shape: tuple[int, ...] = ()
    grouped: bool = False

    KIND: ClassVar[str] = "lowrank"
    SIGNATURES: ClassVar[dict[str, tuple[str, ...]]] = {
        "u": ("S", "I", "R"),
        "v": ("S", "R", "O"),
    }

    def __post_init__(self):
        if not self.shape:
            self.shape = tuple(self.layout.weight_shape)

    @property
    def rank(self) -> int:
        return int(self.u.shape[-1])

    def param_count(self) -> int:
        """Numbers held: ``r·(in + out)`` per stack slice."""
        return int(np.prod(self.u.shape)) + int(np.prod(self.v.shape))

    def nbytes(self) -> int:
        """Bytes held by the pair."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in (self.u, self.v))

    # -- as a LoRA pair of scale 1 (the engine's low-rank machinery) --------------------

    def pair(self) -> LoraAdapter:
        """The pair as a :class:`LoraAdapter` of scale 1 (in this node's form)."""
        return LoraAdapter(lora_a=self.u, lora_b=self.v, scale=1.0, layout=self.layout)

    def with_pair(self, pair: LoraAdapter, dtype: Any) -> LowRankWeight:
        """This weight with ``pair``'s arrays and layout, standing for a ``dtype`` array
        (an engine layout rule's output)."""
        return dataclasses.replace(
            self, u=pair.lora_a, v=pair.lora_b, layout=pair.layout,
            shape=tuple(pair.layout.weight_shape), dtype=jnp.dtype(dtype),
        )  # fmt: skip

    def engine_form(self) -> LowRankWeight:
        """The node in grouped form, as the interpreter carries it."""
        if self.grouped:
            return self
        arrays = self.pair().grouped()
        return dataclasses.replace(self, u=arrays["lora_a"], v=arrays["lora_b"], grouped=True)

    # -- the weight-kind protocol -------------------------------------------------------

    def dense(self) -> Array:
        pair = self.pair()
        if self.grouped:
            pair = pair.flattened()
        return pair.delta().astype(self.dtype)

    def apply(self, eqn: Any, rest: list) -> None:
        """Layout operations follow the pair through the engine's adapter rules (see
        ``_engine._layout_rule``); anything else decodes the weight."""
        return None

    def scanned(self) -> LowRankWeight | None:
        layout = self.layout
        if not layout.stack_axes or layout.stack_axes[0] != 0:
            return None
        kinds = layout.kinds()[1:]
        if "I" not in kinds or "O" not in kinds:
            return None
        inner = Layout.from_kinds(layout.weight_shape[1:], kinds)
        return dataclasses.replace(self, layout=inner, shape=tuple(inner.weight_shape))


jax.tree_util.register_dataclass(
    LowRankWeight, data_fields=["u", "v"], meta_fields=["layout", "dtype", "shape", "grouped"]
)


# -- compress -----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="layout")
def _factors(w: Array, layout: Layout) -> tuple[Array, Array, Array]:
    """``(U·Σ^{1/2}, σ, Σ^{1/2}·Vᵀ)`` of the grouped weight, signs made definite."""
    from jlora._combine import _definite_signs

    grouped = layout.to_grouped(w.astype(wide_float(w.dtype)))
    u, sigma, v_t = jnp.linalg.svd(grouped, full_matrices=False)
    root = jnp.sqrt(sigma)
    a, b = _definite_signs(u * root[..., None, :], root[..., :, None] * v_t)
    return a, sigma, b


def compress(
    params: Params,
    targets: Selector,
    *,
    rank: int | None = None,
    energy: float | None = None,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    dtype: Any = None,
) -> Params:
    """Replace the targeted weights by their truncated SVD, a :class:`LowRankWeight`.

    Each target's grouped form ``W (*stack, in, out)`` becomes ``U_r·Σ_r^{1/2}`` and
    ``Σ_r^{1/2}·V_rᵀ`` (one SVD per stack slice, signs made definite): the best rank-
    ``r`` approximation, whose relative Frobenius error is
    ``sqrt(Σ_{i>r} σ_i² / Σ σ_i²)``, in ``r·(in + out)`` numbers per slice.
    :func:`jlora.lora` runs the result in factored form, with or without adapters on
    the compressed weights (train a LoRA on top to distil it);
    :func:`jlora.summary` counts ``r·(in + out)``; :func:`jlora.dequantize` gives
    the dense ``U·V`` back.

    Exactly one of ``rank`` and ``energy`` chooses ``r``: ``rank`` is the same at
    every target; ``energy`` keeps per target the smallest ``r`` with
    ``Σ_{i≤r} σ_i² ≥ energy·Σ σ_i²`` (the largest any stack slice needs).

    Args:
      params: the model's params (arrays).
      targets: which leaves, in any of the forms ``LoraSpec.targets`` takes.
      rank: the rank at every target (at most ``min(in, out)``).
      energy: the share of each weight's ``Σσ²`` to keep, in ``(0, 1]``.
      fn, args, kwargs: the model function and example inputs, to learn the layout of
        weights of more than two axes (as for :func:`jlora.init`).
      dtype: the pair's dtype; default the weight's.

    Returns:
      ``params`` with a :class:`LowRankWeight` at each target.

    Raises:
      ValueError: neither or both of ``rank``/``energy``, a rank above ``min(in, out)``,
        nothing matches, or a target that is already encoded (quantized or compressed).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
      >>> small = jlora.compress(params, "w", rank=4)
      >>> jlora.summary(small, {})
      'trainable params: 0 || all params: 384 || trainable%: 0.0000'
      >>> x = jnp.ones((1, 64))
      >>> y = jlora.lora(lambda p, x: x @ p["w"])(small, {}, x)
      >>> bool(jnp.allclose(y, x @ small["w"].dense(), atol=1e-4))
      True
    """
    from jlora._extract import _check_choice, _energy_rank
    from jlora._init import _layouts
    from jlora._spec import LoraSpec

    _check_choice(rank, energy, None, what="compress", share="each weight's Σσ²")
    chosen = LoraSpec(targets=targets).select(params)
    for path, leaf in chosen:
        if is_weight_node(leaf):
            raise ValueError(
                f"compress: the weight at {path!r} is already an encoded {leaf.KIND} "
                "weight; compress the float weights (jlora.dequantize them first)"
            )
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise ValueError(
                f"compress: the weight at {path!r} is an abstract jax.ShapeDtypeStruct "
                f"({describe(leaf)}); compress needs the weights themselves"
            )
    layouts = _layouts(chosen, params, fn, args, kwargs, targets)
    nodes = {}
    for path, leaf in chosen:
        if path not in layouts:
            continue
        layout = layouts[path]
        limit = min(layout.in_features, layout.out_features)
        if rank is not None and rank > limit:
            raise ValueError(
                f"compress: rank {rank} at {path!r} exceeds min(in, out) = "
                f"min({layout.in_features}, {layout.out_features}) = {limit} for its weight "
                f"of shape {list(layout.weight_shape)}; lower rank or use energy="
            )
        u, sigma, v = _factors(jnp.asarray(leaf), layout)
        r = int(rank) if rank is not None else _energy_rank(np.asarray(sigma), float(energy))
        out_dtype = jnp.dtype(leaf.dtype if dtype is None else dtype)
        nodes[path] = LowRankWeight(
            u=u[..., :r].astype(out_dtype).reshape(layout.a_shape(r)),
            v=v[..., :r, :].astype(out_dtype).reshape(layout.b_shape(r)),
            layout=layout,
            dtype=jnp.dtype(leaf.dtype),
        )
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: nodes.get(path_str(kp), leaf), params, is_leaf=is_weight_node
    )
