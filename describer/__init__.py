"""Describe images with Gemini, concurrently, into Cloud Storage.

The public surface: settings, the per-process runtime, and the two invocation
handlers that ``main.py`` wires to functions-framework.
"""

from __future__ import annotations

from .errors import Code, ConfigError, DescriberError, RequestError, SourceError, StorageUnavailable
from .events import handle_storage_event
from .http_api import HttpReply, framework_error_reply, handle_http, read_capped
from .instance import start_instance
from .logs import configure as configure_logging
from .records import Record
from .runtime import Runtime
from .settings import Settings

__all__ = [
    "Code",
    "ConfigError",
    "DescriberError",
    "HttpReply",
    "Record",
    "RequestError",
    "Runtime",
    "Settings",
    "SourceError",
    "StorageUnavailable",
    "configure_logging",
    "framework_error_reply",
    "handle_http",
    "handle_storage_event",
    "read_capped",
    "start_instance",
]
