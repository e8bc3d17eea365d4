"""A PathInfo Put over gRPC is recorded only if its metadata is true (issue 12, item 11).

Against a real ``tvix-store daemon``: NarSize/NarHash must be those of the
uploaded content, a CA must give the store path, and a signature by a key the
daemon knows (``--trusted-public-keys``, ``--signing-key``) must verify. A
refused Put is INVALID_ARGUMENT and leaves nothing behind (Get: NOT_FOUND).
``--trust-uploaded-nar-metadata`` skips only the content check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import blake3
import grpc
import grpc.aio
import pytest

from nix_compat import nixbase32
from nix_compat.nar import NarWriter
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.signing import Signature, SigningKey
from nix_compat.store_path import StorePath, build_ca_path, build_text_path
from tvix_castore.digests import B3Digest
from tvix_castore.nodes import DirectoryNode, FileNode, Node
from tvix_castore.protos import castore_pb2 as cpb
from tvix_castore.protos import rpc_blobstore_pb2 as bpb
from tvix_castore.protos import rpc_blobstore_pb2_grpc as bpb_grpc
from tvix_castore.protos import rpc_directory_pb2_grpc as dpb_grpc
from tvix_castore.rpc.channel import channel_options
from tvix_store.pathinfo import PathInfo
from tvix_store.protos import rpc_pathinfo_pb2 as rpb
from tvix_store.protos import rpc_pathinfo_pb2_grpc as rpb_grpc

from .conftest import Daemon, start_daemon

if TYPE_CHECKING:
    PathInfoStub: TypeAlias = rpb_grpc.PathInfoServiceAsyncStub
Code = grpc.StatusCode
TRUSTED = SigningKey.generate("trusted-test-1")
OWN = SigningKey.generate("own-test-1")
STRANGER = SigningKey.generate("stranger-test-1")


def sp(name: str) -> StorePath:
    """An input-addressed store path (any digest will do)."""
    return StorePath(hashlib.sha256(name.encode()).digest()[:20], name)


DATA = b"the truth, the whole truth\n" * 1000


@dataclasses.dataclass(frozen=True)
class Content:
    """A root node uploaded to the daemon, and its NAR as computed here."""

    node: Node
    nar: bytes

    @property
    def nar_size(self) -> int:
        return len(self.nar)

    @property
    def nar_sha256(self) -> bytes:
        return hashlib.sha256(self.nar).digest()

    def info(self, path: StorePath, **kw: object) -> PathInfo:
        fields: dict[str, object] = {
            "store_path": path,
            "node": self.node.with_name(path.basename.encode()),
            "nar_size": self.nar_size,
            "nar_sha256": self.nar_sha256,
            **kw,
        }
        return PathInfo(**fields)  # type: ignore[arg-type]


def _nar(build: Callable[[NarWriter], None]) -> bytes:
    out = io.BytesIO()
    w = NarWriter(out)
    build(w)
    w.close()
    return out.getvalue()


async def upload(channel: grpc.aio.Channel) -> dict[str, Content]:
    """A file root and a directory root, uploaded through the Blob/Directory services."""
    data = DATA
    resp = await bpb_grpc.BlobServiceStub(channel).Put(iter([bpb.BlobChunk(data=data)]))
    digest = B3Digest(resp.digest)
    d = cpb.Directory(files=[cpb.FileNode(name=b"f", digest=digest.raw, size=len(data))])
    dresp = await dpb_grpc.DirectoryServiceStub(channel).Put(iter([d]))
    assert dresp.root_digest == blake3.blake3(d.SerializeToString(deterministic=True)).digest()

    def tree(w: NarWriter) -> None:
        w.directory()
        w.entry(b"f")
        w.file(data)
        w.end_directory()

    return {
        "file": Content(FileNode(b"", digest, len(data)), _nar(lambda w: w.file(data))),
        "directory": Content(DirectoryNode(b"", B3Digest(dresp.root_digest), 1), _nar(tree)),
    }


@pytest.fixture
def own_key(tmp_path: Path) -> Path:
    own = tmp_path / "own.sk"
    own.write_text(OWN.render())
    return own


def _daemon(home: Path, tmp_path: Path, *args: str) -> Iterator[Daemon]:
    d = start_daemon(home, tmp_path / "daemon.log", "127.0.0.1:0", *args)
    yield d
    d.stop()


@pytest.fixture(params=["signing-key", "trusted-public-keys"])
def keyed(
    request: pytest.FixtureRequest, home: Path, tmp_path: Path, own_key: Path
) -> Iterator[tuple[Daemon, SigningKey]]:
    """A daemon knowing one key: its own signing key, or a trusted public key."""
    if request.param == "signing-key":
        args, key = ["--signing-key", str(own_key)], OWN
    else:
        args, key = ["--trusted-public-keys", TRUSTED.verifying_key().render()], TRUSTED
    for d in _daemon(home, tmp_path, *args):
        yield d, key


@pytest.fixture
def trusting(home: Path, tmp_path: Path, own_key: Path) -> Iterator[Daemon]:
    yield from _daemon(
        home, tmp_path, "--trust-uploaded-nar-metadata", "--signing-key", str(own_key)
    )


@dataclasses.dataclass
class Client:
    channel: grpc.aio.Channel
    stub: PathInfoStub
    content: dict[str, Content]

    async def refused(self, info: PathInfo, *needles: str) -> str:
        """Put ``info``: INVALID_ARGUMENT naming ``needles``, and nothing recorded."""
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await self.stub.Put(info.to_proto())
        assert exc.value.code() == Code.INVALID_ARGUMENT, exc.value.details()
        details = exc.value.details() or ""
        assert details.startswith("Invalid path info"), details
        for needle in needles:
            assert needle in details, (needle, details)
        assert await self.get(info.store_path) is None
        return details

    async def accepted(self, info: PathInfo) -> None:
        assert PathInfo.from_proto(await self.stub.Put(info.to_proto())) == info
        assert await self.get(info.store_path) == info

    async def get(self, path: StorePath) -> PathInfo | None:
        try:
            msg = await self.stub.Get(rpb.GetPathInfoRequest(by_output_hash=path.digest))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == Code.NOT_FOUND, exc.details()
            return None
        return PathInfo.from_proto(msg)


async def _client(d: Daemon) -> AsyncIterator[Client]:
    async with grpc.aio.insecure_channel(d.target, options=channel_options()) as ch:
        yield Client(ch, rpb_grpc.PathInfoServiceStub(ch), await upload(ch))


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[Client]:
    """A client of a daemon with default options."""
    async for c in _client(daemon):
        yield c


@pytest.fixture
async def keyed_client(
    keyed: tuple[Daemon, SigningKey],
) -> AsyncIterator[tuple[Client, SigningKey]]:
    async for c in _client(keyed[0]):
        yield c, keyed[1]


@pytest.fixture
async def trusting_client(trusting: Daemon) -> AsyncIterator[Client]:
    async for c in _client(trusting):
        yield c


def nb32(digest: bytes) -> str:
    return "sha256:" + nixbase32.encode(digest)


# -- NarSize / NarHash ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "directory"])
async def test_put_with_false_nar_metadata_is_refused(client: Client, kind: str) -> None:
    c = client.content[kind]
    wrong_hash = hashlib.sha256(b"not this NAR").digest()
    path = sp(f"lying-{kind}")
    cases = [
        c.info(path, nar_sha256=wrong_hash),
        c.info(path, nar_size=(1 << 64) - 1),
        c.info(path, nar_size=c.nar_size + 1),
        c.info(path, nar_size=c.nar_size - 8, nar_sha256=wrong_hash),
    ]
    for info in cases:
        # The message names the claim and what the content really is.
        await client.refused(
            info, str(info.nar_size), nb32(info.nar_sha256), str(c.nar_size), nb32(c.nar_sha256)
        )
    await client.accepted(c.info(path))


# -- CA -------------------------------------------------------------------------------------
async def test_put_ca_must_give_the_store_path(client: Client) -> None:
    c = client.content["directory"]
    source = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, c.nar_sha256))
    ref = sp("some-dependency")
    right = build_ca_path("src", source)
    # The CA names this very NAR, but the path is not the one it gives.
    await client.refused(c.info(sp("src"), ca=source), "CA fixed:r:sha256:", right.absolute)
    # The path fits another CA, not the NAR's: a NAR-sha256 CA must be the NarHash.
    other = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, hashlib.sha256(b"x").digest()))
    await client.refused(c.info(build_ca_path("src", other), ca=other), "NarHash")
    # References are part of a source path: with them, it is another path.
    await client.refused(c.info(right, ca=source, references=(ref,)), "store path")
    # A flat (fixed-output) path cannot have references at all.
    flat = CAHash(CAKind.FLAT, NixHash(HashAlgo.SHA256, hashlib.sha256(b"f").digest()))
    f_path = build_ca_path("fixed", flat)
    await client.refused(c.info(f_path, ca=flat, references=(ref,)), "references")
    # A text path cannot refer to itself.
    text = CAHash(CAKind.TEXT, NixHash(HashAlgo.SHA256, hashlib.sha256(b"t").digest()))
    t_path = build_text_path("note", sha256=text.hash.digest)
    await client.refused(c.info(t_path, ca=text, references=(t_path,)), "CA text:sha256:")
    # The true ones are accepted: a source path with references and a self reference
    # (as a CA derivation output has), and one without.
    refs = sorted([sp("dep-b"), sp("dep-a")])
    path = build_ca_path("src", source, refs, self_reference=True)
    await client.accepted(c.info(path, ca=source, references=(*refs, path)))
    await client.accepted(c.info(build_ca_path("plain", source), ca=source))


def _ca(kind: CAKind, algo: HashAlgo, data: bytes) -> CAHash:
    h = algo.new()
    h.update(data)
    return CAHash(kind, NixHash(algo, h.digest()))


async def test_put_ca_must_be_the_hash_of_the_content(client: Client) -> None:
    file, tree = client.content["file"], client.content["directory"]
    refs = (sp("dep"),)
    # Flat (fixed-output) and text addresses hash a regular file's bytes ...
    flat = _ca(CAKind.FLAT, HashAlgo.SHA512, DATA)
    text = _ca(CAKind.TEXT, HashAlgo.SHA256, DATA)
    text_path = build_ca_path("note", text, refs)
    lying_flat = _ca(CAKind.FLAT, HashAlgo.SHA512, DATA + b"x")
    await client.refused(
        file.info(build_ca_path("fixed", lying_flat), ca=lying_flat), "hash of its content"
    )
    lying_text = _ca(CAKind.TEXT, HashAlgo.SHA256, b"other text")
    await client.refused(
        file.info(build_ca_path("note", lying_text, refs), ca=lying_text, references=refs),
        "hash of its content",
    )
    # ... which a directory is not.
    await client.refused(
        tree.info(build_ca_path("fixed", flat), ca=flat), "non-executable regular file"
    )
    # A recursive address with another algorithm hashes the NAR.
    nar_md5 = _ca(CAKind.NAR, HashAlgo.MD5, tree.nar)
    lying_md5 = _ca(CAKind.NAR, HashAlgo.MD5, file.nar)
    await client.refused(
        tree.info(build_ca_path("rec", lying_md5), ca=lying_md5), "hash of its content"
    )
    await client.accepted(file.info(build_ca_path("fixed", flat), ca=flat))
    await client.accepted(file.info(text_path, ca=text, references=refs))
    await client.accepted(tree.info(build_ca_path("rec", nar_md5), ca=nar_md5))


# -- signatures -----------------------------------------------------------------------------
async def test_put_with_bad_signature_by_a_known_key_is_refused(
    keyed_client: tuple[Client, SigningKey],
) -> None:
    client, key = keyed_client
    c = client.content["file"]
    good = c.info(sp("signed"), references=(sp("dep-b"), sp("dep-a")))
    # Signed over other metadata (a different NarSize), or not signed at all.
    other = dataclasses.replace(good, nar_size=good.nar_size + 1).signed(key)
    for sig in (other.signatures[0], Signature(key.name, bytes(64))):
        await client.refused(
            dataclasses.replace(good, signatures=(sig,)), key.name, "does not verify"
        )
    # One bad signature spoils a good one next to it.
    both = (good.signed(key).signatures[0], other.signatures[0])
    await client.refused(dataclasses.replace(good, signatures=both), key.name)
    # A valid signature by the known key (over the references in the order given, or
    # in Nix's order), and any by an unknown key, are kept as they are.
    nix_order = dataclasses.replace(good, references=tuple(sorted(good.references)))
    unknown = Signature(STRANGER.name, bytes(64))
    sigs = (good.signed(key).signatures[0], nix_order.signed(key).signatures[0], unknown)
    await client.accepted(dataclasses.replace(good, signatures=sigs))


# -- trusted bulk copies --------------------------------------------------------------------
async def test_trust_option_skips_only_the_content_check(trusting_client: Client) -> None:
    client = trusting_client
    c = client.content["directory"]
    wrong = c.info(sp("trusted-copy"), nar_size=(1 << 64) - 1, nar_sha256=bytes(32))
    await client.accepted(wrong)
    # CA, signatures and content presence are still checked.
    source = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, c.nar_sha256))
    await client.refused(c.info(sp("src"), ca=source), "CA")
    await client.refused(
        dataclasses.replace(c.info(sp("sig")), signatures=(Signature(OWN.name, bytes(64)),)),
        "does not verify",
    )
    absent = FileNode(b"", B3Digest(blake3.blake3(b"never uploaded").digest()), 14)
    info = PathInfo(sp("absent"), absent.with_name(sp("absent").basename.encode()), 1, bytes(32))
    await client.refused(info, "not in the store")
