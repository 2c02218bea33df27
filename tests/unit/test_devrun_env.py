"""`make run` tells the operator commands of the same checkout where its servers
are: it writes their URLs to a git-ignored env file that every process's settings
read when DATABASE_URL / REDIS_URL are unset (issue: CLIs fell back to 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools import devrun
from servicekit.settings import DEV_ENV_FILE, CommonSettings


def test_settings_read_the_file_make_run_writes_when_the_environment_is_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / "platform.env"
    monkeypatch.setattr(devrun, "DEV_ENV_FILE", env_file)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_NAMESPACE", raising=False)

    devrun.write_dev_env("postgresql://u@/db?host=/x/pg", "unix:///x/redis.sock", "demo")

    settings = CommonSettings(_env_file=env_file)  # type: ignore[call-arg]
    assert (settings.database_url, settings.redis_url, settings.redis_namespace) == (
        "postgresql://u@/db?host=/x/pg",
        "unix:///x/redis.sock",
        "demo",
    )


def test_the_environment_wins_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / "platform.env"
    monkeypatch.setattr(devrun, "DEV_ENV_FILE", env_file)
    devrun.write_dev_env("postgresql://from-file/db", "redis://from-file:1/0", "demo")
    monkeypatch.setenv("DATABASE_URL", "postgresql://from-env/db")
    monkeypatch.delenv("REDIS_URL", raising=False)

    settings = CommonSettings(_env_file=env_file)  # type: ignore[call-arg]
    assert settings.database_url == "postgresql://from-env/db"
    assert settings.redis_url == "redis://from-file:1/0"


def test_every_process_reads_the_checkouts_file_by_default() -> None:
    # The file lives under the git-ignored .data folder of this checkout.
    assert CommonSettings.model_config.get("env_file") == DEV_ENV_FILE
    assert DEV_ENV_FILE.parts[-3:] == (".data", "run", "platform.env")
