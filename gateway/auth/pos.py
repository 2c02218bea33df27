"""The POS door: a grpc.aio server interceptor on the gateway's PosService.

A POS sends `x-store-id` and `x-api-key` ("<key_id>.<secret>") in call
metadata. The key must belong to a live pos client bound to that store, the
RPC's scope must be granted (policy.RPC_SCOPES, fail-closed), and the
request's own store_id must be the same store: a POS acts only for itself.
Rate limits: the client's bucket and the store's bucket, in the same Redis
round trip that reads the revocation epoch. RESOURCE_EXHAUSTED carries
google.rpc.RetryInfo and a `retry-after-ms` trailer.

Health and reflection stay open (probes carry no keys).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from servicekit.errors import ERROR_DOMAIN, DomainError, PermissionDenied, to_rpc_status

from ..metrics import grpc_client_id
from ..ratelimit import Gatekeeper, Limit
from . import policy
from .crypto import api_key_matches, split_api_key
from .http import AuthSettings
from .model import ClientKind, Credential, RateLimited, Unauthenticated, grants
from .registry import CredentialRegistry

STORE_METADATA = "x-store-id"
KEY_METADATA = "x-api-key"
RETRY_AFTER_METADATA = "retry-after-ms"


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return ""


def _rate_limited_abort(exc: RateLimited) -> tuple[grpc.StatusCode, str, tuple[Any, ...]]:
    """The usual ErrorInfo, plus RetryInfo and a plain trailer for simple clients."""
    info = error_details_pb2.ErrorInfo(reason=exc.code, domain=ERROR_DOMAIN)
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(exc.retry_after_ms)
    details = []
    for message in (info, error_details_pb2.RetryInfo(retry_delay=delay)):
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    status = rpc_status.to_status(
        status_pb2.Status(code=exc.status.value[0], message=exc.message, details=details)
    )
    trailer = ((RETRY_AFTER_METADATA, str(exc.retry_after_ms)),)
    return status.code, status.details, tuple(status.trailing_metadata) + trailer


class PosAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        registry: CredentialRegistry,
        gatekeeper: Gatekeeper,
        settings: AuthSettings,
        store_limit: Limit,
    ) -> None:
        self._registry = registry
        self._gate = gatekeeper
        self._settings = settings
        self._store_limit = store_limit

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(policy.POS_SERVICE_PREFIX):
            return handler
        inner = handler.unary_unary
        assert inner is not None, "PosService RPCs are unary"

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                credential = await self._authorise(method, request, context)
                # For the metrics interceptor around this one (same task, same context).
                grpc_client_id.set(credential.client_id)
            except RateLimited as exc:
                await context.abort(*_rate_limited_abort(exc))
            except DomainError as exc:
                status = to_rpc_status(exc.status, exc.message, exc.code, exc.field)
                await context.abort(status.code, status.details, status.trailing_metadata)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _authorise(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> Credential:
        needed = policy.rpc_scope(method)
        if needed is None:
            raise PermissionDenied(f"{method} is not open to any client", code="RPC_NOT_IN_POLICY")
        store_id = _metadata(context, STORE_METADATA)
        key_id, secret = split_api_key(_metadata(context, KEY_METADATA))
        if not store_id or not key_id or not secret:
            raise Unauthenticated(
                "send x-store-id and x-api-key metadata", code="CREDENTIALS_MISSING"
            )
        cached = self._registry.get(key_id)
        verdict = await self._gate.admit(
            cached.client_id if cached else key_id,
            self._settings.limit_of(cached) if cached else None,
            store_id=store_id,
            store_limit=self._store_limit if cached else None,
        )
        await self._registry.ensure_current(verdict.epoch)
        credential = self._registry.get(key_id)
        if cached is None and credential is not None:
            # A key new to this instance: its buckets were not charged above.
            verdict = await self._gate.admit(
                credential.client_id,
                self._settings.limit_of(credential),
                store_id=store_id,
                store_limit=self._store_limit,
            )
        if credential is None:
            revoked = self._registry.was_revoked(key_id)
            raise Unauthenticated(
                "this key was revoked" if revoked else "unknown key",
                code="KEY_REVOKED" if revoked else "KEY_UNKNOWN",
                field=KEY_METADATA,
            )
        if not api_key_matches(credential.secret, secret):
            raise Unauthenticated(
                "the api key does not match", code="KEY_INVALID", field=KEY_METADATA
            )
        if credential.kind is not ClientKind.POS or credential.store_id != store_id:
            raise PermissionDenied(
                f"this key does not act for store {store_id}",
                code="STORE_MISMATCH",
                field=STORE_METADATA,
            )
        if not grants(credential.scopes, needed):
            raise PermissionDenied(f"this RPC needs the scope {needed}", code="SCOPE_MISSING")
        # Every PosService request names its store; it must be the caller's. An
        # empty one acts for no store: the RPC itself refuses it (STORE_ID_REQUIRED).
        named = getattr(request, "store_id", None)
        if named is None or (named and named != store_id):
            raise PermissionDenied(
                "store_id must be the store this POS is registered for",
                code="STORE_MISMATCH",
                field="store_id",
            )
        if not verdict.allowed:
            raise RateLimited(
                f"rate limit of store {store_id} reached; retry later",
                retry_after_ms=verdict.retry_after_ms,
            )
        return credential
