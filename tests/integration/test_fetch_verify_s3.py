"""Against a real S3 server (SeaweedFS): every download is verified, a bad checkpoint is named
by its URI, and an export replaces the model it lands on.

Objects written "by another client" are written with boto3; corruption in transit is real
corruption, by a proxy that flips one bit of the server's reply (tests/support/tamper.py).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import pytest
from boto3.s3.transfer import TransferConfig
from safetensors.numpy import load_file, save_file

from mergerunner.fetch import (
    DIGEST_ATTRIBUTE,
    INDEX_FILE,
    MANIFEST_NAME,
    WEIGHTS_FILE,
    FetchError,
    fetch_checkpoint,
    upload_directory,
)
from mergerunner.storage import StorageConfig
from mergerunner.trial import FailureKind
from support.s3server import SeaweedS3
from support.tamper import TamperingProxy

pytestmark = pytest.mark.integration
MiB = 2**20


@pytest.fixture(scope="module")
def bucket(s3_server: SeaweedS3) -> str:
    return s3_server.create_bucket()


@pytest.fixture
def base() -> str:
    return f"verify-{secrets.token_hex(4)}"


def _config(s3_server: SeaweedS3, endpoint: str | None = None) -> StorageConfig:
    return s3_server.storage_config(endpoint)


def _model(directory: Path, seed: int, *, rows: int = 64, sharded: bool = False) -> Path:
    """A checkpoint of float32 tensors; `rows` x 4 KiB per tensor, four tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {
        f"layers.{i}.weight": rng.standard_normal((rows, 1024), np.float32) for i in range(4)
    }
    (directory / "config.json").write_text(json.dumps({"model_type": "toy", "seed": seed}))
    if not sharded:
        save_file(tensors, str(directory / WEIGHTS_FILE))
        return directory
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[:2], names[2:]), start=1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(directory / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (directory / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    return directory


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text())["files"]


def test_a_truncated_checkpoint_in_the_store_is_named_by_its_uri(
    s3_server: SeaweedS3, bucket: str, base: str, tmp_path: Path
) -> None:
    source = _model(tmp_path / "src", 0)
    weights = source / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    client = s3_server.client()
    for path in source.iterdir():
        client.upload_file(str(path), bucket, f"{base}/cut/{path.name}")
    uri = f"s3://{bucket}/{base}/cut/"
    with pytest.raises(FetchError) as caught:
        fetch_checkpoint(uri, tmp_path / "cache", config=_config(s3_server))
    message = str(caught.value)
    assert message.startswith(f"{uri}: invalid checkpoint: model.safetensors: ")
    assert "truncated" in message and str(tmp_path / "cache") not in message
    assert caught.value.failure_kind is FailureKind.CHECKPOINT_INVALID


def test_our_uploads_carry_a_digest_and_a_damaged_download_is_refused(
    s3_server: SeaweedS3, bucket: str, base: str, tmp_path: Path
) -> None:
    source = _model(tmp_path / "src", 1, rows=1100)  # 17 MiB: a 2-part multipart upload
    uri = f"s3://{bucket}/{base}/ours/"
    upload_directory(source, uri, config=_config(s3_server))
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{base}/ours/{WEIGHTS_FILE}")
    assert head["ETag"].endswith('-2"') and DIGEST_ATTRIBUTE in head["Metadata"]

    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    with TamperingProxy((host, int(port))) as proxy:
        damaged = _config(s3_server, proxy.endpoint)
        with pytest.raises(FetchError, match=r"BLAKE3 .* differs from its upload's digest") as e:
            fetch_checkpoint(uri, tmp_path / "cache", config=damaged)
        assert proxy.flips == 1
        assert e.value.failure_kind is FailureKind.STORAGE_UNAVAILABLE  # retried
        path = fetch_checkpoint(uri, tmp_path / "cache", config=damaged)  # the retry is whole
    assert (path / WEIGHTS_FILE).read_bytes() == (source / WEIGHTS_FILE).read_bytes()
    assert _manifest(path)[WEIGHTS_FILE]["verified"] == "blake3-attribute"


def test_another_clients_multipart_object_is_verified_by_its_part_etags(
    s3_server: SeaweedS3, bucket: str, base: str, tmp_path: Path
) -> None:
    source = _model(tmp_path / "src", 2, rows=700)  # 11 MiB in 5 MiB parts: 3 parts
    client = s3_server.client()
    parts = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    for path in source.iterdir():
        client.upload_file(str(path), bucket, f"{base}/boto/{path.name}", Config=parts)
    uri = f"s3://{bucket}/{base}/boto/"
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    with TamperingProxy((host, int(port))) as proxy:
        path = fetch_checkpoint(uri, tmp_path / "cache", config=_config(s3_server, proxy.endpoint))
        assert proxy.flips == 1  # the first copy was damaged; the second matched the ETag
    assert (path / WEIGHTS_FILE).read_bytes() == (source / WEIGHTS_FILE).read_bytes()
    entry = _manifest(path)[WEIGHTS_FILE]
    assert entry["verified"] == "multipart-etag" and entry["etag"].endswith("-3")


def test_a_refetch_must_match_the_digest_recorded_at_first_fetch(
    s3_server: SeaweedS3, bucket: str, base: str, tmp_path: Path
) -> None:
    source = _model(tmp_path / "src", 3)
    client = s3_server.client()
    for path in source.iterdir():
        client.upload_file(str(path), bucket, f"{base}/plain/{path.name}")
    uri = f"s3://{bucket}/{base}/plain/"
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    with TamperingProxy((host, int(port)), flip_at=600_000, damage=False) as proxy:
        config = _config(s3_server, proxy.endpoint)  # one endpoint, one cache entry
        path = fetch_checkpoint(uri, tmp_path / "cache", config=config)
        recorded = _manifest(path)[WEIGHTS_FILE]
        assert recorded["verified"] == "md5-etag" and len(recorded["blake3"]) == 64
        (path / WEIGHTS_FILE).unlink()  # lost locally: fetched again, the same object
        proxy.damage = True
        with pytest.raises(FetchError, match="differs from the digest recorded when it was first"):
            fetch_checkpoint(uri, tmp_path / "cache", config=config)
        assert proxy.flips == 1


@pytest.mark.parametrize("where", ["s3", "local"])
def test_an_export_replaces_the_model_at_its_destination(
    s3_server: SeaweedS3, bucket: str, base: str, tmp_path: Path, where: str
) -> None:
    """A single-file model exported over a sharded one leaves no stale index or shards (which
    would otherwise be what some reader merges), and keeps what is not a model file."""
    config = _config(s3_server)
    uri = f"s3://{bucket}/{base}/export/" if where == "s3" else str(tmp_path / "export")
    old = _model(tmp_path / "old", 4, sharded=True)
    (old / "README.md").write_text("notes")
    upload_directory(old, uri, config=config)
    new = _model(tmp_path / "new", 5)
    upload_directory(new, uri, config=config)

    if where == "s3":
        listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{base}/export/")
        names = {o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]}
    else:
        names = {p.name for p in Path(uri).iterdir()}
    assert names == {WEIGHTS_FILE, "config.json", "README.md"}
    fetched = fetch_checkpoint(uri, tmp_path / "cache", config=config)
    got, want = load_file(str(fetched / WEIGHTS_FILE)), load_file(str(new / WEIGHTS_FILE))
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert json.loads((fetched / "config.json").read_text())["seed"] == 5
