"""``jlora.lora(fn)`` equals ``fn(jlora.merge(params, adapters))`` on every model family.

Families beyond Linen (tests/families.py): Flax NNX through ``nnx.split``/``nnx.merge``,
Equinox through ``eqx.partition``/``eqx.combine``, and the Hugging Face Flax GPT-2,
Llama and BERT models. For each: the targets and learned layouts, values and
gradients with and without ``jit`` against the merged reference, every use factored
(``jlora.explain``), and fresh adapters giving exactly the base output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._tree import adapter_items
from tests.families import BUILDERS, Family
from tests.marks import mode, slow_where

NAMES = list(BUILDERS)


@functools.cache
def setup(name: str) -> tuple[Family, jlora.Adapters, jlora.Adapters, jax.Array]:
    """The family, fresh adapters, perturbed adapters (B != 0) and a projection."""
    family = BUILDERS[name]()
    spec = jlora.LoraSpec(rank=2, alpha=4.0, targets=family.targets)
    fresh = jlora.init(spec, family.params, jax.random.key(1), fn=family.fn, args=family.args)
    leaves, treedef = jax.tree_util.tree_flatten(fresh)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noise = [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    perturbed = jax.tree_util.tree_unflatten(treedef, [x + n for x, n in zip(leaves, noise)])
    out = jax.eval_shape(family.fn, family.params, *family.args)
    projection = jax.random.normal(jax.random.key(3), out.shape, out.dtype)
    return family, fresh, perturbed, projection


def maybe_jit(fn, use_jit: bool):
    return jax.jit(fn) if use_jit else fn


@pytest.mark.parametrize("name", NAMES)
def test_targets_and_learned_layouts(name):
    family, fresh, _, _ = setup(name)
    nodes = dict(adapter_items(fresh))
    assert set(nodes) == family.expected
    for path, node in nodes.items():
        layout = node.layout
        assert not layout.stack_axes, path
        if path in family.transposed:  # stored (out, in): A reads axis 1, B writes axis 0
            assert (layout.in_axes, layout.out_axes) == ((1,), (0,)), (path, layout)
        else:  # (in, out) kernels, (vocab, features) embeddings, multi-axis kernels
            assert layout.in_axes[0] == 0, (path, layout)
        assert node.lora_a.shape == (layout.in_features, 2), path
        assert node.lora_b.shape == (2, layout.out_features), path


def projected_loss(out_fn, projection):
    """``sum(out * projection)``: a sum alone has ~0 gradient through LayerNorm."""

    def loss(adapters, params):
        out = out_fn(adapters, params)
        return jnp.sum(out * projection), out

    return jax.value_and_grad(loss, has_aux=True)


@functools.cache
def merged_reference(name: str):
    """``fn(merge(params, adapters))``: output, loss and gradients w.r.t. the adapters."""
    family, _, adapters, projection = setup(name)

    def merged_out(adapters, params):
        return family.fn(jlora.merge(params, adapters), *family.args)

    return jax.jit(projected_loss(merged_out, projection))(adapters, family.params)


# Every family under jit; the eager interpreter (the same rules, op by op) on GPT-2 by
# default, the other families with -m slow.
MATCH_CASES = slow_where(
    [(name, use_jit) for name in NAMES for use_jit in (False, True)],
    ids=lambda name, use_jit: f"{name}-{mode(use_jit)}",
    slow=lambda name, use_jit: not use_jit and name != "gpt2",
)


@pytest.mark.parametrize("name, use_jit", MATCH_CASES)
def test_values_and_gradients_match_merged(name, use_jit):
    family, _, adapters, projection = setup(name)

    def lora_out(adapters, params):
        return jlora.lora(family.fn)(params, adapters, *family.args)

    step = maybe_jit(projected_loss(lora_out, projection), use_jit)
    (loss, out), grads = step(adapters, family.params)
    (ref_loss, ref_out), ref_grads = merged_reference(name)

    ref_out = np.asarray(ref_out)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5 * np.abs(ref_out).max())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    ref_flat = jax.tree_util.tree_leaves_with_path(ref_grads)
    assert [p for p, _ in flat] == [p for p, _ in ref_flat]
    assert len(flat) == 2 * len(family.expected)  # A and B of every target
    for (path, grad), (_, ref) in zip(flat, ref_flat):
        ref = np.asarray(ref)
        assert np.abs(ref).max() > 0, f"{jax.tree_util.keystr(path)}: zero reference gradient"
        np.testing.assert_allclose(
            grad,
            ref,
            rtol=1e-5,
            atol=1e-5 * np.abs(ref).max(),
            err_msg=jax.tree_util.keystr(path),
        )


@pytest.mark.parametrize("name", NAMES)
def test_every_use_is_factored(name):
    family, _, adapters, _ = setup(name)
    report = jlora.explain(family.fn, family.params, adapters, *family.args)
    assert set(report) == family.expected
    not_factored = {p: u for p, u in report.items() if u.materialized or not u.factored}
    assert not not_factored, f"\n{report}"


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", NAMES)
def test_fresh_adapters_give_the_base_output(name, use_jit):
    family, fresh, _, _ = setup(name)
    base = maybe_jit(family.fn, use_jit)(family.params, *family.args)
    out = maybe_jit(jlora.lora(family.fn), use_jit)(family.params, fresh, *family.args)
    if not use_jit:  # the same operations on the same values, plus an exact zero
        np.testing.assert_array_equal(out, base)
    else:
        # XLA compiles the program with the zero low-rank terms as a different graph,
        # and its fusion of the reductions around them (BERT's LayerNorms) may round
        # differently: 1 ulp (3e-8 of 0.13) on BERT, bit-exact on the other families.
        base = np.asarray(base)
        np.testing.assert_allclose(out, base, rtol=0, atol=1e-6 * np.abs(base).max())


def lookup_case():
    """A (vocab, features) table, perturbed adapters and ids, some out of range."""
    params = {"table": jax.random.normal(jax.random.key(0), (10, 4))}
    adapters = jlora.init(jlora.LoraSpec(rank=2, targets="table"), params, jax.random.key(1))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.5, adapters)  # B != 0
    ids = jnp.array([[0, 3, 9], [12, -1, 4]], jnp.int32)
    return params, adapters, ids


def test_vmapped_row_lookup_is_factored():
    # Equinox's Embedding pattern: ``w[i]`` for a scalar i under vmap becomes a gather
    # that also gives the feature axis a start index (0, with the axis sliced whole).
    params, adapters, ids = lookup_case()

    def fn(params, ids):
        return jax.vmap(jax.vmap(lambda i: params["table"][i]))(ids)

    assert jlora.explain(fn, params, adapters, ids)["table"] == jlora.Uses(1, 0)
    expected = fn(jlora.merge(params, adapters), ids)
    np.testing.assert_allclose(jlora.lora(fn)(params, adapters, ids), expected, rtol=1e-6)


def test_lookup_with_fill_on_the_feature_axis_falls_back():
    # With FILL_OR_DROP an out-of-range start on the feature axis would fill, so the
    # lookup is not only a row lookup: the engine builds W + s·B·A for it, and counts it.
    params, adapters, ids = lookup_case()
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=(2,), collapsed_slice_dims=(0,), start_index_map=(0, 1)
    )

    def fn(params, ids):
        starts = jnp.stack([ids, jnp.zeros_like(ids)], axis=-1)
        return jax.lax.gather(
            params["table"], starts, dims, (1, 4), mode=jax.lax.GatherScatterMode.FILL_OR_DROP
        )

    assert jlora.explain(fn, params, adapters, ids)["table"] == jlora.Uses(0, 1)
    expected = fn(jlora.merge(params, adapters), ids)
    np.testing.assert_allclose(jlora.lora(fn)(params, adapters, ids), expected, rtol=1e-6)
