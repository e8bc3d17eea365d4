"""nar-bridge serving: ``nix copy --from`` the bridge versus a static binary cache.

Input: the NAR-dump tree (``benchmarks/.work/nar-dump/tree``, built by
:func:`benchmarks.nar_dump.build_tree`), added once to a chroot Nix store and
exported once as an uncompressed static binary cache (``nix copy --to
file://…?compression=none``), both cached under ``benchmarks/.work/nar-bridge``.

Each run starts two loopback servers: a plain static HTTP server over that
directory (``http.server.ThreadingHTTPServer``, HTTP/1.1 keep-alive,
``TCP_NODELAY``) and a ``tvix-store nar-bridge`` on a fresh ``TVIX_STORE_HOME``,
into which the path is uploaded with ``nix copy --to http://…?compression=none``.

Measured, alternating static/bridge, best of ``--bridge-rounds`` wall-clock:

* ``nix copy --from URL --to FRESH_STORE PATH --no-check-sigs`` (the store on
  tmpfs, ``/dev/shm``, if there is one) with a fresh
  ``XDG_CACHE_HOME`` and no narinfo caching; the copied trees are checked equal
  to the source (sha256 of ``nix-store --dump``) once;
* a plain ``curl`` GET of the NAR (the bridge's castore-node URL from its
  narinfo; the static ``nar/….nar`` file), body discarded;

and ``--narinfo-requests`` sequential GETs of ``<hash>.narinfo`` over one
keep-alive connection (``http.client``), each timed with ``perf_counter``.

Filling (issue 13), ``--fill-rounds`` alternating rounds, ``sync`` and ``fstrim``
before each command, every destination fresh and on disk: ``nix copy --to
'file://DIR?compression=zstd'`` (the reference), the same with
``compression=none``, and ``nix copy --to 'http://BRIDGE?compression=none'``
into a nar-bridge started on a fresh store for each round; the last round's
bridge store is the one served above.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import MB, WORK, machine, settle
from benchmarks.nar_dump import TREE, build_tree

NAME = "nar_bridge"
TITLE = "nar-bridge serving (issue 5)"

BASE = WORK / "nar-bridge"
SRC_STORE = BASE / "src-store"
STATIC_DIR = BASE / "static-cache"
SETUP_META = BASE / "setup.json"
BRIDGE_HOME = BASE / "bridge-home"
SCRATCH = BASE / "scratch"
# Destination stores go to tmpfs when there is one: on this VM's disk, writing
# 745 MB per copy hits dirty-page throttling and a static copy varies 5-45 s.
SHM = Path("/dev/shm")
DEST_ROOT = SHM / "nar-bridge-bench" if SHM.is_dir() and os.access(SHM, os.W_OK) else SCRATCH

BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store")
ENV = {**os.environ, "NIX_CONFIG": "experimental-features = nix-command"}
NO_NARINFO_CACHE = [
    "--option",
    "narinfo-cache-negative-ttl",
    "0",
    "--option",
    "narinfo-cache-positive-ttl",
    "0",
]
COPY_TARGET = 1.5
FILL_TARGET = 1.5  # nar-bridge fill / nix copy --to file://…?compression=zstd
P99_TARGET_MS = 5.0
WARMUP_REQUESTS = 200

STATIC_SERVER = """\
import functools, http.server, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

handler = functools.partial(Handler, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
server.daemon_threads = True
print(f"http://127.0.0.1:{server.server_port}", flush=True)
server.serve_forever()
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bridge-rounds", type=int, default=3, help="rounds for the nar-bridge benchmark"
    )
    parser.add_argument(
        "--fill-rounds",
        type=int,
        default=3,
        help="rounds of filling nar-bridge vs a file:// cache (nar-bridge benchmark)",
    )
    parser.add_argument(
        "--narinfo-requests",
        type=int,
        default=10_000,
        help="sequential narinfo GETs per server (nar-bridge benchmark)",
    )
    parser.add_argument(
        "--bridge-tree",
        type=Path,
        default=None,
        help="serve this tree instead of the NAR-dump tree (smoke tests)",
    )


# -- setup ------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    return {**ENV, **extra}


def _run(argv: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, env=env or ENV, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _narinfo_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key] = value
    return fields


def _hash_part(store_path: str) -> str:
    return Path(store_path).name.split("-", 1)[0]


def prepare_source(tree: Path) -> str:
    """Chroot store holding ``tree`` and its static binary cache (cached); the store path."""
    if SETUP_META.exists():
        meta = json.loads(SETUP_META.read_text())
        path = str(meta["path"])
        if (
            meta.get("tree") == str(tree)
            and (SRC_STORE / path.lstrip("/")).exists()
            and (STATIC_DIR / f"{_hash_part(path)}.narinfo").exists()
        ):
            return path
    print(f"adding {tree} to {SRC_STORE} and exporting it to {STATIC_DIR} ...", file=sys.stderr)
    SETUP_META.unlink(missing_ok=True)
    _rmtree(SRC_STORE)
    _rmtree(STATIC_DIR)
    BASE.mkdir(parents=True, exist_ok=True)
    path = _run(["nix-store", "--store", str(SRC_STORE), "--add", str(tree)]).strip()
    xdg = SCRATCH / "xdg-setup"
    _rmtree(xdg)
    _run(
        [
            "nix",
            "copy",
            "--from",
            str(SRC_STORE),
            "--to",
            f"file://{STATIC_DIR}?compression=none",
            path,
        ],
        _env(XDG_CACHE_HOME=str(xdg)),
    )
    _rmtree(xdg)
    SETUP_META.write_text(json.dumps({"tree": str(tree), "path": path}))
    return path


# -- servers ----------------------------------------------------------------------
@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urllib.parse.urlsplit(self.url)
        assert parts.hostname is not None and parts.port is not None
        return parts.hostname, parts.port

    def cpu_seconds(self) -> float:
        """utime + stime of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def static_server(directory: Path) -> Iterator[Server]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STATIC_SERVER, str(directory)], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("http://"):
            raise SystemExit(f"static server did not start: {line!r}")
        yield Server(line, proc)
    finally:
        _stop(proc)


@contextmanager
def bridge_server(home: Path) -> Iterator[Server]:
    home.mkdir(parents=True, exist_ok=True)
    log_path = home.parent / "bridge.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [TVIX, "nar-bridge", "-l", "127.0.0.1:0"],
            env=_env(TVIX_STORE_HOME=str(home)),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            m = re.search(r"nar-bridge listening on (http://\S+)", log_path.read_text())
            if m:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nar-bridge did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield Server(m.group(1), proc)
    finally:
        _stop(proc)


# -- measuring --------------------------------------------------------------------
def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return seconds


def _dump_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with subprocess.Popen(["nix-store", "--dump", str(path)], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
    if p.returncode:
        raise SystemExit(f"nix-store --dump {path} failed")
    return h.hexdigest()


def upload(bridge: Server, path: str) -> float:
    xdg = SCRATCH / "xdg-upload"
    _rmtree(xdg)
    seconds = _timed(
        [
            "nix",
            "copy",
            "--from",
            str(SRC_STORE),
            "--to",
            f"{bridge.url}?compression=none",
            path,
            *NO_NARINFO_CACHE,
        ],
        _env(XDG_CACHE_HOME=str(xdg)),
    )
    _rmtree(xdg)
    return seconds


def copy_to_file(path: str, compression: str, label: str) -> float:
    """Time one ``nix copy --to file://SCRATCH/…?compression=…`` into a fresh directory
    (kept until the run ends: deleting between timed runs slows this VM's disk)."""
    dest = SCRATCH / f"file-cache-{label}"
    xdg = SCRATCH / f"xdg-file-{label}"
    settle()
    seconds = _timed(
        [
            "nix",
            "copy",
            "--from",
            str(SRC_STORE),
            "--to",
            f"file://{dest}?compression={compression}",
            path,
            *NO_NARINFO_CACHE,
        ],
        _env(XDG_CACHE_HOME=str(xdg)),
    )
    _rmtree(xdg)
    return seconds


@dataclass
class Fill:
    zstd: list[float]
    none: list[float]
    bridge: list[float]
    bridge_cpu: list[float]

    def pair_ratios(self) -> list[float]:
        return sorted(b / z for b, z in zip(self.bridge, self.zstd, strict=True))


def measure_fill(path: str, rounds: int) -> tuple[Fill, Path]:
    """Alternate file:// zstd, file:// none and a fresh nar-bridge; the last bridge's home."""
    fill = Fill([], [], [], [])
    home = SCRATCH / "bridge-home-0"
    for i in range(rounds):
        fill.zstd.append(copy_to_file(path, "zstd", f"zstd-{i}"))
        fill.none.append(copy_to_file(path, "none", f"none-{i}"))
        home = SCRATCH / f"bridge-home-{i}"
        with bridge_server(home) as bridge:
            settle()
            cpu0 = bridge.cpu_seconds()
            fill.bridge.append(upload(bridge, path))
            fill.bridge_cpu.append(bridge.cpu_seconds() - cpu0)
        print(
            f"  fill round {i + 1}: file:// zstd {fill.zstd[-1]:.2f}s, none {fill.none[-1]:.2f}s,"
            f" nar-bridge {fill.bridge[-1]:.2f}s (bridge CPU {fill.bridge_cpu[-1]:.2f}s)",
            file=sys.stderr,
        )
    return fill, home


def copy_from(url: str, path: str, label: str, check_against: str | None) -> float:
    """Time one ``nix copy --from url`` into a fresh store; optionally check the tree."""
    dest = DEST_ROOT / f"dest-{label}"
    xdg = DEST_ROOT / f"xdg-{label}"
    _rmtree(dest)
    _rmtree(xdg)
    seconds = _timed(
        [
            "nix",
            "copy",
            "--from",
            url,
            "--to",
            str(dest),
            path,
            "--no-check-sigs",
            *NO_NARINFO_CACHE,
        ],
        _env(XDG_CACHE_HOME=str(xdg)),
    )
    if check_against is not None:
        got = _dump_sha256(dest / path.lstrip("/"))
        if got != check_against:
            raise SystemExit(f"{label}: copied tree differs: sha256 {got} != {check_against}")
    _rmtree(dest)
    _rmtree(xdg)
    return seconds


@dataclass(frozen=True)
class Latency:
    samples_ms: list[float]
    one_connection: bool

    def pct(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def narinfo_latency(server: Server, hash_part: str, requests: int) -> Latency:
    host, port = server.host_port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    url = f"/{hash_part}.narinfo"
    samples: list[float] = []
    sock = None
    one = True
    try:
        for i in range(WARMUP_REQUESTS + requests):
            start = time.perf_counter()
            conn.request("GET", url)
            resp = conn.getresponse()
            body = resp.read()
            elapsed = time.perf_counter() - start
            if resp.status != 200 or not body:
                raise SystemExit(f"{server.url}{url}: HTTP {resp.status}")
            if i == WARMUP_REQUESTS - 1:
                sock = conn.sock
            elif i >= WARMUP_REQUESTS:
                samples.append(elapsed * 1000)
                one = one and conn.sock is sock and not resp.will_close
    finally:
        conn.close()
    return Latency(samples, one)


def curl_get(url: str) -> tuple[float, int]:
    """Seconds and bytes of a plain GET with the body discarded."""
    out = _run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", url]
    ).split()
    if out[0] != "200":
        raise SystemExit(f"GET {url}: HTTP {out[0]}")
    return float(out[2]), int(out[1])


def _get_text(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", parts.path)
        resp = conn.getresponse()
        body = resp.read().decode()
        if resp.status != 200:
            raise SystemExit(f"GET {url}: HTTP {resp.status}")
        return body
    finally:
        conn.close()


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def run(args: argparse.Namespace) -> str:
    assert shutil.which("nix") and shutil.which("curl"), "needs nix and curl: `make system-deps`"
    tree: Path = args.bridge_tree or TREE
    if args.bridge_tree is None:
        build_tree()
    rounds: int = args.bridge_rounds
    path = prepare_source(tree.resolve())
    hash_part = _hash_part(path)
    static_info = _narinfo_fields((STATIC_DIR / f"{hash_part}.narinfo").read_text())
    nar_size = int(static_info["NarSize"])
    nar_mb = nar_size / MB
    source_sha = _dump_sha256(SRC_STORE / path.lstrip("/"))  # also warms the page cache
    load = _load()

    _rmtree(SCRATCH)
    _rmtree(DEST_ROOT)
    _rmtree(BRIDGE_HOME)
    SCRATCH.mkdir(parents=True)
    DEST_ROOT.mkdir(parents=True, exist_ok=True)
    try:
        fill, home = measure_fill(path, max(1, args.fill_rounds))
        t_upload = min(fill.bridge)
        with static_server(STATIC_DIR) as static, bridge_server(home) as bridge:
            bridge_info = _narinfo_fields(_get_text(f"{bridge.url}/{hash_part}.narinfo"))
            if bridge_info["NarHash"] != static_info["NarHash"]:
                raise SystemExit(f"NarHash differs: {bridge_info} vs {static_info}")

            static_copy: list[float] = []
            bridge_copy: list[float] = []
            bridge_cpu: list[float] = []
            for i in range(rounds):
                check = source_sha if i == 0 else None
                static_copy.append(copy_from(static.url, path, f"static-{i}", check))
                cpu0 = bridge.cpu_seconds()
                bridge_copy.append(copy_from(bridge.url, path, f"bridge-{i}", check))
                bridge_cpu.append(bridge.cpu_seconds() - cpu0)
                print(
                    f"  nix copy round {i + 1}: static {static_copy[-1]:.2f}s,"
                    f" bridge {bridge_copy[-1]:.2f}s (bridge CPU {bridge_cpu[-1]:.2f}s)",
                    file=sys.stderr,
                )

            static_nar_url = f"{static.url}/{static_info['URL']}"
            bridge_nar_url = f"{bridge.url}/{bridge_info['URL']}"
            static_get: list[float] = []
            bridge_get: list[float] = []
            for i in range(rounds):
                for url, times in ((static_nar_url, static_get), (bridge_nar_url, bridge_get)):
                    seconds, size = curl_get(url)
                    if size != nar_size:
                        raise SystemExit(f"GET {url}: {size} bytes, NarSize is {nar_size}")
                    times.append(seconds)
                print(
                    f"  NAR GET round {i + 1}: static {static_get[-1]:.2f}s,"
                    f" bridge {bridge_get[-1]:.2f}s",
                    file=sys.stderr,
                )

            lat_static = narinfo_latency(static, hash_part, args.narinfo_requests)
            lat_bridge = narinfo_latency(bridge, hash_part, args.narinfo_requests)
            print(
                f"  narinfo p99: static {lat_static.pct(0.99):.2f}ms,"
                f" bridge {lat_bridge.pct(0.99):.2f}ms",
                file=sys.stderr,
            )
    finally:
        _rmtree(SCRATCH)
        _rmtree(DEST_ROOT)

    fz, fn, fb = min(fill.zstd), min(fill.none), min(fill.bridge)
    fill_ratio = fb / fz
    pairs = fill.pair_ratios()
    sc, bc = min(static_copy), min(bridge_copy)
    sg, bg = min(static_get), min(bridge_get)
    copy_ratio = bc / sc
    p99 = lat_bridge.pct(0.99)

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def lat_row(label: str, lat: Latency) -> str:
        return (
            f"| {label} | {len(lat.samples_ms):,} | {lat.pct(0.5):.2f} | {lat.pct(0.9):.2f} |"
            f" {lat.pct(0.99):.2f} | {max(lat.samples_ms):.2f} |"
            f" {'yes' if lat.one_connection else 'no'} |"
        )

    return "\n".join(
        [
            f"Machine: {machine()}; load average {load} when the run started.",
            "",
            f"Input: {'the NAR-dump tree' if args.bridge_tree is None else f'`{tree}`'}"
            f" as one store path, {nar_mb:,.0f} MB of NAR, uncompressed everywhere"
            " (`compression=none`). Static server: `http.server.ThreadingHTTPServer`"
            " (HTTP/1.1 keep-alive, TCP_NODELAY) over a `nix copy --to file://…` cache."
            " nar-bridge: `tvix-store nar-bridge` on a fresh embedded store, filled with"
            f" `nix copy --to http://…?compression=none` ({t_upload:.1f} s,"
            f" {nar_mb / t_upload:,.0f} MB/s). Both servers, Nix and curl share the same 2 CPUs.",
            "",
            "Filling (issue 13): `nix copy --from SRC_STORE --to DEST PATH` into a fresh"
            f" destination on disk, {len(fill.bridge)} alternating rounds (zstd, none, bridge),"
            " `sync` + `fstrim` before each, best of each; nar-bridge started on a fresh store"
            " every round. Ratios to the `file://…?compression=zstd` cache.",
            "",
            "| destination | s | NAR MB/s | ratio | target |",
            "|---|---:|---:|---:|---|",
            f"| `file://DIR?compression=zstd` | {fz:.2f} | {nar_mb / fz:,.0f} | 1.00× | |",
            f"| `file://DIR?compression=none` | {fn:.2f} | {nar_mb / fn:,.0f} | {fn / fz:.2f}× | |",
            f"| `http://BRIDGE?compression=none` (bridge CPU {min(fill.bridge_cpu):.2f} s) |"
            f" {fb:.2f} | {nar_mb / fb:,.0f} | **{fill_ratio:.2f}×** (round by round"
            f" {pairs[0]:.2f}–{pairs[-1]:.2f}×, median {pairs[len(pairs) // 2]:.2f}×) |"
            f" ≤ {FILL_TARGET}×: {verdict(fill_ratio <= FILL_TARGET)} |",
            "",
            f"`nix copy --from URL --to FRESH_STORE PATH --no-check-sigs` (store on"
            f" {'tmpfs' if DEST_ROOT != SCRATCH else 'disk'}), fresh `XDG_CACHE_HOME`,"
            f" narinfo cache TTLs 0; best of {rounds} alternating rounds; both copies checked"
            " equal to the source tree (sha256 of `nix-store --dump`).",
            "",
            "| source | nix copy s | NAR MB/s | bridge CPU s | bridge/static | target |",
            "|---|---:|---:|---:|---:|---|",
            f"| static `http.server` | {sc:.2f} | {nar_mb / sc:,.0f} | | | |",
            f"| nar-bridge | {bc:.2f} | {nar_mb / bc:,.0f} | {min(bridge_cpu):.2f} |"
            f" **{copy_ratio:.2f}×** | ≤ {COPY_TARGET}×: {verdict(copy_ratio <= COPY_TARGET)} |",
            "",
            "Plain NAR GET with `curl -o /dev/null` (bridge: the castore-node URL from its"
            f" narinfo; static: the `nar/….nar` file), best of {rounds}:",
            "",
            "| source | s | MB/s | bridge/static |",
            "|---|---:|---:|---:|",
            f"| static `http.server` | {sg:.2f} | {nar_mb / sg:,.0f} | |",
            f"| nar-bridge | {bg:.2f} | {nar_mb / bg:,.0f} | **{bg / sg:.2f}×** |",
            "",
            f"narinfo GET latency: sequential GETs of `<hash>.narinfo` over one keep-alive"
            f" connection (`http.client`, after {WARMUP_REQUESTS} warm-up requests), each timed"
            " with `perf_counter` in the client; ms.",
            "",
            "| server | requests | p50 | p90 | p99 | max | one connection |",
            "|---|---:|---:|---:|---:|---:|---|",
            lat_row("static `http.server`", lat_static),
            lat_row("nar-bridge", lat_bridge),
            "",
            f"nar-bridge narinfo p99 {p99:.2f} ms: target ≤ {P99_TARGET_MS:g} ms"
            f" {verdict(p99 <= P99_TARGET_MS)}.",
        ]
    )
