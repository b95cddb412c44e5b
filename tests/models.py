"""Small reference models shared by the tests (random weights, tiny configs)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    features: tuple[int, ...] = (16, 16, 4)

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.features):
            x = nn.Dense(width, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                x = nn.gelu(x)
        return x


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="conv_0")(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), strides=(2, 2), name="conv_1")(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(3, name="head")(x)


class Block(nn.Module):
    d_model: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x, _):
        head_dim = self.d_model // self.heads
        h = nn.LayerNorm(name="ln_1")(x)
        q = nn.DenseGeneral((self.heads, head_dim), name="query")(h)
        k = nn.DenseGeneral((self.heads, head_dim), name="key")(h)
        v = nn.DenseGeneral((self.heads, head_dim), name="value")(h)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        length = x.shape[1]
        mask = jnp.tril(jnp.ones((length, length), bool))
        logits = jnp.where(mask, logits, jnp.finfo(x.dtype).min)
        attn = jax.nn.softmax(logits, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
        x = x + nn.DenseGeneral(self.d_model, axis=(-2, -1), name="out")(o)
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.gelu(nn.Dense(self.mlp, name="up")(h))
        x = x + nn.Dense(self.d_model, name="down")(h)
        return x, None


class Decoder(nn.Module):
    """A decoder with layers under ``nn.scan`` + ``nn.remat`` and a tied LM head."""

    vocab: int = 64
    d_model: int = 32
    heads: int = 4
    mlp: int = 64
    layers: int = 2
    scan: bool = True

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.d_model, name="embed")
        x = embed(tokens)
        if self.scan:
            block = nn.scan(
                nn.remat(Block),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.layers,
            )(self.d_model, self.heads, self.mlp, name="layers")
            x, _ = block(x, None)
        else:
            for i in range(self.layers):
                x, _ = Block(self.d_model, self.heads, self.mlp, name=f"layer_{i}")(x, None)
        x = nn.LayerNorm(name="ln_f")(x)
        return embed.attend(x)
