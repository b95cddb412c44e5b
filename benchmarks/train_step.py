"""Train-step benchmark: jlora against full fine-tuning, hand-written LoRA and others.

Every variant is one jitted step on the same GPT-style decoder (``benchmarks/models.py``)
and the same batch: next-token loss, gradients, AdamW update (trainable state donated).

=================  ====================================================================
``full``           full fine-tuning of every parameter
``jlora``          ``jlora.lora(model.apply)`` on the unmodified model, gradients
                   with respect to the adapters only
``jlora_unshared`` ``jlora`` with the engine's shared-input look-ahead off: q, k and v
                   (and any uses of one activation) each do their own ``x·A``
``jlora_dots``     ``jlora`` with the forward's ``t·B`` always a GEMM (the engine's
                   outer-product form for ranks <= 16 off)
``jlora_bwd_dots`` ``jlora`` with the backward's input gradient ``gt·Aᵀ`` always a GEMM
                   (the engine's outer-product form for ranks <= 16 off)
``hand``           a hand-written LoRA model: its own Dense layers compute
                   ``x·W + (s·(x·A))·B`` (the practical limit)
``floor``          the gradient with respect to the position embedding only: every
                   activation gradient and no weight gradient, the least work any
                   LoRA step can do (the step's floor)
``merge``          naive merge-on-the-fly: ``model.apply(jlora.merge(params, adapters))``
``nnx``            the NNX model with ``nnx.LoRALinear`` targets
``qwix``           ``qwix.apply_lora_to_model`` on the Linen model (if qwix imports)
``dora``           ``jlora`` with DoRA adapters (``LoraSpec(dora=True)``)
``nf4``            ``jlora`` LoRA on an NF4-quantized base (``jlora.quantize``: QLoRA)
``nf4_dora``       DoRA adapters on the NF4 base
``bf16_base``      ``jlora`` LoRA with the base's kernels and embeddings in bfloat16
``scan_*``         ``full``, ``floor``, ``jlora``, ``hand``, ``dora``, ``nf4`` with the blocks
                   under ``nn.scan`` + ``nn.remat``
``infer_*``        forward only: ``base`` weights, jlora ``unmerged`` (``unmerged_unshared``:
                   without the shared-input look-ahead; ``unmerged_dots``: ``t·B`` as a
                   GEMM), ``merged`` weights
=================  ====================================================================

Each variant's step time is the median of ``--repeats`` interleaved rounds; ratios are
medians of per-round ratios. Compile time is reported apart. XLA's FLOPs and temporary
bytes come from the compiled executable. Peak memory is measured with each variant in
its own process (``--no-memory`` skips it).

Run from the repository root::

    python -m benchmarks.train_step                    # reference model, all variants
    python -m benchmarks.train_step --quick            # tiny smoke test
    python -m benchmarks.train_step --variants full,jlora,hand --repeats 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks import common

ALL_VARIANTS = (
    "full",
    "jlora",
    "jlora_unshared",
    "jlora_dots",
    "jlora_bwd_dots",
    "hand",
    "merge",
    "nnx",
    "qwix",
    "floor",
    "scan_full",
    "scan_floor",
    "scan_jlora",
    "scan_jlora_unshared",
    "scan_jlora_dots",
    "scan_jlora_bwd_dots",
    "scan_hand",
    "dora",
    "scan_dora",
    "nf4",
    "scan_nf4",
    "nf4_dora",
    "bf16_base",
    "infer_base",
    "infer_unmerged",
    "infer_unmerged_unshared",
    "infer_unmerged_dots",
    "infer_merged",
)
QUICK_VARIANTS = ("full", "jlora", "hand", "infer_base", "infer_unmerged")
LORA_NAMES = ("lora_a", "lora_b", "kernel_lora_a", "kernel_lora_b")


@dataclasses.dataclass
class Variant:
    """A compiled step and the state it runs on.

    ``train`` steps take ``(trainable, opt_state, frozen, tokens)`` and return the new
    trainable state, optimizer state and loss; ``state`` is updated after each call.
    Inference steps take ``(frozen, extra, tokens)`` and return logits.
    """

    name: str
    fn: Callable
    args: tuple
    train: bool
    target_shapes: set[tuple[int, ...]]
    lower_s: float = 0.0
    compile_s: float = 0.0
    compiled: Any = None

    def compile(self) -> None:
        import contextlib
        from unittest import mock

        start = time.perf_counter()
        # *_unshared: the engine's shared-input look-ahead off (each use its own x·A).
        # *_dots: the forward's t·B always a GEMM (no outer-product form).
        # *_bwd_dots: the backward's gt·Aᵀ always a GEMM.
        if self.name.endswith("_unshared"):
            off = mock.patch("jlora._engine._shared_input_groups", lambda jaxpr: {})
        elif self.name.endswith("_bwd_dots"):
            off = mock.patch("jlora._lowrank.OUTER_BACKWARD_MAX_RANK", 0)
        elif self.name.endswith("_dots"):
            off = mock.patch("jlora._lowrank.OUTER_PRODUCT_MAX_RANK", 0)
        else:
            off = contextlib.nullcontext()
        with off:
            lowered = self.fn.lower(*self.args)
        self.lower_s = time.perf_counter() - start
        start = time.perf_counter()
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start

    def step(self) -> Any:
        out = self.compiled(*self.args)
        if self.train:
            trainable, opt_state, loss = out
            self.args = (trainable, opt_state, *self.args[2:])
            return loss
        return out


# --------------------------------------------------------------------------------------
# Building the variants
# --------------------------------------------------------------------------------------


def _split(params, is_trainable: Callable[[tuple], bool]):
    """Flatten ``params`` to ``{path_tuple: leaf}`` and split it in trainable / frozen."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return trainable, frozen


def _join(trainable, frozen):
    from flax import traverse_util

    return traverse_util.unflatten_dict({**frozen, **trainable})


def _train_variant(name, loss_fn, trainable, frozen, tokens, tx, target_shapes) -> Variant:
    import jax
    import optax

    def step(trainable, opt_state, frozen, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    fn = jax.jit(step, donate_argnums=(0, 1))
    return Variant(name, fn, (trainable, tx.init(trainable), frozen, tokens), True, target_shapes)


def build(names: list[str], config, rank: int, alpha: float, seed: int) -> dict[str, Variant]:
    """Build (not yet compile) the named variants on fresh random weights."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jlora
    from benchmarks.models import GPT, TARGETS, NnxGPT, batch_of_tokens, next_token_loss

    key_data, key_model, key_lora = jax.random.split(jax.random.key(seed), 3)
    tokens = batch_of_tokens(config, key_data)
    inputs = tokens[:, :-1]
    tx = optax.adamw(1e-4)
    spec = jlora.LoraSpec(rank=rank, alpha=alpha, targets=list(TARGETS))
    variants: dict[str, Variant] = {}
    plain: dict[bool, tuple] = {}

    base_dtype = jnp.dtype(config.base_dtype)

    def frozen_base(tree):
        """A frozen base as the run stores it: matrices in ``base_dtype``."""
        if base_dtype == jnp.float32:
            return tree
        return jax.tree.map(lambda x: x.astype(base_dtype) if x.ndim >= 2 else x, tree)

    def base(scan: bool):
        """Plain model, its params and (non-zero) jlora adapters, built once per layout."""
        if scan not in plain:
            model = GPT(config, scan=scan)
            params = model.init(key_model, inputs)
            adapters = jlora.init(spec, params, key_lora, fn=model.apply, args=(inputs,))
            # B = 0 at init; give it values so merged and unmerged paths are not trivial.
            adapters = jax.tree.map(lambda x: x + 1e-3, adapters)
            shapes = {
                tuple(a.layout.weight_shape)
                for a in jax.tree.leaves(adapters, is_leaf=jlora.is_adapter)
            }
            plain[scan] = (model, params, adapters, shapes)
        return plain[scan]

    def frozen(scan: bool):
        """``base(scan)`` with its params as a frozen base (``base_dtype``)."""
        model, params, adapters, shapes = base(scan)
        return model, frozen_base(params), adapters, shapes

    for name in names:
        scan = name.startswith("scan_")
        kind = name.removeprefix("scan_")
        if kind == "full":
            model, params, _, shapes = base(scan)
            params = jax.tree.map(jnp.copy, params)  # donated: keep the shared base intact

            def loss_full(trainable, frozen, tokens, model=model):
                return next_token_loss(model.apply(trainable, tokens[:, :-1]), tokens)

            variants[name] = _train_variant(name, loss_full, params, None, tokens, tx, shapes)
        elif kind == "floor":
            model, params, _, shapes = base(scan)
            trainable, fixed = _split(params, lambda path: path[-1] == "positions")
            trainable = jax.tree.map(jnp.copy, trainable)  # donated
            fixed = frozen_base(fixed)

            def loss_floor(trainable, frozen, tokens, model=model):
                logits = model.apply(_join(trainable, frozen), tokens[:, :-1])
                return next_token_loss(logits, tokens)

            variants[name] = _train_variant(name, loss_floor, trainable, fixed, tokens, tx, shapes)
        elif kind in ("jlora", "jlora_unshared", "jlora_dots", "jlora_bwd_dots"):
            model, params, adapters, shapes = frozen(scan)
            apply_lora = jlora.lora(model.apply)

            def loss_jlora(adapters, params, tokens, apply_lora=apply_lora):
                return next_token_loss(apply_lora(params, adapters, tokens[:, :-1]), tokens)

            variants[name] = _train_variant(
                name, loss_jlora, jax.tree.map(jnp.copy, adapters), params, tokens, tx, shapes
            )
        elif kind in ("dora", "nf4", "nf4_dora", "bf16_base"):
            # The kinds: a DoRA adapter, an NF4 (QLoRA) or bfloat16 base, and both.
            model, params, adapters, shapes = base(scan)
            if not kind.startswith("nf4"):
                params = frozen_base(params)
            if kind.startswith("nf4"):
                params = jlora.quantize(params, list(TARGETS), fn=model.apply, args=(inputs,))
            elif kind == "bf16_base":
                params = jax.tree.map(
                    lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params
                )
            if kind.endswith("dora"):
                dora_spec = dataclasses.replace(spec, dora=True)
                adapters = jlora.init(dora_spec, params, key_lora, fn=model.apply, args=(inputs,))
                adapters = jax.tree.map(lambda x: x + 1e-3, adapters)
            apply_lora = jlora.lora(model.apply)

            def loss_kind(adapters, params, tokens, apply_lora=apply_lora):
                return next_token_loss(apply_lora(params, adapters, tokens[:, :-1]), tokens)

            variants[name] = _train_variant(
                name, loss_kind, jax.tree.map(jnp.copy, adapters), params, tokens, tx, shapes
            )
        elif kind == "merge":
            model, params, adapters, shapes = frozen(scan)

            def loss_merge(adapters, params, tokens, model=model):
                merged = jlora.merge(params, adapters)
                return next_token_loss(model.apply(merged, tokens[:, :-1]), tokens)

            variants[name] = _train_variant(
                name, loss_merge, jax.tree.map(jnp.copy, adapters), params, tokens, tx, shapes
            )
        elif kind in ("hand", "qwix"):
            _, _, _, shapes = base(scan)
            if kind == "hand":
                model = GPT(config, lora_rank=rank, lora_alpha=alpha, scan=scan)
            else:
                import qwix

                provider = qwix.LoraProvider(
                    module_path=".*(" + "|".join(TARGETS) + ")", rank=rank, alpha=alpha
                )
                model = qwix.apply_lora_to_model(GPT(config, scan=scan), provider)
            params = model.init(key_model, inputs)
            trainable, fixed = _split(params, lambda path: path[-1] in LORA_NAMES)
            trainable = jax.tree.map(lambda x: x + 1e-3, trainable)
            fixed = frozen_base(fixed)

            def loss_split(trainable, frozen, tokens, model=model):
                logits = model.apply(_join(trainable, frozen), tokens[:, :-1])
                return next_token_loss(logits, tokens)

            variants[name] = _train_variant(name, loss_split, trainable, fixed, tokens, tx, shapes)
        elif kind == "nnx":
            _, _, _, shapes = base(False)
            model = NnxGPT(config, rank, rngs=nnx.Rngs(seed))
            graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
            lora_state = jax.tree.map(lambda x: x + 1e-3, lora_state)

            def loss_nnx(lora_state, rest, tokens, graphdef=graphdef):
                logits = nnx.merge(graphdef, lora_state, rest)(tokens[:, :-1])
                return next_token_loss(logits, tokens)

            variants[name] = _train_variant(name, loss_nnx, lora_state, rest, tokens, tx, shapes)
        elif kind.startswith("infer_"):
            model, params, adapters, shapes = frozen(scan)
            how = kind.removeprefix("infer_")
            if how.startswith("unmerged"):
                apply_lora = jlora.lora(model.apply)
                fn = jax.jit(lambda p, a, t, apply_lora=apply_lora: apply_lora(p, a, t[:, :-1]))
                args = (params, adapters, tokens)
            else:
                weights = jlora.merge(params, adapters) if how == "merged" else params
                fn = jax.jit(lambda p, a, t, apply=model.apply: apply(p, t[:, :-1]))
                args = (weights, None, tokens)
            variants[name] = Variant(name, fn, args, False, shapes)
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")
    return variants


# --------------------------------------------------------------------------------------
# Looking inside the compiled step
# --------------------------------------------------------------------------------------

_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\(")
_PASSIVE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}


def hlo_summary(compiled: Any, target_shapes: set[tuple[int, ...]]) -> dict[str, Any]:
    """Count matmuls and weight-shaped temporaries in the optimized HLO.

    A weight-shaped temporary is any non-parameter instruction whose result has the
    shape of a targeted weight (a weight gradient, a materialized ``W + s·B·A`` or a
    transposed copy of ``W``).
    """
    text = compiled.as_text()
    dots = 0
    weight_sized: dict[str, int] = {}
    for line in text.splitlines():
        match = _HLO_INSTR.match(line)
        if not match:
            continue
        _, dims, op = match.groups()
        if op in ("dot", "convolution") or (op == "custom-call" and "matmul" in line):
            dots += 1
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        if shape in target_shapes and op not in _PASSIVE:
            weight_sized[op] = weight_sized.get(op, 0) + 1
    return {"hlo_dots": dots, "weight_sized_temps": weight_sized}


# --------------------------------------------------------------------------------------
# Memory probe: one variant in its own process
# --------------------------------------------------------------------------------------


def probe_memory(variant: Variant, steps: int = 3) -> dict[str, float]:
    """Peak memory of running ``variant`` in this (fresh) process.

    ``peak_rss_bytes``: the process's peak RSS over its life (imports, weights,
    compilation, steps), from ``/proc/self/status`` ``VmHWM`` (``getrusage`` would
    report the parent's peak: it survives fork and exec). ``step_peak_rss_bytes``: the
    peak during the timed steps alone (the mark reset after warm-up).
    ``device_peak_bytes``: the accelerator's peak bytes in use (None on CPU).
    """
    variant.compile()
    for _ in range(2):
        common.block(variant.step())
    out = {"peak_rss_bytes": common.rss_bytes()["hwm_bytes"]}
    reset = common.reset_peak_rss()
    for _ in range(steps):
        common.block(variant.step())
    if reset:
        out["step_peak_rss_bytes"] = common.rss_bytes()["hwm_bytes"]
        out["peak_rss_bytes"] = max(out["peak_rss_bytes"], out["step_peak_rss_bytes"])
    out["device_peak_bytes"] = common.device_peak_bytes()
    return out


def memory_in_subprocesses(names: list[str], argv_base: list[str]) -> dict[str, dict]:
    """Run ``--memory-probe NAME`` for each variant in a fresh process."""
    results = {}
    env = {**os.environ, **common.MALLOC_ENV}
    for name in common.bar(names, desc="memory probes"):
        command = [sys.executable, "-m", "benchmarks.train_step", *argv_base]
        command += ["--memory-probe", name]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"memory probe {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(lines[-1])
    return results


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few variants (CI)")
    parser.add_argument("--variants", help="comma-separated (default: all; quick: a few)")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--mlp", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument(
        "--dtype",
        help="compute dtype (default float32 on CPU, else bfloat16); bfloat16 also stores "
        "the frozen bases in bfloat16 (adapters, optimizer states and full fine-tuning's "
        "master weights stay float32), as tpu_scripts/train.py trains",
    )
    parser.add_argument("--base-dtype", help="frozen base matrices' dtype (default: --dtype)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, help="timed rounds (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        help="peak memory of each variant in its own process (default on, off with --quick)",
    )
    parser.add_argument("--json", default="runs/benchmarks/train_step.json")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace):
    import jax

    from benchmarks.models import QUICK, REFERENCE

    config = QUICK if args.quick else REFERENCE
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    overrides = {"dtype": dtype, "base_dtype": args.base_dtype or dtype}
    for field in ("layers", "d_model", "heads", "mlp", "vocab", "seq", "batch"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    return dataclasses.replace(config, **overrides)


def config_argv(args: argparse.Namespace, config) -> list[str]:
    """Flags that rebuild exactly ``config`` in a subprocess."""
    argv = ["--no-memory", "--rank", str(args.rank), "--alpha", str(args.alpha)]
    argv += ["--seed", str(args.seed), "--dtype", config.dtype, "--base-dtype", config.base_dtype]
    for field in ("layers", "d_model", "heads", "mlp", "vocab", "seq", "batch"):
        argv += ["--" + field.replace("_", "-"), str(getattr(config, field))]
    return argv


def use_compilation_cache(directory: str) -> None:
    """Share compiled steps with the memory probes through JAX's persistent cache."""
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def available(names: list[str]) -> tuple[list[str], dict[str, str]]:
    skipped = {}
    if any(n.endswith("qwix") for n in names):
        try:
            import qwix  # noqa: F401
        except Exception as error:
            skipped["qwix"] = f"qwix does not import: {error}"
    return [n for n in names if n.removeprefix("scan_") not in skipped], skipped


def main(argv=None) -> dict:
    common.ensure_malloc_env()
    args = parse_args(argv)
    config = make_config(args)
    wanted = args.variants or ",".join(QUICK_VARIANTS if args.quick else ALL_VARIANTS)
    names, skipped = available([n.strip() for n in wanted.split(",") if n.strip()])
    if args.memory is None:
        args.memory = not args.quick
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="jlora-bench-cache-")
    use_compilation_cache(cache_dir)

    if args.memory_probe:
        variant = build([args.memory_probe], config, args.rank, args.alpha, args.seed)
        print(json.dumps(probe_memory(variant[args.memory_probe])))
        return {}

    repeats = args.repeats or (3 if args.quick else 10)
    print(f"config: {config}, rank {args.rank}, alpha {args.alpha}", file=sys.stderr)
    variants = build(names, config, args.rank, args.alpha, args.seed)
    rows: dict[str, dict[str, Any]] = {}
    for name in common.bar(names, desc="compiling"):
        variant = variants[name]
        variant.compile()
        rows[name] = {
            "variant": name,
            "lower_s": variant.lower_s,
            "compile_s": variant.compile_s,
            **common.xla_stats(variant.compiled),
            **hlo_summary(variant.compiled, variant.target_shapes),
        }

    times, cpu_times = common.interleaved(
        {n: variants[n].step for n in names}, repeats=repeats, warmup=args.warmup
    )
    ratios = {}
    for name in names:
        rows[name]["step_s"] = statistics.median(times[name])
        rows[name]["times_s"] = times[name]
        rows[name]["step_cpu_s"] = statistics.median(cpu_times[name])
        rows[name]["cpu_times_s"] = cpu_times[name]
    pairs = [
        ("jlora", "hand"),
        ("jlora", "jlora_unshared"),
        ("scan_jlora", "scan_jlora_unshared"),
        ("jlora", "jlora_dots"),
        ("scan_jlora", "scan_jlora_dots"),
        ("jlora", "jlora_bwd_dots"),
        ("scan_jlora", "scan_jlora_bwd_dots"),
        ("jlora_bwd_dots", "floor"),
        ("scan_jlora_bwd_dots", "scan_floor"),
        ("jlora_dots", "full"),
        ("scan_jlora_dots", "scan_full"),
        ("jlora_unshared", "floor"),
        ("jlora", "floor"),
        ("jlora", "full"),
        ("floor", "full"),
        ("hand", "full"),
        ("merge", "full"),
        ("nnx", "full"),
        ("qwix", "full"),
        ("scan_jlora", "scan_hand"),
        ("scan_jlora", "scan_floor"),
        ("scan_jlora", "scan_full"),
        ("scan_floor", "scan_full"),
        ("scan_hand", "scan_full"),
        ("dora", "jlora"),
        ("dora", "full"),
        ("scan_dora", "scan_jlora"),
        ("nf4", "jlora"),
        ("nf4", "bf16_base"),
        ("scan_nf4", "scan_jlora"),
        ("nf4_dora", "dora"),
        ("bf16_base", "jlora"),
        ("infer_unmerged", "infer_merged"),
        ("infer_unmerged", "infer_unmerged_unshared"),
        ("infer_unmerged_unshared", "infer_merged"),
        ("infer_unmerged", "infer_unmerged_dots"),
        ("infer_unmerged_dots", "infer_merged"),
        ("infer_merged", "infer_base"),
    ]
    for numerator, denominator in pairs:
        if numerator in times and denominator in times:
            ratios[f"{numerator}/{denominator}"] = {
                "time": common.median_ratio(times, numerator, denominator),
                "cpu_time": common.median_ratio(cpu_times, numerator, denominator),
                "flops": rows[numerator]["flops"] / rows[denominator]["flops"],
                "temp_bytes": rows[numerator]["temp_bytes"]
                / max(rows[denominator]["temp_bytes"], 1.0),
                "argument_bytes": rows[numerator]["argument_bytes"]
                / max(rows[denominator]["argument_bytes"], 1.0),
            }
    for name in names:
        reference = "scan_full" if name.startswith("scan_") else "full"
        if name.startswith("infer_"):
            reference = "infer_base"
        if reference in times:
            rows[name]["time_vs_ref"] = common.median_ratio(times, name, reference)
            rows[name]["cpu_vs_ref"] = common.median_ratio(cpu_times, name, reference)
            rows[name]["flops_vs_ref"] = rows[name]["flops"] / rows[reference]["flops"]
            rows[name]["reference"] = reference

    if args.memory:
        del variants  # free this process's buffers before the probes run
        argv_base = [*config_argv(args, config), "--cache-dir", cache_dir]
        memory = memory_in_subprocesses(names, argv_base)
        for name, stats in memory.items():
            rows[name].update(stats)

    columns = [
        ("variant", "variant", ""),
        ("step_s", "step ms", "ms"),
        ("time_vs_ref", "time/ref", "x"),
        ("step_cpu_s", "CPU ms", "ms"),
        ("cpu_vs_ref", "CPU/ref", "x"),
        ("flops", "GFLOP", "G"),
        ("flops_vs_ref", "FLOP/ref", "x"),
        ("temp_bytes", "temp MB", "MB"),
        ("argument_bytes", "arg MB", "MB"),
        ("hlo_dots", "dots", ""),
        ("compile_s", "compile s", "s"),
        ("lower_s", "trace+lower s", "s"),
        ("step_peak_rss_bytes", "step peak RSS MB", "MB"),
        ("peak_rss_bytes", "process peak RSS MB", "MB"),
        ("device_peak_bytes", "device peak MB", "MB"),
    ]
    print(common.table(list(rows.values()), columns))
    print("\nreference: full (scan_* vs scan_full, infer_* vs infer_base); ratios are medians")
    print(f"of per-round ratios over {repeats} interleaved rounds; CPU = process CPU time.\n")
    print(
        common.table(
            [{"pair": k, **v} for k, v in ratios.items()],
            [
                ("pair", "pair", ""),
                ("time", "time", "x"),
                ("cpu_time", "CPU time", "x"),
                ("flops", "FLOPs", "x"),
                ("temp_bytes", "temp bytes", "x"),
                ("argument_bytes", "arg bytes", "x"),
            ],
        )
    )
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for name in ("jlora", "scan_jlora", "dora", "scan_dora", "nf4", "scan_nf4"):
        temps = rows.get(name, {}).get("weight_sized_temps")
        if temps is not None:
            print(f"{name}: weight-shaped temporaries in the compiled step: {temps or 'none'}")
    result = {
        "environment": common.environment(),
        "config": dataclasses.asdict(config),
        "rank": args.rank,
        "alpha": args.alpha,
        "repeats": repeats,
        "variants": rows,
        "ratios": ratios,
        "skipped": skipped,
    }
    common.write_json(args.json, result)
    print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
