"""Smoke tests: each benchmark program runs its ``--quick`` mode and writes its JSON.

No timing is asserted; the point is that the programs keep working as the library
changes. Each runs in its own process from the repository root, as a user runs it.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_quick(module: str, json_path: pathlib.Path, *flags: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", module, "--quick", "--json", str(json_path), *flags]
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stderr[-4000:]}"
    assert "|" in proc.stdout  # printed its table
    return json.loads(json_path.read_text())


@pytest.mark.slow
def test_train_step_quick(tmp_path):
    result = run_quick("benchmarks.train_step", tmp_path / "train_step.json")
    variants = result["variants"]
    assert {"full", "jlora", "hand", "infer_unmerged"} <= set(variants)
    for row in variants.values():
        assert row["step_s"] > 0 and row["flops"] > 0
    # XLA's FLOP count is deterministic: jlora's step does the hand-written model's work.
    assert variants["jlora"]["flops"] == pytest.approx(variants["hand"]["flops"], rel=0.02)
    assert variants["jlora"]["flops"] < variants["full"]["flops"]


def test_merge_quick(tmp_path):
    result = run_quick("benchmarks.merge", tmp_path / "merge.json")
    for per_dtype in result["results"].values():
        methods = {row["method"] for row in per_dtype["rows"]}
        assert {"copy", "merge", "unmerge"} <= methods
        assert all(row["gb_per_s"] > 0 for row in per_dtype["rows"])


def test_checkpoint_quick(tmp_path):
    result = run_quick("benchmarks.checkpoint", tmp_path / "checkpoint.json")
    adapters, full = result["rows"]
    assert 0 < adapters["disk_bytes"] < full["disk_bytes"]


@pytest.mark.slow
def test_loftq_quick(tmp_path):
    result = run_quick("benchmarks.loftq", tmp_path / "loftq.json")
    assert not result["failures"]  # the program exits 1 on a failed claim, checked above
    errors = {(row["variant"], row["rank"]): row for row in result["errors"]}
    plain = errors[("NF4 (+ LoRA, B = 0)", "-")]["weight_rel_error"]
    assert 0 < errors[("NF4 + LoftQ (1 round)", 8)]["weight_rel_error"] < plain
    rows = result["finetune"]["rows"]
    assert [row["variant"] for row in rows][:2] == ["float + LoRA", "NF4 + LoRA"]
    for row in rows:
        assert row["flops"] > 0 and row["loss_end"] < row["loss_0"]
    # NF4 stores about 4.1 bits per targeted weight, float32 32.
    assert rows[1]["base_bytes"] < rows[0]["base_bytes"] / 4


@pytest.mark.slow
def test_gpu_step_quick(tmp_path):
    """benchmarks/gpu.sh's program on the tiny preset (any backend): the variants run
    (``--fast-backward`` adds ``jlora_fast``), and XLA counts fewer FLOPs for the LoRA
    steps than for full fine-tuning."""
    result = run_quick("benchmarks.gpu_step", tmp_path / "gpu_step.json", "--fast-backward")
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"full", "jlora", "jlora_fast"}
    assert 0 < rows["jlora_fast"]["xla_tflop"] < rows["full"]["xla_tflop"]
    assert result["jlora_fast_over_jlora"] > 0
    assert all(row["tokens_per_s"] > 0 for row in rows.values())
    assert 0 < rows["jlora"]["xla_tflop"] < rows["full"]["xla_tflop"]
    assert result["jlora_over_full"] > 0


def test_interleaved_rounds_vary_each_variants_neighbour():
    """Every variant runs once per round, and a variant does not always follow the same
    one (a rotation would keep each predecessor: a light step after a heavy one every
    round measured up to 10 % slow)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import common

    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abcde"}
    times, cpu_times = common.interleaved(steps, repeats=8, warmup=1, progress=False)
    assert {n: len(t) for n, t in times.items()} == dict.fromkeys("abcde", 8)
    assert {n: len(t) for n, t in cpu_times.items()} == dict.fromkeys("abcde", 8)
    rounds = [calls[i : i + 5] for i in range(5, len(calls), 5)]  # after the warm-up
    assert len(rounds) == 8 and all(sorted(r) == list("abcde") for r in rounds)
    for name in "abcde":
        before = {r[r.index(name) - 1] for r in rounds if r.index(name) > 0}
        assert len(before) > 1, (name, rounds)
