"""The table behind ``tests/test_contract.py``: one row per public estimator of kljax.

A row says how to call the function on a few named arrays (``call``), how to build valid arrays of
those names for a float dtype (``make``), and which arguments to corrupt and how (``corruptions``).
The generic checks of API.md's conventions (jit == eager, vmap == loop, dtype follows the input,
NaN under jit for a bad value, an eager error naming the argument, no retracing, ...) are written
once in ``test_contract.py`` and run over every row. Adding an estimator = adding a row.

Where the library breaks the contract today, the exact case carries an ``xfail`` reason (the test
is then ``xfail(strict=True)``: it must keep failing until the library is fixed, and then the
reason is removed here). Each reason says what happens and what should.

Inputs are tiny: the cost of this table is compilation, not arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kljax import analytic, discrete, drift, knn, lm, mc, plot, policy, ratio
from kljax import distributions as dist

KEY = jax.random.key(0)  # the PRNG key of every sampling row (closed over, not an input)

# --------------------------------------------------------------------------------------------------
# Corruptions


#: kind -> (how to corrupt a NumPy copy of the argument in place, whether it hits every entry)
_KINDS: dict[str, tuple[Callable[[np.ndarray], None], bool]] = {
    "nan": (lambda a: a.put(0, np.nan), False),
    "+inf": (lambda a: a.put(0, np.inf), False),
    "negative": (lambda a: a.put(0, -0.5), False),
    "zero": (lambda a: a.put(0, 0.0), False),
    "below_one": (lambda a: a.put(0, 0.5), False),
    "no_mass": (lambda a: a.fill(0.0), True),  # probabilities: an all-zero slice
    "all_-inf": (lambda a: a.fill(-np.inf), True),  # logits: an all -inf slice
    "duplicate_row": (lambda a: a.__setitem__(1, a[0]), True),  # samples: two equal points
    "out_of_range": (lambda a: a.put(0, 99), False),  # integer tokens outside the vocabulary
    "decreasing": (lambda a: a.__setitem__(Ellipsis, a[..., ::-1].copy()), True),  # bin edges
}


@dataclasses.dataclass(frozen=True)
class Corruption:
    """One bad value for one argument.

    Attributes:
        arg: the input (a key of the row's ``make``) to corrupt.
        kind: a key of ``_KINDS``.
        name: the argument name the eager error must show in backticks, as the library writes it
            (default ``arg``; e.g. ``scale`` when ``scale_p`` builds the P of an analytic rule).
        allow_inf: ``+inf`` under jit is acceptable here because the math says so (declared per case).
        nan_in: for outputs where only part depends on the bad value, the part that must be NaN
            (a function of each floating output leaf); default: all of it (or the corrupted entries
            of an elementwise row).
        xfail_jit, xfail_eager: the contract violation that makes that check fail today, or None.
    """

    arg: str
    kind: str
    name: str | None = None
    allow_inf: bool = False
    nan_in: Callable[[np.ndarray], np.ndarray] | None = None
    xfail_jit: str | None = None
    xfail_eager: str | None = None

    @property
    def message_name(self) -> str:
        return self.name or self.arg

    @property
    def id(self) -> str:
        return f"{self.arg}={self.kind}"

    def apply(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Corrupted copy of ``inputs`` and the corrupted entries' mask (None: all of them)."""
        corrupt, whole = _KINDS[self.kind]
        value = np.array(inputs[self.arg], copy=True)
        corrupt(value)
        mask = None
        if not whole:
            mask = np.zeros(value.shape, bool)
            mask.put(0, True)
        return {**inputs, self.arg: value}, mask


def corrupt(args: str, kinds: str, **options) -> tuple[Corruption, ...]:
    """Every ``kind`` (space-separated) for every ``arg`` (space-separated), sharing ``options``."""
    return tuple(Corruption(a, k, **options) for a in args.split() for k in kinds.split())


@dataclasses.dataclass(frozen=True)
class ShapeError:
    """A shape problem: ``arg`` with its last axis cut by one must raise ValueError naming ``name``,
    eagerly and at trace time under jit."""

    arg: str
    name: str | None = None
    xfail: str | None = None

    @property
    def message_name(self) -> str:
        return self.name or self.arg

    def apply(self, inputs):
        value = np.asarray(inputs[self.arg])
        return {**inputs, self.arg: value[..., :-1]}


# --------------------------------------------------------------------------------------------------
# Rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One public function under the contract.

    Attributes:
        id: test id, e.g. ``discrete.kl``; ``[...]`` marks a variant (an estimator option).
        covers: the public names this row exercises (``module.name`` or ``module.Class.method``).
        call: the function of the named inputs, positionally in ``make``'s order; static options are
            closed over.
        make: ``(dtype, rng) -> dict`` of valid NumPy inputs (floats in ``dtype``).
        corruptions: bad values, see :class:`Corruption`.
        shape_errors: shape problems, see :class:`ShapeError`.
        elementwise: the output has the shape of the inputs; only corrupted entries must be NaN.
        output_dtype: fixed dtype of the (first) output when it does not follow the input (int, bool).
        xfail: check name -> the contract violation that makes that generic check fail today.
        slow: checks of this row marked ``slow`` because they compile for seconds (``ALL`` for every
            check); the default run keeps to cheap compiles.
        vmap_rtol: the vmap == loop tolerance when the table's (1e-6 in float32) is too strict for a
            stated reason (an iterative fit whose batched kernels round differently).
    """

    id: str
    covers: tuple[str, ...]
    call: Callable[..., Any]
    make: Callable[[Any, np.random.Generator], dict[str, np.ndarray]]
    corruptions: tuple[Corruption, ...] = ()
    shape_errors: tuple[ShapeError, ...] = ()
    elementwise: bool = False
    output_dtype: Any = None
    xfail: dict[str, str] = dataclasses.field(default_factory=dict)
    slow: tuple[str, ...] = ()
    vmap_rtol: float | None = None


ROWS: list[Row] = []
ALL = ("all",)  # Row.slow: every check of the row is slow (compiles take seconds: samplers, permutations)
VMAP = ("vmap",)  # Row.slow: only the vmap check is slow (k-NN search batched: seconds to compile)


def row(*args, **kwargs) -> None:
    ROWS.append(Row(*args, **kwargs))


# Small input builders (NumPy, so that corruptions are plain item assignments).


def _uniform(rng, shape, dtype, low, high):
    return rng.uniform(low, high, shape).astype(dtype)


def _normal(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def _positive(rng, shape, dtype):
    return _uniform(rng, shape, dtype, 0.5, 2.0)


def _tril(rng, d, dtype):
    scale = np.tril(rng.uniform(-0.5, 0.5, (d, d)))
    np.fill_diagonal(scale, rng.uniform(0.5, 2.0, d))
    return scale.astype(dtype)


def _simplex(rng, k, dtype):
    p = rng.uniform(0.2, 1.0, k)
    return (p / p.sum()).astype(dtype)


# --------------------------------------------------------------------------------------------------
# kljax.discrete: categorical inputs of 3 categories


def _pq(dtype, rng):
    return {"p": _uniform(rng, 3, dtype, 0.1, 1.0), "q": _uniform(rng, 3, dtype, 0.1, 1.0)}


_PROBABILITY_KINDS = "nan negative +inf no_mass"

for _name in ("kl", "cross_entropy", "jensen_shannon", "jeffreys"):
    row(f"discrete.{_name}", (f"discrete.{_name}",), getattr(discrete, _name), _pq,
        corrupt("p q", _PROBABILITY_KINDS), shape_errors=(ShapeError("q"),),
        slow=ALL if _name == "jensen_shannon" else ())

row("discrete.entropy", ("discrete.entropy",), discrete.entropy,
    lambda dtype, rng: {"p": _uniform(rng, 3, dtype, 0.1, 1.0)}, corrupt("p", _PROBABILITY_KINDS))

row("discrete.kl_logits", ("discrete.kl_logits",), discrete.kl_logits,
    lambda dtype, rng: {"logits_p": _normal(rng, 3, dtype), "logits_q": _normal(rng, 3, dtype)},
    corrupt("logits_p logits_q", "nan +inf all_-inf"), shape_errors=(ShapeError("logits_q"),))

row("discrete.kl_log", ("discrete.kl_log",), discrete.kl_log,
    lambda dtype, rng: {"log_p": np.log(_simplex(rng, 3, dtype)), "log_q": np.log(_simplex(rng, 3, dtype))},
    corrupt("log_p log_q", "nan +inf all_-inf"), shape_errors=(ShapeError("log_q"),))

row("discrete.histogram_kl", ("discrete.histogram_kl",),
    lambda x, y, pseudocount: discrete.histogram_kl(x, y, bins=4, pseudocount=pseudocount),
    lambda dtype, rng: {"x": _normal(rng, 8, dtype), "y": _normal(rng, 6, dtype),
                        "pseudocount": np.asarray(0.5, dtype)},
    corrupt("x y", "nan +inf") + corrupt("pseudocount", "negative"), slow=ALL)


# --------------------------------------------------------------------------------------------------
# kljax.distributions: log_prob, entropy and sample of each family, built inside the call so that
# eagerly the constructor validates and under jit/vmap it sees tracers.

# family -> (class, parameter builders in constructor order, corruptions, a point of the support)
_FAMILIES: dict[str, tuple] = {
    "Normal": (dist.Normal, {"loc": lambda d, r: _normal(r, (), d), "scale": lambda d, r: _positive(r, (), d)},
               corrupt("loc", "nan +inf") + corrupt("scale", "nan negative zero +inf"),
               lambda d: np.asarray(0.3, d)),
    "MultivariateNormalDiag": (
        dist.MultivariateNormalDiag,
        {"loc": lambda d, r: _normal(r, 2, d), "scale_diag": lambda d, r: _positive(r, 2, d)},
        corrupt("loc", "nan +inf") + corrupt("scale_diag", "nan negative zero +inf"),
        lambda d: np.asarray([0.3, -0.2], d)),
    "MultivariateNormalTriL": (
        dist.MultivariateNormalTriL,
        {"loc": lambda d, r: _normal(r, 2, d), "scale_tril": lambda d, r: _tril(r, 2, d)},
        corrupt("loc", "nan +inf") + corrupt("scale_tril", "nan +inf")
        + corrupt("scale_tril", "negative zero", name="diagonal of scale_tril"),
        lambda d: np.asarray([0.3, -0.2], d)),
    "Categorical": (dist.Categorical, {"logits": lambda d, r: _normal(r, 3, d)},
                    corrupt("logits", "nan +inf all_-inf"), lambda d: np.asarray(1, np.int32)),
    "Bernoulli": (dist.Bernoulli, {"logits": lambda d, r: _normal(r, (), d)},
                  corrupt("logits", "nan"), lambda d: np.asarray(1, np.int32)),
    "Beta": (dist.Beta, {"alpha": lambda d, r: _positive(r, (), d), "beta": lambda d, r: _positive(r, (), d)},
             corrupt("alpha beta", "nan negative zero +inf"), lambda d: np.asarray(0.3, d)),
    "Gamma": (dist.Gamma, {"concentration": lambda d, r: _positive(r, (), d), "rate": lambda d, r: _positive(r, (), d)},
              corrupt("concentration rate", "nan negative zero +inf"), lambda d: np.asarray(0.7, d)),
    "Dirichlet": (dist.Dirichlet, {"concentration": lambda d, r: _positive(r, 3, d)},
                  corrupt("concentration", "nan negative zero +inf"), lambda d: np.asarray([0.2, 0.3, 0.5], d)),
    "Laplace": (dist.Laplace, {"loc": lambda d, r: _normal(r, (), d), "scale": lambda d, r: _positive(r, (), d)},
                corrupt("loc", "nan +inf") + corrupt("scale", "nan negative zero +inf"),
                lambda d: np.asarray(0.3, d)),
    "Exponential": (dist.Exponential, {"rate": lambda d, r: _positive(r, (), d)},
                    corrupt("rate", "nan negative zero +inf"), lambda d: np.asarray(0.7, d)),
    "Poisson": (dist.Poisson, {"rate": lambda d, r: _positive(r, (), d)},
                corrupt("rate", "nan negative zero +inf"), lambda d: np.asarray(2.0, d)),
}


def _parameters(builders):
    return lambda dtype, rng: {name: build(dtype, rng) for name, build in builders.items()}


for _family, (_cls, _builders, _bad, _point) in _FAMILIES.items():
    _make_parameters = _parameters(_builders)

    def _make_with_point(dtype, rng, _make_parameters=_make_parameters, _point=_point):
        return {**_make_parameters(dtype, rng), "x": _point(dtype)}

    row(f"distributions.{_family}.log_prob", (f"distributions.{_family}.log_prob",),
        lambda *args, _cls=_cls: _cls(*args[:-1]).log_prob(args[-1]), _make_with_point, _bad)
    row(f"distributions.{_family}.entropy", (f"distributions.{_family}.entropy",),
        lambda *args, _cls=_cls: _cls(*args).entropy(), _make_parameters, _bad)
    _integer = _family in ("Categorical", "Bernoulli", "Poisson")  # -1 marks a bad parameter's sample
    row(f"distributions.{_family}.sample", (f"distributions.{_family}.sample",),
        lambda *args, _cls=_cls: _cls(*args).sample(KEY, (3,)), _make_parameters, _bad,
        output_dtype=jnp.int32 if _integer else None,
        # jax.random.gamma and poisson (rejection loops) take seconds to compile
        slow=ALL if _family in ("Beta", "Gamma", "Dirichlet", "Poisson") else ())


# --------------------------------------------------------------------------------------------------
# kljax.analytic: every rule, through distributions built from (valid or corrupted) parameters


def _pair(family):
    """Inputs NAME_p, NAME_q for the parameters of P and Q, and corruptions of both (P's all, Q's
    first kind of each parameter), naming the constructor's argument."""
    cls, builders, bad, _ = _FAMILIES[family]
    names = list(builders)

    def make(dtype, rng):
        return {f"{name}_{side}": builders[name](dtype, rng) for side in "pq" for name in names}

    def call(*args):
        return cls(*args[: len(names)]), cls(*args[len(names):])

    corruptions = tuple(dataclasses.replace(c, arg=f"{c.arg}_p", name=c.message_name) for c in bad)
    seen = set()
    for c in bad:
        if c.arg not in seen:
            seen.add(c.arg)
            corruptions += (dataclasses.replace(c, arg=f"{c.arg}_q", name=c.message_name),)
    return make, call, corruptions


_RULES = {
    "kl_normal": "Normal",
    "kl_mvn_diag": "MultivariateNormalDiag",
    "kl_mvn": "MultivariateNormalTriL",
    "kl_categorical": "Categorical",
    "kl_bernoulli": "Bernoulli",
    "kl_beta": "Beta",
    "kl_gamma": "Gamma",
    "kl_dirichlet": "Dirichlet",
    "kl_laplace": "Laplace",
    "kl_exponential": "Exponential",
    "kl_poisson": "Poisson",
}

for _rule, _family in _RULES.items():
    _make, _call, _bad = _pair(_family)
    row(f"analytic.{_rule}", (f"analytic.{_rule}",),
        lambda *args, _rule=_rule, _call=_call: getattr(analytic, _rule)(*_call(*args)), _make, _bad,
        slow=ALL if _rule in ("kl_beta", "kl_gamma", "kl_dirichlet") else ())  # Stirling series: big programs

# The dispatcher: a same-family pair and the registered cross-family pairs.
_make, _call, _bad = _pair("Normal")
row("analytic.kl[Normal||Normal]", ("analytic.kl",), lambda *args, _call=_call: analytic.kl(*_call(*args)),
    _make, _bad)


def _mvn_mixed(dtype, rng):
    return {"loc_p": _normal(rng, 2, dtype), "scale_diag_p": _positive(rng, 2, dtype),
            "loc_q": _normal(rng, 2, dtype), "scale_tril_q": _tril(rng, 2, dtype)}


row("analytic.kl[MultivariateNormalDiag||MultivariateNormalTriL]", ("analytic.kl", "analytic.kl_mvn"),
    lambda loc_p, scale_diag_p, loc_q, scale_tril_q: analytic.kl(
        dist.MultivariateNormalDiag(loc_p, scale_diag_p), dist.MultivariateNormalTriL(loc_q, scale_tril_q)),
    _mvn_mixed,
    corrupt("scale_diag_p", "nan negative", name="scale_diag")
    + corrupt("scale_tril_q", "negative", name="diagonal of scale_tril") + corrupt("loc_q", "nan", name="loc"))


# --------------------------------------------------------------------------------------------------
# kljax.mc: log-densities at 6 samples


def _log_densities(dtype, rng):
    return {"log_p": _normal(rng, 6, dtype) - 1.0, "log_q": _normal(rng, 6, dtype) - 1.0}


_LOG_DENSITY_BAD = corrupt("log_p log_q", "nan")
_MC_SHAPE = (ShapeError("log_q"),)

for _name in ("k1", "k2", "k3", "reverse_k1", "reverse_k3"):
    row(f"mc.{_name}", (f"mc.{_name}",), getattr(mc, _name), _log_densities, _LOG_DENSITY_BAD,
        _MC_SHAPE, elementwise=True)

for _name, _estimators in (("kl", mc.ESTIMATORS), ("kl_with_stderr", mc.ESTIMATORS),
                           ("reverse_kl", mc.REVERSE_ESTIMATORS),
                           ("reverse_kl_with_stderr", mc.REVERSE_ESTIMATORS)):
    for _estimator in _estimators:
        row(f"mc.{_name}[{_estimator}]", (f"mc.{_name}",),
            lambda log_p, log_q, _f=getattr(mc, _name), _e=_estimator: _f(log_p, log_q, estimator=_e),
            _log_densities, _LOG_DENSITY_BAD, _MC_SHAPE)

_make, _call, _ = _pair("Normal")
_FROM_BAD = (corrupt("scale_p", "negative nan", name="scale") + corrupt("loc_p", "+inf", name="loc")
             + corrupt("loc_q", "nan", name="loc") + corrupt("scale_q", "zero", name="scale"))
for _name in ("kl_from", "reverse_kl_from"):
    for _stderr in (False, True):
        row(f"mc.{_name}" + ("[with_stderr]" if _stderr else ""), (f"mc.{_name}",),
            lambda *args, _f=getattr(mc, _name), _s=_stderr, _call=_call: _f(KEY, *_call(*args), 4, with_stderr=_s),
            _make, _FROM_BAD)


# --------------------------------------------------------------------------------------------------
# kljax.knn: x ~ P (7, 2), y ~ Q (6, 2); the default search (a k-d tree for d = 2 on CPU) and brute force


def _xy(dtype, rng, d=2):
    return {"x": _normal(rng, (7, d), dtype), "y": _normal(rng, (6, d), dtype, 1.5)}


_SAMPLES_BAD = corrupt("x", "nan +inf duplicate_row") + corrupt("y", "nan +inf")
_KNN_SHAPE = (ShapeError("y"),)

# neighbors: a bad query makes its own row of distances NaN; a bad reference every row (it could be
# anyone's nearest neighbour), as documented.
_NEIGHBORS_BAD = corrupt("queries", "nan +inf", nan_in=lambda distances: distances[0]) + corrupt("refs", "nan +inf")
row("knn.neighbors", ("knn.neighbors",), lambda queries, refs: knn.neighbors(queries, refs, 2),
    lambda dtype, rng: {"queries": _normal(rng, (4, 2), dtype), "refs": _normal(rng, (5, 2), dtype)},
    _NEIGHBORS_BAD, (ShapeError("refs"),), slow=VMAP)
row("knn.neighbors[brute]", ("knn.neighbors",),
    lambda queries, refs: knn.neighbors(queries, refs, 2, method="brute"),
    lambda dtype, rng: {"queries": _normal(rng, (4, 5), dtype), "refs": _normal(rng, (5, 5), dtype)},
    _NEIGHBORS_BAD, (ShapeError("refs"),), slow=ALL)
# wkv_adaptive is left without the duplicate: its distances rho_l are taken at the adaptive radius
# max(rho_k, nu_k), so a duplicated point makes them 0 (ValueError / NaN) only when no other point of
# x lies within that radius; otherwise the estimate is defined and finite.
_ADAPTIVE_BAD = tuple(c for c in _SAMPLES_BAD if c.kind != "duplicate_row")
for _estimator in knn.ESTIMATORS:
    row(f"knn.kl[{_estimator}]", ("knn.kl",), lambda x, y, _e=_estimator: knn.kl(x, y, estimator=_e), _xy,
        _ADAPTIVE_BAD if _estimator == "wkv_adaptive" else _SAMPLES_BAD, _KNN_SHAPE,
        slow=ALL if _estimator == "wkv_adaptive" else VMAP)
row("knn.kl[wkv,brute]", ("knn.kl",), lambda x, y: knn.kl(x, y, estimator="wkv", method="brute"),
    lambda dtype, rng: _xy(dtype, rng, d=5), _SAMPLES_BAD, _KNN_SHAPE, slow=ALL)
row("knn.entropy", ("knn.entropy",), lambda x: knn.entropy(x),
    lambda dtype, rng: {"x": _normal(rng, (7, 2), dtype)}, corrupt("x", "nan +inf duplicate_row"), slow=VMAP)
row("knn.cross_entropy", ("knn.cross_entropy",), lambda x, y: knn.cross_entropy(x, y), _xy,
    corrupt("x y", "nan +inf"), _KNN_SHAPE, slow=VMAP)
row("knn.kl_with_stderr", ("knn.kl_with_stderr",), lambda x, y: knn.kl_with_stderr(x, y), _xy, _SAMPLES_BAD,
    _KNN_SHAPE, slow=VMAP)
row("knn.entropy_with_stderr", ("knn.entropy_with_stderr",), lambda x: knn.entropy_with_stderr(x),
    lambda dtype, rng: {"x": _normal(rng, (7, 2), dtype)}, corrupt("x", "nan +inf duplicate_row"), slow=VMAP)
# mutual_information: paired rows x (7, 2), y (7, 1); a duplicated row of x alone is no joint copy.
row("knn.mutual_information", ("knn.mutual_information",), lambda x, y: knn.mutual_information(x, y, k=2),
    lambda dtype, rng: {"x": _normal(rng, (7, 2), dtype), "y": _normal(rng, (7, 1), dtype)},
    corrupt("x y", "nan +inf"), slow=VMAP)


# --------------------------------------------------------------------------------------------------
# kljax.ratio: trained estimators on x ~ P (60, 2), y ~ Q (50, 2) (5 folds), 20 steps; paired rows x (60, 2),
# y (60, 3) for mutual information. Every check compiles a training program, so one row per family: `kl`
# and `kl_with_stderr` return the `value` and (`value`, `stderr`) fields of `kl_with_diagnostics`'s Estimate
# (likewise for mutual information), all of which the row checks. vmap == loop holds to 1e-3, not the
# table's 1e-6: the quadratic classifier's damped Newton fit (a line search, then a stopping test)
# amplifies the different rounding of batched and unbatched float32 kernels (measured: 2e-5 to 7e-4).
# Mutual information telescopes through three such fits (12 points per fold, nearly separable) and
# holds to 1e-2 (measured: 1.2e-3 on an estimate of -0.002 nats).

row("ratio.kl_with_diagnostics", ("ratio.kl", "ratio.kl_with_stderr", "ratio.kl_with_diagnostics"),
    lambda x, y: ratio.kl_with_diagnostics(KEY, x, y, num_steps=20),
    lambda dtype, rng: {"x": _normal(rng, (60, 2), dtype), "y": _normal(rng, (50, 2), dtype, 1.5)},
    corrupt("x y", "nan +inf"), (ShapeError("y"),), slow=ALL, vmap_rtol=1e-3)
row("ratio.mutual_information_with_diagnostics",
    ("ratio.mutual_information", "ratio.mutual_information_with_stderr", "ratio.mutual_information_with_diagnostics"),
    lambda x, y: ratio.mutual_information_with_diagnostics(KEY, x, y, num_steps=20),
    lambda dtype, rng: {"x": _normal(rng, (60, 2), dtype), "y": _normal(rng, (60, 3), dtype)},
    corrupt("x y", "nan +inf"), slow=ALL, vmap_rtol=1e-2)


# --------------------------------------------------------------------------------------------------
# kljax.policy


def _log_probs(*names):
    def make(dtype, rng):
        return {name: np.log(_uniform(rng, 4, dtype, 0.1, 0.9)) for name in names}

    return make


def _nan_log_probs(*names):
    return tuple(Corruption(name, "nan") for name in names)


for _name in ("k1_loss", "k2_loss", "k3_loss", "abs_loss", "straight_through_loss", "kl_loss"):
    row(f"policy.{_name}", (f"policy.{_name}",), getattr(policy, _name), _log_probs("log_prob", "log_prob_ref"),
        _nan_log_probs("log_prob", "log_prob_ref"), (ShapeError("log_prob_ref"),), elementwise=True)

row("policy.k1_reward", ("policy.k1_reward",), policy.k1_reward,
    lambda dtype, rng: {**_log_probs("log_prob", "log_prob_ref")(dtype, rng), "baseline": _normal(rng, 4, dtype)},
    _nan_log_probs("log_prob", "log_prob_ref"), (ShapeError("log_prob_ref"),), elementwise=True)
row("policy.k3_loss_is", ("policy.k3_loss_is",), policy.k3_loss_is,
    _log_probs("log_prob", "log_prob_ref", "log_prob_old"),
    _nan_log_probs("log_prob", "log_prob_ref", "log_prob_old"),
    (ShapeError("log_prob_ref"), ShapeError("log_prob_old")), elementwise=True)
row("policy.k3_loss_is[max_weight]", ("policy.k3_loss_is",),
    lambda log_prob, log_prob_ref, log_prob_old, max_weight: policy.k3_loss_is(
        log_prob, log_prob_ref, log_prob_old, max_weight=max_weight),
    lambda dtype, rng: {**_log_probs("log_prob", "log_prob_ref", "log_prob_old")(dtype, rng),
                        "max_weight": np.asarray(1.5, dtype)},
    _nan_log_probs("log_prob_old") + corrupt("max_weight", "nan negative zero", nan_in=lambda out: out),
    elementwise=True)
row("policy.kl_loss[forward,k1]", ("policy.kl_loss",),
    lambda log_prob, log_prob_ref: policy.kl_loss(log_prob, log_prob_ref, direction="forward", estimator="k1"),
    _log_probs("log_prob", "log_prob_ref"), _nan_log_probs("log_prob", "log_prob_ref"),
    (ShapeError("log_prob_ref"),), elementwise=True)
row("policy.sequence_k1_reward", ("policy.sequence_k1_reward",), policy.sequence_k1_reward,
    _log_probs("log_probs", "log_probs_ref"), _nan_log_probs("log_probs", "log_probs_ref"),
    (ShapeError("log_probs_ref"),))
row("policy.exact_kl", ("policy.exact_kl",), policy.exact_kl,
    lambda dtype, rng: {"logits": _normal(rng, 3, dtype), "logits_ref": _normal(rng, 3, dtype)},
    corrupt("logits logits_ref", "nan +inf all_-inf"), (ShapeError("logits_ref"),))
row("policy.sequence_exact_kl", ("policy.sequence_exact_kl",), policy.sequence_exact_kl,
    lambda dtype, rng: {"logits": _normal(rng, (3, 4), dtype), "logits_ref": _normal(rng, (3, 4), dtype),
                        "tokens": rng.integers(0, 4, 3).astype(np.int32)},
    corrupt("logits", "nan +inf") + corrupt("logits_ref", "nan") + corrupt("tokens", "out_of_range"),
    (ShapeError("tokens"),), slow=ALL)

def _coefficient_inputs(**values):
    def make(dtype, rng):
        return {name: np.asarray(value * rng.uniform(0.9, 1.1), dtype) for name, value in values.items()}

    return make


row("policy.adaptive_kl_coefficient", ("policy.adaptive_kl_coefficient",),
    lambda beta, kl, target, tolerance, factor: policy.adaptive_kl_coefficient(
        beta, kl, target, tolerance=tolerance, factor=factor),
    _coefficient_inputs(beta=1.0, kl=0.05, target=0.01, tolerance=1.5, factor=2.0),
    corrupt("beta target", "nan negative zero") + corrupt("tolerance factor", "below_one nan")
    + corrupt("kl", "nan"))
row("policy.proportional_kl_coefficient", ("policy.proportional_kl_coefficient",),
    lambda beta, kl, target, num_steps, horizon, error_clip: policy.proportional_kl_coefficient(
        beta, kl, target, num_steps, horizon, error_clip=error_clip),
    _coefficient_inputs(beta=0.1, kl=12.0, target=6.0, num_steps=256.0, horizon=10_000.0, error_clip=0.2),
    corrupt("beta target horizon", "nan negative zero") + corrupt("num_steps error_clip", "nan negative")
    + corrupt("kl", "nan"))
row("policy.lagrangian_kl_coefficient", ("policy.lagrangian_kl_coefficient",),
    lambda beta, kl, target, learning_rate: policy.lagrangian_kl_coefficient(
        beta, kl, target, learning_rate=learning_rate),
    _coefficient_inputs(beta=0.1, kl=0.05, target=0.01, learning_rate=0.5),
    corrupt("beta", "nan negative") + corrupt("target learning_rate", "nan negative zero") + corrupt("kl", "nan"))


# --------------------------------------------------------------------------------------------------
# kljax.lm: 3 tokens, hidden sizes 4 (P) and 3 (Q), vocabulary 5, chunks (2, 2) that divide neither


def _hidden_states(dtype, rng):
    return {"hidden_p": _normal(rng, (3, 4), dtype), "unembed_p": _normal(rng, (4, 5), dtype),
            "hidden_q": _normal(rng, (3, 3), dtype), "unembed_q": _normal(rng, (3, 5), dtype),
            "temperature": np.asarray(1.5, dtype)}


_HIDDEN_BAD = (corrupt("hidden_p hidden_q", "nan +inf", nan_in=lambda per_token: per_token[0])
               + corrupt("unembed_p unembed_q", "nan +inf") + corrupt("temperature", "nan negative zero +inf"))
_HIDDEN_SHAPES = (ShapeError("unembed_q"), ShapeError("hidden_q"), ShapeError("hidden_p"))
row("lm.kl_from_hidden", ("lm.kl_from_hidden",),
    lambda hidden_p, unembed_p, hidden_q, unembed_q, temperature: lm.kl_from_hidden(
        hidden_p, unembed_p, hidden_q, unembed_q, temperature=temperature, chunk_size=2),
    _hidden_states, _HIDDEN_BAD, _HIDDEN_SHAPES)
row("lm.jsd_from_hidden", ("lm.jsd_from_hidden",),
    lambda hidden_p, unembed_p, hidden_q, unembed_q, temperature, beta: lm.jsd_from_hidden(
        hidden_p, unembed_p, hidden_q, unembed_q, beta=beta, temperature=temperature, chunk_size=2),
    lambda dtype, rng: {**_hidden_states(dtype, rng), "beta": np.asarray(0.3, dtype)},
    _HIDDEN_BAD + corrupt("beta", "nan negative +inf"), _HIDDEN_SHAPES, slow=("vmap",))


# --------------------------------------------------------------------------------------------------
# kljax.drift: reference x (8, 2) against a window y (6, 2), 7 permutations


def _drift_xy(dtype, rng):
    return {"x": _normal(rng, (8, 2), dtype), "y": _normal(rng, (6, 2), dtype, 1.5)}


# k = 1: a duplicated point (2 copies) makes the statistic undefined only for k < 2
row("drift.kl_permutation_test[knn]", ("drift.kl_permutation_test", "drift.permutation_test"),
    lambda x, y: drift.kl_permutation_test(KEY, x, y, estimator="knn", num_permutations=7, k=1), _drift_xy,
    corrupt("x y", "nan +inf") + (Corruption("x", "duplicate_row"),), (ShapeError("y"),), slow=ALL)
row("drift.kl_permutation_test[knn,symmetric]", ("drift.kl_permutation_test",),
    lambda x, y: drift.kl_permutation_test(KEY, x, y, estimator="knn", num_permutations=7, symmetric=True),
    _drift_xy,
    corrupt("x y", "nan +inf"), (ShapeError("y"),), slow=ALL)
row("drift.kl_permutation_test[knn,weighted]", ("drift.kl_permutation_test",),
    lambda x, y: drift.kl_permutation_test(KEY, x, y, estimator="knn", num_permutations=3, k=1,
                                           knn_estimator="weighted"), _drift_xy,
    corrupt("x y", "nan") + (Corruption("x", "duplicate_row"),), slow=ALL)
row("drift.kl_permutation_test[energy]", ("drift.kl_permutation_test",),
    lambda x, y: drift.kl_permutation_test(KEY, x, y, estimator="energy", num_permutations=7), _drift_xy,
    corrupt("x y", "nan +inf"), (ShapeError("y"),), slow=ALL)
row("drift.kl_permutation_test[classifier]", ("drift.kl_permutation_test",),
    lambda x, y: drift.kl_permutation_test(KEY, x, y, estimator="classifier", num_permutations=7), _drift_xy,
    corrupt("x y", "nan +inf"), (ShapeError("y"),), slow=ALL)
row("drift.kl_permutation_test[gaussian]", ("drift.kl_permutation_test",),
    lambda x, y: drift.kl_permutation_test(KEY, x, y, estimator="gaussian", num_permutations=7), _drift_xy,
    corrupt("x y", "nan +inf"), (ShapeError("y"),), slow=ALL)
row("drift.energy_distance", ("drift.energy_distance",), drift.energy_distance, _drift_xy,
    corrupt("x y", "nan +inf"), (ShapeError("y"),))
row("drift.adjust_p_values[bh]", ("drift.adjust_p_values",), lambda p_values: drift.adjust_p_values(p_values, "bh"),
    lambda dtype, rng: {"p_values": _uniform(rng, 5, dtype, 0.0, 1.0)}, corrupt("p_values", "nan"))
row("drift.kl_permutation_test[histogram]", ("drift.kl_permutation_test",),
    lambda x, y, pseudocount: drift.kl_permutation_test(
        KEY, x, y, estimator="histogram", num_permutations=7, bins=3, pseudocount=pseudocount),
    lambda dtype, rng: {**_drift_xy(dtype, rng), "pseudocount": np.asarray(0.5, dtype)},
    corrupt("x y", "nan +inf") + (Corruption("pseudocount", "negative"),),
    (ShapeError("y"),), slow=ALL)


def _bins_with_rule(x, edges):
    """bin_indices and its rule for bad values made visible: indices are integers and cannot be NaN, so
    under jit a NaN value gets -1 and invalid edges give -1 everywhere; the float copy shows -1 as NaN."""
    indices = drift.bin_indices(x, edges)
    return indices, jnp.where(indices < 0, jnp.nan, indices.astype(x.dtype))

row("drift.bin_edges", ("drift.bin_edges",), lambda reference: drift.bin_edges(reference, 3),
    lambda dtype, rng: {"reference": _normal(rng, 8, dtype)}, corrupt("reference", "nan"))
row("drift.bin_indices", ("drift.bin_indices",), _bins_with_rule,
    lambda dtype, rng: {"x": _normal(rng, 8, dtype), "edges": np.asarray([-1.0, 0.0, 0.5, 1.0], dtype)},
    (Corruption("x", "nan", nan_in=lambda leaf: leaf[:1]),  # only the NaN value's index is -1
     Corruption("edges", "nan"), Corruption("edges", "decreasing", name="edges")),
    output_dtype=jnp.int32)

row("drift.feature_histogram_kl", ("drift.feature_histogram_kl",),
    lambda x, y, edges, pseudocount: drift.feature_histogram_kl(x, y, edges, pseudocount=pseudocount),
    lambda dtype, rng: {"x": _normal(rng, 8, dtype), "y": _normal(rng, 6, dtype, 1.5),
                        "edges": np.asarray([-1.0, 0.0, 0.5, 1.0], dtype), "pseudocount": np.asarray(0.5, dtype)},
    corrupt("x y", "nan") + corrupt("pseudocount", "negative") + corrupt("edges", "nan decreasing"),
    slow=ALL)
row("drift.sustained_alarms", ("drift.sustained_alarms",),
    lambda significant: drift.sustained_alarms(significant, 2),
    lambda dtype, rng: {"significant": rng.integers(0, 2, 6).astype(bool)}, output_dtype=jnp.bool_)

# DriftMonitor.score: the monitor (reference of 16 rows, in the row's dtype) is built once per dtype.
_MONITORS: dict = {}


def _monitor(estimator, dtype):
    key = (estimator, np.dtype(dtype).name)
    if key not in _MONITORS:
        reference = _normal(np.random.default_rng(123), (16, 2), dtype)
        options = {"bins": 3, "num_permutations": 99} if estimator == "histogram" else {"num_permutations": 19}
        with jax.ensure_compile_time_eval():  # first use may be inside a trace: build it eagerly
            _MONITORS[key] = drift.DriftMonitor(reference, estimator=estimator, **options)
    return _MONITORS[key]


for _estimator in ("histogram", "knn"):
    row(f"drift.DriftMonitor.score[{_estimator}]", ("drift.DriftMonitor.score",),
        lambda window, _e=_estimator: _monitor(_e, window.dtype).score(KEY, window),
        lambda dtype, rng: {"window": _normal(rng, (6, 2), dtype, 1.5)},
        corrupt("window", "nan +inf"), (ShapeError("window", name="window"),), slow=ALL)


# --------------------------------------------------------------------------------------------------
# Public names deliberately without a row (checked by test_every_public_function_has_a_row)

NOT_ESTIMATORS = {
    "analytic.register_kl": "a registration decorator, not an estimator",
    "distributions.Distribution": "the abstract base class",
    "mc.ESTIMATORS": "a tuple of names",
    "mc.REVERSE_ESTIMATORS": "a tuple of names",
    "knn.ESTIMATORS": "a tuple of names",
    "knn.TIES": "a tuple of names",
    "drift.DriftMonitor": "a class: its `score` has rows; `update`/`run` are loops over `score`",
    "drift.MonitorState": "a NamedTuple",
    "drift.WindowScore": "a NamedTuple",
    "drift.KnnKL": "a statistic value (frozen dataclass): exercised by the kl_permutation_test rows",
    "drift.HistogramKL": "a statistic value (frozen dataclass): exercised by the kl_permutation_test rows",
    "drift.CategoricalKL": "a statistic value (frozen dataclass) of category codes; tested in test_drift.py",
    "drift.EnergyDistance": "a statistic value (frozen dataclass): exercised by the energy rows",
    "drift.ClassifierKL": "a statistic value (frozen dataclass): exercised by the classifier rows",
    "drift.GaussianKL": "a statistic value (frozen dataclass): exercised by the gaussian rows",
    "drift.KnnGraphKL": "a statistic value (frozen dataclass): jit, vmap, float32, bad input and its fast permutation path against a fresh search are in test_drift.py",
    "drift.expected_windows_to_false_alarm": "a formula of two Python options (alpha, consecutive), no arrays",
    **{f"plot.{name}": "draws a figure or summarises repeats with NumPy (tests/test_plot.py)" for name in plot.__all__},
    "ratio.KL_METHODS": "a tuple of names",
    "ratio.MI_METHODS": "a tuple of names",
    "ratio.MODELS": "a tuple of names",
    "ratio.Estimate": "a NamedTuple",
}
