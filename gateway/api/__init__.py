"""HTTP routes, one router module per domain; gateway/http.py mounts them.

Each module owns its request/response models (explicit pydantic schemas) and
calls services only through gateway.clients.Downstreams.
"""
