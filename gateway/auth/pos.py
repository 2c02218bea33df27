"""The POS door: a grpc.aio server interceptor on the gateway's PosService.

A POS sends `x-store-id` and `x-api-key` ("<key_id>.<secret>") in call
metadata. The key must belong to a live pos client bound to that store (and,
with mTLS, the client certificate must name that store), the RPC's scope must
be granted (policy.RPC_SCOPES, fail-closed), and the request's own store_id
must be the same store: a POS acts only for itself. The sign-in sequence is
gateway/auth/signin.py's: only a verified store key charges the client's and
the store's buckets. RESOURCE_EXHAUSTED carries google.rpc.RetryInfo and a
`retry-after-ms` trailer.

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
from ..wrapped import WrappedHandlers
from . import policy
from .crypto import api_key_matches, split_api_key
from .model import ClientKind, Credential, RateLimited, Unauthenticated, grants
from .signin import Attempt, SignIn, bound_key_id

STORE_METADATA = "x-store-id"
KEY_METADATA = "x-api-key"
RETRY_AFTER_METADATA = "retry-after-ms"


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return ""


def peer_address(context: grpc.aio.ServicerContext) -> str:
    """ "ipv4:127.0.0.1:5123" -> "127.0.0.1"; "ipv6:[::1]:5123" -> "[::1]"."""
    peer = context.peer() or "unknown"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0] or rest
    return peer


def certificate_names(context: grpc.aio.ServicerContext) -> set[str]:
    """The verified client certificate's common name and subject alt names
    (empty without mTLS)."""
    auth = context.auth_context() or {}
    names = set()
    for prop in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(prop, ()):
            names.add(value.decode() if isinstance(value, bytes) else str(value))
    return names


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
    def __init__(self, signin: SignIn, *, require_client_certificate: bool = False) -> None:
        self._signin = signin
        # mTLS: the certificate the till presented must name its store.
        self._require_cert = require_client_certificate
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(policy.POS_SERVICE_PREFIX):
            return handler
        return self._wrapped.get(method, handler, lambda h: self._wrap(method, h))

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
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

        def parse() -> Attempt:
            store_id = _metadata(context, STORE_METADATA)
            key_id, secret = split_api_key(_metadata(context, KEY_METADATA))
            if not store_id or not key_id or not secret:
                raise Unauthenticated(
                    "send x-store-id and x-api-key metadata", code="CREDENTIALS_MISSING"
                )
            bound_key_id(key_id, KEY_METADATA)
            if self._require_cert and store_id not in certificate_names(context):
                raise PermissionDenied(
                    f"the client certificate is not for store {store_id}",
                    code="CERTIFICATE_STORE_MISMATCH",
                    field=STORE_METADATA,
                )

            def verify(credential: Credential) -> None:
                if not api_key_matches(credential.secret, secret):
                    raise Unauthenticated(
                        "the api key does not match", code="KEY_INVALID", field=KEY_METADATA
                    )
                # Another store's (or a non-POS) key never charges this store's bucket.
                if credential.kind is not ClientKind.POS or credential.store_id != store_id:
                    raise PermissionDenied(
                        f"this key does not act for store {store_id}",
                        code="STORE_MISMATCH",
                        field=STORE_METADATA,
                    )

            return Attempt(key_id=key_id, verify=verify, key_field=KEY_METADATA, store_id=store_id)

        credential = await self._signin.sign_in(peer_address(context), parse)
        if not grants(credential.scopes, needed):
            raise PermissionDenied(f"this RPC needs the scope {needed}", code="SCOPE_MISSING")
        # Every PosService request names its store; it must be the caller's. An
        # empty one acts for no store: the RPC itself refuses it (STORE_ID_REQUIRED).
        named = getattr(request, "store_id", None)
        if named is None or (named and named != credential.store_id):
            raise PermissionDenied(
                "store_id must be the store this POS is registered for",
                code="STORE_MISMATCH",
                field="store_id",
            )
        return credential
