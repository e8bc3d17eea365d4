"""The exposed service (issue 17): the cost of access control, and 64 clients at once.

One embedded store holds an imported tree (``--service-files`` files of
``--service-file-kib`` KiB, and one ``--service-nar-mib`` MiB file as the NAR to
stream). Three loopback servers serve it:

* ``open``: ``tvix-store nar-bridge --no-metrics`` with no token in the store
  (no checks, nothing counted);
* ``metrics``: the same with metrics on (the default: every request counted,
  timed and its bytes added up);
* ``auth``: the store after ``tvix-store token create``, run with ``--private
  --no-metrics``, so every read presents a Bearer token that is verified (JWT
  signature, then the revocation lookup) before it is served;
* ``auth+metrics``: tokens and metrics both on (what an exposed cache runs);
* ``static``: ``http.server.ThreadingHTTPServer`` over a binary-cache
  directory holding the bridge's own narinfos and NARs (what nginx would serve).

Measured, alternating servers for ``--service-rounds`` rounds (medians):
``--service-requests`` sequential narinfo GETs over one keep-alive connection
(p50/p99); best of 3 GETs of the big NAR (MB/s); then once each, 64 client
threads, each with its own keep-alive connection, fetching narinfos and the
small NARs for ``--service-seconds`` (requests/s, p99).
The servers' CPU seconds are reported too (the clients share the 2 vCPUs).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import WORK, machine
from benchmarks.nar_bridge import STATIC_SERVER
from benchmarks.nar_bridge import Server as BridgeServer

NAME = "service"
TITLE = "The exposed service: tokens and metrics on vs off, 64 clients (issue 17)"
BASE = WORK / "service"
BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store") if (BIN / "tvix-store").exists() else "tvix-store"
STATIC = STATIC_SERVER  # (keep-alive, TCP_NODELAY: the nar-bridge benchmark's)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service-files", type=int, default=200)
    parser.add_argument("--service-file-kib", type=int, default=16)
    parser.add_argument("--service-nar-mib", type=int, default=256)
    parser.add_argument("--service-requests", type=int, default=2000)
    parser.add_argument("--service-seconds", type=float, default=10.0)
    parser.add_argument("--service-rounds", type=int, default=3)


@dataclass
class Server(BridgeServer):
    headers: dict[str, str] = field(default_factory=dict)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SERVICE_ADDR")}
    env["TVIX_STORE_HOME"] = str(home)
    return env


@contextmanager
def _server(argv: list[str], env: dict[str, str], headers: dict[str, str]) -> Iterator[Server]:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline().decode()
            if not line:
                raise SystemExit(f"{argv} did not start")
            m = re.search(r"(http://\S+)", line)
            if m:
                break
        yield Server(m.group(1), proc, headers)
    finally:
        proc.terminate()
        proc.wait(30)


def _get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> int:
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    n = 0
    while chunk := resp.read(1 << 20):
        n += len(chunk)
    if resp.status != 200:
        raise SystemExit(f"GET {path}: HTTP {resp.status}")
    return n


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def sequential(server: Server, path: str, n: int) -> tuple[float, float]:
    conn = http.client.HTTPConnection(*server.host_port, timeout=30)
    samples = []
    for i in range(n + 100):
        t = time.perf_counter()
        _get(conn, path, server.headers)
        if i >= 100:
            samples.append((time.perf_counter() - t) * 1000)
    conn.close()
    return statistics.median(samples), _pct(samples, 0.99)


def throughput(server: Server, path: str) -> float:
    best = 0.0
    for _ in range(3):
        conn = http.client.HTTPConnection(*server.host_port, timeout=60)
        t = time.perf_counter()
        n = _get(conn, path, server.headers)
        best = max(best, n / (time.perf_counter() - t) / 1e6)
        conn.close()
    return best


def concurrent(server: Server, paths: list[str], seconds: float) -> tuple[float, float]:
    lat: list[list[float]] = [[] for _ in range(64)]
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(*server.host_port, timeout=60)
        i = k
        while time.monotonic() < stop:
            t = time.perf_counter()
            _get(conn, paths[i % len(paths)], server.headers)
            lat[k].append((time.perf_counter() - t) * 1000)
            i += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(64)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    every = [x for one in lat for x in one]
    return len(every) / wall, _pct(every, 0.99)


def _prepare(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The store (fresh), the store paths imported."""
    shutil.rmtree(BASE, ignore_errors=True)
    home, src = BASE / "home", BASE / "src"
    src.mkdir(parents=True)
    paths = []
    for i in range(args.service_files):
        f = src / f"small-{i}"
        f.write_bytes(os.urandom(args.service_file_kib << 10))
        paths.append(str(f))
    big = src / "big"
    with big.open("wb") as out:
        for _ in range(args.service_nar_mib):
            out.write(os.urandom(1 << 20))
    out_ = subprocess.run(
        [TVIX, "import", str(big), *paths], env=_env(home), capture_output=True, check=True
    )
    return home, out_.stdout.decode().split()


def _mirror(server: Server, hashes: list[str], static: Path) -> dict[str, str]:
    """Copy the bridge's narinfos and NARs into a static cache directory; the bridge's NAR URLs."""
    urls = {}
    conn = http.client.HTTPConnection(*server.host_port, timeout=60)
    (static / "nar").mkdir(parents=True)
    for h in hashes:
        conn.request("GET", f"/{h}.narinfo")
        text = conn.getresponse().read().decode()
        url = re.search(r"^URL: (\S+)", text, re.M)
        nar_hash = re.search(r"^NarHash: sha256:(\S+)", text, re.M)
        assert url and nar_hash
        urls[h] = "/" + url.group(1)
        conn.request("GET", urls[h])
        body = conn.getresponse().read()
        (static / "nar" / f"{nar_hash.group(1)}.nar").write_bytes(body)
        (static / f"{h}.narinfo").write_text(
            text.replace(url.group(0), f"URL: nar/{nar_hash.group(1)}.nar")
        )
    conn.close()
    return urls


def run(args: argparse.Namespace) -> str:
    home, store_paths = _prepare(args)
    hashes = [Path(p).name.split("-", 1)[0] for p in store_paths]
    env = _env(home)
    static_dir = BASE / "static"
    with _server([TVIX, "nar-bridge", "-l", "127.0.0.1:0"], env, {}) as open_:
        bridge_urls = _mirror(open_, hashes, static_dir)
    static_urls = {
        h: "/" + (static_dir / f"{h}.narinfo").read_text().split("URL: ", 1)[1].split()[0]
        for h in hashes
    }
    token = (
        subprocess.run(
            [TVIX, "token", "create", "--scope", "pull"], env=env, capture_output=True, check=True
        )
        .stdout.decode()
        .splitlines()[-1]
    )
    results: dict[str, dict[str, float]] = {}
    bridge = [TVIX, "nar-bridge", "-l", "127.0.0.1:0"]
    bearer = {"Authorization": f"Bearer {token}"}
    kinds = {
        "static": ([sys.executable, "-c", STATIC, str(static_dir)], {}),
        "open": ([*bridge, "--insecure-no-auth", "--no-metrics"], {}),
        "metrics": ([*bridge, "--insecure-no-auth"], {}),
        "auth": ([*bridge, "--private", "--no-metrics"], bearer),
        "auth+metrics": ([*bridge, "--private"], bearer),
    }
    # "open" must not see the token: a copy of the store without service.sqlite.
    open_home = BASE / "home-open"
    shutil.copytree(home, open_home, ignore=shutil.ignore_patterns("service.sqlite*", "token.key"))
    with ExitStack() as stack:
        servers = {}
        for label, (argv, headers) in kinds.items():
            server_env = _env(open_home) if label in ("open", "metrics") else env
            servers[label] = stack.enter_context(_server(argv, server_env, headers))
        big, small = hashes[0], hashes[1:]
        cpu0 = {label: server.cpu_seconds() for label, server in servers.items()}
        rounds: dict[str, list[tuple[float, float, float]]] = {label: [] for label in kinds}
        # Sequential narinfos and the big NAR: servers alternating, round after round
        # (the machine is shared: each figure is the median of the rounds).
        for _ in range(args.service_rounds):
            for label, server in servers.items():
                nar_urls = static_urls if label == "static" else bridge_urls
                p50, p99 = sequential(server, f"/{small[0]}.narinfo", args.service_requests)
                rounds[label].append((p50, p99, throughput(server, nar_urls[big])))
        for label, server in servers.items():
            nar_urls = static_urls if label == "static" else bridge_urls
            mixed = [p for h in small for p in (f"/{h}.narinfo", nar_urls[h])]
            rps, cp99 = concurrent(server, mixed, args.service_seconds)
            p50s, p99s, mbss = zip(*rounds[label], strict=True)
            results[label] = {
                "p50": statistics.median(p50s), "p99": statistics.median(p99s),
                "mbs": statistics.median(mbss), "rps": rps, "cp99": cp99,
                "cpu": server.cpu_seconds() - cpu0[label],
            }  # fmt: skip
            print(
                f"  {label}: {results[label]} rounds {rounds[label]}", file=sys.stderr, flush=True
            )
    o = results["open"]
    rows = [
        (f"narinfo p50 (sequential, {args.service_requests})", "p50", "{:.2f} ms"),
        ("narinfo p99", "p99", "{:.2f} ms"),
        (f"NAR GET, {args.service_nar_mib} MiB (best of 3)", "mbs", "{:.0f} MB/s"),
        (f"64 clients, narinfo + NAR mix, {args.service_seconds:g} s: requests/s", "rps", "{:.0f}"),
        ("64 clients: p99", "cp99", "{:.1f} ms"),
        ("server CPU seconds (whole run)", "cpu", "{:.2f}"),
    ]
    labels = list(results)
    lines = [
        f"Machine: {machine()}",
        "",
        f"Store: {args.service_files} files of {args.service_file_kib} KiB and one"
        f" {args.service_nar_mib} MiB file, each its own store path (embedded store).",
        "`open`: nar-bridge with no token in the store and --no-metrics; `metrics`: the same"
        " with metrics on (the default); `auth`: a token in the store, --private, every request"
        " carrying a Bearer token that is verified, --no-metrics; `auth+metrics`: both on;"
        " `static`: ThreadingHTTPServer over a binary-cache directory of the same narinfos and"
        f" NARs. All five run at once; sequential narinfos and the big NAR are measured"
        f" {args.service_rounds} rounds, the servers alternating, and each figure is the median"
        " of the rounds; the 64-client mix runs once per server. Ratios are against `open` of"
        " the same run.",
        "",
        "| | " + " | ".join(labels) + " | metrics / open | auth+metrics / open |",
        "|---|" + "---:|" * (len(labels) + 2),
    ]
    for title, key, fmt in rows:
        cells = [fmt.format(results[label][key]) for label in labels]
        ratios = [f"{results[k][key] / o[key]:.2f}×" for k in ("metrics", "auth+metrics")]
        lines.append(f"| {title} | " + " | ".join(cells + ratios) + " |")
    lines += [
        "",
        "Command: `python -m benchmarks service --service-nar-mib"
        f" {args.service_nar_mib} --service-seconds {args.service_seconds:g}"
        f" --service-requests {args.service_requests} --service-rounds {args.service_rounds}`.",
    ]
    shutil.rmtree(BASE, ignore_errors=True)
    return "\n".join(lines)
