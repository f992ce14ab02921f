"""`mergerunner evaluator`: a warm evaluator, many trials in one pod (spec.execution.mode: warm).

A trial pod (`mergerunner run`) fetches every checkpoint, merges to disk, loads the merge and
builds the task suite, for ONE candidate. An evaluator does that work once and then, for each
candidate it leases from the operator, merges into the resident model in place and scores it:

- the checkpoints are fetched once into the cache directory (on a cluster, a node-local
  directory shared by the search's evaluators on that node when the operator is configured
  with one: the fetch cache's file locks make a second evaluator wait for the first and then
  fetch 0 bytes);
- their tensors stay in host memory (`ResidentMerger`, pinned when the model is on GPUs, each
  tensor merged on its module's device), one model object stays loaded over the pod's GPUs
  (the trial's placement), in the trial's dtype, the task suite is built once;
- each candidate is merged in place and scored; the result carries the same content digest a
  trial Job's merge to disk has, bit for bit (tests/integration/test_evaluator.py), and the
  same scores, since the model scored is the same bytes.

The loop holds no Kubernetes credentials: it POSTs to the operator's lease endpoint with the
search's bearer token (a Secret the operator mounts), sending its previous result with each
request for the next candidate (one round trip and, usually, one status write per trial).
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergerunner.analytic import run_analytic
from mergerunner.contract import ExitCode
from mergerunner.run import (
    StepFailed,
    _Clock,
    failed_result,
    fetch_bundle,
    run_trial,
    scored_result,
    task_suite,
)
from mergerunner.trial import ANALYTIC_BACKEND, TrialDocument, TrialResult, parse_trial

log = logging.getLogger(__name__)
EXIT_DONE, EXIT_CONFIG = ExitCode.OK, ExitCode.BAD_INPUT
# The operator holds a request up to ~20 s when it has no candidate (the generation's last
# results are still being scored); the client waits a little longer than that.
REQUEST_TIMEOUT_S = 60.0
AUTH_FAILURES_TOLERATED = 5


def setup_key(doc: TrialDocument) -> str:
    """What the resident state depends on: everything in a document but its id, weights and
    output. Documents of one search share it, so the state is built once."""
    wire = doc.to_wire()
    for key in ("id", "weights", "output"):
        wire.pop(key, None)
    return json.dumps(wire, sort_keys=True)


@dataclass
class WarmTrials:
    """Runs trial documents of one search, keeping what does not change between them."""

    cache_dir: Path
    work_dir: Path | None = None
    bytes_fetched: int = 0
    trials: int = 0
    # The last in-place merge's CPU seconds (this process): on a shared machine a wall time
    # moves with the load, the CPU time of a one-thread merge much less (bench/trial_overhead).
    merge_cpu_s: float = 0.0
    _key: str | None = None
    _state: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self._key is not None

    def run(self, doc: TrialDocument, now: Callable[[], float] = time.perf_counter) -> TrialResult:
        """The trial's result, as `run_trial` would report it; never raises for a step."""
        self.trials += 1
        if doc.evaluator.backend == ANALYTIC_BACKEND:
            return run_analytic(doc)
        if doc.output.save_model:  # an export: the disk path of a trial Job
            return run_trial(doc, cache_dir=self.cache_dir, work_dir=self.work_dir)
        clock = _Clock()
        start = now()
        try:
            if setup_key(doc) != self._key:
                self._setup(doc, clock)
            state = self._state
            with clock.step("merge"):
                cpu = time.process_time()
                digest = state["merger"].merge_into(
                    state["model"], doc.weight_vector(), dtype=doc.dtype
                )
                self.merge_cpu_s = time.process_time() - cpu
            with clock.step("evaluate"):
                scores = state["suite"].score(state["lm"])
        except StepFailed as failure:
            log.error("trial %s failed in step %s: %s", doc.id, failure.step, failure.cause)
            if failure.step == "fetch" or self._key is None:
                self._key, self._state = None, {}
            return failed_result(doc.id, failure, clock.timings(now() - start))
        return scored_result(doc, scores, digest=digest, timings=clock.timings(now() - start))

    def _setup(self, doc: TrialDocument, clock: _Clock) -> None:
        """Fetch the checkpoints (once), hold their tensors, load one model in the trial's
        dtype (as a trial Job loads its merge: the same bytes are scored), build the suite."""
        from transformers import AutoTokenizer

        from mergerunner.devices import load_placed, model_config, plan_for, visible_devices
        from mergerunner.evaluate import compute_dtype, make_lm
        from mergerunner.fetch import _run, fetch_checkpoints_async
        from mergerunner.placement import layout_of_merge
        from mergerunner.resident_merge import ResidentMerger

        self._key, self._state = None, {}
        with clock.step("fetch"):
            uris = [c.uri for c in doc.checkpoints]
            fetched = _run(fetch_checkpoints_async(uris, self.cache_dir))
            self.bytes_fetched += sum(r.bytes_downloaded for r in fetched)
            dirs = [r.path for r in fetched]
        with clock.step("merge"):
            gpus, _ = visible_devices(doc.evaluator)
            merger = ResidentMerger(dirs, pin_memory=bool(gpus))
        with clock.step("evaluate"):
            trust = doc.evaluator.trust_remote_code
            # Placed over every GPU of the pod and computing in the dtype a trial Job uses.
            dtype = compute_dtype(doc.dtype, "cuda" if gpus else "cpu")
            layout = layout_of_merge(merger.plan, dtype)
            placement = plan_for(layout, model_config(dirs[0]), doc.evaluator, dtype)
            model = load_placed(dirs[0], placement, dtype, trust=trust)
            tokenizer = AutoTokenizer.from_pretrained(dirs[0], trust_remote_code=trust)
            bundle = fetch_bundle(doc.datasets_uri, self.cache_dir) if doc.datasets_uri else None
            suite = task_suite(doc, bundle)
            lm = make_lm(model, tokenizer, doc.evaluator, device=placement.devices[0])
        self._state = {"merger": merger, "model": model, "suite": suite, "lm": lm}
        self._key = setup_key(doc)


# --------------------------------------------------------------------------- the lease loop

Post = Callable[[str, str, Mapping[str, Any]], tuple[int, dict[str, Any]]]


def http_post(url: str, token: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST JSON with the bearer token; (status, JSON answer). Raises OSError when the
    endpoint cannot be reached (the operator restarting, say)."""
    request = urllib.request.Request(  # noqa: S310 - the operator's http(s) URL
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            answer = json.loads(error.read() or b"{}")
        except json.JSONDecodeError:
            answer = {}
        return error.code, answer if isinstance(answer, dict) else {}


def _rejected(candidate: str, text: str, exc: Exception) -> dict[str, Any]:
    """A leased document this runner cannot read: reported as a bad input, as `run` would."""
    doc_id = "?"
    with contextlib.suppress(ValueError, AttributeError):
        doc_id = str(json.loads(text).get("id", "?"))
    return {"candidate": candidate, "result": TrialResult.rejected(str(exc), doc_id).to_wire()}


def serve(
    url: str,
    name: str,
    token: str,
    trials: WarmTrials,
    *,
    post: Post = http_post,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Lease, run, post, until the operator says the search is done (exit 0). Unreachable
    endpoints are retried with backoff, keeping the unposted result; a token refused several
    times in a row is a configuration error (exit 2: the Job fails at once)."""
    pending: dict[str, Any] | None = None
    backoff, refused = 1.0, 0
    while True:
        body: dict[str, Any] = {
            "evaluator": name,
            "stats": {"bytesFetched": trials.bytes_fetched, "ready": trials.ready},
        }
        if pending is not None:
            body["posted"] = pending
        try:
            status, answer = post(url, token, body)
        except OSError as exc:
            log.warning("evaluator endpoint unreachable (%s); retrying in %.0fs", exc, backoff)
            sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            continue
        backoff = 1.0
        if status in (401, 403, 404):
            refused += 1
            log.error("the evaluator endpoint refused us (%d): %s", status, answer)
            if refused >= AUTH_FAILURES_TOLERATED:
                return EXIT_CONFIG
            sleep(2.0)
            continue
        if status != 200:
            log.warning("evaluator endpoint answered %d; retrying", status)
            sleep(1.0)
            continue
        refused, pending = 0, None
        if answer.get("done"):
            return EXIT_DONE
        lease = answer.get("lease")
        if not isinstance(lease, dict):
            continue  # nothing to do yet: ask again (the operator holds the request)
        candidate, text = str(lease.get("candidate")), str(lease.get("trial"))
        try:
            doc = parse_trial(text)
        except (ValueError, ValidationError) as exc:
            pending = _rejected(candidate, text, exc)
            continue
        leased_at = time.time()
        result = trials.run(doc)
        pending = {"candidate": candidate, "result": result.to_wire()}
        log.info("trial %s", json.dumps(trial_record(doc.id, leased_at, result, trials)))


def trial_record(
    trial_id: str, leased_at: float, result: TrialResult, trials: WarmTrials
) -> dict[str, Any]:
    """One log line per trial (`MERGERUNNER_LOG_LEVEL=INFO`): when it was leased and done,
    the step timings, the merge's CPU time, the bytes this evaluator has fetched so far and
    its peak resident set (the checkpoints it holds plus the model: what a pod's memory
    request must cover)."""
    return {
        "trial": trial_id,
        "status": result.status,
        "leasedAt": round(leased_at, 4),
        "doneAt": round(time.time(), 4),
        "timings": result.timings.to_wire(),
        "mergeCpuS": round(trials.merge_cpu_s, 4),
        "bytesFetched": trials.bytes_fetched,
        "peakRssBytes": peak_rss_bytes(),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux's ru_maxrss is in kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
