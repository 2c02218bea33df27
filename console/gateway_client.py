"""The console as a gateway client: one signed httpx client per role (the
project's own HmacAuth, gateway/auth/client.py), each holding only its role's
scopes, and every call asserting the signed-in operator in X-Operator-User so
the audit trail names the person."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from gateway.auth.client import HmacAuth
from gateway.principal import OPERATOR_USER_HEADER

from .roles import Role
from .settings import ConsoleSettings


@dataclass
class GatewayError(Exception):
    """The gateway's refusal, as its problem+json body says it (gateway/errors.py)."""

    status: int
    code: str
    message: str
    field: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class NoClientForRole(Exception):
    pass


class Gateway:
    def __init__(self, settings: ConsoleSettings) -> None:
        self._clients: dict[Role, httpx.AsyncClient] = {}
        for name, key in settings.console_gateway_clients.items():
            self._clients[Role(name)] = httpx.AsyncClient(
                base_url=settings.console_gateway_url,
                timeout=settings.console_gateway_timeout_seconds,
                auth=HmacAuth(key.key_id, key.secret),
            )

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    async def call(
        self,
        role: Role,
        operator: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: Any = None,
    ) -> Any:
        client = self._clients.get(role)
        if client is None:
            raise NoClientForRole(f"no gateway client configured for role {role.value}")
        try:
            reply = await client.request(
                method,
                path,
                params={k: v for k, v in (params or {}).items() if v not in ("", None)},
                json=json,
                headers={OPERATOR_USER_HEADER: operator},
            )
        except httpx.TransportError as exc:
            # Not sent, or no answer: the page says so (a retry of a form post
            # replays through its Idempotency-Key where the route has one).
            raise GatewayError(
                503, "GATEWAY_UNREACHABLE", f"the gateway did not answer: {type(exc).__name__}"
            ) from None
        if reply.status_code >= 400:
            try:
                problem = reply.json()
                code, detail = str(problem["code"]), str(problem.get("detail", ""))
            except (ValueError, KeyError, TypeError):
                problem, code, detail = {}, "GATEWAY_ERROR", reply.text[:300]
            raise GatewayError(reply.status_code, code, detail, problem.get("field") or None)
        return reply.json() if reply.content else None
