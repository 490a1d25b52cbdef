"""Where every object the function writes lives, and how a sidecar is told from the rest.

One module names them all, so that no two kinds can land on one name:

- ``RESULTS_PREFIX<object>.json``: an upload's sidecar (the contract), in the results bucket;
- ``BATCHES_PREFIX<batch>.jsonl``, ``.html``, ``.error.json``, ``.shards/<i>.jsonl``: a
  batch's files, in the results bucket, or under ``<output>batches/`` when a request or
  manifest names its own ``output``;
- ``BATCHES_PREFIX<batch>.status.json``, ``.parts/``, ``.listing/`` and ``.jobs/``: a batch's
  state (status object, backfill lock, checkpoints, a backfill's listing plans, batch-mode
  jobs' requests), always where
  :meth:`Settings.state_bucket` says, never where an object's body says;
- ``SHARDS_PREFIX<batch>/<run>/<index>.batch.json``: shard manifests, and
  ``<step>.listing.json``: a backfill's next listing step, in the shards bucket.

BATCHES_PREFIX and SHARDS_PREFIX may not overlap RESULTS_PREFIX (settings refuse it), and
events and backfills skip both, so an upload's name never reaches a batch's objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from .batch import Location
from .settings import Settings
from .store import RESULT_KEY, SOURCE_GENERATION_KEY, result_key

# Metadata naming what kind of object the function wrote.
KIND_KEY = "describer-kind"
SIDECAR_KIND = "sidecar"


def sidecar_name(results: Location, name: str) -> str:
    """Where the record of the object ``name`` goes: beside its path, under the results prefix."""
    return f"{results.prefix}{name}.json"


def batch_files(settings: Settings, bucket: str, output: Location | None) -> Location:
    """Where a batch's JSONL and galleries go: its own ``output``, else BATCHES_PREFIX."""
    if output is not None:
        return Location(output.bucket, f"{output.prefix}batches/")
    return Location(bucket, settings.batches_prefix)


def state_location(settings: Settings, event_bucket: str) -> Location:
    """Where a batch's status object, checkpoints and lock live (see Settings.state_bucket)."""
    return Location(settings.state_bucket(event_bucket), settings.batches_prefix)


def batch_object(files: Location, batch: str, suffix: str) -> str:
    """``<files.prefix><batch><suffix>``: one file of a batch."""
    return f"{files.prefix}{batch}{suffix}"


def status_name(state: Location, batch: str) -> str:
    return batch_object(state, batch, ".status.json")


def gallery_name(jsonl_name: str) -> str:
    """``x.jsonl`` -> ``x.html``: the gallery sits beside its JSONL."""
    return jsonl_name.removesuffix(".jsonl") + ".html"


def shard_object_name(shards_prefix: str, batch: str, run: str, index: int) -> str:
    """``SHARDS_PREFIX<batch>/<run>/<index>.batch.json``: one folder per run of a batch."""
    return f"{shards_prefix}{batch}/{run}/{index:05d}.batch.json"


LISTING_SUFFIX = ".listing.json"


def listing_object_name(shards_prefix: str, batch: str, run: str, step: int) -> str:
    """``SHARDS_PREFIX<batch>/<run>/<step>.listing.json``: the event that runs a listing step."""
    return f"{shards_prefix}{batch}/{run}/{step:05d}{LISTING_SUFFIX}"


def parse_listing_name(shards_prefix: str, name: str) -> tuple[str, str, int] | None:
    """(batch, run, step) of a listing step's object name, or None if it is not one."""
    parts = name.removeprefix(shards_prefix).removesuffix(LISTING_SUFFIX).split("/")
    if len(parts) != 3 or not name.endswith(LISTING_SUFFIX) or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def plan_name(state: Location, batch: str, run: str, step: int) -> str:
    """A listing step as planned: ``BATCHES_PREFIX<batch>.listing/<run>/<step>.json``."""
    return batch_object(state, batch, f".listing/{run}/{step:05d}.json")


def shard_jsonl_name(files: Location, batch: str, index: int) -> str:
    return batch_object(files, batch, f".shards/{index:05d}.jsonl")


def is_sidecar(metadata: Mapping[str, str], record: Any, source_uri: str) -> bool:
    """Whether an object at a sidecar's name is this function's sidecar of ``source_uri``.

    Sidecars say so in their metadata; older ones are recognised by their body,
    the record of that very source. Anything else there (a batch file whose name
    an upload reached, a user's own object) must never be replaced by a sidecar.
    """
    kind = metadata.get(KIND_KEY)
    if kind is not None:
        return kind == SIDECAR_KIND
    if RESULT_KEY in metadata:  # written by every sidecar since backfills came
        return True
    return (
        isinstance(record, dict)
        and record.get("source") == source_uri
        and record.get("status") in ("ok", "error")
    )


def sidecar_is_current(
    metadata: Mapping[str, str], record: Any, *, generation: str, key: str, settings: Settings
) -> bool:
    """Whether a sidecar is the record of ``generation`` made with the result ``key`` (model,
    prompt and schema): the one rule uploads and backfills both go by.

    Sidecars say so in their metadata, so a listing can tell without reading them;
    those written before the metadata existed say it in their record, where an
    answer of GEMINI_FALLBACK_MODEL stands for GEMINI_MODEL, as in the metadata.
    """
    if RESULT_KEY in metadata:
        return metadata[RESULT_KEY] == key and metadata.get(SOURCE_GENERATION_KEY) == generation
    if not isinstance(record, dict) or str(record.get("generation")) != generation:
        return False
    model = record.get("model")
    if model in {settings.model, settings.fallback_model}:
        model = settings.model
    return result_key(str(model), str(record.get("prompt")), record.get("schema")) == key


def jobs_folder(state: Location, batch: str, run: str) -> str:
    """A batch-mode run's job files: ``BATCHES_PREFIX<batch>.jobs/<run>/``, one folder per run,
    so a later run of the same batch (a manifest uploaded again) starts from nothing."""
    return batch_object(state, batch, f".jobs/{run}/")


def job_folder(state: Location, batch: str, run: str, index: int) -> str:
    """A batch-mode shard's job files (its queued requests, one object each, what preparation
    learnt of each, and their concatenations that the Batch API reads)."""
    return f"{jobs_folder(state, batch, run)}{index:05d}/"


def job_registry_prefix(settings: Settings) -> str:
    """Where batch-mode jobs still to land are registered, in Settings.job_bucket."""
    return f"{settings.batches_prefix}.jobs/"


def job_registry_name(settings: Settings, batch: str, run: str, index: int) -> str:
    """One pending job's entry: a collect finds every job to land by listing these."""
    tag = hashlib.sha256(f"{batch}\n{run}".encode()).hexdigest()[:20]
    return f"{job_registry_prefix(settings)}{tag}-{index:05d}.json"


VERTEX_RESULTS_SUFFIX = ".results/"


def vertex_results_prefix(shards_prefix: str, batch: str, run: str, index: int) -> str:
    """Where a Vertex AI batch job writes its answers: beside the shard, under SHARDS_PREFIX
    in a bucket describe_gcs watches, so their arrival is an event."""
    return f"{shards_prefix}{batch}/{run}/{index:05d}{VERTEX_RESULTS_SUFFIX}"


def parse_vertex_results_name(shards_prefix: str, name: str) -> tuple[str, str, int] | None:
    """(batch, run, shard index) of an object a Vertex AI job wrote, or None."""
    head, found, _ = name.removeprefix(shards_prefix).partition(VERTEX_RESULTS_SUFFIX)
    # A manifest's batch is its path, slashes and all: run and shard are the last two parts.
    parts = head.rsplit("/", 2)
    if not found or not name.startswith(shards_prefix) or len(parts) != 3:
        return None
    if not parts[0] or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])
