"""Package attributes resolved on first use (PEP 562), to keep imports cheap.

A command that needs one submodule should not pay for loading all of them:
start-up time counts for every CLI invocation.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes", "lazy_module"]


def lazy_attributes(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` importing ``table[name]`` (a module) for ``name``, once."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


class _LazyModule:
    """Stands in for a module until an attribute of it is used."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


def lazy_module(name: str) -> Any:
    """Module ``name``, imported when first used: for modules a command may not need.

    ``asyncio`` is the case: ~50 ms of a ``tvix-store export`` that writes
    from a NAR plan without an event loop. Use it as::

        if TYPE_CHECKING:
            import asyncio
        else:
            asyncio = lazy_module("asyncio")
    """
    return _LazyModule(name)
