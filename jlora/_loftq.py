"""LoftQ: adapters started at the quantization error of an NF4 base (Li et al. 2023).

LoftQ alternates, per targeted weight ``W`` (grouped ``(*stack, in, out)``):

1. ``Q_t = nf4(W - L_{t-1}·R_{t-1})`` (``L_0·R_0 = 0``), quantized as
   :func:`jlora.quantize` does it (bitsandbytes' NF4, bit for bit);
2. ``L_t·R_t = svd_r(W - Q_t)``, the best rank-``r`` approximation of what the
   quantization lost, split evenly (``U_r·Σ_r^{1/2}``, ``Σ_r^{1/2}·V_rᵀ``).

After ``K`` rounds the base is ``Q_K`` and the adapter's update is ``s·A·B = L_K·R_K``,
so ``Q_K + s·A·B`` is closer to ``W`` than ``Q_K`` alone. With ``K = 1`` the base is
the plain NF4 weight, ``jlora.quantize(params, targets)``.

PEFT (``peft.utils.loftq_utils.loftq_init``) runs the same rounds with
``compress_statistics=False`` and stores ``lora_A = R``, ``lora_B = L`` without
dividing by the LoRA scale, which is LoftQ's approximation only at ``lora_alpha = r``.
jlora divides each side by ``√s``, so ``s·A·B = L·R`` at any alpha; at ``alpha = r``
the factors are PEFT's.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._adapter import Layout
from jlora._types import Array, Params

LOFTQ = re.compile(r"loftq(?:_iter_([1-9]\d*))?")
"""``LoraSpec.init`` values that mean LoftQ: ``"loftq"`` (one round) or ``"loftq_iter_K"``."""


def loftq_iterations(kind: str) -> int | None:
    """The number of LoftQ rounds ``kind`` asks for, or None if it is not LoftQ."""
    found = LOFTQ.fullmatch(kind)
    if found is None:
        return None
    return int(found.group(1) or 1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _error_factors(w: Array, node: Any, layout: Layout, rank: int) -> tuple[Array, Array]:
    """The rank-``rank`` SVD of ``w - decode(node)`` (grouped), split evenly."""
    error = w - layout.to_grouped(node.decoded().astype(jnp.float32))
    u, sigma, v_t = jnp.linalg.svd(error, full_matrices=False)
    root = jnp.sqrt(sigma[..., :rank])
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * v_t[..., :rank, :]


@functools.partial(jax.jit, static_argnums=(3,))
def _residual(w: Array, low_in: Array, low_out: Array, layout: Layout) -> Array:
    return layout.from_grouped(w - jnp.matmul(low_in, low_out))


def loftq_factors(
    weight: Array, layout: Layout, rank: int, iterations: int, block_size: int, double_quant: bool
) -> tuple[Any, Array, Array]:
    """``(Q_K, L_K, R_K)`` for one weight: the NF4 node and the grouped factors
    ``L (*stack, in, r)`` and ``R (*stack, r, out)`` with ``L·R ≈ W - Q_K``. Each step is
    compiled once per shape (the NF4 encoder is :func:`jlora.quantize`'s), whatever
    the number of rounds."""
    from jlora._quant import _encode_jit

    w = layout.to_grouped(jnp.asarray(weight).astype(jnp.float32))
    residual = jnp.asarray(weight).astype(jnp.float32)
    for round_ in range(iterations):
        node = _encode_jit(residual, layout, "nf4", block_size, double_quant)
        low_in, low_out = _error_factors(w, node, layout, rank)
        if round_ + 1 < iterations:
            residual = _residual(w, low_in, low_out, layout)
    return node, low_in, low_out


def loftq(
    spec: Any,
    params: Params,
    key: Array,
    *,
    block_size: int = 64,
    double_quant: bool = True,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    dtype: Any = None,
) -> tuple[Params, Any]:
    """An NF4 base and LoftQ adapters that start at its quantization error.

    ``spec.init`` must be ``"loftq"`` (one round: the base is the plain NF4 weight) or
    ``"loftq_iter_K"`` (``K`` alternating rounds). Per target, ``Q + s·A·B`` is
    closer to the float weight than ``Q`` is: ``s·A·B`` is the best rank-``r``
    approximation of ``W - Q``. :func:`jlora.init` with the same spec returns the
    same adapters alone; with one round their base is ``jlora.quantize(params,
    targets, block_size=..., double_quant=...)``.

    Args:
      spec: the LoRA spec (its ``init`` a LoftQ one).
      params: the float base.
      key: unused by LoftQ itself (its factors are deterministic); passed on to
        :func:`jlora.init`.
      block_size, double_quant: the NF4 encoding, as for :func:`jlora.quantize`
        (``double_quant=False`` is what PEFT's LoftQ quantizes with).
      fn, args, kwargs, dtype: as for :func:`jlora.init`.

    Returns:
      ``(quantized_params, adapters)``: ``params`` with a :class:`jlora.QuantizedWeight`
      at each target, and the adapters, to train with ``jlora.lora(fn)(quantized_params,
      adapters, ...)``.

    Raises:
      ValueError: ``spec.init`` is not a LoftQ init, or as :func:`jlora.init`.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
      >>> spec = jlora.LoraSpec(rank=4, alpha=4.0, targets="w", init="loftq")
      >>> q, adapters = jlora.loftq(spec, params, jax.random.key(1))
      >>> plain = jnp.linalg.norm(params["w"] - jlora.dequantize(q)["w"])
      >>> lofted = jnp.linalg.norm(params["w"] - jlora.merge(jlora.dequantize(q), adapters)["w"])
      >>> bool(lofted < plain)
      True
    """
    from jlora._init import _init

    if not isinstance(spec.init, str) or loftq_iterations(spec.init) is None:
        raise ValueError(
            f"jlora.loftq needs LoraSpec(init='loftq') or init='loftq_iter_K'; found "
            f"init={spec.init!r}"
        )
    adapters, bases = _init(
        spec, params, key, fn=fn, args=args, kwargs=kwargs, dtype=dtype,
        quantization=(block_size, double_quant),
    )  # fmt: skip
    from jlora._paths import path_str
    from jlora._weights import is_weight_node

    quantized = jax.tree_util.tree_map_with_path(
        lambda kp, leaf: bases.get(path_str(kp), leaf), params, is_leaf=is_weight_node
    )
    return quantized, adapters
