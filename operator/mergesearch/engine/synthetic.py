"""A synthetic merge objective with a known optimum, for tests and search benchmarks.

Each task t prefers its own mixture p_t (inside the simplex) and scores a merge w as
`1 - scale_t * ||w - p_t||^2`: concave, so the fitness (their weighted mean) is concave too,
with its maximum at the weighted mean of the p_t, a point strictly inside the simplex. Single
checkpoints score badly and different tasks pull different ways, like the paper's checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mergesearch.engine.records import Candidate, Result


@dataclass(frozen=True)
class SyntheticObjective:
    checkpoints: tuple[str, ...]
    tasks: tuple[str, ...]
    preferred: np.ndarray  # tasks × checkpoints, each row on the simplex
    scales: np.ndarray  # one per task

    @classmethod
    def random(
        cls, checkpoints: tuple[str, ...], tasks: tuple[str, ...], seed: int
    ) -> SyntheticObjective:
        rng = np.random.Generator(np.random.PCG64(seed))
        preferred = rng.dirichlet(np.full(len(checkpoints), 2.0), size=len(tasks))
        scales = rng.uniform(0.5, 1.5, size=len(tasks))
        return cls(tuple(checkpoints), tuple(tasks), preferred, scales)

    def scores(self, weights: np.ndarray) -> dict[str, float]:
        gaps = np.sum((weights[None, :] - self.preferred) ** 2, axis=1)
        return {
            t: float(1.0 - s * g) for t, s, g in zip(self.tasks, self.scales, gaps, strict=True)
        }

    def optimum(self) -> np.ndarray:
        """The maximiser of the unweighted mean score (the scale-weighted mean of the p_t)."""
        return (self.scales @ self.preferred) / np.sum(self.scales)

    def fitness(self, weights: np.ndarray) -> float:
        return float(np.mean(list(self.scores(weights).values())))

    def evaluate(self, candidate: Candidate) -> Result:
        weights = np.array([candidate.weights[n] for n in self.checkpoints])
        return Result(candidate.id, scores=self.scores(weights))
