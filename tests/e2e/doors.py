"""Credentials for the e2e suite: a trusted HTTP client that signs every
request, and POS keys registered per store on first use, so the existing
tests go through the real door without knowing about it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from gateway.auth.admin import ClientAdmin, IssuedKey
from gateway.auth.client import StoreKeyInterceptor
from gateway.auth.model import (
    ADMIN_ALL,
    MEMBER_ANY,
    MEMBER_IDENTIFY,
    PII_READ,
    ClientKind,
)

# Everything an HTTP test may call; limits far above what a suite sends.
TRUSTED_SCOPES = (MEMBER_ANY, MEMBER_IDENTIFY, PII_READ, ADMIN_ALL)
UNLIMITED = {"rate_per_second": 1_000_000.0, "burst": 1_000_000}
# A request without a store_id still needs some key to reach its validation.
DEFAULT_STORE = "SH001"


class StoreKeys:
    """One registered POS client per store, created the first time it is needed."""

    def __init__(self, admin: ClientAdmin) -> None:
        self._admin = admin
        self._keys: dict[str, IssuedKey] = {}
        self._lock = asyncio.Lock()

    async def key_for(self, store_id: str) -> IssuedKey:
        async with self._lock:
            if store_id not in self._keys:
                self._keys[store_id] = await self._admin.create(
                    ClientKind.POS,
                    f"e2e POS of {store_id}",
                    store_id=store_id,
                    **UNLIMITED,  # type: ignore[arg-type]
                )
            return self._keys[store_id]


class PerStoreKeyInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the key of the store the request names (as a store's own POS would)."""

    def __init__(self, keys: StoreKeys) -> None:
        self._keys = keys

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        store_id = getattr(request, "store_id", "") or DEFAULT_STORE
        issued = await self._keys.key_for(store_id)
        inner = StoreKeyInterceptor(store_id, issued.api_key)
        return await inner.intercept_unary_unary(continuation, client_call_details, request)
