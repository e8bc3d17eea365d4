"""Several writing processes on one store, and a full disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.store.test_full_disk import disk  # noqa: F401  (the loop-mounted ext4 fixture)
from tvix_castore.digests import B3Digest
from tvix_castore.packstore import PackBlobService

_WRITER = """
import asyncio, random, sys
from pathlib import Path
from tvix_castore.packstore import PackBlobService

async def main():
    rng = random.Random(int(sys.argv[2]))
    async with PackBlobService(Path(sys.argv[1])) as svc:
        for i in range(20):
            blobs = [rng.randbytes(rng.randrange(1, 20_000)) for _ in range(50)]
            blobs += [b"shared %d" % i * 1000, rng.randbytes(400_000)]
            await svc.put_many(blobs)
asyncio.run(main())
"""


def _blobs(seed: int) -> list[bytes]:
    """What :data:`_WRITER` with ``seed`` writes."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(20):
        out += [rng.randbytes(rng.randrange(1, 20_000)) for _ in range(50)]
        out += [b"shared %d" % i * 1000, rng.randbytes(400_000)]
    return out


async def test_concurrent_writer_processes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(home), str(seed)]) for seed in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert len(list((home / "packs").iterdir())) == 3  # one pack per process
    async with PackBlobService(home) as svc:
        for seed in range(3):
            for data in _blobs(seed):
                assert await svc.read_all(B3Digest.of(data)) == data


_FILL = """
import asyncio, json, os, sys
from pathlib import Path
from tvix_castore.errors import StorageFull
from tvix_castore.packstore import PackBlobService

async def main():
    home, mnt = Path(sys.argv[1]), Path(sys.argv[2])
    svc = PackBlobService(home)
    stored, errors = [], []
    n = 0
    while True:  # fill by writes until they fail
        n += 1
        blobs = [os.urandom(700_000) for _ in range(3)] + [b"%d" % n * 50]
        try:
            digests = await svc.put_many(blobs)
        except StorageFull as exc:
            errors.append(str(exc))
            break
        stored += [d.hex() for d in digests]
    with open(mnt / "filler", "wb") as f:  # then another program takes the rest
        try:
            while True:
                f.write(b"x" * 4096)
                f.flush()
        except OSError:
            pass
    for size in (10, 300_000, 3_000_000):
        try:
            await svc.put(os.urandom(size))
        except StorageFull as exc:
            errors.append(str(exc))
    from tvix_castore.digests import B3Digest
    for h in stored:
        assert await svc.read_all(B3Digest.from_hex(h)) is not None
    svc.close()
    print(json.dumps({"stored": stored, "errors": errors}))
asyncio.run(main())
"""


def test_full_disk(disk: Path) -> None:  # noqa: F811
    home = disk / "home"
    (disk / "ballast").write_bytes(b"b" * (8 << 20))  # given back at the end
    proc = subprocess.run(
        [sys.executable, "-c", _FILL, str(home), str(disk)],
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    out = json.loads(proc.stdout)
    assert len(out["errors"]) == 4, out["errors"]
    assert all("no space left on device" in e and str(home) in e for e in out["errors"])
    # another process opens the full store and reads everything back
    check = (
        "import sys; from pathlib import Path; from tvix_castore.digests import B3Digest;"
        "from tvix_castore.packstore import PackBlobService;"
        "svc = PackBlobService(Path(sys.argv[1]));"
        "assert all(svc.reader.read(B3Digest.from_hex(h)) for h in sys.argv[2:]); svc.close()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", check, str(home), *out["stored"]], capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    (disk / "filler").unlink()
    (disk / "ballast").unlink()
    again = PackBlobService(home)
    try:
        digest = again.put_many_sync([b"space again"])[0]
        assert again.reader.read(digest) == b"space again"
    finally:
        again.close()
