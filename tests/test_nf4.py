"""jlora._nf4 against bitsandbytes itself: NF4 codes, absmaxes and decodes, bit for bit.

Everything runs on CPU. bitsandbytes quantizes 4-bit weights on CPU with its portable
PyTorch kernel, which is the reference for codes and absmaxes. For decoding, the
reference is that portable kernel too (called directly), because bitsandbytes' native
CPU decoder indexes absmaxes per row and is wrong when ``in`` is not a multiple of the
block size. Double quantization on CPU goes through bitsandbytes' native 8-bit
quantizer, which picks a neighbouring level for a small fraction of the absmaxes, so
that part is compared by decoded value (and bit for bit against the portable 8-bit
kernel, reached through the dispatcher).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from jlora._nf4 import (  # noqa: E402
    NF4_CODEBOOK,
    dequantize_absmax,
    dequantize_nf4,
    dequantize_record,
    dynamic_map_signed,
    nf4_max_error,
    quantize_absmax,
    quantize_nf4,
    read_bnb_4bit,
    record_absmax,
)

SHAPES = [(24, 64), (16, 200), (7, 33), (3, 1), (5, 256)]
TORCH_TO_JNP = {
    torch.float32: jnp.float32,
    torch.bfloat16: jnp.bfloat16,
    torch.float16: jnp.float16,
}
NF4_BOUNDS = ((NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / np.float32(2)).astype(np.float32)

quantize_jit = jax.jit(quantize_nf4, static_argnames="block_size")
dequantize_jit = jax.jit(dequantize_nf4, static_argnames=("shape", "block_size", "dtype"))
quantize_absmax_jit = jax.jit(quantize_absmax, static_argnames="block_size")
dequantize_absmax_jit = jax.jit(dequantize_absmax, static_argnames="block_size")


# ------------------------------------------------------------------ bitsandbytes helpers


def bnb_quantize(w: torch.Tensor, block_size: int = 64, nested: bool = False):
    return F.quantize_4bit(w, blocksize=block_size, quant_type="nf4", compress_statistics=nested)


def bnb_absmax(state) -> torch.Tensor:
    """bitsandbytes' own float32 absmaxes, decoding double quantization as it does."""
    if not state.nested:
        return state.absmax
    return F.dequantize_blockwise(state.absmax, state.state2) + state.offset


def bnb_decode(packed: torch.Tensor, absmax: torch.Tensor, shape, block_size=64, dtype=None):
    """bitsandbytes' portable (PyTorch) NF4 decode, called directly.

    Falls back to the same arithmetic in numpy (float32 products, then a cast) if the
    private function moves.
    """
    dtype = torch.float32 if dtype is None else dtype
    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    except ImportError:  # pragma: no cover - depends on the bitsandbytes version
        _dequantize_4bit_compute = None
    if _dequantize_4bit_compute is not None:
        fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
        code = F.get_4bit_type("nf4", device="cpu")
        out = fn(packed.reshape(-1), absmax, code, block_size, tuple(shape), dtype)
        return out.float().numpy()
    n = int(np.prod(shape))
    b = packed.reshape(-1).numpy()
    idx = np.stack([b >> 4, b & 15], axis=-1).reshape(-1)[:n]
    a = np.repeat(absmax.numpy(), block_size)[:n]
    out = torch.from_numpy((NF4_CODEBOOK[idx] * a).reshape(shape))
    return out.to(dtype).float().numpy()


def bnb_portable_quantize_blockwise(x: torch.Tensor, block_size: int = 256):
    """bitsandbytes' portable 8-bit blockwise quantizer (its native CPU kernel bypassed)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    try:
        return op.redispatch(keys, x, F.create_dynamic_map(signed=True), block_size)
    except Exception as err:  # pragma: no cover - depends on the bitsandbytes version
        pytest.skip(f"cannot reach bitsandbytes' portable quantize_blockwise: {err}")


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    b = np.asarray(packed).reshape(-1)
    return np.stack([b >> 4, b & 15], axis=-1).reshape(-1)[:n]


def random_weight(shape, seed, scale=1.0, dtype=torch.float32) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
    return torch.from_numpy(w).to(dtype)


def to_jnp(w: torch.Tensor) -> jax.Array:
    return jnp.asarray(w.float().numpy()).astype(TORCH_TO_JNP[w.dtype])


def per_element(absmax: np.ndarray, n: int, block_size: int) -> np.ndarray:
    return np.repeat(np.asarray(absmax), block_size)[:n]


def check_nested_absmax(q, scales, offset, ref_codes, ref_decoded):
    """Our double-quantized absmaxes against bitsandbytes' (codes and decoded values).

    bnb's native CPU 8-bit kernel (a lookup table) picks the neighbouring level for a
    small fraction of values, and its float32 mean may differ in the last bits; where
    the codes agree the decoded absmaxes agree to 1e-6, elsewhere to one level step.
    Returns the decoded absmaxes and the mask of agreeing codes.
    """
    got = np.asarray(dequantize_absmax_jit(q, scales, offset))
    ref_codes = np.asarray(ref_codes)
    same = np.asarray(q) == ref_codes
    assert same.mean() >= 0.98, f"{(~same).sum()} of {same.size} absmax codes differ"
    assert np.all(np.abs(np.asarray(q, np.int32) - ref_codes.astype(np.int32)) <= 1)
    np.testing.assert_allclose(got[same], ref_decoded[same], rtol=1e-6)
    level_gap = float(np.max(np.diff(dynamic_map_signed())))
    block_scale = per_element(np.asarray(scales), got.size, 256)
    tol = level_gap * block_scale * (1 + 1e-6) + 1e-6 * np.abs(ref_decoded)
    assert np.all(np.abs(got - ref_decoded) <= tol)
    return got, same


# --------------------------------------------------------------------------- tables


def test_tables_equal_bitsandbytes():
    assert NF4_CODEBOOK.dtype == np.float32 and NF4_CODEBOOK.shape == (16,)
    np.testing.assert_array_equal(NF4_CODEBOOK, F.get_4bit_type("nf4", device="cpu").numpy())
    table = dynamic_map_signed()
    assert table.dtype == np.float32 and table.shape == (256,)
    np.testing.assert_array_equal(table, F.create_dynamic_map(signed=True).numpy())
    assert dynamic_map_signed() is table  # cached


# ------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_matches_bitsandbytes(shape, dtype):
    for seed, scale in [(0, 1.0), (1, 3e-3)]:
        w = random_weight(shape, seed, scale, dtype)
        packed, state = bnb_quantize(w)
        codes, absmax = quantize_jit(to_jnp(w))
        n = int(np.prod(shape))
        assert codes.dtype == jnp.uint8 and codes.shape == ((n + 1) // 2,)
        assert absmax.dtype == jnp.float32 and absmax.shape == (-(-n // 64),)
        np.testing.assert_array_equal(np.asarray(codes), packed.numpy().reshape(-1))
        np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())


@pytest.mark.parametrize("block_size", [32, 128, 256])
def test_quantize_other_block_sizes(block_size):
    w = random_weight((9, 130), 2)
    packed, state = bnb_quantize(w, block_size)
    codes, absmax = quantize_jit(to_jnp(w), block_size=block_size)
    np.testing.assert_array_equal(np.asarray(codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())


def test_ties_zero_blocks_and_padding():
    """Values exactly on a boundary take the lower code; zero blocks decode to 0."""
    bounds = np.concatenate([NF4_BOUNDS, NF4_BOUNDS])
    full = np.zeros(64, np.float32)
    full[0] = 1.0  # absmax 1: x * (1 / 1) == x, so each boundary is hit exactly
    full[1 : 1 + bounds.size] = bounds
    scaled_by_two = full * np.float32(2)  # powers of two scale exactly
    partial = np.concatenate([[np.float32(-4.0)], NF4_BOUNDS * np.float32(4)])  # 16 values
    zero_block = np.zeros(64, np.float32)
    zero_block[5] = -0.0
    flat = np.concatenate([full, scaled_by_two, zero_block, partial[:15]]).astype(np.float32)
    assert flat.size % 64 and flat.size % 2  # a partial last block and an odd count
    w = torch.from_numpy(flat.reshape(1, -1))
    packed, state = bnb_quantize(w)
    codes, absmax = quantize_jit(jnp.asarray(flat.reshape(1, -1)))
    np.testing.assert_array_equal(np.asarray(codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())
    got = unpack(np.asarray(codes), flat.size)
    lower = np.arange(15)
    np.testing.assert_array_equal(got[1:16], lower)  # ties to the lower code
    np.testing.assert_array_equal(got[65:80], lower)
    np.testing.assert_array_equal(got[128:192], 7)  # all-zero block -> the code of 0.0
    np.testing.assert_array_equal(got[193:207], lower[:14])
    assert np.asarray(absmax)[2] == 0.0
    assert int(np.asarray(codes)[-1]) & 0xF == 7  # the padding nibble
    out = dequantize_jit(codes, absmax, shape=(1, flat.size))
    np.testing.assert_array_equal(np.asarray(out)[0, 128:192], 0.0)
    np.testing.assert_array_equal(np.asarray(quantize_jit(jnp.zeros((3, 70)))[0]), 0x77)


@functools.cache
def _reciprocal_vs_division_cases(count: int = 4) -> list[tuple[np.float32, np.float32, int, int]]:
    """``(absmax, x)`` pairs where ``x * (1 / absmax)`` and ``x / absmax`` land on
    different sides of an NF4 boundary (float32 arithmetic, as bitsandbytes does)."""
    rng = np.random.default_rng(0)
    found = []
    while len(found) < count:
        a = np.float32(rng.uniform(0.5, 4.0))
        b = NF4_BOUNDS[rng.integers(0, 15)]
        x0 = np.float32(b * a)
        xs = (x0 + np.arange(-4, 5, dtype=np.float32) * np.spacing(x0)).astype(np.float32)
        by_mul = np.searchsorted(NF4_BOUNDS, xs * (np.float32(1) / a), side="left")
        by_div = np.searchsorted(NF4_BOUNDS, xs / a, side="left")
        for j in np.nonzero((by_mul != by_div) & (np.abs(xs) < a))[0]:
            found.append((a, xs[j], int(by_mul[j]), int(by_div[j])))
    return found[:count]


@pytest.mark.parametrize("jit", [False, True])
def test_full_blocks_multiply_by_reciprocal_partial_block_divides(jit):
    """bitsandbytes scales full blocks by ``x * (1/absmax)`` but the partial last block
    by ``x / absmax``; the two differ in the last bit, which can flip a code."""
    cases = _reciprocal_vs_division_cases()
    flat = np.zeros(64 * len(cases) + 2, np.float32)
    for k, (a, x, _, _) in enumerate(cases):
        flat[64 * k], flat[64 * k + 1] = a, x
    a, x, _, div_code = cases[0]
    flat[-2:] = a, x  # the partial last block: two values
    quantize = quantize_jit if jit else quantize_nf4
    codes, absmax = quantize(jnp.asarray(flat[None]))
    packed, state = bnb_quantize(torch.from_numpy(flat[None]))
    np.testing.assert_array_equal(np.asarray(codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())
    got = unpack(np.asarray(codes), flat.size)
    assert [int(got[64 * k + 1]) for k in range(len(cases))] == [c[2] for c in cases]
    assert int(got[-1]) == div_code != cases[0][2]


# ------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_bitsandbytes_codes(shape, dtype):
    """Pre-quantized bitsandbytes weights decode as bitsandbytes decodes them."""
    w = random_weight(shape, 3, 2.0, dtype)
    packed, state = bnb_quantize(w)
    expected = bnb_decode(packed, state.absmax, shape, dtype=dtype)
    got = dequantize_jit(
        jnp.asarray(packed.numpy()),  # the (ceil(n/2), 1) tensor, as stored
        jnp.asarray(state.absmax.numpy()),
        shape=shape,
        dtype=TORCH_TO_JNP[dtype],
    )
    assert got.shape == shape and got.dtype == TORCH_TO_JNP[dtype]
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), expected)


@pytest.mark.parametrize("shape", [(24, 64), (5, 256), (4, 128)])
def test_decode_matches_native_decoder_where_it_is_right(shape):
    """Where ``in`` is a multiple of the block size bnb's native CPU decoder is right."""
    w = random_weight(shape, 4)
    packed, state = bnb_quantize(w)
    native = F.dequantize_4bit(packed, state).numpy()
    codes, absmax = quantize_jit(jnp.asarray(w.numpy()))
    np.testing.assert_array_equal(np.asarray(dequantize_jit(codes, absmax, shape=shape)), native)


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_matches_bitsandbytes(shape):
    w = random_weight(shape, 5)
    packed, state = bnb_quantize(w)
    expected = bnb_decode(packed, bnb_absmax(state), shape)
    codes, absmax = quantize_jit(jnp.asarray(w.numpy()))
    np.testing.assert_array_equal(np.asarray(dequantize_jit(codes, absmax, shape=shape)), expected)


def test_dequantize_checks_sizes():
    codes, absmax = quantize_jit(jnp.ones((4, 64)))
    with pytest.raises(ValueError, match="absmax"):
        dequantize_nf4(codes, absmax[:-1], (4, 64))
    with pytest.raises(ValueError, match="packed NF4 bytes"):
        dequantize_nf4(codes[:-1], absmax, (4, 64))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_nf4(codes.astype(jnp.int32), absmax, (4, 64))


# -------------------------------------------------------------- double quantization


def test_absmax_codec_exact_against_portable_kernel():
    """With an exactly representable mean, codes and scales equal bnb's portable kernel."""
    rng = np.random.default_rng(6)
    absmax = (rng.integers(1, 2**12, size=1024) / np.float32(2**10)).astype(np.float32)
    codes, scales, offset = quantize_absmax_jit(jnp.asarray(absmax))
    exact_mean = np.float32(np.mean(absmax.astype(np.float64)))
    assert np.float32(offset) == exact_mean
    assert torch.from_numpy(absmax).mean().numpy() == exact_mean
    ref_codes, ref_scales = bnb_portable_quantize_blockwise(torch.from_numpy(absmax - exact_mean))
    np.testing.assert_array_equal(np.asarray(codes), ref_codes.numpy())
    np.testing.assert_array_equal(np.asarray(scales), ref_scales.numpy())
    # Decoding equals bitsandbytes' decode (a separate multiply and add, no FMA).
    ref = F.dequantize_blockwise(ref_codes, absmax=ref_scales, blocksize=256) + torch.tensor(
        exact_mean
    )
    got = dequantize_absmax_jit(codes, scales, offset)
    np.testing.assert_array_equal(np.asarray(got), ref.numpy())


@pytest.mark.parametrize("shape", [(24, 64), (16, 200), (7, 33), (300, 1000)])
def test_double_quant_matches_bitsandbytes(shape):
    w = random_weight(shape, 7, 0.05)
    packed, state = bnb_quantize(w, nested=True)
    assert state.nested
    codes, absmax = quantize_jit(jnp.asarray(w.numpy()))
    np.testing.assert_array_equal(np.asarray(codes), packed.numpy().reshape(-1))
    q, scales, offset = quantize_absmax_jit(absmax)
    assert q.dtype == jnp.uint8 and q.shape == absmax.shape
    assert scales.shape == (-(-absmax.shape[0] // 256),) and offset.shape == ()

    # bnb's float32 mean sums in its own order; allow a few ulps.
    np.testing.assert_allclose(float(offset), float(state.offset), rtol=4e-7)
    np.testing.assert_allclose(np.asarray(scales), state.state2.absmax.numpy(), rtol=1e-6)

    ref = bnb_absmax(state).numpy()
    got, same = check_nested_absmax(q, scales, offset, state.absmax.numpy(), ref)

    # Decoded weights: equal where the absmax agrees, and consistent everywhere.
    expected = bnb_decode(packed, torch.from_numpy(ref), shape)
    out = np.asarray(dequantize_jit(codes, jnp.asarray(got), shape=shape))
    n = out.size
    close = per_element(same, n, 64).reshape(shape)
    np.testing.assert_allclose(out[close], expected[close], rtol=1e-6, atol=1e-12)
    values = np.abs(NF4_CODEBOOK[unpack(np.asarray(codes), n)]).reshape(shape)
    diff = per_element(np.abs(got - ref), n, 64).reshape(shape)
    assert np.all(np.abs(out - expected) <= values * diff * (1 + 1e-6) + 1e-6 * np.abs(expected))


def test_decode_bitsandbytes_double_quant_state_exactly():
    """bnb's own nested codes, scales and offset decode to bnb's absmaxes bit for bit."""
    w = random_weight((300, 1000), 8)
    packed, state = bnb_quantize(w, nested=True)
    got = dequantize_absmax_jit(
        jnp.asarray(state.absmax.numpy()),
        jnp.asarray(state.state2.absmax.numpy()),
        jnp.asarray(state.offset.numpy()),
    )
    np.testing.assert_array_equal(np.asarray(got), bnb_absmax(state).numpy())
    expected = bnb_decode(packed, bnb_absmax(state), (300, 1000))
    out = dequantize_jit(jnp.asarray(packed.numpy()), got, shape=(300, 1000))
    np.testing.assert_array_equal(np.asarray(out), expected)


# ---------------------------------------------------------------------- jit and vmap


def test_vmap_over_stacked_layers():
    stack = jnp.asarray(random_weight((3, 16, 200), 9).numpy())
    codes, absmax = jax.jit(jax.vmap(quantize_nf4))(stack)
    assert codes.shape == (3, 1600) and absmax.shape == (3, 50)
    for layer in range(3):
        packed, state = bnb_quantize(torch.from_numpy(np.array(stack[layer])))
        np.testing.assert_array_equal(np.asarray(codes[layer]), packed.numpy().reshape(-1))
        np.testing.assert_array_equal(np.asarray(absmax[layer]), state.absmax.numpy())
    q, scales, offset = jax.jit(jax.vmap(quantize_absmax))(absmax)
    assert q.shape == (3, 50) and scales.shape == (3, 1) and offset.shape == (3,)
    decoded_absmax = jax.jit(jax.vmap(dequantize_absmax))(q, scales, offset)

    @jax.jit
    def step(codes, absmax):
        return jax.vmap(lambda c, a: dequantize_nf4(c, a, (16, 200), dtype=jnp.bfloat16))(
            codes, absmax
        )

    out = step(codes, decoded_absmax)
    assert out.shape == (3, 16, 200) and out.dtype == jnp.bfloat16
    for layer in range(3):
        single = dequantize_jit(
            codes[layer], decoded_absmax[layer], shape=(16, 200), dtype=jnp.bfloat16
        )
        np.testing.assert_array_equal(np.asarray(out[layer]), np.asarray(single))


# -------------------------------------------------------------------------- property

_finite = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_subnormal=False)


@settings(max_examples=30, deadline=None, database=None)
@given(
    hnp.arrays(np.float32, st.sampled_from([(2, 64), (3, 50), (1, 7)]), elements=_finite),
    st.sampled_from([32, 64]),
)
def test_error_within_half_the_widest_gap(w, block_size):
    codes, absmax = quantize_jit(jnp.asarray(w), block_size=block_size)
    out = np.asarray(dequantize_jit(codes, absmax, shape=w.shape, block_size=block_size))
    a = per_element(np.asarray(absmax), w.size, block_size).reshape(w.shape)
    bound = np.asarray(nf4_max_error(jnp.asarray(a)))
    slack = 4 * np.finfo(np.float32).eps * a
    assert np.all(np.abs(out - w) <= bound + slack)


# ------------------------------------------------------------------- reading files


def state_dict_of(prefix: str, w: torch.Tensor, nested: bool, **kw) -> dict[str, np.ndarray]:
    """What ``Linear4bit`` saves for ``prefix`` (``QuantState.as_dict(packed=True)``)."""
    packed, state = F.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=nested, **kw
    )
    out = {f"{prefix}.weight": packed.numpy()}
    for k, v in state.as_dict(packed=True).items():
        out[f"{prefix}.weight.{k}"] = v.numpy()
    return out


@pytest.mark.parametrize("nested", [False, True])
def test_read_quant_state_dict(nested):
    w = random_weight((16, 200), 10, dtype=torch.bfloat16)
    tensors = state_dict_of("layer", w, nested)
    record = read_bnb_4bit(tensors, "layer")
    assert record["shape"] == (16, 200) and record["dtype"] == "bfloat16"
    assert record["block_size"] == 64 and record["codes"].dtype == np.uint8
    assert record["nested_block_size"] == (256 if nested else None)
    assert ("absmax_codes" in record) == nested and ("absmax" in record) != nested
    np.testing.assert_array_equal(record["quant_map"], NF4_CODEBOOK)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
    expected = bnb_decode(packed, bnb_absmax(state), (16, 200), dtype=torch.bfloat16)
    out = dequantize_record(record)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), expected)
    np.testing.assert_array_equal(np.asarray(record_absmax(record)), bnb_absmax(state).numpy())


def test_read_non_uint8_storage():
    w = random_weight((8, 64), 11)
    tensors = state_dict_of("m", w, False, quant_storage=torch.float32)
    assert tensors["m.weight"].dtype == np.float32
    record = read_bnb_4bit(tensors, "m")
    packed, _ = F.quantize_4bit(w, quant_type="nf4")
    np.testing.assert_array_equal(record["codes"], packed.numpy().reshape(-1))


def _mutate_state(tensors, prefix, **changes):
    key = f"{prefix}.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(tensors[key].tobytes())
    state.update(changes)
    out = dict(tensors)
    out[key] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    return out


@pytest.mark.parametrize("nested", [False, True])
def test_read_refuses_bad_input(nested):
    p = "model.layers.0.mlp.down_proj"
    good = state_dict_of(p, random_weight((16, 200), 12), nested)
    read_bnb_4bit(good, p)

    def refuses(tensors, *needles):
        with pytest.raises(ValueError) as info:
            read_bnb_4bit(tensors, p)
        message = str(info.value)
        assert p in message
        for needle in needles:
            assert needle in message, message

    for name in ["weight", "weight.absmax", "weight.quant_map"]:
        bad = dict(good)
        del bad[f"{p}.{name}"]
        refuses(bad, "missing key", f"{p}.{name}")
    bad = dict(good)
    del bad[f"{p}.weight.quant_state.bitsandbytes__nf4"]
    refuses(bad, "missing key", "quant_state.bitsandbytes__nf4")
    refuses(_mutate_state(good, p, quant_type="fp4"), "quant_type", "'nf4'", "'fp4'")
    bad = dict(good)
    bad[f"{p}.weight.quant_state.bitsandbytes__fp4"] = bad.pop(
        f"{p}.weight.quant_state.bitsandbytes__nf4"
    )
    refuses(bad, "bitsandbytes__fp4", "'nf4'")
    bad = dict(good)
    bad[f"{p}.weight.quant_map"] = F.get_4bit_type("fp4", device="cpu").numpy()
    refuses(bad, "quant_map", "NF4 codebook")
    refuses(_mutate_state(good, p, shape=[16, 201]), f"{p}.weight", "1608 bytes", "(1600, 1)")
    refuses(_mutate_state(good, p, shape="16x200"), "shape", "positive integers")
    refuses(_mutate_state(good, p, blocksize=0), "blocksize", "positive integer")
    refuses(_mutate_state(good, p, dtype="int8"), "dtype", "int8")
    bad = dict(good)
    bad[f"{p}.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(b"{not json", np.uint8)
    refuses(bad, "JSON")
    bad = dict(good)
    bad[f"{p}.weight.absmax"] = good[f"{p}.weight.absmax"][:-1]
    refuses(bad, f"{p}.weight.absmax", "49")
    if nested:
        bad = dict(good)
        del bad[f"{p}.weight.nested_absmax"]
        refuses(bad, "missing key", f"{p}.weight.nested_absmax")
        refuses(_mutate_state(good, p, nested_offset="x"), "nested_offset", "finite number")
        bad = dict(good)
        bad[f"{p}.weight.nested_quant_map"] = np.linspace(-1, 1, 256, dtype=np.float32)
        refuses(bad, "nested_quant_map", "dynamic 8-bit map")


# ------------------------------------------------- a checkpoint transformers wrote


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,  # down_proj is (64, 96): ``in`` not a multiple of 64
        num_hidden_layers=1,
        vocab_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    base_dir = tmp_path_factory.mktemp("llama_base")
    transformers.LlamaForCausalLM(config).save_pretrained(base_dir)
    base = load_file(str(base_dir / "model.safetensors"))
    out = {}
    for nested in (False, True):
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=nested
        )
        model = transformers.LlamaForCausalLM.from_pretrained(
            base_dir, quantization_config=quant, device_map="cpu"
        )
        q_dir = tmp_path_factory.mktemp(f"llama_nf4_dq{int(nested)}")
        model.save_pretrained(q_dir)
        out[nested] = (model, load_file(str(q_dir / "model.safetensors")))
    return base, out


@pytest.mark.parametrize("nested", [False, True])
def test_read_transformers_checkpoint(llama_dirs, nested):
    base, models = llama_dirs
    model, tensors = models[nested]
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    assert len(linears) == 7, sorted(linears)
    for name, module in linears.items():
        record = read_bnb_4bit(tensors, name)
        out_f, in_f = module.out_features, module.in_features
        assert record["shape"] == (out_f, in_f)
        assert tensors[f"{name}.weight"].shape == ((out_f * in_f + 1) // 2, 1)
        assert record["nested_block_size"] == (256 if nested else None)

        # jlora's decode of the file == bitsandbytes' decode of the loaded module.
        state = module.weight.quant_state
        dtype = state.dtype
        assert record["dtype"] == str(dtype).removeprefix("torch.")
        expected = bnb_decode(module.weight.data, bnb_absmax(state), state.shape, dtype=dtype)
        got = dequantize_record(record)
        assert got.dtype == TORCH_TO_JNP[dtype]
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), expected, err_msg=name)

        # jlora quantizes the original weight (cast to the load dtype) to the same codes.
        w = jnp.asarray(base[f"{name}.weight"]).astype(TORCH_TO_JNP[dtype])
        codes, absmax = quantize_jit(w)
        np.testing.assert_array_equal(np.asarray(codes), record["codes"], err_msg=name)
        if not nested:
            np.testing.assert_array_equal(np.asarray(absmax), record["absmax"], err_msg=name)
        else:
            q, scales, offset = quantize_absmax_jit(absmax)
            np.testing.assert_allclose(float(offset), record["absmax_offset"], rtol=4e-7)
            ref = np.asarray(record_absmax(record))
            np.testing.assert_array_equal(ref, bnb_absmax(state).numpy())
            check_nested_absmax(q, scales, offset, record["absmax_codes"], ref)
