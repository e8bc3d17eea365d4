"""``nix+http://`` / ``nix+https://``: substitute from a Nix binary cache (B §10, A5).

``get`` fetches ``<hash>.narinfo``, checks it names the requested path, is
signed by a trusted key (when keys are configured) and has a CA that fits its
store path (signatures do not cover the CA), then fetches the NAR
relative to the base URL, decompresses it with an output bound of NarSize,
ingests it into the configured blob/directory services and checks NarSize and
NarHash before anything refers to it. Connections are reused; transient
failures (5xx, connection errors, timeouts) are retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import urljoin

import aiohttp

from nix_compat import nixbase32
from nix_compat.errors import NixCompatError
from nix_compat.narinfo import NarInfo
from nix_compat.signing import VerifyingKey
from tvix_castore.blobservice.base import BlobService
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import (
    ConfigError,
    DataCorruption,
    StorageError,
    StorageUnavailable,
    ValidationError,
)
from tvix_castore.nodes import Node
from tvix_store.compression import COMPRESSIONS, DecompressingReader, decompressor
from tvix_store.nar.ingest import ingest_nar
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.base import PathInfoService
from tvix_store.telemetry import nar_ingested, traces, upstream_fetch
from tvix_store.verify import MetadataMismatch, check_ca_of

__all__ = ["NarTooLarge", "NixHttpPathInfoService", "UntrustedPath"]

log = logging.getLogger(__name__)
_MAX_NARINFO = 2 << 20


class UntrustedPath(DataCorruption):
    """The upstream narinfo is not signed by any trusted key."""


class NarTooLarge(DataCorruption):
    """The upstream NAR inflates beyond the NarSize its narinfo announced."""


class NixHttpPathInfoService(PathInfoService):
    """A read-only PathInfoService backed by an HTTP binary cache."""

    def __init__(
        self,
        base_url: str,
        blobs: BlobService,
        directories: DirectoryService,
        trusted_keys: list[VerifyingKey] | None = None,
        *,
        retries: int = 3,
        backoff: float = 0.2,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{base_url!r}: not an http(s) URL")
        if trusted_keys is not None and not trusted_keys:
            raise ConfigError(
                f"{base_url}: trusted-public-keys is empty; give at least one key or omit it"
            )
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._blobs = blobs
        self._dirs = directories
        self._keys = trusted_keys
        self._retries = retries
        self._backoff = backoff
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(limit=32)
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _open(self, url: str, kind: str) -> aiohttp.ClientResponse | None:
        """GET ``url`` with retries; ``None`` for 404/403; raise for other failures.

        The request carries the current trace context (``traceparent``).
        """
        delay = self._backoff
        headers: dict[str, str] = {}
        traces.inject(headers)
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                resp = await self._client().get(url, headers=headers)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                upstream_fetch(kind, "failure")
                if last:
                    raise StorageUnavailable(f"upstream {url} unreachable: {exc!r}") from exc
            else:
                if resp.status in (403, 404):
                    resp.release()
                    return None
                if resp.status < 300:
                    return resp
                resp.release()
                upstream_fetch(kind, "failure")
                if resp.status < 500 or last:
                    cls = StorageUnavailable if resp.status >= 500 else StorageError
                    raise cls(f"upstream {url} answered HTTP {resp.status}")
            log.info("retrying %s in %.1fs", url, delay)
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    async def get(self, digest: bytes) -> PathInfo | None:
        info = await self.narinfo(digest)
        return None if info is None else await self.fetch(info)

    async def narinfo(self, digest: bytes) -> NarInfo | None:
        """The upstream's narinfo of ``digest``, checked (signature, CA), or ``None``."""
        start = time.perf_counter()
        hash_part = nixbase32.encode(digest)
        url = urljoin(self.base_url, f"{hash_part}.narinfo")
        with traces.span("upstream.narinfo", kind="client", attributes={"url.full": url}):
            try:
                info = await self._narinfo(url, digest, hash_part)
            except BaseException:
                upstream_fetch("narinfo", "error", time.perf_counter() - start)
                raise
            upstream_fetch(
                "narinfo", "miss" if info is None else "hit", time.perf_counter() - start
            )
        return info

    async def _narinfo(self, url: str, digest: bytes, hash_part: str) -> NarInfo | None:
        resp = await self._open(url, "narinfo")
        if resp is None:
            return None
        try:
            body = await resp.content.read(_MAX_NARINFO + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise StorageUnavailable(f"reading {url}: {exc!r}") from exc
        finally:
            resp.release()
        if len(body) > _MAX_NARINFO:
            raise DataCorruption(f"{url}: narinfo larger than {_MAX_NARINFO} bytes")
        try:
            info = NarInfo.parse(body)
        except NixCompatError as exc:
            raise DataCorruption(f"{url}: unable to parse narinfo: {exc}") from exc
        if info.store_path.digest != digest:
            raise DataCorruption(f"{url}: narinfo is for {info.store_path}, not {hash_part}")
        if self._keys is not None and not info.verify(self._keys):
            raise UntrustedPath(f"{info.store_path}: no valid signature by a trusted key")
        try:  # signatures do not cover the CA
            check_ca_of(info.store_path, info.ca, info.references, info.nar_hash)
        except MetadataMismatch as exc:
            raise DataCorruption(f"{url}: {exc}") from exc
        return info

    async def fetch(self, info: NarInfo) -> PathInfo:
        """Ingest the NAR ``info`` names (checked against its NarSize/NarHash)."""
        compression = info.effective_compression
        if compression not in COMPRESSIONS:
            raise DataCorruption(f"{info.store_path}: unsupported compression {compression!r}")
        start = time.perf_counter()
        with traces.span("upstream.nar", kind="client", attributes={"nar.size": info.nar_size}):
            try:
                node = await self._fetch_nar(info, compression)
            except BaseException:
                upstream_fetch("nar", "error", time.perf_counter() - start)
                raise
        upstream_fetch("nar", "hit", time.perf_counter() - start)
        nar_ingested("upstream", info.nar_size)
        return PathInfo.from_narinfo(info, node)

    async def _fetch_nar(self, info: NarInfo, compression: str) -> Node:
        nar_url = urljoin(self.base_url, info.url)
        resp = await self._open(nar_url, "nar")
        if resp is None:
            raise StorageError(f"unable to retrieve NAR at {nar_url}: not found")
        dec = decompressor(compression, info.nar_size)

        async def read_compressed(n: int) -> bytes:
            try:
                return await resp.content.read(n)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise StorageUnavailable(f"reading {nar_url}: {exc!r}") from exc

        reader = DecompressingReader(read_compressed, dec)
        try:
            with traces.span("nar.ingest", attributes={"nar.compression": compression}):
                result = await ingest_nar(
                    reader.read, self._blobs, self._dirs, expect=(info.nar_size, info.nar_hash)
                )
        except ValidationError as exc:
            if dec.out_size > dec.limit:
                raise NarTooLarge(
                    f"{info.store_path}: NAR at {nar_url} is larger than its NarSize"
                    f" {info.nar_size}"
                ) from exc
            raise DataCorruption(f"{info.store_path}: bad NAR at {nar_url}: {exc}") from exc
        finally:
            resp.release()
        return result.node

    async def put(self, info: PathInfo) -> PathInfo:
        raise ValidationError("put not supported for this backend (nix+http is read-only)")

    async def list(self) -> AsyncIterator[PathInfo]:
        raise ValidationError("list not supported for this backend (nix+http)")
        yield  # pragma: no cover
