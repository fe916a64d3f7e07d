"""A tiny causal transformer language model (equinox layers), its corpus and exact enumeration.

The study ``experiments.lm_kl_finetune`` needs a *learned* reference model small enough that every
sequence can be enumerated. This module holds the pieces that are not the study itself:

* ``TinyLM``: token and position embeddings, pre-norm blocks of ``eqx.nn.MultiheadAttention`` (causal
  mask) and ``eqx.nn.MLP``, a final ``eqx.nn.LayerNorm`` and an unembedding matrix ``(h, V)``. The model
  reads ``[BOS, x_1, ..., x_{L-1}]`` and its final hidden state at position t gives the distribution of
  x_{t+1}: ``hidden(tokens) @ unembed``, the form ``kljax.lm.kl_from_hidden`` takes.
* ``markov_corpus``: text from a seeded second-order Markov chain (each next token depends on the two
  before it, rows Dirichlet(``concentration``)), generated on the spot: nothing is downloaded.
* ``enumerate_log_probs``: log pi(x) of all V**L sequences from one forward pass over the V**(L-1)
  prefixes (a causal model's logits at positions < L do not depend on the last token), so
  enumeration costs 1/V of a pass over every sequence.
"""

from __future__ import annotations

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

DTYPE = jnp.float32


class Block(eqx.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    attention_norm: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    mlp_norm: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, width: int, num_heads: int, *, key):
        attention_key, mlp_key = jax.random.split(key)
        self.attention_norm = eqx.nn.LayerNorm(width, dtype=DTYPE)
        self.attention = eqx.nn.MultiheadAttention(num_heads, width, dtype=DTYPE, key=attention_key)
        self.mlp_norm = eqx.nn.LayerNorm(width, dtype=DTYPE)
        self.mlp = eqx.nn.MLP(width, width, 4 * width, 1, activation=jax.nn.gelu, dtype=DTYPE, key=mlp_key)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        y = jax.vmap(self.attention_norm)(x)
        x = x + self.attention(y, y, y, mask=mask)
        return x + jax.vmap(self.mlp)(jax.vmap(self.mlp_norm)(x))


class TinyLM(eqx.Module):
    """A causal transformer over ``vocab_size`` tokens (plus a BOS input token) and ``length`` positions."""

    token_embedding: eqx.nn.Embedding
    position_embedding: eqx.nn.Embedding
    blocks: tuple[Block, ...]
    final_norm: eqx.nn.LayerNorm
    unembed: jax.Array  # (width, vocab_size)

    def __init__(self, vocab_size: int, length: int, width: int, num_layers: int, num_heads: int, *, key):
        keys = jax.random.split(key, num_layers + 3)
        self.token_embedding = eqx.nn.Embedding(vocab_size + 1, width, dtype=DTYPE, key=keys[0])
        self.position_embedding = eqx.nn.Embedding(length, width, dtype=DTYPE, key=keys[1])
        self.blocks = tuple(Block(width, num_heads, key=k) for k in keys[3:])
        self.final_norm = eqx.nn.LayerNorm(width, dtype=DTYPE)
        self.unembed = jax.random.normal(keys[2], (width, vocab_size), DTYPE) / np.sqrt(width)

    @property
    def vocab_size(self) -> int:
        return self.unembed.shape[1]

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Final hidden states (L, width) for the sequence ``tokens`` (L,): row t predicts ``tokens[t]``."""
        length = tokens.shape[0]
        inputs = jnp.concatenate([jnp.full((1,), self.vocab_size, tokens.dtype), tokens[:-1]])
        x = jax.vmap(self.token_embedding)(inputs) + jax.vmap(self.position_embedding)(jnp.arange(length))
        mask = jnp.tril(jnp.ones((length, length), bool))
        for block in self.blocks:
            x = block(x, mask)
        return jax.vmap(self.final_norm)(x)

    def logits(self, tokens: jax.Array) -> jax.Array:
        return self.hidden(tokens) @ self.unembed

    def token_log_probs(self, tokens: jax.Array) -> jax.Array:
        """log pi(x_t | x_<t), shape (L,)."""
        log_probs = jax.nn.log_softmax(self.logits(tokens), axis=-1)
        return jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]

    def sample(self, key: jax.Array, length: int) -> jax.Array:
        """One sequence x ~ pi, token by token: L full forward passes (no cache is worth it at L <= 6),
        in a ``fori_loop`` so that the program holds one copy of the network."""
        keys = jax.random.split(key, length)

        def step(t, tokens):
            logits = jax.lax.dynamic_index_in_dim(self.logits(tokens), t, keepdims=False)
            return tokens.at[t].set(jax.random.categorical(keys[t], logits).astype(jnp.int32))

        return jax.lax.fori_loop(0, length, step, jnp.zeros((length,), jnp.int32))


def init_models(seeds, vocab_size: int, length: int, width: int, num_layers: int, num_heads: int, *,
                stream: int = 0):
    """One ``TinyLM`` per seed, stacked along a leading axis, initialised with NumPy.

    The shapes come from ``eqx.filter_eval_shape`` (nothing computed); the values are drawn from
    ``default_rng([stream, seed, leaf])``: embeddings N(0, 1), the unembedding N(0, 1 / width), other
    matrices U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (equinox's ``Linear`` default), LayerNorm scales 1 and
    biases 0. Compiled random-number kernels (threefry) would cost more compile time than the
    training of these models takes on a CPU.
    """
    template = eqx.filter_eval_shape(TinyLM, vocab_size, length, width, num_layers, num_heads,
                                     key=jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    values = []
    for index, (path, leaf) in enumerate(leaves):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            values.append(leaf)
            continue
        name = jax.tree_util.keystr(path)
        draws = []
        for seed in seeds:
            rng = np.random.default_rng([stream, int(seed), index])
            if "embedding" in name:
                draws.append(rng.normal(size=leaf.shape))
            elif name.endswith(".unembed"):
                draws.append(rng.normal(size=leaf.shape) / np.sqrt(width))
            elif name.endswith(".bias"):
                draws.append(np.zeros(leaf.shape))
            elif len(leaf.shape) == 1:  # LayerNorm scale
                draws.append(np.ones(leaf.shape))
            else:
                bound = 1.0 / np.sqrt(leaf.shape[-1])
                draws.append(rng.uniform(-bound, bound, size=leaf.shape))
        values.append(jnp.asarray(np.stack(draws).astype(np.float32)))
    return jax.tree_util.tree_unflatten(treedef, values)


def unstack(models, index: int = 0):
    """Model ``index`` of a stack made by ``init_models``."""
    return jax.tree.map(lambda leaf: leaf[index] if isinstance(leaf, jax.Array) else leaf, models)


def keys_for(seed: int, stream: int, count: int) -> jax.Array:
    """``count`` independent PRNG keys from NumPy's seed sequence ``[seed, stream]``, without a compiled
    ``jax.random.split``."""
    data = np.random.default_rng([seed, stream]).integers(0, 2**32, size=(count, 2), dtype=np.uint32)
    return jax.random.wrap_key_data(jnp.asarray(data))


def num_parameters(model) -> int:
    return int(sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array))))


def markov_corpus(seed: int, vocab_size: int, length: int, num_sequences: int, *, concentration: float,
                  stream: int = 0) -> tuple[np.ndarray, dict]:
    """Sequences from a seeded second-order Markov chain: x_1 ~ p0, x_2 ~ p1(. | x_1), x_t ~ P(. | x_{t-2}, x_{t-1}).

    The chain (its tables) depends on ``seed`` only; ``stream`` selects independent draws of text
    (training, held-out, test) from the same chain.

    Returns:
        ``(tokens (num_sequences, length) int32, tables)``.
    """
    rng = np.random.default_rng([seed, 0])
    first = rng.dirichlet(np.full(vocab_size, 1.0))
    second = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
    transition = rng.dirichlet(np.full(vocab_size, concentration), size=(vocab_size, vocab_size))
    draw = np.random.default_rng([seed, 1, stream])
    tokens = np.empty((num_sequences, length), np.int32)

    def pick(probs):  # one categorical draw per row by inverse CDF
        u = draw.random(probs.shape[0])[:, None]
        return np.minimum((np.cumsum(probs, axis=1) < u).sum(axis=1), vocab_size - 1)

    tokens[:, 0] = pick(np.broadcast_to(first, (num_sequences, vocab_size)))
    if length > 1:
        tokens[:, 1] = pick(second[tokens[:, 0]])
    for t in range(2, length):
        tokens[:, t] = pick(transition[tokens[:, t - 2], tokens[:, t - 1]])
    return tokens, {"first": first, "second": second, "transition": transition}


def markov_log_probs(tables: dict, sequences: np.ndarray) -> np.ndarray:
    """log P(x) of each sequence under the generating chain."""
    x = sequences
    log_p = np.log(tables["first"][x[:, 0]])
    if x.shape[1] > 1:
        log_p = log_p + np.log(tables["second"][x[:, 0], x[:, 1]])
    for t in range(2, x.shape[1]):
        log_p = log_p + np.log(tables["transition"][x[:, t - 2], x[:, t - 1], x[:, t]])
    return log_p


def all_sequences(vocab_size: int, length: int) -> np.ndarray:
    """Every sequence, (V**L, L), in lexicographic order (first token most significant)."""
    return np.asarray(list(itertools.product(range(vocab_size), repeat=length)), np.int32)


def enumerate_log_probs(model: TinyLM, vocab_size: int, length: int) -> jax.Array:
    """log pi(x) of all V**L sequences in ``all_sequences`` order, from a pass over the V**(L-1) prefixes."""
    prefixes = jnp.asarray(all_sequences(vocab_size, length - 1))
    padded = jnp.concatenate([prefixes, jnp.zeros((prefixes.shape[0], 1), jnp.int32)], axis=1)
    log_probs = jax.nn.log_softmax(jax.vmap(model.logits)(padded), axis=-1)  # (V**(L-1), L, V)
    prefix_part = jnp.take_along_axis(log_probs[:, :-1], prefixes[:, :, None], axis=-1)[:, :, 0].sum(axis=1)
    return (prefix_part[:, None] + log_probs[:, -1]).reshape(-1)


def pretrain(model: TinyLM, corpus: jax.Array, key: jax.Array, *, steps: int, batch_size: int,
             learning_rate: float) -> TinyLM:
    """Maximum likelihood on random batches of the corpus (Adam, cosine-decayed step size)."""
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, 0.05))

    def loss(p, batch):
        m = eqx.combine(p, static)
        return -jnp.mean(jax.vmap(m.token_log_probs)(batch))

    def step(carry, k):
        p, state = carry
        batch = corpus[jax.random.randint(k, (batch_size,), 0, corpus.shape[0])]
        grads = jax.grad(loss)(p, batch)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, steps))
    return eqx.combine(params, static)
