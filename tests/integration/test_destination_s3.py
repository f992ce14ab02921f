"""Output destinations in object storage are checked before any work (a real S3 server)."""

from __future__ import annotations

from typing import Any

import pytest

from mergerunner.fetch import check_destination
from mergerunner.storage import FetchError, StorageConfig

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def config(s3_server: Any) -> StorageConfig:
    return s3_server.storage_config()


def test_remote_destinations(s3_server: Any, config: StorageConfig) -> None:
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    assert check_destination(f"s3://{bucket}/merged/new/", config=config) == "empty"
    client.put_object(Bucket=bucket, Key="merged/old/model.safetensors", Body=b"x")
    assert check_destination(f"s3://{bucket}/merged/old/", config=config) == "model"
    client.put_object(Bucket=bucket, Key="merged/notes/readme.txt", Body=b"x")
    with pytest.raises(FetchError) as caught:
        check_destination(f"s3://{bucket}/merged/notes/", config=config)
    assert caught.value.kind == "config" and "no model" in str(caught.value)


@pytest.mark.parametrize("problem", ["no-bucket", "wrong-key"])
def test_unusable_remote_destinations_are_config_errors(
    s3_server: Any, config: StorageConfig, problem: str
) -> None:
    uri = "s3://no-such-bucket-here/out/"
    if problem == "wrong-key":
        uri = f"s3://{s3_server.create_bucket()}/out/"
        config = StorageConfig(
            endpoint=s3_server.endpoint, access_key_id="AKNOBODY", secret_access_key="nope-nope"
        )
    with pytest.raises(FetchError) as caught:
        check_destination(uri, config=config)
    assert caught.value.kind == "config", caught.value
    assert uri in str(caught.value) and "output destination" in str(caught.value)
