"""LoRA fine-tuning of a Llama-family decoder on a TPU slice (or simulated CPU devices).

One program runs on every host of the slice (see ``launch.sh``). The base weights are
sharded over a (data, fsdp, tensor) mesh, the adapters follow their weights'
sharding (``jlora.sharding``), and one jitted step trains on the whole mesh.

Examples::

    # here, on 8 simulated CPU devices (the same code path, minus jax.distributed):
    python tpu_scripts/train.py --simulate 8 --fsdp 4 --tensor 2 --steps 20

    # a v5p-32 slice (4 hosts x 4 chips), weights from GCS, checkpoints to GCS:
    ./tpu_scripts/launch.sh my-tpu us-east5-a "python jlora/tpu_scripts/train.py \\
        --model-dir gs://bucket/Llama-3.1-8B --data-file /data/train.txt \\
        --tokenizer /data/tokenizer --ckpt-dir gs://bucket/runs/llama8b-lora \\
        --fsdp 16 --batch 64 --seq 2048 --steps 2000"

Gradient accumulation: ``--accum N`` splits each global ``--batch`` into N
micro-batches of ``batch / N`` sequences, run one after another inside the one jitted
step (``jax.lax.scan``), their gradients summed in float32 and averaged, then ONE
optimizer update: the same update as the whole batch at once (to float32 rounding),
with the activation memory of ``batch / N`` sequences. The logged loss, tokens/s and
MFU still count the whole batch; FSDP gathers the base weights once per micro-batch::

    python tpu_scripts/train.py --simulate 8 --fsdp 4 --tensor 2 --batch 16 --accum 2

Resuming: rerun the same command; training continues after the newest complete
checkpoint in ``--ckpt-dir`` (same data order, same optimizer state).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llama
import sizes

import jlora
from jlora import checkpoint as adapter_checkpoint
from jlora.sharding import init_sharded, quantized_shardings, shardings, state_shardings

# bf16 peak matmul TFLOP/s per chip, by jax's device_kind (public Cloud TPU figures).
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model-dir",
        help="HF Llama directory (config.json + *.safetensors), "
        "local or gs://; default: random weights of --preset",
    )
    model.add_argument("--preset", default="tiny", choices=sorted(llama.PRESETS))
    model.add_argument(
        "--param-dtype",
        default=None,
        help="base weight dtype (default bfloat16; float32 with --simulate)",
    )
    model.add_argument(
        "--compute-dtype",
        default=None,
        help="activation dtype (default bfloat16; float32 with --simulate)",
    )
    model.add_argument(
        "--remat", default="nothing_saveable", help="jax.checkpoint_policies name for each layer"
    )
    model.add_argument(
        "--weights-cache", default="/tmp/jlora_weights", help="local copy of a gs:// --model-dir"
    )
    lora = parser.add_argument_group("lora")
    lora.add_argument("--rank", type=int, default=16)
    lora.add_argument("--alpha", type=float, default=32.0)
    lora.add_argument("--targets", default="q,k,v,o,gate,up,down")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument(
        "--quantize",
        choices=["nf4", "int8"],
        help="QLoRA: store the targeted kernels quantized (jlora.quantize: NF4 as "
        "bitsandbytes, double-quantized) and decode them per use inside the step",
    )
    lora.add_argument(
        "--adapter-sharding",
        default="full",
        choices=["full", "follow"],
        help="follow: each factor keeps its weight's partitioning of the axes it shares "
        "with it; full: also split over the weight's other mesh axes (nothing replicated)",
    )
    mesh = parser.add_argument_group("mesh (product = device count; -1 fills the rest)")
    mesh.add_argument("--data", type=int, default=1)
    mesh.add_argument("--fsdp", type=int, default=-1)
    mesh.add_argument("--tensor", type=int, default=1)
    data = parser.add_argument_group("data")
    data.add_argument("--data-file", help="a local text file (default: synthetic sequences)")
    data.add_argument(
        "--tokenizer",
        help="local HF tokenizer dir for --data-file (default: bytes, needs vocab >= 256)",
    )
    data.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    data.add_argument("--seq", type=int, default=64, help="sequence length")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=100)
    train.add_argument(
        "--accum",
        type=int,
        default=1,
        metavar="N",
        help="gradient accumulation: split each --batch into N micro-batches of batch/N "
        "sequences (batch/N must split over data x fsdp), summed in one step before one "
        "optimizer update; activation memory of batch/N, same update as the whole batch",
    )
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--warmup", type=int, default=10)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-every", type=int, default=50)
    train.add_argument("--eval-batches", type=int, default=4)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--ckpt-dir", help="Orbax checkpoints (local or gs://); resume from here")
    train.add_argument("--save-every", type=int, default=100)
    train.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    train.add_argument("--out", help="metrics.jsonl and the final adapters (default --ckpt-dir)")
    run = parser.add_argument_group("runtime")
    run.add_argument(
        "--simulate",
        type=int,
        default=0,
        metavar="N",
        help="run on N simulated CPU devices, without jax.distributed",
    )
    run.add_argument(
        "--no-distributed",
        action="store_true",
        help="skip jax.distributed.initialize() (single host)",
    )
    run.add_argument(
        "--compile-cache",
        help="persistent XLA compilation cache directory (a resumed run skips compiling)",
    )
    run.add_argument(
        "--peak-tflops", type=float, help="per-chip peak for MFU (default: by TPU generation)"
    )
    return parser.parse_args(argv)


def log(*parts: Any) -> None:
    if jax.process_index() == 0:
        print(*parts, flush=True)


# -- setup -----------------------------------------------------------------------------


def make_mesh(args: argparse.Namespace) -> Mesh:
    shape = [args.data, args.fsdp, args.tensor]
    count = jax.device_count()
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1; found {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if count % known:
            raise ValueError(f"{count} devices do not split into data x fsdp x tensor = {shape}")
        shape[shape.index(-1)] = count // known
    if math.prod(shape) != count:
        raise ValueError(
            f"mesh data x fsdp x tensor = {shape} needs {math.prod(shape)} devices; found {count}"
        )
    devices = mesh_utils.create_device_mesh(shape, allow_split_physical_axes=True)
    return Mesh(devices, ("data", "fsdp", "tensor"))


def load_tokens(args: argparse.Namespace, vocab: int) -> dict[str, np.ndarray] | None:
    """``{"train", "eval"}`` sequences of ``seq + 1`` tokens from ``--data-file``, or None.

    Every host tokenizes the whole file (a local path or ``gs://``); the last 5 % of
    the sequences are held out for evaluation.
    """
    if not args.data_file:
        return None
    text = epath.Path(args.data_file).read_text()
    if args.tokenizer:
        from transformers import AutoTokenizer

        ids = np.asarray(AutoTokenizer.from_pretrained(args.tokenizer)(text)["input_ids"])
    else:
        if vocab < 256:
            raise ValueError(f"byte tokens need a vocabulary of 256 or more; the model has {vocab}")
        ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    count = len(ids) // (args.seq + 1)
    if count < 2:
        raise ValueError(
            f"{args.data_file}: {len(ids)} tokens make fewer than 2 sequences of {args.seq + 1}"
        )
    sequences = ids[: count * (args.seq + 1)].reshape(count, args.seq + 1)
    held_out = max(1, count // 20)
    return {"train": sequences[:-held_out], "eval": sequences[-held_out:]}


def host_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the global batch that this host's devices hold."""
    slices = sharding.addressable_devices_indices_map(global_shape).values()
    starts = sorted({s[0].start or 0 for s in slices})
    stops = sorted({global_shape[0] if s[0].stop is None else s[0].stop for s in slices})
    start, stop = starts[0], stops[-1]
    held = sum(b - a for a, b in zip(starts, stops))
    if held != stop - start:
        raise ValueError(
            f"this host's devices hold rows {list(zip(starts, stops))} of the batch, not one "
            "contiguous block; order the mesh so that each host's devices are adjacent"
        )
    return start, stop


def local_batch(
    step: int,
    rows: tuple[int, int],
    *,
    batch: int,
    seq: int,
    vocab: int,
    sequences: np.ndarray | None,
    seed: int = 0,
) -> np.ndarray:
    """Rows ``[start, stop)`` of the global batch of ``step``: a pure function of both.

    Each host reads only the rows its devices hold, and a resumed run (or a run on
    another number of hosts) sees the same global batches. ``sequences`` is a corpus
    of ``seq + 1`` tokens per row (global batch ``k`` takes rows ``k·batch ...`` of it,
    wrapping around); without one, synthetic arithmetic sequences mod ``vocab``
    (learnable from context) are drawn from ``(seed, step)``.
    """
    start, stop = rows
    if sequences is not None:
        return sequences[(step * batch + np.arange(start, stop)) % len(sequences)]
    rng = np.random.default_rng((seed, step))
    first = rng.integers(0, vocab, (batch, 1))[start:stop]
    stride = rng.integers(1, 5, (batch, 1))[start:stop]
    return ((first + stride * np.arange(seq + 1)) % vocab).astype(np.int32)


def global_batch(local: np.ndarray, sharding: NamedSharding, batch: int) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local, (batch, local.shape[1]))


# -- the step --------------------------------------------------------------------------


def micro_batch_size(batch: int, accum: int, batch_ways: int) -> int:
    """Sequences per micro-batch, ``batch / accum``, checked to split over the mesh.

    Each micro-batch is split over the ``batch_ways = data x fsdp`` devices, as the
    whole batch is, so ``batch`` must be divisible by ``accum`` and ``batch / accum``
    by ``batch_ways``; a ``ValueError`` names the values otherwise.
    """
    if accum < 1:
        raise ValueError(f"--accum must be 1 or more; found {accum}")
    if batch % accum:
        raise ValueError(f"--batch {batch} does not split into --accum {accum} equal micro-batches")
    if (batch // accum) % batch_ways:
        raise ValueError(
            f"--batch {batch} / --accum {accum} = {batch // accum} sequences per micro-batch "
            f"must split evenly over data x fsdp = {batch_ways} devices"
        )
    return batch // accum


def split_micro_batches(batch_BxT: jax.Array, accum: int) -> jax.Array:
    """``(B, T) -> (accum, B / accum, T)``: micro-batch ``i`` takes rows ``i, i + accum, ...``.

    Strided rather than in blocks: a device holding a contiguous block of the batch's
    rows (the batch sharding) holds its share of every micro-batch already, so the
    split moves no data between devices when ``B / accum`` splits over them.
    """
    rows, width = batch_BxT.shape
    if rows % accum:
        raise ValueError(f"a batch of {rows} rows does not split into {accum} micro-batches")
    return batch_BxT.reshape(rows // accum, accum, width).swapaxes(0, 1)


def cross_entropy(logits_BxSxV: jax.Array, targets_BxS: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxSxV, targets_BxS).mean()


def quantize_base(params, param_shardings, model, args, tokens_spec):
    """The targeted kernels quantized on device, their codes split like their weights.

    ``jlora.sharding.quantized_shardings`` places each encoded array by its axis
    signature; the step gathers a layer's codes (4-bit, not bf16) and decodes them per
    use. Returns the params and their shardings.
    """
    targets = args.targets.split(",")

    def quantize(p):
        return jlora.quantize(p, targets, kind=args.quantize, fn=model.apply, args=(tokens_spec,))

    is_node = lambda x: isinstance(x, jlora.QuantizedWeight)
    shardings_q = quantized_shardings(jax.eval_shape(quantize, params), param_shardings)
    params = jax.jit(quantize, out_shardings=shardings_q)(params)
    stored = sum(
        x.nbytes() for x in jax.tree_util.tree_leaves(params, is_leaf=is_node) if is_node(x)
    )
    log(f"base kernels quantized to {args.quantize}: {stored / 2**20:.1f} MiB of codes")
    return params, shardings_q


def make_steps(
    model: llama.Llama,
    tx: optax.GradientTransformation,
    dropout: bool,
    accum: int = 1,
    grad_shardings: Any = None,
):
    """``train_step(state, params, batch, key) -> (state, loss, grad_norm)`` and
    ``eval_step(adapters, params, batch) -> loss``, to jit.

    ``accum > 1`` accumulates gradients over ``accum`` micro-batches of the batch (see
    ``accumulate``) and applies one update; ``accum == 1`` is the plain step.
    ``grad_shardings`` (the adapters' shardings) places the accumulated gradients.
    """
    forward = jlora.lora(model.apply)

    def loss_fn(adapters, params, batch, key):
        logits = forward(params, adapters, batch[:, :-1], lora_key=key if dropout else None)
        return cross_entropy(logits, batch[:, 1:])

    def accumulate(adapters, params, batch, key):
        """The loss and adapter gradients of the whole batch, one micro-batch at a time.

        ``jax.lax.scan`` runs ``loss_fn``'s forward and backward on each micro-batch in
        turn (so only one micro-batch's activations are live), summing the losses and
        gradients in float32; both are then divided by ``accum``. Every micro-batch has
        the same number of tokens and ``cross_entropy`` is their mean (no masking), so
        this is the loss and gradient of the mean over the whole batch. Dropout draws a
        key per micro-batch (``fold_in(key, i)``).
        """

        def place(tree):
            if grad_shardings is None:
                return tree
            return jax.lax.with_sharding_constraint(tree, grad_shardings)

        def one(carry, xs):
            loss_sum, grad_sum = carry
            index, micro = xs
            micro_key = jax.random.fold_in(key, index) if dropout else key
            loss, grads = jax.value_and_grad(loss_fn)(adapters, params, micro, micro_key)
            grad_sum = jax.tree_util.tree_map(
                lambda s, g: s + g.astype(jnp.float32), grad_sum, grads
            )
            return (loss_sum + loss.astype(jnp.float32), place(grad_sum)), None

        zeros = place(jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), adapters))
        micro_batches = split_micro_batches(batch, accum)
        (loss_sum, grad_sum), _ = jax.lax.scan(
            one, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(accum), micro_batches)
        )
        grads = jax.tree_util.tree_map(lambda s, a: (s / accum).astype(a.dtype), grad_sum, adapters)
        return loss_sum / accum, grads

    def train_step(state, params, batch, key):
        if accum == 1:  # the plain step, compiled as without accumulation
            loss, grads = jax.value_and_grad(loss_fn)(state["adapters"], params, batch, key)
        else:
            loss, grads = accumulate(state["adapters"], params, batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["adapters"])
        adapters = optax.apply_updates(state["adapters"], updates)
        return {"adapters": adapters, "opt_state": opt_state}, loss, optax.global_norm(grads)

    def eval_step(adapters, params, batch):
        if accum == 1:
            return cross_entropy(forward(params, adapters, batch[:, :-1]), batch[:, 1:])
        # Micro-batched like the train step, so evaluating needs no more memory than it.
        losses = jax.lax.map(
            lambda micro: cross_entropy(forward(params, adapters, micro[:, :-1]), micro[:, 1:]),
            split_micro_batches(batch, accum),
        )
        return losses.mean()

    return train_step, eval_step


def flops_per_token(cfg: llama.LlamaConfig, seq: int, adapter_params: int) -> float:
    """Model FLOPs of one LoRA training token (no remat recompute counted).

    Forward: 2 per matmul weight, plus attention's 2·2·L·seq·heads·hd. Backward: the
    activation gradients only (2 per weight again; the frozen base gets no weight
    gradient), plus 6 per adapter parameter (forward, and both gradients).
    """
    attention = 4 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.dim_per_head
    forward = 2 * cfg.matmul_params() + attention
    return 2 * forward + 6 * adapter_params


def peak_flops(args: argparse.Namespace, table: dict[str, float] | None = None) -> float | None:
    """``--peak-tflops``, else the first ``table`` entry (default: the TPU generations)
    that device 0's ``device_kind`` starts with, in FLOP/s; None when none does."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in (PEAK_TFLOPS if table is None else table).items():
        if kind.startswith(name):
            return tflops * 1e12
    return None


def memory_line() -> str:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return "device memory: not reported on this platform"
    return (
        f"device 0 memory: peak {stats['peak_bytes_in_use'] / 2**30:.2f} GiB of "
        f"{stats.get('bytes_limit', 0) / 2**30:.2f} GiB"
    )


# -- checkpoints -----------------------------------------------------------------------


def checkpoint_manager(args: argparse.Namespace) -> ocp.CheckpointManager | None:
    if not args.ckpt_dir:
        return None
    directory = args.ckpt_dir if "://" in args.ckpt_dir else os.path.abspath(args.ckpt_dir)
    options = ocp.CheckpointManagerOptions(max_to_keep=args.keep, create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(manager, step: int, state: Any, meta: dict[str, Any]) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )


def restore(manager, abstract_state: Any) -> tuple[int, Any] | None:
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return step, restored["state"]


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.simulate:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.simulate)
    elif not args.no_distributed:
        jax.distributed.initialize()  # TPU VMs: coordinator and process ids auto-detected
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    default_dtype = "float32" if args.simulate else "bfloat16"
    param_dtype = jnp.dtype(args.param_dtype or default_dtype)
    compute_dtype = jnp.dtype(args.compute_dtype or default_dtype)

    mesh = make_mesh(args)
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch % batch_ways:
        raise ValueError(
            f"--batch {args.batch} must split evenly over data x fsdp = {batch_ways} devices"
        )
    micro = micro_batch_size(args.batch, args.accum, batch_ways)
    cfg = llama.read_config(args.model_dir) if args.model_dir else llama.PRESETS[args.preset]
    model = llama.Llama(
        cfg, dtype=compute_dtype, param_dtype=param_dtype, mesh=mesh, remat_policy=args.remat
    )
    log(
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} on "
        f"{jax.process_count()} host(s); mesh {dict(mesh.shape)}"
    )
    log(
        f"model: {cfg.params() / 1e6:.1f} M params, {param_dtype.name} base, "
        f"{compute_dtype.name} activations"
    )

    # The base: sharded from the start (loaded shard by shard, or initialised in place).
    tokens_spec = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    abstract_params = jax.eval_shape(model.init, jax.random.key(args.seed), tokens_spec)
    param_shardings = llama.param_shardings(abstract_params, mesh)
    started = time.perf_counter()
    if args.model_dir:
        params = llama.load_hf(
            args.model_dir, abstract_params, param_shardings, cfg, cache_dir=args.weights_cache
        )
    else:
        params = jax.jit(model.init, out_shardings=param_shardings)(
            jax.random.key(args.seed), jnp.zeros((1, args.seq), jnp.int32)
        )
    log(f"base weights ready in {time.perf_counter() - started:.1f}s")

    # Adapters, created on their shards; the optimizer state follows them.
    spec = jlora.LoraSpec(
        rank=args.rank, alpha=args.alpha, targets=args.targets.split(","), dropout=args.lora_dropout
    )
    sharded_abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_params,
        param_shardings,
    )
    adapters = init_sharded(
        spec,
        sharded_abstract,
        jax.random.key(args.seed + 1),
        full=args.adapter_sharding == "full",
        fn=model.apply,
        args=(tokens_spec,),
    )
    adapter_shardings = shardings(adapters, param_shardings, full=args.adapter_sharding == "full")
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, max(args.warmup, 1), max(args.steps, args.warmup + 1)
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),  # over all adapters at once
        jlora.optimizer(optax.adamw(schedule, weight_decay=0.0), adapters),
    )
    state_placement = {
        "adapters": adapter_shardings,
        "opt_state": state_shardings(jax.eval_shape(tx.init, adapters), adapter_shardings),
    }
    state = jax.jit(
        lambda a: {"adapters": a, "opt_state": tx.init(a)}, out_shardings=state_placement
    )(adapters)
    base_shardings = param_shardings
    if args.quantize:
        params, base_shardings = quantize_base(params, param_shardings, model, args, tokens_spec)
    adapter_params = sum(x.size for x in jax.tree_util.tree_leaves(adapters))
    log(jlora.summary(params, adapters))
    log(
        f"adapters: {adapter_params * 4 / 2**20:.2f} MiB in float32 "
        f"(+{2 * adapter_params * 4 / 2**20:.2f} MiB Adam state), sharded like their weights"
    )

    estimate = sizes.estimate(
        cfg,
        chips=jax.device_count(),
        batch=micro,  # the activations live at once: one micro-batch's
        seq=args.seq,
        rank=args.rank,
        tensor=mesh.shape["tensor"],
        param_bytes=param_dtype.itemsize,
        act_bytes=compute_dtype.itemsize,
        quantize="nf4" if args.quantize == "nf4" else None,
    )
    log(
        "estimated per chip: "
        + ", ".join(
            f"{k} {estimate[k] / 2**30:.2f} GiB" for k in ("base", "adapters", "activations")
        )
        + " (tpu_scripts/sizes.py)"
    )

    manager = checkpoint_manager(args)
    first_step = 1
    if manager is not None:
        abstract_state = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        resumed = restore(manager, abstract_state)
        if resumed is not None:
            step, state = resumed
            first_step = step + 1
            log(f"resumed from step {step} in {args.ckpt_dir}")

    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    train_step, eval_step = make_steps(
        model,
        tx,
        dropout=args.lora_dropout > 0,
        accum=args.accum,
        grad_shardings=adapter_shardings,
    )
    if args.accum > 1:
        log(
            f"gradient accumulation: {args.accum} micro-batches of {micro} sequences per "
            f"step of {args.batch}, one optimizer update"
        )
    train_step = jax.jit(
        train_step,
        in_shardings=(state_placement, base_shardings, batch_sharding, None),
        out_shardings=(state_placement, None, None),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(eval_step, in_shardings=(adapter_shardings, base_shardings, batch_sharding))
    corpus = load_tokens(args, cfg.vocab_size)
    rows = host_rows(batch_sharding, (args.batch, args.seq + 1))

    def batch_of(step: int, split: str) -> jax.Array:
        sequences = None if corpus is None else corpus[split]
        seed = args.seed if split == "train" else args.seed + 1
        local = local_batch(
            step,
            rows,
            batch=args.batch,
            seq=args.seq,
            vocab=cfg.vocab_size,
            sequences=sequences,
            seed=seed,
        )
        return global_batch(local, batch_sharding, args.batch)

    def evaluate(adapters) -> float:
        losses = [
            eval_step(adapters, params, batch_of(i, "eval")) for i in range(args.eval_batches)
        ]
        return float(np.mean([float(x) for x in losses]))

    out_dir = args.out or args.ckpt_dir
    metrics_path = epath.Path(out_dir) / "metrics.jsonl" if out_dir else None
    history: list[str] = []
    if metrics_path is not None and jax.process_index() == 0:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if metrics_path.exists():  # a resumed run continues the file
            history = metrics_path.read_text().splitlines()

    def record(entry: dict[str, Any]) -> None:
        log(
            " | ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
            )
        )
        if metrics_path is not None and jax.process_index() == 0:
            history.append(json.dumps(entry))
            # Rewritten whole: gs:// objects cannot be appended to.
            metrics_path.write_text("\n".join(history) + "\n")

    tokens_per_step = args.batch * args.seq  # the whole batch, all micro-batches
    model_flops = flops_per_token(cfg, args.seq, adapter_params) * tokens_per_step
    peak = peak_flops(args)
    base_key = jax.random.key(args.seed + 2)
    if first_step <= args.steps:
        # Compiled ahead, to report XLA's own memory plan before the first step runs.
        tic = time.perf_counter()
        train_step = train_step.lower(
            state, params, batch_of(first_step, "train"), base_key
        ).compile()
        memory = train_step.memory_analysis()
        if memory is not None:
            log(
                f"train step compiled in {time.perf_counter() - tic:.1f}s; XLA's plan per "
                f"device: arguments {memory.argument_size_in_bytes / 2**30:.2f} GiB, "
                f"temporaries {memory.temp_size_in_bytes / 2**30:.2f} GiB"
            )
    window_start, window_steps, compile_seconds = None, 0, 0.0
    last = {}
    for step in range(first_step, args.steps + 1):
        batch = batch_of(step, "train")
        tic = time.perf_counter()
        state, loss, grad_norm = train_step(
            state, params, batch, jax.random.fold_in(base_key, step)
        )
        if window_start is None:  # the first step warms up: keep it out of throughput
            loss.block_until_ready()
            compile_seconds = time.perf_counter() - tic
            window_start, window_steps = time.perf_counter(), 0
        else:
            window_steps += 1
        if step % args.log_every == 0 or step == args.steps:
            loss_value = float(loss)  # waits for the step
            entry = {"step": step, "loss": loss_value, "grad_norm": float(grad_norm)}
            elapsed = time.perf_counter() - window_start
            if window_steps:
                step_time = elapsed / window_steps
                entry["step_s"] = step_time
                entry["tokens_per_s"] = tokens_per_step / step_time
                entry["tokens_per_s_per_chip"] = entry["tokens_per_s"] / jax.device_count()
                if peak:
                    entry["mfu"] = model_flops / step_time / (peak * jax.device_count())
            else:
                entry["first_step_s"] = compile_seconds
            record(entry)
            last = entry
            window_start, window_steps = time.perf_counter(), 0
        if step % args.eval_every == 0 or step == args.steps:
            record({"step": step, "eval_loss": evaluate(state["adapters"])})
            window_start, window_steps = time.perf_counter(), 0
        if manager is not None and (step % args.save_every == 0 or step == args.steps):
            save(
                manager,
                step,
                state,
                {"step": step, "args": vars(args), "config": dataclasses.asdict(cfg)},
            )
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    if out_dir and first_step <= args.steps:
        path = adapter_checkpoint.save(
            f"{out_dir.rstrip('/')}/adapters", state["adapters"], spec, overwrite=True
        )
        log(f"adapters written to {path} (jlora.checkpoint.load to use them)")
    log(memory_line())
    return last


if __name__ == "__main__":
    main()
