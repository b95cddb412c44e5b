"""Extracting adapters from a full fine-tune: truncated SVD of ``tuned - base``.

Per targeted weight, ``D = W_tuned - W_base`` in the weight's grouped form
``(*stack, in, out)`` is factored as ``D = U·Σ·Vᵀ`` (one SVD per stack slice) and
truncated to its top ``r`` components, the best rank-``r`` approximation in the
Frobenius and spectral norms (Eckart–Young). The factors are split evenly,
``A = U_r·Σ_r^{1/2}`` and ``B = Σ_r^{1/2}·V_rᵀ``, so ``A·B`` is that approximation.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._adapter import Layout, LoraAdapter, LoraBiasAdapter, wide_float
from jlora._combine import _definite_signs
from jlora._init import _factor_dtype, _layouts
from jlora._merge import bias_path
from jlora._paths import describe, leaves_with_paths, shape_of
from jlora._spec import LoraSpec, _eligible, callable_selector
from jlora._tree import build_like
from jlora._types import Adapters, Array, Params, Path, Selector, is_int, is_real
from jlora._weights import dense_of, is_weight_node


def extract(
    base_params: Params,
    tuned_params: Params,
    *,
    rank: int | None = None,
    energy: float | None = None,
    targets: Selector | None = None,
    trainable: Selector | None = None,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    alpha: float | None = None,
    lora_bias: bool = False,
) -> Adapters:
    """Adapters that approximate a full fine-tune: a truncated SVD of ``tuned - base``.

    At each target the adapter's delta is the best rank-``r`` approximation of
    ``W_tuned - W_base`` (Eckart–Young: the Frobenius error is the root of the sum of
    the discarded squared singular values), in the weight's layout: a stacked
    (scanned) weight ``(*stack, in, out)`` gets one SVD per stack slice, all slices
    truncated to one rank ``r`` (a :class:`LoraAdapter` has one rank). The factors
    are balanced, ``A = U_r·Σ_r^{1/2}``, ``B = Σ_r^{1/2}·V_rᵀ / scale``, with the sign
    of each component made definite (the largest-magnitude entry of each column of
    ``A`` is positive), so ``jlora.merge(base_params, extract(...))`` gives
    ``base + truncated delta``.

    Exactly one of ``rank`` and ``energy`` chooses ``r``:

    - ``rank``: the same ``r`` at every target; it must not exceed ``min(in, out)`` of
      any target (a ``ValueError`` names the first that is too small: lower ``rank``,
      use ``energy``, or leave that target out).
    - ``energy``: per target, the smallest ``r`` whose leading singular values hold at
      least ``energy`` of the delta's energy, ``Σ_{i≤r} σ_i² ≥ energy·Σ_i σ_i²``; for a
      stacked weight the largest such ``r`` over its slices (every slice then keeps
      at least that share). ``energy=1.0`` keeps every component that adds energy in
      floating point (full rank for a generic delta). A delta that is exactly zero
      gets ``r = 1`` (a zero adapter).

    Which leaves are targeted:

    - ``targets=None`` (default): every floating leaf of two or more dimensions (not
      named ``bias``, ``scale`` or ``b``) whose tuned value differs from the base;
      unchanged leaves get no adapter. Changed leaves that get neither an adapter nor
      a copy (biases, norm scales, leaves ``fn`` does not use as weights) are listed
      in a warning: their change is not in the result; pass ``trainable`` to keep
      them.
    - ``targets`` given (a regex on leaf paths, a list of module names or a callable
      ``(path, leaf) -> bool``, as :class:`jlora.LoraSpec`'s ``targets``): exactly the
      leaves it selects in ``base_params``, changed or not (an unchanged one gets a zero
      adapter of the chosen rank, so trees extracted from several fine-tunes share
      their paths).

    Runs eagerly on concrete arrays (the rank is chosen on the host), not under
    ``jax.jit``. The SVD is computed in float32 (float64 when either weight is
    float64); factors have the base weight's dtype when it is floating of 32 bits or
    more, float32 otherwise (as :func:`jlora.init`).

    Args:
      base_params: the weights the fine-tune started from (arrays or quantized weight
        nodes, which are decoded).
      tuned_params: the fully fine-tuned weights: the same structure and shapes.
      rank: the rank ``r`` of every adapter, an integer >= 1.
      energy: the share of each delta's squared Frobenius norm to keep, in (0, 1].
      targets: which leaves get an adapter (see above); default every changed matrix.
      trainable: leaves copied whole from ``tuned_params`` into the adapters tree (a
        classifier head, biases, norm scales: :class:`jlora.LoraSpec`'s
        ``trainable``), in any of the forms of ``targets``; ``jlora.merge`` and
        ``jlora.lora`` use the copies in place of the base leaves. Targets take
        precedence. Copies keep the base leaf's dtype.
      fn: the model function, as for :func:`jlora.init`: needed to learn the layout of
        weights of more than two axes, or of transposed storage.
      args: example positional arguments of ``fn`` after the params.
      kwargs: example keyword arguments of ``fn``.
      alpha: the adapters' LoRA alpha; default ``r`` at each target (``scale = 1``).
        Given, each adapter gets ``scale = alpha / r`` and ``B`` is divided by it, so
        the delta is the same.
      lora_bias: also carry each target's layer-bias change, ``bias_tuned - bias_base``
        of the ``bias`` leaf beside the weight, in the adapter: a
        :class:`jlora.LoraBiasAdapter` (PEFT's ``lora_bias``, meant for exactly this),
        whose merge adds the change back. A target whose layer has no bias gets a zero
        one. Those biases then count as carried (no warning, no copy needed).

    Returns:
      The adapters tree (``base_params``' structure pruned to a :class:`LoraAdapter`
      per target, plus the ``trainable`` copies), as :func:`jlora.init` makes it.

    Raises:
      ValueError: both or neither of ``rank`` and ``energy``, a ``rank`` that is not a
        positive integer or exceeds a target's ``min(in, out)``, an ``energy`` outside
        (0, 1], a non-positive ``alpha``, trees of different structures or shapes (names
        the path and both shapes), no changed weight (default targets), or a target
        whose layout cannot be known (as :func:`jlora.init`).

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> base = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
      >>> tuned = {"w": jnp.outer(jnp.arange(4.0), jnp.ones(3)), "b": jnp.zeros(3)}
      >>> adapters = extract(base, tuned, rank=1)
      >>> adapters["w"].rank, adapters["w"].scale
      (1, 1.0)
      >>> bool(jnp.allclose(jlora.merge(base, adapters)["w"], tuned["w"], atol=1e-5))
      True
    """
    _check_choice(rank, energy, alpha)
    base, tuned = _paired_leaves(base_params, tuned_params, "extract")
    chosen, layouts = _choose(base_params, base, tuned, targets, fn, args, kwargs, "extract")
    nodes: dict[Path, Any] = {}
    carried: set[Path] = set()
    for path in chosen:
        layout = layouts[path]
        lora_a, sigma, lora_b = _balanced_factors(
            dense_of(base[path]), dense_of(tuned[path]), layout
        )
        r = _rank_for(path, layout, sigma, rank, energy)
        scale = 1.0 if alpha is None else float(alpha) / r
        lora_a, lora_b = lora_a[..., :r], lora_b[..., :r, :]
        if alpha is not None:
            lora_b = lora_b / jnp.asarray(scale, lora_b.dtype)
        dtype = _factor_dtype(base[path], None)
        nodes[path] = LoraAdapter(
            lora_a=lora_a.astype(dtype), lora_b=lora_b.astype(dtype), scale=scale, layout=layout
        )
        if lora_bias:
            nodes[path] = _with_bias(nodes[path], path, base, tuned, dtype)
            carried.add(bias_path(path))
    if trainable is not None:
        spec = LoraSpec(targets=".*", trainable=trainable)
        for path, leaf in base.items():
            if path not in nodes and path not in carried and spec.is_trainable(path, leaf):
                nodes[path] = jnp.array(
                    dense_of(tuned[path]), dtype=getattr(leaf, "dtype", None), copy=True
                )
    if targets is None:
        lost = [p for p in base if p not in nodes and p not in carried
                and _changed(base[p], tuned[p])]  # fmt: skip
        if lost:
            warnings.warn(
                f"jlora.extract: {len(lost)} changed leaves get neither an adapter nor a "
                f"copy, so their change is not in the result: {lost[:8]}"
                f"{' ...' if len(lost) > 8 else ''}. Pass trainable=<their names> to copy "
                "them (biases, norm scales), or targets= to choose the adapted leaves.",
                stacklevel=2,
            )
    return build_like(base_params, nodes)


def _with_bias(node: LoraAdapter, path: Path, base, tuned, dtype) -> LoraBiasAdapter:
    """``node`` carrying the change of its layer's bias as a lora_bias (``b = Δbias / s``)."""
    layout = node.layout
    shape = (*layout.stack_shape, layout.out_features)
    where = bias_path(path)
    if where in base:
        change = dense_of(tuned[where]).astype(jnp.float32) - dense_of(base[where]).astype(
            jnp.float32
        )
        if change.size != int(np.prod(shape)):
            raise ValueError(
                f"extract(lora_bias=True): the bias {where!r} of {path!r} has shape "
                f"{list(change.shape)}, but the weight's layer has {list(shape)} outputs"
            )
        bias = change.reshape(shape) / node.scale
    else:
        bias = jnp.zeros(shape, jnp.float32)
    return LoraBiasAdapter(**vars(node), lora_bias=bias.astype(dtype))


def spectrum(
    base_params: Params,
    tuned_params: Params,
    *,
    targets: Selector | None = None,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
) -> dict[Path, np.ndarray]:
    """The singular values of ``tuned - base`` at each target :func:`extract` would adapt.

    Use it to choose ``rank`` or ``energy`` before extracting: the relative Frobenius
    error of a rank-``r`` extraction is ``sqrt(Σ_{i>r} σ_i² / Σ_i σ_i²)``, and the
    energy it keeps is ``cumsum(σ²)[r-1] / sum(σ²)``.

    Args:
      base_params, tuned_params, targets, fn, args, kwargs: as for :func:`extract`
        (the same leaves are selected).

    Returns:
      ``{path: σ}`` in flattening order, each a numpy array ``(*stack, min(in, out))``
      (one row per stack slice of a stacked weight), descending along the last axis,
      float32 (float64 for float64 weights).

    Raises:
      ValueError: as :func:`extract`.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> base = {"w": jnp.zeros((3, 3))}
      >>> tuned = {"w": jnp.diag(jnp.array([3.0, 0.0, 4.0]))}
      >>> sigma = spectrum(base, tuned)["w"]
      >>> sigma
      array([4., 3., 0.], dtype=float32)
      >>> np.cumsum(sigma**2) / np.sum(sigma**2)  # the energy curve
      array([0.64, 1.  , 1.  ], dtype=float32)
    """
    base, tuned = _paired_leaves(base_params, tuned_params, "spectrum")
    chosen, layouts = _choose(base_params, base, tuned, targets, fn, args, kwargs, "spectrum")
    return {
        path: np.asarray(
            _singular_values(dense_of(base[path]), dense_of(tuned[path]), layouts[path])
        )
        for path in chosen
    }


# -- arguments and trees ------------------------------------------------------------------


def _check_choice(rank: Any, energy: Any, alpha: Any, what: str = "extract",
                  share: str = "each delta's energy") -> None:
    """Exactly one of ``rank`` (an integer >= 1) and ``energy`` (in (0, 1]), for
    ``jlora.<what>``; ``alpha`` None or finite and positive."""
    if (rank is None) == (energy is None):
        raise ValueError(
            f"{what}: give exactly one of rank= (the same rank at every target) and "
            f"energy= (the share of {share} to keep); found rank={rank!r}, "
            f"energy={energy!r}"
        )
    if rank is not None and (not is_int(rank) or rank < 1):
        raise ValueError(f"{what}: rank must be an integer >= 1; found {rank!r}")
    if energy is not None and (
        not is_real(energy) or not math.isfinite(float(energy)) or not 0 < float(energy) <= 1
    ):
        raise ValueError(
            f"{what}: energy must be a number in (0, 1] (e.g. 0.9 keeps 90% of Σσ²); "
            f"found {energy!r}"
        )
    if alpha is not None and (
        not is_real(alpha) or not math.isfinite(float(alpha)) or float(alpha) <= 0
    ):
        raise ValueError(
            f"extract: alpha must be a finite positive number (or None: alpha = r); "
            f"found {alpha!r}"
        )


def _paired_leaves(base_params: Params, tuned_params: Params, what: str):
    """Both trees' leaves by path, checked to have the same paths and shapes."""
    base = dict(leaves_with_paths(base_params, is_leaf=is_weight_node))
    tuned = dict(leaves_with_paths(tuned_params, is_leaf=is_weight_node))
    for mine, other, name, other_name in (
        (base, tuned, "base_params", "tuned_params"),
        (tuned, base, "tuned_params", "base_params"),
    ):
        missing = [p for p in mine if p not in other]
        if missing:
            raise ValueError(
                f"{what}: {name} has a leaf at {missing[0]!r} ({describe(mine[missing[0]])}) "
                f"that {other_name} lacks ({len(missing)} such paths): both must have the "
                "same structure (the fine-tune's params before and after training)"
            )
    for path, leaf in base.items():
        if shape_of(leaf) != shape_of(tuned[path]):
            raise ValueError(
                f"{what}: the leaf at {path!r} is {describe(leaf)} in base_params but "
                f"{describe(tuned[path])} in tuned_params: shapes must match"
            )
        for which, value in (("base_params", leaf), ("tuned_params", tuned[path])):
            if isinstance(value, jax.core.Tracer):
                raise ValueError(
                    f"{what}: {which} at {path!r} is traced; it chooses ranks from "
                    "concrete values, so call it outside jax.jit"
                )
            if isinstance(value, jax.ShapeDtypeStruct):
                raise ValueError(
                    f"{what}: {which} at {path!r} is an abstract jax.ShapeDtypeStruct; "
                    "it needs the weights themselves"
                )
    return base, tuned


def _changed(base_leaf: Any, tuned_leaf: Any) -> bool:
    if not hasattr(base_leaf, "dtype") or not hasattr(tuned_leaf, "dtype"):
        return base_leaf is not tuned_leaf and base_leaf != tuned_leaf
    return not np.array_equal(np.asarray(dense_of(base_leaf)), np.asarray(dense_of(tuned_leaf)))


def _choose(base_params, base, tuned, targets, fn, args, kwargs, what):
    """The target paths (flattening order) and their layouts."""
    if targets is None:
        candidates = [
            (path, leaf)
            for path, leaf in base.items()
            if _eligible(leaf, path) and _changed(leaf, tuned[path])
        ]
        if not candidates:
            raise ValueError(
                f"{what}: tuned_params equals base_params at every floating leaf of two "
                "or more dimensions (biases and norm scales aside): no weight changed. "
                "Name the leaves with targets= to extract them anyway."
            )
        selector: Selector = ".*"
    else:
        candidates = LoraSpec(targets=targets).select(base_params)
        selector = targets
    if fn is None:
        for path, leaf in candidates:
            if len(shape_of(leaf)) != 2 and not isinstance(getattr(leaf, "layout", None), Layout):
                raise ValueError(
                    f"{what}: target {path!r} is a {describe(leaf)} leaf: for weights of "
                    "more than two axes jlora learns which axes are input, output and "
                    "stack axes from how the model uses them. Pass fn=<the model "
                    f"function> and args=<example inputs> to {what}, or leave it out "
                    "with targets="
                )
    layouts = _layouts(candidates, base_params, fn, args, kwargs, selector)
    chosen = [path for path, _ in candidates if path in layouts]
    if not chosen:
        raise ValueError(
            f"{what}: fn uses none of the selected leaves {[p for p, _ in candidates][:8]} "
            "as a matmul, convolution or lookup weight"
        )
    unused = [path for path, _ in candidates if path not in layouts]
    if unused and targets is not None and not callable_selector(targets):
        warnings.warn(
            f"jlora.{what}: {len(unused)} leaves match targets but fn never uses them as a "
            f"matmul, convolution or lookup weight, so they get no adapter: {unused[:8]}",
            stacklevel=3,
        )
    return chosen, layouts


# -- the factorization --------------------------------------------------------------------


def _grouped_delta(base_w: Array, tuned_w: Array, layout: Layout) -> Array:
    """``tuned - base`` as ``(*stack, in, out)``, in float32 or float64."""
    dtype = wide_float(base_w.dtype, tuned_w.dtype)
    return layout.to_grouped(tuned_w.astype(dtype) - base_w.astype(dtype))


@functools.partial(jax.jit, static_argnames="layout")
def _balanced_factors(base_w: Array, tuned_w: Array, layout: Layout) -> tuple[Array, ...]:
    """Every SVD component of ``tuned - base`` (grouped), split evenly:
    ``(U·Σ^{1/2}, σ, Σ^{1/2}·Vᵀ)``, signs made definite (per component, so truncating
    keeps them). One compilation per shape and layout, whatever the rank kept."""
    u, sigma, v_t = jnp.linalg.svd(_grouped_delta(base_w, tuned_w, layout), full_matrices=False)
    root = jnp.sqrt(sigma)
    lora_a, lora_b = _definite_signs(u * root[..., None, :], root[..., :, None] * v_t)
    return lora_a, sigma, lora_b


@functools.partial(jax.jit, static_argnames="layout")
def _singular_values(base_w: Array, tuned_w: Array, layout: Layout) -> Array:
    return jnp.linalg.svd(_grouped_delta(base_w, tuned_w, layout), compute_uv=False)


def _rank_for(path: Path, layout: Layout, sigma: Array, rank: int | None,
              energy: float | None) -> int:
    limit = min(layout.in_features, layout.out_features)
    if rank is not None:
        if rank > limit:
            raise ValueError(
                f"extract: rank {rank} at {path!r} exceeds min(in, out) = "
                f"min({layout.in_features}, {layout.out_features}) = {limit} for its weight "
                f"of shape {list(layout.weight_shape)}; lower rank, choose ranks per target "
                "with energy=, or leave this target out with targets="
            )
        return int(rank)
    return _energy_rank(np.asarray(sigma), float(energy))


def _energy_rank(sigma: np.ndarray, energy: float) -> int:
    """The smallest ``r`` with ``Σ_{i≤r} σ_i² ≥ energy·Σσ²`` in every slice (the max over
    the stack slices of ``sigma``, ``(*stack, k)``); 1 for an all-zero spectrum."""
    power = np.square(sigma.astype(np.float64)).reshape(-1, sigma.shape[-1])
    kept = np.cumsum(power, axis=-1)
    short = kept < energy * kept[:, -1:]  # prefixes holding less than the target share
    return int(max(1, int(np.max(np.sum(short, axis=-1))) + 1))
