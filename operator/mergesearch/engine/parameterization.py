"""Maps between CMA-ES's unconstrained search space and merge weights.

The paper keeps merge weights on the probability simplex. CMA-ES samples from a Gaussian on
R^d, so the simplex needs an explicit, smooth, invertible map rather than a repair step such as
`abs()`-then-normalise (which folds the space, makes distinct samples identical and biases the
covariance update). We use the isometric log-ratio (ilr) coordinates of compositional data
analysis: weights are `softmax(V z)` where the columns of `V` are an orthonormal (Helmert)
basis of the sum-zero subspace of R^N. Consequences:

- a bijection between R^(N-1) and the open simplex, so every sample is a distinct valid merge
  and the origin is exactly the uniform merge;
- no neutral direction: plain softmax of N logits is invariant to adding a constant to all
  logits, a flat direction in which CMA-ES's covariance would drift; ilr removes it;
- isotropy: Euclidean distance in z is the Aitchison distance between compositions, which
  treats every checkpoint alike, so one scalar `sigma0` means the same for every weight
  (a step of size s moves each log-weight by about s).

The Helmert structure lets both directions run in O(N) with cumulative sums: no BLAS call, so
weights derived from a stored vector are the same bits on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

ParameterizationKind = Literal["simplex", "unconstrained"]


class Parameterization(Protocol):
    """A map from a search vector (what CMA-ES samples) to merge weights, and back."""

    kind: ParameterizationKind
    n_weights: int

    @property
    def dim(self) -> int: ...

    def origin(self) -> np.ndarray: ...

    def to_weights(self, x: np.ndarray) -> np.ndarray: ...

    def from_weights(self, w: np.ndarray) -> np.ndarray: ...


def _helmert_scales(n: int) -> np.ndarray:
    """c_j = 1/sqrt((j+1)(j+2)): the norm of Helmert column j before scaling."""
    j = np.arange(n - 1, dtype=np.float64)
    return 1.0 / np.sqrt((j + 1.0) * (j + 2.0))


@dataclass(frozen=True)
class SimplexIlr:
    """Weights = softmax(V z), V the N×(N-1) Helmert basis; see the module docstring.

    Column j of V is c_j on rows 0..j, -(j+1)·c_j on row j+1 and 0 below.
    """

    n_weights: int
    kind: ParameterizationKind = "simplex"

    def __post_init__(self) -> None:
        if self.n_weights < 2:
            raise ValueError("the simplex parameterization needs at least 2 weights")

    @property
    def dim(self) -> int:
        return self.n_weights - 1

    def origin(self) -> np.ndarray:
        return np.zeros(self.dim)

    def logits(self, z: np.ndarray) -> np.ndarray:
        """V z, in O(N): logit_i = sum_{j>=i} a_j - i·a_{i-1} with a_j = c_j z_j."""
        z = np.asarray(z, dtype=np.float64)
        if z.shape != (self.dim,):
            raise ValueError(f"expected a vector of {self.dim} numbers, got shape {z.shape}")
        a = _helmert_scales(self.n_weights) * z
        tail = np.concatenate([np.cumsum(a[::-1])[::-1], [0.0]])
        below = np.concatenate([[0.0], np.arange(1, self.n_weights) * a])
        return tail - below

    def to_weights(self, x: np.ndarray) -> np.ndarray:
        y = self.logits(x)
        e = np.exp(y - np.max(y))  # shift for overflow safety; softmax is shift-invariant
        return e / np.sum(e)

    def from_weights(self, w: np.ndarray) -> np.ndarray:
        """V^T log w (the constant of the centred log-ratio cancels since V^T 1 = 0)."""
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (self.n_weights,):
            raise ValueError(f"expected {self.n_weights} weights, got shape {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError("simplex weights must be finite and strictly positive")
        y = np.log(w / np.sum(w))
        prefix = np.cumsum(y)[:-1]
        counts = np.arange(1, self.n_weights, dtype=np.float64)
        return _helmert_scales(self.n_weights) * (prefix - counts * y[1:])


@dataclass(frozen=True)
class Unconstrained:
    """Weights are the search vector itself: extrapolation and negative weights allowed.

    The search starts at the uniform merge 1/N, so `sigma0` is in weight units here.
    """

    n_weights: int
    kind: ParameterizationKind = "unconstrained"

    @property
    def dim(self) -> int:
        return self.n_weights

    def origin(self) -> np.ndarray:
        return np.full(self.n_weights, 1.0 / self.n_weights)

    def to_weights(self, x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float64)
        if x.shape != (self.dim,):
            raise ValueError(f"expected a vector of {self.dim} numbers, got shape {x.shape}")
        return x

    def from_weights(self, w: np.ndarray) -> np.ndarray:
        w = np.array(w, dtype=np.float64)
        if w.shape != (self.n_weights,) or not np.all(np.isfinite(w)):
            raise ValueError(f"expected {self.n_weights} finite weights")
        return w


def make_parameterization(kind: ParameterizationKind, n_weights: int) -> Parameterization:
    if kind == "simplex":
        return SimplexIlr(n_weights)
    if kind == "unconstrained":
        return Unconstrained(n_weights)
    raise ValueError(f"unknown parameterization {kind!r}")
