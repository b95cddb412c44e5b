"""Combining several adapters into one, as PEFT's ``add_weighted_adapter`` does."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._adapter import DoraAdapter, LoraAdapter, is_adapter, wide_float
from jlora._paths import describe, path_str
from jlora._tree import adapter_items
from jlora._types import Adapters, Array, Path

METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Every ``method`` :func:`combine` knows, as PEFT's ``combination_type`` names them."""

# Methods that mix the A's and the B's entrywise (each side on its own): equal ranks.
FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # these need a density
RANDOM = ("dare_linear", "dare_ties")  # these need a key
SIGN_ELECTING = ("ties", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def combine(
    adapters_list: Sequence[Adapters],
    weights: Sequence[float],
    *,
    method: str = "linear",
    density: float | None = None,
    rank: int | None = None,
    key: Array | None = None,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
) -> Adapters:
    """One adapters tree from several, weighted: PEFT's ``add_weighted_adapter``.

    Every tree must hold plain LoRA adapters at the same paths with the same layouts.
    Adapter ``i`` at a path has ``delta_i = s_i·A_i·B_i``; with ``w_i = weights[i]``:

    - ``"cat"``: exact. ``A = [w_1·s_1·A_1 | w_2·s_2·A_2 | ...]`` along the rank and
      ``B = [B_1; B_2; ...]``, so ``A·B = Σ w_i·delta_i`` at rank ``Σ r_i`` (per path).
    - ``"svd"``: the best rank-``rank`` approximation of ``Σ w_i·delta_i``, computed
      without forming it: QR of ``Ac = [w_i·s_i·A_i]`` (in × R) and of ``Bcᵀ``, SVD of
      the small R×R core; exact (not randomized), ``O((in + out)·R²)`` per matrix. As
      in PEFT the singular values go to ``B`` (``A`` has orthonormal columns), so the
      factors are PEFT's up to the sign of each component; the sign is made definite
      (each column of ``A`` has its largest-magnitude entry positive), which fixes
      what ``svd_clamp`` sees. Components beyond what ``Σ w_i·delta_i`` can hold
      (``rank > min(R, in, out)``) are zero.
    - ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``,
      ``"magnitude_prune"``: PEFT's task-arithmetic merges applied to the A's and to
      the B's separately, with A_i weighted by ``sign(w_i·s_i)·sqrt|w_i·s_i|`` and B_i
      by ``sqrt|w_i·s_i|`` (the scale is split between both sides, as PEFT does).
      Inexact by design (``A·B`` has cross terms ``A_i·B_j``) and only for equal ranks.
      ``magnitude_prune`` keeps each factor's top ``density`` share of entries by
      magnitude (per matrix) and sums; ``ties`` prunes so, elects a sign per entry from
      the pruned, unweighted factors (``"total"``: sign of their sum, ``"frequency"``:
      of their count of signs; a zero vote elects +) and averages the weighted entries of that
      sign. The ``dare_`` methods keep each entry with probability ``density`` instead
      and divide by ``density``, then sum (``dare_linear``) or elect and average
      (``dare_ties``). ``density >= 1`` prunes nothing.

    As in PEFT, a single adapter is always combined linearly (``method``, ``rank``,
    ``density`` and ``svd_clamp`` then change nothing; the delta is ``w·delta``
    exactly), and the ``"svd"`` rank defaults to the largest rank of any adapter at
    any path.

    Each result node has ``scale=1.0`` (PEFT's ``alpha = r``), the layout of its path
    and the first adapter's dropout; factors have the first adapter's dtypes (the work
    is done in float32 or wider). Stacked layouts (``(*stack, in, r)`` factors) are
    combined per matrix, batched over the stack axes. DoRA adapters are refused: PEFT
    runs ``add_weighted_adapter`` on them without complaint, but the result keeps the
    magnitude vector computed when the new adapter was initialized, before its
    factors were overwritten, so it matches neither the inputs nor the combination.

    Args:
      adapters_list: adapters trees (as :func:`jlora.init` makes them) targeting the
        same paths with the same layouts.
      weights: one Python float per tree; may be negative (they are static: each new
        set of weights compiles the per-shape work again).
      method: one of ``METHODS``.
      density: the share of entries kept, in (0, 1]; required by the pruning methods.
      rank: the ``"svd"`` result's rank (default: the largest input rank).
      key: a JAX PRNG key, required by ``"dare_linear"`` and ``"dare_ties"``; the keep
        mask of tree ``i``'s A (B) at the ``p``-th path in flattening order comes from
        ``jax.random.split(key, (n_paths, 2, n_trees))[p, 0 (1), i]``.
      majority_sign_method: ``"total"`` or ``"frequency"``, for ``"ties"`` and
        ``"dare_ties"``.
      svd_clamp: for ``"svd"``, a quantile ``q`` in [0, 1]: per matrix, ``h`` is the
        ``q``-quantile of all entries of ``B`` and ``A`` together and both are clipped
        to ``[-h, h]``, as PEFT's ``svd_clamp``.

    Returns:
      A new adapters tree with the first tree's structure; the inputs are unchanged.

    Raises:
      ValueError: an empty list, ``len(weights) != len(adapters_list)``, trees with
        different paths, layouts or malformed factors, an unknown ``method`` or
        ``majority_sign_method``, a ``density`` missing or outside (0, 1], a missing
        ``key``, unequal ranks at a path for the factorwise methods, a bad ``rank`` or
        ``svd_clamp``, or an argument the method does not use; each names the path.
      TypeError: a DoRA (or other non-LoRA) adapter, a trainable base copy in a tree,
        or a weight that is not a real number.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> from jlora._combine import combine
      >>> k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
      >>> layout = jlora.Layout.dense((6, 4))
      >>> def adapter(ka, kb, scale):
      ...     a, b = jax.random.normal(ka, (6, 2)), jax.random.normal(kb, (2, 4))
      ...     return {"w": jlora.LoraAdapter(a, b, scale, layout)}
      >>> one, two = adapter(k1, k2, 2.0), adapter(k3, k4, 0.5)
      >>> both = combine([one, two], [0.7, -0.3], method="cat")
      >>> both["w"].rank, both["w"].scale
      (4, 1.0)
      >>> target = 0.7 * one["w"].delta() - 0.3 * two["w"].delta()
      >>> bool(jnp.allclose(both["w"].delta(), target, atol=1e-5))
      True
    """
    weights = _check_arguments(
        adapters_list, weights, method, density, rank, key, majority_sign_method, svd_clamp
    )
    columns = _nodes_by_path(adapters_list, method)
    if len(adapters_list) == 1:
        method = "linear"  # PEFT's rule; exact for one adapter
    if method == "svd" and rank is None:
        rank = max(node.rank for nodes in columns.values() for node in nodes)
    path_keys = None
    if method in RANDOM and density < 1:
        path_keys = jax.random.split(key, (len(columns), 2, len(adapters_list)))
    combined = {}
    for index, (path, nodes) in enumerate(columns.items()):
        keys = None if path_keys is None else path_keys[index]
        combined[path] = _combine_nodes(
            nodes, weights, method, density, rank, keys, majority_sign_method, svd_clamp
        )
    return jax.tree_util.tree_map_with_path(
        lambda key_path, node: combined[path_str(key_path)], adapters_list[0], is_leaf=is_adapter
    )


# -- checking the arguments and the trees ----------------------------------------------


def _check_arguments(adapters_list, weights, method, density, rank, key, sign_method, clamp):
    """The weights as floats, after checking every argument against ``method``."""
    if isinstance(adapters_list, dict) or is_adapter(adapters_list):
        raise TypeError(
            "combine: adapters_list must be a sequence of adapters trees, found a single "
            f"{type(adapters_list).__name__}; pass [adapters_1, adapters_2, ...]"
        )
    if len(adapters_list) == 0:
        raise ValueError("combine: adapters_list is empty; pass at least one adapters tree")
    if len(weights) != len(adapters_list):
        raise ValueError(
            f"combine: expected one weight per adapters tree ({len(adapters_list)}), "
            f"found {len(weights)} weights"
        )
    floats = []
    for i, weight in enumerate(weights):
        if not isinstance(weight, (int, float)) and not (
            hasattr(weight, "shape") and tuple(weight.shape) == ()
        ):
            raise TypeError(f"combine: weights[{i}] must be a real number, found {weight!r}")
        floats.append(float(weight))
    if method not in METHODS:
        raise ValueError(f"combine: unknown method {method!r}; expected one of {list(METHODS)}")
    if sign_method not in SIGN_METHODS:
        raise ValueError(
            f"combine: majority_sign_method must be one of {list(SIGN_METHODS)}, found "
            f"{sign_method!r}"
        )
    if method in PRUNING:
        if density is None:
            raise ValueError(
                f"combine(method={method!r}) needs density, the share of entries kept, in (0, 1]"
            )
        if not 0 < density <= 1:
            raise ValueError(
                f"combine(method={method!r}): density must be in (0, 1], found {density}"
            )
    elif density is not None:
        raise ValueError(
            f"combine: density applies to the pruning methods {list(PRUNING)}, not "
            f"method={method!r}"
        )
    if method in RANDOM and key is None:
        raise ValueError(
            f"combine(method={method!r}) draws random keep masks: pass key=jax.random.key(...)"
        )
    if method != "svd" and (rank is not None or clamp is not None):
        raise ValueError(
            f"combine: rank and svd_clamp apply to method='svd' only, not method={method!r} "
            "(whose result rank is fixed by the inputs)"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"combine: rank must be a positive int, found {rank!r}")
    if clamp is not None and not 0 <= clamp <= 1:
        raise ValueError(f"combine: svd_clamp is a quantile in [0, 1], found {clamp}")
    return floats


def _nodes_by_path(adapters_list, method) -> dict[Path, list[LoraAdapter]]:
    """Each path's adapter from every tree, checking kinds, paths, layouts and ranks."""
    columns: dict[Path, list[LoraAdapter]] = {}
    for i, tree in enumerate(adapters_list):
        items = adapter_items(tree)
        for path, node in items:
            _check_kind(i, path, node)
        paths = [path for path, _ in items]
        if i == 0:
            columns = {path: [node] for path, node in items}
            if not columns:
                raise ValueError("combine: adapters_list[0] holds no adapters")
            continue
        if set(paths) != set(columns):
            missing = [p for p in columns if p not in set(paths)]
            extra = [p for p in paths if p not in columns]
            raise ValueError(
                f"combine: adapters_list[{i}] targets other paths than adapters_list[0]: "
                f"missing {missing[:5]}, extra {extra[:5]}; all trees must adapt the same "
                "weights"
            )
        for path, node in items:
            columns[path].append(node)
    for path, nodes in columns.items():
        _check_path(path, nodes, method)
    return columns


def _check_kind(index: int, path: Path, node: Any) -> None:
    where = f"adapters_list[{index}] at {path!r}"
    if isinstance(node, DoraAdapter):
        raise TypeError(
            f"combine: {where} is a DoRA adapter; combining DoRA is not supported (its "
            "magnitude vector has no weighted combination; PEFT keeps a freshly "
            "initialized one). Combine plain LoRA adapters."
        )
    if not isinstance(node, LoraAdapter):
        raise TypeError(
            f"combine: {where} holds {describe(node)}, not an adapter node (a trainable "
            "base copy?); combine takes trees of LoRA adapters only: drop such leaves first"
        )
    if type(node) is not LoraAdapter:
        raise TypeError(
            f"combine: {where} is a {node.KIND!r} adapter ({type(node).__name__}); "
            "only plain LoRA adapters can be combined"
        )


def _check_path(path: Path, nodes: list[LoraAdapter], method: str) -> None:
    for i, node in enumerate(nodes):
        expected = node.expected_shapes()
        found = {name: tuple(array.shape) for name, array in node.arrays().items()}
        if found != expected:
            raise ValueError(
                f"combine: adapters_list[{i}] at {path!r} has factor shapes {found}; its "
                f"layout needs {expected}"
            )
        if node.layout != nodes[0].layout:
            raise ValueError(
                f"combine: at {path!r} adapters_list[0] has {nodes[0].layout} but "
                f"adapters_list[{i}] has {node.layout}; combined adapters must share "
                "each weight's layout"
            )
    ranks = [node.rank for node in nodes]
    if method in FACTORWISE and len(nodes) > 1 and len(set(ranks)) > 1:
        raise ValueError(
            f"combine(method={method!r}) mixes the A's and B's entrywise, so it needs equal "
            f"ranks, but at {path!r} the ranks are {ranks}; use method='cat' (exact) or "
            "'svd'"
        )


# -- one path ----------------------------------------------------------------------


def _combine_nodes(nodes, weights, method, density, rank, keys, sign_method, clamp):
    """The combined adapter for one path's ``nodes`` (one per tree)."""
    first = nodes[0]
    masks = None
    if keys is not None:  # DARE's masks, outside the compiled part: every A's, then every B's
        masks = tuple(
            tuple(
                keep_mask(keys[side, i], density, node.arrays()[name].shape)
                for i, node in enumerate(nodes)
            )
            for side, name in enumerate(("lora_a", "lora_b"))
        )
    lora_a, lora_b = _combine_factors(
        tuple(node.lora_a for node in nodes),
        tuple(node.lora_b for node in nodes),
        tuple(w * node.scale for w, node in zip(weights, nodes)),  # w_i·s_i
        masks,
        method=method,
        density=density,
        rank=rank,
        sign_method=sign_method,
        clamp=clamp,
    )
    return LoraAdapter(lora_a, lora_b, scale=1.0, layout=first.layout, dropout=first.dropout)


@functools.partial(
    jax.jit, static_argnames=("scaled", "method", "density", "rank", "sign_method", "clamp")
)
def _combine_factors(a_list, b_list, scaled, masks, *, method, density, rank, sign_method, clamp):
    """``(lora_a, lora_b)`` of one path, in the first adapter's dtypes (one compile per shape)."""
    out_dtypes = a_list[0].dtype, b_list[0].dtype
    dtype = wide_float(*(x.dtype for x in (*a_list, *b_list)))
    a_list = [a.astype(dtype) for a in a_list]
    b_list = [b.astype(dtype) for b in b_list]
    if method == "cat":
        lora_a = jnp.concatenate([s * a for s, a in zip(scaled, a_list)], axis=-1)
        lora_b = jnp.concatenate(b_list, axis=-2)
    elif method == "svd":
        lora_a, lora_b = _svd_factors(a_list, b_list, scaled, rank, clamp)
    else:
        a_weights = [(1.0 if s >= 0 else -1.0) * math.sqrt(abs(s)) for s in scaled]
        b_weights = [math.sqrt(abs(s)) for s in scaled]
        a_masks, b_masks = (None, None) if masks is None else masks
        lora_a = _merge_factor(a_list, a_weights, method, density, sign_method, a_masks)
        lora_b = _merge_factor(b_list, b_weights, method, density, sign_method, b_masks)
    return lora_a.astype(out_dtypes[0]), lora_b.astype(out_dtypes[1])


def _merge_factor(tensors, weights, method, density, sign_method, masks):
    """PEFT's task-arithmetic merge of one side's factors (all A's, or all B's)."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif masks is not None:  # DARE with density < 1
        tensors = [_random_prune(t, density, mask) for t, mask in zip(tensors, masks)]
    stacked = jnp.stack(tensors)  # (n, *stack, rows, cols)
    w = jnp.asarray(weights, stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
    weighted = stacked * w
    if method not in SIGN_ELECTING:
        return jnp.sum(weighted, axis=0)
    sign = jnp.sign(stacked)
    votes = jnp.sum(stacked if sign_method == "total" else sign, axis=0)
    one = jnp.ones((), stacked.dtype)
    agrees = sign == jnp.where(votes >= 0, one, -one)  # zeros (pruned) never agree
    count = jnp.sum(agrees, axis=0).astype(stacked.dtype)
    return jnp.sum(jnp.where(agrees, weighted, 0), axis=0) / jnp.maximum(count, one)


def _magnitude_prune(matrix: Array, density: float) -> Array:
    """Keep the ``int(density·size)`` largest-magnitude entries of each matrix (last two axes)."""
    if density >= 1:
        return matrix
    flat = matrix.reshape((*matrix.shape[:-2], -1))
    kept = int(density * flat.shape[-1])
    if kept == 0:
        return jnp.zeros_like(matrix)
    _, indices = jax.lax.top_k(jnp.abs(flat), kept)
    mask = jnp.put_along_axis(jnp.zeros(flat.shape, bool), indices, True, axis=-1, inplace=False)
    return jnp.where(mask, flat, 0).reshape(matrix.shape)


def keep_mask(key: Array, density: float, shape: tuple[int, ...]) -> Array:
    """DARE's random keep mask: each entry ``True`` with probability ``density``."""
    return jax.random.bernoulli(key, density, shape)


def _random_prune(tensor: Array, density: float, mask: Array) -> Array:
    """DARE: keep the entries ``mask`` marks, divided by ``density``."""
    return jnp.where(mask, tensor, 0) / jnp.asarray(density, tensor.dtype)


def _svd_factors(a_list, b_list, scaled, rank, clamp):
    """``(A, B)`` of the best rank-``rank`` approximation of ``Σ scaled_i·A_i·B_i``.

    Never forms the dense sum: with ``Ac = [scaled_i·A_i] = Qa·Ra`` and
    ``Bcᵀ = [B_i]ᵀ = Qb·Rb``, ``Ac·Bc = Qa·(Ra·Rbᵀ)·Qbᵀ`` and the SVD of the small
    core ``Ra·Rbᵀ = U·Σ·Vᵀ`` gives ``A = Qa·U``, ``B = Σ·(Qb·V)ᵀ``.
    """
    a_cat = jnp.concatenate([s * a for s, a in zip(scaled, a_list)], axis=-1)  # (*S, in, R)
    b_cat = jnp.concatenate(b_list, axis=-2)  # (*S, R, out)
    q_a, r_a = jnp.linalg.qr(a_cat)  # (*S, in, ka), (*S, ka, R)
    q_b, r_b = jnp.linalg.qr(jnp.swapaxes(b_cat, -1, -2))  # (*S, out, kb), (*S, kb, R)
    core = r_a @ jnp.swapaxes(r_b, -1, -2)  # (*S, ka, kb)
    u, sigma, v_t = jnp.linalg.svd(core, full_matrices=False)
    kept = min(rank, sigma.shape[-1])
    lora_a = q_a @ u[..., :kept]  # (*S, in, kept), orthonormal columns
    lora_b = sigma[..., :kept, None] * (v_t[..., :kept, :] @ jnp.swapaxes(q_b, -1, -2))
    lora_a, lora_b = _definite_signs(lora_a, lora_b)
    if clamp is not None:
        lora_a, lora_b = _clamp(lora_a, lora_b, clamp)
    if kept < rank:  # more than Σ w_i·delta_i can hold: zero components
        stack = lora_a.shape[:-2]
        lora_a = jnp.concatenate(
            [lora_a, jnp.zeros((*stack, lora_a.shape[-2], rank - kept), lora_a.dtype)], axis=-1
        )
        lora_b = jnp.concatenate(
            [lora_b, jnp.zeros((*stack, rank - kept, lora_b.shape[-1]), lora_b.dtype)], axis=-2
        )
    return lora_a, lora_b


def _definite_signs(lora_a: Array, lora_b: Array) -> tuple[Array, Array]:
    """Flip each rank component so that its column of A has its largest-|.| entry > 0."""
    largest = jnp.argmax(jnp.abs(lora_a), axis=-2)  # (*S, r)
    pivot = jnp.take_along_axis(lora_a, largest[..., None, :], axis=-2)[..., 0, :]
    one = jnp.ones((), lora_a.dtype)
    sign = jnp.where(pivot < 0, -one, one)
    return lora_a * sign[..., None, :], lora_b * sign[..., :, None]


def _clamp(lora_a: Array, lora_b: Array, quantile: float) -> tuple[Array, Array]:
    """PEFT's ``svd_clamp``: clip both factors to ``±h``, ``h`` the quantile of their entries."""
    stack = lora_a.shape[:-2]
    entries = jnp.concatenate([lora_b.reshape((*stack, -1)), lora_a.reshape((*stack, -1))], -1)
    high = jnp.quantile(entries, quantile, axis=-1)[..., None, None]
    # min(max(x, -h), h): with h < 0 every entry becomes h, as torch.clamp does.
    return tuple(jnp.minimum(jnp.maximum(x, -high), high) for x in (lora_a, lora_b))
