"""Plumbing every service shares: settings, logging, tracing, errors, database
unit of work, transactional outbox, event consumers and the gRPC server shell.

Services import from here; nothing here imports a service.
"""
