"""Prometheus metrics of the member service, served on their own port
(MEMBER_METRICS_PORT; unset: not served, the counters still count).

Identifiers quarantined (issue 15 item 14), so an alert can fire when a staff
card or a shared phone starts linking strangers, and identifiers flagged by
the velocity watch (presented at too many stores too fast). Each counted after
its call committed; the IdentifierQuarantined / IdentifierVelocityFlagged
event leaves through the outbox in the same transaction.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, start_http_server


class MemberMetrics:
    def __init__(self) -> None:
        # Per service instance, not the global registry: tests run several.
        self.registry = CollectorRegistry()
        self.quarantined = Counter(
            "member_identifiers_quarantined_total",
            "Identifiers that crossed the quarantine threshold, by identifier type",
            ["identifier_type"],
            registry=self.registry,
        )
        self.velocity_flagged = Counter(
            "member_identifiers_velocity_flagged_total",
            "Identifiers presented at too many stores within the velocity window",
            ["identifier_type"],
            registry=self.registry,
        )
        self.port = 0
        self._server: object | None = None

    def start(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server.server_close()  # type: ignore[attr-defined]
            self._server = None
