"""Each example runs in its quick mode and its own headline claim holds.

The examples check their claims themselves (loss went down, adapter off equals the
base exactly, merged equals adapter on) and exit non-zero when one fails; these tests
run them as a user would, in a subprocess, and read the exit code and the summary.
"""

from __future__ import annotations

import os
import pathlib
import random
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))


def run_example(name: str, *args: str, timeout: float = 600) -> str:
    """Run ``examples/<name>`` with ``--quick``; return its stdout, failing on a non-zero exit."""
    env = dict(os.environ)
    # A user's process: one CPU device, no progress bars in the captured output.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "force_host_platform_device_count" not in f)
    env["TQDM_DISABLE"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert result.returncode == 0, (
        f"{name} exited with {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
        f"\n--- stderr\n{result.stderr[-4000:]}"
    )
    assert "FAILED" not in result.stdout
    return result.stdout


def test_finetune_lm(tmp_path):
    out = run_example(
        "finetune_lm.py", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")
    )
    assert "OK: PipeQL loss went down" in out
    before, after = map(float, re.search(r"PipeQL loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before
    assert "trainable params:" in out
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0
    assert any((tmp_path / "cache").glob("charlm-*.msgpack"))  # the base is cached
    if "adapter on disk (peft)" in out:
        assert (tmp_path / "out" / "adapter_peft" / "adapter_config.json").exists()


@pytest.mark.slow  # 25 s; the main example (finetune_lm) stays in the default run
def test_digits(tmp_path):
    out = run_example("digits.py", "--out", str(tmp_path))
    assert re.search(r"OK: digit \d improved at every rank", out)
    assert "adapter off == base: True" in out
    assert (tmp_path / "digits.png").stat().st_size > 0


@pytest.mark.slow  # 35 s
def test_classify_bert(tmp_path):
    out = run_example("classify_bert.py", "--out", str(tmp_path))
    before, after = map(float, re.search(r"base ([\d.]+) -> LoRA .* ([\d.]+);", out).groups())
    assert after > before
    assert "OK: accuracy went up" in out


def test_nnx_and_equinox(tmp_path):
    out = run_example("nnx_and_equinox.py", "--out", str(tmp_path))
    assert "NNX: adapters on linear1/kernel/value, linear2/kernel/value" in out
    assert "Equinox: adapters on layers/0/weight, layers/1/weight" in out
    assert "OK: for NNX and Equinox" in out


def test_sql_grammar_is_seeded_and_well_formed():
    sql_grammar = pytest.importorskip("sql_grammar")
    text = sql_grammar.corpus(200, seed=3)
    assert text == sql_grammar.corpus(200, seed=3)
    assert text != sql_grammar.corpus(200, seed=4)
    for line in text.splitlines():
        assert re.fullmatch(r"(from \w+( \|> [^;|]+)+|put \w+ \([\w, ]+\) <- \([^;]+\));", line)
    # Columns only ever come from the statement's own table (or a joined one).
    rng = random.Random(0)
    for _ in range(200):
        statement = sql_grammar.query(rng)
        table = statement.split()[1]
        allowed = set(sql_grammar.SCHEMAS[table])
        for other in sql_grammar.SCHEMAS:
            if f"join {other}" in statement:
                allowed |= set(sql_grammar.SCHEMAS[other])
        pick = re.search(r"pick ([\w, ]+)", statement)
        if pick:
            assert set(pick.group(1).replace(" ", "").split(",")) <= allowed


@pytest.mark.slow
def test_mixture(tmp_path):
    out = run_example("mixture.py", "--out", str(tmp_path))
    assert "OK: the fresh mixture gives the base output exactly" in out
    assert "OK: the trained mixture's loss is below the base's on every task" in out
    assert "OK: the routing learned the task" in out
    # The loss table: one row per task and the mean, "task  base  LoRA r=8  MoLoRA 4x2".
    rows = re.findall(r"^\s+(\d+|mean)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.MULTILINE)
    assert [row[0] for row in rows] == ["0", "1", "2", "3", "mean"]
    for _, base, lora, mixture in rows:
        assert float(mixture) < float(base)
        assert float(lora) < float(base)
    assert "trainable params:" in out
    assert (tmp_path / "routing.png").stat().st_size > 0


@pytest.mark.slow  # 30 s (compilations: one training step per rank and way)
def test_svd_lowrank(tmp_path):
    out = run_example("svd_lowrank.py", "--out", str(tmp_path))
    assert "OK: the fine-tune delta needs fewer components than a random matrix" in out
    assert "OK: extraction's logit distance falls with rank" in out
    assert "OK: at every rank both distillations beat compression alone" in out
    # The spectra table: per layer, the delta keeps more of Σσ² at rank 1 than the random
    # matrix of the same shape and norm, and needs fewer components for 90 %.
    rows = re.findall(
        r"^(\w+)\s+\d+×\d+\s+(delta|random)\s+([\d.]+)%.*?(\d+)\s+\d+\s+\d+$", out, re.MULTILINE
    )
    table = {(name, kind): (float(r1), int(r90)) for name, kind, r1, r90 in rows}
    for name in ("dense_0", "dense_1", "head"):
        assert table[name, "delta"][0] > table[name, "random"][0]
        assert table[name, "delta"][1] < table[name, "random"][1]
    # Extraction: the logit distance falls with rank, full rank is the tuned model.
    extraction = re.findall(
        r"^\s+(\d+)\s+[\d,]+\s+[\d.]+ %\s+([\d.e+-]+)\s+[\d.e+-]+\s+[\d.e+-]+$", out, re.MULTILINE
    )
    ranks = [int(r) for r, _ in extraction]
    distances = [float(d) for _, d in extraction]
    assert ranks == [1, 2, 4, 8, 16, 32, 64]
    assert all(distances[i + 1] < distances[i] for i in range(len(distances) - 1))
    assert distances[-1] < 1e-4
    # Compression: "r  params  share  acc dist  acc dist  acc dist  (params)" per rank.
    compression = re.findall(
        r"^\s+(\d+)\s+([\d,]+)\s+\d+ %\s+[\d.]+ % ([\d.e+-]+)\s+[\d.]+ % ([\d.e+-]+)"
        r"\s+[\d.]+ % ([\d.e+-]+)\s+\(([\d,]+)\)$",
        out,
        re.MULTILINE,
    )
    assert [int(row[0]) for row in compression] == [2, 4, 8]
    dense = int(re.search(r"\(([\d,]+) params dense\)", out).group(1).replace(",", ""))
    for _, params, compressed, pairs, lora, lora_params in compression:
        assert int(params.replace(",", "")) < int(lora_params.replace(",", "")) < dense
        assert float(pairs) < float(compressed) and float(lora) < float(compressed)
    # The 4×5 arithmetic: r·(in + out) against in·out = 20, computed, and a real compress.
    arithmetic = re.findall(r"^\s+(\d)\s+(\d+)\s+20\s+\d+ %", out, re.MULTILINE)
    assert [(int(r), int(n)) for r, n in arithmetic] == [(1, 9), (2, 18), (3, 27), (4, 36)]
    assert "from r = 3 on, r·(in + out) >= in·out" in out
    assert "param_count() = 18" in out
    assert (tmp_path / "svd_lowrank.png").stat().st_size > 0


def test_finetune_tunix_without_the_zoo_packages_says_what_to_install(tmp_path):
    """In this environment (transformers<5, no tunix) the tunix example must not fail:
    it names what is missing and the install command, runs nothing and exits 0.
    tests/zoo/test_example_tunix.py runs it for real in the zoo environment."""
    import importlib.util

    if importlib.util.find_spec("tunix") is not None:
        pytest.skip("tunix is installed here: tests/zoo runs the example itself")
    out = run_example("finetune_tunix.py", "--out", str(tmp_path / "run"))
    assert "needs tunix" in out and "pip install -e '.[zoo]'" in out, out
    assert "Nothing was run" in out
    assert not (tmp_path / "run").exists()
