"""describe_http: a batch of image URIs in a JSON body, descriptions back and in a bucket."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from .batch import BatchRequest, Location, parse_body
from .errors import RequestError, StorageUnavailable
from .logs import batch_var, trace_from_headers, trace_var
from .records import JSON_TYPE, JSONL_TYPE, Record, counts, to_jsonl, total_usage
from .runtime import Runtime, new_batch_id, open_pipeline
from .settings import Settings

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(status: int, code: str, message: str, **headers: str) -> HttpReply:
    return HttpReply(status, {"error": {"code": code, "message": message}}, headers)


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
    mime = (content_type or "").split(";", 1)[0].strip().lower()
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
        request = parse_body(raw, max_batch_size=settings.max_batch_size)
        output = _http_output(request, settings)
    except RequestError as exc:
        return error_reply(exc.status, exc.code, exc.message)
    batch_id = new_batch_id()
    batch_var.set(batch_id)
    allowed = settings.allowed_buckets | _present(settings.results_bucket)
    prompt = request.prompt or settings.prompt
    results_name = f"{output.prefix}batches/{batch_id}.jsonl"
    log.info("batch received", extra={"count": len(request.images)})
    records, write_error = asyncio.run(
        _describe_and_write(
            runtime, request.images, prompt, allowed, output.bucket, results_name, stop_at
        )
    )
    results = [r.to_json() for r in records]
    body: dict[str, Any] = {
        "batch_id": batch_id,
        "results_uri": f"gs://{output.bucket}/{results_name}",
        "counts": counts(records),
        "usage": total_usage(results),
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
        },
    )
    return HttpReply(200, body)


async def _describe_and_write(
    runtime: Runtime,
    uris: list[str],
    prompt: str,
    allowed: Collection[str],
    bucket: str,
    results_name: str,
    stop_at: float,
) -> tuple[list[Record], StorageUnavailable | None]:
    """Describe every source, then write the batch JSONL once."""
    async with open_pipeline(runtime, prompt=prompt, allowed_buckets=allowed) as pipeline:
        records = await pipeline.run(uris, stop_at=stop_at)
    try:
        await runtime.store.write(bucket, results_name, to_jsonl(records), content_type=JSONL_TYPE)
    except StorageUnavailable as exc:
        return records, exc
    return records, None


def _http_output(request: BatchRequest, settings: Settings) -> Location:
    if request.output is not None:
        return request.output
    if settings.results_bucket:
        return Location(settings.results_bucket, settings.results_prefix)
    raise RequestError(
        400,
        "output_required",
        "RESULTS_BUCKET is not set on this function, so the request must name an 'output'.",
    )


def _present(value: str | None) -> set[str]:
    return {value} if value else set()
