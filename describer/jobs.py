"""A job: the sources of one manifest or one shard, described into one JSONL.

A job checkpoints each finished source as its own object, so a redelivered
event carries on where the last delivery stopped, and writes its JSONL
conditionally on the generation read, so a complete result is never downgraded.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any

from google.api_core import exceptions as gexc
from google.auth.exceptions import GoogleAuthError

from .batch import BatchRequest, GcsSource, Location, parse_body, parse_source
from .errors import Code, RequestError, StorageUnavailable, TransientFailure
from .layout import batch_files, batch_object
from .outcomes import JobState
from .pipeline import ModelBackend, Pipeline
from .records import (
    ERROR,
    JSON_TYPE,
    JSONL_TYPE,
    Record,
    dumps_json,
    dumps_jsonl,
    total_cost,
    total_usage,
)
from .results import write_gallery
from .runtime import ObjectEvent, Runtime, open_pipeline
from .store import (
    COMPLETE_KEY,
    SOURCE_GENERATION_KEY,
    Store,
    generation_number,
    is_permanent,
    result_key,
)
from .uploads import write_sidecar

log = logging.getLogger(__name__)

# A manifest of MAX_MANIFEST_IMAGES URIs of a few hundred characters each fits.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MANIFEST_SUFFIX = ".batch.json"
# Checkpoints carry the gallery thumbnail under this key; it never reaches the JSONL.
_THUMBNAIL_KEY = "_thumbnail"
# Metadata on a job's JSONL: its tally, so a shard's counts can be read back with a stat.
_TALLY_KEYS = {
    "ok": "describer-ok",
    "error": "describer-errors",
    "prompt_tokens": "describer-prompt-tokens",
    "output_tokens": "describer-output-tokens",
    "cost_micro_usd": "describer-cost-micro-usd",
}


@dataclass(frozen=True)
class Job:
    """One manifest's or one shard's sources, and where their results go."""

    request: BatchRequest
    uri: str  # the manifest or shard object, for logs and errors
    generation: str  # its generation: checkpoints and the JSONL's metadata are keyed by it
    output: Location  # where the JSONL and gallery go (the batch's files)
    results_name: str  # the JSONL, in output.bucket
    state: Location  # where the batch's state lives: its checkpoints go there
    parts_prefix: str  # checkpoints go under <parts_prefix><generation>/, in state.bucket
    title: str
    allowed_buckets: frozenset[str]
    # A backfill's shard: each record also becomes a sidecar here, as an upload's would.
    sidecars: Location | None = None
    # Count transient errors (rate limits, outages) as not done yet and ask for
    # redelivery, instead of recording them for good.
    retry_transient: bool = False


@dataclass(frozen=True)
class JobOutcome:
    """How a job's event ended, and its records' tally when the JSONL is complete."""

    state: JobState
    tally: dict[str, int] | None = None
    # Rate-limit 429s this invocation's calls met and rode out (for a shard's status entry).
    throttled: int = 0


async def run_job(runtime: Runtime, job: Job, stop_at: float, *, give_up: bool) -> JobOutcome:
    """Describe what is left of a job and write its JSONL (and gallery).

    Raises TransientFailure when progress was kept but sources remain, so the
    platform redelivers the event and the next invocation carries on.
    """
    settings = runtime.settings
    store = runtime.store
    request, output = job.request, job.output
    existing = await _listed(store, output.bucket, job.results_name)
    if existing is not None:
        state = _manifest_state(existing[0], job.generation)
        if state is not JobState.OPEN:
            log.info("manifest skipped", extra={"uri": job.uri, "state": state})
            tallied = _tally_from(existing[0]) if state is JobState.ALREADY_DONE else None
            return JobOutcome(state, tallied)
    keeper = Keeper(runtime, job)
    checkpoints = keeper.checkpoints
    done, thumbnails = await checkpoints.load(request.images)
    todo = [i for i in range(len(request.images)) if i not in done]
    log.info(
        "manifest received",
        extra={"count": len(request.images), "already_done": len(done), "uri": job.uri},
    )
    # Sources whose sidecar or checkpoint could not be written: not done, whatever
    # their record says, so the job is not reported done without them.
    unwritten = keeper.unwritten

    async def keep(position: int, record: Record) -> None:
        await keeper.keep(todo[position], record)

    async with open_job_pipeline(runtime, job) as pipeline:
        fresh = await pipeline.run(
            [request.images[i] for i in todo], stop_at=stop_at, on_record=keep
        )
        throttled = pipeline.model_calls()["throttled"]
    for index, record in zip(todo, fresh, strict=True):
        if index in unwritten and give_up:
            # Past the retry window: the source ends as an error that names the write.
            record = _write_failed(record, unwritten[index])
        done[index] = record.to_json()
        thumbnails[index] = record.thumbnail
    remaining = sum(
        r.transient if job.retry_transient else r.error_code is Code.DEADLINE_EXCEEDED
        for r in fresh
    ) + (0 if give_up else len(unwritten))
    ordered = [done[i] for i in range(len(request.images))]
    counted = tally(ordered)
    # Replace exactly the JSONL read above (or create it): a concurrent delivery
    # that wrote in between wins, and a complete result is never downgraded.
    written = await store.write(
        output.bucket,
        job.results_name,
        dumps_jsonl(ordered),
        content_type=JSONL_TYPE,
        if_generation_match=existing[1] if existing else 0,
        metadata={
            SOURCE_GENERATION_KEY: job.generation,
            COMPLETE_KEY: str(not remaining).lower(),
            **{key: str(counted[name]) for name, key in _TALLY_KEYS.items()},
        },
    )
    uri = f"gs://{output.bucket}/{job.results_name}"
    if not written:
        again = await store.stat(output.bucket, job.results_name)
        state = _manifest_state(again[0], job.generation) if again else JobState.OPEN
        if state is not JobState.OPEN:
            log.info("another delivery finished the manifest first", extra={"state": state})
            return JobOutcome(state, _tally_from(again[0]) if again else None)
        raise TransientFailure(job.uri, "another delivery wrote the results at the same time")
    if settings.gallery:
        # Written after the JSONL it shows; an incomplete batch gets one too, so
        # what is missing can be seen while redeliveries carry on.
        await write_gallery(
            store,
            output.bucket,
            job.results_name,
            ordered,
            [thumbnails.get(i) for i in range(len(request.images))],
            title=job.title,
            elapsed_s=None,
            metadata={SOURCE_GENERATION_KEY: job.generation},
            unless_after=stop_at + settings.deadline_margin_s / 2,
        )
    if not remaining:
        await checkpoints.clear()
        log.info(
            "manifest done",
            extra={"uri": uri, "count": len(done), "usage": total_usage(done.values())},
        )
        return JobOutcome(JobState.DESCRIBED, counted, throttled)
    if (checkpoints.saved or job.retry_transient or unwritten) and not give_up:
        # Progress was made and kept (or a shard, which its batch waits for): fail
        # this delivery so the platform redelivers the event, and the next
        # invocation carries on from here.
        raise TransientFailure(
            job.uri, f"{remaining} of {len(request.images)} sources remain unfinished"
        )
    # Nothing finished in a whole invocation (a redelivery would do the same
    # again, forever), or the retry window is over. Stop here; the JSONL says
    # which sources are missing.
    log.error(
        "manifest incomplete; not asking for redelivery",
        extra={"uri": uri, "remaining": remaining, "progress": checkpoints.saved},
    )
    return JobOutcome(JobState.STALLED, counted, throttled)


def open_job_pipeline(
    runtime: Runtime, job: Job, *, backend: ModelBackend | None = None
) -> AbstractAsyncContextManager[Pipeline]:
    """The pipeline a job's sources run through: its prompt and schema, the buckets it may
    read, its sources pinned to the generations listed (a backfill's), thumbnails for its
    gallery; ``backend`` queues requests for a batch job instead of calling Gemini."""
    request = job.request
    prompt, schema = runtime.settings.prompt_and_schema(request.prompt, request.schema)
    pins = (
        dict(zip(request.images, request.generations, strict=True)) if request.generations else None
    )
    return open_pipeline(
        runtime,
        prompt=prompt,
        allowed_buckets=job.allowed_buckets,
        schema=schema,
        thumbnails=runtime.settings.gallery,
        pinned_generations=pins,
        backend=backend,
    )


async def load_request(
    runtime: Runtime, event: ObjectEvent, *, shard: bool = False
) -> tuple[bytes, BatchRequest] | RequestError | None:
    """The manifest (or shard) of ``event`` at the event's generation: its bytes, parsed.

    Or why there is nothing to run: None when that generation is gone, or the
    error that makes it impossible to run, as ``BATCHES_PREFIX<stem>.error.json`` then says.
    """
    try:
        body = await read_manifest(runtime, event.bucket, event.name, event.generation)
        if body is None:
            return None
        # shard=True: the shard fields are accepted, and required.
        request = parse_body(body, max_batch_size=runtime.settings.max_manifest_images, shard=shard)
    except RequestError as exc:
        await write_error_report(runtime, event, exc)
        return exc
    return body, request


async def write_error_report(runtime: Runtime, event: ObjectEvent, exc: RequestError) -> None:
    """``BATCHES_PREFIX<stem>.error.json``: why the manifest (or shard) of ``event`` was not run."""
    report = {
        "manifest": f"gs://{event.bucket}/{event.name}",
        "generation": event.generation,
        "error": {"code": exc.code, "message": exc.message},
    }
    stem = event.name.removesuffix(MANIFEST_SUFFIX)
    files = batch_files(runtime.settings, event.results.bucket, None)
    await runtime.store.write(
        files.bucket,
        batch_object(files, stem, ".error.json"),
        dumps_json(report),
        content_type=JSON_TYPE,
        metadata={SOURCE_GENERATION_KEY: event.generation},
    )
    log.error("manifest rejected", extra={"error_code": exc.code, "reason": exc.message})


async def _listed(store: Store, bucket: str, name: str) -> tuple[dict[str, str], int] | None:
    """An object's metadata and generation, found by listing its name.

    A listing, unlike a lookup, fails for a bucket that does not exist, so a job
    whose output cannot be written stops before it pays for a single model call.
    """
    for info in await store.list(bucket, name):
        if info.name == name:
            return dict(info.metadata), info.generation
    return None


def _manifest_state(metadata: Mapping[str, str], generation: str) -> JobState:
    """What an existing manifest JSONL means for this event: open, already_done or superseded."""
    described = generation_number(metadata.get(SOURCE_GENERATION_KEY))
    if described > generation_number(generation):
        return JobState.SUPERSEDED  # a newer upload of the manifest owns the results now
    if described == generation_number(generation) and metadata.get(COMPLETE_KEY) != "false":
        return JobState.ALREADY_DONE
    return JobState.OPEN


def tally(records: list[dict[str, Any]]) -> dict[str, int]:
    """ok and error counts, tokens and cost: what a status object sums over shards."""
    usage = total_usage(records)
    ok = sum(r.get("status") == "ok" for r in records)
    cost = round(total_cost(records) * 1_000_000)
    return {"ok": ok, "error": len(records) - ok, **usage, "cost_micro_usd": cost}


def _tally_from(metadata: Mapping[str, str]) -> dict[str, int] | None:
    """The tally a complete JSONL carries in its metadata (None for an older JSONL)."""
    try:
        # A JSONL written before costs were kept has none: 0, not a reason to count again.
        return {
            name: int(metadata.get(key, "0") if name == "cost_micro_usd" else metadata[key])
            for name, key in _TALLY_KEYS.items()
        }
    except (KeyError, ValueError):
        return None


class Keeper:
    """Keeps a job's finished records: a backfill's sidecar first, then the checkpoint.

    A checkpoint says "done", so a failed sidecar write must leave the source to be
    described again, not lost: such a source is in ``unwritten``, with its error.
    """

    def __init__(self, runtime: Runtime, job: Job) -> None:
        settings = runtime.settings
        prompt, schema = settings.prompt_and_schema(job.request.prompt, job.request.schema)
        self.checkpoints = _Checkpoints(
            runtime.store, job.state.bucket, job.parts_prefix, job.generation
        )
        self._sidecars = _Sidecars(
            runtime.store,
            job,
            result_key(settings.model, prompt, schema),
            deployment_key=result_key(settings.model, *settings.prompt_and_schema()),
        )
        self.unwritten: dict[int, StorageUnavailable] = {}

    async def keep(self, index: int, record: Record) -> None:
        try:
            await self._sidecars.save(index, record)
            await self.checkpoints.save(index, record)
        except StorageUnavailable as exc:
            self.unwritten[index] = exc
            log.error(
                "could not keep a finished record; the source is not done",
                extra={"uri": exc.uri, "reason": str(exc), "source": record.source},
            )


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


class _Sidecars:
    """A backfill's records as sidecars, exactly where an upload's would be.

    Each is written against the sidecar generation seen when the backfill
    listed its sources (0: none): if an upload event or another run wrote one
    since, that one stays.
    """

    def __init__(self, store: Store, job: Job, key: str, *, deployment_key: str) -> None:
        self._store = store
        self._job = job
        self._key = key
        # A backfill with a prompt or schema of its own only creates sidecars: the
        # ones uploads got stay, whatever generation the shard's body names.
        self._create_only = key != deployment_key

    async def save(self, index: int, record: Record) -> None:
        job, results = self._job, self._job.sidecars
        request = job.request
        if results is None or record.transient or request.generations is None:
            return
        if record.error_code is Code.NOT_FOUND:
            return  # replaced or deleted since the listing: its upload event describes it
        assert request.sidecar_generations is not None  # parse_batch checks they come together
        source = parse_source(request.images[index])
        if not isinstance(source, GcsSource):
            return  # a backfill lists gs:// objects only
        await write_sidecar(
            self._store,
            results,
            source.name,
            record,
            generation=request.generations[index],
            key=self._key,
            if_generation_match=0 if self._create_only else request.sidecar_generations[index],
        )


def _write_failed(record: Record, exc: StorageUnavailable) -> Record:
    """The record of a source whose sidecar or checkpoint could not be kept, for good:
    an error, with everything else the record knew (calls, tokens, size) kept."""
    return replace(
        record,
        status=ERROR,
        description=None,
        data=None,
        error_code=Code.WRITE_FAILED,
        error_message=(
            f"The source was processed ({record.status}) but its result could not be kept: {exc}."
        ),
        transient=False,
    )


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


async def read_manifest(runtime: Runtime, bucket: str, name: str, generation: str) -> bytes | None:
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
