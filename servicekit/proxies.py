"""Which peers may tell an HTTP server the client's address (X-Forwarded-For,
X-Forwarded-Proto): the console and the gateway behind an ingress.

Off by default: the peer is the client, and a forwarded header is ignored
(anyone could send one). Behind an ingress every request comes from the
ingress's address, so a per-address limit keyed on the peer puts every
operator in one bucket and one attacker locks them all out; trusting the
ingress's range (a comma-separated list of addresses or CIDR networks, `*` for
any) makes uvicorn's ProxyHeadersMiddleware take the client from the header,
right to left, skipping trusted hops. Only the ingress's range: a peer outside
it still counts as itself."""

from __future__ import annotations

import ipaddress
from typing import Any


def trusted_proxy_list(trusted_proxies: str) -> list[str]:
    """The entries of a trusted-proxies setting; a ValueError names one that
    is neither an address, a CIDR range nor `*` (uvicorn would silently treat
    it as a host name no peer ever has)."""
    entries = [p.strip() for p in trusted_proxies.split(",") if p.strip()]
    for entry in entries:
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(
                f"trusted proxies: {entry!r} is not an IP address or CIDR range"
            ) from None
    return entries


def uvicorn_proxy_options(trusted_proxies: str) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for `trusted_proxies` (empty: none).
    Explicit either way: uvicorn's own default trusts 127.0.0.1 (or the
    FORWARDED_ALLOW_IPS environment variable)."""
    entries = trusted_proxy_list(trusted_proxies)
    if not entries:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": entries}
