"""A manifest (``*.batch.json``) uploaded to a watched bucket: a batch run from storage.

Each finished source is checkpointed as its own object, so a redelivered event
carries on where the last delivery stopped; the batch JSONL is written
conditionally on the generation read, so a complete result is never downgraded.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Mapping
from typing import Any

from google.api_core import exceptions as gexc
from google.auth.exceptions import GoogleAuthError

from .batch import Location, parse_body
from .errors import Code, RequestError, StorageUnavailable, TransientFailure
from .records import JSON_TYPE, JSONL_TYPE, Record, dumps_json, dumps_jsonl, total_usage
from .results import write_gallery
from .runtime import Runtime, open_pipeline
from .settings import schema_setting
from .store import COMPLETE_KEY, SOURCE_GENERATION_KEY, Store, generation_number, is_permanent

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MANIFEST_SUFFIX = ".batch.json"
# Checkpoints carry the gallery thumbnail under this key; it never reaches the JSONL.
_THUMBNAIL_KEY = "_thumbnail"


async def describe_manifest(
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
            dumps_json(report),
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
    done, thumbnails = await checkpoints.load(request.images)
    todo = [i for i in range(len(request.images)) if i not in done]
    log.info(
        "manifest received",
        extra={"count": len(request.images), "already_done": len(done), "uri": manifest_uri},
    )
    prompt = request.prompt or settings.prompt
    schema = schema_setting(request.schema) if request.schema else settings.schema
    allowed = settings.allowed_buckets | {bucket} | _present(settings.results_bucket)
    async with open_pipeline(
        runtime,
        prompt=prompt,
        allowed_buckets=allowed,
        schema=schema,
        thumbnails=settings.gallery,
    ) as pipeline:
        fresh = await pipeline.run(
            [request.images[i] for i in todo],
            stop_at=stop_at,
            on_record=lambda position, record: checkpoints.save(todo[position], record),
        )
    for index, record in zip(todo, fresh, strict=True):
        done[index] = record.to_json()
        thumbnails[index] = record.thumbnail
    remaining = sum(r.error_code is Code.DEADLINE_EXCEEDED for r in fresh)
    ordered = [done[i] for i in range(len(request.images))]
    # Replace exactly the JSONL read above (or create it): a concurrent delivery
    # that wrote in between wins, and a complete result is never downgraded.
    written = await store.write(
        output.bucket,
        results_name,
        dumps_jsonl(ordered),
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
    if settings.gallery:
        # Written after the JSONL it shows; an incomplete batch gets one too, so
        # what is missing can be seen while redeliveries carry on.
        await write_gallery(
            store,
            output.bucket,
            results_name,
            ordered,
            [thumbnails.get(i) for i in range(len(request.images))],
            title=f"Manifest {manifest_uri}",
            elapsed_s=None,
            metadata={SOURCE_GENERATION_KEY: generation},
        )
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
    described = generation_number(metadata.get(SOURCE_GENERATION_KEY))
    if described > generation_number(generation):
        return "superseded"  # a newer upload of the manifest owns the results now
    if described == generation_number(generation) and metadata.get(COMPLETE_KEY) != "false":
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

    async def load(
        self, uris: list[str]
    ) -> tuple[dict[int, dict[str, Any]], dict[int, bytes | None]]:
        """The records already finished, and their gallery thumbnails, by source index."""
        found = await self._store.read_all_json(self._bucket, self._prefix)
        done: dict[int, dict[str, Any]] = {}
        thumbnails: dict[int, bytes | None] = {}
        for name, record in found.items():
            stem = name[len(self._prefix) :].removesuffix(".json")
            index = int(stem) if stem.isdigit() else -1
            thumbnail = record.pop(_THUMBNAIL_KEY, None)
            if 0 <= index < len(uris) and record.get("source") == uris[index]:
                done[index] = record
                thumbnails[index] = _unbase64(thumbnail)
        return done, thumbnails

    async def save(self, index: int, record: Record) -> None:
        if record.transient:
            return  # a retry may do better: describe it again next time
        written = await self._store.write(
            self._bucket,
            f"{self._prefix}{index:06d}.json",
            dumps_json(_with_thumbnail(record)),
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


def _with_thumbnail(record: Record) -> dict[str, Any]:
    """A checkpoint: the record, and its thumbnail so a resumed batch's gallery has it."""
    out = record.to_json()
    if record.thumbnail is not None:
        out[_THUMBNAIL_KEY] = base64.b64encode(record.thumbnail).decode("ascii")
    return out


def _unbase64(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        return None


def _present(value: str | None) -> set[str]:
    return {value} if value else set()
