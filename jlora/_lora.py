"""``jlora.lora`` and ``jlora.explain``: the engine's two public doors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jlora._engine import Explanation, Uses, run
from jlora._types import Adapters, Array, Params


def lora(fn: Callable, *, fast_backward: bool | None = None, aux: bool = False) -> Callable:
    """Transform ``fn(params, *args, **kwargs)`` to run with adapters on its weights.

    ``lora(fn)(params, adapters, *args, lora_key=None, **kwargs)`` equals
    ``fn(jlora.merge(params, adapters), *args, **kwargs)`` in values and in gradients
    with respect to ``adapters``, but each targeted weight is used in factored form
    (``x·W + s·(x·A)·B``): no ``W + s·B·A`` is built and the frozen base gets no
    gradient. ``fn`` itself is not modified; any JAX function works (a Flax
    ``model.apply``, an NNX ``graphdef`` call, an Equinox model, a Hugging Face Flax
    model with ``params=``). Non-array arguments (flags, strings) are treated as static.
    ``fn`` is traced once per input signature (structure, shapes, dtypes, static
    arguments), as ``jax.jit`` traces, so it must be a pure function.

    Args:
      fn: the model function; its first argument is the params tree.
      fast_backward: run plain projections (``x`` contracting its trailing axes with
        the weight's input axes) through a low-rank product with a custom VJP that
        orders the backward matmuls for XLA's fast GEMM path. Values and gradients are
        those of plain autodiff, to float rounding; the train step of the reference
        decoder ran at 0.72x full fine-tuning with it and 1.03x without on CPU
        (``benchmarks/train_step.py``). A ``custom_vjp`` has no forward-mode
        derivative, so pass ``False`` for ``jax.jvp`` / ``jax.jacfwd`` through ``fn``.
        Default (None): on for the CPU backend, where it was measured.
      aux: also return the auxiliary losses of mixtures of LoRA experts
        (``LoraSpec(experts=E)``): ``fn_lora`` then returns ``(outputs, aux)`` with
        ``aux["balance_loss"]``, the Switch load-balancing loss ``E·Σ_e f_e·P_e``
        averaged over every routed use (1.0 when the routing is balanced; 0.0 when no
        mixture ran), and ``aux["router_uses"]``, how many uses were averaged
        (summed over the steps of ``scan`` and ``while`` loops). Add
        ``coef * aux["balance_loss"]`` to the training loss; ``fn`` is unchanged.

    Returns:
      ``fn_lora(params, adapters, *args, lora_key=None, lora_ids=None, **kwargs)``.
      ``lora_key`` (a PRNG key) turns on LoRA dropout on the low-rank path for adapters
      made with ``LoraSpec(dropout > 0)``. ``lora_ids`` (integers of shape
      ``(batch,)``) picks each example's slot of stacked adapters (:func:`jlora.stack`),
      ``-1`` for the base alone.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2))}
      >>> adapters = jlora.init(jlora.LoraSpec(rank=1, targets="w"), params, jax.random.key(0))
      >>> jlora.lora(lambda p, x: x @ p["w"])(params, adapters, jnp.ones((1, 3)))
      Array([[3., 3.]], dtype=float32)
    """

    traces: dict = {}  # jaxprs of fn by input signature, reused as jax.jit reuses traces

    @functools.wraps(fn)
    def fn_lora(
        params: Params,
        adapters: Adapters,
        *args: Any,
        lora_key: Array | None = None,
        lora_ids: Array | None = None,
        **kwargs: Any,
    ) -> Any:
        return run(
            fn,
            params,
            adapters,
            args,
            kwargs,
            key=lora_key,
            cache=traces,
            fast_backward=fast_backward,
            lora_ids=lora_ids,
            aux=aux,
        )

    return fn_lora


def explain(
    fn: Callable,
    params: Params,
    adapters: Adapters,
    *args: Any,
    lora_ids: Array | None = None,
    **kwargs: Any,
) -> Explanation:
    """Report, per target, how many uses ran factored and how many built ``W + s·B·A``.

    Traces ``lora(fn)(params, adapters, *args, **kwargs)`` once (abstract inputs are
    enough) and counts what the engine did at each use of each targeted weight. A
    use falls back to the dense form when no rule fits it (the weight fed to an
    operation other than a matmul, convolution, lookup or layout change).

    Returns:
      ``{path: Uses(factored, materialized)}``, printed as a table that also shows each
      target's weight kind (``dense``, ``nf4``, ``int8``), adapter kind (``lora``,
      ``dora``, ``stack``, ``mixture``) and the forms its factored uses took (``matmul``,
      ``batched``, ``grouped``..., see :class:`jlora.Explanation`); ``.kinds`` holds
      those pairs by path and ``.forms`` the counts by form.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2))}
      >>> adapters = jlora.init(jlora.LoraSpec(rank=1, targets="w"), params, jax.random.key(0))
      >>> jlora.explain(lambda p, x: x @ p["w"], params, adapters, jnp.ones((1, 3)))["w"]
      Uses(factored=1, materialized=0)
    """
    import jax

    counts: dict = {}
    kinds: dict = {}
    forms: dict = {}
    jax.eval_shape(
        lambda p, a, ar, kw, ids: run(
            fn, p, a, ar, kw, counts=counts, kinds=kinds, forms=forms, lora_ids=ids
        ),
        params,
        adapters,
        args,
        kwargs,
        lora_ids,
    )
    return Explanation({path: Uses(*c) for path, c in counts.items()}, kinds=kinds, forms=forms)
