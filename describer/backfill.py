"""Backfill: describe the images already in a bucket, as if each had just been uploaded.

``{"backfill": "gs://bucket/prefix/"}`` over HTTP lists the prefix (every page),
leaves out what is not an image or already has a sidecar for the current model,
prompt and schema, and shards the rest (:mod:`describer.shards`). Each record
becomes the sidecar an upload would have got, so a second backfill of the same
prefix finds them and resumes where the first stopped, and never repeats.

Runaway loops, the reason comparable tools dropped their backfill feature, are
kept out by construction: nothing under RESULTS_PREFIX or SHARDS_PREFIX, no
manifest and no object this function wrote is ever listed as a source; shards
never create shards; and one backfill of a prefix runs at a time (its status
object is the lock).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from .batch import BatchRequest, Location, parse_output, parse_prompt, parse_schema
from .errors import RequestError, StorageUnavailable, TransientFailure
from .images import IMAGE_SUFFIXES, UNTYPED_CONTENT_TYPES, media_type
from .jobs import MANIFEST_SUFFIX
from .layout import (
    KIND_KEY,
    batch_files,
    batch_object,
    is_sidecar,
    sidecar_name,
    state_location,
    status_name,
)
from .records import JSON_TYPE, dumps_json
from .runtime import Runtime, new_batch_id
from .schemas import SCHEMAS
from .settings import Settings
from .shards import plan_shards, write_shards
from .status import new_status, now_iso, update_status
from .store import (
    READ_CONCURRENCY,
    RESULT_KEY,
    SOURCE_GENERATION_KEY,
    ObjectInfo,
    bounded_map,
    is_own_output,
    result_key,
)

log = logging.getLogger(__name__)

_FIELDS = frozenset({"backfill", "dry_run", "max_images", "prompt", "schema"})
# Image tokens Gemini 3 bills per MEDIA_RESOLUTION ("default" is the model's own: high).
_GEMINI_3_IMAGE_TOKENS = {"low": 280, "medium": 560, "high": 1120, "default": 1120}
# Earlier models bill 258 tokens per 768 px tile of the image.
_TILE_TOKENS, _TILE_SIDE = 258, 768
# Output tokens assumed per image for the estimate: a caption, or the four fields of alt_text.
_ASSUMED_OUTPUT_TOKENS = {"text": 60, "alt_text": 200}


@dataclass(frozen=True)
class BackfillRequest:
    where: Location  # the bucket and prefix to backfill
    dry_run: bool
    max_images: int | None
    prompt: str | None
    schema: str | None


def is_backfill(data: Any) -> bool:
    return isinstance(data, dict) and "backfill" in data


def parse_backfill(data: dict[str, Any]) -> BackfillRequest:
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise RequestError(
            400,
            "invalid_request",
            f"Unknown field(s) {', '.join(map(repr, unknown))} in a backfill; expected "
            "'backfill', 'dry_run', 'max_images', 'prompt' and 'schema'.",
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
    return BackfillRequest(location, dry_run, max_images, prompt, schema)


async def start_backfill(
    runtime: Runtime, data: dict[str, Any], *, stop_at: float
) -> tuple[int, dict[str, Any]]:
    """Answer one backfill request: (HTTP status, body).

    ``stop_at`` (``time.monotonic()``) is the invocation's deadline: a listing
    that used it up leaves no time to write the shards, so nothing is claimed.
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
    files = batch_files(settings, results.bucket, None)
    state = state_location(settings, where.bucket)
    prompt, schema = settings.prompt_and_schema(request.prompt, request.schema)
    key = result_key(settings.model, prompt, schema)
    # Sidecars written with the deployment's own prompt and schema are what uploads get:
    # a caller's backfill with a prompt or schema of its own never replaces one.
    deployment_key = result_key(settings.model, *settings.prompt_and_schema())
    sources, sidecars = await asyncio.gather(
        runtime.store.list(where.bucket, where.prefix),
        runtime.store.list(results.bucket, f"{results.prefix}{where.prefix}"),
    )
    images = [o for o in sources if _is_source(o, where.bucket, results, settings)]
    described = await _sidecars_of(runtime, results, where.bucket, images, sidecars)
    todo: list[tuple[ObjectInfo, int]] = []
    taken = kept = 0
    for image in images:
        name = sidecar_name(results, image.name)
        if name in described and described[name] is None:
            taken += 1  # something that is not its sidecar has the name: never replaced
            continue
        sidecar = described.get(name)
        if sidecar is not None and _describes(sidecar, image, key):
            continue
        if sidecar is not None and key != deployment_key:
            kept += 1  # a prompt or schema of the caller's own never replaces a sidecar
            continue
        todo.append((image, sidecar.generation if sidecar else 0))
    already = len(images) - len(todo) - taken - kept
    capped = todo[: request.max_images] if request.max_images else todo
    batch = _batch_name(where.bucket, results)
    body: dict[str, Any] = {
        "backfill": f"gs://{where.bucket}/{where.prefix}",
        "batch": batch,
        "images": len(capped),
        "listed": len(sources),
        "already_described": already,
        "kept_sidecars": kept,
        "names_taken": taken,
        "shards": math.ceil(len(capped) / settings.shard_size),
        "estimate": estimate(settings, len(capped), prompt, schema),
    }
    if request.dry_run:
        log.info("backfill dry run", extra={"count": len(capped), "listed": len(sources)})
        return 200, {**body, "dry_run": True}
    if len(todo) > settings.backfill_confirm_over and request.max_images is None:
        raise RequestError(
            400,
            "max_images_required",
            f"{len(todo)} images would be described, more than BACKFILL_CONFIRM_OVER "
            f"({settings.backfill_confirm_over}): send max_images (e.g. {len(todo)}) to "
            "confirm, or dry_run first to see the estimate.",
        )
    if not capped:
        return 200, {**body, "message": "Every image under the prefix is already described."}
    if len(capped) > settings.max_manifest_images:
        raise RequestError(
            413,
            "batch_too_large",
            f"{len(capped)} images is more than MAX_MANIFEST_IMAGES "
            f"({settings.max_manifest_images}) in one backfill: send max_images "
            f"(at most {settings.max_manifest_images}) and run it again for the rest, or "
            "backfill narrower prefixes.",
        )
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
        total=len(capped),
        shards=body["shards"],
        shard_size=settings.shard_size,
        model=settings.model,
        prompt=prompt,
        schema=schema,
        output=f"gs://{results.bucket}/{results.prefix}",
        files=f"gs://{files.bucket}/{files.prefix}",
        estimate=body["estimate"],
    )
    shard_request = BatchRequest(
        images=[f"gs://{where.bucket}/{image.name}" for image, _ in capped],
        prompt=prompt,
        output=results,
        schema=schema,
        generations=[str(image.generation) for image, _ in capped],
        sidecar_generations=[sidecar for _, sidecar in capped],
    )
    planned = plan_shards(shard_request, status, settings.shards_prefix)
    if not await _claim(runtime, state, batch, status):
        raise RequestError(
            409,
            "backfill_in_progress",
            f"A backfill of this bucket is still running; see {status_uri}. Another can "
            "start once it completes (one backfill per bucket at a time, so no image is "
            "described by two at once).",
        )
    try:
        await write_shards(runtime, planned, shards_bucket=settings.shards_bucket or where.bucket)
    except StorageUnavailable as exc:
        # No shard can run: release the lock at once rather than have every retry
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
        raise
    log.info(
        "backfill started",
        extra={"count": len(capped), "shards": body["shards"], "uri": status_uri},
    )
    return 202, {
        **body,
        "run": run,
        "status_uri": status_uri,
        "results_uri": f"gs://{files.bucket}/{batch_object(files, batch, '.jsonl')}",
    }


def estimate(settings: Settings, images: int, prompt: str, schema: str | None) -> dict[str, Any]:
    """Tokens and cost of describing ``images`` at the current settings (an upper bound)."""
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
    cost = (
        prompt_tokens * settings.price_input_per_mtok
        + output_tokens * settings.price_output_per_mtok
    ) / 1_000_000
    return {
        "model": settings.model,
        "media_resolution": settings.media_resolution,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "assumed_output_tokens_per_image": output_per_image,
        "cost_usd": round(cost, 4),
        "price_per_mtok": {
            "input": settings.price_input_per_mtok,
            "output": settings.price_output_per_mtok,
        },
    }


def _is_source(image: ObjectInfo, bucket: str, results: Location, settings: Settings) -> bool:
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


def _describes(sidecar: ObjectInfo, image: ObjectInfo, key: str) -> bool:
    """Whether the sidecar is the current model's and prompt's record of this generation."""
    metadata = sidecar.metadata
    return metadata.get(RESULT_KEY) == key and metadata.get(SOURCE_GENERATION_KEY) == str(
        image.generation
    )


def _batch_name(bucket: str, results: Location) -> str:
    """One name per backfilled bucket and results location: its status object is the lock.

    Per bucket, not per prefix or prompt: two backfills of overlapping prefixes,
    or with two prompts, would describe the same images twice and overwrite each
    other's sidecars.
    """
    digest = hashlib.sha256(f"{bucket}\n{results.bucket}/{results.prefix}".encode()).hexdigest()
    return f"backfill-{digest[:12]}"


async def _sidecars_of(
    runtime: Runtime,
    results: Location,
    bucket: str,
    images: list[ObjectInfo],
    listed: list[ObjectInfo],
) -> dict[str, ObjectInfo | None]:
    """The objects at the images' sidecar names: each listed object, or None where one is
    there that is not the image's sidecar (and so must never be replaced)."""
    wanted = {sidecar_name(results, i.name): f"gs://{bucket}/{i.name}" for i in images}
    found: dict[str, ObjectInfo | None] = {}
    unmarked: list[ObjectInfo] = []
    for info in listed:
        if info.name not in wanted:
            continue
        if is_sidecar(info.metadata, None, ""):
            found[info.name] = info  # marked as one
        elif KIND_KEY not in info.metadata and is_own_output(info.metadata):
            unmarked.append(info)  # a sidecar from before the markers, or not: read it
        else:
            found[info.name] = None

    async def judge(info: ObjectInfo) -> None:
        record, _ = await runtime.store.read_json(results.bucket, info.name)
        found[info.name] = info if is_sidecar(info.metadata, record, wanted[info.name]) else None

    await bounded_map(judge, unmarked, limit=READ_CONCURRENCY)
    return found


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
    """A run not updated within the retry window will not finish: another may start."""
    try:
        updated = datetime.fromisoformat(str(status.get("updated_at")))
    except ValueError:
        return True
    age = (datetime.now(UTC) - updated).total_seconds()
    return age > settings.event_retry_window_s + settings.function_timeout_s
