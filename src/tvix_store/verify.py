"""Checks that a PathInfo from a client tells the truth before it is recorded.

A PathInfo is served to Nix as a narinfo, so every claim in it must hold:
its NarSize/NarHash are those of the content it names (:func:`check_nar`),
a content address is the one its store path was computed from
(:func:`check_ca`) and the hash of that content (:func:`check_ca_content`),
and a signature by a key we know verifies
(:func:`check_signatures`). Each failure is a :class:`MetadataMismatch`
(a ``ValidationError``: INVALID_ARGUMENT over gRPC, 400 over HTTP) naming
the claimed and the actual value. Nothing here writes a PathInfo.

Signatures by a known key name that do not verify are refused, not dropped:
whoever sent them is lying about that key (or changed the metadata it
signed), so the rest of the upload deserves no trust either. Signatures by
names we have no key for cannot be checked and are kept as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nix_compat import nixbase32
from nix_compat.errors import StorePathError
from nix_compat.narinfo import fingerprint
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.signing import VerifyingKey
from nix_compat.store_path import StorePath, build_ca_path
from tvix_castore.blobservice.base import BlobService
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import ValidationError
from tvix_castore.nodes import FileNode
from tvix_store.nar.render import blob_range, render_nar
from tvix_store.nar.service import NarService
from tvix_store.pathinfo import PathInfo

__all__ = [
    "MetadataMismatch",
    "UploadPolicy",
    "check_ca",
    "check_ca_content",
    "check_ca_of",
    "check_metadata",
    "check_nar",
    "check_signatures",
    "known_keys",
]

log = logging.getLogger(__name__)


class MetadataMismatch(ValidationError):
    """A PathInfo claims something its content, store path or signatures contradict."""


@dataclass(frozen=True, slots=True)
class UploadPolicy:
    """What a server checks in uploaded PathInfos.

    ``known_keys``: public keys whose signatures must verify (a server's own
    signing keys and its trusted keys). ``trust_nar_metadata`` skips reading
    the content to check NarSize/NarHash and a CA's hash (for trusted bulk
    copies); that a CA fits the store path, and signatures, are cheap to
    check and always checked.
    """

    known_keys: tuple[VerifyingKey, ...] = ()
    trust_nar_metadata: bool = False


def _nar_hash(digest: bytes) -> str:
    return f"sha256:{nixbase32.encode(digest)}"


def check_ca(info: PathInfo) -> None:
    """Raise unless ``info.ca`` (if any) yields ``info.store_path`` (see :func:`check_ca_of`)."""
    check_ca_of(info.store_path, info.ca, info.references, info.nar_sha256)


def check_ca_of(
    sp: StorePath, ca: CAHash | None, references: Sequence[StorePath], nar_sha256: bytes
) -> None:
    """Raise unless ``ca`` (if any) yields the store path ``sp``.

    The store path is recomputed from the CA hash, the name and, for text
    and NAR-sha256 ("source") addresses, the references (a reference to the
    path itself is the self reference). A NAR-sha256 address is also the
    NarHash, so the two must be equal.
    """
    if ca is None:
        return
    if ca.kind is CAKind.NAR and ca.hash.algo is HashAlgo.SHA256 and ca.hash.digest != nar_sha256:
        raise MetadataMismatch(
            f"CA {ca.render()} of {sp} is not its NarHash {_nar_hash(nar_sha256)}"
        )
    others = [r for r in references if r != sp]
    try:
        # Nix lists references (a set) in store-path order.
        expected = build_ca_path(
            sp.name, ca, sorted(others), self_reference=len(others) != len(references)
        )
    except StorePathError as exc:
        raise MetadataMismatch(f"CA {ca.render()} does not fit {sp}: {exc}") from exc
    if expected != sp:
        raise MetadataMismatch(
            f"CA {ca.render()} with these references gives the store path {expected}, not {sp}"
        )


def _fingerprints(info: PathInfo) -> set[str]:
    """What a valid signature may cover: references as given, and as Nix orders them."""
    fp = info.fingerprint()
    nix = fingerprint(info.store_path, info.nar_sha256, info.nar_size, sorted(info.references))
    return {fp, nix}


def check_signatures(info: PathInfo, keys: Iterable[VerifyingKey]) -> None:
    """Raise if a signature names one of ``keys`` but verifies under none of that name."""
    by_name: dict[str, list[VerifyingKey]] = {}
    for key in keys:
        by_name.setdefault(key.name, []).append(key)
    fps: set[str] | None = None
    for i, sig in enumerate(info.signatures):
        named = by_name.get(sig.name)
        if not named:
            log.debug(
                "%s: keeping signature by unknown key %s unchecked", info.store_path, sig.name
            )
            continue
        fps = fps or _fingerprints(info)
        if not any(key.verify(fp, sig) for key in named for fp in fps):
            log.warning(
                "refusing %s: its signature by %s does not verify", info.store_path, sig.name
            )
            raise MetadataMismatch(
                f"signature {i} of {info.store_path} by key {sig.name} does not verify"
                " (NarHash, NarSize or references differ from what the key signed, or it is forged)"
            )


async def check_nar(info: PathInfo, nar: NarService) -> None:
    """Raise unless ``info``'s NarSize and NarHash are those of its content's NAR.

    Cheap when NAR plans vouch for the root (content uploaded or hashed here
    before); otherwise the NAR is rendered from castore and hashed, streaming,
    and plans vouching for the result are recorded. The content must be
    present (see :func:`tvix_store.content.check_content`).
    """
    size, sha = await nar.calculate(info.node.with_name(b""))
    if (size, sha) != (info.nar_size, info.nar_sha256):
        raise MetadataMismatch(
            f"NarSize {info.nar_size} / NarHash {_nar_hash(info.nar_sha256)} of {info.store_path}"
            f" do not match its content, whose NAR has {size} bytes and {_nar_hash(sha)}"
        )


async def check_ca_content(info: PathInfo, blobs: BlobService, dirs: DirectoryService) -> None:
    """Raise unless ``info.ca``'s hash is that of the content (streaming).

    Flat and text addresses hash a non-executable regular file's bytes; a
    NAR address hashes the NAR (for sha256 that is the NarHash, checked by
    :func:`check_ca` and :func:`check_nar`, so nothing is read here).
    """
    ca = info.ca
    if ca is None or (ca.kind is CAKind.NAR and ca.hash.algo is HashAlgo.SHA256):
        return
    node = info.node
    h = ca.hash.algo.new()
    if ca.kind is CAKind.NAR:
        async for piece in render_nar(node.with_name(b""), blobs, dirs):
            h.update(piece)
    else:
        if not isinstance(node, FileNode) or node.executable:
            raise MetadataMismatch(
                f"CA {ca.render()} of {info.store_path} needs a non-executable regular file"
            )
        async for piece in blob_range(blobs, node):
            h.update(piece)
    if h.digest() != ca.hash.digest:
        actual = NixHash(ca.hash.algo, h.digest()).nix32()
        raise MetadataMismatch(
            f"CA {ca.render()} of {info.store_path} is not the hash of its content ({actual})"
        )


async def check_metadata(
    info: PathInfo,
    policy: UploadPolicy,
    content: NarService | None,
) -> None:
    """Every check of this module that ``policy`` asks for.

    ``content`` is where the NAR is looked for; ``None`` (a metadata-only
    service) skips the checks against the content, as does a trusting policy.
    """
    check_ca(info)
    check_signatures(info, policy.known_keys)
    if content is not None and not policy.trust_nar_metadata:
        await check_nar(info, content)
        await check_ca_content(info, content.blobs, content.directories)


def known_keys(
    trusted: Sequence[VerifyingKey], own: Iterable[VerifyingKey] = ()
) -> tuple[VerifyingKey, ...]:
    """Trusted keys plus a server's own signing keys' public halves, without duplicates."""
    out: list[VerifyingKey] = []
    for key in (*trusted, *own):
        if key not in out:
            out.append(key)
    return tuple(out)
