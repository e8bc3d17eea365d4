"""A store written by the v1 layout (today's PackedBlobService) reads through the pack store."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.v1_packed import PackedBlobService
from tvix_castore.blobservice import ObjectStoreBlobService
from tvix_castore.digests import B3Digest
from tvix_castore.objectstore import LocalObjectStore
from tvix_castore.packstore import Chunked, Legacy, LegacyObject, Location, PackBlobService
from tvix_castore.packstore.compact import compact

from .util import pseudo_random

MiB = 1 << 20


def _v1(home: Path, zstd: int | None) -> PackedBlobService:
    """The embedded store as ``main`` builds it (``tvix_store.embedded.embedded_blobs``)."""
    home.mkdir(parents=True, exist_ok=True)
    return PackedBlobService(
        home / "store.sqlite",
        ObjectStoreBlobService(LocalObjectStore(home / "blobs"), zstd_level=zstd),
    )


@pytest.mark.parametrize("zstd", [None, 3], ids=["chunks packed", "chunk files"])
async def test_v1_store_reads_back(tmp_path: Path, zstd: int | None) -> None:
    home = tmp_path / "home"
    small = [pseudo_random(n, n) for n in (1, 100, 5000, 128 * 1024)]
    large = [pseudo_random(3 * MiB, 1), pseudo_random(300 * 1024, 2)]
    files = []
    for i, data in enumerate(large):
        path = tmp_path / f"f{i}"
        path.write_bytes(data)
        files.append((str(path), len(data)))
    async with _v1(home, zstd) as old:
        digests = await old.put_many(small)
        digests += [d for d in await old.ingest_files(files) if isinstance(d, B3Digest)]
        streamed = pseudo_random(2 * MiB, 3)
        digests.append(await old.put(streamed))
    everything = [*small, *large, streamed]
    async with PackBlobService(home) as svc:
        kinds = set()
        for data, digest in zip(everything, digests, strict=True):
            assert await svc.has(digest)
            assert await svc.size(digest) == len(data)
            assert await svc.read_all(digest) == data
            assert svc.reader.read(digest) == data
            kinds.add(type(svc.reader.locate([digest.raw])[digest.raw]))
            chunks = await svc.chunks(digest)
            assert chunks is not None
            if chunks:
                assert sum(c.size for c in chunks) == len(data)
                where = svc.reader.locate([c.digest.raw for c in chunks])
                kinds |= {type(loc) for loc in where.values()}
        assert Legacy in kinds and Chunked in kinds
        assert (LegacyObject in kinds) == (zstd is not None)
        assert svc.reader.problem([d.raw for d in digests]) is None
        # storing a blob again appends nothing: it is present (in the legacy layout)
        before = {p.name: p.stat().st_size for p in (home / "packs").iterdir()}
        assert await svc.put_many(small) == digests[: len(small)]
        assert {p.name: p.stat().st_size for p in (home / "packs").iterdir()} == before
        # new blobs go to v2 packs beside the old ones
        new = await svc.put(b"a new blob")
        assert await svc.read_all(new) == b"a new blob"
    assert any(p.suffix == ".tvpack" for p in (home / "packs").iterdir())
    async with _v1(home, zstd) as old:  # (v1 tables untouched: main still reads them)
        assert await old.read_all(digests[0]) == small[0]


async def test_damaged_v1_blob_is_an_error_naming_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with _v1(home, None) as old:
        (digest,) = await old.put_many([pseudo_random(5000)])
    (pack,) = (home / "packs").iterdir()
    raw = bytearray(pack.read_bytes())
    raw[100] ^= 1
    pack.write_bytes(raw)
    async with PackBlobService(home) as svc:
        with pytest.raises(Exception, match=str(digest).replace("+", r"\+")):
            await svc.read_all(digest)


@pytest.mark.parametrize("zstd", [None, 3], ids=["chunks packed", "chunk files"])
async def test_a_v1_read_after_compaction_converted_it_finds_it_again(
    tmp_path: Path, zstd: int | None
) -> None:
    """A reader that located a blob in v1 files before ``compact`` deleted them reads it."""
    home = tmp_path / "home"
    data = [pseudo_random(5000, 7), pseudo_random(300 * 1024, 8)]
    async with _v1(home, zstd) as old:
        digests = [await old.put(d) for d in data]
    reader_svc = PackBlobService(home)
    try:
        found = reader_svc.reader.locate([d.raw for d in digests])
        stale: dict[bytes, Location] = {
            raw: loc for raw, loc in found.items() if isinstance(loc, Legacy | LegacyObject)
        }
        if isinstance(found.get(digests[1].raw), Chunked):  # (its chunks are the legacy part)
            chunked = found[digests[1].raw]
            assert isinstance(chunked, Chunked)
            chunk_locs = reader_svc.reader.locate([c.digest.raw for c in chunked.chunks])
            stale |= chunk_locs
        assert stale
        compactor = PackBlobService(home)
        try:
            stats = compact(compactor)
        finally:
            compactor.close()
        assert stats.legacy_rows_converted + stats.legacy_objects_converted > 0
        assert not list((home / "packs").glob("*.pack"))
        for raw, loc in stale.items():
            got = reader_svc.reader.read_located(raw, loc)
            assert B3Digest.of(got).raw == raw
    finally:
        reader_svc.close()
