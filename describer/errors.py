"""The package's exceptions and the stable error codes users rely on.

    DescriberError               root: anything this package raises on purpose
    ├── ConfigError              the settings cannot work; the function refuses to start
    ├── RequestError             a whole HTTP request is malformed (carries the 4xx status)
    ├── SourceError              one source failed; becomes an error record, never escapes a batch
    ├── StorageUnavailable       results could not be read or written (``permanent`` or not)
    └── TransientFailure         an upload or manifest ended for a passing cause: redeliver it

Per-source failures are data (:class:`SourceError` turns into a record). Only
``ConfigError`` stops an instance; a storage event ends in an exception (and so
is redelivered) only for a StorageUnavailable that is not permanent or a
TransientFailure.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Stable per-source error codes: part of the public contract."""

    INVALID_SOURCE = "invalid_source"
    FORBIDDEN_SOURCE = "forbidden_source"
    NOT_FOUND = "not_found"
    DOWNLOAD_FAILED = "download_failed"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_IMAGE = "unsupported_image"
    BLOCKED = "blocked"
    QUOTA_EXHAUSTED = "quota_exhausted"
    MODEL_ERROR = "model_error"
    TIMEOUT = "timeout"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    # A manifest's or shard's source whose sidecar or checkpoint could not be written
    # within the retry window.
    WRITE_FAILED = "write_failed"
    # The command line only: Ctrl-C stopped the run before this source was finished.
    INTERRUPTED = "interrupted"


class DescriberError(Exception):
    """Root of every exception this package raises on purpose."""


class ConfigError(DescriberError):
    """The settings are inconsistent or unreadable."""


class RequestError(DescriberError):
    """A whole request is malformed; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class SourceError(DescriberError):
    """One source could not be described; carries the stable code and a sentence."""

    def __init__(
        self,
        code: Code,
        message: str,
        *,
        attempts: int = 0,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.attempts = attempts
        # True when the cause may pass (rate limits, 5xx, timeouts): an upload
        # event is then redelivered instead of recording the failure for good.
        self.transient = transient


class StorageUnavailable(DescriberError):
    """Reading or writing results failed.

    ``permanent`` when a retry would fail the same way (no such bucket, no
    permission): the event is then not redelivered, so no model call is paid
    for again and again.
    """

    def __init__(self, uri: str, cause: BaseException, *, permanent: bool = False) -> None:
        super().__init__(f"could not read or write {uri}: {cause}")
        self.uri = uri
        self.permanent = permanent


class TransientFailure(DescriberError):
    """An upload failed for a cause that may pass; the event should be redelivered."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
