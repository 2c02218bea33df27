"""A POS client for humans and docs: call the gateway's PosService from a shell.

    export POS_API_KEY=<key_id>.<secret>   # this store's key (python -m gateway clients create)
    python -m gateway.pos_cli identify --store-id SH001 --phone 13912345678
    python -m gateway.pos_cli complete-order --store-id SH001 --pos-transaction-id T1001 \\
        --member-id <uuid> --paid-fen 3200 --gross-fen 3800

Prints the reply as JSON on stdout (exit 0), or the error status, stable code,
message and field as JSON on stderr (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.errors import error_info

from .auth.client import StoreKeyInterceptor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.pos_cli", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--target", default="127.0.0.1:50050", help="gateway POS gRPC host:port")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("POS_API_KEY", ""),
        help="this store's POS key, '<key_id>.<secret>' (default: $POS_API_KEY); "
        "`python -m gateway clients create --kind pos --store-id ...` prints one",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="call deadline in seconds")
    # TLS (docs/api.md, POS): the CA that signed the gateway's certificate and,
    # for mTLS, this till's certificate (naming its store) and key.
    parser.add_argument("--ca-file", default="", help="PEM CA of the gateway: connect with TLS")
    parser.add_argument("--cert-file", default="", help="PEM client certificate (mTLS)")
    parser.add_argument("--key-file", default="", help="PEM client key (mTLS)")
    commands = parser.add_subparsers(dest="command", required=True)

    identify = commands.add_parser(
        "identify", help="identify a member by phone (enrols if new), member code or card"
    )
    identify.add_argument("--store-id", required=True)
    key = identify.add_mutually_exclusive_group(required=True)
    key.add_argument("--phone")
    key.add_argument("--member-code", help="the dynamic code the mini-program shows")
    key.add_argument("--card", help="a POS member card number")

    order = commands.add_parser("complete-order", help="settle an order and accrue points")
    order.add_argument("--store-id", required=True)
    order.add_argument("--pos-transaction-id", required=True, help="the POS's own id; retry-safe")
    order.add_argument("--member-id", required=True)
    order.add_argument("--paid-fen", type=int, required=True, help="amount paid, in fen")
    order.add_argument(
        "--gross-fen", type=int, default=None, help="list price, in fen (default: paid)"
    )
    return parser


def _request(args: argparse.Namespace) -> tuple[str, Message]:
    if args.command == "identify":
        request = pos_pb2.IdentifyMemberRequest(store_id=args.store_id)
        if args.phone is not None:
            request.phone = args.phone
        elif args.member_code is not None:
            request.member_code = args.member_code
        else:
            request.card = args.card
        return "IdentifyMember", request
    return "CompleteOrder", pos_pb2.CompleteOrderRequest(
        store_id=args.store_id,
        pos_transaction_id=args.pos_transaction_id,
        member_id=args.member_id,
        paid_amount_fen=args.paid_fen,
        gross_amount_fen=args.paid_fen if args.gross_fen is None else args.gross_fen,
    )


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not args.ca_file:
        return None

    def read(path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        read(args.ca_file), read(args.key_file), read(args.cert_file)
    )


async def _call(
    target: str,
    method: str,
    request: Message,
    timeout: float,
    api_key: str = "",
    credentials: grpc.ChannelCredentials | None = None,
) -> Message:
    # The store key goes with the store the request names (x-store-id / x-api-key).
    store_id = getattr(request, "store_id", "")
    interceptors = [StoreKeyInterceptor(store_id, api_key)] if api_key else None
    channel = (
        grpc.aio.secure_channel(target, credentials, interceptors=interceptors)
        if credentials is not None
        else grpc.aio.insecure_channel(target, interceptors=interceptors)
    )
    async with channel:
        stub = pos_pb2_grpc.PosServiceStub(channel)
        return await getattr(stub, method)(request, timeout=timeout)  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    method, request = _request(args)
    try:
        reply = asyncio.run(
            _call(args.target, method, request, args.timeout, args.api_key, _credentials(args))
        )
    except grpc.aio.AioRpcError as exc:
        code, field = error_info(exc)
        error = {"status": exc.code().name, "code": code, "message": exc.details(), "field": field}
        print(json.dumps({"error": error}, ensure_ascii=False, indent=2), file=sys.stderr)
        return 1
    print(
        json_format.MessageToJson(
            reply,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            ensure_ascii=False,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
