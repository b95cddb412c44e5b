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


def run_quick(module: str, json_path: pathlib.Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", module, "--quick", "--json", str(json_path)]
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
