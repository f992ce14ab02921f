"""Ask/tell search over merge weights: pure functions from state to state.

Every call rebuilds what it needs from the state (a CMA-ES strategy, the random stream) and
returns a new state; nothing survives between calls, so a state read back from JSON behaves
exactly like the one that was written. The flow:

- `init` issues the baselines and opens generation 0 (CMA-ES is asked for a population);
- `ask` lists the candidates still waiting for a result (baselines first), changing nothing,
  so asking twice yields the same candidates;
- `tell` records results; a failure may be resampled; merge-best is issued once every 'each'
  result is in; when a generation's last result arrives, CMA-ES is told the whole generation
  and the next generation is opened at once, unless a budget or stop rule says otherwise.

A generation's population is told in slot order whatever order its results came in, and a
failed candidate's penalty is fixed by the generation's own results, so the candidates depend on
the set of results, not on their arrival order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cma
import numpy as np

from mergesearch.engine import cmastate, pareto
from mergesearch.engine.baselines import (
    baseline_weights,
    each_resolved,
    initial_baselines,
    merge_best_members,
)
from mergesearch.engine.codec import (
    decode_f8,
    decode_f8_rows,
    encode_f8,
    generator_from_state,
    generator_state,
)
from mergesearch.engine.config import EngineConfig
from mergesearch.engine.parameterization import Parameterization, make_parameterization
from mergesearch.engine.records import (
    Candidate,
    Outcome,
    Result,
    ScoredTrial,
    TellReport,
    score_result,
)
from mergesearch.engine.state import (
    BaselineRecord,
    ConfirmRecord,
    EngineState,
    FailureNote,
    Finish,
    GenerationSummary,
    OpenGeneration,
    Replacement,
    RngState,
    SlotRecord,
    TrialCounters,
)
from mergesearch.engine.streams import main_generator, replacement_generator

RECENT_FAILURES = 10
# How far a best-baseline start is moved towards the uniform merge (see `start_weights`).
START_SHRINK = 0.5
MIN_STEP = 1e-12
MAX_CONDITION = 1e14
_SLOT_ID = re.compile(r"^g(\d+)-c(\d+)(?:-r(\d+))?$")
CONFIRM_PREFIX = "c-"


# --------------------------------------------------------------------------- public API


def init(config: EngineConfig) -> EngineState:
    """A new search: baselines issued, generation 0 asked (when the budgets allow one)."""
    with cmastate.single_threaded_blas():
        return _init(config)


def _init(config: EngineConfig) -> EngineState:
    main = main_generator(config.seed)
    source = cmastate.NormalSource(main)
    es = cmastate.new_strategy(_settings(config), source)
    baselines = initial_baselines(config, first_seq=0)
    state = EngineState(
        config=config,
        cma=cmastate.snapshot(es),
        rng=RngState(**generator_state(main)),
        baselines=baselines,
        trials=TrialCounters(issued=sum(b.seq is not None for b in baselines)),
    )
    if not _awaits_start(state):
        state = _open_generation(state, _Live(es, main, source))
    return _settle(state)


def ask(state: EngineState, k: int | None = None) -> tuple[EngineState, list[Candidate]]:
    """The candidates still to evaluate, baselines first, at most `k`; the state is unchanged."""
    if k is not None and k < 0:
        raise ValueError("k must be >= 0")
    candidates = pending_candidates(state)
    return state, candidates if k is None else candidates[:k]


def pending_candidates(state: EngineState) -> list[Candidate]:
    if state.finished is not None:
        return []
    config = state.config
    out = [
        Candidate(
            id=b.id,
            kind="baseline",
            generation=None,
            weights=_named(config, baseline_weights(config, b)),
            baseline=b.kind,
        )
        for b in state.baselines
        if b.status == "pending"
    ]
    gen = state.generation
    if gen is not None:
        rows = _stored_rows(state)
        param = _param(config)
        out.extend(
            Candidate(
                id=slot_id(gen.index, s.slot, s.attempt),
                kind="search",
                generation=gen.index,
                weights=_named(config, param.to_weights(rows[s.slot])),
            )
            for s in gen.slots
            if s.status == "pending"
        )
    out.extend(
        Candidate(
            id=c.id,
            kind=c.kind,
            generation=c.generation,
            weights=_named(config, _confirm_weights(state, c)),
            baseline=c.baseline,
            subset="confirmation",
            source=c.source,
        )
        for c in state.confirmations
        if c.status == "pending"
    )
    return out


def tell(state: EngineState, results: Iterable[Result | Mapping[str, Any]]) -> EngineState:
    """Record results; see `tell_with_report` for which results are applied."""
    return tell_with_report(state, results)[0]


def tell_with_report(
    state: EngineState, results: Iterable[Result | Mapping[str, Any]]
) -> tuple[EngineState, TellReport]:
    """Record results, in the order given.

    A result is applied only if its id is pending (issued and not yet told); any other result
    (an unknown id, an id already told, a candidate replaced by resampling, a closed generation,
    a finished search) is ignored and listed with the reason. So telling the same result twice
    is harmless: the operator may collect a finished trial on two reconciles.
    """
    with cmastate.single_threaded_blas():
        return _tell(state, results)


def _tell(
    state: EngineState, results: Iterable[Result | Mapping[str, Any]]
) -> tuple[EngineState, TellReport]:
    applied: list[str] = []
    ignored: list[tuple[str, str]] = []
    live: _Live | None = None
    for raw in results:
        result = Result.coerce(raw)
        cid = result.candidate_id
        if state.finished is not None:
            ignored.append((cid, "the search has finished"))
            continue
        where = _locate(state, cid)
        if where is None:
            ignored.append((cid, _not_pending_reason(state, cid)))
            continue
        outcome = score_result(state.config, result)
        if where[0] == "baseline":
            state = _tell_baseline(state, where[1], outcome)
        elif where[0] == "confirm":
            state = _tell_confirmation(state, where[1], outcome)
        else:
            state, live = _tell_slot(state, where[1], outcome, live)
        applied.append(cid)
        state = _finish_early(state)
    if state.finished is None:
        state = _advance(state, live)
    return _settle(state), TellReport(applied=tuple(applied), ignored=tuple(ignored))


def done(state: EngineState) -> tuple[bool, str | None]:
    """Whether the search is over, and why (a budget, a stop rule, or a failure)."""
    if state.finished is None:
        return False, None
    return True, state.finished.reason


@dataclass(frozen=True)
class EngineStatus:
    """A read-only summary for status fields, metrics and reports."""

    phase: Literal["running", "succeeded", "failed"]
    reason: str | None
    message: str | None
    generation: int
    generations_completed: int
    trials_issued: int
    trials_succeeded: int
    trials_failed: int
    trials_pending: int
    sigma: float
    mean_weights: dict[str, float]
    best: dict[str, Any] | None
    baselines: list[dict[str, Any]] = field(default_factory=list)
    pareto: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    recent_failures: list[dict[str, str]] = field(default_factory=list)
    replay_mismatches: int = 0
    # Search and confirmation scores side by side, and the candidate chosen on the latter
    # (None until every confirmation is in, and when confirmation is off).
    confirmation: list[dict[str, Any]] = field(default_factory=list)
    winner: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def status(state: EngineState) -> EngineStatus:
    config = state.config
    gen = state.generation
    mean = decode_f8(state.cma.mean, state.cma.dim)
    finished = state.finished
    return EngineStatus(
        phase="running" if finished is None else finished.phase,
        reason=None if finished is None else finished.reason,
        message=None if finished is None else finished.message,
        generation=gen.index if gen is not None else state.generations_completed,
        generations_completed=state.generations_completed,
        trials_issued=state.trials.issued,
        trials_succeeded=state.trials.succeeded,
        trials_failed=state.trials.failed,
        trials_pending=len(pending_candidates(state)),
        sigma=gen.sigma if gen is not None else state.cma.sigma,
        mean_weights=_named(config, _param(config).to_weights(mean)),
        best=None if state.best is None else state.best.to_public(config.checkpoints),
        baselines=[_baseline_public(config, b) for b in state.baselines],
        pareto=[p.to_public(config.checkpoints) for p in state.pareto],
        history=[h.model_dump(mode="json") for h in state.history],
        recent_failures=[f.model_dump(mode="json") for f in state.recent_failures],
        replay_mismatches=state.replay_mismatches,
        confirmation=[_confirm_public(state, c) for c in state.confirmations],
        winner=_winner_public(state),
    )


def chosen(status: EngineStatus) -> dict[str, Any] | None:
    """The merge a finished search hands over: the confirmed winner, else the search's best."""
    return status.winner if status.winner is not None else status.best


def trials_told(state: EngineState) -> int:
    """Trials that ran and were told (succeeded or failed): what a progress count shows."""
    return state.trials.succeeded + state.trials.failed


def planned_trials(state: EngineState) -> int | None:
    """How many trials the search runs in all if it ends by its budgets; None if unbounded.

    Not `max_trials`: a generation opens only when its whole population fits the budget, so a
    budget of 40 with 11 baselines and a population of 8 runs 35 trials. Counts what has been
    issued, the trial kept for merge-best, the whole generations that still fit both
    `max_trials` and `max_generations`, and the confirmation that follows (topK and every
    baseline; merge-best may need none). An early stop (target, stagnation, failures) ends the
    search sooner; once it has ended, the plan is what ran. Resampled failures may add trials.
    """
    if state.finished is not None:
        return trials_told(state)
    config = state.config
    committed = state.trials.issued + _reserved(state)
    generations: int | None = None
    if config.max_generations is not None:
        opened = state.generations_completed + (state.generation is not None)
        generations = max(0, config.max_generations - opened)
    if config.max_trials is not None:
        fits = max(0, config.max_trials - committed) // config.popsize
        generations = fits if generations is None else min(generations, fits)
    if state.confirmations:  # issued all at once: counted in `issued`
        return committed
    # the confirmation to come: topK search trials and the baselines (at most)
    confirming = config.confirm_top_k + config.baseline_trials if config.confirm_top_k else 0
    return None if generations is None else committed + generations * config.popsize + confirming


def slot_id(generation: int, slot: int, attempt: int) -> str:
    base = f"g{generation:03d}-c{slot:02d}"
    return base if attempt == 0 else f"{base}-r{attempt}"


# --------------------------------------------------------------------------- strategy plumbing


@dataclass
class _Live:
    """A strategy rebuilt for one engine call, with the main stream it samples from."""

    es: cma.CMAEvolutionStrategy
    main: np.random.Generator
    source: cmastate.NormalSource
    mismatch: bool = False


def _param(config: EngineConfig) -> Parameterization:
    return make_parameterization(config.parameterization, config.n_checkpoints)


def _settings(config: EngineConfig, start: str | None = None) -> cmastate.StrategySettings:
    """The strategy's construction settings; `start` is a state's recorded start point."""
    param = _param(config)
    if start is not None:
        x0 = decode_f8(start, param.dim)
    elif isinstance(config.start, dict):
        x0 = param.from_weights(np.array([config.start[n] for n in config.checkpoints]))
    else:  # uniform, or best-baseline until the baselines are in
        x0 = param.origin()
    return cmastate.StrategySettings(tuple(float(v) for v in x0), config.step_size, config.popsize)


def _awaits_start(state: EngineState) -> bool:
    """Generation 0 waits for the baselines when it starts from the best of them."""
    return (
        state.config.start == "best-baseline"
        and state.start is None
        and state.generation is None
        and state.generations_completed == 0
    )


def start_weights(config: EngineConfig, baselines: Sequence[BaselineRecord]) -> np.ndarray:
    """The best succeeded baseline's weights, moved START_SHRINK of the way to uniform.

    The best baseline is often a single checkpoint or merge-best, on the simplex's boundary,
    where the log-ratio coordinates are infinite; shrinking puts the start inside, near it.
    Ties go to the earlier baseline; with no successful baseline, the start is uniform.
    """
    n = config.n_checkpoints
    done = [b for b in baselines if b.status == "succeeded" and b.fitness is not None]
    if not done:
        return np.full(n, 1.0 / n)
    best = max(done, key=lambda b: b.fitness)  # max keeps the first of equals
    return (1.0 - START_SHRINK) * baseline_weights(config, best) + START_SHRINK / n


def _start_from_baselines(state: EngineState) -> EngineState:
    """All baselines are in: build the strategy at the best of them and open generation 0."""
    config = state.config
    x0 = _param(config).from_weights(start_weights(config, state.baselines))
    start = encode_f8(x0)
    main = generator_from_state(state.rng.model_dump())
    source = cmastate.NormalSource(main)
    es = cmastate.new_strategy(_settings(config, start), source)
    state = state.model_copy(update={"cma": cmastate.snapshot(es), "start": start})
    return _open_generation(state, _Live(es, main, source))


def _stored_rows(state: EngineState) -> np.ndarray:
    """The open generation's search vectors, one per slot (its latest attempt)."""
    gen = state.generation
    assert gen is not None
    return decode_f8_rows(gen.samples, len(gen.slots), state.cma.dim)


def _ask_replacement(
    live: _Live, seed: int, generation: int, slot: int, attempt: int
) -> np.ndarray:
    live.source.generator = replacement_generator(seed, generation, slot, attempt)
    try:
        return cmastate.ask(live.es, 1)[0]
    finally:
        live.source.generator = live.main


def _live(state: EngineState) -> _Live:
    """Rebuild the strategy at the last boundary and replay the open generation's asks.

    The replay puts the strategy exactly where the uninterrupted one was (cma remembers what it
    sent); comparing the replayed samples with the stored ones checks that bit for bit.
    """
    config = state.config
    main = generator_from_state(state.rng.model_dump())
    source = cmastate.NormalSource(main)
    settings = _settings(config, state.start)
    live = _Live(cmastate.restore(settings, state.cma, source), main, source)
    gen = state.generation
    if gen is not None:
        replayed = cmastate.ask(live.es, len(gen.slots))
        for r in gen.replacements:
            replayed[r.slot] = _ask_replacement(live, config.seed, gen.index, r.slot, r.attempt)
        stored = _stored_rows(state)
        live.mismatch = not np.array_equal(replayed.view(np.uint64), stored.view(np.uint64))
    return live


def _open_generation(state: EngineState, live: _Live) -> EngineState:
    """Ask CMA-ES for the next population, or record why no generation opens."""
    reason = _search_stop_reason(state, live.es)
    if reason is not None:
        return state.model_copy(update={"search_stop": reason})
    config = state.config
    rng_before = RngState(**generator_state(live.main))
    rows = cmastate.ask(live.es, config.popsize)
    first = state.trials.issued
    gen = OpenGeneration(
        index=state.generations_completed,
        sigma=float(live.es.sigma),
        samples=encode_f8(rows),
        slots=tuple(
            SlotRecord(slot=i, attempt=0, seq=first + i, status="pending") for i in range(len(rows))
        ),
        penalty_floor=state.worst_fitness if state.worst_fitness is not None else 0.0,
    )
    trials = state.trials.model_copy(update={"issued": first + len(rows)})
    return state.model_copy(
        update={"rng": rng_before, "generation": gen, "search_stop": None, "trials": trials}
    )


def _close_generation(state: EngineState, live: _Live) -> EngineState:
    """Tell CMA-ES the whole generation (in slot order), snapshot, open the next one."""
    gen = state.generation
    assert gen is not None
    config = state.config
    stored = _stored_rows(state)
    mismatches = state.replay_mismatches
    if live.mismatch:
        # The replay differs from what was evaluated (another platform's floating point):
        # tell the evaluated samples, registered as sampled so that cma does not repair them.
        for row in stored:
            live.es.sent_solutions.insert(row, geno=row.copy(), iteration=live.es.countiter)
        mismatches += 1
    slots = sorted(gen.slots, key=lambda s: s.slot)
    fits = [s.fitness for s in slots if s.status == "succeeded" and s.fitness is not None]
    penalty = min([gen.penalty_floor, *fits])
    losses = [-(s.fitness if s.fitness is not None else penalty) for s in slots]
    cmastate.tell(live.es, [stored[s.slot] for s in slots], losses)

    completed = gen.index + 1
    best_so_far = state.best.fitness if state.best is not None else None
    summary = GenerationSummary(
        generation=gen.index,
        sigma=gen.sigma,
        best=max(fits) if fits else None,
        mean=math.fsum(fits) / len(fits) if fits else None,
        worst=min(fits) if fits else None,
        succeeded=len(fits),
        failed=len(gen.replacements) + sum(s.status == "failed" for s in slots),
        best_so_far=best_so_far,
    )
    improved = best_so_far is not None and (
        state.best_reference is None
        or best_so_far > state.best_reference + config.stagnation_tolerance
    )
    state = state.model_copy(
        update={
            "cma": cmastate.snapshot(live.es),
            "rng": RngState(**generator_state(live.main)),
            "generation": None,
            "generations_completed": completed,
            "history": (*state.history, summary)[-config.history_limit :],
            "best_reference": best_so_far if improved else state.best_reference,
            "last_improvement": completed if improved else state.last_improvement,
            "replay_mismatches": mismatches,
        }
    )
    live.mismatch = False
    return _open_generation(state, live)


def _advance(state: EngineState, live: _Live | None) -> EngineState:
    """Close a fully told generation; reopen when freed budget now fits one; open the first
    once the baselines it starts from are in."""
    if _awaits_start(state):
        return state if _anything_pending(state) else _start_from_baselines(state)
    gen = state.generation
    if gen is not None:
        if all(s.status != "pending" for s in gen.slots):
            return _close_generation(state, live or _live(state))
        return state
    if state.search_stop == "max_trials" and _budget_allows(state, state.config.popsize):
        return _open_generation(state, live or _live(state))
    return state


# --------------------------------------------------------------------------- budgets and stops


def _reserved(state: EngineState) -> int:
    """Trials kept for merge-best until it is issued (it may turn out to need none)."""
    return sum(b.status == "waiting" for b in state.baselines)


def _budget_allows(state: EngineState, count: int) -> bool:
    limit = state.config.max_trials
    return limit is None or state.trials.issued + _reserved(state) + count <= limit


def _search_stop_reason(state: EngineState, es: cma.CMAEvolutionStrategy) -> str | None:
    config = state.config
    if state.finished is not None:
        return state.finished.reason
    if _target_reached(state):
        return "target_fitness"
    if config.max_generations is not None and state.generations_completed >= config.max_generations:
        return "max_generations"
    if not _budget_allows(state, config.popsize):
        return "max_trials"
    stagnant_for = state.generations_completed - state.last_improvement
    if (
        config.stagnation_generations is not None
        and state.generations_completed > 0
        and stagnant_for >= config.stagnation_generations
    ):
        return "stagnation"
    if cmastate.step_size_scale(es) < MIN_STEP:
        return "converged"
    if cmastate.condition_number(es) > MAX_CONDITION:
        return "ill_conditioned"
    return None


def _target_reached(state: EngineState) -> bool:
    target = state.config.target_fitness
    return target is not None and state.best is not None and state.best.fitness >= target


def _finish_early(state: EngineState) -> EngineState:
    """Stops that do not wait for running trials: too many failures, or the target reached."""
    if state.finished is not None:
        return state
    limit = state.config.max_failed_trials
    if state.confirmations:  # the search is over: a failed confirmation only loses a finalist
        return state
    if limit is not None and state.trials.failed > limit:
        message = f"{state.trials.failed} trials failed, more than max_failed_trials={limit}"
        return _finish(state, "failed", "max_failed_trials", message)
    if _target_reached(state):
        assert state.best is not None
        if state.config.confirm_top_k > 0:  # stop searching; confirm once the baselines are in
            return state.model_copy(update={"generation": None, "search_stop": "target_fitness"})
        message = f"trial {state.best.id} reached fitness {state.best.fitness:.6g}"
        return _finish(state, "succeeded", "target_fitness", message)
    return state


def _settle(state: EngineState) -> EngineState:
    state = _finish_early(state)
    if state.finished is not None or _anything_pending(state) or state.generation is not None:
        return state
    if state.best is None:
        return _finish(state, "failed", "no_successful_trial", "no trial succeeded")
    if state.config.confirm_top_k > 0 and not state.confirmations:
        return _begin_confirmation(state)
    if any(c.status == "pending" for c in state.confirmations):
        return state
    reason = state.search_stop or "completed"
    message = f"stopped on {reason} after {state.generations_completed} generations"
    winner = _winner(state)
    if winner is not None:
        message += (
            f"; confirmed winner {winner.source} (fitness {winner.fitness:.6g} on unseen "
            f"examples, {winner.search_fitness:.6g} on the search examples)"
        )
    return _finish(state, "succeeded", reason, message)


def _finish(
    state: EngineState, phase: Literal["succeeded", "failed"], reason: str, message: str
) -> EngineState:
    return state.model_copy(
        update={"finished": Finish(phase=phase, reason=reason, message=message)}
    )


# --------------------------------------------------------------------------- confirmation


def _finalists(state: EngineState) -> list[ConfirmRecord]:
    """The best search trials, then every baseline that was evaluated (one per distinct model).

    Issued in that order, which is also the tie-break between equal confirmation scores.
    """
    sources: list[dict[str, Any]] = [
        {
            "source": r.id,
            "kind": "search",
            "generation": r.generation,
            "weights": r.weights,
            "search_fitness": r.fitness,
            "search_scores": dict(r.scores),
        }
        for r in state.leaders
    ]
    for b in state.baselines:
        if b.status != "succeeded" or b.same_as is not None:
            continue
        assert b.fitness is not None and b.scores is not None
        sources.append(
            {
                "source": b.id,
                "kind": "baseline",
                "baseline": b.kind,
                "search_fitness": b.fitness,
                "search_scores": dict(b.scores),
            }
        )
    seq = state.trials.issued
    return [
        ConfirmRecord(id=CONFIRM_PREFIX + s["source"], seq=seq + i, status="pending", **s)
        for i, s in enumerate(sources)
    ]


def _confirm_weights(state: EngineState, record: ConfirmRecord) -> np.ndarray:
    if record.weights is not None:
        return decode_f8(record.weights, state.config.n_checkpoints)
    baseline = next(b for b in state.baselines if b.id == record.source)
    return baseline_weights(state.config, baseline)


def _begin_confirmation(state: EngineState) -> EngineState:
    finalists = _finalists(state)
    trials = state.trials.model_copy(update={"issued": state.trials.issued + len(finalists)})
    return state.model_copy(update={"confirmations": tuple(finalists), "trials": trials})


def _tell_confirmation(state: EngineState, index: int, outcome: Outcome) -> EngineState:
    record = state.confirmations[index]
    if outcome.failed:
        updated = record.model_copy(update={"status": "failed", "reason": outcome.reason})
        state = _record_failure(state, record.id, outcome.reason or "failed")
    else:
        updated = record.model_copy(
            update={"status": "succeeded", "fitness": outcome.fitness, "scores": outcome.scores}
        )
        trials = state.trials.model_copy(update={"succeeded": state.trials.succeeded + 1})
        state = state.model_copy(update={"trials": trials})
    confirmations = (*state.confirmations[:index], updated, *state.confirmations[index + 1 :])
    return state.model_copy(update={"confirmations": confirmations})


def _winner(state: EngineState) -> ConfirmRecord | None:
    """The best confirmation score once all are in; ties go to the earlier finalist."""
    if not state.confirmations or any(c.status == "pending" for c in state.confirmations):
        return None
    done = [c for c in state.confirmations if c.status == "succeeded" and c.fitness is not None]
    return max(done, key=lambda c: c.fitness) if done else None  # type: ignore[arg-type, return-value]


def _anything_pending(state: EngineState) -> bool:
    return any(b.status in ("pending", "waiting") for b in state.baselines)


# --------------------------------------------------------------------------- telling results


def _locate(state: EngineState, cid: str) -> tuple[str, int] | None:
    for i, b in enumerate(state.baselines):
        if b.id == cid and b.status == "pending":
            return "baseline", i
    gen = state.generation
    if gen is not None:
        for i, s in enumerate(gen.slots):
            if s.status == "pending" and slot_id(gen.index, s.slot, s.attempt) == cid:
                return "slot", i
    for i, c in enumerate(state.confirmations):
        if c.id == cid and c.status == "pending":
            return "confirm", i
    return None


def _not_pending_reason(state: EngineState, cid: str) -> str:
    for b in state.baselines:
        if b.id == cid:
            return "not issued yet" if b.status == "waiting" else "already told"
    if any(c.id == cid for c in state.confirmations):
        return "already told"
    match = _SLOT_ID.match(cid)
    if match is None:
        return "unknown candidate"
    generation, slot, attempt = int(match[1]), int(match[2]), int(match[3] or 0)
    gen = state.generation
    current = gen.index if gen is not None else state.generations_completed
    if generation < current:
        return "its generation is closed"
    if gen is not None and generation == gen.index and slot < len(gen.slots):
        latest = next(s for s in gen.slots if s.slot == slot)
        if attempt < latest.attempt:
            return "replaced by a resample"
        if attempt == latest.attempt:
            return "already told"
    return "unknown candidate"


def _record_success(state: EngineState, record: ScoredTrial) -> EngineState:
    config = state.config
    best = state.best
    if (
        best is None
        or record.fitness > best.fitness
        or (record.fitness == best.fitness and record.seq < best.seq)
    ):
        best = record
    front = pareto.insert(
        state.pareto, record, [t.name for t in config.tasks], config.pareto_limit, best.id
    )
    worst = state.worst_fitness
    leaders = state.leaders
    if record.kind == "search" and config.confirm_top_k > 0:
        ranked = sorted((*leaders, record), key=lambda r: (-r.fitness, r.seq))
        leaders = tuple(ranked[: config.confirm_top_k])
    return state.model_copy(
        update={
            "best": best,
            "leaders": leaders,
            "pareto": front,
            "worst_fitness": record.fitness if worst is None else min(worst, record.fitness),
            "trials": state.trials.model_copy(update={"succeeded": state.trials.succeeded + 1}),
        }
    )


def _record_failure(state: EngineState, cid: str, reason: str) -> EngineState:
    notes = (*state.recent_failures, FailureNote(id=cid, reason=reason))[-RECENT_FAILURES:]
    return state.model_copy(
        update={
            "recent_failures": notes,
            "trials": state.trials.model_copy(update={"failed": state.trials.failed + 1}),
        }
    )


def _tell_baseline(state: EngineState, index: int, outcome: Outcome) -> EngineState:
    config = state.config
    record = state.baselines[index]
    if outcome.failed:
        updated = record.model_copy(update={"status": "failed", "reason": outcome.reason})
        state = _record_failure(state, record.id, outcome.reason or "failed")
    else:
        assert outcome.fitness is not None and record.seq is not None
        updated = record.model_copy(
            update={"status": "succeeded", "fitness": outcome.fitness, "scores": outcome.scores}
        )
        trial = ScoredTrial(
            id=record.id,
            seq=record.seq,
            kind="baseline",
            generation=None,
            fitness=outcome.fitness,
            scores=outcome.scores,
            weights=encode_f8(baseline_weights(config, record)),
        )
        state = _record_success(state, trial)
    baselines = (*state.baselines[:index], updated, *state.baselines[index + 1 :])
    return _issue_merge_best(state.model_copy(update={"baselines": baselines}))


def _issue_merge_best(state: EngineState) -> EngineState:
    """Once every 'each' result is in: issue merge-best, reuse a single winner, or skip."""
    index = next((i for i, b in enumerate(state.baselines) if b.status == "waiting"), None)
    if index is None or not each_resolved(state.baselines):
        return state
    record = state.baselines[index]
    members = merge_best_members(state.config, state.baselines)
    trials = state.trials
    if not members:
        update: dict[str, Any] = {"status": "skipped", "reason": "no 'each' baseline succeeded"}
    elif len(members) == 1:
        alone = next(b for b in state.baselines if b.kind == "each" and b.members == members)
        update = {
            "status": "succeeded",
            "members": members,
            "fitness": alone.fitness,
            "scores": alone.scores,
            "same_as": alone.id,
        }
    else:
        update = {"status": "pending", "members": members, "seq": trials.issued}
        trials = trials.model_copy(update={"issued": trials.issued + 1})
    baselines = list(state.baselines)
    baselines[index] = record.model_copy(update=update)
    return state.model_copy(update={"baselines": tuple(baselines), "trials": trials})


def _tell_slot(
    state: EngineState, index: int, outcome: Outcome, live: _Live | None
) -> tuple[EngineState, _Live | None]:
    config = state.config
    gen = state.generation
    assert gen is not None
    slot = gen.slots[index]
    cid = slot_id(gen.index, slot.slot, slot.attempt)
    if not outcome.failed:
        assert outcome.fitness is not None
        row = _stored_rows(state)[slot.slot]
        trial = ScoredTrial(
            id=cid,
            seq=slot.seq,
            kind="search",
            generation=gen.index,
            fitness=outcome.fitness,
            scores=outcome.scores,
            weights=encode_f8(_param(config).to_weights(row)),
        )
        done_slot = slot.model_copy(update={"status": "succeeded", "fitness": outcome.fitness})
        state = _replace_slot(state, index, done_slot)
        return _record_success(state, trial), live
    reason = outcome.reason or "failed"
    state = _record_failure(state, cid, reason)
    can_resample = (
        config.failure_policy == "resample"
        and slot.attempt < config.max_resamples
        and _budget_allows(state, 1)
    )
    if not can_resample:
        failed_slot = slot.model_copy(update={"status": "failed", "reason": reason})
        return _replace_slot(state, index, failed_slot), live
    live = live or _live(state)
    attempt = slot.attempt + 1
    row = _ask_replacement(live, config.seed, gen.index, slot.slot, attempt)
    rows = _stored_rows(state)
    rows[slot.slot] = row
    fresh = SlotRecord(slot=slot.slot, attempt=attempt, seq=state.trials.issued, status="pending")
    gen = gen.model_copy(
        update={
            "samples": encode_f8(rows),
            "replacements": (*gen.replacements, Replacement(slot=slot.slot, attempt=attempt)),
        }
    )
    trials = state.trials.model_copy(update={"issued": state.trials.issued + 1})
    state = state.model_copy(update={"generation": gen, "trials": trials})
    return _replace_slot(state, index, fresh), live


def _replace_slot(state: EngineState, index: int, slot: SlotRecord) -> EngineState:
    gen = state.generation
    assert gen is not None
    slots = (*gen.slots[:index], slot, *gen.slots[index + 1 :])
    return state.model_copy(update={"generation": gen.model_copy(update={"slots": slots})})


# --------------------------------------------------------------------------- presentation


def _named(config: EngineConfig, weights: np.ndarray) -> dict[str, float]:
    return {name: float(w) for name, w in zip(config.checkpoints, weights, strict=True)}


def _confirm_public(state: EngineState, record: ConfirmRecord) -> dict[str, Any]:
    data = record.model_dump(mode="json", exclude={"seq", "weights"}, exclude_none=True)
    data["weights"] = _named(state.config, _confirm_weights(state, record))
    return data


def _winner_public(state: EngineState) -> dict[str, Any] | None:
    """The winner in the shape of `best` (id, kind, generation, fitness, scores, weights), with
    the search-side figures beside the confirmation ones."""
    winner = _winner(state)
    if winner is None:
        return None
    config = state.config
    return {
        "id": winner.source,
        "kind": winner.kind,
        "baseline": winner.baseline,
        "generation": winner.generation,
        "fitness": winner.fitness,
        "scores": dict(winner.scores or {}),
        "searchFitness": winner.search_fitness,
        "searchScores": dict(winner.search_scores),
        "confirmationId": winner.id,
        "weights": _named(config, _confirm_weights(state, winner)),
    }


def _baseline_public(config: EngineConfig, record: BaselineRecord) -> dict[str, Any]:
    data = record.model_dump(mode="json", exclude={"seq"})
    if record.members:
        data["weights"] = _named(config, baseline_weights(config, record))
    return data
