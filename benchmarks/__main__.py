"""Run the benchmarks and record them in benchmarks/RESULTS.md.

Usage: ``python -m benchmarks [NAME ...] [--no-write] [benchmark options]``;
without names every registered benchmark runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from benchmarks import (
    castore,
    disk,
    gc,
    mount,
    nar_bridge,
    nar_dump,
    progress,
    service,
    shared,
    store,
)
from benchmarks.common import RESULTS, update_results


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark module."""

    name: str
    title: str
    run: Callable[[argparse.Namespace], str]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None


def _register(module: ModuleType) -> Benchmark:
    return Benchmark(module.NAME, module.TITLE, module.run, getattr(module, "add_arguments", None))


# Add new benchmark modules here. The store comparison runs before castore's:
# after castore deletes its stores, `nix-store --add` spends 7-8 s in the kernel
# (2.5-3.6 s otherwise), even after an fstrim. The disk benchmark (issue 13)
# runs last: it deletes a 4 GiB file and two 4 GiB stores.
_MODULES = [nar_dump, store, castore, nar_bridge, gc, mount, shared, service, progress, disk]
BENCHMARKS = {b.name: b for b in map(_register, _MODULES)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)}")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    for bench in BENCHMARKS.values():
        if bench.add_arguments is not None:
            bench.add_arguments(parser)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    for name in args.names or list(BENCHMARKS):
        bench = BENCHMARKS[name]
        print(f"== {bench.title}", file=sys.stderr)
        body = bench.run(args)
        print(f"## {bench.title}\n\n{body}\n")
        if not args.no_write:
            update_results(bench.title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
