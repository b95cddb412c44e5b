"""Low rank by SVD: a fine-tune's delta against a random matrix, extraction, compression.

A small Flax Linen MLP classifier (32 inputs, two hidden layers of 64, 8 classes) is
pretrained on a synthetic task A, then fine-tuned in full (every weight, Adam) on a
related task B: task A's hidden rule plus a term in two more input directions, which
relabels about a third of the inputs. The data are generated, nothing is downloaded.
The program then shows four things:

1. **Spectra.** The singular values of each Dense kernel's delta ``W_tuned - W_base``
   (``jlora.spectrum``), of a Gaussian matrix of the same shape scaled to the same
   Frobenius norm, and of the tuned weight itself; the share of ``Σσ²`` each keeps
   at a few ranks, and the ranks that keep 90 %, 95 % and 99 %.
2. **Extraction.** ``jlora.extract`` at ranks 1, 2, 4, ... up to full rank (a layer's
   rank is capped at its ``min(in, out)``; the biases' changes are copied whole):
   task-B accuracy of base + extracted adapter, its logit distance to the tuned
   model, and the weight error against Eckart–Young's prediction from the spectrum.
3. **Compression.** ``jlora.compress`` of the tuned model's two hidden kernels to
   ``LowRankWeight`` pairs at ranks 2, 4, 8, 16 (``--quick``: 2, 4, 8), which
   ``jlora.lora`` runs factored, then a short distillation to the uncompressed
   model's logits on unlabelled inputs, two ways: training the pairs themselves (with
   the head and biases; the parameter count stays the same), and training a rank-4
   LoRA on top of the frozen compressed weights. Parameters (``jlora.summary``)
   against quality.
4. **The arithmetic.** A 4×5 weight has 20 numbers; a rank-2 factorization holds
   ``r·(in + out) = 18``: the table of ``r`` against ``r·(in + out)`` and ``in·out``,
   where low rank stops saving, checked on a real ``jlora.compress`` of a 4×5 matrix.

It plots spectra, energy curves, extraction and compression to one PNG and checks
these claims, exiting non-zero if one fails:

* at every layer the delta needs fewer components than the random matrix for 90 %
  of its energy;
* the extraction's logit distance to the tuned model falls at every step up in rank,
  and full rank gives the tuned model back (distance below 1e-4);
* ``jlora.spectrum`` is numpy's SVD of the delta, and the extraction's weight error
  is Eckart–Young's ``sqrt(Σ_{i>r} σ_i² / Σσ²)``;
* at every rank, both distillations bring the compressed model closer to the
  uncompressed one than compression alone;
* a rank-2 ``jlora.compress`` of a 4×5 weight holds 18 numbers.

How close the distilled models come, and which of the two ways is better, is
reported, not claimed.

    python examples/svd_lowrank.py            # full run, a few minutes on one CPU core
    python examples/svd_lowrank.py --quick    # fewer steps and examples (for CI)
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import jlora

matplotlib.use("Agg")
import matplotlib.pyplot as plt

IN, WIDTH, CLASSES = 32, 64, 8
RULE, EXTRA = 4, 2  # hidden units of the task rule; input directions task B adds
TARGETS = ("dense_0", "dense_1", "head")
COMPRESSED = ("dense_0", "dense_1")  # the head (64×8) is small: left dense
BIASES = ".*/bias"
ENERGIES = (0.90, 0.95, 0.99)
EXTRACT_RANKS = (1, 2, 4, 8, 16, 32, 64)  # capped per layer at min(in, out)
COMPRESS_RANKS = (2, 4, 8, 16)
LORA_RANK = 4  # the LoRA trained on top of the compressed weights


class MLP(nn.Module):
    """IN features -> two hidden layers -> CLASSES logits."""

    @nn.compact
    def __call__(self, x_BxI):
        x = nn.gelu(nn.Dense(WIDTH, name="dense_0")(x_BxI))
        x = nn.gelu(nn.Dense(WIDTH, name="dense_1")(x))
        return nn.Dense(CLASSES, name="head")(x)


# -- data -----------------------------------------------------------------------------------


def make_rules(seed: int):
    """``label(x, task)``: task A's class is the argmax of a random tanh network of
    ``x``; task B adds a term in ``EXTRA`` more input directions, so that about a
    third of the labels change."""
    rng = np.random.default_rng(seed)
    rule_in = 2.0 * rng.normal(size=(IN, RULE)) / math.sqrt(IN)
    rule_out = 3.0 * rng.normal(size=(RULE, CLASSES)) / math.sqrt(RULE)
    extra_in = 2.0 * rng.normal(size=(IN, EXTRA)) / math.sqrt(IN)
    extra_out = rng.normal(size=(EXTRA, CLASSES))

    def label(x: np.ndarray, task: str) -> np.ndarray:
        logits = np.tanh(x @ rule_in) @ rule_out
        if task == "B":
            logits = logits + np.tanh(x @ extra_in) @ extra_out
        return np.argmax(logits, axis=-1).astype(np.int32)

    return label


def inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(size=(n, IN)).astype(np.float32)


# -- training -------------------------------------------------------------------------------


def cross_entropy(logits_BxC, labels_B) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean()


def train_full(apply, params, x, y, steps: int, lr: float, desc: str):
    """Full-batch Adam on every parameter (pretraining, and the full fine-tune)."""
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(apply(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False):
        params, opt_state, _ = step(params, opt_state)
    return params


def distil_pairs(apply, small, x, teacher, steps: int, lr: float, desc: str):
    """Train the compressed model itself to the teacher's logits: the ``LowRankWeight``
    pairs' ``u`` and ``v`` are leaves of ``small``, so Adam trains them with the head
    and the biases; the parameter count does not change."""
    model = jlora.lora(apply)  # runs each pair factored, as (x·u)·v
    tx = optax.adam(lr)
    opt_state = tx.init(small)

    def loss_fn(params):
        return jnp.mean((model(params, {}, x) - teacher) ** 2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False):
        small, opt_state, _ = step(small, opt_state)
    return small


def distil_lora(apply, small, x, teacher, steps: int, lr: float, seed: int, desc: str):
    """Train a rank-``LORA_RANK`` LoRA on top of the frozen compressed weights to the
    teacher's logits; returns the adapters."""
    spec = jlora.LoraSpec(rank=LORA_RANK, alpha=2.0 * LORA_RANK, targets=list(COMPRESSED))
    adapters = jlora.init(spec, small, jax.random.key(seed))
    model = jlora.lora(apply)
    tx = jlora.optimizer(optax.adam(lr), adapters)
    opt_state = tx.init(adapters)

    def loss_fn(adapters):
        return jnp.mean((model(small, adapters, x) - teacher) ** 2)

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False):
        adapters, opt_state, _ = step(adapters, opt_state)
    return adapters


# -- measures -------------------------------------------------------------------------------


def kernel(params, name: str) -> np.ndarray:
    return np.asarray(params["params"][name]["kernel"], np.float64)


def coverage(sigma: np.ndarray) -> np.ndarray:
    """The energy curve: ``cumsum(σ²) / Σσ²``, the share a rank-``r`` truncation keeps."""
    power = np.square(sigma.astype(np.float64))
    return np.cumsum(power) / np.sum(power)


def rank_for(sigma: np.ndarray, energy: float) -> int:
    """The smallest ``r`` that keeps ``energy`` of ``Σσ²``."""
    return int(np.argmax(coverage(sigma) >= energy - 1e-12)) + 1


def accuracy(logits, labels) -> float:
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == labels))


def distance(logits, reference) -> float:
    """Relative logit distance ``‖f − f_ref‖ / ‖f_ref‖`` over the test set."""
    diff = np.asarray(logits, np.float64) - np.asarray(reference, np.float64)
    return float(np.linalg.norm(diff) / np.linalg.norm(np.asarray(reference, np.float64)))


def count(tree: Any) -> int:
    """Numbers held by a params tree: a ``LowRankWeight`` counts its ``r·(in + out)``."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda n: isinstance(n, jlora.LowRankWeight))
    return sum(
        n.param_count() if isinstance(n, jlora.LowRankWeight) else int(np.prod(n.shape))
        for n in leaves
    )


def extract_at(base, tuned, rank: int, limits: dict[str, int]):
    """``jlora.extract`` at ``min(rank, min(in, out))`` per layer (one call per layer, as
    a rank above a layer's limit is refused), the biases' changes copied whole."""
    adapters: dict[str, Any] = {"params": {}}
    for name in TARGETS:
        part = jlora.extract(
            base, tuned, rank=min(rank, limits[name]), targets=[name], trainable=BIASES
        )
        adapters["params"][name] = part["params"][name]  # its kernel and bias
    return adapters


# -- the 4×5 arithmetic ---------------------------------------------------------------------


def arithmetic(d_in: int, d_out: int, seed: int) -> tuple[list[str], int]:
    """The printed table of ``r`` against ``r·(in + out)`` and ``in·out``, and the
    ``param_count()`` of a real rank-2 ``jlora.compress`` of a random ``d_in × d_out``."""
    dense = d_in * d_out
    even = dense / (d_in + d_out)  # r·(in + out) = in·out here
    lines = [
        f"a {d_in}×{d_out} weight holds in·out = {dense} numbers; "
        f"a rank-r pair U·V holds r·(in + out) = r·{d_in + d_out}",
        "   r   r·(in+out)   in·out   share",
    ]
    for r in range(1, min(d_in, d_out) + 1):
        low = r * (d_in + d_out)
        note = "saves" if low < dense else "no saving"
        lines.append(f"  {r:2d}   {low:10d}   {dense:6d}   {100 * low / dense:4.0f} %  {note}")
    stop = math.ceil(even)  # the first r with r·(in + out) >= in·out
    lines.append(
        f"low rank saves only while r < in·out/(in + out) = {dense}/{d_in + d_out} = "
        f"{even:.2f}: from r = {stop} on, r·(in + out) >= in·out"
    )
    w = jax.random.normal(jax.random.key(seed), (d_in, d_out))
    node = jlora.compress({"w": w}, "w", rank=2)["w"]
    lines.append(
        f"jlora.compress of a random {d_in}×{d_out} at r = 2: u {tuple(node.u.shape)}, "
        f"v {tuple(node.v.shape)}, param_count() = {node.param_count()}; "
        f"summary: {jlora.summary({'w': node}, {})}"
    )
    return lines, node.param_count()


# -- the figure -----------------------------------------------------------------------------


def plot(path: pathlib.Path, spectra: dict, extraction: dict, compression: dict, dense: int):
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    styles = {"delta": "-", "random": "--", "weight": ":"}
    labels = {"delta": "fine-tune delta", "random": "random, same norm", "weight": "tuned W"}

    ax = axes[0, 0]
    for i, name in enumerate(TARGETS):
        for kind in ("delta", "random"):
            sigma = spectra[name][kind]
            ax.semilogy(np.arange(1, len(sigma) + 1), sigma, styles[kind], color=f"C{i}")
    ax.set(xlabel="index i", ylabel="singular value σ_i", title="spectra of the deltas")
    ax.set_xscale("log", base=2)
    handles = [plt.Line2D([], [], color=f"C{i}", label=n) for i, n in enumerate(TARGETS)]
    handles += [
        plt.Line2D([], [], color="k", linestyle=styles[k], label=labels[k])
        for k in ("delta", "random")
    ]
    ax.legend(handles=handles, fontsize=8, loc="lower left")

    ax = axes[0, 1]
    for i, name in enumerate(TARGETS):
        for kind in ("delta", "random", "weight"):
            curve = coverage(spectra[name][kind])
            ax.plot(np.arange(1, len(curve) + 1), curve, styles[kind], color=f"C{i}")
    for energy in ENERGIES:
        ax.axhline(energy, color="lightgray", linewidth=0.8, zorder=0)
    ax.set(xlabel="rank r", ylabel="share of Σσ² kept", title="energy coverage", ylim=(0, 1.02))
    ax.set_xscale("log", base=2)
    handles = [plt.Line2D([], [], color=f"C{i}", label=n) for i, n in enumerate(TARGETS)]
    handles += [plt.Line2D([], [], color="k", linestyle=styles[k], label=labels[k]) for k in styles]
    ax.legend(handles=handles, fontsize=8, loc="lower right")

    ax = axes[1, 0]
    ranks = list(extraction)
    ax.semilogy(ranks, [extraction[r]["distance"] for r in ranks], "o-", label="logit distance")
    ax.semilogy(ranks, [extraction[r]["weight"] for r in ranks], "s--", label="weight error")
    ax.set(xlabel="rank r (per layer, capped at min(in, out))")
    ax.set(ylabel="relative to the tuned model", title="extraction: base + extract(rank=r)")
    ax.set_xscale("log", base=2)
    twin = ax.twinx()
    accuracy_line = twin.plot(
        ranks, [100 * extraction[r]["accuracy"] for r in ranks], "^:", color="C2",
        label="task-B accuracy (right)",
    )  # fmt: skip
    twin.set_ylabel("task-B test accuracy (%)", color="C2")
    handles = ax.get_legend_handles_labels()[0] + accuracy_line
    ax.legend(handles=handles, fontsize=8, loc="center left")

    ax = axes[1, 1]
    rows = list(compression.values())
    for key, marker, label in (
        ("compressed", "o-", "compressed"),
        ("pairs", "s-", "+ distilled (the pairs)"),
        ("lora", "^-", f"+ distilled (LoRA r={LORA_RANK} on top)"),
    ):
        ax.semilogy([row[f"{key}_params"] for row in rows], [row[key] for row in rows], marker,
                    label=label)  # fmt: skip
    for rank, row in compression.items():
        ax.annotate(f"r={rank}", (row["compressed_params"], row["compressed"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))  # fmt: skip
    ax.axvline(dense, color="gray", linewidth=0.8)
    ax.text(dense, 0.5, "dense model ", transform=ax.get_xaxis_transform(), ha="right",
            rotation=90, fontsize=8, color="gray")  # fmt: skip
    ax.set(xlabel="parameters (jlora.summary: all params)",
           ylabel="logit distance to the tuned model",
           title="compression of dense_0, dense_1, then distillation")  # fmt: skip
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=8192, help="task-A training examples")
    parser.add_argument("--tune-examples", type=int, default=2048, help="task-B training set")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--tune-steps", type=int, default=200, help="full fine-tune steps")
    parser.add_argument("--distil-steps", type=int, default=500, help="per rank and way")
    parser.add_argument("--distil-lr", type=float, default=3e-3)
    parser.add_argument(
        "--ranks", type=int, nargs="+", default=list(COMPRESS_RANKS), help="compression ranks"
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/svd_lowrank"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer steps (for CI)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.quick:
        args.examples, args.tune_examples = min(args.examples, 4096), min(args.tune_examples, 1024)
        args.pretrain_steps = min(args.pretrain_steps, 400)
        args.tune_steps, args.distil_steps = min(args.tune_steps, 150), min(args.distil_steps, 100)
        args.ranks = [r for r in args.ranks if r <= 8] or args.ranks[:1]
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    label = make_rules(args.seed)
    x_a, x_b, x_test, x_distil = (
        inputs(rng, n) for n in (args.examples, args.tune_examples, 2048, args.examples)
    )
    y_a, y_b, y_test = label(x_a, "A"), label(x_b, "B"), label(x_test, "B")
    y_test_a = label(x_test, "A")
    print(
        f"task A: {len(x_a)} examples; task B: {len(x_b)} (it relabels "
        f"{100 * np.mean(y_test != y_test_a):.0f} % of inputs); {len(x_test)} test inputs"
    )

    # ---- pretrain on A, fine-tune everything on B --------------------------------------
    model = MLP()
    apply = model.apply
    init = jax.jit(model.init)(jax.random.key(args.seed), x_a[:1])  # one compilation
    base = train_full(apply, init, x_a, y_a, args.pretrain_steps, 3e-3, "pretrain on A")
    tuned = train_full(apply, base, x_b, y_b, args.tune_steps, 1e-3, "full fine-tune on B")
    base_logits, tuned_logits = jax.jit(apply)(base, x_test), jax.jit(apply)(tuned, x_test)
    print(
        f"base:  task A {100 * accuracy(base_logits, y_test_a):.1f} %, "
        f"task B {100 * accuracy(base_logits, y_test):.1f} %\n"
        f"tuned: task A {100 * accuracy(tuned_logits, y_test_a):.1f} %, "
        f"task B {100 * accuracy(tuned_logits, y_test):.1f} %  "
        f"({args.tune_steps} Adam steps on every weight)"
    )
    limits = {name: min(kernel(base, name).shape) for name in TARGETS}

    # ---- 1. spectra ---------------------------------------------------------------------
    delta_sigma = jlora.spectrum(base, tuned, targets=list(TARGETS))
    spectra: dict[str, dict[str, np.ndarray]] = {}
    noise = np.random.default_rng(args.seed + 1)
    spectrum_error = 0.0
    for name in TARGETS:
        sigma = delta_sigma[f"params/{name}/kernel"].astype(np.float64)
        delta = kernel(tuned, name) - kernel(base, name)
        random = noise.normal(size=delta.shape)
        random *= np.linalg.norm(delta) / np.linalg.norm(random)  # the same Frobenius norm
        spectra[name] = {
            "delta": sigma,
            "random": np.linalg.svd(random, compute_uv=False),
            "weight": np.linalg.svd(kernel(tuned, name), compute_uv=False),
        }
        # jlora.spectrum against numpy's float64 SVD of the delta, relative to σ_1.
        exact = np.linalg.svd(delta, compute_uv=False)
        spectrum_error = max(spectrum_error, float(np.max(np.abs(sigma - exact)) / exact[0]))
    shown = (1, 2, 4, 8)
    print("\nshare of Σσ² kept at rank r, and the rank that keeps 90 / 95 / 99 %")
    print(
        "layer     shape    matrix   "
        + "".join(f"{f'r={r}':>7}" for r in shown)
        + "   "
        + " ".join(f"{f'{round(100 * e)}%':>4}" for e in ENERGIES)
    )
    for name in TARGETS:
        shape = "×".join(map(str, kernel(base, name).shape))
        for kind in ("delta", "random", "weight"):
            sigma = spectra[name][kind]
            cells = "".join(f"{100 * coverage(sigma)[r - 1]:6.1f}%" for r in shown)
            needed = " ".join(f"{rank_for(sigma, e):4d}" for e in ENERGIES)
            print(f"{name:8s} {shape:>6s}   {kind:7s}{cells}   {needed}")

    # ---- 2. extraction ------------------------------------------------------------------
    lora_model = jax.jit(jlora.lora(apply))  # one compilation per adapter shape
    total = sum(np.sum(spectra[n]["delta"] ** 2) for n in TARGETS)
    extraction: dict[int, dict[str, float]] = {}
    print("\nextraction: base + extract(rank=r) on task B (r capped at each layer's min(in, out))")
    print("   r   adapter params   accuracy   logit dist   weight err   Eckart–Young")
    for rank in EXTRACT_RANKS:
        adapters = extract_at(base, tuned, rank, limits)
        logits = lora_model(base, adapters, x_test)
        merged = jlora.merge(base, adapters)
        error = sum(np.sum((kernel(merged, n) - kernel(tuned, n)) ** 2) for n in TARGETS)
        predicted = sum(np.sum(spectra[n]["delta"][min(rank, limits[n]) :] ** 2) for n in TARGETS)
        extraction[rank] = {
            "accuracy": accuracy(logits, y_test),
            "distance": distance(logits, tuned_logits),
            "weight": math.sqrt(error / total),
            "predicted": math.sqrt(predicted / total),
        }
        row = extraction[rank]
        trainable = jlora.summary(base, adapters).split(" ||")[0].split(": ")[1]
        print(
            f"  {rank:2d}   {trainable:>14s}   {100 * row['accuracy']:7.1f} %   "
            f"{row['distance']:10.2e}   {row['weight']:10.2e}   {row['predicted']:12.2e}"
        )
    print(
        f"  (base: accuracy {100 * accuracy(base_logits, y_test):.1f} %, logit distance "
        f"{distance(base_logits, tuned_logits):.2e}; distance: ‖f − f_tuned‖ / ‖f_tuned‖, "
        "weight error: ‖ΔW − ΔW_r‖ / ‖ΔW‖ over the three kernels)"
    )

    # ---- 3. compression, then distillation ---------------------------------------------
    teacher = apply(tuned, x_distil)
    dense_count = count(tuned)
    compression: dict[int, dict[str, float]] = {}
    print(
        f"\ncompression of {', '.join(COMPRESSED)} in the tuned model ({dense_count:,} "
        f"params dense), then {args.distil_steps} Adam steps of distillation to its logits "
        f"on {len(x_distil)} unlabelled inputs"
    )
    for rank in args.ranks:
        small = jlora.compress(tuned, list(COMPRESSED), rank=rank)
        steps, lr = args.distil_steps, args.distil_lr
        pairs = distil_pairs(apply, small, x_distil, teacher, steps, lr, f"r={rank}: the pairs")
        lora = distil_lora(
            apply, small, x_distil, teacher, steps, lr, args.seed, f"r={rank}: a LoRA on top"
        )
        results = {
            "compressed": lora_model(small, {}, x_test),
            "pairs": lora_model(pairs, {}, x_test),
            "lora": lora_model(small, lora, x_test),
        }
        row = {key: distance(logits, tuned_logits) for key, logits in results.items()}
        row |= {f"{key}_acc": accuracy(logits, y_test) for key, logits in results.items()}
        row |= {
            "compressed_params": count(small),
            "pairs_params": count(pairs),
            "lora_params": count(small) + count(lora),
        }
        if rank == args.ranks[0]:
            print(f"rank {rank}, compressed:      {jlora.summary(small, {})}")
            print(f"rank {rank}, LoRA on top:     {jlora.summary(small, lora)}")
        compression[rank] = row
    print(
        "   r    params  share   compressed          + pairs distilled   "
        f"+ LoRA r={LORA_RANK} (params)"
    )
    for rank, row in compression.items():
        cells = "   ".join(
            f"{100 * row[f'{key}_acc']:5.1f} % {row[key]:8.2e}"
            for key in ("compressed", "pairs", "lora")
        )
        numbers = row["compressed_params"]
        print(
            f"  {rank:2d}  {numbers:7,d}  {100 * numbers / dense_count:4.0f} %"
            f"   {cells}  ({row['lora_params']:,})"
        )
    print(
        f"  (tuned model: {100 * accuracy(tuned_logits, y_test):.1f} % on task B; each cell: "
        "accuracy, logit distance to the tuned model)"
    )

    # ---- 4. the arithmetic --------------------------------------------------------------
    print()
    lines, held = arithmetic(4, 5, args.seed)
    print("\n".join(lines))
    for name in TARGETS:
        d_in, d_out = kernel(base, name).shape
        print(
            f"  {name} ({d_in}×{d_out}): low rank saves while r < "
            f"{d_in * d_out / (d_in + d_out):.1f}"
        )

    plot(args.out / "svd_lowrank.png", spectra, extraction, compression, dense_count)
    print(f"\nplot in {args.out / 'svd_lowrank.png'}; total {time.perf_counter() - started:.0f} s")

    # ---- claims -------------------------------------------------------------------------
    failures = []
    spread = {n: (rank_for(spectra[n]["delta"], 0.9), rank_for(spectra[n]["random"], 0.9))
              for n in TARGETS}  # fmt: skip
    if all(delta < random for delta, random in spread.values()):
        print(
            "OK: the fine-tune delta needs fewer components than a random matrix for 90 % "
            "of its energy at every layer ("
            + ", ".join(f"{n} {d} vs {r}" for n, (d, r) in spread.items())
            + ")"
        )
    else:
        failures.append(f"a delta is not more concentrated than a random matrix: {spread}")
    ranks = list(extraction)
    distances = [extraction[r]["distance"] for r in ranks]
    rising = [
        (a, b)
        for a, b, da, db in zip(ranks, ranks[1:], distances, distances[1:])
        if not db < da and da > 1e-5  # at full rank only float32 noise is left
    ]
    full = extraction[ranks[-1]]["distance"]
    if not rising and full < 1e-4:
        print(
            f"OK: extraction's logit distance falls with rank ({distances[0]:.2e} at r=1 -> "
            f"{full:.1e} at full rank: the tuned model back)"
        )
    else:
        if rising:
            failures.append(f"extraction's distance did not fall from rank to rank at {rising}")
        if not full < 1e-4:
            failures.append(f"full-rank extraction is {full:.2e} from the tuned model")
    young = max(abs(row["weight"] - row["predicted"]) for row in extraction.values())
    if young < 1e-3 and spectrum_error < 1e-4:
        print(
            f"OK: jlora.spectrum is the delta's SVD (max |diff| {spectrum_error:.1e}·σ_1) and "
            f"extraction's weight error is Eckart–Young's (max |diff| {young:.1e})"
        )
    else:
        failures.append(
            f"jlora.spectrum is {spectrum_error:.2e}·σ_1 from numpy's SVD, or extraction's "
            f"weight error differs from Eckart–Young by {young:.2e}"
        )
    worse = [
        (rank, key)
        for rank, row in compression.items()
        for key in ("pairs", "lora")
        if not row[key] < row["compressed"]
    ]
    if not worse:
        print("OK: at every rank both distillations beat compression alone")
    else:
        failures.append(f"distillation did not beat compression alone at {worse}")
    if held == 2 * (4 + 5) < 4 * 5:
        print(f"OK: a rank-2 compression of a 4×5 weight holds 2·(4 + 5) = {held} numbers, not 20")
    else:
        failures.append(f"a rank-2 compression of a 4×5 weight holds {held}, not 2·(4 + 5)")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
