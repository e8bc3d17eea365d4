"""Exports whose frames forked children decode (``tvix_castore.packstore.forkdecode``).

A NAR of many frames is written with its frames decoded and verified by
forked children into shared memory (``TVIX_STORE_FORK=always`` forces it
here whatever the size or CPUs; ``never`` is the in-process path). Both must
give the bytes of ``nix-store --dump``, including files stored once and found
far apart in the tree (copied out of their frame early); a damaged frame
must fail the export naming the blob, as without children.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from tests.compat.oracle import DigestSink, Nix, assert_same_nar
from tvix_castore.digests import B3Digest

from .conftest import TVIX, ok, tvix, tvix_env
from .packs import damage_frame, frame_of

MiB = 1 << 20


def _text(rng: random.Random, n: int) -> bytes:
    words = [bytes(rng.choices(b"abcdefghijklmnop", k=rng.randrange(3, 10))) for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def make_tree(root: Path) -> Path:
    """~26 MiB of small text files (several 4 MiB frames), the same licence file
    early and late (far apart: copied out of its frame), and a chunked file."""
    rng = random.Random(11)
    licence = _text(rng, 3000)
    for d in range(26):
        sub = root / f"d{d:02}"
        sub.mkdir(parents=True)
        for i in range(50):
            (sub / f"m{i:02}.py").write_bytes(_text(rng, rng.randrange(5_000, 36_000)))
        if d % 5 == 0:
            (sub / "LICENSE").write_bytes(licence)
    (root / "zz-big.bin").write_bytes(rng.randbytes(3 * MiB))
    return root


def _export(home: Path, store_path: str, fork: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [TVIX, "export", store_path],
        capture_output=True,
        env=tvix_env(home, {"TVIX_STORE_FORK": fork}),
        check=False,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("forked") / "tree")


@pytest.mark.parametrize("fork", ["always", "never"])
def test_export_matches_nix(tree: Path, home: Path, nix: Nix, fork: str) -> None:
    store_path = ok(tvix(home, "import", tree)).decode().strip()
    proc = _export(home, store_path, fork)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    ours = DigestSink()
    ours.write(proc.stdout)
    want = DigestSink()
    nix.dump(tree, want)
    assert_same_nar(ours, want, f"export with TVIX_STORE_FORK={fork}")


def test_damaged_frame_fails_the_export_naming_the_blob(tree: Path, home: Path) -> None:
    import blake3

    store_path = ok(tvix(home, "import", tree)).decode().strip()
    victim = B3Digest(blake3.blake3((tree / "d13" / "m07.py").read_bytes()).digest())
    damage_frame(frame_of(home, victim))
    proc = _export(home, store_path, "always")
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert "blob" in err and ("damaged" in err or "check" in err), err
    total = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file())
    assert len(proc.stdout) < total
