"""One JSON access-log line per request, without personal data.

The line is built only from what cannot carry PII: the route *template* (never
the raw path or query string, where a phone or openid could sit), status,
stable error code, latency, the calling client, and the member id or store id
(pseudonymous ids). Request and response bodies are never read.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from servicekit.logs import ENCODED_FIELDS

if TYPE_CHECKING:
    from .metrics import Observation

# Its own logger, so operators can route or silence access logs apart from
# application logs (LOG_LEVEL applies; set this one to WARNING to drop them).
log = logging.getLogger("gateway.access")


def write(obs: Observation) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    # The JSON formatter (servicekit/logs.py) adds time, level, service and the
    # trace id, so each line joins its trace. The fields go pre-encoded (one C
    # json call): the generic formatter's walk over the record's attributes was
    # most of the line's cost, paid on every request.
    fields = json.dumps(
        {
            "protocol": obs.protocol,
            "method": obs.method,
            "route": obs.route,
            "status": obs.status,
            "code": obs.code,
            "duration_ms": round(obs.seconds * 1000, 3),
            "client": obs.client,
            "member_id": obs.member_id,
            "store_id": obs.store_id,
        }
    )
    log.info(
        "%s %s %s",
        obs.method,
        obs.route,
        obs.status,
        extra={ENCODED_FIELDS: fields[1:-1]},
    )
