"""Batches past one invocation: shard manifests, each its own finalize event and invocation.

A manifest of more than SHARD_SIZE sources, or a backfill, becomes a status
object and shard manifests written under SHARDS_PREFIX into a bucket that
triggers describe_gcs. The platform delivers each shard as its own event, so
Eventarc and Cloud Run's autoscaling spread the work; nothing here schedules.

Loop safety: a shard is only ever run, never split again (its body says it is
a shard, and only bodies under SHARDS_PREFIX are read as shards); shards are
created create-only, so a redelivered manifest re-creates nothing; a shard
whose run is no longer the status object's current one does nothing. The
shard that records the last pending shard merges the shards' JSONL, in input
order, into the batch's JSONL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from . import batchjobs
from .batch import BatchRequest, Location, ShardInfo, parse_output
from .batchapi import ENDED_WITHOUT_ANSWERS
from .batchjobs import BatchShard
from .errors import RequestError, StorageUnavailable, TransientFailure
from .gallery import render_index
from .jobs import MANIFEST_SUFFIX, Job, load_request, run_job, tally
from .layout import (
    batch_object,
    gallery_name,
    jobs_folder,
    shard_jsonl_name,
    shard_object_name,
    state_location,
    status_name,
)
from .outcomes import JobState, Outcome
from .records import JSON_TYPE, JSONL_TYPE, dumps_json
from .results import HTML_TYPE
from .runtime import ObjectEvent, Runtime
from .settings import Settings
from .status import new_status, now_iso, record_shard, update_status
from .store import COMPLETE_KEY, SOURCE_GENERATION_KEY, Store, bounded_map

log = logging.getLogger(__name__)

# Shard objects written (or shard JSONLs read) at once.
IO_CONCURRENCY = 8


async def shard_manifest(
    runtime: Runtime,
    request: BatchRequest,
    *,
    bucket: str,
    stem: str,
    generation: str,
    output: Location,
    files: Location,
    state: Location,
    mode: str = "online",
) -> Outcome:
    """Split a large manifest into shards (once per manifest generation).

    ``output`` is the manifest's results location, ``files`` where its JSONL and
    galleries go, ``state`` where its status object lives (from the settings).
    """
    settings = runtime.settings
    store = runtime.store
    name = status_name(state, stem)
    shards_bucket = settings.shards_bucket or bucket
    current, current_generation = await store.read_json(state.bucket, name)
    if current is not None and current.get("kind") != "manifest":
        raise RequestError(
            409,
            "batch_name_taken",
            f"A {current.get('kind')} of the same name is recorded in {name}; rename the manifest.",
        )
    if current is not None:
        run = str(current.get("run"))
        if run == generation:
            if current.get("complete"):
                # Merged, and its shards deleted: writing them again would run them again.
                log.info("the sharded manifest is complete already; skipped")
                return Outcome.ALREADY_DONE
            # A redelivery: the plan exists; make sure every shard does too.
            planned = plan_shards(request, current, settings.shards_prefix)
            await write_shards(runtime, planned, shards_bucket=shards_bucket)
            return Outcome.ALREADY_SHARDED
        if run.isdigit() and generation.isdigit() and int(run) > int(generation):
            log.info("a newer generation of the manifest is sharded already; ignored")
            return Outcome.SUPERSEDED
    prompt, schema = settings.prompt_and_schema(request.prompt, request.schema)
    count = math.ceil(len(request.images) / settings.shard_size)
    status = new_status(
        batch=stem,
        kind="manifest",
        source=f"gs://{bucket}/{stem}{MANIFEST_SUFFIX}",
        run=generation,
        total=len(request.images),
        shards=count,
        shard_size=settings.shard_size,
        model=settings.model,
        prompt=prompt,
        schema=schema,
        output=f"gs://{output.bucket}/{output.prefix}",
        files=f"gs://{files.bucket}/{files.prefix}",
        mode=mode,
    )
    planned = plan_shards(request, status, settings.shards_prefix)
    status["shard_digests"] = [digest(body) for _, body in planned]
    if not await store.write(
        state.bucket,
        name,
        dumps_json(status),
        content_type=JSON_TYPE,
        if_generation_match=current_generation or 0,
        metadata={SOURCE_GENERATION_KEY: generation},
    ):
        raise TransientFailure(f"gs://{state.bucket}/{name}", "another delivery is sharding it")
    written = await write_shards(runtime, planned, shards_bucket=shards_bucket)
    log.info(
        "manifest sharded",
        extra={"count": len(request.images), "shards": count, "written": written},
    )
    return Outcome.SHARDED


def plan_shards(
    request: BatchRequest,
    status: dict[str, Any],
    shards_prefix: str,
    *,
    first_index: int = 0,
    first_offset: int = 0,
) -> list[tuple[str, bytes]]:
    """The shard manifests of a batch's sources, as names and bodies; the same every time.

    A backfill plans its shards a listing step at a time: a step's shards follow
    the ``first_index`` shards and ``first_offset`` sources planned before it.
    Their digests go into the status object before any is written, so a shard
    whose body is not one of them (edited, or forged by someone who may write
    to the bucket) is refused instead of run.
    """
    size = int(status["shard_size"])
    count = first_index + math.ceil(len(request.images) / size)
    total = first_offset + len(request.images)
    batch, run = str(status["batch"]), str(status["run"])
    planned = []
    for index in range(first_index, count):
        start = (index - first_index) * size
        info = ShardInfo(
            batch=batch,
            index=index,
            count=count,
            offset=first_offset + start,
            total=total,
            run=run,
            kind=str(status["kind"]),
            source=str(status["source"]),
        )
        body: dict[str, Any] = {
            "images": request.images[start : start + size],
            # The batch's prompt and schema are pinned: a redeploy halfway through
            # does not mix two kinds of description in one batch.
            "prompt": status["prompt"],
            "schema": status["schema"],
            "output": status["output"],
            "shard": asdict(info),
        }
        if request.generations is not None and request.sidecar_generations is not None:
            body["generations"] = request.generations[start : start + size]
            body["sidecar_generations"] = request.sidecar_generations[start : start + size]
        name = shard_object_name(shards_prefix, batch, run, index)
        planned.append((name, json.dumps(body, sort_keys=True).encode()))
    return planned


async def write_shards(
    runtime: Runtime, planned: list[tuple[str, bytes]], *, shards_bucket: str
) -> int:
    """Write planned shard manifests, create-only; return how many were new."""

    async def write_one(shard: tuple[str, bytes]) -> bool:
        name, body = shard
        return await runtime.store.write(
            shards_bucket,
            name,
            body,
            content_type=JSON_TYPE,
            if_generation_match=0,
            metadata={"describer-shard": name},
        )

    written = await bounded_map(write_one, planned, limit=IO_CONCURRENCY)
    return sum(written)


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:32]


@dataclass(frozen=True)
class _Shard:
    """A shard checked against its batch's status: what running or landing it needs."""

    job: Job
    info: ShardInfo
    state: Location
    status_object: str
    files: Location
    bucket: str  # the shard's own bucket (SHARDS_BUCKET, or the batch's)
    fields: dict[str, Any]


async def _open_shard(
    runtime: Runtime, event: ObjectEvent
) -> tuple[_Shard, dict[str, Any]] | Outcome:
    """The shard of ``event`` and its batch's status, or why it is not to be run."""
    bucket, name, generation, results = event.bucket, event.name, event.generation, event.results
    settings = runtime.settings
    uri = f"gs://{bucket}/{name}"
    loaded = await load_request(runtime, event, shard=True)
    if loaded is None:
        log.info("the shard no longer exists (its batch finished); ignored")
        return Outcome.SUPERSEDED
    if isinstance(loaded, RequestError):
        return Outcome.SHARD_INVALID
    body, request = loaded
    info = request.shard
    assert info is not None  # parse_body(shard=True) requires it
    # The status object is found from the settings alone, never from the shard's
    # body: whoever may write a shard beside real ones cannot write its status too.
    state = state_location(settings, bucket)
    status_object = status_name(state, info.batch)
    status, _ = await runtime.store.read_json(state.bucket, status_object)
    fields = {"uri": uri, "batch": info.batch, "shard": info.index}
    if status is None or str(status.get("run")) != info.run:
        log.info("shard of a run that is not the batch's current one; ignored", extra=fields)
        return Outcome.SUPERSEDED
    digests = status.get("shard_digests") or []
    if info.index >= len(digests) or digests[info.index] != digest(body):
        log.error("shard is not the one its batch planned; refused", extra=fields)
        return Outcome.SHARD_INVALID
    # From here the body is the one the batch planned: its fields can be trusted as far
    # as the status can. Sidecars go only where the settings put sidecars.
    output = request.output or results
    if info.kind == "backfill" and (
        output.prefix != settings.results_prefix
        or output.bucket not in settings.readable_buckets(bucket)
    ):
        log.error("a backfill shard's sidecars would go elsewhere; refused", extra=fields)
        return Outcome.SHARD_INVALID
    files = files_of(status)
    if files is None:
        log.error("the batch's status names no files location; ignored", extra=fields)
        return Outcome.SUPERSEDED
    job = Job(
        request=request,
        uri=uri,
        generation=generation,
        output=files,
        results_name=shard_jsonl_name(files, info.batch, info.index),
        state=state,
        parts_prefix=batch_object(state, info.batch, f".shards/{info.index:05d}.parts/"),
        # A backfill's shard count grows while its listing goes on.
        title=f"Shard {info.index + 1} of {info.source}",
        # From the settings, never from the status: where uploaders may write the
        # state bucket too (RESULTS_BUCKET unset, or also a source bucket), a forged
        # status must not widen what the function reads.
        allowed_buckets=settings.readable_buckets(bucket),
        sidecars=output if info.kind == "backfill" else None,
        # A shard waits out passing failures with redeliveries (inside the retry
        # window) rather than record them for good: its batch waits for it anyway.
        retry_transient=True,
    )
    return _Shard(job, info, state, status_object, files, bucket, fields), status


def _batch_shard(shard: _Shard, status: dict[str, Any]) -> BatchShard:
    return BatchShard(
        job=shard.job,
        batch=shard.info.batch,
        run=shard.info.run,
        index=shard.info.index,
        state=shard.state,
        status_object=shard.status_object,
        shards_bucket=shard.bucket,
        model=str(status.get("model") or ""),
    )


def job_entry(status: dict[str, Any], index: int) -> dict[str, Any] | None:
    """A batch-mode shard's job as the status records it (None before it is claimed)."""
    entry = (status.get("jobs") or {}).get(str(index))
    return entry if isinstance(entry, dict) else None


def runs_online(status: dict[str, Any], index: int) -> bool:
    """Whether shard ``index`` is described online: its batch's mode, or a rerun asked for."""
    if status.get("mode") != "batch":
        return True
    entry = job_entry(status, index)
    return bool(entry and entry.get("rerun") and entry.get("state") in ENDED_WITHOUT_ANSWERS)


async def describe_shard(runtime: Runtime, event: ObjectEvent) -> Outcome:
    """Run one shard (or, in batch mode, submit its job), record it in the status object,
    and merge if it was the last."""
    opened = await _open_shard(runtime, event)
    if isinstance(opened, Outcome):
        return opened
    shard, status = opened
    index = shard.info.index
    if str(index) not in status.get("finished_shards", {}):
        if not runs_online(status, index):
            submitted = await batchjobs.submit(
                runtime,
                _batch_shard(shard, status),
                job_entry(status, index),
                stop_at=event.stop_at,
                give_up=event.give_up,
            )
            if submitted is not batchjobs.Submitted.NOTHING_QUEUED:
                return _SUBMITTED[submitted]
            # Not one source could be prepared: their records are kept; the JSONL is next.
        finished = await _finish_shard(runtime, shard, event.stop_at, give_up=event.give_up)
        if isinstance(finished, Outcome):
            return finished
        entry = job_entry(status, index)
        if entry is not None:
            # Run online after its job ended without answers: the job's files go.
            await batchjobs.forget(runtime, _batch_shard(shard, status), entry)
        status = finished
    if not ready_to_merge(status):
        return Outcome.DESCRIBED_SHARD
    # The last shard recorded (or a redelivery of it, if merging failed): merge.
    await merge(runtime, status, shard.files, shard.state, shards_bucket=shard.bucket)
    return Outcome.MERGED


async def _finish_shard(
    runtime: Runtime, shard: _Shard, stop_at: float, *, give_up: bool
) -> dict[str, Any] | Outcome:
    """Describe what is left of the shard online, write its JSONL and record it: the status
    as recorded, or the outcome that ends the event."""
    info, store = shard.info, runtime.store
    outcome = await run_job(runtime, shard.job, stop_at, give_up=give_up)
    if outcome.state is JobState.SUPERSEDED:
        return Outcome.SHARD_SUPERSEDED
    stalled = outcome.state is JobState.STALLED
    tally = {
        **(outcome.tally or await _tally_of(store, shard.files.bucket, shard.job.results_name)),
        "throttled": outcome.throttled,
    }

    def record(s: dict[str, Any]) -> dict[str, Any] | None:
        if s.get("run") != info.run:
            return None
        s = record_shard(s, info.index, tally, stalled=stalled)
        entry = job_entry(s, info.index)
        if entry is not None:
            if entry.get("name") and entry.get("state") not in ENDED_WITHOUT_ANSWERS:
                entry["state"] = "landed"
            entry.pop("landing", None)
        return s

    status = await update_status(store, shard.state.bucket, shard.status_object, record)
    if status is None or status.get("run") != info.run:
        return Outcome.SUPERSEDED
    log.info("shard done", extra={**shard.fields, "pending": len(status["pending_shards"])})
    return status


def shard_of(settings: Settings, status: dict[str, Any], index: int) -> tuple[str, str] | None:
    """Where shard ``index`` of a batch-mode batch lives, as (bucket, name); None when its
    status names a bucket the settings do not vouch for (a forged status must not choose
    what a collect reads, or widen the buckets a shard may read from)."""
    entry = job_entry(status, index) or {}
    bucket = str(entry.get("shard") or "").removeprefix("gs://").partition("/")[0]
    if not batchjobs.shard_bucket_allowed(settings, bucket):
        return None
    return bucket, shard_object_name(
        settings.shards_prefix, str(status["batch"]), str(status["run"]), index
    )


async def land_shard(
    runtime: Runtime, batch: str, run: str, index: int, *, stop_at: float
) -> Outcome:
    """Land a batch-mode shard's job if it finished, then write the shard's JSONL (online
    for what the job left), record it, and merge if it was the last; a shard finished
    before (a landing cut short after it) is merged, if it was the last, and cleaned up."""
    settings = runtime.settings
    state = Location(settings.job_bucket or "", settings.batches_prefix)
    status, _ = await runtime.store.read_json(state.bucket, status_name(state, batch))
    entry = job_entry(status or {}, index)
    if status is None or status.get("run") != run:
        await batchjobs.retire(runtime, batch, run, index)
        return Outcome.SUPERSEDED
    if entry is None or not entry.get("name"):
        # Registered, and its job not recorded yet: the creating delivery is at work, unless
        # its claim lapsed longer ago than redeliveries go on.
        if entry is None or not batchjobs.abandoned(entry, settings):
            return Outcome.BATCH_PENDING
        return await batchjobs.settle_abandoned(runtime, batch, run, index, state, status)
    where = shard_of(settings, status, index)
    if where is None:
        log.error("a batch job's shard is in a bucket not allowed; refused", extra={"batch": batch})
        return Outcome.SHARD_INVALID
    event = ObjectEvent(
        where[0],
        where[1],
        str(entry.get("generation") or ""),
        Location(settings.results_bucket or where[0], settings.results_prefix),
        stop_at,
        give_up=False,
    )
    opened = await _open_shard(runtime, event)
    if isinstance(opened, Outcome):
        return opened
    shard, status = opened
    if shard.info.index != index or shard.info.batch != batch:
        return Outcome.SHARD_INVALID
    target = _batch_shard(shard, status)
    if str(index) in status.get("finished_shards", {}):
        return await _wrap_up(runtime, shard, target, entry, status, Outcome.ALREADY_DONE)
    try:
        landed = await batchjobs.land(runtime, target, entry, stop_at=stop_at)
        if landed is not batchjobs.Landed.ANSWERS_KEPT:
            return _LANDED[landed]
        # As an event's redeliveries do, a landing stops waiting out passing failures of
        # the sources left for online once EVENT_RETRY_WINDOW_S has passed since the job ended.
        ended = entry.get("ended_at")
        give_up = bool(ended) and batchjobs.age_s(str(ended)) > settings.event_retry_window_s
        finished = await _finish_shard(runtime, shard, stop_at, give_up=give_up)
    except BaseException:
        await batchjobs.release_landing(runtime, target)
        raise
    if isinstance(finished, Outcome):
        return finished
    return await _wrap_up(runtime, shard, target, entry, finished, Outcome.LANDED)


async def _wrap_up(
    runtime: Runtime,
    shard: _Shard,
    target: BatchShard,
    entry: dict[str, Any],
    status: dict[str, Any],
    outcome: Outcome,
) -> Outcome:
    """After a landed shard is recorded: merge if it was the last, then let its job go.
    In that order: the job's registration is what brings a collect back to a merge that
    failed."""
    if ready_to_merge(status):
        await merge(runtime, status, shard.files, shard.state, shards_bucket=shard.bucket)
        outcome = Outcome.MERGED
    await batchjobs.forget(runtime, target, entry)
    return outcome


_SUBMITTED = {
    batchjobs.Submitted.SUBMITTED: Outcome.BATCH_SUBMITTED,
    batchjobs.Submitted.ALREADY: Outcome.ALREADY_SUBMITTED,
    batchjobs.Submitted.REFUSED: Outcome.BATCH_ENDED,
}
_LANDED = {
    batchjobs.Landed.PENDING: Outcome.BATCH_PENDING,
    batchjobs.Landed.ENDED: Outcome.BATCH_ENDED,
    batchjobs.Landed.BUSY: Outcome.BATCH_BUSY,
}


def ready_to_merge(status: dict[str, Any]) -> bool:
    """Every shard recorded, a backfill's listing finished, and not merged yet."""
    listing_done = bool(status.get("listing", {}).get("done", True))
    return listing_done and not status["pending_shards"] and not status.get("results_uri")


def files_of(status: dict[str, Any]) -> Location | None:
    """Where the batch's JSONL and galleries go, as its status records it."""
    try:
        return parse_output(str(status.get("files") or ""), what="the status's files")
    except RequestError:
        return None


async def merge(
    runtime: Runtime,
    status: dict[str, Any],
    files: Location,
    state: Location,
    *,
    shards_bucket: str,
) -> None:
    """Concatenate the shards' JSONL, in shard order (each is in input order), into one."""
    store = runtime.store
    batch, run, count = str(status["batch"]), str(status["run"]), int(status["shards"])
    names = [shard_jsonl_name(files, batch, i) for i in range(count)]
    merged_name = batch_object(files, batch, ".jsonl")
    # Cloud Storage concatenates the shards itself: the merge holds no record in
    # memory, whatever the batch's size.
    metadata = {SOURCE_GENERATION_KEY: run, COMPLETE_KEY: "true"}
    try:
        if names:
            await store.compose(
                files.bucket, merged_name, names, content_type=JSONL_TYPE, metadata=metadata
            )
        else:  # a backfill whose listing found everything described as it went
            await store.write(
                files.bucket, merged_name, b"", content_type=JSONL_TYPE, metadata=metadata
            )
    except StorageUnavailable as exc:
        # A finished shard's JSONL missing (404), or an outage: a redelivery merges again.
        raise TransientFailure(exc.uri, f"the shards' JSONL could not be merged: {exc}") from exc
    results_uri = f"gs://{files.bucket}/{merged_name}"
    gallery_uri = None
    if runtime.settings.gallery:
        index_name = gallery_name(merged_name)
        page = render_index(
            status, [f"{batch.rsplit('/', 1)[-1]}.shards/{i:05d}.html" for i in range(count)]
        )
        await store.write(files.bucket, index_name, page, content_type=HTML_TYPE)
        gallery_uri = f"gs://{files.bucket}/{index_name}"

    def finish(s: dict[str, Any]) -> dict[str, Any] | None:
        if s.get("run") != run:
            return None
        s.update(
            complete=True, results_uri=results_uri, gallery_uri=gallery_uri, updated_at=now_iso()
        )
        return s

    await update_status(store, state.bucket, status_name(state, batch), finish)
    # The shard manifests and listing steps did their job; their events, if redelivered
    # late, find nothing. So did a backfill's listing plans, and batch-mode jobs' files:
    # the requests, and what Vertex AI wrote beside the shards (not the function's own,
    # and so deleted whoever wrote them: nothing else belongs under a run's shards).
    await store.delete_all(
        shards_bucket,
        f"{runtime.settings.shards_prefix}{batch}/{run}/",
        any_writer=status.get("mode") == "batch",
    )
    await store.delete_all(state.bucket, batch_object(state, batch, f".listing/{run}/"))
    await store.delete_all(state.bucket, jobs_folder(state, batch, run))
    log.info(
        "batch merged",
        extra={"uri": results_uri, "count": status["total"], "shards": count},
    )


async def _tally_of(store: Store, bucket: str, name: str) -> dict[str, int]:
    """Count a JSONL written before tallies were kept in its metadata."""
    data = await store.read_bytes(bucket, name) or b""
    return tally([json.loads(line) for line in data.splitlines() if line.strip()])
