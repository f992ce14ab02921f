"""A real search on the real control plane: toy checkpoints in S3, lm-eval tasks from a
ConfigMap, the real runner in every trial pod, the operator with only its RBAC rights.

One operator serves one namespace holding a good search and three broken ones, created
together: the broken ones must fail with a condition naming the problem while the same operator
process (never restarted) takes the good one to Succeeded; the merged model it exports must
load and score exactly what the status says.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.cluster import KubeCluster
from support.nodeagent import NodeAgent
from support.operator_proc import OperatorProcess, Searches, running_operator
from support.s3server import SeaweedS3
from support.search_inputs import (
    portable_tasks,
    search_namespace,
    upload_checkpoints,
    upload_tree,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

CHECKPOINTS = ("base", "sft-rev", "sft-sort")
HELD_IN = {"toy_rev": "exact_match", "toy_sort": "exact_match"}
HELD_OUT = {"toy_max": "acc"}
LIMIT, SEED = 8, 1234
EVALUATOR = {"device": "cpu", "batchSize": 8, "seed": SEED}


@dataclass
class Setup:
    cluster: KubeCluster
    searches: Searches
    operator: OperatorProcess
    s3: SeaweedS3
    bucket: str
    tasks_dir: Path  # the ConfigMap's content, as the pods see it


def narrow_checkpoint(source: Path, out: Path) -> Path:
    """A checkpoint like `source` but with another hidden size: same tensor names, other
    shapes, so the merge must refuse it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((source / "config.json").read_text())
    config["hidden_size"] = config["hidden_size"] // 2
    config["intermediate_size"] = config["intermediate_size"] // 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(out, safe_serialization=True)
    for extra in source.iterdir():
        if extra.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(extra, out / extra.name)
    return out


def spec(bucket: str, checkpoints: dict[str, str], **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "checkpoints": [{"name": n, "uri": uri} for n, uri in checkpoints.items()],
        "merge": {"dtype": "float32"},
        "objective": {
            "heldIn": [{"task": t, "metric": m, "limit": LIMIT} for t, m in HELD_IN.items()],
            "heldOut": [{"task": t, "metric": m, "limit": LIMIT} for t, m in HELD_OUT.items()],
            "customTasks": {"configMapRef": {"name": "toy-tasks"}},
            "evaluator": EVALUATOR,
        },
        "search": {"populationSize": 4, "maxGenerations": 1, "seed": 3},
        "execution": {"parallelism": 2, "backoffLimit": 0},
        "storage": {"secretRef": {"name": "toy-store"}},
        "output": {"uri": f"s3://{bucket}/merged/good/"},
    }
    for key, value in changes.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return base


@pytest.fixture(scope="module")
def setup(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    s3_server: SeaweedS3,
    toy_pool: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("opsearch")
    bucket = s3_server.create_bucket()
    uris = upload_checkpoints(s3_server, bucket, {n: toy_pool.checkpoints[n] for n in CHECKPOINTS})
    narrow = narrow_checkpoint(toy_pool.checkpoints["sft-rev"], tmp / "narrow")
    uris["narrow"] = upload_tree(s3_server, bucket, narrow, "pool/narrow")
    tasks = portable_tasks(toy_pool.tasks_dir, [*HELD_IN, *HELD_OUT], tmp / "tasks")
    namespace = search_namespace(k8s_cluster, "search", s3_server, tasks)
    good = {n: uris[n] for n in CHECKPOINTS}
    storage = {"storage": {"endpoint": s3_server.endpoint, "region": s3_server.region}}
    manifests = {
        "missing": spec(
            bucket, {**good, "sft-sort": f"s3://{bucket}/pool/no-such-checkpoint/"}, **storage
        ),
        "narrow": spec(bucket, {**good, "narrow": uris["narrow"]}, **storage),
        "no-task": spec(bucket, good, **storage),
        "good": spec(bucket, good, **storage),
    }
    manifests["no-task"]["objective"]["heldIn"][1]["task"] = "toy_no_such_task"
    for manifest in manifests.values():
        manifest["execution"]["parallelism"] = 1 if manifest is not manifests["good"] else 2
    searches = Searches(k8s_cluster, namespace)
    with running_operator(k8s_cluster, [namespace]) as operator:
        for name, manifest in manifests.items():
            searches.create(name, manifest)
        yield Setup(k8s_cluster, searches, operator, s3_server, bucket, tmp / "tasks")
        assert operator.alive() and operator.starts == 1, "the operator died or was restarted"


@pytest.mark.parametrize(
    ("name", "reason", "named"),
    [
        ("missing", "CheckpointUnavailable", "no-such-checkpoint"),
        ("narrow", "CheckpointsIncompatible", "narrow"),
        ("no-task", "UnknownTask", "toy_no_such_task"),
    ],
)
def test_a_configuration_error_fails_the_search_with_a_condition(
    setup: Setup, name: str, reason: str, named: str
) -> None:
    status = setup.searches.wait_phase(name, ["Failed", "Succeeded"], 300)
    assert status["phase"] == "Failed"
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["status"] == "True" and failed["reason"] == reason, failed
    assert named in failed["message"], failed["message"]
    assert status["trials"]["succeeded"] == 0 and status["activeTrials"] == []
    assert setup.operator.alive()


def test_search_succeeds_and_exports_the_confirmed_winner(setup: Setup, tmp_path: Path) -> None:
    status = setup.searches.wait_phase("good", ["Failed", "Succeeded"], 800)
    assert status["phase"] == "Succeeded", status.get("conditions")
    assert setup.operator.alive() and setup.operator.starts == 1

    # Baselines are trials too: the best is at least as good as every one of them.
    best = status["best"]
    baselines = [b for b in status["baselines"] if b.get("fitness") is not None]
    assert len(baselines) == len(CHECKPOINTS) + 2
    assert all(best["fitness"] >= b["fitness"] for b in baselines)
    trials = status["trials"]
    assert trials["running"] == 0 and trials["failed"] == 0
    assert trials["total"] == trials["succeeded"] + trials["failed"] + trials["running"]

    # The finalists (every search trial: there are 4 < topK, and every baseline) were scored
    # again on unseen examples, and the winner was chosen on those.
    confirmation = status["confirmation"]
    assert len(confirmation) == 4 + len([b for b in baselines if not b.get("sameAs")])
    assert all(c["status"] == "succeeded" for c in confirmation)
    winner = status["winner"]
    confirmed = {c["trial"]: c["fitness"] for c in confirmation}
    assert winner["fitness"] == max(confirmed.values()) == confirmed[winner["trial"]]
    assert set(winner["heldOut"]) == set(HELD_OUT) and "heldOut" not in best

    output = status["output"]
    assert output["uri"] == f"s3://{setup.bucket}/merged/good/" and output["digest"]
    scores = score_exported(setup, tmp_path / "merged")
    assert scores["held_in"] == pytest.approx(winner["searchScores"], abs=1e-12)
    assert scores["fitness"] == pytest.approx(winner["searchFitness"], abs=1e-12)
    assert scores["held_out"] == pytest.approx(winner["heldOut"], abs=1e-12)
    assert scores["confirmation"] == pytest.approx(winner["scores"], abs=1e-12)


def score_exported(setup: Setup, into: Path) -> dict[str, Any]:
    """Download the exported merge, load it with transformers and score it with lm-eval on
    the search's tasks, limits and seed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergerunner.evaluate import TaskSuite, make_lm
    from mergerunner.trial import EvaluatorSpec, TaskSpec, fitness_of, held_in_weights

    client = setup.s3.client()
    listing = client.list_objects_v2(Bucket=setup.bucket, Prefix="merged/good/")
    into.mkdir(parents=True)
    for item in listing.get("Contents", []):
        client.download_file(setup.bucket, item["Key"], str(into / Path(item["Key"]).name))
    assert (into / "model.safetensors").exists() or (into / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(into, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(into)
    evaluator = EvaluatorSpec.model_validate(EVALUATOR)
    lm = make_lm(model, tokenizer, evaluator)
    held_in = [TaskSpec(task=t, metric=m, limit=LIMIT) for t, m in HELD_IN.items()]
    held_out = [TaskSpec(task=t, metric=m, limit=LIMIT) for t, m in HELD_OUT.items()]
    suite_in = TaskSuite(held_in, include_path=setup.tasks_dir, seed=SEED).score(lm)
    suite_out = TaskSuite(held_out, include_path=setup.tasks_dir, seed=SEED).score(lm)
    unseen = TaskSuite(held_in, include_path=setup.tasks_dir, seed=SEED, confirm=list(HELD_IN))
    return {
        "held_in": suite_in,
        "held_out": suite_out,
        "fitness": fitness_of(suite_in, held_in_weights(held_in)),
        "confirmation": unseen.score(lm),
    }


def test_kubectl_shows_the_printer_columns(setup: Setup) -> None:
    status = setup.searches.wait_phase("good", ["Failed", "Succeeded"], 600)
    table = setup.cluster.kubectl("get", "msearch", "good", "-n", setup.searches.namespace)
    header, row = table.strip().splitlines()
    assert header.split() == ["NAME", "PHASE", "ITERATION", "TRIALS", "BEST", "CONFIRMED", "AGE"]
    cells = row.split()
    assert cells[:4] == [
        "good",
        "Succeeded",
        str(status["iteration"]),
        str(status["trials"]["finished"]),
    ]
    assert cells[4] == f"{status['best']['fitness']:.4f}"  # 4 decimals, not 16 digits
    assert cells[5] == f"{status['winner']['fitness']:.4f}"
