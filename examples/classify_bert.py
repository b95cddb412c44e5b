"""LoRA on a Hugging Face Flax BERT: query/value adapters and a trainable classifier head.

``FlaxBertForSequenceClassification`` is built from a small config with random weights
(nothing is downloaded). The example generates a sentence classification set (short
reviews whose label is their sentiment, with negations that flip it), then trains only
LoRA adapters on every attention query and value kernel plus a full copy of the
classifier head, which ``LoraSpec(trainable=["classifier"])`` puts into the adapters
tree and ``jlora.optimizer(..., trainable=["classifier"])`` trains. The frozen BERT
weights are never copied or given a gradient.

Prints accuracy before/after and writes a training-curve PNG. Exits non-zero unless
the test accuracy went up and the adapter off gives back the base model's logits.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import jlora

matplotlib.use("Agg")
import matplotlib.pyplot as plt

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no deprecation banner
from transformers import BertConfig, FlaxBertForSequenceClassification

SUBJECTS = ("the movie", "this film", "the plot", "the acting", "the ending", "the music")
VERBS = ("was", "is", "felt", "seemed")
ADVERBS = ("", "really", "very", "quite", "truly")
POSITIVE = ("good", "great", "wonderful", "fun", "clever", "moving", "superb")
NEGATIVE = ("bad", "dull", "awful", "boring", "silly", "weak", "clumsy")
SPECIAL = ("[PAD]", "[CLS]", "[SEP]")
LENGTH = 12


def sentence(rng: random.Random) -> tuple[str, int]:
    """One review and its label (1 positive, 0 negative); ``not`` flips the adjective."""
    positive = rng.random() < 0.5
    negated = rng.random() < 0.4
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    words = [
        rng.choice(SUBJECTS),
        rng.choice(VERBS),
        "not" if negated else "",
        rng.choice(ADVERBS),
        adjective,
    ]
    return " ".join(w for w in words if w), int(positive != negated)


def vocabulary() -> dict[str, int]:
    words = {w for text in SUBJECTS + VERBS + ADVERBS for w in text.split()}
    words |= set(POSITIVE) | set(NEGATIVE) | {"not"}
    return {w: i for i, w in enumerate(SPECIAL + tuple(sorted(words)))}


def tokenize(texts, vocab) -> tuple[np.ndarray, np.ndarray]:
    """``[CLS] words [SEP]`` padded to ``LENGTH``: token ids and the attention mask."""
    ids = np.zeros((len(texts), LENGTH), np.int32)
    for row, text in enumerate(texts):
        tokens = [vocab["[CLS]"], *(vocab[w] for w in text.split()), vocab["[SEP]"]]
        ids[row, : len(tokens)] = tokens
    return ids, (ids != vocab["[PAD]"]).astype(np.int32)


def dataset(count: int, seed: int, vocab):
    rng = random.Random(seed)
    texts, labels = zip(*(sentence(rng) for _ in range(count)))
    ids, mask = tokenize(texts, vocab)
    return ids, mask, np.array(labels, np.int32), texts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/classify_bert"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer steps (for CI)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.quick:
        args.steps = min(args.steps, 150)
    args.out.mkdir(parents=True, exist_ok=True)

    vocab = vocabulary()
    train_ids, train_mask, train_y, _ = dataset(2000, args.seed, vocab)
    test_ids, test_mask, test_y, test_texts = dataset(500, args.seed + 1, vocab)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    model = FlaxBertForSequenceClassification(config, seed=args.seed)
    params = model.params

    # The one function jlora needs: params first, then the inputs.
    def classify(params, input_ids, attention_mask):
        return model(input_ids, attention_mask=attention_mask, params=params, train=False).logits

    spec = jlora.LoraSpec(
        rank=args.rank, alpha=args.alpha, targets=["query", "value"], trainable=["classifier"]
    )
    example = (train_ids[:1], train_mask[:1])
    adapters = jlora.init(spec, params, jax.random.key(args.seed), fn=classify, args=example)
    classify_lora = jlora.lora(classify)
    print(jlora.summary(params, adapters))
    print(str(jlora.explain(classify, params, adapters, *example)).splitlines()[-1])

    tx = jlora.optimizer(optax.adamw(args.lr, weight_decay=0.0), adapters, trainable=["classifier"])
    opt_state = tx.init(adapters)

    def loss_fn(adapters, ids, mask, labels):
        logits = classify_lora(params, adapters, ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(adapters, opt_state, ids, mask, labels):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, ids, mask, labels)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    accuracy_lora = jax.jit(
        lambda a, ids, mask, y: jnp.mean(jnp.argmax(classify_lora(params, a, ids, mask), -1) == y)
    )
    base_logits = jax.jit(classify)(params, test_ids, test_mask)
    before = float(jnp.mean(jnp.argmax(base_logits, -1) == test_y))

    rng = np.random.default_rng(args.seed)
    losses, accuracies = [], [(0, before)]
    bar = tqdm(range(1, args.steps + 1), desc="LoRA + head", unit="step")
    for i in bar:
        rows = rng.integers(0, len(train_y), args.batch)
        adapters, opt_state, loss = step(
            adapters, opt_state, train_ids[rows], train_mask[rows], train_y[rows]
        )
        losses.append(float(loss))
        if i % 50 == 0 or i == args.steps:
            accuracies.append((i, float(accuracy_lora(adapters, test_ids, test_mask, test_y))))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", test_acc=f"{accuracies[-1][1]:.3f}")
    after = accuracies[-1][1]

    off_logits = jax.jit(classify)(params, test_ids, test_mask)  # adapter off: the base
    merged = jlora.merge(params, adapters)
    merged_accuracy = float(
        jnp.mean(jnp.argmax(jax.jit(classify)(merged, test_ids, test_mask), -1) == test_y)
    )
    predictions = np.asarray(jnp.argmax(classify_lora(params, adapters, test_ids, test_mask), -1))

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(losses, lw=0.8)
    left.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    right.plot(*zip(*accuracies), "o-")
    right.set(title="test accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(args.out / "classify_bert.png", dpi=120)
    plt.close(fig)

    print("\nsome test sentences after training:")
    for text, label, predicted in list(zip(test_texts, test_y, predictions))[:5]:
        print(f"  {text!r:42} label {label}  predicted {predicted}")
    print(
        f"\ntest accuracy: base {before:.3f} -> LoRA (query, value) + head {after:.3f}; "
        f"merged {merged_accuracy:.3f}"
    )
    print(f"plot in {args.out / 'classify_bert.png'}; total {time.perf_counter() - started:.0f} s")

    failures = []
    if not after > before + 0.2:
        failures.append(f"accuracy did not go up enough ({before:.3f} -> {after:.3f})")
    if not jnp.array_equal(off_logits, base_logits):
        failures.append("the adapter off does not give back the base logits exactly")
    if abs(merged_accuracy - after) > 0.01:
        failures.append(f"merged accuracy {merged_accuracy:.3f} != adapter on {after:.3f}")
    for failure in failures:
        print("FAILED:", failure)
    if not failures:
        print("OK: accuracy went up; adapter off equals the base exactly; merged == on")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
