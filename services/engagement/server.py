"""Wiring of the engagement service into the shared server shell.

A shell until the engagement issue: health, reflection, the outbox relay and
graceful shutdown work; journeys and their consumers arrive with that issue.
"""

from __future__ import annotations

from loyalty.engagement.v1 import engagement_pb2, engagement_pb2_grpc
from servicekit.server import ServiceApp
from servicekit.settings import ServiceSettings

from .schema import SCHEMA
from .servicer import EngagementServicer

NAME = "engagement"


def build(settings: ServiceSettings) -> ServiceApp:
    def wire(app: ServiceApp) -> None:
        assert app.server is not None
        engagement_pb2_grpc.add_EngagementServiceServicer_to_server(
            EngagementServicer(), app.server
        )

    return ServiceApp(
        NAME,
        settings,
        services=[engagement_pb2.DESCRIPTOR.services_by_name["EngagementService"]],
        wire=wire,
        schema=SCHEMA,
    )
