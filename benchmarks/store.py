"""Store CLI: ``tvix-store import``/``export`` versus ``nix-store --add``/``--dump``.

Inputs: the NAR-dump benchmark's tree (``benchmarks/.work/nar-dump/tree``,
built by :func:`benchmarks.nar_dump.build_tree`; issue 4) and the stdlib tree
of the disk benchmark (a snapshot of the interpreter's whole stdlib directory,
:func:`benchmarks.disk.stdlib_tree`; issue 13). Every run is a fresh process
into a fresh store (``TVIX_STORE_HOME`` / ``--store`` scratch dir), rounds
alternate, the best wall-clock time is kept. The printed store paths must be
equal, and so must the exported and dumped NARs. ``b3sum`` over every file of
the tree is the hashing floor the import is also compared with.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import disk
from benchmarks.castore import b3sum_argv
from benchmarks.common import MB, WORK, machine, timed_cpu
from benchmarks.nar_dump import TREE, build_tree

NAME = "store"
TITLE = "tvix-store import/export vs nix-store (issue 4)"

BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store")
ENV = {**os.environ, "NIX_CONFIG": "experimental-features = nix-command"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store-rounds", type=int, default=3, help="rounds for the store benchmark"
    )


def _sha_of(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    if p.returncode:
        raise SystemExit(f"{argv[0]} failed")
    return size, h.hexdigest()


Times = list[tuple[float, float]]  # (wall, CPU) per round


@dataclass
class Input:
    """One tree and what was measured on it."""

    label: str
    tree: Path
    build: Callable[[], object]
    add: Times = field(default_factory=list)
    imp: Times = field(default_factory=list)
    dump: Times = field(default_factory=list)
    exp: Times = field(default_factory=list)
    b3sum: Times = field(default_factory=list)
    nar_mb: float = 0.0


def _round(inp: Input, scratch: Path, i: int) -> None:
    nix_store = scratch / f"nix-{inp.tree.name}-{i}"
    home = scratch / f"tvix-{inp.tree.name}-{i}"
    tree = str(inp.tree)
    *t_add, out_nix = timed_cpu(["nix-store", "--store", str(nix_store), "--add", tree], ENV)
    *t_imp, out_ours = timed_cpu([TVIX, "import", tree], {**ENV, "TVIX_STORE_HOME": str(home)})
    if out_nix.strip() != out_ours.strip():
        raise SystemExit(f"store paths differ: {out_nix!r} vs {out_ours!r}")
    path = out_ours.decode().strip()
    with open(os.devnull, "wb") as null:
        *t_dump, _ = timed_cpu(["nix-store", "--dump", tree], ENV, null.fileno())
        *t_exp, _ = timed_cpu(
            [TVIX, "export", path], {**ENV, "TVIX_STORE_HOME": str(home)}, null.fileno()
        )
    *t_b3, _ = timed_cpu(b3sum_argv(inp.tree), ENV)
    if i == 0:
        theirs = _sha_of(["nix-store", "--dump", tree], ENV)
        ours = _sha_of([TVIX, "export", path], {**ENV, "TVIX_STORE_HOME": str(home)})
        if theirs != ours:
            raise SystemExit(f"NARs differ: {theirs} vs {ours}")
        inp.nar_mb = theirs[0] / MB
    inp.add.append((t_add[0], t_add[1]))
    inp.imp.append((t_imp[0], t_imp[1]))
    inp.dump.append((t_dump[0], t_dump[1]))
    inp.exp.append((t_exp[0], t_exp[1]))
    inp.b3sum.append((t_b3[0], t_b3[1]))
    print(
        f"  {inp.tree.name} round {i + 1} (wall/CPU s): nix-store --add"
        f" {t_add[0]:.2f}/{t_add[1]:.2f}, tvix-store import {t_imp[0]:.2f}/{t_imp[1]:.2f},"
        f" nix-store --dump {t_dump[0]:.2f}/{t_dump[1]:.2f},"
        f" tvix-store export {t_exp[0]:.2f}/{t_exp[1]:.2f}, b3sum {t_b3[0]:.2f}/{t_b3[1]:.2f}",
        file=sys.stderr,
    )


def _best(times: Times) -> tuple[float, float]:
    return min(w for w, _ in times), min(c for _, c in times)


def _verdict(ratio: float, target: float) -> str:
    return f"≤ {target}×: {'met' if ratio <= target else 'missed'}"


def run(args: argparse.Namespace) -> str:
    rounds = args.store_rounds
    inputs = [
        Input("NAR-dump tree (issue 4)", TREE, build_tree),
        Input("stdlib tree (issue 13)", disk.STDLIB, disk.stdlib_tree),
    ]
    for inp in inputs:
        inp.build()
    load = os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="store-bench-", dir=WORK))
    try:
        for i in range(rounds):
            for inp in inputs:
                _round(inp, scratch, i)
            # Stores are kept until the end: deleting on this VM's disk (mounted
            # with discard) slows down the next round's writes.
    finally:
        for p in scratch.glob("nix-*"):  # Nix makes its store read-only
            subprocess.run(["chmod", "-R", "u+w", str(p)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
        subprocess.run(["sync"], check=False)

    rows = []
    floor_rows = []
    for inp in inputs:
        (a, a_cpu), (m, m_cpu) = _best(inp.add), _best(inp.imp)
        (d, d_cpu), (e, e_cpu) = _best(inp.dump), _best(inp.exp)
        b, b_cpu = _best(inp.b3sum)
        # The import target: 0.7× for issue 4's tree, 1.0× (issue 13) for the stdlib tree.
        target = 0.7 if inp.tree == TREE else 1.0
        rows += [
            f"| {inp.label}, {inp.nar_mb:,.0f} MB NAR | import (`--add` vs `import`) |"
            f" {a:.2f} | {m:.2f} | **{m / a:.2f}×** | {a_cpu:.2f} | {m_cpu:.2f} |"
            f" {_verdict(m / a, target)} |",
            f"| {inp.label} | export (`--dump` of the tree vs `export`) | {d:.2f} | {e:.2f} |"
            f" **{e / d:.2f}×** | {d_cpu:.2f} | {e_cpu:.2f} | {_verdict(e / d, 1.0)} |",
        ]
        floor_rows.append(
            f"| {inp.label} | {b:.2f} | {b_cpu:.2f} | **{m / b:.2f}×** | {m_cpu / b_cpu:.2f}× |"
            f" {a / b:.2f}× |"
        )

    return "\n".join(
        [
            f"Machine: {machine()}; load average {load:.2f} when the run started"
            " (other work shares the 2 CPUs).",
            "",
            "Inputs: the NAR-dump tree and the disk benchmark's stdlib tree (a hard-link"
            f" snapshot of `{disk.STDLIB_SRC}`, site-packages included). Fresh process and"
            f" fresh store per run, best of {rounds} alternating rounds, page cache warm, `sync`"
            " before each command, and `fstrim` (the VM's disk owes discards for deleted"
            " trees, which slowed `nix-store --add` down up to 4×; run after the castore"
            " benchmark had deleted its stores, it still took 7-8 s, so this one runs first)."
            " Store paths and NARs checked identical."
            " CPU = user + sys of the command"
            " and its children (our forked workers), best run: steadier than wall time here.",
            "",
            "| input | operation | nix-store s | tvix-store s | tvix/nix | nix CPU s | tvix CPU s"
            " | target (wall) |",
            "|---|---|---:|---:|---:|---:|---:|---|",
            *rows,
            "",
            "Import against the hashing floor: `find TREE -type f -print0 | xargs -0 b3sum`"
            " (every file read and hashed, nothing written), same rounds, best of"
            f" {rounds}:",
            "",
            "| input | b3sum s | b3sum CPU s | import ÷ b3sum (wall) | import ÷ b3sum (CPU)"
            " | `nix-store --add` ÷ b3sum |",
            "|---|---:|---:|---:|---:|---:|",
            *floor_rows,
        ]
    )
