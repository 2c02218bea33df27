"""What every router shares: path parameters, error responses, downstream access."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Path, Request
from google.protobuf import message, timestamp_pb2
from pydantic import BaseModel

from servicekit.protos import timestamp

from ..clients import Downstreams
from ..errors import Problem

MEMBER_ID_EXAMPLE = "0b6a3c1e-5d7f-4b8e-9a2c-1f3e5d7a9b0c"

MemberId = Annotated[
    uuid.UUID,
    Path(description="The member's id (a UUID)", examples=[MEMBER_ID_EXAMPLE]),
]


def problem_response(description: str, model: type[BaseModel] = Problem) -> dict[str, Any]:
    return {"model": model, "description": description}


MEMBER_ERRORS: dict[int | str, dict[str, Any]] = {
    422: problem_response("Malformed request; `field` names the culprit"),
    404: problem_response("No such member"),
    503: problem_response("A backing service is unavailable; retry later"),
}


def utc(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def optional_utc(m: message.Message, field: str) -> datetime | None:
    """A reply's optional time: None when the field is unset."""
    return utc(getattr(m, field)) if m.HasField(field) else None


def optional_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A request's optional time: None leaves the field unset (the service's "now")."""
    return None if value is None else timestamp(value)


def downstreams(request: Request) -> Downstreams:
    return request.app.state.downstreams  # type: ignore[no-any-return]
