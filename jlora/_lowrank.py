"""Low-rank products ordered for XLA:CPU's fast GEMM path.

The engine's ``dot_general`` rule uses :func:`lowrank` for plain projections when
``jlora.lora(fn, fast_backward=...)`` is on (the default on CPU). Two pieces, each
equal in values and gradients to ``(s·(x·A))·B``:

* :func:`lowrank`: ``(s·(x·A))·B`` with a custom VJP. Autodiff's A- and B-gradients
  (``xᵀ·gt`` and ``tᵀ·g``) contract axis 0 of both operands, a form XLA:CPU leaves to a
  slow generic dot instead of its YNNPACK GEMM fusions; here every backward product
  contracts the last axis of its lhs, the small ``(N, r)`` operands being transposed
  explicitly behind optimization barriers. Measured on the reference decoder: the
  whole jlora train step 0.72x full fine-tuning instead of 1.0x. Cost: a
  ``custom_vjp`` has no forward-mode derivative (``jax.jvp``, ``jax.jacfwd``).
* :func:`lowrank_shared`: several adapters whose weights share one input (q, k, v;
  gate, up) in one ``x·[A1|A2|A3]`` product, with the same fast-form backward (one
  GEMM each for the input's gradient and the A's). The engine groups such uses by a
  look-ahead over the equations that read the same activation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jlora._types import Array


def _flat(x: Array) -> Array:
    return x.reshape(-1, x.shape[-1])


def _dot(lhs: Array, rhs: Array, lhs_contract: int, rhs_contract: int, precision) -> Array:
    return jax.lax.dot_general(
        lhs, rhs, (((lhs_contract,), (rhs_contract,)), ((), ())), precision=precision
    )


def _forward(x, a, b, scale, precision):
    t = _dot(x, a, x.ndim - 1, 0, precision) * jnp.asarray(scale, x.dtype)
    return _dot(t, b, t.ndim - 1, 0, precision), t


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def lowrank(x_NxI: Array, a_IxR: Array, b_RxO: Array, scale: float, precision=None) -> Array:
    """``(scale·(x·A))·B`` for ``x`` of shape ``(..., in)``; result ``(..., out)``.

    ``precision`` is passed to every product, forward and backward (as
    ``jax.lax.dot_general`` takes it).
    """
    return _forward(x_NxI, a_IxR, b_RxO, scale, precision)[0]


def _lowrank_fwd(x, a, b, scale, precision):
    out, t = _forward(x, a, b, scale, precision)
    return out, (x, a, b, t)


def _lowrank_bwd(scale, precision, residuals, g):
    x, a, b, t = residuals
    batch_shape = x.shape[:-1]
    x_NxI, t_NxR, g_NxO = _flat(x), _flat(t), _flat(g)
    # Every product below contracts the last axis of its lhs and the first or last
    # axis of its rhs: the forms XLA:CPU hands to its fast GEMM (YNNPACK) fusions. The
    # textbook ``xᵀ·gT`` and ``tᵀ·g`` contract axis 0 of both operands and fall back
    # to a slow generic dot. The small (N, r) operands are transposed instead, behind
    # an optimization barrier so that XLA does not fold the transpose back into the dot.
    gtT_RxN = _dot(b, g_NxO, 1, 1, precision) * jnp.asarray(scale, g.dtype)
    gtT_RxN, tT_RxN = jax.lax.optimization_barrier((gtT_RxN, t_NxR.T))
    grad_a = jax.lax.optimization_barrier(_dot(gtT_RxN, x_NxI, 1, 0, precision)).T
    grad_b = _dot(tT_RxN, g_NxO, 1, 0, precision)
    gt_NxR = jax.lax.optimization_barrier(gtT_RxN.T)
    grad_x = _dot(gt_NxR, a, 1, 1, precision).reshape(*batch_shape, a.shape[0])
    return grad_x, grad_a.astype(a.dtype), grad_b.astype(b.dtype)


lowrank.defvjp(_lowrank_fwd, _lowrank_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def lowrank_shared(
    x_NxI: Array, a_list: tuple[Array, ...], b_list: tuple[Array, ...], scales: tuple,
    precision=None,
) -> tuple[Array, ...]:
    """``(s_k·(x·A_k))·B_k`` for each ``k``, with one ``x·[A_1|...|A_k]`` product
    (``a_list`` and ``b_list`` are tuples, as the custom VJP returns their gradients)."""
    return _shared_forward(x_NxI, tuple(a_list), tuple(b_list), scales, precision)[0]


def _shared_forward(x, a_list, b_list, scales, precision):
    a_cat = jnp.concatenate(a_list, axis=-1)
    t_all = _dot(x, a_cat, x.ndim - 1, 0, precision)
    outs, ts, start = [], [], 0
    for a, b, scale in zip(a_list, b_list, scales):
        rank = a.shape[-1]
        t = t_all[..., start : start + rank] * jnp.asarray(scale, x.dtype)
        ts.append(t)
        outs.append(_dot(t, b, t.ndim - 1, 0, precision))
        start += rank
    return tuple(outs), (x, a_cat, tuple(b_list), tuple(ts))


def _shared_fwd(x, a_list, b_list, scales, precision):
    outs, residuals = _shared_forward(x, tuple(a_list), tuple(b_list), scales, precision)
    return outs, residuals


def _shared_bwd(scales, precision, residuals, gs):
    x, a_cat, b_list, ts = residuals
    batch_shape = x.shape[:-1]
    x_NxI = _flat(x)
    gtT, grad_b = [], []
    for b, t, g, scale in zip(b_list, ts, gs, scales):
        g_NxO = _flat(g)
        gtT.append(_dot(b, g_NxO, 1, 1, precision) * jnp.asarray(scale, g.dtype))  # (r, N)
        tT_RxN = jax.lax.optimization_barrier(_flat(t).T)
        grad_b.append(_dot(tT_RxN, g_NxO, 1, 0, precision).astype(b.dtype))
    gtT_KxN = jax.lax.optimization_barrier(jnp.concatenate(gtT, axis=0))
    grad_a_cat = jax.lax.optimization_barrier(_dot(gtT_KxN, x_NxI, 1, 0, precision)).T
    gt_NxK = jax.lax.optimization_barrier(gtT_KxN.T)
    grad_x = _dot(gt_NxK, a_cat, 1, 1, precision).reshape(*batch_shape, a_cat.shape[0])
    grad_a, start = [], 0
    for b in b_list:
        rank = b.shape[0]
        grad_a.append(grad_a_cat[:, start : start + rank].astype(a_cat.dtype))
        start += rank
    return grad_x, tuple(grad_a), tuple(grad_b)


lowrank_shared.defvjp(_shared_fwd, _shared_bwd)
