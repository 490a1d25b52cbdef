"""One invocation, from an HTTP request or a storage event to written results.

Each entry point runs exactly one event loop (``asyncio.run``) around one async
pipeline. Everything bound to that loop (aiohttp sessions, the Gemini client)
is opened and closed inside it; what is safe to share across invocations and
threads (settings, storage client, thread pools, TLS context) lives in
:class:`Runtime`, built once per process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.api_core import exceptions as gexc
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage

from .batch import BatchRequest, Location, parse_body
from .errors import Code, ConfigError, RequestError, StorageUnavailable, TransientFailure
from .fetch import Fetcher, open_http_session
from .gemini import Describer, GeminiConnector
from .logs import batch_var, trace_var
from .netguard import AddressCheck, is_public
from .pipeline import DEFAULT_WRITE_CONCURRENCY, Pipeline, StageLimits
from .records import Record, counts, dumps_jsonl, to_jsonl, total_usage
from .settings import Settings
from .store import (
    COMPLETE_KEY,
    SOURCE_GENERATION_KEY,
    ResultStore,
    Store,
    is_own_output,
    is_permanent,
)

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MANIFEST_SUFFIX = ".batch.json"
JSONL_TYPE = "application/x-ndjson"
JSON_TYPE = "application/json"
# Content types that say nothing about the bytes: sniff them instead.
_UNTYPED = frozenset({"", "application/octet-stream", "binary/octet-stream"})


@dataclass
class Runtime:
    """Process-wide resources, shared by every invocation and thread."""

    settings: Settings
    storage_client: storage.Client
    gemini: GeminiConnector
    # Which resolved addresses downloads may reach; tests widen it, nothing else does.
    address_allowed: AddressCheck = is_public
    # Where results go; Cloud Storage unless a test passes its own Store.
    store: Store = None  # type: ignore[assignment]
    io_executor: ThreadPoolExecutor = field(init=False)
    store_executor: ThreadPoolExecutor = field(init=False)
    cpu_executor: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.io_executor = ThreadPoolExecutor(
            max_workers=self.settings.download_concurrency, thread_name_prefix="describer-io"
        )
        # Results get threads of their own: at the deadline, gs:// reads still
        # running on the I/O pool must not queue ahead of the final writes.
        self.store_executor = ThreadPoolExecutor(
            max_workers=DEFAULT_WRITE_CONCURRENCY, thread_name_prefix="describer-store"
        )
        if self.store is None:
            self.store = ResultStore(
                self.storage_client,
                self.store_executor,
                # Writes happen in the deadline margin: each must fit well inside it.
                timeout_s=max(2.0, self.settings.deadline_margin_s / 2),
            )
        self.cpu_executor = ThreadPoolExecutor(
            # The CPUs this process may run on (the instance's vCPUs on Cloud Run), not the host's.
            max_workers=len(os.sched_getaffinity(0)) or 1,
            thread_name_prefix="describer-cpu",
        )

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        """Build the shared clients; the storage client honours STORAGE_EMULATOR_HOST itself.

        Refuses (ConfigError) when Gemini or Cloud Storage has no credentials, so an
        instance that could only fail every image never starts.
        """
        access = settings.gemini
        if not access.api_key and not access.use_vertexai:
            raise ConfigError(
                "no Gemini credentials: set GEMINI_API_KEY (or GOOGLE_API_KEY), or "
                "GOOGLE_GENAI_USE_VERTEXAI=true with GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_LOCATION"
            )
        try:
            client = storage.Client()
        except GoogleAuthError as exc:
            raise ConfigError(
                f"no Cloud Storage credentials ({exc}); locally, set STORAGE_EMULATOR_HOST"
            ) from exc
        return cls(settings=settings, storage_client=client, gemini=GeminiConnector(access))

    def close(self) -> None:
        self.io_executor.shutdown(wait=False)
        self.store_executor.shutdown(wait=False)
        self.cpu_executor.shutdown(wait=False)


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
    trace_var.set(_trace(headers, settings.gemini.project))
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


def handle_storage_event(
    runtime: Runtime,
    data: Mapping[str, Any],
    *,
    event_id: str = "",
    event_time: str | None = None,
    traceparent: str | None = None,
) -> str:
    """Handle one object-finalized event; return what was done (for logs and tests).

    Returns normally for anything a retry cannot fix; raises StorageUnavailable
    or TransientFailure when a retry may help, so the platform redelivers the event.
    ``event_time`` (the CloudEvent's ``time``) bounds how long redeliveries go on.
    """
    trace_var.set(_trace({"traceparent": traceparent or ""}, runtime.settings.gemini.project))
    age_s = _age_s(event_time)
    try:
        return _handle_storage_event(runtime, data, event_id=event_id, age_s=age_s)
    except StorageUnavailable as exc:
        if not exc.permanent:
            log.error(
                "event failed for a passing cause; asking for redelivery",
                extra={"reason": str(exc), "event_id": event_id},
            )
            raise
        # No such bucket or no permission: every redelivery would fail the same
        # way after paying for the model again. Say so once and stop.
        log.error(
            "results cannot be written (bucket missing or permission denied); "
            "not asking for redelivery",
            extra={"reason": str(exc), "event_id": event_id},
        )
        return "results_unwritable"
    except TransientFailure as exc:
        # One structured line for Cloud Logging before the framework's plain traceback.
        log.error(
            "event failed for a passing cause; asking for redelivery",
            extra={"reason": str(exc), "event_id": event_id},
        )
        raise


def _handle_storage_event(
    runtime: Runtime, data: Mapping[str, Any], *, event_id: str, age_s: float
) -> str:
    settings = runtime.settings
    stop_at = time.monotonic() + settings.work_budget_s
    bucket = str(data.get("bucket") or "")
    name = str(data.get("name") or "")
    generation = str(data.get("generation") or "")
    batch_var.set(f"{bucket}/{name}#{generation}" if bucket else event_id)
    fields = {"bucket": bucket, "object": name, "event_id": event_id}
    if not bucket or not name:
        log.error("event without bucket or object name; ignored", extra=fields)
        return "invalid_event"
    results = Location(settings.results_bucket or bucket, settings.results_prefix)
    # Past the retry window a passing cause is treated as lasting: record it
    # and stop, rather than pay for redeliveries until the platform gives up.
    give_up = age_s > settings.event_retry_window_s
    if bucket == results.bucket and not results.prefix:
        log.error(
            "results would land in the triggering bucket with no RESULTS_PREFIX; refusing",
            extra=fields,
        )
        return "refused_loop"
    if bucket == results.bucket and name.startswith(results.prefix):
        log.info("object is under the results prefix; ignored (loop guard)", extra=fields)
        return "ignored_results"
    if is_own_output(data.get("metadata")):
        log.info("object was written by this function; ignored (loop guard)", extra=fields)
        return "ignored_own_output"
    if name.endswith(MANIFEST_SUFFIX):
        return asyncio.run(
            _manifest(runtime, bucket, name, generation, results, stop_at, give_up=give_up)
        )
    content_type = str(data.get("contentType") or "").split(";", 1)[0].strip().lower()
    if not (content_type.startswith("image/") or content_type in _UNTYPED):
        log.info("object is not an image; ignored", extra={**fields, "content_type": content_type})
        return "ignored_not_image"
    return asyncio.run(
        _upload(
            runtime,
            bucket,
            name,
            generation,
            results,
            stop_at,
            sniffed=content_type in _UNTYPED,
            give_up=give_up,
        )
    )


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


async def _upload(
    runtime: Runtime,
    bucket: str,
    name: str,
    generation: str,
    results: Location,
    stop_at: float,
    *,
    sniffed: bool,
    give_up: bool,
) -> str:
    settings = runtime.settings
    store = runtime.store
    sidecar = f"{results.prefix}{name}.json"
    existing, existing_generation = await store.read_json(results.bucket, sidecar)
    if existing is not None:
        described = _generation(existing.get("generation"))
        if described > _generation(generation):
            # A late event for an older generation: the newer result stays,
            # whatever model or prompt wrote it.
            log.info("a newer generation is already described; ignored", extra={"uri": sidecar})
            return "superseded"
        if (
            described == _generation(generation)
            # The fallback model answers for GEMINI_MODEL when that does not exist.
            and existing.get("model") in {settings.model, settings.fallback_model}
            and existing.get("prompt") == settings.prompt
        ):
            log.info("already described for this generation; skipped", extra={"uri": sidecar})
            return "already_done"
    source = f"gs://{bucket}/{name}"
    allowed = settings.allowed_buckets | {bucket}
    async with open_pipeline(
        runtime,
        prompt=settings.prompt,
        allowed_buckets=allowed,
        pinned_generations={source: generation},
    ) as pipeline:
        (record,) = await pipeline.run([source], stop_at=stop_at)
    if record.error_code is Code.NOT_FOUND:
        # That generation is gone: the object was replaced or deleted, and a
        # newer event (if any) describes what is there now.
        log.info("the event's generation no longer exists; ignored", extra={"object": name})
        return "superseded"
    if record.transient and not give_up:
        # A rate limit, outage or the deadline outlasted our retries: raise so
        # the platform redelivers the event later, not record a failure for good.
        raise TransientFailure(record.source, record.error_message or "transient failure")
    if sniffed and record.error_code is Code.NOT_AN_IMAGE:
        log.info("untyped object is not an image; ignored", extra={"object": name})
        return "ignored_not_image"
    written = await store.write(
        results.bucket,
        sidecar,
        to_json_bytes(record.with_generation(generation).to_json()),
        content_type=JSON_TYPE,
        # Create-only, or replace exactly the sidecar we read: a concurrent
        # delivery that wrote first wins and this one counts as done.
        if_generation_match=existing_generation or 0,
        metadata={SOURCE_GENERATION_KEY: generation},
    )
    uri = results.uri(f"{name}.json")
    if not written:
        log.info("another delivery wrote the result first", extra={"uri": uri})
        return "already_done"
    log.info("described upload", extra={"uri": uri, "status": record.status})
    return "described"


async def _manifest(
    runtime: Runtime,
    bucket: str,
    name: str,
    generation: str,
    results: Location,
    stop_at: float,
    *,
    give_up: bool,
) -> str:
    settings = runtime.settings
    store = runtime.store
    stem = name[: -len(MANIFEST_SUFFIX)]
    manifest_uri = f"gs://{bucket}/{name}"
    try:
        body = await _read_manifest(runtime, bucket, name, generation)
        if body is None:
            log.info("the event's manifest generation no longer exists; ignored")
            return "superseded"
        request = parse_body(body, max_batch_size=settings.max_batch_size)
    except RequestError as exc:
        error_name = f"{results.prefix}batches/{stem}.error.json"
        report = {
            "manifest": manifest_uri,
            "generation": generation,
            "error": {"code": exc.code, "message": exc.message},
        }
        await store.write(
            results.bucket,
            error_name,
            to_json_bytes(report),
            content_type=JSON_TYPE,
            metadata={SOURCE_GENERATION_KEY: generation},
        )
        log.error("manifest rejected", extra={"error_code": exc.code, "reason": exc.message})
        return "manifest_invalid"
    output = request.output or results
    results_name = f"{output.prefix}batches/{stem}.jsonl"
    existing = await store.stat(output.bucket, results_name)
    if existing is not None:
        state = _manifest_state(existing[0], generation)
        if state != "open":
            log.info("manifest skipped", extra={"uri": manifest_uri, "state": state})
            return state
    checkpoints = _Checkpoints(
        store, output.bucket, f"{output.prefix}batches/{stem}.parts/", generation
    )
    done = await checkpoints.load(request.images)
    todo = [i for i in range(len(request.images)) if i not in done]
    log.info(
        "manifest received",
        extra={"count": len(request.images), "already_done": len(done), "uri": manifest_uri},
    )
    prompt = request.prompt or settings.prompt
    allowed = settings.allowed_buckets | {bucket} | _present(settings.results_bucket)
    async with open_pipeline(runtime, prompt=prompt, allowed_buckets=allowed) as pipeline:
        fresh = await pipeline.run(
            [request.images[i] for i in todo],
            stop_at=stop_at,
            on_record=lambda position, record: checkpoints.save(todo[position], record),
        )
    for index, record in zip(todo, fresh, strict=True):
        done[index] = record.to_json()
    remaining = sum(r.error_code is Code.DEADLINE_EXCEEDED for r in fresh)
    # Replace exactly the JSONL read above (or create it): a concurrent delivery
    # that wrote in between wins, and a complete result is never downgraded.
    written = await store.write(
        output.bucket,
        results_name,
        dumps_jsonl(done[i] for i in range(len(request.images))),
        content_type=JSONL_TYPE,
        if_generation_match=existing[1] if existing else 0,
        metadata={SOURCE_GENERATION_KEY: generation, COMPLETE_KEY: str(not remaining).lower()},
    )
    uri = output.uri(f"batches/{stem}.jsonl")
    if not written:
        again = await store.stat(output.bucket, results_name)
        state = _manifest_state(again[0], generation) if again else "open"
        if state != "open":
            log.info("another delivery finished the manifest first", extra={"state": state})
            return state
        raise TransientFailure(manifest_uri, "another delivery wrote the results at the same time")
    if not remaining:
        await checkpoints.clear()
        log.info(
            "manifest done",
            extra={"uri": uri, "count": len(done), "usage": total_usage(done.values())},
        )
        return "described_manifest"
    if checkpoints.saved and not give_up:
        # Progress was made and kept: fail this delivery so the platform
        # redelivers the event, and the next invocation carries on from here.
        raise TransientFailure(
            manifest_uri, f"{remaining} of {len(request.images)} sources remain at the deadline"
        )
    # Nothing finished in a whole invocation (a redelivery would do the same
    # again, forever), or the retry window is over. Stop here; the JSONL says
    # which sources are missing.
    log.error(
        "manifest incomplete; not asking for redelivery",
        extra={"uri": uri, "remaining": remaining, "progress": checkpoints.saved},
    )
    return "manifest_stalled"


def _manifest_state(metadata: Mapping[str, str], generation: str) -> str:
    """What an existing manifest JSONL means for this event: open, already_done or superseded."""
    described = _generation(metadata.get(SOURCE_GENERATION_KEY))
    if described > _generation(generation):
        return "superseded"  # a newer upload of the manifest owns the results now
    if described == _generation(generation) and metadata.get(COMPLETE_KEY) != "false":
        return "already_done"
    return "open"


class _Checkpoints:
    """A manifest's finished records, one object each, so a redelivery skips them.

    Objects live under ``<prefix><generation>/``: a new upload of the manifest
    is a new generation and starts afresh. They are written create-only, so two
    deliveries racing on one source keep the first record.
    """

    def __init__(self, store: Store, bucket: str, prefix: str, generation: str) -> None:
        self._store = store
        self._bucket = bucket
        self._prefix = f"{prefix}{generation}/"
        self._generation = generation
        self.saved = 0

    async def load(self, uris: list[str]) -> dict[int, dict[str, Any]]:
        found = await self._store.read_all_json(self._bucket, self._prefix)
        done: dict[int, dict[str, Any]] = {}
        for name, record in found.items():
            stem = name[len(self._prefix) :].removesuffix(".json")
            index = int(stem) if stem.isdigit() else -1
            if 0 <= index < len(uris) and record.get("source") == uris[index]:
                done[index] = record
        return done

    async def save(self, index: int, record: Record) -> None:
        if record.transient:
            return  # a retry may do better: describe it again next time
        written = await self._store.write(
            self._bucket,
            f"{self._prefix}{index:06d}.json",
            to_json_bytes(record.to_json()),
            content_type=JSON_TYPE,
            if_generation_match=0,
            metadata={SOURCE_GENERATION_KEY: self._generation},
        )
        self.saved += 1 if written else 0

    async def clear(self) -> None:
        try:
            await self._store.delete_all(self._bucket, self._prefix)
        except StorageUnavailable as exc:
            # The JSONL is complete and marked so; leftover checkpoints only cost storage.
            log.warning("could not delete checkpoints", extra={"reason": str(exc)})


async def _read_manifest(runtime: Runtime, bucket: str, name: str, generation: str) -> bytes | None:
    """The manifest at the event's generation (a late event must not read a newer one)."""

    def read() -> bytes | None:
        blob = runtime.storage_client.bucket(bucket).get_blob(
            name, generation=int(generation) if generation.isdigit() else None
        )
        if blob is None:
            return None
        if blob.size is not None and blob.size > MAX_MANIFEST_BYTES:
            raise RequestError(
                413,
                "batch_too_large",
                f"The manifest is {blob.size} bytes, more than {MAX_MANIFEST_BYTES}.",
            )
        return bytes(blob.download_as_bytes(if_generation_match=blob.generation))

    try:
        return await asyncio.get_running_loop().run_in_executor(runtime.io_executor, read)
    except (gexc.NotFound, gexc.PreconditionFailed):
        return None
    except (gexc.GoogleAPIError, GoogleAuthError, OSError) as exc:
        raise StorageUnavailable(f"gs://{bucket}/{name}", exc, permanent=is_permanent(exc)) from exc


@asynccontextmanager
async def open_pipeline(
    runtime: Runtime,
    *,
    prompt: str,
    allowed_buckets: Collection[str],
    pinned_generations: Mapping[str, str] | None = None,
) -> AsyncIterator[Pipeline]:
    """Open this invocation's loop-bound resources and close them all on the way out."""
    settings = runtime.settings
    async with (
        open_http_session(
            settings, runtime.gemini.ssl_context, address_allowed=runtime.address_allowed
        ) as http,
        runtime.gemini.open_session() as model_session,
    ):
        client = runtime.gemini.client(model_session, timeout_s=settings.model_timeout_s)
        try:
            yield Pipeline(
                fetcher=Fetcher(
                    session=http,
                    storage_client=runtime.storage_client,
                    io_executor=runtime.io_executor,
                    settings=settings,
                    allowed_buckets=allowed_buckets,
                    pinned_generations=pinned_generations,
                    address_allowed=runtime.address_allowed,
                ),
                describer=Describer(
                    client,
                    model=settings.model,
                    fallback_model=settings.fallback_model,
                    media_resolution=settings.media_resolution,
                    max_attempts=settings.model_max_attempts,
                    backoff_s=settings.model_backoff_s,
                ),
                cpu_executor=runtime.cpu_executor,
                limits=StageLimits(
                    download_concurrency=settings.download_concurrency,
                    model_concurrency=settings.model_concurrency,
                    image_max_side=settings.image_max_side,
                    max_image_pixels=settings.max_image_pixels,
                ),
                model=settings.model,
                prompt=prompt,
            )
        finally:
            await client.aio.aclose()


def new_batch_id() -> str:
    """Sortable by time, unique by its random tail."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}"


def to_json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode()


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


def _generation(value: object) -> int:
    """Generations compare as integers; anything unreadable sorts first."""
    try:
        return int(str(value))
    except ValueError:
        return -1


def _age_s(timestamp: str | None) -> float:
    """Seconds since an RFC 3339 time (a CloudEvent's ``time``); 0 when absent or unreadable."""
    try:
        then = datetime.fromisoformat(timestamp or "")
    except ValueError:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - then).total_seconds())


def _present(value: str | None) -> set[str]:
    return {value} if value else set()


def _trace(headers: Mapping[str, str], project: str | None) -> str | None:
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
