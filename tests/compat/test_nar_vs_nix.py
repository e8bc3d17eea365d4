"""Our NAR dumper, hasher, store-path computation and reader against Nix 2.8.

Each corpus tree (see ``trees.py``) is written to disk once per session and
then checked against ``nix-store --dump``, ``nix hash path``, ``nix-store
--add`` and ``nix-store --restore`` in a scratch chroot store. Large trees are
streamed through hashing sinks; small ones are compared byte for byte.
"""

from __future__ import annotations

import io
import json
import subprocess
import tempfile
from pathlib import Path
from typing import IO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nix_compat import nixbase32
from nix_compat.errors import NarError
from nix_compat.nar import NarWriter, dump_path, nar_hash_path
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.store_path import build_ca_path

from .conftest import TreeFarm
from .narfuzz import Mutation, mutations, nar_of
from .oracle import DigestSink, HashingReader, Nix, assert_same_nar
from .trees import TREES, Node, Tree, expected, materialize, nodes, replay, snapshot, write_spec

CORPUS = [pytest.param(t, id=t.name, marks=[pytest.mark.slow] if t.large else []) for t in TREES]


def nix_dump(nix: Nix, tree: Tree, path: bytes) -> DigestSink:
    sink = DigestSink(keep=not tree.large)
    nix.dump(path, sink)
    return sink


def our_dump(tree: Tree, path: bytes) -> DigestSink:
    sink = DigestSink(keep=not tree.large)
    dump_path(path, sink)
    return sink


@pytest.mark.parametrize("tree", CORPUS)
def test_materialized_as_specified(farm: TreeFarm, tree: Tree) -> None:
    # Guards the other tests: the tree on disk is the one the spec describes.
    assert snapshot(farm.path(tree)) == expected(tree.root)


@pytest.mark.parametrize("tree", CORPUS)
def test_dump_matches_nix_store_dump(nix: Nix, farm: TreeFarm, tree: Tree) -> None:
    path = farm.path(tree)
    assert_same_nar(our_dump(tree, path), nix_dump(nix, tree, path))


@pytest.mark.parametrize("tree", CORPUS)
def test_writer_matches_nix_store_dump(nix: Nix, farm: TreeFarm, tree: Tree) -> None:
    # NarWriter fed from the spec (not the filesystem) gives the same bytes.
    ours = DigestSink(keep=not tree.large)
    write_spec(tree.root, NarWriter(ours))
    assert_same_nar(ours, nix_dump(nix, tree, farm.path(tree)))


@pytest.mark.parametrize("tree", CORPUS)
def test_nar_hash_matches_nix_hash_path(nix: Nix, farm: TreeFarm, tree: Tree) -> None:
    path = farm.path(tree)
    size, digest = nar_hash_path(path)
    assert nixbase32.encode(digest) == nix.hash_path(path)
    dumped = our_dump(tree, path)
    assert (size, digest) == (dumped.size, dumped.digest)


@pytest.mark.parametrize("tree", CORPUS)
def test_store_path_matches_nix_store_add(nix: Nix, farm: TreeFarm, tree: Tree) -> None:
    path = farm.path(tree)
    size, digest = nar_hash_path(path)
    ours = build_ca_path(tree.name, CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, digest)), [])
    added = nix.add(path)
    assert ours.absolute == added
    info = json.loads(nix.run("nix", "path-info", *nix.store_args, "--json", added))[0]
    assert info["narSize"] == size
    assert info["narHash"] == NixHash(HashAlgo.SHA256, digest).sri()
    assert info["ca"] == f"fixed:r:sha256:{nixbase32.encode(digest)}"
    # The copy in the store (canonicalised: mtime 1, read-only) dumps the same.
    in_store = DigestSink(keep=not tree.large)
    nix.dump_store_path(added, in_store)
    assert_same_nar(our_dump(tree, path), in_store)


@pytest.mark.parametrize("tree", CORPUS)
def test_nix_restores_our_nar(nix: Nix, farm: TreeFarm, tree: Tree) -> None:
    path = farm.path(tree)
    dest = nix.workdir / "restored" / tree.name
    dest.parent.mkdir()

    def produce(stdin: IO[bytes]) -> None:
        dump_path(path, stdin)

    nix.restore(dest, produce)
    diff = subprocess.run(
        ["diff", "-r", "--no-dereference", path, dest], capture_output=True, check=False
    )
    assert diff.returncode == 0, diff.stdout.decode(errors="replace") + diff.stderr.decode()
    # diff ignores modes: compare exec bits, symlink targets and contents too.
    assert snapshot(bytes(dest)) == expected(tree.root)


@pytest.mark.parametrize("tree", CORPUS)
def test_reader_roundtrips_nix_nar(nix: Nix, farm: TreeFarm, tree: Tree) -> None:
    path = farm.path(tree)
    rewritten = DigestSink(keep=not tree.large)
    if tree.large:
        # Stream nix-store --dump straight into our reader; never hold the NAR.
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                ["nix-store", *nix.store_args, "--dump", path],
                stdout=subprocess.PIPE,
                stderr=err,
                env=nix.env,
            )
            assert proc.stdout is not None
            with proc.stdout:
                source = HashingReader(proc.stdout)
                seen = replay(source, NarWriter(rewritten))
                assert proc.stdout.read(1) == b""
            assert proc.wait(timeout=120) == 0
        original = (source.size, source.digest.hex())
        assert (rewritten.size, rewritten.digest.hex()) == original
    else:
        theirs = nix_dump(nix, tree, path)
        seen = replay(io.BytesIO(theirs.data), NarWriter(rewritten))
        assert_same_nar(rewritten, theirs, "re-written NAR")
    assert seen == expected(tree.root)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(root=nodes(max_leaves=20))
def test_random_trees_match_nix(nix: Nix, root: Node) -> None:
    with tempfile.TemporaryDirectory(dir=nix.workdir) as tmp:
        path = tmp.encode() + b"/random-tree"
        materialize(root, path)
        theirs = DigestSink()
        nix.dump(path, theirs)
        ours = DigestSink()
        dump_path(path, ours)
        assert_same_nar(ours, theirs)
        spec = DigestSink()
        write_spec(root, NarWriter(spec))
        assert_same_nar(spec, theirs)
        assert replay(io.BytesIO(theirs.data)) == expected(root)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(root=nodes(max_leaves=10), muts=st.lists(mutations, min_size=1, max_size=2))
def test_nix_restores_every_mutant_our_reader_accepts(
    nix: Nix, root: Node, muts: list[Mutation]
) -> None:
    # Our reader is stricter than Nix 2.8 (which, e.g., lets unsorted entries
    # and NUL in symlink targets through), never laxer.
    data = bytearray(nar_of(root))
    for m in muts:
        m.apply(data)
    mutant = bytes(data)
    try:
        seen = replay(io.BytesIO(mutant))
    except NarError:
        return
    with tempfile.TemporaryDirectory(dir=nix.workdir) as tmp:
        dest = tmp.encode() + b"/restored"
        nix.restore(dest, lambda stdin: stdin.write(mutant))
        assert snapshot(dest) == seen


DEEP_LEVELS = 1200  # 2.4 KB of path: well inside PATH_MAX, beyond Python's recursion limit


def test_very_deep_tree_matches_nix(nix: Nix, tmp_path: Path) -> None:
    root = tmp_path / "deep-1200"
    p = root
    p.mkdir()
    for _ in range(DEEP_LEVELS):
        p = p / "d"
        p.mkdir()
    (p / "leaf").write_bytes(b"bottom\n")
    try:
        check_deep_tree(nix, root)
    finally:
        # shutil.rmtree (and so pytest's tmp cleanup) recurses too: remove bottom up.
        (p / "leaf").unlink()
        while p != tmp_path:
            p.rmdir()
            p = p.parent


def check_deep_tree(nix: Nix, root: Path) -> None:
    theirs = DigestSink()
    nix.dump(root, theirs)
    # Our reader and writer are iterative and cope.
    rewritten = DigestSink()
    seen = replay(io.BytesIO(theirs.data), NarWriter(rewritten))
    assert rewritten.data == theirs.data
    assert len(seen) == DEEP_LEVELS + 2
    ours = DigestSink()
    dump_path(root, ours)  # RecursionError today
    assert_same_nar(ours, theirs)
