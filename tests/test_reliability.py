"""Nothing lost, nothing silent: bad values in files, dtypes, regexes, writes and links.

Each case is one bad input a careless or hostile user could give; each must end in one
of jlora's own errors (:class:`jlora.JloraError` or, for arguments in code, a
``ValueError``/``TypeError``) whose message names the file and the key, and must never
damage what was there before. The fuzz suite (``test_fuzz.py``) and the SIGKILL fault
injection (``test_faults.py``) cover the same ground at random.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora
import jlora.peft
from jlora import checkpoint
from jlora.cli import main
from jlora.peft import CONFIG_NAME, WEIGHTS_NAME

PARAMS = {"params": {"dense": {"kernel": jnp.ones((6, 4))}, "out": {"kernel": jnp.ones((4, 3))}}}
SPEC = jlora.LoraSpec(rank=2, alpha=4.0, targets=["dense", "out"])


def _adapters(seed=0):
    adapters = jlora.init(SPEC, PARAMS, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), adapters
    )


@pytest.fixture
def peft_dir(tmp_path):
    directory = tmp_path / "adapter"
    jlora.peft.save(directory, _adapters(), SPEC, key_map="flax")
    return directory


def _edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


_DELETE = object()


def _load(directory):
    return jlora.peft.load(directory, PARAMS, key_map="flax")


# -- 1. values read from files --------------------------------------------------------

BAD_CONFIG = [
    ("r", 0, "positive integer"),
    ("r", -2, "positive integer"),
    ("r", 2.5, "positive integer"),
    ("r", "2", "positive integer"),
    ("r", True, "positive integer"),
    ("r", _DELETE, "positive integer"),
    ("lora_alpha", math.nan, "finite non-negative"),
    ("lora_alpha", math.inf, "finite non-negative"),
    ("lora_alpha", -4.0, "finite non-negative"),
    ("lora_alpha", "4", "finite non-negative"),
    ("use_rslora", "false", "true or false"),
    ("use_dora", "true", "true or false"),
    ("fan_in_fan_out", 1, "true or false"),
    ("lora_dropout", 1.0, r"\[0, 1\)"),
    ("lora_dropout", -0.1, r"\[0, 1\)"),
    ("lora_dropout", "0.1", r"\[0, 1\)"),
    ("rank_pattern", {"dense": 0}, "positive integer"),
    ("rank_pattern", ["dense"], "an object"),
    ("alpha_pattern", {"dense": -1.0}, "finite non-negative"),
    ("alpha_pattern", {"dense": math.nan}, "finite non-negative"),
    ("rank_pattern", {"(dense": 2}, "valid RE2 regex"),
    ("rank_pattern", {r"(a)\1": 2}, "valid RE2 regex"),
    ("target_modules", ["attention"], "the files disagree"),
    ("target_modules", "att.*", "the files disagree"),
    ("target_modules", 7, "a regex string or a list"),
    ("exclude_modules", ["dense"], "the files disagree"),
    ("peft_type", "IA3", "'LORA'"),
    ("bias", "all", "'none'"),
]


@pytest.mark.parametrize("key, value, message", BAD_CONFIG)
def test_bad_config_values_are_refused_with_file_and_key(peft_dir, key, value, message):
    _edit_config(peft_dir, **{key: value})
    with pytest.raises(jlora.FileFormatError, match=message) as caught:
        _load(peft_dir)
    assert caught.value.file.startswith(str(peft_dir))
    assert key in str(caught.value) or "target_modules" in str(caught.value)
    # The CLI reads the same way and exits 1 with one line naming the file.
    assert main(["inspect", str(peft_dir)]) == 1


def test_string_false_rslora_no_longer_gives_the_sqrt_scale(peft_dir):
    """``"use_rslora": "false"`` used to be truthy: the √r scale, silently."""
    _edit_config(peft_dir, use_rslora="false")
    with pytest.raises(jlora.FileFormatError, match="'use_rslora': expected true or false"):
        jlora.peft.read(peft_dir)


def _edit_tensors(directory, edit):
    path = directory / WEIGHTS_NAME
    tensors = dict(safetensors.numpy.load_file(path))
    edit(tensors)
    safetensors.numpy.save_file(tensors, path)


A = "base_model.model.dense.lora_A.weight"
B = "base_model.model.dense.lora_B.weight"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update({A: t[A][:1]}), "rank 2"),  # shape disagrees with r
        (lambda t: t.update({B: t[B][:, :1]}), "rank 2"),
        (lambda t: t.update({A: np.ones((2, 5), np.float32)}), r"lora_A \[2, 6\]"),  # model
        (lambda t: t.update({A: t[A].astype(np.int32)}), "floating-point"),
        (lambda t: t.update({A: np.full_like(t[A], np.nan)}), "finite"),
        (
            lambda t: t.update(
                {"base_model.model.dense.lora_embedding_A": t[A]}
            ),
            "both",
        ),
        (lambda t: t.pop(B), "both lora_A and lora_B"),
        (lambda t: t.update({A: t[A][None]}), "2-D"),
    ],
)
def test_bad_tensors_are_refused(peft_dir, edit, message):
    _edit_tensors(peft_dir, edit)
    with pytest.raises(jlora.FileFormatError, match=message) as caught:
        _load(peft_dir)
    assert str(peft_dir) in str(caught.value)


def test_cli_merge_into_pytorch_weights_uses_the_checked_reader(tmp_path):
    """A config whose r disagrees with the tensors must not merge (it wrote wrong weights)."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    rng = np.random.default_rng(0)
    tensors = {
        "base_model.model.fc.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32),
        "base_model.model.fc.lora_B.weight": rng.normal(size=(3, 2)).astype(np.float32),
    }
    safetensors.numpy.save_file(tensors, directory / WEIGHTS_NAME)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc"]}
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    base = tmp_path / "base.safetensors"
    safetensors.numpy.save_file({"fc.weight": np.ones((3, 4), np.float32)}, base)
    out = tmp_path / "merged.safetensors"
    argv = ["merge", "--base", str(base), "--adapter", str(directory), "--out", str(out)]
    assert main(argv) == 1
    assert not out.exists()
    config["r"] = 2
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    assert main(argv) == 0
    merged = safetensors.numpy.load_file(out)["fc.weight"]
    want = 1.0 + (8 / 2) * tensors["base_model.model.fc.lora_B.weight"].astype(np.float64) @ (
        tensors["base_model.model.fc.lora_A.weight"]
    )
    np.testing.assert_allclose(merged, want, rtol=1e-6)


# Checkpoint metadata: each edit of the JSON the checkpoint keeps beside its arrays.
def _metadata_file(path):
    return path / "jlora" / "metadata"


def _edit_entry(key, value):
    def edit(metadata):
        metadata["entries"][0][key] = value

    return edit


BAD_METADATA = [
    (_edit_entry("rank", 0), "rank"),
    (_edit_entry("rank", 3), "shape"),  # disagrees with the arrays
    (_edit_entry("scale", None), "scale"),
    (_edit_entry("dropout", 1.5), "dropout"),
    (_edit_entry("kind", "ia3"), "kind"),
    (_edit_entry("layout", {"weight_shape": [6, 4]}), "layout"),
    (_edit_entry("layout", {"weight_shape": [6, 4], "stack_axes": [], "in_axes": [0],
                            "out_axes": [0]}), "layout"),
    (_edit_entry("dtype", {"lora_a": "int32", "lora_b": "float32"}), "dtype"),
    (_edit_entry("path", ""), "path"),
    (lambda m: m.update(entries=[]), "entries"),
    (lambda m: m.update(version="1"), "version"),
    (lambda m: m["spec"].update(rank=-1), "spec"),
    (lambda m: m["spec"].update(rank_pattern={"(?<=x)": 2}), "RE2"),
    (lambda m: m["spec"].update(dropout="0.1"), "spec"),
]


@pytest.mark.parametrize("edit, message", BAD_METADATA)
def test_edited_checkpoint_metadata_is_refused(tmp_path, edit, message):
    path = pathlib.Path(str(checkpoint.save(tmp_path / "ckpt", _adapters(), SPEC)))
    metadata = json.loads(_metadata_file(path).read_text())
    edit(metadata)
    _metadata_file(path).write_text(json.dumps(metadata))
    with pytest.raises(jlora.FileFormatError, match=message) as caught:
        checkpoint.load(path)
    assert str(path) in str(caught.value)
    assert main(["inspect", str(path)]) == 1


def test_a_lookaround_target_regex_in_a_checkpoint_is_not_run(tmp_path):
    spec = jlora.LoraSpec(rank=2, alpha=4.0, targets=r"params/(?!out).*/kernel")
    adapters = jlora.init(spec, PARAMS, jax.random.key(0))
    path = checkpoint.save(tmp_path / "ckpt", adapters, spec)
    with pytest.warns(UserWarning, match="RE2"):
        _, loaded = checkpoint.load(path)
    assert loaded.targets == "params/dense/kernel"


def test_damaged_array_files_are_named_and_the_previous_step_is_loaded(tmp_path):
    root = tmp_path / "run"
    old, new = _adapters(1), _adapters(2)
    checkpoint.save(root, old, SPEC, step=1)
    checkpoint.save(root, new, SPEC, step=2)
    files = [p for p in (root / "2" / "adapters").rglob("*") if p.is_file()]
    data = max(files, key=lambda p: p.stat().st_size)  # the array data, not the manifest
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(jlora.DamagedCheckpointError, match="step 2") as caught:
        checkpoint.load(root, step=2)
    assert caught.value.step == 2
    with pytest.warns(UserWarning, match="loaded step 1 .* newer steps are damaged"):
        loaded, _ = checkpoint.load(root)
    np.testing.assert_array_equal(
        loaded["params"]["dense"]["kernel"].lora_a, old["params"]["dense"]["kernel"].lora_a
    )
    for p in files:
        p.unlink()
    with pytest.raises(jlora.DamagedCheckpointError, match="step 2"):
        checkpoint.load(root, step=2)
    assert main(["inspect", str(root), "--step", "2"]) == 1


def test_a_checkpoint_missing_an_item_is_damaged_not_absent(tmp_path):
    path = pathlib.Path(str(checkpoint.save(tmp_path / "ckpt", _adapters(), SPEC)))
    for p in sorted((path / "adapters").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (path / "adapters").rmdir()
    with pytest.raises(jlora.DamagedCheckpointError, match=r"\['adapters'\] are missing"):
        checkpoint.load(path)


# -- 2. dtypes --------------------------------------------------------------------------


def test_integer_weights_and_factors_are_refused():
    adapters = _adapters()
    quantized = {"params": {**PARAMS["params"], "dense": {"kernel": jnp.ones((6, 4), jnp.int8)}}}
    with pytest.raises(ValueError, match=r"int8.*integer weight"):
        jlora.merge(quantized, adapters)
    node = adapters["params"]["dense"]["kernel"]
    integer = jax.tree_util.tree_map(lambda x: x.astype(jnp.int32), node)
    bad = {"params": {**adapters["params"], "dense": {"kernel": integer}}}
    with pytest.raises(ValueError, match="lora_a of dtype int32"):
        jlora.merge(PARAMS, bad)


def test_a_targeted_integer_leaf_is_named_as_such():
    params = {"dense": {"kernel": jnp.ones((6, 4), jnp.int8)}}
    with pytest.raises(ValueError, match=r"only non-floating leaves.*int8\[6, 4\]") as caught:
        jlora.init(jlora.LoraSpec(rank=2, targets=["dense"]), params, jax.random.key(0))
    assert "Candidate paths (floating" not in str(caught.value)


# -- 3. regexes ---------------------------------------------------------------------------


class _Deadline:
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        def expire(*_):
            raise TimeoutError(f"ran past {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)
        return False


def test_a_crafted_pattern_cannot_hang_the_reader(tmp_path):
    """``(a|a)*b`` on a long run of a's takes Python's ``re`` exponential time."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    module = "a" * 40
    tensors = {
        f"base_model.model.{module}.lora_A.weight": np.ones((2, 4), np.float32),
        f"base_model.model.{module}.lora_B.weight": np.ones((3, 2), np.float32),
    }
    safetensors.numpy.save_file(tensors, directory / WEIGHTS_NAME)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "rank_pattern": {"(a|a)*b": 4},
              "alpha_pattern": {"(a|aa)*c": 1.0}, "target_modules": "(a|a)*"}
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    start = time.perf_counter()
    with _Deadline(20):
        _, modules = jlora.peft.read(directory)
        assert main(["inspect", str(directory)]) == 0
    assert modules[module]["rank"] == 2
    assert time.perf_counter() - start < 20


def test_invalid_user_regexes_get_a_clear_error():
    with pytest.raises(ValueError, match=r"LoraSpec.targets: '\(dense' is not a valid regex"):
        jlora.LoraSpec(targets="(dense")
    with pytest.raises(ValueError, match=r"LoraSpec.rank_pattern key: '\['"):
        jlora.LoraSpec(targets=["dense"], rank_pattern={"[": 2})
    with pytest.raises(ValueError, match="KeyMap 'mine': modules"):
        jlora.peft.KeyMap("mine", modules="(")
    # A look-around in the user's own code still works (Python's re, the user's choice).
    spec = jlora.LoraSpec(targets=r"params/(?!out).*/kernel")
    assert [p for p, _ in spec.select(PARAMS)] == ["params/dense/kernel"]


# -- 4. writes --------------------------------------------------------------------------


def test_a_failed_overwrite_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    old = _adapters(1)
    path = checkpoint.save(tmp_path / "ckpt", old, SPEC)
    root = checkpoint.save(tmp_path / "run", old, SPEC, step=3)

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ocp.Checkpointer, "save", crash)
    for target, step in ((path, None), (root.parent, 3)):
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(target, _adapters(2), SPEC, step=step, overwrite=True)
        loaded, _ = checkpoint.load(target, step=step)
        np.testing.assert_array_equal(
            loaded["params"]["out"]["kernel"].lora_b, old["params"]["out"]["kernel"].lora_b
        )
    monkeypatch.undo()
    checkpoint.save(path, _adapters(2), SPEC, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "run"]  # no temporaries left


def test_save_refuses_what_it_did_not_write(tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(jlora.WriteRefusedError, match="holds files jlora did not write"):
        checkpoint.save(other, _adapters(), SPEC, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="max_to_keep must be a positive integer"):
        checkpoint.save(tmp_path / "run", _adapters(), SPEC, step=1, max_to_keep=0)


def _cli_setup(tmp_path):
    base = tmp_path / "base.safetensors"
    flat = {"params/dense/kernel": np.ones((6, 4), np.float32),
            "params/out/kernel": np.ones((4, 3), np.float32)}
    safetensors.numpy.save_file(flat, base)
    adapter = checkpoint.save(tmp_path / "adapter", _adapters(), SPEC)
    return base, adapter


def test_cli_refuses_outputs_that_would_destroy_data(tmp_path, capsys):
    base, adapter = _cli_setup(tmp_path)
    original = base.read_bytes()
    merge = ["merge", "--base", str(base), "--adapter", str(adapter), "--overwrite"]
    assert main([*merge, "--out", str(base)]) == 1  # the output is the input
    assert "is or holds the input" in capsys.readouterr().err
    assert main([*merge, "--out", str(tmp_path)]) == 1  # the output holds the inputs
    assert "is or holds the input" in capsys.readouterr().err
    assert base.read_bytes() == original
    assert main([*merge, "--out", str(adapter / "merged.safetensors")]) == 0  # beside: fine
    checkpoint.load(adapter)
    unrelated = tmp_path / "unrelated.safetensors"
    safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, unrelated)
    assert main([*merge, "--out", str(unrelated)]) == 1  # jlora did not write it
    assert main([*merge, "--out", str(tmp_path / "merged.safetensors")]) == 0
    assert main([*merge, "--out", str(tmp_path / "merged.safetensors")]) == 0  # its own: ok
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    convert = ["convert", str(adapter), "--to", "peft", "--key-map", "flax", "--overwrite"]
    assert main([*convert, "--out", str(folder)]) == 1
    assert (folder / "keep.txt").read_text() == "mine"
    assert main([*convert, "--out", str(tmp_path / "peft")]) == 0
    assert main([*convert, "--out", str(tmp_path / "peft")]) == 0


def test_cli_key_map_takes_dotted_identifiers_only(tmp_path, capsys):
    _, adapter = _cli_setup(tmp_path)
    for bad in ("../evil:x", "os:system(1)", "a b:c", ":x"):
        argv = ["convert", str(adapter), "--to", "peft", "--key-map", bad, "--out",
                str(tmp_path / "out")]
        assert main(argv) == 1
        assert "dotted Python identifiers" in capsys.readouterr().err


# -- 5. links ----------------------------------------------------------------------------


def _planted(tmp_path, folder, text):
    """An adapter directory whose config is a link to a secret JSON file."""
    (tmp_path / folder).mkdir(exist_ok=True)
    secret = tmp_path / folder / "secret.json"
    secret.write_text(text)
    directory = tmp_path / "adapter"
    jlora.peft.save(directory, _adapters(), SPEC, key_map="flax")
    (directory / CONFIG_NAME).unlink()
    (directory / CONFIG_NAME).symlink_to(secret)
    return secret, directory


def test_writes_never_follow_links(tmp_path):
    outside = tmp_path / "outside"
    # A planted link where the config goes: the save replaces the link, never its target.
    secret, directory = _planted(tmp_path, "outside", '{"r": "TOP-SECRET"}')
    jlora.peft.save(directory, _adapters(), SPEC, key_map="flax")
    assert secret.read_text() == '{"r": "TOP-SECRET"}'
    assert not (directory / CONFIG_NAME).is_symlink()
    # A link as the directory itself, or as the checkpoint, is refused.
    link = tmp_path / "link"
    link.symlink_to(outside)
    with pytest.raises(jlora.WriteRefusedError, match="symbolic link"):
        jlora.peft.save(link, _adapters(), SPEC, key_map="flax")
    with pytest.raises(jlora.WriteRefusedError, match="symbolic link"):
        checkpoint.save(link, _adapters(), SPEC, overwrite=True)
    assert sorted(os.listdir(outside)) == ["secret.json"]


def test_an_error_through_a_link_does_not_show_the_linked_file(tmp_path, capsys):
    _, directory = _planted(
        tmp_path, "elsewhere", '{"peft_type": "TOP-SECRET", "r": 2, "lora_alpha": 2}'
    )
    with pytest.raises(jlora.FileFormatError, match="peft_type") as caught:
        _load(directory)
    assert "TOP-SECRET" not in str(caught.value)
    assert main(["inspect", str(directory)]) == 1
    assert "TOP-SECRET" not in capsys.readouterr().err
    # Reading through links stays as it is (the Hugging Face cache is made of links).
    jlora.peft.save(tmp_path / "real", _adapters(), SPEC, key_map="flax")
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (linked / name).symlink_to(tmp_path / "real" / name)
    loaded, _ = _load(linked)
    assert loaded["params"]["dense"]["kernel"].rank == 2


def test_a_fifo_or_a_huge_file_cannot_block_or_exhaust_the_reader(tmp_path, monkeypatch):
    from jlora import _io

    directory = tmp_path / "adapter"
    jlora.peft.save(directory, _adapters(), SPEC, key_map="flax")
    (directory / CONFIG_NAME).unlink()
    os.mkfifo(directory / CONFIG_NAME)  # opening it would wait for a writer forever
    with _Deadline(20), pytest.raises(jlora.FileFormatError, match="not a regular file"):
        _load(directory)
    path = pathlib.Path(str(checkpoint.save(tmp_path / "ckpt", _adapters(), SPEC)))
    (path / "jlora" / "metadata").unlink()
    os.mkfifo(path / "jlora" / "metadata")
    with _Deadline(20), pytest.raises(jlora.DamagedCheckpointError, match="not a regular file"):
        checkpoint.load(path)
    (path / "jlora" / "metadata").unlink()
    (path / "jlora" / "metadata").write_text("{}")
    monkeypatch.setattr(_io, "MAX_JSON_BYTES", 1)
    with pytest.raises(jlora.DamagedCheckpointError, match="jlora reads at most 1"):
        checkpoint.load(path)
