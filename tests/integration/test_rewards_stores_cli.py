"""The operator's stores command (issue 13, item 26) against the test database:
`python -m services.rewards stores put|close|open|list` run as an operator
runs it, each step read back from rewards.stores; bad input exits 1 with its
named code and writes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from decimal import Decimal
from typing import Any

import asyncpg

from tests.harness import Infra


async def stores_cli(infra: Infra, *args: str) -> tuple[int, Any, str]:
    """Runs the command; answers its exit status, its JSON output (None when
    it wrote none) and its stderr."""
    env = {**os.environ, "DATABASE_URL": infra.database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.rewards", "stores", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, json.loads(out) if out.strip() else None, err.decode()


async def store_row(conn: asyncpg.Connection, store_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT name, city, address, time_zone, latitude, longitude, status"
        " FROM rewards.stores WHERE store_id = $1",
        store_id,
    )
    return dict(row) if row else None


async def test_the_stores_command_puts_closes_opens_and_lists(
    infra: Infra, conn: asyncpg.Connection
) -> None:
    store_id = f"GZ{random.randrange(10**6):06d}"

    def put(name: str, time_zone: str) -> tuple[str, ...]:
        return (
            "put", store_id, "--name", name, "--city", "广州",
            "--address", "广州市天河区天河路208号", "--time-zone", time_zone,
            "--latitude", "23.1323", "--longitude", "113.3253",
        )  # fmt: skip

    status, out, err = await stores_cli(infra, *put("天河城店", "Asia/Shanghai"))
    assert status == 0, err
    assert [(s["store_id"], s["name"], s["status"]) for s in out] == [
        (store_id, "天河城店", "active")
    ]
    assert await store_row(conn, store_id) == {
        "name": "天河城店",
        "city": "广州",
        "address": "广州市天河区天河路208号",
        "time_zone": "Asia/Shanghai",
        "latitude": Decimal("23.132300"),
        "longitude": Decimal("113.325300"),
        "status": "active",
    }

    # put again updates the same store (a new name and zone), it adds no other.
    status, out, err = await stores_cli(infra, *put("天河城二店", "Europe/London"))
    assert status == 0, err
    row = await store_row(conn, store_id)
    assert row is not None
    assert (row["name"], row["time_zone"]) == ("天河城二店", "Europe/London")
    assert (
        await conn.fetchval("SELECT count(*) FROM rewards.stores WHERE store_id = $1", store_id)
        == 1
    )

    status, out, err = await stores_cli(infra, "close", store_id)
    assert status == 0, err
    assert out[0]["status"] == "closed"
    assert (await store_row(conn, store_id) or {})["status"] == "closed"
    status, out, err = await stores_cli(infra, "open", store_id)
    assert status == 0, err
    assert out[0]["status"] == "active"
    assert (await store_row(conn, store_id) or {})["status"] == "active"

    status, out, err = await stores_cli(infra, "list")
    assert status == 0, err
    listed = {s["store_id"]: s for s in out}
    assert listed[store_id]["name"] == "天河城二店"
    assert [s["store_id"] for s in out] == sorted(listed)
    assert len(out) == await conn.fetchval("SELECT count(*) FROM rewards.stores")


async def test_the_stores_command_refuses_bad_input_by_name_and_writes_nothing(
    infra: Infra, conn: asyncpg.Connection
) -> None:
    store_id = f"SZ{random.randrange(10**6):06d}"
    base = ["put", store_id, "--name", "海岸城店", "--city", "深圳"]
    for extra, code, field in (
        (["--time-zone", "Mars/Olympus", "--latitude", "22.5", "--longitude", "113.9"],
         "INVALID_TIME_ZONE", "time_zone"),
        (["--latitude", "91", "--longitude", "113.9"], "INVALID_LOCATION", "latitude"),
        (["--latitude", "22.5", "--longitude", "-181"], "INVALID_LOCATION", "longitude"),
    ):  # fmt: skip
        status, out, err = await stores_cli(infra, *base, *extra)
        assert (status, out) == (1, None), err
        assert json.loads(err)["error"] | {"message": ""} == {
            "code": code,
            "field": field,
            "message": "",
        }
    bad_id, out, err = await stores_cli(
        infra, "put", "GZ 01", "--name", "x", "--city", "y", "--latitude", "0", "--longitude", "0"
    )
    assert bad_id == 1 and json.loads(err)["error"]["code"] == "INVALID_STORE_ID"
    assert await store_row(conn, store_id) is None
    assert await store_row(conn, "GZ 01") is None

    for action in ("close", "open"):
        status, out, err = await stores_cli(infra, action, store_id)
        assert (status, out) == (1, None), err
        assert json.loads(err)["error"]["code"] == "UNKNOWN_STORE"
    assert await store_row(conn, store_id) is None
