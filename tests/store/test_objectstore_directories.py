"""``objectstore+…`` directory services (B §7.3) through the public interface.

Real ``tvix-store`` processes and a real Nix as the NAR oracle: a daemon
whose directories are closure objects receives an import over gRPC and
serves it back; ``tvix-store import`` / ``export`` over the same backend
directly, from flags and from a composition file (``type = "objectstore"``,
also over moto's S3).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import zstandard

from tests.compat.oracle import DigestSink, Nix, assert_same_nar
from tests.compat.trees import TREES_BY_NAME
from tests.servers import S3, Postgres
from tvix_castore.errors import ConfigError

from .conftest import TreeFarm, export_to, ok, service_flags, start_daemon, tvix

TREES = ("mixed", "name-bytes", "deep-50", "lone-file")


def closure_objects(root: Path) -> list[Path]:
    """Every closure object under ``root``'s ``dirs/`` (none of another kind)."""
    found = sorted(p for p in (root / "dirs").rglob("*") if p.is_file())
    for p in found:
        assert p.relative_to(root).parts[:2] == ("dirs", "b3"), p
        assert p.parent.name == p.name[:4] and len(p.name) == 64, p
    return found


def first_frame_digest(obj: Path) -> str:
    """hex(b3) of an object's first frame (read by hand), which names the object."""
    import blake3

    raw = zstandard.ZstdDecompressor().decompressobj().decompress(obj.read_bytes())
    length = int.from_bytes(raw[:4], "big")
    return blake3.blake3(raw[4 : 4 + length]).hexdigest()


def local_flags(tmp_path: Path) -> list[str]:
    objects = tmp_path / "objects"
    return [
        "--blob-service-addr",
        f"objectstore+file://{objects}",
        "--directory-service-addr",
        f"objectstore+file://{objects}",
        "--path-info-service-addr",
        f"sqlite://{tmp_path}/pathinfo.sqlite",
    ]


def _oracle(nix: Nix, paths: list[bytes]) -> list[DigestSink]:
    sinks = [DigestSink() for _ in paths]
    for p, sink in zip(paths, sinks, strict=True):
        nix.dump(p, sink)
    return sinks


def test_daemon_serves_an_import_received_over_grpc(
    tmp_path: Path, farm: TreeFarm, nix: Nix
) -> None:
    paths = [farm.path(TREES_BY_NAME[n]) for n in TREES]
    home = tmp_path / "daemon-home"
    d = start_daemon(home, tmp_path / "daemon.log", "127.0.0.1:0", *local_flags(tmp_path))
    unused = tmp_path / "unused-home"
    try:
        printed = ok(tvix(unused, "import", *service_flags(d.url), *paths)).decode().split()
        assert len(printed) == len(paths)
        # The objects: one per closure root (each store path with a directory root).
        objects = closure_objects(tmp_path / "objects")
        assert len(objects) == 3  # mixed, name-bytes, deep-50 (lone-file has no directory)
        assert all(first_frame_digest(o) == o.name for o in objects)
        # Served back by the daemon, rendered from those closures: Nix's NARs.
        ours = [DigestSink() for _ in paths]
        for store_path, sink in zip(printed, ours, strict=True):
            export_to(unused, store_path, sink, *service_flags(d.url))
    finally:
        rc = d.stop()
    assert rc == 0, d.stderr.decode()
    assert b"Traceback" not in d.stderr
    assert not unused.exists(), "the embedded store was used"
    for mine, theirs, store_path in zip(ours, _oracle(nix, paths), printed, strict=True):
        assert_same_nar(mine, theirs, store_path)


def test_import_and_export_round_trip(tmp_path: Path, farm: TreeFarm, nix: Nix) -> None:
    paths = [farm.path(TREES_BY_NAME[n]) for n in TREES]
    home = tmp_path / "unused-home"
    flags = local_flags(tmp_path)
    printed = ok(tvix(home, "import", *flags, *paths)).decode().split()
    assert ok(tvix(home, "import", *flags, *paths)).decode().split() == printed  # idempotent
    before = {o: o.stat().st_ino for o in closure_objects(tmp_path / "objects")}
    assert len(before) == 3
    ok(tvix(home, "import", *flags, *paths))
    after = {o: o.stat().st_ino for o in closure_objects(tmp_path / "objects")}
    assert after == before  # written only if absent
    ours = [DigestSink() for _ in paths]
    for store_path, sink in zip(printed, ours, strict=True):
        export_to(home, store_path, sink, *flags)
    assert not home.exists()
    for mine, theirs, store_path in zip(ours, _oracle(nix, paths), printed, strict=True):
        assert_same_nar(mine, theirs, store_path)


def test_composition_file_objectstore_directories(
    tmp_path: Path, farm: TreeFarm, nix: Nix, s3: S3
) -> None:
    """``type = "objectstore"`` for directories: on a local directory and on S3."""
    prefix = uuid.uuid4().hex[:12]
    objects = tmp_path / "objects"
    (tmp_path / "store.toml").write_text(
        f"""
[blobservices.default]
type = "objectstore"
object_store_url = "file://{objects}"

[directoryservices.default]
type = "objectstore"
object_store_url = "s3://{s3.bucket}/{prefix}"
object_store_options = {{ endpoint = "{s3.endpoint}", region = "us-east-1", allow_http = true, access_key_id = "test", secret_access_key = "test" }}

[pathinfoservices.default]
type = "sqlite"
path = "{tmp_path}/pathinfo.sqlite"
"""
    )
    paths = [farm.path(TREES_BY_NAME[n]) for n in ("mixed", "deep-50")]
    home = tmp_path / "unused-home"
    comp = ["--store-composition", str(tmp_path / "store.toml")]
    printed = ok(tvix(home, "import", *comp, *paths)).decode().split()
    assert not (objects / "dirs").exists()  # the default directory service is the S3 one
    ours = [DigestSink() for _ in paths]
    for store_path, sink in zip(printed, ours, strict=True):
        export_to(home, store_path, sink, *comp)
    for mine, theirs, store_path in zip(ours, _oracle(nix, paths), printed, strict=True):
        assert_same_nar(mine, theirs, store_path)
    shown = ok(tvix(home, "config", "show", *comp)).decode()
    assert 'type = "objectstore"' in shown and "REDACTED" in shown
    assert not home.exists()


async def test_composition_entry_on_a_local_directory(tmp_path: Path) -> None:
    from tvix_castore.directoryservice.objectstore import ObjectStoreDirectoryService
    from tvix_castore.objectstore import LocalObjectStore
    from tvix_store.composition import Composition

    entry = {"type": "objectstore", "object_store_url": f"file://{tmp_path}/o"}
    comp = Composition({"directoryservices": {"default": entry}})
    dirs = comp.build("directoryservices", "default")
    assert isinstance(dirs, ObjectStoreDirectoryService)
    assert isinstance(dirs.store, LocalObjectStore) and dirs.store.root == tmp_path / "o"
    bad = {**entry, "object_store_options": {"avg_chunk_size": 65536}}
    with pytest.raises(ConfigError, match="a blob service parameter"):
        Composition({"directoryservices": {"default": bad}}).build("directoryservices", "default")
    for close in comp.closers:
        await close()


def test_shared_gc_refuses_directories_outside_postgresql(
    tmp_path: Path, farm: TreeFarm, nix: Nix, s3: S3, postgres: Postgres
) -> None:
    """A shared store's gc marks Directories in PostgreSQL: with them in S3 it must not sweep."""
    bucket = s3.fresh_url()
    meta = postgres.fresh_url()
    flags = ["--blob-service-addr", bucket, "--directory-service-addr", bucket]
    flags += ["--path-info-service-addr", meta]
    home = tmp_path / "unused-home"
    tree = farm.path(TREES_BY_NAME["mixed"])
    (store_path,) = ok(tvix(home, "import", *flags, tree)).decode().split()
    gc = ["gc", "--blob-service-addr", bucket, "--path-info-service-addr", meta, "--grace", "0"]
    proc = tvix(home, *gc)
    assert proc.returncode != 0
    assert b"not in PostgreSQL" in proc.stderr and b"nothing was deleted" in proc.stderr
    ours = DigestSink()
    export_to(home, store_path, ours, *flags)  # every blob is still there
    (theirs,) = _oracle(nix, [tree])
    assert_same_nar(ours, theirs, store_path)
