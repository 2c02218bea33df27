"""The door under the contract fuzz (schemathesis, issue 15's Proof): every
operation of /openapi.json, engagement's included, 25 generated requests
each, every one sent with no credentials and signed by a client without the
operation's scope (one fuzz run for both: generating is most of its cost).
Every answer is 401 (resp. 403), or the router's 404 for
a generated path that names no route, and no table of any service changes.

Schemathesis drives the live gateway from a worker thread, as in
tests/e2e/test_gateway_contract.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.schemas import OpenApiSchema

from gateway.app import Gateway
from gateway.auth import policy
from gateway.auth.admin import ClientAdmin
from gateway.auth.client import HmacAuth
from gateway.auth.model import MEMBER_SELF, ClientKind
from servicekit.db import asyncpg_dsn
from tests.harness import Infra

from .test_gateway_contract import case_request

pytestmark = pytest.mark.e2e

EXAMPLES = 25
SCHEMAS = ("member", "rewards", "tiering", "engagement", "gateway")
# Written by background work (relays, consumers), not by requests.
MOVING = {"outbox", "processed_events", "event_cursors"}


async def snapshot(conn: asyncpg.Connection) -> dict[str, str]:
    """table -> digest of its rows, for every table of every schema."""
    tables = await conn.fetch(
        "SELECT table_schema, table_name FROM information_schema.tables"
        " WHERE table_schema = ANY($1::text[]) AND table_type = 'BASE TABLE'"
        " AND table_name <> 'alembic_version'",
        list(SCHEMAS),
    )
    out = {}
    for t in tables:
        if t["table_name"] in MOVING:
            continue
        name = f'"{t["table_schema"]}"."{t["table_name"]}"'
        rows = await conn.fetchval(
            f"SELECT coalesce(string_agg(r::text, '|' ORDER BY r::text), '') FROM {name} r"
        )
        out[name] = hashlib.sha256(rows.encode()).hexdigest()
    return out


async def settled(conn: asyncpg.Connection) -> dict[str, str]:
    """A snapshot once background work from earlier tests has stopped moving."""
    previous = await snapshot(conn)
    for _ in range(30):
        await asyncio.sleep(0.5)
        current = await snapshot(conn)
        if current == previous:
            return current
        previous = current
    raise AssertionError("the database did not settle")


def _run_operation(operation: Any, clients: dict[str, httpx.Client], answers: Answers) -> None:
    label = f"op {operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
    )
    def run(case: Any) -> None:
        # Each generated case goes through every client's door: generating a
        # case costs far more than sending it (most of a run is hypothesis).
        for name, client in clients.items():
            reply = client.send(case_request(client, case))
            code = reply.json().get("code", "") if reply.content else ""
            answers[name][f"{reply.status_code} {code}"] += 1
            answers[name][label] += 1

    run()


Answers = dict[str, Counter[str]]


def _fuzz(spec: dict[str, Any], base_url: str, auths: dict[str, httpx.Auth | None]) -> Answers:
    schema = schemathesis.openapi.from_dict(spec)
    assert isinstance(schema, OpenApiSchema)
    answers: Answers = {name: Counter() for name in auths}
    operations = [result.ok() for result in schema.get_all_operations()]
    door_operations = [op for op in operations if not policy.is_public(op.method.upper(), op.path)]
    assert len(door_operations) >= 60, "every route is in the spec"
    clients = {
        name: httpx.Client(base_url=base_url, auth=auth, timeout=10) for name, auth in auths.items()
    }
    try:
        for operation in door_operations:
            _run_operation(operation, clients, answers)
    finally:
        for client in clients.values():
            client.close()
    return answers


@dataclass
class DoorRun:
    # Per client: "status code" -> how many answers.
    statuses: dict[str, Counter[str]]
    # Tables whose rows changed across the whole run.
    changed: list[str]


# ~3 minutes on a shared 2-core machine: hypothesis generating 25 cases for
# each of ~120 operations; each case is then sent by both clients.
@pytest.fixture(scope="module")
async def door_run(
    gateway: Gateway, infra: Infra, http: httpx.AsyncClient, client_admin: ClientAdmin
) -> DoorRun:
    """The fuzz, once: every case sent with no credentials and signed by a
    mini-program client holding only member:self and asserting no member (no
    operation is open to it)."""
    weak = await client_admin.create(
        ClientKind.MINIPROGRAM_BACKEND,
        "fuzz without scopes",
        scopes=[MEMBER_SELF],
        app_ids=["wx-fuzz"],
        rate_per_second=1_000_000.0,
        burst=1_000_000,
    )
    auths: dict[str, httpx.Auth | None] = {
        "unauthenticated": None,
        "wrong scope": HmacAuth(weak.key_id, weak.secret),
    }
    spec = (await http.get("/openapi.json")).json()
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        before = await settled(conn)
        target = f"http://127.0.0.1:{gateway.http_port}"
        answers = await asyncio.to_thread(_fuzz, spec, target, auths)
        after = await snapshot(conn)
    finally:
        await conn.close()
    changed = sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )
    statuses = {}
    for name, counted in answers.items():
        per_operation = [v for k, v in counted.items() if k.startswith("op ")]
        # Hypothesis stops early only when an operation has fewer distinct inputs.
        assert len(per_operation) >= 60 and min(per_operation) >= 1, name
        print(f"\n{name}: {len(per_operation)} operations, {sum(per_operation)} requests")
        statuses[name] = Counter({k: v for k, v in counted.items() if not k.startswith("op ")})
    return DoorRun(statuses, changed)


@pytest.mark.timeout(600)
async def test_unauthenticated_fuzz_is_refused_and_writes_nothing(door_run: DoorRun) -> None:
    assert door_run.changed == [], f"refused requests wrote to {door_run.changed}"
    statuses = door_run.statuses["unauthenticated"]
    print(f"\nunauthenticated fuzz: {dict(statuses)}")
    refused = {k for k in statuses if k.startswith("401 ")}
    assert refused and set(statuses) <= refused | {"404 NOT_FOUND"}, statuses
    assert sum(statuses[k] for k in refused) > 0.9 * sum(statuses.values())


@pytest.mark.timeout(600)
async def test_wrong_scope_fuzz_is_forbidden_and_writes_nothing(door_run: DoorRun) -> None:
    assert door_run.changed == [], f"refused requests wrote to {door_run.changed}"
    statuses = door_run.statuses["wrong scope"]
    print(f"\nwrong-scope fuzz: {dict(statuses)}")
    forbidden = {k for k in statuses if k.startswith("403 ")}
    assert forbidden and set(statuses) <= forbidden | {"404 NOT_FOUND"}, statuses
    assert sum(statuses[k] for k in forbidden) > 0.9 * sum(statuses.values())
