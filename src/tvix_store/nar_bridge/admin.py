"""Deletes and admin calls over HTTP: the routes the ``delete`` and ``admin`` scopes are for.

* ``DELETE /<cache>/<hash>.narinfo`` (scope ``delete``): the path leaves the
  named cache (its content stays while anything else keeps it). On the
  default cache at ``/`` it deletes the path from the store, as
  ``tvix-store delete`` does (``?referrers=1``: with every path referring to
  it); ``409`` if a path that stays refers to it or a pin holds it.
* ``GET /_admin/pins``, ``PUT /_admin/pins/<name>`` (a JSON list of store
  paths), ``DELETE /_admin/pins/<name>`` (scope ``admin``): the pins.
* ``POST /_admin/gc?dry-run=1&keep-since=30d&grace=1h`` (scope ``admin``):
  a garbage collection; the JSON of ``tvix-store gc --json``.

These calls need a token even before any exists (``403`` then, saying how to
make one): unlike a push, which can be repeated, what they remove is gone.
The store-wide calls exist when the bridge serves the embedded store
(:attr:`AppConfig.embedded_home`); elsewhere they are ``501``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from nix_compat.errors import NixCompatError
from nix_compat.store_path import StorePath
from tvix_castore.errors import NotFound, ValidationError

__all__ = ["ADMIN_PREFIX", "add_admin_routes"]

ADMIN_PREFIX = "/_admin"
_MAX_BODY = 1 << 20
_T = TypeVar("_T")


def _home(request: web.Request) -> Path:
    from tvix_store.nar_bridge.app import CONFIG_KEY, HttpError

    home = request.app[CONFIG_KEY].embedded_home
    if home is None:
        raise HttpError(501, "this bridge does not serve the embedded store: use the CLI")
    return home


async def _with_store(request: web.Request, body: Callable[[Any], _T]) -> _T:
    """Run ``body(Embedded(home))`` in a thread (the lifecycle code is blocking).

    A path still referred to or pinned, and a collection already running, are
    conflicts (``409``): the request is fine, the store's state is in the way.
    """
    from tvix_store.gc import GcBusy, Referenced
    from tvix_store.nar_bridge.app import HttpError

    home = _home(request)

    def run() -> _T:
        from tvix_store.embedded import Embedded

        store = Embedded(home)
        try:
            return body(store)
        finally:
            store.close()

    try:
        return await asyncio.to_thread(run)
    except (GcBusy, Referenced) as exc:
        raise HttpError(409, str(exc)) from exc


def _json(data: Any) -> web.Response:
    return web.Response(text=json.dumps(data, indent=1) + "\n", content_type="application/json")


async def delete_narinfo(request: web.Request) -> web.Response:
    from tvix_store.nar_bridge.app import HttpError, _digest20, _registry, cache_of

    digest = _digest20(request.match_info["hash"])
    cache = cache_of(request)
    if cache is not None:
        if not _registry(request).remove(cache.name, digest):
            raise HttpError(404, f"{request.match_info['hash']}: not in cache {cache.name!r}")
        return _json({"cache": cache.name, "removed": request.match_info["hash"]})
    from tvix_store.gc import delete_paths

    with_referrers = request.query.get("referrers", "") in ("1", "true")

    def delete(store: Any) -> list[str]:
        info = store.pathinfos().get_sync(digest)
        if info is None:
            raise NotFound(f"{request.match_info['hash']}: no such path")
        return delete_paths(store, [info.store_path], with_referrers=with_referrers)

    return _json({"deleted": await _with_store(request, delete)})


async def list_pins(request: web.Request) -> web.Response:
    from tvix_store.pins import Pins

    def pins(store: Any) -> dict[str, list[str]]:
        p = Pins(store.db)
        try:
            return {k: list(v) for k, v in p.current().items()}
        finally:
            p.close()

    return _json(await _with_store(request, pins))


async def set_pin(request: web.Request) -> web.Response:
    from tvix_store.nar_bridge.app import HttpError
    from tvix_store.pins import Pins

    name = Pins.check_name(request.match_info["name"])
    if request.content_length is not None and request.content_length > _MAX_BODY:
        raise HttpError(413, f"a pin is at most {_MAX_BODY} bytes of JSON")
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        raise HttpError(413, f"a pin is at most {_MAX_BODY} bytes of JSON")
    try:
        texts = json.loads(raw)
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("not a list")
        paths = [StorePath.from_absolute_path(t.rstrip("/")) for t in texts]
    except (ValueError, NixCompatError) as exc:
        raise ValidationError(f"expected a JSON list of store paths: {exc}") from exc

    def pin(store: Any) -> None:
        pathinfos = store.pathinfos()
        for p in paths:
            info = pathinfos.get_sync(p.digest)
            if info is None or info.store_path != p:
                raise NotFound(f"{p.absolute}: not in this store")
        pins = Pins(store.db)
        try:
            pins.set(name, paths)
        finally:
            pins.close()

    await _with_store(request, pin)
    return _json({"pin": name, "paths": [p.absolute for p in paths]})


async def remove_pin(request: web.Request) -> web.Response:
    from tvix_store.pins import Pins

    name = request.match_info["name"]

    def remove(store: Any) -> tuple[str, ...]:
        pins = Pins(store.db)
        try:
            return pins.remove(name)
        finally:
            pins.close()

    return _json({"pin": name, "removed": list(await _with_store(request, remove))})


def _seconds(request: web.Request, key: str, default: float | None) -> float | None:
    from tvix_store.lifecycle_cli import parse_duration

    text = request.query.get(key)
    if text is None:
        return default
    try:
        return parse_duration(text)
    except ValueError:
        raise ValidationError(f"{key}={text!r}: not a duration (e.g. 30d, 12h)") from None


async def run_gc(request: web.Request) -> web.Response:
    from tvix_store.gc import GC_GRACE, collect

    dry_run = request.query.get("dry-run", "") in ("1", "true")
    keep_since = _seconds(request, "keep-since", None)
    grace = _seconds(request, "grace", GC_GRACE)
    assert grace is not None
    report = await _with_store(
        request, lambda s: collect(s, keep_since=keep_since, grace=grace, dry_run=dry_run)
    )
    return _json(report.as_json())


def add_admin_routes(app: web.Application, cache_prefix: str) -> None:
    """The delete route for the default cache and each named one, and ``/_admin/…``."""
    for prefix in ("", cache_prefix):
        app.router.add_route("DELETE", prefix + r"/{hash:[^/.]+}.narinfo", delete_narinfo)
    app.router.add_route("GET", ADMIN_PREFIX + "/pins", list_pins)
    app.router.add_route("PUT", ADMIN_PREFIX + "/pins/{name}", set_pin)
    app.router.add_route("DELETE", ADMIN_PREFIX + "/pins/{name}", remove_pin)
    app.router.add_route("POST", ADMIN_PREFIX + "/gc", run_gc)
