"""Fault injection: every writer SIGKILLed at random points leaves loadable, whole content.

A child process (``tests/_fault_writer.py``) runs ``jlora.save`` (single checkpoint and
step, both overwriting), ``jlora.peft.save``, ``jlora merge`` and ``jlora convert`` in
turn, forever, alternating between two versions of the content. It is killed with
SIGKILL at a random moment. Afterwards each target must load and equal one of the two
versions exactly: never a mixture, never a partial file, never nothing.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import safetensors.numpy

import jlora
import jlora.peft
from jlora import checkpoint
from tests import _fault_writer as writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arrays(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _which(found, versions):
    for version, want in versions.items():
        if len(found) == len(want) and all(np.array_equal(a, b) for a, b in zip(found, want)):
            return version
    raise AssertionError("the content equals neither version: a write was left half done")


def _prepare(work):
    safetensors.numpy.save_file(writer.BASE, os.path.join(work, "base.safetensors"))
    for version in (0, 1):
        checkpoint.save(os.path.join(work, f"adapter{version}"), writer.adapters(version),
                        writer.SPEC)
    for name in writer.WRITERS:  # the earlier content: version 0 everywhere
        writer.write(name, work, 0)


def _check(work):
    versions = {v: _arrays(writer.adapters(v)) for v in (0, 1)}
    params = {k: v for k, v in writer.BASE.items()}
    merged = {}
    for v in (0, 1):
        nested = {"params": {"dense": {"kernel": params["params/dense/kernel"]},
                             "out": {"kernel": params["params/out/kernel"]}}}
        out = jlora.merge(nested, writer.adapters(v))
        merged[v] = [np.asarray(out["params"]["dense"]["kernel"]),
                     np.asarray(out["params"]["out"]["kernel"])]
    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a recovered copy warns; the content is what counts
        seen["save"] = _which(_arrays(checkpoint.load(os.path.join(work, "ckpt"))[0]), versions)
        seen["save_step"] = _which(
            _arrays(checkpoint.load(os.path.join(work, "run"), step=1)[0]), versions
        )
        for name in ("peft", "converted"):
            loaded, _ = jlora.peft.load(os.path.join(work, name), writer.PARAMS, key_map="flax")
            seen[name] = _which(_arrays(loaded), versions)
    tensors = safetensors.numpy.load_file(os.path.join(work, "merged.safetensors"))
    assert np.array_equal(tensors["params/pad/kernel"], writer.BASE["params/pad/kernel"])
    found = [tensors["params/dense/kernel"], tensors["params/out/kernel"]]
    seen["merge"] = [v for v in (0, 1) if all(np.allclose(a, b) for a, b in zip(found, merged[v]))]
    assert seen["merge"], "the merged file equals neither version"
    return seen


def _kill_once(work, seed):
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests._fault_writer", work],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        lines = []
        while not lines or lines[-1] != "ready":
            line = child.stdout.readline()
            assert line, f"the writer stopped before it was ready: {lines[-3:]}"
            lines.append(line.strip())
        time.sleep(rng.uniform(0.0, 1.5))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return child.stdout.read().split("\n")


@pytest.mark.parametrize("seed", [0])
def test_sigkill_at_random_points_leaves_whole_content(tmp_path, seed):
    work = str(tmp_path)
    _prepare(work)
    done = _kill_once(work, seed)
    _check(work)
    # Writes continue to work after a kill (stale temporaries are cleaned up).
    for name in writer.WRITERS:
        writer.write(name, work, 1)
    seen = _check(work)
    assert seen.pop("merge") == [1] and set(seen.values()) == {1}, done


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 14))
def test_sigkill_at_random_points_long(tmp_path, seed):
    work = str(tmp_path)
    _prepare(work)
    for round_ in range(3):
        _kill_once(work, seed * 10 + round_)
        _check(work)
