"""Quantized weight kinds (NF4, int8) in the engine: they compose with LoRA and DoRA.

The reference is always the plain model on the dequantized weights (``jlora.dequantize``,
whose codec is checked against bitsandbytes in ``tests/test_nf4.py``).
"""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jlora
from jlora._paths import leaves_with_paths
from tests.models import CNN, MLP, Decoder
from tests.test_core import assert_trees_close, perturb, projection_loss
from tests.test_dora import reference_params_jnp

TARGETS = ["query", "key", "value", "out", "up", "down"]


def _decoder(scan=True):
    model = Decoder(scan=scan)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    params = model.init(jax.random.key(1), tokens)
    return model.apply, params, tokens


def _check(fn, qparams, adapters, args, *, use_jit, rtol=1e-5, dora=False):
    """lora(fn) on quantized params against fn on the dequantized (and merged) params."""
    base = jlora.dequantize(qparams)
    key = jax.random.key(5)

    def ours(a):
        return projection_loss(jlora.lora(fn)(qparams, a, *args), key)

    def reference(a):
        merged = reference_params_jnp(base, a) if dora else jlora.merge(base, a)
        return projection_loss(fn(merged, *args), key)

    forward = jax.jit(jlora.lora(fn)) if use_jit else jlora.lora(fn)
    grad = jax.jit(jax.grad(ours)) if use_jit else jax.grad(ours)
    reference_params = reference_params_jnp(base, adapters) if dora else jlora.merge(base, adapters)
    want = jax.jit(fn)(reference_params, *args)
    got = forward(qparams, adapters, *args)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.abs(want).max()))
    if jax.tree.leaves(adapters):
        assert_trees_close(grad(adapters), jax.jit(jax.grad(reference))(adapters), rtol=rtol)


@pytest.mark.parametrize("kind", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
@pytest.mark.parametrize("use_jit", [True], ids=["jit"])
def test_quantized_base_alone_equals_the_dequantized_model(kind, use_jit):
    fn, params, tokens = _decoder()
    qparams = jlora.quantize(params, TARGETS, kind=kind, fn=fn, args=(tokens,))
    quantized = jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, jlora.QuantizedWeight))
    assert sum(isinstance(x, jlora.QuantizedWeight) for x in quantized) == len(TARGETS)
    _check(fn, qparams, {}, (tokens,), use_jit=use_jit)


# Every combination under jit; eager (20-30 s each on 2 cores) for NF4 + DoRA only.
DECODER_CASES = [
    pytest.param(False, "nf4", True, id="lora-nf4-jit"),
    # DoRA on NF4 stays in the default run through test_dora_families[llama-nf4] and
    # test_nf4_and_dora_train_and_lower_the_loss.
    pytest.param(True, "nf4", True, id="dora-nf4-jit", marks=pytest.mark.slow),
    pytest.param(True, "int8", True, id="dora-int8-jit", marks=pytest.mark.slow),
    pytest.param(True, "nf4", False, id="dora-nf4-eager", marks=pytest.mark.slow),
    pytest.param(False, "int8", True, id="lora-int8-jit", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("dora, kind, use_jit", DECODER_CASES)
def test_adapters_on_a_quantized_scanned_decoder(dora, kind, use_jit):
    fn, params, tokens = _decoder()
    qparams = jlora.quantize(params, TARGETS, kind=kind, fn=fn, args=(tokens,))
    spec = jlora.LoraSpec(rank=4, targets=[*TARGETS, "embed"], dora=dora)
    adapters = perturb(jlora.init(spec, qparams, jax.random.key(2), fn=fn, args=(tokens,)),
                       jax.random.key(3))  # fmt: skip
    _check(fn, qparams, adapters, (tokens,), use_jit=use_jit, dora=dora)
    report = jlora.explain(fn, qparams, adapters, tokens)
    assert all(u.materialized == 0 and u.factored >= 1 for u in report.values()), report
    kinds = set(report.kinds.values())
    adapter_kind = "dora" if dora else "lora"
    assert {(kind, adapter_kind), ("dense", adapter_kind)} <= kinds  # embed stays dense


@pytest.mark.parametrize("name", ["mlp", "cnn", pytest.param("unrolled", marks=pytest.mark.slow)])
def test_quantized_bases_of_other_layouts(name):
    key = jax.random.key(0)
    if name == "mlp":
        model, x, targets = MLP(), jax.random.normal(key, (3, 8)), ["dense_0", "dense_1"]
    elif name == "cnn":
        model, x, targets = CNN(), jax.random.normal(key, (2, 8, 8, 3)), ["conv_0", "head"]
    else:
        model, x = Decoder(scan=False), jax.random.randint(key, (2, 8), 0, 64)
        targets = ["query", "out", "up", "down"]
    params = model.init(jax.random.key(1), x)
    qparams = jlora.quantize(params, targets, fn=model.apply, args=(x,))
    spec = jlora.LoraSpec(rank=2, targets=targets)
    adapters = perturb(jlora.init(spec, qparams, jax.random.key(2), fn=model.apply, args=(x,)),
                       jax.random.key(3))  # fmt: skip
    _check(model.apply, qparams, adapters, (x,), use_jit=True)


def _residual_shapes(fn, *args) -> list[tuple[str, tuple[int, ...]]]:
    """Floating residuals the backward pass saves that are computed in the forward pass
    (not the function's own inputs or constants)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    found = []
    for line in out.getvalue().splitlines():
        match = re.match(r"(bf16|f16|f32|f64)\[([\d,]*)\] output of", line.strip())
        if match:
            found.append((match[1], tuple(int(d) for d in match[2].split(",") if d)))
    return found


def test_backward_keeps_the_codes_not_the_decoded_weight():
    fn, params, tokens = _decoder()
    qparams = jlora.quantize(params, TARGETS, fn=fn, args=(tokens,))
    spec = jlora.LoraSpec(rank=4, targets=TARGETS)
    adapters = jlora.init(spec, qparams, jax.random.key(2), fn=fn, args=(tokens,))
    weight_shapes = set()
    for path, leaf in leaves_with_paths(params):
        if path.endswith("kernel") and any(t in path for t in TARGETS):
            weight_shapes |= {tuple(leaf.shape), tuple(leaf.shape[1:])}

    def loss(a, p):
        return projection_loss(jlora.lora(fn)(p, a, tokens), jax.random.key(0))

    # What the float base saves of weight shape (the tied head's transposed embedding,
    # (32, 64) like `up`) is the model's own; the NF4 base must save nothing more.
    saved_float = {s for _, s in _residual_shapes(lambda a: loss(a, params), adapters)}
    saved = {s for _, s in _residual_shapes(lambda a: loss(a, qparams), adapters)}
    assert saved, "no residuals listed: the check would be vacuous"
    extra = (saved - saved_float) & weight_shapes
    assert not extra, extra

    # The check can fail: decoding under plain autodiff saves the decoded weights.
    def decoded_outside(a, q):
        return loss(a, jlora.dequantize(q))

    saved_plain = {s for _, s in _residual_shapes(decoded_outside, adapters, qparams)}
    assert (saved_plain - saved_float) & weight_shapes


def test_nf4_and_dora_train_and_lower_the_loss():
    fn, params, tokens = _decoder()
    qparams = jlora.quantize(params, TARGETS, fn=fn, args=(tokens,))
    for dora in (False, True):
        spec = jlora.LoraSpec(rank=4, targets=TARGETS, dora=dora)
        adapters = jlora.init(spec, qparams, jax.random.key(0), fn=fn, args=(tokens,))
        tx = jlora.optimizer(optax.adam(1e-2), adapters)
        state = tx.init(adapters)

        def loss(a):
            logits = jlora.lora(fn)(qparams, a, tokens)
            labels = tokens[:, 1:]
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels).mean()

        @jax.jit
        def step(a, s, loss=loss, tx=tx):
            value, grads = jax.value_and_grad(loss)(a)
            with jax.numpy_dtype_promotion("standard"):
                updates, s = tx.update(grads, s, a)
            return optax.apply_updates(a, updates), s, value

        losses = []
        for _ in range(20):
            adapters, state, value = step(adapters, state)
            losses.append(float(value))
        assert losses[-1] < 0.8 * losses[0], (dora, losses)


def test_quantized_shardings_follow_the_float_specs():
    """The quick check of the slow mesh test below: NF4 arrays split as their weight."""
    from jax.sharding import NamedSharding

    from tests import test_sharding as ts

    model, _, params, _, tokens, _ = ts.setup()
    qparams = jlora.quantize(params, ts.TARGETS[:-1], fn=model.apply, args=(tokens,))
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
    up_params = qparams["params"]["layers"]["up"]
    float_specs = {"params": {"layers": {"up": {"kernel": P(None, "fsdp", "tensor"),
                                                "bias": P(None, "tensor")}}}}  # fmt: skip
    shardings = jax.tree_util.tree_map(lambda p: NamedSharding(mesh, p), float_specs)
    placed = jlora.sharding.quantized_shardings(
        {"params": {"layers": {"up": up_params}}}, shardings
    )
    up = placed["params"]["layers"]["up"]["kernel"]
    assert up.codes.spec == P(None, ("fsdp", "tensor")) and up.absmax_offset.spec == P(None)


@pytest.mark.slow  # 37 s; test_quantized_shardings_follow_the_float_specs is the quick check
def test_nf4_dora_on_a_mesh_equals_one_device():
    from tests import test_sharding as ts
    from tests.test_dora import assert_mesh_step_equals_one_device

    model, _, params, _, tokens, _ = ts.setup()
    qparams = jlora.quantize(params, ts.TARGETS[:-1], fn=model.apply, args=(tokens,))
    spec = jlora.LoraSpec(rank=3, targets=ts.TARGETS, dora=True)
    adapters = perturb(jlora.init(spec, qparams, jax.random.key(2), fn=model.apply,
                                  args=(tokens,)), jax.random.key(3))  # fmt: skip
    placed = {}

    def base_shardings(float_shardings):
        placed.update(jlora.sharding.quantized_shardings(qparams, float_shardings))
        return placed

    a_shard = assert_mesh_step_equals_one_device(model, qparams, adapters, tokens,
                                                 base_shardings=base_shardings)  # fmt: skip
    up = placed["params"]["layers"]["up"]["kernel"]  # (layers, d, mlp) split (None, fsdp, tp)
    assert up.codes.spec == P(None, ("fsdp", "tensor")) and up.absmax_offset.spec == P(None)
    # DoRA's magnitude (layers, out) is split like B's output axis.
    up_adapter = a_shard["params"]["layers"]["up"]["kernel"]
    assert up_adapter.magnitude.spec == P(None, "tensor")
    assert up_adapter.lora_b.spec == P(None, None, "tensor")


@settings(max_examples=4, deadline=None)
@given(
    d_in=st.integers(1, 140),
    d_out=st.integers(1, 6),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nf4_error_is_within_half_the_largest_codebook_gap(d_in, d_out, double_quant, seed):
    from jlora import _nf4

    w = jax.random.normal(jax.random.key(seed), (d_in, d_out)) * 3.0
    q = jlora.quantize({"w": w}, "w", double_quant=double_quant)["w"]
    back = np.asarray(jlora.dequantize({"w": q})["w"], np.float64)
    codebook = np.sort(np.asarray(_nf4.NF4_CODEBOOK, np.float64))
    half_gap = np.max(np.diff(codebook)) / 2
    w_OxI = np.asarray(w, np.float64).T.reshape(-1)
    blocks = -(-w_OxI.size // 64)
    padded = np.pad(np.abs(w_OxI), (0, blocks * 64 - w_OxI.size)).reshape(blocks, 64)
    absmax = np.repeat(padded.max(axis=1), 64)[: w_OxI.size].reshape(d_out, d_in).T
    # Double quantization perturbs each absmax by at most its own 8-bit rounding.
    slack = 2e-2 * absmax if double_quant else 1e-6 * absmax
    assert np.all(np.abs(back - np.asarray(w, np.float64)) <= half_gap * absmax + slack)


def test_quantize_errors_and_merge_refusal():
    params = {"w": jnp.ones((64, 4))}
    with pytest.raises(ValueError, match="kind must be one of"):
        jlora.quantize(params, "w", kind="nf2")
    with pytest.raises(ValueError, match="block_size"):
        jlora.quantize(params, "w", block_size=0)
    q = jlora.quantize(params, "w")
    adapters = jlora.init(jlora.LoraSpec(rank=1, targets="w"), q, jax.random.key(0))
    with pytest.raises(ValueError, match="Dequantize first"):
        jlora.merge(q, adapters)
    merged = jlora.merge(jlora.dequantize(q), adapters)
    assert merged["w"].dtype == jnp.float32


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("shape", [(64, 24), (3, 2, 40)], ids=str)
def test_jlora_quantize_is_bitsandbytes_on_the_pytorch_layout(shape, double_quant):
    """``jlora.quantize`` of a Flax ``(in, out)`` kernel (or a stacked one) equals
    bitsandbytes' ``quantize_4bit`` of each layer's PyTorch ``(out, in)`` weight."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from tests.test_nf4 import bnb_absmax, bnb_decode, bnb_quantize

    w = jax.random.normal(jax.random.key(0), shape) * 0.1

    def fn(p, x):  # a stacked weight is one layer per index of its leading axis
        if p["w"].ndim == 3:
            return jax.lax.scan(lambda carry, w: (carry, x @ w), 0.0, p["w"])[1]
        return x @ p["w"]

    args = (jnp.ones((2, shape[-2])),)
    node = jlora.quantize({"w": w}, "w", double_quant=double_quant, fn=fn, args=args)["w"]
    assert node.layout.stack_axes == tuple(range(len(shape) - 2))
    back = np.asarray(jlora.dequantize({"w": node})["w"])
    layers = w.reshape(-1, *shape[-2:])
    codes = np.asarray(node.codes).reshape(layers.shape[0], -1)
    for k, layer in enumerate(np.asarray(layers)):
        w_OxI = torch.from_numpy(np.ascontiguousarray(layer.T))
        packed, state = bnb_quantize(w_OxI, nested=double_quant)
        absmax = bnb_absmax(state)
        want = bnb_decode(packed, absmax, w_OxI.shape).T
        got = back.reshape(layers.shape)[k]
        if double_quant:  # bnb's native 8-bit kernel may pick a neighbouring absmax code
            np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * np.abs(want).max())
        else:
            np.testing.assert_array_equal(codes[k], packed.numpy().reshape(-1))
            np.testing.assert_array_equal(got, want)
