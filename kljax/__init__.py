"""kljax: JAX-accelerated estimators of Kullback-Leibler divergence.

Modules (see their docstrings):
    kljax.discrete       exact KL between categorical distributions
    kljax.distributions  lightweight pytree distributions
    kljax.analytic       closed-form KL between distributions
    kljax.mc             Monte Carlo estimators k1, k2, k3 and standard errors
    kljax.knn            k-nearest-neighbour search and estimators for continuous samples
    kljax.ratio          density-ratio (classifier) and variational KL / MI estimators, trained with optax
    kljax.policy         KL penalties for policy optimisation
    kljax.drift          two-sample drift statistics
    kljax.lm             per-token KL / JSD between two language models from hidden states (chunked, memory-bounded)
    kljax.plot           standard figures (matplotlib, imported when a figure is drawn)

Conventions: P first, Q second, nats, zero-safe (0 * log(0 / q) = 0).
"""

from kljax import analytic as analytic
from kljax import discrete as discrete
from kljax import distributions as distributions
from kljax import drift as drift
from kljax import knn as knn
from kljax import lm as lm
from kljax import mc as mc
from kljax import plot as plot
from kljax import policy as policy
from kljax import ratio as ratio

__version__ = "0.1.0"

__all__ = ["analytic", "discrete", "distributions", "drift", "knn", "lm", "mc", "plot", "policy", "ratio"]
