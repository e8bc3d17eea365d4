"""``PathInfo``: a Nix store path, its castore root node and its NAR metadata.

Validated on construction; :meth:`PathInfo.from_proto` applies the tvix HEAD
checks of B §2.9 in order, so a bad message is rejected with the same reason
tvix gives (as :class:`InvalidPathInfo`, mapped to INVALID_ARGUMENT).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nix_compat.errors import NixCompatError
from nix_compat.narinfo import NarInfo, fingerprint
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.signing import Signature, SigningKey
from nix_compat.store_path import StorePath
from tvix_castore.errors import CastoreError, ValidationError
from tvix_castore.nodes import NameRule, Node, node_from_proto, node_to_proto
from tvix_store.protos import pathinfo_pb2 as pb

__all__ = ["InvalidPathInfo", "PathInfo", "ca_from_proto", "ca_to_proto"]


class InvalidPathInfo(ValidationError):
    """A PathInfo breaks a rule of B §2.9."""


_CA_TYPES: dict[pb.NARInfo.CA.Hash.ValueType, tuple[CAKind, HashAlgo]] = {
    pb.NARInfo.CA.NAR_SHA256: (CAKind.NAR, HashAlgo.SHA256),
    pb.NARInfo.CA.NAR_SHA1: (CAKind.NAR, HashAlgo.SHA1),
    pb.NARInfo.CA.NAR_SHA512: (CAKind.NAR, HashAlgo.SHA512),
    pb.NARInfo.CA.NAR_MD5: (CAKind.NAR, HashAlgo.MD5),
    pb.NARInfo.CA.TEXT_SHA256: (CAKind.TEXT, HashAlgo.SHA256),
    pb.NARInfo.CA.FLAT_SHA1: (CAKind.FLAT, HashAlgo.SHA1),
    pb.NARInfo.CA.FLAT_MD5: (CAKind.FLAT, HashAlgo.MD5),
    pb.NARInfo.CA.FLAT_SHA256: (CAKind.FLAT, HashAlgo.SHA256),
    pb.NARInfo.CA.FLAT_SHA512: (CAKind.FLAT, HashAlgo.SHA512),
}
_CA_ENUM = {v: k for k, v in _CA_TYPES.items()}


def ca_from_proto(msg: pb.NARInfo.CA) -> CAHash:
    """The CA of a ``NARInfo.CA`` message (digest = raw bytes)."""
    kind_algo = _CA_TYPES.get(msg.type)
    if kind_algo is None:
        raise InvalidPathInfo("The ca field is invalid: unknown type")
    kind, algo = kind_algo
    try:
        return CAHash(kind, NixHash(algo, msg.digest))
    except NixCompatError as exc:
        raise InvalidPathInfo(f"The ca field is invalid: {exc}") from exc


def ca_to_proto(ca: CAHash) -> pb.NARInfo.CA:
    """The ``NARInfo.CA`` message of a content address."""
    return pb.NARInfo.CA(type=_CA_ENUM[(ca.kind, ca.hash.algo)], digest=ca.hash.digest)


@dataclass(frozen=True, slots=True)
class PathInfo:
    """A store path's metadata. ``node`` carries the store path basename as its name."""

    store_path: StorePath
    node: Node
    nar_size: int
    nar_sha256: bytes
    references: tuple[StorePath, ...] = ()
    signatures: tuple[Signature, ...] = ()
    deriver: StorePath | None = None
    ca: CAHash | None = None

    def __post_init__(self) -> None:
        if self.node.name != self.store_path.basename.encode():
            raise InvalidPathInfo(
                f"root node name {self.node.name!r} is not {self.store_path.basename}"
            )
        if len(self.nar_sha256) != 32:
            raise InvalidPathInfo(f"Invalid narinfo.nar_sha256 length {len(self.nar_sha256)}")
        if not 0 <= self.nar_size < 1 << 64:
            raise InvalidPathInfo(f"nar_size {self.nar_size} out of range")

    @property
    def digest(self) -> bytes:
        """The 20-byte key: the store path's digest."""
        return self.store_path.digest

    @classmethod
    def from_proto(cls, msg: pb.PathInfo) -> PathInfo:
        """Validate a wire PathInfo (B §2.9 HEAD checks, in order)."""
        if not msg.HasField("narinfo"):
            raise InvalidPathInfo("The narinfo field is missing")
        ni = msg.narinfo
        for i, ref in enumerate(msg.references):
            if len(ref) != 20:
                raise InvalidPathInfo(f"Invalid length of digest at position {i}: {len(ref)}")
        if len(ni.reference_names) != len(msg.references):
            raise InvalidPathInfo(
                f"Inconsistent Number of References: {len(msg.references)} (references)"
                f" vs {len(ni.reference_names)} (narinfo)"
            )
        refs: list[StorePath] = []
        for i, (name, ref) in enumerate(zip(ni.reference_names, msg.references, strict=True)):
            try:
                sp = StorePath.from_basename(name)
            except NixCompatError as exc:
                raise InvalidPathInfo(f"Invalid reference_name at position {i}: {exc}") from exc
            if sp.digest != ref:
                raise InvalidPathInfo(
                    f"digest in reference_name at position {i} does not match digest in PathInfo"
                )
            refs.append(sp)
        if not msg.HasField("node"):
            raise InvalidPathInfo("No node present")
        try:
            node = node_from_proto(msg.node, name_rule=NameRule.REQUIRED)
        except CastoreError as exc:
            raise InvalidPathInfo(f"Invalid root node: {exc}") from exc
        try:
            store_path = StorePath.from_basename(node.name)
        except NixCompatError as exc:
            raise InvalidPathInfo(f"Failed to parse {node.name!r} as StorePath: {exc}") from exc
        if len(ni.nar_sha256) != 32:
            raise InvalidPathInfo(f"Invalid narinfo.nar_sha256 length {len(ni.nar_sha256)}")
        deriver = None
        if ni.HasField("deriver"):
            try:
                deriver = StorePath(ni.deriver.digest, ni.deriver.name)
            except NixCompatError as exc:
                raise InvalidPathInfo(f"deriver field is invalid: {exc}") from exc
        sigs: list[Signature] = []
        for i, s in enumerate(ni.signatures):
            try:
                sigs.append(Signature(s.name, s.data))
            except NixCompatError as exc:
                raise InvalidPathInfo(f"The signature at position {i} is invalid: {exc}") from exc
        ca = ca_from_proto(ni.ca) if ni.HasField("ca") else None
        return cls(
            store_path=store_path,
            node=node,
            nar_size=ni.nar_size,
            nar_sha256=ni.nar_sha256,
            references=tuple(refs),
            signatures=tuple(sigs),
            deriver=deriver,
            ca=ca,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PathInfo:
        """Decode and validate a serialised PathInfo."""
        msg = pb.PathInfo()
        try:
            msg.ParseFromString(data)
        except Exception as exc:
            raise InvalidPathInfo(f"undecodable PathInfo: {exc}") from exc
        return cls.from_proto(msg)

    def to_proto(self) -> pb.PathInfo:
        """The wire form."""
        ni = pb.NARInfo(
            nar_size=self.nar_size,
            nar_sha256=self.nar_sha256,
            signatures=[pb.NARInfo.Signature(name=s.name, data=s.data) for s in self.signatures],
            reference_names=[r.basename for r in self.references],
        )
        if self.deriver is not None:
            ni.deriver.CopyFrom(pb.StorePath(name=self.deriver.name, digest=self.deriver.digest))
        if self.ca is not None:
            ni.ca.CopyFrom(ca_to_proto(self.ca))
        return pb.PathInfo(
            node=node_to_proto(self.node),
            references=[r.digest for r in self.references],
            narinfo=ni,
        )

    def encode(self) -> bytes:
        """Deterministic serialisation (for storage)."""
        return self.to_proto().SerializeToString(deterministic=True)

    def fingerprint(self) -> str:
        """What Nix signs for this path."""
        return fingerprint(self.store_path, self.nar_sha256, self.nar_size, self.references)

    def signed(self, key: SigningKey) -> PathInfo:
        """A copy with a signature by ``key`` appended (existing ones kept)."""
        return replace(self, signatures=(*self.signatures, key.sign(self.fingerprint())))

    def to_narinfo(self, url: str, compression: str = "none") -> NarInfo:
        """The narinfo Nix sees for this path (B §5.2)."""
        return NarInfo(
            store_path=self.store_path,
            url=url,
            compression=compression,
            nar_hash=self.nar_sha256,
            nar_size=self.nar_size,
            references=self.references,
            deriver=self.deriver,
            signatures=self.signatures,
            ca=self.ca,
        )

    @classmethod
    def from_narinfo(cls, info: NarInfo, root: Node) -> PathInfo:
        """A PathInfo for ``info`` whose content is the (nameless) ``root`` node."""
        return cls(
            store_path=info.store_path,
            node=root.with_name(info.store_path.basename.encode()),
            nar_size=info.nar_size,
            nar_sha256=info.nar_hash,
            references=info.references,
            signatures=info.signatures,
            deriver=info.deriver,
            ca=info.ca,
        )
