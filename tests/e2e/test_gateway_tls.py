"""TLS on the POS port (issue 15 item 11), with certificates made at test
time by `cryptography`: a till that trusts the brand's CA is served over TLS
and a plaintext one is not; with a client CA configured (mTLS) a till needs a
certificate, and its certificate must name the store it acts for."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import pos_cli
from gateway.app import Gateway, build
from gateway.auth.admin import ClientAdmin
from gateway.auth.client import StoreKeyInterceptor
from gateway.auth.model import ClientKind
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.errors import error_info
from servicekit.server import ServiceApp
from tests.harness import Infra

from .conftest import gateway_settings

pytestmark = pytest.mark.e2e

STORE, OTHER_STORE = "SH001", "SH002"


class Authority:
    """A CA that signs a server and client certificates, written as PEM files."""

    def __init__(self, directory: Path, name: str = "Loyalty test CA") -> None:
        self._dir = directory
        # Valid around now, whatever "now" is (the suite runs with faketime too).
        self._now = dt.datetime.now(dt.UTC)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            self._builder(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self._write("ca.crt", self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(
        self, subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - dt.timedelta(days=1))
            .not_valid_after(self._now + dt.timedelta(days=2))
        )

    def _write(self, name: str, data: bytes) -> Path:
        path = self._dir / name
        path.write_bytes(data)
        return path

    def issue(self, common_name: str, *, server: bool) -> tuple[Path, Path]:
        """(certificate, key) files for a server on 127.0.0.1 or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = self._builder(subject, self.cert.subject, key.public_key())
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        tag = f"{common_name}-{uuid.uuid4().hex[:6]}"
        return (
            self._write(f"{tag}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            self._write(
                f"{tag}.key",
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            ),
        )


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pos-tls"))


async def tls_gateway(
    infra: Infra,
    member_app: ServiceApp,
    rewards_app: ServiceApp,
    tiering_app: ServiceApp,
    authority: Authority,
    *,
    mutual: bool,
) -> Gateway:
    cert, key = authority.issue("gateway", server=True)
    gw = build(
        gateway_settings(
            member_addr=f"127.0.0.1:{member_app.port}",
            rewards_addr=f"127.0.0.1:{rewards_app.port}",
            tiering_addr=f"127.0.0.1:{tiering_app.port}",
            auth_enabled=True,
            database_url=infra.database_url,
            redis_url=infra.redis_url,
            redis_namespace=infra.namespace,
            pos_tls_cert_file=str(cert),
            pos_tls_key_file=str(key),
            pos_tls_client_ca_file=str(authority.pem) if mutual else "",
        )
    )
    await gw.start()
    return gw


@pytest.fixture
async def tls_gateways(
    infra: Infra,
    member_app: ServiceApp,
    rewards_app: ServiceApp,
    tiering_app: ServiceApp,
    demo_stores: list[str],
    authority: Authority,
) -> AsyncIterator[dict[str, Gateway]]:
    made = {
        "tls": await tls_gateway(
            infra, member_app, rewards_app, tiering_app, authority, mutual=False
        ),
        "mtls": await tls_gateway(
            infra, member_app, rewards_app, tiering_app, authority, mutual=True
        ),
    }
    yield made
    for gw in made.values():
        await gw.stop()


async def identify(
    target: str, store: str, api_key: str, credentials: grpc.ChannelCredentials | None
) -> pos_pb2.IdentifyMemberResponse:
    interceptors = [StoreKeyInterceptor(store, api_key)]
    channel = (
        grpc.aio.secure_channel(target, credentials, interceptors=interceptors)
        if credentials is not None
        else grpc.aio.insecure_channel(target, interceptors=interceptors)
    )
    async with channel:
        request = pos_pb2.IdentifyMemberRequest(store_id=store, card=f"C-{uuid.uuid4().hex[:10]}")
        return await pos_pb2_grpc.PosServiceStub(channel).IdentifyMember(request, timeout=5)


async def test_the_pos_port_serves_tls_and_refuses_plaintext(
    tls_gateways: dict[str, Gateway], authority: Authority, client_admin: ClientAdmin
) -> None:
    till = await client_admin.create(ClientKind.POS, "tls till", store_id=STORE)
    target = f"127.0.0.1:{tls_gateways['tls'].pos_grpc_port}"
    trusted = grpc.ssl_channel_credentials(root_certificates=authority.pem.read_bytes())
    served = await identify(target, STORE, till.api_key, trusted)
    assert served.member_id
    with pytest.raises(grpc.aio.AioRpcError) as plaintext:
        await identify(target, STORE, till.api_key, None)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    # A till trusting another CA does not accept this server (nor an impostor's).
    elsewhere = authority.pem.parent / f"other-{uuid.uuid4().hex[:6]}"
    elsewhere.mkdir()
    stranger = grpc.ssl_channel_credentials(Authority(elsewhere, "another CA").pem.read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as untrusted:
        await identify(target, STORE, till.api_key, stranger)
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_needs_a_client_certificate_naming_the_store(
    tls_gateways: dict[str, Gateway], authority: Authority, client_admin: ClientAdmin
) -> None:
    till = await client_admin.create(ClientKind.POS, "mtls till", store_id=STORE)
    target = f"127.0.0.1:{tls_gateways['mtls'].pos_grpc_port}"
    ca = authority.pem.read_bytes()

    def with_certificate(store: str) -> grpc.ChannelCredentials:
        cert, key = authority.issue(store, server=False)
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
        )

    assert (await identify(target, STORE, till.api_key, with_certificate(STORE))).member_id
    # Another store's certificate with this store's key: refused by name.
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await identify(target, STORE, till.api_key, with_certificate(OTHER_STORE))
    assert (other.value.code(), error_info(other.value)[0]) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "CERTIFICATE_STORE_MISMATCH",
    )
    # The command-line till speaks mTLS too.
    cert, key = authority.issue(STORE, server=False)
    args = ["--target", target, "--api-key", till.api_key, "--ca-file", str(authority.pem)]
    args += ["--cert-file", str(cert), "--key-file", str(key)]
    args += ["identify", "--store-id", STORE, "--card", f"C-{uuid.uuid4().hex[:10]}"]
    assert await asyncio.to_thread(pos_cli.main, args) == 0
    # No certificate at all: the handshake fails.
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await identify(target, STORE, till.api_key, grpc.ssl_channel_credentials(ca))
    assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE
