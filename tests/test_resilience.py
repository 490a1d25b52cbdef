"""Faults, quotas, deadlines, redelivery and crashes: nothing lost, nothing described twice.

Invocations run in the test process with real clients handed in, except the
crash test, which kills a real functions-framework process mid-manifest.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from google.cloud import storage

from describer import Runtime, handle_storage_event
from describer.errors import StorageUnavailable, TransientFailure
from describer.layout import KIND_KEY, SIDECAR_KIND
from describer.store import COMPLETE_KEY, OUTPUT_MARKER, SOURCE_GENERATION_KEY
from localdev import procs
from localdev.events import finalized_event
from localdev.gemini_sim import RunningSimulator
from localdev.memory_store import MemoryStore

from .conftest import (
    API_KEY,
    event_data,
    function_env,
    post_batch,
    send_event,
    upload,
    upload_pictures,
    wait_for,
)

PARTS = "describer-batches/job.parts/"
# What another delivery's sidecar carries: the function's marks.
SIDECAR = {**OUTPUT_MARKER, KIND_KEY: SIDECAR_KIND}


def _records(reply: Any) -> list[dict[str, Any]]:
    assert reply.status == 200, reply.body
    return reply.body["results"]  # type: ignore[no-any-return]


def _widths(sim: RunningSimulator) -> list[int]:
    """The width of every image the simulator answered for (our test images differ by width)."""
    return sorted(image["width"] for image in sim.stats.images)


@pytest.fixture
def event_runtime(make_runtime: Callable[..., Runtime]) -> Callable[..., Runtime]:
    """As make_runtime, but results go to the event's own (fresh) bucket: no RESULTS_BUCKET."""
    return lambda **kw: make_runtime(**{"results_bucket": None, **kw})


@pytest.fixture
def pictures(bucket: storage.Bucket) -> Callable[[int], list[str]]:
    """Upload n distinct images (widths 100, 101, ...) and return their gs:// URIs."""

    def make(n: int) -> list[str]:
        return upload_pictures(bucket, n, height=80, colour="green")

    return make


def _one_picture(bucket: storage.Bucket, pictures: Callable[[int], list[str]]) -> storage.Blob:
    """Upload one picture and return its blob, generation included (as an event names it)."""
    (uri,) = pictures(1)
    blob = bucket.get_blob(uri.split("/", 3)[3])
    assert blob is not None
    return blob


def _manifest(bucket: storage.Bucket, images: list[str]) -> storage.Blob:
    return upload(bucket, "job.batch.json", json.dumps({"images": images}).encode(), None)


def _jsonl(bucket: storage.Bucket) -> tuple[list[dict[str, Any]], dict[str, str]]:
    blob = bucket.get_blob("describer-batches/job.jsonl")
    assert blob is not None
    lines = [json.loads(line) for line in blob.download_as_text().splitlines()]
    return lines, dict(blob.metadata or {})


# --- model calls that ride out trouble -------------------------------------------------------


def test_a_storm_of_429s_500s_and_timeouts_ends_with_every_image_described(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """30% 429 (with RetryInfo), 10% 500 and 5% hangs past the timeout are all ridden out."""
    # GIVEN a model that fails 45% of calls in three different ways
    sim.configure(
        api_key=API_KEY,
        rate_429=0.3,
        rate_500=0.1,
        rate_hang=0.05,
        hang_ms=3_000,
        retry_delay_s=0.02,
        seed=7,
    )
    runtime = make_runtime(model_max_attempts=12, model_timeout_s=0.5, model_concurrency=6)
    images = [f"{image_server}/{n}" for n in ("chelsea.png", "coffee.png", "rocket.jpg")] * 8
    # WHEN a batch of 24 is described
    records = _records(post_batch(runtime, {"images": images}))
    # THEN every record is ok, and the attempts recorded are exactly the calls made
    assert [r["status"] for r in records] == ["ok"] * 24, [r["error"] for r in records]
    assert sum(r["attempts"] for r in records) == sim.stats.calls
    assert sim.stats.calls <= 24 * 12
    # AND the faults really happened and were retried
    assert sim.stats.by_status.get("429", 0) > 0 and sim.stats.by_status.get("500", 0) > 0
    assert max(r["attempts"] for r in records) > 1


def test_a_model_that_never_answers_times_out_after_bounded_attempts(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """Calls that hang past MODEL_TIMEOUT_S are retried, then recorded as timeout."""
    sim.configure(api_key=API_KEY, rate_hang=1.0, hang_ms=5_000)
    runtime = make_runtime(model_max_attempts=2, model_timeout_s=0.3)
    (record,) = _records(post_batch(runtime, {"images": [f"{image_server}/chelsea.png"]}))
    assert record["error"]["code"] == "timeout"
    assert record["attempts"] == 2
    assert sim.stats.calls == 2


def test_a_quota_on_calls_in_flight_is_absorbed_by_retries(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """A model that answers 429 above 2 calls in flight still describes a batch sent 6 at a time."""
    sim.configure(api_key=API_KEY, max_in_flight=2, latency_ms=30, retry_delay_s=0.02)
    runtime = make_runtime(model_concurrency=6, model_max_attempts=20)
    images = [f"{image_server}/chelsea.png", f"{image_server}/coffee.png"] * 6
    records = _records(post_batch(runtime, {"images": images}))
    assert [r["status"] for r in records] == ["ok"] * 12
    assert sim.stats.by_status.get("429", 0) > 0
    assert sim.stats.ok == 12


def test_a_missing_model_falls_back_to_gemini_fallback_model(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """GEMINI_FALLBACK_MODEL describes the batch when GEMINI_MODEL does not exist."""
    sim.configure(api_key=API_KEY, known_models=["gemini-old-but-here"])
    runtime = make_runtime(
        model="gemini-gone", fallback_model="gemini-old-but-here", model_concurrency=2
    )
    images = [f"{image_server}/chelsea.png"] * 5
    records = _records(post_batch(runtime, {"images": images}))
    assert [(r["status"], r["model"]) for r in records] == [("ok", "gemini-old-but-here")] * 5
    # Only the calls already under way when the first 404 came went to the missing model.
    assert sim.stats.by_status["404"] <= 2
    assert sim.stats.ok == 5
    # AND the switch is the process's: the next invocation goes straight to the fallback
    missing = sim.stats.by_status["404"]
    again = _records(post_batch(runtime, {"images": images[:2]}))
    assert [r["model"] for r in again] == ["gemini-old-but-here"] * 2
    assert sim.stats.by_status["404"] == missing


def test_a_missing_fallback_is_named_beside_the_missing_model(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """When neither model exists the error names both settings."""
    sim.configure(api_key=API_KEY, known_models=["something-else"])
    runtime = make_runtime(model="gemini-gone", fallback_model="gemini-also-gone")
    (record,) = _records(post_batch(runtime, {"images": [f"{image_server}/chelsea.png"]}))
    assert record["error"]["code"] == "model_error"
    assert "GEMINI_MODEL" in record["error"]["message"]
    assert "'gemini-also-gone' (GEMINI_FALLBACK_MODEL)" in record["error"]["message"]
    assert sim.stats.calls == 2


# --- the deadline ----------------------------------------------------------------------------
# These wait for a real deadline (FUNCTION_TIMEOUT_S - DEADLINE_MARGIN_S, seconds each), so
# they are marked slow. The deadline is an asyncio timeout on the event loop's clock: a clock
# injected to skip the wait would have to drive the event loop itself.


@pytest.mark.slow
def test_the_deadline_keeps_finished_records_and_marks_the_rest(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """At FUNCTION_TIMEOUT_S - DEADLINE_MARGIN_S work stops and every source still has a record."""
    # GIVEN a model that answers 3 calls and then holds every further call
    sim.configure(api_key=API_KEY, answer_limit=3)
    runtime = make_runtime(
        function_timeout_s=4.0, deadline_margin_s=1.0, model_concurrency=1, download_concurrency=1
    )
    images = [f"{image_server}/chelsea.png"] * 8
    # WHEN a batch of 8 is described
    reply = post_batch(runtime, {"images": images})
    records = _records(reply)
    # THEN it returns with one record per source, in order
    assert [r["source"] for r in records] == images
    statuses = [r["status"] if r["error"] is None else r["error"]["code"] for r in records]
    assert statuses.count("ok") == 3
    assert statuses.count("deadline_exceeded") == 5
    messages = {r["error"]["message"] for r in records if r["error"]}
    # AND the records say whether the source was cut off or never started
    assert any("stopped unfinished" in m for m in messages)
    assert any("not started" in m for m in messages)
    # AND the call the deadline cut off is counted: the attempts add up to the calls made
    cut = [r for r in records if r["error"] and "stopped unfinished" in r["error"]["message"]]
    (held,) = [r for r in cut if r["attempts"]]  # the others were waiting for the model
    assert held["attempts"] == 1
    assert (held["width"], held["height"]) == (451, 300)
    assert held["latency_ms"] > 0
    assert sum(r["attempts"] for r in records) == sim.stats.calls == 4
    # AND the results were written within the margin: the gallery, written last, is skipped
    # once half the margin is gone, so its being there says the batch ended in time
    assert reply.body["results_uri"] is not None
    assert reply.body["gallery_uri"] is not None


@pytest.mark.slow
def test_a_deadline_during_a_retry_wait_counts_the_call_already_made(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN a model that answers 429 with a RetryInfo delay longer than the time left
    sim.configure(api_key=API_KEY, rate_429=1.0, retry_delay_s=30.0)
    runtime = make_runtime(function_timeout_s=3.0, deadline_margin_s=1.0)
    # WHEN the deadline comes while the image waits to retry
    (record,) = _records(post_batch(runtime, {"images": [f"{image_server}/chelsea.png"]}))
    # THEN its record is cut short and still counts the one call made
    assert record["error"]["code"] == "deadline_exceeded"
    assert record["attempts"] == sim.stats.calls == 1
    assert (record["width"], record["height"]) == (451, 300)


@pytest.mark.slow
def test_an_upload_cut_off_by_the_deadline_asks_for_redelivery(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """An upload that runs out of time raises (so Eventarc redelivers) and writes no sidecar."""
    sim.configure(api_key=API_KEY, answer_limit=0)
    runtime = event_runtime(function_timeout_s=2.5, deadline_margin_s=1.0)
    blob = _one_picture(bucket, pictures)
    with pytest.raises(TransientFailure, match="deadline"):
        handle_storage_event(runtime, event_data(blob))
    assert bucket.get_blob(f"descriptions/{blob.name}.json") is None


# --- manifests: checkpoints, redelivery, crashes ---------------------------------------------


@pytest.mark.slow
def test_a_manifest_cut_off_by_the_deadline_resumes_on_redelivery_without_repeats(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """A manifest cut off by the deadline keeps its progress; the redelivery does only the rest."""
    images = pictures(6)
    manifest = _manifest(bucket, images)
    runtime = event_runtime(function_timeout_s=3.5, deadline_margin_s=1.0, model_concurrency=2)
    # GIVEN a model that answers only 2 calls in the first delivery
    sim.configure(api_key=API_KEY, answer_limit=2)
    # WHEN the manifest event arrives THEN the invocation asks for redelivery
    with pytest.raises(TransientFailure, match="4 of 6 sources remain"):
        handle_storage_event(runtime, event_data(manifest))
    first = _widths(sim)
    lines, meta = _jsonl(bucket)
    # AND the JSONL already holds every source, marked incomplete
    assert meta[COMPLETE_KEY] == "false"
    assert [line["status"] for line in lines].count("ok") == 2
    assert [line["error"]["code"] for line in lines if line["error"]] == ["deadline_exceeded"] * 4
    # WHEN the event is redelivered to a model without the limit
    sim.configure(api_key=API_KEY)
    assert handle_storage_event(runtime, event_data(manifest)) == "described_manifest"
    # THEN only the 4 unfinished sources were described, and the JSONL is whole and in order
    assert len(first) == 2 and len(_widths(sim)) == 4
    assert sorted(first + _widths(sim)) == list(range(100, 106))
    lines, meta = _jsonl(bucket)
    assert [line["source"] for line in lines] == images
    assert [line["status"] for line in lines] == ["ok"] * 6
    assert meta[COMPLETE_KEY] == "true"
    assert meta[SOURCE_GENERATION_KEY] == str(manifest.generation)
    # AND the gallery shows all 6, thumbnails of the first delivery's 2 kept by their checkpoints
    gallery = bucket.get_blob("describer-batches/job.html")
    assert gallery is not None
    html = gallery.download_as_text()
    assert html.count('class="card') == 6
    assert html.count("data:image/jpeg;base64,") == 6
    # AND the checkpoints are gone, and a third delivery does nothing
    assert not list(bucket.list_blobs(prefix=PARTS))
    assert handle_storage_event(runtime, event_data(manifest)) == "already_done"
    assert sim.stats.calls == 4


@pytest.mark.slow
def test_a_manifest_with_no_progress_at_all_does_not_loop(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """If nothing finishes in a whole invocation, it stops instead of asking for redelivery."""
    sim.configure(api_key=API_KEY, answer_limit=0)
    runtime = event_runtime(function_timeout_s=2.5, deadline_margin_s=1.0)
    manifest = _manifest(bucket, pictures(2))
    assert handle_storage_event(runtime, event_data(manifest)) == "manifest_stalled"
    lines, meta = _jsonl(bucket)
    assert meta[COMPLETE_KEY] == "false"
    assert [line["error"]["code"] for line in lines] == ["deadline_exceeded"] * 2


@pytest.fixture
def killable_function(
    emulator_url: str, sim_server: RunningSimulator, gcs: storage.Client, tmp_path: Path
) -> Iterator[Callable[[], tuple[Any, str]]]:
    """Start describe_gcs processes that the test may kill; all are stopped at the end."""
    started: list[Any] = []

    def start() -> tuple[Any, str]:
        port = procs.free_port()
        proc = procs.start_function(
            "describe_gcs",
            port,
            function_env(emulator_url, sim_server.url, MODEL_CONCURRENCY="2"),
            cloudevent=True,
            log_path=tmp_path / f"describe_gcs-{len(started)}.log",
        )
        started.append(proc)
        return proc, f"http://127.0.0.1:{port}/"

    yield start
    for proc in started:
        if proc.poll() is None:
            procs.kill_hard(proc)


@pytest.mark.slow
def test_a_process_killed_mid_manifest_loses_nothing_and_repeats_nothing(
    killable_function: Callable[[], tuple[Any, str]],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """SIGKILL mid-manifest, then redelivery: every image is described exactly once overall."""
    images = pictures(8)
    manifest = _manifest(bucket, images)
    # GIVEN a function process describing the manifest, whose model answers 3 calls and holds
    sim.configure(api_key=API_KEY, answer_limit=3)
    proc, url = killable_function()

    def kill_once_three_are_kept() -> None:
        wait_for(
            lambda: sim.stats.held >= 1 and len(list(bucket.list_blobs(prefix=PARTS))) >= 3,
            "three checkpoints and a held call",
        )
        procs.kill_hard(proc)

    # WHEN the event is in flight, three answers are checkpointed and the next calls
    # are held, the process is killed (SIGKILL: no clean-up of any kind)
    killer = threading.Thread(target=kill_once_three_are_kept)
    killer.start()
    headers, body = finalized_event(manifest)
    try:
        with pytest.raises(requests.ConnectionError):
            requests.post(url, data=body, headers=headers, timeout=60)
    finally:
        killer.join()
    first = _widths(sim)
    assert len(first) == 3
    # WHEN the platform redelivers the event to a fresh process, with the model healthy
    sim.configure(api_key=API_KEY)
    _, url = killable_function()
    assert send_event(url, manifest).status_code == 200
    # THEN the 5 that were not kept are described, none of the 3 again
    second = _widths(sim)
    assert len(second) == 5
    assert sorted(first + second) == list(range(100, 108))
    lines, meta = _jsonl(bucket)
    assert [line["source"] for line in lines] == images
    assert [line["status"] for line in lines] == ["ok"] * 8
    assert meta[COMPLETE_KEY] == "true"


# --- create-only writes, against a store that enforces preconditions ---------------------------


def test_a_sidecar_written_first_by_another_delivery_wins(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """The create-only sidecar write loses to a concurrent delivery and counts as done."""
    store = MemoryStore()
    runtime = event_runtime(store=store)
    blob = _one_picture(bucket, pictures)
    sidecar = f"descriptions/{blob.name}.json"

    async def other_delivery_writes_first(bucket_name: str, name: str) -> None:
        if name == sidecar and (bucket_name, name) not in store.objects:
            store.put(bucket_name, name, b'{"description": "the other delivery"}')

    # GIVEN another delivery of the same event that writes the sidecar just before this one
    store.before_write = other_delivery_writes_first
    # WHEN this delivery finishes THEN it counts as done and leaves the other's result
    assert handle_storage_event(runtime, event_data(blob)) == "already_done"
    assert store.rejected == [(bucket.name, sidecar)]
    assert json.loads(store.objects[(bucket.name, sidecar)].data) == {
        "description": "the other delivery"
    }


def test_a_sidecar_replaced_between_read_and_write_is_not_overwritten(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """Replacing an older sidecar is conditional on the generation that was read."""
    store = MemoryStore()
    runtime = event_runtime(store=store)
    blob = _one_picture(bucket, pictures)
    sidecar = f"descriptions/{blob.name}.json"
    # GIVEN a sidecar for an older generation of the object
    store.put(bucket.name, sidecar, json.dumps({"generation": "1"}).encode(), SIDECAR)

    async def newer_delivery_replaces_it(bucket_name: str, name: str) -> None:
        if name == sidecar and not store.rejected:
            store.put(bucket_name, name, json.dumps({"generation": "99"}).encode(), SIDECAR)

    # WHEN a newer delivery replaces it while this one is describing
    store.before_write = newer_delivery_replaces_it
    # THEN this write is refused and the newer result stays
    assert handle_storage_event(runtime, event_data(blob)) == "already_done"
    assert json.loads(store.objects[(bucket.name, sidecar)].data) == {"generation": "99"}


def test_without_a_race_the_sidecar_is_created_once(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """The same event twice against the enforcing store: one model call, one write, no rejects."""
    store = MemoryStore()
    runtime = event_runtime(store=store)
    blob = _one_picture(bucket, pictures)
    assert handle_storage_event(runtime, event_data(blob)) == "described"
    assert handle_storage_event(runtime, event_data(blob)) == "already_done"
    assert sim.stats.calls == 1
    assert store.rejected == []
    assert store.names(bucket.name) == [f"descriptions/{blob.name}.json"]


def test_manifest_checkpoints_are_create_only(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """A checkpoint already written by a racing delivery is kept, and the batch still completes."""
    store = MemoryStore()
    runtime = event_runtime(store=store)
    images = pictures(3)
    manifest = _manifest(bucket, images)
    racing = f"{PARTS}{manifest.generation}/000001.json"

    async def racing_delivery(bucket_name: str, name: str) -> None:
        if name == racing and (bucket_name, name) not in store.objects:
            racer = json.dumps({"source": images[1], "racer": True}).encode()
            store.put(bucket_name, name, racer, OUTPUT_MARKER)

    store.before_write = racing_delivery
    assert handle_storage_event(runtime, event_data(manifest)) == "described_manifest"
    assert store.rejected == [(bucket.name, racing)]
    lines = store.objects[(bucket.name, "describer-batches/job.jsonl")].data.splitlines()
    assert [json.loads(line)["source"] for line in lines] == images
    # The checkpoints were cleared once the JSONL was complete.
    assert store.names(bucket.name, PARTS) == []


# --- review findings: no hidden calls, no loops, no stale overwrites ---------------------------


def test_dropped_connections_are_retried_by_us_alone_and_counted(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """The SDK's own silent resend is off: every call made is an attempt in the record."""
    # GIVEN a model whose server drops every connection without answering
    sim.configure(api_key=API_KEY, rate_drop=1.0)
    runtime = make_runtime(model_max_attempts=3)
    # WHEN an image is described
    (record,) = _records(post_batch(runtime, {"images": [f"{image_server}/chelsea.png"]}))
    # THEN it fails after exactly 3 calls, all counted: a resend of the SDK's own (and the
    # backoff it would wait before one) would show as a fourth call the server saw
    assert record["error"]["code"] == "model_error"
    assert record["attempts"] == 3
    assert sim.stats.calls == sim.stats.dropped == 3


def test_a_late_event_for_an_older_manifest_generation_is_superseded(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """A redelivery of an old manifest upload neither re-describes nor overwrites the newer one."""
    runtime = event_runtime()
    images = pictures(3)
    old = _manifest(bucket, images[:2])
    new = _manifest(bucket, images)
    assert handle_storage_event(runtime, event_data(new)) == "described_manifest"
    # WHEN the older generation's event arrives late
    assert handle_storage_event(runtime, event_data(old)) == "superseded"
    # THEN no model call was made for it and the JSONL still belongs to the newer upload
    assert sim.stats.calls == 3
    lines, meta = _jsonl(bucket)
    assert [line["source"] for line in lines] == images
    assert meta[SOURCE_GENERATION_KEY] == str(new.generation)


def test_results_that_can_never_be_written_do_not_ask_for_redelivery(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """A manifest whose output bucket does not exist ends once, instead of paying on every retry."""
    images = pictures(1)
    manifest = upload(
        bucket,
        "job.batch.json",
        json.dumps({"images": images, "output": "gs://no-such-bucket-here/out/"}).encode(),
        None,
    )
    assert handle_storage_event(event_runtime(), event_data(manifest)) == "results_unwritable"
    # The missing bucket shows when the earlier result is looked up: before any model call.
    assert sim.stats.calls == 0


def test_an_unwritable_requested_output_is_a_400_that_still_returns_the_results(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """A request naming a bucket that does not exist gets a 400 (do not retry) with its results."""
    reply = post_batch(
        make_runtime(),
        {"images": [f"{image_server}/chelsea.png"], "output": "gs://no-such-bucket-here/x/"},
    )
    assert reply.status == 400
    assert reply.body["error"]["code"] == "output_unwritable"
    assert reply.body["results_uri"] is None
    assert [r["status"] for r in reply.body["results"]] == ["ok"]


def test_a_redelivered_upload_described_by_the_fallback_model_is_skipped(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """The sidecar names the fallback model; a second delivery must still count as done."""
    sim.configure(api_key=API_KEY, known_models=["gemini-here"])
    runtime = event_runtime(model="gemini-gone", fallback_model="gemini-here")
    blob = _one_picture(bucket, pictures)
    assert handle_storage_event(runtime, event_data(blob)) == "described"
    calls = sim.stats.calls
    assert handle_storage_event(runtime, event_data(blob)) == "already_done"
    assert sim.stats.calls == calls


def test_past_the_retry_window_a_passing_failure_is_recorded_not_redelivered(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """An upload still failing after EVENT_RETRY_WINDOW_S gets its error sidecar and stops."""
    sim.configure(api_key=API_KEY, rate_500=1.0)
    runtime = event_runtime(model_max_attempts=2, event_retry_window_s=60.0)
    blob = _one_picture(bucket, pictures)
    # GIVEN a fresh event: the outage asks for redelivery
    with pytest.raises(TransientFailure):
        handle_storage_event(runtime, event_data(blob), event_time=_ago(10))
    # WHEN the same event is delivered again two minutes after it was first sent
    assert handle_storage_event(runtime, event_data(blob), event_time=_ago(120)) == "described"
    # THEN the failure is written down for good
    sidecar = bucket.get_blob(f"descriptions/{blob.name}.json")
    assert sidecar is not None
    assert json.loads(sidecar.download_as_bytes())["error"]["code"] == "model_error"


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


def test_a_manifest_finished_first_by_a_concurrent_delivery_is_not_downgraded(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """The JSONL write is conditional: a complete result written meanwhile wins."""
    store = MemoryStore()
    runtime = event_runtime(store=store)
    manifest = _manifest(bucket, pictures(2))
    jsonl = "describer-batches/job.jsonl"

    async def other_delivery_completes_first(bucket_name: str, name: str) -> None:
        if name == jsonl and (bucket_name, name) not in store.objects:
            store.put(
                bucket_name,
                name,
                b"{}\n",
                {SOURCE_GENERATION_KEY: str(manifest.generation), COMPLETE_KEY: "true"},
            )

    store.before_write = other_delivery_completes_first
    assert handle_storage_event(runtime, event_data(manifest)) == "already_done"
    assert store.rejected == [(bucket.name, jsonl)]
    assert store.objects[(bucket.name, jsonl)].data == b"{}\n"


def test_a_checkpoint_that_cannot_be_written_leaves_the_manifest_unfinished(
    event_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    pictures: Callable[[int], list[str]],
    sim: RunningSimulator,
) -> None:
    """A record whose checkpoint write fails is not done: the delivery asks to be redelivered
    and the next one finishes it; past the retry window it ends as a named write_failed error,
    never as a manifest reported complete with its results missing."""
    store = MemoryStore()
    runtime = event_runtime(store=store, event_retry_window_s=60.0)
    images = pictures(3)
    manifest = _manifest(bucket, images)
    outage = True

    async def checkpoints_refused(bucket_name: str, name: str) -> None:
        if outage and ".parts/" in name and name.endswith("000001.json"):
            raise StorageUnavailable(f"gs://{bucket_name}/{name}", ConnectionError("503"))

    store.before_write = checkpoints_refused
    # WHEN one checkpoint cannot be written THEN the delivery fails, to be redelivered
    with pytest.raises(TransientFailure, match="1 of 3 sources remain unfinished"):
        handle_storage_event(runtime, event_data(manifest), event_time=_ago(10))
    jsonl = store.objects[(bucket.name, "describer-batches/job.jsonl")]
    assert jsonl.metadata[COMPLETE_KEY] == "false"
    # WHEN it is redelivered after the outage THEN only that source is described again
    outage = False
    assert handle_storage_event(runtime, event_data(manifest), event_time=_ago(20)) == (
        "described_manifest"
    )
    assert sim.stats.calls == 4
    done = store.objects[(bucket.name, "describer-batches/job.jsonl")]
    assert done.metadata[COMPLETE_KEY] == "true"
    assert [json.loads(line)["status"] for line in done.data.splitlines()] == ["ok"] * 3
    # GIVEN a new upload of the manifest whose checkpoint fails past the retry window
    outage = True
    again = _manifest(bucket, images)
    assert handle_storage_event(runtime, event_data(again), event_time=_ago(120)) == (
        "described_manifest"
    )
    # THEN the source ends as an error naming the write, with the calls it cost
    lines = store.objects[(bucket.name, "describer-batches/job.jsonl")].data.splitlines()
    second = json.loads(lines[1])
    assert second["error"]["code"] == "write_failed"
    assert "000001.json" in second["error"]["message"]
    assert second["attempts"] == 1 and second["usage"]["prompt_tokens"] > 0
