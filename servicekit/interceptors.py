"""Server interceptor: domain errors become precise gRPC statuses."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import grpc

from .errors import (
    RETRY_AFTER_SECONDS,
    DomainError,
    is_connection_error,
    to_rpc_status,
    unavailable_status,
)

log = logging.getLogger(__name__)

# Raised by PostgreSQL for text the database encoding cannot hold.
_UNSTORABLE_TEXT = (
    asyncpg.CharacterNotInRepertoireError,
    asyncpg.UntranslatableCharacterError,
)


async def _abort(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    """End the call with `status` without raising: grpc.aio discards the
    (None) response of a call whose code is not OK. `context.abort()` would
    raise AbortError through the OpenTelemetry server interceptor, which then
    formats a full traceback for every expected NOT_FOUND or INVALID_ARGUMENT
    (a third of the gateway's CPU under load, measured with py-spy)."""
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class UnaryInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps a method's unary-unary behaviour once
    per method, not once per call. grpc.aio runs every interceptor's
    intercept_service on every call; building a closure and a method handler
    there each time is per-call Python that buys nothing (issue 19). The
    wrapped handler is kept while the inner chain hands back the same handler
    (grpc's registered handlers, or an inner UnaryInterceptor's cached one);
    an inner interceptor that builds a new handler per call gets a new
    wrapping per call, as before. Unknown methods are never kept (a caller
    could otherwise grow the cache with made-up names).

    Subclasses implement `wrap(method, inner)`: the wrapped behaviour, or
    None to leave the method as it is."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, method: str, inner: Behaviour) -> Behaviour | None:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        if handler is None:
            return handler
        wrapped = self.wrap_handler(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap_handler(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` with this interceptor's behaviour around its unary call."""
        if handler.unary_unary is None:
            return handler
        behaviour = self.wrap(method, handler.unary_unary)
        if behaviour is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come wrapped (once per method)."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler],
    ) -> None:
        self._inner = inner
        self._wrap = wrap
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._cache.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(method, handler))
            self._cache[method] = cached
        return cached[1]


def wrap_at_registration(server: grpc.aio.Server, chain: Sequence[UnaryInterceptor]) -> None:
    """Apply `chain` (outermost first) to every handler as it is registered on
    `server`, instead of as grpc.aio interceptors. A server with interceptors
    walks them in its own interceptor path on every call, which cost
    0.06-0.15 ms per call in the servers bench while the interceptors' own
    Python is ~5 us (docs/operations.md, Servers); wrapped at registration,
    a call goes straight to its (wrapped) handler."""

    def wrapped(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        for interceptor in reversed(chain):
            handler = interceptor.wrap_handler(method, handler)
        return handler

    add_generic = server.add_generic_rpc_handlers
    add_registered = server.add_registered_method_handlers

    def add_generic_rpc_handlers(handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        add_generic([_WrappedGenericHandler(h, wrapped) for h in handlers])

    def add_registered_method_handlers(
        service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        add_registered(
            service, {name: wrapped(f"/{service}/{name}", h) for name, h in handlers.items()}
        )

    server.add_generic_rpc_handlers = add_generic_rpc_handlers  # type: ignore[method-assign]
    server.add_registered_method_handlers = add_registered_method_handlers  # type: ignore[method-assign]


class DomainErrorInterceptor(UnaryInterceptor):
    def wrap(self, method: str, inner: Behaviour) -> Behaviour:
        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner(request, context)
            except DomainError as exc:
                # UNAVAILABLE (here, or a downstream's passed on) says when to retry.
                retry = RETRY_AFTER_SECONDS if exc.status == grpc.StatusCode.UNAVAILABLE else None
                await _abort(
                    context, to_rpc_status(exc.status, exc.message, exc.code, exc.field, retry)
                )
            except grpc.aio.AbortError:
                raise
            except _UNSTORABLE_TEXT as exc:
                # Text PostgreSQL cannot hold (a NUL byte, an invalid sequence):
                # the caller's input, refused whole (the transaction rolled back).
                log.info("%s: unstorable text: %s", method, exc)
                await _abort(
                    context,
                    to_rpc_status(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "text contains a character that cannot be stored (e.g. NUL)",
                        "INVALID_CHARACTERS",
                    ),
                )
            except Exception as exc:
                if is_connection_error(exc):
                    # Infrastructure a caller can retry: UNAVAILABLE with a hint.
                    log.warning("%s: dependency unavailable: %r", method, exc)
                    await _abort(context, unavailable_status())
                    return None
                # Log the details here; the caller gets no stack trace or address.
                log.exception("%s failed", method)
                await _abort(
                    context,
                    to_rpc_status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL"),
                )

        return unary_unary
