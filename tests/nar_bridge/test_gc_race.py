"""gc racing uploads and imports, and gc killed with ``kill -9``: nothing referenced is lost.

The race that loses data in a naive collector: a path is deleted (its
content is now garbage), and an upload of the same bytes, deduplicating
against that garbage, runs while the collector sweeps it. Here imports and
``nix copy`` uploads of such content run for many rounds against collections
with ``--grace 0``; afterwards every PathInfo's closure must be complete
(``fsck``) and every live path must export its exact NAR.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import NIX_HTTP_OPTS, TVIX, Bridges, Closure, nix_in, tvix_env
from .test_gc import files, gc, tvix, uploaded_home


def _tree(root: Path, shared: bytes, unique: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "shared").write_bytes(shared)
    (root / "unique").write_bytes(unique)
    (root / "d").mkdir()
    (root / "d" / "small").write_bytes(shared[:100])
    return root


def _export(home: Path, path: str) -> bytes:
    proc = subprocess.run(
        [TVIX, "export", path], capture_output=True, env=tvix_env(home), check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def test_gc_racing_imports_and_uploads_never_loses_referenced_content(
    bridges: Bridges, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TVIX_STORE_LEASE_TTL", "3")  # (writers' leases end soon: gc gets gaps)
    bridge = bridges.start()
    home = bridge.home
    rng = random.Random(5)
    nix = nix_in(tmp_path, "source")
    stop = threading.Event()
    sweeps: list[dict[str, object]] = []
    errors: list[str] = []

    def collector() -> None:
        while not stop.is_set():
            code, report = gc(home, "--grace", "0", "--wait", "2")
            if code == 0 and not report["deferred"]:
                sweeps.append(report)

    thread = threading.Thread(target=collector)
    thread.start()
    live: dict[str, bytes] = {}  # path -> its NAR, as Nix dumps it
    previous: str | None = None
    try:
        for i in range(30):  # (at least 8 rounds, and more until a collection swept meanwhile)
            if i >= 8 and sweeps:
                break
            shared = rng.randbytes(20_000 + i)  # (the same bytes in rounds i and i + 1)
            # An import of content a deleted path had: dedup against garbage.
            a = _tree(tmp_path / f"imp-{i}", shared, rng.randbytes(5000))
            b = _tree(tmp_path / f"imp-{i}-again", shared, rng.randbytes(5000))
            first = tvix(home, "import", str(a))
            assert first.returncode == 0, first.stderr
            path = first.stdout.strip().splitlines()[-1]
            if previous is not None:
                assert tvix(home, "delete", previous).returncode == 0
                live.pop(previous)
            deleted = tvix(home, "delete", path)
            assert deleted.returncode == 0, deleted.stderr
            again = tvix(home, "import", str(b))
            assert again.returncode == 0, again.stderr
            previous = again.stdout.strip().splitlines()[-1]
            live[previous] = subprocess.run(
                ["nix-store", "--dump", str(b)], capture_output=True, check=True
            ).stdout
            # And a real `nix copy` of a path with the same bytes, through nar-bridge.
            c = _tree(tmp_path / f"nix-{i}", shared, rng.randbytes(3000))
            added = nix.run("nix-store", *nix.store_args, "--add", str(c)).decode().strip()
            nix.run(
                "nix",
                "copy",
                *nix.store_args,
                "--to",
                f"{bridge.url}?compression=none",
                *NIX_HTTP_OPTS,
                added,
            )
            live[added] = subprocess.run(
                ["nix-store", "--dump", str(c)], capture_output=True, check=True
            ).stdout
    except BaseException as exc:
        errors.append(repr(exc))
        raise
    finally:
        stop.set()
        thread.join(timeout=600)
    bridge.stop()
    code, final = gc(home, "--grace", "0")
    assert code == 0 and not final["deferred"], final
    assert sweeps, "no collection swept while the uploads ran (the race was not exercised)"
    swept = sum(int(str(r["blobs"])) for r in [*sweeps, final])
    assert swept >= 8, (sweeps, final)  # (the deleted rounds' unique blobs went)
    fsck = tvix(home, "fsck", "--deep", "--json")
    report = json.loads(fsck.stdout)
    assert fsck.returncode == 0 and report["damaged_paths"] == [], report
    assert report["paths"] == len(live)
    for path, nar in live.items():
        assert _export(home, path) == nar, path


def test_gc_killed_at_any_point_leaves_a_consistent_store(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    home = uploaded_home(bridges, closure, tmp_path)
    rng = random.Random(9)
    doomed = []
    for n in range(3):
        root = tmp_path / f"many-{n}"
        root.mkdir()
        for j in range(400):
            (root / f"f{j}").write_bytes(rng.randbytes(rng.randrange(50, 3000)))
        proc = tvix(home, "import", str(root))
        assert proc.returncode == 0, proc.stderr
        doomed.append(proc.stdout.strip().splitlines()[-1])
    assert tvix(home, "pin", "add", "keep", closure.by_name("top").path).returncode == 0
    before = sum(len(v) for v in files(home).values())
    env = tvix_env(home)
    killed = 0
    for delay in (0.05, 0.2, 0.4, 0.6, 0.8, 1.0, 1.3, 1.7):
        child = subprocess.Popen(
            [TVIX, "gc", "--keep-since", "0", "--grace", "0", "--min-garbage", "0"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            killed += 1
        child.wait(timeout=120)
        check = tvix(home, "fsck", "--json")
        assert check.returncode == 0, check.stdout  # consistent after every kill
        if child.returncode == 0:
            break
    assert killed >= 1
    code, report = gc(home, "--keep-since", "0", "--grace", "0")
    assert code == 0 and not report["deferred"], report
    for path in doomed:
        assert tvix(home, "info", path).returncode != 0
    fsck = tvix(home, "fsck", "--deep", "--json")
    assert fsck.returncode == 0 and json.loads(fsck.stdout)["paths"] == 3, fsck.stdout
    for name in ("top", "mid", "dep"):
        p = closure.by_name(name)
        assert _export(home, p.path) == p.nar, name
    assert sum(len(v) for v in files(home).values()) < before
