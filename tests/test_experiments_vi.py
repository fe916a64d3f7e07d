"""The VI experiments (experiments/vi_conjugate, vi_bimodal, vi_logistic, vae_digits) at small scale.

Each experiment runs in-process through its ``main([... "--quick", "--out", tmp])``; the exact-answer
cases are checked against independent truths: the conjugate posterior and evidence against generic
Gaussian conditioning and SciPy, the single-sample gradient variances against their closed forms,
the forward-KL fit against moment matching, and the reverse-KL optima against SciPy's optimiser on a
SciPy-integrated objective.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, optimize, stats

from experiments import vae_digits, vi_bimodal, vi_conjugate, vi_logistic

DATA = [0.5, 1.2, -0.3, 0.8, 1.0]


# --------------------------------------------------------------------------------------------------
# vi_conjugate
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior_scale, noise_scale", [(1.0, 1.0), (1.3, 0.7), (0.4, 2.0)])
def test_conjugate_closed_forms_match_gaussian_conditioning(prior_scale, noise_scale):
    x = np.array(DATA)
    n = x.size
    # (z, x) is jointly Gaussian: Cov(x) = s^2 I + s0^2 1 1^T, Cov(z, x) = s0^2 1^T.
    cov_x = noise_scale**2 * np.eye(n) + prior_scale**2 * np.ones((n, n))
    cross = prior_scale**2 * np.ones(n)
    mean = cross @ np.linalg.solve(cov_x, x)
    var = prior_scale**2 - cross @ np.linalg.solve(cov_x, cross)
    got_mean, got_var = vi_conjugate.exact_posterior(DATA, prior_scale, noise_scale)
    np.testing.assert_allclose([got_mean, got_var], [mean, var], rtol=1e-12)
    expected = stats.multivariate_normal(np.zeros(n), cov_x).logpdf(x)
    np.testing.assert_allclose(vi_conjugate.log_evidence(DATA, prior_scale, noise_scale), expected, rtol=1e-12)


@pytest.fixture(scope="module")
def conjugate(tmp_path_factory):
    out = tmp_path_factory.mktemp("vi_conjugate")
    metrics = vi_conjugate.main(["--quick", "--no-progress", "--out", str(out), "--data", ",".join(map(str, DATA)),
                                 "--prior-scale", "1", "--noise-scale", "1"])
    return metrics, out


def test_conjugate_writes_the_promised_metrics_and_figure(conjugate):
    metrics, out = conjugate
    assert json.loads((out / "metrics.json").read_text())["log_evidence"] == pytest.approx(metrics["log_evidence"])
    assert (out / "elbo_and_gradient_variance.png").stat().st_size > 0
    assert set(metrics["posterior"]) == {"mean", "var"}
    assert set(metrics["fits"]) == {"analytic_kl", "mc_kl", "stl"}
    for fit in metrics["fits"].values():
        assert {"mean", "var"} <= set(fit)
    assert set(metrics["grad_variance_at_posterior"]) == {"total_derivative", "stl"}
    assert all(len(v) == 2 for v in metrics["grad_variance_at_posterior"].values())
    assert "![" in vi_conjugate.report(metrics, "vi_conjugate")


def test_conjugate_fits_match_the_exact_posterior(conjugate):
    metrics, _ = conjugate
    mean, var = metrics["posterior"]["mean"], metrics["posterior"]["var"]
    assert (mean, var) == pytest.approx((8 / 15, 1 / 6), rel=1e-12)
    # Over seeds, the averaged S = 1 iterates scatter with sd ~0.02 posterior sds in the mean and ~2.5%
    # in the variance (4000 steps); the tolerances are about 5 of those.
    for name in ("analytic_kl", "mc_kl"):
        fit = metrics["fits"][name]
        assert abs(fit["mean"] - mean) < 0.1 * math.sqrt(var), name
        assert abs(fit["var"] / var - 1) < 0.125, name
        assert fit["elbo"] <= metrics["log_evidence"] + 1e-12
    # STL's gradient vanishes at the optimum for every eps, so its iterates land on it.
    stl = metrics["fits"]["stl"]
    assert stl["mean"] == pytest.approx(mean, abs=1e-6)
    assert stl["var"] == pytest.approx(var, rel=1e-6)
    assert stl["kl_to_posterior"] < 1e-10


def test_conjugate_seeds_give_intervals_and_a_computed_reading(conjugate):
    metrics, _ = conjugate
    seeds = metrics["config"]["seeds"]
    assert seeds == vi_conjugate.Config.quick().seeds >= 2
    for name, fit in metrics["fits"].items():
        values = fit["per_seed"]["kl_to_posterior"]
        assert len(values) == seeds
        # the reported number is the seed mean, its ± the 95% Student-t half-width
        assert fit["kl_to_posterior"] == pytest.approx(np.mean(values), rel=1e-12)
        half = stats.t.ppf(0.975, seeds - 1) * np.std(values, ddof=1) / math.sqrt(seeds)
        assert fit["ci95"]["kl_to_posterior"] == pytest.approx(half, rel=1e-9)
    # STL lands on the posterior at every seed, so the paired test of log KL separates it from the others
    assert max(metrics["fits"]["stl"]["per_seed"]["kl_to_posterior"]) < 1e-10
    text = vi_conjugate.report(metrics, "vi_conjugate")
    assert "stl has lower KL(q ‖ posterior) of the fit than analytic_kl" in text
    assert text.count("ELBO gap to q*:") == 3  # the misspecified fits, pairwise
    variance = metrics["grad_variance_by_kl_term_seeds"]["mc_kl_k1"]
    assert np.asarray(variance["per_seed"]).shape == (seeds, 2)
    assert np.asarray(metrics["variance_growth"]["per_seed"]["mc_kl_k3"]).shape == (
        seeds, len(metrics["variance_growth"]["draws"]), 2)


def test_conjugate_paired_family_says_what_holm_allows():
    rng = np.random.default_rng(0)
    base = rng.normal(size=6)
    # c differs from a by noise of mean exactly zero (p = 1); b by a shift of 1
    per_seed = {"a": base, "b": base + 1.0 + 0.01 * rng.normal(size=6),
                "c": base + np.array([0.01, -0.01, 0.02, -0.02, 0.005, -0.005])}
    a_b, a_c = vi_conjugate._paired_family(per_seed, [("a", "b"), ("a", "c")], "score")
    assert a_b.startswith("a has lower score than b")
    assert "not significant" in a_c
    # Holm: the smaller p is multiplied by 2, the larger by 1 (and kept monotone)
    p_b, p_c = stats.ttest_rel(per_seed["a"], per_seed["b"]).pvalue, stats.ttest_rel(per_seed["a"], per_seed["c"]).pvalue
    assert f"Holm-adjusted {min(1, 2 * p_b):.2g}" in a_b
    assert f"Holm-adjusted {max(p_c, min(1, 2 * p_b)):.2g}" in a_c


def test_conjugate_gradient_variance_at_the_posterior(conjugate):
    metrics, _ = conjugate
    draws = metrics["config"]["num_draws"]
    v = metrics["posterior"]["var"]
    total = metrics["grad_variance_at_posterior"]["total_derivative"]
    stl = metrics["grad_variance_at_posterior"]["stl"]
    # Total derivative at the posterior = -(score): (-eps / sigma, 1 - eps^2), variances (1 / v, 2).
    # Standard error of a sample variance: sqrt((mu_4 - sigma^4) / N); mu_4 = 3 sigma^4 for the normal
    # coordinate and E(eps^2 - 1)^4 = 60 for the other.
    assert total[0] == pytest.approx(1 / v, abs=5 * math.sqrt(2 / draws) / v)
    assert total[1] == pytest.approx(2.0, abs=5 * math.sqrt((60 - 4) / draws))
    assert max(stl) < 1e-12 * min(total)
    # The closed-form KL keeps the likelihood term's noise: Var d/d mean = n^2 v / s^4 = 25 / 6.
    analytic = metrics["grad_variance_by_kl_term"]["analytic_kl"]
    assert analytic[0] == pytest.approx(25 / 6, abs=5 * math.sqrt(2 / draws) * 25 / 6)


def test_conjugate_misspecified_target_and_infinite_variance(conjugate):
    metrics, _ = conjugate
    mis = metrics["misspecified"]
    # q* is the best Gaussian: no fit beats it, and the KL left to the two-mode posterior is positive
    assert all(fit["gap_to_best"] > -1e-6 for fit in mis["fits"].values())
    assert mis["best_q"]["kl_to_posterior"] > 0.1
    # the evidence by quadrature bounds every ELBO
    assert all(fit["elbo"] <= mis["log_evidence"] for fit in mis["fits"].values())
    # STL's gradient variance at q* is lower than the total derivative's but not zero (unlike at a posterior
    # inside the family)
    variance = mis["grad_variance_at_best_q"]
    assert 1e-3 * min(variance["mc_kl"]) < min(variance["stl"]) and max(variance["stl"]) < max(variance["mc_kl"])
    # k3's infinite variance is reported as such (its sample estimates do not settle); k1's settle on 1 / v
    assert not metrics["k3_variance_finite"]
    assert "∞" in vi_conjugate.report(metrics, "vi_conjugate")
    settled = [v[0] * metrics["posterior"]["var"] for v in metrics["variance_growth"]["mc_kl_k1"]]
    assert max(abs(v - 1) for v in settled) < 0.25


def test_misspecified_quadratures_against_scipy():
    from scipy import integrate

    data, s0, s, df = [0.5, 1.2, 4.0, 4.5], 3.0, 0.3, 3.0
    # p(x, z) ~ e^-17: scaled by e^17 so that QUADPACK's absolute tolerance does not dominate
    joint = lambda z: math.exp(vi_conjugate._numpy_log_joint([z], data, s0, s, df)[0] + 17)
    evidence = sum(integrate.quad(joint, a, b, limit=500, epsabs=0, epsrel=1e-12)[0]
                   for a, b in ((-40, 0), (0, 2.5), (2.5, 40)))
    assert vi_conjugate.misspecified_evidence(data, s0, s, df) == pytest.approx(math.log(evidence) - 17, abs=1e-9)
    mean, scale = 1.1, 0.35
    expected = integrate.quad(lambda z: stats.norm.pdf(z, mean, scale) * vi_conjugate._numpy_log_joint(
        [z], data, s0, s, df)[0], mean - 12 * scale, mean + 12 * scale, limit=200)[0]
    expected += 0.5 * math.log(2 * math.pi * math.e * scale**2)
    assert vi_conjugate.misspecified_elbo(mean, scale, data, s0, s, df) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("estimator", ["analytic_kl", "mc_kl", "mc_kl_k3", "stl"])
def test_conjugate_estimators_are_unbiased_away_from_the_posterior(estimator):
    # At q = N(0.1, 0.8^2) the exact -ELBO gradient is d/dphi KL(q || posterior) (log p(x) is constant).
    data = jnp.asarray(DATA, jnp.float64)
    mean, var = vi_conjugate.exact_posterior(DATA, 1.0, 1.0)
    params = jnp.array([0.1, math.log(0.8)], jnp.float64)

    def exact(p):
        sigma = jnp.exp(p[1])
        return 0.5 * (sigma**2 / var + (p[0] - mean) ** 2 / var - 1) - jnp.log(sigma / math.sqrt(var))

    grads = jax.jit(jax.vmap(jax.grad(lambda p, k: vi_conjugate.negative_elbo(
        p, k, data=data, prior_scale=1.0, noise_scale=1.0, estimator=estimator)), in_axes=(None, 0)))(
        params, jax.random.split(jax.random.key(3), 20_000))
    grads = np.asarray(grads)
    stderr = grads.std(axis=0, ddof=1) / math.sqrt(grads.shape[0])
    np.testing.assert_array_less(np.abs(grads.mean(axis=0) - np.asarray(jax.grad(exact)(params))),
                                 5 * stderr + 1e-12)


# --------------------------------------------------------------------------------------------------
# vi_bimodal
# --------------------------------------------------------------------------------------------------


def _mixture_logpdf(x, a):
    return np.logaddexp(stats.norm.logpdf(x, -a, 1), stats.norm.logpdf(x, a, 1)) - math.log(2)


def _quad(function, low, high):
    # log p bends sharply at 0 (width 1 / (2a)); tell QUADPACK where.
    return integrate.quad(function, low, high, limit=400, epsabs=1e-13, epsrel=1e-12, points=[0.0])[0]


def _scipy_reverse_kl(mean, std, a):
    f = lambda x: stats.norm.pdf(x, mean, std) * (stats.norm.logpdf(x, mean, std) - _mixture_logpdf(x, a))
    return _quad(f, mean - 12 * std, mean + 12 * std)


@pytest.mark.parametrize("mean, std, a", [(0.0, 2.0, 2.0), (3.1, 0.9, 3.0), (-1.0, 3.0, 4.0), (0.0, 0.3, 4.0)])
def test_bimodal_quadratures_match_scipy(mean, std, a):
    assert vi_bimodal.reverse_kl_quadrature(mean, std, a) == pytest.approx(_scipy_reverse_kl(mean, std, a),
                                                                           abs=1e-9)
    forward = _quad(lambda x: np.exp(_mixture_logpdf(x, a)) * (_mixture_logpdf(x, a)
                                                              - stats.norm.logpdf(x, mean, std)), -a - 12, a + 12)
    assert vi_bimodal.forward_kl_quadrature(mean, std, a) == pytest.approx(forward, abs=1e-9)


@pytest.fixture(scope="module")
def bimodal(tmp_path_factory):
    out = tmp_path_factory.mktemp("vi_bimodal")
    metrics = vi_bimodal.main(["--quick", "--no-progress", "--out", str(out), "--separations", "2,4",
                               "--steps", "800", "--num-inits", "5", "--check-samples", "20000",
                               "--spread-sizes", "10,1000", "--spread-repeats", "100"])
    return metrics, out


def test_bimodal_forward_fit_matches_moments(bimodal):
    metrics, out = bimodal
    assert (out / "forward_vs_reverse.png").stat().st_size > 0
    for result in metrics["results"]:
        a = result["separation"]
        assert set(result) >= {"separation", "forward", "reverse"}
        assert set(result["reverse"]) >= {"mean", "std", "kl"}
        # 64 fresh draws per step: the end point scatters by ~1-2% of sqrt(1 + a^2).
        target_std = math.sqrt(1 + a * a)
        assert result["forward"]["analytic"] == {"mean": 0.0, "std": target_std,
                                                 "kl": result["forward"]["analytic"]["kl"]}
        assert abs(result["forward"]["mean"]) < 0.1 * target_std
        assert result["forward"]["std"] == pytest.approx(target_std, rel=0.05)


def test_bimodal_seeds_give_intervals(bimodal):
    metrics, _ = bimodal
    seeds = metrics["config"]["seeds"]
    assert seeds >= 2
    for result in metrics["results"]:
        forward = result["forward"]["seeds"]["std"]
        assert len(forward["per_seed"]) == seeds
        assert result["forward"]["std"] == pytest.approx(np.mean(forward["per_seed"]), rel=1e-12)
        assert forward["ci95"] > 0
    # a = 4: each seed's best reverse fit sits on a mode with KL ~ log 2
    reverse = {r["separation"]: r["reverse"]["seeds"] for r in metrics["results"]}[4.0]
    assert all(abs(v - 4.0) < 0.1 for v in reverse["abs_mean"]["per_seed"])
    assert all(abs(v - math.log(2)) < 0.005 for v in reverse["kl"]["per_seed"])
    assert f"sits on one mode in {seeds} of {seeds} seeds" in vi_bimodal.report(metrics, "vi_bimodal")


def test_bimodal_miss_reason_depends_on_where_q_sits():
    spread = {"mean": [0.2264], "mean_low": [0.22638], "mean_high": [0.22642]}
    centred = {"separation": 2.0, "reverse": {"mean": 0.006, "std": 2.047, "kl": 0.22651,
                                              "estimator_spread": {"k1": spread, "k3": spread}}}
    text = vi_bimodal._miss_reason(centred, [10**6])
    assert "r = p/q is bounded" in text and "Var_q(r)" not in text
    on_mode = {"separation": 4.0, "reverse": {**centred["reverse"], "mean": -3.999, "std": 1.0, "kl": 0.6931}}
    assert "Var_q(r) = (e^(4a²) - 1) / 4 = 1.6e+27" in vi_bimodal._miss_reason(on_mode, [10**6])


def _scipy_reverse_optima(a):
    # SciPy's optimiser on the quadrature objective (itself checked against QUADPACK above).
    found = []
    for start in ([-a, 0.0], [a, 0.0], [0.0, math.log(1 + a)]):
        res = optimize.minimize(lambda p: vi_bimodal.reverse_kl_quadrature(p[0], math.exp(p[1]), a), start,
                                method="BFGS", options={"gtol": 1e-8})
        found.append((res.x[0], math.exp(res.x[1]), res.fun))
    return found


def test_bimodal_reverse_fit_seeks_a_mode_when_modes_separate(bimodal):
    metrics, _ = bimodal
    by_a = {r["separation"]: r for r in metrics["results"]}
    found = {f["separation"]: f["optima"] for f in metrics["reverse_optima_found"]}

    # a = 4: best reverse fit sits on one mode, N(+-4, ~1), KL ~ log 2 (the other mode is ignored).
    best = by_a[4.0]["reverse"]
    assert abs(abs(best["mean"]) - 4.0) < 0.1
    assert best["std"] == pytest.approx(1.0, abs=0.05)
    assert best["kl"] == pytest.approx(math.log(2), abs=0.005)
    # k1 from samples of q agrees with quadrature; k3 misses the other mode's mass (about log 2 - 1/2).
    assert abs(best["kl_mc_k1"] - best["kl"]) < 5 * best["kl_mc_k1_stderr"] + 1e-6
    assert best["kl_mc_k3"] < best["kl"] - 0.3
    # ... although k3 is unbiased: its typical estimate sits near log 2 - 1/2 at every n tried, while k1's
    # mean over the independent estimates covers the truth.
    spread = best["estimator_spread"]
    assert all(abs(median - (math.log(2) - 0.5)) < 0.05 for median in spread["k3"]["median"])
    assert spread["k1"]["mean_low"][-1] <= best["kl"] <= spread["k1"]["mean_high"][-1]
    assert "does not cover the truth" in vi_bimodal.report(metrics, "vi_bimodal")
    # Both modes and the centred local optimum, each matching SciPy's optimiser on the quad objective.
    scipy_optima = _scipy_reverse_optima(4.0)
    for mean, std, kl in scipy_optima:
        match = [o for o in found[4.0] if abs(o["mean"] - mean) < 0.15 * std and abs(o["std"] - std) < 0.05 * std]
        assert match, (mean, std, found[4.0])
        assert match[0]["kl"] == pytest.approx(kl, abs=0.01)

    # a = 2: the modes overlap; the only optimum is centred, matching SciPy's.
    mean, std, kl = _scipy_reverse_optima(2.0)[2]
    assert abs(mean) < 1e-3
    assert len(found[2.0]) == 1
    assert abs(by_a[2.0]["reverse"]["mean"]) < 0.1
    assert by_a[2.0]["reverse"]["std"] == pytest.approx(std, rel=0.03)
    assert by_a[2.0]["reverse"]["kl"] == pytest.approx(kl, abs=0.005)


def test_symmetric_mixture_samples_and_density():
    mixture = vi_bimodal.SymmetricMixture(jnp.asarray(3.0, jnp.float64))
    x = np.linspace(-8, 8, 41)
    np.testing.assert_allclose(mixture.log_prob(jnp.asarray(x)), _mixture_logpdf(x, 3.0), rtol=1e-12)
    draws = np.asarray(mixture.sample(jax.random.key(0), (40_000,)))
    # E x = 0, E x^2 = 1 + a^2; standard errors sqrt(10 / n) and sqrt(Var x^2 / n).
    assert abs(draws.mean()) < 5 * math.sqrt(10 / draws.size)
    second = draws**2
    assert abs(second.mean() - 10) < 5 * second.std() / math.sqrt(draws.size)


# --------------------------------------------------------------------------------------------------
# vi_logistic
# --------------------------------------------------------------------------------------------------


def test_predictive_metrics_by_hand():
    # One draw whose logits give P(y = 1) = 0.93, 0.22, 0.64, 0.45 (features = identity); labels 1, 0, 0, 0.
    probability = np.array([0.93, 0.22, 0.64, 0.45])
    draws = np.log(probability / (1 - probability))[None, :]
    labels = np.array([1.0, 0.0, 0.0, 0.0])
    got = vi_logistic.predictive_metrics(draws, np.eye(4), labels, num_bins=5)
    # Predictions 1, 0, 1, 0: 3 of 4 correct; confidences 0.93, 0.78, 0.64, 0.55.
    assert got["accuracy"] == pytest.approx(0.75)
    assert got["log_loss"] == pytest.approx(-np.mean(np.log([0.93, 0.78, 0.36, 0.55])), rel=1e-9)
    # Bins of width 0.1 on [0.5, 1] hold one point each (weight 1/4): |accuracy - confidence| per bin.
    expected_ece = 0.25 * (abs(1 - 0.93) + abs(1 - 0.78) + abs(0 - 0.64) + abs(1 - 0.55))
    assert got["ece"] == pytest.approx(expected_ece, rel=1e-9)
    assert [b["count"] for b in got["reliability"]] == [1, 1, 1, 1]


@pytest.fixture(scope="module")
def logistic(tmp_path_factory):
    out = tmp_path_factory.mktemp("vi_logistic")
    metrics = vi_logistic.main(["--quick", "--no-progress", "--out", str(out), "--num-warmup", "200",
                                "--num-samples", "300", "--steps", "600",
                                # 300 draws are 0.57 per parameter of the d = 31 quadratic classifier: below
                                # the study's gate (4), lowered here so that the ratio path runs.
                                "--ratio-min-draws-per-parameter", "0.5",
                                # 2 cross-fitting folds instead of 5: the same path at a third of the time
                                "--ratio-folds", "2"])
    return metrics, out


def test_logistic_ratio_column_is_gated_by_draws_per_parameter():
    config = vi_logistic.Config.quick()
    parameters = 32 * 33 // 2
    assert config.num_samples < config.ratio_min_draws_per_parameter * parameters  # quick: not computed
    assert vi_logistic.Config().num_samples >= vi_logistic.Config().ratio_min_draws_per_parameter * parameters


def test_logistic_full_rank_is_closer_to_nuts_than_mean_field(logistic):
    metrics, out = logistic
    for name in ("posteriors.png", "reliability.png"):
        assert (out / name).stat().st_size > 0
    results = metrics["results"]
    mean_field, full_rank = results["mean_field"], results["full_rank"]
    for direction in ("kl_reference_to_q", "kl_q_to_reference"):
        assert 0 < full_rank["kl_closed_form_gaussian"][direction] < mean_field["kl_closed_form_gaussian"][direction]
    # Mean field under-estimates the marginal spread of correlated weights; full rank does not.
    assert mean_field["std_ratio_to_reference"]["median"] < 0.85
    assert full_rank["std_ratio_to_reference"]["median"] == pytest.approx(1.0, abs=0.15)
    # Only this direction is trustworthy in d = 31 at this n (see the experiment's report).
    assert full_rank["kl_knn"]["kl_q_to_reference"] < mean_field["kl_knn"]["kl_q_to_reference"]
    # The density-ratio column: finite estimates with standard errors, ranking the families as the closed
    # form does in the direction q -> reference (mean field's too-narrow q is far from NUTS there).
    for name in ("mean_field", "full_rank"):
        assert all(np.isfinite(v) for v in full_rank["kl_ratio"].values())
        assert results[name]["kl_ratio"]["stderr_q_to_reference"] > 0
    assert full_rank["kl_ratio"]["kl_q_to_reference"] < mean_field["kl_ratio"]["kl_q_to_reference"]
    text = vi_logistic.report(metrics, "x")
    assert "ratio KL(q ‖ ref)" in text
    # one NUTS chain per seed, both families measured against each; the numbers are seed means
    seeds = metrics["config"]["seeds"]
    assert seeds == 2 and len(results["nuts"]["divergences_per_chain"]) == seeds
    for name in ("mean_field", "full_rank"):
        block = results[name]["seeds"]["kl_closed_form_gaussian"]["kl_q_to_reference"]
        assert len(block["per_seed"]) == seeds and block["ci95"] > 0
        assert results[name]["kl_closed_form_gaussian"]["kl_q_to_reference"] == pytest.approx(
            np.mean(block["per_seed"]), rel=1e-12)
    assert "Holm" in text and (out / "distances.png").stat().st_size > 0
    assert "**kNN column**" in text and "**Ratio column**" in text
    for name in ("nuts", "mean_field", "full_rank"):
        assert results[name]["test"]["accuracy"] > 0.9
        assert 0 <= results[name]["test"]["ece"] < 0.2


def test_logistic_knn_and_ratio_note_reads_against_the_closed_form():
    def block(ref_to_q, q_to_ref):
        return {"kl_reference_to_q": ref_to_q, "kl_q_to_reference": q_to_ref}

    metrics = {"config": {"num_samples": 4000, "dimension": 31, "ratio_penalty": 1e-3},
               "reference_floor": {"gaussian_closed_form": block(0.06, 0.06), "knn": block(0.03, -0.03),
                                   "ratio": block(0.0, 0.0)},
               "results": {"mean_field": {"kl_closed_form_gaussian": block(17.06, 10.26), "kl_knn": block(-0.37, 7.06),
                                          "kl_ratio": block(10.1, 7.98)},
                           "full_rank": {"kl_closed_form_gaussian": block(0.17, 0.16), "kl_knn": block(0.15, 0.2),
                                         "kl_ratio": block(0.12, 0.11)}}}
    text = vi_logistic._knn_and_ratio_note(metrics)
    # kNN: negative for mean field ref -> q (truth ~17), fine elsewhere; the floor does not bound that bias
    assert "below zero, for mean_field ref → q, while" in text and "does not bound it" in text
    assert "ref → q: disagrees; q → ref: agrees" in text
    # ratio: 10.1 / (17.06 - 0.06) = 0.59, more than a quarter low; 7.98 / 10.2 = 0.78 is not
    assert "mean_field ref → q x0.59" in text and "more than a quarter lower for mean_field ref → q:" in text


# --------------------------------------------------------------------------------------------------
# vae_digits
# --------------------------------------------------------------------------------------------------


def test_vae_kl_terms_agree_in_expectation():
    # Both KL terms estimate the same ELBO: their means over eps agree within 5 standard errors.
    x_train, _, _, _ = vae_digits.load_data(0)
    x = jnp.asarray(x_train[0], jnp.float64)
    params = vae_digits.init_params(jax.random.key(1), 16, jnp.float64)
    keys = jax.random.split(jax.random.key(2), 10_000)

    @jax.jit
    def kl_difference(keys):
        # Same eps for both: only the KL estimate differs.
        elbo = lambda k, term: vae_digits.example_elbo(params, x, k, term)
        return jax.vmap(lambda k: elbo(k, "monte_carlo_k1") - elbo(k, "closed_form"))(keys)

    difference = np.asarray(kl_difference(keys))
    assert abs(difference.mean()) < 5 * difference.std(ddof=1) / math.sqrt(difference.size)
    assert difference.std() > 0


def test_vae_runs_and_reports(tmp_path):
    metrics = vae_digits.main(["--quick", "--no-progress", "--out", str(tmp_path), "--epochs", "4", "--latents", "2",
                               "--seeds", "2", "--iwae-draws", "32", "--grad-draws", "16", "--hidden", "32"])
    for name in ("iwae_by_latent.png", "reconstructions.png", "latent.png"):
        assert (tmp_path / name).stat().st_size > 0
    result = metrics["results"]["2"]
    for term in vae_digits.KL_TERMS:
        values = result["terms"][term]
        assert len(values["iwae"]) == 2 and all(np.isfinite(values["iwae"]))
        curve = np.asarray(values["train_curve"])
        assert (curve[:, -1] > curve[:, 0]).all()  # training helps
        # the importance-weighted bound (K = 32) is tighter than the ELBO, and both bound log p(x) <= 0
        assert np.mean(values["iwae"]) > np.mean(values["elbo"])
        assert -64 * math.log(2) - 50 < np.mean(values["elbo"]) < np.mean(values["iwae"]) < 0
    for stage in ("initial", "final"):
        variance = result["gradient_variance"][stage]
        # the decoder never sees the KL term: same eps, same decoder gradients for all three
        for term in ("monte_carlo_k1", "stl"):
            assert variance[term]["decoder"] == pytest.approx(variance["closed_form"]["decoder"], rel=1e-9)
    # at initialisation q(z | x) is near the prior: k1 adds the score noise the closed form does not have
    initial = result["gradient_variance"]["initial"]
    assert initial["monte_carlo_k1"]["encoder"] > 2 * initial["closed_form"]["encoder"]
    assert {(row["a"], row["b"]) for row in metrics["comparisons"]} == {
        ("closed_form", "monte_carlo_k1"), ("closed_form", "stl"), ("stl", "monte_carlo_k1")}
    assert "paired t-tests" in vae_digits.report(metrics, "vae_digits")


def test_vae_stl_term_has_the_value_of_k1_and_its_expected_gradient():
    # STL drops the score term: the same value as k1 for every eps, and the same gradient in expectation
    x_train, _, _, _ = vae_digits.load_data(0)
    x = jnp.asarray(x_train[0], jnp.float64)
    params = vae_digits.init_params(jax.random.key(1), 16, jnp.float64, latent=3)
    keys = jax.random.split(jax.random.key(2), 4000)
    elbo = lambda p, k, term: vae_digits.example_elbo(p, x, k, term)
    values = jax.jit(jax.vmap(lambda k: elbo(params, k, "stl") - elbo(params, k, "monte_carlo_k1")))(keys)
    assert np.abs(np.asarray(values)).max() < 1e-12
    grad = lambda term: jax.jit(jax.vmap(lambda k: jax.grad(elbo)(params, k, term)))(keys)
    stl, k1 = grad("stl")["encoder"].layers[1].bias, grad("monte_carlo_k1")["encoder"].layers[1].bias
    difference = np.asarray(stl - k1)
    stderr = difference.std(axis=0, ddof=1) / math.sqrt(difference.shape[0])
    np.testing.assert_array_less(np.abs(difference.mean(axis=0)), 5 * stderr + 1e-12)


def test_vae_reading_applies_holm():
    rows = [{"latent": 2, "a": "closed_form", "b": "stl", "difference": -0.13, "p_value": 0.001},
            {"latent": 8, "a": "closed_form", "b": "stl", "difference": -0.04, "p_value": 0.047},
            {"latent": 16, "a": "closed_form", "b": "stl", "difference": 0.01, "p_value": 0.6}]
    lines = vae_digits._reading({"comparisons": rows}).splitlines()
    assert "stl is higher by 0.13 nats (p = 0.001, Holm 0.003)" in lines[0]
    assert "significant alone but not after Holm's correction" in lines[1]
    assert "no significant difference" in lines[2]
