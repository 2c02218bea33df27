"""The benchmark's open-loop generator and the dev supervisor's process handling."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from bench.cpu import CpuMeter, cpu_table, marginal, process_cpu_seconds
from bench.loadgen import DROPPED, open_loop, percentile
from bench.profile import wanted
from bench.scaleout import replicated_children
from devtools import supervisor


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 99.9) == 100.0
    assert percentile([], 50) is None


async def test_open_loop_counts_queueing_behind_a_stall() -> None:
    # The "server" stalls for the first 0.3 s. A closed loop would record one
    # slow call; an open loop records every arrival that waited behind it.
    unblocked = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, unblocked.set)

    async def call(i: int) -> None:
        await unblocked.wait()

    result = await open_loop("stall", call, rate=100, duration=1.0)
    assert result.scheduled == 100 and result.ok == 100
    slow = [lat for lat in result.latencies if lat > 0.1]
    assert len(slow) >= 15  # arrivals during the first ~0.2 s all waited
    assert max(result.latencies) >= 0.28


async def test_open_loop_keeps_the_schedule_and_counts_errors_by_status() -> None:
    class Refused(Exception):
        pass

    async def call(i: int) -> None:
        if i % 4 == 0:
            raise Refused()
        if i % 4 == 1:
            await asyncio.sleep(10)  # beyond the deadline

    result = await open_loop("mixed", call, rate=200, duration=0.5, timeout=0.2)
    assert result.scheduled == 100
    assert result.statuses["Refused"] == 25
    assert result.statuses["CLIENT_TIMEOUT"] == 25
    assert result.ok == 50
    # Arrivals do not wait for answers: the run ends near its duration plus one deadline.
    assert result.elapsed_s < 0.5 + 0.2 + 0.5


async def test_open_loop_drops_beyond_max_in_flight() -> None:
    gate = asyncio.Event()

    async def call(i: int) -> None:
        await gate.wait()

    asyncio.get_running_loop().call_later(0.4, gate.set)
    result = await open_loop("full", call, rate=100, duration=0.3, max_in_flight=10)
    assert result.statuses[DROPPED] == 20
    assert result.ok == 10


async def test_platform_waits_for_health_and_stops_children() -> None:
    port = supervisor.free_port()
    child = supervisor.Child(
        "echo",
        [sys.executable, "-m", "bench.echo_server", "--port", str(port)],
        supervisor.child_env({}),
        grpc_target=f"127.0.0.1:{port}",
    )
    platform = supervisor.Platform([child])
    await platform.spawn()
    try:
        await platform.wait_ready(20)
        assert await supervisor.grpc_serving(f"127.0.0.1:{port}")
    finally:
        await platform.stop(grace=5)
    assert child.returncode == 0  # SIGTERM led to a clean exit


async def test_platform_reports_a_child_that_dies_during_startup() -> None:
    child = supervisor.Child(
        "broken",
        [sys.executable, "-c", "raise SystemExit(3)"],
        supervisor.child_env({}),
        grpc_target=f"127.0.0.1:{supervisor.free_port()}",
    )
    platform = supervisor.Platform([child])
    await platform.spawn()
    with pytest.raises(supervisor.DevrunError, match="broken exited with code 3"):
        await platform.wait_ready(20)
    await platform.stop()


def test_port_overrides_come_from_the_environment() -> None:
    ports = supervisor.ports_from_env({"MEMBER_GRPC_PORT": "6051", "HTTP_PORT": "9090"})
    assert ports["member"] == 6051 and ports["http"] == 9090 and ports["rewards"] == 50054
    with pytest.raises(supervisor.DevrunError, match="MEMBER_GRPC_PORT"):
        supervisor.ports_from_env({"MEMBER_GRPC_PORT": "x"})


async def test_cpu_meter_charges_a_busy_process_per_call_and_an_idle_one_nothing() -> None:
    # Each says "up" once the interpreter has started: on a loaded machine
    # the start itself took long enough to be counted against the idle one.
    idle = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import time; print('up', flush=True); time.sleep(30)",
        stdout=asyncio.subprocess.PIPE,
    )
    busy = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import time\nprint('up', flush=True)\nend = time.process_time() + 0.4\n"
        "while time.process_time() < end: pass\ntime.sleep(30)",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        for child in (idle, busy):
            assert child.stdout is not None
            assert await child.stdout.readline() == b"up\n"
        meter = await CpuMeter.open({"idle": idle.pid, "busy": busy.pid})
        resting = await meter.idle(0.3)  # the busy one spins meanwhile: its rate is high
        before = await meter.snapshot()
        await asyncio.sleep(0.6)
        cpu = await meter.per_call(before, calls=10)
        await meter.close()
    finally:
        idle.kill()
        busy.kill()
        await idle.wait()
        await busy.wait()
    # The busy child burned up to 0.4 s over 10 calls: tens of ms per call.
    assert cpu["busy"] >= 5.0
    assert cpu["idle"] < 1.0
    assert cpu["total"] == pytest.approx(sum(v for k, v in cpu.items() if k != "total"), abs=0.01)
    assert process_cpu_seconds(2**22 + 12345) == 0.0  # no such process: nothing, not an error
    assert resting["idle"] < 0.05 and resting["busy"] > 0.05  # CPU seconds per second


def test_marginal_cpu_takes_each_process_idle_work_off_the_run() -> None:
    # 100 calls over 2 s; the consumer idles at 50 ms/s (1 ms per call of it).
    per_call = {"gateway": 2.0, "consumer": 1.5, "pg backends": 0.4, "total": 3.9}
    idle = {"gateway": 0.0, "consumer": 0.05, "pg backends": 0.01}
    out = marginal(per_call, idle, seconds=2.0, calls=100)
    assert out == {"gateway": 2.0, "consumer": 0.5, "pg backends": 0.2, "total": 2.7}
    # A process that idled more than it worked (noise) costs nothing, not less.
    assert marginal({"relay": 0.1, "total": 0.1}, {"relay": 1.0}, 2.0, 100)["relay"] == 0.0


def test_cpu_table_shows_only_processes_that_worked() -> None:
    text = cpu_table(
        [
            ("slice", {"gateway": 2.5, "echo": 0.0, "total": 2.5}),
            ("baseline", {"gateway": 0.0, "echo": 0.4, "total": 0.4}),
        ]
    )
    head, _, slice_row, baseline_row = text.splitlines()
    assert head.split()[-3:] == ["gateway", "echo", "total"]
    assert slice_row.split()[-3:] == ["2.500", "0.000", "2.500"]
    assert baseline_row.split()[-3:] == ["0.000", "0.400", "0.400"]
    assert cpu_table([]) == ""


def test_bench_profile_names_the_processes_asked_for() -> None:
    names = {"gateway": 10, "rewards": 11, "member": 12}
    assert wanted(names, "") == {}
    assert wanted(names, "all") == names
    assert wanted(names, "rewards, gateway") == {"rewards": 11, "gateway": 10}
    # A run without the named process (a baseline's own server) profiles nothing.
    assert wanted({"echo": 13}, "rewards") == {}


async def test_the_cpu_meter_profiles_the_measured_run_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make profile`: py-spy attaches at the run's first snapshot and writes
    its file when the per-call figures are read."""
    monkeypatch.setenv("BENCH_PROFILE", "busy")
    monkeypatch.setenv("BENCH_PROFILE_FORMAT", "raw")
    monkeypatch.setenv("BENCH_PROFILE_RATE", "100")
    busy = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import time\ndef spin_for_the_profiler():\n"
        "    end = time.monotonic() + 30\n"
        "    while time.monotonic() < end: pass\nspin_for_the_profiler()",
    )
    try:
        meter = await CpuMeter.open({"busy": busy.pid})
        assert meter.profiler is not None
        meter.profiler.out_dir = tmp_path
        before = await meter.snapshot()
        await asyncio.sleep(1.5)
        await meter.per_call(before, calls=1)
        await meter.close()
    finally:
        busy.kill()
        await busy.wait()
    [written] = await asyncio.to_thread(lambda: list(tmp_path.glob("*-busy.txt")))
    assert "spin_for_the_profiler" in await asyncio.to_thread(written.read_text)


def test_scaleout_runs_n_gateways_and_n_rewards_behind_round_robin_targets() -> None:
    children, pos_ports = replicated_children(2, {"PATH": "/usr/bin"})
    by_name = {c.name: c for c in children}
    assert {"gateway", "gateway-2", "rewards", "rewards-2"} <= set(by_name)
    rewards_ports = [by_name[n].env["GRPC_PORT"] for n in ("rewards", "rewards-2")]
    assert len(set(rewards_ports)) == 2
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in rewards_ports)
    # Every process reaches rewards through both of them.
    assert all(c.env["REWARDS_ADDR"] == target for c in children)
    assert len(set(pos_ports)) == 2
    assert by_name["gateway-2"].env["POS_GRPC_PORT"] == str(pos_ports[1])
    assert by_name["gateway"].env["HTTP_PORT"] != by_name["gateway-2"].env["HTTP_PORT"]
    assert replicated_children(1, {})[0][-1].name == "gateway"  # one of each: as make bench


def test_free_ports_are_below_the_ephemeral_range_and_never_handed_out_twice() -> None:
    """A port the OS picks for port 0 is one the children's outgoing
    connections may take first (the benchmark's gateway once failed to bind
    its port so): free ports come from below the ephemeral range."""
    low = supervisor.ephemeral_low()
    ports = [supervisor.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(supervisor.PORT_FLOOR <= p < low for p in ports)
    assert all(p < 20_000 for p in (supervisor.free_port(ceiling=20_000) for _ in range(20)))
