"""Pure parts of the deployment plumbing: how the start-up schema check
classifies a database's revisions (servicekit/schemacheck.py), and that client
keepalive and server ping policy agree (servicekit/clients.py)."""

from __future__ import annotations

import json

import pytest

from servicekit import clients
from servicekit.migrations import SERVICES
from servicekit.schemacheck import SchemaState, classify, code_revisions

KNOWN = {"0001", "0002", "0003"}


@pytest.mark.parametrize(
    ("db", "state"),
    [
        ([], SchemaState.MISSING),
        (["0003"], SchemaState.AT_HEAD),
        (["0002"], SchemaState.BEHIND),
        (["0001"], SchemaState.BEHIND),
        (["0004"], SchemaState.AHEAD),
    ],
)
def test_classify(db: list[str], state: SchemaState) -> None:
    assert classify(db, {"0003"}, KNOWN) is state


@pytest.mark.parametrize("service", SERVICES)
def test_every_schema_has_one_head_the_check_can_compare(service: str) -> None:
    revisions = code_revisions(service)
    assert len(revisions.heads) == 1
    assert revisions.heads <= revisions.known


def test_servers_accept_the_clients_keepalive_pings() -> None:
    client = dict(clients.CLIENT_KEEPALIVE_OPTIONS)
    server = dict(clients.SERVER_KEEPALIVE_OPTIONS)
    # A client pinging more often than the server's minimum gets GOAWAY too_many_pings.
    assert (
        server["grpc.http2.min_recv_ping_interval_without_data_ms"]
        < client["grpc.keepalive_time_ms"]
    )
    # Clients ping idle connections too, so the server must permit it.
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1


def test_clients_balance_round_robin_through_the_service_config() -> None:
    config = json.loads(clients.SERVICE_CONFIG)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
