"""A compact Llama-family decoder in Flax Linen, and Hugging Face safetensors loading.

Layers run under ``nn.scan`` + ``nn.remat`` (one compiled layer, weights stacked on a
leading layer axis). Attention and MLP kernels keep their natural axes, so the
sharding rules below can split heads and features over mesh axes::

    embed/embedding        (vocab, d)             model.embed_tokens.weight
    layers/q/kernel        (L, d, heads, hd)      model.layers.{i}.self_attn.q_proj.weight
    layers/k/kernel        (L, d, kv_heads, hd)   ... k_proj.weight
    layers/v/kernel        (L, d, kv_heads, hd)   ... v_proj.weight
    layers/o/kernel        (L, heads, hd, d)      ... o_proj.weight
    layers/gate/kernel     (L, d, ffn)            model.layers.{i}.mlp.gate_proj.weight
    layers/up/kernel       (L, d, ffn)            ... up_proj.weight
    layers/down/kernel     (L, ffn, d)            ... down_proj.weight
    layers/attn_norm/scale (L, d)                 model.layers.{i}.input_layernorm.weight
    layers/mlp_norm/scale  (L, d)                 ... post_attention_layernorm.weight
    final_norm/scale       (d,)                   model.norm.weight
    lm_head/kernel         (d, vocab)             lm_head.weight (absent when tied)

Hugging Face stores ``nn.Linear`` weights as ``(out, in)``; they are transposed and
split into heads on load. RoPE uses Hugging Face's rotate-half convention (and its
"llama3" frequency scaling), so checkpoints load without permuting q and k.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

P = PartitionSpec


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The Hugging Face ``LlamaConfig`` fields this model uses."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF's dict, as sorted items
    tie_word_embeddings: bool = False

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face ``config.json`` dict (unknown keys ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields and v is not None}
        if isinstance(kwargs.get("rope_scaling"), dict):
            kwargs["rope_scaling"] = tuple(sorted(kwargs["rope_scaling"].items()))
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get(
                "num_attention_heads", cls.num_attention_heads
            )
        return cls(**kwargs)

    def matmul_params(self) -> int:
        """Weights used in matmuls per token (all but the embedding lookup)."""
        d, hd = self.hidden_size, self.dim_per_head
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * d * self.intermediate_size
        return self.num_hidden_layers * (attn + mlp) + d * self.vocab_size

    def params(self) -> int:
        """All base parameters."""
        untied = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        return self.matmul_params() - self.hidden_size * self.vocab_size + embed + untied + norms


PRESETS = {
    # Random-weight configs for runs without a checkpoint (dims of public models).
    "tiny": LlamaConfig(),
    "llama-3.2-1b": LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
    "llama-3-70b": LlamaConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
}


# -- the model -------------------------------------------------------------------------


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies of RoPE, with Hugging Face's "llama3" scaling if configured."""
    hd = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    scaling = dict(config.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq.astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_context / low) & (wavelen >= old_context / high)
    scaled = np.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return scaled.astype(np.float32)


def apply_rope(x_BxSxHxD: jax.Array, positions_S: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    angles_SxD2 = positions_S.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    angles_SxD = jnp.concatenate([angles_SxD2, angles_SxD2], axis=-1)
    cos, sin = jnp.cos(angles_SxD)[:, None, :], jnp.sin(angles_SxD)[:, None, :]
    x = x_BxSxHxD.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxSxHxD.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class Block(nn.Module):
    config: LlamaConfig
    dtype: Any
    param_dtype: Any
    constrain: Callable[[jax.Array], jax.Array]

    @nn.compact
    def __call__(self, x_BxSxD, positions_S):
        cfg = self.config
        heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        inv_freq = rope_frequencies(cfg)

        h = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="attn_norm")(x_BxSxD)
        q = nn.DenseGeneral((heads, hd), name="q", **dense)(h)
        k = nn.DenseGeneral((kv_heads, hd), name="k", **dense)(h)
        v = nn.DenseGeneral((kv_heads, hd), name="v", **dense)(h)
        q, k = apply_rope(q, positions_S, inv_freq), apply_rope(k, positions_S, inv_freq)
        q_BxSxKxGxD = q.reshape(*q.shape[:2], kv_heads, heads // kv_heads, hd)
        logits = jnp.einsum("bskgd,btkd->bkgst", q_BxSxKxGxD, k).astype(jnp.float32)
        logits = logits / np.float32(math.sqrt(hd))
        length = x_BxSxD.shape[1]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        logits = jnp.where(causal, logits, np.float32(-1e30))
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        attn = jnp.einsum("bkgst,btkd->bskgd", weights, v).reshape(q.shape)
        attn = self.constrain(attn)
        x_BxSxD = x_BxSxD + nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), name="o", **dense)(attn)
        x_BxSxD = self.constrain(x_BxSxD)

        h = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="mlp_norm")(x_BxSxD)
        gate = nn.Dense(cfg.intermediate_size, name="gate", **dense)(h)
        up = nn.Dense(cfg.intermediate_size, name="up", **dense)(h)
        hidden = self.constrain(nn.silu(gate) * up)
        x_BxSxD = x_BxSxD + nn.Dense(cfg.hidden_size, name="down", **dense)(hidden)
        return self.constrain(x_BxSxD), None


class Llama(nn.Module):
    """Llama-family causal LM: ``apply(params, tokens_BxS) -> logits_BxSxV`` (float32).

    ``mesh`` and ``batch_axes`` keep activations split over the batch mesh axes
    (FSDP gathers weights, not activations); without a mesh nothing is constrained.
    """

    config: LlamaConfig
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16
    mesh: Any = None
    batch_axes: tuple[str, ...] = ("data", "fsdp")
    remat_policy: str = "nothing_saveable"

    def constrain(self, x: jax.Array) -> jax.Array:
        if self.mesh is None:
            return x
        spec = P(self.batch_axes, *[P.UNCONSTRAINED] * (x.ndim - 1))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    @nn.compact
    def __call__(self, tokens_BxS):
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embed",
        )
        x_BxSxD = self.constrain(embed(tokens_BxS))
        positions_S = jnp.arange(tokens_BxS.shape[1])
        policy = getattr(jax.checkpoint_policies, self.remat_policy)
        layers = nn.scan(
            nn.remat(Block, prevent_cse=False, policy=policy),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=cfg.num_hidden_layers,
        )(cfg, self.dtype, self.param_dtype, self.constrain, name="layers")
        x_BxSxD, _ = layers(x_BxSxD, positions_S)
        x_BxSxD = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="final_norm")(
            x_BxSxD
        )
        if cfg.tie_word_embeddings:
            logits = embed.attend(x_BxSxD)
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="lm_head",
            )(x_BxSxD)
        return self.constrain(logits.astype(jnp.float32))


# -- sharding rules --------------------------------------------------------------------

RULES = {
    # Rows over every model axis: a lookup from a table split on d would have to move
    # the looked-up rows from d-split to batch-split, which XLA does by replicating.
    "embed/embedding": P(("tensor", "fsdp"), None),
    "layers/q/kernel": P(None, "fsdp", "tensor", None),
    "layers/k/kernel": P(None, "fsdp", "tensor", None),
    "layers/v/kernel": P(None, "fsdp", "tensor", None),
    "layers/o/kernel": P(None, "tensor", None, "fsdp"),
    "layers/gate/kernel": P(None, "fsdp", "tensor"),
    "layers/up/kernel": P(None, "fsdp", "tensor"),
    "layers/down/kernel": P(None, "tensor", "fsdp"),
    "lm_head/kernel": P("fsdp", "tensor"),
}


def partition_spec(path: str, shape: tuple[int, ...], mesh_shape: dict[str, int]) -> P:
    """FSDP over "fsdp", Megatron tensor parallelism over "tensor"; norms replicated.

    A mesh axis is dropped from a weight axis it does not divide (e.g. 8 KV heads on
    a tensor axis of 16): that weight axis is then replicated over it.
    """
    rule = next((spec for suffix, spec in RULES.items() if path.endswith(suffix)), P())
    entries = []
    for dim, entry in zip(shape, tuple(rule) + (None,) * (len(shape) - len(rule))):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept, ways = [], 1
        for name in names:
            size = mesh_shape.get(name, 1)
            if size > 1 and dim % (ways * size) == 0:
                kept.append(name)
                ways *= size
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*entries)


def param_shardings(abstract_params: Any, mesh: jax.sharding.Mesh) -> Any:
    """A ``NamedSharding`` for every parameter, by :func:`partition_spec`."""
    mesh_shape = dict(mesh.shape)

    def one(key_path, leaf):
        path = "/".join(str(getattr(k, "key", k)) for k in key_path)
        return NamedSharding(mesh, partition_spec(path, leaf.shape, mesh_shape))

    return jax.tree_util.tree_map_with_path(one, abstract_params)


# -- Hugging Face safetensors ----------------------------------------------------------

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
}


def _local_copy(directory: str, cache_dir: str) -> str:
    """A ``gs://`` (or other remote) directory copied once to local disk; local as is."""
    source = epath.Path(directory)
    if "://" not in directory:
        return directory
    target = epath.Path(cache_dir) / source.name
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name.endswith((".safetensors", ".json")) and not (target / item.name).exists():
            partial = target / (item.name + ".partial")
            item.copy(partial, overwrite=True)
            partial.rename(target / item.name)
    return os.fspath(target)


class SafetensorsDir:
    """Tensors of every ``*.safetensors`` file in a directory, memory-mapped as numpy."""

    def __init__(self, directory: str):
        self.locations: dict[str, tuple[str, dict[str, Any], int]] = {}
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"expected *.safetensors files in {directory!r}; found none")
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            header.pop("__metadata__", None)
            for tensor, info in header.items():
                self.locations[tensor] = (path, info, 8 + length)

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def get(self, name: str) -> np.ndarray:
        if name not in self.locations:
            raise KeyError(f"tensor {name!r} not found in the safetensors files")
        path, info, offset = self.locations[name]
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset + start, shape=end - start)
        return data.view(dtype).reshape(info["shape"])


def hf_tensor(tensors: SafetensorsDir, path: str, layer: int | None, cfg: LlamaConfig):
    """Our parameter ``path`` (one layer of it for stacked ones) from the HF tensors."""
    d, hd = cfg.hidden_size, cfg.dim_per_head
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    prefix = f"model.layers.{layer}."
    linear = {
        "layers/q/kernel": ("self_attn.q_proj.weight", (d, heads, hd)),
        "layers/k/kernel": ("self_attn.k_proj.weight", (d, kv_heads, hd)),
        "layers/v/kernel": ("self_attn.v_proj.weight", (d, kv_heads, hd)),
        "layers/o/kernel": ("self_attn.o_proj.weight", (heads, hd, d)),
        "layers/gate/kernel": ("mlp.gate_proj.weight", None),
        "layers/up/kernel": ("mlp.up_proj.weight", None),
        "layers/down/kernel": ("mlp.down_proj.weight", None),
    }
    norms = {
        "layers/attn_norm/scale": "input_layernorm.weight",
        "layers/mlp_norm/scale": "post_attention_layernorm.weight",
    }
    for suffix, (name, shape) in linear.items():
        if path.endswith(suffix):
            weight = np.asarray(tensors.get(prefix + name)).T  # (out, in) -> (in, out)
            return weight.reshape(shape) if shape else weight
    for suffix, name in norms.items():
        if path.endswith(suffix):
            return np.asarray(tensors.get(prefix + name))
    if path.endswith("embed/embedding"):
        return np.asarray(tensors.get("model.embed_tokens.weight"))
    if path.endswith("final_norm/scale"):
        return np.asarray(tensors.get("model.norm.weight"))
    if path.endswith("lm_head/kernel"):
        return np.asarray(tensors.get("lm_head.weight")).T
    raise KeyError(f"no Hugging Face tensor for parameter {path!r}")


def load_hf(
    directory: str,
    abstract_params: Any,
    shardings: Any,
    cfg: LlamaConfig,
    *,
    cache_dir: str = "/tmp/jlora_weights",
) -> Any:
    """Sharded params from a Hugging Face safetensors directory (local or ``gs://``).

    Each host reads one parameter at a time (stacking the layers on host memory) and
    places only its own devices' shards: peak host memory is the largest stacked
    parameter, and no device ever holds more than its shards.
    """
    tensors = SafetensorsDir(_local_copy(directory, cache_dir))

    def one(key_path, leaf, sharding):
        path = "/".join(str(getattr(k, "key", k)) for k in key_path)
        if "/layers/" in f"/{path}":
            full = np.stack(
                [hf_tensor(tensors, path, i, cfg) for i in range(cfg.num_hidden_layers)]
            )
        else:
            full = hf_tensor(tensors, path, None, cfg)
        if full.shape != tuple(leaf.shape):
            raise ValueError(
                f"{path}: expected shape {tuple(leaf.shape)} from config.json; the "
                f"safetensors give {full.shape}"
            )
        full = full.astype(leaf.dtype)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: full[index])

    return jax.tree_util.tree_map_with_path(one, abstract_params, shardings)


def read_config(directory: str) -> LlamaConfig:
    """``config.json`` of a Hugging Face model directory (local or ``gs://``)."""
    return LlamaConfig.from_hf(json.loads((epath.Path(directory) / "config.json").read_text()))
