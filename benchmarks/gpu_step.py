"""GPU train-step benchmark: jlora LoRA against full fine-tuning on a ~1B Llama, in bf16.

The model is ``tpu_scripts/llama.py``'s Llama (scanned, rematerialized blocks) with the
dimensions of Llama 3.2 1B (1.24 B parameters, random weights) at sequence 2048:

=========  ===========================================================================
``full``   full fine-tuning: float32 master weights and AdamW state, bf16 compute
``jlora``  ``jlora.lora(model.apply)``: a bf16 frozen base, float32 adapters (rank 16
           on q, k, v, o, gate, up, down) and AdamW state, bf16 compute
``jlora_fast``  with ``--fast-backward``: ``jlora`` with ``jlora.lora(...,
           fast_backward=True)`` (the CPU default, off on GPU): the shared-input
           look-ahead, the outer-product forms and the custom-VJP backward, to tell
           whether they pay on this GPU (``jlora_fast / jlora`` is printed)
=========  ===========================================================================

It prints each step's time (median of interleaved rounds), tokens/s, MFU and XLA's
FLOPs and temporary bytes, and jlora / full as the median of per-round ratios. The MFU
numerator is the model FLOP count ``tpu_scripts/train.py`` reports (no recompute
counted; the frozen base gets no weight gradient, full fine-tuning does); the peak is
looked up by ``device_kind`` (``--peak-tflops`` overrides it).

Run ``bash benchmarks/gpu.sh`` on a machine with one NVIDIA GPU (it installs
``.[bench]`` and ``jax[cuda12]`` into ``.venv-gpu`` first), or, with those installed::

    python -m benchmarks.gpu_step                      # llama-3.2-1b, seq 2048, batch 4
    python -m benchmarks.gpu_step --quick              # tiny, on any backend (a smoke test)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchmarks import common

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tpu_scripts"))  # fmt: skip

# bf16 dense peak matmul TFLOP/s, by the start of jax's device_kind (vendor datasheets).
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100": 989.0,
    "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0,
    "NVIDIA L40S": 362.0,
}
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama-3.2-1b", help="a tpu_scripts/llama.py preset")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU")
    parser.add_argument(
        "--fast-backward", action="store_true",
        help="also time jlora with fast_backward=True (the CPU default) as jlora_fast",
    )
    parser.add_argument("--quick", action="store_true", help="tiny preset, seq 64 (smoke test)")
    parser.add_argument("--json", default="runs/benchmarks/gpu_step.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.seq, args.batch, args.rank, args.repeats = "tiny", 64, 2, 4, 3
    return args


def build(args):
    """``({name: (compiled step, state)}, model FLOPs per token by name, config)``."""
    import jax
    import jax.numpy as jnp
    import llama
    import optax
    import train as tpu_train

    import jlora

    cfg = llama.PRESETS[args.preset]
    model = llama.Llama(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    key_model, key_lora, key_data = jax.random.split(jax.random.key(0), 3)
    tokens = jax.random.randint(key_data, (args.batch, args.seq + 1), 0, cfg.vocab_size)
    inputs = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    master = jax.jit(model.init)(key_model, tokens[:, :-1])  # float32
    base = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p))(master)
    spec = jlora.LoraSpec(rank=args.rank, alpha=args.alpha, targets=list(TARGETS))
    adapters = jlora.init(spec, base, key_lora, fn=model.apply, args=(inputs,))
    adapters = jax.tree.map(lambda x: x + 1e-3, adapters)  # B = 0 at init: make it count
    tx = optax.adamw(1e-5)

    def loss_of(logits, tokens):
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def full_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(
            lambda p: loss_of(model.apply(p, tokens[:, :-1]), tokens)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def lora_step_of(apply_lora):
        def lora_step(adapters, opt_state, tokens):
            loss, grads = jax.value_and_grad(
                lambda a: loss_of(apply_lora(base, a, tokens[:, :-1]), tokens)
            )(adapters)
            updates, opt_state = tx.update(grads, opt_state, adapters)
            return optax.apply_updates(adapters, updates), opt_state, loss

        return lora_step

    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    lora_flops = tpu_train.flops_per_token(cfg, args.seq, n_adapter)
    flops = {"full": 1.5 * tpu_train.flops_per_token(cfg, args.seq, 0), "jlora": lora_flops,
             "jlora_fast": lora_flops}  # fmt: skip
    variants = [("full", full_step, master),
                ("jlora", lora_step_of(jlora.lora(model.apply)), adapters)]  # fmt: skip
    if args.fast_backward:
        fast = jlora.lora(model.apply, fast_backward=True)
        # Its own copy: each variant's state is donated to its step.
        variants.append(("jlora_fast", lora_step_of(fast), jax.tree.map(jnp.copy, adapters)))
    steps = {}
    for name, fn, state in variants:
        jitted = jax.jit(fn, donate_argnums=(0, 1))
        start = time.perf_counter()
        compiled = jitted.lower(state, tx.init(state), tokens).compile()
        steps[name] = {"compiled": compiled, "state": [state, tx.init(state)],
                       "compile_s": time.perf_counter() - start}  # fmt: skip
    return steps, flops, cfg, tokens, n_adapter


def main(argv=None) -> dict:
    common.ensure_malloc_env()
    args = parse_args(argv)
    import jax

    steps, flops, cfg, tokens, n_adapter = build(args)

    def runner(name):
        entry = steps[name]

        def run():
            params, opt_state, loss = entry["compiled"](*entry["state"], tokens)
            entry["state"] = [params, opt_state]
            return loss

        return run

    times, _ = common.interleaved(
        {name: runner(name) for name in steps}, repeats=args.repeats, warmup=args.warmup
    )
    import train as tpu_train

    peak = tpu_train.peak_flops(args, PEAK_TFLOPS)
    tokens_per_step = args.batch * args.seq
    rows = []
    for name, entry in steps.items():
        step_s = statistics.median(times[name])
        stats = common.xla_stats(entry["compiled"])
        rows.append({
            "variant": name,
            "step_ms": 1e3 * step_s,
            "tokens_per_s": tokens_per_step / step_s,
            "mfu": flops[name] * tokens_per_step / step_s / peak if peak else None,
            "xla_tflop": stats["flops"] / 1e12,
            "temp_gb": stats["temp_bytes"] / 1e9,
            "compile_s": entry["compile_s"],
        })  # fmt: skip
    ratio = common.median_ratio(times, "jlora", "full")
    env = common.environment()
    print(
        f"{env['device']} ({env['backend']}), jax {env['jax']}: {args.preset} "
        f"({cfg.params() / 1e6:,.1f} M params), seq {args.seq}, batch {args.batch}, bf16 "
        f"compute; LoRA rank {args.rank} on {', '.join(TARGETS)} ({n_adapter / 1e6:.1f} M)"
    )
    columns = (("variant", "variant", ""), ("step_ms", "step ms", ".1f"),
               ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".3f"),
               ("xla_tflop", "XLA TFLOP/step", ".3f"), ("temp_gb", "temp GB", ".2f"),
               ("compile_s", "compile s", ".1f"))  # fmt: skip
    shown = [
        {key: "-" if row[key] is None else format(row[key], spec) for key, _, spec in columns}
        for row in rows
    ]
    print(common.table(shown, [(key, header, "") for key, header, _ in columns]))
    print(f"\njlora / full step time: {ratio:.3f} (median of {args.repeats} paired rounds)")
    if "jlora_fast" in steps:
        fast_ratio = common.median_ratio(times, "jlora_fast", "jlora")
        print(f"jlora_fast / jlora step time: {fast_ratio:.3f} (fast_backward=True / default)")
    if peak is None:
        print(f"MFU: no peak known for {jax.devices()[0].device_kind!r}; pass --peak-tflops")
    result = {"environment": env, "args": vars(args), "rows": rows, "jlora_over_full": ratio}
    if "jlora_fast" in steps:
        result["jlora_fast_over_jlora"] = fast_ratio
    common.write_json(args.json, result)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
