"""Directory closure graphs: upload (B §2.6) and download (B §2.7) vectors of B §3.2."""

import pytest

from tvix_castore import (
    ClosureVerifier,
    DataCorruption,
    Directory,
    DirectoryGraph,
    DirectoryGraphError,
    DirectoryNode,
    SizeMode,
    ValidationError,
)
from tvix_castore.testing.fixtures import directories

MODES: list[SizeMode] = ["documented", "tvix-2024"]


def fx(mode: SizeMode, name: str) -> Directory:
    directory = getattr(directories(mode), name)
    assert isinstance(directory, Directory)
    return directory


def broken_parent(mode: SizeMode) -> Directory:
    """{foo -> A} with a size that is 42 too big."""
    a = fx(mode, "a")
    node = a.to_node(b"foo", mode)
    return Directory(directories=(DirectoryNode(node.name, node.digest, node.size + 42),))


def upload(mode: SizeMode, names: list[str]) -> DirectoryGraph:
    graph = DirectoryGraph(mode)
    for name in names:
        graph.add(fx(mode, name))
    return graph


# --- uploads, leaves -> root ------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("sequence", "root", "stored"),
    [
        (["a"], "a", ["a"]),
        (["a", "b"], "b", ["a", "b"]),
        (["a", "a", "c"], "c", ["a", "c"]),
        (["a", "c"], "c", ["a", "c"]),
        (["a", "b", "d"], "d", ["a", "b", "d"]),
        (["with_keep", "complicated"], "complicated", ["with_keep", "complicated"]),
        (["a", "b", "a"], "b", ["a", "b"]),  # a re-sent child after its parent
    ],
)
def test_upload_ok(mode: SizeMode, sequence: list[str], root: str, stored: list[str]) -> None:
    closure = upload(mode, sequence).finalize()
    assert closure.root == fx(mode, root).digest
    assert closure.leaves_to_root() == [fx(mode, name) for name in stored]
    assert set(closure.directories) == {fx(mode, name).digest for name in stored}


@pytest.mark.parametrize("mode", MODES)
def test_upload_disconnected_fails_at_end(mode: SizeMode) -> None:
    graph = upload(mode, ["a", "c", "b"])  # every add is fine ...
    with pytest.raises(DirectoryGraphError, match="disconnected roots"):
        graph.finalize()  # ... but B and C are both roots


@pytest.mark.parametrize("mode", MODES)
def test_upload_unknown_child_fails_immediately(mode: SizeMode) -> None:
    graph = DirectoryGraph(mode)
    with pytest.raises(DirectoryGraphError, match="unknown directory") as info:
        graph.add(fx(mode, "b"))
    assert "'a'" in str(info.value)
    assert isinstance(info.value, ValidationError)


@pytest.mark.parametrize("mode", MODES)
def test_upload_wrong_size(mode: SizeMode) -> None:
    graph = upload(mode, ["a"])
    with pytest.raises(DirectoryGraphError, match="'foo' has wrong size, specified 42, recorded 0"):
        graph.add(broken_parent(mode))


def test_upload_size_mode_mismatch() -> None:
    # A 2023-style (documented) closure is refused by a HEAD-rule graph, and vice versa.
    with pytest.raises(DirectoryGraphError, match="'keep' has wrong size, specified 1, recorded 2"):
        upload("tvix-2024", ["with_keep"]).add(fx("documented", "complicated"))
    with pytest.raises(DirectoryGraphError, match="'keep' has wrong size, specified 2, recorded 1"):
        upload("documented", ["with_keep"]).add(fx("tvix-2024", "complicated"))


def test_upload_empty_stream() -> None:
    with pytest.raises(DirectoryGraphError, match="got no directories"):
        DirectoryGraph().finalize()


# --- downloads, root -> leaves ----------------------------------------------


def download(mode: SizeMode, root: Directory, sequence: list[Directory]) -> ClosureVerifier:
    verifier = ClosureVerifier(root.digest, mode)
    for directory in sequence:
        verifier.add(directory)
    return verifier


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("root", "sequence"),
    [
        ("a", ["a"]),
        ("b", ["b", "a"]),
        ("c", ["c", "a"]),
        ("d", ["d", "b", "a"]),
        ("d", ["d", "a", "b"]),
        ("complicated", ["complicated", "with_keep"]),
    ],
)
def test_download_ok(mode: SizeMode, root: str, sequence: list[str]) -> None:
    verifier = download(mode, fx(mode, root), [fx(mode, name) for name in sequence])
    closure = verifier.finalize()
    assert closure is not None
    assert closure.root == fx(mode, root).digest
    assert len(closure.directories) == len(sequence)


@pytest.mark.parametrize("mode", MODES)
def test_download_unreferenced_fails(mode: SizeMode) -> None:
    verifier = download(mode, fx(mode, "c"), [fx(mode, "c")])
    with pytest.raises(DataCorruption, match="unexpected directory"):
        verifier.add(fx(mode, "b"))


@pytest.mark.parametrize("mode", MODES)
def test_download_wrong_root_fails(mode: SizeMode) -> None:
    verifier = ClosureVerifier(fx(mode, "b").digest, mode)
    with pytest.raises(DataCorruption, match="unexpected directory"):
        verifier.add(fx(mode, "a"))


@pytest.mark.parametrize("mode", MODES)
def test_download_wrong_size_fails(mode: SizeMode) -> None:
    parent = broken_parent(mode)
    verifier = download(mode, parent, [parent])
    with pytest.raises(DataCorruption, match="'foo' has wrong size, specified 42, recorded 0"):
        verifier.add(fx(mode, "a"))


def test_download_wrong_size_to_already_received_child() -> None:
    # D = {a -> A, b -> B}, B = {a -> A}: with order D, A, B the edge B -> A is
    # checked when B arrives. Swap in a B whose edge lies about A's size.
    mode: SizeMode = "documented"
    a = fx(mode, "a")
    bad_b = Directory(directories=(DirectoryNode(b"a", a.digest, 7),))
    d = Directory(directories=(a.to_node(b"a"), bad_b.to_node(b"b")))
    verifier = download(mode, d, [d, a])
    with pytest.raises(DataCorruption, match="'a' has wrong size, specified 7, recorded 0"):
        verifier.add(bad_b)


@pytest.mark.parametrize("mode", MODES)
def test_download_duplicate_fails(mode: SizeMode) -> None:
    verifier = download(mode, fx(mode, "c"), [fx(mode, "c"), fx(mode, "a")])
    with pytest.raises(DataCorruption, match="twice"):
        verifier.add(fx(mode, "a"))


def test_download_nothing_received_is_not_found() -> None:
    assert ClosureVerifier(fx("documented", "b").digest).finalize() is None


def test_download_premature_end() -> None:
    verifier = download("documented", fx("documented", "d"), [fx("documented", "d")])
    with pytest.raises(DataCorruption, match="premature end of stream"):
        verifier.finalize()


# --- closure orders ---------------------------------------------------------


def test_closure_orders() -> None:
    mode: SizeMode = "documented"
    closure = upload(mode, ["a", "b", "d"]).finalize()
    a, b, d = (fx(mode, n) for n in ("a", "b", "d"))
    assert closure.root_to_leaves() == [d, a, b]  # BFS, children in name order
    assert closure.leaves_to_root() == [a, b, d]  # every child before its parents


def test_deep_closure_has_no_recursion_limit() -> None:
    graph = DirectoryGraph()
    child = Directory()
    graph.add(child)
    chain = [child]
    for _ in range(5000):
        child = Directory(directories=(child.to_node(b"d"),))
        graph.add(child)
        chain.append(child)
    closure = graph.finalize()
    assert closure.leaves_to_root() == chain
    assert closure.root_to_leaves() == chain[::-1]
    verifier = ClosureVerifier(closure.root)
    for directory in closure.root_to_leaves():
        verifier.add(directory)
    assert verifier.finalize() is not None
