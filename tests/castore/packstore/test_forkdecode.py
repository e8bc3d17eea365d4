"""ForkedDecoder: frames decoded by forked children into shared memory, on real packs.

The children only ever save work: every answer must equal what the reader
decodes itself, and anything off the happy path (a damaged frame, a child
killed, no free slot) must be ``None`` (decode it yourself), never bytes.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tvix_castore.packstore import Member, PackBlobService
from tvix_castore.packstore.forkdecode import ForkedDecoder
from tvix_castore.packstore.reader import FrameRef

from .test_service import text


async def _frames(home: Path, n_blobs: int = 90) -> tuple[PackBlobService, list[FrameRef]]:
    svc = PackBlobService(home)
    await svc.__aenter__()
    digests = await svc.put_many([text(200_000, i) for i in range(n_blobs)])
    located = svc.reader.locate([d.raw for d in digests])
    frames = list(dict.fromkeys(loc.frame for loc in located.values() if isinstance(loc, Member)))
    assert len(frames) >= 4
    return svc, frames


async def test_children_decode_what_the_reader_decodes(tmp_path: Path) -> None:
    svc, frames = await _frames(tmp_path)
    try:
        dec = ForkedDecoder(svc.reader, workers=2, slots=3)
        try:
            for ref in frames:  # (more frames than slots: each released, then reused)
                assert dec.submit(ref)
                got = dec.result(ref)
                want = svc.reader.decode(ref)
                assert got is not None and want is not None
                assert bytes(got.payload) == bytes(want.payload)
                assert got.offsets == want.offsets and got.frame == want.frame
                dec.release(ref)
                dec.flushed()
        finally:
            dec.close()
    finally:
        await svc.__aexit__(None, None, None)


async def test_no_free_slot_until_flushed(tmp_path: Path) -> None:
    svc, frames = await _frames(tmp_path)
    try:
        dec = ForkedDecoder(svc.reader, workers=1, slots=2)
        try:
            assert dec.submit(frames[0]) and dec.submit(frames[1])
            assert not dec.submit(frames[2])  # (both slots taken)
            first = dec.result(frames[0])
            assert first is not None
            held = bytes(first.payload)
            dec.release(frames[0])
            assert not dec.submit(frames[2])  # (its views may still be unconsumed)
            assert bytes(first.payload) == held
            dec.flushed()
            assert dec.submit(frames[2])
            assert dec.result(frames[1]) is not None and dec.result(frames[2]) is not None
        finally:
            dec.close()
    finally:
        await svc.__aexit__(None, None, None)


async def test_damaged_frame_is_none(tmp_path: Path) -> None:
    svc, frames = await _frames(tmp_path)
    try:
        victim = frames[1]
        with open(svc.reader.pack_path(victim.pack), "r+b") as f:
            f.seek(victim.offset + victim.length - 40)
            byte = f.read(1)
            f.seek(victim.offset + victim.length - 40)
            f.write(bytes([byte[0] ^ 0xFF]))
        dec = ForkedDecoder(svc.reader, workers=2, slots=4)
        try:
            for ref in frames[:3]:
                assert dec.submit(ref)
            assert dec.result(frames[0]) is not None
            assert dec.result(victim) is None
            assert dec.result(frames[2]) is not None
        finally:
            dec.close()
    finally:
        await svc.__aexit__(None, None, None)


async def test_a_killed_child_means_none_not_a_hang(tmp_path: Path) -> None:
    svc, frames = await _frames(tmp_path)
    try:
        dec = ForkedDecoder(svc.reader, workers=1, slots=8)
        try:
            # (the one child is the only process this one forked since)
            assert dec.submit(frames[0])
            assert dec.result(frames[0]) is not None
            pid = _only_child()
            os.kill(pid, signal.SIGKILL)
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            dec.submit(frames[1])  # (may see the broken pipe, or not yet)
            assert dec.result(frames[1]) is None
            assert not dec.submit(frames[2])  # (no child left: decode it yourself)
        finally:
            dec.close()
    finally:
        await svc.__aexit__(None, None, None)


def _only_child() -> int:
    me = os.getpid()
    kids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == me]
    assert len(kids) == 1, kids
    return kids[0]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1
