"""describe_gcs: one object-finalized event, routed to an upload or a manifest."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .batch import Location
from .collect import land_results
from .errors import StorageUnavailable, TransientFailure
from .images import UNTYPED_CONTENT_TYPES, media_type
from .jobs import MANIFEST_SUFFIX
from .layout import LISTING_SUFFIX, parse_vertex_results_name
from .listing import continue_listing
from .logs import batch_var, trace_from_headers, trace_var
from .manifests import describe_manifest
from .outcomes import Outcome
from .runtime import ObjectEvent, Runtime
from .shards import describe_shard
from .store import is_own_output
from .uploads import describe_upload

log = logging.getLogger(__name__)


def handle_storage_event(
    runtime: Runtime,
    data: Mapping[str, Any],
    *,
    event_id: str = "",
    event_time: str | None = None,
    traceparent: str | None = None,
) -> Outcome:
    """Handle one object-finalized event; return what was done (for logs and tests).

    Returns normally for anything a retry cannot fix; raises StorageUnavailable
    or TransientFailure when a retry may help, so the platform redelivers the event.
    ``event_time`` (the CloudEvent's ``time``) bounds how long redeliveries go on.
    """
    trace_var.set(
        trace_from_headers({"traceparent": traceparent or ""}, runtime.settings.gemini.project)
    )
    age_s = _age_s(event_time)
    try:
        outcome = _handle_storage_event(runtime, data, event_id=event_id, age_s=age_s)
        log.info("event handled", extra={"outcome": outcome.value, "event_id": event_id})
        return outcome
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
        return Outcome.RESULTS_UNWRITABLE
    except TransientFailure as exc:
        # One structured line for Cloud Logging before the framework's plain traceback.
        log.error(
            "event failed for a passing cause; asking for redelivery",
            extra={"reason": str(exc), "event_id": event_id},
        )
        raise


def _handle_storage_event(
    runtime: Runtime, data: Mapping[str, Any], *, event_id: str, age_s: float
) -> Outcome:
    settings = runtime.settings
    stop_at = time.monotonic() + settings.work_budget_s
    bucket = str(data.get("bucket") or "")
    name = str(data.get("name") or "")
    generation = str(data.get("generation") or "")
    batch_var.set(f"{bucket}/{name}#{generation}" if bucket else event_id)
    fields = {"bucket": bucket, "object": name, "event_id": event_id}
    if not bucket or not name:
        log.error("event without bucket or object name; ignored", extra=fields)
        return Outcome.INVALID_EVENT
    results = Location(settings.results_bucket or bucket, settings.results_prefix)
    # Past the retry window a passing cause is treated as lasting: record it
    # and stop, rather than pay for redeliveries until the platform gives up.
    give_up = age_s > settings.event_retry_window_s
    if bucket == results.bucket and not results.prefix:
        log.error(
            "results would land in the triggering bucket with no RESULTS_PREFIX; refusing",
            extra=fields,
        )
        return Outcome.REFUSED_LOOP
    if bucket == results.bucket and name.startswith(results.prefix):
        log.info("object is under the results prefix; ignored (loop guard)", extra=fields)
        return Outcome.IGNORED_RESULTS
    if name.startswith(settings.batches_prefix):
        # Batch files and state are the function's own, wherever they land; an
        # upload named there is not described, so its sidecar cannot reach them.
        log.info("object is under the batches prefix; ignored (loop guard)", extra=fields)
        return Outcome.IGNORED_BATCH_FILE
    event = ObjectEvent(bucket, name, generation, results, stop_at, give_up)
    if name.startswith(settings.shards_prefix):
        # Shards are this function's own output too, written to be delivered
        # back: run as shards (never split again), and nothing else there is.
        if name.endswith(LISTING_SUFFIX):
            return asyncio.run(continue_listing(runtime, event))
        if parse_vertex_results_name(settings.shards_prefix, name) is not None:
            # A Vertex AI batch job's answers, written where its shard is.
            if not name.endswith(".jsonl"):
                log.info("a batch job's file that holds no answers; ignored", extra=fields)
                return Outcome.IGNORED_NOT_SHARD
            return asyncio.run(land_results(runtime, event))
        if not name.endswith(MANIFEST_SUFFIX):
            log.info("object under the shards prefix is not a shard; ignored", extra=fields)
            return Outcome.IGNORED_NOT_SHARD
        return asyncio.run(describe_shard(runtime, event))
    if is_own_output(data.get("metadata")):
        log.info("object was written by this function; ignored (loop guard)", extra=fields)
        return Outcome.IGNORED_OWN_OUTPUT
    if name.endswith(MANIFEST_SUFFIX):
        return asyncio.run(describe_manifest(runtime, event))
    content_type = media_type(str(data.get("contentType") or ""))
    if not (content_type.startswith("image/") or content_type in UNTYPED_CONTENT_TYPES):
        log.info("object is not an image; ignored", extra={**fields, "content_type": content_type})
        return Outcome.IGNORED_NOT_IMAGE
    return asyncio.run(
        describe_upload(runtime, event, sniffed=content_type in UNTYPED_CONTENT_TYPES)
    )


def _age_s(timestamp: str | None) -> float:
    """Seconds since an RFC 3339 time (a CloudEvent's ``time``); 0 when absent or unreadable."""
    try:
        then = datetime.fromisoformat(timestamp or "")
    except ValueError:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - then).total_seconds())
