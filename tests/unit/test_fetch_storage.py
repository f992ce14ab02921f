"""URIs, endpoint/credential configuration and store construction, without any server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from obstore.exceptions import PermissionDeniedError
from obstore.store import AzureStore, GCSStore, S3Store

from mergerunner.storage import (
    ENV_CREDENTIALS,
    FetchError,
    Location,
    StorageConfig,
    make_store,
    parse_uri,
    storage_error,
)

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_ambient_cloud_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """obstore reads AWS_/GOOGLE_/AZURE_ variables itself; a developer's own must not leak in."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "GOOGLE_", "AZURE_")) or name == ENV_CREDENTIALS:
            monkeypatch.delenv(name)


# --- URIs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/prefix/", Location("s3", "bucket", "prefix")),
        ("s3://bucket/prefix", Location("s3", "bucket", "prefix")),
        ("S3://bucket//a///b/", Location("s3", "bucket", "a/b")),
        ("s3a://bucket/a/b", Location("s3", "bucket", "a/b")),
        ("s3://bucket", Location("s3", "bucket", "")),
        ("gs://gbucket/ckpt/x/", Location("gs", "gbucket", "ckpt/x")),
        ("gcs://gbucket/ckpt", Location("gs", "gbucket", "ckpt")),
        ("az://container/ckpt/", Location("az", "container", "ckpt")),
        ("s3://bucket/with%20space/", Location("s3", "bucket", "with space")),
    ],
)
def test_parse_remote_uris(uri: str, expected: Location) -> None:
    assert parse_uri(uri) == expected


def test_equivalent_spellings_normalise_to_one_uri() -> None:
    spellings = ["s3://b/x/y", "s3://b/x/y/", "s3://b//x/y//", "s3a://b/x/y"]
    assert {parse_uri(s).uri for s in spellings} == {"s3://b/x/y/"}
    assert parse_uri("s3://b").uri == "s3://b/"


def test_local_paths_and_file_uris(tmp_path: Path) -> None:
    plain = parse_uri(str(tmp_path / "ckpt" / ".." / "ckpt"))
    assert plain == Location("file", "", str(tmp_path / "ckpt"))
    assert parse_uri(f"file://{tmp_path}/ckpt") == plain
    assert parse_uri(f"file://localhost{tmp_path}/ckpt") == plain
    assert plain.is_local
    assert plain.uri == f"file://{tmp_path}/ckpt"


def test_relative_path_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_uri("models/a").prefix == str(tmp_path / "models" / "a")


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "empty"),
        ("http://host/x", "unsupported scheme"),
        ("s3:///prefix", "no bucket"),
        ("s3://b/../x", "'..'"),
        ("s3://b/x?versionId=1", "query"),
        ("file://otherhost/x", "another host"),
    ],
)
def test_bad_uris_fail_with_config_error(uri: str, fragment: str) -> None:
    with pytest.raises(FetchError) as caught:
        parse_uri(uri)
    assert caught.value.kind == "config"
    assert fragment in str(caught.value)


# --- configuration from the environment and from secret files -------------------------------


def test_from_env_reads_standard_aws_variables() -> None:
    config = StorageConfig.from_env(
        {
            "AWS_ENDPOINT_URL": "http://store:8333",
            "AWS_ACCESS_KEY_ID": "AKID",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
            "AWS_SESSION_TOKEN": "tok-value",
            "AWS_DEFAULT_REGION": "eu-west-1",
        }
    )
    assert config.endpoint == "http://store:8333"
    assert config.access_key_id == "AKID"
    assert config.secret_access_key == "s3cr3t-value"
    assert config.session_token == "tok-value"
    assert config.region == "eu-west-1"


def test_service_specific_endpoint_and_region_take_precedence() -> None:
    config = StorageConfig.from_env(
        {
            "AWS_ENDPOINT_URL": "http://generic:1",
            "AWS_ENDPOINT_URL_S3": "http://s3-only:2",
            "AWS_REGION": "us-west-2",
            "AWS_DEFAULT_REGION": "eu-west-1",
        }
    )
    assert config.endpoint == "http://s3-only:2"
    assert config.region == "us-west-2"


def write_secret_dir(directory: Path, values: dict[str, str]) -> Path:
    """Lay files out as Kubernetes does for a mounted Secret: keys behind `..data` symlinks."""
    data = directory / "..2026_01_01_00_00_00.000000001"
    data.mkdir(parents=True)
    for key, value in values.items():
        (data / key).write_text(value)
    (directory / "..data").symlink_to(data.name)
    for key in values:
        (directory / key).symlink_to(Path("..data") / key)
    return directory


def test_from_secret_dir_like_a_mounted_kubernetes_secret(tmp_path: Path) -> None:
    secret_dir = write_secret_dir(
        tmp_path / "secret",
        {
            "AWS_ACCESS_KEY_ID": "AKFILE\n",
            "AWS_SECRET_ACCESS_KEY": "file-secret\n",
            "AWS_ENDPOINT_URL": "http://object-store:8333\n",
            "unrelated-key": "ignored",
        },
    )
    config = StorageConfig.from_env({ENV_CREDENTIALS: str(secret_dir)})
    assert config.access_key_id == "AKFILE"
    assert config.secret_access_key == "file-secret"
    assert config.endpoint == "http://object-store:8333"


def test_env_wins_over_files_and_key_pairs_are_never_mixed(tmp_path: Path) -> None:
    secret_dir = write_secret_dir(
        tmp_path / "secret",
        {
            "AWS_ACCESS_KEY_ID": "AKFILE",
            "AWS_SECRET_ACCESS_KEY": "file-secret",
            "AWS_SESSION_TOKEN": "file-token",
            "AWS_ENDPOINT_URL": "http://from-file:1",
            "AWS_REGION": "file-region",
        },
    )
    env = {
        ENV_CREDENTIALS: str(secret_dir),
        "AWS_ACCESS_KEY_ID": "AKENV",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "AWS_ENDPOINT_URL": "http://from-env:2",
    }
    config = StorageConfig.from_env(env)
    assert (config.access_key_id, config.secret_access_key) == ("AKENV", "env-secret")
    assert config.session_token is None  # the file's token belongs to the file's key
    assert config.endpoint == "http://from-env:2"
    assert config.region == "file-region"  # unset in the environment, so the file fills in


def test_explicit_credentials_dir_argument(tmp_path: Path) -> None:
    secret_dir = write_secret_dir(tmp_path / "s", {"AWS_ACCESS_KEY_ID": "AK2"})
    assert StorageConfig.from_env({}, credentials_dir=secret_dir).access_key_id == "AK2"


def test_missing_credentials_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as caught:
        StorageConfig.from_env({ENV_CREDENTIALS: str(tmp_path / "absent")})
    assert caught.value.kind == "config"
    assert ENV_CREDENTIALS in str(caught.value)


def test_secrets_never_appear_in_repr() -> None:
    config = StorageConfig.from_env(
        {
            "AWS_ACCESS_KEY_ID": "AKID",
            "AWS_SECRET_ACCESS_KEY": "very-secret-value",
            "AWS_SESSION_TOKEN": "session-token-value",
            "AZURE_STORAGE_ACCOUNT_KEY": "azure-key-value",
        }
    )
    text = repr(config) + str(config)
    for secret in ("very-secret-value", "session-token-value", "azure-key-value"):
        assert secret not in text
    assert set(config.secrets()) == {"very-secret-value", "session-token-value", "azure-key-value"}


def test_google_and_azure_settings_from_env_and_files(tmp_path: Path) -> None:
    secret_dir = write_secret_dir(
        tmp_path / "s", {"GOOGLE_SERVICE_ACCOUNT_KEY": '{"type": "service_account"}'}
    )
    config = StorageConfig.from_env(
        {
            ENV_CREDENTIALS: str(secret_dir),
            "AZURE_STORAGE_ACCOUNT_NAME": "acct",
            "AZURE_STORAGE_ACCOUNT_KEY": "a2V5",
        }
    )
    assert config.gcs == {"google_service_account_key": '{"type": "service_account"}'}
    assert config.azure == {
        "azure_storage_account_name": "acct",
        "azure_storage_account_key": "a2V5",
    }


# --- store construction: the right obstore store with the right settings --------------------


def test_s3_store_gets_endpoint_credentials_and_prefix() -> None:
    config = StorageConfig(
        endpoint="http://127.0.0.1:8333",
        access_key_id="AKID",
        secret_access_key="secret-key",
        session_token="token",
    )
    store = make_store(parse_uri("s3://ckpts/runs/a/"), config)
    assert isinstance(store, S3Store)
    assert store.prefix == "runs/a"
    assert store.config["bucket"] == "ckpts"
    assert store.config["endpoint"] == "http://127.0.0.1:8333"
    assert store.config["access_key_id"] == "AKID"
    assert store.config["secret_access_key"] == "secret-key"
    assert store.config["session_token"] == "token"
    assert store.config["region"] == "us-east-1"
    assert store.client_options["allow_http"] in (True, "true")
    assert store.retry_config["max_retries"] == config.max_retries


def test_https_endpoint_keeps_plain_http_disallowed() -> None:
    options = StorageConfig(endpoint="https://s3.example.com").client_options("s3")
    assert options["allow_http"] is False


def test_gcs_store_for_gs_uri() -> None:
    config = StorageConfig(gcs={"google_base_url": "https://storage.example.com"})
    store = make_store(parse_uri("gs://gbucket/ckpt/sft-a/"), config)
    assert isinstance(store, GCSStore)
    assert store.config["bucket"] == "gbucket"
    assert store.prefix == "ckpt/sft-a"
    assert store.client_options["allow_http"] in (False, "false")


def test_azure_store_for_az_uri() -> None:
    config = StorageConfig(
        azure={"azure_storage_account_name": "acct", "azure_storage_account_key": "a2V5"}
    )
    store = make_store(parse_uri("az://container/ckpt/po-b"), config)
    assert isinstance(store, AzureStore)
    assert store.config["container_name"] == "container"
    assert store.config["account_name"] == "acct"
    assert store.prefix == "ckpt/po-b"


def test_azure_without_account_is_a_config_error() -> None:
    with pytest.raises(FetchError) as caught:
        make_store(parse_uri("az://container/x"), StorageConfig())
    assert caught.value.kind == "config"
    assert "az://container/x/" in str(caught.value)


# --- translating library errors -------------------------------------------------------------

DENIED_BODY = (
    "Generic S3 error: Error performing list request: Error performing GET "
    "http://127.0.0.1:9/b?list-type=2 in 1.1ms - Server returned non-2xx status code: "
    '403 Forbidden: <?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SignatureDoesNotMatch'
    "</Code><Message>The request signature we calculated does not match</Message></Error>"
    "\n\nDebug source:\nGeneric { store: S3 }"
)


def test_denied_error_is_classified_and_shortened() -> None:
    error = storage_error("s3://b/x/", RuntimeError(DENIED_BODY), None)
    assert error.kind == "access-denied"
    assert str(error).startswith("s3://b/x/: access denied:")
    assert "SignatureDoesNotMatch" in str(error)
    assert "Debug source" not in str(error)
    assert "<?xml" not in str(error)


def test_error_classes_map_to_kinds() -> None:
    assert storage_error("u", PermissionDeniedError("nope"), None).kind == "access-denied"
    assert storage_error("u", FileNotFoundError("Object at x not found"), None).kind == "not-found"
    unreachable = RuntimeError("Error performing GET http://127.0.0.1:1/b - error sending request")
    assert storage_error("u", unreachable, None).kind == "unreachable"
    bucket = RuntimeError("404 Not Found: <Error><Code>NoSuchBucket</Code></Error>")
    assert storage_error("u", bucket, None).kind == "not-found"


def test_secrets_are_scrubbed_from_error_messages() -> None:
    config = StorageConfig(access_key_id="AK", secret_access_key="leaky-secret-123")
    error = storage_error("s3://b/", RuntimeError("bad header leaky-secret-123 sent"), config)
    assert "leaky-secret-123" not in str(error)
    assert "***" in str(error)
