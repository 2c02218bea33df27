"""Wiring of the member service into the shared server shell."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from loyalty.member.v1 import member_pb2, member_pb2_grpc
from servicekit.redis_client import preload_scripts
from servicekit.safety import refuse_unsafe
from servicekit.server import ServiceApp
from servicekit.settings import ServiceSettings

from .cache import ResolveCache
from .handlers import MemberHandlers
from .metrics import MemberMetrics
from .partitions import partitioned_tables
from .pii import PiiVault, parse_keyring
from .policy import load_policy
from .schema import SCHEMA
from .servicer import MemberServicer
from .settings import member_settings, production_problems
from .velocity import VelocityWatch

NAME = "member"


def _now() -> datetime:
    return datetime.now(UTC)


def build(settings: ServiceSettings, clock: Callable[[], datetime] = _now) -> ServiceApp:
    """`clock` is the velocity watch's (tests pin it)."""
    s = member_settings(settings)
    refuse_unsafe(NAME, s.loyalty_env, production_problems(s))
    # Bad keys or a bad policy stop the process here, before it serves anything.
    vault = PiiVault(s.pii_key, parse_keyring(s.pii_encryption_keys), s.pii_active_key_id)
    policy = load_policy(s.identity_policy_path or None)
    handlers = MemberHandlers(vault, policy, s.member_code_secret.encode())
    metrics = MemberMetrics()

    def wire(app: ServiceApp) -> None:
        assert app.db is not None and app.server is not None and app.redis is not None
        cache = (
            ResolveCache(app.redis, s.redis_namespace, s.resolve_cache_ttl_seconds)
            if s.resolve_cache_ttl_seconds > 0
            else None
        )
        velocity = VelocityWatch(
            app.redis, s.redis_namespace, s.velocity_stores, s.velocity_window_seconds, clock
        )
        # The cache's and the velocity watch's Lua scripts, loaded on every
        # node now so the first calls do not all meet NOSCRIPT (as the
        # gateway's gatekeeper does). wire runs inside ServiceApp.start, on
        # its loop; the task ends on its own (success, or a logged failure).
        scripts = [*(cache.scripts if cache is not None else []), *velocity.scripts]
        app.scripts_loaded = asyncio.get_running_loop().create_task(  # type: ignore[attr-defined]
            preload_scripts(app.redis, scripts, NAME), name="member-scripts"
        )
        member_pb2_grpc.add_MemberServiceServicer_to_server(
            MemberServicer(app.db, handlers, s.identify_max_attempts, cache, metrics, velocity),
            app.server,
        )
        if s.member_metrics_port is not None:
            metrics.start(s.member_metrics_host, s.member_metrics_port)

    app = ServiceApp(
        NAME,
        s,
        services=[member_pb2.DESCRIPTOR.services_by_name["MemberService"]],
        wire=wire,
        schema=SCHEMA,
    )
    # For tests and the process's own use; served when METRICS_PORT is set.
    app.member_metrics = metrics  # type: ignore[attr-defined]
    # Partitions past their retention dropped, instead of rows pruned.
    app.partition(*partitioned_tables(s))
    return app
