"""The gateway: the only door into the platform.

One process serves HTTP/JSON (FastAPI, for mini-program backends and operators)
and the store POS gRPC API (grpc.aio) on the same event loop, and talks to the
domain services over gRPC. It owns no data; it validates what is cheap,
translates, and maps downstream failures to one error model.
"""
