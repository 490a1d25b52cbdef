"""A backfill of 5000 images across several function processes, events relayed as Eventarc would.

Real components only: gcp-storage-emulator behind the project's relay (which
enforces generation preconditions and turns every object written into a
trigger bucket into a finalize CloudEvent delivered to one of the
describe_gcs processes, redelivering on failure), functions-framework
processes for describe_http and describe_gcs, and the Gemini simulator. One
process is killed with SIGKILL in the middle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from google.cloud import storage

from localdev import procs
from localdev.gemini_sim import RunningSimulator
from localdev.relay import RunningRelay

from .conftest import API_KEY, Functions, fleet_relay, function_env, make_image, wait_for

IMAGES = 5000
SHARD_SIZE = 500
GCS_PROCESSES = 3
SHARDS = "describer-shards/"


def _image(i: int) -> bytes:
    """Image i: a small PNG whose size alone tells it apart from the 4999 others."""
    return make_image(20 + i % 100, 20 + i // 100, "green", "PNG")


# Its own waits add up to more than the suite's 300 s per test.
@pytest.mark.timeout(900)
@pytest.mark.slow
def test_a_backfill_of_5000_images_across_processes_survives_a_killed_process(
    gcs: storage.Client,
    fleet_buckets: tuple[storage.Bucket, storage.Bucket],
    relay: RunningRelay,
    sim: RunningSimulator,
    tmp_path: Path,
) -> None:
    photos, results = fleet_buckets
    # GIVEN 5000 distinct images already in a bucket (uploaded before any trigger existed)
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: photos.blob(f"cam/{i:05d}.png").upload_from_string(
                    _image(i), content_type="image/png"
                ),
                range(IMAGES),
            )
        )
    # AND three describe_gcs processes and one describe_http, all talking to storage
    # through the relay, which delivers the photos bucket's events to the gcs processes
    env = function_env(
        relay.url,
        sim.url,
        RESULTS_BUCKET=results.name,
        ALLOWED_BUCKETS=photos.name,
        SHARD_SIZE=str(SHARD_SIZE),
        MODEL_CONCURRENCY="8",
        FUNCTION_TIMEOUT_S="300",
        GALLERY="false",
    )
    functions = Functions(env, tmp_path)
    started = functions.started
    try:
        http = functions.start("describe_http")
        workers = [functions.start("describe_gcs", cloudevent=True) for _ in range(GCS_PROCESSES)]
        relay.set_targets(workers)
        sim.configure(api_key=API_KEY, latency_ms=20)

        # WHEN a backfill of the prefix is asked for
        reply = requests.post(
            http,
            json={"backfill": f"gs://{photos.name}/cam/", "max_images": IMAGES},
            timeout=120,
        )
        assert reply.status_code == 202, reply.text
        body = reply.json()
        assert (body["images"], body["shards"]) == (IMAGES, IMAGES // SHARD_SIZE)
        status_name = f"describer-batches/{body['batch']}.status.json"

        def kept() -> int:
            """Answers kept so as not to be asked for again: checkpoints, and finished shards."""
            prefix = f"describer-batches/{body['batch']}.shards/"
            checkpoints = sum(
                ".parts/" in b.name for b in gcs.list_blobs(results.name, prefix=prefix)
            )
            blob = results.get_blob(status_name)
            finished = json.loads(blob.download_as_bytes())["finished_shards"] if blob else {}
            return checkpoints + sum(int(s["ok"]) for s in finished.values())

        # AND, a third of the way through, the model holds every further call, and once
        # every answer so far is kept (its sidecar, then its checkpoint, written) one
        # describe_gcs process is killed with SIGKILL
        wait_for(lambda: sim.stats.ok >= IMAGES // 3, "a third of the answers", 240, poll_s=0.1)
        sim.hold()
        # Calls let through just before the hold are still answered: wait until every
        # call in flight is a held one, so no answer is on its way to the victim.
        wait_for(
            lambda: sim.stats.in_flight == sim.stats.held and kept() == sim.stats.ok,
            "every call in flight held and every answer so far kept",
            60,
            poll_s=0.1,
        )
        answered_before = sim.stats.ok
        victim = started[1]
        procs.kill_hard(victim)
        relay.set_targets(workers[1:])
        # WHEN the model answers again and the relay redelivers what the victim had
        sim.release()

        def complete() -> bool:
            blob = results.get_blob(status_name)
            return blob is not None and json.loads(blob.download_as_bytes())["complete"]

        wait_for(complete, "the backfill's status to say complete", 420, poll_s=0.1)
        stats = relay.wait_idle(60)
    finally:
        functions.stop_all()

    # THEN each image was described exactly once: no answer twice for the same bytes
    answered = sim.stats.answered_digests()
    assert len(answered) == IMAGES
    assert set(answered.values()) == {1}
    assert answered_before < IMAGES
    # AND the victim had calls in flight that were never answered, and its events were
    # redelivered to the live processes
    assert sim.stats.abandoned >= 1
    assert stats.redelivered >= 1 and stats.dead_lettered == 0
    # AND the status object is right
    status = _exact_status(results, status_name, IMAGES)
    assert status["shards"] == IMAGES // SHARD_SIZE
    assert status["images_per_s"] > 0
    # AND the merged JSONL has every image once, in listing order, with the status's tokens
    merged = results.get_blob(f"describer-batches/{body['batch']}.jsonl")
    assert merged is not None
    records = [json.loads(line) for line in merged.download_as_text().splitlines()]
    assert [r["source"] for r in records] == [
        f"gs://{photos.name}/cam/{i:05d}.png" for i in range(IMAGES)
    ]
    assert sum(r["usage"]["prompt_tokens"] for r in records) == status["usage"]["prompt_tokens"]
    # AND every image has its sidecar
    assert sum(1 for _ in gcs.list_blobs(results.name, prefix="descriptions/cam/")) == IMAGES
    # AND no shard created a shard: exactly the backfill's shards and its listing steps were
    # ever written under the shards prefix, each once, and none is left
    shard_objects = sorted(n for n in stats.objects if n.startswith(SHARDS))
    run_folder = f"{SHARDS}{body['batch']}/{body['run']}/"
    steps = status["listing"]["step"]
    assert shard_objects == sorted(
        [f"{run_folder}{i:05d}.batch.json" for i in range(IMAGES // SHARD_SIZE)]
        + [f"{run_folder}{i:05d}.listing.json" for i in range(steps)]
    )
    assert all(len(stats.objects[n]) == 1 for n in shard_objects)
    assert not list(gcs.list_blobs(photos.name, prefix=SHARDS))


KILL_IMAGES = 300
KILL_SHARD_SIZE = 50
KILL_MODEL_CONCURRENCY = 8
# Shard events in flight across the fleet: two, so that a victim has two events at once.
# A process's calls in flight plus answers not yet kept are at most MODEL_CONCURRENCY
# whatever the events it runs (Runtime.answer_room), so a kill costs at most that many
# calls per process killed.
KILL_EVENTS_AT_ONCE = 2


@pytest.fixture
def kill_relay(
    emulator_url: str, fleet_buckets: tuple[storage.Bucket, storage.Bucket]
) -> Iterator[RunningRelay]:
    running = fleet_relay(
        emulator_url, fleet_buckets[0], max_deliveries_at_once=KILL_EVENTS_AT_ONCE
    )
    yield running
    running.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("moment", ["listing", "early", "middle", "late", "merge"])
def test_a_process_killed_at_any_moment_costs_at_most_its_model_concurrency(
    moment: str,
    gcs: storage.Client,
    fleet_buckets: tuple[storage.Bucket, storage.Bucket],
    kill_relay: RunningRelay,
    sim: RunningSimulator,
    tmp_path: Path,
) -> None:
    """A describe_gcs process killed with SIGKILL without waiting for anything (while the
    backfill is still being listed, early, in the middle, late, or while its batch is merged)
    costs at most MODEL_CONCURRENCY extra model calls, though it runs two events at once (both
    processes are killed for the listing and the merge: twice that), and the batch still ends
    with every image, its status and JSONL exact."""
    photos, results = fleet_buckets
    for i in range(KILL_IMAGES):
        photos.blob(f"cam/{i:04d}.png").upload_from_string(
            make_image(20 + i % 100, 20 + i // 100, "green", "PNG"), content_type="image/png"
        )
    env = function_env(
        kill_relay.url,
        sim.url,
        RESULTS_BUCKET=results.name,
        ALLOWED_BUCKETS=photos.name,
        SHARD_SIZE=str(KILL_SHARD_SIZE),
        MODEL_CONCURRENCY=str(KILL_MODEL_CONCURRENCY),
        FUNCTION_TIMEOUT_S="300",
        LIST_PAGE_SIZE="10",
        GALLERY="false",
    )
    functions = Functions(env, tmp_path)
    try:
        http = functions.start("describe_http")
        workers = [functions.start("describe_gcs", cloudevent=True) for _ in range(2)]
        kill_relay.set_targets(workers)
        sim.configure(api_key=API_KEY, latency_ms=30)
        if moment == "merge":
            kill_relay.set_faults(hold_composes=True)
        if moment == "listing":
            # Pages so slow that the request lists a quarter of the prefix, and a step the rest.
            kill_relay.set_faults(list_page_delay_s=0.3)
        where: dict[str, Any] = {"backfill": f"gs://{photos.name}/cam/", "max_images": KILL_IMAGES}
        reply = requests.post(http, json=where, timeout=120)
        assert reply.status_code == 202, reply.text
        body = reply.json()
        status_name = f"describer-batches/{body['batch']}.status.json"

        def status() -> dict[str, Any]:
            blob = results.get_blob(status_name)
            return json.loads(blob.download_as_bytes()) if blob else {}

        # WHEN a process is killed at the moment chosen, without waiting for its writers
        share = {"early": 0.1, "middle": 0.5, "late": 0.9}.get(moment)
        if share is not None:
            wait_for(lambda: sim.stats.ok >= KILL_IMAGES * share, f"{moment} answers", 240)
        elif moment == "listing":
            # Held at its next page, a listing step is certainly in the middle of its work.
            assert not body["listing_complete"]
            kill_relay.set_faults(list_page_delay_s=0.3, hold_next_pages=True)
            wait_for(lambda: kill_relay.stats().pages_held >= 1, "a listing step's next page")
        else:
            wait_for(lambda: kill_relay.stats().composes_held >= 1, "the merge to start", 240)
        # Both workers for the merge and the listing: whichever holds the event dies with it.
        both = moment in ("merge", "listing")
        victims = functions.started[1:] if both else functions.started[1:2]
        for victim in victims:
            procs.kill_hard(victim)
        # AND a fresh process takes the victims' place, as Cloud Run would start one
        survivors = [
            w for w, p in zip(workers, functions.started[1:], strict=True) if p not in victims
        ]
        kill_relay.set_targets([*survivors, functions.start("describe_gcs", cloudevent=True)])
        kill_relay.set_faults()

        wait_for(lambda: status()["complete"], "the status to say complete", 420, poll_s=0.1)
        kill_relay.wait_idle(60)
    finally:
        functions.stop_all()
    if moment == "listing":
        # THEN the listing step the kill interrupted was delivered again, and finished
        steps = [
            r
            for n, rs in kill_relay.stats().objects.items()
            if n.endswith(".listing.json")
            for r in rs
        ]
        assert any(d.status is None for r in steps for d in r.deliveries), steps
    # THEN every image was answered, and each process killed cost at most MODEL_CONCURRENCY
    # calls, though it was running two events
    assert len(sim.stats.answered_digests()) == KILL_IMAGES
    assert sim.stats.calls - KILL_IMAGES <= len(victims) * KILL_MODEL_CONCURRENCY, sim.stats.calls
    # AND the status and the merged JSONL are exact
    _exact_status(results, status_name, KILL_IMAGES)
    merged = results.get_blob(f"describer-batches/{body['batch']}.jsonl")
    assert merged is not None
    records = [json.loads(line) for line in merged.download_as_text().splitlines()]
    assert [r["source"] for r in records] == [
        f"gs://{photos.name}/cam/{i:04d}.png" for i in range(KILL_IMAGES)
    ]
    assert sum(1 for _ in gcs.list_blobs(results.name, prefix="descriptions/cam/")) == KILL_IMAGES


def _exact_status(results: storage.Bucket, name: str, images: int) -> dict[str, Any]:
    """The batch's status object, checked to say every image done and ok, nothing pending."""
    blob = results.get_blob(name)
    assert blob is not None
    status: dict[str, Any] = json.loads(blob.download_as_bytes())
    counts = (status["total"], status["done"], status["ok"], status["errors"])
    assert counts == (images, images, images, 0), counts
    assert status["pending_shards"] == []
    return status
