"""castore: filesystem ingestion versus ``b3sum`` and ``nix-store --add``; gRPC blob throughput.

Input (built once under ``benchmarks/.work/castore``): ``tree`` = the NAR dump
benchmark's tree (hard links into ``nar-dump/tree``) plus a copy of
``/usr/lib/x86_64-linux-gnu``: at least 1 GiB in at least 10k files.

Ingestion, each a fresh process (start-up counts), best of ``--castore-rounds``:

* ``b3sum``: ``find TREE -type f -print0 | xargs -0 b3sum > /dev/null``, the
  hashing limit (reads and hashes every file, writes nothing);
* ours: ``ingest_path`` into a fresh ``objectstore+file://`` +
  ``sqlite://`` store, then once more into the same store (everything
  already there: the dedup path);
* ``nix-store --store <fresh dir> --add TREE``.

Every store of every round is kept until all rounds are done (then deleted):
deleting ~100k files between timed runs makes ext4 (mounted with ``discard``)
slow down whatever runs next. ``sync`` and ``fstrim`` run before each timed
command (see :func:`benchmarks.common.settle`).

gRPC: a 1 GiB random blob is Put and Read through ``GrpcBlobService`` against
a server in a separate process (``memory://`` and ``objectstore+memory:///``
backends), on loopback TCP; best of ``--castore-rounds`` each way.

``--castore-profile`` instead runs one ingestion in-process under cProfile
(main thread and every worker thread) and prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

from benchmarks import nar_dump
from benchmarks.common import MB, WORK, machine, python_snippet, settle, tool_version

NAME = "castore"
TITLE = "castore ingestion and gRPC throughput (issue 3)"

BASE = WORK / "castore"
TREE = BASE / "tree"
TREE_META = BASE / "tree.json"
SCRATCH = BASE / "scratch"
USR_LIB = Path("/usr/lib/x86_64-linux-gnu")
GiB = 1 << 30
MiB = 1 << 20
MIN_FILES = 10_000

INGEST = (
    "import asyncio, sys\n"
    "from tvix_castore.ingest import ingest_path\n"
    "from tvix_castore.registry import blob_service_from_url, directory_service_from_url\n"
    "async def main():\n"
    "    blobs = blob_service_from_url(sys.argv[2])\n"
    "    dirs = directory_service_from_url(sys.argv[3])\n"
    "    async with blobs, dirs:\n"
    "        node = await ingest_path(sys.argv[1], blobs, dirs)\n"
    "    print(node.digest.hex())\n"
    "asyncio.run(main())\n"
)

# The embedded default store's layout (tvix_store.embedded): blobs, chunks and
# Directories in compressed pack files (tvix_castore.packstore), indexed by SQLite.
INGEST_EMBEDDED = (
    "import asyncio, sys\n"
    "from pathlib import Path\n"
    "from tvix_castore.ingest import ingest_path\n"
    "from tvix_castore.packstore import PackBlobService\n"
    "from tvix_castore.packstore.directories import PackDirectoryService\n"
    "async def main():\n"
    "    blobs = PackBlobService(Path(sys.argv[2]))\n"
    "    dirs = PackDirectoryService(blobs, owns=True)\n"
    "    async with dirs:\n"
    "        node = await ingest_path(sys.argv[1], blobs, dirs)\n"
    "    print(node.digest.hex())\n"
    "asyncio.run(main())\n"
)

SERVER = (
    "import asyncio, sys\n"
    "from tvix_castore.protos import rpc_blobstore_pb2_grpc as pb_grpc\n"
    "from tvix_castore.registry import blob_service_from_url\n"
    "from tvix_castore.rpc.blob_server import BlobServiceServicer\n"
    "from tvix_castore.rpc.server import start_server\n"
    "async def main():\n"
    "    servicer = BlobServiceServicer(blob_service_from_url(sys.argv[1]))\n"
    "    add = lambda s: pb_grpc.add_BlobServiceServicer_to_server(servicer, s)\n"
    "    server, addr = await start_server('127.0.0.1:0', [(add, 'tvix.castore.v1.BlobService')])\n"
    "    print(addr, flush=True)\n"
    "    await server.wait_for_termination()\n"
    "asyncio.run(main())\n"
)
GRPC_BACKENDS = ["memory://", "objectstore+memory:///"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--castore-rounds", type=int, default=3, help="timed rounds per castore measurement"
    )
    parser.add_argument(
        "--castore-profile",
        action="store_true",
        help="profile one in-process ingestion (all threads) instead of benchmarking",
    )


# -- input ------------------------------------------------------------------------------------
def build_tree() -> dict[str, int]:
    """Build (once) the ≥ 1 GiB, ≥ 10k-file tree; its stats are cached in tree.json."""
    if TREE_META.exists() and TREE.is_dir():
        meta: dict[str, int] = json.loads(TREE_META.read_text())
        return meta
    nar_dump.build_tree()
    tmp = BASE / "tree.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"building {TREE} (once) ...", file=sys.stderr)
    shutil.copytree(nar_dump.TREE, tmp / "nar-dump-tree", symlinks=True, copy_function=os.link)
    shutil.copytree(USR_LIB, tmp / "usr-lib", symlinks=True, ignore=nar_dump._ignore_special)
    meta = nar_dump._count(tmp)
    if meta["bytes"] < GiB or meta["files"] < MIN_FILES:
        raise SystemExit(f"benchmark tree too small: {meta}")
    shutil.rmtree(TREE, ignore_errors=True)
    tmp.rename(TREE)
    TREE_META.write_text(json.dumps(meta))
    return meta


# -- timing child processes -------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """One finished child process: wall clock and CPU time (its descendants included)."""

    wall: float
    cpu: float
    stdout: str


def timed(argv: list[str], *, env: dict[str, str] | None = None) -> Timing:
    """Run ``argv`` after a ``sync``; time it (wall and CPU), fail if it fails."""
    settle()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, env=env, check=False, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{argv[0]} failed with exit status {proc.returncode}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Timing(wall, cpu, proc.stdout.strip())


def b3sum_argv(tree: Path = TREE) -> list[str]:
    """Hash every regular file of ``tree`` with ``b3sum`` (output discarded)."""
    return ["sh", "-c", 'find "$1" -type f -print0 | xargs -0 b3sum > /dev/null', "sh", str(tree)]


def ingest_argv(store: Path) -> list[str]:
    return python_snippet(
        INGEST, str(TREE), f"objectstore+file://{store}/blobs", f"sqlite://{store}/dirs.sqlite"
    )


def nix_add_argv(store: Path) -> list[str]:
    return ["nix-store", "--store", str(store), "--add", str(TREE)]


def dd_argv(path: Path, size: int) -> list[str]:
    """Write ``size`` bytes (rounded up to MiB) of zeros to a fresh file: the write floor."""
    return ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={-(-size // MiB)}", "status=none"]


def nix_env() -> dict[str, str]:
    return {**os.environ, "NIX_CONFIG": "experimental-features = nix-command"}


def du(path: Path) -> tuple[int, int]:
    """(regular files, bytes allocated on disk) under ``path``."""
    files = blocks = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            files += 1
            blocks += st.st_blocks
    return files, blocks * 512


@dataclass
class Ingestion:
    b3sum: list[Timing]
    ours: list[Timing]
    dedup: list[Timing]
    nix: list[Timing]
    floor: list[Timing]
    embedded: list[Timing]
    our_store: tuple[int, int]
    nix_store: tuple[int, int]


def best(runs: list[Timing]) -> Timing:
    return min(runs, key=lambda r: r.wall)


def measure_ingestion(rounds: int) -> Ingestion:
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    timed(b3sum_argv())  # warms the page cache
    result = Ingestion([], [], [], [], [], [], (0, 0), (0, 0))
    try:
        for i in range(rounds):
            ours_dir, nix_dir = SCRATCH / f"ours-{i}", SCRATCH / f"nix-{i}"
            ours_dir.mkdir()
            result.b3sum.append(timed(b3sum_argv()))
            result.ours.append(timed(ingest_argv(ours_dir)))
            result.dedup.append(timed(ingest_argv(ours_dir)))
            embedded_dir = SCRATCH / f"embedded-{i}"
            embedded_dir.mkdir()
            result.embedded.append(
                timed(python_snippet(INGEST_EMBEDDED, str(TREE), str(embedded_dir)))
            )
            result.nix.append(timed(nix_add_argv(nix_dir), env=nix_env()))
            if i == 0:
                result.our_store = du(ours_dir)
            result.floor.append(timed(dd_argv(SCRATCH / f"dd-{i}", result.our_store[1])))
            print(
                f"  round {i + 1}: b3sum {result.b3sum[-1].wall:.2f}s"
                f" ours {result.ours[-1].wall:.2f}s dedup {result.dedup[-1].wall:.2f}s"
                f" nix-store --add {result.nix[-1].wall:.2f}s",
                file=sys.stderr,
            )
        roots = {t.stdout for t in result.ours + result.dedup + result.embedded}
        nix_paths = {t.stdout for t in result.nix}
        if len(roots) != 1 or len(nix_paths) != 1:
            raise SystemExit(f"results differ between runs: {roots} {nix_paths}")
        result.nix_store = du(SCRATCH / "nix-0" / "nix" / "store")
    finally:
        for p in SCRATCH.glob("nix-*"):  # Nix makes its store read-only
            subprocess.run(["chmod", "-R", "u+w", str(p)], check=False)
        shutil.rmtree(SCRATCH, ignore_errors=True)
    return result


# -- gRPC -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Throughput:
    backend: str
    put: list[float]  # seconds per 1 GiB Put
    read: list[float]
    reader: str


async def _grpc_rounds(url: str, data: bytes, digest: bytes, rounds: int) -> Throughput:
    from tvix_castore.registry import blob_service_from_url

    blobs = blob_service_from_url(url)
    puts: list[float] = []
    reads: list[float] = []
    reader_kind = ""
    view = memoryview(data)
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            writer = blobs.open_write()
            for off in range(0, len(view), MiB):
                await writer.write(view[off : off + MiB])
            got = await writer.close()
            puts.append(time.perf_counter() - start)
            if got.raw != digest:
                raise SystemExit(f"gRPC put returned {got}")
        for _ in range(rounds):
            start = time.perf_counter()
            reader = await blobs.open_read(got)
            if reader is None:
                raise SystemExit("gRPC read: blob not found")
            total = 0
            async with reader:
                while chunk := await reader.read(MiB):
                    total += len(chunk)
            reads.append(time.perf_counter() - start)
            reader_kind = type(reader).__name__
            if total != len(data):
                raise SystemExit(f"gRPC read returned {total} bytes")
    finally:
        await blobs.aclose()
    return Throughput(url, puts, reads, reader_kind)


def measure_grpc(backend: str, data: bytes, digest: bytes, rounds: int) -> Throughput:
    """Serve ``backend`` from a separate process; Put and Read 1 GiB through our client."""
    server = subprocess.Popen(python_snippet(SERVER, backend), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        addr = server.stdout.readline().strip()
        if not addr:
            raise SystemExit(f"gRPC server for {backend} did not start")
        result = asyncio.run(_grpc_rounds(f"grpc+http://{addr}", data, digest, rounds))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    print(
        f"  grpc {backend}: put {', '.join(f'{len(data) / s / MB:.0f}' for s in result.put)}"
        f" MB/s; read {', '.join(f'{len(data) / s / MB:.0f}' for s in result.read)} MB/s",
        file=sys.stderr,
    )
    return Throughput(backend, result.put, result.read, result.reader)


# -- profile ----------------------------------------------------------------------------------
def profile_ingestion() -> None:
    """One in-process ingestion under cProfile: event-loop thread and worker threads apart."""
    from tvix_castore.ingest import ingest_path
    from tvix_castore.registry import blob_service_from_url, directory_service_from_url

    store = SCRATCH / "profile"
    shutil.rmtree(SCRATCH, ignore_errors=True)
    store.mkdir(parents=True)
    workers: list[cProfile.Profile] = []
    original: Callable[[threading.Thread], None] = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        prof = cProfile.Profile()
        workers.append(prof)
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()

    async def ingest() -> None:
        blobs = blob_service_from_url(f"objectstore+file://{store}/blobs")
        dirs = directory_service_from_url(f"sqlite://{store}/dirs.sqlite")
        async with blobs, dirs:
            await ingest_path(TREE, blobs, dirs)

    setattr(threading.Thread, "run", profiled_run)  # noqa: B010  (patching a method)
    main = cProfile.Profile()
    try:
        start = time.perf_counter()
        main.enable()
        asyncio.run(ingest())
        main.disable()
        print(f"ingestion under cProfile: {time.perf_counter() - start:.2f}s", file=sys.stderr)
    finally:
        setattr(threading.Thread, "run", original)  # noqa: B010
        shutil.rmtree(SCRATCH, ignore_errors=True)
    print("== event-loop thread", file=sys.stderr)
    pstats.Stats(main, stream=sys.stderr).sort_stats("tottime").print_stats(12)
    print(f"== {len(workers)} worker threads, summed", file=sys.stderr)
    stats = pstats.Stats(workers[0], stream=sys.stderr)
    for prof in workers[1:]:
        stats.add(prof)
    stats.sort_stats("tottime").print_stats(20)


# -- report -----------------------------------------------------------------------------------
def _met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def run(args: argparse.Namespace) -> str:
    assert shutil.which("nix-store"), "nix-store not on PATH: run `make system-deps`"
    assert shutil.which("b3sum"), "b3sum not on PATH: run `make system-deps`"
    meta = build_tree()
    if args.castore_profile:
        profile_ingestion()
        raise SystemExit(0)
    rounds: int = args.castore_rounds
    load = os.getloadavg()[0]
    ing = measure_ingestion(rounds)

    nar_dump.build_one_gib()
    data = nar_dump.ONE_GIB.read_bytes()
    digest = blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
    grpc = [measure_grpc(b, data, digest, rounds) for b in GRPC_BACKENDS]

    mb = meta["bytes"] / MB
    b3, ours, dedup, nix = best(ing.b3sum), best(ing.ours), best(ing.dedup), best(ing.nix)
    floor = best(ing.floor)
    embedded = best(ing.embedded)

    def row(label: str, t: Timing, megabytes: float = mb) -> str:
        return (
            f"| {label} | {t.wall:.2f} | {t.cpu:.2f} | {megabytes / t.wall:,.0f} | "
            f"{t.wall / b3.wall:.2f}× | {t.wall / nix.wall:.2f}× |"
        )

    def rate(seconds: list[float]) -> float:
        return len(data) / min(seconds) / MB

    lines = [
        f"Machine: {machine()}; {tool_version(['b3sum', '--version'])}; "
        f"load average {load:.1f} when the run started (other work shares the 2 CPUs).",
        "",
        f"Input tree: the NAR dump tree plus `{USR_LIB}`: {mb:,.0f} MB in "
        f"{meta['files']:,} files, {meta['directories']:,} directories, "
        f"{meta['symlinks']:,} symlinks.",
        "",
        "Each command is a fresh process (start-up counts); best of "
        f"{rounds} wall-clock runs, `sync` and `fstrim` before each, page cache warm. "
        "CPU = user + sys "
        "of the process and its children. Ours: `ingest_path` into "
        "`objectstore+file://` + `sqlite://` (fresh store; then again into the same store, "
        "where every chunk already exists). `nix-store --store <fresh dir> --add`. "
        "MB = 10^6 bytes of file content. The `dd` row writes as many bytes as our "
        "store occupies, as one file: the cost of the writes alone on this disk.",
        "",
        "| run | wall s | CPU s | MB/s | ÷ b3sum | ÷ nix-store --add |",
        "|---|---:|---:|---:|---:|---:|",
        row("`b3sum` over every file", b3),
        row("ours, fresh store", ours),
        row("ours, same store again (dedup)", dedup),
        row("ours, embedded layout (pack files + SQLite), fresh", embedded),
        row("`nix-store --add`, fresh store", nix),
        row(
            f"floor: `dd` {ing.our_store[1] / MB:,.0f} MB of zeros to a fresh file",
            floor,
            ing.our_store[1] / MB,
        ),
        "",
        f"Stores: ours {ing.our_store[1] / MB:,.0f} MB on disk in {ing.our_store[0]:,} "
        f"files; Nix {ing.nix_store[1] / MB:,.0f} MB in {ing.nix_store[0]:,} files.",
        "",
        f"Targets: ingestion ≤ 1.5 × b3sum: {_met(ours.wall <= 1.5 * b3.wall)} "
        f"({ours.wall / b3.wall:.2f}×); faster than `nix-store --add`: "
        f"{_met(ours.wall < nix.wall)} ({ours.wall / nix.wall:.2f}×); with the embedded "
        f"layout {_met(embedded.wall < nix.wall)} ({embedded.wall / nix.wall:.2f}×).",
        "",
        "gRPC blob throughput on loopback TCP: one 1 GiB random blob through "
        "`GrpcBlobService` (Put in 1 MiB messages; Read verifying every byte) against "
        f"`BlobServiceServicer` in a separate server process; best of {rounds}. "
        "Target ≥ 400 MB/s each way.",
        "",
        "| server backend | Put MB/s | Read MB/s | client reader | target |",
        "|---|---:|---:|---|---|",
        *(
            f"| `{g.backend}` | {rate(g.put):,.0f} | {rate(g.read):,.0f} | `{g.reader}` | "
            f"Put {_met(rate(g.put) >= 400)}, Read {_met(rate(g.read) >= 400)} |"
            for g in grpc
        ),
    ]
    return "\n".join(lines)
