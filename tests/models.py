"""Small reference models shared by the tests (random weights, tiny configs)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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


# --------------------------------------------------------------------------------------
# A hand-written LoRA version of ``Decoder`` (the practical limit): its own layers
# compute x·W + s·(x·A)·B with A and B in a separate "lora" collection.
# --------------------------------------------------------------------------------------


class LoraProj(nn.Module):
    """DenseGeneral with a hand-written low-rank branch (A, B in collection "lora")."""

    features: int | tuple[int, ...]
    axis: int | tuple[int, ...] = -1
    rank: int = 4
    scale: float = 2.0

    @nn.compact
    def __call__(self, x):
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        axis = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        axis = tuple(a % x.ndim for a in axis)
        base = nn.DenseGeneral(self.features, axis=self.axis, name="base")(x)
        in_features = 1
        for a in axis:
            in_features *= x.shape[a]
        out_features = 1
        for f in features:
            out_features *= f
        lora_a = self.variable(
            "lora", "lora_a", lambda: jnp.zeros((in_features, self.rank), x.dtype)
        ).value
        lora_b = self.variable(
            "lora", "lora_b", lambda: jnp.zeros((self.rank, out_features), x.dtype)
        ).value
        batch_shape = tuple(d for i, d in enumerate(x.shape) if i not in axis)
        x_flat = x.reshape((*batch_shape, in_features))
        low = ((x_flat @ lora_a) * self.scale) @ lora_b
        return base + low.reshape(base.shape)


class HandLoraBlock(nn.Module):
    d_model: int
    heads: int
    mlp: int
    rank: int = 4
    scale: float = 2.0

    @nn.compact
    def __call__(self, x, _):
        head_dim = self.d_model // self.heads
        kw = {"rank": self.rank, "scale": self.scale}
        h = nn.LayerNorm(name="ln_1")(x)
        q = LoraProj((self.heads, head_dim), name="query", **kw)(h)
        k = LoraProj((self.heads, head_dim), name="key", **kw)(h)
        v = LoraProj((self.heads, head_dim), name="value", **kw)(h)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        length = x.shape[1]
        mask = jnp.tril(jnp.ones((length, length), bool))
        logits = jnp.where(mask, logits, jnp.finfo(x.dtype).min)
        attn = jax.nn.softmax(logits, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
        x = x + LoraProj(self.d_model, axis=(-2, -1), name="out", **kw)(o)
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.gelu(LoraProj(self.mlp, name="up", **kw)(h))
        x = x + LoraProj(self.d_model, name="down", **kw)(h)
        return x, None


class HandLoraDecoder(nn.Module):
    vocab: int = 64
    d_model: int = 32
    heads: int = 4
    mlp: int = 64
    layers: int = 2
    rank: int = 4
    scale: float = 2.0

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.d_model, name="embed")
        x = embed(tokens)
        block = nn.scan(
            nn.remat(HandLoraBlock),
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True},
            length=self.layers,
        )(self.d_model, self.heads, self.mlp, self.rank, self.scale, name="layers")
        x, _ = block(x, None)
        x = nn.LayerNorm(name="ln_f")(x)
        return embed.attend(x)


def perturb(adapters, seed, scale=0.1):
    """Random non-zero factors, so lora_B != 0 and every value is checked (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    noisy = [
        jnp.asarray((np.asarray(x, np.float32) + scale * rng.normal(size=x.shape)).astype(x.dtype))
        for x in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, noisy)
