"""Session-wide real servers, started only when a test asks for them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.servers import S3, Postgres, start_postgres, start_s3

if TYPE_CHECKING:
    from selenium.webdriver import Chrome


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


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chrome]:
    """A headless Chromium (selenium), shared by the session and quit at its end."""
    from tests.browser import start_chromium

    work = tmp_path_factory.mktemp("chromium")
    driver = start_chromium(work / "profile", work / "chromedriver.log")
    yield driver
    driver.quit()
