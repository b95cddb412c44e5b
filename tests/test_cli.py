"""The ``jlora`` command: inspect, merge and convert, checked against numpy references."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

import jlora
from jlora import checkpoint
from jlora.cli import main


def _random(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32).astype(dtype)


def _run(*args):
    """The command as a user runs it: a fresh process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run(
        [sys.executable, "-m", "jlora.cli", *args], capture_output=True, text=True, env=env
    )


def _trained(adapters, seed):
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    return treedef.unflatten(
        [jnp.asarray(_random(x.shape, seed + i, x.dtype)) for i, x in enumerate(leaves)]
    )


@pytest.fixture(scope="module")
def gpt2_like(tmp_path_factory):
    """Hugging Face Flax GPT-2-shaped params (Conv1D kernels stored (out, in)), adapters
    for them saved as a jlora checkpoint, and the base as Orbax and safetensors."""
    root = tmp_path_factory.mktemp("gpt2")
    d_model = 16
    block = {
        "attn": {
            "c_attn": {"kernel": _random((3 * d_model, d_model), 1), "bias": np.zeros(48)},
            "c_proj": {"kernel": _random((d_model, d_model), 2), "bias": np.zeros(16)},
        },
        "mlp": {"c_fc": {"kernel": _random((4 * d_model, d_model), 3)}},
    }
    params = {"transformer": {"h": {"0": block}, "wte": {"embedding": _random((40, 16), 4)}}}
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)

    def layout(shape):  # GPT-2's Conv1D-style storage: axis 1 is the input
        return jlora.Layout(shape, (), (1,), (0,))

    spec = jlora.LoraSpec(
        rank=4, alpha=8.0, targets=["c_attn", "c_fc", "wte"], rank_pattern={"c_fc": 2}
    )
    nodes = {}
    for path, leaf in jlora._paths.leaves_with_paths(params):
        if spec.is_target(path, leaf):
            rank = spec.rank_for(path)
            node_layout = jlora.Layout.dense(leaf.shape) if "wte" in path else layout(leaf.shape)
            nodes[path] = jlora.LoraAdapter(
                lora_a=jnp.zeros(node_layout.a_shape(rank)),
                lora_b=jnp.zeros(node_layout.b_shape(rank)),
                scale=spec.scale_for(path),
                layout=node_layout,
            )
    adapters = _trained(jlora._tree.build_like(params, nodes), 10)
    checkpoint.save(root / "adapter", adapters, spec)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(root / "base", args=ocp.args.PyTreeSave(params))
    flat = dict(jlora._paths.leaves_with_paths(params))
    safetensors.numpy.save_file(flat, root / "base.safetensors", metadata={"note": "kept"})
    return root, params, adapters, spec


def test_help_and_usage_errors(capsys):
    result = _run("--help")
    assert result.returncode == 0
    for command in ("inspect", "merge", "convert"):
        assert command in result.stdout
    for command in ("inspect", "merge", "convert"):
        assert main([command, "--help"]) == 0
        assert f"usage: jlora {command}" in capsys.readouterr().out
    assert main(["convert", "x", "--to", "onnx", "--key-map", "gpt2", "--out", "y"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid choice: 'onnx'" in err


def test_inspect_checkpoint(gpt2_like, capsys):
    root, _, adapters, spec = gpt2_like
    assert main(["inspect", str(root / "adapter"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "orbax"
    items = dict(jlora._tree.adapter_items(adapters))
    assert [t["path"] for t in report["targets"]] == list(items)
    for target in report["targets"]:
        node = items[target["path"]]
        assert target["rank"] == spec.rank_for(target["path"])
        assert target["scale"] == spec.scale_for(target["path"])
        assert target["alpha"] == pytest.approx(spec.alpha)
        dense = np.asarray(node.lora_a, np.float64) @ np.asarray(node.lora_b, np.float64)
        assert target["update_norm"] == pytest.approx(target["scale"] * np.linalg.norm(dense))
    count = sum(x.size for x in jax.tree_util.tree_leaves(adapters))
    assert report["parameters"] == count
    assert report["bytes"] == 4 * count

    result = _run("inspect", str(root / "adapter"))  # the text form, from a fresh process
    assert result.returncode == 0, result.stderr
    assert "format:     orbax" in result.stdout
    assert f"parameters: {count:,} trainable" in result.stdout
    assert "transformer/h/0/mlp/c_fc/kernel" in result.stdout


def _peft_dir(path, modules, config):
    """A PEFT adapter directory written by hand (independent of jlora.peft)."""
    path.mkdir()
    tensors = {}
    for name, (lora_a, lora_b, embedding) in modules.items():
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B")
            if embedding
            else (
                "lora_A.weight",
                "lora_B.weight",
            )
        )
        tensors[f"base_model.model.{name}.{a_key}"] = lora_a
        tensors[f"base_model.model.{name}.{b_key}"] = lora_b
    safetensors.numpy.save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))


def test_inspect_and_merge_peft_into_pytorch_weights(tmp_path, capsys):
    base = {
        "model.q_proj.weight": _random((12, 8), 1),  # nn.Linear: (out, in)
        "model.embed.weight": _random((30, 8), 2),  # nn.Embedding: (num, dim)
        "model.norm.weight": _random((8,), 3),
    }
    q_a, q_b = _random((4, 8), 4), _random((12, 4), 5)
    e_a, e_b = _random((2, 30), 6), _random((8, 2), 7)
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"embed": 2}, "alpha_pattern": {"embed": 6}}
    _peft_dir(
        tmp_path / "peft",
        {"model.q_proj": (q_a, q_b, False), "model.embed": (e_a, e_b, True)},
        config,
    )
    assert main(["inspect", str(tmp_path / "peft"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "peft"
    by_path = {t["path"]: t for t in report["targets"]}
    assert (by_path["model.q_proj"]["rank"], by_path["model.q_proj"]["scale"]) == (4, 2.0)
    assert (by_path["model.embed"]["rank"], by_path["model.embed"]["scale"]) == (2, 3.0)
    assert by_path["model.q_proj"]["update_norm"] == pytest.approx(2.0 * np.linalg.norm(q_b @ q_a))
    assert report["parameters"] == q_a.size + q_b.size + e_a.size + e_b.size

    safetensors.numpy.save_file(base, tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    argv = [
        "merge",
        "--base",
        str(tmp_path / "base.safetensors"),
        "--adapter",
        str(tmp_path / "peft"),
    ]
    assert main([*argv, "--out", str(out)]) == 0
    merged = safetensors.numpy.load_file(out)
    # float64 references; float32 sums agree to an ulp of the largest term.
    q_want = base["model.q_proj.weight"] + 2.0 * q_b.astype(np.float64) @ q_a
    e_want = base["model.embed.weight"] + 3.0 * (e_b.astype(np.float64) @ e_a).T
    for got, want in (
        (merged["model.q_proj.weight"], q_want),
        (merged["model.embed.weight"], e_want),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert np.array_equal(merged["model.norm.weight"], base["model.norm.weight"])


@pytest.mark.parametrize("base_name", ["base", "base.safetensors"])
def test_merge_checkpoint_into_flax_weights(gpt2_like, tmp_path, base_name):
    root, params, adapters, _ = gpt2_like
    out = tmp_path / ("merged" + base_name.removeprefix("base"))
    argv = ["merge", "--base", str(root / base_name), "--adapter", str(root / "adapter")]
    assert main([*argv, "--out", str(out)]) == 0
    want = dict(jlora._paths.leaves_with_paths(jlora.merge(params, adapters)))
    if base_name.endswith(".safetensors"):
        got = safetensors.numpy.load_file(out)
        with __import__("safetensors").safe_open(out, framework="numpy") as handle:
            assert handle.metadata() == {"note": "kept", "jlora": "jlora merge"}
    else:
        as_numpy = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params
        )
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(out, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
        got = dict(jlora._paths.leaves_with_paths(restored))
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        assert np.array_equal(np.asarray(got[path]), np.asarray(value)), path
    assert main([*argv, "--out", str(out)]) == 1  # exists: refused without --overwrite


def test_convert_round_trip_and_agreement_with_pytorch_space_merge(gpt2_like, tmp_path):
    """Orbax -> PEFT (GPT-2 key map) -> Orbax is bit-exact, and merging the PEFT file into
    PyTorch-layout weights gives jlora.merge's Flax weights, transposed."""
    root, params, adapters, _ = gpt2_like
    peft_dir, back = tmp_path / "peft", tmp_path / "back"
    convert = ["convert", "--key-map", "gpt2"]
    assert (
        main(
            [
                *convert[:1],
                str(root / "adapter"),
                "--to",
                "peft",
                *convert[1:],
                "--out",
                str(peft_dir),
            ]
        )
        == 0
    )
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["rank_pattern"]
    argv = [
        str(peft_dir),
        "--to",
        "orbax",
        *convert[1:],
        "--base",
        str(root / "base"),
        "--out",
        str(back),
    ]
    assert main([*convert[:1], *argv]) == 0
    loaded, _ = checkpoint.load(back)
    for (path, got), (_, want) in zip(
        jlora._tree.adapter_items(loaded), jlora._tree.adapter_items(adapters)
    ):
        assert got.layout == want.layout and got.scale == want.scale, path
        assert np.array_equal(np.asarray(got.lora_a), np.asarray(want.lora_a)), path
        assert np.array_equal(np.asarray(got.lora_b), np.asarray(want.lora_b)), path

    # The same weights as PyTorch names them: Conv1D stores Flax's kernel transposed.
    torch_base = {}
    for path, leaf in jlora._paths.leaves_with_paths(params):
        name = path.removeprefix("transformer/").replace("/", ".")
        name = name.replace(".kernel", ".weight").replace(".embedding", ".weight")
        torch_base["transformer." + name] = np.ascontiguousarray(
            leaf.T if path.endswith("kernel") else leaf
        )
    safetensors.numpy.save_file(torch_base, tmp_path / "torch.safetensors")
    out = tmp_path / "torch_merged.safetensors"
    argv = ["merge", "--base", str(tmp_path / "torch.safetensors"), "--adapter", str(peft_dir)]
    assert main([*argv, "--out", str(out)]) == 0
    merged = safetensors.numpy.load_file(out)
    flax_merged = jlora.merge(params, adapters)["transformer"]
    np.testing.assert_allclose(
        merged["transformer.h.0.attn.c_attn.weight"],
        np.asarray(flax_merged["h"]["0"]["attn"]["c_attn"]["kernel"]).T,
        rtol=1e-6,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        merged["transformer.wte.weight"], np.asarray(flax_merged["wte"]["embedding"]), atol=1e-5
    )
    assert np.array_equal(
        merged["transformer.h.0.attn.c_proj.weight"],
        torch_base["transformer.h.0.attn.c_proj.weight"],
    )


def test_bad_input_exits_with_one_line(gpt2_like, tmp_path, capsys):
    root = gpt2_like[0]
    result = _run("inspect", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("jlora inspect: error: ")
    assert "does not exist" in result.stderr

    other = {
        "transformer": {
            "h": {"0": {"attn": {"c_attn": {"kernel": np.zeros((48, 24), np.float32)}}}}
        }
    }
    safetensors.numpy.save_file(
        dict(jlora._paths.leaves_with_paths(other)), tmp_path / "other.safetensors"
    )
    cases = [
        (
            [
                "merge",
                "--base",
                str(tmp_path / "other.safetensors"),
                "--adapter",
                str(root / "adapter"),
                "--out",
                str(tmp_path / "o"),
            ],
            "another model",
        ),
        (
            [
                "convert",
                str(root / "adapter"),
                "--to",
                "peft",
                "--key-map",
                "gpt3",
                "--out",
                str(tmp_path / "p"),
            ],
            "unknown key_map 'gpt3'",
        ),
        (
            [
                "convert",
                str(root / "adapter"),
                "--to",
                "orbax",
                "--key-map",
                "gpt2",
                "--out",
                str(tmp_path / "q"),
            ],
            "already a jlora Orbax checkpoint",
        ),
        (["inspect", str(root / "adapter"), "--step", "3"], "no step 3"),
    ]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8}'
    )
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(
        b'\x10\x00\x00\x00\x00\x00\x00\x00{"a'
    )
    cases.append((["inspect", str(tmp_path / "broken")], "malformed or truncated"))
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert message in err, err
