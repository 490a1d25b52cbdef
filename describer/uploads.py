"""An image uploaded to a watched bucket: described into a sidecar beside its results."""

from __future__ import annotations

import logging

from .batch import Location
from .errors import Code, TransientFailure
from .records import JSON_TYPE, Record, dumps_json
from .runtime import ObjectEvent, Runtime, open_pipeline
from .store import RESULT_KEY, SOURCE_GENERATION_KEY, Store, generation_number, result_key

log = logging.getLogger(__name__)


def sidecar_name(results: Location, name: str) -> str:
    """Where the record of the object ``name`` goes: beside its path, under the results prefix."""
    return f"{results.prefix}{name}.json"


async def write_sidecar(
    store: Store,
    results: Location,
    name: str,
    record: Record,
    *,
    generation: str,
    key: str,
    if_generation_match: int,
) -> bool:
    """Write the record of generation ``generation`` of ``name`` as its sidecar.

    Uploads and backfills both write through here, so a backfill can tell from a
    sidecar's metadata alone (source generation, result key) whether it is current.
    False when ``if_generation_match`` no longer holds: another writer came first.
    """
    return await store.write(
        results.bucket,
        sidecar_name(results, name),
        dumps_json(record.with_generation(generation).to_json()),
        content_type=JSON_TYPE,
        if_generation_match=if_generation_match,
        metadata={SOURCE_GENERATION_KEY: generation, RESULT_KEY: key},
    )


async def describe_upload(runtime: Runtime, event: ObjectEvent, *, sniffed: bool) -> str:
    bucket, name, generation = event.bucket, event.name, event.generation
    results, stop_at, give_up = event.results, event.stop_at, event.give_up
    settings = runtime.settings
    store = runtime.store
    prompt, schema = settings.prompt_and_schema()
    sidecar = sidecar_name(results, name)
    existing, existing_generation = await store.read_json(results.bucket, sidecar)
    if existing is not None:
        described = generation_number(existing.get("generation"))
        if described > generation_number(generation):
            # A late event for an older generation: the newer result stays,
            # whatever model or prompt wrote it.
            log.info("a newer generation is already described; ignored", extra={"uri": sidecar})
            return "superseded"
        if (
            described == generation_number(generation)
            # The fallback model answers for GEMINI_MODEL when that does not exist.
            and existing.get("model") in {settings.model, settings.fallback_model}
            and existing.get("prompt") == prompt
            and existing.get("schema") == schema
        ):
            log.info("already described for this generation; skipped", extra={"uri": sidecar})
            return "already_done"
    source = f"gs://{bucket}/{name}"
    allowed = settings.allowed_buckets | {bucket}
    async with open_pipeline(
        runtime,
        prompt=prompt,
        allowed_buckets=allowed,
        schema=schema,
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
    written = await write_sidecar(
        store,
        results,
        name,
        record,
        generation=generation,
        key=result_key(settings.model, prompt, schema),
        # Create-only, or replace exactly the sidecar we read: a concurrent
        # delivery that wrote first wins and this one counts as done.
        if_generation_match=existing_generation or 0,
    )
    uri = f"gs://{results.bucket}/{sidecar}"
    if not written:
        log.info("another delivery wrote the result first", extra={"uri": uri})
        return "already_done"
    log.info("described upload", extra={"uri": uri, "status": record.status})
    return "described"
