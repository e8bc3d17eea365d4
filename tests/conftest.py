"""Session-wide real servers, started only when a test asks for them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import S3, Postgres, start_postgres, start_s3


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL 15 on loopback (each test takes a schema of its own)."""
    server = start_postgres()
    yield server
    server.close()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    """moto's S3 server on loopback with a bucket (each test takes a prefix of its own)."""
    server = start_s3()
    yield server
    server.close()
