"""``examples/finetune_tunix.py`` in its quick mode, in the zoo environment: it trains
LoRA on a tunix Qwen 3 and Qwen 3 MoE, and checks itself that the loss fell, that the
Orbax copy equals the adapters and that PEFT's logits equal jlora's (exit 1 if not)."""

from __future__ import annotations

import re

import pytest

from tests.test_examples import run_example

pytest.importorskip("tunix")


def test_finetune_tunix(tmp_path):
    out = run_example("finetune_tunix.py", "--out", str(tmp_path))
    rows = re.findall(r"^(dense|moe)\s+([\d.]+) ->\s+([\d.]+)\s+equal\s+max \|diff\| (\S+)\s+ok$",
                      out, re.M)  # fmt: skip
    assert [row[0] for row in rows] == ["dense", "moe"], out
    for _, before, after, diff in rows:
        assert float(after) < 0.5 * float(before) and float(diff) < 1e-4
    assert "4 expert parameters (target_parameters)" in out
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "moe" / "peft-adapter" / "adapter_config.json").exists()
