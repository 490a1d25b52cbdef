"""Backfill: describe the images already in a bucket, as if each had just been uploaded.

``{"backfill": "gs://bucket/prefix/"}`` over HTTP lists the prefix a step at a time
(:mod:`describer.listing`: the request lists for seconds, each later step in an
event of its own), leaves out what is not an image or already has a sidecar for the
current model, prompt and schema, and shards the rest (:mod:`describer.shards`) as
it goes, so shards run while the listing continues. Each record
becomes the sidecar an upload would have got, so a second backfill of the same
prefix finds them and resumes where the first stopped, and never repeats.

Runaway loops, the reason comparable tools dropped their backfill feature, are
kept out by construction: nothing under RESULTS_PREFIX or SHARDS_PREFIX, no
manifest and no object this function wrote is ever listed as a source; shards
never create shards; and one backfill of a prefix runs at a time (its status
object is the lock).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .batch import Location, choose_mode, parse_mode, parse_output, parse_prompt, parse_schema
from .batchjobs import require_batch_mode
from .errors import RequestError, StorageUnavailable, TransientFailure
from .layout import batch_files, batch_object, state_location, status_name
from .listing import (
    REQUEST_LIST_S,
    Scope,
    list_step,
    make_plan,
    new_listing,
    start_step,
    write_plan,
)
from .records import JSON_TYPE, dumps_json
from .runtime import Runtime, new_batch_id
from .schemas import SCHEMAS
from .settings import Settings
from .status import new_status, now_iso, update_status
from .store import result_key

log = logging.getLogger(__name__)

_FIELDS = frozenset({"backfill", "dry_run", "max_images", "prompt", "schema", "mode"})
# Image tokens Gemini 3 bills per MEDIA_RESOLUTION ("default" is the model's own: high).
_GEMINI_3_IMAGE_TOKENS = {"low": 280, "medium": 560, "high": 1120, "default": 1120}
# Earlier models bill 258 tokens per 768 px tile of the image.
_TILE_TOKENS, _TILE_SIDE = 258, 768
# How long a Batch API job may take before the API ends it (expired): 24 h of running after
# up to a day in the queue. A batch-mode backfill quiet for longer is no longer waiting.
BATCH_JOB_LIFETIME_S = 48 * 3600.0
# Output tokens assumed per image for the estimate: a caption, or the four fields of alt_text.
_ASSUMED_OUTPUT_TOKENS = {"text": 60, "alt_text": 200}


@dataclass(frozen=True)
class BackfillRequest:
    where: Location  # the bucket and prefix to backfill
    dry_run: bool
    max_images: int | None
    prompt: str | None
    schema: str | None
    mode: str | None = None  # "online" or "batch"; None leaves it to BATCH_MODE_OVER


def is_backfill(data: Any) -> bool:
    return isinstance(data, dict) and "backfill" in data


def parse_backfill(data: dict[str, Any]) -> BackfillRequest:
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise RequestError(
            400,
            "invalid_request",
            f"Unknown field(s) {', '.join(map(repr, unknown))} in a backfill; expected "
            "'backfill', 'dry_run', 'max_images', 'prompt', 'schema' and 'mode'.",
        )
    where = data["backfill"]
    if not isinstance(where, str):
        raise RequestError(400, "invalid_request", "'backfill' must be a gs://bucket/prefix/ URI.")
    location = parse_output(where, what="'backfill'")
    dry_run = data.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise RequestError(400, "invalid_request", "'dry_run' must be true or false.")
    max_images = data.get("max_images")
    if "max_images" in data and not (type(max_images) is int and max_images >= 1):
        raise RequestError(400, "invalid_request", "'max_images' must be a whole number >= 1.")
    prompt = parse_prompt(data["prompt"]) if "prompt" in data else None
    schema = parse_schema(data["schema"]) if "schema" in data else None
    mode = parse_mode(data["mode"]) if "mode" in data else None
    return BackfillRequest(location, dry_run, max_images, prompt, schema, mode)


async def start_backfill(
    runtime: Runtime, data: dict[str, Any], *, stop_at: float
) -> tuple[int, dict[str, Any]]:
    """Answer one backfill request: (HTTP status, body).

    The request lists for a few seconds at most (:data:`REQUEST_LIST_S`) and plans
    the first step from that; the listing goes on step by step in events of its
    own (:mod:`describer.listing`), so the answer comes within seconds whatever
    the prefix holds. ``stop_at`` (``time.monotonic()``) is the invocation's deadline.
    """
    settings = runtime.settings
    request = parse_backfill(data)
    where = request.where
    if where.bucket not in settings.readable_buckets():
        raise RequestError(
            403,
            "forbidden_bucket",
            f"Bucket {where.bucket!r} is not in ALLOWED_BUCKETS (nor RESULTS_BUCKET).",
        )
    results = Location(settings.results_bucket or where.bucket, settings.results_prefix)
    if results.bucket == where.bucket and not results.prefix:
        raise RequestError(
            400,
            "invalid_request",
            "Results would land among the sources with no RESULTS_PREFIX: refused.",
        )
    if request.max_images and request.max_images > settings.max_backfill_images:
        raise RequestError(
            413,
            "batch_too_large",
            f"max_images {request.max_images} is more than MAX_BACKFILL_IMAGES "
            f"({settings.max_backfill_images}) in one backfill: send at most "
            f"{settings.max_backfill_images} and run it again for the rest (a second run "
            "skips what the first described), or backfill narrower prefixes.",
        )
    files = batch_files(settings, results.bucket, None)
    state = state_location(settings, where.bucket)
    prompt, schema = settings.prompt_and_schema(request.prompt, request.schema)
    # Sidecars written with the deployment's own prompt and schema are what uploads get:
    # a caller's backfill with a prompt or schema of its own never replaces one.
    scope = Scope(
        where,
        results,
        key=result_key(settings.model, prompt, schema),
        deployment_key=result_key(settings.model, *settings.prompt_and_schema()),
    )
    limit = request.max_images or settings.max_backfill_images
    now = time.monotonic()
    step = await list_step(
        runtime,
        scope,
        cursor=None,
        until=now + min(REQUEST_LIST_S, (stop_at - now) / 2),
        room=limit,
    )
    found = len(step.todo)
    batch = _batch_name(where.bucket, results)
    mode = choose_mode(settings.batch_mode_over, request.mode, found)
    estimates = {
        "online": estimate(settings, found, prompt, schema),
        "batch": estimate(settings, found, prompt, schema, batch=True),
    }
    body: dict[str, Any] = {
        "backfill": f"gs://{where.bucket}/{where.prefix}",
        "batch": batch,
        "images": found,
        "listed": step.listed,
        "listing_complete": step.done,
        "already_described": step.already_described,
        "kept_sidecars": step.kept_sidecars,
        "names_taken": step.names_taken,
        "shards": math.ceil(found / settings.shard_size),
        "mode": mode,
        "estimate": estimates[mode],
    }
    if step.stopped_at_limit:
        body["stopped_at_limit"] = limit
    if request.dry_run:
        # Both, side by side: what the same images cost asked now, and asked as batch jobs.
        body["estimates"] = estimates
        log.info("backfill dry run", extra={"count": found, "listed": step.listed})
        if not step.done:
            body["partial"] = True
            body["message"] = (
                f"Listed {step.listed} objects in {REQUEST_LIST_S:g} s and the prefix holds "
                "more: the counts and the estimate are for what was listed, a lower bound."
            )
        return 200, {**body, "dry_run": True}
    unknown = not step.done and settings.backfill_confirm_over < settings.max_backfill_images
    if request.max_images is None and (found > settings.backfill_confirm_over or unknown):
        at_least = "at least " if not step.done else ""
        raise RequestError(
            400,
            "max_images_required",
            f"{at_least}{found} images would be described"
            + (
                f", more than BACKFILL_CONFIRM_OVER ({settings.backfill_confirm_over})"
                if found > settings.backfill_confirm_over
                else f" (listing {step.listed} objects took {REQUEST_LIST_S:g} s, and more remain)"
            )
            + f": send max_images (at most {settings.max_backfill_images}) to confirm how many "
            "at most, or dry_run first to see the estimate.",
        )
    if step.stopped_at_limit and request.max_images is None:
        raise RequestError(
            413,
            "batch_too_large",
            f"More than MAX_BACKFILL_IMAGES ({settings.max_backfill_images}) images would be "
            f"described in one backfill: send max_images (at most {settings.max_backfill_images})"
            " and run it again for the rest (a second run skips what the first described), "
            "or backfill narrower prefixes.",
        )
    if step.done and not step.todo:
        return 200, {**body, "message": "Every image under the prefix is already described."}
    if mode == "batch":
        require_batch_mode(settings, settings.shards_bucket or where.bucket)
    if time.monotonic() > stop_at:
        raise TransientFailure(
            body["backfill"],
            "listing took the whole time budget; backfill narrower prefixes, or raise "
            "FUNCTION_TIMEOUT_S",
        )
    status_uri = f"gs://{state.bucket}/{status_name(state, batch)}"
    run = new_batch_id()
    status = new_status(
        batch=batch,
        kind="backfill",
        source=body["backfill"],
        run=run,
        total=0,
        shards=0,
        shard_size=settings.shard_size,
        model=settings.model,
        prompt=prompt,
        schema=schema,
        output=f"gs://{results.bucket}/{results.prefix}",
        files=f"gs://{files.bucket}/{files.prefix}",
        estimate=body["estimate"],
        mode=mode,
        limit=limit,
        result_key=scope.key,
        deployment_key=scope.deployment_key,
        shard_digests=[],
        listing=new_listing(),
    )
    if not await _claim(runtime, state, batch, status):
        raise RequestError(
            409,
            "backfill_in_progress",
            f"A backfill of this bucket is still running; see {status_uri}. Another can "
            "start once it completes (one backfill per bucket at a time, so no image is "
            "described by two at once).",
        )
    shards_bucket = settings.shards_bucket or where.bucket
    try:
        # The first step, as listed here, is applied by its own event like every later one.
        plan = make_plan(step, status, 0, bucket=where.bucket, shards_prefix=settings.shards_prefix)
        await write_plan(runtime, state, status, plan)
        await start_step(runtime, status, shards_bucket=shards_bucket, number=0)
    except StorageUnavailable as exc:
        # No step can run: release the lock at once rather than have every retry
        # refused as "in progress" until the run is taken for abandoned.
        reason = str(exc)
        await update_status(
            runtime.store,
            state.bucket,
            status_name(state, batch),
            lambda s: (
                {**s, "failed": reason, "updated_at": now_iso()} if s.get("run") == run else None
            ),
        )
        await runtime.store.delete_all(state.bucket, batch_object(state, batch, f".listing/{run}/"))
        raise
    log.info(
        "backfill started",
        extra={"count": found, "shards": body["shards"], "uri": status_uri, "done": step.done},
    )
    return 202, {
        **body,
        "run": run,
        "status_uri": status_uri,
        "results_uri": f"gs://{files.bucket}/{batch_object(files, batch, '.jsonl')}",
    }


def estimate(
    settings: Settings, images: int, prompt: str, schema: str | None, *, batch: bool = False
) -> dict[str, Any]:
    """Tokens and cost of describing ``images`` at the current settings (an upper bound),
    at online prices, or at the Batch API's (``batch``)."""
    model = settings.model.removeprefix("models/")
    if model.startswith("gemini-3"):
        image_tokens = _GEMINI_3_IMAGE_TOKENS[settings.media_resolution]
    else:
        image_tokens = _TILE_TOKENS * math.ceil(settings.image_max_side / _TILE_SIDE) ** 2
    instruction = SCHEMAS[schema].instruction if schema else ""
    text_tokens = math.ceil((len(prompt) + len(instruction)) / 4)  # ~4 characters a token
    output_per_image = _ASSUMED_OUTPUT_TOKENS[schema or "text"]
    prompt_tokens = images * (image_tokens + text_tokens)
    output_tokens = images * output_per_image
    prices = settings.batch_prices() if batch else settings.online_prices()
    cost = prices.cost(prompt_tokens, output_tokens)
    return {
        "model": settings.model,
        "media_resolution": settings.media_resolution,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "assumed_output_tokens_per_image": output_per_image,
        "cost_usd": round(cost, 6),
        "price_per_mtok": {"input": prices.input_per_mtok, "output": prices.output_per_mtok},
    }


def _batch_name(bucket: str, results: Location) -> str:
    """One name per backfilled bucket and results location: its status object is the lock.

    Per bucket, not per prefix or prompt: two backfills of overlapping prefixes,
    or with two prompts, would describe the same images twice and overwrite each
    other's sidecars.
    """
    digest = hashlib.sha256(f"{bucket}\n{results.bucket}/{results.prefix}".encode()).hexdigest()
    return f"backfill-{digest[:12]}"


async def _claim(runtime: Runtime, state: Location, batch: str, status: dict[str, Any]) -> bool:
    """Write the new run's status unless another run of the batch is still going."""
    name = status_name(state, batch)
    current, generation = await runtime.store.read_json(state.bucket, name)
    if (
        current is not None
        and not current.get("complete")
        and not current.get("failed")
        and not _abandoned(current, runtime.settings)
    ):
        return False
    return await runtime.store.write(
        state.bucket,
        name,
        dumps_json(status),
        content_type=JSON_TYPE,
        # Only over exactly the status read: two requests at once cannot both start.
        if_generation_match=generation or 0,
    )


def _abandoned(status: dict[str, Any], settings: Settings) -> bool:
    """A run not updated within the retry window will not finish: another may start.

    A batch-mode run waits on its jobs, which may say nothing new for a day: it is
    abandoned only once no job of it could still be running (BATCH_JOB_LIFETIME_S).
    """
    try:
        updated = datetime.fromisoformat(str(status.get("updated_at")))
    except ValueError:
        return True
    age = (datetime.now(UTC) - updated).total_seconds()
    window = settings.event_retry_window_s + settings.function_timeout_s
    if status.get("mode") == "batch":
        window = max(window, BATCH_JOB_LIFETIME_S)
    return age > window
