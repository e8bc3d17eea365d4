"""What the store holds and what its collections did, read at each scrape.

The store's size is asked for when Prometheus scrapes (a collector, not a
counter kept up to date): the pack files' sizes (``stat``), the index
database's, and row counts of the embedded store's index. Other blob
services report nothing here: their size is not cheap to know.

GC runs in its own process (``tvix-store gc``), so each run is recorded in
``gc-metrics.json`` in the data directory (:func:`record_gc`) and the
server reports the record: runs, deferred runs, bytes freed, the last run's
duration and end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tvix_store.telemetry.metrics import REGISTRY

__all__ = ["GC_RECORD", "StoreCollector", "read_gc_record", "record_gc", "register_store"]

log = logging.getLogger(__name__)
GC_RECORD = "gc-metrics.json"
_COUNTS = (
    ("path_infos", "SELECT count(*) FROM pathinfos"),
    ("blobs", "SELECT count(*) FROM pack_blobs"),
    ("nar_uploads", "SELECT count(*) FROM nar_index"),
)


def record_gc(home: Path, kind: str, seconds: float, freed: int, deferred: bool) -> None:
    """Add one collection of ``kind`` (``embedded``, ``shared``) to ``home``'s record.

    Best effort: a record that cannot be written is logged, the collection stands.
    """
    path = Path(home) / GC_RECORD
    try:
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = read_gc_record(home)
            entry = record.setdefault(kind, {})
            entry["runs"] = int(entry.get("runs", 0)) + 1
            entry["deferred"] = int(entry.get("deferred", 0)) + int(deferred)
            entry["freed_bytes"] = int(entry.get("freed_bytes", 0)) + freed
            entry["last_seconds"] = seconds
            entry["last_freed_bytes"] = freed
            entry["last_end"] = time.time()
            tmp = path.with_name(f".{GC_RECORD}.{os.getpid()}")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record this collection in %s: %s", path, exc)


def read_gc_record(home: Path) -> dict[str, dict[str, Any]]:
    """The record of collections in ``home`` (empty when there is none, or it is unreadable)."""
    try:
        data = json.loads((Path(home) / GC_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class StoreCollector(Collector):
    """Sizes and counts of the store at ``home`` (embedded: ``packs`` is not ``None``)."""

    def __init__(self, home: Path, packs: Path | None) -> None:
        self.home = home
        self.packs = packs

    def _counts(self, db: Path) -> Iterator[tuple[str, int]]:
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        except sqlite3.Error:
            return
        with contextlib.closing(conn):
            for kind, query in _COUNTS:
                try:
                    (n,) = conn.execute(query).fetchone()
                except sqlite3.Error:
                    continue  # (a table this store does not have)
                yield kind, int(n)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self.packs is not None:
            from tvix_castore.packstore.compact import store_bytes
            from tvix_store.embedded import STORE_DB

            size = GaugeMetricFamily(
                "tvix_store_stored_bytes", "Bytes on disk of the embedded store.", labels=["kind"]
            )
            size.add_metric(["packs"], store_bytes(self.packs))
            index = 0
            for suffix in ("", "-wal"):
                with contextlib.suppress(FileNotFoundError):
                    index += (self.packs / (STORE_DB + suffix)).stat().st_size
            size.add_metric(["index"], index)
            yield size
            objects = GaugeMetricFamily(
                "tvix_store_objects", "Rows of the embedded store's index.", labels=["kind"]
            )
            for kind, n in self._counts(self.packs / STORE_DB):
                objects.add_metric([kind], n)
            yield objects
        yield from _gc_families(read_gc_record(self.home))


def _gc_families(record: dict[str, dict[str, Any]]) -> Iterator[Any]:
    runs = CounterMetricFamily(
        "tvix_store_gc_runs", "Garbage collections finished, by kind.", labels=["kind"]
    )
    deferred = CounterMetricFamily(
        "tvix_store_gc_deferred_runs",
        "Collections whose sweep was deferred (writers held leases).",
        labels=["kind"],
    )
    freed = CounterMetricFamily(
        "tvix_store_gc_freed_bytes", "Bytes freed by collections.", labels=["kind"]
    )
    last_seconds = GaugeMetricFamily(
        "tvix_store_gc_last_duration_seconds", "Duration of the last collection.", labels=["kind"]
    )
    last_freed = GaugeMetricFamily(
        "tvix_store_gc_last_freed_bytes", "Bytes freed by the last collection.", labels=["kind"]
    )
    last_end = GaugeMetricFamily(
        "tvix_store_gc_last_end_timestamp_seconds",
        "When the last collection ended (Unix time).",
        labels=["kind"],
    )
    for kind, entry in sorted(record.items()):
        if not isinstance(entry, dict):
            continue
        runs.add_metric([kind], float(entry.get("runs", 0)))
        deferred.add_metric([kind], float(entry.get("deferred", 0)))
        freed.add_metric([kind], float(entry.get("freed_bytes", 0)))
        last_seconds.add_metric([kind], float(entry.get("last_seconds", 0)))
        last_freed.add_metric([kind], float(entry.get("last_freed_bytes", 0)))
        last_end.add_metric([kind], float(entry.get("last_end", 0)))
    yield from (runs, deferred, freed, last_seconds, last_freed, last_end)


_registered: StoreCollector | None = None


def register_store(store: Any) -> None:
    """Report ``store``'s size and GC record at each scrape (the first store registered wins)."""
    global _registered
    if _registered is not None:
        return
    from tvix_castore.packstore.service import PackBlobService
    from tvix_store.embedded import data_dir

    blobs = store.blobs
    packs = blobs.home if isinstance(blobs, PackBlobService) else None
    _registered = StoreCollector(packs or data_dir(), packs)
    REGISTRY.register(_registered)
