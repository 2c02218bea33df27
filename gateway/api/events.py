"""Dead-lettered stream events (operators, scope admin:events): the list across
every producer's stream and consumer group, and the redrive of one, audited
under the authenticated principal (gateway/principal.py) on the redrive audit
stream beside the dead letters (servicekit/deadletters.py).

The gateway reads the event streams' Redis directly (the door's client, same
REDIS_URL and namespace as the services): dead letters belong to no one
service, and the redrive is a Redis operation, not a service's.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict
from redis.exceptions import RedisError

from servicekit import deadletters
from servicekit.errors import Unavailable

from ..auth.door import Door
from ..principal import principal
from .common import problem_response

log = logging.getLogger(__name__)

router = APIRouter(
    responses={
        422: problem_response("Malformed stream, group or id; `field` names it"),
        503: problem_response("The events' Redis is unavailable; retry later"),
    }
)

DEAD_LETTER_EXAMPLE: JsonDict = {
    "stream": "loyalty:events:rewards",
    "group": "tiering",
    "id": "1733300000000-0",
    "event_id": "0b4f6c2e-3d8a-4e1f-9a7b-5c6d7e8f9a0b",
    "event_type": "loyalty.events.v1.OrderCompleted",
    "member_id": "8d3c5f0e-7a2b-4c1d-9e8f-1a2b3c4d5e6f",
    "error": "RuntimeError('ledger says no')",
    "attempts": 5,
    "dead_lettered_at": "2026-12-04T08:13:20Z",
}


class DeadLetter(BaseModel):
    stream: str = Field(description="The source stream, `<namespace>:events:<producer>`")
    group: str = Field(description="The consumer group that gave up on it")
    id: str = Field(description="Its entry id on the dead-letter stream")
    event_id: str
    event_type: str
    member_id: str = Field(description="Empty when the event names no member")
    error: str = Field(description="The last error of its handler")
    attempts: int
    dead_lettered_at: datetime = Field(description="RFC 3339, UTC")


class DeadLetters(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"dead_letters": [DEAD_LETTER_EXAMPLE]}]}
    )

    dead_letters: list[DeadLetter]


class RedriveRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{k: DEAD_LETTER_EXAMPLE[k] for k in ("stream", "group", "id")}]
        }
    )

    stream: str = Field(min_length=1, max_length=200)
    group: str = Field(min_length=1, max_length=64)
    id: str = Field(min_length=1, max_length=64)


class Redriven(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"dead_letter": DEAD_LETTER_EXAMPLE, "published_id": "1733300900000-0"}]
        }
    )

    dead_letter: DeadLetter
    published_id: str = Field(description="The envelope's new entry id on the source stream")


def _door(request: Request) -> Door:
    door: Door | None = getattr(request.app.state, "door", None)
    if door is None:  # auth off (a test gateway): no Redis of the door
        raise Unavailable("the gateway has no Redis client for the event streams")
    return door


def _shown(d: deadletters.DeadLetter) -> DeadLetter:
    return DeadLetter(
        stream=d.stream,
        group=d.group,
        id=d.entry_id,
        event_id=d.event_id,
        event_type=d.event_type,
        member_id=d.member_id,
        error=d.error,
        attempts=d.attempts,
        dead_lettered_at=d.dead_lettered_at,
    )


@router.get(
    "/v1/admin/dead-letters",
    response_model=DeadLetters,
    tags=["admin"],
    summary="Dead-lettered events of every producer and consumer group, oldest first in each",
)
async def list_dead_letters(
    request: Request,
    per_stream: Annotated[
        int, Query(ge=1, le=500, description="At most this many of each (stream, group)")
    ] = 100,
) -> DeadLetters:
    door = _door(request)
    try:
        found = await deadletters.list_dead_letters(door.redis, door.namespace, per_stream)
    except RedisError as exc:
        raise Unavailable(f"the events' Redis did not answer: {type(exc).__name__}") from None
    return DeadLetters(dead_letters=[_shown(d) for d in found])


@router.post(
    "/v1/admin/dead-letters/redrive",
    response_model=Redriven,
    tags=["admin"],
    summary="Re-publish one dead letter to its source stream and delete it (audited)",
    responses={404: problem_response("No such dead letter, or it was redriven already")},
)
async def redrive_dead_letter(body: RedriveRequest, request: Request) -> Redriven:
    door = _door(request)
    operator = principal(request)
    try:
        done = await deadletters.redrive(
            door.redis, door.namespace, body.stream, body.group, body.id, operator
        )
    except RedisError as exc:
        raise Unavailable(f"the events' Redis did not answer: {type(exc).__name__}") from None
    extra: dict[str, Any] = {
        "operator": operator,
        "stream": body.stream,
        "group": body.group,
        "dead_letter_id": body.id,
        "event_id": done.dead_letter.event_id,
        "published_id": done.published_id,
    }
    log.info("dead letter redriven", extra=extra)
    return Redriven(dead_letter=_shown(done.dead_letter), published_id=done.published_id)
