"""A mixture of LoRA experts against one LoRA of the same total rank (jlora, reference decoder).

Variants, on the reference decoder (``benchmarks/models.py``), forward pass and train
step:

* ``lora``: one LoRA of rank ``E·r``;
* ``lora-autodiff``: the same without the fast low-rank backward (a custom VJP that
  plain projections get on CPU, and mixtures do not);
* ``mix-soft`` and ``mix-top2``: ``E`` experts of rank ``r`` routed by the softmax and
  by top-2, trained with the balance loss from ``jlora.lora(fn, aux=True)``.

A mixture's use is one matmul against ``A`` as ``(in, E·r)`` and one against ``B`` as
``(E·r, out)``, plus the router, so its FLOPs are about the single LoRA's.

Variants are timed in interleaved rounds in one process; ratios are medians of the
per-round ratios. XLA's FLOPs (``cost_analysis``) and temporary bytes
(``memory_analysis``) are printed beside the times.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/mixture.py            # reference sizes
    python benchmarks/mixture.py --quick        # tiny, for CI
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common
from benchmarks.models import GPT, QUICK, REFERENCE, TARGETS, batch_of_tokens


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model (CI)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=2, help="rank of each expert")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 10, quick 3)")
    parser.add_argument("--json", default="runs/benchmarks/mixture.json")
    return parser.parse_args(argv)


def steps_for(config, args):
    import jax
    import optax

    import jlora
    from benchmarks.models import next_token_loss

    model = GPT(config, scan=True)
    tokens = batch_of_tokens(config, jax.random.key(0))
    inputs = tokens[:, :-1]
    params = model.init(jax.random.key(1), inputs)
    total = args.experts * args.rank
    specs = {
        "lora": jlora.LoraSpec(rank=total, alpha=2.0 * total, targets=list(TARGETS)),
        "mix-soft": jlora.LoraSpec(rank=args.rank, alpha=2.0 * args.rank,
                                   targets=list(TARGETS), experts=args.experts),
        "mix-top2": jlora.LoraSpec(rank=args.rank, alpha=2.0 * args.rank,
                                   targets=list(TARGETS), experts=args.experts, top_k=2),
    }  # fmt: skip
    # "lora-autodiff": the single LoRA without the fast low-rank backward (a custom VJP
    # that plain projections get on CPU, see jlora.lora), which mixtures do not use.
    specs["lora-autodiff"] = specs["lora"]
    steps, stats = {}, {}
    for name, spec in specs.items():
        fast = False if name == "lora-autodiff" else None
        apply = jlora.lora(model.apply, aux=True, fast_backward=fast)
        tree = jlora.init(spec, params, jax.random.key(2), fn=model.apply, args=(inputs,))
        tree = jax.tree_util.tree_map(lambda x: x + 0.01, tree)  # non-zero B
        tx = jlora.optimizer(optax.adam(1e-3), tree)

        def forward(a, x, apply=apply):
            return apply(params, a, x)[0]

        def loss(a, tokens, apply=apply):
            logits, aux = apply(params, a, tokens[:, :-1])
            return next_token_loss(logits, tokens) + 0.01 * aux["balance_loss"]

        runs, xla = common.forward_and_train(forward, loss, tx, tree, inputs, tokens)
        stats[f"{name}/params"] = sum(x.size for x in jax.tree_util.tree_leaves(tree))
        for kind in ("forward", "train"):
            stats[f"{name}/{kind}"] = xla[kind]
            steps[f"{name} {kind}"] = runs[kind]
    return steps, stats, list(specs)


def main(argv=None) -> None:
    common.ensure_malloc_env()
    args = parse_args(argv)
    config = QUICK if args.quick else REFERENCE
    config = dataclasses.replace(config)
    repeats = args.repeats or (3 if args.quick else 10)
    steps, stats, names = steps_for(config, args)
    times, _ = common.interleaved(steps, repeats=repeats)
    rows = []
    for name in names:
        for kind in ("forward", "train"):
            key = f"{name} {kind}"
            rows.append({
                "variant": key,
                "ms": sorted(times[key])[len(times[key]) // 2],
                "ratio": common.median_ratio(times, key, f"lora {kind}"),
                "flops": stats[f"{name}/{kind}"]["flops"],
                "temp": stats[f"{name}/{kind}"]["temp_bytes"],
                "params": stats[f"{name}/params"],
            })  # fmt: skip
    print(f"\nbatch {config.batch}, seq {config.seq}, d_model {config.d_model}, layers "
          f"{config.layers}; LoRA rank {args.experts * args.rank} against {args.experts} "
          f"experts of rank {args.rank}; {repeats} rounds")  # fmt: skip
    columns = [
        ("variant", "variant", ""),
        ("ms", "median ms", "ms"),
        ("ratio", "/ lora (median of rounds)", "x"),
        ("flops", "XLA GFLOPs", "G"),
        ("temp", "XLA temp MB", "MB"),
        ("params", "adapter params", ""),
    ]
    print(common.table(rows, columns))
    common.write_json(args.json, {"environment": common.environment(), "rows": rows,
                                  "times": times})  # fmt: skip


if __name__ == "__main__":
    main()
