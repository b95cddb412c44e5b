"""LoftQ on an NF4 base against plain NF4 (QLoRA), on the reference decoder.

Run from the repository root::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python -m benchmarks.loftq                # a few minutes on 2 CPU cores
    python -m benchmarks.loftq --quick            # under a minute, for CI
    python -m benchmarks.loftq --no-reference     # without table 1b (the reference size)

(The program re-executes itself with those two malloc thresholds when they are not set,
as the other benchmarks do.)

The variants, all with adapters on the six targets of ``benchmarks/models.py``
(``q``, ``k``, ``v``, ``o``, ``up``, ``down``) and ``alpha = 2·rank``:

==========================  ===========================================================
``float + LoRA``            the float base, ``jlora.init`` (kaiming A, B = 0)
``NF4 + LoRA``              ``jlora.quantize`` (bitsandbytes' NF4, double-quantized
                            absmaxes, blocks of 64) and the same fresh adapters (B = 0:
                            the model starts as the plain NF4 model); QLoRA
``NF4 + LoftQ (1 round)``   ``jlora.loftq(init="loftq")``: the same NF4 base, adapters
                            at the best rank-r approximation of its error ``W − Q``
``NF4 + LoftQ (K rounds)``  ``init="loftq_iter_K"`` (``--rounds``, default 4):
                            alternating ``Q = nf4(W − L·R)``, ``L·R = svd_r(W − Q)``
==========================  ===========================================================

What is measured, in order:

1. **A float model worth quantizing.** The decoder's random weights are not a
   pretrained model, so the float model is first trained in full (every parameter,
   Adam, ``--pretrain-steps``) on next-token prediction of a generated task: a random
   Markov chain over the vocabulary, each token followed by one of ``--successors``
   random tokens with random (Dirichlet) probabilities. The pretraining's targets are
   the chain's exact next-token distributions (soft labels, not sampled tokens), which
   makes the float model good in a few hundred steps. Since the distributions are
   known, every loss printed is exact given the inputs: the cross-entropy against the
   true next-token distribution minus its entropy, i.e. ``KL(chain ‖ model)``, 0 at
   best ("loss − H"). The true distributions are not one-hot, so the float model's
   logits are not saturated and an error in them costs loss, as in a language model.
   The head is tied to the input embedding, so predicting a token's successors is the
   work of the targeted layers.
2. **Quantization error** of each variant at ranks ``--ranks`` (8 and 16; ``--quick``:
   8), before any training:
   (a) the relative Frobenius error of the effective weight, ``‖W − (Q + s·A·B)‖ / ‖W‖``
   per targeted matrix, averaged over the matrices; (b) the relative error of the
   logits on a held-out batch, ``‖z − z_float‖ / ‖z_float‖``; (c) the KL divergence
   from the float model's next-token distribution, ``KL(p_float ‖ p)``, averaged over
   positions; (d) the task's loss − H. Table 1b gives (a)-(c) for the reference size
   itself (``benchmarks.models.REFERENCE``: 6 layers, d_model 512, vocabulary 8192) at
   its random initialization, on random tokens (not in ``--quick``; ``--no-reference``
   skips it: LoftQ's SVDs of its 36 matrices take one to two minutes on two CPU cores,
   several times that when other work shares them).
3. **A short fine-tune** (``--steps`` of Adam at ``--lr`` on the adapters alone, rank
   ``--rank``, on sampled next tokens as a fine-tune on data is; the same seed, adapter
   init where it applies, and batches for every variant) on a shifted chain: a fraction
   ``--changed`` of the tokens get new successors, so the fine-tune has to learn
   something new while keeping the rest of what the float model knew and quantization
   damaged. The held-out loss − H is printed at step 0, halfway and at the end, the end
   split into the positions whose token kept its successors and those whose successors
   changed. ``--changed 0`` fine-tunes on the pretraining chain itself (pure recovery
   from quantization).
4. **XLA's counts** for each variant's compiled train step (``cost_analysis`` FLOPs,
   ``memory_analysis`` argument and temporary bytes) and the step time, from interleaved
   rounds (median step time; ratio to the float base: median of per-round ratios).

The training runs on a smaller decoder than the reference size (``SMALL``: 2 layers,
d_model 128, MLP 512, vocabulary 512, sequence 64, batch 16; ``--quick``:
``benchmarks.models.QUICK`` with batch 8), so that the whole program fits in a few minutes
of two CPU cores; the program says so in its output. ``--layers``, ``--d-model`` and the
like change it.

Claim checked (the program exits 1 if it fails): at every rank, LoftQ's mean relative
weight error, one round and K rounds, is below plain NF4's. Nothing is claimed about
the fine-tune; its table is the measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common
from benchmarks.models import (
    GPT,
    QUICK,
    REFERENCE,
    TARGETS,
    Config,
    batch_of_tokens,
    next_token_loss,
)

SMALL = Config(vocab=512, d_model=128, heads=4, mlp=512, layers=2, seq=64, batch=16)
"""The trained decoder in the full mode: the reference architecture, smaller."""
TINY = dataclasses.replace(QUICK, batch=8)
"""The trained decoder in ``--quick`` mode."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to start: the base (``"float"`` or ``"nf4"``) and the adapters' init."""

    name: str
    base: str
    init: str

    @property
    def rounds(self) -> int:
        """LoftQ rounds; 0 for a fresh (kaiming) adapter."""
        if not self.init.startswith("loftq"):
            return 0
        return int(self.init.rsplit("_", 1)[1]) if "iter" in self.init else 1


def variants(rounds: int) -> list[Variant]:
    return [
        Variant("float + LoRA", "float", "kaiming"),
        Variant("NF4 + LoRA", "nf4", "kaiming"),
        Variant("NF4 + LoftQ (1 round)", "nf4", "loftq"),
        Variant(f"NF4 + LoftQ ({rounds} rounds)", "nf4", f"loftq_iter_{rounds}"),
    ]


# --------------------------------------------------------------------------------------
# The task: a random Markov chain over the vocabulary
# --------------------------------------------------------------------------------------


def random_chain(vocab: int, successors: int, key: Any) -> Any:
    """``(vocab, vocab)`` transition probabilities: each row ``successors`` random tokens
    with Dirichlet(1) weights."""
    import jax
    import jax.numpy as jnp

    key_next, key_weights = jax.random.split(key)
    nexts = jnp.argsort(jax.random.uniform(key_next, (vocab, vocab)), axis=1)[:, :successors]
    # Dirichlet(1, ..., 1): i.i.d. exponentials, normalized.
    weights = -jnp.log(jax.random.uniform(key_weights, (vocab, successors), minval=1e-12))
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)
    rows = jnp.arange(vocab)[:, None]
    return jnp.zeros((vocab, vocab), jnp.float32).at[rows, nexts].set(weights)


def chains(vocab: int, successors: int, changed: float, key: Any) -> tuple[Any, Any, Any]:
    """``(P, P', moved)``: the pretraining chain, the fine-tune's (the rows of a fraction
    ``changed`` of the tokens drawn anew) and the boolean mask of those tokens."""
    import jax
    import jax.numpy as jnp

    key_p, key_new, key_moved = jax.random.split(key, 3)
    probs = random_chain(vocab, successors, key_p)
    moved = jnp.zeros(vocab, bool)
    moved = moved.at[jax.random.permutation(key_moved, vocab)[: round(changed * vocab)]].set(True)
    shifted = jnp.where(moved[:, None], random_chain(vocab, successors, key_new), probs)
    return probs, shifted, moved


@functools.cache
def _sampler(batch: int, length: int) -> Callable:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def sample(probs, key):
        key_start, key_steps = jax.random.split(key)
        start = jax.random.randint(key_start, (batch,), 0, probs.shape[0])
        log_probs = jnp.log(probs)  # -inf where a token cannot follow

        def step(x, k):
            return jax.random.categorical(k, log_probs[x]).astype(x.dtype), x

        _, seq_LxB = jax.lax.scan(step, start, jax.random.split(key_steps, length))
        return seq_LxB.T

    return sample


def sample(probs: Any, key: Any, batch: int, length: int) -> Any:
    """``(batch, length)`` int32 sequences of the chain ``probs`` from uniform starts."""
    return _sampler(batch, length)(probs, key)


@functools.cache
def _chain_losses_fn() -> Callable:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def losses(logits, tokens, probs, moved):
        target = probs[tokens[:, :-1]]  # (B, L, V): the true next-token distributions
        log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        safe_log_p = jnp.log(jnp.where(target > 0, target, 1.0))
        kl = jnp.sum(target * (safe_log_p - log_q), axis=-1)
        entropy = -jnp.sum(target * safe_log_p, axis=-1)
        changed = moved[tokens[:, :-1]]
        mean = lambda mask: jnp.sum(kl * mask) / jnp.sum(mask)  # NaN if no position
        return kl.mean(), mean(~changed), mean(changed), entropy.mean()

    return losses


def chain_losses(logits: Any, tokens: Any, probs: Any, moved: Any) -> dict[str, float | None]:
    """Mean ``KL(chain ‖ model)`` (loss − H) over the positions of ``tokens``
    ``(B, L+1)``: all, those of kept tokens, those of ``moved`` ones (None if there are
    none); and H."""
    values = [float(v) for v in _chain_losses_fn()(logits, tokens, probs, moved)]
    return {k: v if v == v else None for k, v in zip(("all", "kept", "changed", "entropy"), values)}


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def compiled_step(loss: Callable, tx: Any, trainable: Any, frozen: Any, tokens: Any) -> Any:
    """The compiled Adam step ``(trainable, opt_state, frozen, tokens) -> (trainable,
    opt_state, loss)``."""
    import jax
    import optax

    def step(trainable, opt_state, frozen, tokens):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, tokens)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    with jax.numpy_dtype_promotion("standard"):  # optax's Adam: float ** int32 count
        return jax.jit(step).lower(trainable, tx.init(trainable), frozen, tokens).compile()


def pretrain(
    model: GPT, params: Any, probs: Any, config: Config, steps: int, lr: float, key: Any
) -> tuple[Any, list[float]]:
    """Full training of every parameter on the chain ``probs``; the train losses.

    The targets are the chain's exact next-token distributions (cross-entropy against
    ``probs[x]``), not sampled next tokens: the float model gets good in a few hundred
    steps instead of thousands.
    """
    import jax
    import optax

    def loss(trainable, _, tokens):
        logits = model.apply(trainable, tokens[:, :-1])
        return optax.softmax_cross_entropy(logits, probs[tokens[:, :-1]]).mean()

    tx = optax.adam(lr)
    batches = [sample(probs, jax.random.fold_in(key, i), config.batch, config.seq + 1)
               for i in range(steps)]  # fmt: skip
    step, state = compiled_step(loss, tx, params, None, batches[0]), tx.init(params)
    losses = []
    for tokens in common.bar(batches, desc="pretraining"):
        params, state, value = step(params, state, None, tokens)
        losses.append(float(value))
    return params, losses


# --------------------------------------------------------------------------------------
# Building the variants and measuring their error
# --------------------------------------------------------------------------------------


def build(
    variant: Variant, rank: int, params: Any, model: GPT, inputs: Any, key: Any, cache: dict
) -> tuple[Any, Any]:
    """``(base, adapters)`` of a variant at ``rank``; the plain NF4 base is made once."""
    import jlora

    spec = jlora.LoraSpec(rank=rank, alpha=2.0 * rank, targets=list(TARGETS), init=variant.init)
    shapes = {"fn": model.apply, "args": (inputs,)}
    if variant.rounds:
        return jlora.loftq(spec, params, key, **shapes)
    adapters = jlora.init(spec, params, key, **shapes)
    if variant.base == "float":
        return params, adapters
    if "nf4" not in cache:
        cache["nf4"] = jlora.quantize(params, list(TARGETS), **shapes)
    return cache["nf4"], adapters


def target_kernels(tree: Any) -> dict[tuple, Any]:
    """The targeted ``(in, out)`` kernels of a params tree, by path."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(tree)
    return {k: v for k, v in flat.items() if k[-1] == "kernel" and k[-2] in TARGETS}


@functools.cache
def _effective_fn() -> Callable:
    import jax

    import jlora

    # Jitted: one compile per tree structure instead of many small eager ones.
    return jax.jit(lambda base, adapters: target_kernels(
        jlora.merge(jlora.dequantize(base), adapters)))  # fmt: skip


def weight_error(params: Any, base: Any, adapters: Any) -> dict[str, float]:
    """``‖W − (Q + s·A·B)‖ / ‖W‖``: mean over the targeted matrices, and of them all."""
    import numpy as np

    effective = _effective_fn()(base, adapters)
    relative, lost, total = [], 0.0, 0.0
    for path, weight in target_kernels(params).items():
        w = np.asarray(weight, np.float64)
        diff = float(np.sum((w - np.asarray(effective[path], np.float64)) ** 2))
        norm = float(np.sum(w**2))
        relative.append((diff / norm) ** 0.5)
        lost, total = lost + diff, total + norm
    return {"weight_rel_error": statistics.mean(relative), "weight_rel_error_all":
            (lost / total) ** 0.5}  # fmt: skip


@functools.cache
def _logit_stats_fn() -> Callable:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def stats(logits, reference):
        relative = jnp.linalg.norm(logits - reference) / jnp.linalg.norm(reference)
        log_p = jax.nn.log_softmax(reference.astype(jnp.float32), axis=-1)
        log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1).mean()
        return relative, kl

    return stats


def logit_error(logits: Any, reference: Any) -> dict[str, float]:
    """Relative error of the logits and ``KL(p_reference ‖ p)``, mean over positions."""
    relative, kl = _logit_stats_fn()(logits, reference)
    return {"logit_rel_error": float(relative), "kl_from_float": float(kl)}


def error_rows(
    model: GPT,
    params: Any,
    tokens: Any,
    ranks: Sequence[int],
    chosen: Sequence[Variant],
    key: Any,
    forward: Callable,
    task_loss: Callable[[Any], float] | None = None,
) -> list[dict[str, Any]]:
    """Quantization error of the NF4 variants at each rank, on ``tokens`` ``(B, L+1)``.

    ``forward`` is the jitted ``jlora.lora(model.apply)``; ``task_loss(logits)`` the
    task's loss, if it has one. The float model's logits are ``forward`` with fresh
    adapters (B = 0: the float model exactly), which saves a compilation.
    """
    inputs = tokens[:, :-1]
    cache: dict = {}
    fresh = build(chosen[0], ranks[0], params, model, inputs, key, cache)[1]
    reference = forward(params, fresh, inputs)
    loss = task_loss or (lambda _: None)
    rows = [{"variant": "float", "rank": "-", "weight_rel_error": 0.0, "logit_rel_error": 0.0,
             "kl_from_float": 0.0, "loss": loss(reference)}]  # fmt: skip
    for rank in ranks:
        for variant in chosen:
            if variant.base == "float" or (variant.init == "kaiming" and rank != ranks[0]):
                continue  # B = 0: plain NF4 is the same model at every rank
            start = time.perf_counter()
            base, adapters = build(variant, rank, params, model, inputs, key, cache)
            built_s = time.perf_counter() - start
            logits = forward(base, adapters, inputs)
            rows.append({
                "variant": "NF4 (+ LoRA, B = 0)" if variant.init == "kaiming" else variant.name,
                "rank": "-" if variant.init == "kaiming" else rank,
                "init": variant.init,
                "rounds": variant.rounds,
                "build_s": built_s,
                **weight_error(params, base, adapters),
                **logit_error(logits, reference),
                "loss": loss(logits),
            })  # fmt: skip
    plain = rows[1]
    for row in rows[1:]:
        row["weight_vs_nf4"] = row["weight_rel_error"] / plain["weight_rel_error"]
        row["logit_vs_nf4"] = row["logit_rel_error"] / plain["logit_rel_error"]
    return rows


# --------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One variant's fine-tune: its compiled step and what it measured."""

    variant: Variant
    base: Any
    adapters: Any
    step: Any
    state: Any
    tokens: Any
    row: dict[str, Any] = dataclasses.field(default_factory=dict)

    def timed_step(self) -> Any:
        """One step on fixed arguments (for timing; the state is not kept)."""
        return self.step(self.adapters, self.state, self.base, self.tokens)


def base_bytes(base: Any) -> int:
    """Bytes of the targeted weights as stored (NF4 codes and absmaxes, or floats)."""
    return sum(
        x.nbytes() if callable(getattr(x, "nbytes", None)) else int(x.nbytes)
        for x in target_kernels(base).values()
    )


def finetune(
    runs: list[Run],
    batches: list[Any],
    eval_at: Sequence[int],
    evaluate: Callable[[Any, Any], dict[str, float]],
) -> None:
    """Train each run on the same batches; ``evaluate(base, adapters)`` at ``eval_at``."""
    for run in runs:
        adapters, state, curve, train = run.adapters, run.state, {}, []
        for i in common.bar(range(len(batches) + 1), desc=run.variant.name):
            if i in eval_at:
                curve[i] = evaluate(run.base, adapters)
            if i < len(batches):
                adapters, state, value = run.step(adapters, state, run.base, batches[i])
                train.append(float(value))
        run.row.update(curve=curve, train_losses=train)


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def num(value: Any, digits: int = 4) -> str:
    """A number in ``digits`` significant figures; a string as it is; None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}g}"


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """A Markdown table of ``(key, header)`` columns, numbers as :func:`num` writes them."""
    cells = [{key: num(row.get(key)) for key, _ in columns} for row in rows]
    print(common.table(cells, [(key, header, "") for key, header in columns]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (CI)")
    parser.add_argument("--ranks", help="ranks of the error table (default 8,16; quick 8)")
    parser.add_argument("--rank", type=int, default=8, help="rank of the fine-tune")
    parser.add_argument("--rounds", type=int, default=4, help="LoftQ rounds of the K variant")
    parser.add_argument("--successors", type=int, default=4, help="successors per token")
    parser.add_argument("--pretrain-steps", type=int, help="full training (default 300, quick 150)")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, help="fine-tune steps (default 150, quick 60)")
    parser.add_argument("--lr", type=float, default=2e-3, help="fine-tune Adam learning rate")
    parser.add_argument(
        "--changed",
        type=float,
        default=0.25,
        help="share of the tokens whose successors the fine-tune changes",
    )
    parser.add_argument("--repeats", type=int, help="timed rounds (default 10, quick 3)")
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        help="table 1b, at the reference size (default: on; off with --quick)",
    )
    for field in ("layers", "d_model", "heads", "mlp", "vocab", "seq", "batch"):
        parser.add_argument(
            "--" + field.replace("_", "-"), type=int, help="override the trained decoder's size"
        )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="runs/benchmarks/loftq.json")
    return parser.parse_args(argv)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    common.ensure_malloc_env()
    args = parse_args(argv)
    started = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import optax

    import jlora

    config = TINY if args.quick else SMALL
    overrides = {
        f: getattr(args, f)
        for f in ("layers", "d_model", "heads", "mlp", "vocab", "seq", "batch")
        if getattr(args, f) is not None
    }
    config = dataclasses.replace(config, **overrides)  # fmt: skip
    ranks = [int(r) for r in (args.ranks or ("8" if args.quick else "8,16")).split(",")]
    pretrain_steps = args.pretrain_steps or (150 if args.quick else 300)
    steps = args.steps or (60 if args.quick else 150)
    repeats = args.repeats or (3 if args.quick else 10)
    if args.reference is None:
        args.reference = not args.quick
    chosen = variants(args.rounds)
    keys = jax.random.split(jax.random.key(args.seed), 6)
    key_task, key_model, key_pretrain, key_eval, key_lora, key_data = keys
    length, eval_batch = config.seq + 1, 4 * config.batch  # eval: 4 batches

    # ---- 1. a float model worth quantizing ----------------------------------------------
    probs, shifted, moved = chains(config.vocab, args.successors, args.changed, key_task)
    model = GPT(config)
    # Held-out batches of 4 training batches each (one sampler compilation).
    eval_pre, eval_ft = (
        jnp.concatenate([sample(chain, jax.random.fold_in(key_eval, 4 * j + i), config.batch,
                                length) for i in range(4)])
        for j, chain in enumerate((probs, shifted))
    )  # fmt: skip
    params = jax.jit(model.init)(key_model, eval_pre[:, :-1])
    start = time.perf_counter()
    params, pre_losses = pretrain(model, params, probs, config, pretrain_steps, args.pretrain_lr,
                                  key_pretrain)  # fmt: skip
    pretrain_s = time.perf_counter() - start

    # ---- 2. quantization error ----------------------------------------------------------
    forward = jax.jit(jlora.lora(model.apply))  # one compilation per base structure
    pre_eval = lambda logits: chain_losses(logits, eval_pre, probs, moved)["all"]
    errors = error_rows(model, params, eval_pre, ranks, chosen, key_lora, forward, pre_eval)
    reference_rows = None
    if args.reference:
        ref_model = GPT(REFERENCE)
        ref_tokens = batch_of_tokens(REFERENCE, key_eval)
        ref_params = jax.jit(ref_model.init)(key_model, ref_tokens[:, :-1])
        reference_rows = error_rows(ref_model, ref_params, ref_tokens, ranks, chosen, key_lora,
                                    jax.jit(jlora.lora(ref_model.apply)))  # fmt: skip
        del ref_params

    # ---- 3. the fine-tune ---------------------------------------------------------------
    batches = [sample(shifted, jax.random.fold_in(key_data, i), config.batch, length)
               for i in range(steps)]  # fmt: skip
    apply_lora = jlora.lora(model.apply)

    def loss(adapters, base, tokens):
        return next_token_loss(apply_lora(base, adapters, tokens[:, :-1]), tokens)

    def evaluate(base, adapters):
        return chain_losses(forward(base, adapters, eval_ft[:, :-1]), eval_ft, shifted, moved)

    runs, cache, compiled = [], {}, {}
    float_logits = None
    for variant in chosen:
        base, adapters = build(variant, args.rank, params, model, batches[0][:, :-1], key_lora,
                               cache)  # fmt: skip
        # One adapters structure, so one optimizer serves every variant, and the NF4
        # variants share one compiled step.
        tx = jlora.optimizer(optax.adam(args.lr), adapters)
        if variant.base not in compiled:
            compiled[variant.base] = compiled_step(loss, tx, adapters, base, batches[0])
        step = compiled[variant.base]
        runs.append(Run(variant, base, adapters, step, tx.init(adapters), batches[0]))
        logits = forward(base, adapters, eval_pre[:, :-1])
        float_logits = logits if float_logits is None else float_logits
        runs[-1].row.update(variant=variant.name, base_bytes=base_bytes(base),
                            **common.xla_stats(step), **weight_error(params, base, adapters),
                            **logit_error(logits, float_logits))  # fmt: skip
    summary = jlora.summary(runs[1].base, runs[1].adapters)
    eval_at = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps})
    start = time.perf_counter()
    finetune(runs, batches, eval_at, evaluate)
    finetune_s = time.perf_counter() - start
    times, _ = common.interleaved({r.variant.name: r.timed_step for r in runs}, repeats=repeats)
    for run in runs:
        curve, float_curve = run.row["curve"], runs[0].row["curve"]
        run.row.update(
            loss_0=curve[0]["all"], loss_half=curve[steps // 2]["all"],
            loss_end=curve[steps]["all"], kept_end=curve[steps]["kept"],
            changed_end=curve[steps]["changed"],
            gap_end=curve[steps]["all"] - float_curve[steps]["all"],
            step_ms=1e3 * statistics.median(times[run.variant.name]),
            time_vs_float=common.median_ratio(times, run.variant.name, chosen[0].name),
            base_mb=run.row["base_bytes"] / 2**20,
            argument_mb=run.row["argument_bytes"] / 2**20,
            temp_mb=run.row["temp_bytes"] / 2**20, gflops=run.row["flops"] / 1e9,
        )  # fmt: skip

    # ---- report ---------------------------------------------------------------------------
    entropy_pre = chain_losses(float_logits, eval_pre, probs, moved)["entropy"]
    entropy_ft = runs[0].row["curve"][0]["entropy"]
    print(f"\ntrained model: GPT (benchmarks/models.py) at {config}; smaller than the "
          f"reference size ({REFERENCE.layers} layers, d_model {REFERENCE.d_model}, vocab "
          f"{REFERENCE.vocab}) so that the training fits in minutes on a CPU")  # fmt: skip
    print(f"task: a random Markov chain, {args.successors} successors per token; loss − H = "
          f"cross-entropy against the true next-token distribution minus its entropy "
          f"(H = {entropy_pre:.4f} nats), i.e. KL(chain || model), 0 at best")  # fmt: skip
    print(f"pretraining: all parameters, Adam {args.pretrain_lr:g}, {pretrain_steps} steps of "
          f"{config.batch} sequences, soft targets: train loss {pre_losses[0]:.3f} -> "
          f"{statistics.mean(pre_losses[-10:]):.3f} (mean of the last 10) in {pretrain_s:.0f} s; "
          f"held-out loss − H of the float model {errors[0]['loss']:.4f}")  # fmt: skip
    print(f"\n1. quantization error before training (the pretrained model; held-out batch of "
          f"{eval_batch} x {config.seq}; alpha = 2 rank)")  # fmt: skip
    error_columns = [
        ("variant", "variant"),
        ("rank", "rank"),
        ("weight_rel_error", "weight rel. error"),
        ("weight_vs_nf4", "/ NF4"),
        ("logit_rel_error", "logit rel. error"),
        ("logit_vs_nf4", "/ NF4"),
        ("kl_from_float", "KL(float || variant)"),
        ("loss", "loss − H"),
        ("build_s", "build s (with compile)"),
    ]
    print_table(errors, error_columns)
    if reference_rows is not None:
        print(f"\n1b. the same at the reference size ({REFERENCE}), random init, random tokens")
        print_table(reference_rows, [c for c in error_columns if c[0] != "loss"])
    print(f"\n2. fine-tune on the shifted chain ({args.changed:.0%} of the tokens with new "
          f"successors; H = {entropy_ft:.4f}): rank {args.rank}, alpha {2 * args.rank}, Adam "
          f"{args.lr:g}, {steps} steps of {config.batch} sequences, held-out loss − H on "
          f"{eval_batch} sequences; {finetune_s:.0f} s")  # fmt: skip
    print(f"   NF4 + LoRA: {summary}")
    print_table([r.row for r in runs], [
        ("variant", "variant"),
        ("weight_rel_error", "weight rel. error"),
        ("logit_rel_error", "logit rel. error"),
        ("loss_0", "loss − H, step 0"),
        ("loss_half", f"step {steps // 2}"),
        ("loss_end", f"step {steps}"),
        ("gap_end", "− float"),
        ("kept_end", "kept tokens"),
        ("changed_end", "changed tokens"),
    ])  # fmt: skip
    print(f"\n3. the compiled train step (XLA's counts; times: {repeats} interleaved rounds)")
    print_table([r.row for r in runs], [
        ("variant", "variant"),
        ("base_mb", "targeted base MB"),
        ("argument_mb", "XLA argument MB"),
        ("temp_mb", "XLA temp MB"),
        ("gflops", "XLA GFLOPs"),
        ("step_ms", "median step ms"),
        ("time_vs_float", "/ float (median of rounds)"),
    ])  # fmt: skip

    failures = []
    plain = errors[1]["weight_rel_error"]
    for row in errors[2:]:
        if not row["weight_rel_error"] < plain:
            failures.append(
                f"{row['variant']} at rank {row['rank']}: weight error "
                f"{row['weight_rel_error']:.5f} is not below NF4's {plain:.5f}"
            )
    for failure in failures:
        print("FAILED:", failure)
    if not failures:
        print("\nOK: LoftQ's weight error is below plain NF4's at every rank")
    total_s = time.perf_counter() - started
    print(f"total {total_s:.0f} s")
    common.write_json(args.json, {
        "environment": common.environment(),
        "config": dataclasses.asdict(config),
        "args": vars(args),
        "pretrain": {"steps": pretrain_steps, "losses": pre_losses, "seconds": pretrain_s},
        "errors": errors,
        "reference_errors": reference_rows,
        "finetune": {"rank": args.rank, "steps": steps, "eval_at": eval_at,
                     "rows": [r.row for r in runs]},
        "times": times,
        "failures": failures,
        "total_s": total_s,
    })  # fmt: skip
    print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
