"""The HTTP binary cache (SPEC A4): routes, checks, and the one error→status table.

Handlers only translate: storage work is done by the store's services,
``ingest_nar`` and the NAR layout. Uploads are verified before anything
refers to them: a NAR is indexed (NarHash → root node) only after its hash
matched the URL, and a narinfo becomes a PathInfo only if it names a NAR that
was received, with the same size, under the store path its URL names, and
only if its CA fits that store path and every signature by a key the bridge
knows verifies (:mod:`tvix_store.verify`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from nix_compat import nixbase32
from nix_compat.errors import NixCompatError
from nix_compat.narinfo import NarInfo
from nix_compat.signing import SigningKey, VerifyingKey
from tvix_castore.digests import B3Digest
from tvix_castore.errors import (
    CastoreError,
    DataCorruption,
    NotFound,
    StorageFull,
    StorageUnavailable,
    ValidationError,
)
from tvix_castore.nodes import (
    Directory,
    NameRule,
    Node,
    node_from_proto,
    node_to_proto,
)
from tvix_castore.protos import castore_pb2
from tvix_store.caches import Cache, CacheRegistry
from tvix_store.compression import SUFFIXES, DecompressingReader, TooLarge, decompressor
from tvix_store.config import Store
from tvix_store.content import MissingContent, check_content
from tvix_store.nar.ingest import ingest_nar
from tvix_store.nar.layout import NarLayout, nar_layout
from tvix_store.nar.render import NarRenderError, fetch_closure, render_nar
from tvix_store.nar_bridge.admin import ADMIN_PREFIX, add_admin_routes
from tvix_store.nar_bridge.pullthrough import BadUpstream, PullThrough
from tvix_store.nar_bridge.ranges import UnsatisfiableRange, parse_range
from tvix_store.pathinfo import PathInfo
from tvix_store.rpc.auth import bearer
from tvix_store.telemetry import nar_ingested, traces
from tvix_store.tokens import Forbidden, TokenAuthority, Unauthenticated
from tvix_store.verify import check_ca, check_ca_content, check_signatures, known_keys

__all__ = ["STORE_KEY", "AppConfig", "make_app"]

log = logging.getLogger(__name__)

MAX_NARINFO = 2 << 20
MAX_NODE_URL = 4096
_NAR_TYPE = "application/x-nix-nar"
_NARINFO_TYPE = "text/x-nix-narinfo"
_IMMUTABLE = "public, max-age=31536000, immutable"
_NAR_NAME = re.compile(r"([0-9a-df-np-sv-z]{52})(\.nar(?:\.xz|\.bz2|\.gz|\.zst)?)")
_DECIMAL = re.compile(r"[0-9]{1,20}")
_GZIP_MAGIC = b"\x1f\x8b"
# A NAR whose stored content was found damaged is "gone": Nix takes 404 and 410
# as "not there" (no retries; the next substituter; ``nix copy`` uploads it
# again, which repairs it), while it retries a 5xx and ``nix copy``'s HEAD
# existence check fails on one.
_DAMAGED = 410


@dataclass
class AppConfig:
    """How the binary cache behaves."""

    priority: int = 39
    signing_keys: list[SigningKey] = field(default_factory=list)
    max_nar_size: int = 64 << 30
    """Refuse uploads that decompress to more than this."""
    trusted_keys: list[VerifyingKey] = field(default_factory=list)
    """Public keys whose signatures in uploaded narinfos must verify (besides our own)."""
    header_timeout: float = 30.0
    """Close a connection whose request header is not complete this long after it
    opened (or after the previous response)."""
    body_timeout: float = 30.0
    """Answer 408 and close when a request body sends nothing for this long."""
    max_connections: int = 1024
    """Refuse (503, closed) connections beyond this many open ones."""
    tokens: TokenAuthority | None = None
    """Checks tokens (:mod:`tvix_store.tokens`); ``None``: no access control at all."""
    private: bool = False
    """Reads need a token with scope ``pull`` too (once tokens are enforced)."""
    insecure_no_auth: bool = False
    """Listening beyond loopback while no token exists is allowed (else refused)."""
    caches: CacheRegistry | None = None
    """Named caches served at ``/<name>/…`` (:mod:`tvix_store.caches`)."""
    embedded_home: Path | None = None
    """The data directory of the embedded store served, if it is: store-wide deletes,
    pins and gc over HTTP (:mod:`tvix_store.nar_bridge.admin`) work on it."""
    metrics: bool = True
    """Count and time requests (:mod:`tvix_store.telemetry`)."""
    metrics_route: bool = True
    """Serve ``/metrics`` here (loopback peers, or a token with scope ``admin``)."""

    def known_keys(self) -> tuple[VerifyingKey, ...]:
        """Keys an uploaded signature is checked against: trusted ones and our own."""
        return known_keys(self.trusted_keys, (k.verifying_key() for k in self.signing_keys))


STORE_KEY = web.AppKey("store", Store)
CONFIG_KEY = web.AppKey("config", AppConfig)
PULL_KEY = web.AppKey("pullthrough", PullThrough)


class HttpError(Exception):
    """A client-visible failure with its status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _status_for(exc: BaseException) -> int:
    cause: BaseException | None = exc
    while cause is not None:  # a bound hit deep inside the NAR reader is still "too large"
        if isinstance(cause, TooLarge):
            return 413
        cause = cause.__cause__
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, BadUpstream):
        return 502
    if isinstance(exc, Unauthenticated):
        return 401
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, MissingContent):
        return 400
    if isinstance(exc, (ValidationError, NixCompatError)):
        return 400
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, StorageUnavailable):
        return 503
    if isinstance(exc, StorageFull):
        return 507  # Insufficient Storage
    return 500


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except (HttpError, CastoreError, NixCompatError) as exc:
        status = _status_for(exc)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc)
        else:
            log.info("%s %s: %d %s", request.method, request.path, status, exc)
        resp = web.Response(status=status, text=f"{exc}\n")
        if status == 401:  # (curl, hence Nix, then sends its netrc credentials)
            resp.headers["WWW-Authenticate"] = 'Basic realm="tvix-store", charset="UTF-8"'
        if status == 408:
            resp.force_close()
        return resp


_CACHE_PREFIX = "/{cache:[a-z0-9][a-z0-9_-]{0,62}}"
_METRICS_ROUTE = "metrics"
_SCOPE_OF = {"GET": "pull", "HEAD": "pull", "PUT": "push", "POST": "push", "DELETE": "delete"}


def _token(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer …`` or ``Basic`` (the password; Nix's netrc form)."""
    value = request.headers.get("Authorization")
    if value is None or not value.strip().lower().startswith("basic "):
        return bearer(value)
    try:
        decoded = base64.b64decode(value.strip()[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("malformed basic credentials") from None
    _login, sep, password = decoded.partition(":")
    if not sep or not password:
        raise Unauthenticated("basic credentials need the token as the password")
    return password


@web.middleware
async def _access(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Token checks for every route (DESIGN §10): writes need a token once any exists."""
    config = request.app[CONFIG_KEY]
    tokens = config.tokens
    if tokens is not None and request.match_info.route.name == _METRICS_ROUTE:
        # An operator's view: open to this machine, else an admin's (once tokens exist).
        if tokens.enforced() and not _from_loopback(request):
            tokens.authorize(_token(request), "admin", "", True)
    elif tokens is not None:
        cache = cache_of(request)
        private = config.private if cache is None else not cache.public
        if request.path.startswith(ADMIN_PREFIX + "/"):
            scope = "admin"
        else:
            scope = _SCOPE_OF.get(request.method, "admin")
        text = _token(request)
        if scope in ("delete", "admin"):  # (always: what they remove is gone)
            if text is None:
                raise Unauthenticated(
                    f"this request needs a token with scope {scope!r}"
                    f" (tvix-store token create --scope {scope})"
                )
            tokens.authorize(text, scope, "" if cache is None else cache.name, True)
            return await handler(request)
        enforced = tokens.enforced()  # (point queries: cheaper than a thread hop)
        needed = enforced and (scope != "pull" or private)
        if text is not None or needed:
            tokens.authorize(text, scope, "" if cache is None else cache.name, needed)
    return await handler(request)


def _from_loopback(request: web.Request) -> bool:
    """Whether the peer is on this machine (a loopback address, or the unix socket)."""
    import ipaddress

    transport = request.transport
    if transport is None:
        return False
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return True  # (a unix socket)
    try:
        return ipaddress.ip_address(str(peer[0]).partition("%")[0]).is_loopback
    except ValueError:
        return False


def cache_of(request: web.Request) -> Cache | None:
    """The named cache a request is for (``None``: the default cache at ``/``)."""
    name = request.match_info.get("cache")
    if name is None:
        return None
    registry = request.app[CONFIG_KEY].caches
    cache = None if registry is None else registry.get(name)
    if cache is None:
        raise HttpError(404, f"no cache named {name!r}")
    return cache


def _registry(request: web.Request) -> CacheRegistry:
    registry = request.app[CONFIG_KEY].caches
    assert registry is not None  # (a named cache was found in it)
    return registry


def _store(request: web.Request) -> Store:
    return request.app[STORE_KEY]


def _body(request: web.Request) -> Callable[[int], Awaitable[bytes]]:
    """``read(n)`` of the request body that gives up (408) when it stalls."""
    timeout = request.app[CONFIG_KEY].body_timeout

    async def read(n: int) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await request.content.read(n)
        except TimeoutError:
            raise HttpError(408, f"request body stalled for {timeout:g} s") from None

    return read


def _bounded(
    read: Callable[[int], Awaitable[bytes]], first: bytes, limit: int
) -> Callable[[int], Coroutine[Any, Any, bytes]]:
    """``read`` after ``first``, refusing (413) as soon as the body passes ``limit`` bytes."""
    total = 0

    async def bounded(n: int) -> bytes:
        nonlocal first, total
        data, first = first or await read(n), b""
        total += len(data)
        if total > limit:
            raise TooLarge(f"NAR exceeds {limit} bytes")
        return data

    return bounded


def _digest20(text: str) -> bytes:
    try:
        return nixbase32.decode(text, 20)
    except NixCompatError as exc:
        raise HttpError(404, f"{text}: not a store path hash") from exc


async def cache_info(request: web.Request) -> web.Response:
    cache = cache_of(request)
    prio = request.app[CONFIG_KEY].priority if cache is None else cache.priority
    return web.Response(
        text=f"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {prio}\n",
        content_type="text/x-nix-cache-info",
    )


def node_url(node: Node, nar_size: int) -> str:
    """The castore-node NAR URL (B §9.1): everything needed to render it."""
    raw = node_to_proto(node.with_name(b"")).SerializeToString(deterministic=True)
    b64 = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return f"nar/tvix-castore/{b64}?narsize={nar_size}"


async def get_narinfo(request: web.Request) -> web.Response:
    digest = _digest20(request.match_info["hash"])
    store = _store(request)
    cache = cache_of(request)
    if cache is not None:
        registry = _registry(request)
        seen = registry.seen(cache.name, digest)
        if seen is not None:
            registry.touch(cache, digest, seen)  # (its retention starts anew)
        elif cache.upstream is None or not await request.app[PULL_KEY].pull(
            cache, registry, digest
        ):
            raise HttpError(404, f"{request.match_info['hash']}: not in cache {cache.name!r}")
    info = await store.pathinfos.get(digest)
    if info is None:
        raise HttpError(404, f"{request.match_info['hash']}: no such path")
    reason = await store.nar.damage(info.node)
    if reason is not None:  # "not here": Nix then asks its next substituter
        raise HttpError(404, f"{request.match_info['hash']}: damaged in this store ({reason})")
    if request.method == "HEAD":
        return web.Response(content_type=_NARINFO_TYPE)
    keys = request.app[CONFIG_KEY].signing_keys if cache is None else cache.signing_keys
    have = {s.name for s in info.signatures}
    for key in keys:
        if key.name not in have:
            info = info.signed(key)
    text = info.to_narinfo(node_url(info.node, info.nar_size)).render()
    return web.Response(text=text, content_type=_NARINFO_TYPE)


async def put_narinfo(request: web.Request) -> web.Response:
    url_digest = _digest20(request.match_info["hash"])
    if request.content_length is not None and request.content_length > MAX_NARINFO:
        raise HttpError(413, f"narinfo larger than {MAX_NARINFO} bytes")
    read = _body(request)
    parts: list[bytes] = []
    size = 0
    while part := await read(1 << 16):  # until the end of the body
        size += len(part)
        if size > MAX_NARINFO:
            raise HttpError(413, f"narinfo larger than {MAX_NARINFO} bytes")
        parts.append(part)
    body = b"".join(parts)
    try:
        info = NarInfo.parse(body)
    except NixCompatError as exc:
        raise HttpError(400, f"invalid narinfo: {exc}") from exc
    if info.store_path.digest != url_digest:
        raise HttpError(
            400,
            f"narinfo is for {info.store_path}, but was uploaded as {request.match_info['hash']}",
        )
    store = _store(request)
    cache = cache_of(request)
    # (a lease first: the content checked below stays until the PathInfo refers to it)
    await asyncio.to_thread(store.blobs.begin_write)
    entry = await store.nar_index.get(info.nar_hash)
    if cache is not None and not _registry(request).has_nar(cache.name, info.nar_hash):
        entry = None  # the uploader must send the bytes to this cache too
    if entry is None:
        raise HttpError(
            400, f"NAR sha256:{nixbase32.encode(info.nar_hash)} was not uploaded to this cache"
        )
    node, nar_size = entry
    if nar_size != info.nar_size:
        raise HttpError(
            400, f"NarSize {info.nar_size} does not match the uploaded NAR ({nar_size})"
        )
    pathinfo = PathInfo.from_narinfo(info, node)
    check_ca(pathinfo)  # NarHash/NarSize: from the NAR index, i.e. hashed here
    config = request.app[CONFIG_KEY]
    if cache is None:
        known = config.known_keys()
    else:
        known = known_keys(config.trusted_keys, (k.verifying_key() for k in cache.signing_keys))
    check_signatures(pathinfo, known)
    await check_content(pathinfo.node, store.blobs, store.directories)
    await check_ca_content(pathinfo, store.blobs, store.directories)
    await store.pathinfos.put(pathinfo)
    if cache is not None:
        _registry(request).add(cache.name, pathinfo.digest, pathinfo.store_path.absolute)
    return web.Response(status=200)


async def put_nar(request: web.Request) -> web.Response:
    m = _NAR_NAME.fullmatch(request.match_info["name"])
    if m is None:
        raise HttpError(400, f"{request.match_info['name']}: not a NAR file name")
    try:
        url_hash = nixbase32.decode(m.group(1), 32)
    except NixCompatError as exc:
        raise HttpError(400, f"{m.group(1)}: invalid hash") from exc
    kind = SUFFIXES[m.group(2)]
    store = _store(request)
    cache = cache_of(request)
    await asyncio.to_thread(store.blobs.begin_write)
    limit = request.app[CONFIG_KEY].max_nar_size
    read = _body(request)
    first = await read(1 << 16)
    if kind == "none" and first.startswith(_GZIP_MAGIC):
        kind = "gzip"  # Nix names gzip-compressed NARs plain ".nar"
    elif kind == "none" and (request.content_length or 0) > limit:
        raise HttpError(413, f"NAR of {request.content_length} bytes: over the {limit}-byte limit")
    closure: dict[B3Digest, Directory] = {}
    if kind == "none":
        # The body is the NAR: ingesting hashes it, so it is not hashed twice.
        read_nar = _bounded(read, first, limit)
    else:
        reader = DecompressingReader(read, decompressor(kind, limit), first)
        read_nar = reader.read
    with traces.span("nar.ingest", attributes={"nar.compression": kind}) as span:
        result = await ingest_nar(
            read_nar, store.blobs, store.directories, collect=closure, max_size=limit
        )
        if span is not None:
            span.set_attribute("nar.size", result.nar_size)
    nar_ingested("upload", result.nar_size)
    # The URL names the file as uploaded (FileHash; for an uncompressed NAR, its NarHash).
    got = result.nar_sha256 if kind == "none" else reader.file_hash.digest()
    if got != url_hash:
        raise HttpError(
            400,
            f"uploaded {'NAR' if kind == 'none' else 'file'} has sha256 {nixbase32.encode(got)},"
            f" not {m.group(1)}",
        )
    await store.nar_index.put(result.nar_sha256, result.node, result.nar_size)
    if cache is not None:
        _registry(request).received(cache.name, result.nar_sha256)
    # The NarHash was computed from the very bytes ingested: the plan vouches for it.
    await store.nar.record(result.node, closure, result.nar_size, result.nar_sha256)
    if await store.nar.damage(result.node) is not None:
        # Ingesting stored anew every blob whose bytes were found gone or corrupt;
        # the mark goes once the whole NAR reads back intact.
        problem = await store.nar.verify(result.node, result.nar_sha256)
        if problem is not None:
            await store.nar.mark_damaged(result.node, problem)
            raise HttpError(500, f"stored content of this NAR is still damaged: {problem}")
        await store.nar.clear_damage(result.node)
    return web.Response(status=200)


async def _layout_for(store: Store, node: Node) -> tuple[NarLayout, Mapping[B3Digest, Directory]]:
    """The NAR's layout and closure, after checking every blob is present."""
    try:
        closure = await fetch_closure(node, store.directories)
        layout = await nar_layout(node, store.directories, closure)
        files = layout.files
        present = await store.blobs.has_many([f.digest for f in files])
    except NarRenderError as exc:
        raise HttpError(500, f"store is missing content for this NAR: {exc}") from exc
    missing = [f for f in files if f.digest not in present]
    if missing:
        raise HttpError(500, f"store is missing content for this NAR: blob {missing[0].digest}")
    problem = await store.nar.unreadable([f.digest for f in files])
    if problem is not None:  # indexed, but its bytes are gone: damage
        await store.nar.mark_damaged(node, problem)
        raise HttpError(_DAMAGED, f"store content of this NAR is damaged: {problem}")
    return layout, closure


async def _stream(
    request: web.Request, resp: web.StreamResponse, pieces: AsyncIterator[bytes], node: Node
) -> web.StreamResponse:
    """Send ``pieces``; a failure after the headers can only cut the connection short.

    Content found missing or corrupt marks ``node`` damaged, so the next
    request is refused before its headers.
    """
    try:
        async for piece in pieces:
            await resp.write(piece)
    except (CastoreError, ConnectionError) as exc:
        log.error("NAR stream for %s failed: %s", request.path, exc)
        if request.transport is not None:
            request.transport.close()
        if isinstance(exc, DataCorruption):
            await _store(request).nar.mark_damaged(node, str(exc))
        return resp
    await resp.write_eof()
    return resp


async def _serve_nar(request: web.Request, node: Node) -> web.StreamResponse:
    store = _store(request)
    headers = {
        "Content-Type": _NAR_TYPE,
        "Cache-Control": _IMMUTABLE,
        "Accept-Ranges": "bytes",
    }
    reason = await store.nar.damage(node)
    if reason is not None:
        raise HttpError(_DAMAGED, f"store content of this NAR is damaged: {reason}")
    served = await store.nar.serve(node)
    if served is not None and request.method == "GET" and "Range" not in request.headers:
        # The whole NAR, straight from the pack files.
        size = served.nar_size
        resp = web.StreamResponse(status=200, headers={**headers, "Content-Length": str(size)})
        await resp.prepare(request)
        return await _stream(request, resp, served.pieces(), node)
    if served is not None:
        layout, closure = served.layout(), None
    else:
        layout, closure = await _layout_for(store, node)
    start, end, status = 0, layout.size, 200
    rng = request.headers.get("Range")
    if rng is not None:
        try:
            parsed = parse_range(rng, layout.size)
        except UnsatisfiableRange:
            return web.Response(
                status=416, headers={"Content-Range": f"bytes */{layout.size}"}, text="416\n"
            )
        if parsed is not None:
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{layout.size}"
    headers["Content-Length"] = str(end - start)
    resp = web.StreamResponse(status=status, headers=headers)
    await resp.prepare(request)
    if request.method == "HEAD":
        await resp.write_eof()
        return resp
    if status == 206:
        return await _stream(request, resp, layout.read(store.blobs, start, end), node)
    if closure is None:  # from a plan; a Range header we ignore (several ranges, say)
        assert served is not None
        return await _stream(request, resp, served.pieces(), node)
    resp = await _stream(
        request, resp, render_nar(node, store.blobs, store.directories, closure=closure), node
    )
    if resp.prepared and request.transport is not None and not request.transport.is_closing():
        # Next time, serve it from a plan (one that vouches for no NarHash: not hashed here).
        await store.nar.record(node, closure, layout.size, None)
    return resp


async def get_nar_by_node(request: web.Request) -> web.StreamResponse:
    text = request.match_info["node"]
    cache_of(request)  # (content-addressed: any cache serves a node its URL names)
    if len(text) > MAX_NODE_URL:
        raise HttpError(400, "node URL too long")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        msg = castore_pb2.Node()
        msg.ParseFromString(raw)
    except (binascii.Error, ValueError, Exception) as exc:
        raise HttpError(404, "not a castore node URL") from exc
    try:
        node = node_from_proto(msg, name_rule=NameRule.EMPTY)
    except CastoreError as exc:
        raise HttpError(400, f"invalid node: {exc}") from exc
    narsize = request.query.get("narsize")
    if narsize is not None and _DECIMAL.fullmatch(narsize) is None:
        raise HttpError(400, "narsize must be a decimal number below 2^64")
    with traces.span("nar.render"):
        return await _serve_nar(request, node)


async def get_nar_classic(request: web.Request) -> web.StreamResponse:
    m = _NAR_NAME.fullmatch(request.match_info["name"])
    if m is None or m.group(2) != ".nar":
        raise HttpError(404, f"{request.match_info['name']}: no such NAR")
    try:
        nar_hash = nixbase32.decode(m.group(1), 32)
    except NixCompatError as exc:
        raise HttpError(404, "invalid NAR hash") from exc
    cache = cache_of(request)
    entry = await _store(request).nar_index.get(nar_hash)
    if cache is not None and not _registry(request).has_nar(cache.name, nar_hash):
        entry = None
    if entry is None:
        raise HttpError(404, f"{request.match_info['name']}: no such NAR")
    with traces.span("nar.render"):
        return await _serve_nar(request, entry[0])


async def put_ignored(request: web.Request) -> web.Response:
    """Listings (``.ls``), logs and cache-info uploads are accepted and dropped."""
    cache_of(request)  # (of a cache that exists)
    read = _body(request)
    while await read(1 << 16):
        pass
    return web.Response(status=200)


def make_app(store: Store, config: AppConfig | None = None) -> web.Application:
    """The aiohttp application serving ``store`` as a binary cache."""
    config = config or AppConfig()
    middlewares: list[Any] = [_errors, _access]
    if config.metrics:
        from tvix_store.telemetry import http

        middlewares.insert(0, http.observe)  # (outermost: it sees the status _errors chose)
    app = web.Application(middlewares=middlewares, client_max_size=MAX_NARINFO + 1)
    app[STORE_KEY] = store
    app[CONFIG_KEY] = config
    app[PULL_KEY] = PullThrough(store)

    async def close_upstreams(app: web.Application) -> None:
        await app[PULL_KEY].aclose()

    app.on_cleanup.append(close_upstreams)
    if config.metrics and config.metrics_route:
        app.router.add_get(http.METRICS_PATH, http.metrics, name=_METRICS_ROUTE)
    # The default cache at /, then each named one at /<name>/ (same handlers).
    for prefix in ("", _CACHE_PREFIX):
        add = app.router.add_route
        add("GET", f"{prefix}/nix-cache-info", cache_info)
        add("PUT", f"{prefix}/nix-cache-info", put_ignored)
        add("GET", prefix + r"/{hash:[^/.]+}.narinfo", get_narinfo)
        add("HEAD", prefix + r"/{hash:[^/.]+}.narinfo", get_narinfo)
        add("PUT", prefix + r"/{hash:[^/.]+}.narinfo", put_narinfo)
        add("PUT", prefix + r"/{hash:[^/.]+}.ls", put_ignored)
        add("PUT", prefix + "/log/{name}", put_ignored)
        add("GET", prefix + "/nar/tvix-castore/{node}", get_nar_by_node)
        add("HEAD", prefix + "/nar/tvix-castore/{node}", get_nar_by_node)
        add("PUT", prefix + "/nar/{name}", put_nar)
        add("GET", prefix + "/nar/{name}", get_nar_classic)
        add("HEAD", prefix + "/nar/{name}", get_nar_classic)
    from tvix_store.nar_bridge.web import add_web_routes  # (web imports this module)

    for prefix in ("", _CACHE_PREFIX):
        add_web_routes(app, prefix)
    add_admin_routes(app, _CACHE_PREFIX)
    return app
