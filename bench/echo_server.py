"""Baseline server: an empty unary gRPC method, nothing else, in its own process.

`python -m bench.echo_server --port N` serves `/bench.Echo/Ping` (bytes in,
empty bytes out, no protobuf work) plus the standard health service, on
loopback, until SIGTERM/SIGINT. Its latency is the floor any gRPC hop on this
machine pays: Python grpc.aio, HTTP/2 framing, loopback, two processes.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Ping"


async def _ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


async def serve(host: str, port: int) -> None:
    # Same server options that matter for latency as servicekit's services.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE, {"Ping": grpc.unary_unary_rpc_method_handler(_ping)}
            )
        ]
    )
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"cannot bind {host}:{port}")
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
