"""Handlers the gateway's POS interceptors wrap, built once per method.

grpc.aio runs every interceptor's `intercept_service` for every call. The
handler beneath one is the same object call after call (the servicer's, or
the wrapper the next interceptor keeps here), so each interceptor keeps its
wrapper per method and hands it out again, instead of building closures and a
method handler on every call. A different handler beneath (a servicer added
later, a test's) gets a new wrapper.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc


class WrappedHandlers:
    def __init__(self) -> None:
        # method -> (the handler beneath, its wrapper); one entry per registered RPC.
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(
        self,
        method: str,
        inner: grpc.RpcMethodHandler,
        wrap: Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler],
    ) -> grpc.RpcMethodHandler:
        found = self._by_method.get(method)
        if found is not None and found[0] is inner:
            return found[1]
        wrapped = wrap(inner)
        self._by_method[method] = (inner, wrapped)
        return wrapped
