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

from kljax import analytic, discrete, drift, knn, mc, plot, policy
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


# --------------------------------------------------------------------------------------------------
# kljax.policy


def _log_probs(*names):
    def make(dtype, rng):
        return {name: np.log(_uniform(rng, 4, dtype, 0.1, 0.9)) for name in names}

    return make


_NO_EAGER_NAN_CHECK = ("eagerly a NaN log-probability is not rejected: the surrogate returns NaN instead of a "
                       "ValueError naming `{name}` (kljax.mc rejects NaN `log_p` this way)")


def _nan_log_probs(*names):
    return tuple(Corruption(name, "nan", xfail_eager=_NO_EAGER_NAN_CHECK.format(name=name)) for name in names)


for _name in ("k1_loss", "k2_loss", "k3_loss"):
    row(f"policy.{_name}", (f"policy.{_name}",), getattr(policy, _name), _log_probs("log_prob", "log_prob_ref"),
        _nan_log_probs("log_prob", "log_prob_ref"), (ShapeError("log_prob_ref"),), elementwise=True)

row("policy.k1_reward", ("policy.k1_reward",), policy.k1_reward,
    lambda dtype, rng: {**_log_probs("log_prob", "log_prob_ref")(dtype, rng), "baseline": _normal(rng, 4, dtype)},
    _nan_log_probs("log_prob", "log_prob_ref"), (ShapeError("log_prob_ref"),), elementwise=True)
row("policy.k3_loss_is", ("policy.k3_loss_is",), policy.k3_loss_is,
    _log_probs("log_prob", "log_prob_ref", "log_prob_old"),
    _nan_log_probs("log_prob", "log_prob_ref", "log_prob_old"),
    (ShapeError("log_prob_ref"), ShapeError("log_prob_old")), elementwise=True)
_WRONG_NAMES = ("the message names `log_prob` and `log_prob_ref` (a shared helper's names), but the "
                "arguments of sequence_k1_reward are `log_probs` and `log_probs_ref`")
row("policy.sequence_k1_reward", ("policy.sequence_k1_reward",), policy.sequence_k1_reward,
    _log_probs("log_probs", "log_probs_ref"), _nan_log_probs("log_probs", "log_probs_ref"),
    (ShapeError("log_probs_ref", xfail=_WRONG_NAMES),))
row("policy.exact_kl", ("policy.exact_kl",), policy.exact_kl,
    lambda dtype, rng: {"logits": _normal(rng, 3, dtype), "logits_ref": _normal(rng, 3, dtype)},
    corrupt("logits logits_ref", "nan +inf all_-inf"), (ShapeError("logits_ref"),))
row("policy.sequence_exact_kl", ("policy.sequence_exact_kl",), policy.sequence_exact_kl,
    lambda dtype, rng: {"logits": _normal(rng, (3, 4), dtype), "logits_ref": _normal(rng, (3, 4), dtype),
                        "tokens": rng.integers(0, 4, 3).astype(np.int32)},
    corrupt("logits", "nan +inf") + corrupt("logits_ref", "nan") + corrupt("tokens", "out_of_range"),
    (ShapeError("tokens"),), slow=ALL)

_KL_PASSES_NAN = ("eagerly a NaN `kl` is passed through (documented: 'NaN where kl is NaN') instead of "
                  "raising a ValueError naming `kl` as API.md asks for bad input")


def _coefficient_inputs(**values):
    def make(dtype, rng):
        return {name: np.asarray(value * rng.uniform(0.9, 1.1), dtype) for name, value in values.items()}

    return make


row("policy.adaptive_kl_coefficient", ("policy.adaptive_kl_coefficient",),
    lambda beta, kl, target, tolerance, factor: policy.adaptive_kl_coefficient(
        beta, kl, target, tolerance=tolerance, factor=factor),
    _coefficient_inputs(beta=1.0, kl=0.05, target=0.01, tolerance=1.5, factor=2.0),
    corrupt("beta target", "nan negative zero") + corrupt("tolerance factor", "below_one nan")
    + (Corruption("kl", "nan", xfail_eager=_KL_PASSES_NAN),))
row("policy.proportional_kl_coefficient", ("policy.proportional_kl_coefficient",),
    lambda beta, kl, target, num_steps, horizon, error_clip: policy.proportional_kl_coefficient(
        beta, kl, target, num_steps, horizon, error_clip=error_clip),
    _coefficient_inputs(beta=0.1, kl=12.0, target=6.0, num_steps=256.0, horizon=10_000.0, error_clip=0.2),
    corrupt("beta target horizon", "nan negative zero") + corrupt("num_steps error_clip", "nan negative")
    + (Corruption("kl", "nan", xfail_eager=_KL_PASSES_NAN),))


# --------------------------------------------------------------------------------------------------
# kljax.drift: reference x (8, 2) against a window y (6, 2), 7 permutations


def _drift_xy(dtype, rng):
    return {"x": _normal(rng, (8, 2), dtype), "y": _normal(rng, (6, 2), dtype, 1.5)}


_INF_SILENT_KNN = ("eagerly a +inf sample is not rejected (only NaN is checked): the k-NN statistic comes back "
                   "NaN with no error; knn.kl itself raises ValueError naming `x`")
_DUPLICATE_UNNAMED = ("the duplicate-point error says 'the pooled sample (x, y)' without naming an argument "
                      "in backticks as the other messages do")

row("drift.kl_permutation_test[knn]", ("drift.kl_permutation_test",),
    lambda x, y: drift.kl_permutation_test(KEY, x, y, num_permutations=7), _drift_xy,
    corrupt("x y", "nan")
    + (Corruption("x", "+inf", xfail_eager=_INF_SILENT_KNN),
       Corruption("y", "+inf", xfail_eager=_INF_SILENT_KNN.replace("`x`", "`y`"),
                  xfail_jit="under jit a +inf point of `y` leaves the observed statistic finite (it is no "
                            "point's nearest neighbour), so the statistic is a finite number, not NaN"),
       Corruption("x", "duplicate_row", xfail_eager=_DUPLICATE_UNNAMED)),
    (ShapeError("y"),), slow=ALL)
row("drift.kl_permutation_test[knn,weighted]", ("drift.kl_permutation_test",),
    lambda x, y: drift.kl_permutation_test(KEY, x, y, num_permutations=3, knn_estimator="weighted"), _drift_xy,
    corrupt("x y", "nan") + (Corruption("x", "duplicate_row", xfail_eager=_DUPLICATE_UNNAMED),), slow=ALL)
row("drift.kl_permutation_test[histogram]", ("drift.kl_permutation_test",),
    lambda x, y, pseudocount: drift.kl_permutation_test(
        KEY, x, y, estimator="histogram", num_permutations=7, bins=3, pseudocount=pseudocount),
    lambda dtype, rng: {**_drift_xy(dtype, rng), "pseudocount": np.asarray(0.5, dtype)},
    corrupt("x y", "nan") + (Corruption(
        "pseudocount", "negative",
        xfail_jit="under jit a negative `pseudocount` is not masked: with no empty bin the smoothed counts stay "
                  "positive and the statistic and p-value are finite numbers"),),
    (ShapeError("y"),), slow=ALL)

_INTEGER_BINS = ("bin indices are integers and cannot be NaN: under jit a bad value gives a finite, "
                 "meaningless bin index")
row("drift.bin_edges", ("drift.bin_edges",), lambda reference: drift.bin_edges(reference, 3),
    lambda dtype, rng: {"reference": _normal(rng, 8, dtype)}, corrupt("reference", "nan"))
row("drift.bin_indices", ("drift.bin_indices",), drift.bin_indices,
    lambda dtype, rng: {"x": _normal(rng, 8, dtype), "edges": np.asarray([-1.0, 0.0, 0.5, 1.0], dtype)},
    (Corruption("x", "nan", xfail_jit=_INTEGER_BINS,
                xfail_eager="eagerly NaN samples are not rejected: NaN gets a bin index, no ValueError naming `x`"),
     Corruption("edges", "nan", xfail_jit=_INTEGER_BINS),
     Corruption("edges", "decreasing", name="edges", xfail_jit=_INTEGER_BINS)),
    output_dtype=jnp.int32)

_EDGES_UNCHECKED_UNDER_JIT = ("under jit bad `edges` ({what}) are not masked: the result is a finite number "
                              "instead of NaN")
row("drift.feature_histogram_kl", ("drift.feature_histogram_kl",),
    lambda x, y, edges, pseudocount: drift.feature_histogram_kl(x, y, edges, pseudocount=pseudocount),
    lambda dtype, rng: {"x": _normal(rng, 8, dtype), "y": _normal(rng, 6, dtype, 1.5),
                        "edges": np.asarray([-1.0, 0.0, 0.5, 1.0], dtype), "pseudocount": np.asarray(0.5, dtype)},
    tuple(Corruption(name, "nan", xfail_eager=f"eagerly NaN in `{name}` is not rejected: the result is NaN, "
                                              f"no ValueError naming `{name}`") for name in ("x", "y"))
    + corrupt("pseudocount", "negative")
    + (Corruption("edges", "nan", xfail_jit=_EDGES_UNCHECKED_UNDER_JIT.format(what="NaN")),
       Corruption("edges", "decreasing", xfail_jit=_EDGES_UNCHECKED_UNDER_JIT.format(what="decreasing"))),
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


_INF_WINDOW = ("API.md: score 'refuses, eagerly, a window it cannot score (... NaN or inf values ...)'; a +inf "
               "window is scored without error ({what})")
for _estimator, _jit_inf in (
        ("histogram", "under jit the +inf window gives finite statistics and p-values, not NaN"),
        ("knn", "under jit the +inf window gives a finite statistic (the p-value is NaN)")):
    row(f"drift.DriftMonitor.score[{_estimator}]", ("drift.DriftMonitor.score",),
        lambda window, _e=_estimator: _monitor(_e, window.dtype).score(KEY, window),
        lambda dtype, rng: {"window": _normal(rng, (6, 2), dtype, 1.5)},
        corrupt("window", "nan") + (Corruption(
            "window", "+inf", xfail_jit=_jit_inf,
            xfail_eager=_INF_WINDOW.format(what="finite statistics" if _estimator == "histogram"
                                           else "a finite statistic with a NaN p-value")),),
        (ShapeError("window", name="window"),), slow=ALL)


# --------------------------------------------------------------------------------------------------
# Public names deliberately without a row (checked by test_every_public_function_has_a_row)

NOT_ESTIMATORS = {
    "analytic.register_kl": "a registration decorator, not an estimator",
    "distributions.Distribution": "the abstract base class",
    "mc.ESTIMATORS": "a tuple of names",
    "mc.REVERSE_ESTIMATORS": "a tuple of names",
    "knn.ESTIMATORS": "a tuple of names",
    "drift.DriftMonitor": "a class: its `score` has rows; `update`/`run` are loops over `score`",
    "drift.MonitorState": "a NamedTuple",
    "drift.WindowScore": "a NamedTuple",
    **{f"plot.{name}": "draws a figure or summarises repeats with NumPy (tests/test_plot.py)" for name in plot.__all__},
}
