"""A backfill's listing, a step at a time, so that no invocation lists for longer than it may.

A step lists pages from where the last one stopped, for at most its share of the
invocation's time, sorts out which images need describing (page by page: each
page's sidecars are listed by name range), and writes the outcome as a plan in
the batch's state location, create-only, before anything else. The plan is the
step's write-ahead log. Applying it appends the step's shards to the status
object (their digests first), writes the shard manifests, and writes the next
step's object under SHARDS_PREFIX, which arrives as an event of its own.

Every part is idempotent, so the redelivery of a step's event mends a crash
anywhere in it: a plan already written is applied rather than listed again, a
plan already applied only has its shards and next step written again
(create-only), and the step that finds the listing done with no shard pending
merges. The status object says which step is next; an event for any other step
changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from .batch import BatchRequest, Location, parse_output
from .errors import RequestError, TransientFailure
from .images import IMAGE_SUFFIXES, UNTYPED_CONTENT_TYPES, media_type
from .jobs import MANIFEST_SUFFIX
from .layout import (
    KIND_KEY,
    is_sidecar,
    listing_object_name,
    parse_listing_name,
    plan_name,
    sidecar_is_current,
    sidecar_name,
    state_location,
    status_name,
)
from .outcomes import Outcome
from .records import JSON_TYPE, dumps_json
from .runtime import ObjectEvent, Runtime
from .settings import Settings
from .shards import digest, files_of, merge, plan_shards, ready_to_merge, write_shards
from .status import now_iso, update_status
from .store import (
    READ_CONCURRENCY,
    ObjectInfo,
    bounded_map,
    is_own_output,
)

log = logging.getLogger(__name__)

# A request answers within seconds however much the prefix holds: it lists this long at most.
REQUEST_LIST_S = 5.0
# A listing step's event lists this long at most (and never past half its time left).
STEP_LIST_S = 60.0
# A step plans at most this many images: its plan object stays a few MB.
STEP_MAX_IMAGES = 10_000


@dataclass(frozen=True)
class Scope:
    """What a backfill lists, where its sidecars go, and which sidecars count as current."""

    where: Location  # the bucket and prefix backfilled
    results: Location  # where sidecars go
    key: str  # the result key of this backfill's model, prompt and schema
    deployment_key: str  # the key uploads get: only sidecars made with it may be replaced


@dataclass
class Step:
    """What one listing step found: the images to describe and the counts of the rest."""

    cursor: str | None  # the page token to list from next
    done: bool = False  # the listing reached the end, or the backfill's limit
    stopped_at_limit: bool = False
    pages: int = 0
    listed: int = 0
    already_described: int = 0
    kept_sidecars: int = 0
    names_taken: int = 0
    # (image, generation of the sidecar it replaces or 0)
    todo: list[tuple[ObjectInfo, int]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "pages": self.pages,
            "listed": self.listed,
            "already_described": self.already_described,
            "kept_sidecars": self.kept_sidecars,
            "names_taken": self.names_taken,
        }


def new_listing() -> dict[str, Any]:
    """A status object's ``listing`` before its first step."""
    return {
        "step": 0,
        "cursor": None,
        "done": False,
        "stopped_at_limit": False,
        **Step(cursor=None).counts(),
    }


async def list_step(
    runtime: Runtime, scope: Scope, *, cursor: str | None, until: float, room: int
) -> Step:
    """List pages from ``cursor`` until ``until`` (``time.monotonic()``), the end, or
    ``room`` images to describe; at least one page, so every step moves on."""
    settings = runtime.settings
    step = Step(cursor=cursor)
    while True:
        page, token = await runtime.store.list_page(
            scope.where.bucket,
            scope.where.prefix,
            page_token=step.cursor,
            page_size=settings.list_page_size,
        )
        step.pages += 1
        step.listed += len(page)
        step.cursor = token
        await _sort_page(runtime, scope, page, step)
        if len(step.todo) >= room:
            # The rest of this page is left for a later backfill, as the limit says.
            step.stopped_at_limit = len(step.todo) > room or token is not None
            del step.todo[room:]
            step.done = True
            return step
        if token is None:
            step.done = True
            return step
        if len(step.todo) >= STEP_MAX_IMAGES or time.monotonic() >= until:
            return step


async def _sort_page(runtime: Runtime, scope: Scope, page: list[ObjectInfo], step: Step) -> None:
    """Add a page's images to ``step``: to describe, or counted as why not."""
    images = [o for o in page if is_source(o, scope.where.bucket, scope.results, runtime.settings)]
    if not images:
        return
    described = await _sidecars_of(runtime, scope, images)
    for image in images:
        name = sidecar_name(scope.results, image.name)
        if name in described and described[name] is None:
            step.names_taken += 1  # something that is not its sidecar has the name: kept
            continue
        found = described.get(name)
        sidecar = found[0] if found else None
        if found and sidecar_is_current(
            found[0].metadata,
            found[1],
            generation=str(image.generation),
            key=scope.key,
            settings=runtime.settings,
        ):
            step.already_described += 1
            continue
        if sidecar is not None and scope.key != scope.deployment_key:
            step.kept_sidecars += 1  # a prompt or schema of the caller's own replaces none
            continue
        step.todo.append((image, sidecar.generation if sidecar else 0))


def is_source(image: ObjectInfo, bucket: str, results: Location, settings: Settings) -> bool:
    """Whether a listed object is an image a backfill describes (never the function's own)."""
    name = image.name
    if name.endswith(("/", MANIFEST_SUFFIX)) or name.startswith(
        (settings.shards_prefix, settings.batches_prefix)
    ):
        return False
    if bucket == results.bucket and name.startswith(results.prefix):
        return False
    if is_own_output(image.metadata):
        return False
    content_type = media_type(image.content_type)
    if content_type.startswith("image/"):
        return True
    return (
        content_type in UNTYPED_CONTENT_TYPES
        and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES
    )


async def _sidecars_of(
    runtime: Runtime, scope: Scope, images: list[ObjectInfo]
) -> dict[str, tuple[ObjectInfo, Any] | None]:
    """The objects at the images' sidecar names: each listed sidecar with its record when
    it had to be read (None when its metadata tells all), or None where an object is there
    that is not the image's sidecar (and so must never be replaced).

    One listing of the name range the page's sidecars fall in: every sidecar name is
    the image's name plus ``.json`` under the results prefix, so it sorts at or after
    the first image's name and at or before the greatest of the sidecar names.
    """
    results, bucket = scope.results, scope.where.bucket
    wanted = {sidecar_name(results, i.name): f"gs://{bucket}/{i.name}" for i in images}
    last = max(wanted)
    listed = await runtime.store.list(
        results.bucket,
        f"{results.prefix}{scope.where.prefix}",
        start=sidecar_name(results, images[0].name).removesuffix(".json"),
        end=last[:-1] + chr(ord(last[-1]) + 1),  # just past the last name: the end is exclusive
    )
    found: dict[str, tuple[ObjectInfo, Any] | None] = {}
    unmarked: list[ObjectInfo] = []
    for info in listed:
        if info.name not in wanted:
            continue
        if is_sidecar(info.metadata, None, ""):
            found[info.name] = (info, None)  # marked as one
        elif KIND_KEY not in info.metadata and is_own_output(info.metadata):
            unmarked.append(info)  # a sidecar from before the markers, or not: read it
        else:
            found[info.name] = None

    async def judge(info: ObjectInfo) -> None:
        record, _ = await runtime.store.read_json(results.bucket, info.name)
        is_one = is_sidecar(info.metadata, record, wanted[info.name])
        found[info.name] = (info, record) if is_one else None

    await bounded_map(judge, unmarked, limit=READ_CONCURRENCY)
    return found


def make_plan(
    step: Step, status: dict[str, Any], number: int, *, bucket: str, shards_prefix: str
) -> dict[str, Any]:
    """Step ``number`` as planned: its counts, where the next step lists from, its shards."""
    request = BatchRequest(
        images=[f"gs://{bucket}/{image.name}" for image, _ in step.todo],
        prompt=status["prompt"],
        output=None,
        generations=[str(image.generation) for image, _ in step.todo],
        sidecar_generations=[sidecar for _, sidecar in step.todo],
    )
    planned = plan_shards(
        request,
        status,
        shards_prefix,
        first_index=int(status["shards"]),
        first_offset=int(status["total"]),
    )
    return {
        "step": number,
        "run": status["run"],
        "cursor": step.cursor,
        "done": step.done,
        "stopped_at_limit": step.stopped_at_limit,
        "counts": step.counts(),
        "images": len(step.todo),
        "shards": [{"name": name, "body": body.decode()} for name, body in planned],
    }


async def write_plan(
    runtime: Runtime, state: Location, status: dict[str, Any], plan: dict[str, Any]
) -> dict[str, Any]:
    """Write a step's plan create-only; the plan that is stored (ours, or an earlier one)."""
    name = plan_name(state, status["batch"], status["run"], plan["step"])
    if await runtime.store.write(
        state.bucket, name, dumps_json(plan), content_type=JSON_TYPE, if_generation_match=0
    ):
        return plan
    stored, _ = await runtime.store.read_json(state.bucket, name)
    if stored is None:
        raise TransientFailure(f"gs://{state.bucket}/{name}", "the plan was written and is gone")
    return stored


async def start_step(
    runtime: Runtime, status: dict[str, Any], *, shards_bucket: str, number: int
) -> None:
    """Hand step ``number`` on: its object under SHARDS_PREFIX arrives as its own event."""
    batch, run = status["batch"], status["run"]
    name = listing_object_name(runtime.settings.shards_prefix, batch, run, number)
    body = {"listing": {"batch": status["batch"], "run": status["run"], "step": number}}
    await runtime.store.write(
        shards_bucket, name, dumps_json(body), content_type=JSON_TYPE, if_generation_match=0
    )


def scope_of(status: dict[str, Any], settings: Settings) -> Scope:
    """A backfill's scope as its status records it, checked against the settings."""
    where = parse_output(str(status["source"]), what="the status's source")
    results = parse_output(str(status["output"]), what="the status's output")
    if where.bucket not in settings.readable_buckets() or results.prefix != settings.results_prefix:
        raise RequestError(
            400, "invalid_request", "the backfill's status names buckets the settings do not allow"
        )
    return Scope(where, results, str(status["result_key"]), str(status["deployment_key"]))


def _applied(plan: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """The change to the status that applies ``plan``: once, and only to its own run."""

    def apply(status: dict[str, Any]) -> dict[str, Any] | None:
        listing = status["listing"]
        if status.get("run") != plan["run"] or listing["step"] != plan["step"]:
            return None
        bodies = [shard["body"].encode() for shard in plan["shards"]]
        status["shard_digests"] = [*status["shard_digests"], *map(digest, bodies)]
        status["shards"] = int(status["shards"]) + len(bodies)
        status["total"] = int(status["total"]) + int(plan["images"])
        finished = status["finished_shards"]
        status["pending_shards"] = [i for i in range(status["shards"]) if str(i) not in finished]
        listing.update(
            step=plan["step"] + 1,
            cursor=plan["cursor"],
            done=plan["done"],
            stopped_at_limit=plan["stopped_at_limit"],
        )
        for key, value in plan["counts"].items():
            listing[key] = int(listing.get(key, 0)) + int(value)
        status["updated_at"] = now_iso()
        return status

    return apply


async def continue_listing(runtime: Runtime, event: ObjectEvent) -> Outcome:
    """Run the listing step an event names: list (or take its plan), apply, hand on."""
    settings = runtime.settings
    store = runtime.store
    parsed = parse_listing_name(settings.shards_prefix, event.name)
    fields = {"uri": f"gs://{event.bucket}/{event.name}"}
    if parsed is None:
        log.info("object under the shards prefix is not a listing step; ignored", extra=fields)
        return Outcome.IGNORED_NOT_SHARD
    batch, run, number = parsed
    # As for shards: the status is found from the settings, never from the event's object.
    state = state_location(settings, event.bucket)
    status_object = status_name(state, batch)
    status, _ = await store.read_json(state.bucket, status_object)
    if status is None or status.get("run") != run or status.get("kind") != "backfill":
        log.info("listing step of a run that is not the batch's current one; ignored", extra=fields)
        return Outcome.SUPERSEDED
    expected = int(status["listing"]["step"])
    if number > expected:
        log.error("listing step ahead of its batch; refused", extra={**fields, "next": expected})
        return Outcome.LISTING_INVALID
    name = plan_name(state, batch, run, number)
    plan, _ = await store.read_json(state.bucket, name)
    if number == expected:
        if plan is None:
            scope = scope_of(status, settings)
            now = time.monotonic()
            step = await list_step(
                runtime,
                scope,
                cursor=status["listing"]["cursor"],
                until=now + min(STEP_LIST_S, (event.stop_at - now) / 2),
                room=int(status["limit"]) - int(status["total"]),
            )
            planned = make_plan(
                step,
                status,
                number,
                bucket=scope.where.bucket,
                shards_prefix=settings.shards_prefix,
            )
            plan = await write_plan(runtime, state, status, planned)
        status = await update_status(store, state.bucket, status_object, _applied(plan))
        if status is None or status.get("run") != run:
            return Outcome.SUPERSEDED
    elif plan is None:
        return Outcome.ALREADY_LISTED  # merged, and its plans deleted
    shards_bucket = settings.shards_bucket or event.bucket
    # What a crash before these writes left undone, its redelivery does (create-only).
    await write_shards(
        runtime,
        [(shard["name"], shard["body"].encode()) for shard in plan["shards"]],
        shards_bucket=shards_bucket,
    )
    log.info(
        "backfill listing step done",
        extra={**fields, "step": number, "count": plan["images"], "done": plan["done"]},
    )
    if not plan["done"]:
        await start_step(runtime, status, shards_bucket=shards_bucket, number=number + 1)
        return Outcome.LISTED
    files = files_of(status)
    if files is not None and ready_to_merge(status):
        # Every shard finished before the listing did: no shard is left to merge.
        await merge(runtime, status, files, state, shards_bucket=shards_bucket)
        return Outcome.MERGED
    return Outcome.LISTED
