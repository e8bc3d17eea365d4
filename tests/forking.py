"""Seeing from outside that a process forked: its children, as /proc lists them.

Tests force the forked or the one-process path (``fork=True``/``False``,
``$TVIX_STORE_FORK``) and check it through these, not through private state.
A child that has exited stays listed (a zombie) until its parent waits for it.
"""

from __future__ import annotations

import os
import time

FORK_ENV = "TVIX_STORE_FORK"


def child_pids(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (running or exited and not yet waited for)."""
    found: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid:
            found.add(int(name))
    return found


def wait_for_child(pid: int, *, ignore: set[int] | frozenset[int] = frozenset()) -> int:
    """A child of ``pid`` not in ``ignore``, waiting for one to appear (bounded: 60 s).

    Callers keep the child alive meanwhile (e.g. by not reading the pipe it
    writes to), so the wait is for an event, not a race against its exit.
    """
    deadline = time.monotonic() + 60
    while True:
        new = child_pids(pid) - ignore
        if new:
            return min(new)
        assert time.monotonic() < deadline, f"process {pid} forked no child within 60 s"
        time.sleep(0.01)
