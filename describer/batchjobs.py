"""Batch mode: a shard's sources answered by one Gemini Batch API job, at half the price.

Submitting (a batch-mode shard's event). Each source is prepared exactly as online
(the pipeline, with :class:`BatchRequests` as its model stage): its request line and
what preparation learnt of it (size, type, thumbnail) are written as objects of their
own, create-only, under the shard's job folder, so a redelivery carries on where the
last delivery stopped; a source that cannot be prepared gets its record at once, as
online. Once every source is queued or recorded, the lines are concatenated by Cloud
Storage (compose) into the job's input, the job is claimed in the status object,
registered for collects, and created (:mod:`describer.batchapi`).

One job per shard, whatever is redelivered or killed: the claim is taken under the
status object's generation, so two deliveries cannot both create. It holds until an
instant written in it (an invocation's whole time from when it was taken), after which
its holder is gone: Cloud Run stops an invocation at its timeout. The holder checks its
claim still holds just before it creates; a delivery that takes over an expired claim
first looks for a job of the shard's display name, which the dead holder may have
created before it could record it; and a holder that finds another job recorded when
it comes to record its own cancels its own.

Landing (a collect, or the event of a Vertex AI job's answers): the job's answers
become the records online calls would have made, at batch prices, each kept as its
sidecar and checkpoint (:class:`describer.jobs.Keeper`); a request that failed for a
passing cause, or whose answer did not fit its schema, is left for the ordinary online
job that then writes the shard's JSONL (:func:`describer.shards.land_shard`). A landing
is claimed as a job's creation is, so two collects at once land a job once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from .batch import Location
from .batchapi import (
    ENDED_WITHOUT_ANSWERS,
    VERTEX_KEY_LABEL,
    BatchRefused,
    JobView,
    answer_record,
    jsonl_lines,
    open_jobs,
)
from .errors import Code, RequestError, SourceError, StorageUnavailable, TransientFailure
from .gemini import Described, Spent, request_json
from .images import PreparedImage
from .jobs import Job, Keeper, open_job_pipeline
from .layout import job_folder, job_registry_name, status_name, vertex_results_prefix
from .outcomes import Outcome
from .records import JSON_TYPE, JSONL_TYPE, QUEUED, Record, dumps_json
from .runtime import Runtime
from .settings import Settings
from .status import now_iso, update_status
from .store import Store, bounded_map

log = logging.getLogger(__name__)

# Objects written or read at once while a job is landed.
IO_CONCURRENCY = 8


class Submitted(StrEnum):
    """How a batch-mode shard's event ended."""

    SUBMITTED = "submitted"  # this delivery created (or adopted) the shard's job
    ALREADY = "already"  # the job was created (or refused) before: nothing to do
    REFUSED = "refused"  # the Batch API refused the job: recorded failed, for a rerun online
    NOTHING_QUEUED = "nothing_queued"  # no source could be prepared: no job, the shard ends


class Landed(StrEnum):
    """How landing one job ended."""

    PENDING = "pending"  # not finished yet
    ENDED = "ended"  # failed, expired or cancelled: its sources wait for a rerun online
    ANSWERS_KEPT = "answers_kept"  # every answer is a record now: the shard's JSONL is next
    BUSY = "busy"  # another invocation is landing it


@dataclass(frozen=True)
class BatchShard:
    """A batch-mode shard: its job (as online, for records and the JSONL) and its batch."""

    job: Job
    batch: str
    run: str
    index: int
    state: Location  # where the batch's status lives
    status_object: str
    shards_bucket: str  # where the shard lives, and a Vertex AI job's answers go
    model: str  # the batch's model, pinned in its status

    @property
    def folder(self) -> str:
        return job_folder(self.state, self.batch, self.run, self.index)

    @property
    def display_name(self) -> str:
        return display_name(self.batch, self.run, self.index)


def display_name(batch: str, run: str, index: int) -> str:
    """A shard's job's name as the shard knows it before the API names it: the same every
    time, so a delivery that takes over a claim finds the job a dead one created."""
    tag = hashlib.sha256(f"{batch}\n{run}\n{index}".encode()).hexdigest()
    return f"describer-{tag[:24]}"


def require_batch_mode(settings: Settings, shards_bucket: str) -> None:
    """Refuse batch mode where a collect could not find or land its jobs from the settings.

    Jobs are registered in Settings.job_bucket (RESULTS_BUCKET, else SHARDS_BUCKET), and a
    landing reads its shard from a bucket the settings vouch for: a status object is
    never trusted to name one.
    """
    if settings.job_bucket is None:
        raise RequestError(
            400,
            "batch_mode_unavailable",
            "Batch mode needs RESULTS_BUCKET (or SHARDS_BUCKET) set on the function: its jobs "
            "are registered there, for the collects that land them.",
        )
    if not shard_bucket_allowed(settings, shards_bucket):
        raise RequestError(
            400,
            "batch_mode_unavailable",
            f"Batch mode's shards would go to {shards_bucket!r}, which is neither in "
            "ALLOWED_BUCKETS nor RESULTS_BUCKET nor SHARDS_BUCKET: list it in ALLOWED_BUCKETS, "
            "or set SHARDS_BUCKET.",
        )


def shard_bucket_allowed(settings: Settings, bucket: str) -> bool:
    return bucket in settings.readable_buckets() or bucket == settings.shards_bucket


class BatchRequests:
    """The pipeline's model stage in batch mode: each prepared image's request, queued.

    The request is the one an online call sends (:func:`describer.gemini.request_json`),
    written as one JSONL line of its own, create-only, keyed by the source's index.
    """

    def __init__(self, runtime: Runtime, shard: BatchShard, todo: list[int]) -> None:
        self._store = runtime.store
        self._settings = runtime.settings
        self._vertex = runtime.gemini.vertex
        self._shard = shard
        self._todo = todo

    def calls(self) -> dict[str, int]:
        return {"limit": 0, "ceiling": 0, "throttled": 0}

    async def answer(
        self, position: int, image: PreparedImage, prompt: str, *, schema: str | None, spent: Spent
    ) -> Described | None:
        key = f"{self._todo[position]:06d}"
        request = request_json(
            image,
            prompt,
            schema=schema,
            model=self._shard.model,
            media_resolution=self._settings.media_resolution,
        )
        if self._vertex:
            request["labels"] = {VERTEX_KEY_LABEL: key}
        line = json.dumps({"key": key, "request": request}, separators=(",", ":")) + "\n"
        try:
            await self._store.write(
                self._shard.state.bucket,
                f"{self._shard.folder}requests/{key}.jsonl",
                line.encode(),
                content_type=JSONL_TYPE,
                if_generation_match=0,
            )
        except StorageUnavailable as exc:
            # Not queued, and not the image's fault: prepared again on redelivery.
            raise SourceError(
                Code.WRITE_FAILED, f"The request could not be queued: {exc}.", transient=True
            ) from exc
        return None


async def submit(
    runtime: Runtime,
    shard: BatchShard,
    entry: Mapping[str, Any] | None,
    *,
    stop_at: float,
    give_up: bool,
) -> Submitted:
    """Prepare what is left of the shard, then create its job once (see the module's text).

    Raises TransientFailure while sources remain unprepared for a passing cause, while
    another delivery holds the claim, or when the job may have been created without its
    creator learning so: the event is redelivered.
    """
    if entry is not None and (entry.get("name") or entry.get("state") in ENDED_WITHOUT_ANSWERS):
        return Submitted.ALREADY
    store, job = runtime.store, shard.job
    request = job.request
    keeper = Keeper(runtime, job)
    done, _ = await keeper.checkpoints.load(request.images)
    queued = await _queued(store, shard)
    todo = [i for i in range(len(request.images)) if i not in done and i not in queued]
    if todo:
        await _prepare(runtime, shard, keeper, todo, stop_at=stop_at, give_up=give_up)
        done, _ = await keeper.checkpoints.load(request.images)
        queued = await _queued(store, shard)
    missing = [i for i in range(len(request.images)) if i not in queued and i not in done]
    if missing and not give_up:
        raise TransientFailure(
            job.uri, f"{len(missing)} of {len(request.images)} sources are not prepared yet"
        )
    # Past the retry window the job goes without them: the online job that writes the
    # shard's JSONL at landing describes (or records) what is neither queued nor recorded.
    if not queued:
        return Submitted.NOTHING_QUEUED
    if time.monotonic() > stop_at:
        # What is left (composing, uploading, creating) needs time of its own.
        raise TransientFailure(job.uri, "every source is queued; no time left to create the job")
    keys = sorted(queued)
    folder, bucket = shard.folder, shard.state.bucket
    # Cloud Storage concatenates the lines: no request passes through this process here.
    for kind in ("requests", "queued"):
        await store.compose(
            bucket,
            f"{folder}{kind}.jsonl",
            [f"{folder}{kind}/{i:06d}.jsonl" for i in keys],
            content_type=JSONL_TYPE,
        )
    claim = await _claim(runtime, shard, len(keys))
    if claim is None:
        return Submitted.ALREADY
    claim_id, takeover = claim
    await store.write(
        runtime.settings.job_bucket or bucket,
        job_registry_name(runtime.settings, shard.batch, shard.run, shard.index),
        dumps_json({"batch": shard.batch, "run": shard.run, "index": shard.index}),
        content_type=JSON_TYPE,
    )
    dest = vertex_results_prefix(
        runtime.settings.shards_prefix, shard.batch, shard.run, shard.index
    )
    async with open_jobs(runtime) as jobs:
        try:
            found = await jobs.find(shard.display_name) if takeover else None
        except BatchRefused as exc:  # not knowing is not "there is none"
            raise TransientFailure(job.uri, f"could not look for the shard's job: {exc}") from exc
        if found is not None:
            created, input_file = found, None
        else:
            await _still_holds(runtime, shard, claim_id)
            try:
                created, input_file = await jobs.create(
                    display_name=shard.display_name,
                    model=shard.model,
                    bucket=bucket,
                    name=f"{folder}requests.jsonl",
                    dest=f"gs://{shard.shards_bucket}/{dest}",
                )
            except BatchRefused as exc:
                await _record_refusal(runtime, shard, claim_id, str(exc))
                return Submitted.REFUSED
            except TransientFailure:
                # The job may exist without our knowing (a reply lost): the next delivery
                # looks for it at once instead of waiting out the claim.
                await _change_entry(runtime, shard, _expire(claim_id))
                raise
        if not await _record_job(runtime, shard, claim_id, created, input_file):
            # Another delivery took over and recorded a job of its own: ours goes.
            log.error("a second job was made for a shard; cancelled", extra={"job": created.name})
            await jobs.cancel(created.name)
            return Submitted.ALREADY
    log.info(
        "batch job submitted",
        extra={"job": created.name, "count": len(keys), "adopted": found is not None},
    )
    return Submitted.SUBMITTED


async def _prepare(
    runtime: Runtime,
    shard: BatchShard,
    keeper: Keeper,
    todo: list[int],
    *,
    stop_at: float,
    give_up: bool,
) -> None:
    """Prepare and queue ``todo``; record at once the sources that cannot be prepared."""
    store, request = runtime.store, shard.job.request

    async def keep(position: int, record: Record) -> None:
        index = todo[position]
        if record.status == QUEUED:
            await store.write(
                shard.state.bucket,
                f"{shard.folder}queued/{index:06d}.jsonl",
                _queued_line(index, record),
                content_type=JSONL_TYPE,
                if_generation_match=0,
            )
        elif not record.transient or give_up:
            # Past the retry window a passing failure is final, as online.
            await keeper.keep(index, replace(record, transient=False))

    backend = BatchRequests(runtime, shard, todo)
    async with open_job_pipeline(runtime, shard.job, backend=backend) as pipeline:
        await pipeline.run([request.images[i] for i in todo], stop_at=stop_at, on_record=keep)


def _queued_line(index: int, record: Record) -> bytes:
    """What preparation learnt of a queued source, as one JSONL line, for its record later."""
    known: dict[str, Any] = {
        "index": index,
        "source": record.source,
        "mime_type": record.mime_type,
        "width": record.width,
        "height": record.height,
        "latency_ms": record.latency_ms,
    }
    if record.thumbnail is not None:
        known["thumbnail"] = base64.b64encode(record.thumbnail).decode("ascii")
    return json.dumps(known, separators=(",", ":")).encode() + b"\n"


async def _queued(store: Store, shard: BatchShard) -> set[int]:
    """The sources queued (request and what was learnt of it both written), by index."""
    found = await store.list(shard.state.bucket, f"{shard.folder}queued/")
    names = (info.name.rsplit("/", 1)[-1].removesuffix(".jsonl") for info in found)
    return {int(stem) for stem in names if stem.isdigit()}


# --- claims: one creator, one lander --------------------------------------------------------


def _until(settings: Settings) -> str:
    """When a claim taken now lapses: an invocation's whole time, after which its holder
    has been stopped. Written into the claim, so a function with another timeout reads
    the holder's lease, not its own."""
    lease = timedelta(seconds=settings.function_timeout_s + settings.deadline_margin_s)
    return (datetime.now(UTC) + lease).isoformat(timespec="milliseconds")


def _holds(until: Any) -> bool:
    try:
        return datetime.fromisoformat(str(until)) > datetime.now(UTC)
    except ValueError:
        return False


def age_s(iso: str) -> float:
    """Seconds since an ISO time the status object wrote; infinite when unreadable."""
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return float("inf")
    return (datetime.now(UTC) - then).total_seconds()


async def _change_entry(
    runtime: Runtime, shard: BatchShard, change: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """Apply ``change`` to the shard's job entry (it returns whether it changed anything);
    the status as it is afterwards."""

    def apply(status: dict[str, Any]) -> dict[str, Any] | None:
        entry = status.get("jobs", {}).get(str(shard.index))
        if status.get("run") != shard.run or entry is None or not change(entry):
            return None
        status["updated_at"] = now_iso()
        return status

    return await update_status(runtime.store, shard.state.bucket, shard.status_object, apply)


async def _claim(runtime: Runtime, shard: BatchShard, count: int) -> tuple[str, bool] | None:
    """Claim the shard's job creation; (claim id, whether an earlier claim was taken over),
    or None when a job is recorded already. Raises TransientFailure while another
    delivery's claim holds."""
    claim_id = uuid.uuid4().hex
    outcome: dict[str, Any] = {}

    def take(status: dict[str, Any]) -> dict[str, Any] | None:
        if status.get("run") != shard.run:
            outcome["gone"] = True
            return None
        entry = status.setdefault("jobs", {}).get(str(shard.index)) or {}
        if entry.get("name") or entry.get("state") in ENDED_WITHOUT_ANSWERS:
            outcome["recorded"] = True
            return None
        if entry.get("claim") and _holds(entry.get("claim_until")):
            outcome["held"] = True
            return None
        status["jobs"][str(shard.index)] = {
            "state": "submitting",
            "claim": claim_id,
            "claimed_at": now_iso(),
            "claim_until": _until(runtime.settings),
            "display_name": shard.display_name,
            "images": count,
            "shard": shard.job.uri,
            "generation": shard.job.generation,
        }
        outcome["takeover"] = bool(entry.get("claim"))
        status["updated_at"] = now_iso()
        return status

    await update_status(runtime.store, shard.state.bucket, shard.status_object, take)
    if outcome.get("recorded") or outcome.get("gone"):
        return None
    if outcome.get("held"):
        raise TransientFailure(shard.job.uri, "another delivery is creating the shard's job")
    return claim_id, bool(outcome.get("takeover"))


async def _still_holds(runtime: Runtime, shard: BatchShard, claim_id: str) -> None:
    """Just before creating: the claim is still ours and has not lapsed (else a taker may
    be creating the shard's job at this moment)."""
    status, _ = await runtime.store.read_json(shard.state.bucket, shard.status_object)
    entry = (status or {}).get("jobs", {}).get(str(shard.index)) or {}
    if entry.get("claim") != claim_id or not _holds(entry.get("claim_until")):
        raise TransientFailure(shard.job.uri, "the claim on the shard's job lapsed")


def _expire(claim_id: str) -> Callable[[dict[str, Any]], bool]:
    def expire(entry: dict[str, Any]) -> bool:
        if entry.get("claim") != claim_id:
            return False
        entry["claim_until"] = now_iso()
        return True

    return expire


async def _record_job(
    runtime: Runtime, shard: BatchShard, claim_id: str, job: JobView, input_file: str | None
) -> bool:
    """Record the created (or adopted) job under our claim; False when another delivery
    recorded a job instead (it took the claim over: ours is the second)."""
    outcome: dict[str, bool] = {}

    def record(entry: dict[str, Any]) -> bool:
        if entry.get("name"):
            outcome["theirs"] = entry["name"] != job.name
            return False
        entry.update(name=job.name, state=job.state, submitted_at=now_iso())
        if input_file:
            entry["input_file"] = input_file
        entry.pop("claim", None)
        entry.pop("claim_until", None)
        return True

    await _change_entry(runtime, shard, record)
    return not outcome.get("theirs")


async def _record_refusal(runtime: Runtime, shard: BatchShard, claim_id: str, reason: str) -> None:
    def record(entry: dict[str, Any]) -> bool:
        if entry.get("claim") != claim_id:
            return False
        entry.update(state="failed", error=f"refused: {reason}", ended_at=now_iso())
        entry.pop("claim", None)
        entry.pop("claim_until", None)
        return True

    await _change_entry(runtime, shard, record)
    await _unregister(runtime, shard)
    log.error(
        "the Batch API refused the shard's job; it waits for a rerun online",
        extra={"reason": reason, "uri": shard.job.uri},
    )


async def _take_landing(runtime: Runtime, shard: BatchShard) -> bool:
    """Claim the landing of the shard's job, so two collects at once land it once."""
    claim_id = uuid.uuid4().hex

    def take(entry: dict[str, Any]) -> bool:
        landing = entry.get("landing") or {}
        if entry.get("state") == "landed" or _holds(landing.get("until")):
            return False
        entry["landing"] = {"claim": claim_id, "until": _until(runtime.settings)}
        return True

    status = await _change_entry(runtime, shard, take)
    entry = (status or {}).get("jobs", {}).get(str(shard.index)) or {}
    return bool((entry.get("landing") or {}).get("claim") == claim_id)


async def release_landing(runtime: Runtime, shard: BatchShard) -> None:
    """Give up the landing claim of a landing cut short, so the next collect carries on."""

    def release(entry: dict[str, Any]) -> bool:
        return entry.pop("landing", None) is not None

    await _change_entry(runtime, shard, release)


def abandoned(entry: Mapping[str, Any], settings: Settings) -> bool:
    """A claim whose job was never recorded, lapsed longer ago than its shard's event is
    redelivered: no delivery will come to record it."""
    until = entry.get("claim_until")
    if not until or _holds(until):
        return False
    return age_s(str(until)) > settings.event_retry_window_s + settings.function_timeout_s


async def settle_abandoned(
    runtime: Runtime, batch: str, run: str, index: int, state: Location, status: Mapping[str, Any]
) -> Outcome:
    """An abandoned claim: adopt the job its holder may have made, or record the shard as
    failed, so a rerun online can take it and the batch can complete."""
    async with open_jobs(runtime) as jobs:
        found = await jobs.find(display_name(batch, run, index))

    def settle(current: dict[str, Any]) -> dict[str, Any] | None:
        entry = current.get("jobs", {}).get(str(index))
        if current.get("run") != run or entry is None or entry.get("name"):
            return None
        if found is not None:
            entry.update(name=found.name, state=found.state, submitted_at=now_iso())
        else:
            entry.update(
                state="failed",
                error="its shard's event stopped before a job was made",
                ended_at=now_iso(),
            )
        for key in ("claim", "claim_until"):
            entry.pop(key, None)
        current["updated_at"] = now_iso()
        return current

    await update_status(runtime.store, state.bucket, status_name(state, batch), settle)
    if found is not None:
        return Outcome.BATCH_PENDING
    settings = runtime.settings
    registry = job_registry_name(settings, batch, run, index)
    await runtime.store.delete_all(settings.job_bucket or state.bucket, registry)
    return Outcome.BATCH_ENDED


async def retire(runtime: Runtime, batch: str, run: str, index: int) -> None:
    """A job of a run its batch no longer runs (a manifest uploaded again): cancel it if it
    still runs, and delete its files, so nothing of the old run is paid for or reused."""
    async with open_jobs(runtime) as jobs:
        found = await jobs.find(display_name(batch, run, index))
        if found is not None and found.state in ("pending", "running"):
            try:
                await jobs.cancel(found.name)
            except BatchRefused as exc:
                log.warning("could not cancel a superseded job", extra={"reason": str(exc)})
    settings = runtime.settings
    state = Location(settings.job_bucket or "", settings.batches_prefix)
    await runtime.store.delete_all(state.bucket, job_folder(state, batch, run, index))
    log.info("a superseded run's job retired", extra={"batch": batch, "shard": index})


# --- landing --------------------------------------------------------------------------------


async def land(
    runtime: Runtime, shard: BatchShard, entry: Mapping[str, Any], *, stop_at: float
) -> Landed:
    """Land the shard's job if it has finished: each answer kept as its record.

    What is left (passing per-request errors, answers that did not fit their schema)
    the online job that writes the shard's JSONL describes next. Raises TransientFailure
    when an answer could not be kept (the landing claim is given back by the caller).
    """
    name = str(entry["name"])
    if entry.get("answers_kept"):
        # A landing cut short after its answers were kept: the JSONL is next, whatever the
        # Batch API now says of the job (its answers file may have expired since).
        return Landed.ANSWERS_KEPT if await _take_landing(runtime, shard) else Landed.BUSY
    async with open_jobs(runtime) as jobs:
        try:
            view = await jobs.get(name)
        except BatchRefused as exc:  # deleted, or no longer ours to read
            view = JobView(name, "failed", error=f"the Batch API no longer gives it: {exc}")
        if view.state in ("pending", "running"):
            await _note_state(runtime, shard, view)
            return Landed.PENDING
        if view.state in ENDED_WITHOUT_ANSWERS:
            return await _ended(runtime, shard, view)
        if not await _take_landing(runtime, shard):
            return Landed.BUSY
        try:
            answers = await jobs.answers(view)
        except BatchRefused as exc:
            # Its answers file is gone (it expires after 48 h): every source not kept yet is
            # described online as the JSONL is written, under the same checkpoints.
            log.error(
                "a batch job's answers cannot be read; its sources are asked online",
                extra={"job": name, "reason": str(exc)},
            )
            answers = {}
    data = await runtime.store.read_bytes(shard.state.bucket, f"{shard.folder}queued.jsonl")
    queued = jsonl_lines(data or b"")
    keeper = Keeper(runtime, shard.job)
    request = shard.job.request
    prompt, schema = runtime.settings.prompt_and_schema(request.prompt, request.schema)
    prices = runtime.settings.batch_prices()
    online = 0

    async def keep(known: dict[str, Any]) -> None:
        nonlocal online
        index = int(known["index"])
        if index >= len(request.images) or known.get("source") != request.images[index]:
            return
        record = answer_record(
            known,
            answers.get(f"{index:06d}"),
            job=name,
            model=shard.model,
            prompt=prompt,
            schema=schema,
            prices=prices,
        )
        if record is None:
            online += 1
            return
        await keeper.keep(index, record)

    await bounded_map(keep, queued, limit=IO_CONCURRENCY)
    if keeper.unwritten:
        # Kept ones stay kept; the next landing keeps the rest, rather than pay online for them.
        raise TransientFailure(
            f"gs://{shard.state.bucket}/{shard.folder}",
            f"{len(keeper.unwritten)} answers of {name} could not be kept",
        )
    await _note_state(runtime, shard, view, answers=len(answers), online=online, answers_kept=1)
    log.info(
        "batch job landed",
        extra={"job": name, "answers": len(answers), "online": online, "count": len(queued)},
    )
    return Landed.ANSWERS_KEPT


async def _ended(runtime: Runtime, shard: BatchShard, view: JobView) -> Landed:
    await _note_state(runtime, shard, view)
    await _unregister(runtime, shard)
    log.error(
        "batch job ended without answers; its sources wait for a rerun online",
        extra={"job": view.name, "state": view.state, "reason": view.error},
    )
    return Landed.ENDED


# A job's states in the order they come: a collect that read an older state than another
# collect wrote never moves the entry back.
_ORDER = {"submitting": 0, "pending": 1, "running": 2, "succeeded": 3, "failed": 3,
          "cancelled": 3, "expired": 3, "landed": 4}  # fmt: skip


async def _note_state(runtime: Runtime, shard: BatchShard, view: JobView, **counts: int) -> None:
    def note(entry: dict[str, Any]) -> bool:
        if entry.get("name") != view.name:
            return False
        if _ORDER.get(str(entry.get("state")), 0) > _ORDER.get(view.state, 0):
            return False
        if entry.get("state") == view.state and not counts:
            return False
        entry.update(state=view.state, checked_at=now_iso(), **counts)
        if view.error:
            entry["error"] = view.error
        elif view.state in ENDED_WITHOUT_ANSWERS:
            # The Gemini API's SDK reads no reason off a failed batch.
            entry["error"] = f"the Batch API says the job {view.state} and gives no reason"
        if view.state not in ("pending", "running"):
            entry.setdefault("ended_at", now_iso())
        return True

    await _change_entry(runtime, shard, note)


async def _unregister(runtime: Runtime, shard: BatchShard) -> None:
    settings = runtime.settings
    registry = job_registry_name(settings, shard.batch, shard.run, shard.index)
    await runtime.store.delete_all(settings.job_bucket or shard.state.bucket, registry)


async def forget(runtime: Runtime, shard: BatchShard, entry: Mapping[str, Any]) -> None:
    """Once the shard's JSONL is written: the job's files, its registration and its Files
    API input go (idempotent: a redelivery finds less to delete)."""
    try:
        await runtime.store.delete_all(shard.state.bucket, shard.folder)
        if runtime.gemini.vertex:
            # Vertex AI wrote its answers (and a copy of every request) beside the shard.
            answers = vertex_results_prefix(
                runtime.settings.shards_prefix, shard.batch, shard.run, shard.index
            )
            await runtime.store.delete_all(shard.shards_bucket, answers, any_writer=True)
        await _unregister(runtime, shard)
    except StorageUnavailable as exc:
        log.warning("could not delete a landed job's files", extra={"reason": str(exc)})
    if entry.get("input_file") and not runtime.gemini.vertex:
        async with open_jobs(runtime) as jobs:
            await jobs.delete_input(str(entry["input_file"]))
