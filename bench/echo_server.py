"""Baseline server: an empty unary gRPC method, nothing else, in its own process.

`python -m bench.echo_server --port N` serves `/bench.Echo/Ping` (bytes in,
empty bytes out, no protobuf work) plus the standard health service, on
loopback, until SIGTERM/SIGINT. Its latency is the floor any gRPC hop on this
machine pays: Python grpc.aio, HTTP/2 framing, loopback, two processes.

Variants, for the server comparison (bench/servers.py, issue 19):
- `--loop asyncio`: grpc.aio on the default event loop instead of uvloop.
- `--server sync --workers N`: grpc's synchronous server with a pool of N threads.
- `--server sync --bridge`: the same, each call running an (empty) coroutine
  on one event-loop thread (run_coroutine_threadsafe): what a sync server
  would cost the services, whose code is asyncio (asyncpg, redis.asyncio).
- `--interceptors drain,errors,metrics`: grpc.aio with servicekit's server
  chain (servicekit.server.create_grpc_server), any subset, in that order;
  `--servicekit-server` alone: that server (its options, servicekit imported)
  with no interceptor.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import threading
from collections.abc import Coroutine
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Ping"
CHAIN = ("drain", "errors", "metrics")


async def _ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


def _echo_handlers(ping: Any) -> list[grpc.GenericRpcHandler]:
    return [
        grpc.method_handlers_generic_handler(
            SERVICE, {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
        )
    ]


def _aio_server(chain: list[str], servicekit_server: bool = False) -> grpc.aio.Server:
    if not chain and not servicekit_server:
        # Same server options that matter for latency as servicekit's services.
        return grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    from servicekit.metrics import ServiceMetrics
    from servicekit.server import Drain, create_grpc_server

    return create_grpc_server(
        60_000,
        1.0,
        [ServiceMetrics("echo").interceptor()] if "metrics" in chain else [],
        traced=False,
        drain=Drain() if "drain" in chain else None,
        domain_errors="errors" in chain,
    )


async def serve(host: str, port: int, chain: list[str], servicekit_server: bool = False) -> None:
    server = _aio_server(chain, servicekit_server)
    server.add_generic_rpc_handlers(_echo_handlers(_ping))
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"cannot bind {host}:{port}")
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    # As a service's process does (servicekit.server.freeze_startup_heap): with
    # servicekit imported, collections walking its modules would be billed to the calls.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


class _LoopThread:
    """One event loop (uvloop when installed) in a thread of its own, for a sync server's bridge."""

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="bridge").start()

    def run(self, coro: Coroutine[Any, Any, bytes]) -> bytes:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


def serve_sync(host: str, port: int, workers: int, bridge: bool) -> None:
    async def empty() -> bytes:
        return b""

    if bridge:
        loop_thread = _LoopThread()

        def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
            return loop_thread.run(empty())
    else:

        def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
            return b""

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=[("grpc.so_reuseport", 0)]
    )
    server.add_generic_rpc_handlers(_echo_handlers(ping))
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise SystemExit(f"cannot bind {host}:{port}")
    server.start()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1.0).wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", choices=["aio", "sync"], default="aio")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--workers", type=int, default=10, help="sync: thread pool size")
    parser.add_argument("--bridge", action="store_true", help="sync: run a coroutine per call")
    parser.add_argument(
        "--interceptors", default="", help=f"aio: comma-separated subset of {','.join(CHAIN)}"
    )
    parser.add_argument(
        "--servicekit-server",
        action="store_true",
        help="aio: servicekit's create_grpc_server (its options, its imports) even with no interceptor",
    )
    args = parser.parse_args()
    chain = [c for c in args.interceptors.split(",") if c]
    unknown = set(chain) - set(CHAIN)
    if unknown:
        parser.error(f"unknown interceptors {sorted(unknown)}; choose from {CHAIN}")
    if args.server == "sync":
        serve_sync(args.host, args.port, args.workers, args.bridge)
        return
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(serve(args.host, args.port, chain, args.servicekit_server))
            return
    asyncio.run(serve(args.host, args.port, chain, args.servicekit_server))


if __name__ == "__main__":
    main()
