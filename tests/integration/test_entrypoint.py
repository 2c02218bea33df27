"""A service as a real process: serves, then drains and exits cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from devtools.supervisor import free_port

from ..harness import Infra, wait_until_serving


async def test_sigterm_drains_and_exits_zero(infra: Infra) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": infra.database_url,
        "REDIS_URL": infra.redis_url,
        "REDIS_NAMESPACE": infra.namespace,
        "GRPC_PORT": str(port),
        "SHUTDOWN_GRACE_SECONDS": "2",
        "SHUTDOWN_DELAY_SECONDS": "0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.member",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await wait_until_serving(f"127.0.0.1:{port}", "loyalty.member.v1.MemberService")
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = output.decode()
    assert proc.returncode == 0, log
    assert "draining" in log and "member stopped" in log, log
    # JSON log lines: every line parses and names the service.
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert lines and all(line["service"] == "member" for line in lines)


async def test_events_status_prints_the_producer_and_its_consumers(infra: Infra) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": infra.database_url,
        "REDIS_URL": infra.redis_url,
        "REDIS_NAMESPACE": infra.namespace,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.tiering",
        "events",
        "status",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    text = output.decode()
    assert proc.returncode == 0, text
    assert text.startswith("producer tiering: last published seq"), text
    assert "consumer" in text and "lag" in text and "gaps found" in text, text
