"""Local mode: the whole search on one machine, no cluster, resumable at any moment.

The engine is the operator's; trials run in-process on a resident model. What survives a kill
is on disk in the state directory: `state.json` (the engine state, the same JSON the operator
keeps in a resource's status), `trials.jsonl` (every finished trial, appended and fsynced before
the state that counts it) and `final.json` (held-out scores and export of the best). A trial
found in the log but not yet in the state is told from the log, not evaluated again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergerunner.contract import MODEL_FILES
from mergerunner.trial import (
    FailureKind,
    FailurePolicy,
    TrialResult,
    backoff_s,
    failure_policy,
    runs_again,
)
from mergesearch import engine
from mergesearch.local.records import TrialLogEntry, append_record, read_records, write_json_atomic
from mergesearch.searchconfig import engine_config
from mergesearch.spec import MergeSearch, MergeSearchSpec

log = logging.getLogger(__name__)
STATE_VERSION = 1
# The id of the finalization's trial: the held-out scores of the chosen merge.
FINALIZATION_TRIAL = "final"


class LocalInputError(Exception):
    """Bad input found before the search starts: a checkpoint, a task, a state directory."""


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def trials(self) -> Path:
        return self.root / "trials.jsonl"

    @property
    def final(self) -> Path:
        return self.root / "final.json"


def resolve_location(uri: str, base: Path) -> str:
    """Relative paths in a manifest are relative to the manifest's directory."""
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())


def spec_fingerprint(spec: MergeSearchSpec) -> str:
    """What a search's results depend on; a state made under another fingerprint is refused."""
    relevant = spec.model_dump(
        mode="json", by_alias=True, include={"checkpoints", "merge", "objective", "search"}
    )
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _saved(paths: StatePaths) -> dict[str, Any] | None:
    return json.loads(paths.state.read_text()) if paths.state.exists() else None


def saved_under_other_spec(paths: StatePaths, spec: MergeSearchSpec) -> bool:
    """Whether a saved state exists and was made for another spec (or another version's
    defaults of it)."""
    data = _saved(paths)
    return data is not None and data.get("fingerprint") != spec_fingerprint(spec)


def load_state(paths: StatePaths, spec: MergeSearchSpec) -> engine.EngineState | None:
    data = _saved(paths)
    if data is None:
        return None
    if data.get("fingerprint") != spec_fingerprint(spec):
        raise LocalInputError(
            f"{paths.state} belongs to a search with a different spec; "
            "rerun with --fresh to start over, or use another --state-dir"
        )
    return engine.EngineState.from_json(json.dumps(data["engine"]))


def save_state(paths: StatePaths, spec: MergeSearchSpec, state: engine.EngineState) -> None:
    write_json_atomic(
        paths.state,
        {
            "version": STATE_VERSION,
            "fingerprint": spec_fingerprint(spec),
            "engine": json.loads(state.to_json()),
        },
    )


def record_of(candidate: engine.Candidate, result: TrialResult) -> TrialLogEntry:
    """A finished trial as the log keeps it, from the runner's result type."""
    common = {
        "id": candidate.id,
        "kind": candidate.kind,
        "generation": candidate.generation if candidate.generation is not None else -1,
        "weights": dict(candidate.weights),
        "subset": candidate.subset,
        "source": candidate.source,
    }
    if result.status != "succeeded":
        kind = result.error_kind.value if result.error_kind else None
        return TrialLogEntry(**common, status="failed", error=result.error, error_kind=kind)
    return TrialLogEntry(
        **common,
        status="succeeded",
        held_in=dict(result.held_in),
        held_out=dict(result.held_out),
        fitness=result.fitness,
        merge_s=result.timings.merge_s,
        evaluate_s=result.timings.evaluate_s,
        digest=result.digest,
        subtasks=dict(result.subtasks or {}),
    )


def result_of(record: TrialLogEntry) -> engine.Result:
    if record.status != "succeeded":
        return engine.Result(candidate_id=record.id, failed=True, reason=record.error)
    return engine.Result(candidate_id=record.id, scores=record.held_in)


@dataclass(frozen=True)
class FatalFailure:
    """A trial failed with a kind whose policy is fatal: every later trial would fail alike.

    The search stops at once and issues nothing more; the failed trial is not logged, so a
    rerun after the cause is fixed evaluates it again.
    """

    trial: str
    kind: FailureKind
    error: str

    @property
    def message(self) -> str:
        return f"trial {self.trial} failed ({self.kind.value}): {self.error}"


def fatal_failure(result: TrialResult, *, first_trials: bool = False) -> FatalFailure | None:
    """The fatal failure a trial result reveals, decided from its kind as the operator decides
    (`mergerunner.trial.failure_policy`: storage never reached before any success is fatal)."""
    kind = result.error_kind
    if result.status == "succeeded" or kind is None:
        return None
    if failure_policy(kind, first_trials=first_trials) is not FailurePolicy.FATAL:
        return None
    return FatalFailure(trial=result.id, kind=kind, error=result.error or kind.value)


class FinalEvaluationFailed(Exception):
    """The final evaluation of the chosen merge failed (after the retries its kind allows, as
    on a cluster): the search fails, as its resource would with `FinalizationFailed`."""

    def __init__(self, result: TrialResult) -> None:
        super().__init__(f"final evaluation failed: {result.summary}")
        self.result = result


Progress = Callable[[engine.EngineState, TrialLogEntry | None], None]


class LocalSearch:
    """The imperative shell around the engine for one manifest."""

    def __init__(
        self,
        manifest: MergeSearch,
        manifest_dir: Path,
        *,
        state_dir: Path,
        cache_dir: Path,
        fresh: bool = False,
        fresh_if_changed: bool = False,
        overwrite_output: bool = False,
    ) -> None:
        self.manifest = manifest
        self.spec = manifest.spec
        self.base = manifest_dir
        self.paths = StatePaths(state_dir)
        self.cache_dir = cache_dir
        self.config = engine_config(self.spec, source="manifest")
        if fresh or (fresh_if_changed and saved_under_other_spec(self.paths, self.spec)):
            exported = self._recorded_export()
            for path in (self.paths.state, self.paths.trials, self.paths.final):
                path.unlink(missing_ok=True)
            if exported:  # starting over forgets the trials, not which model this search wrote
                write_json_atomic(self.paths.final, {"output": exported})
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.state = load_state(self.paths, self.spec) or engine.init(self.config)
        self.records = {r.id: r for r in read_records(self.paths.trials)}
        self.dirs: list[Path] = []
        self.evaluator: Any = None
        self.fatal: FatalFailure | None = None
        self.destination: str | None = None  # what spec.output.uri holds: "empty" or "model"
        self.overwrite_output = overwrite_output
        self.sleep: Callable[[float], None] = time.sleep  # the wait before a retry

    @property
    def output_uri(self) -> str:
        """spec.output.uri, a relative path resolved against the manifest's directory."""
        return resolve_location(self.spec.output.uri or "", self.base)

    def own_export(self) -> dict[str, Any] | None:
        """This search's earlier export to spec.output.uri ({uri, digest}), if final.json
        records one: the one model at the destination that a rerun may replace unasked."""
        output = self._recorded_export()
        return output if output and output.get("uri") == self.output_uri else None

    def _recorded_export(self) -> dict[str, Any] | None:
        if not self.paths.final.exists():
            return None
        return json.loads(self.paths.final.read_text()).get("output") or None

    def trials_done(self) -> int:
        return engine.trials_told(self.state)

    def trials_planned(self) -> int | None:
        return engine.planned_trials(self.state)

    # -- preflight -------------------------------------------------------------------------
    def custom_tasks_dir(self) -> Path | None:
        custom = self.spec.objective.custom_tasks
        if custom is None:
            return None
        if custom.path is None:
            raise LocalInputError(
                "spec.objective.customTasks.configMapRef works on a cluster only; "
                "locally, use customTasks.path"
            )
        return Path(resolve_location(custom.path, self.base))

    def check_output(self) -> None:
        """spec.output.uri, before any work: usable, and not another model to overwrite.

        A model there that this search did not export (final.json records its own exports)
        is replaced only with --overwrite-output: an earlier export is never replaced
        silently.
        """
        from mergerunner.fetch import FetchError, check_destination

        if not self.spec.output.uri:
            return
        try:
            self.destination = check_destination(self.output_uri)
        except FetchError as exc:
            raise LocalInputError(f"spec.output.uri: {exc}") from None
        if self.destination == "model" and not (self.own_export() or self.overwrite_output):
            raise LocalInputError(
                f"spec.output.uri: {self.output_uri} already holds a model that this search "
                "did not export; choose another destination, remove that model, or pass "
                "--overwrite-output to replace it"
            )

    def prepare(self) -> None:
        """Fetch and check everything before the first trial, so bad input fails fast."""
        from mergerunner.bundle import BundleError
        from mergerunner.checkpoint import CheckpointError, validate_checkpoints
        from mergerunner.evaluate import EvaluationError
        from mergerunner.fetch import FetchError, fetch_checkpoint
        from mergerunner.resident import ResidentEvaluator

        self.check_headers()
        self.check_output()
        dirs = []
        for ref in self.spec.checkpoints:
            try:
                dirs.append(fetch_checkpoint(resolve_location(ref.uri, self.base), self.cache_dir))
            except FetchError as exc:
                raise LocalInputError(f"checkpoint {ref.name!r}: {exc}") from None
        try:
            validate_checkpoints(dirs)
        except CheckpointError as exc:
            raise LocalInputError(f"checkpoints cannot be merged: {exc}") from None
        self.dirs = dirs
        objective = self.spec.objective
        bundle = self.data_bundle()
        try:
            self.evaluator = ResidentEvaluator(
                dirs,
                held_in=objective.held_in,
                held_out=objective.held_out,
                evaluator=objective.evaluator,
                custom_tasks_dir=self.custom_tasks_dir(),
                dtype=self.spec.merge.dtype,
                confirm=self.config.confirm_top_k > 0,
                bundle=bundle,
                allow_code_execution=objective.allow_code_execution,
            )
        except (EvaluationError, BundleError) as exc:
            raise LocalInputError(str(exc)) from None

    def check_headers(self) -> None:
        """Checkpoints that cannot be merged are found from their headers (ranged reads),
        before a byte of weights is downloaded."""
        from mergerunner.checkpoint import CheckpointError
        from mergerunner.fetch import FetchError
        from mergerunner.preflight import check_checkpoints
        from mergerunner.storage import parse_uri

        uris = [resolve_location(ref.uri, self.base) for ref in self.spec.checkpoints]
        names = {
            parse_uri(u).uri: ref.name for u, ref in zip(uris, self.spec.checkpoints, strict=True)
        }
        try:
            check_checkpoints(uris)
        except FetchError as exc:
            raise LocalInputError(f"checkpoint {names.get(exc.uri, exc.uri)!r}: {exc}") from None
        except CheckpointError as exc:
            raise LocalInputError(f"checkpoints cannot be merged: {exc}") from None

    def data_bundle(self) -> Path | None:
        """spec.objective.datasets fetched into the cache (a local path is used in place)."""
        from mergerunner.fetch import FetchError
        from mergerunner.run import fetch_bundle

        datasets = self.spec.objective.datasets
        if datasets is None:
            return None
        try:
            return fetch_bundle(resolve_location(datasets.uri, self.base), self.cache_dir)
        except FetchError as exc:
            raise LocalInputError(f"spec.objective.datasets.uri: {exc}") from None

    # -- the loop --------------------------------------------------------------------------
    def evaluate(self, candidate: engine.Candidate) -> TrialResult:
        """One candidate, as the runner reports a trial: a failure is data, never raised. A
        failure whose kind is an outage runs again after a backoff, as on a cluster."""
        weights = [candidate.weights[name] for name in self.config.checkpoints]
        return self._run_trial(
            candidate.id,
            weights,
            with_held_out=candidate.kind == "baseline" and candidate.subset == "search",
            subset=candidate.subset,
        )

    def _run_trial(self, trial_id: str, weights: list[float], **options: Any) -> TrialResult:
        """`evaluator.trial`, run again while `runs_again` says so (the operator's schedule:
        outages RETRY_LIMIT times; the final evaluation also after a counted failure)."""
        first = self.state.trials.succeeded == 0
        finalization = trial_id == FINALIZATION_TRIAL
        attempt = 0
        while True:
            result = self.evaluator.trial(trial_id, weights, **options)
            attempt += 1
            if result.status == "succeeded":
                return result
            kind = result.error_kind
            log.warning("trial %s failed (%s): %s", trial_id, kind, result.error)
            if not runs_again(
                kind, attempt, first_trials=first and not finalization, finalization=finalization
            ):
                return result
            wait = backoff_s(attempt)
            log.warning("trial %s runs again in %.0f s (attempt %d)", trial_id, wait, attempt + 1)
            self.sleep(wait)

    def run(self, progress: Progress | None = None) -> engine.EngineState:
        """Evaluate candidates until the engine is done or a trial fails fatally.

        The engine is asked again after every result, never for a whole generation at once:
        once a result finishes the search (too many failures, the target reached), nothing
        more is evaluated.
        """
        while self.fatal is None and not engine.done(self.state)[0]:
            self.state, candidates = engine.ask(self.state, 1)
            if not candidates:
                break
            candidate = candidates[0]
            record = self.records.get(candidate.id)
            if record is None:
                result = self.evaluate(candidate)
                first = self.state.trials.succeeded == 0
                self.fatal = fatal_failure(result, first_trials=first)
                if self.fatal is not None:
                    break
                record = record_of(candidate, result)
                append_record(self.paths.trials, record)
                self.records[record.id] = record
            self.state = engine.tell(self.state, [result_of(record)])
            save_state(self.paths, self.spec, self.state)
            if progress:
                progress(self.state, record)
        return self.state

    # -- the end ---------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Held-out scores of the chosen merge (the confirmed winner, else the search's best),
        and its export to spec.output.uri."""
        best = engine.chosen(engine.status(self.state))
        if best is None:
            return {}
        final: dict[str, Any] = {}
        if self.paths.final.exists():
            final = json.loads(self.paths.final.read_text())
        if final.get("best") != best["id"]:
            weights = [best["weights"][n] for n in self.config.checkpoints]
            result = self._run_trial(FINALIZATION_TRIAL, weights, with_held_out=True)
            if result.status != "succeeded":
                raise FinalEvaluationFailed(result)
            final = {"best": best["id"], "heldOut": result.held_out, "digest": result.digest}
            write_json_atomic(self.paths.final, final)
        uri = self.spec.output.uri
        if uri and final.get("output", {}).get("uri") != self.output_uri:
            final["output"] = self.export(best["weights"], self.output_uri)
            write_json_atomic(self.paths.final, final)
        return final

    def export(self, weights: dict[str, float], uri: str) -> dict[str, Any]:
        from mergerunner.fetch import upload_directory
        from mergerunner.merge import merge_to_directory

        vector = [weights[n] for n in self.config.checkpoints]
        dtype = self.spec.merge.dtype
        if "://" not in uri or uri.startswith("file://"):
            target = Path(uri.removeprefix("file://"))
            staging = target.with_name(f".{target.name}.new")
            shutil.rmtree(staging, ignore_errors=True)
            report = merge_to_directory(self.dirs, vector, staging, dtype=dtype)
            replace_model_dir(staging, target)
            return {"uri": uri, "digest": report.digest}
        with tempfile.TemporaryDirectory(prefix="mergesearch-export-") as tmp:
            report = merge_to_directory(self.dirs, vector, Path(tmp) / "model", dtype=dtype)
            upload_directory(Path(tmp) / "model", uri)
        return {"uri": uri, "digest": report.digest}


def replace_model_dir(new: Path, target: Path) -> None:
    """Put a freshly merged model at `target`, replacing an earlier export but nothing else."""
    if target.exists() and any(target.iterdir()):
        if not any((target / f).exists() for f in MODEL_FILES):
            raise LocalInputError(f"spec.output.uri: {target} exists and is not a model directory")
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
        return
    if target.exists():
        target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    new.rename(target)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """lm-eval and transformers log per call; hundreds of trials would bury the progress bar.

    What libraries print goes to stderr too: stdout carries the results table alone.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-call progress bars
    names = ["lm_eval", "lm-eval", "transformers", "datasets", "accelerate", "httpx"]
    saved = {n: logging.getLogger(n).level for n in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
