"""NAR mutations and uneven sources for fuzzing the reader."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from nix_compat.nar import NarWriter

from .oracle import DigestSink
from .trees import Node, write_spec


class Trickle:
    """A source returning at most ``step`` bytes per read (cycling through ``steps``)."""

    def __init__(self, data: bytes, steps: list[int]) -> None:
        self._data = data
        self._pos = 0
        self._steps = steps or [1 << 30]
        self._i = 0
        self.reads = 0

    def read(self, n: int = -1, /) -> bytes:
        self.reads += 1
        step = self._steps[self._i % len(self._steps)]
        self._i += 1
        if n < 0:
            n = len(self._data)
        out = self._data[self._pos : self._pos + min(n, step)]
        self._pos += len(out)
        return out


def nar_of(root: Node) -> bytes:
    sink = DigestSink()
    write_spec(root, NarWriter(sink))
    return sink.data


@dataclass(frozen=True)
class Flip:
    pos: int
    mask: int

    def apply(self, data: bytearray) -> None:
        if data:
            data[self.pos % len(data)] ^= self.mask


@dataclass(frozen=True)
class Insert:
    pos: int
    blob: bytes

    def apply(self, data: bytearray) -> None:
        i = self.pos % (len(data) + 1)
        data[i:i] = self.blob


@dataclass(frozen=True)
class Delete:
    pos: int
    length: int

    def apply(self, data: bytearray) -> None:
        if data:
            i = self.pos % len(data)
            del data[i : i + self.length]


@dataclass(frozen=True)
class SetU64:
    """Overwrite an aligned 8-byte word (most are string lengths) with ``value``."""

    word: int
    value: int

    def apply(self, data: bytearray) -> None:
        words = len(data) // 8
        if words:
            i = self.word % words * 8
            data[i : i + 8] = struct.pack("<Q", self.value)


@dataclass(frozen=True)
class Truncate:
    pos: int

    def apply(self, data: bytearray) -> None:
        del data[self.pos % (len(data) + 1) :]


Mutation = Flip | Insert | Delete | SetU64 | Truncate

positions = st.integers(min_value=0, max_value=1 << 16)
interesting_u64 = st.one_of(
    st.sampled_from([0, 1, 2, 7, 8, 9, 13, 64, 255, 256, 4095, 4096, 2**32, 2**63, 2**64 - 1]),
    st.integers(min_value=0, max_value=2**64 - 1),
)
mutations: st.SearchStrategy[Mutation] = st.one_of(
    st.builds(Flip, positions, st.integers(min_value=1, max_value=255)),
    st.builds(Insert, positions, st.binary(min_size=1, max_size=16)),
    st.builds(Delete, positions, st.integers(min_value=1, max_value=16)),
    st.builds(SetU64, positions, interesting_u64),
    st.builds(Truncate, positions),
)
