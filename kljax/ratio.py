"""Density-ratio and variational estimators of KL divergence and mutual information, trained with optax.

From samples ``x ~ P`` of shape ``(n, d)`` and ``y ~ Q`` of shape ``(m, d)`` a model ``f`` is trained
to tell the two samples apart; at its optimum ``f`` is (an affine function of) the log density ratio
``log p/q``, and the KL is read off it. Unlike k-NN estimators the error does not grow with the
dimension through neighbour distances; it is that of fitting ``log p/q`` with the chosen model.

Methods (``method=``), each with its objective for ``f`` and its estimate:

==============  ==================================================  ==========================================
method          training objective (maximised)                      estimate from held-out points
==============  ==================================================  ==========================================
``classifier``  balanced logistic log-likelihood, P = 1 vs Q = 0    ``mean_P f``  (f -> log p/q)
``nwj``         ``E_P[f] - E_Q[exp(f - 1)]``                        same functional (f -> 1 + log p/q)
``dv``          ``E_P[f] - log E_Q[exp f]`` (MINE gradient)         same functional (f -> log p/q + c)
==============  ==================================================  ==========================================

Rules that hold for every method:

* **Cross-fitting.** The points are split at random into ``num_folds`` folds; fold k's model is trained
  on the other folds and evaluated on fold k only, so the fit's in-sample optimism does not enter the
  estimate (for ``P = Q`` the held-out logits have mean ~0, whereas in-sample ones are biased upwards);
  what remains is the fitted model's own error on new points. The estimate averages the held-out
  terms; the folds' models are trained together (``jax.vmap`` over folds, a ``lax.scan`` over steps or
  a ``lax.while_loop`` over Newton steps: the whole training is one jitted program).
* **Prior correction.** Each training step draws ``batch_size`` points from P and as many from Q (the
  Newton fit weights P's training points by 1/(2n) and Q's by 1/(2m)), so the classifier sees
  balanced classes and its logit estimates ``log p/q`` itself; it is the log(n/m)
  prior correction (Bickel et al. 2009; Sugiyama et al. 2012, ch. 4) applied in the sampling instead of
  subtracted afterwards, and it keeps working when m and n differ by orders of magnitude.
* **Standard error.** ``kl_with_stderr`` returns the larger of two standard errors: the per-point one
  and the one from the spread of the ``num_folds`` fold estimates (which also sees the spread between
  trained models). For the quadratic classifier the per-point one is the delta method's,
  ``sqrt(Var_P(f) / n + g^T C g)``: the first term is P's sampling noise at fixed ``f``, the second the
  fitted model's (both samples'), with ``g`` the mean feature vector over P and ``C`` the logistic fit's
  sandwich covariance (Huber 1967), averaged over the folds; otherwise it is ``std(held-out terms) /
  sqrt(n)``. Neither covers the estimator's bias: the classifier's O(p / n) overfitting bias (p
  parameters; positive for KL) or a model too weak for ``log p/q``.
* **Divergence.** A training run whose loss or parameters turn non-finite gives a NaN estimate and
  ``diverged=True`` in :func:`kl_with_diagnostics`; :func:`kl` and :func:`kl_with_stderr` then return
  NaN and, called eagerly, warn (``RuntimeWarning``). A finite number is never presented as an estimate
  of a run that diverged.
* **Overfitting bias and its extrapolation.** The held-out mean of a maximum-likelihood logistic fit
  with p parameters is still biased, by about c / N with N its training points (the fitted
  coefficients are inflated by O(p / N); Sur & Candes 2019): positive for KL. With ``extrapolate=True``
  (default; quadratic classifier) every fold is fitted twice, without its own fold (N_a = (K - 1)/K of
  the points) and without the next fold too (N_b = (K - 2)/K), both evaluated on the fold's held-out
  points, and the terms ``(K - 1) f_a - (K - 2) f_b`` cancel the c / N term (Richardson
  extrapolation; the jackknife's bias correction, Quenouille 1956). Where the bias is not ~ c / N
  (nearly separable pairs: MI of 10 nats in 20 dimensions at n = 5000) it can make things worse.
* Features are standardised (pooled mean and standard deviation of x and y), a label-free map that
  leaves every divergence unchanged.

Models (``model=``): ``"quadratic"``, logistic regression on the features ``(1, x, x_i x_j for i <= j)``,
exact for any two Gaussians (their log-ratio is a quadratic form), with ``1 + d + d(d + 1)/2``
parameters; and ``"mlp"``, a small multilayer perceptron (SiLU, ``hidden`` widths) for non-Gaussian
pairs. The quadratic classifier is convex in its parameters and is fitted to convergence by damped
Newton steps on every training point (standardised features, a small L2 ``penalty``); a learning rate
cannot stop it short of the large coefficients of a large KL or MI (those grow as 1 / (1 - rho^2) for
correlated Gaussians). The MLP and the variational bounds are plain pytrees of arrays trained with
``optax.adamw`` on a cosine learning-rate decay (``num_steps``, ``batch_size``, ``learning_rate`` and
``weight_decay`` apply to them only).

Mutual information (:func:`mutual_information`) is ``D(P_XY || P_X P_Y)``: ``"classifier"`` (default)
trains the classifier above on joint pairs ``(x_i, y_i)`` against shuffled pairs ``(x_i, y_j)`` (the
shuffles stay inside each fold, so a held-out pair's halves are never seen in training). At large MI
the two are nearly separable (a "density chasm": joint pairs sit where shuffled ones almost never fall),
so the logistic fit barely sees the region that fixes the size of its logits, and the penalty that keeps
it finite shrinks them: one classifier read 8.1 for 10 nats in 20 dimensions. The quadratic classifier
therefore telescopes by default (``waymarks=3``; Rhodes, Xu & Gutmann 2020): joint pairs ``z_0`` and
shuffled pairs ``z_K`` are mixed into waymarks ``z_k = sqrt(1 - a_k^2) z_0 + a_k z_K`` (``a_k = (k /
K)^1.5``), one classifier tells each waymark from the next, and the held-out log-ratios add up,
``log p_0/p_K = sum_k log p_k/p_(k+1)``. Neighbouring waymarks overlap, and Gaussian pairs stay Gaussian
along the way, so every step is quadratic. Measured (experiments.ratio_study, d = 20, n = 5000, 5 seeds):
bias within 0.08 nats for MI from 2 to 10. ``"nwj"``
and ``"infonce"`` train a critic ``T(x, y)`` on all ``batch_size^2`` pairs of a batch (Poole et al.
2019). InfoNCE ``mean_i [T_ii - log (1/B) sum_j exp T_ij]`` can never exceed ``log B`` with ``B`` the
batch size (here ``batch_size``, training and evaluation alike): it is a low-variance estimator of MI
only when MI is well below ``log B``, and saturates at ``log B`` above it.

Known failure modes: the DV estimate and its MINE gradient have high variance (the ``log E_Q exp f``
term is dominated by a few points when KL is large; Song & Ermon 2020); NWJ's ``E_Q[exp(f - 1)]``
has variance ``exp(KL)``-like, so both bounds are unreliable above a few nats; the classifier estimate
inherits the classifier's miscalibration (a model too weak for ``log p/q``, or regularisation that
shrinks the logits, biases it low).

References:
    X. Nguyen, M. J. Wainwright, M. I. Jordan (2010), "Estimating divergence functionals and the
    likelihood ratio by convex risk minimization", IEEE Trans. Inf. Theory 56(11) (NWJ bound).
    M. D. Donsker, S. R. S. Varadhan (1983), "Asymptotic evaluation of certain Markov process
    expectations for large time IV", Comm. Pure Appl. Math. 36(2) (DV bound).
    M. I. Belghazi et al. (2018), "Mutual Information Neural Estimation", ICML,
    https://arxiv.org/abs/1801.04062 (MINE, the moving-average corrected gradient, Sec. 3.2).
    A. van den Oord, Y. Li, O. Vinyals (2018), "Representation learning with contrastive predictive
    coding", https://arxiv.org/abs/1807.03748 (InfoNCE).
    B. Poole, S. Ozair, A. van den Oord, A. Alemi, G. Tucker (2019), "On variational bounds of mutual
    information", ICML, https://arxiv.org/abs/1905.06922 (NWJ, InfoNCE and the log(batch) ceiling).
    J. Song, S. Ermon (2020), "Understanding the limitations of variational mutual information
    estimators", ICLR, https://arxiv.org/abs/1910.06222.
    B. Rhodes, K. Xu, M. U. Gutmann (2020), "Telescoping density-ratio estimation", NeurIPS,
    https://arxiv.org/abs/2006.12204 (waymarks by linear mixing).
    S. Bickel, M. Brueckner, T. Scheffer (2009), "Discriminative learning under covariate shift",
    JMLR 10; M. Sugiyama, T. Suzuki, T. Kanamori (2012), "Density Ratio Estimation in Machine
    Learning", Cambridge University Press, ch. 4 (probabilistic classification).
    V. Chernozhukov et al. (2018), "Double/debiased machine learning", Econometrics Journal 21(1)
    (cross-fitting).
    P. J. Huber (1967), "The behavior of maximum likelihood estimates under nonstandard conditions",
    Proc. Fifth Berkeley Symposium 1 (sandwich covariance).
    F. Roosta-Khorasani, M. W. Mahoney (2019), "Sub-sampled Newton methods", Math. Programming 174
    (Newton steps with a subsampled Hessian).
    P. Sur, E. J. Candes (2019), "A modern maximum-likelihood theory for high-dimensional logistic
    regression", PNAS 116(29) (coefficient inflation); M. H. Quenouille (1956), "Notes on bias in
    estimation", Biometrika 43 (jackknife bias correction).
    P. Czyz, F. Grabowski, J. Vogt, N. Beerenwinkel, A. Marx (2023), "Beyond normal: on the evaluation
    of mutual information estimators", NeurIPS, https://arxiv.org/abs/2306.11078.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from kljax._contract import as_float_array, check_eagerly, check_flag, check_int, is_concrete, nan_unless, real

__all__ = [
    "KL_METHODS",
    "MI_METHODS",
    "MODELS",
    "Estimate",
    "kl",
    "kl_with_stderr",
    "kl_with_diagnostics",
    "mutual_information",
    "mutual_information_with_stderr",
    "mutual_information_with_diagnostics",
]

KL_METHODS = ("classifier", "nwj", "dv")
"""Names accepted by ``method=`` of :func:`kl` and friends."""
MI_METHODS = ("classifier", "nwj", "infonce")
"""Names accepted by ``method=`` of :func:`mutual_information` and friends."""
MODELS = ("quadratic", "mlp")
"""Names accepted by ``model=``."""

# Defaults (chosen by measurement on the Gaussian pairs of experiments.ratio_study; see its report).
_DEFAULTS = {
    "num_folds": 5,
    "num_steps": 2000,
    "batch_size": 256,
    # learning_rate=None: 1e-3 (an MLP at 0.01 overfits into overconfident logits; the exp terms of
    # NWJ/DV overflow at 0.01). The Newton-fitted quadratic classifier has no learning rate.
    "learning_rate": None,
    "weight_decay": 1e-4,
    "hidden": (64, 64),
    # The quadratic classifier's L2 penalty on its standardised coefficients (per unit of the averaged
    # loss). Measured (ratio_study, d = 20, n = 5000): 1e-3 and 1e-4 shrink large-MI fits (MI 10 read
    # 4.3 and 6.0), 0 lets nearly separable ones grow without bound; 1e-5 is the compromise.
    "penalty": 1e-5,
    "waymarks": 3,
}
# MINE's moving-average rate for E_Q[exp f] (Belghazi et al. 2018, Sec. 3.2 and their code: 0.01).
_MINE_EMA_RATE = 0.01
# Newton steps at most for the quadratic classifier (it stops earlier once the Newton decrement is tiny).
_NEWTON_STEPS = 40
# Telescoping waymarks' mixing weights a_k = (k / K)^power: steps shorter near the joint pairs, where
# the log-ratio changes fastest (measured at MI 10 and 20 in d = 20: power 1.5 and 2 beat 1 and 0.5).
_WAYMARK_POWER = 1.5
# Rows of the subsampled Newton Hessian (half from each sample).
_HESSIAN_ROWS = 4096


class Estimate(NamedTuple):
    """A trained estimate and what is needed to judge it.

    Attributes:
        value: the estimate in nats (NaN when the training diverged or an input is bad under jit).
        stderr: its standard error (the larger of the per-point and the between-fold one).
        diverged: True when some fold's loss or parameters became non-finite (then ``value`` is NaN).
        fold_values: the estimate of each fold from its held-out points, shape ``(num_folds,)``.
        final_loss: each fold's training loss averaged over the last tenth of the steps (the quadratic
            classifier: its final penalised training loss).
    """

    value: jax.Array
    stderr: jax.Array
    diverged: jax.Array
    fold_values: jax.Array
    final_loss: jax.Array


# --------------------------------------------------------------------------------------------------
# Models: plain pytrees of arrays, written for one (batch, d) input
# --------------------------------------------------------------------------------------------------


def _quadratic_init(key, dim: int, hidden: tuple[int, ...], dtype):
    del key, hidden
    return {"bias": jnp.zeros((), dtype), "linear": jnp.zeros((dim,), dtype),
            "quadratic": jnp.zeros((dim, dim), dtype)}


def _quadratic_apply(params, x):
    # f(x) = b + w.x + x^T A x: every quadratic form, so log p/q of any two Gaussians is representable.
    return params["bias"] + x @ params["linear"] + jnp.sum((x @ params["quadratic"]) * x, axis=-1)


def _mlp_init(key, dim: int, hidden: tuple[int, ...], dtype):
    sizes = (dim,) + tuple(hidden)
    keys = jax.random.split(key, len(hidden))
    layers = []
    for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:]):
        weight = jax.random.normal(k, (fan_in, fan_out), dtype) * math.sqrt(1.0 / fan_in)
        layers.append({"weight": weight, "bias": jnp.zeros((1, fan_out), dtype)})
    # A zero output layer: the fit starts from f = 0 (log p/q = 0), as the quadratic model does.
    layers.append({"weight": jnp.zeros((sizes[-1], 1), dtype), "bias": jnp.zeros((1, 1), dtype)})
    return layers


def _mlp_apply(params, x):
    h = x
    for layer in params[:-1]:
        h = jax.nn.silu(h @ layer["weight"] + layer["bias"])
    return (h @ params[-1]["weight"] + params[-1]["bias"])[:, 0]


_MODELS: dict[str, tuple[Callable, Callable]] = {
    "quadratic": (_quadratic_init, _quadratic_apply),
    "mlp": (_mlp_init, _mlp_apply),
}


# --------------------------------------------------------------------------------------------------
# Folds: points are in a random order; fold k holds the positions [bounds[k], bounds[k + 1])
# --------------------------------------------------------------------------------------------------


def _bounds(count: int, num_folds: int) -> np.ndarray:
    return np.array([(k * count) // num_folds for k in range(num_folds + 1)], np.int32)


def _fold_of_position(count: int, num_folds: int) -> np.ndarray:
    return np.repeat(np.arange(num_folds, dtype=np.int32), np.diff(_bounds(count, num_folds)))


def _draw_training_positions(key, bounds: jax.Array, fold, count: int, batch_size: int):
    """``batch_size`` positions drawn uniformly (with replacement) outside fold ``fold``'s block."""
    start, stop = bounds[fold], bounds[fold + 1]
    offset = jax.random.randint(key, (batch_size,), 0, count - (stop - start))
    return (stop + offset) % count


def _held_out(values: jax.Array, count: int, num_folds: int) -> jax.Array:
    """From the (num_folds, count) values of every fold's model at every point, each point's value
    under the model that did not see it."""
    fold = jnp.asarray(_fold_of_position(count, num_folds))
    return jnp.take_along_axis(values, fold[None, :], axis=0)[0]


def _held_out_by(values: jax.Array, fold: np.ndarray) -> jax.Array:
    """From the (num_folds, count) values of every fold's model at every point, each point's value
    under the model of its fold ``fold`` (NumPy, per point)."""
    return jnp.take_along_axis(values, jnp.asarray(fold)[None, :], axis=0)[0]


def _fold_means(values: jax.Array, count: int, num_folds: int) -> jax.Array:
    fold = jnp.asarray(_fold_of_position(count, num_folds))
    sums = jax.ops.segment_sum(values, fold, num_segments=num_folds)
    return sums / jnp.asarray(np.diff(_bounds(count, num_folds)), values.dtype)


def _fold_log_mean_exp(values: jax.Array, count: int, num_folds: int) -> jax.Array:
    fold = jnp.asarray(_fold_of_position(count, num_folds))
    top = lax.stop_gradient(jnp.max(values))
    sums = jax.ops.segment_sum(jnp.exp(values - top), fold, num_segments=num_folds)
    return jnp.log(sums / jnp.asarray(np.diff(_bounds(count, num_folds)), values.dtype)) + top


# --------------------------------------------------------------------------------------------------
# Training: lax.scan over steps of a step vmapped over folds
# --------------------------------------------------------------------------------------------------


def _standardise(*arrays):
    pooled = jnp.concatenate(arrays, axis=0)
    mean = jnp.mean(pooled, axis=0, keepdims=True)
    std = jnp.std(pooled, axis=0, keepdims=True)
    std = jnp.where(std > 0, std, jnp.ones_like(std))
    return tuple((a - mean) / std for a in arrays)


def _optimizer(learning_rate: float, weight_decay: float, num_steps: int):
    schedule = optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.01)
    return optax.adamw(schedule, weight_decay=weight_decay)


def _report_progress(progress, num_steps):
    """A jax.debug.callback every num_steps // 10 steps: progress(step, per-fold losses)."""
    every = max(1, num_steps // 10)

    def maybe_report(step, losses):
        if progress is None:
            return
        lax.cond((step + 1) % every == 0,
                 lambda: jax.debug.callback(lambda s, l: progress(int(s), np.asarray(l)), step + 1, losses),
                 lambda: None)
    return maybe_report


def _train(key, loss_of_fold, init_params, extra_init, *, num_folds, num_steps, learning_rate,
           weight_decay, progress):
    """Trains ``num_folds`` models at once. ``loss_of_fold(params, extra, key, fold) -> (loss, extra)``
    is one fold's minibatch loss (``extra``: auxiliary state such as MINE's moving average)."""
    optimizer = _optimizer(learning_rate, weight_decay, num_steps)
    opt_state = jax.vmap(optimizer.init)(init_params)
    folds = jnp.arange(num_folds)
    report = _report_progress(progress, num_steps)

    def fold_step(params, opt_state, extra, key, fold):
        (loss, extra), grads = jax.value_and_grad(loss_of_fold, has_aux=True)(params, extra, key, fold)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, extra, loss

    def step(carry, inputs):
        params, opt_state, extra = carry
        index, key = inputs
        keys = jax.random.split(key, num_folds)
        params, opt_state, extra, losses = jax.vmap(fold_step)(params, opt_state, extra, keys, folds)
        report(index, losses)
        return (params, opt_state, extra), losses

    steps = (jnp.arange(num_steps), jax.random.split(key, num_steps))
    (params, _, _), losses = lax.scan(step, (init_params, opt_state, extra_init), steps)
    tail = max(1, num_steps // 10)
    final_loss = jnp.mean(losses[-tail:], axis=0)
    finite_params = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf), axis=tuple(range(1, leaf.ndim)))
                                       for leaf in jax.tree.leaves(params)]), axis=0)
    ok = jnp.all(jnp.isfinite(losses), axis=0) & finite_params
    return params, final_loss, ok


def _quadratic_features(z: jax.Array) -> jax.Array:
    """Rows ``(z, z_i z_j for i <= j)`` of the quadratic model (the intercept is kept apart)."""
    upper_i, upper_j = np.triu_indices(z.shape[1])
    return jnp.concatenate([z, z[:, upper_i] * z[:, upper_j]], axis=1)


def _newton_classifier(design, label, weight, hessian_rows, penalty, beta, max_steps: int, copies=None):
    """Penalised logistic regression by damped Newton steps, started at ``beta``: one fold's fit.

    Minimises ``sum_i weight_i softplus(-s_i design_i . beta) + penalty / 2 |beta[1:]|^2`` (``s_i = +1``
    for P's rows, ``-1`` for Q's; the weights are 1/(2 n) and 1/(2 m) on the fold's training rows, 0 on
    its held-out rows). The objective is convex, so Newton's method converges without a learning rate
    and reaches the large coefficients of nearly separable pairs (large KL or MI). The Hessian is that
    of the rows ``hessian_rows`` (a fixed subsample, reweighted to the class totals: subsampled Newton,
    Roosta-Khorasani & Mahoney 2019); the gradient and the objective use every row, and each step tries
    the lengths 1, 1/2, ..., 1/16 and keeps the best (Boyd & Vandenberghe 2004, Sec. 9.5), so the
    iteration still converges to the exact minimiser. ``copies`` (per row, default 1): how many rows are
    copies of this one (weighted as one point in total); the sandwich then counts the copies' scores as
    one cluster. Returns ``(beta, final objective, sandwich covariance of beta)``.
    """
    width = design.shape[1]
    ridge = jnp.full((width,), penalty, design.dtype).at[0].set(0.0)
    sign = 2.0 * label - 1.0
    lengths = jnp.asarray([1.0, 0.5, 0.25, 0.125, 0.0625], design.dtype)
    sub_design, sub_label = design[hessian_rows], label[hessian_rows]
    # Reweight the subsample so that each class keeps its total training weight.
    sub_weight = weight[hessian_rows]
    for cls in (0.0, 1.0):
        total = jnp.sum(jnp.where(label == cls, weight, 0.0))
        sub_total = jnp.sum(jnp.where(sub_label == cls, sub_weight, 0.0))
        sub_weight = jnp.where(sub_label == cls, sub_weight * total / jnp.maximum(sub_total, 1e-30), sub_weight)

    def objective(logits, beta):
        return jnp.sum(weight * jax.nn.softplus(-sign * logits)) + 0.5 * jnp.sum(ridge * beta ** 2)

    def step(state):
        beta, logits, _, count = state
        gradient = design.T @ (weight * (jax.nn.sigmoid(logits) - label)) + ridge * beta
        sub_prob = jax.nn.sigmoid(sub_design @ beta)
        curvature = sub_weight * sub_prob * (1.0 - sub_prob)
        hessian = (sub_design * curvature[:, None]).T @ sub_design + jnp.diag(ridge + 1e-7)
        direction = -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hessian), gradient)
        change = design @ direction
        trials = jax.vmap(lambda t: objective(logits + t * change, beta + t * direction))(lengths)
        length = lengths[jnp.argmin(jnp.where(jnp.isfinite(trials), trials, jnp.inf))]
        decrement = -jnp.dot(gradient, direction)  # the (squared) Newton decrement: twice the predicted gain
        return beta + length * direction, logits + length * change, decrement, count + 1

    def keep_going(state):
        _, _, decrement, count = state
        return (count < max_steps) & (decrement > 1e-6) & jnp.isfinite(decrement)

    start = (beta, design @ beta, jnp.asarray(1.0, design.dtype), jnp.asarray(0))
    beta, logits, _, _ = lax.while_loop(keep_going, step, start)
    # The sandwich covariance of beta, H^-1 M H^-1 with M = sum_i w_i^2 (sigma_i - label_i)^2 design_i
    # design_i^T (the M-estimator's asymptotic covariance; Huber 1967), both on the Hessian's rows.
    sub_prob = jax.nn.sigmoid(sub_design @ beta)
    hessian = (sub_design * (sub_weight * sub_prob * (1.0 - sub_prob))[:, None]).T @ sub_design \
        + jnp.diag(ridge + 1e-7)
    # Exact copies of a point are one cluster: their summed score is copies times one copy's.
    cluster = 1.0 if copies is None else copies[hessian_rows]
    meat = (sub_design * (cluster * sub_weight * weight[hessian_rows] * (sub_prob - sub_label) ** 2)[:, None]).T \
        @ sub_design
    factor = jax.scipy.linalg.cho_factor(hessian)
    covariance = jax.scipy.linalg.cho_solve(factor, jax.scipy.linalg.cho_solve(factor, meat).T)
    return beta, objective(logits, beta), covariance


def _quadratic_classifier_core(x, y, *, num_folds, penalty, max_steps, extrapolate=False, fold_x=None,
                               fold_y=None, evaluate=None, fold_evaluate=None, copies_x=None):
    """The quadratic classifier of x (label 1) against y (label 0), fitted by Newton's method on each
    fold's training points and evaluated on held-out points.

    Returns ``(held-out f at the evaluation points (n_e,), final losses (num_folds,), ok, variance of
    their mean from the fit's noise)``. ``fold_x``, ``fold_y`` (NumPy, per row): the rows' folds (default:
    consecutive blocks); ``evaluate`` (default ``x``) with ``fold_evaluate``: where f is read, each point
    by the model of the folds that did not see it. ``copies_x``: rows of x that are copies of one point
    (a scalar; see :func:`_newton_classifier`).
    """
    n, m = x.shape[0], y.shape[0]
    dtype = x.dtype
    fold_x = _fold_of_position(n, num_folds) if fold_x is None else fold_x
    fold_y = _fold_of_position(m, num_folds) if fold_y is None else fold_y
    if evaluate is None:
        evaluate, fold_evaluate = x, fold_x
    phi = _quadratic_features(jnp.concatenate([x, y], axis=0))
    # Standardise the features (pooled over both samples: label-free), so one penalty suits all of them.
    mean = jnp.mean(phi, axis=0, keepdims=True)
    std = jnp.std(phi, axis=0, keepdims=True)
    std = jnp.where(std > 0, std, jnp.ones_like(std))
    design = jnp.concatenate([jnp.ones((n + m, 1), dtype), (phi - mean) / std], axis=1)
    at = jnp.concatenate([jnp.ones((evaluate.shape[0], 1), dtype), (_quadratic_features(evaluate) - mean) / std],
                         axis=1)
    label = jnp.concatenate([jnp.ones((n,), dtype), jnp.zeros((m,), dtype)])
    copies = None if copies_x is None else jnp.concatenate([jnp.full((n,), copies_x, dtype), jnp.ones((m,), dtype)])
    fold = jnp.asarray(np.concatenate([fold_x, fold_y]))
    # The Hessian's rows: an evenly spaced subsample of each sample (the points are in random order).
    rows = np.concatenate([np.linspace(0, n - 1, min(n, _HESSIAN_ROWS // 2)).astype(np.int32),
                           n + np.linspace(0, m - 1, min(m, _HESSIAN_ROWS // 2)).astype(np.int32)])
    rows = jnp.asarray(np.unique(rows))

    def fit(k, drop_next, start):
        out = (fold == k) | (drop_next & (fold == (k + 1) % num_folds))
        count_x = jnp.sum(jnp.where(out, 0.0, label))
        count_y = jnp.sum(jnp.where(out, 0.0, 1.0 - label))
        weight = jnp.where(out, 0.0, jnp.where(label > 0, 0.5 / count_x, 0.5 / count_y)).astype(dtype)
        return _newton_classifier(design, label, weight, rows, penalty, start, max_steps, copies)

    folds = jnp.arange(num_folds)
    zeros = jnp.zeros((num_folds, design.shape[1]), dtype)
    beta, losses, covariance = jax.vmap(fit, in_axes=(0, None, 0))(folds, False, zeros)  # (num_folds, 1 + p)
    logits = beta @ at.T  # (num_folds, n_e): every fold's model at every evaluation point
    ok = jnp.all(jnp.isfinite(beta))
    if extrapolate:
        # Richardson extrapolation in the training size: the held-out mean's bias is ~ c / (training
        # points); fits without a second fold (warm-started at the first) have (K - 2)/(K - 1) of them, so
        # (K - 1) f_a - (K - 2) f_b cancels the c / N term.
        smaller, _, _ = jax.vmap(fit, in_axes=(0, None, 0))(folds, True, beta)
        ok = ok & jnp.all(jnp.isfinite(smaller))
        logits = (num_folds - 1) * logits - (num_folds - 2) * (smaller @ at.T)
    # The estimate mean f = mean(at) . beta moves with beta's noise (the fit's, from both samples): its
    # variance g^T Cov(beta) g, averaged over the folds (whose fits share most of their points).
    g = jnp.mean(at, axis=0)
    fit_variance = jnp.mean(jnp.einsum("p,kpq,q->k", g, covariance, g))
    return _held_out_by(logits, fold_evaluate), losses, ok, fit_variance


def _telescoped_classifier_core(x, y, *, waymarks, num_shuffles, num_folds, penalty, max_steps, extrapolate):
    """MI by telescoping density-ratio estimation (Rhodes, Xu & Gutmann 2020) with the quadratic classifier.

    Joint pairs z_0 = (x_i, y_i) and product pairs z_K = (x_a, y_b) (rows a != b, both != i, from i's
    fold) are mixed into the waymarks z_k = sqrt(1 - a_k^2) z_0 + a_k z_K, a_k = (k / K)^1.5; classifier k
    tells z_k from z_(k+1), and log p_0 / p_K = sum_k log p_k / p_(k+1) is read at held-out joint pairs.
    Each neighbouring pair overlaps, where joint and product pairs are nearly separable at large MI (the
    "density chasm"). Gaussian z_0, z_K keep every waymark Gaussian, so each log-ratio stays quadratic.
    Returns ``(held-out sum of the log-ratios at the joint pairs (n,), losses, ok, fit variance)``.
    """
    n = x.shape[0]
    dtype = x.dtype
    bounds = _bounds(n, num_folds)
    fold = _fold_of_position(n, num_folds)
    start, size = bounds[:-1][fold], np.diff(bounds)[fold]
    position = np.arange(n)

    def partner(shifts):
        return (start[:, None] + (position[:, None] - start[:, None] + shifts[None, :]) % size[:, None]).reshape(-1)

    shifts = np.arange(1, num_shuffles + 1)
    joint = jnp.concatenate([x, y], axis=1)
    product = jnp.concatenate([x[jnp.asarray(partner(shifts))], y[jnp.asarray(partner(shifts + num_shuffles))]],
                              axis=1)  # (n * num_shuffles, dx + dy), row i * S + s
    base = jnp.repeat(joint, num_shuffles, axis=0)
    fold_rows = np.repeat(fold, num_shuffles)
    alphas = np.linspace(0.0, 1.0, waymarks + 1) ** _WAYMARK_POWER
    mix = jnp.asarray(np.stack([np.sqrt(1.0 - alphas ** 2), alphas], axis=1), dtype)  # (K + 1, 2)
    # Waymark 0 is the joint pairs themselves, each repeated num_shuffles times (one point, one cluster).
    copies = jnp.asarray([float(num_shuffles)] + [1.0] * (waymarks - 1), dtype)

    def step(inputs):
        near, far, copies_k = inputs
        return _quadratic_classifier_core(near[0] * base + near[1] * product, far[0] * base + far[1] * product,
                                          num_folds=num_folds, penalty=penalty, max_steps=max_steps,
                                          extrapolate=extrapolate, fold_x=fold_rows, fold_y=fold_rows,
                                          evaluate=joint, fold_evaluate=fold, copies_x=copies_k)

    # One waymark at a time (lax.map): the design matrices of all of them at once would be K times larger.
    f, losses, ok, fit_variance = lax.map(step, (mix[:-1], mix[1:], copies))
    # The fits of neighbouring steps share their samples; their errors are taken as independent.
    return jnp.sum(f, axis=0), jnp.sum(losses, axis=0), jnp.all(ok), jnp.sum(fit_variance)


def _init_folds(key, model: str, dim: int, hidden, dtype, num_folds: int):
    init, _ = _MODELS[model]
    return jax.vmap(lambda k: init(k, dim, hidden, dtype))(jax.random.split(key, num_folds))


def _classifier_estimate(fx: jax.Array, num_folds: int, fit_variance=None):
    """The classifier's estimate ``mean_P f`` of the held-out logits and its standard error.

    Two sources of noise: P's points (``Var_P(f) / n``) and the fitted model, which carries the noise
    of both samples; ``fit_variance`` is the latter's share (delta method with the logistic fit's
    sandwich covariance, quadratic model). The standard error is the larger of
    ``sqrt(Var_P(f) / n + fit_variance)`` and the spread of the fold estimates.
    """
    n = fx.shape[0]
    fold_values = _fold_means(fx, n, num_folds)
    variance = jnp.var(fx, ddof=1) / n
    if fit_variance is not None:
        variance = variance + fit_variance
    between_folds = jnp.std(fold_values, ddof=1) / math.sqrt(num_folds)
    return jnp.mean(fx), jnp.maximum(jnp.sqrt(variance), between_folds), fold_values


def _two_sample_core(key, x, y, *, method, model, num_folds, num_steps, batch_size, learning_rate,
                     weight_decay, hidden, penalty, extrapolate, progress):
    """D(P || Q) from x ~ P (n, d), y ~ Q (m, d), already in fold order (block k = fold k)."""
    n, dim = x.shape
    m = y.shape[0]
    dtype = x.dtype
    if method == "classifier" and model == "quadratic":
        fx, final_loss, ok, fit_variance = _quadratic_classifier_core(
            x, y, num_folds=num_folds, penalty=penalty, max_steps=_NEWTON_STEPS, extrapolate=extrapolate)
        value, stderr, fold_values = _classifier_estimate(fx, num_folds, fit_variance)
        ok = ok & jnp.isfinite(value) & jnp.all(jnp.isfinite(fx))
        return _finish(value, stderr, ok, fold_values, final_loss)
    _, apply = _MODELS[model]
    bounds_x, bounds_y = jnp.asarray(_bounds(n, num_folds)), jnp.asarray(_bounds(m, num_folds))
    init_key, train_key = jax.random.split(key)

    def loss_of_fold(params, log_average, key, fold):
        key_x, key_y = jax.random.split(key)
        fx = apply(params, x[_draw_training_positions(key_x, bounds_x, fold, n, batch_size)])
        fy = apply(params, y[_draw_training_positions(key_y, bounds_y, fold, m, batch_size)])
        if method == "classifier":
            # Balanced logistic loss: its minimiser is f = log p/q (equal class priors).
            return 0.5 * (jnp.mean(jax.nn.softplus(-fx)) + jnp.mean(jax.nn.softplus(fy))), log_average
        if method == "nwj":
            return -(jnp.mean(fx) - jnp.mean(jnp.exp(fy - 1.0))), log_average
        # dv: MINE's corrected gradient: grad log E_Q e^f ~ grad mean_Q e^f / (moving average of mean_Q e^f).
        log_mean = jax.nn.logsumexp(fy) - math.log(batch_size)
        log_average = jnp.where(jnp.isfinite(log_average),
                                jnp.logaddexp(math.log1p(-_MINE_EMA_RATE) + log_average,
                                              math.log(_MINE_EMA_RATE) + lax.stop_gradient(log_mean)),
                                lax.stop_gradient(log_mean))
        surrogate = jnp.exp(log_mean - lax.stop_gradient(log_average))
        # The value of log E_Q e^f with the gradient of E_Q e^f / (moving average): the loss's value is
        # -DV on the batch, its gradient MINE's (Belghazi et al. 2018, eq. 12).
        corrected = lax.stop_gradient(log_mean) + surrogate - lax.stop_gradient(surrogate)
        return -(jnp.mean(fx) - corrected), log_average

    params = _init_folds(init_key, model, dim, hidden, dtype, num_folds)
    extra = jnp.full((num_folds,), -jnp.inf, dtype)
    params, final_loss, ok = _train(train_key, loss_of_fold, params, extra, num_folds=num_folds,
                                    num_steps=num_steps, learning_rate=learning_rate,
                                    weight_decay=weight_decay, progress=progress)
    fx = _held_out(jax.vmap(apply, in_axes=(0, None))(params, x), n, num_folds)
    fy = _held_out(jax.vmap(apply, in_axes=(0, None))(params, y), m, num_folds)
    if method == "classifier":
        value, stderr, fold_values = _classifier_estimate(fx, num_folds)
    elif method == "nwj":
        terms_y = jnp.exp(fy - 1.0)
        fold_values = _fold_means(fx, n, num_folds) - _fold_means(terms_y, m, num_folds)
        value = jnp.mean(fx) - jnp.mean(terms_y)
        per_point = jnp.sqrt(jnp.var(fx, ddof=1) / n + jnp.var(terms_y, ddof=1) / m)
        stderr = jnp.maximum(per_point, jnp.std(fold_values, ddof=1) / math.sqrt(num_folds))
    else:  # dv: a free constant per model, so each fold is evaluated on its own and the folds averaged
        fold_values = _fold_means(fx, n, num_folds) - _fold_log_mean_exp(fy, m, num_folds)
        weights = jnp.asarray(np.diff(_bounds(n, num_folds)) / n, dtype)
        value = jnp.sum(weights * fold_values)
        # Delta method per point: the DV functional's influence terms f(x_i) and exp(f(y_j) - log mean).
        ratio = jnp.exp(fy - jnp.repeat(_fold_log_mean_exp(fy, m, num_folds), np.diff(_bounds(m, num_folds)),
                                        total_repeat_length=m))
        per_point = jnp.sqrt(jnp.var(fx, ddof=1) / n + jnp.var(ratio, ddof=1) / m)
        stderr = jnp.maximum(per_point, jnp.std(fold_values, ddof=1) / math.sqrt(num_folds))
    ok = jnp.all(ok) & jnp.isfinite(value) & jnp.all(jnp.isfinite(fx))
    return _finish(value, stderr, ok, fold_values, final_loss)


def _finish(value, stderr, ok, fold_values, final_loss) -> Estimate:
    nan = jnp.full_like(value, jnp.nan)
    return Estimate(jnp.where(ok, value, nan), jnp.where(ok, stderr, nan), ~ok, fold_values, final_loss)


def _pairs_core(key, x, y, *, method, model, num_folds, num_steps, batch_size, learning_rate,
                weight_decay, hidden, penalty, extrapolate, progress):
    """MI from paired rows (in fold order) by a critic T(x, y) on all batch_size^2 pairs (NWJ, InfoNCE)."""
    n, dim_x = x.shape
    dim = dim_x + y.shape[1]
    dtype = x.dtype
    _, apply = _MODELS[model]
    bounds = jnp.asarray(_bounds(n, num_folds))
    init_key, train_key = jax.random.split(key)

    def scores(params, xb, yb):
        b = xb.shape[0]
        if model == "quadratic":
            # f([x, y]) = c + w.z + z^T M z splits into u(x_i) + v(y_j) + x_i^T (M_xy + M_yx^T) y_j, so the
            # b^2 scores cost two b x d products instead of b^2 quadratic forms.
            w, mat = params["linear"], params["quadratic"]
            u = xb @ w[:dim_x] + jnp.sum((xb @ mat[:dim_x, :dim_x]) * xb, axis=-1)
            v = yb @ w[dim_x:] + jnp.sum((yb @ mat[dim_x:, dim_x:]) * yb, axis=-1)
            cross = (xb @ (mat[:dim_x, dim_x:] + mat[dim_x:, :dim_x].T)) @ yb.T
            return params["bias"] + u[:, None] + v[None, :] + cross
        pairs = jnp.concatenate([jnp.repeat(xb, b, axis=0), jnp.tile(yb, (b, 1))], axis=1)
        return apply(params, pairs).reshape(b, b)  # [i, j] = T(x_i, y_j)

    def bound(t):
        b = t.shape[0]
        diagonal = jnp.diagonal(t)
        if method == "infonce":
            return jnp.mean(diagonal - jax.nn.logsumexp(t, axis=1)) + math.log(b)
        off = ~np.eye(b, dtype=bool)
        return jnp.mean(diagonal) - jnp.sum(jnp.where(off, jnp.exp(t - 1.0), 0.0)) / (b * (b - 1))

    def loss_of_fold(params, extra, key, fold):
        positions = _draw_training_positions(key, bounds, fold, n, batch_size)
        return -bound(scores(params, x[positions], y[positions])), extra

    params = _init_folds(init_key, model, dim, hidden, dtype, num_folds)
    params, final_loss, ok = _train(train_key, loss_of_fold, params, jnp.zeros((num_folds,), dtype),
                                    num_folds=num_folds, num_steps=num_steps, learning_rate=learning_rate,
                                    weight_decay=weight_decay, progress=progress)
    # Held-out evaluation in consecutive chunks of batch_size pairs of each fold's own block.
    sizes = np.diff(_bounds(n, num_folds))
    chunk = int(min(batch_size, sizes.min()))
    num_chunks = int(sizes.min()) // chunk

    def fold_value(params, start):
        def chunk_value(c):
            xb = lax.dynamic_slice_in_dim(x, start + c * chunk, chunk)
            yb = lax.dynamic_slice_in_dim(y, start + c * chunk, chunk)
            return bound(scores(params, xb, yb))
        return jnp.mean(lax.map(chunk_value, jnp.arange(num_chunks)))

    fold_values = jax.vmap(fold_value)(params, bounds[:-1])
    value = jnp.mean(fold_values)
    stderr = jnp.std(fold_values, ddof=1) / math.sqrt(num_folds)
    ok = jnp.all(ok) & jnp.isfinite(value)
    return _finish(value, stderr, ok, fold_values, final_loss)


def _classifier_pairs(x, y, num_shuffles: int, num_folds: int):
    """Joint rows (x_i, y_i) and ``num_shuffles`` shuffled rows (x_i, y_j) per i, y_j from i's own fold,
    both in fold order: returns (joint (n, dx + dy), product (n * num_shuffles, dx + dy))."""
    n = x.shape[0]
    bounds = _bounds(n, num_folds)
    fold = _fold_of_position(n, num_folds)
    start, size = bounds[:-1][fold], np.diff(bounds)[fold]
    position = np.arange(n)
    # Partners at cyclic shifts 1..num_shuffles within the fold's block of a random order: each
    # shuffled pair (x_i, y_j) has i != j, and both come from the same fold.
    partner = start[:, None] + (position[:, None] - start[:, None] + np.arange(1, num_shuffles + 1)[None, :]) \
        % size[:, None]
    joint = jnp.concatenate([x, y], axis=1)
    product = jnp.concatenate([jnp.repeat(x, num_shuffles, axis=0), y[jnp.asarray(partner.reshape(-1))]], axis=1)
    return joint, product


# --------------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------------


def _samples(name: str, x) -> jax.Array:
    x = as_float_array(name, x)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must have shape (num_points, dim), got shape {x.shape}.")
    if x.shape[1] < 1:
        raise ValueError(f"`{name}` must have at least one coordinate, got shape {x.shape}.")
    return x


def _options(method, methods, model, num_folds, num_steps, batch_size, learning_rate, weight_decay, hidden,
             penalty, extrapolate, function: str) -> dict:
    if method not in methods:
        raise ValueError(f"`method` must be one of {methods} for {function}, got {method!r}.")
    if model not in MODELS:
        raise ValueError(f"`model` must be one of {MODELS}, got {model!r}.")
    check_int("num_folds", num_folds, 2)
    check_int("num_steps", num_steps, 1)
    check_int("batch_size", batch_size, 2)
    if learning_rate is None:
        learning_rate = 1e-3
    for name, value, minimum in (("learning_rate", learning_rate, False), ("weight_decay", weight_decay, True),
                                 ("penalty", penalty, True)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                or not math.isfinite(value) or value < 0 or (value == 0 and not minimum):
            raise ValueError(f"`{name}` must be a finite number {'>= 0' if minimum else '> 0'}, got {value!r}.")
    hidden = (hidden,) if isinstance(hidden, (int, np.integer)) else tuple(hidden)
    for width in hidden:
        check_int("hidden", width, 1)
    if not hidden:
        raise ValueError("`hidden` must name at least one layer width.")
    return {"model": model, "num_folds": int(num_folds), "num_steps": int(num_steps),
            "batch_size": int(batch_size), "learning_rate": float(learning_rate),
            "weight_decay": float(weight_decay), "hidden": tuple(int(w) for w in hidden), "penalty": float(penalty),
            "extrapolate": check_flag("extrapolate", extrapolate)}


def _check_fold_sizes(name: str, count: int, num_folds: int, per_fold: int = 2) -> None:
    if count < per_fold * num_folds:
        raise ValueError(f"`{name}` has {count} points: too few for `num_folds`={num_folds} (each fold needs at "
                         f"least {per_fold} held-out points, so at least {per_fold * num_folds}); pass a smaller "
                         "`num_folds` or more points.")


def _key(key):
    if isinstance(key, (int, np.integer)) or key is None:
        raise TypeError(f"`key` must be a JAX PRNG key (jax.random.key(seed)), got {key!r}.")
    return key


@functools.lru_cache(maxsize=None)
def _jitted(core, static: tuple):
    return jax.jit(functools.partial(core, **dict(static)))


def _run(core, key, arrays, static: dict) -> Estimate:
    """Runs ``core``: jitted once per static configuration for concrete inputs, inline under a trace."""
    if all(is_concrete(a) for a in (key,) + tuple(arrays)):
        return _jitted(core, tuple(sorted(static.items())))(key, *arrays)
    return core(key, *arrays, **static)


def _permute(key, x):
    return x[jax.random.permutation(key, x.shape[0])]


def _with_validity(result: Estimate, *arrays) -> Estimate:
    masks = [jnp.all(real(a)) for a in arrays]
    return result._replace(value=nan_unless(result.value, *masks), stderr=nan_unless(result.stderr, *masks),
                           fold_values=nan_unless(result.fold_values, *masks),
                           final_loss=nan_unless(result.final_loss, *masks))


def _warn_if_diverged(result: Estimate, what: str) -> None:
    if is_concrete(result.diverged) and bool(result.diverged):
        warnings.warn(f"kljax.ratio: the training for {what} diverged (non-finite loss or parameters); the "
                      "estimate is NaN. Lower `learning_rate` or use method='classifier'.", RuntimeWarning,
                      stacklevel=3)


def kl_with_diagnostics(key, x, y, *, method: str = "classifier", model: str = "quadratic",
                        num_folds: int = _DEFAULTS["num_folds"], num_steps: int = _DEFAULTS["num_steps"],
                        batch_size: int = _DEFAULTS["batch_size"],
                        learning_rate: float | None = _DEFAULTS["learning_rate"],
                        weight_decay: float = _DEFAULTS["weight_decay"], hidden=_DEFAULTS["hidden"],
                        penalty: float = _DEFAULTS["penalty"], extrapolate: bool = True,
                        progress: Callable[[int, np.ndarray], None] | None = None) -> Estimate:
    """Cross-fitted density-ratio estimate of D(P || Q) with its diagnostics.

    Args:
        key: a JAX PRNG key (fold split, minibatches, MLP initialisation).
        x: samples of P, shape ``(n, d)``; at least ``2 * num_folds`` rows.
        y: samples of Q, shape ``(m, d)``; at least ``2 * num_folds`` rows.
        method: one of :data:`KL_METHODS` (module docstring): ``"classifier"`` (default), ``"nwj"``,
            ``"dv"`` (MINE's bias-corrected gradient).
        model: ``"quadratic"`` (logistic regression on quadratic features, exact for Gaussians) or ``"mlp"``.
        num_folds: cross-fitting folds K; fold k's model never sees fold k's points.
        num_steps: optimisation steps (each fold; the folds train together). Like ``batch_size``,
            ``learning_rate`` and ``weight_decay``, it applies to the MLP and the NWJ/DV bounds, not to
            the quadratic classifier (fitted by Newton's method to convergence).
        batch_size: points drawn from P and from Q at every step.
        learning_rate: Adam's initial learning rate (cosine decay to 1% of it); None: 1e-3.
        weight_decay: decoupled weight decay of ``optax.adamw``.
        hidden: the MLP's hidden widths (``model="mlp"`` only).
        penalty: the quadratic classifier's L2 penalty on its coefficients (standardised features,
            averaged loss); 0 is the plain maximum-likelihood fit.
        extrapolate: the quadratic classifier only: cancel its O(1 / n) overfitting bias by Richardson
            extrapolation in the training size (module docstring); about 1.5 times the fitting cost.
        progress: optional ``progress(step, losses)`` called (through ``jax.debug.callback``) every tenth
            of the stochastic-gradient training with the per-fold minibatch losses (not called for the
            Newton-fitted quadratic classifier, which takes seconds).

    Returns:
        An :class:`Estimate`: ``value`` and ``stderr`` in nats (NaN when the training diverged, and NaN
        under jit for NaN/inf inputs), ``diverged``, ``fold_values``, ``final_loss``. The floating
        fields have the dtype of the inputs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax import ratio
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (2000, 3))
        >>> y = jax.random.normal(ky, (2000, 3)) + 1.0  # closed form: 3 / 2
        >>> result = ratio.kl_with_diagnostics(jax.random.key(1), x, y)
        >>> print(abs(float(result.value) - 1.5) < 4 * float(result.stderr), bool(result.diverged))
        True False

    References:
        Sugiyama, Suzuki, Kanamori (2012), Density Ratio Estimation in Machine Learning, ch. 4;
        Nguyen, Wainwright, Jordan (2010); Belghazi et al. (2018), Sec. 3.2 (module docstring).
    """
    key = _key(key)
    x, y = _samples("x", x), _samples("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"`x` and `y` must have the same dimension (last axis), got shapes {x.shape} and {y.shape}.")
    static = _options(method, KL_METHODS, model, num_folds, num_steps, batch_size, learning_rate, weight_decay,
                      hidden, penalty, extrapolate, "kl")
    _check_fold_sizes("x", x.shape[0], static["num_folds"])
    _check_fold_sizes("y", y.shape[0], static["num_folds"])
    check_eagerly("x", x, real)
    check_eagerly("y", y, real)
    dtype = jnp.result_type(x.dtype, y.dtype)
    x, y = x.astype(dtype), y.astype(dtype)
    result = _run(_kl_program, key, (x, y), dict(static, method=method, progress=progress))
    result = _with_validity(result, x, y)
    _warn_if_diverged(result, f"kl(method={method!r})")
    return result


def _kl_program(key, x, y, *, method, progress, **static):
    split_key, fit_key = jax.random.split(key)
    key_x, key_y = jax.random.split(split_key)
    x, y = _standardise(x, y)
    return _two_sample_core(fit_key, _permute(key_x, x), _permute(key_y, y), method=method, progress=progress,
                            **static)


def kl(key, x, y, **options) -> jax.Array:
    """Cross-fitted density-ratio (classifier) estimate of D(P || Q) in nats from x ~ P and y ~ Q.

    Defaults work out of the box: a quadratic-feature logistic classifier fitted by Newton's method,
    5 folds. See :func:`kl_with_diagnostics` for the options and the module docstring for the methods.

    Args:
        key: a JAX PRNG key.
        x: samples of P, shape ``(n, d)``.
        y: samples of Q, shape ``(m, d)``.
        **options: ``method``, ``model``, ``num_folds``, ``num_steps``, ``batch_size``, ``learning_rate``,
            ``weight_decay``, ``hidden``, ``penalty``, ``extrapolate``, ``progress``
            (:func:`kl_with_diagnostics`).

    Returns:
        The estimate, a scalar of the inputs' dtype; NaN (and eagerly a ``RuntimeWarning``) when the
        training diverged.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax import ratio
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (2000, 2))
        >>> y = 2.0 * jax.random.normal(ky, (2000, 2))  # closed form: 2 (log 2 + 1/8 - 1/2) = 0.636
        >>> print(round(float(ratio.kl(jax.random.key(1), x, y)), 1))
        0.6

    References:
        Sugiyama, Suzuki, Kanamori (2012), Density Ratio Estimation in Machine Learning, ch. 4.
    """
    return kl_with_diagnostics(key, x, y, **options).value


def kl_with_stderr(key, x, y, **options) -> tuple[jax.Array, jax.Array]:
    """:func:`kl` and its standard error (the larger of the per-point and the between-fold one).

    Args:
        key: a JAX PRNG key.
        x: samples of P, shape ``(n, d)``.
        y: samples of Q, shape ``(m, d)``.
        **options: as for :func:`kl_with_diagnostics`.

    Returns:
        ``(estimate, stderr)`` in nats.

    Example:
        >>> import jax
        >>> from kljax import ratio
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x, y = jax.random.normal(kx, (1000, 2)), jax.random.normal(ky, (1000, 2))
        >>> value, stderr = ratio.kl_with_stderr(jax.random.key(1), x, y)  # P = Q: about 0
        >>> print(abs(float(value)) < 4 * float(stderr) + 0.01)
        True

    References:
        Chernozhukov et al. (2018), Econometrics Journal 21(1) (cross-fitting).
    """
    result = kl_with_diagnostics(key, x, y, **options)
    return result.value, result.stderr


def mutual_information_with_diagnostics(
        key, x, y, *, method: str = "classifier", model: str = "quadratic",
        num_folds: int = _DEFAULTS["num_folds"], num_steps: int = _DEFAULTS["num_steps"],
        batch_size: int = _DEFAULTS["batch_size"], learning_rate: float | None = _DEFAULTS["learning_rate"],
        weight_decay: float = _DEFAULTS["weight_decay"], hidden=_DEFAULTS["hidden"],
        penalty: float = _DEFAULTS["penalty"], extrapolate: bool = True, num_shuffles: int | None = None,
        waymarks: int | None = None, progress: Callable[[int, np.ndarray], None] | None = None) -> Estimate:
    """Cross-fitted estimate of the mutual information I(X; Y) = D(P_XY || P_X P_Y) with diagnostics.

    Args:
        key: a JAX PRNG key.
        x: shape ``(n, dx)``; row i is paired with row i of ``y``; at least ``2 * num_folds`` rows.
        y: shape ``(n, dy)``.
        method: one of :data:`MI_METHODS`: ``"classifier"`` (default; joint vs shuffled pairs),
            ``"nwj"``, ``"infonce"`` (at most ``log(batch_size)``).
        model: ``"quadratic"`` (exact for jointly Gaussian x, y) or ``"mlp"``, on the pair ``(x, y)``.
        num_folds, num_steps, batch_size, learning_rate, weight_decay, hidden, penalty, extrapolate,
            progress: as for :func:`kl_with_diagnostics` (``batch_size``: pairs per step; NWJ and InfoNCE score all
            ``batch_size^2`` combinations).
        num_shuffles: ``"classifier"`` only: shuffled pairs per joint pair (the Q sample has
            ``n * num_shuffles`` rows). More distinct negatives curb the classifier's overfitting. None:
            2 when telescoping (each of its classifiers sees ``2 n num_shuffles`` rows), else 4 (measured
            in experiments.ratio_study). Partners come from the pair's own fold: at most (smallest
            fold's size - 1) of them, or (smallest fold's size - 1) // 2 when telescoping.
        waymarks: ``"classifier"`` with ``model="quadratic"`` only: the number K of telescoping steps
            between joint and shuffled pairs (module docstring); 1 is the single classifier. None: 3
            for the quadratic classifier (about twice the cost of one classifier at small MI, less
            than one at large MI, where its Newton fit needs more steps), 1 otherwise. With fewer than 3
            points per fold there is no telescoping.

    Returns:
        An :class:`Estimate` in nats.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax import ratio
        >>> rho = 0.8  # closed form: -log(1 - rho^2) / 2 = 0.511
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (2000, 1))
        >>> y = rho * x + jnp.sqrt(1 - rho**2) * jax.random.normal(ky, (2000, 1))
        >>> result = ratio.mutual_information_with_diagnostics(jax.random.key(1), x, y)
        >>> print(abs(float(result.value) - 0.511) < 4 * float(result.stderr))
        True

    References:
        Poole et al. (2019), ICML, https://arxiv.org/abs/1905.06922; van den Oord et al. (2018).
    """
    key = _key(key)
    x, y = _samples("x", x), _samples("y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"`x` and `y` must have the same number of rows (paired samples), got shapes "
                         f"{x.shape} and {y.shape}.")
    static = _options(method, MI_METHODS, model, num_folds, num_steps, batch_size, learning_rate, weight_decay,
                      hidden, penalty, extrapolate, "mutual_information")
    _check_fold_sizes("x", x.shape[0], static["num_folds"])
    # A shuffled partner comes from the pair's own fold: at most (smallest fold - 1) distinct ones.
    smallest_fold = x.shape[0] // static["num_folds"]
    if waymarks is None:
        waymarks = _DEFAULTS["waymarks"] if method == "classifier" and model == "quadratic" else 1
    waymarks = check_int("waymarks", waymarks, 1)
    if num_shuffles is None:
        num_shuffles = 2 if waymarks > 1 else 4
    num_shuffles = check_int("num_shuffles", num_shuffles, 1)
    if waymarks > 1 and not (method == "classifier" and model == "quadratic"):
        raise ValueError(f"`waymarks` > 1 (telescoping) needs method='classifier' and model='quadratic', got "
                         f"method={method!r}, model={model!r}.")
    if waymarks > 1 and smallest_fold >= 3:
        # A product pair's two halves and the joint pair it is mixed with: three rows of one fold.
        num_shuffles = min(num_shuffles, (smallest_fold - 1) // 2)
    else:
        waymarks = 1
        num_shuffles = min(num_shuffles, smallest_fold - 1)
    check_eagerly("x", x, real)
    check_eagerly("y", y, real)
    dtype = jnp.result_type(x.dtype, y.dtype)
    x, y = x.astype(dtype), y.astype(dtype)
    result = _run(_mi_program, key, (x, y), dict(static, method=method, progress=progress,
                                                  num_shuffles=num_shuffles, waymarks=waymarks))
    result = _with_validity(result, x, y)
    _warn_if_diverged(result, f"mutual_information(method={method!r})")
    return result


def _mi_program(key, x, y, *, method, num_shuffles, waymarks, progress, **static):
    split_key, fit_key = jax.random.split(key)
    order = jax.random.permutation(split_key, x.shape[0])
    x, y = _standardise(x[order])[0], _standardise(y[order])[0]
    if waymarks > 1:
        num_folds = static["num_folds"]
        fx, final_loss, ok, fit_variance = _telescoped_classifier_core(
            x, y, waymarks=waymarks, num_shuffles=num_shuffles, num_folds=num_folds, penalty=static["penalty"],
            max_steps=_NEWTON_STEPS, extrapolate=static["extrapolate"])
        value, stderr, fold_values = _classifier_estimate(fx, num_folds, fit_variance)
        ok = ok & jnp.isfinite(value) & jnp.all(jnp.isfinite(fx))
        return _finish(value, stderr, ok, fold_values, final_loss)
    if method == "classifier":
        joint, product = _classifier_pairs(x, y, num_shuffles, static["num_folds"])
        return _two_sample_core(fit_key, joint, product, method="classifier", progress=progress, **static)
    return _pairs_core(fit_key, x, y, method=method, progress=progress, **static)


def mutual_information(key, x, y, **options) -> jax.Array:
    """Estimate of the mutual information I(X; Y) in nats from paired rows of ``x`` and ``y``.

    Defaults: quadratic-feature logistic classifiers telescoping from joint pairs to shuffled pairs in 3
    steps, 5 folds (:func:`mutual_information_with_diagnostics` has the options).

    Args:
        key: a JAX PRNG key.
        x: shape ``(n, dx)``.
        y: shape ``(n, dy)``, row i paired with row i of ``x``.
        **options: as for :func:`mutual_information_with_diagnostics`.

    Returns:
        The estimate, a scalar of the inputs' dtype (NaN when the training diverged).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax import ratio
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (2000, 2))
        >>> y = 0.8 * x + 0.6 * jax.random.normal(ky, (2000, 2))  # closed form: -log(0.36) = 1.02
        >>> print(round(float(ratio.mutual_information(jax.random.key(1), x, y)), 1))
        1.0

    References:
        Poole et al. (2019), ICML, https://arxiv.org/abs/1905.06922.
    """
    return mutual_information_with_diagnostics(key, x, y, **options).value


def mutual_information_with_stderr(key, x, y, **options) -> tuple[jax.Array, jax.Array]:
    """:func:`mutual_information` and its standard error.

    Args:
        key: a JAX PRNG key.
        x: shape ``(n, dx)``.
        y: shape ``(n, dy)``.
        **options: as for :func:`mutual_information_with_diagnostics`.

    Returns:
        ``(estimate, stderr)`` in nats.

    Example:
        >>> import jax
        >>> from kljax import ratio
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x, y = jax.random.normal(kx, (1000, 2)), jax.random.normal(ky, (1000, 2))  # independent
        >>> value, stderr = ratio.mutual_information_with_stderr(jax.random.key(1), x, y)
        >>> print(abs(float(value)) < 4 * float(stderr) + 0.01)
        True

    References:
        Poole et al. (2019), ICML, https://arxiv.org/abs/1905.06922.
    """
    result = mutual_information_with_diagnostics(key, x, y, **options)
    return result.value, result.stderr
