"""Random mutations of valid files: every reader ends in jlora's own error, or loads unchanged.

Each example takes a valid PEFT adapter directory or jlora checkpoint, mutates it
(truncation, byte flips, deleted fields, swapped types, changed shapes) and reads it
with ``jlora.peft.load``, ``jlora.checkpoint.load`` or ``jlora inspect``, under a time
bound. The outcome must be either a :class:`jlora.JloraError` whose message names the
file it read, or a load equal to the unmutated one (the mutation touched nothing jlora
reads). Anything else (another exception type, a hang, a different result without a
word) fails.

PEFT's safetensors files carry no checksum, so byte flips in their data section are
not mutated here (a flip there is a different, valid value; NaN and Inf are refused);
jlora checkpoints carry CRC-32s, so their array bytes are flipped too.

The default run keeps the example counts small; ``-m slow`` runs a longer profile.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import struct
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jlora
import jlora.peft
from jlora import checkpoint
from jlora.cli import main
from jlora.peft import CONFIG_NAME, WEIGHTS_NAME

PARAMS = {"params": {"dense": {"kernel": jnp.ones((6, 4))}, "out": {"kernel": jnp.ones((4, 3))}}}
SPEC = jlora.LoraSpec(rank=2, alpha=4.0, targets=["dense", "out"], rank_pattern={"out": 1})
DEADLINE_S = 20.0
FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
LONG = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


def _adapters():
    adapters = jlora.init(SPEC, PARAMS, jax.random.key(0))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), adapters
    )


@contextlib.contextmanager
def _deadline(seconds=DEADLINE_S):
    def expire(*_):
        raise TimeoutError(f"a reader ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _arrays(adapters):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(adapters)]


def _same(a, b):
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b)
    )


# -- mutations -------------------------------------------------------------------------

_SWAPS = [None, True, "x", "false", -1, 0, 2.5, float("nan"), [], {}, ["dense"], {"a": 1}]


def _json_mutation(data, draw):
    """Delete a field, swap its value's type, or nest into a sub-object and do that."""
    node = data
    while True:
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node, key=str)))
        elif isinstance(node, list) and node:
            key = draw(st.integers(0, len(node) - 1))
        else:
            return data
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(st.sampled_from(_SWAPS))
        return data


def _mutate_bytes(raw: bytes, draw, *, start=0, stop=None) -> bytes:
    stop = len(raw) if stop is None else stop
    kind = draw(st.sampled_from(["truncate", "flip", "flip"]))
    if kind == "truncate" or stop <= start:
        return raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    out = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(start, stop - 1))
        out[i] ^= draw(st.integers(1, 255))
    return bytes(out)


def _safetensors_header_end(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def _change_shape(raw: bytes, draw) -> bytes:
    """Rewrite one tensor's shape in the safetensors header (data offsets unchanged)."""
    end = _safetensors_header_end(raw)
    header = json.loads(raw[8:end])
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    shape = header[name]["shape"]
    header[name]["shape"] = draw(
        st.sampled_from([shape[::-1], [*shape, 1], shape[:1], [shape[0] + 1, *shape[1:]]])
    )
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[end:]


@pytest.fixture(scope="module")
def peft_original(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz") / "adapter"
    jlora.peft.save(directory, _adapters(), SPEC, key_map="flax")
    files = {name: (directory / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    loaded, _ = jlora.peft.load(directory, PARAMS, key_map="flax")
    return files, _arrays(loaded)


def _mutated_peft(files, draw) -> dict[str, bytes]:
    files = dict(files)
    target = draw(st.sampled_from(["config", "config", "weights", "weights", "shape"]))
    if target == "config":
        raw = files[CONFIG_NAME]
        if draw(st.booleans()):
            data = _json_mutation(json.loads(raw), draw)
            files[CONFIG_NAME] = json.dumps(data).encode()
        else:
            files[CONFIG_NAME] = _mutate_bytes(raw, draw)
    elif target == "weights":
        raw = files[WEIGHTS_NAME]
        files[WEIGHTS_NAME] = _mutate_bytes(raw, draw, stop=_safetensors_header_end(raw))
    else:
        files[WEIGHTS_NAME] = _change_shape(files[WEIGHTS_NAME], draw)
    return files


def _write(directory: pathlib.Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (directory / name).write_bytes(raw)


def _check_peft(files, want, mutated, reader):
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp) / "adapter"
        _write(directory, mutated)
        try:
            with _deadline():
                result = reader(directory)
        except jlora.JloraError as error:
            assert str(directory) in str(error), f"the error does not name the file: {error}"
            return
        if result is not None:
            assert _same(_arrays(result), want), "a mutated file loaded as different adapters"


def _peft_load(directory):
    return jlora.peft.load(directory, PARAMS, key_map="flax")[0]


@FAST
@given(data=st.data())
def test_fuzz_peft_reader(peft_original, data):
    files, want = peft_original
    _check_peft(files, want, _mutated_peft(files, data.draw), _peft_load)


def _cli_inspect(directory):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["inspect", str(directory)])
    assert status in (0, 1)
    if status == 1:
        assert str(directory) in err.getvalue(), f"the CLI error does not name it: {err}"
    return None


@FAST
@given(data=st.data())
def test_fuzz_cli_inspect(peft_original, data):
    files, want = peft_original
    _check_peft(files, want, _mutated_peft(files, data.draw), _cli_inspect)


# -- checkpoints ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_original(tmp_path_factory):
    path = pathlib.Path(str(checkpoint.save(tmp_path_factory.mktemp("fuzz") / "ckpt",
                                            _adapters(), SPEC)))
    loaded, _ = checkpoint.load(path)
    return path, _arrays(loaded)


def _checkpoint_files(path):
    return sorted(
        p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()
    )


def _check_checkpoint(original, draw):
    source, want = original
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "ckpt"
        shutil.copytree(source, path)
        names = _checkpoint_files(path)
        target = draw(st.sampled_from(["metadata", "metadata", "arrays", "delete"]))
        if target == "metadata":
            file = path / "jlora" / "metadata"
            if draw(st.booleans()):
                data = _json_mutation(json.loads(file.read_bytes()), draw)
                file.write_text(json.dumps(data))
            else:
                file.write_bytes(_mutate_bytes(file.read_bytes(), draw))
        elif target == "arrays":
            arrays = [n for n in names if n.startswith("adapters/")]
            file = path / draw(st.sampled_from(arrays))
            file.write_bytes(_mutate_bytes(file.read_bytes(), draw))
        else:
            os.unlink(path / draw(st.sampled_from(names)))
        try:
            with _deadline():
                loaded, _ = checkpoint.load(path)
        except jlora.JloraError as error:
            assert str(path) in str(error), f"the error does not name the checkpoint: {error}"
            return
        assert _same(_arrays(loaded), want), "a mutated checkpoint loaded as different adapters"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's loop
@settings(FAST, max_examples=40)
@given(data=st.data())
def test_fuzz_checkpoint_reader(checkpoint_original, data):
    _check_checkpoint(checkpoint_original, data.draw)


# -- the long profile --------------------------------------------------------------------


@pytest.mark.slow
@LONG
@given(data=st.data())
def test_fuzz_peft_reader_long(peft_original, data):
    files, want = peft_original
    _check_peft(files, want, _mutated_peft(files, data.draw), _peft_load)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@settings(LONG, max_examples=200)
@given(data=st.data())
def test_fuzz_checkpoint_reader_long(checkpoint_original, data):
    _check_checkpoint(checkpoint_original, data.draw)
