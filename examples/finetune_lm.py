"""A model that knows Python learns a new SQL dialect, with LoRA.

1. Pretrain a small character-level decoder (Flax Linen) on the Python standard
   library's own source files, read from this interpreter's installation. The trained
   base is cached (``--cache``), so a second run skips this step.
2. LoRA-adapt it to PipeQL, a made-up SQL dialect generated from a seeded grammar
   (``sql_grammar.py``), training only the adapters: the base is never modified.
3. Report what changed: loss on PipeQL before/after, loss on Python with the adapter
   on, off (must equal the base exactly) and merged, the adapter's size on disk next to
   the model's, and generated samples before/after. A loss-curve PNG and the adapter
   (Orbax and Hugging Face PEFT form) are written to ``--out``.

Run ``python examples/finetune_lm.py`` (about four CPU-minutes, under five minutes on
two cores; about half that the second time) or ``--quick`` for a tiny smoke run. The
program exits non-zero if a headline claim fails: the PipeQL loss went down, and the
adapter off gives back the base exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import sysconfig
import time

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import jlora

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import sql_grammar

VOCAB = 128  # bytes 0..127; anything outside ASCII is read as "?"
PROMPTS = ("from users |> ", "from orders |> where ", "put ")


# --------------------------------------------------------------------------------------
# The model: a small pre-LayerNorm decoder with a tied output head
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Model and pretraining sizes (part of the cache key)."""

    d_model: int = 128
    heads: int = 4
    mlp: int = 512
    layers: int = 3
    context: int = 96
    pretrain_steps: int = 500
    pretrain_batch: int = 24
    pretrain_lr: float = 3e-3
    corpus_bytes: int = 3_000_000


QUICK = Config(
    d_model=64,
    heads=2,
    mlp=128,
    layers=2,
    context=64,
    pretrain_steps=150,
    pretrain_batch=16,
    corpus_bytes=400_000,
)


class Block(nn.Module):
    """Causal self-attention and an MLP, each behind a LayerNorm and a residual."""

    d_model: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x_BxLxD):
        batch, length, _ = x_BxLxD.shape
        head_dim = self.d_model // self.heads
        h = nn.LayerNorm(name="ln_1")(x_BxLxD)
        split = lambda t: t.reshape(batch, length, self.heads, head_dim)
        q = split(nn.Dense(self.d_model, name="query")(h))
        k = split(nn.Dense(self.d_model, name="key")(h))
        v = split(nn.Dense(self.d_model, name="value")(h))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
        causal = jnp.tril(jnp.ones((length, length), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        x_BxLxD = x_BxLxD + nn.Dense(self.d_model, name="out")(o.reshape(batch, length, -1))
        h = nn.LayerNorm(name="ln_2")(x_BxLxD)
        h = nn.Dense(self.d_model, name="down")(nn.gelu(nn.Dense(self.mlp, name="up")(h)))
        return x_BxLxD + h


class CharLM(nn.Module):
    """Byte-level decoder-only language model; returns next-token logits."""

    config: Config

    @nn.compact
    def __call__(self, tokens_BxL):
        c = self.config
        embed = nn.Embed(VOCAB, c.d_model, name="embed")
        positions = self.param(
            "positions", nn.initializers.normal(0.02), (c.context, c.d_model), jnp.float32
        )
        x = embed(tokens_BxL) + positions[: tokens_BxL.shape[1]]
        for i in range(c.layers):
            x = Block(c.d_model, c.heads, c.mlp, name=f"layer_{i}")(x)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


# --------------------------------------------------------------------------------------
# Data: the standard library's source, and PipeQL
# --------------------------------------------------------------------------------------


def encode(text: str) -> np.ndarray:
    """Text to byte tokens below ``VOCAB`` (non-ASCII becomes ``?``)."""
    data = np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8)
    return np.where(data < VOCAB, data, ord("?")).astype(np.int32)


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("ascii", errors="replace")


def python_corpus(num_bytes: int) -> str:
    """The first ``num_bytes`` of the standard library's ``.py`` files (tests left out)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).parts
        if any(part in ("test", "tests", "site-packages", "idlelib") for part in relative):
            continue
        try:
            text = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunks.append(text)
        total += len(text)
        if total >= num_bytes:
            break
    if not chunks:
        raise SystemExit(f"no Python source found under {root}")
    return "\n".join(chunks)[:num_bytes]


def windows(data: np.ndarray, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random windows of ``length + 1`` tokens (inputs and shifted targets)."""
    starts = rng.integers(0, len(data) - length - 1, size=count)
    return np.stack([data[s : s + length + 1] for s in starts])


def split(data: np.ndarray, held_out: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(data) * (1.0 - held_out))
    return data[:cut], data[cut:]


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


def cross_entropy(logits_BxLxV, batch_BxL1) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch_BxL1[:, 1:]).mean()


def pretrain(model, config: Config, train_data: np.ndarray, seed: int) -> tuple[dict, list]:
    """Train the base model in full on Python source; returns params and the loss curve."""
    rng = np.random.default_rng(seed)
    params = model.init(jax.random.key(seed), jnp.zeros((1, config.context), jnp.int32))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.pretrain_lr, config.pretrain_steps // 10, config.pretrain_steps
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(
            lambda p: cross_entropy(model.apply(p, batch[:, :-1]), batch)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    curve = []
    bar = tqdm(range(config.pretrain_steps), desc="pretrain on Python", unit="step")
    for _ in bar:
        batch = windows(train_data, config.pretrain_batch, config.context, rng)
        params, opt_state, loss = step(params, opt_state, batch)
        curve.append(float(loss))
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
    return params, curve


def cached_base(model, config: Config, cache: pathlib.Path | None, seed: int, corpus: np.ndarray):
    """Load the pretrained base from ``cache`` if it was made with the same settings."""
    fingerprint = json.dumps(
        [dataclasses.asdict(config), seed, hashlib.sha256(corpus.tobytes()).hexdigest()]
    )
    name = "charlm-" + hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    if cache is not None and (cache / f"{name}.msgpack").exists():
        like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        params = flax.serialization.from_bytes(like, (cache / f"{name}.msgpack").read_bytes())
        curve = json.loads((cache / f"{name}.json").read_text())
        print(f"loaded the pretrained base from {cache / name}.msgpack (pretraining skipped)")
        return jax.tree_util.tree_map(jnp.asarray, params), curve, True
    params, curve = pretrain(model, config, split(corpus)[0], seed)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{name}.msgpack").write_bytes(flax.serialization.to_bytes(params))
        (cache / f"{name}.json").write_text(json.dumps(curve))
    return params, curve, False


def make_sampler(apply, context: int, temperature: float):
    """A jitted sampler: continue each prompt, one token at a time, to ``context`` tokens."""

    @jax.jit
    def sample(params, buffer_BxL, starts_B, key):
        rows = jnp.arange(buffer_BxL.shape[0])

        def body(t, carry):
            buffer, key = carry
            key, sub = jax.random.split(key)
            position = jnp.minimum(starts_B + t, context - 1)
            logits = apply(params, buffer)[rows, position - 1] / temperature
            token = jax.random.categorical(sub, logits).astype(buffer.dtype)
            token = jnp.where(starts_B + t < context, token, buffer[rows, position])
            return buffer.at[rows, position].set(token), key

        steps = context - jnp.min(starts_B)
        buffer, _ = jax.lax.fori_loop(0, steps, body, (buffer_BxL, key))
        return buffer

    return sample


def generate(sample, params, prompts, context: int, seed: int) -> list[str]:
    """Sample a continuation of each prompt; show it up to the end of its line."""
    buffer = np.zeros((len(prompts), context), np.int32)
    for row, prompt in enumerate(prompts):
        buffer[row, : len(prompt)] = encode(prompt)
    starts = np.array([len(p) for p in prompts], np.int32)
    out = np.asarray(sample(params, buffer, starts, jax.random.key(seed)))
    return [
        prompt + decode(out[row])[len(prompt) :].split("\n")[0]
        for row, prompt in enumerate(prompts)
    ]


def disk_size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def peft_module_name(path: str) -> str:
    """Flax path ``params/layer_0/query/kernel`` -> PyTorch module ``layers.0.query``."""
    parts = [p for p in path.split("/") if p not in ("params", "kernel")]
    return ".".join(
        "layers." + p.removeprefix("layer_") if p.startswith("layer_") else p for p in parts
    )


def save_adapter(out: pathlib.Path, adapters, spec, params) -> dict[str, pathlib.Path]:
    """Write the adapter in Orbax and PEFT form, read each back and check it is bit-exact."""
    written = {}
    try:
        from jlora import checkpoint
    except ImportError:
        print("note: jlora.checkpoint (Orbax) is not available in this jlora; skipped")
    else:
        checkpoint.save(out / "adapter_orbax", adapters, spec, overwrite=True)
        loaded, _ = checkpoint.load(out / "adapter_orbax", like=adapters)
        written["orbax"] = out / "adapter_orbax"
        check_same("Orbax", loaded, adapters)
    try:
        import jlora.peft as peft
    except ImportError:
        print("note: jlora.peft (PEFT export) is not available in this jlora; skipped")
    else:
        peft.save(out / "adapter_peft", adapters, spec, key_map=peft_module_name)
        loaded, _ = peft.load(out / "adapter_peft", params, key_map=peft_module_name)
        written["peft"] = out / "adapter_peft"
        check_same("PEFT", loaded, adapters)
    return written


def check_same(kind: str, loaded, adapters) -> None:
    same = jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, adapters)
    )
    if not same:
        raise SystemExit(f"FAILED: the {kind} adapter files do not read back bit-exact")


def plot(path: pathlib.Path, pretrain_curve, lora_curve, evals, base_python: float) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(pretrain_curve, lw=0.8)
    left.set(title="pretraining on Python (full model)", xlabel="step", ylabel="loss (nats/char)")
    right.plot(lora_curve, lw=0.8, alpha=0.6, label="PipeQL train")
    steps, sql, python = zip(*evals)
    right.plot(steps, sql, "o-", label="PipeQL held out")
    right.plot(steps, python, "s-", label="Python held out (adapter on)")
    right.axhline(base_python, color="gray", ls="--", lw=0.8, label="Python, base")
    right.set(title="LoRA fine-tuning on PipeQL", xlabel="step", ylabel="loss (nats/char)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="LoRA steps (300; quick 80)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    parser.add_argument(
        "--targets",
        default="query,key,value,out,up,down",
        help="comma-separated module names to adapt (every Dense by default)",
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate")
    parser.add_argument("--batch", type=int, default=24, help="LoRA batch size")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/finetune_lm"))
    parser.add_argument(
        "--cache",
        type=pathlib.Path,
        default=pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "jlora",
        help="where the pretrained base is kept",
    )
    parser.add_argument("--no-cache", action="store_true", help="always pretrain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (for CI)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    config = QUICK if args.quick else Config()
    steps = args.steps if args.steps is not None else (80 if args.quick else 300)
    args.out.mkdir(parents=True, exist_ok=True)
    model = CharLM(config)
    apply = model.apply

    # ---- data ------------------------------------------------------------------------
    python = encode(python_corpus(config.corpus_bytes))
    sql_train = encode(sql_grammar.corpus(4000, seed=args.seed))
    sql_val = encode(sql_grammar.corpus(400, seed=args.seed + 1))
    eval_rng = np.random.default_rng(1234)
    eval_rows = 16 if args.quick else 32
    python_eval = windows(split(python)[1], eval_rows, config.context, eval_rng)
    sql_eval = windows(sql_val, eval_rows, config.context, eval_rng)
    print(
        f"Python corpus: {len(python):,} chars from {sysconfig.get_paths()['stdlib']}; "
        f"PipeQL: {len(sql_train):,} chars, e.g.\n  {sql_grammar.corpus(1, seed=7).strip()}"
    )

    # ---- 1. the base -----------------------------------------------------------------
    cache = None if args.no_cache else args.cache
    params, pretrain_curve, from_cache = cached_base(model, config, cache, args.seed, python)
    eval_base = jax.jit(lambda p, batch: cross_entropy(apply(p, batch[:, :-1]), batch))
    base_python = float(eval_base(params, python_eval))
    base_sql = float(eval_base(params, sql_eval))

    # ---- 2. LoRA ---------------------------------------------------------------------
    spec = jlora.LoraSpec(
        rank=args.rank, alpha=args.alpha, targets=[t.strip() for t in args.targets.split(",")]
    )
    tokens_spec = jax.ShapeDtypeStruct((1, config.context), jnp.int32)
    adapters = jlora.init(spec, params, jax.random.key(args.seed), fn=apply, args=(tokens_spec,))
    lm = jlora.lora(apply)
    print("\n" + jlora.summary(params, adapters))
    print(str(jlora.explain(apply, params, adapters, tokens_spec)).splitlines()[-1])

    eval_lora = jax.jit(lambda p, a, batch: cross_entropy(lm(p, a, batch[:, :-1]), batch))
    fresh_sql = float(eval_lora(params, adapters, sql_eval))

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(steps // 10, 1), steps)
    tx = jlora.optimizer(optax.adamw(schedule, weight_decay=0.0), adapters)
    opt_state = tx.init(adapters)

    @jax.jit
    def lora_step(adapters, opt_state, params, batch):
        loss, grads = jax.value_and_grad(
            lambda a: cross_entropy(lm(params, a, batch[:, :-1]), batch)
        )(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    sampler = make_sampler(apply, config.context, temperature=0.7)
    samples_before = generate(sampler, params, PROMPTS, config.context, args.seed)

    rng = np.random.default_rng(args.seed + 2)
    lora_curve, evals = [], [(0, fresh_sql, base_python)]
    eval_every = max(steps // 6, 1)
    bar = tqdm(range(1, steps + 1), desc="LoRA on PipeQL", unit="step")
    for step in bar:
        batch = windows(sql_train, args.batch, config.context, rng)
        adapters, opt_state, loss = lora_step(adapters, opt_state, params, batch)
        lora_curve.append(float(loss))
        if step % eval_every == 0 or step == steps:
            evals.append(
                (
                    step,
                    float(eval_lora(params, adapters, sql_eval)),
                    float(eval_lora(params, adapters, python_eval)),
                )
            )
            bar.set_postfix(loss=f"{lora_curve[-1]:.3f}", held_out=f"{evals[-1][1]:.3f}")

    # ---- 3. what changed -------------------------------------------------------------
    after_sql = evals[-1][1]
    python_on = evals[-1][2]
    python_off = float(eval_base(params, python_eval))  # the base, untouched
    merged = jlora.merge(params, adapters)
    python_merged = float(eval_base(merged, python_eval))
    sql_merged = float(eval_base(merged, sql_eval))
    samples_after = generate(sampler, merged, PROMPTS, config.context, args.seed)

    written = save_adapter(args.out, adapters, spec, params)
    plot(args.out / "loss.png", pretrain_curve, lora_curve, evals, base_python)
    model_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    adapter_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(adapters))

    print("\nloss (nats/char)               PipeQL   Python")
    print(f"  base                         {base_sql:6.3f}   {base_python:6.3f}")
    print(f"  base + fresh adapter (B=0)   {fresh_sql:6.3f}")
    print(f"  adapter on  (jlora.lora)     {after_sql:6.3f}   {python_on:6.3f}")
    print(f"  adapter off (the base)                {python_off:6.3f}")
    print(f"  merged      (jlora.merge)    {sql_merged:6.3f}   {python_merged:6.3f}")
    print(
        "  (the adapter specializes the model to PipeQL; with it off, the Python model "
        "is back, bit for bit)"
    )
    print(
        f"\nmodel: {human(model_bytes)} of float32; adapter: {human(adapter_bytes)} in memory "
        f"({100 * adapter_bytes / model_bytes:.1f} % of the model)"
    )
    for kind, path in written.items():
        size = disk_size(path)
        print(
            f"  adapter on disk ({kind}): {human(size)} "
            f"({100 * size / model_bytes:.1f} % of the model; reads back bit-exact) in {path}"
        )
    print("\nsamples before (the Python base, prompted with PipeQL):")
    for text in samples_before:
        print(f"  {text!r}")
    print("samples after (with the adapter merged):")
    for text in samples_after:
        print(f"  {text!r}")
    elapsed = time.perf_counter() - started
    print(
        f"\nPipeQL loss {base_sql:.3f} -> {after_sql:.3f} in {steps} LoRA steps; "
        f"pretraining {'loaded from cache' if from_cache else 'ran'}; total {elapsed:.0f} s; "
        f"plot in {args.out / 'loss.png'}"
    )

    failures = []
    if not after_sql < base_sql:
        failures.append(f"PipeQL loss did not go down ({base_sql:.4f} -> {after_sql:.4f})")
    if python_off != base_python:
        failures.append(f"adapter off {python_off!r} != base {base_python!r}")
    if not math.isclose(sql_merged, after_sql, rel_tol=1e-3, abs_tol=1e-3):
        failures.append(f"merged PipeQL loss {sql_merged:.5f} != adapter on {after_sql:.5f}")
    for failure in failures:
        print("FAILED:", failure)
    if not failures:
        print("OK: PipeQL loss went down; adapter off equals the base exactly; merged == on")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
