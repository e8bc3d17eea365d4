"""File trees that exercise every corner of the NAR format.

A tree is described by a small in-memory spec (:class:`File`, :class:`BigFile`,
:class:`Symlink`, :class:`Hardlink`, :class:`Dir`). The same spec can be

* written to disk (:func:`materialize`) for the Nix oracle,
* written as a NAR with our :class:`~nix_compat.nar.NarWriter` (:func:`write_spec`),
* turned into the :data:`Snapshot` we expect to see after any round trip
  (:func:`expected`), to compare with a directory on disk (:func:`snapshot`)
  or with the events of a NAR reader (:func:`replay`).

:data:`TREES` is the fixed corpus; :func:`nodes` is a hypothesis strategy for
random trees.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from hypothesis import strategies as st

from nix_compat.nar import (
    NarDirectory,
    NarDirectoryEnd,
    NarFile,
    NarSymlink,
    NarWriter,
    read_nar,
)
from nix_compat.nar.reader import Source

MiB = 1 << 20


# -- spec ---------------------------------------------------------------------
@dataclass(frozen=True)
class File:
    """A regular file held in memory; ``mode`` is applied with chmod."""

    contents: bytes = b""
    mode: int = 0o644

    @property
    def executable(self) -> bool:
        return bool(self.mode & stat.S_IXUSR)


@dataclass(frozen=True)
class BigFile:
    """A large regular file of deterministic pseudo-random bytes, never held whole."""

    size: int
    seed: int = 0
    mode: int = 0o644

    @property
    def executable(self) -> bool:
        return bool(self.mode & stat.S_IXUSR)

    def chunks(self, chunk: int = 4 * MiB) -> Iterator[bytes]:
        rng = random.Random(self.seed)
        left = self.size
        while left:
            n = min(left, chunk)
            yield rng.randbytes(n)
            left -= n


@dataclass(frozen=True)
class Symlink:
    """A symlink; the target is raw bytes and never followed."""

    target: bytes


@dataclass(frozen=True)
class Hardlink:
    """A second name for the file at ``of`` (a path relative to the tree root).

    The target must sort (bytewise, depth first) before the link so that it
    exists when the link is made.
    """

    of: bytes


@dataclass(frozen=True)
class Dir:
    """A directory; keys are raw entry names (any order: NARs sort them)."""

    entries: Mapping[bytes, Node] = field(default_factory=dict)


Node = File | BigFile | Symlink | Hardlink | Dir


@dataclass(frozen=True)
class Tree:
    """A named root; ``name`` is a valid store path name (``nix-store --add`` uses it)."""

    name: str
    root: Node
    large: bool = False

    def __str__(self) -> str:
        return self.name


# -- what we expect to see ------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """One filesystem object as observed; ``data`` is sha256(contents) or the link target."""

    kind: Literal["directory", "regular", "symlink"]
    executable: bool = False
    size: int = 0
    data: bytes = b""


Snapshot = dict[bytes, Seen]


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _resolve(root: Node, rel: bytes) -> Node:
    node = root
    for part in rel.split(b"/"):
        assert isinstance(node, Dir), f"{rel!r} does not name a file in the spec"
        node = node.entries[part]
    return node


def expected(root: Node) -> Snapshot:
    """The snapshot any faithful round trip of ``root`` must produce."""
    out: Snapshot = {}

    def visit(node: Node, rel: bytes) -> None:
        if isinstance(node, Hardlink):
            node = _resolve(root, node.of)
        if isinstance(node, File):
            digest = hashlib.sha256(node.contents).digest()
            out[rel] = Seen("regular", node.executable, len(node.contents), digest)
        elif isinstance(node, BigFile):
            h = hashlib.sha256()
            for chunk in node.chunks():
                h.update(chunk)
            out[rel] = Seen("regular", node.executable, node.size, h.digest())
        elif isinstance(node, Symlink):
            out[rel] = Seen("symlink", data=node.target)
        elif isinstance(node, Dir):
            out[rel] = Seen("directory")
            for name, child in node.entries.items():
                visit(child, _join(rel, name))
        else:  # pragma: no cover - Hardlink to a Hardlink
            raise AssertionError(f"unresolvable node {node!r}")

    visit(root, b"")
    return out


def _hash_file(path: bytes) -> tuple[int, bytes]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * MiB)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.digest()


def snapshot(path: bytes) -> Snapshot:
    """Observe the tree at ``path`` (symlinks not followed; executable = owner x)."""
    out: Snapshot = {}

    def visit(p: bytes, rel: bytes) -> None:
        st_ = os.lstat(p)
        if stat.S_ISLNK(st_.st_mode):
            out[rel] = Seen("symlink", data=os.readlink(p))
        elif stat.S_ISREG(st_.st_mode):
            size, digest = _hash_file(p)
            out[rel] = Seen("regular", bool(st_.st_mode & stat.S_IXUSR), size, digest)
        elif stat.S_ISDIR(st_.st_mode):
            out[rel] = Seen("directory")
            for name in os.listdir(p):
                visit(p + b"/" + name, _join(rel, name))
        else:
            raise AssertionError(f"unexpected file type at {p!r}")

    visit(path, b"")
    return out


# -- writing ------------------------------------------------------------------
def materialize(root: Node, path: bytes) -> None:
    """Create ``root`` at ``path`` (which must not exist)."""

    def make(node: Node, p: bytes) -> None:
        if isinstance(node, File):
            with open(p, "xb") as f:
                f.write(node.contents)
            os.chmod(p, node.mode)
        elif isinstance(node, BigFile):
            with open(p, "xb") as f:
                for chunk in node.chunks():
                    f.write(chunk)
            os.chmod(p, node.mode)
        elif isinstance(node, Symlink):
            os.symlink(node.target, p)
        elif isinstance(node, Hardlink):
            os.link(path + b"/" + node.of, p, follow_symlinks=False)
        else:
            os.mkdir(p)
            for name in sorted(node.entries):
                make(node.entries[name], p + b"/" + name)

    make(root, path)


def write_spec(root: Node, writer: NarWriter) -> None:
    """Write ``root`` as a NAR with our writer (entries in bytewise order)."""

    def emit(node: Node) -> None:
        if isinstance(node, Hardlink):
            node = _resolve(root, node.of)
        if isinstance(node, File):
            writer.file(node.contents, node.executable)
        elif isinstance(node, BigFile):
            writer.regular(node.size, node.executable)
            for chunk in node.chunks():
                writer.write(chunk)
            writer.end_regular()
        elif isinstance(node, Symlink):
            writer.symlink(node.target)
        elif isinstance(node, Dir):
            writer.directory()
            for name in sorted(node.entries):
                writer.entry(name)
                emit(node.entries[name])
            writer.end_directory()
        else:  # pragma: no cover
            raise AssertionError(f"unresolvable node {node!r}")

    emit(root)
    writer.close()


def replay(source: Source, writer: NarWriter | None = None) -> Snapshot:
    """Read a NAR with our reader, optionally re-emit it through ``writer``.

    File contents are consumed chunk by chunk while iterating (never held
    whole); the returned snapshot describes what the NAR contains.
    """
    out: Snapshot = {}

    def entry(path: bytes) -> None:
        if writer is not None and path:
            writer.entry(path.rpartition(b"/")[2])

    for ev in read_nar(source):
        if isinstance(ev, NarDirectory):
            entry(ev.path)
            if writer is not None:
                writer.directory()
            out[ev.path] = Seen("directory")
        elif isinstance(ev, NarDirectoryEnd):
            if writer is not None:
                writer.end_directory()
        elif isinstance(ev, NarSymlink):
            entry(ev.path)
            if writer is not None:
                writer.symlink(ev.target)
            out[ev.path] = Seen("symlink", data=ev.target)
        elif isinstance(ev, NarFile):
            entry(ev.path)
            if writer is not None:
                writer.regular(ev.size, ev.executable)
            h = hashlib.sha256()
            got = 0
            for chunk in ev.contents.chunks():
                h.update(chunk)
                got += len(chunk)
                if writer is not None:
                    writer.write(chunk)
            assert got == ev.size
            if writer is not None:
                writer.end_regular()
            out[ev.path] = Seen("regular", ev.executable, ev.size, h.digest())
        else:  # pragma: no cover
            raise AssertionError(f"unknown event {ev!r}")
    if writer is not None:
        writer.close()
    return out


# -- the corpus ---------------------------------------------------------------
def _order_names() -> dict[bytes, Node]:
    """Names whose byte order differs from text, locale or code-point-of-str order."""
    names = [
        "Z", "a", "A", "_", "a-b", "a.b", "ab", "a0", "a b", "~", "-", "+", "1", "10", "9",
        "é", "z", "ß", "ä", "Ω", "日本", "🦀", "e\u0301", "\ue000", "\uffff", "...", ".a",
    ]  # fmt: skip
    entries: dict[bytes, Node] = {n.encode(): File(n.encode()) for n in names}
    # Surrogate-escaped bytes sort before U+E000 as str but after it as bytes.
    for raw in (b"\xff", b"\xff\xfe", b"\x80", b"\xed\xa0\x80", b"\xc3", b"\xf0\x9f"):
        entries[raw] = File(raw)
    return entries


def _byte_names() -> dict[bytes, Node]:
    """Non-UTF-8, control characters, and names at the 255-byte limit."""
    return {
        b"\xff\xfe": File(b"not utf-8"),
        b"\xfe\xff-dir": Dir({b"\x81\x82": File(b"inner", 0o755)}),
        b"latin1-caf\xe9": Symlink(b"caf\xe9-target-\xff"),
        b"\x01ctrl\x7f": File(b""),
        b"new\nline": File(b"nl"),
        b"tab\there": File(b"tab"),
        b"back\\slash": File(b"bs"),
        b"q'uo\"te": File(b"q"),
        b"*?[glob]": File(b"g"),
        "caf\u00e9-nfc".encode(): File(b"nfc"),
        "cafe\u0301-nfd".encode(): File(b"nfd"),
        "\u65e5\u672c\u8a9e".encode(): Dir({"\U0001f980".encode(): Symlink("\u2192x".encode())}),
        b"n" * 255: File(b"255 bytes of name"),
        "\u00e9".encode() * 127 + b"x": File(b"255 bytes, 128 characters"),
    }


def _padding() -> dict[bytes, Node]:
    """Every padding length for names, contents and symlink targets."""
    entries: dict[bytes, Node] = {}
    for i in range(18):
        entries[b"f" * (i + 1)] = File(bytes(range(i)))
    for i in range(1, 18):
        entries[b"l%02d" % i] = Symlink(b"t" * i)
    return entries


def _deep(levels: int) -> Node:
    node: Node = Dir(
        {
            b"leaf": File(b"at the bottom\n"),
            b"up": Symlink(b"/".join([b".."] * levels)),
            b"empty": Dir(),
        }
    )
    for i in reversed(range(levels)):
        node = Dir({b"d%02d" % i: node})
    return node


def _mixed() -> Node:
    return Dir(
        {
            b"empty-file": File(),
            b"empty-dir": Dir(),
            b"nested-empty": Dir({b"e1": Dir({b"e2": Dir()})}),
            b"hello.txt": File(b"Hello, World!\n"),
            b"run.sh": File(b"#!/bin/sh\necho hi\n", 0o755),
            b"bin": Dir({b"tool": File(b"\x7fELF fake", 0o755), b"data": File(b"d" * 4097)}),
            b"abs-link": Symlink(b"/nix/store/00000000000000000000000000000000-nowhere/bin/sh"),
            b"rel-link": Symlink(b"hello.txt"),
            b"rel-up": Symlink(b"../mixed/bin/tool"),
            b"dangling": Symlink(b"does/not/exist"),
            b"dir-link": Symlink(b"bin"),
            b"dot-link": Symlink(b"."),
            b"self-loop": Symlink(b"self-loop"),
            b"hard-1": File(b"hardlinked contents\n", 0o755),
            b"hard-2": Hardlink(b"hard-1"),
            b".hidden": File(b"dotfile"),
            b"...": Dir({b"..a": File(b"dots")}),
        }
    )


def _exec_bits() -> Node:
    # Only the owner's x bit counts (Nix: S_IXUSR).
    modes = {"u-x": 0o744, "g-x": 0o654, "o-x": 0o645, "all-x": 0o755, "ro": 0o444, "r-x": 0o555}
    return Dir({k.encode(): File(k.encode(), m) for k, m in modes.items()})


TREES: list[Tree] = [
    Tree("lone-file", File(b"just one file\n")),
    Tree("lone-empty-file", File()),
    Tree("lone-exec", File(b"#!/bin/sh\nexit 0\n", 0o755)),
    Tree("lone-empty-exec", File(b"", 0o700)),
    Tree("lone-symlink-abs", Symlink(b"/nix/store/00000000000000000000000000000000-x")),
    Tree("lone-symlink-rel", Symlink(b"../somewhere/else")),
    Tree("lone-symlink-bytes", Symlink(b"\xff\xfe/\xe9")),
    Tree("lone-symlink-long", Symlink(b"/" + b"x" * 4094)),
    Tree("empty-dir", Dir()),
    Tree("mixed", _mixed()),
    Tree("name-order", Dir(_order_names())),
    Tree("name-bytes", Dir(_byte_names())),
    Tree("padding", Dir(_padding())),
    Tree("exec-bits", _exec_bits()),
    Tree("deep-50", _deep(50)),
    Tree("wide-2000", Dir({str(i).encode(): File(str(i).encode()) for i in range(2000)})),
    Tree(
        "large-64MiB",
        Dir(
            {
                b"big.bin": BigFile(64 * MiB + 3, seed=64, mode=0o755),
                b"small": File(b"small next to big\n"),
            }
        ),
        large=True,
    ),
]
TREES_BY_NAME = {t.name: t for t in TREES}


# -- random trees ---------------------------------------------------------------
def _valid_name(name: bytes) -> bool:
    return b"/" not in name and b"\0" not in name and name not in (b".", b"..")


names = st.binary(min_size=1, max_size=12).filter(_valid_name)
targets = st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t)
files = st.builds(
    File, st.binary(max_size=300), st.sampled_from([0o644, 0o755, 0o600, 0o700, 0o444])
)
leaves = st.one_of(files, st.builds(Symlink, targets))


def nodes(max_leaves: int = 30) -> st.SearchStrategy[Node]:
    """Random trees (no hardlinks, no big files)."""
    return st.recursive(
        leaves,
        lambda children: st.builds(Dir, st.dictionaries(names, children, max_size=6)),
        max_leaves=max_leaves,
    )
