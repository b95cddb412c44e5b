"""LoRA on a tunix Qwen 3 (dense and MoE), exported for vLLM and checked in PyTorch PEFT.

A user of tunix (google-tunix) has an NNX model and wants a small adapter that vLLM or
PEFT serves. This example does that end to end, on tiny random models so it needs no
download:

1. Build a small Qwen 3 in transformers 5 (PyTorch, random weights), save it as
   safetensors, and read it into tunix with tunix's own loader, so both sides hold
   the same model. ``--family moe`` does the same for Qwen 3 MoE (4 experts, top 2).
2. ``nnx.split`` the tunix model and train LoRA on every attention and MLP projection
   (for MoE: the stacked expert weights) with ``jlora.lora`` and optax, on a generated
   task: sequences that walk a fixed cycle of 12 of the 64 tokens from a random start.
   A progress bar shows the loss; ``loss.png`` plots it.
3. Save the adapters with Orbax (``jlora.checkpoint``), read them back, and export them
   with ``jlora.peft.save(..., key_map="tunix-qwen3", target="vllm")`` (or
   ``"tunix-qwen3-moe"``, whose gate and up expert weights become transformers'
   one ``experts.gate_up_proj``).
4. Load the file with ``PeftModel.from_pretrained`` on the PyTorch model and compare its
   logits with jlora's.

Run ``python examples/finetune_tunix.py`` (both families, about a minute on two CPU
cores) or ``--quick``. It needs the zoo extra, in an environment of its own::

    python3 -m venv .venv-zoo && . .venv-zoo/bin/activate && pip install torch==2.13.0 \\
      && pip install -e '.[zoo]' && python examples/finetune_tunix.py

Without those packages it says what to install and exits 0. It exits non-zero if a
claim fails: the loss went down, the Orbax copy equals the adapters, and PEFT's logits
equal jlora's to 1e-4.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

NEEDED = ("tunix", "torch", "transformers", "peft", "matplotlib", "tqdm")
INSTALL = "pip install torch==2.13.0 && pip install -e '.[zoo]'"
VOCAB, LENGTH = 64, 16


def missing_packages() -> list[str]:
    """The packages this example needs that are not installed (transformers must be 5)."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if "transformers" not in missing:
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:
            missing.append(f"transformers>=5 (found {transformers.__version__})")
    return missing


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["dense", "moe", "both"], default="both")
    parser.add_argument("--steps", type=int, default=None, help="LoRA steps (100; quick 40)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (vLLM: 8, 16, ...)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/finetune_tunix"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few steps (for CI)")
    return parser.parse_args(argv)


CYCLE = (5, 17, 42, 8, 33, 61, 2, 27, 50, 14, 39, 23)  # the task: after t, its successor


def batches(rng, batch: int):
    """Sequences that walk ``CYCLE`` from a random starting point: each token follows
    from the last, so a model that learned the cycle predicts all but the first."""
    import numpy as np

    start = rng.integers(0, len(CYCLE), size=(batch, 1))
    return np.asarray(CYCLE, np.int32)[(start + np.arange(LENGTH)) % len(CYCLE)]


def build_pair(family: str, directory: pathlib.Path, seed: int):
    """``(tunix model, torch model)`` with the same random weights (tunix reads the
    transformers 5 save with its own safetensors loader)."""
    import jax.numpy as jnp
    import torch
    import transformers
    from tunix.models.qwen3 import model as model_lib
    from tunix.models.qwen3 import params as params_lib

    torch.manual_seed(seed)
    # tunix 0.1.7's Qwen 3 rotates with rope_theta 1e6 whatever its config says.
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e6,
                  tie_word_embeddings=False,
                  # std 0.02 (the default) leaves a frozen head too weak to move the logits
                  initializer_range=0.3)  # fmt: skip
    tunix_common = dict(num_layers=2, vocab_size=VOCAB, embed_dim=32, num_heads=4, head_dim=8,
                        num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-6)  # fmt: skip
    if family == "moe":
        torch_model = transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(
                **common, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        )  # fmt: skip
        config = model_lib.ModelConfig(**tunix_common, hidden_dim=16, num_experts=4,
                                       num_experts_per_tok=2)  # fmt: skip
    else:
        torch_model = transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(**common, intermediate_size=48)
        )
        config = model_lib.ModelConfig(**tunix_common, hidden_dim=48)
    torch_model.eval()
    torch_model.save_pretrained(directory, safe_serialization=True)
    model = params_lib.create_model_from_safe_tensors(os.fspath(directory), config,
                                                      dtype=jnp.float32)  # fmt: skip
    return model, torch_model


def run_family(family: str, args, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import peft
    import torch
    from flax import nnx
    from tqdm import tqdm

    import jlora
    import jlora.checkpoint
    import jlora.peft

    out = args.out / family
    out.mkdir(parents=True, exist_ok=True)
    model, torch_model = build_pair(family, out / "base-hf", args.seed)

    # ---- the tunix model as a function of its state ----------------------------------
    graphdef, state = nnx.split(model)

    def logits_fn(state, tokens):
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
        return nnx.merge(graphdef, state)(tokens, positions, None, mask)[0]

    def loss_fn(state, adapters, tokens):
        logits = jlora.lora(logits_fn)(state, adapters, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    # ---- LoRA on attention and MLP ----------------------------------------------------
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    spec = jlora.LoraSpec(rank=args.rank, alpha=args.alpha, targets=targets)
    example = jax.ShapeDtypeStruct((1, LENGTH - 1), jnp.int32)
    adapters = jlora.init(spec, state, jax.random.key(args.seed), fn=logits_fn, args=(example,))
    report = jlora.explain(logits_fn, state, adapters, example)
    print(f"\n== tunix Qwen 3 {'MoE ' if family == 'moe' else ''}==")
    print(jlora.summary(state, adapters))
    print(str(report).splitlines()[-1])

    tx = optax.adam(args.lr)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda a: loss_fn(state, a, tokens))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    held_out = jnp.asarray(batches(np.random.default_rng(10_000 + args.seed), 64))
    evaluate = jax.jit(lambda a: loss_fn(state, a, held_out))
    before = float(evaluate(adapters))
    curve = []
    bar = tqdm(range(steps), desc=f"LoRA, {family}", unit="step")
    for _ in bar:
        adapters, opt_state, loss = step(adapters, opt_state, jnp.asarray(batches(rng, args.batch)))
        curve.append(float(loss))
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
    after = float(evaluate(adapters))

    # ---- save with Orbax, read back -------------------------------------------------
    ckpt = jlora.checkpoint.save(out / "orbax", adapters, spec, overwrite=True)
    like = jax.eval_shape(lambda: adapters)
    restored, _ = jlora.checkpoint.load(ckpt, like=like)
    same = all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree_util.tree_leaves(adapters), jax.tree_util.tree_leaves(restored))
    )

    # ---- export for vLLM, run in PyTorch PEFT ---------------------------------------
    key_map = "tunix-qwen3-moe" if family == "moe" else "tunix-qwen3"
    exported = out / "peft-adapter"
    jlora.peft.save(exported, adapters, spec, key_map=key_map, target="vllm")
    config = json.loads((exported / jlora.peft.CONFIG_NAME).read_text())
    tokens = np.asarray(held_out[:4, :-1])
    want = np.asarray(jax.jit(jlora.lora(logits_fn))(state, adapters, jnp.asarray(tokens)))
    served = peft.PeftModel.from_pretrained(torch_model, os.fspath(exported))
    with torch.no_grad():
        got = served(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()
    diff = float(np.max(np.abs(got - want)))
    return {
        "family": family, "curve": curve, "before": before, "after": after,
        "orbax_equal": same, "peft_diff": diff, "exported": exported,
        "modules": len(config["target_modules"]),
        "parameters": len(config.get("target_parameters", [])),
    }  # fmt: skip


def plot(path: pathlib.Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for result in results:
        ax.plot(result["curve"], label="Qwen 3 MoE" if result["family"] == "moe" else "Qwen 3")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("LoRA on tunix Qwen 3: walk a cycle of 12 tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_packages()
    if missing:
        print(
            f"finetune_tunix.py needs {', '.join(missing)}, which this environment lacks.\n"
            "tunix brings transformers 5, so give it an environment of its own:\n"
            f"  python3 -m venv .venv-zoo && . .venv-zoo/bin/activate && {INSTALL}\n"
            "then run this example again. Nothing was run."
        )
        return 0
    started = time.perf_counter()
    steps = args.steps if args.steps is not None else (40 if args.quick else 100)
    families = ["dense", "moe"] if args.family == "both" else [args.family]
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_family(family, args, steps) for family in families]
    plot(args.out / "loss.png", results)

    failed = False
    print("\nfamily  held-out loss before -> after   Orbax copy   PEFT logits vs jlora")
    for r in results:
        ok = r["after"] < 0.5 * r["before"] and r["orbax_equal"] and r["peft_diff"] < 1e-4
        failed |= not ok
        print(
            f"{r['family']:<7} {r['before']:8.3f} -> {r['after']:6.3f}"
            f"{'':12}{'equal' if r['orbax_equal'] else 'DIFFERS':<13}"
            f"max |diff| {r['peft_diff']:.1e}   {'ok' if ok else 'FAILED'}"
        )
        what = f"{r['modules']} modules"
        if r["parameters"]:
            what += f" and {r['parameters']} expert parameters (target_parameters)"
        print(f"        PEFT file: {r['exported']} ({what})")
    print(f"\nloss curve: {args.out / 'loss.png'}; {time.perf_counter() - started:.0f} s")
    if failed:
        print("FAILED: a claim above does not hold")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
