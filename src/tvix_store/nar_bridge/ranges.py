"""Single HTTP byte ranges (``Range: bytes=a-b``), shared by NAR and file downloads."""

from __future__ import annotations

import re

__all__ = ["UnsatisfiableRange", "parse_range"]

_RANGE = re.compile(r"bytes=([0-9]{0,20})-([0-9]{0,20})")  # ASCII digits, ≤ 2^64


class UnsatisfiableRange(Exception):
    """A ``Range`` header that must be answered 416 (malformed, empty or past the end)."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single byte range; ``None`` to ignore it.

    Another unit or several ranges are ignored (the whole body is served, as
    RFC 9110 allows); anything else that cannot be served raises
    :class:`UnsatisfiableRange`.
    """
    spec = header.strip()
    if not spec.startswith("bytes=") or "," in spec:
        return None
    m = _RANGE.fullmatch(spec)
    if m is None:
        raise UnsatisfiableRange(f"malformed byte range {spec[:40]!r}")
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        raise UnsatisfiableRange("empty byte range")
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            raise UnsatisfiableRange("empty suffix range")
        return max(0, size - length), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise UnsatisfiableRange(f"range not satisfiable for {size} bytes")
    return start, end
