"""A real headless Chromium (Debian ``chromium`` + ``chromium-driver``) driven by Selenium.

Nothing is downloaded: the driver and browser are the Debian binaries, Selenium
Manager is told to stay offline, and Chromium's own background traffic
(component updates, sync, QUIC probes) is switched off. Each session gets a
fresh profile directory.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1280, 900)
SCREENSHOTS_ENV = "TVIX_WEB_SCREENSHOTS"
"""A directory: pages the web tests visit are saved there as PNGs (unset: none are)."""


def start_chromium(profile: Path, log: Path) -> webdriver.Chrome:
    """A headless Chromium on a fresh profile; ``quit()`` it at the end."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(binary), f"{binary} missing: run `make system-deps`"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(log))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver
        driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    return driver


def screenshot(driver: webdriver.Chrome, name: str) -> None:
    """Save the whole current page as ``$TVIX_WEB_SCREENSHOTS/web-NAME.png`` (if set)."""
    where = os.environ.get(SCREENSHOTS_ENV)
    if not where:
        return
    Path(where).mkdir(parents=True, exist_ok=True)
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": WINDOW[0], "height": min(size["height"], 1600), "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    (Path(where) / f"web-{name}.png").write_bytes(base64.b64decode(shot["data"]))
