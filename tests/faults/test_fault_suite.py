"""The fault suite's smallest run (bench/faults.py --smoke) as part of the test
suite: the platform as real processes on its own PostgreSQL and Redis under
POS load; Redis is wiped while tiering lags, PostgreSQL restarts, the gateway
gets SIGTERM during a burst. Every check must pass: no acknowledged order
missing, the audit clean, tiering's and engagement's projections equal to
rewards' orders (no event lost), no dead letter, everyone ready again; and no
CANCELLED or INTERNAL answer. The full run is `make faults`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import faults


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_smoke_fault_run_loses_nothing(tmp_path: Path) -> None:
    args = faults.parse_args(["--smoke", "--data-dir", str(tmp_path), "--settle-timeout", "60"])
    report = await faults.run(args)
    by_fault = {f["fault"]: f for f in report["faults"]}
    assert len(by_fault) == 3, report["table"]
    for fault in report["faults"]:
        checks = fault["checks"]
        assert checks["acked_missing"] == 0, report["table"]
        assert checks["audit_ok"], report["table"]
        assert checks["tiering_mismatches"] == checks["engagement_mismatches"] == 0, report["table"]
        assert checks["lost_events"] == 0, report["table"]
        assert checks["dead_letters"] == 0, report["table"]
        assert checks["ready"], report["table"]
        assert fault["internal"] == 0, report["table"]
    assert report["burst_codes"].get("CANCELLED", 0) == 0, report["burst_codes"]
    assert report["passed"], report["table"]
