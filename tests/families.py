"""Model families beyond Linen, as ``(params, fn, args)`` for the equivalence tests.

Each builder makes a tiny model with random weights and returns a :class:`Family`:
the params pytree exactly as its framework stores it, the model function
``fn(params, *args)``, example inputs, the ``LoraSpec.targets`` names to adapt (the
usual attention, MLP and embedding modules) and the target paths they must select.
Builders are cached: the Hugging Face models take seconds to build.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

VOCAB = 64
WIDTH = 16
LAYERS = 1


class Family(NamedTuple):
    """One model family ready for ``jlora``: params, ``fn(params, *args)`` and inputs."""

    name: str
    params: Any
    fn: Callable
    args: tuple
    targets: list[str]
    expected: frozenset[str]  # the target paths ``targets`` must select
    transposed: frozenset[str] = frozenset()  # targets stored (out, in): in_axes == (1,)


def token_ids(batch: int = 2, length: int = 6) -> jax.Array:
    """Deterministic token ids spread over the vocabulary."""
    return (jnp.arange(batch * length, dtype=jnp.int32).reshape(batch, length) * 7 + 3) % VOCAB


# --------------------------------------------------------------------------------------
# Flax NNX: Embed, LinearGeneral (fused qkv), Einsum (output projection), Linear (MLP)
# --------------------------------------------------------------------------------------


@functools.cache
def nnx_model() -> Family:
    from flax import nnx

    heads, head_dim = 2, WIDTH // 2

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.norm_1 = nnx.LayerNorm(WIDTH, rngs=rngs)
            self.qkv = nnx.LinearGeneral(WIDTH, (3, heads, head_dim), rngs=rngs)
            self.out = nnx.Einsum("bthd,hdo->bto", (heads, head_dim, WIDTH), (WIDTH,), rngs=rngs)
            self.norm_2 = nnx.LayerNorm(WIDTH, rngs=rngs)
            self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
            self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

        def __call__(self, x_BxLxD):
            q, k, v = jnp.moveaxis(self.qkv(self.norm_1(x_BxLxD)), 2, 0)
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
            o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
            x_BxLxD = x_BxLxD + self.out(o)
            return x_BxLxD + self.down(jax.nn.gelu(self.up(self.norm_2(x_BxLxD))))

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
            self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)

        def __call__(self, ids_BxL):
            x = self.embed(ids_BxL)
            for block in self.blocks:
                x = block(x)
            return self.embed.attend(self.norm(x))  # tied head: the embedding used twice

    graphdef, state = nnx.split(Model(nnx.Rngs(0)))

    def fn(state, ids):
        return nnx.merge(graphdef, state)(ids)

    names = ["qkv", "out", "up", "down"]
    expected = {f"blocks/{i}/{n}/kernel/value" for i in range(LAYERS) for n in names}
    expected.add("embed/embedding/value")
    return Family("nnx", state, fn, (token_ids(),), ["embed", *names], frozenset(expected))


# --------------------------------------------------------------------------------------
# Equinox: Embedding, MultiheadAttention, MLP, Linear (weights stored (out, in))
# --------------------------------------------------------------------------------------


@functools.cache
def equinox_model() -> Family:
    import equinox as eqx

    class Model(eqx.Module):
        embed: eqx.nn.Embedding
        norm_1: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        norm_2: eqx.nn.LayerNorm
        mlp: eqx.nn.MLP
        head: eqx.nn.Linear

        def __init__(self, key):
            keys = jax.random.split(key, 4)
            self.embed = eqx.nn.Embedding(VOCAB, WIDTH, key=keys[0])
            self.norm_1 = eqx.nn.LayerNorm(WIDTH)
            self.attn = eqx.nn.MultiheadAttention(2, WIDTH, key=keys[1])
            self.norm_2 = eqx.nn.LayerNorm(WIDTH)
            self.mlp = eqx.nn.MLP(WIDTH, WIDTH, 2 * WIDTH, 1, activation=jax.nn.gelu, key=keys[2])
            self.head = eqx.nn.Linear(WIDTH, 5, key=keys[3])

        def __call__(self, ids_L):
            x_LxD = jax.vmap(self.embed)(ids_L)
            h_LxD = jax.vmap(self.norm_1)(x_LxD)
            x_LxD = x_LxD + self.attn(h_LxD, h_LxD, h_LxD)
            x_LxD = x_LxD + jax.vmap(self.mlp)(jax.vmap(self.norm_2)(x_LxD))
            return jax.vmap(self.head)(x_LxD)

    params, static = eqx.partition(Model(jax.random.key(0)), eqx.is_array)

    def fn(params, ids_BxL):
        return jax.vmap(eqx.combine(params, static))(ids_BxL)

    attention = [f"attn/{n}_proj/weight" for n in ("query", "key", "value", "output")]
    linears = {*attention, "mlp/layers/0/weight", "mlp/layers/1/weight", "head/weight"}
    targets = ["embed", "query_proj", "key_proj", "value_proj", "output_proj", "layers", "head"]
    return Family(
        "equinox",
        params,
        fn,
        (token_ids(),),
        targets,
        frozenset({*linears, "embed/weight"}),
        transposed=frozenset(linears),
    )


# --------------------------------------------------------------------------------------
# Hugging Face Flax models from tiny configs (random weights, nothing downloaded)
# --------------------------------------------------------------------------------------


def _hf_build(model_class: Any, config: Any) -> tuple[Any, Any]:
    """The model and its random params, initialized under ``jit`` (op by op is slow)."""
    with jax.numpy_dtype_promotion("standard"):  # see _hf_fn
        model = model_class(config, seed=0, _do_init=False)
        params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), (1, 1))
    return model, params


def _hf_fn(model: Any) -> Callable:
    def fn(params, ids):
        # The models' own mask code mixes int32 and bool, which the tests' strict
        # promotion refuses; the context holds while fn is traced, so under jit too.
        with jax.numpy_dtype_promotion("standard"):
            return model(ids, params=params).logits

    return fn


@functools.cache
def gpt2() -> Family:
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=LAYERS, n_head=2)
    model, params = _hf_build(FlaxGPT2LMHeadModel, config)
    layer = "transformer/h/{}/{}/kernel"
    kernels = {
        layer.format(i, name)
        for i in range(LAYERS)
        for name in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
    }
    return Family(
        "gpt2",
        params,
        _hf_fn(model),
        (token_ids(),),
        ["c_attn", "c_proj", "c_fc", "wte"],
        frozenset({*kernels, "transformer/wte/embedding"}),  # wte: lookup and tied head
        transposed=frozenset(kernels),  # GPT-2's Conv1D kernels are stored (out, in)
    )


@functools.cache
def llama() -> Family:
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped-query attention: k/v narrower than q
        max_position_embeddings=16,
    )
    model, params = _hf_build(FlaxLlamaForCausalLM, config)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    blocks = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn"}
    blocks |= {"o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    expected = {f"model/layers/{i}/{blocks[n]}/{n}/kernel" for i in range(LAYERS) for n in names}
    expected |= {"model/embed_tokens/embedding", "lm_head/kernel"}
    return Family(
        "llama",
        params,
        _hf_fn(model),
        (token_ids(),),
        [*names, "embed_tokens", "lm_head"],
        frozenset(expected),
    )


@functools.cache
def bert() -> Family:
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=16,
        num_labels=3,
    )
    model, params = _hf_build(FlaxBertForSequenceClassification, config)
    layer = "bert/encoder/layer/{}/{}/kernel"
    modules = (
        "attention/self/query",
        "attention/self/key",
        "attention/self/value",
        "attention/output/dense",
        "intermediate/dense",
        "output/dense",
    )
    expected = {layer.format(i, m) for i in range(LAYERS) for m in modules}
    expected |= {"bert/pooler/dense/kernel", "bert/embeddings/word_embeddings/embedding"}
    return Family(
        "bert",
        params,
        _hf_fn(model),
        (token_ids(),),
        ["query", "key", "value", "dense", "word_embeddings"],
        frozenset(expected),
    )


BUILDERS: dict[str, Callable[[], Family]] = {
    "nnx": nnx_model,
    "equinox": equinox_model,
    "gpt2": gpt2,
    "llama": llama,
    "bert": bert,
}
