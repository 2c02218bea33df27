"""The door's pure rules: request signatures (version 2 signs the member and
Idempotency-Key headers), secrets at rest, scope grants, in-process buckets,
and the policy table's shape."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.auth import policy
from gateway.auth.crypto import (
    SecretBox,
    SignedHeaders,
    api_key,
    api_key_matches,
    new_key_id,
    new_secret,
    sign,
    signature_matches,
    split_api_key,
    string_to_sign,
)
from gateway.auth.model import (
    ADMIN_ALL,
    ADMIN_REWARDS,
    DEFAULT_SCOPES,
    KNOWN_SCOPES,
    MEMBER_ANY,
    MEMBER_SELF,
    PII_READ,
    ClientKind,
    Credential,
    RateLimited,
    Unauthenticated,
    grants,
)
from gateway.auth.registry import CredentialRegistry
from gateway.auth.signin import SignInSettings
from gateway.auth.tokens import TokenIssuer
from gateway.errors import domain_problem
from gateway.ratelimit import Gatekeeper, Limit, LocalBuckets, StoreUnreachable
from loyalty.pos.v1 import pos_pb2
from servicekit.errors import Unavailable

KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"])
paths = st.from_regex(r"/v1/[a-z0-9/{}_-]{0,40}(\?[a-z=&0-9]{0,20})?", fullmatch=True)
bodies = st.binary(max_size=256)
tokens = st.text(alphabet="abcdef0123456789", min_size=1, max_size=32)


@given(methods, paths, tokens, tokens, bodies)
def test_a_signature_verifies_only_the_request_it_was_made_for(
    method: str, path: str, timestamp: str, nonce: str, body: bytes
) -> None:
    secret = "s3cret"
    signature = sign(secret, method, path, timestamp, nonce, body)
    assert signature_matches(secret, signature, method, path, timestamp, nonce, body)
    assert signature_matches(secret, signature.upper(), method, path, timestamp, nonce, body)
    assert not signature_matches("other", signature, method, path, timestamp, nonce, body)
    assert not signature_matches(secret, signature, method, path + "x", timestamp, nonce, body)
    assert not signature_matches(secret, signature, method, path, timestamp + "1", nonce, body)
    assert not signature_matches(secret, signature, method, path, timestamp, nonce + "1", body)
    assert not signature_matches(secret, signature, method, path, timestamp, nonce, body + b"!")
    other = "GET" if method != "GET" else "POST"
    assert not signature_matches(secret, signature, other, path, timestamp, nonce, body)


def test_the_string_to_sign_is_one_field_a_line() -> None:
    headers = SignedHeaders(
        appid="wx-shop", openid="o-1", idempotency_key="idem-1", operator_user="li.wei"
    )
    text = string_to_sign("post", "/v1/x?a=1", "1700000000", "n1", b"{}", headers).decode()
    assert text.split("\n") == [
        "LOYALTY-HMAC-SHA256-2",
        "POST",
        "/v1/x?a=1",
        "1700000000",
        "n1",
        # sha256 of "{}"
        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "wx-shop",
        "o-1",
        "idem-1",
        "li.wei",
    ]
    # Version 1 (accepted only behind AUTH_ACCEPT_SIGNATURE_V1): the six first lines.
    legacy = string_to_sign("post", "/v1/x?a=1", "1700000000", "n1", b"{}", version=1).decode()
    assert legacy.split("\n")[0] == "LOYALTY-HMAC-SHA256" and len(legacy.split("\n")) == 6


@given(st.sampled_from(["appid", "openid", "idempotency_key", "operator_user"]), tokens)
def test_retargeting_a_signed_request_breaks_its_signature(field: str, other: str) -> None:
    """Changing the asserted member, the Idempotency-Key or the audited operator
    user in transit is detected."""
    sent = SignedHeaders(
        appid="wx-shop", openid="o-victim-not", idempotency_key="k-1", operator_user="li.wei"
    )
    signature = sign("s3cret", "GET", "/v1/m", "1", "n", b"", sent)
    changed = SignedHeaders(**{**sent.__dict__, field: other + "-changed"})
    assert signature_matches("s3cret", signature, "GET", "/v1/m", "1", "n", b"", sent)
    assert not signature_matches("s3cret", signature, "GET", "/v1/m", "1", "n", b"", changed)
    # Nor is a version 2 signature downgraded by the migration window.
    assert not signature_matches(
        "s3cret", signature, "GET", "/v1/m", "1", "n", b"", changed, accept_v1=True
    )


def test_version_1_signatures_only_behind_the_setting() -> None:
    legacy = sign("s3cret", "GET", "/v1/m", "1", "n", b"", version=1)
    assert not signature_matches("s3cret", legacy, "GET", "/v1/m", "1", "n", b"")
    assert signature_matches("s3cret", legacy, "GET", "/v1/m", "1", "n", b"", accept_v1=True)


def test_secrets_are_sealed_per_key_id() -> None:
    box = SecretBox(KEY)
    key_id, secret = new_key_id(), new_secret()
    sealed = box.seal(key_id, secret)
    assert secret.encode() not in sealed
    assert box.open(key_id, sealed) == secret
    # A cipher copied onto another key's row does not open.
    with pytest.raises(InvalidTag):
        box.open(new_key_id(), sealed)
    with pytest.raises(InvalidTag):
        SecretBox("ZGV2LW9ubHktZ2F0ZXdheS1rZXktY2hhbmdlLW1lLTE=").open(key_id, sealed)
    with pytest.raises(ValueError, match="32 bytes"):
        SecretBox("c2hvcnQ=")


def test_api_keys_split_and_compare() -> None:
    key_id, secret = new_key_id(), new_secret()
    assert split_api_key(api_key(key_id, secret)) == (key_id, secret)
    assert split_api_key("no-dot") == ("no-dot", "")
    assert api_key_matches(secret, secret) and not api_key_matches(secret, secret[:-1])


@given(st.sets(st.sampled_from(sorted(KNOWN_SCOPES))), st.sampled_from(sorted(KNOWN_SCOPES)))
def test_a_scope_is_granted_only_by_itself_or_a_wider_one(held: set[str], needed: str) -> None:
    wider = {needed}
    if needed == MEMBER_SELF:
        wider.add(MEMBER_ANY)
    if needed.startswith("admin:"):
        wider.add(ADMIN_ALL)
    assert grants(held, needed) == bool(held & wider)


def test_defaults_never_include_pii() -> None:
    assert all(PII_READ not in scopes for scopes in DEFAULT_SCOPES.values())
    assert set(DEFAULT_SCOPES) == set(ClientKind)
    assert grants(DEFAULT_SCOPES[ClientKind.OPS_TOOLING], ADMIN_REWARDS)


def test_every_pos_rpc_and_no_writing_route_is_public() -> None:
    service = pos_pb2.DESCRIPTOR.services_by_name["PosService"]
    for method in service.methods:
        full = f"/{service.full_name}/{method.name}"
        assert policy.rpc_scope(full) is not None, full
        # Every PosService request names its store, so a POS can be held to its own.
        assert "store_id" in method.input_type.fields_by_name, full
    assert policy.rpc_scope("/loyalty.pos.v1.PosService/Unknown") is None
    # Nothing public writes without proof: the token exchange checks the key in
    # its body, WeCom's callback WeCom's signature (services/guides/wecom_crypto.py),
    # the SMS delivery reports the callback token configured with their URL.
    assert {r for r in policy.PUBLIC_ROUTES if r[0] != "GET"} == {
        ("POST", "/v1/auth/token"),
        ("POST", "/v1/wecom/callback"),
        ("POST", "/v1/callbacks/sms/aliyun"),
    }
    assert set(policy.ROUTE_SCOPES.values()) <= KNOWN_SCOPES
    assert set(policy.RPC_SCOPES.values()) <= KNOWN_SCOPES


def test_a_client_rate_overrides_its_kind() -> None:
    settings = SignInSettings(
        600_000, {k.value: Limit(10, 20) for k in ClientKind}, Limit(50, 100), Limit(1, 5)
    )
    base = Credential("k", "c", ClientKind.POS, "SH001", frozenset(), "s")
    assert settings.limit_of(base) == Limit(10, 20)
    own = Credential("k", "c", ClientKind.POS, "SH001", frozenset(), "s", 1.5, 3)
    assert settings.limit_of(own) == Limit(1.5, 3)


def test_local_buckets_refill_take_all_or_nothing_and_stay_bounded() -> None:
    now = [0.0]
    buckets = LocalBuckets(max_entries=3, clock=lambda: now[0])
    slow, roomy = Limit(1, 2), Limit(100, 100)
    assert buckets.take([("a", slow)]) == 0
    assert buckets.take([("a", slow)]) == 0
    assert buckets.take([("a", slow)]) == 1000  # empty: one token a second
    # All or nothing: the roomy bucket is not charged when the slow one refuses.
    assert buckets.take([("b", roomy), ("a", slow)]) == 1000
    assert buckets.wait_ms("b", roomy) == 0 and "b" not in buckets._buckets
    now[0] += 1.0
    assert buckets.take([("a", slow)]) == 0
    # Failures are always counted (debt of one at most), so a source keeps paying.
    for _ in range(5):
        buckets.spend("f", slow)
    assert buckets.wait_ms("f", slow) == 2000
    # A flood of new keys evicts the least recently used; memory stays bounded.
    for n in range(100):
        buckets.spend(f"flood-{n}", slow)
    assert len(buckets) == 3


def test_a_bearer_token_names_its_key_until_it_expires() -> None:
    now = [1_800_000_000.0]
    issuer = TokenIssuer(KEY, ttl_seconds=900, clock=lambda: now[0])
    token = issuer.issue("k_abc")
    assert issuer.verify(token) == "k_abc"
    now[0] += 899
    assert issuer.verify(token) == "k_abc"
    now[0] += 1
    with pytest.raises(Unauthenticated) as expired:
        issuer.verify(token)
    assert expired.value.code == "TOKEN_EXPIRED"
    prefix, payload, mac = token.split(".")
    forged_payload = base64.urlsafe_b64encode(b"k_other.9999999999").decode().rstrip("=")
    for bad in (
        f"{prefix}.{forged_payload}.{mac}",
        f"{prefix}.{payload}.{'0' * 64}",
        f"lt0.{payload}.{mac}",
        "garbage",
        # Another gateway key signs other tokens.
        TokenIssuer("ZGV2LW9ubHktZ2F0ZXdheS1rZXktY2hhbmdlLW1lLTE=", 900).issue("k_abc"),
    ):
        with pytest.raises(Unauthenticated) as invalid:
            issuer.verify(bad)
        assert invalid.value.code == "TOKEN_INVALID"


@pytest.mark.parametrize(("retry_after_ms", "header"), [(1, "1"), (1000, "1"), (1001, "2")])
def test_a_rate_limited_refusal_says_when_to_retry(retry_after_ms: int, header: str) -> None:
    """Every 429, the door's and a route's (POST /v1/auth/token), carries Retry-After."""
    response = domain_problem(RateLimited("slow down", retry_after_ms=retry_after_ms))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == header


class _DeadRedis:
    """Every call fails as a refused connection would; counts the attempts."""

    def __init__(self) -> None:
        self.attempts = 0

    def register_script(self, source: str) -> Any:
        async def run(**_: Any) -> Any:
            self.attempts += 1
            raise RedisConnectionError("refused")

        return run

    async def get(self, key: str) -> Any:
        self.attempts += 1
        raise RedisConnectionError("refused")


async def test_after_a_failed_round_trip_the_gatekeeper_skips_redis_for_a_moment() -> None:
    now = [100.0]
    redis = _DeadRedis()
    gate = Gatekeeper(redis, "ns", monotonic=lambda: now[0])  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(StoreUnreachable):
            await gate.admit("c", Limit(1, 1))
        assert await gate.current_epoch() is None
    assert redis.attempts == 1  # one caller paid for finding out
    now[0] += 0.6
    assert await gate.current_epoch() is None
    assert redis.attempts == 2


class _FlakyPool:
    """A pool whose connections answer (no keys) until `down` is set."""

    def __init__(self) -> None:
        self.down = False

    def acquire(self) -> Any:
        pool = self

        class _Conn:
            async def __aenter__(self) -> Any:
                if pool.down:
                    raise OSError("connection refused")
                return self

            async def __aexit__(self, *exc: object) -> None:
                return None

            async def fetch(self, *args: Any) -> list[Any]:
                return []

        return _Conn()


async def test_a_failed_credential_reload_serves_the_cache_unless_the_epoch_moved() -> None:
    pool = _FlakyPool()
    # Stale at once: every call wants a reload.
    registry = CredentialRegistry(pool, SecretBox(KEY), max_age_seconds=1e-9)  # type: ignore[arg-type]
    pool.down = True
    with pytest.raises(Unavailable):  # nothing loaded yet: nothing to serve
        await registry.ensure_current(1)
    pool.down = False
    await registry.ensure_current(1)
    pool.down = True
    # Only the maximum age passed: the cache in hand serves, no error.
    await registry.ensure_current(1)
    await registry.ensure_current(None)
    # The revocation epoch moved: a key may be revoked, so no stale answer.
    with pytest.raises(Unavailable) as refused:
        await registry.ensure_current(2)
    assert refused.value.code == "DEPENDENCY_UNAVAILABLE"


def test_pos_tls_needs_a_certificate_and_its_key() -> None:
    from gateway.app import pos_server_credentials
    from gateway.settings import GatewaySettings

    assert pos_server_credentials(GatewaySettings()) is None  # plaintext unless configured
    for half in (
        {"pos_tls_cert_file": "/x/gateway.crt"},
        {"pos_tls_key_file": "/x/gateway.key"},
        {"pos_tls_client_ca_file": "/x/ca.crt"},
    ):
        with pytest.raises(ValueError, match="POS_TLS_CERT_FILE and POS_TLS_KEY_FILE"):
            pos_server_credentials(GatewaySettings(**half))  # type: ignore[arg-type]
