"""The gateway's door: who is calling (credentials), what it may do (scopes),
how often (rate limits), and for whom (store, asserted member).

- model.py: clients, kinds, scopes; crypto.py: key ids, secrets at rest, request signing
- policy.py: the one table of route / RPC -> scope (fail-closed)
- signin.py: the one sign-in sequence (bounds, key lookup, verify, then nonce
  and rate limit for the verified caller) that every door below uses
- registry.py: the in-memory credential cache, reloaded when the revocation epoch moves
- http.py: the ASGI middleware for HTTP; pos.py: the gRPC interceptor for the POS
- members.py: the mini-program's member assertion (openid -> member id)
- repository.py + admin.py: the store and `python -m gateway clients ...`
- client.py: what a caller uses to sign (httpx Auth, gRPC interceptor)
"""
