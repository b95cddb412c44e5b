"""Shared pieces of the benchmark programs: timing, XLA statistics, memory, output.

Timings on a busy CPU drift by tens of percent between processes, so every program
here times its variants in interleaved rounds inside one process and reports the median
of per-round ratios, next to XLA's own noise-free counts (``cost_analysis`` FLOPs and
``memory_analysis`` bytes). glibc's default allocator thresholds alone moved the same
jitted program 25 % between processes; :func:`ensure_malloc_env` re-executes the program
with fixed thresholds unless they are set already.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def ensure_malloc_env() -> None:
    """Re-execute this process with fixed glibc malloc thresholds unless already set."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, list(sys.orig_argv), env)


def environment() -> dict[str, Any]:
    """What the numbers were measured on: date, versions, device, command."""
    import jax

    device = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", *sys.orig_argv[1:]]),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def block(value: Any) -> Any:
    """Wait for every array in ``value``."""
    import jax

    return jax.block_until_ready(value)


def interleaved(
    steps: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 2,
    progress: bool = True,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time each step ``repeats`` times in rounds (every variant once per round).

    Each round runs the variants in a fresh random order (seeded, so runs repeat), so
    that no variant always follows the same neighbour: a rotation keeps the cyclic
    order, and a light step that always ran right after a heavy one (the inference
    variants after the train steps) measured up to 10 % slow against its own copy run
    elsewhere in the round. Returns ``({name: [wall seconds per round]}, {name: [CPU seconds]})``:
    the CPU time of this process (all its threads) is far less disturbed than the
    wall time when other processes compete for the cores.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            block(steps[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    rounds = range(repeats)
    if progress:
        rounds = bar(rounds, desc="timing rounds", total=repeats)
    order = random.Random(0)
    for _ in rounds:
        for name in order.sample(names, len(names)):
            start, cpu_start = time.perf_counter(), time.process_time()
            block(steps[name]())
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return times, cpu_times


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``time[numerator] / time[denominator]`` (paired rounds)."""
    pairs = zip(times[numerator], times[denominator])
    return statistics.median(a / b for a, b in pairs)


def bar(iterable: Iterable, *, desc: str, total: int | None = None) -> Iterable:
    """A progress bar on stderr (tqdm when installed, else plain)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False)


# --------------------------------------------------------------------------------------
# XLA's counts and process memory
# --------------------------------------------------------------------------------------


def xla_stats(compiled: Any) -> dict[str, float]:
    """FLOPs and bytes from a compiled executable's cost and memory analyses."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    memory = compiled.memory_analysis()
    stats = {
        "flops": float(cost.get("flops", float("nan"))),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
    }
    for field in ("temp", "argument", "output", "alias", "generated_code"):
        value = getattr(memory, f"{field}_size_in_bytes", None)
        stats[f"{field}_bytes"] = float(value) if value is not None else float("nan")
    return stats


def forward_and_train(forward: Callable, loss: Callable, tx: Any, tree: Any, inputs: Any,
                      tokens: Any) -> tuple[dict[str, Callable[[], Any]], dict[str, dict]]:
    """Compiled ``forward(tree, inputs)`` and an optax train step on ``loss(tree, tokens)``.

    Returns ``({"forward": run, "train": run}, {"forward": xla_stats, "train": ...})``:
    each ``run()`` calls its executable on the fixed arguments, for :func:`interleaved`.
    """
    import jax
    import optax

    @jax.jit
    def train(a, state, tokens):
        value, grads = jax.value_and_grad(loss)(a, tokens)
        updates, state = tx.update(grads, state, a)
        return optax.apply_updates(a, updates), state, value

    state = tx.init(tree)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam: float ** int32 count
        f_compiled = jax.jit(forward).lower(tree, inputs).compile()
        t_compiled = train.lower(tree, state, tokens).compile()
    runs = {
        "forward": lambda: f_compiled(tree, inputs),
        "train": lambda: t_compiled(tree, state, tokens),
    }
    return runs, {"forward": xla_stats(f_compiled), "train": xla_stats(t_compiled)}


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> dict[str, float]:
    """Current RSS, peak RSS since the last reset (``VmHWM``), ``getrusage`` max RSS.

    ``getrusage``'s figure survives ``fork`` and ``exec``: in a child process it is at
    least the parent's peak at the fork. ``VmHWM`` belongs to this process alone.
    """
    current = _proc_status_kb("VmRSS")
    peak = _proc_status_kb("VmHWM")
    return {
        "rss_bytes": float(current * 1024) if current is not None else float("nan"),
        "hwm_bytes": float(peak * 1024) if peak is not None else float("nan"),
        "maxrss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    }


def device_peak_bytes() -> float | None:
    """Peak bytes in use on the first accelerator, or None on CPU."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    return float(stats.get("peak_bytes_in_use", float("nan")))


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def fmt(value: Any, kind: str = "") -> str:
    """Human format: ``ms``, ``x`` ratios, ``G`` FLOPs, ``MB`` bytes."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if kind == "ms":
        return f"{value * 1e3:.1f}"
    if kind == "s":
        return f"{value:.2f}"
    if kind == "x":
        return f"{value:.3f}"
    if kind == "G":
        return f"{value / 1e9:.2f}"
    if kind == "MB":
        return f"{value / 2**20:.1f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table; ``columns`` are ``(key, header, kind)`` with kinds as in :func:`fmt`."""
    header = [h for _, h, _ in columns]
    body = [[fmt(row.get(k), kind) for k, _, kind in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in body:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON (NaN becomes null)."""

    def clean(value):
        if isinstance(value, float) and value != value:
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as out:
        json.dump(clean(data), out, indent=2)
        out.write("\n")
