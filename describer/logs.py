"""JSON-line logs on stdout that Cloud Logging parses into structured entries.

The batch id and the source being worked on live in context variables, so
every line logged while one image is processed carries them without threading
them through every call (each asyncio task gets its own copy of the context).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

batch_var: ContextVar[str | None] = ContextVar("batch_id", default=None)
source_var: ContextVar[str | None] = ContextVar("source", default=None)
trace_var: ContextVar[str | None] = ContextVar("trace", default=None)

_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}
# Attributes every LogRecord has: anything else came from ``extra=`` and is logged as a field.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "source"}
_ROOT = "describer"


class JsonFormatter(logging.Formatter):
    """One JSON object per line with ``severity`` and ``message`` as Cloud Logging expects."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        batch = batch_var.get()
        if batch:
            entry["batch_id"] = batch
        source = getattr(record, "source", None) or source_var.get()
        if source:
            entry["source"] = source
        trace = trace_var.get()
        if trace:
            entry["logging.googleapis.com/trace"] = trace
        for name, value in vars(record).items():
            if name not in _STANDARD and value is not None and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Send the package's logs to ``stream`` (stdout) as JSON lines (idempotent)."""
    logger = logging.getLogger(_ROOT)
    if any(getattr(h, "_describer", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler._describer = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def trace_from_headers(headers: Mapping[str, str], project: str | None) -> str | None:
    """The trace id from X-Cloud-Trace-Context or W3C traceparent (header names ignore case)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    trace_id = None
    cloud = lowered.get("x-cloud-trace-context")
    if cloud:
        trace_id = cloud.split("/", 1)[0].strip()
    else:
        parent = lowered.get("traceparent", "").split("-")
        if len(parent) == 4:
            trace_id = parent[1]
    if not trace_id or not trace_id.isalnum():
        return None
    return f"projects/{project}/traces/{trace_id}" if project else trace_id
