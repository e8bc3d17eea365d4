"""NAR ⇄ castore: rendering a NAR from castore, and ingesting a NAR into it."""

from tvix_store.nar.ingest import IngestedNar, ingest_nar, ingest_nar_file
from tvix_store.nar.render import NarRenderError, calculate_nar, render_nar

__all__ = [
    "IngestedNar",
    "NarRenderError",
    "calculate_nar",
    "ingest_nar",
    "ingest_nar_file",
    "render_nar",
]
