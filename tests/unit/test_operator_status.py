"""Status document: size bound, conditions and their transitions, milestones as events."""

from __future__ import annotations

import base64
import re
import zlib

import pytest
import yaml

from mergesearch.engine import (
    EngineConfig,
    EngineState,
    Result,
    init,
    pending_candidates,
    tell,
)
from mergesearch.operator.events import milestones
from mergesearch.operator.status import (
    SIZE_BUDGET,
    STATE_MAX_BYTES,
    STATE_PREFIX,
    Finalization,
    MergeSearchStatus,
    OutputEntry,
    Phase,
    Reason,
    build_status,
    decode_state,
    phase_conditions,
    set_condition,
    size_of,
)
from support.engine_runs import large_search
from support.statusdoc import condition

pytestmark = pytest.mark.unit

T0, T1 = "2025-01-01T00:00:00Z", "2025-01-01T01:00:00Z"


def _status(state: EngineState, active: list[str]) -> MergeSearchStatus:
    return build_status(
        state=state,
        phase=Phase.RUNNING,
        reason=Reason.SEARCHING,
        message="x" * 5000,  # long messages are cut
        previous=MergeSearchStatus(),
        active=active,
        now=T0,
        spec_generation=3,
        finalization=Finalization(job="j" * 63, trial="g300-c10", state="Running"),
        output=OutputEntry(uri="s3://" + "o" * 200, digest="sha256:" + "a" * 64),
        held_out={f"held-out-task-{i}": 0.5 for i in range(8)},
    )


@pytest.mark.slow
def test_status_for_64_checkpoints_and_5000_trials_stays_under_the_budget() -> None:
    sizes: list[tuple[int, int]] = []
    for step in large_search(
        seed=3, objective_seed=5, fails=lambda told, i: (told + i) % 29 == 3, reason="y" * 2000
    ):
        active = [c.id for c in step.asked][:64]  # a wide parallelism: 64 active trials
        status = _status(step.before, active)
        sizes.append((step.before.trials.issued, size_of(status)))
    state = step.after
    last = _status(state, [])
    sizes.append((state.trials.issued, size_of(last)))
    final = last.to_wire()
    assert state.trials.issued >= 4900
    largest = max(size for _, size in sizes)
    print(f"largest status: {largest} bytes")
    assert largest < SIZE_BUDGET * 0.75, f"largest status {largest} bytes"
    # Bounded: once the Pareto front and the history have filled up (well before 2000 trials),
    # the size does not grow with the number of trials.
    early = max(size for issued, size in sizes if 1000 <= issued < 2000)
    late = max(size for issued, size in sizes if issued > 4000)
    assert late < early * 1.1
    assert len(final["history"]) <= 50 and len(final["paretoFront"]) <= 16
    assert len(final["recentFailures"]) <= 10
    assert all(len(f["reason"]) <= 300 for f in final["recentFailures"])
    assert len(condition(final, "Ready")["message"]) <= 1000
    assert decode_state(final["optimizer"]) == state  # the state survives the status


def test_status_fields_and_printer_columns() -> None:
    config = EngineConfig(checkpoints=("a", "b", "c"), tasks={"t": 1.0}, max_generations=2)
    state = init(config)
    status = build_status(
        state=state,
        phase=Phase.PENDING,
        reason=Reason.BASELINES,
        message="m",
        previous=MergeSearchStatus(),
        active=["b-each-a"],
        now=T0,
        spec_generation=1,
    ).to_wire()
    assert status["phase"] == "Pending" and status["iteration"] == 0
    assert status["trials"] == {
        "total": 11,  # 3 each + uniform + a population of 4+⌊3 ln 3⌋ = 7
        "succeeded": 0,
        "failed": 0,
        "finished": 0,
        "running": 1,
    }
    assert status["observedGeneration"] == 1 and status["activeTrials"] == ["b-each-a"]
    assert [b["id"] for b in status["baselines"]][:2] == ["b-each-a", "b-each-b"]
    assert "weights" not in status["baselines"][0]  # implied by members: kept small
    assert "best" not in status and "completionTime" not in status


def test_a_condition_keeps_its_transition_time_until_its_status_flips() -> None:
    conds = set_condition(
        [], type="Ready", holds=False, reason="Searching", message="a", now=T0, spec_generation=1
    )
    same = set_condition(
        conds,
        type="Ready",
        holds=False,
        reason="Finalizing",
        message="b",
        now=T1,
        spec_generation=2,
    )
    assert same[0].last_transition_time == T0
    assert same[0].reason == "Finalizing" and same[0].observed_generation == 2
    flipped = set_condition(
        same, type="Ready", holds=True, reason="Succeeded", message="c", now=T1, spec_generation=2
    )
    assert flipped[0].value == "True" and flipped[0].last_transition_time == T1


@pytest.mark.parametrize(
    ("phase", "ready", "progressing", "failed"),
    [
        ("Pending", "False", "True", "False"),
        ("Running", "False", "True", "False"),
        ("Suspended", "False", "False", "False"),
        ("Succeeded", "True", "False", "False"),
        ("Failed", "False", "False", "True"),
    ],
)
def test_conditions_follow_the_phase(phase: str, ready: str, progressing: str, failed: str) -> None:
    conds = phase_conditions(
        [], phase=Phase(phase), reason="R", message="m", now=T0, spec_generation=4
    )
    by_type = {c.type: c for c in conds}
    assert by_type["Ready"].value == ready
    assert by_type["Progressing"].value == progressing
    assert by_type["Failed"].value == failed
    assert by_type["Failed"].reason == ("R" if failed == "True" else "NoFailure")
    assert all(c.observed_generation == 4 for c in conds)


def test_milestones() -> None:
    def status(
        phase: str, best: str | None, baselines: str, failed_reason: str = ""
    ) -> MergeSearchStatus:
        conds = phase_conditions(
            [],
            phase=Phase(phase),
            reason=failed_reason or "R",
            message="why",
            now=T0,
            spec_generation=1,
        )
        out = {
            "phase": phase,
            "optimizer": {"x": 1},
            "baselines": [
                {"id": "b-uniform", "kind": "uniform", "status": baselines, "fitness": 0.4}
            ],
            "conditions": [c.to_wire() for c in conds],
        }
        if best:
            out["best"] = {
                "trial": best,
                "kind": "search",
                "fitness": 0.5,
                "scores": {"t": 0.5},
                "weights": {"a": 1.0},
            }
        return MergeSearchStatus.read(out)

    first = milestones(MergeSearchStatus(), status("Pending", None, "pending"))
    assert [e.reason for e in first] == ["Started"]
    progress = milestones(
        status("Running", None, "pending"), status("Running", "g000-c01", "succeeded")
    )
    assert [e.reason for e in progress] == ["BaselinesDone", "NewBest"]
    same = status("Running", "g000-c01", "succeeded")
    assert milestones(same, same) == []
    failed = milestones(same, status("Failed", "g000-c01", "succeeded", "MaxFailedTrials"))
    assert [(e.type, e.reason) for e in failed] == [("Warning", "MaxFailedTrials")]
    assert [e.reason for e in milestones(same, status("Suspended", "g000-c01", "succeeded"))] == [
        "Suspended"
    ]


def test_the_optimizer_state_is_one_compact_line_and_round_trips_exactly() -> None:
    """`kubectl describe` printed ~150 lines of optimizer internals: now it is one string, and
    the best fitness is shown with 4 decimals (the BEST printer column)."""
    config = EngineConfig(checkpoints=tuple("abcdefghi"), tasks={"t": 1.0}, max_generations=3)
    state = init(config)
    for _ in range(3):
        candidates = pending_candidates(state)
        results = [Result(c.id, scores={"t": 0.1 + 0.01 * i}) for i, c in enumerate(candidates)]
        state = tell(state, results)
    status = build_status(
        state=state, phase=Phase.RUNNING, reason=Reason.SEARCHING, message="m",
        previous=MergeSearchStatus(), active=[], now=T0, spec_generation=1,
    ).to_wire()  # fmt: skip
    assert isinstance(status["optimizer"], str) and "\n" not in status["optimizer"]
    assert decode_state(status["optimizer"]) == state
    assert decode_state(state.to_dict()) == state  # what earlier versions wrote still reads
    described = yaml.safe_dump(status, width=10**9)
    assert sum("optimizer" in line for line in described.splitlines()) == 1
    assert len(yaml.safe_dump({"optimizer": state.to_dict()}).splitlines()) > 40  # was
    assert status["bestFitness"] == f"{status['best']['fitness']:.4f}"
    assert re.fullmatch(r"-?\d+\.\d{4}", status["bestFitness"])


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        STATE_PREFIX + "!!!",
        STATE_PREFIX + base64.b64encode(b"not zlib").decode(),
        STATE_PREFIX + base64.b64encode(zlib.compress(b"{}")).decode(),
        STATE_PREFIX + base64.b64encode(zlib.compress(b"0" * (STATE_MAX_BYTES + 10))).decode(),
    ],
)
def test_a_corrupt_or_oversized_state_is_refused_not_loaded(value: str) -> None:
    with pytest.raises(ValueError):
        decode_state(value)
