"""Property tests: any valid Directory survives the wire unchanged."""

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
