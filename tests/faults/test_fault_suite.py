"""The fault suite's smallest run (bench/faults.py --smoke) as part of the test
suite: the platform as real processes on its own PostgreSQL and Redis under
POS load; Redis is wiped while tiering lags, PostgreSQL restarts, the gateway
gets SIGTERM during a burst. Every check must pass: no acknowledged order
missing, the audit clean, tiering's and engagement's projections equal to
rewards' orders (no event lost), no dead letter, everyone ready again; and no
CANCELLED or INTERNAL answer. The full run is `make faults`.

Run as its own process (`python -m bench faults`), as `make faults` does:
restarting PostgreSQL forks pg_ctl, which must not happen in a process whose
gRPC threads are busy (gRPC's fork handlers); its data lives under .data/
(the embedded server's user must reach it; pytest's tmp_path is private)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import uuid

import pytest

from bench import faults
from devtools import embedded


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_smoke_fault_run_loses_nothing() -> None:
    data_dir = embedded.DATA_DIR / f"faults-test-{uuid.uuid4().hex[:8]}"
    results = data_dir / "results.json"
    # Its own servers, and the real clock: it checks no date, and redis-server
    # cannot run under libfaketime (the suite may run under faketime '+365d').
    env = {
        k: v
        for k, v in faults.without_faketime(os.environ).items()
        if k not in ("DATABASE_URL", "REDIS_URL")
    }
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench",
            "faults",
            "--smoke",
            "--data-dir",
            str(data_dir),
            "--settle-timeout",
            "60",
            "--json",
            str(results),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=600)
        log = output.decode(errors="replace")[-6000:]
        assert results.exists(), log
        report = json.loads(results.read_text())
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    table = report["table"]
    assert len(report["faults"]) == 3, log
    for fault in report["faults"]:
        checks = fault["checks"]
        assert checks["acked_missing"] == 0, table
        assert checks["audit_ok"], table
        assert checks["tiering_mismatches"] == checks["engagement_mismatches"] == 0, table
        assert checks["lost_events"] == 0, table
        assert checks["dead_letters"] == 0, table
        assert checks["ready"], table
        assert fault["internal"] == 0, table
    assert report["burst_codes"].get("CANCELLED", 0) == 0, report["burst_codes"]
    assert report["passed"], table
    assert proc.returncode == 0, log
