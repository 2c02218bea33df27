"""`python -m bench knees` end to end at tiny rates (as tests/faults runs the
fault suite's smallest run): one platform start, every path stepped, the
JSON report written. Its own process, as `make bench` runs it; against the
session's PostgreSQL and Redis (a throwaway database and namespace, removed
after), so it never touches .data/bench. No latency is asserted: the SLO is
set far above anything this machine does, and only what ran is checked."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from bench import knees

from ..harness import Infra


@pytest.mark.timeout(420)
async def test_knees_steps_every_path_and_writes_its_report(infra: Infra, tmp_path: Path) -> None:
    env = dict(os.environ, DATABASE_URL=infra.admin_url, REDIS_URL=infra.redis_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench",
        "knees",
        *("--start-rate", "4", "--factor", "2", "--max-rate", "8"),
        *("--step-seconds", "1", "--check-seconds", "1", "--warmup", "0.5"),
        *("--idle-seconds", "0.5", "--members", "4", "--slo-ms", "60000", "--min-rate", "2"),
        *("--results-dir", str(tmp_path)),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=400)
    log = output.decode(errors="replace")[-6000:]
    assert proc.returncode == 0, log
    [written] = await asyncio.to_thread(lambda: list(tmp_path.glob("knees-*.json")))
    report = json.loads(await asyncio.to_thread(written.read_text))
    assert [p["path"] for p in report["paths"]] == list(knees.PATHS), log
    assert report["config"]["rates"] == [4.0, 8.0]
    for path in report["paths"]:
        assert path["steps"], path
        # Every call of every step is answered: the scenario drives real work.
        for step in path["steps"]:
            assert step["ok"] > 0 and not step["errors_by_status"], (path["path"], step)
        if path["knee_per_s"] is not None:
            assert path["check_rate_per_s"] == knees.check_rate(path["knee_per_s"], 0.7)
            assert path["check"]["ok"] > 0 and path["check"]["cpu_ms_per_call"]["total"] > 0
        else:
            assert path["check"] is None and "/s:" in path["stopped_by"]
    assert set(report["target"]["met"]) == set(knees.PATHS)
    assert "knee/s" in log and "CPU ms per call" in log and "target p99 <= 60000 ms" in log
