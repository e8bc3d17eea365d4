"""``tvix-store config show``: the effective composition as TOML, secrets redacted."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

TVIX = str(Path(sys.executable).parent / "tvix-store")


def _show(home: Path, *args: str) -> str:
    env = {"TVIX_STORE_HOME": str(home), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [TVIX, "config", "show", *args], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_flags_become_a_composition_that_loads_back(tmp_path: Path) -> None:
    s3 = "objectstore+s3://bucket/p?access_key_id=AK&secret_access_key=SK&allow_http=1"
    pg = "postgresql://tvix:hunter2@db.internal:5433/tvix?schema=prod"
    out = _show(tmp_path, "--blob-service-addr", s3, "--path-info-service-addr", pg)
    assert "SK" not in out and "hunter2" not in out
    config = tomllib.loads(out)
    assert config["blobservices"]["default"] == {
        "type": "url",
        "url": "objectstore+s3://bucket/p?access_key_id=AK&secret_access_key=REDACTED&allow_http=1",
    }
    assert config["directoryservices"]["default"] == {"type": "embedded", "path": str(tmp_path)}
    assert config["pathinfoservices"]["default"]["url"] == (
        "postgresql://tvix:REDACTED@db.internal:5433/tvix?schema=prod"
    )
    # What it prints is a composition file: shown again, it is the same.
    (tmp_path / "c.toml").write_text(out)
    again = _show(tmp_path, "--store-composition", str(tmp_path / "c.toml"))
    assert tomllib.loads(again) == config


def test_a_substituter_is_shown_behind_its_local_cache(tmp_path: Path) -> None:
    out = tomllib.loads(_show(tmp_path, "--path-info-service-addr", "nix+https://cache.example"))
    assert out["pathinfoservices"] == {
        "default": {"type": "cache", "near": "local", "far": "nix+https://cache.example"},
        "local": {"type": "embedded", "path": str(tmp_path)},
    }


def test_file_and_flags_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("")
    env = {"TVIX_STORE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [TVIX, "config", "show", "--store-composition", str(tmp_path / "c.toml"),
         "--blob-service-addr", "memory://"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "not both" in proc.stderr
