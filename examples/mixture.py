"""A mixture of LoRA experts (MoLoRA) against one LoRA of the same total rank.

Four synthetic regression tasks share one frozen base, a small Flax Linen MLP with
random weights. An input is 16 standard normal features followed by its task's one-hot
code (so the task can be read from the input, but a fresh router, whose weights are
small, hardly sees it), and its target is the base's output plus the task's own
correction: a different random nonlinear map of the features per task. Two adapters
of the same total rank are trained on the four tasks together, on the same three Dense
kernels, for the same number of full-batch Adam steps:

* one plain LoRA of rank ``E·r = 8``;
* a mixture of ``E = 4`` LoRA experts of rank ``r = 2``, with a router per weight that
  sends each example to its ``top_k = 2`` most probable experts
  (``LoraSpec(experts=4, top_k=2)``), trained with ``0.01 * balance_loss`` added (the
  Switch load-balancing loss that ``jlora.lora(fn, aux=True)`` returns beside the
  outputs).

The program prints the test loss per task (base, LoRA, MoLoRA) with the trainable
parameter counts, and each task's routing histogram at the first layer (whose router
reads the input itself), fresh and trained; it plots the histograms to ``routing.png``
and checks three claims, exiting non-zero if one fails:

* the fresh mixture (every B zero) gives the base output exactly;
* the trained mixture's loss is below the base's on every task;
* the router learned the task: the mutual information between an example's task and
  the experts the first layer sends it to rose by at least 0.2 bits in training.

Which of the two adapters fits the tasks better is reported, not claimed.

    python examples/mixture.py            # full run, about a minute on one CPU core
    python examples/mixture.py --quick    # fewer steps and examples (for CI)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import jlora

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TASKS, FEATURES, WIDTH, OUT = 4, 16, 64, 8
IN = FEATURES + TASKS  # the features, then the task's one-hot code
CODE = 1.0  # the code's scale: the fresh router barely sees it, a trained one must
EXPERTS, RANK = 4, 2  # the mixture; the plain LoRA gets rank EXPERTS * RANK
TARGETS = ["dense_0", "dense_1", "head"]
BALANCE = 0.01  # weight of the balance loss in the mixture's training loss


class MLP(nn.Module):
    """IN inputs -> two hidden layers -> OUT outputs."""

    @nn.compact
    def __call__(self, x_BxI):
        x = nn.gelu(nn.Dense(WIDTH, name="dense_0")(x_BxI))
        x = nn.gelu(nn.Dense(WIDTH, name="dense_1")(x))
        return nn.Dense(OUT, name="head")(x)


def make_tasks(apply, params, n: int, seed: int):
    """``(x, y, task)`` for ``n`` examples per task, train and test.

    ``x`` is ``FEATURES`` standard normal features then the task's one-hot code; ``y`` is
    the base's output plus the task's own map of the features, ``tanh(2·z·U_t)·V_t``.
    """
    rng = np.random.default_rng(seed)
    maps_in = rng.normal(size=(TASKS, FEATURES, 8)) / np.sqrt(FEATURES)
    maps_out = rng.normal(size=(TASKS, 8, OUT)) / np.sqrt(8)

    def draw(count):
        task = np.repeat(np.arange(TASKS), count)
        z = rng.normal(size=(len(task), FEATURES))
        hidden = np.tanh(2 * np.einsum("bi,bih->bh", z, maps_in[task]))
        change = np.einsum("bh,bho->bo", hidden, maps_out[task])
        x = np.concatenate([z, CODE * np.eye(TASKS)[task]], axis=-1).astype(np.float32)
        y = np.asarray(apply(params, x)) + change.astype(np.float32)
        return x, y, task

    return draw(n), draw(n)


def per_task_mse(outputs, y, task) -> np.ndarray:
    err = np.mean((np.asarray(outputs) - y) ** 2, axis=-1)
    return np.array([err[task == t].mean() for t in range(TASKS)])


def train(apply, params, adapters, x, y, steps: int, lr: float):
    """Full-batch Adam on the adapters (router included); returns them and the last loss."""
    fn = jlora.lora(apply, aux=True)
    tx = jlora.optimizer(optax.adam(lr), adapters)
    opt_state = tx.init(adapters)

    def loss_fn(adapters):
        outputs, aux = fn(params, adapters, x)
        mse = jnp.mean((outputs - y) ** 2)
        return mse + BALANCE * aux["balance_loss"], (mse, aux["balance_loss"])

    @jax.jit
    def step(adapters, opt_state):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, metrics

    metrics = None
    for _ in range(steps):
        adapters, opt_state, metrics = step(adapters, opt_state)
    return adapters, tuple(float(m) for m in metrics)


def routing(node: jlora.MixtureAdapter, x, task) -> np.ndarray:
    """``(TASKS, EXPERTS)``: each task's share of the routing at a layer fed by ``x``."""
    _, _, assignments = node.gates(jnp.asarray(x) @ node.router)
    assignments = np.asarray(assignments)
    return np.stack([assignments[task == t].mean(0) for t in range(TASKS)])


def task_information(route: np.ndarray) -> float:
    """Mutual information (bits) between an example's task and the experts it is sent to.

    0 for a router blind to the task (a collapsed one included); at most
    ``log2(EXPERTS / k)`` bits with top-k routing.
    """
    joint = route / TASKS  # p(task, expert): the tasks are equally frequent
    expert = joint.sum(0, keepdims=True)
    terms = joint * np.log2(np.where(joint > 0, joint, 1.0) / np.maximum(expert / TASKS, 1e-30))
    return float(np.sum(terms))


def plot(path: pathlib.Path, before: np.ndarray, after: np.ndarray, k: int):
    fig, axes = plt.subplots(1, TASKS, figsize=(3 * TASKS, 3), sharey=True)
    experts = np.arange(EXPERTS)
    for t, ax in enumerate(axes):
        ax.bar(experts - 0.2, before[t], 0.4, label="fresh", color="lightgray")
        ax.bar(experts + 0.2, after[t], 0.4, label="trained", color=f"C{t}")
        ax.set(title=f"task {t}", xticks=experts, xlabel="expert", ylim=(0, 1.05 / k))
    axes[0].set_ylabel(f"share of top-{k} assignments")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("dense_0: routing histogram per task (MoLoRA 4x2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trainable(adapters) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(adapters))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2048, help="train examples per task")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps per adapter")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--top-k",
        type=int,
        default=2,
        help="experts per example (0: all, by the softmax; 1: Switch's gate, the top "
        "probability)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/mixture"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer steps (for CI)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.quick:
        args.examples, args.steps = min(args.examples, 512), min(args.steps, 300)
    args.out.mkdir(parents=True, exist_ok=True)

    model = MLP()
    apply = model.apply
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, IN)))
    (x, y, _), (x_test, y_test, task_test) = make_tasks(apply, params, args.examples, args.seed)
    print(f"{TASKS} tasks x {args.examples} train / {args.examples} test examples; {IN} inputs")

    key_lora, key_mix = jax.random.split(jax.random.key(args.seed + 1))
    lora_spec = jlora.LoraSpec(rank=EXPERTS * RANK, alpha=2.0 * EXPERTS * RANK, targets=TARGETS)
    mix_spec = jlora.LoraSpec(
        rank=RANK, alpha=2.0 * RANK, targets=TARGETS, experts=EXPERTS, top_k=args.top_k
    )
    lora = jlora.init(lora_spec, params, key_lora, fn=apply, args=(x[:1],))
    mix = jlora.init(mix_spec, params, key_mix, fn=apply, args=(x[:1],))

    base_out = apply(params, x_test)
    fresh_out, _ = jlora.lora(apply, aux=True)(params, mix, x_test)
    fresh_equal = bool(jnp.array_equal(fresh_out, base_out))
    route_before = routing(mix["params"]["dense_0"]["kernel"], x_test, task_test)

    lora, (lora_mse, _) = train(apply, params, lora, x, y, args.steps, args.lr)
    mix, (mix_mse, balance) = train(apply, params, mix, x, y, args.steps, args.lr)

    base_loss = per_task_mse(base_out, y_test, task_test)
    lora_loss = per_task_mse(jlora.lora(apply)(params, lora, x_test), y_test, task_test)
    mix_loss = per_task_mse(jlora.lora(apply)(params, mix, x_test), y_test, task_test)
    route_after = routing(mix["params"]["dense_0"]["kernel"], x_test, task_test)

    # ---- report -------------------------------------------------------------------------
    print(f"LoRA r={EXPERTS * RANK}:   {jlora.summary(params, lora)}")
    print(f"MoLoRA {EXPERTS}x{RANK}: {jlora.summary(params, mix)}")
    print(
        f"last train MSE: LoRA {lora_mse:.4f}, MoLoRA {mix_mse:.4f} "
        f"(balance loss {balance:.3f}; 1.0 is balanced)"
    )
    lora_name, mix_name = f"LoRA r={EXPERTS * RANK}", f"MoLoRA {EXPERTS}x{RANK}"
    print(f"\ntest MSE per task ({args.steps} Adam steps each)")
    print(f"task      base  {lora_name:>10}  {mix_name:>10}")
    for t in range(TASKS):
        print(f"  {t}   {base_loss[t]:7.4f}  {lora_loss[t]:10.4f}  {mix_loss[t]:10.4f}")
    print(f"  mean {base_loss.mean():7.4f}  {lora_loss.mean():10.4f}  {mix_loss.mean():10.4f}")
    print(f"trainable   {0:7d}  {trainable(lora):10d}  {trainable(mix):10d}")

    k = args.top_k or 1  # experts each example is assigned to
    info_before, info_after = task_information(route_before), task_information(route_after)
    print(f"\nrouting at dense_0: share of each task's top-{k} assignments per expert")
    print("task " + "".join(f"{f'e{e}':>6}" for e in range(EXPERTS)))
    for t in range(TASKS):
        for name, route in (("fresh", route_before), ("trained", route_after)):
            print(f"  {t}  " + "".join(f"{share:6.2f}" for share in route[t]) + f"  ({name})")
    print(
        f"information the routing carries about the task: {info_before:.2f} bits fresh -> "
        f"{info_after:.2f} bits trained (at most {np.log2(EXPERTS / k):.2f})"
    )

    plot(args.out / "routing.png", route_before, route_after, k)
    print(f"\nfresh mixture == base: {fresh_equal}")
    print(f"plot in {args.out / 'routing.png'}; total {time.perf_counter() - started:.0f} s")

    failures = []
    if not fresh_equal:
        failures.append("the fresh mixture does not give the base output exactly")
    else:
        print("OK: the fresh mixture gives the base output exactly")
    worse = [t for t in range(TASKS) if not mix_loss[t] < base_loss[t]]
    if worse:
        failures.append(f"the trained mixture is not below the base on tasks {worse}")
    else:
        print("OK: the trained mixture's loss is below the base's on every task")
    if not info_after >= info_before + 0.2:
        failures.append(
            f"the routing did not learn the task ({info_before:.2f} -> {info_after:.2f} bits)"
        )
    else:
        print(
            f"OK: the routing learned the task ({info_before:.2f} -> {info_after:.2f} bits "
            "about it at dense_0)"
        )
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
