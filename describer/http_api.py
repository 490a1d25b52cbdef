"""describe_http: a batch of image URIs in a JSON body, descriptions back and in a bucket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import IO, Any

from .backfill import is_backfill, start_backfill
from .batch import BatchRequest, Location, decode_json, parse_batch
from .collect import collect, is_collect, is_rerun, rerun_online
from .errors import RequestError, StorageUnavailable, TransientFailure
from .images import media_type
from .layout import batch_files, batch_object
from .logs import batch_var, trace_from_headers, trace_var
from .records import JSON_TYPE, JSONL_TYPE, Record, counts, dumps_jsonl, total_usage
from .results import write_gallery
from .runtime import Runtime, new_batch_id, open_pipeline
from .settings import Settings

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 * 1024 * 1024
# How much of a body is held at once while it is read, or dropped past MAX_REQUEST_BYTES.
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(status: int, code: str, message: str, **headers: str) -> HttpReply:
    return HttpReply(status, {"error": {"code": code, "message": message}}, headers)


def read_capped(
    stream: IO[bytes], limit: int = MAX_REQUEST_BYTES, *, declared: int | None = None
) -> bytes:
    """At most ``limit + 1`` bytes of a request body, in constant memory whatever its size.

    Past the limit the rest is read and dropped: functions-framework reads whatever
    is left of a body after every call, into memory, so leaving it unread would not
    spare the memory. A body ``declared`` (Content-Length) over the limit is dropped
    whole, unread. Errors of a broken framing propagate from the first reads.
    """
    parts: list[bytes] = []
    size = 0
    if declared is not None and declared > limit:
        size = limit + 1  # refused by its Content-Length: nothing of it is kept
    while size <= limit:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        size += len(chunk)
    with contextlib.suppress(Exception):  # the answer is a 413 whatever the rest holds
        while stream.read(_READ_CHUNK):
            pass
    return b"".join(parts)


def framework_error_reply(status: int, *, method: str, path: str) -> HttpReply:
    """A JSON answer for what functions-framework refuses before the function runs.

    Its own pages are HTML, and the one for a request that is not a CloudEvent
    echoes every request header back: neither is an answer a client can act on.
    """
    if status == 405:
        return error_reply(405, "method_not_allowed", f"Use POST, not {method}.", Allow="POST")
    if status in (400, 415):
        return error_reply(
            status,
            "invalid_event" if status == 400 else "unsupported_media_type",
            "This function takes Cloud Storage object-finalized CloudEvents "
            "(google.cloud.storage.object.v1.finalized, in binary or structured mode, as "
            "Eventarc sends them); the request was not one.",
        )
    if status == 404:
        return error_reply(404, "not_found", f"Nothing is served at {path[:200]!r}.")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return error_reply(status, f"http_{status}", f"{phrase}.")


def handle_http(
    runtime: Runtime,
    *,
    method: str,
    content_type: str | None,
    content_length: int | None,
    read_body: Callable[[], bytes],
    headers: Mapping[str, str],
) -> HttpReply:
    """Answer one describe_http call; malformed requests get a 4xx, never an exception."""
    settings = runtime.settings
    stop_at = time.monotonic() + settings.work_budget_s
    batch_var.set(None)
    trace_var.set(trace_from_headers(headers, settings.gemini.project))
    # Read the body first, whatever the answer: functions-framework reads what is
    # left of it after every call, so a body that cannot be read (a broken chunked
    # encoding, a client gone mid-upload) must fail here, not there as a 500.
    try:
        raw: bytes | None = read_body()
    except Exception:  # noqa: BLE001 - each HTTP server raises its own framing errors
        raw = None
    if method.upper() != "POST":
        return error_reply(405, "method_not_allowed", f"Use POST, not {method}.", Allow="POST")
    mime = media_type(content_type)
    if mime != JSON_TYPE and not (mime.startswith("application/") and mime.endswith("+json")):
        return error_reply(
            415,
            "unsupported_media_type",
            f"Send Content-Type: application/json, not {content_type}."
            if content_type
            else "The request has no Content-Type; send application/json.",
        )
    if content_length is not None and content_length > MAX_REQUEST_BYTES:
        return error_reply(
            413, "request_too_large", f"The body is larger than {MAX_REQUEST_BYTES} bytes."
        )
    if raw is None:
        return error_reply(
            400,
            "invalid_json",
            "The body could not be read: its chunked encoding is broken or cut short.",
        )
    if len(raw) > MAX_REQUEST_BYTES:
        return error_reply(
            413, "request_too_large", f"The body is larger than {MAX_REQUEST_BYTES} bytes."
        )
    try:
        data = decode_json(raw)
        if is_backfill(data):
            return _backfill(runtime, data, stop_at)
        if is_collect(data):
            return _storage_call(collect(runtime, data, stop_at=stop_at))
        if is_rerun(data):
            return _storage_call(rerun_online(runtime, data))
        request = parse_batch(data, max_batch_size=settings.max_batch_size)
        if request.mode == "batch":
            raise RequestError(
                400,
                "invalid_request",
                '"mode": "batch" is for backfills and manifests, whose answers may come hours '
                "later; a request's batch is answered in its reply.",
            )
        output = _http_output(request, settings)
    except RequestError as exc:
        return error_reply(exc.status, exc.code, exc.message)
    batch_id = new_batch_id()
    batch_var.set(batch_id)
    allowed = settings.readable_buckets()
    prompt, schema = settings.prompt_and_schema(request.prompt, request.schema)
    results_name = batch_object(output, batch_id, ".jsonl")
    log.info("batch received", extra={"count": len(request.images)})
    records, results, gallery_uri, write_error, model_calls = asyncio.run(
        _describe_and_write(
            runtime,
            request.images,
            prompt,
            schema,
            allowed,
            output.bucket,
            results_name,
            stop_at,
            title=f"Batch {batch_id}",
        )
    )
    body: dict[str, Any] = {
        "batch_id": batch_id,
        "results_uri": f"gs://{output.bucket}/{results_name}",
        "gallery_uri": gallery_uri,
        "counts": counts(records),
        "usage": total_usage(results),
        "model_calls": model_calls,
        "results": results,
    }
    if write_error is not None:
        # The descriptions are done and paid for: hand them back even though
        # the results object could not be written.
        log.error(str(write_error), extra={"uri": write_error.uri})
        body["results_uri"] = None
        if not write_error.permanent:
            body["error"] = {"code": "results_write_failed", "message": str(write_error)}
            return HttpReply(503, body)
        # A retry would fail the same way (no such bucket, no permission): say
        # so, so that clients do not retry and pay for every image again.
        if request.output is not None:
            body["error"] = {
                "code": "output_unwritable",
                "message": f"The function cannot write to the requested output: {write_error}.",
            }
            return HttpReply(400, body)
        body["error"] = {"code": "results_write_failed", "message": str(write_error)}
        return HttpReply(500, body)
    log.info(
        "batch done",
        extra={
            "uri": body["results_uri"],
            "count": len(records),
            "counts": body["counts"],
            "usage": body["usage"],
            "model_calls": model_calls,
        },
    )
    return HttpReply(200, body)


async def _describe_and_write(
    runtime: Runtime,
    uris: list[str],
    prompt: str,
    schema: str | None,
    allowed: Collection[str],
    bucket: str,
    results_name: str,
    stop_at: float,
    *,
    title: str,
) -> tuple[
    list[Record], list[dict[str, Any]], str | None, StorageUnavailable | None, dict[str, int]
]:
    """Describe every source, then write the batch JSONL once, and its gallery.

    Returns the records, their JSON, the gallery's URI (None when none was
    written), the error that kept the JSONL from being written, if any, and the
    model calls' limit and 429s (:meth:`Pipeline.model_calls`).
    """
    started = time.monotonic()
    gallery = runtime.settings.gallery
    async with open_pipeline(
        runtime, prompt=prompt, allowed_buckets=allowed, schema=schema, thumbnails=gallery
    ) as pipeline:
        records = await pipeline.run(uris, stop_at=stop_at)
        model_calls = pipeline.model_calls()
    results = [r.to_json() for r in records]
    try:
        await runtime.store.write(
            bucket, results_name, dumps_jsonl(results), content_type=JSONL_TYPE
        )
    except StorageUnavailable as exc:
        return records, results, None, exc, model_calls
    gallery_uri = None
    if gallery:
        gallery_uri = await write_gallery(
            runtime.store,
            bucket,
            results_name,
            results,
            [r.thumbnail for r in records],
            title=title,
            elapsed_s=time.monotonic() - started,
            unless_after=stop_at + runtime.settings.deadline_margin_s / 2,
        )
    return records, results, gallery_uri, None, model_calls


def _backfill(runtime: Runtime, data: dict[str, Any], stop_at: float) -> HttpReply:
    return _storage_call(start_backfill(runtime, data, stop_at=stop_at))


def _storage_call(work: Coroutine[Any, Any, tuple[int, dict[str, Any]]]) -> HttpReply:
    """Run a request that works on stored state; storage trouble answered as 503 or 400."""
    try:
        status, body = asyncio.run(work)
    except TransientFailure as exc:
        log.error(str(exc))
        return error_reply(503, "storage_unavailable", f"{exc}; retry later.")
    except StorageUnavailable as exc:
        log.error(str(exc), extra={"uri": exc.uri})
        if exc.permanent:
            return error_reply(400, "storage_refused", f"The function {exc}.")
        return error_reply(503, "storage_unavailable", f"The function {exc}; retry later.")
    return HttpReply(status, body)


def _http_output(request: BatchRequest, settings: Settings) -> Location:
    """Where the batch's JSONL and gallery go: its own output, else BATCHES_PREFIX."""
    if request.output is not None or settings.results_bucket:
        return batch_files(settings, settings.results_bucket or "", request.output)
    raise RequestError(
        400,
        "output_required",
        "RESULTS_BUCKET is not set on this function, so the request must name an 'output'.",
    )
