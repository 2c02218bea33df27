"""Client administration: create, rotate, revoke, list. Used by
`python -m gateway clients ...`, by `make run` (demo clients) and by tests.

Every change bumps the revocation epoch in Redis after its transaction
commits, so every gateway instance reloads its credentials on its next request.
A secret is returned once, at creation or rotation, and never again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass

import asyncpg

from loyalty.rewards.v1 import rewards_pb2
from servicekit.db import create_pool
from servicekit.errors import AlreadyExists, DomainError, InvalidArgument, NotFound
from servicekit.redis_client import RedisClient, create_redis

from ..clients import STORE_OPEN, RewardsClient
from ..ratelimit import epoch_key, nonce_epoch_key
from ..settings import GatewaySettings
from . import repository as repo
from .crypto import SecretBox, api_key, new_key_id, new_secret
from .model import DEFAULT_SCOPES, KNOWN_SCOPES, OPERATOR_KINDS, ClientKind, operator_only

_CLIENT_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# A WeChat app id (wx + 16 hex in practice; kept loose for test and demo apps).
_APP_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _app_ids(kind: ClientKind, app_ids: Sequence[str]) -> list[str]:
    """A mini-program backend names at least one app; no other kind names any."""
    apps = sorted({a.strip() for a in app_ids})
    if kind is not ClientKind.MINIPROGRAM_BACKEND:
        if apps:
            raise InvalidArgument(
                "only a miniprogram_backend client is bound to apps",
                code="APP_IDS_FOR_MINIPROGRAM_ONLY",
                field="app_ids",
            )
        return []
    if not apps:
        raise InvalidArgument(
            "a miniprogram_backend client needs --app-id (repeatable): the WeChat apps "
            "whose openids it may assert",
            code="APP_IDS_REQUIRED",
            field="app_ids",
        )
    bad = [a for a in apps if not _APP_ID.match(a)]
    if bad:
        raise InvalidArgument(f"not an app id: {bad[0]!r}", code="INVALID_APP_ID", field="app_ids")
    return apps


@dataclass(frozen=True)
class IssuedKey:
    client_id: str
    key_id: str
    secret: str
    # What a POS puts in `x-api-key`; HTTP callers sign with key_id + secret.
    api_key: str


# Whether a store exists (and is open) in rewards: a POS client is registered
# only for one (issue 13, item 26).
StoreCheck = Callable[[str], Awaitable[bool]]


def open_store_check(rewards: RewardsClient) -> StoreCheck:
    """Ask rewards (which owns stores) whether a store exists and is open;
    rewards unreachable fails the registration (DEPENDENCY_UNAVAILABLE)."""

    async def store_exists(store_id: str) -> bool:
        try:
            # Not the gateway's cached read: a store closed a moment ago is closed.
            store = await rewards.call("GetStore", rewards_pb2.GetStoreRequest(store_id=store_id))
            return bool(store.status == STORE_OPEN)
        except DomainError as exc:
            if exc.code == "UNKNOWN_STORE":
                return False
            raise

    return store_exists


class ClientAdmin:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: RedisClient,
        box: SecretBox,
        namespace: str,
        store_exists: StoreCheck | None = None,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._box = box
        self._namespace = namespace
        self._store_exists = store_exists

    async def _changed(self) -> None:
        await self._redis.incr(epoch_key(self._namespace))

    async def create(
        self,
        kind: ClientKind,
        name: str,
        *,
        client_id: str = "",
        store_id: str = "",
        scopes: Sequence[str] = (),
        rate_per_second: float | None = None,
        burst: int | None = None,
        app_ids: Sequence[str] = (),
    ) -> IssuedKey:
        client_id = client_id or f"{kind.value.split('_')[0]}-{secrets.token_hex(4)}"
        if not _CLIENT_ID.match(client_id):
            raise InvalidArgument(
                "client id: lower-case letters, digits, '_', '.', '-'; at most 63",
                code="INVALID_CLIENT_ID",
                field="client_id",
            )
        if (kind is ClientKind.POS) != bool(store_id.strip()):
            raise InvalidArgument(
                "a pos client needs --store-id, and only a pos client has one",
                code="STORE_ID_FOR_POS_ONLY",
                field="store_id",
            )
        if self._store_exists is not None and store_id.strip():
            if not await self._store_exists(store_id.strip()):
                raise NotFound(
                    f"store {store_id.strip()} does not exist or is closed",
                    code="UNKNOWN_STORE",
                    field="store_id",
                )
        granted = list(scopes) or list(DEFAULT_SCOPES[kind])
        unknown = sorted(set(granted) - KNOWN_SCOPES)
        if unknown:
            raise InvalidArgument(
                f"unknown scopes: {', '.join(unknown)}", code="UNKNOWN_SCOPE", field="scopes"
            )
        misplaced = sorted(s for s in granted if operator_only(s))
        if misplaced and kind not in OPERATOR_KINDS:
            raise InvalidArgument(
                f"{', '.join(misplaced)} only for operator_console or ops_tooling clients,"
                f" not {kind.value}",
                code="SCOPE_NOT_FOR_KIND",
                field="scopes",
            )
        if (rate_per_second is None) != (burst is None) or (
            rate_per_second is not None and (rate_per_second <= 0 or (burst or 0) < 1)
        ):
            raise InvalidArgument(
                "give both a positive rate and a burst of at least 1, or neither",
                code="INVALID_RATE_LIMIT",
                field="rate_per_second",
            )
        # Last of the checks: a refusal of the kind's scopes or limits names those.
        apps = _app_ids(kind, app_ids)
        key_id, secret = new_key_id(), new_secret()
        async with self._pool.acquire() as conn, conn.transaction():
            created = await repo.insert_client(
                conn,
                client_id,
                kind.value,
                name,
                store_id.strip(),
                granted,
                rate_per_second,
                burst,
                apps,
            )
            if not created:
                raise AlreadyExists(
                    f"client {client_id} exists", code="CLIENT_EXISTS", field="client_id"
                )
            await repo.insert_key(conn, key_id, client_id, self._box.seal(key_id, secret))
        # Before the epoch moves (gateways load the key then): a new client has
        # no nonce a lost store could forget (ratelimit.nonce_epoch_key).
        await self._redis.set(nonce_epoch_key(self._namespace, client_id), 0, nx=True)
        await self._changed()
        return IssuedKey(client_id, key_id, secret, api_key(key_id, secret))

    async def set_apps(self, client_id: str, app_ids: Sequence[str]) -> list[str]:
        """Bind a mini-program backend to exactly these apps (replacing the old
        list): a client registered before app binding speaks for none."""
        async with self._pool.acquire() as conn, conn.transaction():
            kind = await repo.live_client_kind(conn, client_id)
            if kind is None:
                raise NotFound(
                    f"no active client {client_id}", code="UNKNOWN_CLIENT", field="client_id"
                )
            apps = _app_ids(ClientKind(kind), app_ids)
            await repo.set_app_ids(conn, client_id, apps)
        await self._changed()
        return apps

    async def rotate(self, client_id: str) -> IssuedKey:
        """A new key beside the existing ones (both valid): switch callers over,
        then revoke the old key."""
        key_id, secret = new_key_id(), new_secret()
        async with self._pool.acquire() as conn, conn.transaction():
            if not await repo.lock_live_client(conn, client_id):
                raise NotFound(
                    f"no active client {client_id}", code="UNKNOWN_CLIENT", field="client_id"
                )
            await repo.insert_key(conn, key_id, client_id, self._box.seal(key_id, secret))
        await self._changed()
        return IssuedKey(client_id, key_id, secret, api_key(key_id, secret))

    async def revoke_key(self, key_id: str) -> None:
        async with self._pool.acquire() as conn:
            revoked = await repo.revoke_key(conn, key_id)
        if not revoked:
            raise NotFound(f"no active key {key_id}", code="UNKNOWN_KEY", field="key_id")
        await self._changed()

    async def revoke_client(self, client_id: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            revoked = await repo.revoke_client(conn, client_id)
        if not revoked:
            raise NotFound(
                f"no active client {client_id}", code="UNKNOWN_CLIENT", field="client_id"
            )
        await self._changed()

    async def fresh_key(
        self,
        kind: ClientKind,
        name: str,
        client_id: str,
        *,
        store_id: str = "",
        app_ids: Sequence[str] = (),
        scopes: Sequence[str] = (),
    ) -> IssuedKey:
        """For `make run`: the client, created if new (with `scopes`, or its
        kind's defaults), with one new key and its older keys revoked (a secret
        cannot be shown again, so a restart issues another)."""
        existing = {c.client_id: c for c in await self.list()}.get(client_id)
        if existing is None or existing.revoked_at is not None:
            if existing is not None:
                raise AlreadyExists(
                    f"client {client_id} was revoked", code="CLIENT_REVOKED", field="client_id"
                )
            return await self.create(
                kind, name, client_id=client_id, store_id=store_id, app_ids=app_ids, scopes=scopes
            )
        issued = await self.rotate(client_id)
        for key_id in existing.active_keys:
            await self.revoke_key(key_id)
        return issued

    async def list(self) -> list[repo.ClientRow]:
        async with self._pool.acquire() as conn:
            return await repo.list_clients(conn)


# ---- the command ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway clients",
        description="Register gateway clients and manage their keys. "
        "A secret is printed once, when created; store it then.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="register a client and print its first key")
    create.add_argument("--kind", required=True, choices=[k.value for k in ClientKind])
    create.add_argument("--name", required=True, help="who this is, for people")
    create.add_argument("--client-id", default="", help="default: generated")
    create.add_argument("--store-id", default="", help="pos only: the one store it acts for")
    create.add_argument(
        "--scope",
        action="append",
        default=[],
        help=f"repeatable; default: the kind's scopes. Known: {', '.join(sorted(KNOWN_SCOPES))}",
    )
    create.add_argument("--rate", type=float, default=None, help="requests/s (default: kind's)")
    create.add_argument("--burst", type=int, default=None, help="bucket size (with --rate)")
    create.add_argument(
        "--app-id",
        action="append",
        default=[],
        help="miniprogram_backend only, required, repeatable: a WeChat app id it speaks for",
    )
    set_apps = commands.add_parser(
        "set-apps", help="bind a miniprogram_backend client to exactly these WeChat app ids"
    )
    set_apps.add_argument("client_id")
    set_apps.add_argument("--app-id", action="append", required=True)
    commands.add_parser("list", help="clients, scopes and active key ids (never secrets)")
    rotate = commands.add_parser("rotate", help="add a new key; the old ones stay valid")
    rotate.add_argument("client_id")
    revoke = commands.add_parser("revoke", help="revoke one key, or a client and all its keys")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--key-id")
    which.add_argument("--client-id")
    return parser


async def run(
    argv: Sequence[str], database_url: str, redis_url: str, namespace: str, box: SecretBox
) -> object:
    args = _parser().parse_args(argv)
    pool = await create_pool(database_url, min_size=1, max_size=2)
    redis = create_redis(redis_url)
    settings = GatewaySettings()
    rewards = RewardsClient(str(settings.rewards_addr), settings.downstream_timeout_seconds)
    admin = ClientAdmin(pool, redis, box, namespace, open_store_check(rewards))
    try:
        if args.command == "create":
            issued = await admin.create(
                ClientKind(args.kind),
                args.name,
                client_id=args.client_id,
                store_id=args.store_id,
                scopes=args.scope,
                rate_per_second=args.rate,
                burst=args.burst,
                app_ids=args.app_id,
            )
            return asdict(issued)
        if args.command == "set-apps":
            apps = await admin.set_apps(args.client_id, args.app_id)
            return {"client_id": args.client_id, "app_ids": apps}
        if args.command == "rotate":
            return asdict(await admin.rotate(args.client_id))
        if args.command == "revoke":
            if args.key_id:
                await admin.revoke_key(args.key_id)
                return {"revoked_key_id": args.key_id}
            await admin.revoke_client(args.client_id)
            return {"revoked_client_id": args.client_id}
        return [
            {
                **asdict(c),
                "created_at": c.created_at.isoformat(),
                "revoked_at": c.revoked_at.isoformat() if c.revoked_at else None,
            }
            for c in await admin.list()
        ]
    finally:
        await rewards.close()
        await redis.aclose()
        await pool.close()


def main(
    argv: Sequence[str], database_url: str, redis_url: str, namespace: str, key_b64: str
) -> int:
    try:
        out = asyncio.run(run(argv, database_url, redis_url, namespace, SecretBox(key_b64)))
    except DomainError as exc:
        error = {"code": exc.code, "message": exc.message, "field": exc.field}
        print(json.dumps({"error": error}), file=sys.stderr)
        return 1
    print(json.dumps(out, ensure_ascii=False, indent=2))
    return 0
