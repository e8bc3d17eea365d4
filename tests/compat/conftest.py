"""Fixtures for the Nix 2.8 compatibility tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .oracle import Nix
from .trees import Tree, materialize


@pytest.fixture
def nix(tmp_path: Path) -> Nix:
    """Nix confined to a fresh scratch store and a fresh XDG cache."""
    return Nix(tmp_path / "nix")


class TreeFarm:
    """Materializes corpus trees on first use, once per session."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._made: dict[str, bytes] = {}

    def path(self, tree: Tree) -> bytes:
        if tree.name not in self._made:
            parent = self._base / tree.name
            parent.mkdir()
            # The root's basename is the tree name: nix-store --add uses it as store name.
            p = os.fsencode(parent / tree.name)
            materialize(tree.root, p)
            self._made[tree.name] = p
        return self._made[tree.name]


@pytest.fixture(scope="session")
def farm(tmp_path_factory: pytest.TempPathFactory) -> TreeFarm:
    return TreeFarm(tmp_path_factory.mktemp("trees"))
