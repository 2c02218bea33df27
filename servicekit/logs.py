"""JSON logs with the current trace id on every line."""

from __future__ import annotations

import json as jsonlib
import logging
import sys
import time

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter


class TraceContextFilter(logging.Filter):
    """Stamp each record with the active span's ids so logs join traces."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        else:
            record.trace_id = ""
            record.span_id = ""
        return True


# A record may carry its extra fields already encoded (the inside of a JSON
# object, e.g. `"route": "/x", "status": "200"`): a per-request line (the
# gateway's access log) then skips the generic formatter's walk over every
# record attribute. The line is the same as with the fields as `extra`.
ENCODED_FIELDS = "encoded_fields"


class FastJsonFormatter(JsonFormatter):
    """The service's JSON line format. Formats the time once per second (the
    generic path calls strftime for every line), and writes a record carrying
    ENCODED_FIELDS straight out: same keys, same order, same text."""

    def __init__(self, service: str) -> None:
        super().__init__(
            "{asctime}{levelname}{name}{message}{trace_id}{span_id}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service},
        )
        self._service = jsonlib.dumps(service)
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        # logging.Formatter.default_msec_format, "%s,%03d"
        return f"{self._second_text},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__.get(ENCODED_FIELDS)
        if fields is None or record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.asctime = self.formatTime(record)
        record.message = record.getMessage()
        dumps = jsonlib.dumps
        return (
            f'{{"time": {dumps(record.asctime)}, "level": {dumps(record.levelname)},'
            f' "logger": {dumps(record.name)}, "message": {dumps(record.message)},'
            f' "trace_id": {dumps(getattr(record, "trace_id", None))},'
            f' "span_id": {dumps(getattr(record, "span_id", None))},'
            f' "service": {self._service}, {fields}}}'
        )


def configure_logging(service: str, level: str = "INFO", json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContextFilter())
    if json:
        handler.setFormatter(FastJsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request's URL at INFO, query string included: provider
    # access tokens and WeChat's app secret travel there (never logged).
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
