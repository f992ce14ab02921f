"""The maps between CMA-ES's search space and merge weights."""

from __future__ import annotations

import numpy as np
import pytest

from mergesearch.engine.parameterization import (
    SimplexIlr,
    Unconstrained,
    make_parameterization,
)

pytestmark = pytest.mark.unit

SIZES = [2, 3, 8, 64]


def _helmert_matrix(n: int) -> np.ndarray:
    """The basis written out densely, to check the O(N) cumulative-sum implementation."""
    v = np.zeros((n, n - 1))
    for j in range(n - 1):
        c = 1.0 / np.sqrt((j + 1) * (j + 2))
        v[: j + 1, j] = c
        v[j + 1, j] = -(j + 1) * c
    return v


@pytest.mark.parametrize("n", SIZES)
def test_helmert_basis_is_orthonormal_and_sums_to_zero(n: int) -> None:
    v = _helmert_matrix(n)
    np.testing.assert_allclose(v.T @ v, np.eye(n - 1), atol=1e-12)
    np.testing.assert_allclose(v.sum(axis=0), 0.0, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_logits_match_the_dense_basis(n: int) -> None:
    param = SimplexIlr(n)
    z = np.random.default_rng(n).standard_normal(n - 1) * 3
    np.testing.assert_allclose(param.logits(z), _helmert_matrix(n) @ z, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_simplex_weights_are_positive_and_sum_to_one(n: int) -> None:
    param = SimplexIlr(n)
    rng = np.random.default_rng(1)
    for scale in (0.01, 1.0, 10.0, 200.0):
        w = param.to_weights(rng.standard_normal(n - 1) * scale)
        assert w.shape == (n,)
        assert np.all(w >= 0)
        assert np.all(np.isfinite(w))
        assert abs(w.sum() - 1.0) < 1e-12


@pytest.mark.parametrize("n", SIZES)
def test_origin_is_exactly_the_uniform_merge(n: int) -> None:
    param = SimplexIlr(n)
    assert param.dim == n - 1
    w = param.to_weights(param.origin())
    np.testing.assert_array_equal(w, np.full(n, 1.0 / n))


@pytest.mark.parametrize("n", SIZES)
def test_simplex_round_trips_both_ways(n: int) -> None:
    param = SimplexIlr(n)
    rng = np.random.default_rng(2)
    for _ in range(20):
        z = rng.standard_normal(n - 1) * 2
        np.testing.assert_allclose(param.from_weights(param.to_weights(z)), z, atol=1e-9)
        w = rng.dirichlet(np.ones(n))
        np.testing.assert_allclose(param.to_weights(param.from_weights(w)), w, rtol=1e-9)


def test_simplex_start_from_weights_ignores_scale() -> None:
    param = SimplexIlr(4)
    w = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(param.from_weights(w), param.from_weights(w / 10), atol=1e-12)


def test_simplex_rejects_weights_off_the_open_simplex() -> None:
    param = SimplexIlr(3)
    for bad in ([0.5, 0.5, 0.0], [1.2, -0.1, -0.1], [np.nan, 0.5, 0.5]):
        with pytest.raises(ValueError):
            param.from_weights(np.array(bad))
    with pytest.raises(ValueError):
        param.to_weights(np.zeros(3))  # wrong dimension


def test_ilr_is_an_isometry_so_sigma_means_the_same_for_every_checkpoint() -> None:
    """A step of length s in z moves the centred log-weights by exactly length s."""
    param = SimplexIlr(8)
    rng = np.random.default_rng(3)
    z1, z2 = rng.standard_normal(7), rng.standard_normal(7)

    def clr(w: np.ndarray) -> np.ndarray:
        return np.log(w) - np.log(w).mean()

    gap = np.linalg.norm(clr(param.to_weights(z1)) - clr(param.to_weights(z2)))
    assert gap == pytest.approx(np.linalg.norm(z1 - z2), rel=1e-9)


def test_softmax_has_no_flat_direction() -> None:
    """Unlike softmax of N logits, distinct search points are distinct merges."""
    param = SimplexIlr(5)
    z = np.random.default_rng(4).standard_normal(4)
    for direction in np.eye(4):
        assert not np.allclose(param.to_weights(z), param.to_weights(z + 0.1 * direction))


@pytest.mark.parametrize("n", SIZES)
def test_unconstrained_is_the_identity_starting_at_uniform(n: int) -> None:
    param = Unconstrained(n)
    assert param.dim == n
    np.testing.assert_array_equal(param.origin(), np.full(n, 1.0 / n))
    x = np.random.default_rng(5).standard_normal(n)
    np.testing.assert_array_equal(param.to_weights(x), x)
    np.testing.assert_array_equal(param.from_weights(x), x)
    assert param.to_weights(x) is not x  # a copy: callers may not alias the search vector


def test_factory() -> None:
    assert isinstance(make_parameterization("simplex", 3), SimplexIlr)
    assert isinstance(make_parameterization("unconstrained", 3), Unconstrained)
    with pytest.raises(ValueError):
        make_parameterization("abs-normalise", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SimplexIlr(1)
