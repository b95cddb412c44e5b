"""Orbax checkpoints of adapters: bit-exact round trips, steps, size, interrupted saves."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jlora
from jlora import checkpoint


def _random(shape, dtype=jnp.float32, seed=0):
    """Random normal values made with numpy (no XLA compilation per shape)."""
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(values.astype(jnp.dtype(dtype)))


def _perturbed(adapters, seed):
    """Adapters with every array replaced by distinct random values (B no longer zero)."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    new = [_random(x.shape, x.dtype, seed=seed * 1000 + i) for i, x in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


def _bits(x):
    """The raw bytes of an array, for bit-exact comparison (NaN-safe, -0.0-safe)."""
    x = np.asarray(x)
    return x.dtype.str, x.shape, x.tobytes()


def _assert_same(got, want):
    """Same adapter nodes (static fields included) and bit-identical arrays, by path."""
    got_items = dict(jlora._tree.adapter_items(got))
    want_items = dict(jlora._tree.adapter_items(want))
    assert sorted(got_items) == sorted(want_items)
    for path, node in want_items.items():
        other = got_items[path]
        assert type(other) is type(node) or not jlora.is_adapter(node), path
        if jlora.is_adapter(node):
            assert (other.scale, other.layout, other.dropout) == (
                node.scale,
                node.layout,
                node.dropout,
            ), path
            pairs = [(other.lora_a, node.lora_a), (other.lora_b, node.lora_b)]
        else:
            pairs = [(other, node)]
        for a, b in pairs:
            assert _bits(a) == _bits(b), path


def _dir_bytes(path) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def _stacked_model(params, tokens):
    """A tiny decoder by hand: embedding, scanned layers with a 3-axis kernel, tied head."""
    x = params["embed"]["embedding"][tokens]

    def layer(x, weights):
        heads = jnp.einsum("bld,dhk->blhk", x, weights["attn"]["kernel"])
        x = x + jnp.tanh(heads.reshape(x.shape))
        return x + jnp.tanh(x @ weights["mlp"]["kernel"]) * weights["mlp"]["bias"], None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    return x @ params["embed"]["embedding"].T


def _stacked_params():
    return {
        "embed": {"embedding": _random((32, 16), seed=1)},
        "layers": {
            "attn": {"kernel": _random((2, 16, 2, 8), seed=2)},
            "mlp": {
                "kernel": _random((2, 16, 16), seed=3),
                "bias": jnp.ones((2, 16)),
            },
        },
    }


def test_round_trip_is_bit_exact_and_small(tmp_path):
    params = _stacked_params()
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    spec = jlora.LoraSpec(
        rank=4,
        alpha=8.0,
        targets=["attn", "mlp", "embed"],
        rank_pattern={"mlp": 2},
        dropout=0.1,
        trainable=".*/bias",
    )
    made = jlora.init(spec, params, jax.random.key(1), fn=_stacked_model, args=(tokens,))
    adapters = _perturbed(made, 2)
    # Mixed dtypes come back as they were: a bfloat16 adapter beside float32 ones.
    mlp = adapters["layers"]["mlp"]["kernel"]
    adapters["layers"]["mlp"]["kernel"] = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.bfloat16), mlp
    )
    assert adapters["layers"]["attn"]["kernel"].layout.stack_axes == (0,)
    assert adapters["layers"]["attn"]["kernel"].layout.out_axes == (2, 3)
    path = checkpoint.save(tmp_path / "ckpt", adapters, spec)

    loaded, loaded_spec = checkpoint.load(path)
    assert isinstance(loaded, dict)  # nested by path components, no `like` needed
    _assert_same(loaded, adapters)
    assert loaded_spec == spec
    # The loaded tree drives the model exactly as the saved one does.
    want = jlora.lora(_stacked_model)(params, adapters, tokens)
    got = jlora.lora(_stacked_model)(params, loaded, tokens)
    assert _bits(got) == _bits(want)
    assert not np.array_equal(np.asarray(want), np.asarray(_stacked_model(params, tokens)))

    adapter_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(adapters))
    on_disk = _dir_bytes(path)
    assert on_disk < 1.1 * adapter_bytes + 64 * 1024


def test_size_of_a_large_adapter_set(tmp_path):
    params = {f"layer_{i}": {"kernel": jnp.zeros((256, 512), jnp.float32)} for i in range(8)}
    spec = jlora.LoraSpec(rank=16, targets=".*kernel")
    adapters = _perturbed(jlora.init(spec, params, jax.random.key(0)), 1)
    path = checkpoint.save(tmp_path / "ckpt", adapters, spec)
    adapter_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(adapters))
    on_disk = _dir_bytes(path)
    assert adapter_bytes <= on_disk + 64 * 1024  # random values: nothing to compress
    assert on_disk < 1.1 * adapter_bytes + 64 * 1024
    assert on_disk < 0.1 * sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def test_like_restores_structure_sharding_and_dtype(tmp_path):
    """Save sharded one way, restore onto another mesh and dtype via ``like``."""
    devices = np.array(jax.devices()[:8])
    params = {"a": {"kernel": jnp.ones((64, 32))}, "b": {"kernel": jnp.ones((32, 16))}}
    spec = jlora.LoraSpec(rank=8, targets=".*kernel")
    adapters = _perturbed(jlora.init(spec, params, jax.random.key(0)), 1)
    save_mesh = Mesh(devices.reshape(8), ("x",))
    by_rows = NamedSharding(save_mesh, PartitionSpec("x", None))
    sharded = jax.tree_util.tree_map(lambda x: jax.device_put(x, by_rows), adapters)
    checkpoint.save(tmp_path / "run", sharded, spec, step=3)

    load_mesh = Mesh(devices.reshape(2, 4), ("data", "model"))
    by_cols = NamedSharding(load_mesh, PartitionSpec(None, "model"))
    abstract = jax.eval_shape(lambda: jlora.init(spec, params, jax.random.key(0)))
    like = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16, sharding=by_cols), abstract
    )
    loaded, _ = checkpoint.load(tmp_path / "run", like=like)
    for got, want in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(adapters)):
        assert got.sharding == by_cols
        assert got.dtype == jnp.bfloat16
        assert _bits(got) == _bits(want.astype(jnp.bfloat16))

    exact, _ = checkpoint.load(tmp_path / "run", like=sharded)  # a real tree works too
    _assert_same(exact, adapters)
    assert all(x.sharding == by_rows for x in jax.tree_util.tree_leaves(exact))


class _NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def _nnx_case():
    graphdef, state = nnx.split(_NNXModel(nnx.Rngs(0)))
    spec = jlora.LoraSpec(rank=2, targets=["up", "down"], trainable=".*down/bias.*")
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state, spec


def _eqx_case():
    model = eqx.nn.Linear(8, 4, key=jax.random.key(0))
    spec = jlora.LoraSpec(rank=2, targets="weight")
    return (lambda m, x: jax.vmap(m)(x)), model, spec


@pytest.mark.parametrize("case", [_nnx_case, _eqx_case], ids=["nnx", "equinox"])
def test_like_restores_nnx_and_equinox_structure(tmp_path, case):
    fn, params, spec = case()
    x = jnp.linspace(-1.0, 1.0, 16).reshape(2, 8)

    def make():
        return jlora.init(spec, params, jax.random.key(1), fn=fn, args=(x,))

    adapters = _perturbed(make(), 2)
    checkpoint.save(tmp_path / "ckpt", adapters, spec)
    loaded, _ = checkpoint.load(tmp_path / "ckpt", like=jax.eval_shape(make))
    treedef = jax.tree_util.tree_structure
    assert treedef(loaded) == treedef(adapters)
    _assert_same(loaded, adapters)
    want = jlora.lora(fn)(params, adapters, x)
    assert _bits(jlora.lora(fn)(params, loaded, x)) == _bits(want)


def test_steps_keep_the_newest(tmp_path):
    params = {"dense": {"kernel": jnp.ones((8, 8))}}
    spec = jlora.LoraSpec(rank=2, targets=["dense"])
    saved = {}
    for step in (1, 2, 3, 4):
        saved[step] = _perturbed(jlora.init(spec, params, jax.random.key(0)), step)
        checkpoint.save(tmp_path, saved[step], spec, step=step, max_to_keep=2)
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]
    _assert_same(checkpoint.load(tmp_path)[0], saved[4])
    _assert_same(checkpoint.load(tmp_path, step=3)[0], saved[3])
    with pytest.raises(FileNotFoundError, match=r"no step 1 .*complete steps: \[3, 4\]"):
        checkpoint.load(tmp_path, step=1)
    with pytest.raises(ValueError, match="step 4 already exists"):
        checkpoint.save(tmp_path, saved[1], spec, step=4)
    checkpoint.save(tmp_path, saved[1], spec, step=4, overwrite=True)
    _assert_same(checkpoint.load(tmp_path, step=4)[0], saved[1])


def _dense_params(widths):
    """Flax-Linen-like params of an MLP: ``params/dense_i/{kernel,bias}``."""
    layers = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        kernel = jnp.linspace(-1.0, 1.0, fan_in * fan_out).reshape(fan_in, fan_out)
        layers[f"dense_{i}"] = {"kernel": kernel, "bias": jnp.zeros(fan_out)}
    return {"params": layers}


def test_callable_targets_are_stored_as_paths(tmp_path):
    params = _dense_params((4, 8, 8, 2))
    spec = jlora.LoraSpec(rank=2, targets=lambda path, leaf: path.endswith("dense_1/kernel"))
    adapters = jlora.init(spec, params, jax.random.key(1))
    checkpoint.save(tmp_path / "ckpt", adapters, spec)
    metadata = checkpoint.read_metadata(tmp_path / "ckpt")
    assert "lambda" in metadata["spec"]["targets"]["callable"]
    _, loaded_spec = checkpoint.load(tmp_path / "ckpt")
    assert [p for p, _ in loaded_spec.select(params)] == ["params/dense_1/kernel"]
    assert (loaded_spec.rank, loaded_spec.alpha) == (2, spec.alpha)


def _mlp(params, x):
    for i in range(len(params["params"])):
        layer = params["params"][f"dense_{i}"]
        x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return x


def test_checkpoint_for_another_model_is_refused(tmp_path):
    small, large = _dense_params((4, 8, 4)), _dense_params((4, 16, 4))
    spec = jlora.LoraSpec(rank=2, targets=["dense_0", "dense_1"])
    checkpoint.save(tmp_path / "ckpt", jlora.init(spec, small, jax.random.key(1)), spec)
    loaded, _ = checkpoint.load(tmp_path / "ckpt")
    message = r"'params/dense_0/kernel'.*shape \[4, 8\].*float32\[4, 16\]"
    with pytest.raises(ValueError, match=message):
        jlora.merge(large, loaded)
    with pytest.raises(ValueError, match=message):
        jlora.lora(_mlp)(large, loaded, jnp.ones((1, 4)))
    like = jax.eval_shape(lambda: jlora.init(spec, large, jax.random.key(1)))
    with pytest.raises(ValueError, match="params/dense_0/kernel"):
        checkpoint.load(tmp_path / "ckpt", like=like)
    # ... while the model it was made for takes it.
    assert jlora.lora(_mlp)(small, loaded, jnp.ones((1, 4))).shape == (1, 4)


def test_clear_errors(tmp_path, key):
    params = {"w": jnp.ones((4, 4))}
    spec = jlora.LoraSpec(rank=1, targets="w")
    adapters = jlora.init(spec, params, jax.random.key(0))
    checkpoint.save(tmp_path / "one", adapters, spec)
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        checkpoint.save(tmp_path / "one", adapters, spec)
    with pytest.raises(ValueError, match="is a single checkpoint"):
        checkpoint.save(tmp_path / "one", adapters, spec, step=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load(tmp_path / "missing")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="PEFT adapter"):
        checkpoint.load(tmp_path / "peft")
    other = jlora.init(jlora.LoraSpec(rank=1, targets="v"), {"v": params["w"]}, key)
    with pytest.raises(ValueError, match=r"checkpoint: \['w'\], only in like: \['v'\]"):
        checkpoint.load(tmp_path / "one", like=other)


# What the killed writer saves at each step: the parent rebuilds it to check the bits.
_WRITER_SETUP = """
import numpy as np
import jax, jax.numpy as jnp
import jlora
from jlora import checkpoint

shapes = {f"layer_{i}": {"kernel": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
          for i in range(8)}
spec = jlora.LoraSpec(rank=128, targets=".*kernel")
template = jlora.init(spec, shapes, jax.random.key(0))

def adapters_for(step):
    leaves, treedef = jax.tree_util.tree_flatten(template)
    rng = np.random.default_rng(step)
    return treedef.unflatten(
        [jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32)) for x in leaves]
    )
"""

_WRITER_LOOP = """
import sys
root, step = sys.argv[1], int(sys.argv[2])
while True:  # save steps back to back until killed
    checkpoint.save(root, adapters_for(step), spec, step=step, max_to_keep=2)
    print(step, flush=True)
    step += 1
"""


def test_save_killed_midway_leaves_the_last_complete_step(tmp_path):
    """SIGKILL a process while it writes a step: the step before stays whole."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER_SETUP + _WRITER_LOOP)
    root = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    first = 1
    for _attempt in range(3):  # the kill lands mid-save almost always; retry if not
        child = subprocess.Popen(
            [sys.executable, str(script), str(root), str(first)], stdout=subprocess.PIPE, env=env
        )
        try:
            assert child.stdout.readline().strip() == str(first).encode()  # one step done
            pending, deadline = [], time.monotonic() + 60
            while not pending and time.monotonic() < deadline:
                pending = [n for n in os.listdir(root) if "orbax-checkpoint-tmp" in n]
                time.sleep(0.002)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        pending = [n for n in os.listdir(root) if "orbax-checkpoint-tmp" in n]
        if pending:
            break
        first = max(int(n) for n in os.listdir(root) if n.isdigit()) + 1
    assert pending, "the writer was never caught mid-save"

    newest = max(int(n) for n in os.listdir(root) if n.isdigit())
    interrupted = int(pending[0].split(".", 1)[0])
    assert interrupted > newest
    writer = {}
    exec(_WRITER_SETUP, writer)
    loaded, _ = checkpoint.load(root)  # the newest complete step, bit for bit
    _assert_same(loaded, writer["adapters_for"](newest))
    with pytest.raises(FileNotFoundError, match=f"step {interrupted} .* is incomplete"):
        checkpoint.load(root, step=interrupted)
