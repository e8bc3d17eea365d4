"""Package surface: exports, the error tree, and the docstring examples."""

import doctest
import importlib
import types

import pytest

import tvix_castore
from tvix_castore import errors

MODULES = [
    "tvix_castore",
    "tvix_castore.digests",
    "tvix_castore.errors",
    "tvix_castore.nodes",
    "tvix_castore.directoryservice",
    "tvix_castore.directoryservice.graph",
    "tvix_castore.directoryservice.objectstore",
    "tvix_castore.testing.fixtures",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported: list[str] = getattr(module, "__all__", [])
    assert exported == sorted(exported, key=lambda n: (not n.isupper(), n.islower(), n))
    for item in exported:
        assert hasattr(module, item), f"{name}.{item}"


def test_top_level_exports_every_public_item_of_core_modules() -> None:
    for name in ("tvix_castore.digests", "tvix_castore.nodes", "tvix_castore.errors"):
        module = importlib.import_module(name)
        missing = set(module.__all__) - set(tvix_castore.__all__) - {"show_name"}
        assert not missing, f"{name}: {sorted(missing)}"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    assert isinstance(module, types.ModuleType)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_single_error_root() -> None:
    classes = [
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type)
        and issubclass(obj, Exception)
        and obj.__module__ == errors.__name__
    ]
    assert len(classes) >= 10
    for cls in classes:
        assert issubclass(cls, errors.CastoreError), cls
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} missing from the tree"


def test_error_tree_shape() -> None:
    assert issubclass(errors.NodeError, errors.DirectoryError)
    assert issubclass(errors.DirectoryError, errors.ValidationError)
    assert issubclass(errors.InvalidDigest, errors.ValidationError)
    assert issubclass(errors.DirectoryGraphError, errors.ValidationError)
    assert issubclass(errors.ChecksumMismatch, errors.DataCorruption)
    assert issubclass(errors.DataCorruption, errors.StorageError)
    assert issubclass(errors.StorageUnavailable, errors.StorageError)
    assert issubclass(errors.UnknownScheme, errors.ConfigError)
    assert not issubclass(errors.NotFound, errors.StorageError)


def test_directory_error_message() -> None:
    err = errors.DirectoryError(errors.DirectoryErrorKind.INVALID_NAME, b"a\0b", "contains NUL")
    assert str(err) == r"'a\x00b': invalid name: contains NUL"
    assert str(errors.DirectoryError(errors.DirectoryErrorKind.NO_NODE_SET, None)) == "no node set"
