"""LOYALTY_ENV=production refuses development secrets (issue 15 item 8): the
rules per process, and the real entrypoints exiting with one log line."""

from __future__ import annotations

import base64
import logging
import os
import secrets
import subprocess
import sys

import pytest

from gateway.safety import production_problems as gateway_problems
from gateway.settings import GatewaySettings
from servicekit.safety import UnsafeForProduction, refuse_unsafe
from services.member.settings import MemberSettings
from services.member.settings import production_problems as member_problems


def key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def real_member(**overrides: object) -> MemberSettings:
    values: dict[str, object] = {
        "pii_key": key(),
        "member_code_secret": secrets.token_urlsafe(32),
        "loyalty_env": "production",
    }
    values.update(overrides)
    return MemberSettings(**values)  # type: ignore[arg-type]


def real_gateway(**overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "auth_secret_key": key(),
        "wechat_apps": {"wx8d5f0c1a2b3c4d5e": secrets.token_hex(16)},
        "loyalty_env": "production",
    }
    values.update(overrides)
    return GatewaySettings(**values)  # type: ignore[arg-type]


def test_production_is_the_default() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOYALTY_ENV"}
    os_env = os.environ.copy()
    try:
        os.environ.clear()
        os.environ.update(env)
        assert MemberSettings().loyalty_env == "production"
    finally:
        os.environ.clear()
        os.environ.update(os_env)


def test_member_secrets() -> None:
    assert member_problems(real_member()) == []
    defaults = member_problems(MemberSettings(loyalty_env="production"))
    assert defaults == [
        "PII_KEY is a development value from the repository",
        "MEMBER_CODE_SECRET is a development value from the repository",
    ]
    assert member_problems(real_member(member_code_secret="")) == ["MEMBER_CODE_SECRET is missing"]
    assert member_problems(real_member(member_code_secret="short-secret")) == [
        "MEMBER_CODE_SECRET is shorter than 32 characters"
    ]
    short_key = base64.b64encode(secrets.token_bytes(16)).decode()
    assert member_problems(real_member(pii_key=short_key)) == [
        "PII_KEY must be base64 of at least 32 random bytes"
    ]
    dev_rotation = f"k1:{base64.b64encode(b'dev-only-rotation-key-32-bytes!!').decode()}"
    assert member_problems(real_member(pii_encryption_keys=dev_rotation)) == [
        "PII_ENCRYPTION_KEYS (k1) is a development value from the repository"
    ]


def test_gateway_secrets_and_an_open_door() -> None:
    assert gateway_problems(real_gateway()) == []
    assert gateway_problems(GatewaySettings(loyalty_env="production")) == [
        "AUTH_SECRET_KEY is a development value from the repository"
    ]
    demo = real_gateway(wechat_apps={"wx-shop": "dev-only-wechat-app-secret"})
    assert gateway_problems(demo) == [
        "WECHAT_APPS (wx-shop) is a development value from the repository"
    ]
    # The door off is tolerated on loopback (the benchmark's baseline) only.
    assert gateway_problems(real_gateway(auth_enabled=False)) == []
    exposed = real_gateway(auth_enabled=False, http_host="0.0.0.0", pos_grpc_host="::1")
    assert gateway_problems(exposed) == ["AUTH_ENABLED=false on a non-loopback address (0.0.0.0)"]


def test_refusal_is_one_log_line_and_exit_2(caplog: pytest.LogCaptureFixture) -> None:
    refuse_unsafe("member", "development", ["PII_KEY is missing"])  # development: no-op
    refuse_unsafe("member", "production", [])
    with caplog.at_level(logging.CRITICAL), pytest.raises(UnsafeForProduction) as stopped:
        refuse_unsafe("member", "production", ["PII_KEY is missing", "X is short"])
    assert stopped.value.code == 2
    (record,) = caplog.records
    assert "LOYALTY_ENV=production" in record.getMessage()
    assert "PII_KEY is missing; X is short" in record.getMessage()


@pytest.mark.parametrize(
    ("module", "named"),
    [("services.member", "PII_KEY"), ("gateway", "AUTH_SECRET_KEY")],
)
def test_the_real_process_refuses_to_start(module: str, named: str) -> None:
    """`python -m ...` without LOYALTY_ENV is production: with the repository's
    keys it exits 2 before binding anything, saying why in one line."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOYALTY_ENV", "PII_KEY")}
    env.update(
        {
            "AUTH_SECRET_KEY": GatewaySettings.model_fields["auth_secret_key"].default,
            "GRPC_PORT": "0",
            "HTTP_PORT": "0",
            "POS_GRPC_PORT": "0",
            "METRICS_PORT": "0",
            "LOG_JSON": "false",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", module],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "refuses to start" in lines[0] and named in lines[0]
