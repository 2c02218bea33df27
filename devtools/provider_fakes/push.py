"""Fake of the generic app push contract (docs/journeys.md, "App push"):
`POST /` with a bearer token and {alias, title, body, page, message_id};
401 without the token, 400 without alias or body, 429 when rate limited,
200 {"id"} otherwise."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from . import Faults, dropped_answer


@dataclass
class FakePush:
    token: str
    faults: Faults = field(default_factory=Faults)
    sent: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> FastAPI:
        api = FastAPI(title="fake app push", openapi_url=None, docs_url=None, redoc_url=None)

        @api.post("/", response_model=None)
        async def push(request: Request) -> Any:
            if not secrets.compare_digest(
                request.headers.get("authorization", ""), f"Bearer {self.token}"
            ):
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            body = await request.json()
            fault = self.faults.next(body)
            if fault == "rate_limit":
                return JSONResponse({"error": "rate limited"}, status_code=429)
            if fault == "bad_data" or not body.get("alias") or not body.get("body"):
                return JSONResponse({"error": "alias and body are required"}, status_code=400)
            ref = f"push-{secrets.token_hex(8)}"
            self.sent.append({**body, "id": ref})
            if fault == "slow":
                await asyncio.sleep(self.faults.slow_seconds)
            if fault == "drop":
                return dropped_answer()
            return {"id": ref}

        return api
