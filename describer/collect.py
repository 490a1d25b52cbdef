"""Landing batch-mode jobs without a person: ``{"collect": true}``, and reruns online.

The Gemini API sends no event when a batch job ends, so a schedule (deploy.sh sets one
up) POSTs ``{"collect": true}`` to describe_http every few minutes. A collect lists
the jobs registered in Settings.job_bucket and lands every one that finished
(:func:`describer.shards.land_shard`), a few at once, and answers with what it landed
and what is still pending. Two collects at once land each job once: a landing is
claimed in the batch's status object first.

A Vertex AI job's answers arrive as objects under SHARDS_PREFIX, and their event lands
the job the same way (:func:`land_results`); a collect also finds Vertex AI jobs,
including the ones that failed and so wrote nothing that could make an event.

``{"rerun_online": "<batch>"}`` describes online the sources of a batch whose jobs
failed, expired or were cancelled: each such shard is written again, and its new
event runs it as an online shard.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .batch import Location
from .batchapi import ENDED_WITHOUT_ANSWERS
from .errors import RequestError, StorageUnavailable, TransientFailure
from .layout import job_registry_prefix, parse_vertex_results_name, status_name
from .outcomes import Outcome
from .records import JSON_TYPE
from .runtime import ObjectEvent, Runtime
from .shards import land_shard, shard_of
from .status import now_iso, update_status
from .store import bounded_map, is_own_output

log = logging.getLogger(__name__)

# Jobs landed at once by one collect: each holds a job's answers file (with Vertex AI, a copy
# of every request too: about SHARD_SIZE prepared images) and writes its records.
LAND_CONCURRENCY = 2
_OUTCOME_KINDS = {
    Outcome.LANDED: "landed",
    Outcome.MERGED: "landed",
    Outcome.ALREADY_DONE: "already_landed",
    Outcome.BATCH_PENDING: "pending",
    Outcome.BATCH_ENDED: "ended",
    Outcome.BATCH_BUSY: "busy",
}


def is_collect(data: Any) -> bool:
    return isinstance(data, dict) and "collect" in data


def is_rerun(data: Any) -> bool:
    return isinstance(data, dict) and "rerun_online" in data


async def collect(
    runtime: Runtime, data: dict[str, Any], *, stop_at: float
) -> tuple[int, dict[str, Any]]:
    """Land every registered job that finished: (200, what was landed, pending, or left for
    later).

    ``stop_at`` (``time.monotonic()``): no landing starts in the last half of what is left,
    so the ones started can write their JSONL; the rest are ``not_reached``, for the next.
    """
    if set(data) != {"collect"} or data["collect"] is not True:
        raise RequestError(
            400, "invalid_request", 'A collect is exactly {"collect": true}, with no other field.'
        )
    settings, store = runtime.settings, runtime.store
    bucket = settings.job_bucket
    jobs: list[dict[str, Any]] = []
    if bucket is None:
        return 200, _answer(
            jobs, "No batch-mode jobs can exist: RESULTS_BUCKET and SHARDS_BUCKET are unset."
        )
    # Only registrations the function wrote: a name planted beside them costs nothing.
    entries = [
        info.name
        for info in await store.list(bucket, job_registry_prefix(settings))
        if is_own_output(info.metadata)
    ]
    start_by = time.monotonic() + (stop_at - time.monotonic()) / 2

    async def land(name: str) -> None:
        if time.monotonic() > start_by:
            jobs.append({"batch": "", "shard": 0, "registration": name, "outcome": "not_reached"})
            return
        registered, _ = await store.read_json(bucket, name)
        batch, run, index = _registered(registered)
        if batch is None:
            log.error("a job registration that is not one; ignored", extra={"uri": name})
            return
        found: dict[str, Any] = {"batch": batch, "shard": index}
        jobs.append(found)
        try:
            outcome = await land_shard(runtime, batch, run, index, stop_at=stop_at)
        except (TransientFailure, StorageUnavailable) as exc:
            found.update(outcome="retry", reason=str(exc))
            return
        except Exception as exc:
            # One job's trouble is its own line: the collect lands the others.
            log.exception("a job could not be landed", extra={"batch": batch, "shard": index})
            found.update(outcome="error", reason=f"{type(exc).__name__}: {exc}")
            return
        found["outcome"] = _OUTCOME_KINDS.get(outcome, str(outcome))
        if outcome in (Outcome.SUPERSEDED, Outcome.SHARD_INVALID):
            # Its batch moved on, or it is not one to land: nothing is left to collect.
            await store.delete_all(bucket, name)

    await bounded_map(land, entries, limit=LAND_CONCURRENCY)
    return 200, _answer(jobs, None)


def _registered(body: Any) -> tuple[str | None, str, int]:
    """(batch, run, shard) of a job registration; batch None when it is not one."""
    try:
        return str(body["batch"]), str(body["run"]), int(body["index"])
    except (TypeError, KeyError, ValueError):
        return None, "", 0


def _answer(jobs: list[dict[str, Any]], message: str | None) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["outcome"]] = counts.get(job["outcome"], 0) + 1
    body: dict[str, Any] = {
        "collected": len(jobs),
        "counts": counts,
        "jobs": sorted(jobs, key=lambda j: (j["batch"], j["shard"], j.get("registration", ""))),
    }
    if message:
        body["message"] = message
    log.info("collect done", extra={"counts": counts})
    return body


async def land_results(runtime: Runtime, event: ObjectEvent) -> Outcome:
    """A Vertex AI job's answers arrived: land its job (again later if it has not ended)."""
    parsed = parse_vertex_results_name(runtime.settings.shards_prefix, event.name)
    if parsed is None:
        return Outcome.IGNORED_NOT_SHARD
    batch, run, index = parsed
    outcome = await land_shard(runtime, batch, run, index, stop_at=event.stop_at)
    if outcome is Outcome.BATCH_PENDING and not event.give_up:
        # The answers are written before the job says it succeeded: come back shortly.
        raise TransientFailure(f"gs://{event.bucket}/{event.name}", "the job has not ended yet")
    return outcome


async def rerun_online(runtime: Runtime, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Describe online the sources of a batch's jobs that ended without answers."""
    batch = data.get("rerun_online")
    if set(data) != {"rerun_online"} or not isinstance(batch, str) or not batch:
        raise RequestError(
            400,
            "invalid_request",
            'A rerun is exactly {"rerun_online": "<batch>"}: the batch named in its status object.',
        )
    settings, store = runtime.settings, runtime.store
    if settings.job_bucket is None:
        raise RequestError(404, "batch_not_found", "No batch-mode batch can exist here.")
    state = Location(settings.job_bucket, settings.batches_prefix)
    name = status_name(state, batch)
    status, _ = await store.read_json(state.bucket, name)
    if status is None or status.get("mode") != "batch":
        raise RequestError(404, "batch_not_found", f"No batch-mode batch {batch!r} is recorded.")
    finished = status.get("finished_shards", {})
    # Each ended job's shard is rerun once: a second request (or a retry after a rewrite
    # failed halfway) rewrites only those not rewritten yet, so no shard runs twice.
    ended = [
        int(i)
        for i, entry in (status.get("jobs") or {}).items()
        if entry.get("state") in ENDED_WITHOUT_ANSWERS
        and i not in finished
        and not entry.get("rerun_generation")
        and entry.get("generation")
    ]
    if not ended:
        states = {i: e.get("state") for i, e in (status.get("jobs") or {}).items()}
        raise RequestError(
            409,
            "nothing_to_rerun",
            f"No job of {batch!r} ended without answers and is still to rerun (jobs: "
            f"{states or 'none yet'}).",
        )
    run = status["run"]

    def mark(s: dict[str, Any]) -> dict[str, Any] | None:
        if s.get("run") != run:
            return None
        for index in ended:
            s["jobs"][str(index)].update(rerun=True, rerun_at=now_iso())
        s["updated_at"] = now_iso()
        return s

    await update_status(store, state.bucket, name, mark)

    async def again(index: int) -> None:
        where = shard_of(settings, status, index)
        body = await store.read_bytes(*where) if where else None
        if where is None or body is None:
            raise RequestError(409, "shard_gone", f"Shard {index} of {batch!r} is gone.")
        # Written again, the same body makes a new event: its shard now runs online. Only
        # over the generation its job was made from: a rerun asked twice (or retried after a
        # status update failed) rewrites each shard once, so none runs online twice.
        bucket, shard = where
        entry = (status.get("jobs") or {}).get(str(index)) or {}
        if not await store.write(
            bucket,
            shard,
            body,
            content_type=JSON_TYPE,
            metadata={"describer-shard": shard},
            if_generation_match=int(entry["generation"]),
        ):
            log.info("shard rewritten for its rerun already", extra={"shard": index})
        written = await store.stat(bucket, shard)
        generation = str(written[1]) if written else "unknown"

        def rewritten(s: dict[str, Any]) -> dict[str, Any] | None:
            if s.get("run") != run:
                return None
            s["jobs"][str(index)]["rerun_generation"] = generation
            return s

        await update_status(store, state.bucket, name, rewritten)

    await bounded_map(again, ended, limit=LAND_CONCURRENCY)
    log.info("rerun online", extra={"batch": batch, "shards": ended})
    return 202, {
        "batch": batch,
        "rerun_online": sorted(ended),
        "status_uri": f"gs://{state.bucket}/{name}",
    }
