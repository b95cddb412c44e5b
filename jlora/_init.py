"""Creating adapters: target selection, layouts, and the initial factors."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._adapter import DoraAdapter, Layout, LoraAdapter, LoraBiasAdapter, wide_float
from jlora._layout import discover
from jlora._loftq import loftq_factors, loftq_iterations
from jlora._paths import describe, leaves_with_paths, shape_of
from jlora._spec import LoraSpec, callable_selector
from jlora._tree import build_like
from jlora._types import Adapters, Array, Params, Path
from jlora._weights import dense_of, is_weight_node


def init(
    spec: LoraSpec,
    params: Params,
    key: Array,
    *,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    dtype: Any = None,
) -> Adapters:
    """Create fresh adapters (random A, zero B) for the leaves ``spec`` targets.

    With ``fn`` and example ``args`` (arrays or ``jax.ShapeDtypeStruct`` s) the layout of
    every target (stack, input and output axes) is learned from how
    ``fn(params, *args, **kwargs)`` uses it; this is needed for kernels of more than two
    axes and for transposed storage (Hugging Face GPT-2). Without ``fn`` a 2-D leaf is
    read as ``(in, out)``, the Flax convention.

    Args:
      spec: what to adapt and how.
      params: the frozen base (arrays or ``jax.ShapeDtypeStruct`` s).
      key: a PRNG key for A.
      fn: the model function, as it will be passed to :func:`jlora.lora`.
      args: example positional arguments of ``fn`` after ``params``.
      kwargs: example keyword arguments of ``fn``.
      dtype: factor dtype; default the weight's dtype, float32 for 16-bit weights.

    Returns:
      The adapters tree: ``params``' structure with a :class:`LoraAdapter` at each
      target (and a copy of each ``spec.trainable`` leaf), other branches pruned.

    Raises:
      ValueError: nothing matches, a rank is out of range, a target is not floating
        point, or an N-D target's layout cannot be learned.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}
      >>> adapters = init(LoraSpec(rank=2, targets=["dense"]), params, jax.random.key(0))
      >>> adapters["dense"]["kernel"].lora_a.shape, adapters["dense"]["kernel"].lora_b.shape
      ((6, 2), (2, 4))
    """
    return _init(spec, params, key, fn=fn, args=args, kwargs=kwargs, dtype=dtype)[0]


def _init(
    spec: LoraSpec,
    params: Params,
    key: Array,
    *,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    dtype: Any = None,
    quantization: tuple[int, bool] = (64, True),
) -> tuple[Adapters, dict[Path, Any]]:
    """:func:`init`, and the NF4 bases a LoftQ init made (``{path: QuantizedWeight}``),
    encoded with ``quantization = (block_size, double_quant)``."""
    tokens = spec.token_targets(params)
    no_targets = isinstance(spec.targets, tuple) and not spec.targets
    targets = [] if tokens and no_targets else spec.select(params)
    both = [path for path, _ in targets if path in tokens]
    if both:
        raise ValueError(
            f"{both[0]!r} is both a LoRA target and a trainable_token_indices embedding; a "
            "weight takes one of them: exclude it from the targets (LoraSpec.exclude)"
        )
    layouts = _layouts(targets, params, fn, args, kwargs, spec.targets)
    if fn is not None and targets and not callable_selector(spec.targets):
        # Matched by name or regex but never used as a weight (a stacked bias or norm
        # scale of a scanned model): not a target.
        unused = [path for path, _ in targets if path not in layouts]
        targets = [(path, leaf) for path, leaf in targets if path in layouts]
        if not targets:
            raise ValueError(
                f"LoraSpec.targets={spec.targets!r} matches {unused[:8]}, but fn uses none "
                "of them as a matmul, convolution or lookup weight"
            )
        if unused:
            warnings.warn(
                f"jlora.init: {len(unused)} leaves match LoraSpec.targets but fn never "
                f"uses them as a matmul, convolution or lookup weight, so they get no "
                f"adapter: {unused[:8]}{' ...' if len(unused) > 8 else ''}",
                stacklevel=2,
            )
    keys = jax.random.split(key, len(targets))
    nodes: dict[Path, Any] = {}
    bases: dict[Path, Any] = {}
    for (path, leaf), leaf_key in zip(targets, keys):
        layout = layouts[path]
        rank = spec.rank_for(path)
        limit = min(layout.in_features, layout.out_features)
        if rank > limit:
            raise ValueError(
                f"rank {rank} at {path!r} exceeds min(in, out) = min({layout.in_features}, "
                f"{layout.out_features}) = {limit} for its weight of shape "
                f"{list(layout.weight_shape)}; lower LoraSpec.rank or set rank_pattern"
            )
        factor_dtype = _factor_dtype(leaf, dtype)
        if spec.experts:
            nodes[path] = _mixture(spec, path, leaf_key, layout, rank, factor_dtype)
            continue
        scale = spec.scale_for(path)
        if loftq_iterations(spec.init) is not None:
            bases[path], lora_a, lora_b = _loftq(spec.init, leaf, path, layout, rank, scale,
                                                 factor_dtype, quantization)  # fmt: skip
        else:
            lora_a, lora_b = _init_factors(spec.init, leaf_key, leaf, path, layout, rank, scale,
                                           factor_dtype)  # fmt: skip
        node = LoraAdapter(
            lora_a=lora_a,
            lora_b=lora_b,
            scale=scale,
            layout=layout,
            dropout=float(spec.dropout),
        )
        if spec.lora_bias:
            bias = jnp.zeros((*layout.stack_shape, layout.out_features), factor_dtype)
            node = LoraBiasAdapter(**vars(node), lora_bias=bias)
        if spec.dora:
            # The magnitude starts at the column norms of the weight the adapter starts
            # from: W itself, or LoftQ's NF4 base plus its update.
            start = node.merge_into(bases[path].dense()) if path in bases else leaf
            node = DoraAdapter(**vars(node), magnitude=_column_norms(start, layout, factor_dtype))
        nodes[path] = node
    if tokens:
        from jlora._tokens import tokens_adapter

        leaves = dict(leaves_with_paths(params, is_leaf=is_weight_node))
        token_layouts = _layouts([(p, leaves[p]) for p in tokens], params, fn, args, kwargs,
                                 "|".join(map(re.escape, tokens)))  # fmt: skip
        for path, indices in tokens.items():
            nodes[path] = tokens_adapter(path, leaves[path], token_layouts[path], indices,
                                         _factor_dtype(leaves[path], dtype))  # fmt: skip
    if spec.share_router:
        nodes.update(_share_routers({path: nodes[path] for path, _ in targets}))
    for path, leaf in leaves_with_paths(params, is_leaf=is_weight_node):
        if path not in nodes and spec.is_trainable(path, leaf):
            nodes[path] = jnp.array(leaf, copy=True)
    return build_like(params, nodes), bases


def _layouts(targets, params, fn, args, kwargs, spec_targets) -> dict[Path, Layout]:
    if fn is not None:
        found = discover(fn, params, [p for p, _ in targets], args, kwargs)
        if not callable_selector(spec_targets):
            return found
    else:
        found = {}
    layouts = {}
    for path, leaf in targets:
        shape = shape_of(leaf)
        own = getattr(leaf, "layout", None)  # a quantized weight knows its layout
        if path in found:
            layouts[path] = found[path]
        elif isinstance(own, Layout) and not getattr(leaf, "ops", ()):
            layouts[path] = own
        elif len(shape) == 2:
            layouts[path] = Layout.dense(shape)
        elif fn is None:
            raise ValueError(
                f"target {path!r} is a {describe(leaf)} leaf: for weights of more than two "
                "axes jlora learns which axes are input, output and stack axes from how "
                "the model uses them. Pass fn=<the model function> and args=<example "
                "inputs> to jlora.init."
            )
        else:
            raise ValueError(
                f"could not learn the layout of {path!r} ({describe(leaf)}) from fn: it "
                "is never used by a matmul, convolution or row lookup in the traced "
                "computation. Exclude it from the targets."
            )
    return layouts


def _mixture(spec: LoraSpec, path: Path, key: Array, layout: Layout, rank: int, dtype: Any):
    """``spec.experts`` fresh experts (random A, zero B) and a router, as a torch
    ``nn.Linear`` gate starts: ``U(-1/sqrt(in), 1/sqrt(in))``."""
    from jlora._mixture import MixtureAdapter

    experts = spec.experts
    a_key, router_key = jax.random.split(key)
    a = jnp.stack(
        [_init_a(spec.init, k, layout, rank, dtype) for k in jax.random.split(a_key, experts)],
        axis=len(layout.stack_axes),
    )
    bound = 1.0 / math.sqrt(layout.in_features)
    router_shape = MixtureAdapter.field_shape("router", layout, rank, E=experts)
    router = jax.random.uniform(router_key, router_shape, jnp.float32, -bound, bound)
    return MixtureAdapter(
        lora_a=a,
        lora_b=jnp.zeros(MixtureAdapter.field_shape("lora_b", layout, rank, E=experts), dtype),
        scale=spec.scale_for(path),
        layout=layout,
        dropout=float(spec.dropout),
        router=router.astype(dtype),
        experts=experts,
        top_k=int(spec.top_k),
    )


def _layer_of(path: Path) -> Path:
    """The layer a target belongs to: the parent of its module (``.../query/kernel``
    and ``.../value/kernel`` are in one layer; an NNX ``/value`` suffix is dropped)."""
    parts = path.split("/")
    if len(parts) > 2 and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts[:-2])


def _share_routers(mixtures: dict[Path, Any]) -> dict[Path, Any]:
    """Per layer, the first mixture keeps its router; the others borrow it."""
    from jlora._mixture import SharedRouterMixture

    owners: dict[Path, Path] = {}
    shared = {}
    for path, node in mixtures.items():
        owner = owners.setdefault(_layer_of(path), path)
        if owner == path:
            continue
        first = mixtures[owner]
        if first.router.shape != node.router.shape:
            raise ValueError(
                f"LoraSpec(share_router=True): {path!r} and {owner!r} are in one layer but "
                f"need routers of shapes {list(node.router.shape)} and "
                f"{list(first.router.shape)} (inputs of other widths); exclude one or do not "
                "share the router"
            )
        fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
        fields.pop("router")
        shared[path] = SharedRouterMixture(**fields, router_of=owner)
    return shared


def _column_norms(leaf: Any, layout: Layout, dtype: Any) -> Array:
    """DoRA's initial magnitude: ``‖W‖`` over the input axes, ``(*stack, out_features)``."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ValueError(
            "LoraSpec(dora=True) needs the weights themselves to start the magnitude at "
            "their column norms; jlora.init got an abstract jax.ShapeDtypeStruct"
        )
    weight = dense_of(leaf)
    grouped = layout.to_grouped(weight.astype(wide_float(weight.dtype)))
    return jnp.sqrt(jnp.sum(grouped * grouped, axis=-2)).astype(dtype)


def _factor_dtype(leaf: Any, dtype: Any) -> Any:
    if dtype is not None:
        return jnp.dtype(dtype)
    leaf_dtype = jnp.dtype(leaf.dtype)
    return leaf_dtype if leaf_dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def _loftq(kind: str, leaf: Any, path: Path, layout: Layout, rank: int, scale: float,
           dtype: Any, quantization: tuple[int, bool]) -> tuple[Any, Array, Array]:
    """LoftQ's NF4 base and ``(A, B)`` with ``s·A·B = L·R``, the rank-``r`` part of the
    quantization error (see ``jlora._loftq``)."""
    _need_float_weight(kind, leaf, path)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"LoraSpec(init={kind!r}) needs a floating weight at {path!r}; "
                         f"found {leaf.dtype}")  # fmt: skip
    block_size, double_quant = quantization
    node, low_in, low_out = loftq_factors(
        jnp.asarray(leaf), layout, rank, loftq_iterations(kind), block_size, double_quant
    )
    root = jnp.sqrt(jnp.asarray(scale, jnp.float32))
    node = dataclasses.replace(node, dtype=jnp.dtype(leaf.dtype))
    return node, (low_in / root).astype(dtype), (low_out / root).astype(dtype)


def _need_float_weight(kind: str, leaf: Any, path: Path) -> None:
    if isinstance(leaf, jax.ShapeDtypeStruct) or is_weight_node(leaf):
        what = "an abstract jax.ShapeDtypeStruct" if isinstance(leaf, jax.ShapeDtypeStruct) else (
            f"a quantized {leaf.KIND} weight"
        )
        raise ValueError(
            f"LoraSpec(init={kind!r}) starts the adapter from the weight at {path!r}, which "
            f"is {what}; pass the float weights (dequantize a quantized base first)"
        )


def _init_factors(
    kind: str, key: Array, leaf: Any, path: Path, layout: Layout, rank: int, scale: float,
    dtype: Any,
) -> tuple[Array, Array]:
    """``(A, B)`` for ``LoraSpec.init = kind``.

    ``kaiming``/``gaussian``: random A, zero B. ``orthogonal``: A and B random with
    ``A·B = 0`` (PEFT's: the two halves of an orthogonal ``r×r`` matrix). ``pissa``,
    ``pissa_niter_K`` and ``olora`` start ``s·A·B`` at the weight's principal part
    (its top-``r`` singular triplets, or the first ``r`` columns of a QR of ``Wᵀ``);
    the residual base is ``jlora.unmerge(params, adapters)``.
    """
    if kind in ("kaiming", "gaussian"):
        return _init_a(kind, key, layout, rank, dtype), jnp.zeros(layout.b_shape(rank), dtype)
    if kind == "orthogonal":
        if rank % 2:
            raise ValueError(f"LoraSpec(init='orthogonal') needs an even rank; {path!r} has {rank}")
        q_key, a_key, b_key = jax.random.split(key, 3)
        q, _ = jnp.linalg.qr(jax.random.normal(q_key, (rank, rank), jnp.float32))
        odd, even = q[0::2], q[1::2]  # orthogonal rows: odd·evenᵀ = 0
        stack = layout.stack_shape
        g_a = jax.random.normal(a_key, (*stack, layout.in_features, rank // 2), jnp.float32)
        g_b = jax.random.normal(b_key, (*stack, rank // 2, layout.out_features), jnp.float32)
        a = jnp.matmul(g_a, odd) / 10.0
        b = jnp.matmul(even.T, g_b) / 10.0
        return a.astype(dtype), b.astype(dtype)
    # The spectral inits read the weight itself.
    _need_float_weight(kind, leaf, path)
    wide = wide_float(leaf.dtype)
    w = layout.to_grouped(jnp.asarray(leaf).astype(wide))  # (*stack, in, out)
    s = jnp.asarray(scale, wide)
    if kind == "olora":
        # PEFT: Wᵀ = Q·R (out × in); B_torch = Q[:, :r], A_torch = R[:r].
        q, r_factor = jnp.linalg.qr(jnp.swapaxes(w, -1, -2))
        a = jnp.swapaxes(r_factor[..., :rank, :], -1, -2)  # (in, r)
        b = jnp.swapaxes(q[..., :, :rank], -1, -2)  # (r, out)
        return a.astype(dtype), b.astype(dtype)
    if kind == "pissa":
        u, sv, vt = jnp.linalg.svd(w, full_matrices=False)
        u, sv, vt = u[..., :rank], sv[..., :rank], vt[..., :rank, :]
    else:  # pissa_niter_K: a randomized SVD with K power iterations
        u, sv, vt = _randomized_svd(w, rank, int(kind.rsplit("_", 1)[1]), key)
    root = jnp.sqrt(sv / s)  # PEFT divides the singular values by the scale
    a = u * root[..., None, :]
    b = root[..., :, None] * vt
    return a.astype(dtype), b.astype(dtype)


def _randomized_svd(w: Array, rank: int, niter: int, key: Array) -> tuple[Array, Array, Array]:
    """Top-``rank`` singular triplets of ``w (*stack, m, n)`` by a randomized range finder
    (Halko et al.; what ``torch.svd_lowrank`` does): ``niter`` power iterations, each
    re-orthonormalised, then the exact SVD of the small projection."""
    n = w.shape[-1]
    g = jax.random.normal(key, (*w.shape[:-2], n, rank), w.dtype)  # q = r, as PEFT asks
    q, _ = jnp.linalg.qr(jnp.matmul(w, g))
    wt = jnp.swapaxes(w, -1, -2)
    for _ in range(niter):
        z, _ = jnp.linalg.qr(jnp.matmul(wt, q))
        q, _ = jnp.linalg.qr(jnp.matmul(w, z))
    small = jnp.matmul(jnp.swapaxes(q, -1, -2), w)  # (r, n)
    u_small, sv, vt = jnp.linalg.svd(small, full_matrices=False)
    u = jnp.matmul(q, u_small)
    return u[..., :rank], sv[..., :rank], vt[..., :rank, :]


def _init_a(kind: str, key: Array, layout: Layout, rank: int, dtype: Any) -> Array:
    shape = layout.a_shape(rank)
    if kind == "gaussian":  # PEFT's "gaussian": std 1/r
        return (jax.random.normal(key, shape, jnp.float32) / rank).astype(dtype)
    # PEFT's default: kaiming_uniform_(a=sqrt(5)) on (r, in) gives U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(layout.in_features)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
