"""A batch that mixes 8 adapters against the same batch with one adapter (jlora and PEFT).

jlora, on the reference decoder (``benchmarks/models.py``): the forward pass and the
train step with one plain adapters tree (``single``), with a stack of one slot
(``stack1``, the cost of per-example gathering alone) and with a stack of 8 slots, each
example choosing its own (``mixed8``, ``lora_ids = arange(batch) % 8``). PEFT, on a
PyTorch GPT-2 of the same sizes (torch CPU): the forward pass with one active adapter
against ``adapter_names=[...]`` naming 8 (PEFT's mixed batch serves inference only).

Variants are timed in interleaved rounds in one process; ratios are medians of the
per-round ratios. XLA's FLOPs (``cost_analysis``) and temporary bytes
(``memory_analysis``) are printed beside the jlora times.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/many_adapters.py            # reference sizes, batch 8
    python benchmarks/many_adapters.py --quick        # tiny, for CI
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
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, help="timed rounds (default 10, quick 3)")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--peft", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", default="runs/benchmarks/many_adapters.json")
    return parser.parse_args(argv)


def jlora_steps(config, args):
    import jax
    import jax.numpy as jnp
    import optax

    import jlora
    from benchmarks.models import next_token_loss

    model = GPT(config, scan=args.scan)
    tokens = batch_of_tokens(config, jax.random.key(0))
    inputs = tokens[:, :-1]
    params = model.init(jax.random.key(1), inputs)
    spec = jlora.LoraSpec(rank=args.rank, alpha=2.0 * args.rank, targets=list(TARGETS))

    def made(k):
        tree = jlora.init(spec, params, jax.random.key(10 + k), fn=model.apply, args=(inputs,))
        return jax.tree_util.tree_map(lambda x: x + 0.01, tree)  # non-zero B

    single = made(0)
    trees = {"single": single, "stack1": jlora.stack([single]),
             "mixed8": jlora.stack([made(k) for k in range(args.adapters)])}  # fmt: skip
    ids = {"single": None, "stack1": jnp.zeros(config.batch, jnp.int32),
           "mixed8": jnp.arange(config.batch, dtype=jnp.int32) % args.adapters}  # fmt: skip
    apply = jlora.lora(model.apply)
    steps, stats = {}, {}
    for name, tree in trees.items():
        kw = {} if ids[name] is None else {"lora_ids": ids[name]}
        tx = jlora.optimizer(optax.adam(1e-3), tree)

        def forward(a, x, kw=kw):
            return apply(params, a, x, **kw)

        def loss(a, tokens, kw=kw):
            return next_token_loss(apply(params, a, tokens[:, :-1], **kw), tokens)

        runs, xla = common.forward_and_train(forward, loss, tx, tree, inputs, tokens)
        for kind in ("forward", "train"):
            stats[f"{name}/{kind}"] = xla[kind]
            steps[f"jlora {name} {kind}"] = runs[kind]
    return steps, stats


def peft_steps(config, args):
    import numpy as np
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    gpt2 = transformers.GPT2Config(
        n_embd=config.d_model, n_layer=config.layers, n_head=config.heads,
        n_inner=config.mlp, vocab_size=config.vocab, n_positions=config.seq,
    )  # fmt: skip
    base = transformers.GPT2LMHeadModel(gpt2)
    lora = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        init_lora_weights=False,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )
    model = peft.get_peft_model(base, lora, adapter_name="a0")
    for k in range(1, args.adapters):
        model.add_adapter(f"a{k}", lora)
    model.eval()
    tokens = torch.from_numpy(
        np.random.default_rng(0).integers(0, config.vocab, (config.batch, config.seq))
    )
    names = [f"a{b % args.adapters}" for b in range(config.batch)]

    def single():
        with torch.no_grad():
            model.set_adapter("a0")
            return model(tokens).logits

    def mixed():
        with torch.no_grad():
            return model(tokens, adapter_names=names).logits

    return {"peft single forward": single, "peft mixed8 forward": mixed}


def main(argv=None) -> None:
    common.ensure_malloc_env()
    args = parse_args(argv)
    base = QUICK if args.quick else REFERENCE
    config = dataclasses.replace(base, batch=args.batch, seq=min(args.seq, base.seq) if
                                 args.quick else args.seq)  # fmt: skip
    repeats = args.repeats or (3 if args.quick else 10)
    steps, stats = jlora_steps(config, args)
    if args.peft:
        try:
            steps.update(peft_steps(config, args))
        except ImportError as error:
            print(f"PEFT side skipped ({error}); pip install -e .[test] for it")
    times, _ = common.interleaved(steps, repeats=repeats)
    rows = []
    for name in ("single", "stack1", "mixed8"):
        for kind in ("forward", "train"):
            key = f"jlora {name} {kind}"
            rows.append({
                "variant": key,
                "ms": sorted(times[key])[len(times[key]) // 2],
                "ratio": common.median_ratio(times, key, f"jlora single {kind}"),
                "flops": stats[f"{name}/{kind}"]["flops"],
                "temp": stats[f"{name}/{kind}"]["temp_bytes"],
            })  # fmt: skip
    for key in ("peft single forward", "peft mixed8 forward"):
        if key in times:
            rows.append({
                "variant": key,
                "ms": sorted(times[key])[len(times[key]) // 2],
                "ratio": common.median_ratio(times, key, "peft single forward"),
            })  # fmt: skip
    print(f"\nbatch {config.batch}, seq {config.seq}, d_model {config.d_model}, layers "
          f"{config.layers}, rank {args.rank}, {args.adapters} adapters, scan {args.scan}, "
          f"{repeats} rounds")  # fmt: skip
    columns = [
        ("variant", "variant", ""),
        ("ms", "median ms", "ms"),
        ("ratio", "/ single (median of rounds)", "x"),
        ("flops", "XLA GFLOPs", "G"),
        ("temp", "XLA temp MB", "MB"),
    ]
    print(common.table(rows, columns))
    common.write_json(args.json, {"environment": common.environment(), "rows": rows,
                                  "times": times})  # fmt: skip


if __name__ == "__main__":
    main()
