"""jlora.compress: the low-rank weight kind, against numpy's float64 SVD and the dense model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._compress import LowRankWeight
from tests.models import Decoder

TARGETS = ["query", "key", "value", "out", "up", "down"]


def assert_all_factored(fn, params, adapters, *args):
    """Every compressed or adapted weight ran factored, and each was used."""
    report = jlora.explain(fn, params, adapters, *args)
    compressed = {p for p, leaf in jlora._paths.leaves_with_paths(
        params, is_leaf=jlora._weights.is_weight_node) if isinstance(leaf, LowRankWeight)}
    assert compressed and compressed <= set(report), report
    for path, uses in report.items():
        assert uses.materialized == 0, f"{path} materialized:\n{report}"
        assert uses.factored >= 1, f"{path} never used:\n{report}"


def _truncated(w: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def _decaying(key, m, n, rate=0.7):
    """A matrix with singular values rate**i (a clear spectrum to truncate)."""
    k1, k2 = jax.random.split(key)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (m, m)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, n)))
    k = min(m, n)
    return (u[:, :k] * (rate ** jnp.arange(k, dtype=jnp.float32))) @ v[:, :k].T


def test_compress_is_the_truncated_svd(key):
    w = _decaying(key, 24, 16)
    for r in (1, 3, 8):
        node = jlora.compress({"w": w}, "w", rank=r)["w"]
        assert isinstance(node, LowRankWeight)
        assert node.u.shape == (24, r) and node.v.shape == (r, 16)
        ref = _truncated(np.asarray(w), r)
        np.testing.assert_allclose(np.asarray(node.dense(), np.float64), ref, atol=1e-5)
        # Eckart–Young: the Frobenius error is the root of the discarded σ².
        sigma = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
        err = np.linalg.norm(np.asarray(node.dense(), np.float64) - np.asarray(w, np.float64))
        np.testing.assert_allclose(err, np.sqrt(np.sum(sigma[r:] ** 2)), rtol=1e-4, atol=1e-6)
        # Balanced factors: U·Σ^{1/2} and Σ^{1/2}·Vᵀ have equal column / row norms.
        np.testing.assert_allclose(
            np.linalg.norm(node.u, axis=0), np.linalg.norm(node.v, axis=1), rtol=1e-4
        )


def test_energy_picks_the_cumsum_rank_and_stacks_share_the_largest(key):
    w = _decaying(key, 20, 12, rate=0.8)
    sigma = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    energy = np.cumsum(sigma**2) / np.sum(sigma**2)
    for target in (0.5, 0.9, 0.99, 1.0):
        expected = int(np.argmax(energy >= target - 1e-12)) + 1
        node = jlora.compress({"w": w}, "w", energy=target)["w"]
        assert node.rank == expected, (target, node.rank, expected)
    # A stack of two slices: one flat spectrum (needs many components), one steep.
    steep, flat = _decaying(key, 12, 12, rate=0.3), _decaying(key, 12, 12, rate=0.95)
    stacked = jnp.stack([steep, flat])

    def fn(p, x):
        return jnp.einsum("bi,lio->lbo", x, p["w"])

    node = jlora.compress({"w": stacked}, "w", energy=0.9, fn=fn, args=(jnp.ones((2, 12)),))["w"]
    ranks = []
    for slice_ in (steep, flat):
        s = np.linalg.svd(np.asarray(slice_, np.float64), compute_uv=False)
        ranks.append(int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.9)) + 1)
    assert node.rank == max(ranks) and ranks[0] < ranks[1]
    for i, slice_ in enumerate((steep, flat)):
        np.testing.assert_allclose(
            np.asarray(node.dense()[i], np.float64), _truncated(np.asarray(slice_), node.rank),
            atol=1e-5,
        )  # fmt: skip


@pytest.fixture(scope="module")
def decoder():
    model = Decoder()
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
    params = model.init(jax.random.key(2), tokens)
    return model, params, tokens


def test_compressed_decoder_runs_factored_and_equals_the_dense_model(decoder):
    model, params, tokens = decoder
    small = jlora.compress(params, TARGETS, rank=4, fn=model.apply, args=(tokens,))
    dense = jlora.dequantize(small)
    got = jax.jit(jlora.lora(model.apply))(small, {}, tokens)
    want = model.apply(dense, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert_all_factored(model.apply, small, {}, tokens)
    report = jlora.explain(model.apply, small, {}, tokens)
    assert all("low-rank base" in f for path, forms in report.forms.items() for f in forms
               if "layers" in path), report.forms  # fmt: skip
    # The compression is lossy: the output moved (the test can fail).
    assert float(jnp.max(jnp.abs(want - model.apply(params, tokens)))) > 1e-3


def test_summary_counts_r_times_in_plus_out(decoder):
    model, params, tokens = decoder
    small = jlora.compress(params, ["up"], rank=3, fn=model.apply, args=(tokens,))
    full = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
    up = params["params"]["layers"]["up"]["kernel"]  # (layers, d_model, mlp)
    layers, d_in, d_out = up.shape
    expected = full - up.size + layers * 3 * (d_in + d_out)
    assert f"all params: {expected:,}" in jlora.summary(small, {})


def test_an_adapter_on_a_compressed_weight_equals_the_merged_dense_model(key):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"up": jax.random.normal(k1, (8, 12)), "down": jax.random.normal(k2, (12, 8))}
    x = jax.random.normal(k3, (4, 8))

    def fn(p, x):
        return jnp.tanh(x @ p["up"]) @ p["down"]

    small = jlora.compress(params, "up|down", rank=3)
    adapters = jlora.init(jlora.LoraSpec(rank=2, alpha=3.0, targets="up|down"), small, key)
    adapters = jax.tree_util.tree_map(lambda a: a + 0.1, adapters)

    def loss(a):
        return jnp.sum(jax.jit(jlora.lora(fn))(small, a, x) ** 2)

    def loss_dense(a):
        return jnp.sum(fn(jlora.merge(jlora.dequantize(small), a), x) ** 2)

    value, grads = jax.value_and_grad(loss)(adapters)
    value_ref, grads_ref = jax.value_and_grad(loss_dense)(adapters)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    assert_all_factored(fn, small, adapters, x)


@pytest.mark.slow
def test_an_adapter_on_a_compressed_decoder_distils_it_towards_the_teacher(decoder, key):
    """Distillation on the scanned decoder: a LoRA on the compressed weights, values and
    gradients equal to the merged dense model's, and a few steps bring the logits
    towards the teacher's."""
    steps = 15
    model, params, tokens = decoder
    small = jlora.compress(params, TARGETS, rank=2, fn=model.apply, args=(tokens,))
    spec = jlora.LoraSpec(rank=2, alpha=2.0, targets=TARGETS)
    adapters = jlora.init(spec, small, key, fn=model.apply, args=(tokens,))
    adapters = jax.tree_util.tree_map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape, x.dtype), adapters
    )
    teacher = model.apply(params, tokens)

    def loss_lora(a):
        return jnp.mean((jlora.lora(model.apply)(small, a, tokens) - teacher) ** 2)

    def loss_dense(a):
        merged = jlora.merge(jlora.dequantize(small), a)
        return jnp.mean((model.apply(merged, tokens) - teacher) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss_lora))(adapters)
    value_ref, grads_ref = jax.value_and_grad(loss_dense)(adapters)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    assert_all_factored(model.apply, small, adapters, tokens)
    step = jax.jit(lambda a: jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, a,
                                                    jax.grad(loss_lora)(a)))  # fmt: skip
    first = float(loss_lora(adapters))
    for _ in range(steps):
        adapters = step(adapters)
    assert float(loss_lora(adapters)) < 0.7 * first


def test_gradients_reach_the_pair_itself(key):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"up": jax.random.normal(k1, (8, 12)), "down": jax.random.normal(k2, (12, 8))}
    x = jax.random.normal(k3, (4, 8))

    def fn(p, x):
        return jnp.tanh(x @ p["up"]) @ p["down"]

    small = jlora.compress(params, "up|down", rank=2)

    def loss(p):
        return jnp.sum(jlora.lora(fn)(p, {}, x) ** 2)

    def loss_dense(p):
        return jnp.sum(fn(jlora.dequantize(p), x) ** 2)

    g = jax.grad(loss)(small)["up"]
    g_ref = jax.grad(loss_dense)(small)["up"]
    assert isinstance(g, LowRankWeight)
    np.testing.assert_allclose(g.u, g_ref.u, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.v, g_ref.v, rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(g.u))) > 0


def test_merge_keeps_a_compressed_weight_low_rank(key):
    w = _decaying(key, 16, 12)
    small = jlora.compress({"w": w}, "w", rank=3)
    adapters = jlora.init(jlora.LoraSpec(rank=2, alpha=4.0, targets="w"), {"w": w}, key)
    adapters["w"].lora_b = jax.random.normal(key, adapters["w"].lora_b.shape)
    merged = jlora.merge(small, adapters)["w"]
    assert isinstance(merged, LowRankWeight) and merged.rank == 5
    want = small["w"].dense() + adapters["w"].delta()
    np.testing.assert_allclose(merged.dense(), want, atol=1e-5)
    back = jlora.unmerge({"w": merged}, adapters)["w"]
    np.testing.assert_allclose(back.dense(), small["w"].dense(), atol=1e-5)
    x = jnp.ones((2, 16))
    np.testing.assert_allclose(
        jlora.lora(lambda p, x: x @ p["w"])(small, adapters, x),
        jlora.lora(lambda p, x: x @ p["w"])({"w": merged}, {}, x), rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_compressed_embedding_lookup_and_tied_head(decoder):
    model, params, tokens = decoder
    small = jlora.compress(params, ["embed"], rank=8, fn=model.apply, args=(tokens,))
    np.testing.assert_allclose(
        jlora.lora(model.apply)(small, {}, tokens), model.apply(jlora.dequantize(small), tokens),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    assert_all_factored(model.apply, small, {}, tokens)


def test_errors(key):
    w = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"exactly one of rank= .* and energy="):
        jlora.compress({"w": w}, "w")
    with pytest.raises(ValueError, match="exactly one"):
        jlora.compress({"w": w}, "w", rank=1, energy=0.9)
    with pytest.raises(ValueError, match="rank 4 at 'w' exceeds min"):
        jlora.compress({"w": w}, "w", rank=4)
    with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
        jlora.compress({"w": w}, "w", energy=1.5)
    with pytest.raises(ValueError, match="already an encoded lowrank weight"):
        jlora.compress(jlora.compress({"w": w}, "w", rank=1), "w", rank=1)
    with pytest.raises(ValueError, match="already an encoded nf4 weight"):
        jlora.compress(jlora.quantize({"w": jnp.ones((64, 4))}, "w"), "w", rank=1)


def test_dora_and_a_stack_on_a_compressed_weight(key):
    """The two axes compose: a DoRA adapter and a stack chosen per example on a low-rank
    weight equal the merged dense model (DoRA's norm reads the dense U·V)."""
    w = _decaying(key, 16, 12)
    small = jlora.compress({"w": w}, "w", rank=4)
    dense = jlora.dequantize(small)
    x = jax.random.normal(key, (3, 16))

    def fn(p, x):
        return x @ p["w"]

    dora = jlora.init(jlora.LoraSpec(rank=2, targets="w", dora=True), dense, key)
    dora = jax.tree_util.tree_map(lambda t: t + 0.1, dora)
    np.testing.assert_allclose(jlora.lora(fn)(small, dora, x), fn(jlora.merge(dense, dora), x),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    one = jlora.init(jlora.LoraSpec(rank=2, targets="w"), dense, key)
    one = jax.tree_util.tree_map(lambda t: t + 0.1, one)
    got = jlora.lora(fn)(small, jlora.stack([one, one]), x, lora_ids=jnp.array([0, 1, -1]))
    want = jnp.stack([fn(jlora.merge(dense, one), x)[0], fn(jlora.merge(dense, one), x)[1],
                      fn(dense, x)[2]])  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
