"""LoftQ on NF4: against PEFT's algorithm run with bitsandbytes itself (CPU), numpy's
float64 SVD, and on the scanned decoder.

PEFT's ``loftq_init`` moves the weight to ``"cuda"`` (or ``"xpu"``) unconditionally, so it
cannot run on a CPU-only machine. The reference here is its loop, line for line, with
bitsandbytes' own ``quantize_4bit``/``dequantize_4bit`` on CPU (``compress_statistics=
False``, as PEFT quantizes) and ``torch.linalg.svd``. Input widths are multiples of 64,
where bitsandbytes' native CPU decode is right (see VARIANTS.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests.models import Decoder

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

TARGETS = ["query", "key", "value", "out", "up", "down"]


def peft_loftq(weight_OxI: np.ndarray, rank: int, iterations: int):
    """PEFT's ``loftq_init`` (num_bits=4) on CPU: ``(Q, lora_A (r, in), lora_B (out, r))``."""
    weight = torch.from_numpy(np.array(weight_OxI, np.float32))
    res = weight.clone()
    for i in range(iterations):
        packed, state = F.quantize_4bit(res, blocksize=64, quant_type="nf4",
                                        compress_statistics=False)  # fmt: skip
        dequantized = F.dequantize_4bit(packed, state)
        res = weight - dequantized
        u, s, vh = torch.linalg.svd(res, full_matrices=False)
        low_out = u @ torch.sqrt(torch.diag(s)[:, :rank])
        low_in = torch.sqrt(torch.diag(s)[:rank, :]) @ vh
        if i + 1 == iterations:
            break
        res = weight - low_out @ low_in
    return dequantized.numpy(), low_in.numpy(), low_out.numpy()


def _weight(key, shape=(128, 48)):
    """A Flax-layout (in, out) weight with a decaying spectrum plus noise."""
    k1, k2, k3 = jax.random.split(key, 3)
    low = jax.random.normal(k1, (shape[0], 6)) @ jax.random.normal(k2, (6, shape[1]))
    return low + 0.3 * jax.random.normal(k3, shape)


EPS32 = float(np.finfo(np.float32).eps)


def _svd_factors_and_tolerance(error: np.ndarray, rank: int):
    """The float64 LoftQ split of ``error`` (``U_r·Σ_r^½``, ``Σ_r^½·V_rᵀ``) and, per
    rank component, how far a float32 SVD may stray from it.

    A singular vector computed in float32 moves by about ``ε·‖E‖₂ / gap`` (Wedin's
    bound), ``gap`` the distance from its singular value to the nearest other one; a
    factor column is that vector times ``√σ``. Four times that bound allows for the
    constant; noise-like errors have close singular values, so the tolerance of a
    component with a small gap is large (its direction is ill-conditioned in float32,
    for PEFT's torch SVD as for jlora's), while a wrong scale, sign, orientation or
    round is off by O(1).
    """
    u, s, vt = np.linalg.svd(error, full_matrices=False)
    neighbours = np.concatenate([[np.inf], s, [0.0]])
    gaps = np.minimum(neighbours[:-2] - s, s - neighbours[2:])[:rank]
    tolerance = 4 * EPS32 * s[0] / gaps * np.sqrt(s[:rank]) + 8 * EPS32 * np.sqrt(s[0])
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank], tolerance


def _assert_factors(a, b, a_ref, b_ref, tolerance, who):
    """``a (in, r)``, ``b (r, out)`` against the float64 split, each component's sign
    aligned first (singular vectors have none)."""
    signs = np.sign(np.sum(a * a_ref, axis=0))
    off_a = np.max(np.abs(a * signs - a_ref), axis=0)
    off_b = np.max(np.abs(b * signs[:, None] - b_ref), axis=1)
    assert np.all(off_a <= tolerance) and np.all(off_b <= tolerance), (
        who, off_a, off_b, tolerance)  # fmt: skip


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_equals_peft_with_bitsandbytes(key, iterations):
    w = _weight(key)  # (in=128, out=48): torch (48, 128), in_features a multiple of 64
    rank = 4
    init = "loftq" if iterations == 1 else f"loftq_iter_{iterations}"
    spec = jlora.LoraSpec(rank=rank, alpha=float(rank), targets="w", init=init)
    q, adapters = jlora.loftq(spec, {"w": w}, key, double_quant=False)
    ref_q, ref_a, ref_b = peft_loftq(np.asarray(w).T, rank, iterations)
    # The base: bitsandbytes' decode of its own codes, bit for bit after one round. Later
    # rounds quantize W - L·R, whose float32 rounding differs between the two SVDs.
    base = np.asarray(jlora.dequantize(q)["w"]).T
    if iterations == 1:
        np.testing.assert_array_equal(base, ref_q)
    else:
        np.testing.assert_allclose(base, ref_q, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref_q)))
    # The factors, at alpha = r (PEFT's scale-free storage): A = Rᵀ, B = Lᵀ up to signs.
    # Both jlora's and PEFT's (torch float32) are checked against the float64 SVD of
    # the last round's error W - Q, with the float32 tolerance of each component.
    error = np.asarray(w, np.float64).T - ref_q.astype(np.float64)  # torch (out, in)
    if iterations > 1:  # the last round's error is W - Q_K; Q_K is jlora's (above)
        error = np.asarray(w, np.float64).T - base.astype(np.float64)
    b_64, a_64, tolerance = _svd_factors_and_tolerance(error, rank)  # (out, r), (r, in)
    a = np.asarray(adapters["w"].lora_a)
    b = np.asarray(adapters["w"].lora_b)
    _assert_factors(a, b, a_64.T, b_64.T, tolerance, "jlora")
    _assert_factors(ref_a.T, ref_b.T, a_64.T, b_64.T, tolerance, "peft")


def test_loftq_is_the_svd_of_the_quantization_error_at_any_alpha(key):
    w = _weight(key, (64, 40))
    rank, alpha = 3, 12.0
    spec = jlora.LoraSpec(rank=rank, alpha=alpha, targets="w", init="loftq")
    q, adapters = jlora.loftq(spec, {"w": w}, key)
    # One round: the base is the plain NF4 weight, jlora.quantize's, code for code.
    plain = jlora.quantize({"w": w}, "w")
    for name in ("codes", "absmax_codes", "absmax_scales", "absmax_offset"):
        np.testing.assert_array_equal(getattr(q["w"], name), getattr(plain["w"], name))
    base = np.asarray(jlora.dequantize(q)["w"], np.float64)
    error = np.asarray(w, np.float64) - base
    u, s, vt = np.linalg.svd(error, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    # s·A·B is the rank-r part of the error whatever alpha is (PEFT's is only at alpha = r).
    np.testing.assert_allclose(np.asarray(adapters["w"].delta(), np.float64), best, atol=2e-5)
    left = np.linalg.norm(error - np.asarray(adapters["w"].delta(), np.float64))
    np.testing.assert_allclose(left, np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-4)
    assert left < 0.9 * np.linalg.norm(error)
    # jlora.init with the same spec gives the same adapters.
    again = jlora.init(spec, {"w": w}, key)
    np.testing.assert_array_equal(again["w"].lora_a, adapters["w"].lora_a)
    np.testing.assert_array_equal(again["w"].lora_b, adapters["w"].lora_b)


def test_more_rounds_do_not_increase_the_error(key):
    w = _weight(key, (128, 32))
    errors = []
    for init in ("loftq", "loftq_iter_4"):
        spec = jlora.LoraSpec(rank=8, alpha=8.0, targets="w", init=init)
        q, adapters = jlora.loftq(spec, {"w": w}, key)
        merged = jlora.merge(jlora.dequantize(q), adapters)["w"]
        errors.append(float(jnp.linalg.norm(merged - w)))
    plain = float(jnp.linalg.norm(jlora.dequantize(jlora.quantize({"w": w}, "w"))["w"] - w))
    assert errors[0] < 0.95 * plain, (errors, plain)
    assert errors[1] <= errors[0] * 1.001, errors


@pytest.fixture(scope="module")
def decoder():
    model = Decoder()
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
    params = model.init(jax.random.key(2), tokens)
    return model, params, tokens


def test_stacked_loftq_is_per_layer_loftq_under_scan(key):
    stacked = jnp.stack([_weight(k, (64, 64)) for k in jax.random.split(key, 3)])

    def fn(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    x = jax.random.normal(key, (2, 64))
    spec = jlora.LoraSpec(rank=2, alpha=2.0, targets="w", init="loftq")
    q, adapters = jlora.loftq(spec, {"w": stacked}, key, fn=fn, args=(x,))
    for layer in range(3):
        _, one = jlora.loftq(spec, {"w": stacked[layer]}, key)
        np.testing.assert_allclose(adapters["w"].delta()[layer], one["w"].delta(), atol=1e-5)
    got = jax.jit(jlora.lora(fn))(q, adapters, x)
    want = fn(jlora.merge(jlora.dequantize(q), adapters), x)
    # Both float32 runs against the float64 forward of Q + s·A·B, within a first-order
    # float32 error bound: each layer adds γ·(|h|·|Q| + s·|h|·|A|·|B|) to the
    # pre-activation (γ = (n + r + 3)·ε: a length-n dot, the rank-r product and the
    # sum, merged or factored), and the error already in h passes through |W|; tanh' =
    # 1 - tanh² scales both, and XLA's tanh (a rational approximation, not correctly
    # rounded) adds a few ulp: 4ε.
    base = np.asarray(jlora.dequantize(q)["w"], np.float64)
    node = adapters["w"]
    a64, b64 = np.asarray(node.lora_a, np.float64), np.asarray(node.lora_b, np.float64)
    h = np.asarray(x, np.float64)
    bound = np.zeros_like(h)
    gamma = (h.shape[-1] + node.rank + 3) * EPS32
    for layer in range(3):
        w64 = base[layer] + node.scale * a64[layer] @ b64[layer]
        size = np.abs(base[layer]) + node.scale * np.abs(a64[layer]) @ np.abs(b64[layer])
        pre = h @ w64
        slope = 1 - np.tanh(pre) ** 2
        bound = slope * (bound @ np.abs(w64) + gamma * (np.abs(h) @ size)) + 4 * EPS32
        h = np.tanh(pre)
    assert np.all(np.abs(np.asarray(want, np.float64) - h) <= bound), (
        np.max(np.abs(np.asarray(want, np.float64) - h) / bound))  # fmt: skip
    assert np.all(np.abs(np.asarray(got, np.float64) - h) <= bound), (
        np.max(np.abs(np.asarray(got, np.float64) - h) / bound))  # fmt: skip


@pytest.mark.slow
def test_nf4_loftq_adapter_on_the_scanned_decoder(decoder, key):
    model, params, tokens = decoder
    spec = jlora.LoraSpec(rank=4, alpha=8.0, targets=TARGETS, init="loftq")
    q, adapters = jlora.loftq(spec, params, key, fn=model.apply, args=(tokens,))
    kernel = q["params"]["layers"]["up"]["kernel"]
    assert isinstance(kernel, jlora.QuantizedWeight) and kernel.kind == "nf4"
    assert kernel.layout.stack_axes == (0,)
    got = jax.jit(jlora.lora(model.apply))(q, adapters, tokens)
    want = model.apply(jlora.merge(jlora.dequantize(q), adapters), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    report = jlora.explain(model.apply, q, adapters, tokens)
    assert all(u.materialized == 0 for u in report.values()), report
    # Closer to the float model than the plain NF4 base is.
    reference = model.apply(params, tokens)
    plain = model.apply(jlora.dequantize(jlora.quantize(params, TARGETS, fn=model.apply,
                                                        args=(tokens,))), tokens)  # fmt: skip
    assert float(jnp.linalg.norm(got - reference)) < float(jnp.linalg.norm(plain - reference))
    # Gradients reach the adapters only, through the NF4 base.
    grads = jax.grad(lambda a: jnp.sum(jlora.lora(model.apply)(q, a, tokens) ** 2))(adapters)
    assert float(jnp.abs(grads["params"]["layers"]["up"]["kernel"].lora_b).max()) > 0


def test_dora_with_loftq_starts_at_the_loftq_model(key):
    w = _weight(key, (64, 16))
    spec = jlora.LoraSpec(rank=2, alpha=2.0, targets="w", init="loftq", dora=True)
    q, adapters = jlora.loftq(spec, {"w": w}, key)
    x = jax.random.normal(key, (3, 64))
    base = jlora.dequantize(q)["w"]
    want = x @ (base + adapters["w"].delta())  # m = ‖Q + s·A·B‖: the ratio is 1
    np.testing.assert_allclose(jlora.lora(lambda p, x: x @ p["w"])(q, adapters, x), want,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_errors(key):
    w = jnp.ones((64, 8))
    with pytest.raises(ValueError, match=r"jlora\.loftq needs LoraSpec"):
        jlora.loftq(jlora.LoraSpec(rank=2, targets="w"), {"w": w}, key)
    with pytest.raises(ValueError, match="quantized nf4 weight"):
        jlora.init(jlora.LoraSpec(rank=2, targets="w", init="loftq"),
                   jlora.quantize({"w": w}, "w"), key)  # fmt: skip
    with pytest.raises(ValueError, match="'loftq_iter_K'"):
        jlora.LoraSpec(rank=2, targets="w", init="loftq_iter_0")
