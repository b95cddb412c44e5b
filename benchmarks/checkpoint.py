"""Checkpoint benchmark: jlora adapter save/load against saving the full parameters.

On the reference decoder of ``benchmarks/models.py`` with rank-8 adapters on q, k, v,
o, up and down of every layer, each round (rounds interleaved, fresh directories):

=====================  ================================================================
``adapters_save``      ``jlora.checkpoint.save`` (Orbax, plus the spec as JSON)
``adapters_load``      ``jlora.checkpoint.load(like=adapters)``
``full_save``          ``orbax.checkpoint.StandardCheckpointer().save`` of every parameter
``full_load``          ``StandardCheckpointer().restore`` onto the abstract parameters
=====================  ================================================================

Size is the bytes on disk of one checkpoint directory.

Run from the repository root::

    python -m benchmarks.checkpoint
    python -m benchmarks.checkpoint --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks import common


def directory_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds (CI)")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--mlp", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, help="rounds (default 5, quick 2)")
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    parser.add_argument("--json", default="runs/benchmarks/checkpoint.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    common.ensure_malloc_env()
    args = parse_args(argv)
    import jax
    import orbax.checkpoint as ocp

    import jlora
    from benchmarks.models import GPT, QUICK, REFERENCE, TARGETS, batch_of_tokens
    from jlora import checkpoint

    config = QUICK if args.quick else REFERENCE
    overrides = {f: getattr(args, f) for f in ("layers", "d_model", "mlp", "vocab")}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    repeats = args.repeats or (2 if args.quick else 5)

    model = GPT(config)
    inputs = batch_of_tokens(config, jax.random.key(0))[:, :-1]
    params = model.init(jax.random.key(1), inputs)
    spec = jlora.LoraSpec(rank=args.rank, alpha=2.0 * args.rank, targets=list(TARGETS))
    adapters = jlora.init(spec, params, jax.random.key(2), fn=model.apply, args=(inputs,))
    # Trained-looking factors (B = 0 at init would compress to nothing on disk).
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    adapters = jax.tree.unflatten(treedef, leaves)
    abstract_params = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
    tensor_bytes = {
        "adapters": sum(x.nbytes for x in jax.tree.leaves(adapters)),
        "full": sum(x.nbytes for x in jax.tree.leaves(params)),
    }

    root = args.dir or tempfile.mkdtemp(prefix="jlora-bench-ckpt-")
    os.makedirs(root, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    sizes: dict[str, int] = {}
    times: dict[str, list[float]] = {
        k: [] for k in ("adapters_save", "adapters_load", "full_save", "full_load")
    }

    def adapters_round(index: int) -> None:
        path = os.path.join(root, f"adapters_{index}")
        start = time.perf_counter()
        checkpoint.save(path, adapters, spec)
        times["adapters_save"].append(time.perf_counter() - start)
        start = time.perf_counter()
        loaded, _ = checkpoint.load(path, like=adapters)
        common.block(loaded)
        times["adapters_load"].append(time.perf_counter() - start)
        sizes["adapters"] = directory_bytes(path)
        shutil.rmtree(path)

    def full_round(index: int) -> None:
        path = os.path.join(root, f"full_{index}")
        start = time.perf_counter()
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
        times["full_save"].append(time.perf_counter() - start)
        start = time.perf_counter()
        restored = checkpointer.restore(path, abstract_params)
        common.block(restored)
        times["full_load"].append(time.perf_counter() - start)
        sizes["full"] = directory_bytes(path)
        shutil.rmtree(path)

    adapters_round(-1)  # warm-up: imports, first-call setup
    full_round(-1)
    for index in common.bar(range(repeats), desc="rounds", total=repeats):
        if index % 2:
            full_round(index)
            adapters_round(index)
        else:
            adapters_round(index)
            full_round(index)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    for what in ("adapters", "full"):
        save_s = statistics.median(times[f"{what}_save"])
        load_s = statistics.median(times[f"{what}_load"])
        rows.append(
            {
                "what": "jlora adapters" if what == "adapters" else "full params (Orbax)",
                "tensor_bytes": tensor_bytes[what],
                "disk_bytes": sizes[what],
                "save_s": save_s,
                "load_s": load_s,
            }
        )
    print(f"{config}, rank {args.rank}; median of {repeats} rounds\n")
    print(
        common.table(
            rows,
            [
                ("what", "checkpoint", ""),
                ("tensor_bytes", "tensor MB", "MB"),
                ("disk_bytes", "on disk MB", "MB"),
                ("save_s", "save ms", "ms"),
                ("load_s", "load ms", "ms"),
            ],
        )
    )
    size_ratio = sizes["full"] / sizes["adapters"]
    print(
        f"\nadapters: {size_ratio:.0f}x smaller on disk than the full parameters; save "
        f"{rows[1]['save_s'] / rows[0]['save_s']:.1f}x and load "
        f"{rows[1]['load_s'] / rows[0]['load_s']:.1f}x faster.",
        file=sys.stdout,
    )
    out = {
        "environment": common.environment(),
        "config": dataclasses.asdict(config),
        "rank": args.rank,
        "rows": rows,
        "times_s": times,
    }
    common.write_json(args.json, out)
    print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
