"""What a download is checked against, and what an export replaces: the pure parts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mergerunner.fetch import (
    DIGEST_ATTRIBUTE,
    Expected,
    FetchError,
    RemoteObject,
    _PartHasher,
    _verify,
    expected_of,
    file_digest,
    files_to_replace,
    multipart_etag,
    part_size_candidates,
    upload_batches,
)

pytestmark = pytest.mark.unit
MiB = 2**20


def _etag(data: bytes, part: int) -> str:
    parts = [data[i : i + part] for i in range(0, len(data), part)]
    digests = b"".join(hashlib.md5(p, usedforsecurity=False).digest() for p in parts)
    return hashlib.md5(digests, usedforsecurity=False).hexdigest() + f"-{len(parts)}"


def _remote(data: bytes, etag: str | None) -> RemoteObject:
    return RemoteObject("model.safetensors", len(data), etag, "2026-01-01T00:00:00")


@pytest.mark.parametrize(("size", "part"), [(11 * MiB + 5, 5 * MiB), (40 * MiB, 8 * MiB)])
def test_part_size_candidates_hold_the_uploaders_part_size(size: int, part: int) -> None:
    parts = -(-size // part)
    candidates = part_size_candidates(size, parts)
    assert part in candidates and len(candidates) <= 4
    for p in candidates:
        assert (parts - 1) * p < size <= parts * p


def test_multipart_etag_is_checked_part_by_part(tmp_path: Path) -> None:
    data = os.urandom(11 * MiB + 123)
    file = tmp_path / "f"
    file.write_bytes(data)
    etag = _etag(data, 5 * MiB)
    remote = _remote(data, etag)
    assert multipart_etag(remote) == (etag[:32], 3)
    hasher = _PartHasher(5 * MiB)
    hasher.update(data[:100], 0)
    hasher.update(data[100:], 100)
    assert hasher.etag() == (etag[:32], 3)
    verified = _verify("s3://b/p/", remote, file, expected_of(remote, {}, None, True))
    assert verified.by == "multipart-etag"
    damaged = bytearray(data)
    damaged[7 * MiB] ^= 1
    file.write_bytes(bytes(damaged))
    assert _verify("s3://b/p/", remote, file, expected_of(remote, {}, None, True)).by == "size"


def test_our_digest_attribute_decides_and_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_bytes(b"weights")
    remote = _remote(b"weights", "0" * 32 + "-2")
    good = expected_of(remote, {DIGEST_ATTRIBUTE: file_digest(file)}, None, True)
    assert _verify("s3://b/p/", remote, file, good).by == "blake3-attribute"
    bad = expected_of(remote, {DIGEST_ATTRIBUTE: "0" * 64}, None, True)
    with pytest.raises(FetchError, match=r"model\.safetensors: BLAKE3 .* its upload's digest"):
        _verify("s3://b/p/", remote, file, bad)
    recorded = Expected(blake3="0" * 64, blake3_source="recorded")
    with pytest.raises(FetchError, match="the digest recorded when it was first fetched"):
        _verify("s3://b/p/", remote, file, recorded)


def test_an_export_replaces_a_model_and_leaves_other_things() -> None:
    old_sharded = [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "config.json",
        "tokenizer.model",
        "pytorch_model.bin",
        "README.md",
    ]
    assert files_to_replace(old_sharded) == sorted(set(old_sharded) - {"README.md"})
    assert files_to_replace(["config.json", "notes.txt", "README.md"]) == []  # no model there


def test_uploads_put_weights_first_and_config_last() -> None:
    files = ["config.json", "model.safetensors.index.json", "m-1.safetensors", "tokenizer.json"]
    assert upload_batches(files) == [
        ["m-1.safetensors"],
        ["model.safetensors.index.json", "tokenizer.json"],
        ["config.json"],
    ]
