"""CMA-ES from the `cma` package, with its whole state as plain data.

The engine never keeps a `CMAEvolutionStrategy` alive between calls: each call rebuilds one
from a `CmaSnapshot`, uses it, and snapshots it again. A snapshot is taken at a generation
boundary (after `tell`, before the next `ask`) and holds exactly what a later `ask`/`tell`
reads: the mean, the step size, the covariance matrix, the two evolution paths and the
step-size path, the counters, and the eigendecomposition bookkeeping. It never holds the
random generator: the caller passes the `NormalSource` that cma samples with.

The options below pin cma to a configuration whose state is fully captured, each for a reason:

- `randn` is a per-search numpy Generator, `seed` NaN: cma never touches numpy's global state;
- `updatecovwait=0`: the eigendecomposition follows every covariance update. `update_now()` runs
  it right after `tell`, so at a snapshot C is exactly symmetric (cma symmetrises it before
  decomposing) and one triangle stores it exactly, and B and D are recomputed bit for bit on
  restore by the same decomposition of the same matrix instead of being stored (4 KB → 0);
- `CMA_mirrors=0`, `AdaptSigma=CSA`: mirrored sampling and TPA carry injected directions
  across generations; CSA's only state is its path `ps`;
- `conditioncov_alleviate=[0, 0]`: the conditioning "alleviations" would move state into a
  coordinate scaling and a genotype transform; the engine stops on ill-conditioning instead;
- `verbose=-9`, `verb_log=0`, `verb_disp=0`: no printing, no files.

`snapshot` checks these invariants and refuses a strategy that left them.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import cma
import numpy as np
from cma.sampler import GaussFullSampler
from cma.sigma_adaptation import CMAAdaptSigmaCSA
from cma.utilities.utils import ElapsedWCTime
from pydantic import BaseModel, ConfigDict, Field

from mergesearch.engine.codec import decode_f8, encode_f8, pack_upper, unpack_upper

CMA_VERSION: str = cma.__version__


class UnsupportedStrategyState(RuntimeError):
    """The strategy is in a state the snapshot format does not capture (a bug, not bad input)."""


class NormalSource:
    """cma's `randn(rows, cols)`: standard normals from a numpy Generator the caller can swap."""

    def __init__(self, generator: np.random.Generator) -> None:
        self.generator = generator

    def __call__(self, *shape: int) -> np.ndarray:
        return self.generator.standard_normal(shape)


@dataclass(frozen=True)
class StrategySettings:
    """What a fresh strategy is built from; all of it follows from the engine's config."""

    x0: tuple[float, ...]
    sigma0: float
    popsize: int


class CmaSnapshot(BaseModel):
    """A strategy at a generation boundary; arrays are base64 float64 (see `codec`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cma_version: str
    dim: int = Field(ge=1)
    countiter: int = Field(ge=0)
    countevals: int = Field(ge=0)
    sigma: float = Field(gt=0)
    mean: str
    pc: str
    pc2: str
    ps: str
    ps_iteration: int
    csa_delta: float
    cov_upper: str
    count_tell: int = Field(ge=0)
    last_update: int = Field(ge=0)
    count_eigen: int = Field(ge=0)


@functools.cache
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it BLAS keeps its own thread count
        return None
    return ThreadpoolController()


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run cma's small linear algebra on one BLAS thread.

    For the matrices of a merge search (N ≤ a few hundred) threads only add overhead: on a busy
    2-core machine a 63×63 eigendecomposition took 45 ms with OpenBLAS's threads against 1.5 ms
    on one. One thread also makes results independent of the machine's core count, which
    matters for bit-exact replay when an operator moves between nodes. The limit is process
    wide while it lasts (BLAS has no per-thread setting).
    """
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def strategy_options(settings: StrategySettings, source: NormalSource) -> dict[str, Any]:
    return {
        "popsize": settings.popsize,
        "randn": source,
        "seed": float("nan"),
        "CMA_mirrors": 0,
        "updatecovwait": 0,
        "conditioncov_alleviate": [0, 0],
        "AdaptSigma": CMAAdaptSigmaCSA,
        "verbose": -9,
        "verb_log": 0,
        "verb_disp": 0,
    }


@functools.lru_cache(maxsize=8)
def _template(settings: StrategySettings) -> cma.CMAEvolutionStrategy:
    """A fresh strategy that is only ever deep-copied, never used.

    Building a strategy parses and evaluates cma's ~100 option strings (10-20 ms); a deep copy
    of a fresh one takes about 2 ms. The copy is rewired to the caller's random source.
    """
    unused = NormalSource(np.random.Generator(np.random.PCG64(0)))
    return cma.CMAEvolutionStrategy(
        list(settings.x0), settings.sigma0, strategy_options(settings, unused)
    )


def new_strategy(settings: StrategySettings, source: NormalSource) -> cma.CMAEvolutionStrategy:
    """A fresh strategy (as `cma.CMAEvolutionStrategy(x0, sigma0, options)`) sampling `source`."""
    es = copy.deepcopy(_template(settings))
    es.opts["randn"] = source
    es.sm.randn = source
    return es


def _check_supported(es: cma.CMAEvolutionStrategy) -> None:
    problems = []
    if not isinstance(es.sm, GaussFullSampler):
        problems.append(f"sampler is {type(es.sm).__name__}, not GaussFullSampler")
    if not isinstance(es.adapt_sigma, CMAAdaptSigmaCSA):
        problems.append(f"step-size adaptation is {type(es.adapt_sigma).__name__}, not CSA")
    if not es.gp.isidentity or not np.all(es.sigma_vec.scaling == 1):
        problems.append("a coordinate scaling or genotype transformation is active")
    if es.pop_injection_directions or es.pop_injection_solutions:
        problems.append("injected solutions are queued")
    if not es._flgtelldone:
        problems.append("a generation was asked but not told")
    if es.sm.count_tell != es.sm.last_update:
        problems.append("the covariance was updated but not decomposed")
    if problems:
        raise UnsupportedStrategyState("; ".join(problems))


def snapshot(es: cma.CMAEvolutionStrategy) -> CmaSnapshot:
    _check_supported(es)
    sm = es.sm
    return CmaSnapshot(
        cma_version=CMA_VERSION,
        dim=int(es.N),
        countiter=int(es.countiter),
        countevals=int(es.countevals),
        sigma=float(es.sigma),
        mean=encode_f8(es.mean),
        pc=encode_f8(es.pc),
        pc2=encode_f8(es.pc2),
        ps=encode_f8(es.adapt_sigma.ps),
        ps_iteration=int(es.adapt_sigma._ps_updated_iteration),
        csa_delta=float(es.adapt_sigma.delta),
        cov_upper=encode_f8(pack_upper(sm.C)),
        count_tell=int(sm.count_tell),
        last_update=int(sm.last_update),
        count_eigen=int(sm.count_eigen),
    )


def restore(
    settings: StrategySettings, snap: CmaSnapshot, source: NormalSource
) -> cma.CMAEvolutionStrategy:
    """Rebuild the strategy that `snap` was taken from, sampling from `source`."""
    n = snap.dim
    if n != len(settings.x0):
        raise UnsupportedStrategyState(f"snapshot has dimension {n}, settings {len(settings.x0)}")
    es = new_strategy(settings, source)
    es.mean = decode_f8(snap.mean, n)
    es.mean_after_tell = es.mean.copy()
    es.mean_old = es.mean.copy()  # read by `tell` only to be overwritten
    es.sigma = snap.sigma
    es.countiter = snap.countiter
    es.countevals = snap.countevals
    es.pc = decode_f8(snap.pc, n)
    es.pc2 = decode_f8(snap.pc2, n)
    csa = es.adapt_sigma
    csa.ps = decode_f8(snap.ps, n)
    csa._ps_updated_iteration = snap.ps_iteration
    csa.delta = snap.csa_delta
    sm = es.sm
    sm.C = unpack_upper(decode_f8(snap.cov_upper, n * (n + 1) // 2), n)
    if snap.count_eigen > 0:
        # The snapshot's C is the matrix the last decomposition symmetrised and decomposed
        # (symmetrising it again is the identity), so this recomputes that B and D exactly.
        sm._decompose_C()
    sm.count_tell = snap.count_tell
    sm.last_update = snap.last_update
    sm.count_eigen = snap.count_eigen
    es._updateBDfromSM(sm)
    if es.countiter > 0:
        es.timer = ElapsedWCTime()  # `ask` expects the timer `tell` left; it is never read
    return es


def ask(es: cma.CMAEvolutionStrategy, number: int) -> np.ndarray:
    """`number` samples as rows of a float64 matrix."""
    return np.array([np.asarray(x, dtype=np.float64) for x in es.ask(number)])


def tell(es: cma.CMAEvolutionStrategy, rows: Sequence[np.ndarray], losses: Sequence[float]) -> None:
    """Tell a whole generation (cma minimises) and decompose now, ready for a snapshot."""
    es.tell([np.asarray(r) for r in rows], [float(f) for f in losses])
    es.sm.update_now()
    es._updateBDfromSM(es.sm)


def step_size_scale(es: cma.CMAEvolutionStrategy) -> float:
    """sigma times the largest axis of C: the largest standard deviation of a sample."""
    return float(es.sigma * np.max(es.sm.D))


def condition_number(es: cma.CMAEvolutionStrategy) -> float:
    return float(es.sm.condition_number)
