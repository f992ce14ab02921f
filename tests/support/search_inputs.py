"""What a search on the test cluster reads besides its spec: checkpoints in the S3 server, the
custom lm-eval tasks as a ConfigMap, and the store's credentials as a Secret (by reference, as
the product asks of users). Shared by the e2e tests, the integration tests that upload, and the
trial-overhead benchmark.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from support.cluster import ApiClient, KubeCluster
from support.s3server import SeaweedS3

TASKS_CONFIGMAP = "toy-tasks"
STORE_SECRET = "toy-store"


def upload_tree(s3: SeaweedS3, bucket: str, source: Path, prefix: str) -> str:
    """Every file below `source` under `prefix/` (keys relative to `source`); the prefix's URI."""
    client = s3.client()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(source).as_posix()}")
    return f"s3://{bucket}/{prefix}/"


def upload_checkpoints(
    s3: SeaweedS3, bucket: str, checkpoints: Mapping[str, Path], prefix: str = "pool"
) -> dict[str, str]:
    """Each checkpoint directory under `prefix/NAME/`; name → its URI, in the given order."""
    return {
        name: upload_tree(s3, bucket, Path(path), f"{prefix}/{name}")
        for name, path in checkpoints.items()
    }


def portable_tasks(
    pool_tasks: Path, names: Iterable[str], out: Path | None = None
) -> dict[str, str]:
    """The pool's task YAMLs with `data_files` made relative (resolved beside the YAML by the
    runner), and their JSONL files: the content of the custom-task ConfigMap. Also written to
    `out` when given (the tasks as the pods see them, for scoring outside the cluster)."""
    data: dict[str, str] = {}
    for name in names:
        jsonl = pool_tasks / f"{name}.jsonl"
        text = (pool_tasks / f"{name}.yaml").read_text().replace(str(jsonl), jsonl.name)
        assert jsonl.name in text and str(pool_tasks) not in text
        data[f"{name}.yaml"], data[jsonl.name] = text, jsonl.read_text()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for key, value in data.items():
            (out / key).write_text(value)
    return data


def create_search_inputs(
    api: ApiClient,
    namespace: str,
    s3: SeaweedS3,
    tasks: Mapping[str, str] | None = None,
    *,
    secret_extra: Mapping[str, str] | None = None,
) -> None:
    """The store Secret (the S3 server's keys, plus `secret_extra`) and, when `tasks` is given,
    the custom-task ConfigMap, in `namespace`."""
    if tasks is not None:
        api.create(
            f"/api/v1/namespaces/{namespace}/configmaps",
            {"metadata": {"name": TASKS_CONFIGMAP}, "data": dict(tasks)},
        )
    credentials = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    api.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {"metadata": {"name": STORE_SECRET}, "stringData": {**credentials, **(secret_extra or {})}},
    )


def search_namespace(
    cluster: KubeCluster,
    prefix: str,
    s3: SeaweedS3,
    tasks: Mapping[str, str] | None = None,
    *,
    secret_extra: Mapping[str, str] | None = None,
) -> str:
    """A fresh namespace `prefix-XXXXXX` holding the search inputs; its name."""
    namespace = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(namespace)
    create_search_inputs(cluster.api(), namespace, s3, tasks, secret_extra=secret_extra)
    return namespace
