"""servicekit/proxies.py: the trusted-proxies setting of the console and the
gateway becomes uvicorn's proxy options; a malformed entry is refused at start
instead of matching no peer."""

from __future__ import annotations

import pytest

from servicekit.proxies import uvicorn_proxy_options


def test_empty_trusts_no_proxy_not_even_loopback() -> None:
    assert uvicorn_proxy_options("") == {"proxy_headers": False}
    assert uvicorn_proxy_options(" , ") == {"proxy_headers": False}


def test_addresses_and_ranges_are_passed_to_uvicorn() -> None:
    assert uvicorn_proxy_options("10.0.0.0/8, 192.168.1.5,fd00::/8") == {
        "proxy_headers": True,
        "forwarded_allow_ips": ["10.0.0.0/8", "192.168.1.5", "fd00::/8"],
    }


def test_a_malformed_entry_is_named() -> None:
    with pytest.raises(ValueError, match="'ingress-range'"):
        uvicorn_proxy_options("10.0.0.0/8,ingress-range")
