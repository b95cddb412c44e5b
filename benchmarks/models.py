"""The reference GPT-style decoder of the benchmarks, in Linen and in NNX.

One configuration (:class:`Config`) drives three builds of the same network:

* :class:`GPT` (Flax Linen), the unmodified model jlora and full fine-tuning run on.
  With ``lora_rank > 0`` its targeted Dense layers (``q``, ``k``, ``v``, ``o``, ``up``,
  ``down``) are :class:`LoraDense`, a hand-written LoRA layer computing
  ``x·W + b + (s·(x·A))·B`` itself: the practical limit any LoRA library can reach
  with the same matmuls. With ``scan=True`` the blocks run under ``nn.scan`` +
  ``nn.remat`` (stacked weights, one compiled block).
* :class:`NnxGPT` (Flax NNX), the same network with ``nnx.LoRALinear`` on the targets.

The reference size is GPT-2-small-like but shallower: 6 layers, d_model 512, 8 heads,
MLP 2048, vocab 8192, sequence 256, batch 4.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

TARGETS = ("q", "k", "v", "o", "up", "down")


@dataclasses.dataclass(frozen=True)
class Config:
    """Model and batch sizes; ``dtype`` is the compute dtype. ``base_dtype`` is the
    dtype the train-step benchmark stores a frozen base's matrices in (the model
    initializes float32; adapters, full fine-tuning's master weights and optimizer
    states stay float32)."""

    vocab: int = 8192
    d_model: int = 512
    heads: int = 8
    mlp: int = 2048
    layers: int = 6
    seq: int = 256
    batch: int = 4
    dtype: str = "float32"
    base_dtype: str = "float32"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


REFERENCE = Config()
QUICK = Config(vocab=256, d_model=64, heads=4, mlp=128, layers=2, seq=32, batch=2)


def kaiming_a(key, shape, dtype=jnp.float32):
    """PEFT's default A init: U(-1/sqrt(in), 1/sqrt(in)) for an ``(in, r)`` matrix."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


# --------------------------------------------------------------------------------------
# Linen
# --------------------------------------------------------------------------------------


class LoraDense(nn.Module):
    """Hand-written LoRA Dense: ``x·W + bias + (scale·(x·A))·B``, W and bias frozen."""

    features: int
    rank: int
    alpha: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_NxD):
        d_in = x_NxD.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (d_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        lora_a = self.param("lora_a", kaiming_a, (d_in, self.rank))
        lora_b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
        x_NxD = x_NxD.astype(self.dtype)
        y_NxF = x_NxD @ kernel.astype(self.dtype) + bias.astype(self.dtype)
        t_NxR = (x_NxD @ lora_a.astype(self.dtype)) * jnp.asarray(
            self.alpha / self.rank, self.dtype
        )
        return y_NxF + t_NxR @ lora_b.astype(self.dtype)


def _causal_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK):
    head_dim = q_BxLxHxK.shape[-1]
    dtype = q_BxLxHxK.dtype
    logits_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q_BxLxHxK, k_BxLxHxK)
    logits_BxHxLxL = logits_BxHxLxL / jnp.asarray(math.sqrt(head_dim), dtype)
    length = q_BxLxHxK.shape[1]
    mask_LxL = jnp.tril(jnp.ones((length, length), bool))
    logits_BxHxLxL = jnp.where(mask_LxL, logits_BxHxLxL, jnp.finfo(dtype).min)
    probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL.astype(jnp.float32), axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs_BxHxLxL, v_BxLxHxK)


class Block(nn.Module):
    """Pre-norm transformer block; ``lora_rank > 0`` makes the targets :class:`LoraDense`."""

    config: Config
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def dense(self, features: int, name: str):
        dtype = self.config.compute_dtype
        if self.lora_rank > 0:
            return LoraDense(features, self.lora_rank, self.lora_alpha, dtype, name=name)
        return nn.Dense(features, dtype=dtype, name=name)

    @nn.compact
    def __call__(self, x_BxLxD, _=None):
        c = self.config
        batch, length, _ = x_BxLxD.shape
        head_shape = (batch, length, c.heads, c.d_model // c.heads)
        h_BxLxD = nn.LayerNorm(dtype=c.compute_dtype, name="ln_1")(x_BxLxD)
        q = self.dense(c.d_model, "q")(h_BxLxD).reshape(head_shape)
        k = self.dense(c.d_model, "k")(h_BxLxD).reshape(head_shape)
        v = self.dense(c.d_model, "v")(h_BxLxD).reshape(head_shape)
        o_BxLxD = _causal_attention(q, k, v).reshape(batch, length, c.d_model)
        x_BxLxD = x_BxLxD + self.dense(c.d_model, "o")(o_BxLxD)
        h_BxLxD = nn.LayerNorm(dtype=c.compute_dtype, name="ln_2")(x_BxLxD)
        h_BxLxM = nn.gelu(self.dense(c.mlp, "up")(h_BxLxD))
        x_BxLxD = x_BxLxD + self.dense(c.d_model, "down")(h_BxLxM)
        return x_BxLxD, None


class GPT(nn.Module):
    """GPT-style decoder: token + position embeddings, blocks, final norm, tied head.

    Attributes:
      config: sizes and compute dtype.
      lora_rank: 0 for the plain model; r > 0 for the hand-written LoRA model.
      lora_alpha: LoRA alpha of the hand-written model (scale ``alpha / r``).
      scan: run the blocks under ``nn.scan(nn.remat(Block))`` with stacked weights.
    """

    config: Config
    lora_rank: int = 0
    lora_alpha: float = 16.0
    scan: bool = False

    @nn.compact
    def __call__(self, tokens_BxL):
        c = self.config
        embed = nn.Embed(c.vocab, c.d_model, name="embed")
        positions = self.param(
            "positions", nn.initializers.normal(0.02), (c.seq, c.d_model), jnp.float32
        )
        x_BxLxD = embed(tokens_BxL) + positions[: tokens_BxL.shape[1]]
        x_BxLxD = x_BxLxD.astype(c.compute_dtype)
        if self.scan:
            blocks = nn.scan(
                nn.remat(Block),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=c.layers,
            )(c, self.lora_rank, self.lora_alpha, name="blocks")
            x_BxLxD, _ = blocks(x_BxLxD, None)
        else:
            for i in range(c.layers):
                block = Block(c, self.lora_rank, self.lora_alpha, name=f"block_{i}")
                x_BxLxD, _ = block(x_BxLxD)
        x_BxLxD = nn.LayerNorm(dtype=c.compute_dtype, name="ln_f")(x_BxLxD)
        return embed.attend(x_BxLxD.astype(jnp.float32))


# --------------------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------------------


class NnxBlock(nnx.Module):
    """The same block in NNX; targets are ``nnx.LoRALinear`` when ``lora_rank > 0``."""

    def __init__(self, config: Config, lora_rank: int, *, rngs: nnx.Rngs):
        c = config
        self.config = c

        def linear(d_in, d_out):
            if lora_rank > 0:
                return nnx.LoRALinear(
                    d_in, d_out, lora_rank=lora_rank, dtype=c.compute_dtype, rngs=rngs
                )
            return nnx.Linear(d_in, d_out, dtype=c.compute_dtype, rngs=rngs)

        self.ln_1 = nnx.LayerNorm(c.d_model, dtype=c.compute_dtype, rngs=rngs)
        self.q = linear(c.d_model, c.d_model)
        self.k = linear(c.d_model, c.d_model)
        self.v = linear(c.d_model, c.d_model)
        self.o = linear(c.d_model, c.d_model)
        self.ln_2 = nnx.LayerNorm(c.d_model, dtype=c.compute_dtype, rngs=rngs)
        self.up = linear(c.d_model, c.mlp)
        self.down = linear(c.mlp, c.d_model)

    def __call__(self, x_BxLxD):
        c = self.config
        batch, length, _ = x_BxLxD.shape
        head_shape = (batch, length, c.heads, c.d_model // c.heads)
        h_BxLxD = self.ln_1(x_BxLxD)
        q = self.q(h_BxLxD).reshape(head_shape)
        k = self.k(h_BxLxD).reshape(head_shape)
        v = self.v(h_BxLxD).reshape(head_shape)
        o_BxLxD = _causal_attention(q, k, v).reshape(batch, length, c.d_model)
        x_BxLxD = x_BxLxD + self.o(o_BxLxD)
        h_BxLxM = nnx.gelu(self.up(self.ln_2(x_BxLxD)))
        return x_BxLxD + self.down(h_BxLxM)


class NnxGPT(nnx.Module):
    """The reference decoder in NNX (unrolled blocks, tied head)."""

    def __init__(self, config: Config, lora_rank: int = 0, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = nnx.Embed(c.vocab, c.d_model, rngs=rngs)
        self.positions = nnx.Param(jax.random.normal(rngs.params(), (c.seq, c.d_model)) * 0.02)
        self.blocks = nnx.List([NnxBlock(c, lora_rank, rngs=rngs) for _ in range(c.layers)])
        self.ln_f = nnx.LayerNorm(c.d_model, dtype=c.compute_dtype, rngs=rngs)

    def __call__(self, tokens_BxL):
        x_BxLxD = self.embed(tokens_BxL) + self.positions[: tokens_BxL.shape[1]]
        x_BxLxD = x_BxLxD.astype(self.config.compute_dtype)
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD)
        x_BxLxD = self.ln_f(x_BxLxD)
        return self.embed.attend(x_BxLxD.astype(jnp.float32))


# --------------------------------------------------------------------------------------
# Data and loss
# --------------------------------------------------------------------------------------


def batch_of_tokens(config: Config, key: jax.Array) -> jax.Array:
    """Random tokens ``(batch, seq + 1)``: inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
    return jax.random.randint(key, (config.batch, config.seq + 1), 0, config.vocab, jnp.int32)


def next_token_loss(logits_BxLxV: jax.Array, tokens_BxL1: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of logits for ``tokens[:, :-1]``."""
    targets_BxL = tokens_BxL1[:, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    return losses.mean()
