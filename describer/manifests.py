"""A manifest (``*.batch.json``) uploaded to a watched bucket: a batch run from storage.

A manifest of up to SHARD_SIZE sources is one job (:mod:`describer.jobs`) in one
invocation; a larger one is split into shards (:mod:`describer.shards`), each a
job of its own in an invocation of its own.
"""

from __future__ import annotations

import logging

from .batch import choose_mode
from .batchjobs import require_batch_mode
from .errors import RequestError
from .jobs import MANIFEST_SUFFIX, Job, load_request, run_job, write_error_report
from .layout import batch_files, batch_object, state_location
from .outcomes import JobState, Outcome
from .runtime import ObjectEvent, Runtime
from .shards import shard_manifest

log = logging.getLogger(__name__)


_MANIFEST_OUTCOMES = {
    JobState.DESCRIBED: Outcome.DESCRIBED_MANIFEST,
    JobState.STALLED: Outcome.MANIFEST_STALLED,
    JobState.ALREADY_DONE: Outcome.ALREADY_DONE,
    JobState.SUPERSEDED: Outcome.SUPERSEDED,
}


async def describe_manifest(runtime: Runtime, event: ObjectEvent) -> Outcome:
    bucket, name, generation = event.bucket, event.name, event.generation
    results, stop_at, give_up = event.results, event.stop_at, event.give_up
    settings = runtime.settings
    stem = name.removesuffix(MANIFEST_SUFFIX)
    manifest_uri = f"gs://{bucket}/{name}"
    loaded = await load_request(runtime, event)
    if loaded is None:
        log.info("the event's manifest generation no longer exists; ignored")
        return Outcome.SUPERSEDED
    if isinstance(loaded, RequestError):
        return Outcome.MANIFEST_INVALID
    _, request = loaded
    files = batch_files(settings, results.bucket, request.output)
    state = state_location(settings, bucket)
    mode = choose_mode(settings.batch_mode_over, request.mode, len(request.images))
    # A manifest in batch mode is always a sharded batch: its jobs outlive any invocation,
    # and a status object is what carries them.
    if len(request.images) > settings.shard_size or mode == "batch":
        try:
            if mode == "batch":
                require_batch_mode(settings, settings.shards_bucket or bucket)
            return await shard_manifest(
                runtime,
                request,
                bucket=bucket,
                stem=stem,
                generation=generation,
                output=request.output or results,
                files=files,
                state=state,
                mode=mode,
            )
        except RequestError as exc:
            await write_error_report(runtime, event, exc)
            return Outcome.MANIFEST_INVALID
    job = Job(
        request=request,
        uri=manifest_uri,
        generation=generation,
        output=files,
        results_name=batch_object(files, stem, ".jsonl"),
        state=state,
        parts_prefix=batch_object(state, stem, ".parts/"),
        title=f"Manifest {manifest_uri}",
        allowed_buckets=settings.readable_buckets(bucket),
    )
    outcome = await run_job(runtime, job, stop_at, give_up=give_up)
    return _MANIFEST_OUTCOMES[outcome.state]
