"""An image uploaded to a watched bucket: described into a sidecar beside its results."""

from __future__ import annotations

import logging

from .batch import Location
from .errors import Code, TransientFailure
from .layout import KIND_KEY, SIDECAR_KIND, is_sidecar, sidecar_is_current, sidecar_name
from .outcomes import Outcome
from .records import JSON_TYPE, Record, dumps_json
from .runtime import ObjectEvent, Runtime, open_pipeline
from .store import RESULT_KEY, SOURCE_GENERATION_KEY, Store, generation_number, result_key

log = logging.getLogger(__name__)


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
        metadata={SOURCE_GENERATION_KEY: generation, RESULT_KEY: key, KIND_KEY: SIDECAR_KIND},
    )


async def describe_upload(runtime: Runtime, event: ObjectEvent, *, sniffed: bool) -> Outcome:
    bucket, name, generation = event.bucket, event.name, event.generation
    results, stop_at, give_up = event.results, event.stop_at, event.give_up
    settings = runtime.settings
    store = runtime.store
    prompt, schema = settings.prompt_and_schema()
    key = result_key(settings.model, prompt, schema)
    sidecar = sidecar_name(results, name)
    source = f"gs://{bucket}/{name}"
    existing, existing_generation, metadata = await store.read_json_meta(results.bucket, sidecar)
    if existing_generation is not None and not is_sidecar(metadata, existing, source):
        # Something else has the sidecar's name (a batch file an upload name reached,
        # or an object of the user's): it is never replaced, and the upload not described.
        log.error(
            "the sidecar's name is taken by an object that is not its sidecar; not described",
            extra={"uri": f"gs://{results.bucket}/{sidecar}", "error_code": "name_taken"},
        )
        return Outcome.NAME_TAKEN
    if existing is not None:
        described = generation_number(existing.get("generation"))
        if described > generation_number(generation):
            # A late event for an older generation: the newer result stays,
            # whatever model or prompt wrote it.
            log.info("a newer generation is already described; ignored", extra={"uri": sidecar})
            return Outcome.SUPERSEDED
        if sidecar_is_current(
            metadata, existing, generation=generation, key=key, settings=settings
        ):
            log.info("already described for this generation; skipped", extra={"uri": sidecar})
            return Outcome.ALREADY_DONE
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
        return Outcome.SUPERSEDED
    if record.transient and not give_up:
        # A rate limit, outage or the deadline outlasted our retries: raise so
        # the platform redelivers the event later, not record a failure for good.
        raise TransientFailure(record.source, record.error_message or "transient failure")
    if sniffed and record.error_code is Code.NOT_AN_IMAGE:
        log.info("untyped object is not an image; ignored", extra={"object": name})
        return Outcome.IGNORED_NOT_IMAGE
    written = await write_sidecar(
        store,
        results,
        name,
        record,
        generation=generation,
        key=key,
        # Create-only, or replace exactly the sidecar we read: a concurrent
        # delivery that wrote first wins and this one counts as done.
        if_generation_match=existing_generation or 0,
    )
    uri = f"gs://{results.bucket}/{sidecar}"
    if not written:
        log.info("another delivery wrote the result first", extra={"uri": uri})
        return Outcome.ALREADY_DONE
    log.info("described upload", extra={"uri": uri, "status": record.status})
    return Outcome.DESCRIBED
