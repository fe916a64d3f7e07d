"""Per-token divergences between two language models' next-token distributions, from hidden states.

A language model's next-token distribution at position t is ``softmax(h_t @ W / temperature)`` with
``h_t`` the final hidden state (size ``h``) and ``W`` the unembedding matrix (``h x V``). Distillation
and KL-regularised fine-tuning need a divergence between two such models at every token. The
textbook program materialises the ``T x V`` logits of both models (and, for the gradient, several more
arrays of that size): 4 GiB per array at T = 8192, V = 128k in float32. The functions here never hold
more than one chunk of logits per model.

Rules:

* **Chunked over tokens and vocabulary.** A ``lax.scan`` over token chunks holds a ``fori_loop`` over
  vocabulary chunks. The per-token statistics are merged across vocabulary chunks online: a running
  maximum and mass of P's weights (online log-sum-exp, Milakov & Gimelshein 2018), P's mean of the
  log-ratio ``d = logit_q - logit_p`` and the centred moment ``A = E_P[phi(d - E_P d)]`` with
  ``phi(u) = e^u - 1 - u``. Two groups with masses ``W_a, W_b``, means ``m_a, m_b`` and moments
  ``A_a, A_b`` merge like the pairwise variance of Chan, Golub & LeVeque (1979):

      m = m_a + alpha (m_b - m_a),   alpha = W_b / (W_a + W_b),
      A = (1 - alpha) [e^(delta_a) A_a + phi(delta_a)] + alpha [e^(delta_b) A_b + phi(delta_b)],

  ``delta_g = m_g - m``: every term is non-negative, so nothing cancels.
* **Cancellation-free value.** ``D(P || Q) = log E_P[e^c] = log1p(A)`` with ``c = d - E_P d`` (the
  centred form of :func:`kljax._math.kl_from_log_weights`): a sum of non-negative terms, each accurate
  to a few ulps, so a per-token KL of 1e-7 over 4096 entries comes out within 1% of float64 in
  float32 (the rounding of the logits themselves is the limit), where ``sum p (log p - log q)`` is
  off by more than 50%. A KL beyond ``log(finfo.max)`` takes the textbook form
  ``log Z_q - log Z_p - E_P d``, which has nothing to cancel there.
* **Memory-bounded gradient.** A custom VJP keeps only the inputs and a few numbers per token
  (``log Z_p``, ``E_P d``, the divergence) and recomputes each chunk's logits in the backward pass,
  with the closed-form softmax Jacobians ``dD/dlogit_p = -P c`` and ``dD/dlogit_q = Q - P``. Gradients
  reach the hidden states and unembeddings of both sides; hold a teacher fixed with
  ``jax.lax.stop_gradient`` (the caller's choice). The backward pass loops over vocabulary chunks
  outside and token chunks inside, so that the unembedding's gradient is accumulated one chunk of
  columns at a time.
* **Precision.** bfloat16 and float16 inputs are multiplied with float32 accumulation and every
  statistic is float32; the result is cast back to the inputs' dtype (as :mod:`kljax._math` does).
* **Temperature.** ``logits = hidden @ unembed / temperature`` on both sides. The gradient of a
  divergence between temperature-softened distributions scales as ``1 / temperature^2`` at high
  temperature (Hinton, Vinyals & Dean 2015, Section 2.1); multiply the loss by ``temperature^2`` to
  keep the gradient's magnitude when changing the temperature, as distillation recipes do.
* **Skew Jensen-Shannon.** ``JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M)`` with
  ``M = beta P + (1 - beta) Q`` (Agarwal et al. 2024, GKD, Section 3; TRL's ``generalized_jsd_loss``
  with P the teacher). Since ``JSD_beta / beta -> KL(P || Q)`` as ``beta -> 0`` and
  ``JSD_beta / (1 - beta) -> KL(Q || P)`` as ``beta -> 1``, the end points are defined as those limits:
  ``beta = 0`` gives ``KL(P || Q)`` and ``beta = 1`` gives ``KL(Q || P)`` (as GKD and TRL do). Its
  terms ``beta p log(p/m) + (1 - beta) q log(q/m) >= 0`` are evaluated pointwise without cancellation.

Bad input: shape mismatches (hidden vs unembedding size, the two vocabularies, the two token shapes),
``temperature <= 0``, ``beta`` outside [0, 1], ``chunk_size <= 0`` raise eagerly naming the argument;
shape problems raise at trace time under ``jit``, and a traced bad ``temperature`` or ``beta`` gives NaN.
NaN or inf in a hidden state or unembedding raise eagerly; under ``jit`` they give NaN for the tokens
they touch.

References:
    G. Hinton, O. Vinyals and J. Dean, "Distilling the Knowledge in a Neural Network",
    arXiv:1503.02531, 2015 (temperature, Section 2.1: gradients scale as 1/T^2).
    R. Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes" (GKD), ICLR 2024, arXiv:2306.13649 (generalised JSD).
    M. Milakov and N. Gimelshein, "Online normalizer calculation for softmax", arXiv:1805.02867, 2018.
    T. F. Chan, G. H. Golub and R. J. LeVeque, "Updating formulae and a pairwise algorithm for
    computing sample variances", Stanford CS report STAN-CS-79-773, 1979.
    P.-L. Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", arXiv:2410.10989, 2024
    (fused linear + divergence losses).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from kljax._contract import (Constraint, as_float_array, check, check_eagerly, check_int, finite_positive,
                             nan_unless, real)
from kljax._math import _phi_series, computation_dtype, exp_minus_one_minus

__all__ = ["kl_from_hidden", "jsd_from_hidden"]

#: Default (tokens, vocabulary entries) per chunk: 1M logits (4 MiB in float32) per model, and
#: matrix products large enough to run at full speed.
DEFAULT_CHUNK_SIZE = (512, 2048)

_unit_interval = Constraint(lambda x: (x >= 0) & (x <= 1), "in [0, 1]")

# Below this |c| phi(c) comes from its series (see kljax._math); beyond _LARGE, w e^c is formed from
# Q's logit directly, so that neither overflows nor 0 * inf appears where P's weight underflows.
_SERIES_RADIUS = 0.5
_LARGE = 40.0


# --------------------------------------------------------------------------------------------------
# Arguments


def _chunk_sizes(chunk_size, num_tokens, vocabulary):
    if chunk_size is None:
        tokens, entries = DEFAULT_CHUNK_SIZE
    elif isinstance(chunk_size, (tuple, list)):
        if len(chunk_size) != 2:
            raise ValueError(f"`chunk_size` must be an int or a pair (tokens, vocabulary), got {chunk_size!r}.")
        tokens = check_int("chunk_size", chunk_size[0], 1)
        entries = check_int("chunk_size", chunk_size[1], 1)
    else:
        tokens = entries = check_int("chunk_size", chunk_size, 1)
    return max(1, min(tokens, num_tokens)), min(entries, vocabulary)


def _prepare(hidden_p, unembed_p, hidden_q, unembed_q, temperature, chunk_size, where):
    """Checks the arguments; returns the flattened inputs, the token mask, the chunk sizes and more."""
    arrays = {"hidden_p": hidden_p, "unembed_p": unembed_p, "hidden_q": hidden_q, "unembed_q": unembed_q}
    arrays = {name: as_float_array(name, x) for name, x in arrays.items()}
    hidden_p, unembed_p, hidden_q, unembed_q = arrays.values()
    for side in "pq":
        hidden, unembed = arrays[f"hidden_{side}"], arrays[f"unembed_{side}"]
        if hidden.ndim < 2:
            raise ValueError(f"`hidden_{side}` must have shape (..., T, h), got {hidden.shape}.")
        if unembed.ndim != 2:
            raise ValueError(f"`unembed_{side}` must have shape (h, V), got {unembed.shape}.")
        if hidden.shape[-1] != unembed.shape[0]:
            raise ValueError(
                f"`hidden_{side}` of shape {hidden.shape} has hidden size {hidden.shape[-1]} but "
                f"`unembed_{side}` of shape {unembed.shape} expects {unembed.shape[0]}.")
    if unembed_p.shape[1] != unembed_q.shape[1]:
        raise ValueError(f"`unembed_q` must have the vocabulary of `unembed_p`: got V = {unembed_q.shape[1]} "
                         f"(shape {unembed_q.shape}) and V = {unembed_p.shape[1]} (shape {unembed_p.shape}).")
    if hidden_p.shape[:-1] != hidden_q.shape[:-1]:
        raise ValueError(f"`hidden_q` must have the token shape of `hidden_p`: got {hidden_q.shape} and "
                         f"{hidden_p.shape} (the last axis, the hidden size, may differ).")
    token_shape = hidden_p.shape[:-1]
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"`where` must be a boolean array, got {where.dtype}.")
        if where.shape != token_shape:
            raise ValueError(f"`where` must have the token shape {token_shape} of `hidden_p`, got {where.shape}.")
    for name, x in arrays.items():
        check_eagerly(name, x, real)
    temperature_ok = check("temperature", temperature, finite_positive)
    dtype = jnp.result_type(*arrays.values())
    compute = computation_dtype(dtype)
    num_tokens = math.prod(token_shape)
    chunks = _chunk_sizes(chunk_size, num_tokens, unembed_p.shape[1])
    # Temperature scales the hidden states (N x h), not the logits: autodiff then carries its gradient.
    # The default 1 skips it (no scaled copy of the hidden states).
    unit_temperature = isinstance(temperature, (int, float)) and temperature == 1
    temperature = jnp.asarray(temperature, compute)

    def flat(hidden):
        hidden = hidden.reshape(num_tokens, hidden.shape[-1])
        if where is not None:  # masked tokens: zero rows, so garbage there cannot reach the gradient
            hidden = jnp.where(where.reshape(num_tokens, 1), hidden, jnp.zeros_like(hidden))
        scaled = hidden if unit_temperature else (hidden.astype(compute) / temperature).astype(hidden.dtype)
        padding = -num_tokens % chunks[0]
        return jnp.pad(scaled, ((0, padding), (0, 0))) if padding else scaled

    def finish(per_token):
        per_token = per_token[:num_tokens].reshape(token_shape)
        if where is not None:
            per_token = jnp.where(where, per_token, jnp.zeros_like(per_token))
        return nan_unless(per_token, temperature_ok).astype(dtype)

    return flat(hidden_p), unembed_p, flat(hidden_q), unembed_q, chunks, finish


# --------------------------------------------------------------------------------------------------
# One chunk of logits


def _logits(h_p, unembed_p, h_q, unembed_q, v, entries):
    """Both models' logits for vocabulary chunk ``v`` (float32 or wider) and the chunk's valid columns.

    The last chunk is clamped to end at V (``dynamic_slice`` keeps slices in bounds), so it overlaps
    the one before; the overlapping columns are marked invalid instead of padding the unembeddings
    (which would copy them)."""
    vocabulary = unembed_p.shape[1]
    start = jnp.minimum(v * entries, vocabulary - entries)
    compute = computation_dtype(jnp.result_type(h_p, unembed_p, h_q, unembed_q))
    u_p = lax.dynamic_slice_in_dim(unembed_p, start, entries, axis=1)
    u_q = lax.dynamic_slice_in_dim(unembed_q, start, entries, axis=1)
    l_p = jnp.dot(h_p, u_p, preferred_element_type=compute).astype(compute)
    l_q = jnp.dot(h_q, u_q, preferred_element_type=compute).astype(compute)
    valid = None
    if vocabulary % entries:
        valid = (start + jnp.arange(entries)) >= v * entries
    return l_p, l_q, valid, start, u_p, u_q


def _masked(valid, x, fill=0.0):
    return x if valid is None else jnp.where(valid[None, :], x, jnp.full_like(x, fill))


def _chunk_stats(l_p, l_q, valid):
    """Per row: P's max logit M, mass W = sum e^(l_p - M), mean m = E_P[d], moment A = E_P[phi(d - m)],
    and Q's max logit and mass (for the textbook fall-back)."""
    l_p_valid = _masked(valid, l_p, -jnp.inf)
    top = jnp.max(l_p_valid, axis=-1, keepdims=True)
    w = jnp.exp(l_p_valid - top)
    mass = jnp.sum(w, axis=-1, keepdims=True)
    d = _masked(valid, l_q - l_p)
    mean = jnp.sum(w * d, axis=-1, keepdims=True) / mass
    c = d - mean
    small = jnp.abs(c) < _SERIES_RADIUS
    moderate = c < _LARGE
    c_moderate = jnp.where(moderate & ~small, c, jnp.ones_like(c))
    # w phi(c): series; w (expm1(c) - c) (cancels at most a factor ~5 at |c| = 1/2); for huge c,
    # w e^c = e^(l_q - M - m) from Q's logit (w may have underflowed there).
    terms = jnp.where(small, w * _phi_series(jnp.where(small, c, jnp.zeros_like(c))),
                      jnp.where(moderate, w * (jnp.expm1(c_moderate) - c_moderate),
                                jnp.exp(jnp.where(moderate, jnp.zeros_like(c), l_q - top - mean)) - w * (1 + c)))
    moment = jnp.sum(_masked(valid, terms), axis=-1) / mass[:, 0]
    l_q_valid = _masked(valid, l_q, -jnp.inf)
    top_q = jnp.max(l_q_valid, axis=-1)
    mass_q = jnp.sum(jnp.exp(l_q_valid - top_q[:, None]), axis=-1)
    return top[:, 0], mass[:, 0], mean[:, 0], moment, top_q, mass_q


def _merge(a, b):
    """Merges two groups' statistics (module docstring): online log-sum-exp and the centred moment."""
    top_a, mass_a, mean_a, moment_a, top_qa, mass_qa = a
    top_b, mass_b, mean_b, moment_b, top_qb, mass_qb = b
    top = jnp.maximum(top_a, top_b)
    mass_a = mass_a * jnp.exp(top_a - top)
    mass_b = mass_b * jnp.exp(top_b - top)
    mass = mass_a + mass_b
    alpha, one_minus_alpha = mass_b / mass, mass_a / mass
    gap = mean_b - mean_a
    mean = mean_a + alpha * gap
    delta_a, delta_b = -alpha * gap, one_minus_alpha * gap

    def part(weight, delta, moment):
        value = jnp.exp(delta) * moment + exp_minus_one_minus(delta)
        return jnp.where(weight > 0, weight * value, jnp.zeros_like(value))

    moment = part(one_minus_alpha, delta_a, moment_a) + part(alpha, delta_b, moment_b)
    top_q = jnp.maximum(top_qa, top_qb)
    mass_q = mass_qa * jnp.exp(top_qa - top_q) + mass_qb * jnp.exp(top_qb - top_q)
    return top, mass, mean, moment, top_q, mass_q


def _empty_stats(rows, dtype):
    minus_inf = jnp.full((rows,), -jnp.inf, dtype)
    zero = jnp.zeros((rows,), dtype)
    return minus_inf, zero, zero, zero, minus_inf, zero


def _kl_stats(h_p, unembed_p, h_q, unembed_q, entries, blocks=None):
    """Per token of one token chunk: (log Z_p, E_P[d], KL(P || Q)) over the whole vocabulary."""
    vocabulary = unembed_p.shape[1]
    num_chunks = -(-vocabulary // entries)
    compute = computation_dtype(jnp.result_type(h_p, unembed_p, h_q, unembed_q))

    def step(v, state):
        l_p, l_q, valid, *_ = _logits(h_p, unembed_p, h_q, unembed_q, v, entries)
        return _merge(state, _chunk_stats(l_p, l_q, valid))

    state = _empty_stats(h_p.shape[0], compute)
    if num_chunks == 1:
        state = _merge(state, _chunk_stats(*blocks)) if blocks is not None else step(0, state)
    else:
        state = lax.fori_loop(0, num_chunks, step, state)
    top, mass, mean, moment, top_q, mass_q = state
    log_z_p = top + jnp.log(mass)
    textbook = (top_q + jnp.log(mass_q)) - log_z_p - mean
    kl = jnp.where(jnp.isfinite(moment), jnp.log1p(moment), textbook)
    # NaN or inf in the row's logits (from a non-finite input) shows in the maxima; finite inputs give
    # finite logits, so a non-finite maximum always means bad input: NaN, never a finite number.
    invalid = ~jnp.isfinite(top) | ~jnp.isfinite(top_q) | ~jnp.isfinite(mass) | ~jnp.isfinite(mass_q)
    kl = jnp.where(invalid, jnp.full_like(kl, jnp.nan), kl)
    return log_z_p, mean, kl


# --------------------------------------------------------------------------------------------------
# Shared loops


def _forward(per_token_chunk, chunks, h_p, unembed_p, h_q, unembed_q):
    """Scans ``per_token_chunk(h_p_chunk, h_q_chunk)`` (a tuple of (C,) arrays) over token chunks."""
    tokens = chunks[0]
    num_chunks = h_p.shape[0] // tokens

    def step(_, rows):
        return None, per_token_chunk(*rows)

    xs = (h_p.reshape(num_chunks, tokens, h_p.shape[1]), h_q.reshape(num_chunks, tokens, h_q.shape[1]))
    _, outputs = lax.scan(step, None, xs)
    return tuple(x.reshape(-1) for x in outputs)


def _backward(block_gradients, chunks, h_p, unembed_p, h_q, unembed_q, per_token):
    """Gradients to the four arrays from ``block_gradients(l_p, l_q, per_token_rows) -> (G_p, G_q)``,
    the cotangents of one block of logits; vocabulary chunks outside, token chunks inside."""
    tokens, entries = chunks
    vocabulary = unembed_p.shape[1]
    compute = computation_dtype(jnp.result_type(h_p, unembed_p, h_q, unembed_q))
    num_token_chunks = h_p.shape[0] // tokens
    num_vocab_chunks = -(-vocabulary // entries)

    def vocab_step(v, carry):
        d_h_p, d_h_q, d_u_p, d_u_q = carry

        def token_step(t, inner):
            d_h_p, d_h_q, d_u_p_chunk, d_u_q_chunk = inner
            rows_p = lax.dynamic_slice_in_dim(h_p, t * tokens, tokens)
            rows_q = lax.dynamic_slice_in_dim(h_q, t * tokens, tokens)
            l_p, l_q, valid, start, u_p, u_q = _logits(rows_p, unembed_p, rows_q, unembed_q, v, entries)
            stats = tuple(lax.dynamic_slice_in_dim(x, t * tokens, tokens)[:, None] for x in per_token)
            g_p, g_q = (_masked(valid, g) for g in block_gradients(l_p, l_q, stats))
            d_rows_p = g_p @ u_p.astype(compute).T
            d_rows_q = g_q @ u_q.astype(compute).T
            d_h_p = lax.dynamic_update_slice_in_dim(
                d_h_p, lax.dynamic_slice_in_dim(d_h_p, t * tokens, tokens) + d_rows_p, t * tokens, 0)
            d_h_q = lax.dynamic_update_slice_in_dim(
                d_h_q, lax.dynamic_slice_in_dim(d_h_q, t * tokens, tokens) + d_rows_q, t * tokens, 0)
            d_u_p_chunk = d_u_p_chunk + rows_p.astype(compute).T @ g_p
            d_u_q_chunk = d_u_q_chunk + rows_q.astype(compute).T @ g_q
            return d_h_p, d_h_q, d_u_p_chunk, d_u_q_chunk

        zeros_p = jnp.zeros((h_p.shape[1], entries), compute)
        zeros_q = jnp.zeros((h_q.shape[1], entries), compute)
        d_h_p, d_h_q, d_u_p_chunk, d_u_q_chunk = lax.fori_loop(
            0, num_token_chunks, token_step, (d_h_p, d_h_q, zeros_p, zeros_q))
        start = jnp.minimum(v * entries, vocabulary - entries)
        # Add, not write: the clamped last chunk overlaps the one before (with exactly zero cotangent
        # on the overlap). The accumulators are float32 for 16-bit inputs: XLA:CPU computes a 16-bit
        # update of a slice by converting the whole buffer, at every chunk.
        d_u_p = lax.dynamic_update_slice_in_dim(
            d_u_p, lax.dynamic_slice_in_dim(d_u_p, start, entries, axis=1) + d_u_p_chunk, start, 1)
        d_u_q = lax.dynamic_update_slice_in_dim(
            d_u_q, lax.dynamic_slice_in_dim(d_u_q, start, entries, axis=1) + d_u_q_chunk, start, 1)
        return d_h_p, d_h_q, d_u_p, d_u_q

    init = (jnp.zeros(h_p.shape, compute), jnp.zeros(h_q.shape, compute),
            jnp.zeros(unembed_p.shape, compute), jnp.zeros(unembed_q.shape, compute))
    d_h_p, d_h_q, d_u_p, d_u_q = lax.fori_loop(0, num_vocab_chunks, vocab_step, init)
    return (d_h_p.astype(h_p.dtype), d_u_p.astype(unembed_p.dtype),
            d_h_q.astype(h_q.dtype), d_u_q.astype(unembed_q.dtype))


def _q_minus_p(p, gap, log_p):
    """Q - P = P expm1(gap) with gap = log(Q / P), without 0 * inf where P underflows and gap is huge."""
    near = jnp.abs(gap) < 1
    far = jnp.exp(log_p + jnp.where(near, jnp.zeros_like(gap), gap)) - p
    return jnp.where(near, p * jnp.expm1(jnp.where(near, gap, jnp.zeros_like(gap))), far)


# --------------------------------------------------------------------------------------------------
# KL(P || Q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kl_core(chunks, h_p, unembed_p, h_q, unembed_q):
    return _kl_forward(chunks, h_p, unembed_p, h_q, unembed_q)[0]


def _kl_forward(chunks, h_p, unembed_p, h_q, unembed_q):
    def per_token_chunk(rows_p, rows_q):
        return _kl_stats(rows_p, unembed_p, rows_q, unembed_q, chunks[1])

    log_z_p, mean, kl = _forward(per_token_chunk, chunks, h_p, unembed_p, h_q, unembed_q)
    return kl, (h_p, unembed_p, h_q, unembed_q, log_z_p, mean, kl)


def _kl_gradients(l_p, l_q, stats):
    """dKL/dl_p = -P c, dKL/dl_q = Q - P, with c = d - E_P d and log(Q / P) = c - KL (times the cotangent)."""
    log_z_p, mean, kl, cotangent = stats
    log_p = l_p - log_z_p
    p = jnp.exp(log_p)
    c = (l_q - l_p) - mean
    return -cotangent * p * c, cotangent * _q_minus_p(p, c - kl, log_p)


def _kl_backward(chunks, residuals, cotangent):
    h_p, unembed_p, h_q, unembed_q, log_z_p, mean, kl = residuals
    # A token whose cotangent is 0 (masked, padding) must not contribute 0 * NaN.
    kl_safe = jnp.where(cotangent != 0, kl, jnp.zeros_like(kl))
    per_token = (log_z_p, mean, kl_safe, cotangent.astype(log_z_p.dtype))
    return _backward(_kl_gradients, chunks, h_p, unembed_p, h_q, unembed_q, per_token)


_kl_core.defvjp(_kl_forward, _kl_backward)


def kl_from_hidden(hidden_p, unembed_p, hidden_q, unembed_q, *, temperature=1.0, chunk_size=None, where=None):
    """Per-token ``D(P || Q)`` between two models' next-token distributions, from hidden states.

    With ``P_t = softmax(hidden_p[..., t, :] @ unembed_p / temperature)`` and ``Q_t`` likewise, returns
    ``KL(P_t || Q_t)`` for every token, computed chunk by chunk so that neither the value nor the
    gradient holds all tokens' logits (see the module docstring for the algorithm and its precision).

    Args:
        hidden_p: P's final hidden states, shape (..., T, h_p), differentiable.
        unembed_p: P's unembedding matrix, shape (h_p, V), differentiable.
        hidden_q: Q's hidden states, shape (..., T, h_q) with the token shape of ``hidden_p``
            (the hidden sizes may differ, e.g. teacher and student).
        unembed_q: Q's unembedding matrix, shape (h_q, V).
        temperature: divides both models' logits, > 0 (a scalar; traced values allowed). The gradient
            scales as ``1 / temperature^2`` at high temperature (Hinton et al. 2015).
        chunk_size: ``(tokens, vocabulary entries)`` per chunk of logits; an int ``c`` means
            ``(c, c)``; None means ``DEFAULT_CHUNK_SIZE`` = (512, 4096), each capped at the input's size.
            Peak memory grows with the product; the result does not depend on it (up to rounding).
        where: optional boolean token mask of shape (..., T); masked tokens give 0 and no gradient
            (under ``jit`` even when their hidden states are NaN; eagerly every input must be finite).

    Returns:
        The per-token divergence in nats, shape (..., T), in the inputs' dtype (computed in float32 for
        16-bit inputs).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax import lm
        >>> keys = jax.random.split(jax.random.key(0), 3)
        >>> hidden = jax.random.normal(keys[0], (2, 5, 8))
        >>> unembed_p = jax.random.normal(keys[1], (8, 50))
        >>> unembed_q = unembed_p + 0.5 * jax.random.normal(keys[2], (8, 50))
        >>> kl = lm.kl_from_hidden(hidden, unembed_p, hidden, unembed_q, chunk_size=(4, 16))
        >>> naive = jnp.sum(jax.nn.softmax(hidden @ unembed_p) * (jax.nn.log_softmax(hidden @ unembed_p)
        ...                 - jax.nn.log_softmax(hidden @ unembed_q)), axis=-1)
        >>> kl.shape, bool(jnp.allclose(kl, naive, rtol=1e-4, atol=1e-6))
        ((2, 5), True)

    References:
        G. Hinton, O. Vinyals and J. Dean, arXiv:1503.02531, 2015 (temperature);
        P.-L. Hsu et al., arXiv:2410.10989, 2024 (chunked linear + divergence losses).
    """
    h_p, u_p, h_q, u_q, chunks, finish = _prepare(hidden_p, unembed_p, hidden_q, unembed_q, temperature,
                                                  chunk_size, where)
    return finish(_kl_core(chunks, h_p, u_p, h_q, u_q))


# --------------------------------------------------------------------------------------------------
# Generalised Jensen-Shannon


def _chi_series(u):
    """chi(u) = e^u (u - 1) + 1 = sum_{n >= 2} (n - 1) u^n / n!, for |u| < 1/2."""
    terms = 10 if jnp.finfo(u.dtype).bits <= 32 else 18
    series = jnp.full_like(u, (terms - 1) / math.factorial(terms))
    for n in range(terms - 1, 1, -1):
        series = u * series + (n - 1) / math.factorial(n)
    return u * u * series


def _jsd_pieces(l_p, l_q, log_z_p, mean, kl, beta):
    """Pointwise pieces of the JSD of one block: log P, log-ratio r = log(P/Q), u_p = log(P/M), u_q = log(Q/M),
    log M (all accurate when P and Q are close)."""
    log_p = l_p - log_z_p
    r = kl - ((l_q - l_p) - mean)  # log P - log Q = KL - c
    log_q = log_p - r
    near = jnp.abs(r) < 1
    r_near = jnp.where(near, r, jnp.zeros_like(r))
    u_p_near = -jnp.log1p((1 - beta) * jnp.expm1(-r_near))  # -log(beta + (1 - beta) Q/P)
    log_beta, log_rest = jnp.log(beta), jnp.log1p(-beta)
    log_m_far = jnp.logaddexp(log_beta + log_p, log_rest + log_q)
    u_p = jnp.where(near, u_p_near, log_p - log_m_far)
    u_q = jnp.where(near, u_p_near - r_near, log_q - log_m_far)
    log_m = jnp.where(near, log_p - u_p_near, log_m_far)
    return log_p, r, log_q, u_p, u_q, log_m


def _m_chi(u, log_x, log_m):
    """M chi(log(X/M)) = X log(X/M) - X + M >= 0, from u = log(X/M): series near 0, direct beyond."""
    small = jnp.abs(u) < _SERIES_RADIUS
    series = jnp.exp(log_m) * _chi_series(jnp.where(small, u, jnp.zeros_like(u)))
    u_far = jnp.where(small | ~jnp.isfinite(u), jnp.zeros_like(u), u)
    direct = jnp.exp(log_x) * (u_far - 1) + jnp.exp(log_m)
    return jnp.where(small, series, direct)


def _jsd_terms(l_p, l_q, valid, log_z_p, mean, kl, beta):
    """Per row: KL(P || M), KL(Q || M) and KL(Q || P), each a sum of non-negative pointwise terms."""
    log_p, r, log_q, u_p, u_q, log_m = _jsd_pieces(l_p, l_q, log_z_p, mean, kl, beta)
    to_p = _m_chi(u_p, log_p, log_m)
    to_q = _m_chi(u_q, log_q, log_m)
    reverse = _m_chi(-r, log_q, log_p)  # P chi(log(Q/P)) = KL(Q || P)'s terms
    return tuple(jnp.sum(_masked(valid, x), axis=-1) for x in (to_p, to_q, reverse))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _jsd_core(chunks, h_p, unembed_p, h_q, unembed_q, beta):
    return _jsd_forward(chunks, h_p, unembed_p, h_q, unembed_q, beta)[0]


def _jsd_value(kl, to_p, to_q, reverse, beta):
    general = beta * to_p + (1 - beta) * to_q
    return jnp.where(beta == 0, kl, jnp.where(beta == 1, reverse, general))


def _jsd_forward(chunks, h_p, unembed_p, h_q, unembed_q, beta):
    entries = chunks[1]
    vocabulary = unembed_p.shape[1]
    num_chunks = -(-vocabulary // entries)

    def per_token_chunk(rows_p, rows_q):
        blocks = None
        if num_chunks == 1:  # one block of logits per token chunk: compute it once for both passes
            l_p, l_q, valid, *_ = _logits(rows_p, unembed_p, rows_q, unembed_q, 0, entries)
            blocks = (l_p, l_q, valid)
        log_z_p, mean, kl = _kl_stats(rows_p, unembed_p, rows_q, unembed_q, entries, blocks)
        safe = [jnp.where(jnp.isfinite(kl), x, jnp.zeros_like(x))[:, None] for x in (log_z_p, mean, kl)]

        def step(v, sums):
            l_p, l_q, valid, *_ = _logits(rows_p, unembed_p, rows_q, unembed_q, v, entries)
            return tuple(a + b for a, b in zip(sums, _jsd_terms(l_p, l_q, valid, *safe, beta)))

        zeros = (jnp.zeros_like(kl),) * 3
        sums = _jsd_terms(*blocks, *safe, beta) if blocks is not None else lax.fori_loop(0, num_chunks, step, zeros)
        nan = jnp.isnan(kl)
        sums = tuple(jnp.where(nan, jnp.full_like(x, jnp.nan), x) for x in sums)
        return (log_z_p, mean, kl) + sums

    log_z_p, mean, kl, to_p, to_q, reverse = _forward(per_token_chunk, chunks, h_p, unembed_p, h_q, unembed_q)
    value = _jsd_value(kl, to_p, to_q, reverse, beta)
    return value, (h_p, unembed_p, h_q, unembed_q, log_z_p, mean, kl, to_p, to_q, reverse, beta)


def _jsd_backward(chunks, residuals, cotangent):
    h_p, unembed_p, h_q, unembed_q, log_z_p, mean, kl, to_p, to_q, reverse, beta = residuals
    live = cotangent != 0
    per_token = tuple(jnp.where(live, x, jnp.zeros_like(x)) for x in (log_z_p, mean, kl, to_p, to_q, reverse))
    per_token += (cotangent.astype(log_z_p.dtype),)

    def block_gradients(l_p, l_q, stats):
        log_z_p, mean, kl, to_p, to_q, reverse, g = stats
        log_p, r, log_q, u_p, u_q, log_m = _jsd_pieces(l_p, l_q, log_z_p, mean, kl, beta)
        p = jnp.exp(log_p)
        q = jnp.exp(log_q)
        q_minus_p = _q_minus_p(p, -r, log_p)
        # General beta: dJSD/dl_p = beta P (u_p - KL(P||M)), dJSD/dl_q = (1 - beta) Q (u_q - KL(Q||M));
        # beta = 0 is KL(P || Q): (P (r - KL), Q - P); beta = 1 is KL(Q || P): (P - Q, Q (-r - KL(Q||P))).
        g_p = jnp.where(beta == 0, p * (r - kl), jnp.where(beta == 1, -q_minus_p, beta * p * (u_p - to_p)))
        g_q = jnp.where(beta == 0, q_minus_p,
                        jnp.where(beta == 1, q * (-r - reverse), (1 - beta) * q * (u_q - to_q)))
        return g * g_p, g * g_q

    gradients = _backward(block_gradients, chunks, h_p, unembed_p, h_q, unembed_q, per_token)
    return gradients + (jnp.zeros_like(beta),)


_jsd_core.defvjp(_jsd_forward, _jsd_backward)


def jsd_from_hidden(hidden_p, unembed_p, hidden_q, unembed_q, *, beta=0.5, temperature=1.0, chunk_size=None,
                    where=None):
    """Per-token generalised (skew) Jensen-Shannon divergence between two models, from hidden states.

    ``JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M)`` with ``M = beta P + (1 - beta) Q``
    (GKD's convention, Agarwal et al. 2024). ``beta = 0`` gives ``KL(P || Q)`` and ``beta = 1`` gives
    ``KL(Q || P)``: the limits of ``JSD_beta / beta`` and ``JSD_beta / (1 - beta)``, as in GKD and TRL.
    ``beta = 0.5`` is the symmetric Jensen-Shannon divergence (at most log 2). Chunked like
    :func:`kl_from_hidden`, with a second pass over the vocabulary (the mixture needs both
    normalisers) unless the vocabulary fits in one chunk.

    Args:
        hidden_p, unembed_p, hidden_q, unembed_q: as for :func:`kl_from_hidden`.
        beta: the skew, in [0, 1] (a scalar; traced values allowed; no gradient flows to it).
        temperature: divides both models' logits, > 0.
        chunk_size: ``(tokens, vocabulary entries)`` per chunk (see :func:`kl_from_hidden`).
        where: optional boolean token mask of shape (..., T); masked tokens give 0 and no gradient.

    Returns:
        The per-token divergence in nats, shape (..., T), in the inputs' dtype. A ``beta`` outside
        [0, 1] raises ``ValueError`` when concrete and gives NaN under ``jit``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax import lm
        >>> keys = jax.random.split(jax.random.key(0), 3)
        >>> hidden = jax.random.normal(keys[0], (5, 8))
        >>> unembed_p, unembed_q = jax.random.normal(keys[1], (8, 50)), jax.random.normal(keys[2], (8, 50))
        >>> jsd = lm.jsd_from_hidden(hidden, unembed_p, hidden, unembed_q, beta=0.5, chunk_size=16)
        >>> p, q = jax.nn.softmax(hidden @ unembed_p), jax.nn.softmax(hidden @ unembed_q)
        >>> m = 0.5 * (p + q)
        >>> naive = 0.5 * jnp.sum(p * jnp.log(p / m) + q * jnp.log(q / m), axis=-1)
        >>> bool(jnp.allclose(jsd, naive, rtol=1e-4)), bool(jnp.all(jsd <= jnp.log(2.0)))
        (True, True)

    References:
        R. Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
        Mistakes", ICLR 2024, arXiv:2306.13649, Section 3 (generalised JSD);
        J. Lin, "Divergence measures based on the Shannon entropy", IEEE Trans. Inf. Theory, 1991.
    """
    beta_ok = check("beta", beta, _unit_interval)
    h_p, u_p, h_q, u_q, chunks, finish = _prepare(hidden_p, unembed_p, hidden_q, unembed_q, temperature,
                                                  chunk_size, where)
    compute = computation_dtype(jnp.result_type(h_p, u_p, h_q, u_q))
    beta_value = lax.stop_gradient(jnp.asarray(beta, compute))
    if beta_value.ndim:
        raise ValueError(f"`beta` must be a scalar, got shape {beta_value.shape}.")
    # A bad beta is replaced by 1/2 inside (no NaN in the loops) and the result made NaN outside.
    beta_value = jnp.where(beta_ok, beta_value, jnp.full_like(beta_value, 0.5))
    value = _jsd_core(chunks, h_p, u_p, h_q, u_q, beta_value)
    return finish(nan_unless(value, beta_ok))
