"""Wiring of the member service into the shared server shell."""

from __future__ import annotations

from loyalty.member.v1 import member_pb2, member_pb2_grpc
from servicekit.server import ServiceApp
from servicekit.settings import ServiceSettings

from .handlers import MemberHandlers
from .pii import PiiVault
from .schema import SCHEMA
from .servicer import MemberServicer

NAME = "member"


def build(settings: ServiceSettings) -> ServiceApp:
    vault = PiiVault(settings.pii_key)

    def wire(app: ServiceApp) -> None:
        assert app.db is not None and app.server is not None
        member_pb2_grpc.add_MemberServiceServicer_to_server(
            MemberServicer(app.db, MemberHandlers(vault)), app.server
        )

    return ServiceApp(
        NAME,
        settings,
        services=[member_pb2.DESCRIPTOR.services_by_name["MemberService"]],
        wire=wire,
        schema=SCHEMA,
    )
