"""Merge/unmerge throughput: GB/s of base weights, against a plain copy of the same bytes.

The weights are the targeted matrices of a Llama-3.2-1B-shaped decoder (16 layers,
d_model 2048, 512-wide k/v, MLP 8192: q, k, v, o, gate, up, down, 0.97 B parameters),
with rank-8 adapters on all of them. Each method processes the whole set once per
round; rounds interleave the methods:

==================  ==================================================================
``copy``            a jitted copy of every weight (reads and writes the same bytes:
                    the memory-bandwidth limit)
``merge``           ``jax.jit(jlora.merge)``: new weights ``W + s·A·B``
``unmerge``         ``jax.jit(jlora.unmerge)``
``merge_inplace``   ``jax.jit(jlora.merge, donate_argnums=0)`` then the same for
                    unmerge, each timed alone: the base buffers are reused
``merge_eager``     ``jlora.merge`` called without ``jit`` (op by op)
``oneshot``         the one-shot form jlora used before its blocked merge:
                    ``W + s·A·B`` with the whole float32 product formed first
``oneshot_inplace`` the same, donated (merged again and again into its own buffers)
``merge_blocks``    ``merge``, with low-rank weights merged by row blocks as high-rank
                    ones are (``_OUTER_MAX_RANK`` set to 0 while it compiles): the path
                    the outer-product pass replaced, side by side
``merge_blocks_inplace``  the same for the donated pair (with
``unmerge_blocks_inplace``)
==================  ==================================================================

Throughput is the bytes of the base weights divided by the time. ``--layers`` scales
the set down when memory or time is short (the per-byte rate hardly depends on it).
``--warmup`` untimed rounds come first: on a VM, memory fresh to the process faults in
slowly, and without them the first rounds of a run were up to 4.5x slower.

Run from the repository root::

    python -m benchmarks.merge                        # 16 layers, float32 and bfloat16
    python -m benchmarks.merge --layers 16 --dtypes bfloat16 --warmup 4 --repeats 7
    python -m benchmarks.merge --layers 4 --dtypes bfloat16
    python -m benchmarks.merge --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks import common

METHODS = (
    "copy", "merge", "unmerge", "merge_inplace", "unmerge_inplace", "merge_eager", "oneshot",
    "oneshot_inplace", "merge_blocks", "merge_blocks_inplace", "unmerge_blocks_inplace",
)  # fmt: skip


def compile_with_blocks(fn, *args, donate: bool = False):
    """``jax.jit(fn)`` compiled with the outer-product merge off (row blocks at any rank).

    A fresh wrapper of ``fn``, so no trace cached with the default threshold is reused.
    """
    import jax

    from jlora import _adapter

    def wrapped(*a):
        return fn(*a)

    saved = _adapter._OUTER_MAX_RANK
    _adapter._OUTER_MAX_RANK = 0
    try:
        return jax.jit(wrapped, donate_argnums=0 if donate else ()).lower(*args).compile()
    finally:
        _adapter._OUTER_MAX_RANK = saved


def oneshot_merge(params, adapters):
    """``W + s·A·B`` with the product of each whole weight formed first (the baseline)."""
    import jax

    import jlora
    from jlora._adapter import add_delta

    return jax.tree.map(
        lambda w, a: add_delta(w, a.delta()) if jlora.is_adapter(a) else w,
        params, adapters, is_leaf=jlora.is_adapter,
    )  # fmt: skip


def weight_shapes(d_model: int, kv: int, mlp: int) -> dict[str, tuple[int, int]]:
    """One layer's targeted matrices as ``(in, out)`` kernels."""
    return {
        "q": (d_model, d_model),
        "k": (d_model, kv),
        "v": (d_model, kv),
        "o": (d_model, d_model),
        "gate": (d_model, mlp),
        "up": (d_model, mlp),
        "down": (mlp, d_model),
    }


def build(args, dtype):
    """Base weights (constant fill: values do not change the speed) and rank-r adapters."""
    import jax
    import jax.numpy as jnp

    import jlora

    shapes = weight_shapes(args.d_model, args.kv, args.mlp)
    params = {
        f"layer_{i}": {
            name: {"kernel": jnp.full(shape, 0.01, dtype)} for name, shape in shapes.items()
        }
        for i in range(args.layers)
    }
    spec = jlora.LoraSpec(rank=args.rank, alpha=2.0 * args.rank, targets=list(shapes))
    adapters = jlora.init(spec, params, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 1e-3, adapters)  # B = 0 at init
    return common.block(params), common.block(adapters)


def run_dtype(args, dtype_name: str) -> dict:
    """Time every method on one dtype; returns per-method medians and ratios."""
    import jax
    import jax.numpy as jnp

    import jlora

    dtype = jnp.dtype(dtype_name)
    params, adapters = build(args, dtype)
    leaves = jax.tree.leaves(params)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    n_params = sum(x.size for x in leaves)
    print(
        f"{dtype_name}: {n_params / 1e9:.3f} B parameters, {weight_bytes / 1e9:.2f} GB",
        file=sys.stderr,
    )

    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
    merge = jax.jit(jlora.merge)
    unmerge = jax.jit(jlora.unmerge)
    merge_donated = jax.jit(jlora.merge, donate_argnums=0)
    unmerge_donated = jax.jit(jlora.unmerge, donate_argnums=0)
    oneshot = jax.jit(oneshot_merge)
    oneshot_donated = jax.jit(oneshot_merge, donate_argnums=0)
    compiled = {
        "copy": copy.lower(params).compile(),
        "merge": merge.lower(params, adapters).compile(),
        "unmerge": unmerge.lower(params, adapters).compile(),
        "oneshot": oneshot.lower(params, adapters).compile(),
    }
    if "merge_blocks" in args.methods:
        compiled["merge_blocks"] = compile_with_blocks(jlora.merge, params, adapters)
    xla = {name: common.xla_stats(c) for name, c in compiled.items()}

    # The in-place pair shares one buffer set: merge consumes it, unmerge gives it back.
    working = {"params": jax.tree.map(jnp.copy, params)}
    if "oneshot_inplace" in args.methods:
        working["oneshot"] = jax.tree.map(jnp.copy, params)
    merge_blocks_donated = unmerge_blocks_donated = None  # compiled only when asked for
    if "merge_blocks_inplace" in args.methods:
        working["blocks"] = jax.tree.map(jnp.copy, params)
        merge_blocks_donated = compile_with_blocks(jlora.merge, params, adapters, donate=True)
        unmerge_blocks_donated = compile_with_blocks(jlora.unmerge, params, adapters, donate=True)

    def in_place(key, donated):
        """A step that runs ``donated`` on the buffer set ``working[key]`` and keeps its
        result there for the next step (the donated input is consumed)."""

        def step():
            working[key] = donated(working[key], adapters)
            return working[key]

        return step

    steps = {
        "copy": lambda: compiled["copy"](params),
        "merge": lambda: compiled["merge"](params, adapters),
        "unmerge": lambda: compiled["unmerge"](params, adapters),
        "merge_inplace": in_place("params", merge_donated),
        "unmerge_inplace": in_place("params", unmerge_donated),
        "merge_eager": lambda: jlora.merge(params, adapters),
        "oneshot": lambda: compiled["oneshot"](params, adapters),
        "oneshot_inplace": in_place("oneshot", oneshot_donated),
        "merge_blocks": lambda: compiled["merge_blocks"](params, adapters),
        "merge_blocks_inplace": in_place("blocks", merge_blocks_donated),
        "unmerge_blocks_inplace": in_place("blocks", unmerge_blocks_donated),
    }
    steps = {name: steps[name] for name in args.methods}
    # The in-place pair must alternate; keep it adjacent and in order within each round.
    times: dict[str, list[float]] = {name: [] for name in steps}
    # Warm-up: compiles the donated and eager paths, and lets the machine hand out the
    # pages the outputs need (on a VM, fresh memory is slow to fault in at first).
    for _ in range(args.warmup):
        for step in steps.values():
            common.block(step())
    for _ in common.bar(range(args.repeats), desc=f"{dtype_name} rounds", total=args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            out = common.block(step())
            times[name].append(time.perf_counter() - start)
            del out

    rows = []
    for name in steps:
        seconds = statistics.median(times[name])
        row = {
            "method": name,
            "dtype": dtype_name,
            "seconds": seconds,
            "gb_per_s": weight_bytes / seconds / 1e9,
            "times_s": times[name],
        }
        if "copy" in times:
            row["time_vs_copy"] = common.median_ratio(times, name, "copy")
        if name in xla:
            row.update({k: xla[name][k] for k in ("flops", "temp_bytes", "bytes_accessed")})
        rows.append(row)
    return {"weight_bytes": weight_bytes, "parameters": n_params, "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds (CI)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--kv", type=int, default=512)
    parser.add_argument("--mlp", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--json", default="runs/benchmarks/merge.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.kv, args.mlp, args.repeats = 2, 256, 64, 1024, 2
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for first in ("merge_inplace", "merge_blocks_inplace"):
        if (first in args.methods) != ("un" + first in args.methods):
            parser.error(f"{first} and un{first} run as a pair: name both or neither")
    return args


def main(argv=None) -> dict:
    common.ensure_malloc_env()
    args = parse_args(argv)
    results = {}
    for dtype_name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        results[dtype_name] = run_dtype(args, dtype_name)
    rows = [row for result in results.values() for row in result["rows"]]
    print(
        f"{args.layers} layers of d_model {args.d_model}, kv {args.kv}, MLP {args.mlp}, "
        f"rank {args.rank}; median of {args.repeats} interleaved rounds\n"
    )
    print(
        common.table(
            rows,
            [
                ("dtype", "dtype", ""),
                ("method", "method", ""),
                ("seconds", "ms", "ms"),
                ("gb_per_s", "GB/s", "x"),
                ("time_vs_copy", "time/copy", "x"),
                ("flops", "GFLOP", "G"),
                ("temp_bytes", "temp MB", "MB"),
            ],
        )
    )
    for dtype_name, result in results.items():
        by_name = {row["method"]: row for row in result["rows"]}
        if "merge" in by_name and "copy" in by_name:
            print(
                f"{dtype_name}: jit merge {by_name['merge']['gb_per_s']:.1f} GB/s, "
                f"copy {by_name['copy']['gb_per_s']:.1f} GB/s "
                f"({by_name['merge']['time_vs_copy']:.2f}x the copy's time)"
            )
    out = {"environment": common.environment(), "args": vars(args), "results": results}
    common.write_json(args.json, out)
    print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
