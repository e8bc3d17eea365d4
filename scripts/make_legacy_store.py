#!/usr/bin/env python3
"""Build ``tests/data/legacy-store-v1.tar.gz``: an embedded store in format v1.

Format v1 is the embedded-store layout written by ``main`` up to the pack
store of issue 13: raw ``packs/*.pack`` files indexed by the ``packed``,
``pack_segments`` and ``chunked`` tables of ``store.sqlite``, large blobs as
zstd chunk objects under ``blobs/`` (B §7.1 layout) when
``TVIX_STORE_CHUNK_ZSTD`` is set, and NAR plans in ``nar_plans``.

Run it from a checkout of the commit that wrote format v1 (it uses that
checkout's ``.venv/bin/tvix-store``), never from a later one: the point of
the fixture is that *old* code wrote it. The commit hash is recorded in
``tests/data/legacy-store-v1.json`` with, for every store path, the NarHash
and NarSize the store recorded and the sha256 of ``tvix-store export``
(checked here to equal ``nix-store --dump`` of the source, or of the NAR
uploaded). The trees are generated from a fixed seed, so the store paths are
the same on every run (pack names and SQLite pages are not).

    .venv/bin/python scripts/make_legacy_store.py [--out tests/data]

What the store holds:

- ``small``: small files, empty files, an executable, symlinks (relative,
  absolute, dangling), nested and empty directories, a duplicated file;
- ``chunked``: a file just over 128 KiB and one of a few MiB (cut by FastCDC
  into packed chunks: ``chunked`` rows), a file of exactly 128 KiB, one of
  600 KiB, and a file shared with ``small``;
- ``single-file``: a path whose root is a file;
- ``zstd-chunks``: imported with ``TVIX_STORE_CHUNK_ZSTD=3``, so its large
  file lands in the legacy chunk store ``blobs/``;
- NARs uploaded through ``tvix-store nar-bridge`` (HTTP PUT of NAR and
  narinfo): ``net-tools``, ``complicated``, ``symlink`` and
  ``onebyteexecutable`` from ``/work/shared/testdata`` (or ``--testdata``),
  one of them input-addressed with a reference;
- every path exported once (NAR plans recorded by the export's checked render).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import blake3

from nix_compat import nixbase32
from nix_compat.nar import dump_path
from nix_compat.narinfo import NarInfo
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.store_path import StorePath, build_ca_path

ROOT = Path(__file__).resolve().parent.parent
FORMAT = "v1"
NAME = "legacy-store-v1"
SEED = 20261205
_WORDS = [
    "store",
    "path",
    "nar",
    "blob",
    "chunk",
    "pack",
    "segment",
    "directory",
    "symlink",
    "digest",
    "blake3",
    "sha256",
    "closure",
    "derivation",
    "output",
    "reference",
    "signature",
    "narinfo",
    "castore",
    "tvix",
    "nix",
    "zstd",
    "index",
    "frame",
    "member",
    "offset",
    "size",
    "legacy",
]


def text(rng: random.Random, size: int) -> bytes:
    """Compressible but varied bytes (so FastCDC cuts distinct chunks)."""
    out = bytearray()
    while len(out) < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14)))
        out += f"{rng.randint(0, 999):03d} {line}\n".encode()
    return bytes(out[:size])


def make_trees(src: Path) -> dict[str, Path]:
    """Write the source trees under ``src``; their names → paths."""
    rng = random.Random(SEED)
    shared = text(rng, 5000)

    small = src / "small"
    (small / "a" / "b" / "c").mkdir(parents=True)
    (small / "empty-dir").mkdir()
    (small / "README").write_bytes(b"a tree of small things\n")
    (small / "empty").write_bytes(b"")
    (small / "a" / "empty-too").write_bytes(b"")
    (small / "a" / "one").write_bytes(b"1")
    (small / "a" / "shared.txt").write_bytes(shared)
    (small / "a" / "b" / "dup-1").write_bytes(b"same bytes twice\n")
    (small / "a" / "b" / "dup-2").write_bytes(b"same bytes twice\n")
    (small / "a" / "b" / "c" / "deep.txt").write_bytes(text(rng, 3000))
    for i in range(40):
        (small / "a" / f"f{i:02d}.txt").write_bytes(text(rng, rng.randint(1, 9000)))
    (small / "a" / "rand.bin").write_bytes(rng.randbytes(20000))
    exe = small / "bin-tool"
    exe.write_bytes(b"#!/bin/sh\necho tool\n")
    exe.chmod(0o755)
    os.symlink("a/one", small / "link-rel")
    os.symlink("/nix/store/does-not-exist/x", small / "link-abs")
    os.symlink("nowhere", small / "a" / "dangling")
    os.symlink("c", small / "a" / "b" / "to-dir")

    chunked = src / "chunked"
    (chunked / "sub").mkdir(parents=True)
    (chunked / "just-over-128k").write_bytes(text(rng, (128 << 10) + 1))
    (chunked / "exactly-128k").write_bytes(text(rng, 128 << 10))
    big = text(rng, 2 << 20)
    (chunked / "sub" / "big.txt").write_bytes(big)
    (chunked / "sub" / "text-600k.txt").write_bytes(text(rng, 600 << 10))
    (chunked / "shared.txt").write_bytes(shared)
    tool = chunked / "sub" / "run"
    tool.write_bytes(b"#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)

    single = src / "single-file"
    single.write_bytes(text(rng, 777))

    zchunks = src / "zstd-chunks"
    (zchunks / "d").mkdir(parents=True)
    (zchunks / "d" / "large.txt").write_bytes(text(rng, 1 << 20))
    (zchunks / "d" / "large-rand.bin").write_bytes(rng.randbytes(140 << 10))
    (zchunks / "small.txt").write_bytes(b"small, next to large chunk files\n")
    return {"small": small, "chunked": chunked, "single-file": single, "zstd-chunks": zchunks}


def run(tvix: str, home: Path, *args: str, env: dict[str, str] | None = None) -> bytes:
    """``tvix-store ARGS`` on the embedded store ``home``; its stdout (exit on failure)."""
    e = {k: v for k, v in os.environ.items() if not k.endswith("_SERVICE_ADDR")}
    e.pop("TVIX_STORE_CHUNK_ZSTD", None)
    e["TVIX_STORE_HOME"] = str(home)
    e.update(env or {})
    proc = subprocess.run([tvix, *args], env=e, capture_output=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"tvix-store {' '.join(args)} failed:\n{proc.stderr.decode(errors='replace')}")
    return proc.stdout


def nar_of(path: Path) -> bytes:
    """The NAR of ``path``, from ``nix-store --dump`` when Nix is installed."""
    if shutil.which("nix-store"):
        return subprocess.run(
            ["nix-store", "--dump", str(path)], capture_output=True, check=True
        ).stdout
    buf = io.BytesIO()
    dump_path(str(path), buf)
    return buf.getvalue()


def upload(tvix: str, home: Path, nars: list[tuple[str, bytes, list[str]]]) -> list[str]:
    """PUT each (name, NAR, references) through ``tvix-store nar-bridge``; return store paths."""
    log = home.parent / "nar-bridge.log"
    e = {k: v for k, v in os.environ.items() if not k.endswith("_SERVICE_ADDR")}
    e["TVIX_STORE_HOME"] = str(home)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [tvix, "nar-bridge", "-l", "127.0.0.1:0"], env=e, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"nar-bridge listening on (http://\S+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"nar-bridge did not start:\n{log.read_text()}")
            time.sleep(0.05)
        url = m.group(1).rstrip("/")
        paths = []
        for name, nar, refs in nars:
            sha = hashlib.sha256(nar).digest()
            if refs:  # input-addressed: any hash part will do, as for a built output
                hash_part = nixbase32.encode(hashlib.sha256(b"legacy:" + nar).digest()[:20])
                sp = StorePath.from_absolute_path(f"/nix/store/{hash_part}-{name}")
                ca = None
            else:
                ca = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, sha))
                sp = build_ca_path(name, ca)
            info = NarInfo(
                store_path=sp,
                url=f"nar/{nixbase32.encode(sha)}.nar",
                compression="none",
                file_hash=sha,
                file_size=len(nar),
                nar_hash=sha,
                nar_size=len(nar),
                references=tuple(StorePath.from_absolute_path(r) for r in refs),
                deriver=None,
                ca=ca,
            )
            for path, body in (
                (f"/{info.url}", nar),
                (f"/{sp.hash_part}.narinfo", info.render().encode()),
            ):
                req = urllib.request.Request(url + path, data=body, method="PUT")
                with urllib.request.urlopen(req, timeout=60) as resp:
                    if resp.status not in (200, 201, 204):
                        sys.exit(f"PUT {path}: {resp.status}")
            paths.append(sp.absolute)
        return paths
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def table_counts(db: Path) -> dict[str, int]:
    """Rows in each table of ``db``."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in sorted(names)}
    finally:
        conn.close()


def file_blobs(tree: Path) -> list[dict[str, object]]:
    """The regular files of ``tree`` as blobs (BLAKE3, size), largest first."""
    files = (
        [tree]
        if tree.is_file()
        else [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]
    )
    out = []
    for p in files:
        data = p.read_bytes()
        out.append({"b3": blake3.blake3(data).hexdigest(), "size": len(data)})
    out.sort(key=lambda b: (-int(str(b["size"])), str(b["b3"])))
    return out


def main() -> None:
    """Build the store, check it reads back, write the tarball and the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    ap.add_argument("--tvix", default=str(ROOT / ".venv" / "bin" / "tvix-store"))
    ap.add_argument("--testdata", type=Path, default=Path("/work/shared/testdata"))
    ap.add_argument("--keep", type=Path, help="also leave the store here (a directory)")
    args = ap.parse_args()

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if dirty:
        sys.exit(f"src/ has uncommitted changes; the fixture must be written by a commit:\n{dirty}")

    with tempfile.TemporaryDirectory(prefix="legacy-store-") as tmp:
        tmpd = Path(tmp)
        home = tmpd / "store"
        trees = make_trees(tmpd / "src")
        expected: dict[str, bytes] = {}  # store path -> NAR
        origin: dict[str, str] = {}
        blobs: dict[str, list[dict[str, object]]] = {}
        for name, tree in trees.items():
            env = {"TVIX_STORE_CHUNK_ZSTD": "3"} if name == "zstd-chunks" else {}
            (sp,) = run(args.tvix, home, "import", str(tree), env=env).decode().split()
            expected[sp] = nar_of(tree)
            origin[sp] = "import" + (" (TVIX_STORE_CHUNK_ZSTD=3)" if env else "")
            blobs[sp] = file_blobs(tree)
        uploads: list[tuple[str, bytes, list[str]]] = [
            (n, (args.testdata / f"{n}.nar").read_bytes(), [])
            for n in ("net-tools", "complicated", "symlink", "onebyteexecutable")
        ]
        paths = upload(args.tvix, home, uploads)
        for (_name, nar, _refs), sp in zip(uploads, paths, strict=True):
            expected[sp] = nar
            origin[sp] = "nar-bridge PUT"
        # An input-addressed path with a reference, as `nix copy` uploads a built output.
        (dep,) = upload(args.tvix, home, [("with-ref", uploads[1][1], [paths[0]])])
        expected[dep] = uploads[1][1]
        origin[dep] = "nar-bridge PUT (input-addressed, one reference)"

        records = []
        for sp, nar in sorted(expected.items()):
            info = json.loads(run(args.tvix, home, "info", "--json", sp))
            exported = run(args.tvix, home, "export", sp)  # records a NAR plan if none yet
            sha = hashlib.sha256(nar).digest()
            want = "sha256:" + nixbase32.encode(sha)
            if exported != nar or info["narHash"] != want or info["narSize"] != len(nar):
                sys.exit(f"{sp}: the store does not give back what went in")
            records.append(
                {
                    "store_path": sp,
                    "origin": origin[sp],
                    "nar_hash": info["narHash"],
                    "nar_size": info["narSize"],
                    "export_sha256": sha.hex(),
                    "references": info["references"],
                    "ca": info["ca"],
                    "root": info["root"],
                    "blobs": blobs.get(sp, []),
                }
            )

        # The store is closed (every process exited): fold the WAL into store.sqlite.
        db = home / "store.sqlite"
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        for extra in ("store.sqlite-wal", "store.sqlite-shm"):
            p = home / extra
            if p.exists() and p.stat().st_size == 0:
                p.unlink()
        files = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
        tables = table_counts(db)
        packs = [f for f in files if f.startswith("packs/")]
        chunk_files = len([f for f in files if f.startswith("blobs/")])
        layout = {"tables": tables, "packs": packs, "chunk_store_files": chunk_files}
        if not packs or not chunk_files or not tables.get("chunked"):
            sys.exit(f"the store lacks a part of format v1: {layout}")
        if not tables.get("nar_plans"):
            sys.exit("no NAR plans were recorded")

        args.out.mkdir(parents=True, exist_ok=True)
        tar_path = args.out / f"{NAME}.tar.gz"
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for p in sorted(home.rglob("*")):
                ti = tar.gettarinfo(str(p), arcname="store/" + str(p.relative_to(home)))
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
                if ti.isfile():
                    with p.open("rb") as f:
                        tar.addfile(ti, f)
                else:
                    tar.addfile(ti)
        tar_path.write_bytes(gzip.compress(raw.getvalue(), compresslevel=9, mtime=0))
        meta = {
            "format": FORMAT,
            "written_by_commit": commit,
            "tarball": tar_path.name,
            "store_dir": "store",
            "made_by": "scripts/make_legacy_store.py",
            "layout": layout,
            "paths": records,
        }
        (args.out / f"{NAME}.json").write_text(json.dumps(meta, indent=1) + "\n")
        if args.keep:
            shutil.copytree(home, args.keep, symlinks=True, dirs_exist_ok=True)
        print(f"{tar_path}: {tar_path.stat().st_size} bytes, {len(records)} paths, commit {commit}")
        print(json.dumps(layout, indent=1))


if __name__ == "__main__":
    main()
