"""The writer that tests/test_faults.py kills: every jlora writer in turn, forever.

Run as ``python -m tests._fault_writer WORKDIR``. Prints ``ready`` once everything is
imported and compiled, then ``<writer> <version>`` after each complete write, while
alternating between two versions of the content.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.peft
from jlora import checkpoint
from jlora.cli import main

PARAMS = {"params": {"dense": {"kernel": jnp.ones((6, 4))}, "out": {"kernel": jnp.ones((4, 3))}}}
SPEC = jlora.LoraSpec(rank=2, alpha=4.0, targets=["dense", "out"])
# Big enough that a write takes a while, so kills land inside writes too.
BASE = {"params/dense/kernel": np.ones((6, 4), np.float32),
        "params/out/kernel": np.ones((4, 3), np.float32),
        "params/pad/kernel": np.zeros((512, 512), np.float32)}


def adapters(version: int):
    made = jlora.init(SPEC, PARAMS, jax.random.key(0))
    rng = np.random.default_rng(100 + version)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), made
    )


def write(name: str, work: str, version: int) -> None:
    tree = adapters(version)
    if name == "save":
        checkpoint.save(os.path.join(work, "ckpt"), tree, SPEC, overwrite=True)
    elif name == "save_step":
        checkpoint.save(os.path.join(work, "run"), tree, SPEC, step=1, overwrite=True)
    elif name == "peft":
        jlora.peft.save(os.path.join(work, "peft"), tree, SPEC, key_map="flax")
    elif name == "merge":
        argv = ["merge", "--base", os.path.join(work, "base.safetensors"), "--adapter",
                os.path.join(work, f"adapter{version}"), "--out",
                os.path.join(work, "merged.safetensors"), "--overwrite"]
        if main(argv) != 0:
            raise SystemExit(f"merge failed: {argv}")
    elif name == "convert":
        argv = ["convert", os.path.join(work, f"adapter{version}"), "--to", "peft",
                "--key-map", "flax", "--out", os.path.join(work, "converted"), "--overwrite"]
        if main(argv) != 0:
            raise SystemExit(f"convert failed: {argv}")
    else:
        raise ValueError(name)


WRITERS = ("save", "save_step", "peft", "merge", "convert")

if __name__ == "__main__":
    work = sys.argv[1]
    for name in WRITERS:  # warm up every code path on version 1, then announce
        write(name, work, 1)
    print("ready", flush=True)
    i = 0
    while True:
        for name in WRITERS:
            write(name, work, i % 2)
            print(name, i % 2, flush=True)
        i += 1
