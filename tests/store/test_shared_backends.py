"""S3 and PostgreSQL backends: bad URLs, missing credentials, migrations, outages.

Real servers throughout: moto's S3 and a PostgreSQL 15 (the session ones,
or a private one for the tests that stop it).
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import aiohttp
import psycopg
import pytest

from nix_compat.nar import NarWriter
from nix_compat.store_path import StorePath
from tests.servers import S3, S3_KEYS, Postgres, free_port, start_postgres
from tvix_castore.blobservice import MemoryBlobService
from tvix_castore.directoryservice import MemoryDirectoryService
from tvix_castore.errors import ConfigError, StorageError, StorageUnavailable
from tvix_castore.nodes import Directory, FileNode
from tvix_castore.postgres import Database
from tvix_castore.registry import blob_service_from_url, directory_service_from_url
from tvix_store.config import path_info_service_from_url
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.grpc import GrpcPathInfoService
from tvix_store.pathinfoservice.postgres import STORE_MIGRATIONS, PostgresPathInfoService

TVIX = str(Path(sys.executable).parent / "tvix-store")


def _info(i: int) -> PathInfo:
    import hashlib

    sp = StorePath(i.to_bytes(20, "little"), f"p{i}")
    out = io.BytesIO()
    w = NarWriter(out)
    w.file(b"hello")
    w.close()
    nar = out.getvalue()
    from tvix_castore.digests import B3Digest

    node = FileNode(sp.basename.encode(), B3Digest.of(b"hello"), 5)
    return PathInfo(sp, node, len(nar), hashlib.sha256(nar).digest())


# -- S3 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("objectstore+s3://bucket/p?region=us-east-1", "no credentials"),
        ("objectstore+gs://bucket/p", "no credentials"),
        ("objectstore+azure://container/p?account_name=a", "no credentials"),
        ("objectstore+s3:///p?skip_signature=1", "needs a bucket name"),
        ("objectstore+s3://user@bucket/p?skip_signature=1", "the bucket name only"),
        ("objectstore+s3://bucket/p?bogus=1", "unknown parameter(s) bogus"),
        ("objectstore+s3://bucket/p?access_key_id=x", "both access_key_id and secret_access_key"),
        ("objectstore+s3://bucket/p?skip_signature=1&avg_chunk_size=1", "out of range"),
        ("objectstore+s3://bucket/p?skip_signature=1&allow_http=yes", "must be 0 or 1"),
        ("objectstore+s3://bucket/a//b?skip_signature=1", "empty segments"),
    ],
)
def test_bad_cloud_urls_are_clear_errors(
    url: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "AWS_ACCESS_KEY_ID",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "AZURE_STORAGE_ACCOUNT_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="'objectstore") as info:
        blob_service_from_url(url)
    assert message in str(info.value)


def test_cloud_credentials_from_the_environment(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard AWS variables are used (and then no credentials are needed in the URL)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    url = f"objectstore+s3://{s3.bucket}/env?endpoint={s3.endpoint}&allow_http=1"
    svc = blob_service_from_url(url)
    digest = asyncio.run(svc.put(b"from env credentials"))
    assert asyncio.run(svc.has(digest))


async def test_cloud_directories_are_closures_by_root(s3: S3) -> None:
    """``objectstore+s3://`` directories: B §7.3 (tests/castore/test_directory_objectstore.py)."""
    from tvix_castore.directoryservice.objectstore import closure_key

    async with directory_service_from_url(s3.fresh_url()) as dirs:
        await dirs.put(Directory())
        assert await dirs.get(Directory().digest) == Directory()
        assert closure_key(Directory().digest).startswith("dirs/b3/af13/af1349b9")


async def test_s3_unreachable_is_unavailable() -> None:
    """No server at the endpoint: the retries end in StorageUnavailable, not a hang."""
    url = (
        f"objectstore+s3://b/p?endpoint=http://127.0.0.1:{free_port()}&{S3_KEYS}"
        "&max_retries=1&retry_timeout=2"
    )
    svc = blob_service_from_url(url)
    with pytest.raises(StorageUnavailable, match="objectstore\\+s3://b/p"):
        await svc.put(b"x" * 100)


async def test_s3_small_files_cost_one_request_each(s3: S3, tmp_path: Path) -> None:
    """A new small file is one PUT (no HEAD first); a multi-chunk one, a PUT per chunk + index."""
    from tvix_castore.blobservice.objectstore import ObjectStoreBlobService
    from tvix_castore.cloudstore import CloudObjectStore

    svc = blob_service_from_url(s3.fresh_url() + "&avg_chunk_size=65536")
    assert isinstance(svc, ObjectStoreBlobService)
    assert isinstance(svc.store, CloudObjectStore)
    files = []
    for i in range(20):
        (tmp_path / f"f{i}").write_bytes(f"small file {i}\n".encode())
        files.append((str(tmp_path / f"f{i}"), len(f"small file {i}\n")))
    before = svc.store.request_counts()
    digests = await svc.ingest_files(files)
    after = svc.store.request_counts()
    assert all(not isinstance(d, Exception) for d in digests)
    assert {k: after.get(k, 0) - before.get(k, 0) for k in after} == {"put": 20}
    for (path, _), digest in zip(files, digests, strict=True):
        assert not isinstance(digest, Exception)
        assert await svc.read_all(digest) == Path(path).read_bytes()


# -- PostgreSQL -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://test@127.0.0.1:{port}/tvix?schema=a-b", "schema must be letters"),
        ("postgresql://test@127.0.0.1:{port}/tvix?pool_max=0", "pool_max must be an integer"),
        ("postgresql://test@127.0.0.1:{port}/nosuchdb", "nosuchdb"),
        ("postgresql://test@127.0.0.1:{free}/tvix", "cannot use PostgreSQL"),
        ("postgresql://test@127.0.0.1:{port}/tvix?sslmode=bogus", "sslmode"),
    ],
)
def test_bad_postgres_urls_are_clear_errors(url: str, message: str, postgres: Postgres) -> None:
    url = url.format(port=postgres.port, free=free_port())
    with pytest.raises(ConfigError, match=message):
        directory_service_from_url(url)


def test_postgres_without_privileges_says_so(postgres: Postgres) -> None:
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS nobody_here")
        conn.execute("CREATE ROLE nobody_here LOGIN")
    url = postgres.fresh_url().replace("//test@", "//nobody_here@")
    with pytest.raises(StorageError, match="permission denied"):
        path_info_service_from_url(url, MemoryBlobService(), MemoryDirectoryService())


def test_migrations_run_once_when_frontends_start_together(postgres: Postgres) -> None:
    url = postgres.fresh_url()
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def frontend() -> None:
        db = Database(url)  # (each its own pool, as separate processes have)
        try:
            start.wait()
            db.migrate("store", STORE_MIGRATIONS)
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=frontend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    db = Database(url)
    try:
        assert db.versions() == {"store": len(STORE_MIGRATIONS)}
        rows = db.run(
            "counting",
            lambda c: c.execute("SELECT count(*) FROM tvix_schema").fetchone(),
        )
        assert rows == (len(STORE_MIGRATIONS),)
    finally:
        db.close()


def test_a_newer_schema_is_refused(postgres: Postgres) -> None:
    url = postgres.fresh_url()
    db = Database(url)
    try:
        db.migrate("store", STORE_MIGRATIONS)
        db.run(
            "faking a newer release",
            lambda c: c.execute(
                "INSERT INTO tvix_schema (component, version) VALUES ('store', 99)"
            ),
        )
    finally:
        db.close()
    with pytest.raises(StorageError, match="version 99, newer than this program knows"):
        PostgresPathInfoService(url)


def test_migrate_command(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.fresh_url()
    cmd = [TVIX, "migrate", "--directory-service-addr", url, "--path-info-service-addr", url]
    env = {"TVIX_STORE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert ": castore: version 0 -> 2" in out.stdout, out.stdout
    assert ": store: version 0 -> 3" in out.stdout, out.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    assert ": castore: version 2 (current)" in again.stdout


async def test_a_store_of_an_older_release_is_migrated_with_its_rows(
    postgres: Postgres, tmp_path: Path
) -> None:
    from tvix_castore.postgres import Database
    from tvix_store.pathinfoservice.postgres import STORE_MIGRATIONS, PostgresPathInfoService

    url = postgres.fresh_url()
    old = Database(url)
    try:  # (the tables as release 2 of the schema left them, with a path in them)
        old.migrate("store", STORE_MIGRATIONS[:2])
        info = _info(7)
        old.run(
            "writing a path as an older release",
            lambda c: c.execute(
                "INSERT INTO pathinfos (digest, data, root_digest, nar_sha256, updated)"
                " VALUES (%s, %s, NULL, %s, 0)",
                (info.digest, info.encode(), info.nar_sha256),
            ),
        )
    finally:
        old.close()
    cmd = [TVIX, "migrate", "--path-info-service-addr", url]
    env = {"TVIX_STORE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0 and ": store: version 2 -> 3" in out.stdout, out
    service = PostgresPathInfoService(url)
    try:
        assert await service.get(info.digest) == info
    finally:
        await service.aclose()


async def test_a_frontend_answers_503_while_postgres_is_away_and_recovers(
    tmp_path: Path,
) -> None:
    """Stop the database under a running daemon: 503 / UNAVAILABLE, then service again."""
    from tests.nar_bridge.conftest import Bridges

    pg = start_postgres()
    bridges = Bridges(tmp_path / "b")
    (tmp_path / "b").mkdir()
    try:
        url = pg.fresh_url()
        flags = ("--directory-service-addr", url, "--path-info-service-addr", url)
        daemon = bridges.start_daemon(None, "--blob-service-addr", "memory://", *flags)
        info = _info(7)
        client = GrpcPathInfoService.from_url(f"grpc+http://{daemon.grpc_addr}")
        narinfo = f"{daemon.url}/{info.store_path.basename[:32]}.narinfo"
        async with aiohttp.ClientSession() as session:
            async with session.get(narinfo) as resp:
                assert resp.status == 404
            await asyncio.to_thread(pg.stop)
            async with session.get(narinfo) as resp:
                assert resp.status == 503, await resp.text()
                assert "unavailable" in (await resp.text()).lower()
            with pytest.raises(StorageUnavailable, match="the database is unavailable"):
                await client.get(info.digest)  # (the server's own UNAVAILABLE, not a lost link)
            await asyncio.to_thread(pg.start)
            async with session.get(narinfo) as resp:
                assert resp.status == 404, await resp.text()
        assert await client.get(info.digest) is None
        await client.aclose()
        assert daemon.alive()
    finally:
        bridges.stop_all()
        pg.close()


async def test_a_frontend_answers_503_while_s3_is_away_and_recovers(
    tmp_path: Path, postgres: Postgres
) -> None:
    """Stop the object store under a running bridge: 503 for reads and uploads, then service."""
    from moto.server import ThreadedMotoServer

    from tests.nar_bridge.conftest import Bridges

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    bridges = Bridges(tmp_path / "b")
    (tmp_path / "b").mkdir()
    try:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/away", method="PUT")).close()
        blobs = (
            f"objectstore+s3://away/p?endpoint={endpoint}&{S3_KEYS}&max_retries=1&retry_timeout=2"
        )
        meta = postgres.fresh_url()
        flags = ("--blob-service-addr", blobs, "--directory-service-addr", meta,
                 "--path-info-service-addr", meta)  # fmt: skip
        tree = tmp_path / "tree"
        tree.write_bytes(b"in S3 " * 50_000)  # (several chunks)
        env = {"TVIX_STORE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
        imported = subprocess.run(
            [TVIX, "import", *flags, str(tree)], capture_output=True, text=True, env=env,
            check=False,
        )  # fmt: skip
        assert imported.returncode == 0, imported.stderr
        hash_part = StorePath.from_absolute_path(imported.stdout.strip()).basename[:32]
        bridge = bridges.start(None, *flags)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{bridge.url}/{hash_part}.narinfo") as resp:
                assert resp.status == 200
                nar_url = next(
                    line.split(": ", 1)[1]
                    for line in (await resp.text()).splitlines()
                    if line.startswith("URL: ")
                )
            async with session.get(f"{bridge.url}/{nar_url}") as resp:
                assert resp.status == 200
                nar = await resp.read()
            moto.stop()
            async with session.get(f"{bridge.url}/{nar_url}") as resp:
                assert resp.status == 503, await resp.text()
            async with session.put(f"{bridge.url}/nar/{'1' * 52}.nar", data=nar) as resp:
                assert resp.status == 503, await resp.text()
            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            moto.start()  # (moto's buckets live in this process: the objects are back)
            async with session.get(f"{bridge.url}/{nar_url}") as resp:
                assert resp.status == 200 and await resp.read() == nar
        assert bridge.alive()
    finally:
        bridges.stop_all()
        moto.stop()


class _Flaky:
    """An HTTP proxy in front of moto that answers 503 to every ``fail_every``-th request."""

    def __init__(self, upstream: str, fail_every: int) -> None:
        import http.client
        import http.server
        import urllib.parse

        target = urllib.parse.urlsplit(upstream)
        outer = self
        self.requests = 0
        self.failed = 0
        self.multipart = 0
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    outer.requests += 1
                    fail = outer.requests % fail_every == 0
                    outer.failed += fail
                    outer.multipart += "uploadId=" in self.path and self.command == "PUT"
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection(target.netloc, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_s3_transient_errors_are_retried_and_big_objects_go_in_parts(s3: S3) -> None:
    """Every third request fails with 503: uploads and reads still succeed, exactly."""
    import random

    flaky = _Flaky(s3.endpoint, fail_every=3)
    try:
        url = f"objectstore+s3://{s3.bucket}/flaky?endpoint={flaky.url}&{S3_KEYS}&max_retries=5"
        svc = blob_service_from_url(url + "&avg_chunk_size=2097152")
        from tvix_castore.blobservice.objectstore import ObjectStoreBlobService

        assert isinstance(svc, ObjectStoreBlobService)
        small = [random.Random(i).randbytes(3000) for i in range(10)]
        digests = [await svc.put(data) for data in small]
        for digest, data in zip(digests, small, strict=True):
            assert await svc.read_all(digest) == data
        # A 9 MiB object (over the 8 MiB part size) is put in parts, and appears whole.
        big = random.Random(99).randbytes(9 << 20)
        await asyncio.to_thread(svc.store.put_sync, "big/object", big)
        assert flaky.multipart >= 2
        assert await asyncio.to_thread(svc.store.get_sync, "big/object") == big
        assert flaky.failed > 5
    finally:
        flaky.close()


def test_a_composition_file_names_s3_and_postgres(
    s3: S3, postgres: Postgres, tmp_path: Path
) -> None:
    """tvix's ``type = "objectstore"`` form with ``object_store_options``, and URL entries."""
    prefix = uuid.uuid4().hex[:12]
    meta = postgres.fresh_url()
    (tmp_path / "store.toml").write_text(
        f"""
[blobservices.default]
type = "objectstore"
object_store_url = "s3://{s3.bucket}/{prefix}"
object_store_options = {{ endpoint = "{s3.endpoint}", region = "us-east-1", allow_http = true, access_key_id = "test", secret_access_key = "test" }}

[directoryservices.default]
type = "url"
url = "{meta}"

[pathinfoservices.default]
type = "url"
url = "{meta}"
"""
    )
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_bytes(b"through a composition file\n")
    env = {"TVIX_STORE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    comp = ["--store-composition", str(tmp_path / "store.toml")]
    out = subprocess.run(
        [TVIX, "import", *comp, str(tmp_path / "tree")],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    path = out.stdout.split()[-1]
    # The same store through plain URLs (another process): the file is there.
    blob_url = f"objectstore+s3://{s3.bucket}/{prefix}?endpoint={s3.endpoint}&{S3_KEYS}"
    urls = ["--blob-service-addr", blob_url]
    urls += ["--directory-service-addr", meta, "--path-info-service-addr", meta]
    cat = subprocess.run(
        [TVIX, "cat", *urls, f"{path}/f"], capture_output=True, env=env, check=True
    )
    assert cat.stdout == b"through a composition file\n"
    assert not (tmp_path / "home").exists()
    shown = subprocess.run(
        [TVIX, "config", "show", *comp], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert 'secret_access_key = "REDACTED"' in shown and '"test"' not in shown.split("secret")[1]


# -- garbage collection: leases and the sweep ---------------------------------------------------
def test_gc_defers_to_a_live_lease_and_writers_wait_for_a_sweep(s3: S3, postgres: Postgres) -> None:
    from tvix_store.pathinfoservice.postgres import open_database
    from tvix_store.sharedgc import _GC_LOCK, PgLease, collect_shared

    url = postgres.fresh_url()
    blobs = blob_service_from_url(s3.fresh_url())
    digest = asyncio.run(blobs.put(b"garbage nobody refers to"))
    from tvix_castore.blobservice.objectstore import ObjectStoreBlobService

    assert isinstance(blobs, ObjectStoreBlobService)
    blobs.store.put_sync("chunks/notes.txt", b"not ours: never deleted")
    db = open_database(url)
    try:
        lease = PgLease(db, ttl=600)
        lease.touch()  # a writer at work
        report = collect_shared(blobs, url, grace=0)
        assert report.deferred and report.objects == 1
        assert asyncio.run(blobs.has(digest))  # deferred: nothing swept
        lease.release()
        # Another collector holds the lock: this one says so instead of racing it.
        with psycopg.connect(db.conninfo, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (_GC_LOCK,))
            with pytest.raises(StorageUnavailable, match="another garbage collection"):
                collect_shared(blobs, url, grace=0)
        report = collect_shared(blobs, url, grace=0)
        assert not report.deferred and report.objects == 1
        assert not asyncio.run(blobs.has(digest))
        assert blobs.store.get_sync("chunks/notes.txt") == b"not ours: never deleted"

        # A writer that wants a lease while a sweep is recorded waits for it to end.
        db.run(
            "recording a sweep",
            lambda c: c.execute(
                "INSERT INTO gc_sweeps (id, holder, expires) VALUES ('s', 'test', now() + '1h')"
            ),
        )
        ended = threading.Event()

        def end_sweep() -> None:
            db.run("ending it", lambda c: c.execute("DELETE FROM gc_sweeps WHERE id = 's'"))
            ended.set()

        timer = threading.Timer(0.5, end_sweep)
        timer.start()
        PgLease(db, ttl=600).touch()
        assert ended.is_set()  # (touch returned only once the sweep had ended)
        timer.join()
    finally:
        db.release()
