"""kljax.lm: chunked per-token KL / JSD from hidden states against the materialised-logits program.

The independent truth is the textbook computation with all logits in memory (jax.nn.log_softmax, and
jax.grad through it) in float64; the precision tests compare float32 / bfloat16 against the same inputs
in float64, and show that the textbook float32 program is not accurate there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kljax import lm

T, H_P, H_Q, V = 7, 6, 5, 23  # V prime: no chunk size below divides it


def _inputs(seed=0, batch=(2,), dtype=np.float64, h_q=H_Q):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(*batch, T, H_P)), dtype), jnp.asarray(rng.normal(size=(H_P, V)), dtype),
            jnp.asarray(rng.normal(size=(*batch, T, h_q)), dtype), jnp.asarray(rng.normal(size=(h_q, V)), dtype))


def _log_softmaxes(hidden_p, unembed_p, hidden_q, unembed_q, temperature):
    return (jax.nn.log_softmax(hidden_p @ unembed_p / temperature),
            jax.nn.log_softmax(hidden_q @ unembed_q / temperature))


def _naive(beta, hidden_p, unembed_p, hidden_q, unembed_q, temperature=1.0):
    """KL(P || Q) (beta None) or GKD's JSD_beta from materialised logits."""
    log_p, log_q = _log_softmaxes(hidden_p, unembed_p, hidden_q, unembed_q, temperature)

    def kl(log_a, log_b):
        return jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)

    if beta is None or beta == 0:
        return kl(log_p, log_q)
    if beta == 1:
        return kl(log_q, log_p)
    log_m = jnp.logaddexp(np.log(beta) + log_p, np.log1p(-beta) + log_q)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def _chunked(beta, *arrays, **options):
    if beta is None:
        return lm.kl_from_hidden(*arrays, **options)
    return lm.jsd_from_hidden(*arrays, beta=beta, **options)


@pytest.mark.parametrize("chunk_size", [(3, 5), (T * 2, V)], ids=["chunked", "one_chunk"])
def test_value_and_gradients_match_materialised_logits(chunk_size):
    """Value and jax.grad to all four arrays: KL and JSD_beta for beta = 0, 0.3, 1, with a token mask and
    a non-uniform cotangent; chunk sizes (3, 5) divide neither T nor V, (14, 23) is the unchunked program."""
    arrays = _inputs()
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, T)))
    mask = jnp.asarray(np.arange(2 * T).reshape(2, T) % 3 != 0)
    options = dict(temperature=1.7, chunk_size=chunk_size, where=mask)

    @jax.jit  # one compile per function; beta is traced
    def chunked(beta, *a):
        def loss(*a):
            values = lm.kl_from_hidden(*a, **options) if beta is None else lm.jsd_from_hidden(*a, beta=beta, **options)
            return jnp.sum(weights * values), values
        return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*a)

    for beta in (None, 0.0, 0.3, 1.0):
        def naive_loss(*a):
            values = jnp.where(mask, _naive(beta, *a, temperature=1.7), 0.0)
            return jnp.sum(weights * values), values

        expected_grads, expected_value = jax.grad(naive_loss, argnums=(0, 1, 2, 3), has_aux=True)(*arrays)
        grads, value = chunked(beta, *arrays)
        np.testing.assert_allclose(value, expected_value, rtol=1e-12, atol=1e-14)
        for got, want in zip(grads, expected_grads):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def _close_models(epsilon, seed=0, vocabulary=4096, h=32):
    """Two float32 models with the same hidden states and unembeddings epsilon apart: KL ~ epsilon^2."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(16, h)).astype(np.float32)
    unembed_p = (3 * rng.normal(size=(h, vocabulary)) / np.sqrt(h)).astype(np.float32)
    unembed_q = (unembed_p + epsilon * rng.normal(size=(h, vocabulary))).astype(np.float32)
    return [jnp.asarray(x) for x in (hidden, unembed_p, hidden, unembed_q)]


def test_tiny_kl_accurate_in_float32():
    """Per-token KL ~ 1e-7 over 4096 entries: float32 within 1% of float64 (same inputs); the textbook
    float32 sum is off by more than 50%."""
    arrays = _close_models(1e-4)
    truth = _naive(None, *(x.astype(jnp.float64) for x in arrays))  # exact enough in float64
    assert 1e-8 < float(truth.min()) and float(truth.max()) < 1e-6
    got = jax.jit(lambda *a: lm.kl_from_hidden(*a, chunk_size=(8, 1000)))(*arrays)
    assert got.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(got - truth) / truth)) < 1e-2
    textbook = _naive(None, *arrays)
    assert float(jnp.max(jnp.abs(textbook - truth) / truth)) > 0.5
    jsd = jax.jit(lambda *a: lm.jsd_from_hidden(*a, beta=0.5, chunk_size=(8, 1000)))(*arrays)
    jsd_truth = _naive(0.5, *(x.astype(jnp.float64) for x in arrays))
    assert float(jnp.max(jnp.abs(jsd - jsd_truth) / jsd_truth)) < 1e-2


def test_bfloat16_accumulates_in_float32():
    arrays = [x.astype(jnp.bfloat16) for x in _close_models(1e-2)]
    truth = _naive(None, *(x.astype(jnp.float64) for x in arrays))

    def loss(unembed_q, arrays):
        values = lm.kl_from_hidden(*arrays[:3], unembed_q, chunk_size=(8, 1000))
        return jnp.sum(values.astype(jnp.float32)), values

    grad, got = jax.jit(jax.grad(loss, has_aux=True))(arrays[3], arrays)
    assert got.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(got.astype(jnp.float64) - truth) / truth)) < 1e-2  # bfloat16 rounding: 4e-3

    arrays64 = [x.astype(jnp.float64) for x in arrays]
    grad_truth = jax.grad(lambda u: jnp.sum(_naive(None, *arrays64[:3], u)))(arrays64[3])
    assert grad.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(grad - grad_truth)) / jnp.max(jnp.abs(grad_truth))) < 1e-2


def test_mask_ignores_garbage_under_jit():
    """Masked tokens give 0 and no gradient, even when their hidden states are NaN (padding)."""
    hidden_p, unembed_p, hidden_q, unembed_q = _inputs(batch=())
    mask = jnp.arange(T) < 4
    garbage = hidden_p.at[5].set(jnp.nan)

    @jax.jit
    def loss(hidden_p):
        return jnp.sum(lm.kl_from_hidden(hidden_p, unembed_p, hidden_q, unembed_q, where=mask, chunk_size=3))

    value, grad = jax.value_and_grad(loss)(garbage)
    assert float(value) == pytest.approx(float(jnp.sum(_naive(None, hidden_p, unembed_p, hidden_q, unembed_q)[:4])))
    assert np.all(np.asarray(grad[4:]) == 0) and np.all(np.isfinite(grad))


def test_vmap_over_model_pairs():
    """vmap over every argument (a batch of model pairs, each with its own unembedding) == one by one.
    (jit == eager and vmap == loop are also checked by tests/test_contract.py's rows.)"""
    batched = [jnp.stack([x, x[..., ::-1, :]]) for x in _inputs(batch=())]
    vmapped = jax.jit(jax.vmap(lambda *a: lm.kl_from_hidden(*a, chunk_size=(4, 6))))(*batched)
    for index in range(2):
        np.testing.assert_allclose(vmapped[index], _naive(None, *(x[index] for x in batched)), rtol=1e-12)


def test_jsd_limits_and_bounds():
    """JSD_beta / beta -> KL(P || Q) as beta -> 0 (the beta = 0 value), JSD_1/2 <= log 2, symmetric."""
    # equal hidden sizes: swapping the models needs no new compile; unembeddings scaled so that the
    # chi^2 divergence, which sets the O(beta) remainder of the limits, stays moderate
    arrays = [x * scale for x, scale in zip(_inputs(batch=(), h_q=H_P), (1.0, 0.3, 1.0, 0.3))]
    jsd = jax.jit(lambda beta, *a: lm.jsd_from_hidden(*a, beta=beta))
    np.testing.assert_allclose(jsd(1e-9, *arrays) / 1e-9, jsd(0.0, *arrays), rtol=1e-6)
    np.testing.assert_allclose(jsd(1 - 1e-9, *arrays) / 1e-9, jsd(1.0, *arrays), rtol=1e-6)
    half = jsd(0.5, *arrays)
    swapped = jsd(0.5, *arrays[2:], *arrays[:2])
    np.testing.assert_allclose(half, swapped, rtol=1e-12)
    assert np.all(np.asarray(half) <= np.log(2))


def test_temperature_gradient_scales_as_inverse_square():
    """Hinton et al. 2015: at high temperature the gradient of the divergence scales as 1/T^2."""
    arrays = _inputs(batch=())

    @jax.jit  # temperature traced: one compile
    def grad_norm(temperature):
        grad = jax.grad(lambda u: jnp.sum(lm.kl_from_hidden(arrays[0], u, *arrays[2:], temperature=temperature)))
        return jnp.linalg.norm(grad(arrays[1]))

    assert float(grad_norm(200.0) / grad_norm(100.0)) == pytest.approx(0.25, rel=0.03)


def test_memory_is_bounded_by_the_chunk():
    """The compiled gradient's temporaries stay far below one (T, V) array of logits."""
    tokens, vocabulary, h = 512, 8192, 16
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((tokens, h), (h, vocabulary)) * 2]

    def loss(*a):
        return jnp.sum(lm.kl_from_hidden(*a, chunk_size=(64, 512)))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*shapes).compile()
    logits_bytes = tokens * vocabulary * 4
    assert compiled.memory_analysis().temp_size_in_bytes < logits_bytes / 8


@pytest.mark.parametrize("arg, bad, name", [
    ("hidden_q", lambda a: a[..., :-1], "hidden_q"),  # hidden size differs from unembed_q's
    ("unembed_q", lambda a: a[:, :-1], "unembed_q"),  # vocabulary differs from unembed_p's
    ("hidden_q", lambda a: a[:, :-1], "hidden_q"),  # token shapes differ
    ("unembed_p", lambda a: a[None], "unembed_p"),
])
def test_shape_errors_eagerly_and_under_jit(arg, bad, name):
    arrays = dict(zip(("hidden_p", "unembed_p", "hidden_q", "unembed_q"), _inputs()))
    arrays[arg] = bad(arrays[arg])
    for function in (lm.kl_from_hidden, jax.jit(lm.kl_from_hidden), jax.jit(lm.jsd_from_hidden)):
        with pytest.raises(ValueError, match=f"`{name}`"):
            function(*arrays.values())


def test_bad_options():
    arrays = _inputs()
    for temperature in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match="`temperature`"):
            lm.kl_from_hidden(*arrays, temperature=temperature)
    for beta in (-0.1, 1.5, np.nan):
        with pytest.raises(ValueError, match="`beta`"):
            lm.jsd_from_hidden(*arrays, beta=beta)
    for chunk_size in (0, (4, 0), -3):
        with pytest.raises(ValueError, match="`chunk_size`"):
            lm.kl_from_hidden(*arrays, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="`hidden_p`"):
        lm.kl_from_hidden(arrays[0].at[0, 0, 0].set(jnp.nan), *arrays[1:])
    with pytest.raises(TypeError, match="`where`"):
        lm.kl_from_hidden(*arrays, where=jnp.ones((2, T)))
    # Under jit a bad temperature or beta gives NaN, never a finite number.
    kl = jax.jit(lambda t: lm.kl_from_hidden(*arrays, temperature=t))(-1.0)
    jsd = jax.jit(lambda b: lm.jsd_from_hidden(*arrays, beta=b))(1.5)
    assert np.all(np.isnan(kl)) and np.all(np.isnan(jsd))
