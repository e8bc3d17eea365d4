"""NAR ⇄ castore: rendering a NAR from castore, and ingesting a NAR into it.

Names are resolved on first use, so a command that only renders does not load
the ingester (start-up time counts for CLI commands).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvix_castore.lazy import lazy_attributes

if TYPE_CHECKING:
    from tvix_store.nar.ingest import IngestedNar, ingest_nar, ingest_nar_file
    from tvix_store.nar.render import NarRenderError, calculate_nar, render_nar

_LAZY = {
    "IngestedNar": "tvix_store.nar.ingest",
    "ingest_nar": "tvix_store.nar.ingest",
    "ingest_nar_file": "tvix_store.nar.ingest",
    "NarRenderError": "tvix_store.nar.render",
    "calculate_nar": "tvix_store.nar.render",
    "render_nar": "tvix_store.nar.render",
}

__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "IngestedNar",
    "NarRenderError",
    "calculate_nar",
    "ingest_nar",
    "ingest_nar_file",
    "render_nar",
]
