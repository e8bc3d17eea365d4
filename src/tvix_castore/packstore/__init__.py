"""The embedded blob store: compressed, self-describing pack files (PACKSTORE.md).

``format`` (the pack file), ``index`` (the one owner of the pack tables in
``store.sqlite``), ``writer`` (appending frames), ``reader`` (the one lookup
routine, shared with the NAR code), ``service`` (:class:`PackBlobService`,
:class:`PackTxn`), ``rebuild`` (indexing packs the index is behind on),
``legacy`` (reading the v1 layout) and ``workers`` (forked ingestion).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvix_castore.lazy import lazy_attributes

if TYPE_CHECKING:
    from tvix_castore.packstore.format import Kind
    from tvix_castore.packstore.reader import (
        Chunked,
        FrameRef,
        Legacy,
        LegacyObject,
        Location,
        Member,
        PackReader,
    )
    from tvix_castore.packstore.rebuild import RebuildStats
    from tvix_castore.packstore.service import PackBlobService, PackTxn

_LAZY = {
    "Kind": "tvix_castore.packstore.format",
    "Chunked": "tvix_castore.packstore.reader",
    "FrameRef": "tvix_castore.packstore.reader",
    "Legacy": "tvix_castore.packstore.reader",
    "LegacyObject": "tvix_castore.packstore.reader",
    "Location": "tvix_castore.packstore.reader",
    "Member": "tvix_castore.packstore.reader",
    "PackReader": "tvix_castore.packstore.reader",
    "RebuildStats": "tvix_castore.packstore.rebuild",
    "PackBlobService": "tvix_castore.packstore.service",
    "PackTxn": "tvix_castore.packstore.service",
}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "Chunked",
    "FrameRef",
    "Kind",
    "Legacy",
    "LegacyObject",
    "Location",
    "Member",
    "PackBlobService",
    "PackReader",
    "PackTxn",
    "RebuildStats",
]
