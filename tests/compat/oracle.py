"""The real Nix 2.8 as a test oracle, confined to throwaway chroot stores.

Every :class:`Nix` owns a scratch store directory and its own XDG cache, so
nothing touches the host's ``/nix/store`` or a narinfo cache shared with
another test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

Arg = str | bytes | os.PathLike[str]

NIX_TOOLS = ("nix-store", "nix")


class NixFailed(AssertionError):
    """A Nix command exited non-zero."""

    def __init__(self, args: Sequence[Arg], returncode: int, stderr: bytes) -> None:
        cmd = " ".join(repr(os.fsdecode(a)) for a in args)
        super().__init__(f"{cmd} exited {returncode}:\n{stderr.decode(errors='replace')}")
        self.returncode = returncode
        self.stderr = stderr


class DigestSink:
    """A NAR sink that counts and sha256-hashes; keeps the bytes only if asked."""

    def __init__(self, keep: bool = True) -> None:
        self._h = hashlib.sha256()
        self.size = 0
        self._kept: bytearray | None = bytearray() if keep else None

    def write(self, data: bytes | bytearray, /) -> int:
        self._h.update(data)
        self.size += len(data)
        if self._kept is not None:
            self._kept += data
        return len(data)

    @property
    def digest(self) -> bytes:
        return self._h.digest()

    @property
    def data(self) -> bytes:
        assert self._kept is not None, "bytes were not kept"
        return bytes(self._kept)

    @property
    def kept(self) -> bool:
        return self._kept is not None


class HashingReader:
    """Wraps a binary source; hashes and counts every byte read through it."""

    def __init__(self, source: IO[bytes]) -> None:
        self._src = source
        self._h = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._src.read(n)
        self._h.update(data)
        self.size += len(data)
        return data

    @property
    def digest(self) -> bytes:
        return self._h.digest()


def assert_same_nar(ours: DigestSink, theirs: DigestSink, what: str = "NAR") -> None:
    """Equal bytes (with the first differing offset on failure) or equal digests."""
    if ours.kept and theirs.kept:
        a, b = ours.data, theirs.data
        if a != b:
            i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
            lo = max(0, i - 32) // 8 * 8
            raise AssertionError(
                f"{what} differs at byte {i} (ours {len(a)} bytes, nix {len(b)} bytes)\n"
                f"  ours: {a[lo : i + 32].hex(' ', 8)}\n"
                f"  nix:  {b[lo : i + 32].hex(' ', 8)}"
            )
    assert (ours.size, ours.digest.hex()) == (theirs.size, theirs.digest.hex()), what


class Nix:
    """Runs ``nix-store`` / ``nix`` against a scratch chroot store under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        for tool in NIX_TOOLS:
            assert shutil.which(tool), f"{tool} not on PATH: run `make system-deps` (nix-bin)"
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.store = workdir / "store"
        self.env = dict(os.environ)
        self.env.pop("NIX_REMOTE", None)
        self.env.update(
            NIX_CONFIG="experimental-features = nix-command",
            XDG_CONFIG_HOME=str(workdir / "xdg-config"),
            XDG_DATA_HOME=str(workdir / "xdg-data"),
            XDG_STATE_HOME=str(workdir / "xdg-state"),
        )
        self._caches = 0
        self.fresh_cache()

    def fresh_cache(self) -> None:
        """Switch to a new, empty ``XDG_CACHE_HOME`` (forget cached narinfos)."""
        self._caches += 1
        self.env["XDG_CACHE_HOME"] = str(self.workdir / f"xdg-cache-{self._caches}")

    def other(self, name: str) -> Nix:
        """Another scratch store (and cache) next to this one."""
        return Nix(self.workdir / name)

    @property
    def store_args(self) -> list[Arg]:
        return ["--store", self.store]

    # -- running ----------------------------------------------------------------
    def run(
        self, *args: Arg, input: bytes | None = None, env: dict[str, str] | None = None
    ) -> bytes:
        """Run a command; stdout on success, :class:`NixFailed` otherwise."""
        proc = self.try_run(*args, input=input, env=env)
        if proc.returncode:
            raise NixFailed(args, proc.returncode, proc.stderr)
        return proc.stdout

    def try_run(
        self, *args: Arg, input: bytes | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            list(args),
            input=input,
            capture_output=True,
            env={**self.env, **(env or {})},
            timeout=120,
            check=False,
        )

    def stream_out(self, args: Sequence[Arg], sink: DigestSink) -> None:
        """Run a command, copying its stdout to ``sink`` in chunks."""
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=err, env=self.env)
            assert proc.stdout is not None
            with proc.stdout:
                while chunk := proc.stdout.read(1 << 20):
                    sink.write(chunk)
            rc = proc.wait(timeout=120)
            if rc:
                err.seek(0)
                raise NixFailed(args, rc, err.read())

    def stream_in(self, args: Sequence[Arg], produce: Callable[[IO[bytes]], object]) -> None:
        """Run a command, letting ``produce`` write its stdin."""
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(list(args), stdin=subprocess.PIPE, stderr=err, env=self.env)
            assert proc.stdin is not None
            try:
                with proc.stdin:
                    produce(proc.stdin)
            except BrokenPipeError:
                pass  # the command gave up early; its exit status says why
            rc = proc.wait(timeout=120)
            if rc:
                err.seek(0)
                raise NixFailed(args, rc, err.read())

    # -- oracles ----------------------------------------------------------------
    def dump(self, path: Arg, sink: DigestSink) -> None:
        """``nix-store --dump PATH`` into ``sink``."""
        self.stream_out(["nix-store", *self.store_args, "--dump", path], sink)

    def dump_store_path(self, store_path: str, sink: DigestSink) -> None:
        """``nix store dump-path`` of a path in the scratch store."""
        self.stream_out(["nix", "store", "dump-path", *self.store_args, store_path], sink)

    def restore(self, dest: Arg, produce: Callable[[IO[bytes]], object]) -> None:
        """``nix-store --restore DEST`` fed by ``produce``."""
        self.stream_in(["nix-store", *self.store_args, "--restore", dest], produce)

    def hash_path(self, path: Arg) -> str:
        """``nix hash path --base32 --type sha256 PATH``."""
        out = self.run(
            "nix", *self.store_args, "hash", "path", "--base32", "--type", "sha256", path
        )
        return out.decode().strip()

    def add(self, path: Arg) -> str:
        """``nix-store --add PATH``: the store path it prints."""
        return self.run("nix-store", *self.store_args, "--add", path).decode().strip()
