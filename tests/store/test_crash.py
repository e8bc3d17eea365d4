"""kill -9 at random points of an import and of an upload leaves a consistent store.

One store takes many interrupted writes in a row (garbage of earlier crashes
stays behind, as on a real machine). After each kill, every store path the
store knows is checked through the CLI: ``export`` renders a NAR whose size
and sha256 are the recorded NarSize/NarHash, so its closure (every Directory
and blob) is complete and verifies. Then the interrupted write is done again
to completion and must give what ``nix-store --add`` gives.

The kill points are random (the seed is in the test's name): uniformly
spread over the time an uninterrupted write of the same input takes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from nix_compat import nixbase32
from tests.compat.oracle import Nix

from .conftest import TVIX, ok, tvix, tvix_env

_RUNS = 10


def _tree(root: Path, seed: int) -> Path:
    """A tree like a small package: many small files, a few large, links, nesting."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    words = [rng.randbytes(6).hex() for _ in range(300)]
    for d in range(8):
        sub = root / f"lib{d}" / "share"
        sub.mkdir(parents=True)
        for f in range(30):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 900)))
            (sub / f"f{f}.txt").write_text(text)
        (sub / "same.txt").write_text("shared by every directory\n")
        (sub / "link").symlink_to("f0.txt")
    (root / "bin").mkdir()
    exe = root / "bin" / "tool"
    exe.write_bytes(rng.randbytes(1536 << 10))  # several chunks
    exe.chmod(0o755)
    (root / "data.bin").write_bytes(rng.randbytes(700 << 10))
    (root / "empty").write_bytes(b"")
    return root


def _nar_sha256(path: Path) -> tuple[int, str]:
    nar = subprocess.run(["nix-store", "--dump", str(path)], capture_output=True, check=True).stdout
    return len(nar), "sha256:" + nixbase32.encode(hashlib.sha256(nar).digest())


def _check_consistent(home: Path, store_paths: list[str]) -> int:
    """Every known path exports to its recorded NarHash; how many are known."""
    known = 0
    for store_path in store_paths:
        info = tvix(home, "info", "--json", store_path)
        if info.returncode != 0:
            assert b"is not in the store" in info.stderr, info.stderr.decode(errors="replace")
            continue
        known += 1
        meta = json.loads(info.stdout)
        nar = ok(tvix(home, "export", store_path))
        assert len(nar) == meta["narSize"]
        sha = "sha256:" + nixbase32.encode(hashlib.sha256(nar).digest())
        assert sha == meta["narHash"], f"{store_path}: exported NAR does not match its NarHash"
    return known


def _kill_after(argv: list[str], env: dict[str, str], delay: float) -> int | None:
    """Start ``argv``, SIGKILL it after ``delay`` s; its exit code if it finished first."""
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        proc.wait(timeout=delay)
        return proc.returncode
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None
    finally:
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.parametrize("seed", [1307])
def test_kill_9_during_import(home: Path, nix: Nix, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    trees = [_tree(tmp_path / f"t{i}" / "pkg", seed + i) for i in range(_RUNS)]
    expected = [nix.run("nix-store", *nix.store_args, "--add", t).decode().strip() for t in trees]
    scratch = tmp_path / "scratch"
    started = time.monotonic()
    ok(tvix(scratch, "import", trees[0]))
    full = time.monotonic() - started
    env = tvix_env(home)
    killed = 0
    for tree, store_path in zip(trees, expected, strict=True):
        code = _kill_after([TVIX, "import", str(tree)], env, rng.uniform(0.0, full * 1.2))
        killed += code is None
        assert code in (None, 0)
        _check_consistent(home, [store_path])  # (all of them at the end)
        # The store keeps working: the same import, uninterrupted, is right.
        assert ok(tvix(home, "import", tree)).decode().strip() == store_path
        nar_size, nar_hash = _nar_sha256(tree)
        meta = json.loads(ok(tvix(home, "info", "--json", store_path)))
        assert (meta["narSize"], meta["narHash"]) == (nar_size, nar_hash)
    assert killed >= _RUNS // 3, f"only {killed} of {_RUNS} imports were interrupted"
    assert _check_consistent(home, expected) == _RUNS


def _start_bridge(home: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    out = log.open("wb")
    proc = subprocess.Popen(
        [TVIX, "nar-bridge", "-l", "127.0.0.1:0"],
        env=tvix_env(home),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines()[::-1]:
            if "nar-bridge listening on http://" in line:
                url = line.split("listening on ", 1)[1].split()[0]
                if proc.poll() is None:
                    return proc, url
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"nar-bridge did not start:\n{log.read_text(errors='replace')}")


@pytest.mark.parametrize("seed", [2411])
def test_kill_9_of_nar_bridge_during_upload(
    home: Path, nix: Nix, tmp_path: Path, seed: int
) -> None:
    """The server dies mid-upload (NAR PUT or the narinfo after it), then restarts."""
    rng = random.Random(seed)
    trees = [_tree(tmp_path / f"t{i}" / "pkg", seed + i) for i in range(_RUNS // 2)]
    paths = [nix.run("nix-store", *nix.store_args, "--add", t).decode().strip() for t in trees]
    nars = [
        subprocess.run(["nix-store", "--dump", str(t)], capture_output=True, check=True).stdout
        for t in trees
    ]
    logs = (tmp_path / f"bridge-{i}.log" for i in range(len(trees) + 2))

    def upload(url: str, store_path: str, nar: bytes) -> None:
        sha = hashlib.sha256(nar).digest()
        name = nixbase32.encode(sha)
        req = urllib.request.Request(f"{url}/nar/{name}.nar", data=nar, method="PUT")
        urllib.request.urlopen(req, timeout=60).close()
        hash_part = store_path.removeprefix("/nix/store/").split("-", 1)[0]
        narinfo = (
            f"StorePath: {store_path}\nURL: nar/{name}.nar\nCompression: none\n"
            f"NarHash: sha256:{name}\nNarSize: {len(nar)}\nReferences: \n"
            f"CA: fixed:r:sha256:{name}\n"
        )
        req = urllib.request.Request(
            f"{url}/{hash_part}.narinfo", data=narinfo.encode(), method="PUT"
        )
        urllib.request.urlopen(req, timeout=60).close()

    proc, url = _start_bridge(home, next(logs))
    try:
        started = time.monotonic()
        upload(url, paths[0], nars[0])
        full = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()
    for store_path, nar in zip(paths[1:], nars[1:], strict=True):
        proc, url = _start_bridge(home, next(logs))
        try:

            def client(u: str = url, p: str = store_path, n: bytes = nar) -> None:
                # (the server is killed under it: failing is expected)
                with contextlib.suppress(OSError, urllib.error.URLError):
                    upload(u, p, n)

            t = threading.Thread(target=client)
            t.start()
            time.sleep(rng.uniform(0.0, full * 1.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            t.join(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        _check_consistent(home, [store_path])
    # Restarted, the bridge takes every upload to completion and serves it.
    proc, url = _start_bridge(home, next(logs))
    try:
        for store_path, nar in zip(paths, nars, strict=True):
            upload(url, store_path, nar)
    finally:
        proc.kill()
        proc.wait()
    assert _check_consistent(home, paths) == len(paths)
    for store_path, nar in zip(paths, nars, strict=True):
        assert ok(tvix(home, "export", store_path)) == nar
