"""The web pages of a real ``tvix-store nar-bridge``, loaded in a real headless Chromium.

One bridge serves, for the whole module: the session's closure (pushed with a
real ``nix copy --to``), an edge-case tree (non-UTF-8 names, a symlink, an
executable, HTML in a file name) and enough single files for two pages of
the path list, imported with ``tvix-store import`` into the bridge's store
while it runs. Expected values come from Nix (``nix-store --add`` of the same
files, ``nix path-info --json``), the source files and the store's pack files.

With ``TVIX_WEB_SCREENSHOTS=docs`` the tests save one PNG of each page.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from nix_compat.narinfo import NarInfo
from nix_compat.store_path import StorePath
from tests.browser import screenshot
from tests.compat.trees import TREES_BY_NAME, Dir, File, Symlink, materialize
from tests.nar_bridge.conftest import (
    NIX_HTTP_OPTS,
    TVIX,
    Bridge,
    Closure,
    Keys,
    copy_to,
    nix_in,
    start_process,
    tvix_env,
)

PAGE_FILES = 101  # with the closure and the tree: two pages of the path list (100 a page)
HTML_NAME = b"<img src=x onerror=alert(1)>"
HTML_TARGET = b'"><img src=y>'


@dataclass(frozen=True)
class Site:
    bridge: Bridge
    closure: Closure
    edge: str
    """Store path of the edge-case tree."""
    pages: tuple[str, ...]
    """Store paths of the single files."""
    nar_sizes: dict[str, int]
    """Every store path served, with its NarSize (from Nix)."""

    @property
    def url(self) -> str:
        return self.bridge.url


def _edge_tree() -> Dir:
    return Dir(
        {
            b"name-bytes": TREES_BY_NAME["name-bytes"].root,
            HTML_NAME: File(b"html in a name"),
            b"html-link": Symlink(HTML_TARGET),
            b"tool": File(b"#!/bin/sh\necho tool\n", 0o755),
        }
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, closure: Closure, keys: Keys) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("web")
    home = work / "home"
    bridge = start_process(
        home,
        work / "bridge.log",
        ["nar-bridge", "-l", "127.0.0.1:0", "--signing-key", str(keys.one.secret_file)],
    )
    try:
        nix = nix_in(work)
        copy_to(nix, closure, bridge.url)
        src = work / "src"
        src.mkdir()
        materialize(_edge_tree(), os.fsencode(src / "web-edge"))
        files = []
        for i in range(PAGE_FILES):
            f = src / f"page-{i:03d}"
            f.write_bytes(f"page file {i}\n".encode())
            files.append(f)
        sources = [src / "web-edge", *files]
        out = subprocess.run(
            [TVIX, "import", *sources], env=tvix_env(home), capture_output=True, check=True
        )
        imported = out.stdout.decode().split()
        # The same files added by Nix: the same store paths, and Nix's NarSizes.
        added = nix.run("nix-store", *nix.store_args, "--add", *sources).decode().split()
        assert imported == added
        infos = json.loads(nix.run("nix", "path-info", *nix.store_args, "--json", *added))
        sizes = {i["path"]: int(i["narSize"]) for i in infos}
        sizes |= {p.path: len(p.nar) for p in closure.paths}
        yield Site(bridge, closure, imported[0], tuple(imported[1:]), sizes)
    finally:
        bridge.stop()


# -- helpers --------------------------------------------------------------------------------
def _text(el: WebElement) -> str:
    """The element's text as in the DOM (no whitespace folding)."""
    return str(el.get_attribute("textContent"))


def _by_id(browser: Chrome, ident: str) -> str:
    return _text(browser.find_element(By.ID, ident))


def _hash(path: str) -> str:
    return StorePath.from_absolute_path(path).hash_part


def _name(path: str) -> str:
    return StorePath.from_absolute_path(path).name


def _rows(browser: Chrome) -> list[str]:
    return [_text(a) for a in browser.find_elements(By.CSS_SELECTOR, "#paths tr.path td.name a")]


def _links(browser: Chrome, ident: str) -> dict[str, str]:
    """Text → href of the links in the list ``#ident`` (none if it is absent)."""
    return {
        _text(a): str(a.get_attribute("href"))
        for a in browser.find_elements(By.CSS_SELECTOR, f"#{ident} a")
    }


@dataclass(frozen=True)
class Entry:
    mode: str
    type: str
    size: str
    target: str | None
    href: str | None


def _entries(browser: Chrome) -> dict[str, Entry]:
    out = {}
    for row in browser.find_elements(By.CSS_SELECTOR, "#entries tr.entry"):
        name_cell = row.find_element(By.CSS_SELECTOR, "td.name")
        links = name_cell.find_elements(By.TAG_NAME, "a")
        targets = name_cell.find_elements(By.CSS_SELECTOR, "code.target")
        name = _text(links[0]) if links else _text(name_cell).split(" → ")[0]
        out[name] = Entry(
            mode=_text(row.find_element(By.CSS_SELECTOR, "td.mode")),
            type=_text(row.find_element(By.CSS_SELECTOR, "td.type")),
            size=_text(row.find_element(By.CSS_SELECTOR, "td.size")),
            target=_text(targets[0]) if targets else None,
            href=str(links[0].get_attribute("href")) if links else None,
        )
    return out


def _request(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request as sent (the path is not normalised), with its status, headers and body."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=60)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# -- landing ----------------------------------------------------------------------------------


def _follow(browser: Chrome, element: WebElement) -> None:
    """Click a link or submit button and wait until the next page has replaced this one."""
    element.click()
    WebDriverWait(browser, 60).until(expected_conditions.staleness_of(element))


def test_landing_shows_the_cache_and_snippets_that_work(
    browser: Chrome, site: Site, keys: Keys, tmp_path: Path
) -> None:
    browser.get(site.url + "/")
    url, key = site.url, keys.one.public
    assert _by_id(browser, "cache-url") == url
    assert [_text(li) for li in browser.find_elements(By.CSS_SELECTOR, "#public-keys li")] == [key]
    nixconf = _by_id(browser, "snippet-nixconf")
    assert nixconf.splitlines() == [
        f"extra-substituters = {url}",
        f"extra-trusted-public-keys = {key}",
    ]
    assert f"substituters = {url} https://cache.nixos.org" in _by_id(
        browser, "snippet-nixconf-replace"
    )
    for snippet in ("snippet-nixos", "snippet-flake"):
        text = _by_id(browser, snippet)
        assert f'[ "{url}" ]' in text and f'"{key}"' in text, text
    assert "nixConfig" in _by_id(browser, "snippet-flake")
    assert "nix.settings" in _by_id(browser, "snippet-nixos")
    assert f"nix copy --to '{url}'" in _by_id(browser, "snippet-copy")
    screenshot(browser, "landing")

    # The nix.conf snippet, as pasted, makes Nix substitute from the cache (signatures checked).
    dep = site.closure.by_name("dep").path
    nix = nix_in(tmp_path)
    conf = f"experimental-features = nix-command\nsubstituters =\n{nixconf}\n"
    out = nix.run(
        "nix-store", "--store", tmp_path / "dst", "-r", dep, *NIX_HTTP_OPTS,
        env={"NIX_CONFIG": conf},
    )  # fmt: skip
    assert out.decode().split() == [dep]
    assert (tmp_path / "dst" / dep.lstrip("/") / "small").read_bytes() == b"hello from nar-bridge\n"

    _follow(browser, browser.find_element(By.ID, "link-paths"))
    assert browser.current_url == f"{url}/paths"
    status, headers, _ = _request(f"{url}/", "HEAD")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")


# -- the path list ----------------------------------------------------------------------------
def test_path_list_pages_and_search_form(browser: Chrome, site: Site) -> None:
    everything = sorted((_name(p), _hash(p)) for p in site.nar_sizes)
    browser.get(f"{site.url}/paths")
    assert int(_by_id(browser, "match-count")) == len(everything)
    first = _rows(browser)
    assert len(first) == 100
    screenshot(browser, "paths")
    _follow(browser, browser.find_element(By.ID, "next-page"))
    second = _rows(browser)
    assert first + second == [name for name, _ in everything]
    assert browser.find_elements(By.ID, "next-page") == []

    # The search form, submitted in the browser.
    browser.get(f"{site.url}/paths")
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys("mid")
    _follow(browser, browser.find_element(By.ID, "search-submit"))
    assert urllib.parse.urlsplit(browser.current_url).query == "q=mid"
    assert _rows(browser) == ["mid"]
    dep = site.closure.by_name("dep").path
    box = browser.find_element(By.ID, "q")
    assert box.get_attribute("value") == "mid"
    box.clear()
    box.send_keys(_hash(dep).upper())  # any case
    box.submit()
    assert _rows(browser) == ["dep"]
    sizes = browser.find_elements(By.CSS_SELECTOR, "#paths tr.path td.num")
    assert sizes[0].get_attribute("title") == f"{site.nar_sizes[dep]} bytes"

    # A search with more matches than a page: the next page keeps the search.
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys("page-")
    box.submit()
    assert int(_by_id(browser, "match-count")) == PAGE_FILES
    names = _rows(browser)
    _follow(browser, browser.find_element(By.ID, "next-page"))
    names += _rows(browser)
    assert names == sorted(_name(p) for p in site.pages)
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys("no-such-thing")
    box.submit()
    assert _by_id(browser, "match-count") == "0"
    assert browser.find_elements(By.ID, "no-paths")


# -- a path's page ----------------------------------------------------------------------------
def test_path_page_narinfo_references_and_referrers(
    browser: Chrome, site: Site, keys: Keys
) -> None:
    url = site.url
    top, mid, dep = (site.closure.by_name(n) for n in ("top", "mid", "dep"))
    browser.get(f"{url}/paths?q=top")
    _follow(browser, browser.find_element(By.LINK_TEXT, "top"))
    assert browser.current_url == f"{url}/path/{top.hash_part}"
    assert _by_id(browser, "store-path") == top.path
    text = _by_id(browser, "narinfo")
    info = NarInfo.parse(text)
    assert info.store_path == top.store_path
    assert info.nar_hash == top.nar_hash and info.nar_size == len(top.nar)
    assert {r.absolute for r in info.references} == set(top.references)
    assert info.verify([keys.one.verifying])
    status, _, served = _request(f"{url}/{top.hash_part}.narinfo")
    assert (status, served.decode()) == (200, text)  # what the cache serves, signed alike
    closure_size = sum(len(p.nar) for p in (top, mid, dep))
    assert _by_id(browser, "closure").startswith("3 paths, ")
    assert f"({closure_size} bytes)" in _by_id(browser, "closure")
    screenshot(browser, "path")

    # top refers to mid and itself; nothing refers to top.
    refs = _links(browser, "references")
    assert refs == {mid.path: f"{url}/path/{mid.hash_part}", top.path: browser.current_url}
    assert _links(browser, "referrers") == {}
    _follow(browser, browser.find_element(By.LINK_TEXT, mid.path))
    assert _by_id(browser, "store-path") == mid.path
    assert _links(browser, "references") == {dep.path: f"{url}/path/{dep.hash_part}"}
    assert _links(browser, "referrers") == {top.path: f"{url}/path/{top.hash_part}"}
    _follow(browser, browser.find_element(By.LINK_TEXT, dep.path))
    assert _by_id(browser, "store-path") == dep.path
    assert _links(browser, "references") == {}
    assert _links(browser, "referrers") == {mid.path: f"{url}/path/{mid.hash_part}"}


# -- the file browser -------------------------------------------------------------------------
def test_file_browser_lists_trees(browser: Chrome, site: Site) -> None:
    dep = site.closure.by_name("dep")
    browser.get(f"{site.url}/path/{dep.hash_part}")
    _follow(browser, browser.find_element(By.ID, "browse"))
    entries = _entries(browser)
    src = site.closure.store / dep.path.lstrip("/")
    assert set(entries) == {p.name for p in src.iterdir()}
    assert entries["run.sh"].mode == "-r-xr-xr-x" and entries["run.sh"].type == "regular"
    assert entries["small"].mode == "-r--r--r--"
    assert entries["link"].type == "symlink" and entries["link"].target == "sub/deeper/file"
    assert entries["link"].href is None
    assert entries["big"].size.endswith("MiB")
    assert entries["sub"].type == "directory"
    _follow(browser, browser.find_element(By.LINK_TEXT, "sub"))
    _follow(browser, browser.find_element(By.LINK_TEXT, "deeper"))
    assert set(_entries(browser)) == {"file"}
    assert _by_id(browser, "location") == f"{dep.store_path.basename}/sub/deeper"

    # The edge-case tree: names escaped, never markup.
    browser.get(f"{site.url}/path/{_hash(site.edge)}/files/")
    entries = _entries(browser)
    assert set(entries) == {"name-bytes", HTML_NAME.decode(), "html-link", "tool"}
    assert entries["html-link"].target == HTML_TARGET.decode()
    assert entries["tool"].mode == "-r-xr-xr-x"
    assert browser.find_elements(By.TAG_NAME, "img") == []
    screenshot(browser, "browser")
    _follow(browser, browser.find_element(By.LINK_TEXT, "name-bytes"))
    entries = _entries(browser)
    assert entries["\\xff\\xfe"].type == "regular"  # b"\xff\xfe", not UTF-8
    assert entries["latin1-caf\\xe9"].target == "caf\\xe9-target-\\xff"
    assert entries["new\\x0aline"].type == "regular"
    assert entries["q'uo\"te"].type == "regular"
    assert entries["日本語"].type == "directory"
    _follow(browser, browser.find_element(By.LINK_TEXT, "\\xfe\\xff-dir"))
    inner = _entries(browser)
    assert list(inner) == ["\\x81\\x82"] and inner["\\x81\\x82"].mode == "-r-xr-xr-x"


def test_downloads_and_ranges(browser: Chrome, site: Site) -> None:
    dep = site.closure.by_name("dep")
    browser.get(f"{site.url}/path/{dep.hash_part}/files/")
    href = _entries(browser)["big"].href
    assert href is not None
    big = (site.closure.store / dep.path.lstrip("/") / "big").read_bytes()
    status, headers, body = _request(href)
    assert status == 200 and body == big
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-length"] == str(len(big))
    assert headers["content-disposition"].startswith('attachment; filename="big"')
    for spec, (start, end) in {
        "bytes=1000-1999": (1000, 2000),
        "bytes=700000-": (700000, len(big)),
        "bytes=-10": (len(big) - 10, len(big)),
    }.items():
        status, headers, body = _request(href, headers={"Range": spec})
        assert status == 206, spec
        assert headers["content-range"] == f"bytes {start}-{end - 1}/{len(big)}"
        assert body == big[start:end]
    status, headers, _ = _request(href, headers={"Range": f"bytes={len(big)}-"})
    assert (status, headers["content-range"]) == (416, f"bytes */{len(big)}")
    status, headers, body = _request(href, "HEAD")
    assert (status, headers["content-length"], body) == (200, str(len(big)), b"")

    # A file whose name is not UTF-8, found by following the browser's links.
    browser.get(f"{site.url}/path/{_hash(site.edge)}/files/name-bytes/")
    href = _entries(browser)["\\xff\\xfe"].href
    assert href is not None and href.endswith("/name-bytes/%FF%FE")
    status, headers, body = _request(href)
    assert (status, body) == (200, b"not utf-8")
    # A single-file store path downloads from its page.
    single = site.closure.by_name("single")
    browser.get(f"{site.url}/path/{single.hash_part}")
    status, _, body = _request(str(browser.find_element(By.ID, "browse").get_attribute("href")))
    assert (status, body) == (200, b"a single-file store path\n")


def test_unknown_and_bad_paths_are_clean_errors(site: Site) -> None:
    url, dep = site.url, site.closure.by_name("dep")
    files = f"{url}/path/{dep.hash_part}/files"
    absent = "0" * 32
    cases = {
        f"{url}/path/{absent}": 404,
        f"{url}/path/not-a-hash": 404,
        f"{files}/no-such-file": 404,
        f"{files}/small/below-a-file": 404,
        f"{files}/../../nix-cache-info": 400,
        f"{files}/sub/%2E%2E/small": 400,
        f"{files}/a%00b": 400,
        f"{url}/paths?page=0": 400,
        f"{url}/paths?page=3": 404,
    }
    for target, want in cases.items():
        status, headers, body = _request(target)
        assert status == want, (target, status, body)
        assert headers["content-type"].startswith("text/plain"), target
    status, headers, _ = _request(f"{files}/small")
    assert status == 200


# -- statistics -------------------------------------------------------------------------------
def test_stats_match_the_store(browser: Chrome, site: Site) -> None:
    browser.get(f"{site.url}/")
    _follow(browser, browser.find_element(By.ID, "link-stats"))
    assert int(_by_id(browser, "path-count")) == len(site.nar_sizes)
    assert int(_by_id(browser, "logical-bytes")) == sum(site.nar_sizes.values())
    packs = site.bridge.home / "packs"
    on_disk = sum(p.stat().st_size for p in packs.glob("*.tvpack"))
    assert int(_by_id(browser, "stored-bytes")) == on_disk
    ratio = float(_by_id(browser, "ratio").rstrip("×"))
    assert ratio == pytest.approx(sum(site.nar_sizes.values()) / on_disk, abs=0.005)
    largest = [_text(a) for a in browser.find_elements(By.CSS_SELECTOR, "#largest a")]
    assert largest[0] == "dep"  # the multi-chunk file
    screenshot(browser, "stats")
