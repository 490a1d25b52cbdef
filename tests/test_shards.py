"""Sharding and backfill, in-process, with events delivered by the test as Eventarc would."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from google.cloud import storage

from describer import Runtime, handle_storage_event
from describer.backfill import start_backfill
from describer.errors import TransientFailure
from describer.status import new_status, record_shard, update_status
from localdev.gemini_sim import RunningSimulator
from localdev.memory_store import MemoryStore

from .conftest import (
    API_KEY,
    deliver_all,
    event_data,
    make_image,
    post_batch,
    upload,
    upload_pictures,
)

SHARDS = "describer-shards/"


@pytest.fixture
def runtime(make_runtime: Callable[..., Runtime], bucket: storage.Bucket) -> Runtime:
    """Results in the event's own bucket; shards of 5; the bucket allowed for backfills."""
    return make_runtime(results_bucket=None, shard_size=5, allowed_buckets=frozenset({bucket.name}))


def _pictures(bucket: storage.Bucket, n: int, folder: str = "in") -> list[str]:
    return upload_pictures(bucket, n, folder=folder, height=60, colour="blue")


def _deliver_shards(runtime: Runtime, bucket: storage.Bucket) -> list[str]:
    return deliver_all(runtime, bucket, SHARDS)


def _status(bucket: storage.Bucket, batch: str) -> dict[str, Any]:
    blob = bucket.get_blob(f"describer-batches/{batch}.status.json")
    assert blob is not None
    data: dict[str, Any] = json.loads(blob.download_as_bytes())
    return data


def test_a_large_manifest_is_sharded_and_the_last_shard_merges_in_input_order(
    runtime: Runtime,
    bucket: storage.Bucket,
    sim: RunningSimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN a manifest of 12 sources (one missing) with SHARD_SIZE 5
    images = [*_pictures(bucket, 11), f"gs://{bucket.name}/in/missing.png"]
    manifest = upload(bucket, "jobs/big.batch.json", json.dumps({"images": images}).encode(), None)
    # WHEN its event arrives THEN it is split into 3 shards and no model call is made
    caplog.set_level(logging.INFO, logger="describer")
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    # AND the event's last log line names the outcome
    assert [r.outcome for r in caplog.records if r.getMessage() == "event handled"] == ["sharded"]
    assert sim.stats.calls == 0
    shards = sorted(b.name for b in bucket.list_blobs(prefix=SHARDS))
    assert shards == [
        f"{SHARDS}jobs/big/{manifest.generation}/{i:05d}.batch.json" for i in range(3)
    ]
    status = _status(bucket, "jobs/big")
    assert (status["total"], status["shards"], status["pending_shards"]) == (12, 3, [0, 1, 2])
    # AND the same manifest event again creates nothing new
    assert handle_storage_event(runtime, event_data(manifest)) == "already_sharded"
    assert sorted(b.name for b in bucket.list_blobs(prefix=SHARDS)) == shards

    # WHEN the shards' events arrive
    outcomes = _deliver_shards(runtime, bucket)
    # THEN each is described once, the last merges, and the status is complete
    assert outcomes == ["described_shard", "described_shard", "merged"]
    assert sim.stats.calls == 11
    merged = bucket.get_blob("describer-batches/jobs/big.jsonl")
    assert merged is not None
    records = [json.loads(line) for line in merged.download_as_text().splitlines()]
    assert [r["source"] for r in records] == images
    assert records[-1]["error"]["code"] == "not_found"
    status = _status(bucket, "jobs/big")
    assert status["complete"] is True and status["pending_shards"] == []
    assert (status["done"], status["ok"], status["errors"]) == (12, 11, 1)
    assert status["usage"]["prompt_tokens"] == sum(
        r["usage"]["prompt_tokens"] for r in records if r.get("usage")
    )
    assert status["results_uri"] == f"gs://{bucket.name}/describer-batches/jobs/big.jsonl"
    assert status["images_per_s"] is not None
    # AND each shard has its JSONL and gallery; the batch's page links them
    for i in range(3):
        assert bucket.get_blob(f"describer-batches/jobs/big.shards/{i:05d}.jsonl")
        assert bucket.get_blob(f"describer-batches/jobs/big.shards/{i:05d}.html")
    index = bucket.get_blob("describer-batches/jobs/big.html")
    assert index is not None
    page = index.download_as_text()
    assert all(f'href="./big.shards/{i:05d}.html"' in page for i in range(3))
    # AND the shard manifests are gone, so late redeliveries find nothing to do
    assert not list(bucket.list_blobs(prefix=SHARDS))


def test_edited_or_forged_shards_are_refused_and_stale_runs_do_nothing(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    """Only the shards a batch planned are run: their digests are in its status object."""
    images = _pictures(bucket, 7)
    manifest = upload(bucket, "m.batch.json", json.dumps({"images": images}).encode(), None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    first = sorted(bucket.list_blobs(prefix=SHARDS), key=lambda b: b.name)
    # GIVEN a shard edited by someone who may write to the bucket: more sources, and
    # posing as a backfill so that its records would become sidecars
    body = json.loads(first[0].download_as_bytes())
    body["images"] = images
    body["shard"].update(total=7, kind="backfill")
    body["generations"] = ["9" * 19] * 7
    body["sidecar_generations"] = [0] * 7
    forged = upload(bucket, first[0].name, json.dumps(body).encode(), None)
    # WHEN it arrives THEN it is refused: no model call, no sidecar, no new shard
    assert handle_storage_event(runtime, event_data(forged)) == "shard_invalid"
    assert sim.stats.calls == 0
    assert not list(bucket.list_blobs(prefix="descriptions/in/"))
    assert len(list(bucket.list_blobs(prefix=SHARDS))) == len(first)
    # AND a manifest without the shard fields under the shards prefix is refused too
    plain = upload(
        bucket, f"{SHARDS}x/1/00000.batch.json", json.dumps({"images": images}).encode(), None
    )
    assert handle_storage_event(runtime, event_data(plain)) == "shard_invalid"
    # GIVEN the manifest uploaded again: a new run
    again = upload(bucket, "m.batch.json", json.dumps({"images": images[:6]}).encode(), None)
    assert handle_storage_event(runtime, event_data(again)) == "sharded"
    # WHEN a shard of the old run is delivered late THEN it does nothing
    assert handle_storage_event(runtime, event_data(first[1])) == "superseded"
    assert sim.stats.calls == 0


def test_a_manifest_delivered_again_after_its_merge_writes_no_shard(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    manifest = upload(
        bucket, "m.batch.json", json.dumps({"images": _pictures(bucket, 6)}).encode(), None
    )
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    assert _deliver_shards(runtime, bucket)[-1] == "merged"
    assert handle_storage_event(runtime, event_data(manifest)) == "already_done"
    assert not list(bucket.list_blobs(prefix=SHARDS))
    assert sim.stats.calls == 6


@pytest.mark.slow  # a real deadline, twice
def test_a_shard_that_cannot_finish_is_redelivered_then_recorded_as_stalled(
    make_runtime: Callable[..., Runtime], bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    """Inside the retry window a stuck shard asks for redelivery; past it, the batch completes."""
    runtime = make_runtime(
        results_bucket=None, shard_size=5, function_timeout_s=2.5, deadline_margin_s=1.0
    )
    manifest = upload(
        bucket, "m.batch.json", json.dumps({"images": _pictures(bucket, 7)}).encode(), None
    )
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    first, second = sorted(bucket.list_blobs(prefix=SHARDS), key=lambda b: b.name)
    assert handle_storage_event(runtime, event_data(second)) == "described_shard"
    # GIVEN a model that answers nothing at all
    sim.configure(api_key=API_KEY, answer_limit=0)
    # WHEN the first shard runs inside the retry window THEN it asks for redelivery,
    # though it finished nothing (its batch waits for it)
    with pytest.raises(TransientFailure):
        handle_storage_event(runtime, event_data(first))
    assert _status(bucket, "m")["pending_shards"] == [0]
    # WHEN it is delivered past the retry window THEN it is recorded as stalled and the
    # batch completes, its unfinished sources as errors in the merged JSONL
    late = handle_storage_event(runtime, event_data(first), event_time="2020-01-01T00:00:00Z")
    assert late == "merged"
    status = _status(bucket, "m")
    assert status["complete"] and status["stalled_shards"] == [0]
    assert (status["ok"], status["errors"]) == (2, 5)


def test_shards_in_a_bucket_of_their_own_still_read_the_manifests_bucket(
    make_runtime: Callable[..., Runtime],
    gcs: storage.Client,
    bucket: storage.Bucket,
    sim: RunningSimulator,
) -> None:
    shards_bucket = gcs.create_bucket(f"s-{bucket.name}")
    # (the manifest's bucket must be allowed: a shard reads only what the settings allow)
    runtime = make_runtime(
        results_bucket=None,
        shard_size=5,
        allowed_buckets=frozenset({bucket.name}),
        shards_bucket=shards_bucket.name,
    )
    images = _pictures(bucket, 6)
    manifest = upload(bucket, "m.batch.json", json.dumps({"images": images}).encode(), None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    assert not list(bucket.list_blobs(prefix=SHARDS))
    # The shards' events come from their own bucket; the results stay with the manifest's.
    assert _deliver_shards(runtime, shards_bucket)[-1] == "merged"
    # AND with no RESULTS_BUCKET the batch's state lives in the shards bucket, where the
    # shards find it from the settings alone
    assert _status(shards_bucket, "m")["ok"] == 6
    assert bucket.get_blob("describer-batches/m.jsonl") is not None


def test_backfill_dry_run_writes_nothing_and_estimates(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    _pictures(bucket, 8, folder="photos")
    upload(bucket, "photos/readme.txt", b"words", "text/plain")
    reply = post_batch(runtime, {"backfill": f"gs://{bucket.name}/photos/", "dry_run": True})
    assert reply.status == 200
    body = reply.body
    assert (body["images"], body["already_described"], body["shards"]) == (8, 0, 2)
    assert body["dry_run"] is True
    estimate = body["estimate"]
    assert estimate["prompt_tokens"] > 8 * 500  # medium media resolution: 560 a picture
    assert estimate["cost_usd"] > 0
    assert not list(bucket.list_blobs(prefix=SHARDS))
    assert not list(bucket.list_blobs(prefix="descriptions/"))
    assert sim.stats.calls == 0


def test_backfill_describes_each_image_once_and_a_rerun_resumes(
    runtime: Runtime,
    make_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    sim: RunningSimulator,
) -> None:
    # GIVEN 12 images, one of which already has a sidecar for the current settings
    uris = _pictures(bucket, 12, folder="photos")
    first_upload = bucket.get_blob("photos/000.png")
    assert first_upload is not None
    assert handle_storage_event(runtime, event_data(first_upload)) == "described"
    assert sim.stats.calls == 1
    # WHEN a backfill of the prefix is asked for (over the cap: max_images required)
    where = {"backfill": f"gs://{bucket.name}/photos/"}
    capped = make_runtime(
        results_bucket=None,
        shard_size=5,
        allowed_buckets=frozenset({bucket.name}),
        backfill_confirm_over=5,
    )
    refused = post_batch(capped, where)
    assert refused.status == 400 and refused.body["error"]["code"] == "max_images_required"
    reply = post_batch(runtime, {**where, "max_images": 6})
    # THEN 6 of the 11 undescribed images are sharded
    assert reply.status == 202, reply.body
    assert (reply.body["images"], reply.body["already_described"]) == (6, 1)
    batch = reply.body["batch"]
    # AND a second backfill of the bucket while it runs is refused, whatever its prefix
    # or prompt: two at once would describe the same images twice
    for other in (where, {"backfill": f"gs://{bucket.name}/", "prompt": "Another prompt."}):
        busy = post_batch(runtime, other)
        assert busy.status == 409 and busy.body["error"]["code"] == "backfill_in_progress"
    # WHEN its shards are delivered THEN 6 sidecars are written and the batch merged
    assert _deliver_shards(runtime, bucket)[-1] == "merged"
    assert sim.stats.calls == 7
    sidecars = sorted(b.name for b in bucket.list_blobs(prefix="descriptions/photos/"))
    assert len(sidecars) == 7
    status = _status(bucket, batch)
    assert status["complete"] and status["done"] == 6 and status["kind"] == "backfill"
    # WHEN the backfill is run again THEN only the remaining 5 are described
    again = post_batch(runtime, where)
    assert again.status == 202 and again.body["images"] == 5
    assert _deliver_shards(runtime, bucket)[-1] == "merged"
    assert sim.stats.calls == 12
    # AND a third run finds nothing to do
    done = post_batch(runtime, where)
    assert done.status == 200 and done.body["images"] == 0
    # AND each image was described exactly once, its sidecar naming its generation
    answered = sorted(info["width"] for info in sim.stats.images)
    assert answered == list(range(100, 112))
    for uri in uris:
        name = uri.split("/", 3)[3]
        blob = bucket.get_blob(name)
        sidecar = bucket.get_blob(f"descriptions/{name}.json")
        assert blob is not None and sidecar is not None
        assert json.loads(sidecar.download_as_bytes())["generation"] == str(blob.generation)
    # AND an upload event for a backfilled image makes no second call
    late = bucket.get_blob("photos/011.png")
    assert late is not None
    assert handle_storage_event(runtime, event_data(late)) == "already_done"
    assert sim.stats.calls == 12


def test_backfill_requests_are_checked(runtime: Runtime, bucket: storage.Bucket) -> None:
    cases = [
        ({"backfill": "s3://x/"}, 400, "invalid_request"),
        ({"backfill": f"gs://{bucket.name}/", "max_images": 0}, 400, "invalid_request"),
        ({"backfill": f"gs://{bucket.name}/", "dry_run": "yes"}, 400, "invalid_request"),
        ({"backfill": f"gs://{bucket.name}/", "output": "gs://x/"}, 400, "invalid_request"),
        ({"backfill": "gs://not-allowed-bucket/"}, 403, "forbidden_bucket"),
    ]
    for body, status, code in cases:
        reply = post_batch(runtime, body)
        assert (reply.status, reply.body["error"]["code"]) == (status, code), body


def test_a_backfill_whose_results_would_land_among_its_sources_is_refused(
    make_runtime: Callable[..., Runtime], bucket: storage.Bucket
) -> None:
    # GIVEN RESULTS_BUCKET set to the backfilled bucket, with no RESULTS_PREFIX
    runtime = make_runtime(
        results_bucket=bucket.name, results_prefix="", allowed_buckets=frozenset({bucket.name})
    )
    _pictures(bucket, 2)
    # WHEN a backfill of it is asked for THEN it is refused: its sidecars would be sources
    reply = post_batch(runtime, {"backfill": f"gs://{bucket.name}/"})
    assert (reply.status, reply.body["error"]["code"]) == (400, "invalid_request")
    assert "among the sources" in reply.body["error"]["message"]
    assert not list(bucket.list_blobs(prefix=SHARDS))


def test_an_object_under_the_shards_prefix_that_is_no_shard_is_ignored(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN an image written under the shards prefix, where only shards belong
    blob = upload(bucket, f"{SHARDS}stray.png", make_image(40, 30, "red", "PNG"), "image/png")
    # WHEN its event arrives THEN it is neither described nor run as a shard
    assert handle_storage_event(runtime, event_data(blob)) == "ignored_not_shard"
    assert sim.stats.calls == 0


def test_status_updates_from_many_shards_at_once_lose_nothing() -> None:
    """Twenty shards record themselves at the same moment: every one is counted once."""
    store = MemoryStore()
    status = new_status(
        batch="b",
        kind="manifest",
        source="gs://in/b.batch.json",
        run="1",
        total=200,
        shards=20,
        model="m",
        prompt="p",
        schema=None,
    )
    store.put("out", "batches/b.status.json", json.dumps(status).encode())

    async def interleave(_bucket: str, _name: str) -> None:
        await asyncio.sleep(0)  # every writer reads, then all of them try to write

    store.before_write = interleave
    tally = {"ok": 9, "error": 1, "prompt_tokens": 100, "output_tokens": 5}

    async def finish_all() -> None:
        async with asyncio.TaskGroup() as group:
            for index in range(20):
                group.create_task(
                    update_status(
                        store,
                        "out",
                        "batches/b.status.json",
                        lambda s, i=index: record_shard(s, i, tally),
                    )
                )

    asyncio.run(finish_all())
    final, _ = asyncio.run(store.read_json("out", "batches/b.status.json"))
    assert final is not None
    assert final["pending_shards"] == []
    assert sorted(map(int, final["finished_shards"])) == list(range(20))
    assert (final["done"], final["ok"], final["errors"]) == (200, 180, 20)
    assert final["usage"] == {"prompt_tokens": 2000, "output_tokens": 100}
    # AND the writers really raced: some writes were refused by the precondition and retried
    assert store.rejected


def test_a_backfill_whose_shards_cannot_be_written_releases_its_lock(
    make_runtime: Callable[..., Runtime], bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    _pictures(bucket, 3, folder="photos")
    where = {"backfill": f"gs://{bucket.name}/photos/"}
    # GIVEN shards that would go to a bucket that does not exist (the lock, in RESULTS_BUCKET,
    # can be written)
    broken = make_runtime(
        results_bucket=bucket.name,
        allowed_buckets=frozenset({bucket.name}),
        shards_bucket="no-such-bucket-for-shards",
    )
    reply = post_batch(broken, where)
    # THEN the request fails as unwritable, and says why
    assert reply.status == 400 and reply.body["error"]["code"] == "storage_refused"
    status = _status(bucket, _backfill_batch(bucket))
    assert "no-such-bucket-for-shards" in status["failed"]
    # AND once fixed, the same backfill starts at once (no 409 for a run that never ran)
    fixed = make_runtime(results_bucket=None, allowed_buckets=frozenset({bucket.name}))
    again = post_batch(fixed, where)
    assert again.status == 202, again.body
    assert sim.stats.calls == 0


def _backfill_batch(bucket: storage.Bucket) -> str:
    """The one backfill batch whose status object is in the bucket."""
    (blob,) = (
        b
        for b in bucket.list_blobs(prefix="describer-batches/backfill-")
        if b.name.endswith(".status.json")
    )
    return str(blob.name).removeprefix("describer-batches/").removesuffix(".status.json")


def test_a_backfill_above_max_backfill_images_or_out_of_time_claims_nothing(
    make_runtime: Callable[..., Runtime], bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    _pictures(bucket, 4, folder="photos")
    where = {"backfill": f"gs://{bucket.name}/photos/"}
    capped = make_runtime(
        results_bucket=None, allowed_buckets=frozenset({bucket.name}), max_backfill_images=3
    )
    # GIVEN more images than one run may take THEN 413, and max_images within the cap works
    reply = post_batch(capped, where)
    assert reply.status == 413 and reply.body["error"]["code"] == "batch_too_large"
    assert not list(bucket.list_blobs(prefix="describer-batches/"))
    # GIVEN a listing that used up the invocation's time THEN nothing is claimed
    runtime = make_runtime(results_bucket=None, allowed_buckets=frozenset({bucket.name}))
    with pytest.raises(TransientFailure, match="time budget"):
        asyncio.run(start_backfill(runtime, where, stop_at=time.monotonic() - 1))
    assert not list(bucket.list_blobs(prefix="describer-batches/"))
    assert not list(bucket.list_blobs(prefix=SHARDS))
    assert post_batch(capped, {**where, "max_images": 3}).status == 202
    assert sim.stats.calls == 0


def test_a_batch_of_more_shards_than_one_compose_takes_merges_in_order(
    make_runtime: Callable[..., Runtime], bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    """The merged JSONL is composed by storage from the shards' JSONL, 32 at a time, so its
    size costs the merging process nothing: 35 shards come out as one file, in input order."""
    runtime = make_runtime(
        results_bucket=None, shard_size=2, allowed_buckets=frozenset(), gallery=False
    )
    images = upload_pictures(bucket, 70, folder="many", height=20, colour="red")
    manifest = upload(bucket, "many.batch.json", json.dumps({"images": images}).encode(), None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    assert _deliver_shards(runtime, bucket)[-1] == "merged"
    merged = bucket.get_blob("describer-batches/many.jsonl")
    assert merged is not None
    assert (merged.metadata or {}).get("describer-complete") == "true"
    lines = [json.loads(line) for line in merged.download_as_text().splitlines()]
    assert [r["source"] for r in lines] == images
    assert _status(bucket, "many")["done"] == 70
