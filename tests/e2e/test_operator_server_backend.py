"""A cluster search whose trials score through an inference server (`backend: openai`).

The real control plane, the operator with its RBAC rights, toy checkpoints in S3, lm-eval task
YAMLs from a ConfigMap; every trial pod (a process of the test node agent) merges, starts
`transformers serve` on the merged model, scores through lm-eval's local-completions and stops
the server. The search succeeds and its best trial's scores are what the in-process hf backend
gives the same merge.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from support.cluster import KubeCluster
from support.nodeagent import NodeAgent
from support.operator_proc import Searches, running_operator
from support.s3server import SeaweedS3
from support.search_inputs import portable_tasks, search_namespace, upload_checkpoints

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

CHECKPOINTS = ("base", "sft-rev")
TASK, METRIC, LIMIT = "toy_rev", "exact_match", 6
HUB = "/var/cache/hub"


def _serve_command() -> list[str]:
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    assert exe, "transformers' CLI is not installed beside this interpreter"
    return [
        *(exe, "serve", "{model}", "--host", "{host}", "--port", "{port}"),
        *("--device", "cpu", "--dtype", "float32", "--log-level", "warning"),
    ]


def test_a_search_scores_every_trial_through_a_server(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    s3_server: SeaweedS3,
    toy_pool: Any,
    tmp_path: Path,
) -> None:
    from support.net import free_port

    bucket = s3_server.create_bucket()
    uris = upload_checkpoints(s3_server, bucket, {n: toy_pool.checkpoints[n] for n in CHECKPOINTS})
    tasks = portable_tasks(toy_pool.tasks_dir, [TASK])
    namespace = search_namespace(k8s_cluster, "served", s3_server, tasks)
    server = {"command": _serve_command(), "port": free_port(), "readyTimeoutSeconds": 300}
    evaluator = {"backend": "openai", "device": "cpu", "seed": 1234, "server": server}
    spec = {
        "checkpoints": [{"name": n, "uri": uri} for n, uri in uris.items()],
        "merge": {"dtype": "float32"},
        "objective": {
            "heldIn": [{"task": TASK, "metric": METRIC, "limit": LIMIT}],
            "customTasks": {"configMapRef": {"name": "toy-tasks"}},
            "evaluator": evaluator,
        },
        # Confirmation off: this test is about the server path, and each trial serves a model.
        "search": {
            "populationSize": 3,
            "maxGenerations": 1,
            "seed": 3,
            "baselines": [],
            "confirm": {"enabled": False},
        },
        # One trial at a time: the node agent's pods share the machine's network namespace,
        # so two servers on one port would collide (a real pod has its own).
        "execution": {
            "parallelism": 1,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "runner",
                            # transformers serve lists the hub cache on /v1/models
                            "env": [{"name": "HF_HUB_CACHE", "value": HUB}],
                            "volumeMounts": [{"name": "hub", "mountPath": HUB}],
                        }
                    ],
                    "volumes": [{"name": "hub", "emptyDir": {}}],
                }
            },
        },
        "storage": {
            "endpoint": s3_server.endpoint,
            "region": s3_server.region,
            "secretRef": {"name": "toy-store"},
        },
    }
    searches = Searches(k8s_cluster, namespace)
    with running_operator(k8s_cluster, [namespace]) as operator:
        searches.create("served", spec)
        status = searches.wait_phase("served", ["Failed", "Succeeded"], 800)
        assert operator.alive()
    assert status["phase"] == "Succeeded", status.get("conditions")
    trials = status["trials"]
    assert trials["succeeded"] == 3 and trials["failed"] == 0, trials

    # The best trial's score is what the in-process hf backend gives the same merge.
    from mergerunner.run import run_trial
    from mergerunner.trial import TrialDocument

    best = status["best"]
    doc = TrialDocument.model_validate(
        {
            "id": "check",
            "checkpoints": [{"name": n, "uri": str(toy_pool.checkpoints[n])} for n in uris],
            "weights": best["weights"],
            "dtype": "float32",
            "heldIn": [{"task": TASK, "metric": METRIC, "limit": LIMIT}],
            "customTasksDir": str(toy_pool.tasks_dir),
            "evaluator": {"device": "cpu", "batchSize": 1, "seed": 1234},
        }
    )
    local = run_trial(doc, cache_dir=tmp_path / "cache", work_dir=tmp_path)
    assert local.status == "succeeded", local.error
    assert local.held_in == best["scores"]
