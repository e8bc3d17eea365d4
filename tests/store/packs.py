"""Looking into an embedded store from tests, through public APIs only.

Which roots the NAR service vouches for, where a blob's frame is (to damage
it), and flipping bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from tvix_castore.digests import B3Digest
from tvix_castore.packstore.reader import Chunked, Member
from tvix_store.embedded import Embedded
from tvix_store.nar.plancache import PlanCache


def vouched(home: Path) -> dict[bytes, bytes]:
    """Root Directory digest → the NAR sha256 the store vouches for."""
    cache = PlanCache(home / "store.sqlite")
    try:
        return {root: v.sha256 for root, v in cache.roots().items()}
    finally:
        cache.close()


def plan_bytes(home: Path) -> int:
    """Bytes of all NAR plan rows."""
    cache = PlanCache(home / "store.sqlite")
    try:
        return cache.stored_bytes()
    finally:
        cache.close()


class Place(NamedTuple):
    """A blob's frame in a pack file: where to damage it."""

    pack: Path
    offset: int  # of the frame in the pack
    length: int  # of the frame


def frame_of(home: Path, digest: B3Digest) -> Place:
    """The frame holding ``digest`` (the first chunk's, for a chunked blob)."""
    store = Embedded(home)
    try:
        reader = store.blobs().reader
        loc = reader.locate([digest.raw])[digest.raw]
        if isinstance(loc, Chunked):
            first = loc.chunks[0].digest.raw
            loc = reader.locate([first])[first]
        assert isinstance(loc, Member), loc
        return Place(home / "packs" / loc.frame.pack, loc.frame.offset, loc.frame.length)
    finally:
        store.close()


def damage_frame(place: Place) -> None:
    """Flip a byte in the frame's payload (its checksum then fails)."""
    at = place.offset + place.length - 40  # inside the payload, before the check
    with open(place.pack, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


ZERO = bytes(32)


def planned_roots(home: Path) -> dict[bytes, bytes]:
    """Root Directory digest of each stored path whose plans are complete → the NAR sha256
    vouched for (``ZERO``: plans that serve the NAR but vouch for no NarHash)."""
    import contextlib
    import sqlite3

    from tvix_castore.nodes import DirectoryNode
    from tvix_store.pathinfo import PathInfo

    with contextlib.closing(sqlite3.connect(home / "store.sqlite")) as conn:
        infos = [
            PathInfo.from_bytes(bytes(d)) for (d,) in conn.execute("SELECT data FROM pathinfos")
        ]
    cache = PlanCache(home / "store.sqlite")
    try:
        roots = cache.roots()
        out: dict[bytes, bytes] = {}
        for info in infos:
            if isinstance(info.node, DirectoryNode):
                raw = info.node.digest.raw
                if cache.closure(raw) is not None:
                    out[raw] = roots[raw].sha256 if raw in roots else ZERO
        return out
    finally:
        cache.close()


def files_under(home: Path, root: bytes) -> list[B3Digest]:
    """Digests of the files in the plans of the Directory ``root`` (all plans needed)."""
    cache = PlanCache(home / "store.sqlite")
    try:
        closure = cache.closure(root)
        assert closure is not None, "plans of the whole closure"
        return [B3Digest(f.digest) for plan in closure.values() for f in plan.files]
    finally:
        cache.close()
