"""How an event ended: one stable value per way, logged and answered by describe_gcs.

Handlers return an :class:`Outcome`, never a free string, so every way an event
can end is listed here once, and a test or a log query can name it exactly.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    # Uploads.
    DESCRIBED = "described"
    ALREADY_DONE = "already_done"  # the sidecar (or JSONL) for this generation is there
    SUPERSEDED = "superseded"  # a newer generation or run owns the results; nothing to do
    NAME_TAKEN = "name_taken"  # an object that is not its sidecar holds the sidecar's name
    # Loop guards and objects that are not the function's to describe.
    INVALID_EVENT = "invalid_event"
    REFUSED_LOOP = "refused_loop"
    IGNORED_RESULTS = "ignored_results"
    IGNORED_BATCH_FILE = "ignored_batch_file"
    IGNORED_OWN_OUTPUT = "ignored_own_output"
    IGNORED_NOT_IMAGE = "ignored_not_image"
    IGNORED_NOT_SHARD = "ignored_not_shard"
    RESULTS_UNWRITABLE = "results_unwritable"
    # Manifests.
    DESCRIBED_MANIFEST = "described_manifest"
    MANIFEST_STALLED = "manifest_stalled"  # past the retry window with sources unfinished
    MANIFEST_INVALID = "manifest_invalid"
    SHARDED = "sharded"
    ALREADY_SHARDED = "already_sharded"
    # Shards of a manifest or backfill.
    DESCRIBED_SHARD = "described_shard"
    SHARD_INVALID = "shard_invalid"  # not a body the batch planned: refused
    SHARD_SUPERSEDED = "shard_superseded"
    MERGED = "merged"  # this event recorded the last pending shard (or listing step) and merged
    # Batch mode (a Batch API job per shard).
    BATCH_SUBMITTED = "batch_submitted"  # this event created (or adopted) the shard's job
    ALREADY_SUBMITTED = "already_submitted"
    BATCH_PENDING = "batch_pending"  # the job has not finished yet
    BATCH_ENDED = "batch_ended"  # failed, expired or cancelled: its sources wait for a rerun
    BATCH_BUSY = "batch_busy"  # another invocation is landing it
    LANDED = "landed"  # the job's answers are the shard's JSONL now
    # A backfill's listing steps.
    LISTED = "listed"
    ALREADY_LISTED = "already_listed"
    LISTING_INVALID = "listing_invalid"  # a step ahead of its batch: refused


class JobState(StrEnum):
    """How one run of a manifest or shard job ended (before it becomes an Outcome)."""

    DESCRIBED = "described"
    ALREADY_DONE = "already_done"
    SUPERSEDED = "superseded"
    STALLED = "stalled"
    OPEN = "open"  # a JSONL of this generation that still lacks sources: carry on
