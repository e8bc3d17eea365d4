"""Store CLI: ``tvix-store import``/``export`` versus ``nix-store --add``/``--dump``.

Same tree as the NAR-dump benchmark (``benchmarks/.work/nar-dump/tree``,
built by :func:`benchmarks.nar_dump.build_tree`). Every run is a fresh
process into a fresh store (``TVIX_STORE_HOME`` / ``--store`` scratch dir),
rounds alternate, the best wall-clock time is kept. The printed store paths
must be equal, and so must the exported and dumped NARs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import MB, WORK, machine, settle
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


def _timed(
    argv: list[str], env: dict[str, str], stdout: int | None = None
) -> tuple[float, float, bytes]:
    """Wall time and CPU time (user + sys, its children included) of ``argv``, after
    :func:`~benchmarks.common.settle` (untimed)."""
    import resource
    import time

    settle()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=stdout or subprocess.PIPE, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout or b""


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


def run(args: argparse.Namespace) -> str:
    if not TREE.exists():
        build_tree()
    rounds = args.store_rounds
    scratch = Path(tempfile.mkdtemp(prefix="store-bench-", dir=WORK))
    add_times: list[tuple[float, float]] = []  # (wall, CPU)
    imp_times: list[tuple[float, float]] = []
    dump_times: list[tuple[float, float]] = []
    exp_times: list[tuple[float, float]] = []
    try:
        for i in range(rounds):
            nix_store = scratch / f"nix-{i}"
            home = scratch / f"tvix-{i}"
            *t_add, out_nix = _timed(
                ["nix-store", "--store", str(nix_store), "--add", str(TREE)], ENV
            )
            *t_imp, out_ours = _timed(
                [TVIX, "import", str(TREE)], {**ENV, "TVIX_STORE_HOME": str(home)}
            )
            if out_nix.strip() != out_ours.strip():
                raise SystemExit(f"store paths differ: {out_nix!r} vs {out_ours!r}")
            path = out_ours.decode().strip()
            with open(os.devnull, "wb") as null:
                *t_dump, _ = _timed(["nix-store", "--dump", str(TREE)], ENV, null.fileno())
                *t_exp, _ = _timed(
                    [TVIX, "export", path], {**ENV, "TVIX_STORE_HOME": str(home)}, null.fileno()
                )
            if i == 0:
                theirs = _sha_of(["nix-store", "--dump", str(TREE)], ENV)
                ours = _sha_of([TVIX, "export", path], {**ENV, "TVIX_STORE_HOME": str(home)})
                if theirs != ours:
                    raise SystemExit(f"NARs differ: {theirs} vs {ours}")
                nar_mb = theirs[0] / MB
            add_times.append((t_add[0], t_add[1]))
            imp_times.append((t_imp[0], t_imp[1]))
            dump_times.append((t_dump[0], t_dump[1]))
            exp_times.append((t_exp[0], t_exp[1]))
            print(
                f"  round {i + 1} (wall/CPU s): nix-store --add {t_add[0]:.2f}/{t_add[1]:.2f},"
                f" tvix-store import {t_imp[0]:.2f}/{t_imp[1]:.2f},"
                f" nix-store --dump {t_dump[0]:.2f}/{t_dump[1]:.2f},"
                f" tvix-store export {t_exp[0]:.2f}/{t_exp[1]:.2f}",
                file=sys.stderr,
            )
            # Stores are kept until the end: deleting on this VM's disk (mounted
            # with discard) slows down the next round's writes.
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        subprocess.run(["sync"], check=False)

    def best(times: list[tuple[float, float]]) -> tuple[float, float]:
        return min(w for w, _ in times), min(c for _, c in times)

    (a, a_cpu), (m, m_cpu) = best(add_times), best(imp_times)
    (d, d_cpu), (e, e_cpu) = best(dump_times), best(exp_times)

    def verdict(ratio: float, target: float) -> str:
        return f"≤ {target}×: {'met' if ratio <= target else 'missed'}"

    return "\n".join(
        [
            f"Machine: {machine()}.",
            "",
            f"Input: the NAR-dump tree ({nar_mb:.0f} MB of NAR). Fresh process and fresh store per"
            f" run, best of {rounds} alternating rounds, page cache warm, `sync` before each"
            " command, and `fstrim` (the VM's disk owes discards for deleted trees, which"
            " slowed `nix-store --add` down up to 4×; run after the castore benchmark had"
            " deleted its stores, it still took 7-8 s, so this one runs first)."
            " Store paths and NARs checked identical."
            " CPU = user + sys of the command"
            " and its children (our forked workers), best run: steadier than wall time here.",
            "",
            "| operation | nix-store s | tvix-store s | tvix/nix | nix CPU s | tvix CPU s"
            " | target (wall) |",
            "|---|---:|---:|---:|---:|---:|---|",
            f"| import (`--add` vs `import`) | {a:.2f} | {m:.2f} | **{m / a:.2f}×** |"
            f" {a_cpu:.2f} | {m_cpu:.2f} | {verdict(m / a, 0.7)} |",
            f"| export (`--dump` of the tree vs `export`) | {d:.2f} | {e:.2f} |"
            f" **{e / d:.2f}×** | {d_cpu:.2f} | {e_cpu:.2f} | {verdict(e / d, 1.0)} |",
        ]
    )
