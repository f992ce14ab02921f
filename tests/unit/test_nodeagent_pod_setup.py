"""The test node agent's container preparation (tests/support/pod_setup.py): env, volumes and
the runAsNonRoot check behave as the kubelet's do, with the kubelet's messages. The API is a
fake here (a dict of Secrets and ConfigMaps); the e2e tests run the same code on the real one."""

from __future__ import annotations

import base64
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from support.cluster import ApiError
from support.pod_setup import (
    ObjectReader,
    PodRejected,
    PodSetupError,
    VolumeSetupError,
    container_command,
    expand_refs,
    materialise_volume,
    resolve_env,
    rewrite_paths,
    verify_non_root,
    volume_mounts,
)

pytestmark = pytest.mark.unit

POD: dict[str, Any] = {
    "metadata": {"name": "p", "namespace": "team", "uid": "u-1", "labels": {"app": "x"}},
    "spec": {"serviceAccountName": "trial", "containers": [{"name": "c"}]},
}


class FakeApi:
    """Secrets and ConfigMaps of namespace `team`, as GET answers them; counts the reads."""

    def __init__(self, secrets: dict[str, dict[str, str]], maps: dict[str, dict[str, str]]):
        self.objects = {
            f"/api/v1/namespaces/team/secrets/{name}": {
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            }
            for name, data in secrets.items()
        } | {f"/api/v1/namespaces/team/configmaps/{n}": {"data": d} for n, d in maps.items()}
        self.reads = 0

    def get(self, path: str) -> dict[str, Any]:
        self.reads += 1
        if path not in self.objects:
            raise ApiError("GET", path, 404, "not found")
        return self.objects[path]


def reader(**secrets: dict[str, str]) -> ObjectReader:
    api = FakeApi(secrets, {"tasks": {"a.yaml": "task: a"}})
    return ObjectReader(api, "team")  # type: ignore[arg-type]


def test_refs_expand_known_names_keep_unknown_ones_and_unescape_dollars() -> None:
    env = {"A": "1", "B": "two"}
    assert expand_refs("$(A)-$(B)-$(C)-$$(A)", env) == "1-two-$(C)-$(A)"


def test_paths_are_rewritten_where_a_path_starts_longest_mount_first(tmp_path: Path) -> None:
    mounts = [("/data", "/host/d"), ("/data/cache", "/host/c"), ("/tmp", str(tmp_path))]
    assert rewrite_paths("/data/x", mounts) == "/host/d/x"
    assert rewrite_paths("/data/cache/y", mounts) == "/host/c/y"
    assert rewrite_paths("--out=/data,/data/cache:/datax", mounts) == "--out=/host/d,/host/c:/datax"
    assert rewrite_paths("/tmp/z", mounts) == f"{tmp_path}/z"  # never rewritten twice
    existing = tmp_path / "file.py"
    existing.write_text("")
    assert rewrite_paths(str(existing), [(str(tmp_path), "/elsewhere")]) == str(existing)


def test_env_from_first_then_env_in_order_each_expanded_against_the_ones_before() -> None:
    container = {
        "name": "c",
        "envFrom": [{"secretRef": {"name": "store"}, "prefix": "S_"}],
        "env": [
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "store", "key": "id"}}},
            {"name": "URL", "value": "s3://$(KEY)/$(S_id)"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {
                "name": "GONE",
                "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
        ],
    }
    env = resolve_env(container, POD, reader(store={"id": "abc"}), "n1")
    assert env == {"S_id": "abc", "KEY": "abc", "URL": "s3://abc/abc", "POD": "p", "APP": "x"}


def test_a_missing_secret_or_key_is_the_kubelets_config_error() -> None:
    missing = {
        "name": "c",
        "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
    }
    with pytest.raises(PodSetupError, match=r'^secret "s" not found$'):
        resolve_env(missing, POD, reader(), "n1")
    with pytest.raises(PodSetupError, match="couldn't find key k in Secret team/s"):
        resolve_env(missing, POD, reader(s={"other": "v"}), "n1")


def test_an_unsupported_field_ref_is_refused() -> None:
    container = {
        "name": "c",
        "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}}],
    }
    with pytest.raises(PodRejected, match=r"spec\.hostname"):
        resolve_env(container, POD, reader(), "n1")


def test_each_object_is_read_once_per_pod_start() -> None:
    objects = reader(store={"a": "1", "b": "2"})
    container = {
        "name": "c",
        "env": [
            {"name": k, "valueFrom": {"secretKeyRef": {"name": "store", "key": k.lower()}}}
            for k in ("A", "B")
        ],
    }
    resolve_env(container, POD, objects, "n1")
    assert objects.api.reads == 1  # type: ignore[attr-defined]


def test_volumes_become_directories_with_their_items_and_modes(tmp_path: Path) -> None:
    objects = reader(store={"id": "abc", "key": "xyz"})
    secret = {"name": "creds", "secret": {"secretName": "store", "defaultMode": 0o400}}
    directory = materialise_volume(secret, tmp_path / "creds", POD, objects, "n1")
    assert (directory / "id").read_text() == "abc" and (directory / "key").read_text() == "xyz"
    assert stat.S_IMODE((directory / "id").stat().st_mode) == 0o400
    projected = {
        "name": "all",
        "projected": {
            "sources": [
                {"configMap": {"name": "tasks", "items": [{"key": "a.yaml", "path": "t/a.yaml"}]}},
                {
                    "downwardAPI": {
                        "items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]
                    }
                },
                {"serviceAccountToken": {"path": "token"}},
            ]
        },
    }
    directory = materialise_volume(projected, tmp_path / "all", POD, objects, "n1")
    assert sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()
    ) == [
        "name",
        "t/a.yaml",
    ]  # no token: trial processes get no Kubernetes credentials
    assert (directory / "t" / "a.yaml").read_text() == "task: a"
    assert materialise_volume(
        {"name": "e", "emptyDir": {}}, tmp_path / "e", POD, objects, "n1"
    ).is_dir()
    host = {"name": "h", "hostPath": {"path": "/var/cache/x"}}
    assert materialise_volume(host, tmp_path / "h", POD, objects, "n1") == Path("/var/cache/x")


def test_a_volume_whose_object_is_missing_fails_its_mount_like_the_kubelet(tmp_path: Path) -> None:
    volume = {"name": "creds", "secret": {"secretName": "absent"}}
    with pytest.raises(
        VolumeSetupError,
        match=re.escape('MountVolume.SetUp failed for volume "creds" : secret "absent" not found'),
    ):
        materialise_volume(volume, tmp_path / "creds", POD, reader(), "n1")
    optional = {"name": "o", "secret": {"secretName": "absent", "optional": True}}
    assert materialise_volume(optional, tmp_path / "o", POD, reader(), "n1").is_dir()
    with pytest.raises(PodRejected, match="not supported"):
        materialise_volume(
            {"name": "pvc", "persistentVolumeClaim": {}}, tmp_path / "p", POD, reader(), "n1"
        )


def test_mounts_map_container_paths_to_volume_directories(tmp_path: Path) -> None:
    container = {
        "volumeMounts": [
            {"name": "data", "mountPath": "/data"},
            {"name": "data", "mountPath": "/cache", "subPath": "cache"},
        ]
    }
    mounts = volume_mounts(container, {"data": tmp_path})
    assert mounts == [("/data", str(tmp_path)), ("/cache", str(tmp_path / "cache"))]
    assert (tmp_path / "cache").is_dir()
    with pytest.raises(PodRejected, match="'other' names no volume"):
        volume_mounts({"volumeMounts": [{"name": "other", "mountPath": "/o"}]}, {})


@pytest.mark.parametrize(
    ("pod_context", "container_context", "image_user", "refusal"),
    [
        ({}, {}, 0, None),  # no runAsNonRoot: nothing checked
        ({"runAsNonRoot": True}, {}, 65532, None),
        ({"runAsNonRoot": True}, {}, 0, "image will run as root"),
        ({"runAsNonRoot": True}, {}, "nobody", "non-numeric user (nobody)"),
        ({"runAsNonRoot": True, "runAsUser": 0}, {}, 65532, "runAsUser breaks non-root policy"),
        ({"runAsNonRoot": True}, {"runAsUser": 1000}, 0, None),  # the container's user wins
        ({}, {"runAsNonRoot": True, "runAsUser": 0}, 65532, "runAsUser breaks non-root policy"),
    ],
)
def test_run_as_non_root_is_checked_like_the_kubelet(
    pod_context: dict, container_context: dict, image_user: int | str, refusal: str | None
) -> None:
    pod = {**POD, "spec": {**POD["spec"], "securityContext": pod_context}}
    container = {"name": "c", "securityContext": container_context}
    if refusal is None:
        verify_non_root(pod, container, image_user)
        return
    with pytest.raises(PodSetupError, match=re.escape(refusal)) as info:
        verify_non_root(pod, container, image_user)
    assert '(pod: "p_team", container: c)' in str(info.value)


def test_the_command_is_the_containers_or_its_images_entrypoint_with_refs_expanded() -> None:
    env = {"N": "3"}
    container = {"name": "c", "command": ["run", "$(N)"], "args": ["--n=$(N)"]}
    assert container_command(container, {}, env) == ["run", "3", "--n=3"]
    by_image = {"name": "c", "image": "runner:1", "args": ["x"]}
    assert container_command(by_image, {"runner:1": ["mergerunner"]}, env) == ["mergerunner", "x"]
    with pytest.raises(PodRejected, match="has no command"):
        container_command({"name": "c", "image": "unknown"}, {}, env)
