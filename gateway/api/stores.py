"""Store routes for operators (rewards service): the brand's stores are data
an operator manages: create or update (code, name, city, address, time zone,
location for LBS), close or reopen, list. Guarantees: docs/api.md, "Stores"."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from loyalty.rewards.v1 import rewards_pb2

from .common import downstreams, problem_response

router = APIRouter()

StoreId = Annotated[
    str, Path(min_length=1, max_length=32, description="The store's code", examples=["SH001"])
]
STORE_EXAMPLE: JsonDict = {
    "store_id": "SH001",
    "name": "静安寺店",
    "city": "上海",
    "address": "上海市静安区南京西路1618号",
    "time_zone": "Asia/Shanghai",
    "latitude": 31.2232,
    "longitude": 121.4469,
    "status": "active",
}


class StoreFields(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{k: v for k, v in STORE_EXAMPLE.items() if k != "store_id"}]
        },
    )

    name: str = Field(min_length=1, max_length=200)
    city: str = Field(min_length=1, max_length=200)
    address: str = Field("", max_length=200)
    time_zone: str = Field("Asia/Shanghai", description="IANA time zone")
    latitude: float = Field(ge=-90, le=90, description="WGS-84 degrees")
    longitude: float = Field(ge=-180, le=180, description="WGS-84 degrees")
    status: Literal["active", "closed"] = "active"


class Store(StoreFields):
    model_config = ConfigDict(json_schema_extra={"examples": [STORE_EXAMPLE]})

    store_id: str


class Stores(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"stores": [STORE_EXAMPLE]}]})

    stores: list[Store]


class StoreStatus(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"status": "closed"}]}
    )

    status: Literal["active", "closed"]


def store_model(m: rewards_pb2.Store) -> Store:
    return Store(
        store_id=m.store_id,
        name=m.name,
        city=m.city,
        address=m.address,
        time_zone=m.time_zone or "Asia/Shanghai",
        latitude=m.latitude,
        longitude=m.longitude,
        status="closed" if m.status == "closed" else "active",
    )


@router.get("/v1/admin/stores", response_model=Stores, tags=["admin"], summary="Every store")
async def list_stores(request: Request) -> Stores:
    reply = await downstreams(request).rewards.call("ListStores", rewards_pb2.ListStoresRequest())
    return Stores(stores=[store_model(s) for s in reply.stores])


@router.put(
    "/v1/admin/stores/{store_id}",
    response_model=Store,
    tags=["admin"],
    summary="Create or update a store",
    responses={
        422: problem_response(
            "Malformed store; `field` names the culprit (INVALID_TIME_ZONE, INVALID_LOCATION,"
            " INVALID_STORE_ID, ...)"
        )
    },
)
async def put_store(store_id: StoreId, body: StoreFields, request: Request) -> Store:
    reply = await downstreams(request).rewards.call(
        "PutStore",
        rewards_pb2.PutStoreRequest(
            store=rewards_pb2.Store(store_id=store_id, **body.model_dump())
        ),
        {"store.": ""},
    )
    return store_model(reply)


@router.put(
    "/v1/admin/stores/{store_id}/status",
    response_model=Store,
    tags=["admin"],
    summary="Close a store (no new orders settle there) or open it again",
    responses={404: problem_response("UNKNOWN_STORE")},
)
async def set_status(store_id: StoreId, body: StoreStatus, request: Request) -> Store:
    reply = await downstreams(request).rewards.call(
        "SetStoreStatus",
        rewards_pb2.SetStoreStatusRequest(store_id=store_id, status=body.status),
    )
    return store_model(reply)
