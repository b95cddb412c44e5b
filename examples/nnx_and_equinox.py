"""The same LoRA on a Flax NNX model and on an Equinox model: one function each.

jlora needs a pure function ``fn(params, x)`` and its parameter pytree. Each framework
gives one in a line:

* NNX:      ``graphdef, state = nnx.split(model)``;
            ``fn = lambda state, x: nnx.merge(graphdef, state)(x)``
* Equinox:  ``params, static = eqx.partition(model, eqx.is_array)``;
            ``fn = lambda params, x: jax.vmap(eqx.combine(params, static))(x)``

From there the code is identical for both (``pretrain`` and ``finetune`` below never
look at the framework): a small MLP is trained on a regression task, then LoRA-adapted
to a shifted task. Equinox stores ``Linear`` weights as ``(out, in)``, so ``jlora.init``
gets ``fn`` and an example input to learn that layout. Prints the loss before/after per
framework, writes a PNG, and exits non-zero unless the new-task loss went down and the
adapter off gives back the base exactly.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import jlora

matplotlib.use("Agg")
import matplotlib.pyplot as plt

IN, WIDTH = 8, 64


class NnxMLP(nnx.Module):
    """An NNX MLP with three Linear layers."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(IN, WIDTH, rngs=rngs)
        self.linear2 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.linear3 = nnx.Linear(WIDTH, 1, rngs=rngs)

    def __call__(self, x_BxI):
        x = nnx.gelu(self.linear1(x_BxI))
        x = nnx.gelu(self.linear2(x))
        return self.linear3(x)[:, 0]


def nnx_recipe(seed: int):
    """NNX: split the model into a static graph and a state pytree."""
    model = NnxMLP(nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    fn = lambda state, x: nnx.merge(graphdef, state)(x)
    return fn, state, ["linear1", "linear2"]  # the hidden layers, by module name


def equinox_recipe(seed: int):
    """Equinox: partition the model into arrays and the static rest."""
    model = eqx.nn.MLP(
        IN, "scalar", WIDTH, depth=2, activation=jax.nn.gelu, key=jax.random.key(seed)
    )
    params, static = eqx.partition(model, eqx.is_array)
    fn = lambda params, x: jax.vmap(eqx.combine(params, static))(x)
    return fn, params, r"layers/[01]/weight"  # the hidden layers, by regex


# ---- everything below is framework-agnostic --------------------------------------------


def tasks(seed: int, count: int):
    """Inputs, the base task's targets, and the new task's (a low-rank shift of it)."""
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(2, IN)).astype(np.float32) / np.sqrt(IN)
    x = rng.normal(size=(count, IN)).astype(np.float32)
    base = np.sin(2.0 * x @ u)
    new = base + np.tanh(3.0 * x @ v)
    return x, base.astype(np.float32), new.astype(np.float32)


def mse(prediction, target) -> jax.Array:
    return jnp.mean((prediction - target) ** 2)


def pretrain(fn, params, x, y, steps: int, name: str):
    """Full training of the base on the first task."""
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: mse(fn(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in tqdm(range(steps), desc=f"{name}: base", unit="step", leave=False):
        params, opt_state, _ = step(params, opt_state)
    return params


def finetune(fn, params, targets, x, y, steps: int, rank: int, seed: int, name: str):
    """LoRA on the named layers of the frozen base, towards the second task."""
    spec = jlora.LoraSpec(rank=rank, alpha=2.0 * rank, targets=targets)
    adapters = jlora.init(spec, params, jax.random.key(seed), fn=fn, args=(x[:1],))
    fn_lora = jlora.lora(fn)
    tx = optax.adam(1e-2)  # the adapters tree holds only what trains
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(lambda a: mse(fn_lora(params, a, x), y))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    curve = []
    for _ in tqdm(range(steps), desc=f"{name}: LoRA", unit="step", leave=False):
        adapters, opt_state, loss = step(adapters, opt_state)
        curve.append(float(loss))
    return adapters, curve


def run(name, recipe, args, data) -> tuple[list[str], list[float]]:
    x, y_base, y_new, x_test, y_base_test, y_new_test = data
    fn, params, targets = recipe(args.seed)
    params = pretrain(fn, params, x, y_base, args.base_steps, name)
    base_out = jax.jit(fn)(params, x_test)
    adapters, curve = finetune(
        fn, params, targets, x, y_new, args.steps, args.rank, args.seed, name
    )
    on_out = jax.jit(jlora.lora(fn))(params, adapters, x_test)
    off_out = jax.jit(fn)(params, x_test)
    merged_out = jax.jit(fn)(jlora.merge(params, adapters), x_test)

    before, after = float(mse(base_out, y_new_test)), float(mse(on_out, y_new_test))
    print(f"\n{name}: adapters on {', '.join(adapter_paths(adapters))}")
    print(f"  {jlora.summary(params, adapters)}")
    print(
        f"  new task MSE: base {before:.4f} -> LoRA {after:.4f} "
        f"(merged {float(mse(merged_out, y_new_test)):.4f})"
    )
    print(
        f"  old task MSE: base {float(mse(base_out, y_base_test)):.4f}, "
        f"adapter on {float(mse(on_out, y_base_test)):.4f}, "
        f"adapter off {float(mse(off_out, y_base_test)):.4f}"
    )

    failures = []
    if not after < 0.5 * before:
        failures.append(f"{name}: new-task loss did not go down ({before:.4f} -> {after:.4f})")
    if not jnp.array_equal(off_out, base_out):
        failures.append(f"{name}: adapter off does not give back the base exactly")
    if not jnp.allclose(merged_out, on_out, atol=1e-4):
        failures.append(f"{name}: merged output differs from the adapter on")
    return failures, curve


def adapter_paths(adapters) -> list[str]:
    """The "/"-joined paths of the adapter nodes, e.g. ``layers/0/weight``."""

    def name(key) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    flat = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=jlora.is_adapter)[0]
    return ["/".join(name(k) for k in path) for path, node in flat if jlora.is_adapter(node)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=500, help="LoRA steps")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/nnx_and_equinox"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer steps (for CI)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.quick:
        args.base_steps, args.steps = min(args.base_steps, 300), min(args.steps, 200)
    args.out.mkdir(parents=True, exist_ok=True)
    x, y_base, y_new = tasks(args.seed, 1280)  # the last 256 rows are held out
    data = (x[:1024], y_base[:1024], y_new[:1024], x[1024:], y_base[1024:], y_new[1024:])

    failures, curves = [], {}
    for name, recipe in (("NNX", nnx_recipe), ("Equinox", equinox_recipe)):
        found, curves[name] = run(name, recipe, args, data)
        failures += found

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in curves.items():
        ax.plot(curve, label=name)
    ax.set(
        yscale="log", xlabel="LoRA step", ylabel="MSE (new task)", title="same LoRA, two frameworks"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "nnx_and_equinox.png", dpi=120)
    plt.close(fig)
    print(
        f"\nplot in {args.out / 'nnx_and_equinox.png'}; total {time.perf_counter() - started:.0f} s"
    )
    for failure in failures:
        print("FAILED:", failure)
    if not failures:
        print(
            "OK: for NNX and Equinox, the new-task loss went down and the adapter off "
            "equals the base exactly"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
