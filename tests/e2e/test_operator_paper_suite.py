"""The paper's task suite on the real control plane: lm-eval's own gsm8k, mbpp (code allowed),
the leaderboard_musr group held in and ifeval held out, a chat template and a system
instruction, toy checkpoints and a data bundle in the real S3 server, the real runner in every
pod. Every configuration error fails its search in the preflight, with a condition naming the
cause and zero trial Jobs; the good search passes its preflight once and succeeds, and its
exported model, scored outside the operator, gives the status's scores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.cluster import KubeCluster
from support.nodeagent import NodeAgent
from support.operator_proc import OperatorProcess, Searches, running_operator
from support.paper_suite import EVALUATOR, HELD_IN, HELD_OUT, wider, with_chat_template
from support.s3server import SeaweedS3
from support.search_inputs import search_namespace, upload_tree
from support.taskdata import build_bundle

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

CHECKPOINTS = ("base", "sft-rev", "sft-sort")


@dataclass
class Setup:
    cluster: KubeCluster
    searches: Searches
    operator: OperatorProcess
    s3: SeaweedS3
    bucket: str
    bundle: Path


def spec(setup_uris: dict[str, str], bundle: str, bucket: str, **objective: Any) -> dict:
    return {
        "checkpoints": [{"name": n, "uri": u} for n, u in setup_uris.items()],
        "merge": {"dtype": "float32"},
        "objective": {
            "heldIn": HELD_IN,
            "heldOut": HELD_OUT,
            "datasets": {"uri": bundle},
            "allowCodeExecution": True,
            "evaluator": EVALUATOR,
            **objective,
        },
        "search": {"populationSize": 4, "maxGenerations": 1, "baselines": ["uniform"], "seed": 1},
        "execution": {"parallelism": 2, "backoffLimit": 0},
        "storage": {"secretRef": {"name": "toy-store"}},
        "output": {"uri": f"s3://{bucket}/merged/paper/"},
    }


@pytest.fixture(scope="module")
def setup(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    s3_server: SeaweedS3,
    toy_pool: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("paper-e2e")
    bucket = s3_server.create_bucket()
    uris = {}
    for name in CHECKPOINTS:
        local = with_chat_template(Path(toy_pool.checkpoints[name]), tmp / "pool" / name)
        uris[name] = upload_tree(s3_server, bucket, local, f"pool/{name}")
    odd = wider(tmp / "pool" / "base", tmp / "odd")
    odd_uri = upload_tree(s3_server, bucket, odd, "pool/odd")
    bundle = build_bundle(tmp / "bundle", tmp / "scratch")
    bundle_uri = upload_tree(s3_server, bucket, bundle, "bundles/paper")

    storage = {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_REGION": s3_server.region}
    namespace = search_namespace(k8s_cluster, "paper", s3_server, secret_extra=storage)
    good = spec(uris, bundle_uri, bucket)
    musr = HELD_IN[2]
    manifests = {
        "paper": good,
        "no-code": spec(uris, bundle_uri, bucket, allowCodeExecution=False),
        "no-data": spec(uris, bundle_uri, bucket, heldOut=[{"task": "arc_easy"}]),
        "bad-metric": spec(uris, bundle_uri, bucket, heldIn=[{**musr, "metric": "exact_match"}]),
        "typo": spec(uris, bundle_uri, bucket, heldIn=[{**musr, "task": "leaderboard_musrr"}]),
        "shapes": {**good, "checkpoints": [*good["checkpoints"], {"name": "odd", "uri": odd_uri}]},
        "multiturn": spec(uris, bundle_uri, bucket, evaluator={"fewshotAsMultiturn": True}),
    }
    searches = Searches(k8s_cluster, namespace)
    with running_operator(k8s_cluster, [namespace]) as operator:
        for name, manifest in manifests.items():
            searches.create(name, manifest)
        yield Setup(k8s_cluster, searches, operator, s3_server, bucket, bundle)
        assert operator.alive() and operator.starts == 1


def roles(setup: Setup, name: str) -> list[str]:
    return sorted(j["metadata"]["labels"]["mergesearch.io/role"] for j in setup.searches.jobs(name))


@pytest.mark.parametrize(
    ("name", "reason", "words", "jobs"),
    [
        ("no-code", "ConfigInvalid", ["mbpp", "allowCodeExecution"], ["preflight"]),
        ("no-data", "DataMissing", ["arc_easy", "allenai/ai2_arc"], ["preflight"]),
        ("bad-metric", "UnknownMetric", ["leaderboard_musr", "exact_match"], ["preflight"]),
        ("typo", "UnknownTask", ["leaderboard_musrr"], ["preflight"]),
        ("shapes", "CheckpointsIncompatible", ["embed_tokens", "odd"], ["preflight"]),
        ("multiturn", "SpecInvalid", ["fewshotAsMultiturn", "applyChatTemplate"], []),
    ],
)
def test_each_configuration_error_fails_before_any_trial_job(
    setup: Setup, name: str, reason: str, words: list[str], jobs: list[str]
) -> None:
    status = setup.searches.wait_phase(name, ["Failed", "Succeeded"], 900)
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert status["phase"] == "Failed" and failed["reason"] == reason, failed
    for word in words:
        assert word in failed["message"], failed["message"]
    assert roles(setup, name) == jobs  # the preflight at most: zero trial Jobs
    preflight = [j for j in setup.searches.jobs(name) if "preflight" in j["metadata"]["name"]]
    for job in preflight:  # CPU only
        assert "gpu" not in json.dumps(
            job["spec"]["template"]["spec"]["containers"][0].get("resources", {})
        )


def test_the_paper_suite_succeeds_and_the_export_scores_the_same(
    setup: Setup, tmp_path: Path
) -> None:
    status = setup.searches.wait_phase("paper", ["Failed", "Succeeded"], 1500)
    assert status["phase"] == "Succeeded", status.get("conditions")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Preflight"]["status"] == "True"
    assert roles(setup, "paper").count("preflight") == 1
    # The exported merge: the winner confirmed on unseen examples (the best when no
    # confirmation ran); its scores on the search's examples are what an exact re-score gives.
    chosen = status.get("winner") or status["best"]
    search_scores = chosen.get("searchScores", chosen["scores"])
    assert set(search_scores) == {"gsm8k", "mbpp", "leaderboard_musr"}
    assert set(chosen["heldOut"]) == {"ifeval"}
    client = setup.s3.client()
    listing = client.list_objects_v2(Bucket=setup.bucket, Prefix="merged/paper/")
    model = tmp_path / "merged"
    model.mkdir()
    for item in listing.get("Contents", []):
        client.download_file(setup.bucket, item["Key"], str(model / Path(item["Key"]).name))
    scores = rescore(model, setup.bundle)
    for task, value in search_scores.items():
        assert scores[task] == pytest.approx(value, abs=1e-12), task
    assert scores["ifeval"] == pytest.approx(chosen["heldOut"]["ifeval"], abs=1e-12)


def rescore(model_dir: Path, bundle: Path) -> dict[str, float]:
    """The exported model scored in this process with lm-eval, the bundle's data, the same
    examples and settings (MergeSearch's TaskSuite only picks the seeded subsets)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergerunner.evaluate import TaskSuite, make_lm
    from mergerunner.trial import EvaluatorSpec, TaskSpec

    evaluator = EvaluatorSpec.model_validate(EVALUATOR)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = make_lm(model, AutoTokenizer.from_pretrained(model_dir), evaluator)
    out: dict[str, float] = {}
    for entries in (HELD_IN, HELD_OUT):
        specs = [TaskSpec.model_validate(e) for e in entries]
        suite = TaskSuite(specs, evaluator=evaluator, bundle=bundle, allow_code_execution=True)
        out.update(suite.score(lm))
    return out
