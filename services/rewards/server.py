"""Wiring of the rewards service into the shared server shell."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.server import ServiceApp
from servicekit.settings import ServiceSettings

from .domain import DEFAULT_MAX_PAID_AMOUNT_FEN, OrderLimits
from .handlers import RewardsHandlers
from .schema import SCHEMA
from .servicer import RewardsServicer

NAME = "rewards"


class RewardsSettings(BaseSettings):
    """Business limits of the rewards service (REWARDS_* environment variables)."""

    model_config = SettingsConfigDict(env_prefix="REWARDS_", extra="ignore", frozen=True)

    # An order paying more than this is refused (ORDER_AMOUNT_TOO_LARGE).
    max_order_amount_fen: int = DEFAULT_MAX_PAID_AMOUNT_FEN


def build(settings: ServiceSettings, rewards: RewardsSettings | None = None) -> ServiceApp:
    rewards = rewards or RewardsSettings()
    handlers = RewardsHandlers(OrderLimits(max_paid_amount_fen=rewards.max_order_amount_fen))

    def wire(app: ServiceApp) -> None:
        assert app.db is not None and app.server is not None
        rewards_pb2_grpc.add_RewardsServiceServicer_to_server(
            RewardsServicer(app.db, handlers), app.server
        )

    return ServiceApp(
        NAME,
        settings,
        services=[rewards_pb2.DESCRIPTOR.services_by_name["RewardsService"]],
        wire=wire,
        schema=SCHEMA,
    )
