"""API.md's conventions, checked once for every public estimator (the rows of ``_contract_table``).

For every row, in float32 (the compiled checks 1, 2, 4, 6) and in float32 and float64 (3, 5):

1. ``jax.jit`` gives the eager value (rtol 1e-6 in float32);
2. ``jax.vmap`` over a leading batch axis gives a Python loop of eager calls;
3. the output dtype follows the input (or is the row's fixed integer/bool dtype), compiled in float32 and
   by abstract evaluation (``jax.eval_shape``, no compile) in both dtypes;
4. every declared bad value gives NaN under jit (never a finite number; +inf only where declared; an
   output with only integer parts, such as a sample of counts, gives -1 instead);
5. the same bad value raises ``ValueError``/``TypeError`` eagerly, naming the argument in backticks;
6. a second call with the same shapes does not retrace (``chex.assert_max_traces``);

and once per row (float64): 7. jit over the first argument with the others closed over as concrete
arrays (a fixed reference sample, fixed bin edges) gives the eager value; 8. a shape problem raises
``ValueError`` naming the argument eagerly and at trace time under jit.

Known violations are ``xfail(strict=True)`` with their reason in the table, so the suite stays green
and a fix shows up as an XPASS to clean up.

Run time is compilation: one eager and one jit compile per row (float32), shared by checks 1, 3, 4,
5 and 6. ``-m "not slow"`` keeps those for the rows that compile in well under a second, plus the
vmap; check 7 and the rows whose programs take seconds to compile (rejection samplers, permutation
tests, batched k-NN search, trained estimators; ``Row.slow``) are marked ``slow``.
"""

from __future__ import annotations

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kljax
from kljax import analytic, discrete, distributions, drift, knn, mc, policy
from _contract_table import NOT_ESTIMATORS, ROWS, Row  # tests/ is on sys.path (pytest's rootdir-less import)

DTYPES = ("float32", "float64")
RTOL = {"float32": 1e-6, "float64": 1e-12}
_BY_ID = {row.id: row for row in ROWS}


# --------------------------------------------------------------------------------------------------
# Shared inputs, eager results and compiled functions


@functools.cache
def _inputs(row_id: str, dtype: str, seed: int) -> dict[str, np.ndarray]:
    return _BY_ID[row_id].make(np.dtype(dtype), np.random.default_rng(seed))


def _arrays(inputs: dict[str, np.ndarray]) -> list[jax.Array]:
    return [jnp.asarray(value) for value in inputs.values()]


@functools.cache
def _eager(row_id: str, dtype: str):
    return _BY_ID[row_id].call(*_arrays(_inputs(row_id, dtype, 0)))


@functools.cache
def _jitted(row_id: str, dtype: str):
    """The row under ``jax.jit``, failing on a second trace; one per row and dtype, shared by all checks."""
    row = _BY_ID[row_id]

    def traced(*args):
        return row.call(*args)

    # chex identifies a function by its source and name: make the name unique per row and dtype.
    traced.__name__ = traced.__qualname__ = f"contract[{row_id}][{dtype}]"
    return jax.jit(chex.assert_max_traces(traced, n=1))


@functools.cache
def _jit_result(row_id: str, dtype: str):
    return _jitted(row_id, dtype)(*_arrays(_inputs(row_id, dtype, 0)))


def _is_float(leaf) -> bool:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return jnp.issubdtype(dtype, jnp.floating)


def _assert_same(actual, expected, dtype: str, tolerance: float | None = None) -> None:
    actual_leaves, expected_leaves = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(actual_leaves) == len(expected_leaves)
    tolerance = tolerance or RTOL[dtype]
    for got, want in zip(actual_leaves, expected_leaves):
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape
        if _is_float(want):
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
        else:
            np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------------
# Parametrisation over the table (xfail marks from the table's reasons)


# The default run (-m "not slow") compiles each light row twice, in float32: eagerly and under jit
# (shared by checks 1, 3, 4, 5, 6), plus its float32 vmap. Every check that needs a float64 compile,
# and check 7 (a third jit), is slow; float64's dtype is still checked by tracing (eval_shape), and its
# eager errors, which are raised before anything compiles.
_COMPILING = {"jit", "vmap", "dtype", "retrace", "partial_jit"}


def _is_slow(row: Row, check: str, dtype: str | None, reason: str | None) -> bool:
    if "all" in row.slow or check in row.slow or check == "partial_jit":
        return True
    if dtype == "float64":
        # an eager case that is a known violation runs to the end, and compiles
        return check in _COMPILING or (check == "eager" and reason is not None)
    return False


def _marks(row: Row, check: str, dtype: str | None, reason: str | None):
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    if _is_slow(row, check, dtype, reason):
        marks.append(pytest.mark.slow)
    return marks


# The compiled checks run in float32 only: float64 doubles the compile time of the table (the largest
# part of the test suite's run time) and runs the same code. float64 keeps the checks that need no
# compile of their own (the output dtype by abstract evaluation, the eager errors) and check 7.
COMPILED_DTYPES = ("float32",)


def _row_cases(check: str, dtypes=None, where=lambda row: True):
    if dtypes is None:
        dtypes = COMPILED_DTYPES if check in _COMPILING else DTYPES
    return [pytest.param(row.id, dtype, id=f"{row.id}-{dtype}", marks=_marks(row, check, dtype, row.xfail.get(check)))
            for row in ROWS if where(row) for dtype in dtypes]


def _corruption_cases(check: str):
    cases = []
    for row in ROWS:
        for index, corruption in enumerate(row.corruptions):
            reason = corruption.xfail_jit if check == "jit" else corruption.xfail_eager
            for dtype in (COMPILED_DTYPES if check == "jit" else DTYPES):
                cases.append(pytest.param(row.id, index, dtype, id=f"{row.id}-{corruption.id}-{dtype}",
                                          marks=_marks(row, check, dtype, reason)))
    return cases


def _shape_cases():
    return [pytest.param(row.id, index, id=f"{row.id}-{error.arg}", marks=_marks(row, "shape", None, error.xfail))
            for row in ROWS for index, error in enumerate(row.shape_errors)]


# --------------------------------------------------------------------------------------------------
# The generic checks


@pytest.mark.parametrize("row_id, dtype", _row_cases("jit"))
def test_jit_matches_eager(row_id, dtype):
    _assert_same(_jit_result(row_id, dtype), _eager(row_id, dtype), dtype)


@pytest.mark.parametrize("row_id, dtype", _row_cases("vmap"))
def test_vmap_matches_loop(row_id, dtype):
    row = _BY_ID[row_id]
    batch = [_inputs(row_id, dtype, seed) for seed in (10, 11)]
    stacked = [jnp.stack([jnp.asarray(inputs[name]) for inputs in batch]) for name in batch[0]]
    batched = jax.vmap(row.call)(*stacked)
    for index, inputs in enumerate(batch):
        _assert_same(jax.tree.map(lambda leaf: leaf[index], batched), row.call(*_arrays(inputs)), dtype,
                     row.vmap_rtol)


def _assert_dtypes(row: Row, result, dtype: str) -> None:
    """The row's fixed dtype for its first output, if any; the input's dtype for every floating output."""
    leaves = jax.tree.leaves(result)
    if row.output_dtype is not None:
        assert leaves[0].dtype == row.output_dtype
        leaves = leaves[1:]
    for leaf in leaves:
        if _is_float(leaf):
            assert leaf.dtype == np.dtype(dtype), (leaf.dtype, dtype)


@pytest.mark.parametrize("row_id, dtype", _row_cases("dtype"))
def test_output_dtype_follows_input(row_id, dtype):
    for result in (_eager(row_id, dtype), _jit_result(row_id, dtype)):
        _assert_dtypes(_BY_ID[row_id], result, dtype)


@pytest.mark.parametrize("row_id, dtype", _row_cases("trace_dtype"))
def test_output_dtype_follows_input_when_traced(row_id, dtype):
    """Check 3 by abstract evaluation (no compile), so that float64 is covered by the default run too."""
    row = _BY_ID[row_id]
    _assert_dtypes(row, jax.eval_shape(row.call, *_arrays(_inputs(row_id, dtype, 0))), dtype)


@pytest.mark.parametrize("row_id, dtype", _row_cases("retrace"))
def test_no_retrace_with_same_shapes(row_id, dtype):
    jitted = _jitted(row_id, dtype)
    for seed in (0, 1, 0):  # new values, same shapes and dtypes: one trace in all
        jax.block_until_ready(jitted(*_arrays(_inputs(row_id, dtype, seed))))


@pytest.mark.parametrize("row_id, index, dtype", _corruption_cases("jit"))
def test_bad_value_gives_nan_under_jit(row_id, index, dtype):
    row = _BY_ID[row_id]
    corruption = row.corruptions[index]
    inputs, mask = corruption.apply(_inputs(row_id, dtype, 0))
    result = _jitted(row_id, dtype)(*_arrays(inputs))
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(result)]
    float_leaves = [leaf for leaf in leaves if _is_float(leaf)]
    # An output with no floating part (integer samples, bin indices) marks a bad value with -1.
    checked = float_leaves or [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.signedinteger)]
    assert checked, "the output has no floating or signed integer part that could mark a bad value"
    for leaf in checked:
        if corruption.nan_in is not None:
            leaf = corruption.nan_in(leaf)
        elif row.elementwise and mask is not None:
            assert leaf.shape == mask.shape
            leaf = leaf[mask]
        if not float_leaves:
            assert (leaf == -1).all(), f"{corruption.id} under jit gave {leaf}, expected -1 (integer output)"
            continue
        bad = ~np.isnan(leaf)
        if corruption.allow_inf:
            bad &= ~np.isposinf(leaf)
        assert not bad.any(), f"{corruption.id} under jit gave {leaf}, expected NaN"


@pytest.mark.parametrize("row_id, index, dtype", _corruption_cases("eager"))
def test_bad_value_raises_eagerly_naming_the_argument(row_id, index, dtype):
    row = _BY_ID[row_id]
    corruption = row.corruptions[index]
    inputs, _ = corruption.apply(_inputs(row_id, dtype, 0))
    with pytest.raises((ValueError, TypeError)) as raised:
        jax.block_until_ready(row.call(*_arrays(inputs)))
    assert f"`{corruption.message_name}`" in str(raised.value)


@pytest.mark.parametrize("row_id, dtype", _row_cases("partial_jit", ("float64",),
                                                     where=lambda row: len(_inputs(row.id, "float64", 0)) > 1))
def test_jit_with_the_other_arguments_closed_over(row_id, dtype):
    """jit over the first argument only; the others are concrete arrays captured by the function."""
    row = _BY_ID[row_id]
    first, *rest = _arrays(_inputs(row_id, dtype, 0))
    result = jax.jit(lambda a: row.call(a, *rest))(first)
    _assert_same(result, _eager(row_id, dtype), dtype)


@pytest.mark.parametrize("row_id, index", _shape_cases())
def test_shape_problem_raises_eagerly_and_at_trace_time(row_id, index):
    row = _BY_ID[row_id]
    error = row.shape_errors[index]
    inputs = error.apply(_inputs(row_id, "float64", 0))
    for function in (row.call, jax.jit(row.call)):
        with pytest.raises(ValueError) as raised:
            jax.block_until_ready(function(*_arrays(inputs)))
        assert f"`{error.message_name}`" in str(raised.value)


# --------------------------------------------------------------------------------------------------
# The table itself, and names API.md promises


# Every module `import kljax` gives (new modules join the check by joining kljax.__all__).
_MODULES = {name: getattr(kljax, name) for name in kljax.__all__}


def test_every_public_function_has_a_row():
    covered = {name for row in ROWS for name in row.covers}
    missing = []
    for module_name, module in _MODULES.items():
        for name in module.__all__:
            qualified = f"{module_name}.{name}"
            obj = getattr(module, name)
            if qualified in NOT_ESTIMATORS:
                continue
            if inspect.isclass(obj) and issubclass(obj, distributions.Distribution):
                missing += [f"{qualified}.{m}" for m in ("log_prob", "entropy", "sample")
                            if f"{qualified}.{m}" not in covered]
            elif qualified not in covered:
                missing.append(qualified)
    assert not missing, f"public names without a contract row (add a row or a NOT_ESTIMATORS reason): {missing}"
    assert set(NOT_ESTIMATORS) <= {f"{m}.{n}" for m, mod in _MODULES.items() for n in mod.__all__}


@pytest.mark.parametrize("module_name, name", [
    *[("discrete", n) for n in ("kl", "kl_logits", "kl_log", "entropy", "cross_entropy", "jensen_shannon",
                                "jeffreys", "histogram_kl")],
    *[("distributions", n) for n in ("Normal", "MultivariateNormalDiag", "MultivariateNormalTriL", "Categorical",
                                     "Bernoulli", "Beta", "Gamma", "Dirichlet", "Laplace", "Exponential",
                                     "Poisson")],
    ("analytic", "kl"),
    *[("ratio", n) for n in ("kl", "kl_with_stderr", "mutual_information")],
    *[("lm", n) for n in ("kl_from_hidden", "jsd_from_hidden")],
    *[("mc", n) for n in ("k1", "k2", "k3", "kl", "kl_with_stderr", "kl_from")],
    *[("knn", n) for n in ("neighbors", "kl", "entropy", "kl_with_stderr", "entropy_with_stderr",
                           "mutual_information")],
    *[("drift", n) for n in ("kl_permutation_test", "DriftMonitor")],
])
def test_api_md_name_exists(module_name, name):
    assert name in getattr(kljax, module_name).__all__


def test_neighbors_takes_a_metric():
    assert "metric" in inspect.signature(knn.neighbors).parameters


def test_unregistered_pair_raises_naming_both_types():
    with pytest.raises(NotImplementedError, match="Normal.*Gamma"):
        analytic.kl(distributions.Normal(0.0, 1.0), distributions.Gamma(1.0, 1.0))
