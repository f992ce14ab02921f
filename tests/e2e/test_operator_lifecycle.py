"""The operator's life-cycle guarantees, on the real control plane, with instant trials.

The operator runs as its own process with the RBAC ServiceAccount's credentials; trials run
on the benchmarking objective (the operator started with `ANALYTIC_TRIALS`,
docs/trial-contract.md), so a whole search takes seconds and its result is a pure function of
the spec and the seed. That makes "the same result as an uninterrupted run" an exact
comparison: suspending, SIGKILLing the operator mid-generation or failing a trial must not
change which candidates are asked, evaluate one twice, or lose one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from support.cluster import ApiError, KubeCluster
from support.nodeagent import NodeAgent
from support.operator_proc import (
    ANALYTIC_TRIALS,
    OperatorFactory,
    Searches,
    operator_factory,
    running_operator,
)
from support.polling import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]
__all__ = ["operator_factory"]  # the fixture, imported so that pytest finds it here

POPULATION, GENERATIONS, CHECKPOINTS = 4, 3, ("alpha", "beta", "gamma")
BASELINES = len(CHECKPOINTS) + 2  # each checkpoint, uniform, merge-best
FAILING_CANDIDATE = "g000-c01"
LIMIT = 8  # examples per task: the analytic objective reads none, confirmation needs a limit


def analytic_spec(**execution: Any) -> dict[str, Any]:
    """Three checkpoints that are never fetched (analytic trials), two tasks, 17 trials."""
    return {
        "checkpoints": [{"name": n, "uri": f"s3://unused/{n}/"} for n in CHECKPOINTS],
        "objective": {
            "heldIn": [
                {"task": "task-one", "limit": LIMIT},
                {"task": "task-two", "weight": 2, "limit": LIMIT},
            ],
        },
        "search": {"populationSize": POPULATION, "maxGenerations": GENERATIONS, "seed": 11},
        "execution": {"parallelism": 4, **execution},
    }


def new_namespace(cluster: KubeCluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(name)
    return name


def result_of(status: dict[str, Any]) -> dict[str, Any]:
    """What must not depend on how the search was run: the best trial, the per-generation
    history, the final distribution's mean, the finalists' confirmation and the winner."""
    return {
        "best": {k: status["best"][k] for k in ("trial", "fitness", "weights", "scores")},
        "confirmation": status["confirmation"],
        "winner": status["winner"],
        "history": status["history"],
        "mean": status["search"]["meanWeights"],
        "sigma": status["search"]["sigma"],
    }


def pods_per_job(searches: Searches) -> Counter[str]:
    """How many pods the Job controller created per Job name, over the Jobs' whole lives
    (collected Jobs are deleted, their events stay); a Job name seen with two uids (deleted
    and created again) counts as a duplicate too."""
    per_job: Counter[str] = Counter()
    uids: dict[str, set[str]] = {}
    for event in searches.job_events():
        obj = event["involvedObject"]
        per_job[obj["name"]] += int(event.get("count") or 1)
        uids.setdefault(obj["name"], set()).add(obj["uid"])
    twice = {name for name, ids in uids.items() if len(ids) > 1}
    assert not twice, f"Jobs created more than once: {sorted(twice)}"
    return per_job


def assert_each_trial_ran_once(searches: Searches, expected: int) -> None:
    per_job = wait_for(
        lambda: (c := pods_per_job(searches)) and sum(c.values()) >= expected and c,
        30,
        f"{expected} pod-creation events",
    )
    assert len(per_job) == expected, sorted(per_job)
    assert set(per_job.values()) == {1}, {k: v for k, v in per_job.items() if v != 1}


def trials_run(status: dict[str, Any]) -> int:
    """Every search slot, plus the baselines that ran (merge-best is not run again when it is
    the same merge as one checkpoint alone, `sameAs`), plus the confirmation of the best five
    search trials and of every baseline that ran."""
    ran = [b for b in status["baselines"] if not b.get("sameAs")]
    assert len(status["confirmation"]) == 5 + len(ran)
    return 2 * len(ran) + POPULATION * GENERATIONS + 5


def assert_counts_exact(status: dict[str, Any], succeeded: int, failed: int = 0) -> None:
    trials = status["trials"]
    assert trials["running"] == 0
    assert trials["succeeded"] == succeeded and trials["failed"] == failed
    assert trials["total"] == trials["succeeded"] + trials["failed"] + trials["running"]


@pytest.fixture(scope="module")
def reference(k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent) -> dict[str, Any]:
    """An uninterrupted run of `analytic_spec()`, with an operator of its own."""
    namespace = new_namespace(k8s_cluster, "ref")
    searches = Searches(k8s_cluster, namespace)
    with running_operator(k8s_cluster, [namespace], env=ANALYTIC_TRIALS):
        searches.create("ref", analytic_spec())
        status = searches.wait_phase("ref", ["Succeeded", "Failed"], 180)
    assert status["phase"] == "Succeeded", status.get("conditions")
    assert_counts_exact(status, trials_run(status))
    assert_each_trial_ran_once(searches, trials_run(status))
    return status


def test_reference_search_beats_its_baselines(reference: dict[str, Any]) -> None:
    """Baselines are trials too: the best is at least as good as each, and the analytic
    objective's optimum is inside the simplex, so the search strictly beats them."""
    baselines = [b for b in reference["baselines"] if b.get("fitness") is not None]
    assert len(baselines) == BASELINES
    assert all(reference["best"]["fitness"] > b["fitness"] for b in baselines)
    assert reference["best"]["kind"] == "search"
    assert abs(sum(reference["best"]["weights"].values()) - 1) < 1e-9
    assert reference["activeTrials"] == []
    conditions = {c["type"]: c for c in reference["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Failed"]["status"] == "False"


def test_sigkill_mid_generation_changes_nothing(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    operator_factory: OperatorFactory,
    reference: dict[str, Any],
) -> None:
    """SIGKILL the operator four times (baselines, generation 0 and 1, the confirmation in
    flight), restart it: the same final weights, fitness, history, confirmation and winner as
    the uninterrupted run, each candidate's Job created once with one pod, no trial lost."""
    namespace = new_namespace(k8s_cluster, "kill")
    searches = Searches(k8s_cluster, namespace)
    operator = operator_factory([namespace], env=ANALYTIC_TRIALS)
    searches.create("crash", analytic_spec())
    kills = 0
    searched = trials_run(reference) - len(reference["confirmation"])
    for finished in (3, 8, 12, searched + 2):
        wait_for(
            lambda n=finished: (
                (searches.status("crash").get("trials") or {}).get("finished", 0) >= n
            ),
            120,
            f"{finished} finished trials",
            interval_s=0.1,
        )
        operator.kill()
        kills += 1
        status = searches.status("crash")
        assert status["phase"] == "Running", "killed too late to test anything"
        operator.start()
    status = searches.wait_phase("crash", ["Succeeded", "Failed"], 180)
    assert status["phase"] == "Succeeded", status.get("conditions")
    assert kills == 4 and operator.starts == 5
    assert result_of(status) == result_of(reference)
    assert_counts_exact(status, trials_run(reference))
    assert_each_trial_ran_once(searches, trials_run(reference))


def test_suspend_stops_launching_and_resume_finishes_the_same(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    operator_factory: OperatorFactory,
    reference: dict[str, Any],
) -> None:
    namespace = new_namespace(k8s_cluster, "susp")
    searches = Searches(k8s_cluster, namespace)
    operator_factory([namespace], env=ANALYTIC_TRIALS)
    searches.create("pause", analytic_spec(parallelism=2))
    wait_for(
        lambda: (searches.status("pause").get("trials") or {}).get("finished", 0) >= 4,
        120,
        "4 finished trials",
        interval_s=0.1,
    )
    searches.patch_spec("pause", {"suspend": True})
    suspended = wait_for(
        lambda: (
            (s := searches.status("pause")).get("phase") == "Suspended"
            and not s.get("activeTrials")
            and s
        ),
        60,
        "Suspended with no active trial",
    )
    created = sum(pods_per_job(searches).values())
    progressing = {c["type"]: c for c in suspended["conditions"]}["Progressing"]
    assert progressing["status"] == "False" and progressing["reason"] == "Suspended"
    assert suspended["trials"]["finished"] < trials_run(reference)
    time.sleep(3)  # three seconds of quiet: a suspended search launches nothing
    assert sum(pods_per_job(searches).values()) == created
    assert searches.status("pause")["trials"] == suspended["trials"]

    searches.patch_spec("pause", {"suspend": False})
    status = searches.wait_phase("pause", ["Succeeded", "Failed"], 180)
    assert status["phase"] == "Succeeded", status.get("conditions")
    assert result_of(status) == result_of(reference)
    assert_counts_exact(status, trials_run(reference))
    assert_each_trial_ran_once(searches, trials_run(reference))


CRASHING_RUNNER = Path(__file__).resolve().parents[1] / "support" / "crashing_runner.py"


def test_failed_trial_is_penalised_and_deletion_collects_everything(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    operator_factory: OperatorFactory,
) -> None:
    """One trial's pod crashes: the search goes on (penalize), the failure is counted and
    named, the failed Job is kept for `kubectl logs`, the counts add up; deleting the
    MergeSearch then garbage-collects its Jobs and pods."""
    namespace = new_namespace(k8s_cluster, "fail")
    searches = Searches(k8s_cluster, namespace)
    operator_factory(
        [namespace],
        env={
            "MERGESEARCH_RUNNER_COMMAND": f"python {CRASHING_RUNNER} {FAILING_CANDIDATE}",
            **ANALYTIC_TRIALS,
        },
    )
    spec = analytic_spec(backoffLimit=0)
    spec["search"]["failurePolicy"] = "penalize"
    searches.create("flaky", spec)
    status = searches.wait_phase("flaky", ["Succeeded", "Failed"], 180)
    assert status["phase"] == "Succeeded", status.get("conditions")
    assert_counts_exact(status, trials_run(status) - 1, failed=1)
    assert [f["id"] for f in status["recentFailures"]] == [FAILING_CANDIDATE]
    generation0 = next(h for h in status["history"] if h["generation"] == 0)
    assert (generation0["succeeded"], generation0["failed"]) == (POPULATION - 1, 1)
    assert_each_trial_ran_once(searches, trials_run(status))
    kept = searches.jobs("flaky")
    assert [j["metadata"]["annotations"]["mergesearch.io/candidate-id"] for j in kept] == [
        FAILING_CANDIDATE
    ]
    assert kept[0]["status"].get("failed") == 1

    searches.delete("flaky")

    def gone() -> bool:
        try:
            searches.get("flaky")
            return False
        except ApiError as err:
            return err.status == 404

    wait_for(gone, 60, "the MergeSearch to be deleted (the operator's finalizer released)")
    wait_for(lambda: not searches.jobs() and not searches.pods(), 60, "Jobs and pods collected")


def test_deleting_a_running_search_collects_running_trials(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, operator_factory: OperatorFactory
) -> None:
    namespace = new_namespace(k8s_cluster, "del")
    searches = Searches(k8s_cluster, namespace)
    operator = operator_factory([namespace], env=ANALYTIC_TRIALS)
    searches.create("doomed", analytic_spec())
    wait_for(lambda: searches.jobs("doomed"), 60, "the first trial Jobs")
    searches.delete("doomed")
    wait_for(lambda: not searches.jobs() and not searches.pods(), 60, "Jobs and pods collected")
    with pytest.raises(ApiError) as err:
        searches.get("doomed")
    assert err.value.status == 404
    assert operator.alive()
    assert not operator.log_lines("Traceback"), json.dumps(operator.logs()[-3000:])
