"""Low-rank products ordered for XLA:CPU's fast GEMM path.

The engine's ``dot_general`` rule uses :func:`lowrank` for plain projections when
``jlora.lora(fn, fast_backward=...)`` is on (the default on CPU). Its pieces, each
equal in values and gradients to ``(s·(x·A))·B``:

* :func:`lowrank`: ``(s·(x·A))·B`` with a custom VJP. Autodiff's A- and B-gradients
  (``xᵀ·gt`` and ``tᵀ·g``) contract axis 0 of both operands, a form XLA:CPU leaves to a
  slow generic dot instead of its YNNPACK GEMM fusions; here every backward product
  contracts the last axis of its lhs, the small ``(N, r)`` operands being transposed
  explicitly behind optimization barriers. Measured on the reference decoder: the
  whole jlora train step 0.72x full fine-tuning instead of 1.0x. Cost: a
  ``custom_vjp`` has no forward-mode derivative (``jax.jvp``, ``jax.jacfwd``).
* Forward, both: at ranks up to :data:`OUTER_PRODUCT_MAX_RANK` the ``t·B`` product is
  a sum of rank-1 outer products that XLA fuses into the projection's consumer
  (:func:`_expand`) instead of a skinny GEMM whose ``(N, out)`` result goes to memory.
* Backward, both: the input gradient ``gt·Aᵀ`` likewise, up to
  :data:`OUTER_BACKWARD_MAX_RANK`, fused into the add with the base weight's input
  gradient (:func:`_expand_grad_x`).
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


#: Up to this rank the forward's ``t·B`` is a sum of rank-1 outer products (see
#: :func:`_expand`); above it, a GEMM.
OUTER_PRODUCT_MAX_RANK = 16


#: The outer-product form only in a one-device process. On a mesh XLA's sharding
#: propagation through the elementwise sum gathers the layer's biases that the base
#: model's step leaves sharded (``tests/test_sharding.py``), so there the GEMM form stays.
SINGLE_DEVICE_ONLY = True


#: Up to this rank the backward's input gradient ``gt·Aᵀ`` is a sum of rank-1 outer
#: products too (:func:`_expand_grad_x`); above it, a GEMM.
OUTER_BACKWARD_MAX_RANK = 16


def _outer_form(t: Array, max_rank: int | None = None) -> bool:
    max_rank = OUTER_PRODUCT_MAX_RANK if max_rank is None else max_rank
    return (
        t.shape[-1] <= max_rank
        and jnp.issubdtype(t.dtype, jnp.floating)
        and not (SINGLE_DEVICE_ONLY and jax.device_count() > 1)
    )


def _outer_sum(t: Array, rows_RxO: Array, out_dtype) -> Array:
    """``Σ_k t[..., k:k+1]·rows[k]``, accumulated in float32 (or wider) and cast once."""
    acc = t.dtype if jnp.finfo(t.dtype).bits >= 32 else jnp.dtype(jnp.float32)
    t = t.astype(acc)
    rows_RxO = rows_RxO.astype(acc)
    out = t[..., 0:1] * rows_RxO[0:1]
    for k in range(1, t.shape[-1]):
        out = out + t[..., k : k + 1] * rows_RxO[k : k + 1]
    return out.astype(out_dtype)


def _expand_grad_x(gt_NxR: Array, a_IxR: Array, precision) -> Array:
    """The input gradient ``gt·Aᵀ`` (``(N, in)``) of a low-rank product.

    At rank ``r ≤ OUTER_BACKWARD_MAX_RANK`` it is ``Σ_k gt[:, k]·A[:, k]ᵀ`` (see
    :func:`_expand`): elementwise, XLA fuses it into the sum with the base weight's
    input gradient that autodiff adds it to, so no skinny ``K = r`` GEMM runs and its
    ``(N, in)`` result is not written to memory and read again. ``Aᵀ`` is made once,
    by an exact product with ``I`` (in a scan body ``A`` is a dynamic-slice of the
    stacked adapters, which fused into the sum would be recomputed per element).

    On the reference decoder's float32 train step (``benchmarks/train_step.py``,
    ``jlora`` against ``jlora_bwd_dots``, 20 paired rounds on a 2-core CPU) it took
    0.973x the GEMM form's time unscanned and 0.986x scanned, gains of the order of the
    noise, and the scanned step's temporary bytes to 0.928x.
    """
    if not _outer_form(gt_NxR, OUTER_BACKWARD_MAX_RANK):
        return _dot(gt_NxR, a_IxR, 1, 1, precision)
    rank = a_IxR.shape[-1]
    eye = jnp.eye(rank, dtype=a_IxR.dtype)
    aT_RxI = _dot(eye, a_IxR, 1, 1, jax.lax.Precision.HIGHEST)
    return _outer_sum(gt_NxR, aT_RxI, gt_NxR.dtype)


def _expand(xa: Array, t: Array, b: Array, scale: float, precision) -> Array:
    """``s·(x·A)·B`` from ``xa = x·A (..., r)``, ``t = s·xa`` and ``B (r, out)``, in
    ``xa``'s dtype (the GEMM form uses ``t``, which the callers keep for the backward).

    At rank ``r ≤ OUTER_PRODUCT_MAX_RANK`` it is ``Σ_k xa[..., k:k+1]·(s·B)[k]``,
    accumulated in float32 (float64 for float64 inputs) and rounded once, as a GEMM
    with a float32 accumulator would. Elementwise, XLA fuses it into whatever consumes
    the projection (the add to ``x·W``, the bias, the next activation), so the
    ``(N, out)`` low-rank term is never written to memory and no skinny ``K = r`` GEMM
    runs. ``s·B`` is made by a (tiny, exact) product with ``s·I``: XLA does not fuse a
    dot into its consumer, so ``s·B`` is computed once instead of per output element
    (in a scan body B is a dynamic-slice of the stacked adapters, which fused into the
    sum made it 1.4x slower in a one-layer scan).

    On the reference decoder's inference this took unmerged / merged from 1.058 to
    1.022 (float32) and from 1.165 to 1.036 (bfloat16), and the step's temporary bytes
    from 1.82x to 1.03x the merged model's (``benchmarks/train_step.py``,
    ``infer_unmerged`` against ``infer_unmerged_dots``). Above the threshold the
    elementwise form costs more than the GEMM it replaces (rank 32: 1.18x slower in a
    one-layer measurement).
    """
    if not _outer_form(xa):
        return _dot(t, b, t.ndim - 1, 0, precision)
    out_dtype, rank = xa.dtype, xa.shape[-1]
    acc = xa.dtype if jnp.finfo(xa.dtype).bits >= 32 else jnp.dtype(jnp.float32)
    scaled_eye = jnp.eye(rank, dtype=acc) * jnp.asarray(scale, acc)
    sb = _dot(scaled_eye, b.astype(acc), 1, 0, jax.lax.Precision.HIGHEST)
    return _outer_sum(xa, sb, out_dtype)


def _forward(x, a, b, scale, precision):
    xa = _dot(x, a, x.ndim - 1, 0, precision)
    t = xa * jnp.asarray(scale, x.dtype)
    return _expand(xa, t, b, scale, precision), t


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
    grad_x = _expand_grad_x(gt_NxR, a, precision).reshape(*batch_shape, a.shape[0])
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
        xa = t_all[..., start : start + rank]
        ts.append(xa * jnp.asarray(scale, x.dtype))
        outs.append(_expand(xa, ts[-1], b, scale, precision))
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
    grad_x = _expand_grad_x(gt_NxK, a_cat, precision).reshape(*batch_shape, a_cat.shape[0])
    grad_a, start = [], 0
    for b in b_list:
        rank = b.shape[0]
        grad_a.append(grad_a_cat[:, start : start + rank].astype(a_cat.dtype))
        start += rank
    return grad_x, tuple(grad_a), tuple(grad_b)


lowrank_shared.defvjp(_shared_fwd, _shared_bwd)
