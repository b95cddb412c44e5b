"""``tpu_scripts/``: the Llama port against transformers, and ``train.py --simulate 8``."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tpu_scripts"))

import llama  # noqa: E402  (tpu_scripts is not a package)
import train  # noqa: E402


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        },
    ],
    ids=["gqa", "tied_llama3_rope"],
)
def test_llama_loads_hf_safetensors_and_matches_transformers(tmp_path, extra):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    tokens = np.random.default_rng(0).integers(0, 96, (2, 12))
    with torch.no_grad():
        expected = reference(torch.as_tensor(tokens)).logits.numpy()

    config = llama.read_config(str(tmp_path))
    model = llama.Llama(config, dtype=jnp.float32, param_dtype=jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    shardings = llama.param_shardings(abstract, mesh)
    params = llama.load_hf(str(tmp_path), abstract, shardings, config)
    q = params["params"]["layers"]["q"]["kernel"]
    assert q.sharding.spec == llama.P(None, "fsdp", "tensor", None)
    with jax.default_matmul_precision("highest"):
        logits = jax.jit(model.apply)(params, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-4)


# -- data: each host reads its own rows ------------------------------------------------


@pytest.mark.parametrize("corpus", [False, True], ids=["synthetic", "text"])
def test_hosts_read_disjoint_rows_of_the_same_global_batch(corpus):
    sequences = np.arange(40 * 9, dtype=np.int32).reshape(40, 9) if corpus else None
    kwargs = dict(batch=8, seq=8, vocab=64, sequences=sequences, seed=3)
    whole = train.local_batch(5, (0, 8), **kwargs)
    halves = [train.local_batch(5, rows, **kwargs) for rows in ((0, 4), (4, 8))]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    assert whole.shape == (8, 9) and whole.dtype == np.int32
    assert not np.array_equal(whole, train.local_batch(6, (0, 8), **kwargs))


def test_host_rows_follow_the_batch_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    sharding = jax.sharding.NamedSharding(mesh, llama.P(("data", "fsdp"), None))
    assert train.host_rows(sharding, (16, 9)) == (0, 16)  # one host holds every row


# -- train.py --simulate 8, then a resume ----------------------------------------------


def run_train(tmp_path, steps: int, extra=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = [
        sys.executable, str(ROOT / "tpu_scripts" / "train.py"), "--simulate", "8",
        "--fsdp", "4", "--tensor", "2", "--batch", "8", "--seq", "16", "--rank", "4",
        "--steps", str(steps), "--log-every", "1", "--eval-every", "2", "--eval-batches", "1",
        "--save-every", "2", "--ckpt-dir", str(tmp_path / "run"),
        "--compile-cache", str(tmp_path / "xla-cache"), *extra,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_metrics(tmp_path) -> list[dict]:
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_train_simulate_then_resume_from_the_last_checkpoint(tmp_path):
    run_train(tmp_path, steps=4)
    first = read_metrics(tmp_path)
    losses = {e["step"]: e["loss"] for e in first if "loss" in e}
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert [e["step"] for e in first if "eval_loss" in e] == [2, 4]
    assert all(e["tokens_per_s"] > 0 for e in first if e["step"] > 1 and "loss" in e)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == ["2", "4"]

    # Pretend the job died after step 2's checkpoint: the rerun resumes there and
    # repeats steps 3 and 4 exactly (same data, same adapters and optimizer state).
    shutil.rmtree(tmp_path / "run" / "4")
    result = run_train(tmp_path, steps=4)
    assert "resumed from step 2" in result.stdout
    second = read_metrics(tmp_path)[len(first) :]
    assert [(e["step"], e["loss"]) for e in second if "loss" in e] == [
        (3, losses[3]),
        (4, losses[4]),
    ]
    assert [e["eval_loss"] for e in second if "eval_loss" in e] == [
        e["eval_loss"] for e in first if "eval_loss" in e and e["step"] == 4
    ]

    # The exported adapters load with jlora.checkpoint, sharded like the base.
    from jlora import checkpoint

    adapters, spec = checkpoint.load(tmp_path / "run" / "adapters")
    assert spec.rank == 4
    q = adapters["params"]["layers"]["q"]["kernel"]
    assert q.lora_a.shape == (2, 64, 4) and q.lora_b.shape == (2, 4, 4 * 16)


@pytest.mark.slow  # 30 s: one more compile of the whole sharded step
def test_train_simulate_on_an_nf4_base(tmp_path):
    result = run_train(tmp_path, steps=2, extra=["--quantize", "nf4"])
    assert "base kernels quantized to nf4" in result.stdout + result.stderr
    losses = [e["loss"] for e in read_metrics(tmp_path) if "loss" in e]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_shell_scripts_parse_and_launch_prints_usage():
    for script in ("setup.sh", "launch.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "tpu_scripts" / script)], check=True)
    usage = subprocess.run(
        ["bash", str(ROOT / "tpu_scripts" / "launch.sh")], capture_output=True, text=True
    )
    assert usage.returncode == 2 and "--worker=all" in usage.stdout


def test_size_arithmetic_counts_what_the_model_and_jlora_create():
    import sizes

    import jlora

    cfg = llama.PRESETS["tiny"]
    model = llama.Llama(cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == cfg.params()
    spec = jlora.LoraSpec(rank=4, targets=list(sizes.TARGETS))
    adapters = jax.eval_shape(
        lambda p: jlora.init(spec, p, jax.random.key(0), fn=model.apply, args=(tokens,)), params
    )
    assert sum(x.size for x in jax.tree_util.tree_leaves(adapters)) == sizes.adapter_params(cfg, 4)
    parts = sizes.estimate(cfg, chips=8, batch=8, seq=16, rank=4)
    assert parts["total"] == pytest.approx(parts["base"] + parts["adapters"] + parts["activations"])


def test_every_llama_target_runs_factored():
    import jlora

    cfg = llama.PRESETS["tiny"]
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    model = llama.Llama(cfg, dtype=jnp.float32, param_dtype=jnp.float32, mesh=mesh)
    tokens = jax.ShapeDtypeStruct((8, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    spec = jlora.LoraSpec(rank=4, targets=["q", "k", "v", "o", "gate", "up", "down", "embed"])
    adapters = jax.eval_shape(
        lambda p: jlora.init(spec, p, jax.random.key(0), fn=model.apply, args=(tokens,)), params
    )
    report = jlora.explain(model.apply, params, adapters, tokens)
    assert len(report) == 8
    assert all(uses.materialized == 0 and uses.factored >= 1 for uses in report.values()), report


# -- gradient accumulation: --accum N is the whole batch's update ----------------------


@functools.cache
def tiny_training():
    """The tiny preset on a (1, 4, 2) mesh, a batch of 16 sequences of 9 tokens,
    adapters with both factors random (so that A and B both get gradients), and plain
    SGD at learning rate 1 (Adam's first step would hide the gradient's scale).

    Weights and factors are drawn here from their shapes (nothing to compile)."""
    import optax

    import jlora

    cfg = llama.PRESETS["tiny"]
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    model = llama.Llama(cfg, dtype=jnp.float32, param_dtype=jnp.float32, mesh=mesh)
    batch = train.local_batch(1, (0, 16), batch=16, seq=8, vocab=cfg.vocab_size, sequences=None)
    tokens = jax.ShapeDtypeStruct((16, 8), jnp.int32)
    rng = np.random.default_rng(0)

    def draw(path, x):
        if jax.tree_util.keystr(path).endswith("['scale']"):  # RMSNorm
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)

    params = jax.tree_util.tree_map_with_path(
        draw, jax.eval_shape(model.init, jax.random.key(0), tokens)
    )
    spec = jlora.LoraSpec(rank=4, targets=["q", "v", "down"])
    abstract = jax.eval_shape(
        lambda p: jlora.init(spec, p, jax.random.key(1), fn=model.apply, args=(tokens,)), params
    )
    adapters = jax.tree_util.tree_map_with_path(draw, abstract)
    return model, params, adapters, jlora.optimizer(optax.sgd(1.0), adapters), batch


@functools.cache
def jitted_steps(accum: int):
    model, _, _, tx, _ = tiny_training()
    train_step, eval_step = train.make_steps(model, tx, dropout=False, accum=accum)
    return jax.jit(train_step), jax.jit(eval_step)


def one_update(accum: int, batch: np.ndarray):
    """New adapters, loss, gradient norm and eval loss of one ``train.make_steps`` step."""
    _, params, adapters, tx, _ = tiny_training()
    train_step, eval_step = jitted_steps(accum)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes weak and float32 scalars
        state = {"adapters": adapters, "opt_state": tx.init(adapters)}
        state, loss, grad_norm = train_step(state, params, jnp.asarray(batch), jax.random.key(3))
    eval_loss = eval_step(adapters, params, jnp.asarray(batch))
    return state["adapters"], float(loss), float(grad_norm), float(eval_loss)


def test_accumulating_four_micro_batches_is_the_whole_batch_update():
    batch = tiny_training()[-1]
    whole, loss, grad_norm, eval_loss = one_update(1, batch)
    accumulated, accum_loss, accum_norm, accum_eval = one_update(4, batch)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        accumulated,
        whole,
    )
    assert accum_loss == pytest.approx(loss, rel=1e-6)
    assert accum_norm == pytest.approx(grad_norm, rel=1e-5)
    assert accum_eval == pytest.approx(eval_loss, rel=1e-6) and eval_loss == pytest.approx(loss)

    # A wrong accumulation would not pass the above: one micro-batch alone (rows 0, 4,
    # 8, 12, repeated 4 times to reuse the compiled step: same mean, same gradient)
    # gives another loss and another update; a sum of the micro-batches' gradients in
    # place of their mean would give 4 x the norm.
    alone, alone_loss, alone_norm, _ = one_update(1, np.tile(batch[0::4], (4, 1)))
    assert abs(alone_loss - loss) > 1e-3 and abs(alone_norm - grad_norm) > 1e-3 * grad_norm
    differences = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), alone, whole)
    assert max(jax.tree_util.tree_leaves(differences)) > 1e-3


def test_micro_batch_split_keeps_each_devices_rows():
    micro = train.split_micro_batches(jnp.arange(16)[:, None], 4)
    assert micro.shape == (4, 4, 1)
    assert micro[1, :, 0].tolist() == [1, 5, 9, 13]  # strided: device d's rows stay on d
    np.testing.assert_array_equal(np.sort(micro.reshape(-1)), np.arange(16))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "16", "--accum", "3"], "--batch 16 does not split into --accum 3"),
        (["--batch", "16", "--accum", "4"], "--batch 16 / --accum 4 = 4 .* data x fsdp = 8"),
        (["--batch", "16", "--accum", "0"], "--accum must be 1 or more; found 0"),
    ],
    ids=["indivisible", "micro_batch_over_mesh", "zero"],
)
def test_accum_that_does_not_split_the_batch_is_refused(argv, message):
    # Refused before the model is built: the mesh is all 8 devices on fsdp.
    with pytest.raises(ValueError, match=message):
        train.main(["--no-distributed", *argv])
