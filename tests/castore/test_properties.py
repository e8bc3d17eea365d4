"""Property tests: any valid Directory survives the wire unchanged."""

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvix_castore import (
    MAX_NAME_LENGTH,
    B3Digest,
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
)
from tvix_castore.errors import ValidationError
from tvix_castore.protos import castore_pb2 as pb

names = st.binary(min_size=1, max_size=MAX_NAME_LENGTH).filter(
    lambda n: n not in (b".", b"..") and b"/" not in n and b"\0" not in n
)
digests = st.binary(min_size=32, max_size=32).map(B3Digest)
sizes = st.integers(min_value=0, max_value=2**40)
targets = st.binary(min_size=1, max_size=200).filter(lambda t: b"\0" not in t)


@st.composite
def nodes(draw: st.DrawFn, name: bytes) -> Node:
    kind = draw(st.sampled_from(["dir", "file", "symlink"]))
    if kind == "dir":
        return DirectoryNode(name, draw(digests), draw(sizes))
    if kind == "file":
        return FileNode(name, draw(digests), draw(sizes), draw(st.booleans()))
    return SymlinkNode(name, draw(targets))


@st.composite
def directory_strategy(draw: st.DrawFn) -> Directory:
    entry_names = draw(st.lists(names, max_size=12, unique=True))
    return Directory.from_nodes([draw(nodes(name)) for name in entry_names])


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(directory_strategy())
def test_roundtrip(directory: Directory) -> None:
    encoded = directory.encode()
    again = Directory.from_bytes(encoded)
    assert again == directory
    assert again.encode() == encoded
    assert again.digest == B3Digest.of(encoded)
    assert pb.Directory.FromString(encoded) == directory.to_proto()


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(directory_strategy())
def test_iteration_is_sorted_and_complete(directory: Directory) -> None:
    listed = [node.name for node in directory.nodes()]
    assert listed == sorted(listed)
    count = len(directory.directories) + len(directory.files) + len(directory.symlinks)
    assert len(listed) == count
    for node in directory.nodes():
        assert directory.lookup(node.name) == node
    expected = count + sum(d.size for d in directory.directories)
    assert directory.size() == expected
    assert directory.size("tvix-2024") == expected + count


_BAD_NAMES = [b"", b".", b"..", b"a/b", b"a\0b", b"x" * (MAX_NAME_LENGTH + 1)]


@st.composite
def wire_directories(draw: st.DrawFn) -> bytes:
    """A valid Directory's encoding with at most one defect of each kind the rules name."""
    msg = draw(directory_strategy()).to_proto()
    lists: list[Any] = [msg.directories, msg.files, msg.symlinks]
    entries: list[Any] = [n for nodes_ in lists for n in nodes_]
    for defect in draw(st.lists(st.integers(0, 6), max_size=2)):
        if not entries:
            break
        entry = draw(st.sampled_from(entries))
        if defect == 0:
            entry.name = draw(st.sampled_from(_BAD_NAMES))
        elif defect == 1 and not isinstance(entry, pb.SymlinkNode):
            entry.digest = draw(st.binary(max_size=40).filter(lambda d: len(d) != 32))
        elif defect == 2 and isinstance(entry, pb.SymlinkNode):
            entry.target = draw(st.sampled_from([b"", b"a\0b", b"t" * 4096]))
        elif defect == 3:  # (a name another entry has, maybe in another list)
            entry.name = draw(st.sampled_from(entries)).name
        elif defect == 4 and isinstance(entry, pb.DirectoryNode):
            entry.size = 2**64 - 1  # (the sum overflows a u64)
        elif defect == 5:
            nodes_ = draw(st.sampled_from(lists))
            if len(nodes_) > 1:
                nodes_[0].name, nodes_[-1].name = nodes_[-1].name, nodes_[0].name
        elif defect == 6:
            msg.directories.add(name=b"zz", digest=bytes(32), size=2**64 - 1)
    return msg.SerializeToString()


def _checked(data: bytes) -> Directory:
    """The same message built through the validating constructors."""
    msg = pb.Directory.FromString(data)
    return Directory(
        tuple(DirectoryNode(d.name, B3Digest(d.digest), d.size) for d in msg.directories),
        tuple(FileNode(f.name, B3Digest(f.digest), f.size, f.executable) for f in msg.files),
        tuple(SymlinkNode(s.name, s.target) for s in msg.symlinks),
    )


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(wire_directories())
def test_decoding_accepts_exactly_what_the_constructors_accept(data: bytes) -> None:
    try:
        expected: Directory | None = _checked(data)
    except ValidationError:
        expected = None
    try:
        decoded: Directory | None = Directory.from_bytes(data)
    except ValidationError:
        decoded = None
    assert decoded == expected
    if expected is not None and decoded is not None:
        assert decoded.size() == expected.size()
        assert decoded.digest == expected.digest
