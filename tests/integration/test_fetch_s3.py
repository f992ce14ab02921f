"""Fetching and uploading against a real S3 server (SeaweedFS, authentication on).

Set-up writes objects with boto3, independently of the code under test, so that a bug shared by
upload and fetch cannot hide itself.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mergerunner.fetch import (
    INDEX_FILE,
    MANIFEST_NAME,
    WEIGHTS_FILE,
    FetchError,
    FetchResult,
    fetch_checkpoint,
    fetch_checkpoint_result,
    fetch_checkpoints,
    upload_directory,
)
from mergerunner.storage import ENV_CREDENTIALS, StorageConfig
from support.s3server import SeaweedS3, free_ports
from support.search_inputs import upload_tree

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AUX_FILES = {
    "config.json": json.dumps({"model_type": "toy", "hidden_size": 8}),
    "generation_config.json": json.dumps({"max_new_tokens": 4}),
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}),
    "tokenizer_config.json": json.dumps({"model_max_length": 64}),
    "special_tokens_map.json": json.dumps({"eos_token": "</s>"}),
}
PICKLES = {"pytorch_model.bin": b"\x80\x04pickle", "optimizer.pt": b"\x80\x04", "rng.pkl": b"\x80"}
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


# --- helpers --------------------------------------------------------------------------------


def tensors(seed: int, names: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((16, 8)).astype(np.float32) for name in names}


def write_single(directory: Path, seed: int = 0, *, pickles: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors(seed, ["embed.weight", "lm_head.weight"]), str(directory / WEIGHTS_FILE))
    for name, text in AUX_FILES.items():
        (directory / name).write_text(text)
    for name, data in (PICKLES if pickles else {}).items():
        (directory / name).write_bytes(data)
    return directory


def write_sharded(directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for number, shard in enumerate(SHARDS):
        names = [f"layers.{number}.weight", f"layers.{number}.bias"]
        save_file(tensors(seed + number, names), str(directory / shard))
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index))
    for name, text in AUX_FILES.items():
        (directory / name).write_text(text)
    return directory


def file_identity(directory: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: unchanged means not rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def assert_same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for name in left:
        np.testing.assert_array_equal(left[name], right[name])


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_bucket(s3_server: SeaweedS3) -> str:
    return s3_server.create_bucket()


@pytest.fixture
def bucket(shared_bucket: str) -> str:
    """Each test writes under its own prefix of one bucket (creating buckets is the slow part)."""
    return shared_bucket


@pytest.fixture
def base() -> str:
    return f"run-{secrets.token_hex(4)}"


@pytest.fixture
def config(s3_server: SeaweedS3) -> StorageConfig:
    return s3_server.storage_config()


@pytest.fixture
def single_uri(s3_server: SeaweedS3, bucket: str, base: str, tmp_path: Path) -> str:
    upload_tree(s3_server, bucket, write_single(tmp_path / "src-single"), f"{base}/single")
    return f"s3://{bucket}/{base}/single/"


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A checkpoint as uploaded: its URI, and its objects to change behind the fetcher's back."""

    server: SeaweedS3
    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def put(self, source: Path, name: str) -> None:
        self.server.client().upload_file(str(source), self.bucket, f"{self.prefix}/{name}")

    def delete(self, name: str) -> None:
        self.server.client().delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")


@pytest.fixture
def sharded(s3_server: SeaweedS3, bucket: str, base: str, tmp_path: Path) -> RemoteCheckpoint:
    upload_tree(s3_server, bucket, write_sharded(tmp_path / "src-sharded"), f"{base}/sharded")
    return RemoteCheckpoint(s3_server, bucket, f"{base}/sharded")


@pytest.fixture
def sharded_uri(sharded: RemoteCheckpoint) -> str:
    return sharded.uri


@pytest.fixture
def closed_port() -> Iterator[int]:
    (port,) = free_ports(1)
    yield port


# --- fetching -------------------------------------------------------------------------------


def test_fetch_single_file_checkpoint(
    single_uri: str, config: StorageConfig, tmp_path: Path
) -> None:
    result = fetch_checkpoint_result(single_uri, tmp_path / "cache", config=config)
    names = {p.name for p in result.path.iterdir()}
    assert names == {WEIGHTS_FILE, *AUX_FILES, MANIFEST_NAME}  # no pickles
    assert sorted(result.downloaded) == sorted([WEIGHTS_FILE, *AUX_FILES])
    assert result.path.parent == tmp_path / "cache"
    assert_same_tensors(result.path / WEIGHTS_FILE, tmp_path / "src-single" / WEIGHTS_FILE)
    for name, text in AUX_FILES.items():
        assert (result.path / name).read_text() == text
    assert not list(result.path.glob(".*.part-*"))


def test_second_fetch_transfers_nothing(
    single_uri: str, config: StorageConfig, tmp_path: Path
) -> None:
    first = fetch_checkpoint_result(single_uri, tmp_path / "cache", config=config)
    before = file_identity(first.path)
    second = fetch_checkpoint_result(single_uri.rstrip("/"), tmp_path / "cache", config=config)
    assert second.path == first.path
    assert second.downloaded == ()
    assert second.bytes_downloaded == 0
    assert sorted(second.reused) == sorted(first.downloaded)
    after = file_identity(second.path)
    assert {k: v for k, v in after.items() if k != MANIFEST_NAME} == {
        k: v for k, v in before.items() if k != MANIFEST_NAME
    }


def test_fetch_sharded_checkpoint(sharded_uri: str, config: StorageConfig, tmp_path: Path) -> None:
    result = fetch_checkpoint_result(sharded_uri, tmp_path / "cache", config=config)
    assert {p.name for p in result.path.iterdir()} == {
        *SHARDS,
        INDEX_FILE,
        *AUX_FILES,
        MANIFEST_NAME,
    }
    for shard in SHARDS:
        assert_same_tensors(result.path / shard, tmp_path / "src-sharded" / shard)
    again = fetch_checkpoint_result(sharded_uri, tmp_path / "cache", config=config)
    assert again.downloaded == ()  # the cached index was used, not fetched again


def test_changed_remote_object_is_fetched_again(
    sharded: RemoteCheckpoint, config: StorageConfig, tmp_path: Path
) -> None:
    first = fetch_checkpoint_result(sharded.uri, tmp_path / "cache", config=config)
    before = file_identity(first.path)
    replacement = tmp_path / "replacement.safetensors"
    save_file(tensors(99, ["layers.1.weight", "layers.1.bias"]), str(replacement))
    sharded.put(replacement, SHARDS[1])

    second = fetch_checkpoint_result(sharded.uri, tmp_path / "cache", config=config)
    assert second.downloaded == (SHARDS[1],)
    assert_same_tensors(second.path / SHARDS[1], replacement)
    after = file_identity(second.path)
    assert after[SHARDS[0]] == before[SHARDS[0]]
    assert after[SHARDS[1]] != before[SHARDS[1]]


def test_locally_damaged_copy_is_fetched_again(
    single_uri: str, config: StorageConfig, tmp_path: Path
) -> None:
    first = fetch_checkpoint_result(single_uri, tmp_path / "cache", config=config)
    with (first.path / WEIGHTS_FILE).open("r+b") as handle:
        handle.truncate(10)
    second = fetch_checkpoint_result(single_uri, tmp_path / "cache", config=config)
    assert second.downloaded == (WEIGHTS_FILE,)
    assert_same_tensors(second.path / WEIGHTS_FILE, tmp_path / "src-single" / WEIGHTS_FILE)


def test_layout_change_prunes_old_files(
    sharded: RemoteCheckpoint, config: StorageConfig, tmp_path: Path
) -> None:
    first = fetch_checkpoint_result(sharded.uri, tmp_path / "cache", config=config)
    single = write_single(tmp_path / "now-single", seed=5, pickles=False)
    for name in [*SHARDS, INDEX_FILE]:
        sharded.delete(name)
    sharded.put(single / WEIGHTS_FILE, WEIGHTS_FILE)

    second = fetch_checkpoint_result(sharded.uri, tmp_path / "cache", config=config)
    assert second.path == first.path
    assert second.downloaded == (WEIGHTS_FILE,)
    assert {p.name for p in second.path.iterdir()} == {WEIGHTS_FILE, *AUX_FILES, MANIFEST_NAME}


def test_large_files_in_ranged_parts_and_multipart_objects(
    s3_server: SeaweedS3, bucket: str, base: str, config: StorageConfig, tmp_path: Path
) -> None:
    from boto3.s3.transfer import TransferConfig

    source = write_single(tmp_path / "src", pickles=False)
    big = tmp_path / "src" / WEIGHTS_FILE
    rng = np.random.default_rng(3)
    save_file({f"t{i}": rng.standard_normal((64, 64), np.float32) for i in range(64)}, str(big))
    multipart = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    padded = tmp_path / "src" / "tokenizer.json"
    padded.write_text(json.dumps({"pad": "x" * (6 * 2**20)}))  # 2 parts of a multipart upload
    client = s3_server.client()
    for path in source.iterdir():
        client.upload_file(str(path), bucket, f"{base}/big/{path.name}", Config=multipart)
    assert "-" in client.head_object(Bucket=bucket, Key=f"{base}/big/tokenizer.json")["ETag"]

    result = fetch_checkpoint_result(
        f"s3://{bucket}/{base}/big/", tmp_path / "cache", config=config, part_size=256 * 2**10
    )
    assert big.stat().st_size > 4 * 256 * 2**10  # so it really came in several ranged parts
    assert_same_tensors(result.path / WEIGHTS_FILE, big)
    assert (result.path / "tokenizer.json").read_bytes() == padded.read_bytes()


def test_several_checkpoints_at_once(
    single_uri: str, sharded_uri: str, config: StorageConfig, tmp_path: Path
) -> None:
    paths = fetch_checkpoints(
        [single_uri, sharded_uri, single_uri], tmp_path / "cache", config=config
    )
    assert paths[0] == paths[2] != paths[1]
    assert (paths[0] / WEIGHTS_FILE).is_file()
    assert (paths[1] / INDEX_FILE).is_file()


# --- errors ---------------------------------------------------------------------------------


def test_wrong_secret_key_is_access_denied(
    s3_server: SeaweedS3, single_uri: str, tmp_path: Path
) -> None:
    wrong = StorageConfig(
        endpoint=s3_server.endpoint, access_key_id=s3_server.access_key, secret_access_key="wrong"
    )
    with pytest.raises(FetchError) as caught:
        fetch_checkpoint(single_uri, tmp_path / "cache", config=wrong)
    assert caught.value.kind == "access-denied"
    assert single_uri in str(caught.value)
    assert "access denied" in str(caught.value)
    assert s3_server.secret_key not in str(caught.value)


def test_missing_prefix_names_the_uri(
    bucket: str, base: str, config: StorageConfig, tmp_path: Path
) -> None:
    uri = f"s3://{bucket}/{base}/no/such/checkpoint/"
    with pytest.raises(FetchError) as caught:
        fetch_checkpoint(uri, tmp_path / "cache", config=config)
    assert caught.value.kind == "not-found"
    assert uri in str(caught.value)
    assert not any((tmp_path / "cache").glob("*/"))  # no empty cache entry left behind


def test_missing_bucket_is_not_found(config: StorageConfig, tmp_path: Path) -> None:
    with pytest.raises(FetchError) as caught:
        fetch_checkpoint("s3://no-such-bucket-here/x/", tmp_path / "cache", config=config)
    assert caught.value.kind == "not-found"
    assert "s3://no-such-bucket-here/x/" in str(caught.value)


def test_unreachable_endpoint_fails_fast(closed_port: int, tmp_path: Path) -> None:
    config = StorageConfig(
        endpoint=f"http://127.0.0.1:{closed_port}", access_key_id="AK", secret_access_key="SK"
    )
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        fetch_checkpoint("s3://bucket/ckpt/", tmp_path / "cache", config=config)
    assert time.monotonic() - started < 15
    assert caught.value.kind == "unreachable"
    assert "s3://bucket/ckpt/" in str(caught.value)


def test_pickle_only_checkpoint_is_refused(
    s3_server: SeaweedS3, bucket: str, base: str, config: StorageConfig, tmp_path: Path
) -> None:
    source = tmp_path / "pickled"
    source.mkdir()
    for name, data in PICKLES.items():
        (source / name).write_bytes(data)
    (source / "config.json").write_text("{}")
    upload_tree(s3_server, bucket, source, f"{base}/pickled")
    with pytest.raises(FetchError) as caught:
        fetch_checkpoint(f"s3://{bucket}/{base}/pickled/", tmp_path / "cache", config=config)
    assert caught.value.kind == "invalid-checkpoint"
    assert "not a safetensors checkpoint" in str(caught.value)


def test_index_naming_a_missing_shard(
    s3_server: SeaweedS3, bucket: str, base: str, config: StorageConfig, tmp_path: Path
) -> None:
    source = write_sharded(tmp_path / "src")
    (source / SHARDS[1]).unlink()
    upload_tree(s3_server, bucket, source, f"{base}/broken")
    with pytest.raises(FetchError) as caught:
        fetch_checkpoint(f"s3://{bucket}/{base}/broken/", tmp_path / "cache", config=config)
    assert caught.value.kind == "invalid-checkpoint"
    assert SHARDS[1] in str(caught.value)
    assert f"s3://{bucket}/{base}/broken/" in str(caught.value)


# --- uploading ------------------------------------------------------------------------------


def test_upload_directory_round_trip(
    bucket: str, base: str, config: StorageConfig, tmp_path: Path
) -> None:
    source = write_sharded(tmp_path / "merged")
    (source / ".fetch-manifest.json").write_text("{}")  # hidden files stay home
    (source / "results").mkdir()
    (source / "results" / "scores.json").write_text('{"gsm8k": 0.5}')
    uri = f"s3://{bucket}/{base}/merged/run-1/"

    uploaded = upload_directory(source, uri, config=config)
    assert set(uploaded) == {*SHARDS, INDEX_FILE, *AUX_FILES, "results/scores.json"}
    assert uploaded[-1] == "config.json"

    fetched = fetch_checkpoint(uri, tmp_path / "cache", config=config)
    for shard in SHARDS:
        assert_same_tensors(fetched / shard, source / shard)
    assert (fetched / INDEX_FILE).read_text() == (source / INDEX_FILE).read_text()


def test_upload_to_a_local_directory(tmp_path: Path) -> None:
    source = write_single(tmp_path / "merged", pickles=False)
    target = tmp_path / "out" / "model"
    upload_directory(source, f"file://{target}")
    assert fetch_checkpoint(str(target), tmp_path / "cache") == target
    assert_same_tensors(target / WEIGHTS_FILE, source / WEIGHTS_FILE)


def test_upload_with_wrong_key_is_access_denied(
    s3_server: SeaweedS3, bucket: str, base: str, tmp_path: Path
) -> None:
    wrong = StorageConfig(
        endpoint=s3_server.endpoint, access_key_id="AKNOBODY", secret_access_key="nope-nope"
    )
    uri = f"s3://{bucket}/{base}/denied/"
    with pytest.raises(FetchError) as caught:
        upload_directory(write_single(tmp_path / "m", pickles=False), uri, config=wrong)
    assert caught.value.kind == "access-denied"
    assert uri in str(caught.value)


# --- configuration from the environment, concurrency between processes ---------------------


def test_credentials_from_a_mounted_secret_directory(
    s3_server: SeaweedS3, single_uri: str, tmp_path: Path
) -> None:
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    for key, value in s3_server.env().items():
        (secret_dir / key).write_text(value + "\n")
    config = StorageConfig.from_env({ENV_CREDENTIALS: str(secret_dir)})
    path = fetch_checkpoint(single_uri, tmp_path / "cache", config=config)
    assert (path / WEIGHTS_FILE).is_file()


def test_concurrent_fetches_in_threads_share_one_copy(
    single_uri: str, config: StorageConfig, tmp_path: Path
) -> None:
    results: list[FetchResult] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(fetch_checkpoint_result(single_uri, tmp_path / "cache", config=config))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len({result.path for result in results}) == 1
    assert sum(bool(result.downloaded) for result in results) == 1
    assert_same_tensors(results[0].path / WEIGHTS_FILE, tmp_path / "src-single" / WEIGHTS_FILE)


FETCH_IN_CHILD = """
import json, sys
from pathlib import Path
from mergerunner.fetch import fetch_checkpoint_result
from mergerunner.shutdown import exit_without_finalization
result = fetch_checkpoint_result(sys.argv[1], Path(sys.argv[2]))
print(json.dumps({"path": str(result.path), "downloaded": list(result.downloaded)}))
exit_without_finalization(0)  # as every entry point that fetches does (obstore's runtime)
"""


@pytest.mark.slow
def test_concurrent_fetches_in_processes_configured_from_env(
    s3_server: SeaweedS3, sharded_uri: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.env(), PYTHONPATH=str(ROOT / "runner"))
    command = [sys.executable, "-X", "faulthandler", "-c", FETCH_IN_CHILD, sharded_uri]
    command.append(str(tmp_path / "cache"))
    children = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outputs: list[dict[str, Any]] = []
    for child in children:
        stdout, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, (stdout.decode(), stderr.decode())
        outputs.append(json.loads(stdout))
    assert len({output["path"] for output in outputs}) == 1
    downloads = sorted(name for output in outputs for name in output["downloaded"])
    assert downloads == sorted([*SHARDS, INDEX_FILE, *AUX_FILES])  # each file exactly once
    path = Path(outputs[0]["path"])
    for shard in SHARDS:
        assert_same_tensors(path / shard, tmp_path / "src-sharded" / shard)
