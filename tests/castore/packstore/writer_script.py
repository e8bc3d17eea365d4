"""A process writing to a pack store until it is killed (see test_crash.py).

Usage: python -m tests.castore.packstore.writer_script HOME SEED [fork]
Prints "ready" once the store is open, then writes transactions forever:
batches of small blobs, streamed large blobs, records, aborted transactions;
with ``fork``, imports of a changing tree by forked workers instead.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.memory import MemoryDirectoryService
from tvix_castore.ingest import ingest_path
from tvix_castore.packstore import Kind, PackBlobService


async def forked_imports(svc: PackBlobService, tree: Path, rng: random.Random) -> None:
    """Import a tree again and again by two forked workers, changing some files each time."""
    tree.mkdir(exist_ok=True)
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        for _ in range(rng.randrange(20, 200)):
            size = rng.choice([rng.randrange(1, 5000), rng.randrange(1, 300_000), 1_500_000])
            (tree / f"f{rng.randrange(400)}").write_bytes((b"%d " % n) * 10 + rng.randbytes(size))
        await ingest_path(tree, svc, MemoryDirectoryService(), fork=True, concurrency=2)


async def main(home: Path, seed: int, fork: bool) -> None:
    rng = random.Random(seed)
    svc = PackBlobService(home)
    if fork:
        await forked_imports(svc, home.parent / "tree", rng)
        return
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        choice = rng.random()
        if choice < 0.5:
            blobs = [rng.randbytes(rng.randrange(1, 40_000)) for _ in range(rng.randrange(1, 200))]
            blobs += [b"common %d" % rng.randrange(50) * 100 for _ in range(5)]
            await svc.put_many(blobs)
        elif choice < 0.75:
            w = svc.open_write()
            size = rng.randrange(200_000, 6_000_000)
            data = (b"%d " % n) * (size // 8) + rng.randbytes(size // 2)
            for i in range(0, len(data), 300_000):
                await w.write(data[i : i + 300_000])
            await w.close()
        elif choice < 0.9:
            record = rng.randbytes(rng.randrange(10, 3000))
            svc.add_records(Kind.DIRECTORIES, [(B3Digest.of(record).raw, record)])
        else:
            txn = svc.transaction()
            for _ in range(50):
                data = rng.randbytes(3000)
                txn.put(B3Digest.of(data), data)
            txn.stager.flush()
            txn.abort()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["fork"]))
