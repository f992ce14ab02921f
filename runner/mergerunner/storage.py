"""Where checkpoints live and how to reach them: URIs, endpoint and credentials, object stores.

Endpoint and credentials never come from the trial document (which is stored in the cluster,
printed and logged): they come from the process environment and from a directory of secret
files, the shape a Kubernetes Secret takes when mounted as a volume. Secrets are kept out of
every `repr` and scrubbed from error messages.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from mergerunner.contract import ENV_CREDENTIALS
from mergerunner.trial import FailureKind

if TYPE_CHECKING:
    from obstore.store import ObjectStore


AWS_CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
AWS_SETTING_KEYS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
GCS_KEYS = (
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_BASE_URL",
)
AZURE_KEYS = (
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_TOKEN",
    "AZURE_STORAGE_CLIENT_ID",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_STORAGE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_STORAGE_ENDPOINT",
    "AZURE_STORAGE_USE_EMULATOR",
)
SECRET_FILE_NAMES = AWS_CREDENTIAL_KEYS + AWS_SETTING_KEYS + GCS_KEYS + AZURE_KEYS

# Values of these keys are secrets: never shown, scrubbed from messages.
SECRET_KEYS = frozenset(
    {
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "GOOGLE_SERVICE_ACCOUNT_KEY",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_SAS_KEY",
        "AZURE_STORAGE_TOKEN",
        "AZURE_STORAGE_CLIENT_SECRET",
    }
)

Scheme = Literal["s3", "gs", "az", "file"]
SCHEME_ALIASES: dict[str, Scheme] = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "az": "az",
    "azure": "az",
    "file": "file",
}

ErrorKind = Literal[
    "not-found", "access-denied", "unreachable", "invalid-checkpoint", "config", "io", "storage"
]


# What each fetch error means for the search: a user's mistake is fatal, an outage of the store
# (unreachable, or a store-side error such as a 5xx or bytes that arrived wrong) is retried,
# a local disk problem counts as a failed trial.
_FAILURE_KINDS: dict[ErrorKind, FailureKind] = {
    "not-found": FailureKind.CHECKPOINT_UNAVAILABLE,
    "access-denied": FailureKind.CHECKPOINT_UNAVAILABLE,
    "invalid-checkpoint": FailureKind.CHECKPOINT_INVALID,
    "config": FailureKind.CONFIG,
    "unreachable": FailureKind.STORAGE_UNAVAILABLE,
    "storage": FailureKind.STORAGE_UNAVAILABLE,
    "io": FailureKind.INTERNAL,
}


class FetchError(Exception):
    """The one error of fetching and uploading: names the URI, the kind of failure and its cause.

    `kind` lets a caller tell a user's mistake (not-found, access-denied, invalid-checkpoint,
    config) from an outage (unreachable) without parsing the message; `failure_kind` is the
    same decision in the trial contract's terms.
    """

    def __init__(self, uri: str, kind: ErrorKind, cause: str) -> None:
        self.uri = uri
        self.kind = kind
        self.cause = cause
        super().__init__(f"{uri}: {kind.replace('-', ' ')}: {cause}")

    @property
    def failure_kind(self) -> FailureKind:
        return _FAILURE_KINDS[self.kind]


@dataclass(frozen=True)
class Location:
    """A parsed checkpoint URI: a store (scheme + bucket) and a prefix (a "directory") in it.

    For `file` the prefix is an absolute local path and the bucket is empty.
    """

    scheme: Scheme
    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        """The normalised URI: one spelling per location, hence one cache entry."""
        if self.scheme == "file":
            return f"file://{self.prefix}"
        suffix = f"{self.prefix}/" if self.prefix else ""
        return f"{self.scheme}://{self.bucket}/{suffix}"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"


def parse_uri(uri: str) -> Location:
    """Parse `s3://bucket/prefix/`, `gs://…`, `az://container/…`, `file:///path` or a path."""
    text = uri.strip()
    if not text:
        raise FetchError(uri, "config", "empty URI")
    if "://" not in text:
        return Location("file", "", str(Path(text).expanduser().resolve()))
    parts = urlsplit(text)
    scheme = SCHEME_ALIASES.get(parts.scheme.lower())
    if scheme is None:
        known = ", ".join(sorted({f"{s}://" for s in SCHEME_ALIASES.values()}))
        raise FetchError(uri, "config", f"unsupported scheme {parts.scheme!r} (use {known})")
    if parts.query or parts.fragment:
        raise FetchError(uri, "config", "a query or fragment is not allowed in a storage URI")
    if scheme == "file":
        return _parse_file_uri(uri, parts.netloc, parts.path)
    if not parts.netloc:
        raise FetchError(uri, "config", "no bucket in the URI")
    return Location(scheme, parts.netloc, _normalise_prefix(uri, unquote(parts.path)))


def _parse_file_uri(uri: str, host: str, path: str) -> Location:
    if host not in ("", "localhost"):
        raise FetchError(uri, "config", f"file:// URI on another host {host!r}")
    if not path:
        raise FetchError(uri, "config", "no path in the file:// URI")
    return Location("file", "", str(Path(unquote(path)).resolve()))


def _normalise_prefix(uri: str, path: str) -> str:
    segments = [segment for segment in path.split("/") if segment]
    if any(segment in (".", "..") for segment in segments):
        raise FetchError(uri, "config", "'.' and '..' are not allowed in an object prefix")
    return "/".join(segments)


@dataclass(frozen=True)
class StorageConfig:
    """How to reach object storage; build it with `from_env()` in the runner.

    The timeouts and retries are deliberately short for connecting (an unreachable endpoint must
    fail in seconds, not minutes) and long for a whole request (a multi-gigabyte shard part on a
    slow link must not be cut off).
    """

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    gcs: Mapping[str, str] = field(default_factory=dict, repr=False)
    azure: Mapping[str, str] = field(default_factory=dict, repr=False)
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 900.0
    max_retries: int = 3
    retry_timeout_s: float = 20.0
    verify_md5_etag: bool = True

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        credentials_dir: Path | str | None = None,
    ) -> StorageConfig:
        """Read the standard AWS / Google / Azure variables and the secret-file directory.

        A variable set in the environment wins over a file of the same name. The AWS key pair
        (with its session token) is taken as a whole from one source, never one half from each.
        """
        env = os.environ if environ is None else environ
        directory = credentials_dir or env.get(ENV_CREDENTIALS) or None
        files = read_secret_dir(Path(directory)) if directory else {}
        merged = {**files, **{k: v for k, v in env.items() if k in SECRET_FILE_NAMES and v}}
        pair_source = env if env.get("AWS_ACCESS_KEY_ID") else files
        return cls(
            endpoint=merged.get("AWS_ENDPOINT_URL_S3") or merged.get("AWS_ENDPOINT_URL"),
            region=merged.get("AWS_REGION") or merged.get("AWS_DEFAULT_REGION"),
            access_key_id=pair_source.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=pair_source.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=pair_source.get("AWS_SESSION_TOKEN") or None,
            gcs={k.lower(): merged[k] for k in GCS_KEYS if k in merged},
            azure={k.lower(): merged[k] for k in AZURE_KEYS if k in merged},
        )

    def secrets(self) -> list[str]:
        """Every secret value this configuration holds, for scrubbing messages."""
        values = [self.secret_access_key, self.session_token]
        values += [v for k, v in {**self.gcs, **self.azure}.items() if k.upper() in SECRET_KEYS]
        return [v for v in values if v]

    def s3_options(self, bucket: str) -> dict[str, Any]:
        """obstore's S3 configuration: only what is set, so obstore's own defaults apply."""
        options: dict[str, Any] = {
            "bucket": bucket,
            "endpoint": self.endpoint,
            "region": self.region or ("us-east-1" if self.endpoint else None),
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "session_token": self.session_token,
        }
        return {k: v for k, v in options.items() if v is not None}

    def client_options(self, scheme: Scheme = "s3") -> dict[str, Any]:
        """HTTP client options; plain http only towards an endpoint the user named as http://."""
        endpoint = {
            "s3": self.endpoint,
            "gs": self.gcs.get("google_base_url"),
            "az": self.azure.get("azure_storage_endpoint"),
        }.get(scheme)
        return {
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
            "connect_timeout": timedelta(seconds=self.connect_timeout_s),
            "timeout": timedelta(seconds=self.request_timeout_s),
        }

    def retry_options(self) -> dict[str, Any]:
        backoff = {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=2),
            "base": 2,
        }
        return {
            "max_retries": self.max_retries,
            "retry_timeout": timedelta(seconds=self.retry_timeout_s),
            "backoff": backoff,
        }


def read_secret_dir(directory: Path) -> dict[str, str]:
    """Read the known secret files of a mounted Secret; unknown files are left unread.

    Kubernetes mounts each key as a file (through `..data` symlinks); values often end with a
    newline added by whoever created the secret, which is never part of a key.
    """
    if not directory.is_dir():
        raise FetchError(str(directory), "config", f"{ENV_CREDENTIALS} is not a directory")
    values = {}
    for name in SECRET_FILE_NAMES:
        path = directory / name
        if path.is_file():
            value = path.read_text(encoding="utf-8").strip()
            if value:
                values[name] = value
    return values


def make_store(location: Location, config: StorageConfig) -> ObjectStore:
    """The obstore store rooted at the location's prefix (paths in it are relative names)."""
    from obstore.store import AzureStore, GCSStore, S3Store

    common: dict[str, Any] = {
        "prefix": location.prefix or None,
        "client_options": config.client_options(location.scheme),
        "retry_config": config.retry_options(),
    }
    try:
        if location.scheme == "s3":
            return S3Store(config=config.s3_options(location.bucket), **common)
        if location.scheme == "gs":
            return GCSStore(location.bucket, config=dict(config.gcs), **common)
        if location.scheme == "az":
            return AzureStore(location.bucket, config=dict(config.azure), **common)
    except Exception as error:  # obstore validates its configuration when a store is built
        raise storage_error(location.uri, error, config, kind="config") from error
    raise FetchError(location.uri, "config", "a local path has no object store")


# --- translating the library's errors into FetchError ------------------------------------------

_S3_ERROR = re.compile(r"<Code>(?P<code>[^<]*)</Code>\s*(?:<Message>(?P<message>[^<]*)</Message>)?")
_DENIED_CODES = {
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "AuthenticationFailed",
    "AuthorizationFailure",
}
_MISSING_CODES = {"NoSuchBucket", "NoSuchKey", "ContainerNotFound", "BlobNotFound"}
MIN_SCRUBBED_LENGTH = 4
_TIMING = re.compile(r" in [0-9.]+(?:ns|µs|us|ms|s)\b")
_UNREACHABLE_HINTS = (
    "error sending request",
    "connection refused",
    "dns error",
    "timed out",
    "operation timed out",
    "connection reset",
)


def storage_error(
    uri: str,
    error: BaseException,
    config: StorageConfig | None,
    *,
    kind: ErrorKind | None = None,
) -> FetchError:
    """Classify a store error (unless `kind` is given) and keep a short, secret-free cause."""
    text = str(error)
    match = _S3_ERROR.search(text)
    code = match.group("code") if match else ""
    kind = kind or _classify(error, text, code)
    cause = _short_cause(text, match)
    for secret in config.secrets() if config else []:
        if len(secret) >= MIN_SCRUBBED_LENGTH:  # a one-letter "secret" would blank out the URL
            cause = cause.replace(secret, "***")
    hint = {
        "access-denied": " (check the access key and secret)",
        "unreachable": " (check the endpoint URL and that the server is up)",
    }.get(kind, "")
    return FetchError(uri, kind, cause + hint)


def _classify(error: BaseException, text: str, code: str) -> ErrorKind:
    from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

    lowered = text.lower()
    if isinstance(error, PermissionDeniedError | UnauthenticatedError) or code in _DENIED_CODES:
        return "access-denied"
    if isinstance(error, FileNotFoundError) or code in _MISSING_CODES:
        return "not-found"
    if "403 forbidden" in lowered or "401 unauthorized" in lowered:
        return "access-denied"
    if "404 not found" in lowered:
        return "not-found"
    if any(hint in lowered for hint in _UNREACHABLE_HINTS):
        return "unreachable"
    return "storage"


def _short_cause(text: str, match: re.Match[str] | None) -> str:
    """One line: the library's summary (without its debug dump) and the server's error code."""
    summary = text.split("Debug source:")[0].strip().splitlines()[0] if text.strip() else ""
    summary = summary.split(": <?xml")[0].strip().removeprefix("Generic ")
    summary = _TIMING.sub("", summary)
    if match:
        message = (match.group("message") or "").strip()
        summary += (
            f" [{match.group('code')}: {message}]" if message else f" [{match.group('code')}]"
        )
    return summary[:600] or "unknown error"
