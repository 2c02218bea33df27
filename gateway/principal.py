"""Who acts, for the audit trail: the authenticated client, never a body field.

Every audited write or read the gateway forwards (PII reads, merge, unmerge,
erasure, review decisions, manual point adjustments, coupon grants) records
`principal(request)`: the client id the door authenticated, and, when the
caller is the operator console, the operator user it asserts in the signed
`X-Operator-User` header, as `<client_id>/<user>` (client ids never hold a
"/"). A request body may add a free-text reason; it never names the actor.
"""

from __future__ import annotations

import re

from fastapi import Request

from servicekit.errors import InvalidArgument, PermissionDenied

from .auth.model import ClientKind, Credential

OPERATOR_USER_HEADER = "x-operator-user"
# An operator's login name at the console: short, printable, no separators.
_OPERATOR_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
# A gateway without the door (the benchmark's baseline) knows nobody.
UNAUTHENTICATED = "unauthenticated"


def principal(request: Request) -> str:
    """The audit principal of this request (docs/identity.md, "Trust boundaries")."""
    credential: Credential | None = getattr(request.state, "credential", None)
    user = request.headers.get(OPERATOR_USER_HEADER, "")
    if credential is None:
        return UNAUTHENTICATED
    if not user:
        return credential.client_id
    if credential.kind is not ClientKind.OPERATOR_CONSOLE:
        raise PermissionDenied(
            "only an operator console asserts an operator user",
            code="OPERATOR_USER_NOT_ALLOWED",
            field=OPERATOR_USER_HEADER,
        )
    if not _OPERATOR_USER.match(user):
        raise InvalidArgument(
            "X-Operator-User: 1 to 64 letters, digits, '_', '.', '@', '-'",
            code="INVALID_OPERATOR_USER",
            field=OPERATOR_USER_HEADER,
        )
    return f"{credential.client_id}/{user}"
