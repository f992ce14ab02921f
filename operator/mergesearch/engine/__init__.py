"""The search engine: pure ask/tell CMA-ES over merge weights, state in and state out.

No Kubernetes, no torch, no I/O: the operator keeps the state in its resource's status and
local mode in a file; both call the same functions. See docs/engine.md.
"""

from mergesearch.engine.config import EngineConfig, HeldInTask
from mergesearch.engine.engine import (
    EngineStatus,
    ask,
    chosen,
    done,
    init,
    pending_candidates,
    planned_trials,
    slot_id,
    status,
    tell,
    tell_with_report,
    trials_told,
)
from mergesearch.engine.parameterization import (
    Parameterization,
    SimplexIlr,
    Unconstrained,
    make_parameterization,
)
from mergesearch.engine.records import Candidate, Result, TellReport
from mergesearch.engine.state import EngineState

__all__ = [
    "Candidate",
    "EngineConfig",
    "EngineState",
    "EngineStatus",
    "HeldInTask",
    "Parameterization",
    "Result",
    "SimplexIlr",
    "TellReport",
    "Unconstrained",
    "ask",
    "chosen",
    "done",
    "init",
    "make_parameterization",
    "pending_candidates",
    "planned_trials",
    "slot_id",
    "status",
    "tell",
    "tell_with_report",
    "trials_told",
]
