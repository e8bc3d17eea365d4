import hashlib
import io
from pathlib import Path

import pytest

from nix_compat.errors import NarError, NarWriteError
from nix_compat.nar import (
    NarDirectory,
    NarDirectoryEnd,
    NarEvent,
    NarFile,
    NarSymlink,
    NarWriter,
    read_nar,
)
from nix_compat.nar.wire import token

DATA = Path(__file__).parent.parent / "data"

NARS = {
    "symlink.nar": (136, "097d397e9b5826384eaa16c457715d1c1a51670313ead0f58566e0b232539cf1"),
    "helloworld.nar": (128, "03e7f63be30b065d78bcf615f5473545fdb4eb69aa416f43495b4e05cdfb8040"),
    "complicated.nar": (840, "ebd52279a8df024c9fd5718de4103bf5e760dc7f2cf49044ee7dea87ab16911a"),
    "emptydirectory.nar": (96, "a50a5ab6d992f5598edd92105059fae9acfc192981e08bd88534c2167e92526a"),
    "onebyteregular.nar": (120, "730850a811259dbf3a68dc2ee87a79aa6cae9f71375edf396f9d7a91fbe9134d"),
    "onebyteexecutable.nar": (
        152,
        "fa0de8dccc3589bed965eee20dd776b232f90fee5f004a58e11898c8d371c7f4",
    ),
    "popdirectories.nar": (600, "88c73fb9141b358561b28f5185ea7ecc7397d3a09942f81269118129d06fb59e"),
    "net-tools.nar": (464152, "c6e155b3456e30b7612263ec095070811caf8abfd59faa72ab82a592efdeb253"),
}


def rewrite(data: bytes) -> bytes:
    """Parse ``data`` and write it again from the events."""
    out = io.BytesIO()
    w = NarWriter(out)
    for ev in read_nar(io.BytesIO(data)):
        if ev.path and not isinstance(ev, NarDirectoryEnd):
            w.entry(ev.path.rsplit(b"/", 1)[-1])
        if isinstance(ev, NarDirectory):
            w.directory()
        elif isinstance(ev, NarDirectoryEnd):
            w.end_directory()
        elif isinstance(ev, NarSymlink):
            w.symlink(ev.target)
        else:
            w.regular(ev.size, ev.executable)
            for chunk in ev.contents.chunks(7):
                w.write(chunk)
            w.end_regular()
    w.close()
    return out.getvalue()


def events(data: bytes) -> list[NarEvent]:
    out: list[NarEvent] = []
    for ev in read_nar(io.BytesIO(data)):
        if isinstance(ev, NarFile):
            ev.contents.read()
        out.append(ev)
    return out


@pytest.mark.parametrize("name", sorted(NARS))
def test_fixture_nars_roundtrip(name: str) -> None:
    data = (DATA / name).read_bytes()
    size, sha = NARS[name]
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == sha
    assert rewrite(data) == data


def test_net_tools_details() -> None:
    data = (DATA / "net-tools.nar").read_bytes()
    evs = read_nar(io.BytesIO(data))
    seen: dict[bytes, object] = {}
    for ev in evs:
        if isinstance(ev, NarFile):
            import blake3

            seen[ev.path] = (ev.executable, ev.size, blake3.blake3(ev.contents.read()).hexdigest())
        elif isinstance(ev, NarSymlink):
            seen[ev.path] = ev.target
    assert seen[b"bin/arp"] == (
        True,
        55288,
        "fbc4614a292711cbcce499819cf0a917f7d091beea08cb5baa7676f5ee4f82bb",
    )
    assert seen[b"sbin"] == b"bin"
    for alias in (b"dnsdomainname", b"domainname", b"nisdomainname", b"ypdomainname"):
        assert seen[b"bin/" + alias] == b"hostname"


def test_unread_contents_are_skipped() -> None:
    data = (DATA / "complicated.nar").read_bytes()
    kinds = [type(ev).__name__ for ev in read_nar(io.BytesIO(data))]
    assert kinds == [
        "NarDirectory",
        "NarFile",
        "NarSymlink",
        "NarDirectory",
        "NarFile",
        "NarDirectoryEnd",
        "NarDirectoryEnd",
    ]


def test_paths_of_events() -> None:
    evs = events((DATA / "complicated.nar").read_bytes())
    assert [ev.path for ev in evs] == [b"", b".keep", b"aa", b"keep", b"keep/.keep", b"keep", b""]


def nar_dir(*entries: tuple[bytes, bytes]) -> bytes:
    body = b"".join(
        token(b"entry", b"(", b"name", n, b"node") + node + token(b")") for n, node in entries
    )
    return token(b"(", b"type", b"directory") + body + token(b")")


def nar_file(data: bytes, executable: bool = False) -> bytes:
    ex = (b"executable", b"") if executable else ()
    return token(b"(", b"type", b"regular", *ex, b"contents", data, b")")


def nar_link(target: bytes) -> bytes:
    return token(b"(", b"type", b"symlink", b"target", target, b")")


MAGIC = token(b"nix-archive-1")


def test_handmade_nar_parses() -> None:
    nar = MAGIC + nar_dir((b"a", nar_file(b"x")), (b"b", nar_link(b"a")))
    assert rewrite(nar) == nar


@pytest.mark.parametrize(
    ("nar", "message"),
    [
        (b"", "unexpected end"),
        (token(b"nix-archive-2"), "magic"),
        (MAGIC + nar_file(b"abc") + b"\0", "trailing bytes"),
        (MAGIC + nar_file(b"abc")[:-1], "unexpected end"),
        (MAGIC + nar_dir((b"b", nar_file(b"")), (b"a", nar_file(b""))), "unsorted"),
        (MAGIC + nar_dir((b"a", nar_file(b"")), (b"a", nar_file(b""))), "duplicate"),
        (MAGIC + nar_dir((b"", nar_file(b""))), "empty entry name"),
        (MAGIC + nar_dir((b".", nar_file(b""))), "not allowed"),
        (MAGIC + nar_dir((b"..", nar_file(b""))), "not allowed"),
        (MAGIC + nar_dir((b"a/b", nar_file(b""))), "'/' or NUL"),
        (MAGIC + nar_dir((b"a\0", nar_file(b""))), "'/' or NUL"),
        (MAGIC + nar_dir((b"x" * 256, nar_file(b""))), "exceeds the limit"),
        (MAGIC + nar_link(b""), "empty symlink target"),
        (MAGIC + nar_link(b"a\0b"), "NUL"),
        (MAGIC + nar_link(b"x" * 4096), "exceeds the limit"),
        (MAGIC + token(b"(", b"type", b"hardlink", b")"), "unknown node type"),
        (
            MAGIC + token(b"(", b"type", b"regular", b"executable", b"x", b"contents"),
            "empty string",
        ),
        (MAGIC + token(b"(", b"type", b"regular", b"content", b"x", b")"), "expected 'contents'"),
        (MAGIC + token(b"(", b"type", b"directory", b"entri"), "expected 'entry'"),
        (MAGIC + token(b"(", b"type", b"symlink", b"targets", b"x", b")"), "'target'"),
        (MAGIC + token(b"(", b"tipe", b"symlink"), "'type'"),
    ],
)
def test_rejects(nar: bytes, message: str) -> None:
    with pytest.raises(NarError, match=message):
        events(nar)


def test_rejects_nonzero_padding_in_contents_and_strings() -> None:
    good = MAGIC + nar_file(b"abc")
    bad = bytearray(good)
    bad[-17] = 1  # padding byte after the 3 content bytes
    with pytest.raises(NarError, match="padding") as exc:
        events(bytes(bad))
    assert exc.value.offset == len(good) - 21
    link = bytearray(MAGIC + nar_link(b"abc"))
    link[-17] = 0x20
    with pytest.raises(NarError, match="padding"):
        events(bytes(link))


def test_error_offset_points_at_problem() -> None:
    nar = MAGIC + nar_dir((b"b", nar_file(b"")), (b"a", nar_file(b"")))
    with pytest.raises(NarError) as exc:
        events(nar)
    assert nar[exc.value.offset : exc.value.offset + 9] == token(b"a")[:9]


def test_huge_declared_length_is_not_allocated() -> None:
    nar = MAGIC + token(b"(", b"type") + (2**63).to_bytes(8, "little")
    with pytest.raises(NarError, match="exceeds"):
        events(nar)


def test_source_errors_propagate_unchanged() -> None:
    """An I/O error of the source is not a format error: callers must see it as it is."""

    class Broken:
        def read(self, n: int = -1, /) -> bytes:
            raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        list(read_nar(Broken()))


def test_file_contents_stream_in_pieces() -> None:
    payload = bytes(range(256)) * 5000
    nar = MAGIC + nar_file(payload, executable=True)
    (ev,) = [e for e in read_nar(io.BytesIO(nar)) if isinstance(e, NarFile) and e.executable]
    assert ev.size == len(payload)


def test_writer_checks() -> None:
    w = NarWriter(io.BytesIO())
    with pytest.raises(NarWriteError):
        w.close()
    w.directory()
    with pytest.raises(NarWriteError):
        w.symlink(b"x")  # no entry introduced
    w.entry(b"b")
    with pytest.raises(NarWriteError):
        w.entry(b"c")  # node owed for b
    w.regular(3)
    w.write(b"ab")
    with pytest.raises(NarWriteError, match="exceed"):
        w.write(b"cd")
    with pytest.raises(NarWriteError, match="short"):
        w.end_regular()
    w.write(b"c")
    w.end_regular()
    with pytest.raises(NarWriteError, match="not after"):
        w.entry(b"a")
    with pytest.raises(NarWriteError):
        w.entry(b"a/b")
    w.end_directory()
    w.close()
    with pytest.raises(NarWriteError):
        NarWriter(io.BytesIO()).symlink(b"")


class _Trickle:
    """A source handing out at most ``piece`` bytes per read."""

    def __init__(self, data: bytes, piece: int) -> None:
        self._f = io.BytesIO(data)
        self._piece = piece

    def read(self, n: int = -1, /) -> bytes:
        return self._f.read(self._piece if n < 0 else min(n, self._piece))


def _outcome(data: bytes, piece: int) -> list[object]:
    """Events (with contents) and the error, if any, reading ``data`` ``piece`` bytes at a time."""
    out: list[object] = []
    try:
        for i, ev in enumerate(read_nar(_Trickle(data, piece))):
            if isinstance(ev, NarFile):
                body = ev.contents.read() if i % 2 else b"".join(ev.contents.chunks(3))
                out.append((ev.path, ev.executable, ev.size, body))
            else:
                out.append(ev)
    except NarError as exc:
        out.append((str(exc), exc.offset))
    return out


def test_damage_is_reported_alike_whatever_the_read_sizes() -> None:
    """The one-comparison fast paths and the token-by-token path agree, byte for byte.

    Read a byte at a time, the fast paths rarely see a whole token sequence
    buffered; read whole, they nearly always do. Every single-byte change and
    every truncation of a NAR with each kind of node gives the same events and
    the same error at the same offset either way.
    """
    nar = MAGIC + nar_dir(
        (b"a", nar_file(b"x" * 9)),
        (b"bin", nar_dir((b"run", nar_file(b"#!", executable=True)), (b"z", nar_file(b"")))),
        (b"link", nar_link(b"a")),
    )
    assert _outcome(nar, 1) == _outcome(nar, 1 << 20)
    for i in range(len(nar)):
        for bad in (nar[:i], nar[:i] + bytes([nar[i] ^ 0x01]) + nar[i + 1 :]):
            assert _outcome(bad, 1) == _outcome(bad, 1 << 20), i
