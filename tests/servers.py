"""Real backend servers on loopback for the test suite: PostgreSQL 15 and moto's S3.

Both start in well under two seconds and are stopped by whoever started
them (the session fixtures in ``tests/conftest.py``, or a benchmark).
PostgreSQL runs as the ``postgres`` user (``initdb`` refuses root) in a
throwaway data directory; moto runs in a thread of this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
S3_KEYS = "access_key_id=test&secret_access_key=test&region=us-east-1&allow_http=1"


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Postgres:
    """A running throwaway PostgreSQL server."""

    root: Path
    port: int

    @property
    def url(self) -> str:
        """The URL of its ``tvix`` database, as user ``test``."""
        return f"postgresql://test@127.0.0.1:{self.port}/tvix"

    def fresh_url(self) -> str:
        """A URL naming a schema of its own (a fresh, empty store each time)."""
        return f"{self.url}?schema=t{uuid.uuid4().hex[:12]}"

    def pg_ctl(self, *args: str) -> None:
        """Run ``pg_ctl`` on this server's data directory (as ``postgres``)."""
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), *args])

    def start(self) -> None:
        """Start (or restart after :meth:`stop`) the server and wait until it accepts."""
        opts = f"-k {self.root} -p {self.port} -h 127.0.0.1 -c fsync=off -c max_connections=200"
        self.pg_ctl("-o", opts, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        """Stop the server at once (connections are cut)."""
        self.pg_ctl("-m", "immediate", "-w", "stop")

    def close(self) -> None:
        """Stop it if running and delete its data."""
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _as_postgres(argv: list[str]) -> None:
    prefix = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    if os.geteuid() != 0:
        prefix = []
    proc = subprocess.run(prefix + argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed: {proc.stdout}{proc.stderr}")


def start_postgres() -> Postgres:
    """initdb + start a PostgreSQL 15 on a free loopback port, with a ``tvix`` database."""
    root = Path(tempfile.mkdtemp(prefix="tvix-pg-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    _as_postgres(
        [str(PG_BIN / "initdb"), "-D", str(root / "data"), "-U", "test", "--auth=trust", "-N"]
    )
    server = Postgres(root, free_port())
    try:
        server.start()
        import psycopg

        with psycopg.connect(f"postgresql://test@127.0.0.1:{server.port}/postgres") as conn:
            conn.autocommit = True
            conn.execute("CREATE DATABASE tvix")
    except BaseException:
        server.close()
        raise
    return server


@dataclass
class S3:
    """A running moto S3 server and its bucket."""

    server: object
    endpoint: str
    bucket: str = "tvix"

    def fresh_url(self) -> str:
        """An ``objectstore+s3://`` URL with a prefix of its own (an empty store each time)."""
        prefix = uuid.uuid4().hex[:12]
        return f"objectstore+s3://{self.bucket}/{prefix}?endpoint={self.endpoint}&{S3_KEYS}"

    def close(self) -> None:
        """Stop the server."""
        self.server.stop()  # type: ignore[attr-defined]


def start_s3() -> S3:
    """moto's S3 server on a free loopback port, with one bucket."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[name]  # (never a real account or a metadata endpoint)
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/tvix", method="PUT")).close()
    return S3(server, endpoint)
