"""Reading Jobs, pods and termination messages back (data only, never code)."""

from __future__ import annotations

import json

import pytest

from mergerunner.trial import TrialResult
from mergesearch.operator import jobs as jobspec
from mergesearch.operator.observe import (
    JobSummary,
    PodSummary,
    job_summary,
    outcome_of,
    parse_result,
    pod_summary,
)

pytestmark = pytest.mark.unit


def result(**fields: object) -> str:
    base = {"id": "job-1", "status": "succeeded", "held_in": {"t": 0.5}, "fitness": 0.5}
    return TrialResult(**{**base, **fields}).termination_message()


def test_job_summary_reads_state_owner_and_candidate() -> None:
    body = {
        "metadata": {
            "name": "job-1",
            "annotations": {jobspec.ANNOTATION_CANDIDATE: "g001-c02"},
            "labels": {jobspec.LABEL_ROLE: "trial"},
            "ownerReferences": [{"uid": "u1", "controller": True}],
        },
        "status": {
            "conditions": [
                {"type": "FailureTarget", "status": "True"},
                {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"},
            ]
        },
    }
    summary = job_summary(body)
    assert summary == JobSummary(
        "job-1", "u1", "g001-c02", "trial", "failed", True, "DeadlineExceeded", False
    )
    body["status"] = {"ready": 1, "active": 1}
    running = job_summary(body)
    assert running is not None and running.state == "active" and running.started
    assert job_summary({"metadata": {"name": "other"}}) is None


def test_pod_summary_only_once_the_runner_terminated() -> None:
    pod = {
        "metadata": {"name": "job-1-xyz", "labels": {"batch.kubernetes.io/job-name": "job-1"}},
        "status": {"containerStatuses": [{"name": "runner", "state": {"running": {}}}]},
    }
    assert pod_summary(pod) is None
    pod["status"]["containerStatuses"][0]["state"] = {
        "terminated": {"exitCode": 0, "message": "{}", "finishedAt": "t"}
    }
    assert pod_summary(pod) == PodSummary("job-1-xyz", "job-1", 0, None, "{}", "t")


def test_pods_that_do_not_start_say_why_and_belong_to_one_job() -> None:
    labels = {"batch.kubernetes.io/job-name": "job-1", "batch.kubernetes.io/controller-uid": "j1"}
    pod = {
        "metadata": {"name": "job-1-xyz", "labels": labels, "creationTimestamp": "t0"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "runner",
                    "state": {"waiting": {"reason": "CreateContainerConfigError", "message": "m"}},
                }
            ],
        },
    }
    summary = pod_summary(pod)
    assert summary is not None and not summary.terminated
    assert (summary.waiting, summary.message, summary.created) == (
        "CreateContainerConfigError",
        "m",
        "t0",
    )
    job = JobSummary("job-1", "u1", "g000-c00", "trial", "active", uid="j1")
    assert summary.of(job) and not summary.of(
        JobSummary("job-1", "u1", "g", "trial", "active", uid="j2")
    )
    pod["metadata"]["deletionTimestamp"] = "t1"  # going: nothing to decide from any more
    assert pod_summary(pod) is None
    unscheduled = {
        "metadata": {"name": "job-1-abc", "labels": labels},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/1",
                }
            ],
        },
    }
    assert pod_summary(unscheduled).waiting == "Unschedulable"


def test_parse_result_accepts_results_and_refuses_everything_else() -> None:
    ok, problem = parse_result(result(), "job-1")
    assert ok is not None and ok.held_in == {"t": 0.5} and problem is None
    newer = json.loads(result())
    newer["someFutureField"] = [1, 2]
    assert parse_result(json.dumps(newer), "job-1")[0] is not None  # added fields are fine
    assert parse_result(result(), "job-2")[1] == "result is for trial 'job-1', not 'job-2'"
    assert "not JSON" in parse_result("Traceback (most recent call last)", "job-1")[1]
    assert "apiVersion" in parse_result('{"apiVersion": "v9"}', "job-1")[1]
    assert parse_result("", "job-1")[1] == "no result in the termination message"
    assert parse_result('["x"]', "job-1")[1] == "termination message is not a JSON object"


def test_outcomes() -> None:
    done = JobSummary("job-1", "u", "g000-c00", "trial", "succeeded")
    good = PodSummary("p", "job-1", 0, None, result(), "t2")
    outcome = outcome_of(done, [good])
    assert outcome is not None and outcome.succeeded and outcome.result.held_in == {"t": 0.5}
    garbled = outcome_of(done, [PodSummary("p", "job-1", 0, None, "oops", "t")])
    assert garbled is not None and not garbled.succeeded and "not JSON" in garbled.reason
    assert outcome_of(done, []).reason == "no terminated pod found for the Job"
    failed = JobSummary("job-1", "u", "g000-c00", "trial", "failed", reason="BackoffLimitExceeded")
    step = PodSummary(
        "p",
        "job-1",
        1,
        "Error",
        result(status="failed", failed_step="merge", error="boom", held_in={}, fitness=None),
        "t",
    )
    out = outcome_of(failed, [step])
    assert out is not None and out.result.failed_step == "merge" and out.reason == "merge: boom"
    active = JobSummary("job-1", "u", "g000-c00", "trial", "active")
    assert outcome_of(active, [good]) is None


def test_parse_result_reads_a_packed_termination_message() -> None:
    """84 held-in scores do not fit 4 KiB as JSON: the runner packs them, the operator reads
    every score back."""
    scores = {f"mmlu_high_school_subject_{i:02d}": i / 83 for i in range(84)}
    full = TrialResult(id="job-1", status="succeeded", held_in=scores, fitness=0.5)
    message = full.termination_message()
    assert "packed" in json.loads(message) and len(message) <= 4000
    parsed, problem = parse_result(message, "job-1")
    assert problem is None and parsed is not None
    assert parsed.held_in == scores and parsed.fitness == 0.5 and parsed.truncated
    broken = json.dumps({**json.loads(message), "packed": "not base64!"})
    assert "packed result cannot be read" in (parse_result(broken, "job-1")[1] or "")
