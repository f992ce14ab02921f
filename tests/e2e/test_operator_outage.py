"""An object-store outage in the middle of a real search, and another during its final
evaluation: neither may cost the search (docs/operator.md, "Failures that wait").

Its own SeaweedFS (the session's is shared with other tests), toy checkpoints in it, the real
runner in every trial pod. The store is stopped for 75 s once some trials have succeeded, and
again as soon as the final evaluation starts; each time it comes back on the same address.
Trials that failed because the store could not be reached are run again after a backoff and
never counted as failures; the search shows `StorageUnavailable` while it waits and ends
Succeeded with its export, by itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_operator_search import CHECKPOINTS, HELD_IN, HELD_OUT, spec

from support.cluster import KubeCluster
from support.nodeagent import NodeAgent
from support.operator_proc import Searches, running_operator
from support.polling import wait_for
from support.s3server import SeaweedS3
from support.search_inputs import portable_tasks, search_namespace, upload_checkpoints

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1200)]

OUTAGE_S = 75.0


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with SeaweedS3(tmp_path_factory.mktemp("outage-s3")) as server:
        yield server


def test_outages_mid_search_and_during_finalization_cost_nothing(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    store: SeaweedS3,
    toy_pool: Any,
) -> None:
    bucket = store.create_bucket()
    uris = upload_checkpoints(store, bucket, {n: toy_pool.checkpoints[n] for n in CHECKPOINTS})
    tasks = portable_tasks(toy_pool.tasks_dir, [*HELD_IN, *HELD_OUT])
    namespace = search_namespace(k8s_cluster, "outage", store, tasks)
    manifest = spec(bucket, uris, storage={"endpoint": store.endpoint, "region": store.region})
    searches = Searches(k8s_cluster, namespace)
    seen: set[str] = set()

    def status() -> dict[str, Any]:
        current = searches.status("weather")
        seen.update(t for t, c in conditions(current).items() if c["status"] == "True")
        return current

    with running_operator(k8s_cluster, [namespace]) as operator:
        searches.create("weather", manifest)
        wait_for(lambda: status().get("trials", {}).get("succeeded", 0) >= 2, 400, "2 trials")

        # 1. The store goes away mid-search for 75 s.
        store.stop()
        stopped = time.monotonic()
        waiting = wait_for(
            lambda: (
                (c := conditions(status()).get("StorageUnavailable"))
                and c["status"] == "True"
                and c
            ),
            OUTAGE_S,
            "StorageUnavailable while the store is down",
        )
        assert "wait for the object store" in waiting["message"]
        while time.monotonic() - stopped < OUTAGE_S:
            current = status()
            assert current["phase"] == "Running", current.get("conditions")
            assert current["trials"]["failed"] == 0, current["recentFailures"]
            time.sleep(1)
        store.restart()

        # 2. Again, as soon as the final evaluation starts.
        wait_for(
            lambda: (status().get("final") or {}).get("state") == "Running",
            600,
            "the final evaluation",
            interval_s=0.1,
        )
        store.stop()
        retrying = wait_for(
            lambda: (
                (current := status()).get("final", {}).get("state") in ("Retrying", "Succeeded")
                and current
            ),
            180,
            "the final evaluation to be retried",
        )
        assert retrying["final"]["state"] == "Retrying", "the export finished before the outage"
        time.sleep(10)
        store.restart()

        final = searches.wait_phase("weather", ["Succeeded", "Failed"], 400)
        assert operator.alive() and operator.starts == 1

    assert final["phase"] == "Succeeded", final.get("conditions")
    assert final["trials"]["failed"] == 0 and final["trials"]["running"] == 0
    assert final["final"]["state"] == "Succeeded" and final["final"]["attempt"] >= 1
    handed_over = final.get("winner") or final["best"]  # the confirmed winner, when confirmed
    assert final["output"]["digest"] and set(handed_over["heldOut"]) == set(HELD_OUT)
    assert conditions(final)["StorageUnavailable"]["status"] == "False"
    assert "StorageUnavailable" in seen
    events = searches.events()
    reasons = {e["reason"] for e in events if e["involvedObject"].get("kind") == "MergeSearch"}
    assert {"StorageUnavailable", "FinalizationRetried", "Succeeded"} <= reasons
