"""Service URLs → services: every accept/reject rule, and that what is built works."""

import doctest
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tvix_castore import registry
from tvix_castore.blobservice import BlobService, MemoryBlobService, ObjectStoreBlobService
from tvix_castore.blobservice.grpc import GrpcBlobService
from tvix_castore.blobservice.objectstore import DEFAULT_AVG_CHUNK_SIZE, chunk_key
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice import (
    DirectoryService,
    GrpcDirectoryService,
    MemoryDirectoryService,
    SqliteDirectoryService,
)
from tvix_castore.errors import ConfigError, StorageUnavailable, UnknownScheme
from tvix_castore.objectstore import LocalObjectStore, MemoryObjectStore
from tvix_castore.protos import rpc_blobstore_pb2_grpc as blob_grpc
from tvix_castore.protos import rpc_directory_pb2_grpc as dir_grpc
from tvix_castore.registry import (
    ServiceUrl,
    blob_service_from_url,
    blob_service_schemes,
    directory_service_from_url,
    directory_service_schemes,
    register_blob_service,
    register_directory_service,
)
from tvix_castore.rpc.blob_server import BlobServiceServicer
from tvix_castore.rpc.directory_server import DirectoryServiceServicer
from tvix_castore.rpc.server import start_server
from tvix_castore.testing.fixtures import directories

FX = directories()
DATA = os.urandom(3 * DEFAULT_AVG_CHUNK_SIZE)  # several chunks with the default chunker


def test_docstring_examples() -> None:
    result = doctest.testmod(registry, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0


def test_all_is_sorted_and_resolves() -> None:
    exported = registry.__all__
    assert exported == sorted(exported, key=lambda n: (not n.isupper(), n.islower(), n))
    for name in exported:
        assert hasattr(registry, name)


def test_builtin_schemes() -> None:
    assert blob_service_schemes() == [
        "grpc+http",
        "grpc+https",
        "grpc+unix",
        "memory",
        "objectstore+azure",
        "objectstore+file",
        "objectstore+gs",
        "objectstore+memory",
        "objectstore+s3",
    ]
    assert directory_service_schemes() == [
        "grpc+http",
        "grpc+https",
        "grpc+unix",
        "memory",
        "objectstore+azure",
        "objectstore+file",
        "objectstore+gs",
        "objectstore+memory",
        "objectstore+s3",
        "postgres",
        "postgresql",
        "sqlite",
    ]


# -- unknown schemes and malformed URLs ---------------------------------------------------------
@pytest.mark.parametrize("url", ["foo://", "s3://bucket/x", "objectstore+ftp://b/p", "grpc://h:1"])
def test_unknown_scheme_lists_the_known_ones(url: str) -> None:
    with pytest.raises(UnknownScheme) as blob_err:
        blob_service_from_url(url)
    for scheme in blob_service_schemes():
        assert f"{scheme}://" in str(blob_err.value)
    with pytest.raises(UnknownScheme) as dir_err:
        directory_service_from_url(url)
    assert "sqlite://" in str(dir_err.value)


def test_sqlite_is_no_blob_service(tmp_path: Path) -> None:
    with pytest.raises(UnknownScheme, match=r"sqlite:// is a directory service \(known: "):
        blob_service_from_url(f"sqlite://{tmp_path}/db.sqlite")


def test_unknown_scheme_is_a_config_error() -> None:
    assert issubclass(UnknownScheme, ConfigError)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "not a service URL"),
        ("memory", "not a service URL"),
        ("memory:", "not a service URL"),
        ("memory:/", "not a service URL"),
        ("/abs/path", "not a service URL"),
        ("://", "not a service URL"),
        ("1mem://", "not a service URL"),
        ("mem ory://", "whitespace"),
        ("memory:// ", "whitespace"),
        (" memory://", "whitespace"),
        ("memory://\n", "whitespace"),
        ("memory://\x00", "controls"),
        ("memory://#", "fragment"),
        ("memory://#x", "fragment"),
        ("memory://?a", "malformed URL"),
        ("grpc+http://[::1:8000", "malformed URL"),
    ],
)
def test_malformed(url: str, message: str) -> None:
    for build in (blob_service_from_url, directory_service_from_url):
        with pytest.raises(ConfigError, match=message) as err:
            build(url)
        assert not isinstance(err.value, UnknownScheme)
        assert repr(url) in str(err.value)


def test_scheme_is_case_insensitive() -> None:
    assert isinstance(blob_service_from_url("MEMORY://"), MemoryBlobService)


# -- memory:// ----------------------------------------------------------------------------------
async def test_memory_accepted() -> None:
    blobs = blob_service_from_url("memory://")
    assert isinstance(blobs, MemoryBlobService)
    dirs = directory_service_from_url("memory://")
    assert isinstance(dirs, MemoryDirectoryService)
    await _round_trip(blobs, dirs)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory:///", "takes no path"),
        ("memory:////", "takes no path"),
        ("memory://foo", "takes no host"),
        ("memory://foo/", "takes no host"),
        ("memory://:8000", "takes no host"),
        ("memory://?x=1", r"unknown parameter\(s\) x; memory:// takes no query"),
        ("memory://?avg_chunk_size=1024", "takes no query"),
    ],
)
def test_memory_rejected(url: str, message: str) -> None:
    for build in (blob_service_from_url, directory_service_from_url):
        with pytest.raises(ConfigError, match=message):
            build(url)


# -- sqlite:// ----------------------------------------------------------------------------------
async def test_sqlite_accepted(tmp_path: Path) -> None:
    path = tmp_path / "dirs.sqlite"
    dirs = directory_service_from_url(f"sqlite://{path}")
    assert isinstance(dirs, SqliteDirectoryService)
    assert dirs.path == path
    await _round_trip(MemoryBlobService(), dirs)
    await dirs.aclose()
    again = directory_service_from_url(f"sqlite://{path}")  # persisted
    assert await again.get(FX.complicated.digest) == FX.complicated
    await again.aclose()


async def test_sqlite_path_is_percent_decoded(tmp_path: Path) -> None:
    dirs = directory_service_from_url(f"sqlite://{tmp_path}/a%20b.sqlite")
    assert isinstance(dirs, SqliteDirectoryService)
    assert dirs.path == tmp_path / "a b.sqlite"
    await dirs.aclose()
    assert (tmp_path / "a b.sqlite").exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "needs an absolute database file path"),
        ("sqlite:///", "must name a database file"),
        ("sqlite://host/tmp/x.sqlite", "takes no host"),
        ("sqlite://localhost/tmp/x.sqlite", "takes no host"),
        ("sqlite:///tmp/", "must name a database file"),
        ("sqlite:///tmp/x.sqlite?mode=ro", r"unknown parameter\(s\) mode"),
        ("sqlite:///nonexistent-dir-for-tvix/x.sqlite", "nonexistent-dir-for-tvix does not exist"),
        ("sqlite:///tmp/a%00b", "NUL"),
    ],
)
def test_sqlite_rejected(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        directory_service_from_url(url)


# -- objectstore+file:// and objectstore+memory:// ----------------------------------------------
async def test_objectstore_file_accepted(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    blobs = blob_service_from_url(f"objectstore+file://{root}")
    assert isinstance(blobs, ObjectStoreBlobService)
    assert isinstance(blobs.store, LocalObjectStore)
    assert blobs.store.root == root
    assert blobs.avg_size == DEFAULT_AVG_CHUNK_SIZE
    digest = await _blob_round_trip(blobs)
    chunks = await blobs.chunks(digest)
    assert chunks is not None
    assert len(chunks) >= 2
    assert (root / chunk_key(chunks[0].digest)).is_file()
    # A second service over the same directory sees the blob.
    other = blob_service_from_url(f"objectstore+file://{root}")
    assert await other.read_all(digest) == DATA


@pytest.mark.parametrize("avg", [512, 65536, 2 << 20])
async def test_objectstore_avg_chunk_size(tmp_path: Path, avg: int) -> None:
    for url in (f"objectstore+file://{tmp_path}/o?avg_chunk_size={avg}",
                f"objectstore+memory:///?avg_chunk_size={avg}"):  # fmt: skip
        blobs = blob_service_from_url(url)
        assert isinstance(blobs, ObjectStoreBlobService)
        assert (blobs.min_size, blobs.avg_size, blobs.max_size) == (avg // 2, avg, 2 * avg)
        await _blob_round_trip(blobs)


async def test_objectstore_memory_accepted() -> None:
    for url in ("objectstore+memory:///", "objectstore+memory://"):
        blobs = blob_service_from_url(url)
        assert isinstance(blobs, ObjectStoreBlobService)
        assert isinstance(blobs.store, MemoryObjectStore)
        await _blob_round_trip(blobs)
    a = blob_service_from_url("objectstore+memory:///")
    b = blob_service_from_url("objectstore+memory:///")
    digest = await a.put(b"only in a")
    assert not await b.has(digest)  # each URL is a fresh, private store


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("objectstore+file://", "needs an absolute directory path"),
        ("objectstore+file:///", "must name a directory"),
        ("objectstore+file:///tmp/x/", "must name a directory"),
        ("objectstore+file://host/tmp/x", "takes no host"),
        ("objectstore+file:///tmp/x?foo=bar", r"unknown parameter\(s\) foo"),
        ("objectstore+file:///tmp/x?avg_chunk_size=511", r"out of range \[512, 2097152\]"),
        ("objectstore+file:///tmp/x?avg_chunk_size=2097153", "out of range"),
        ("objectstore+file:///tmp/x?avg_chunk_size=0", "out of range"),
        ("objectstore+file:///tmp/x?avg_chunk_size=", "must be a decimal integer"),
        ("objectstore+file:///tmp/x?avg_chunk_size=-1024", "must be a decimal integer"),
        ("objectstore+file:///tmp/x?avg_chunk_size=1e6", "must be a decimal integer"),
        ("objectstore+file:///tmp/x?avg_chunk_size=%EF%BC%91", "must be a decimal integer"),
        ("objectstore+file:///tmp/x?avg_chunk_size=1024&avg_chunk_size=1024", "given 2 times"),
        ("objectstore+memory:///x", "takes no path"),
        ("objectstore+memory://host/", "takes no host"),
        ("objectstore+memory:///?region=eu", r"unknown parameter\(s\) region"),
        ("objectstore+memory:///?avg_chunk_size=big", "must be a decimal integer"),
    ],
)
def test_objectstore_rejected(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        blob_service_from_url(url)


def test_objectstore_file_over_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        blob_service_from_url(f"objectstore+file://{tmp_path}/f")


async def test_objectstore_directories(tmp_path: Path) -> None:
    """The blob URLs name directory services too (B §7.3 closures, under ``dirs/``)."""
    from tvix_castore.directoryservice.objectstore import ObjectStoreDirectoryService, closure_key

    root = tmp_path / "objects"
    dirs = directory_service_from_url(f"objectstore+file://{root}")
    assert isinstance(dirs, ObjectStoreDirectoryService)
    assert isinstance(dirs.store, LocalObjectStore) and dirs.store.root == root
    await dirs.put(FX.a)
    assert (root / closure_key(FX.a.digest)).is_file()
    # The same URL as a blob service: one directory, keys apart.
    blobs = blob_service_from_url(f"objectstore+file://{root}")
    await _blob_round_trip(blobs)
    other = directory_service_from_url(f"objectstore+file://{root}")
    assert await other.get(FX.a.digest) == FX.a
    for url in ("objectstore+memory:///", "objectstore+memory://"):
        mem = directory_service_from_url(url)
        assert isinstance(mem, ObjectStoreDirectoryService)
        assert isinstance(mem.store, MemoryObjectStore)
        assert await mem.get(FX.a.digest) is None  # each URL is a fresh, private store


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("objectstore+file:///tmp/x?avg_chunk_size=65536", "a blob service parameter"),
        ("objectstore+memory:///?avg_chunk_size=65536", "a blob service parameter"),
        ("objectstore+s3://b/p?skip_signature=1&avg_chunk_size=65536", "a blob service parameter"),
        ("objectstore+file:///tmp/x?foo=bar", r"unknown parameter\(s\) foo"),
        ("objectstore+file://", "needs an absolute directory path"),
        ("objectstore+file:///tmp/x/", "must name a directory"),
        ("objectstore+file://host/tmp/x", "takes no host"),
        ("objectstore+memory:///x", "takes no path"),
        ("objectstore+s3://b/p?region=us-east-1", "no credentials"),
    ],
)
def test_objectstore_directories_rejected(
    url: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    with pytest.raises(ConfigError, match=message) as err:
        directory_service_from_url(url)
    assert not isinstance(err.value, UnknownScheme)


# -- grpc+http://, grpc+https://, grpc+unix:// --------------------------------------------------
@dataclass
class Server:
    tcp: str  # host:port
    unix: str  # socket path
    blobs: BlobService
    dirs: DirectoryService


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    blobs = ObjectStoreBlobService(MemoryObjectStore())
    dirs = MemoryDirectoryService()
    regs = [
        (lambda s: blob_grpc.add_BlobServiceServicer_to_server(BlobServiceServicer(blobs), s),
         "tvix.castore.v1.BlobService"),
        (lambda s: dir_grpc.add_DirectoryServiceServicer_to_server(DirectoryServiceServicer(dirs), s),
         "tvix.castore.v1.DirectoryService"),
    ]  # fmt: skip
    tcp, tcp_addr = await start_server("127.0.0.1:0", regs)
    sock = str(tmp_path / "castore.sock")
    unix, _ = await start_server(sock, regs)
    try:
        yield Server(tcp_addr, sock, blobs, dirs)
    finally:
        await tcp.stop(None)
        await unix.stop(None)


@pytest.mark.parametrize("query", ["", "?wait-connect=1", "?wait-connect=0"])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_grpc_accepted(server: Server, transport: str, query: str) -> None:
    if transport == "tcp":
        url = f"grpc+http://{server.tcp}{query}"
    else:
        url = f"grpc+unix://{server.unix}{query}"
    blobs = blob_service_from_url(url)
    dirs = directory_service_from_url(url)
    assert isinstance(blobs, GrpcBlobService)
    assert isinstance(dirs, GrpcDirectoryService)
    try:
        digest = await _round_trip(blobs, dirs)
    finally:
        await blobs.aclose()
        await dirs.aclose()
    # What went through the client is really in the server's backends.
    assert await server.dirs.get(FX.complicated.digest) == FX.complicated
    assert await server.blobs.read_all(digest) == DATA


async def test_grpc_ipv6_host() -> None:
    blobs = blob_service_from_url("grpc+http://[::1]:8000")
    assert isinstance(blobs, GrpcBlobService)
    await blobs.aclose()


@pytest.mark.parametrize("url", ["grpc+https://127.0.0.1:1", "grpc+http://127.0.0.1:1"])
async def test_grpc_unreachable_fails_on_use(url: str) -> None:
    blobs = blob_service_from_url(url)
    dirs = directory_service_from_url(url + "?wait-connect=1")
    try:
        with pytest.raises(StorageUnavailable):
            await blobs.has(FX.complicated.digest)
        with pytest.raises(StorageUnavailable):
            await dirs.get(FX.complicated.digest)
    finally:
        await blobs.aclose()
        await dirs.aclose()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("grpc+http://", "needs a host"),
        ("grpc+http://:8000", "needs a host"),
        ("grpc+https://", "needs a host"),
        ("grpc+http://localhost:8000/", "takes no path"),
        ("grpc+http://localhost:8000/foo", "takes no path"),
        ("grpc+https://example.com/prefix", "takes no path"),
        ("grpc+http://localhost:port", "invalid port"),
        ("grpc+http://localhost:70000", "invalid port"),
        ("grpc+http://localhost:0", "port 0"),
        ("grpc+http://user@localhost:8000", "user info"),
        ("grpc+http://user:pw@localhost:8000", "user info"),
        ("grpc+http://localhost:8000?foo=1", r"unknown parameter\(s\) foo"),
        ("grpc+http://localhost:8000?wait-connect=yes", "wait-connect must be 0 or 1"),
        ("grpc+http://localhost:8000?wait-connect=", "wait-connect must be 0 or 1"),
        ("grpc+http://localhost:8000?wait-connect=1&wait-connect=1", "given 2 times"),
        ("grpc+unix://", "needs an absolute socket path"),
        ("grpc+unix:///", "must name a socket"),
        ("grpc+unix://host/run/sock", "takes no host"),
        ("grpc+unix://localhost/run/sock", "takes no host"),
        ("grpc+unix:///run/sock/", "must name a socket"),
        ("grpc+unix:///run/sock?x=1", r"unknown parameter\(s\) x"),
        ("grpc+unix:///run/sock?wait-connect=2", "wait-connect must be 0 or 1"),
    ],
)
def test_grpc_rejected(url: str, message: str) -> None:
    for build in (blob_service_from_url, directory_service_from_url):
        with pytest.raises(ConfigError, match=message):
            build(url)


# -- the registration hook ----------------------------------------------------------------------
@pytest.fixture
def clean_registry() -> Iterator[None]:
    blobs = dict(registry._BLOB_SERVICES)
    dirs = dict(registry._DIRECTORY_SERVICES)
    yield
    registry._BLOB_SERVICES.clear()
    registry._BLOB_SERVICES.update(blobs)
    registry._DIRECTORY_SERVICES.clear()
    registry._DIRECTORY_SERVICES.update(dirs)


@pytest.mark.usefixtures("clean_registry")
def test_register_new_schemes() -> None:
    seen: list[ServiceUrl] = []

    def blobs(url: ServiceUrl) -> BlobService:
        url.check_query("k")
        seen.append(url)
        return MemoryBlobService()

    def dirs(url: ServiceUrl) -> DirectoryService:
        url.no_host()
        return MemoryDirectoryService()

    register_blob_service("test+mem", blobs)
    register_directory_service("test+mem", dirs)
    assert "test+mem" in blob_service_schemes()
    assert "test+mem" in directory_service_schemes()
    assert isinstance(blob_service_from_url("test+mem://h/p%2Fq?k=a&k=b"), MemoryBlobService)
    assert seen == [
        ServiceUrl("test+mem://h/p%2Fq?k=a&k=b", "test+mem", "h", "/p/q", (("k", "a"), ("k", "b")))
    ]
    assert seen[0].get_all("k") == ["a", "b"]
    with pytest.raises(ConfigError, match="given 2 times"):
        seen[0].get("k")
    assert seen[0].get("missing") is None
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) z; test\+mem:// accepts only k"):
        blob_service_from_url("test+mem://?z=1")
    assert isinstance(directory_service_from_url("test+mem://"), MemoryDirectoryService)
    with pytest.raises(ConfigError, match="takes no host"):
        directory_service_from_url("test+mem://h")


@pytest.mark.usefixtures("clean_registry")
def test_register_refuses_taken_and_malformed_schemes() -> None:
    with pytest.raises(ConfigError, match="already registered for memory://"):
        register_blob_service("memory", lambda url: MemoryBlobService())
    with pytest.raises(ConfigError, match="already registered for sqlite://"):
        register_directory_service("sqlite", lambda url: MemoryDirectoryService())
    for bad in ("", "Memory", "1x", "a b", "a:", "a/b"):
        with pytest.raises(ConfigError, match="invalid URL scheme"):
            register_blob_service(bad, lambda url: MemoryBlobService())
    replacement = MemoryBlobService()
    register_blob_service("memory", lambda url: replacement, replace=True)
    assert blob_service_from_url("memory://anything") is replacement


# -- helpers ------------------------------------------------------------------------------------
async def _blob_round_trip(blobs: BlobService) -> B3Digest:
    digest = await blobs.put(DATA)
    assert await blobs.has(digest)
    assert await blobs.read_all(digest) == DATA
    return digest


async def _round_trip(blobs: BlobService, dirs: DirectoryService) -> B3Digest:
    digest = await _blob_round_trip(blobs)
    blob_digest = await blobs.put(b"Hello World!")
    assert await blobs.read_all(blob_digest) == b"Hello World!"
    async with dirs.put_multiple_start() as putter:
        await putter.put(FX.with_keep)  # the closure's leaf
        await putter.put(FX.complicated)
        root = await putter.close()
    assert root == FX.complicated.digest
    assert await dirs.get(root) == FX.complicated
    assert [d async for d in dirs.get_recursive(root)] == [FX.complicated, FX.with_keep]
    return digest
