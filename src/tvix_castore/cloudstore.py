"""Object storage in the cloud (S3 and compatibles, GCS, Azure) through obstore.

``objectstore+s3://``, ``objectstore+gs://`` and ``objectstore+azure://`` URLs
build a :class:`CloudObjectStore`, on which the B §7.1 chunk layout sits
exactly as on ``objectstore+file://``.

Credentials come from the URL's query (or the composition's options) or the
provider's standard environment variables. Where neither names any, the
store refuses to start instead of letting obstore fall back to a cloud
metadata endpoint (EC2 IMDS, GCE, Azure MSI): on a machine that is not in
that cloud the fallback hangs on an unroutable address. ``allow_metadata=1``
asks for that fallback explicitly; ``skip_signature=1`` is anonymous access.

A put is one atomic request (objects of ``multipart_size`` or more are
uploaded in parts and appear only when complete), so a reader sees either
nothing or the whole object. Requests are retried with exponential backoff
on connection errors and 5xx answers (``max_retries``, within
``retry_timeout`` seconds); at most ``max_concurrency`` run at once per store.
Failures that outlast the retries are :class:`StorageUnavailable` (503 /
UNAVAILABLE to clients); refused credentials are :class:`StorageError`.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from tvix_castore.errors import StorageError, StorageUnavailable
from tvix_castore.objectstore import ObjectStore
from tvix_castore.registry import ServiceUrl

if TYPE_CHECKING:
    import obstore.store
    from obstore.store import ClientConfig, RetryConfig

__all__ = ["CLOUD_SCHEMES", "CloudObjectStore", "cloud_store_from_url"]

CLOUD_SCHEMES = ("objectstore+s3", "objectstore+gs", "objectstore+azure")
_MULTIPART_SIZE = 8 << 20
_DEFAULT_CONCURRENCY = 16

# Environment variables that name credentials (no metadata endpoint is needed then).
_S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
_GCS_ENV = (
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_BEARER_TOKEN",
)
_AZURE_ENV = (
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_STORAGE_USE_EMULATOR",
    "AZURE_STORAGE_TOKEN",
)
# URL query parameters passed to obstore as configuration, per provider.
_S3_KEYS = ("endpoint", "region", "access_key_id", "secret_access_key", "session_token")
_GCS_KEYS = ("service_account", "service_account_key", "application_credentials")
_AZURE_KEYS = ("account_name", "account_key", "sas_key", "client_id", "client_secret", "tenant_id")
_COMMON = (
    "avg_chunk_size",
    "allow_http",
    "allow_metadata",
    "skip_signature",
    "max_concurrency",
    "max_retries",
    "retry_timeout",
    "timeout",
)


class CloudObjectStore(ObjectStore):
    """Keys as objects in a bucket (under a prefix), through an obstore store."""

    # Asking whether a small object exists costs as much as writing it.
    cheap_exists = False

    def __init__(
        self,
        store: obstore.store.ObjectStore,
        description: str,
        *,
        max_concurrency: int = _DEFAULT_CONCURRENCY,
    ) -> None:
        self._store = store
        self.description = description
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self.upload_concurrency = max_concurrency
        self._counts: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def request_counts(self) -> dict[str, int]:
        """How many requests of each kind (get, head, put) this store sent so far."""
        with self._count_lock:
            return dict(self._counts)

    def _count(self, kind: str) -> None:
        with self._count_lock:
            self._counts[kind] += 1

    def _fail(self, what: str, key: str, exc: Exception) -> StorageError:
        from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

        message = f"{what} {key} in {self.description}: {exc}"
        if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)):
            return StorageError(f"access refused: {message}")
        return StorageUnavailable(message)

    def get_sync(self, key: str) -> bytes | None:
        import obstore
        from obstore.exceptions import NotFoundError

        self._count("get")
        with self._slots:
            try:
                return obstore.get(self._store, key).bytes().to_bytes()
            except (NotFoundError, FileNotFoundError):
                return None
            except Exception as exc:
                raise self._fail("reading", key, exc) from exc

    def _head(self, key: str) -> int | None:
        import obstore
        from obstore.exceptions import NotFoundError

        self._count("head")
        with self._slots:
            try:
                return int(obstore.head(self._store, key)["size"])
            except (NotFoundError, FileNotFoundError):
                return None
            except Exception as exc:
                raise self._fail("looking up", key, exc) from exc

    def exists_sync(self, key: str) -> bool:
        return self._head(key) is not None

    def size_sync(self, key: str) -> int | None:
        return self._head(key)

    def put_sync(self, key: str, data: bytes) -> None:
        import obstore

        self._count("put")
        with self._slots:
            try:
                obstore.put(
                    self._store,
                    key,
                    data,
                    use_multipart=len(data) >= _MULTIPART_SIZE,
                    chunk_size=_MULTIPART_SIZE,
                    max_concurrency=4,
                )
            except Exception as exc:
                raise self._fail("writing", key, exc) from exc

    def list_sync(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        """(key, size, last modified as a Unix time) of every object under ``prefix``."""
        import obstore

        self._count("list")
        try:
            for batch in obstore.list(self._store, prefix, chunk_size=1000):
                for meta in batch:
                    yield meta["path"], int(meta["size"]), meta["last_modified"].timestamp()
        except Exception as exc:
            raise self._fail("listing", prefix, exc) from exc

    def delete_sync(self, keys: Sequence[str]) -> None:
        """Delete these objects (in bulk requests; an absent one is no error)."""
        import obstore

        for i in range(0, len(keys), 1000):
            self._count("delete")
            with self._slots:
                try:
                    obstore.delete(self._store, list(keys[i : i + 1000]))
                except Exception as exc:
                    raise self._fail("deleting", keys[i], exc) from exc


def _seconds(url: ServiceUrl, name: str, default: int, high: int) -> timedelta:
    value = url.get_int(name, 1, high)
    return timedelta(seconds=default if value is None else value)


def _bucket_and_prefix(url: ServiceUrl, what: str) -> tuple[str, str | None]:
    if "@" in url.host or ":" in url.host:
        raise url.error(f"{url.scheme}://{what}/prefix: the host part is the {what} name only")
    if not url.host:
        raise url.error(f"{url.scheme}:// needs a {what} name ({url.scheme}://{what}/prefix)")
    prefix = url.path.strip("/")
    if "//" in prefix or "\0" in prefix:
        raise url.error("the prefix may not contain empty segments or NUL")
    return url.host, prefix or None


def _config(url: ServiceUrl, keys: tuple[str, ...]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for key in keys:
        value = url.get(key)
        if value is not None:
            if not value:
                raise url.error(f"{key} is empty")
            config[key] = value
    return config


def _refuse_metadata(url: ServiceUrl, config: dict[str, Any], named: tuple[str, ...]) -> None:
    """Refuse a store that would fetch credentials from a metadata endpoint, unless asked."""
    if url.get_flag("allow_metadata") or url.get_flag("skip_signature"):
        return
    if any(k in config for k in named) or any(os.environ.get(v) for v in _ENV[url.scheme]):
        return
    raise url.error(
        "no credentials: give them in the URL or the composition"
        f" ({', '.join(named)}) or the environment ({', '.join(_ENV[url.scheme])});"
        " add allow_metadata=1 to fetch them from the cloud's metadata endpoint,"
        " or skip_signature=1 for anonymous access"
    )


_ENV = {"objectstore+s3": _S3_ENV, "objectstore+gs": _GCS_ENV, "objectstore+azure": _AZURE_ENV}


def cloud_store_from_url(url: ServiceUrl) -> tuple[CloudObjectStore, int | None]:
    """The store an ``objectstore+{s3,gs,azure}://`` URL names, and its ``avg_chunk_size``.

    Raises:
        ConfigError: an unknown parameter, a malformed value, or no credentials.
    """
    from tvix_castore.registry import MAX_AVG_CHUNK_SIZE, MIN_AVG_CHUNK_SIZE

    provider = {"objectstore+s3": _S3_KEYS, "objectstore+gs": _GCS_KEYS}.get(
        url.scheme, _AZURE_KEYS
    )
    url.check_query(*_COMMON, *provider)
    avg = url.get_int("avg_chunk_size", MIN_AVG_CHUNK_SIZE, MAX_AVG_CHUNK_SIZE)
    concurrency = url.get_int("max_concurrency", 1, 1024) or _DEFAULT_CONCURRENCY
    retries = url.get_int("max_retries", 0, 100)
    client: ClientConfig = {
        "connect_timeout": timedelta(seconds=5),
        "timeout": _seconds(url, "timeout", 120, 86400),
        "allow_http": url.get_flag("allow_http"),
    }
    retry: RetryConfig = {
        "max_retries": 3 if retries is None else retries,
        "retry_timeout": _seconds(url, "retry_timeout", 15, 3600),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=2),
            "base": 2,
        },
    }
    config = _config(url, provider)
    if url.get_flag("skip_signature"):
        config["skip_signature"] = True
    from obstore import store as obs

    try:
        if url.scheme == "objectstore+s3":
            bucket, prefix = _bucket_and_prefix(url, "bucket")
            if ("access_key_id" in config) != ("secret_access_key" in config):
                raise url.error("give both access_key_id and secret_access_key, or neither")
            _refuse_metadata(url, config, ("access_key_id", "secret_access_key"))
            if "region" not in config and not os.environ.get("AWS_REGION"):
                config["region"] = os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            made: obstore.store.ObjectStore = obs.S3Store(
                bucket, prefix=prefix, client_options=client, retry_config=retry, **config
            )
        elif url.scheme == "objectstore+gs":
            bucket, prefix = _bucket_and_prefix(url, "bucket")
            _refuse_metadata(url, config, _GCS_KEYS)
            made = obs.GCSStore(
                bucket, prefix=prefix, client_options=client, retry_config=retry, **config
            )
        else:
            container, prefix = _bucket_and_prefix(url, "container")
            _refuse_metadata(url, config, ("account_key", "sas_key", "client_secret"))
            made = obs.AzureStore(
                container, prefix=prefix, client_options=client, retry_config=retry, **config
            )
    except ValueError as exc:  # (obstore's configuration errors)
        raise url.error(f"invalid configuration: {exc}") from exc
    shown = url.url.split("?", 1)[0]
    return CloudObjectStore(made, shown, max_concurrency=concurrency), avg
