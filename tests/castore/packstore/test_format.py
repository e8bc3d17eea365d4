"""Pack file v2 frames: encode, decode, scan; torn tails and damaged bytes."""

import os
from pathlib import Path

import blake3
import pytest

from tvix_castore.errors import DataCorruption
from tvix_castore.packstore.format import (
    FILE_HEADER,
    Codec,
    Frame,
    FrameMember,
    Kind,
    build_frame,
    decode_payload,
    encode_frame,
    scan,
)

from .util import pseudo_random

TEXT = b"the quick brown fox jumps over the lazy dog\n" * 2000


def _frame(payloads: list[bytes], level: int = 5, kind: Kind = Kind.BLOBS) -> bytes:
    members = [FrameMember(blake3.blake3(p).digest(), len(p)) for p in payloads]
    return b"".join(bytes(p) for p in encode_frame(kind, members, payloads, level))


@pytest.mark.parametrize("level", [0, 1, 5])
def test_round_trip(level: int) -> None:
    payloads = [TEXT, b"", b"x", pseudo_random(10_000)]
    data = _frame(payloads, level)
    frame, payload = decode_payload(data, "test")
    assert bytes(payload) == b"".join(payloads)
    assert frame.length == len(data)
    assert frame.raw == len(payload)
    assert frame.members == tuple(FrameMember(blake3.blake3(p).digest(), len(p)) for p in payloads)
    assert frame.codec == (Codec.RAW if level == 0 else Codec.ZSTD)
    if level:
        assert len(data) < len(payload) // 2


def test_content_addressed_members_are_listed_by_size_only() -> None:
    """Blobs and Directories: 4 bytes a member in the table; keys come from decoding."""
    payloads = [pseudo_random(100 + i) for i in range(100)]
    blobs = _frame(payloads, level=0)
    records = [FrameMember(bytes([i]) * 32, len(p)) for i, p in enumerate(payloads)]
    pathinfos = b"".join(bytes(p) for p in encode_frame(Kind.PATHINFOS, records, payloads, 0))
    assert len(pathinfos) - len(blobs) == 100 * (40 - 4)
    (scanned,) = scan_bytes(blobs)
    assert [m.size for m in scanned.members] == [len(p) for p in payloads]
    assert {m.key for m in scanned.members} == {b""}  # (unknown until decoded)


def test_a_wrong_key_fails_the_frame_check() -> None:
    members = [FrameMember(bytes(32), 4)]
    data = b"".join(bytes(p) for p in encode_frame(Kind.BLOBS, members, [b"abcd"], 0))
    with pytest.raises(DataCorruption, match="check failed"):
        decode_payload(data, "x")


def test_incompressible_is_stored_raw() -> None:
    data = pseudo_random(1 << 20)
    built = build_frame(Kind.BLOBS, [FrameMember(bytes(32), len(data))], [data], 5)
    assert built.codec == Codec.RAW
    assert built.length < len(data) + 200


def test_flipped_byte_anywhere_is_detected() -> None:
    data = bytearray(_frame([TEXT, pseudo_random(5000)]))
    for pos in range(0, len(data), max(1, len(data) // 97)):
        damaged = bytearray(data)
        damaged[pos] ^= 0x40
        with pytest.raises(DataCorruption, match="where-it-is"):
            decode_payload(bytes(damaged), "where-it-is")


def test_flipped_byte_in_raw_payload() -> None:
    data = bytearray(_frame([pseudo_random(5000)], level=0))
    data[len(data) // 2] ^= 1
    with pytest.raises(DataCorruption, match="check failed"):
        decode_payload(bytes(data), "x")


def _pack(tmp_path: Path, frames: list[bytes]) -> Path:
    path = tmp_path / "a.tvpack"
    path.write_bytes(FILE_HEADER + b"".join(frames))
    return path


def test_scan_finds_every_frame(tmp_path: Path) -> None:
    frames = [_frame([TEXT]), _frame([b"abc", b"de"], kind=Kind.DIRECTORIES), _frame([b"q"])]
    path = _pack(tmp_path, frames)
    found = list(scan(path))
    assert [f.kind for f in found] == [Kind.BLOBS, Kind.DIRECTORIES, Kind.BLOBS]
    assert [f.length for f in found] == [len(f) for f in frames]
    assert found[0].offset == len(FILE_HEADER)
    assert list(scan(path, found[1].offset)) == found[1:]


@pytest.mark.parametrize("cut", [1, 10, 27, 28, 40, 80, 200, -33, -1])
def test_scan_stops_at_a_torn_tail(tmp_path: Path, cut: int) -> None:
    good = [_frame([TEXT]), _frame([b"abc"])]
    last = _frame([TEXT[:5000], pseudo_random(400)])
    torn = last[:cut]
    path = _pack(tmp_path, [*good, torn])
    assert [f.length for f in scan(path)] == [len(f) for f in good]


def test_scan_stops_at_garbage_and_damaged_heads(tmp_path: Path) -> None:
    good = _frame([TEXT])
    second = bytearray(_frame([b"abc"]))
    second[30] ^= 1  # inside the member table: the head check fails
    path = _pack(tmp_path, [good, bytes(second), _frame([b"after"])])
    assert len(list(scan(path))) == 1
    path.write_bytes(FILE_HEADER + good + os.urandom(100))
    assert len(list(scan(path))) == 1


def test_scan_of_a_non_pack(tmp_path: Path) -> None:
    path = tmp_path / "x.tvpack"
    path.write_bytes(b"TVIXPACK\x01\x00\x00\x00\x00\x00\x00\x00" + _frame([b"a"]))
    assert list(scan(path)) == []
    path.write_bytes(b"")
    assert list(scan(path)) == []


def test_payload_larger_than_raw_is_refused() -> None:
    data = bytearray(_frame([TEXT]))
    # claim fewer raw bytes than the zstd frame decodes to: the head check fails first,
    # so the refusal is DataCorruption either way
    data[20] = (data[20] - 1) % 256
    with pytest.raises(DataCorruption):
        decode_payload(bytes(data), "x")


def test_an_incompressible_start_does_not_decide_for_the_segment() -> None:
    payloads = [pseudo_random(100_000), TEXT * 20]
    members = [FrameMember(bytes([i]) * 32, len(p)) for i, p in enumerate(payloads)]
    built = build_frame(Kind.BLOBS, members, payloads, 5)
    assert built.codec == Codec.ZSTD and built.length < 200_000


def scan_bytes(frame: bytes) -> list[Frame]:
    """The frames :func:`scan` finds in a pack holding ``frame``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return list(scan(_pack(Path(tmp), [frame])))
