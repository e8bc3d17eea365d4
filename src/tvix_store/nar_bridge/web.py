"""The bridge's web pages: how to use the cache, its paths, a file browser, statistics.

Server-rendered HTML (jinja2 templates beside this module, autoescaped; no
JavaScript). The handlers read only through :func:`~.views.view_of` (and the
view's blob and directory services for file contents) and build every link
from :attr:`~.views.CacheView.prefix`, so the same routes serve a named cache
when mounted under ``/{cache}``. Errors are raised as typed exceptions and
answered by the app's one error middleware.

Costs: the path list, a path's page (referrers, closure) and the statistics
scan every path of the cache (:meth:`CacheView.paths`): there is no reverse
reference index. File downloads are streamed from the blob service.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_to_bytes, urlencode

from aiohttp import web

from nix_compat import nixbase32
from nix_compat.errors import NixCompatError
from nix_compat.signing import SigningKey
from nix_compat.store_path import StorePath
from tvix_castore.errors import CastoreError, DataCorruption
from tvix_castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix_store.browse import describe, listing, resolve
from tvix_store.config import STORE_DB, Store
from tvix_store.nar_bridge.app import HttpError, node_url
from tvix_store.nar_bridge.ranges import UnsatisfiableRange, parse_range
from tvix_store.nar_bridge.views import CacheView, view_of
from tvix_store.pathinfo import PathInfo

if TYPE_CHECKING:
    import jinja2

__all__ = ["PAGE_SIZE", "add_web_routes", "cache_url", "display_name", "human_size", "narinfo_text"]

log = logging.getLogger(__name__)

PAGE_SIZE = 100
"""Paths per page of the path list."""
_TEMPLATES = Path(__file__).parent / "templates"
_PIECE = 1 << 20  # bytes per write of a file download
_MAX_QUERY = 256
_PAGE_NUMBER = re.compile(r"[1-9][0-9]{0,8}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE_FILENAME = re.compile(r'[^\x20-\x7e]|["\\]')
_BAD_PARTS = (b".", b"..")


def human_size(n: int) -> str:
    """``n`` bytes in binary units (``1.5 MiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def display_name(raw: bytes) -> str:
    r"""A file name or symlink target as text: undecodable bytes and controls as ``\xNN``."""
    text = raw.decode(errors="backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


@functools.cache
def _templates() -> jinja2.Environment:
    """The template environment (jinja2 is imported on the first page served)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["human_size"] = human_size
    return env


def _page(view: CacheView, template: str, title: str, **context: Any) -> web.Response:
    html = (
        _templates()
        .get_template(template)
        .render(prefix=view.prefix, cache_name=view.name, title=title, **context)
    )
    return web.Response(text=html, content_type="text/html", charset="utf-8")


def cache_url(request: web.Request, view: CacheView) -> str:
    """The URL clients reach the cache at, as this request reached it."""
    return f"{request.scheme}://{request.host}{view.prefix}"


def narinfo_text(info: PathInfo, signing_keys: tuple[SigningKey, ...]) -> str:
    """The narinfo the cache serves for ``info`` (signed on the fly, castore-node URL)."""
    have = {s.name for s in info.signatures}
    for key in signing_keys:
        if key.name not in have:
            info = info.signed(key)
    return info.to_narinfo(node_url(info.node, info.nar_size)).render()


def _digest(hash_part: str) -> bytes:
    try:
        return nixbase32.decode(hash_part, 20)
    except NixCompatError as exc:
        raise HttpError(404, f"{hash_part[:64]}: not a store path hash") from exc


async def _path(view: CacheView, request: web.Request) -> PathInfo:
    hash_part = request.match_info["hash"]
    info = await view.get(_digest(hash_part))
    if info is None:
        raise HttpError(404, f"{hash_part}: no such path in this cache")
    return info


# -- landing ----------------------------------------------------------------------------------
async def landing(request: web.Request) -> web.Response:
    view = view_of(request)
    keys = [k.verifying_key().render() for k in view.signing_keys]
    return _page(
        view,
        "landing.html",
        "Nix binary cache",
        url=cache_url(request, view),
        keys=keys,
        priority=view.priority,
    )


# -- the path list ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Row:
    name: str
    hash: str
    nar_size: int
    references: int

    @classmethod
    def of(cls, info: PathInfo) -> _Row:
        sp = info.store_path
        return cls(sp.name, sp.hash_part, info.nar_size, len(info.references))


def _page_number(query: Mapping[str, str]) -> int:
    text = query.get("page", "1")
    if _PAGE_NUMBER.fullmatch(text) is None:
        raise HttpError(400, f"page must be a number from 1, not {text[:20]!r}")
    return int(text)


async def paths_list(request: web.Request) -> web.Response:
    view = view_of(request)
    q = request.query.get("q", "").strip()
    if len(q) > _MAX_QUERY:
        raise HttpError(400, f"search text longer than {_MAX_QUERY} characters")
    page = _page_number(request.query)
    needle = q.lower().removeprefix("/nix/store/")
    rows: list[_Row] = []
    count = 0
    async for info in view.paths():
        count += 1
        if needle in info.store_path.basename.lower():
            rows.append(_Row.of(info))
    rows.sort(key=lambda r: (r.name, r.hash))
    pages = max(1, -(-len(rows) // PAGE_SIZE))
    if page > pages:
        raise HttpError(404, f"page {page}: there are {pages}")

    def page_url(n: int) -> str:
        params = {"q": q, "page": str(n)} if q else {"page": str(n)}
        return f"{view.prefix}/paths?{urlencode(params)}"

    return _page(
        view,
        "paths.html",
        f"Paths matching {q}" if q else "Paths",
        q=q,
        rows=rows[(page - 1) * PAGE_SIZE : page * PAGE_SIZE],
        total=len(rows),
        all_count=count,
        page=page,
        pages=pages,
        page_url=page_url,
    )


# -- a path's page ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Ref:
    path: str
    hash: str
    present: bool
    itself: bool = False


def _closure(
    root: bytes, graph: Mapping[bytes, tuple[int, tuple[bytes, ...]]]
) -> tuple[int, int, int]:
    """(paths, NarSize sum, references missing) of ``root``'s closure within ``graph``."""
    seen, missing, todo, size = {root}, set(), [root], 0
    while todo:
        entry = graph.get(todo.pop())
        if entry is None:
            continue
        size += entry[0]
        for ref in entry[1]:
            if ref not in seen:
                seen.add(ref)
                if ref in graph:
                    todo.append(ref)
                else:
                    missing.add(ref)
    return len(seen) - len(missing), size, len(missing)


async def path_page(request: web.Request) -> web.Response:
    view = view_of(request)
    info = await _path(view, request)
    digest = info.digest
    # One scan of the cache: which references are here, who refers to this path, its closure.
    graph: dict[bytes, tuple[int, tuple[bytes, ...]]] = {}
    referrers: list[StorePath] = []
    async for other in view.paths():
        refs = tuple(r.digest for r in other.references)
        graph[other.digest] = (other.nar_size, refs)
        if other.digest != digest and digest in refs:
            referrers.append(other.store_path)
    graph[digest] = (info.nar_size, tuple(r.digest for r in info.references))
    count, size, missing = _closure(digest, graph)
    references = [
        _Ref(r.absolute, r.hash_part, r.digest in graph, r.digest == digest)
        for r in sorted(info.references, key=lambda r: (r.name, r.hash_part))
    ]
    root = info.node
    hash_part = info.store_path.hash_part
    return _page(
        view,
        "path.html",
        info.store_path.name,
        store_path=info.store_path.absolute,
        hash=hash_part,
        nar_size=info.nar_size,
        narinfo=narinfo_text(info, view.signing_keys),
        damage=await view.store.nar.damage(root),
        root_kind=_kind(root),
        root_target=display_name(root.target) if isinstance(root, SymlinkNode) else None,
        files_url=f"{view.prefix}/path/{hash_part}/files/",
        references=references,
        referrers=[
            _Ref(r.absolute, r.hash_part, True)
            for r in sorted(referrers, key=lambda r: (r.name, r.hash_part))
        ],
        closure_count=count,
        closure_size=size,
        closure_missing=missing,
    )


def _kind(node: Node) -> str:
    if isinstance(node, FileNode):
        return "executable file" if node.executable else "file"
    return "directory" if isinstance(node, DirectoryNode) else "symlink"


# -- the file browser -------------------------------------------------------------------------
def _sub_parts(request: web.Request, hash_part: str) -> list[bytes]:
    """The raw (percent-decoded bytes) names after ``…/files``: names need not be UTF-8."""
    raw = request.rel_url.raw_path
    marker = f"/path/{hash_part}/files"
    at = raw.find(marker)
    if at < 0:
        raise HttpError(404, "not a file browser URL")
    parts = [unquote_to_bytes(p) for p in raw[at + len(marker) :].split("/") if p]
    for part in parts:
        if part in _BAD_PARTS or b"/" in part or b"\0" in part:
            raise HttpError(400, f"{display_name(part)!r} is not a file name")
    return parts


def _files_url(view: CacheView, hash_part: str, parts: list[bytes]) -> str:
    return f"{view.prefix}/path/{hash_part}/files/" + "/".join(quote(p, safe="") for p in parts)


async def files(request: web.Request) -> web.StreamResponse:
    view = view_of(request)
    info = await _path(view, request)
    hash_part = info.store_path.hash_part
    parts = _sub_parts(request, hash_part)
    dirs = view.store.directories
    node = await resolve(info.node, os.fsdecode(b"/".join(parts)), dirs)
    if isinstance(node, FileNode):
        return await _download(request, view, info, node, parts[-1] if parts else info.node.name)
    crumbs = [{"name": info.store_path.basename, "url": _files_url(view, hash_part, [])}]
    crumbs += [
        {"name": display_name(p), "url": _files_url(view, hash_part, parts[: i + 1])}
        for i, p in enumerate(parts)
    ]
    title = "/".join(c["name"] for c in crumbs)
    if isinstance(node, SymlinkNode):
        return _page(
            view, "files.html", title, crumbs=crumbs, hash=hash_part,
            symlink=display_name(node.target), entries=[],
        )  # fmt: skip
    assert isinstance(node, DirectoryNode)
    entries = []
    children = await listing(node, dirs)
    children.sort(key=lambda n: (not isinstance(n, DirectoryNode), n.name))
    for entry in children:
        d = describe(entry)
        url = None
        if not isinstance(entry, SymlinkNode):
            url = _files_url(view, hash_part, [*parts, entry.name])
            url += "/" if isinstance(entry, DirectoryNode) else ""
        target = display_name(entry.target) if isinstance(entry, SymlinkNode) else None
        entries.append(
            {"name": display_name(entry.name), "type": d["type"], "mode": d["mode"],
             "size": d["size"], "url": url, "target": target}
        )  # fmt: skip
    return _page(
        view, "files.html", title, crumbs=crumbs, hash=hash_part, symlink=None, entries=entries
    )


def _disposition(name: bytes) -> str:
    """``attachment`` with an ASCII fallback name and the RFC 5987 UTF-8 one."""
    text = name.decode(errors="replace")
    fallback = _UNSAFE_FILENAME.sub("_", text) or "file"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(text, safe='')}"


async def _download(
    request: web.Request, view: CacheView, info: PathInfo, node: FileNode, name: bytes
) -> web.StreamResponse:
    """The file's bytes (or one range of them), streamed from the blob service."""
    size = node.size
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Disposition": _disposition(name),
        "Accept-Ranges": "bytes",
    }
    start, end, status = 0, size, 200
    rng = request.headers.get("Range")
    if rng is not None:
        try:
            parsed = parse_range(rng, size)
        except UnsatisfiableRange:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        if parsed is not None:
            (start, end), status = parsed, 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    reader = await view.store.blobs.open_read(node.digest)
    if reader is None:
        raise HttpError(500, f"store is missing content for this file: blob {node.digest}")
    async with reader:
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            await resp.write_eof()
            return resp
        try:
            if start:
                await reader.seek(start)
            left = end - start
            while left:
                data = await reader.read(min(left, _PIECE))
                if not data:
                    raise DataCorruption(f"blob {node.digest} is shorter than its {size} bytes")
                await resp.write(data[:left])
                left -= len(data[:left])
        except (CastoreError, ConnectionError) as exc:
            # After the headers, a failure can only cut the download short.
            log.error("download of %s failed: %s", request.path, exc)
            if request.transport is not None:
                request.transport.close()
            if isinstance(exc, DataCorruption):
                await view.store.nar.mark_damaged(info.node, str(exc))
            return resp
    await resp.write_eof()
    return resp


# -- statistics -------------------------------------------------------------------------------
def _disk_bytes(store: Store) -> tuple[int, int] | None:
    """(pack bytes, index bytes) of an embedded store; ``None`` where it is not cheap to know."""
    from tvix_castore.packstore.service import PackBlobService

    blobs = store.blobs
    if not isinstance(blobs, PackBlobService):
        return None
    from tvix_castore.packstore.compact import store_bytes

    index = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            index += (blobs.home / (STORE_DB + suffix)).stat().st_size
    return store_bytes(blobs.home), index


async def stats(request: web.Request) -> web.Response:
    view = view_of(request)
    count = logical = 0
    largest: list[tuple[int, str, str]] = []
    async for info in view.paths():
        count += 1
        logical += info.nar_size
        item = (info.nar_size, info.store_path.name, info.store_path.hash_part)
        if len(largest) < 10:
            heapq.heappush(largest, item)
        else:
            heapq.heappushpop(largest, item)
    disk = await asyncio.to_thread(_disk_bytes, view.store)
    stored, index = disk if disk is not None else (None, None)
    return _page(
        view,
        "stats.html",
        "Statistics",
        count=count,
        logical=logical,
        stored=stored,
        index_bytes=index,
        stored_why="the blob service is not the embedded store: its size is not cheap to know",
        ratio=logical / stored if stored else None,
        largest=[
            _Row(name, hash_part, size, 0)
            for size, name, hash_part in sorted(largest, reverse=True)
        ],
    )


# -- routes -----------------------------------------------------------------------------------
def add_web_routes(app: web.Application, prefix_pattern: str = "") -> None:
    """Serve the pages at ``prefix_pattern`` (``""`` for the default cache, or ``/{cache}``).

    None collides with the binary-cache routes (``/{hash}.narinfo``, ``/nar/…``,
    ``/nix-cache-info``, ``/log/…``). GET routes answer HEAD too.
    """
    p = prefix_pattern
    routes: list[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("/", landing),
        ("/paths", paths_list),
        ("/path/{hash}", path_page),
        ("/path/{hash}/files", files),
        ("/path/{hash}/files/{sub:.*}", files),
        ("/stats", stats),
    ]
    for path, handler in routes:
        app.router.add_get(p + path, handler)
