"""NF4 4-bit weights in pure JAX, bit-compatible with bitsandbytes.

The codecs here reproduce what ``bitsandbytes.functional.quantize_4bit(...,
quant_type="nf4")`` stores, so weights quantized by jlora and weights read from a
bitsandbytes / Hugging Face 4-bit checkpoint are interchangeable:

* A weight in torch layout ``(out, in)`` is flattened row-major and cut into blocks of
  ``block_size`` consecutive values (the blocks run along ``in`` and, when ``in`` is not
  a multiple of the block size, straddle rows; the last block may be partial).
* Each block keeps its absolute maximum (float32). Values are scaled into ``[-1, 1]``
  (full blocks by multiplying with the float32 reciprocal of the absmax, the partial
  last block by dividing by it, as bitsandbytes does) and mapped to the nearest entry
  of :data:`NF4_CODEBOOK`; a value exactly half-way between two entries takes the lower.
* Two 4-bit codes go in a byte, the first in the high nibble; an odd count is padded
  with the code of 0.0.
* Double quantization ("compressed statistics") stores the absmaxes themselves in 8
  bits: their mean is subtracted and the rest is quantized in blocks of 256 with the
  signed dynamic map of :func:`dynamic_map_signed`.

Every codec is a pure ``jax.numpy`` function of static shapes, so it can be jitted
(shape, block size and dtype arguments static) and vmapped over a leading axis, e.g.
stacked layers. :func:`read_bnb_4bit` reads the safetensors layout that transformers
writes for a bitsandbytes 4-bit model, without dequantizing anything on the host.

Two compiler behaviours are worked around to stay bit-exact: XLA rewrites a division by
a broadcast value into a multiplication by its reciprocal (so the partial block's
quotient is computed with integer arithmetic), and it contracts a multiply followed by
an add into one fused multiply-add (kept apart when decoding double-quantized absmaxes).
XLA on CPU also flushes subnormal floats to zero, so a block whose absmax is subnormal
(below about 1.2e-38) quantizes as all zeros here, while bitsandbytes may still resolve
it. Weights with NaN or infinite values are not supported.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._types import is_int, is_real

__all__ = [
    "NF4_CODEBOOK",
    "dequantize_absmax",
    "dequantize_nf4",
    "dequantize_record",
    "dynamic_map_signed",
    "nf4_max_error",
    "quantize_absmax",
    "quantize_nf4",
    "read_bnb_4bit",
    "record_absmax",
]

#: The 16 NormalFloat4 levels, in code order (code ``i`` decodes to ``NF4_CODEBOOK[i]``).
NF4_CODEBOOK: np.ndarray = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_CODEBOOK.flags.writeable = False

# Decision boundaries: float32 midpoints of neighbouring levels, rounded in float32.
_NF4_BOUNDS: np.ndarray = ((NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / np.float32(2)).astype(
    np.float32
)
_NF4_ZERO_CODE = 7  # the code of 0.0, used for the padding nibble
_NF4_HALF_GAP = float(np.max(np.diff(NF4_CODEBOOK.astype(np.float64)))) / 2.0

# bitsandbytes clamps absmax to this before scaling; only an all-zero block reaches it.
_ABSMAX_FLOOR = 1e-38


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    torch steps in float32 from ``start`` for the first half and back from ``end`` for
    the second, each point being one fused multiply-add. The float64 expression below
    is exact before its single rounding, so it equals that fused multiply-add.
    """
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    up = np.float64(s) + step * i
    down = np.float64(e) - step * (steps - 1 - i)
    return np.where(np.arange(steps) < steps // 2, up, down).astype(np.float32)


@functools.cache
def _dynamic_map_signed() -> np.ndarray:
    levels: list[np.ndarray] = []
    max_exponent_bits = 7
    for i in range(max_exponent_bits):
        edges = _torch_linspace_f32(0.1, 1.0, 2**i + 1)
        means = ((edges[:-1] + edges[1:]) / np.float32(2)).astype(np.float32)
        decade = np.float32(10.0 ** (i - (max_exponent_bits - 1)))
        scaled = (decade * means).astype(np.float32)
        levels += [scaled, -scaled]
    levels.append(np.array([0.0, 1.0], dtype=np.float32))
    table = np.sort(np.concatenate(levels)).astype(np.float32)
    assert table.shape == (256,)
    table.flags.writeable = False
    return table


def dynamic_map_signed() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map, ``create_dynamic_map(signed=True)``.

    Seven decades of levels (``1e-6`` to ``1``) with ``2**i`` linearly spaced levels in
    decade ``i`` and their negatives, plus ``0`` and ``1``: 256 sorted float32 values,
    equal bit for bit to the table bitsandbytes builds. Computed once and cached.

    Returns:
      A read-only float32 array of shape ``(256,)``.
    """
    return _dynamic_map_signed()


@functools.cache
def _dynamic_bounds() -> np.ndarray:
    table = _dynamic_map_signed()
    bounds = ((table[:-1] + table[1:]) / np.float32(2)).astype(np.float32)
    bounds.flags.writeable = False
    return bounds


def _num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _check_block_size(block_size: int, name: str = "block_size") -> None:
    if not is_int(block_size):
        raise TypeError(f"{name} must be a Python int, got {type(block_size).__name__}")
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"{name} must be a positive even number, got {block_size}")


def _divide_rn(x: jax.Array, a: jax.Array) -> jax.Array:
    """``x / a`` in float32, correctly rounded (round to nearest even), by integer arithmetic.

    XLA does not guarantee IEEE division: its algebraic simplifier rewrites a division by
    a broadcast value into a multiplication by the reciprocal (seen on CPU, jax 0.10), and
    accelerators may divide approximately. bitsandbytes' codes depend on the last bit of
    the quotient, so the significands are divided here bit by bit. ``a`` must be
    positive and normal; ``x`` zero or subnormal, and quotients below the normal range,
    give a signed zero (XLA flushes those anyway).
    """
    x = jnp.asarray(x, jnp.float32)
    a = jnp.asarray(a, jnp.float32)
    x, a = jnp.broadcast_arrays(x, a)
    bx = jax.lax.bitcast_convert_type(x, jnp.uint32)
    ba = jax.lax.bitcast_convert_type(a, jnp.uint32)
    sign = (bx ^ ba) & jnp.uint32(0x80000000)
    ex = ((bx >> jnp.uint32(23)) & jnp.uint32(0xFF)).astype(jnp.int32)
    ea = ((ba >> jnp.uint32(23)) & jnp.uint32(0xFF)).astype(jnp.int32)
    hidden = jnp.uint32(0x800000)
    mx = (bx & jnp.uint32(0x7FFFFF)) | hidden
    ma = (ba & jnp.uint32(0x7FFFFF)) | hidden
    # Scale the remainder so that the quotient's leading bit comes first: r / ma in [1, 2).
    below = mx < ma
    r = jnp.where(below, mx << jnp.uint32(1), mx)
    exponent = ex - ea - below.astype(jnp.int32)
    q = jnp.zeros_like(r)
    for _ in range(25):  # 24 significand bits and one rounding bit
        bit = r >= ma
        r = jnp.where(bit, r - ma, r) << jnp.uint32(1)
        q = (q << jnp.uint32(1)) | bit.astype(jnp.uint32)
    mant = q >> jnp.uint32(1)
    round_up = ((q & jnp.uint32(1)) == 1) & ((r != 0) | ((mant & jnp.uint32(1)) == 1))
    mant = mant + round_up.astype(jnp.uint32)
    carry = mant >> jnp.uint32(24)  # rounding up 0xFFFFFF carries into the exponent
    mant = mant >> carry
    biased = exponent + carry.astype(jnp.int32) + 127
    underflow = (biased <= 0) | (ex == 0)
    overflow = biased >= 255
    fields = (jnp.clip(biased, 0, 255).astype(jnp.uint32) << jnp.uint32(23)) | (
        mant & jnp.uint32(0x7FFFFF)
    )
    fields = jnp.where(overflow, jnp.uint32(0x7F800000), fields)
    fields = jnp.where(underflow, jnp.uint32(0), fields)
    return jax.lax.bitcast_convert_type(sign | fields, jnp.float32)


def _blockwise_scale(x: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-block absmax of flat float32 ``x`` and ``x`` scaled into ``[-1, 1]``.

    Returns ``(scaled, absmax)`` with ``scaled`` of shape ``(blocks, block_size)``
    (the tail of the last block zero-padded) and ``absmax`` of shape ``(blocks,)``.
    """
    n = x.shape[0]
    blocks = _num_blocks(n, block_size)
    pad = blocks * block_size - n
    xb = jnp.pad(x, (0, pad)).reshape(blocks, block_size)
    absmax = jnp.max(jnp.abs(xb), axis=1)
    # bitsandbytes clamps absmax at 1e-38; here that only matters for an all-zero block
    # (XLA flushes subnormals), where any positive divisor gives the same zero scale.
    safe = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))
    scaled = xb * _divide_rn(jnp.float32(1.0), safe)[:, None]
    if pad:
        # The partial last block is divided by its absmax instead; the quotient can
        # differ from the product with the reciprocal in the last bit.
        scaled = scaled.at[-1].set(_divide_rn(xb[-1], safe[-1]))
    return jnp.clip(scaled, jnp.float32(-1.0), jnp.float32(1.0)), absmax


def quantize_nf4(w_OxI: jax.Array, block_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """Quantize a weight to packed NF4 codes and per-block absmaxes, as bitsandbytes does.

    Equal bit for bit to ``bitsandbytes.functional.quantize_4bit(w, blocksize=block_size,
    quant_type="nf4", compress_statistics=False)`` (but see the module notes on subnormal
    values): bfloat16 and float16 inputs are widened to float32 first, as bitsandbytes
    does.

    Args:
      w_OxI: the weight in torch layout ``(out, in)`` (any shape works; it is flattened
        row-major). float32, bfloat16 or float16.
      block_size: values per absmax block (static).

    Returns:
      ``(codes, absmax)``: ``codes`` is uint8 of shape ``(ceil(n / 2),)`` with the first
      code of each pair in the high nibble; ``absmax`` is float32 of shape
      ``(ceil(n / block_size),)``.
    """
    _check_block_size(block_size)
    w = jnp.asarray(w_OxI)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"quantize_nf4 needs a floating-point weight, got {w.dtype}")
    x = w.reshape(-1).astype(jnp.float32)
    n = x.shape[0]
    if n == 0:
        raise ValueError("quantize_nf4 needs a non-empty weight")
    scaled, absmax = _blockwise_scale(x, block_size)
    # Nearest level with ties to the lower code: count the boundaries strictly below.
    flat = scaled.reshape(-1)[: n + (n % 2)]  # the padding value is 0.0 -> the zero code
    codes = jnp.zeros(flat.shape, jnp.uint8)
    for bound in _NF4_BOUNDS:
        codes = codes + (flat > jnp.float32(bound)).astype(jnp.uint8)
    pairs = codes.reshape(-1, 2)
    packed = jnp.left_shift(pairs[:, 0], jnp.uint8(4)) | pairs[:, 1]
    return packed, absmax


def _unpack_nf4(codes: jax.Array, n: int) -> jax.Array:
    flat = jnp.asarray(codes).reshape(-1)
    if flat.dtype != jnp.uint8:
        raise TypeError(f"NF4 codes must be uint8, got {flat.dtype}")
    if flat.shape[0] != (n + 1) // 2:
        raise ValueError(f"{n} values need {(n + 1) // 2} packed NF4 bytes, got {flat.shape[0]}")
    high = jnp.right_shift(flat, jnp.uint8(4))
    low = flat & jnp.uint8(0x0F)
    return jnp.stack([high, low], axis=-1).reshape(-1)[:n]


def dequantize_nf4(
    codes: jax.Array,
    absmax: jax.Array,
    shape: Sequence[int],
    block_size: int = 64,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Decode packed NF4 codes back to a weight, as bitsandbytes' portable kernel does.

    Each value is ``NF4_CODEBOOK[code] * absmax[block]`` computed in float32, then cast
    to ``dtype`` (round to nearest even), which equals ``bitsandbytes.functional.
    dequantize_4bit`` with its PyTorch (default-backend) kernel.

    Args:
      codes: uint8, ``ceil(n / 2)`` packed bytes (any shape; it is flattened, so the
        ``(ceil(n / 2), 1)`` tensor bitsandbytes stores works as it is).
      absmax: float32 per-block absmaxes, ``ceil(n / block_size)`` of them. Decode double
        quantized ones with :func:`dequantize_absmax` first.
      shape: the weight's shape, torch layout ``(out, in)`` (static).
      block_size: values per absmax block (static).
      dtype: the result's dtype (static).

    Returns:
      The weight, of ``shape`` and ``dtype``.
    """
    _check_block_size(block_size)
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    blocks = _num_blocks(n, block_size)
    scales = jnp.asarray(absmax).reshape(-1).astype(jnp.float32)
    if scales.shape[0] != blocks:
        raise ValueError(
            f"a weight of shape {shape} in blocks of {block_size} needs {blocks} absmax "
            f"values, got {scales.shape[0]}"
        )
    idx = _unpack_nf4(codes, n)
    values = jnp.asarray(NF4_CODEBOOK)[idx]
    values = jnp.pad(values, (0, blocks * block_size - n)).reshape(blocks, block_size)
    out = (values * scales[:, None]).reshape(-1)[:n]
    return out.reshape(shape).astype(dtype)


def quantize_absmax(
    absmax: jax.Array, block_size: int = 256
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Double-quantize NF4 absmaxes to 8 bits, as ``compress_statistics=True`` does.

    The offset is the mean of the absmaxes; ``absmax - offset`` is quantized in blocks of
    ``block_size`` with :func:`dynamic_map_signed`, each block scaled by its own float32
    absmax and mapped to the nearest level (ties to the lower), like bitsandbytes'
    portable ``quantize_blockwise``. Its native CPU kernel, which bitsandbytes uses on
    CPU, picks a neighbouring level for a small fraction of the values, and its float32
    mean may differ in the last bit, so compare the *decoded* absmaxes with it.

    Args:
      absmax: the per-block absmaxes from :func:`quantize_nf4` (any shape; flattened).
      block_size: values per 8-bit block (static); bitsandbytes uses 256.

    Returns:
      ``(codes, scales, offset)``: uint8 of shape ``(n,)``, float32 of shape
      ``(ceil(n / block_size),)`` and a float32 scalar.
    """
    _check_block_size(block_size)
    a = jnp.asarray(absmax).reshape(-1).astype(jnp.float32)
    n = a.shape[0]
    if n == 0:
        raise ValueError("quantize_absmax needs at least one absmax value")
    offset = jnp.mean(a)
    scaled, scales = _blockwise_scale(a - offset, block_size)
    bounds = jnp.asarray(_dynamic_bounds())
    codes = jnp.searchsorted(bounds, scaled.reshape(-1)[:n], side="left")
    return codes.astype(jnp.uint8), scales, offset


def dequantize_absmax(
    codes: jax.Array,
    scales: jax.Array,
    offset: jax.Array | float,
    block_size: int = 256,
    code: jax.Array | np.ndarray | None = None,
) -> jax.Array:
    """Decode double-quantized absmaxes: ``code[codes] * scales[block] + offset``.

    Args:
      codes: uint8 8-bit codes, one per NF4 block (any shape; flattened).
      scales: float32 absmax of each ``block_size`` block of codes (bitsandbytes'
        ``nested_absmax``).
      offset: the float32 mean that was subtracted (``nested_offset``).
      block_size: codes per block (static; ``nested_blocksize``).
      code: the 256-level table; defaults to :func:`dynamic_map_signed`.

    Returns:
      float32 absmaxes of shape ``(n,)``.
    """
    _check_block_size(block_size)
    q = jnp.asarray(codes).reshape(-1)
    if q.dtype != jnp.uint8:
        raise TypeError(f"absmax codes must be uint8, got {q.dtype}")
    n = q.shape[0]
    blocks = _num_blocks(n, block_size)
    s = jnp.asarray(scales).reshape(-1).astype(jnp.float32)
    if s.shape[0] != blocks:
        raise ValueError(
            f"{n} absmax codes in blocks of {block_size} need {blocks} scales, got {s.shape[0]}"
        )
    table = jnp.asarray(dynamic_map_signed() if code is None else code).astype(jnp.float32)
    if table.shape != (256,):
        raise ValueError(f"the 8-bit code table must have shape (256,), got {table.shape}")
    values = jnp.pad(table[q], (0, blocks * block_size - n)).reshape(blocks, block_size)
    product = (values * s[:, None]).reshape(-1)[:n]
    # bitsandbytes rounds the product before adding the offset. XLA would contract the
    # two into a fused multiply-add (one rounding); the select keeps them apart.
    product = jnp.where(jnp.isnan(product), jnp.float32(jnp.nan), product)
    return product + jnp.asarray(offset).astype(jnp.float32)


def nf4_max_error(absmax_per_element: jax.Array) -> jax.Array:
    """The largest NF4 rounding error for values scaled by ``absmax_per_element``.

    Half the widest gap between neighbouring :data:`NF4_CODEBOOK` levels, times the
    block's absmax: ``|dequantize(quantize(w)) - w|`` stays within it (up to float32
    rounding of the scaling), which makes it the bound for property tests.

    Args:
      absmax_per_element: each value's block absmax, broadcast to the values' shape.

    Returns:
      float32 bounds of the same shape.
    """
    a = jnp.asarray(absmax_per_element).astype(jnp.float32)
    return jnp.float32(_NF4_HALF_GAP) * a


# ----------------------------------------------------------------------------- reading

_QUANT_STATE_SUFFIX = "quant_state.bitsandbytes__"
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _need(tensors: Mapping[str, np.ndarray], prefix: str, name: str) -> np.ndarray:
    key = f"{prefix}.{name}"
    if key not in tensors:
        near = sorted(k for k in tensors if k.startswith(f"{prefix}."))
        raise ValueError(
            f"bitsandbytes 4-bit weight {prefix!r}: missing key {key!r}; "
            f"found {near if near else 'no keys under this prefix'}"
        )
    return np.asarray(tensors[key])


def _bad(prefix: str, key: str, expected: str, found: Any) -> ValueError:
    return ValueError(
        f"bitsandbytes 4-bit weight {prefix!r}: {key!r} should be {expected}, found {found}"
    )


def _json_state(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, Any]:
    stem = f"{prefix}.weight.{_QUANT_STATE_SUFFIX}"
    found = sorted(k for k in tensors if k.startswith(stem))
    if not found:
        near = sorted(k for k in tensors if k.startswith(f"{prefix}."))
        raise ValueError(
            f"bitsandbytes 4-bit weight {prefix!r}: missing key {stem + 'nf4'!r}; "
            f"found {near if near else 'no keys under this prefix'}"
        )
    if found != [stem + "nf4"]:
        kinds = [k[len(stem) :] for k in found]
        raise _bad(prefix, found[0], "the quant state of quant_type 'nf4'", f"types {kinds}")
    key = found[0]
    raw = np.asarray(tensors[key])
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _bad(prefix, key, "a 1-D uint8 tensor of JSON", f"{raw.dtype} {raw.shape}")
    try:
        state = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(prefix, key, "UTF-8 JSON", f"undecodable bytes ({err})") from None
    if not isinstance(state, dict):
        raise _bad(prefix, key, "a JSON object", type(state).__name__)
    return state


def _int_field(state: Mapping[str, Any], prefix: str, key: str, field: str) -> int:
    value = state.get(field)
    if not is_int(value) or value <= 0:
        raise _bad(prefix, f"{key}[{field!r}]", "a positive integer", repr(value))
    return value


def read_bnb_4bit(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, Any]:
    """Read one bitsandbytes NF4 weight from a Hugging Face 4-bit state dict.

    transformers saves a ``Linear4bit`` at module ``prefix`` as ``prefix.weight``
    (uint8 of shape ``(ceil(n / 2), 1)``), ``prefix.weight.absmax``,
    ``prefix.weight.quant_map`` and ``prefix.weight.quant_state.bitsandbytes__nf4`` (a
    uint8 tensor holding JSON with ``quant_type``, ``blocksize``, ``dtype``, ``shape``);
    with double quantization ``absmax`` holds uint8 codes and the file adds
    ``prefix.weight.nested_absmax``, ``prefix.weight.nested_quant_map`` and the JSON
    fields ``nested_blocksize``, ``nested_dtype``, ``nested_offset``.

    Nothing is dequantized: pass the result to :func:`dequantize_record` (or
    :func:`record_absmax` and :func:`dequantize_nf4`) on device.

    Args:
      tensors: name to array, e.g. from ``safetensors.numpy.load_file``.
      prefix: the module's name, e.g. ``"model.layers.0.self_attn.q_proj"``.

    Returns:
      A dict with ``codes`` (uint8, flat), ``shape`` (``(out, in)``), ``dtype`` (the
      original weight's dtype name), ``block_size``, ``nested_block_size`` (``None``
      without double quantization), ``quant_map`` (float32 ``(16,)``) and either
      ``absmax`` (float32) or ``absmax_codes`` (uint8), ``absmax_scales`` (float32),
      ``absmax_offset`` (a float32 scalar array) and ``absmax_quant_map`` (float32
      ``(256,)``).

    Raises:
      ValueError: a key is missing, the quant type is not NF4, the quant map is not
        :data:`NF4_CODEBOOK`, the JSON is malformed or the pieces' shapes disagree;
        the message names the prefix, the key, and what was expected and found.
    """
    prefix = prefix.removesuffix(".weight")
    wkey = f"{prefix}.weight"
    skey = f"{wkey}.{_QUANT_STATE_SUFFIX}nf4"
    packed = _need(tensors, prefix, "weight")
    state = _json_state(tensors, prefix)

    quant_type = state.get("quant_type")
    if quant_type != "nf4":
        raise _bad(prefix, f"{skey}['quant_type']", "'nf4'", repr(quant_type))
    block_size = _int_field(state, prefix, skey, "blocksize")
    shape_field = state.get("shape")
    if (
        not isinstance(shape_field, list)
        or not shape_field
        or not all(is_int(d) and d > 0 for d in shape_field)
    ):
        raise _bad(prefix, f"{skey}['shape']", "a list of positive integers", repr(shape_field))
    shape = tuple(shape_field)
    dtype = state.get("dtype")
    if dtype not in _FLOAT_DTYPES:
        raise _bad(prefix, f"{skey}['dtype']", f"one of {list(_FLOAT_DTYPES)}", repr(dtype))

    n = math.prod(shape)
    codes = np.ascontiguousarray(packed).reshape(-1)
    if codes.dtype != np.uint8 and codes.dtype.kind in "fiuV":
        codes = codes.view(np.uint8)  # bnb_4bit_quant_storage other than uint8: same bytes
    if codes.dtype != np.uint8 or codes.size != (n + 1) // 2:
        raise _bad(
            prefix,
            wkey,
            f"{(n + 1) // 2} bytes of packed codes for shape {shape}",
            f"{packed.dtype} of shape {packed.shape}",
        )

    quant_map = _need(tensors, prefix, "weight.quant_map")
    if quant_map.shape != (16,) or not np.array_equal(quant_map.astype(np.float32), NF4_CODEBOOK):
        raise _bad(
            prefix, f"{wkey}.quant_map", "the 16-level NF4 codebook", f"{quant_map.tolist()}"
        )

    blocks = _num_blocks(n, block_size)
    absmax = _need(tensors, prefix, "weight.absmax")
    record: dict[str, Any] = {
        "codes": codes,
        "shape": shape,
        "dtype": dtype,
        "block_size": block_size,
        "quant_map": quant_map.astype(np.float32),
    }
    nested = (
        any(k in state for k in ("nested_blocksize", "nested_offset", "nested_dtype"))
        or f"{wkey}.nested_absmax" in tensors
    )
    if not nested:
        if absmax.dtype != np.float32 or absmax.size != blocks:
            raise _bad(
                prefix,
                f"{wkey}.absmax",
                f"float32 with {blocks} values",
                f"{absmax.dtype} of shape {absmax.shape}",
            )
        record["absmax"] = absmax.reshape(-1)
        record["nested_block_size"] = None
        return record

    nested_block_size = _int_field(state, prefix, skey, "nested_blocksize")
    offset = state.get("nested_offset")
    if not is_real(offset) or not np.isfinite(offset):
        raise _bad(prefix, f"{skey}['nested_offset']", "a finite number", repr(offset))
    nested_dtype = state.get("nested_dtype", "float32")
    if nested_dtype != "float32":
        raise _bad(prefix, f"{skey}['nested_dtype']", "'float32'", repr(nested_dtype))
    if absmax.dtype != np.uint8 or absmax.size != blocks:
        raise _bad(
            prefix,
            f"{wkey}.absmax",
            f"uint8 codes, {blocks} of them (double quantization)",
            f"{absmax.dtype} of shape {absmax.shape}",
        )
    scales = _need(tensors, prefix, "weight.nested_absmax")
    nested_blocks = _num_blocks(blocks, nested_block_size)
    if scales.dtype != np.float32 or scales.size != nested_blocks:
        raise _bad(
            prefix,
            f"{wkey}.nested_absmax",
            f"float32 with {nested_blocks} values",
            f"{scales.dtype} of shape {scales.shape}",
        )
    nested_map = _need(tensors, prefix, "weight.nested_quant_map")
    reference = dynamic_map_signed()
    if nested_map.shape != (256,) or not np.allclose(
        nested_map.astype(np.float32), reference, rtol=1e-6, atol=1e-9
    ):
        raise _bad(
            prefix,
            f"{wkey}.nested_quant_map",
            "bitsandbytes' signed dynamic 8-bit map",
            f"an array of shape {nested_map.shape} that differs from it",
        )
    record.update(
        absmax_codes=absmax.reshape(-1),
        absmax_scales=scales.reshape(-1),
        absmax_offset=np.float32(offset),
        absmax_quant_map=nested_map.astype(np.float32),
        nested_block_size=nested_block_size,
    )
    return record


def record_absmax(record: Mapping[str, Any]) -> jax.Array:
    """The float32 per-block absmaxes of a :func:`read_bnb_4bit` record, decoded in JAX."""
    if record.get("nested_block_size") is None:
        return jnp.asarray(record["absmax"], jnp.float32)
    return dequantize_absmax(
        jnp.asarray(record["absmax_codes"]),
        jnp.asarray(record["absmax_scales"]),
        jnp.asarray(record["absmax_offset"]),
        block_size=record["nested_block_size"],
        code=record.get("absmax_quant_map"),
    )


def dequantize_record(record: Mapping[str, Any], dtype: Any = None) -> jax.Array:
    """Decode a :func:`read_bnb_4bit` record to its ``(out, in)`` weight, in JAX.

    Args:
      record: what :func:`read_bnb_4bit` returned.
      dtype: the result's dtype; defaults to the checkpoint's original weight dtype.

    Returns:
      The weight, equal to bitsandbytes' own (portable-kernel) decode.
    """
    return dequantize_nf4(
        jnp.asarray(record["codes"]),
        record_absmax(record),
        record["shape"],
        block_size=record["block_size"],
        dtype=jnp.dtype(record["dtype"]) if dtype is None else dtype,
    )
