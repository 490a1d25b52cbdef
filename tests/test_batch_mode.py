"""Batch mode, in-process: manifests and backfills answered by Batch API jobs.

Real components: the storage emulator through the real google-cloud-storage client, and the
project's Gemini simulator (its Batch API: Files API uploads, batch jobs that end when a test
lets them) through the real google-genai client. Events are delivered by the test as
Eventarc would (conftest.deliver_all); collects are describe_http requests handled in-process.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from describer import Runtime, Settings, handle_storage_event
from describer.errors import TransientFailure
from describer.gemini import GeminiConnector
from describer.layout import job_registry_name, parse_vertex_results_name
from describer.settings import GeminiAccess, Prices
from describer.store import OUTPUT_MARKER_KEY
from localdev.gemini_sim import RunningSimulator
from localdev.relay import RelayConfig, RunningRelay
from localdev.relay import start_in_thread as start_relay

from .conftest import (
    API_KEY,
    deliver_all,
    event_data,
    make_image,
    post_batch,
    upload,
    upload_pictures,
    wait_for,
)

SHARDS = "describer-shards/"
BATCHES = "describer-batches/"


@pytest.fixture
def batch_relay(emulator_url: str) -> Iterator[RunningRelay]:
    """Storage through the relay, which holds generation preconditions as Cloud Storage does
    (the emulator ignores them): collects land jobs at once, and so update the status
    object at once."""
    relay = start_relay(RelayConfig(emulator_url=emulator_url))
    yield relay
    relay.stop()


@pytest.fixture
def make_batch_runtime(
    batch_relay: RunningRelay, bucket: storage.Bucket, sim: RunningSimulator
) -> Iterator[Callable[..., Runtime]]:
    """Runtimes whose event bucket holds everything (RESULTS_BUCKET, so batch mode may
    register jobs), with settings ``overrides``."""
    made: list[Runtime] = []

    def build(*, store_timeout_s: float | None = None, **overrides: Any) -> Runtime:
        settings = replace(
            Settings(
                results_bucket=bucket.name,
                allowed_buckets=frozenset({bucket.name}),
                shard_size=5,
                allow_private_urls=True,
                model_backoff_s=0.01,
                gemini=GeminiAccess(api_key=API_KEY, base_url=sim.url),
            ),
            **overrides,
        )
        client = storage.Client(
            project="test",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": batch_relay.url},
        )
        runtime = Runtime(
            settings=settings,
            storage_client=client,
            gemini=GeminiConnector(settings.gemini),
            store_timeout_s=store_timeout_s,
        )
        made.append(runtime)
        return runtime

    yield build
    for runtime in made:
        runtime.close()


@pytest.fixture
def runtime(make_batch_runtime: Callable[..., Runtime]) -> Runtime:
    return make_batch_runtime()


def _status(bucket: storage.Bucket, batch: str) -> dict[str, Any]:
    blob = bucket.get_blob(f"{BATCHES}{batch}.status.json")
    assert blob is not None
    data: dict[str, Any] = json.loads(blob.download_as_bytes())
    return data


def _records(bucket: storage.Bucket, name: str) -> list[dict[str, Any]]:
    blob = bucket.get_blob(name)
    assert blob is not None, name
    return [json.loads(line) for line in blob.download_as_text().splitlines()]


def _collect(runtime: Runtime) -> dict[str, Any]:
    reply = post_batch(runtime, {"collect": True})
    assert reply.status == 200, reply.body
    body: dict[str, Any] = reply.body
    return body


def _jobs_ended(
    sim: RunningSimulator, count: int, state: str = "JOB_STATE_SUCCEEDED"
) -> Callable[[], bool]:
    def ended() -> bool:
        states = list(sim.stats.batch_states.values())
        return len(states) == count and all(s == state for s in states)

    return ended


def test_a_manifest_in_batch_mode_is_one_job_per_shard_landed_by_a_collect_at_batch_prices(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN a manifest in batch mode: 8 pictures, one missing object and one that is no image
    sim.configure(api_key=API_KEY, batch_hold=True)
    images = upload_pictures(bucket, 8, height=40, colour="green")
    upload(bucket, "in/notes.png", b"not a picture", "image/png")
    images += [f"gs://{bucket.name}/in/missing.png", f"gs://{bucket.name}/in/notes.png"]
    body = json.dumps({"images": images, "mode": "batch"}).encode()
    manifest = upload(bucket, "jobs/night.batch.json", body, None)
    # WHEN its event and its shards' events arrive
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    outcomes = deliver_all(runtime, bucket, SHARDS)
    # THEN each shard submitted one job and no online call was made
    assert outcomes == ["batch_submitted", "batch_submitted"]
    assert sim.stats.calls == 0
    assert sim.stats.batch_jobs_created == 2
    status = _status(bucket, "jobs/night")
    assert status["mode"] == "batch"
    jobs = status["jobs"]
    assert sorted(jobs) == ["0", "1"]
    assert all(j["name"].startswith("batches/") for j in jobs.values())
    assert {j["state"] for j in jobs.values()} <= {"pending", "running"}
    # AND the same shard events again create no job
    for blob in bucket.list_blobs(prefix=SHARDS):
        assert handle_storage_event(runtime, event_data(blob)) == "already_submitted"
    assert sim.stats.batch_jobs_created == 2

    # WHEN a collect comes while the jobs run THEN it lands nothing and says they are pending
    collected = _collect(runtime)
    assert collected["counts"] == {"pending": 2}
    assert not bucket.get_blob(f"{BATCHES}jobs/night.jsonl")

    # WHEN the jobs end and a collect comes
    sim.release()
    wait_for(_jobs_ended(sim, 2), "both jobs to end")
    collected = _collect(runtime)
    # THEN both are landed, the batch is merged, and still no online call was made
    assert collected["counts"] == {"landed": 2}, collected
    assert sim.stats.calls == 0, _status(bucket, "jobs/night")
    records = _records(bucket, f"{BATCHES}jobs/night.jsonl")
    assert [r["source"] for r in records] == images
    answered = records[:8]
    assert all(r["status"] == "ok" and r["batch_job"] in {j["name"] for j in jobs.values()}
               for r in answered)  # fmt: skip
    assert [r["error"]["code"] for r in records[8:]] == ["not_found", "not_an_image"]
    assert all("batch_job" not in r for r in records[8:])
    # AND each answer costs its tokens at the batch prices, half the online ones
    batch = Prices(0.05, 0.20)
    for record in answered:
        usage = record["usage"]
        cost = batch.cost(usage["prompt_tokens"], usage["output_tokens"])
        assert record["cost_usd"] == pytest.approx(cost)
    status = _status(bucket, "jobs/night")
    assert status["complete"] is True
    # (summed per shard to the micro-dollar)
    assert status["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in answered), abs=2e-6)
    assert {j["state"] for j in status["jobs"].values()} == {"landed"}, status["jobs"]
    # AND the descriptions are the ones online calls give for the same images
    assert sim.stats.batch_requests == 8
    assert all("Mostly green" in r["description"] for r in answered)
    # AND nothing is left to collect: the jobs' files and registrations are gone
    assert not list(bucket.list_blobs(prefix=f"{BATCHES}.jobs/"))
    assert not [b.name for b in bucket.list_blobs(prefix=BATCHES) if ".job/" in b.name]
    assert _collect(runtime)["collected"] == 0


def test_requests_that_fail_inside_a_job_are_asked_online_when_passing_and_recorded_when_not(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    images = upload_pictures(bucket, 5, height=30, colour="red")
    for code, expect_online in ((500, True), (400, False)):
        # GIVEN jobs in which every request fails with ``code``
        sim.configure(api_key=API_KEY, batch_error_rate=1.0, batch_error_code=code)
        body = json.dumps({"images": images, "mode": "batch"}).encode()
        manifest = upload(bucket, f"jobs/e{code}.batch.json", body, None)
        assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
        assert deliver_all(runtime, bucket, SHARDS) == ["batch_submitted"]
        wait_for(_jobs_ended(sim, 1), "the job to end")
        # WHEN it is collected
        assert _collect(runtime)["counts"] == {"landed": 1}
        records = _records(bucket, f"{BATCHES}jobs/e{code}.jsonl")
        if expect_online:
            # THEN a passing error is asked again online, at online prices
            assert sim.stats.calls == 5
            assert all(r["status"] == "ok" and "batch_job" not in r for r in records)
            online = Prices(0.10, 0.40)
            assert all(
                r["cost_usd"]
                == pytest.approx(
                    online.cost(r["usage"]["prompt_tokens"], r["usage"]["output_tokens"])
                )
                for r in records
            )
        else:
            # THEN a lasting one is the record, naming the job and its reason
            assert sim.stats.calls == 0
            assert all(r["error"]["code"] == "model_error" for r in records)
            assert all(r["batch_job"].startswith("batches/") for r in records)
            assert all("400" in r["error"]["message"] for r in records)


def test_a_backfill_in_batch_mode_dry_runs_both_estimates_and_writes_sidecars(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    sim.configure(api_key=API_KEY)
    for i in range(6):
        upload(bucket, f"cam/{i}.png", make_image(40 + i, 30, "blue", "PNG"), "image/png")
    # GIVEN a dry run in batch mode THEN it answers both estimates side by side
    dry = post_batch(
        runtime, {"backfill": f"gs://{bucket.name}/cam/", "mode": "batch", "dry_run": True}
    )
    assert dry.status == 200, dry.body
    estimates = dry.body["estimates"]
    assert dry.body["mode"] == "batch"
    assert estimates["batch"]["prompt_tokens"] == estimates["online"]["prompt_tokens"]
    assert estimates["batch"]["cost_usd"] == pytest.approx(
        estimates["online"]["cost_usd"] / 2, abs=1e-6
    )
    assert dry.body["estimate"] == estimates["batch"]
    # WHEN it runs
    started = post_batch(runtime, {"backfill": f"gs://{bucket.name}/cam/", "mode": "batch"})
    assert started.status == 202, started.body
    batch = started.body["batch"]
    outcomes = deliver_all(runtime, bucket, SHARDS)
    assert outcomes.count("batch_submitted") == 2
    wait_for(_jobs_ended(sim, 2), "both jobs to end")
    assert _collect(runtime)["counts"] == {"landed": 2}
    # THEN every image has its sidecar, written from the job's answer
    for i in range(6):
        sidecar = bucket.get_blob(f"descriptions/cam/{i}.png.json")
        assert sidecar is not None
        record = json.loads(sidecar.download_as_bytes())
        assert record["status"] == "ok" and record["batch_job"].startswith("batches/")
    assert sim.stats.calls == 0 and sim.stats.batch_requests == 6
    assert _status(bucket, batch)["complete"] is True
    # AND a second backfill finds nothing to describe
    again = post_batch(runtime, {"backfill": f"gs://{bucket.name}/cam/", "mode": "batch"})
    assert again.status == 200 and again.body["images"] == 0


def test_a_failed_job_is_recorded_and_one_request_reruns_its_sources_online(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    sim.configure(api_key=API_KEY, batch_outcome="failed")
    images = upload_pictures(bucket, 7, height=30, colour="blue")
    body = json.dumps({"images": images, "mode": "batch"}).encode()
    manifest = upload(bucket, "jobs/f.batch.json", body, None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    assert deliver_all(runtime, bucket, SHARDS) == ["batch_submitted", "batch_submitted"]
    wait_for(_jobs_ended(sim, 2, "JOB_STATE_FAILED"), "both jobs to fail")
    # WHEN a collect finds them failed THEN the status says so and the batch waits
    assert _collect(runtime)["counts"] == {"ended": 2}
    status = _status(bucket, "jobs/f")
    assert {j["state"] for j in status["jobs"].values()} == {"failed"}
    assert all(j.get("error") for j in status["jobs"].values())
    assert status["pending_shards"] == [0, 1] and not status["complete"]
    # WHEN one request asks for a rerun online
    sim.configure(api_key=API_KEY)
    rerun = post_batch(runtime, {"rerun_online": "jobs/f"})
    assert rerun.status == 202, rerun.body
    assert rerun.body["rerun_online"] == [0, 1]
    outcomes = deliver_all(runtime, bucket, SHARDS)
    # THEN the shards run online, and the batch completes at online prices
    assert outcomes[-1] == "merged"
    assert sim.stats.calls == 7 and sim.stats.batch_jobs_created == 0
    records = _records(bucket, f"{BATCHES}jobs/f.jsonl")
    assert [r["source"] for r in records] == images
    assert all(r["status"] == "ok" and "batch_job" not in r for r in records)
    # AND a second rerun has nothing to do
    assert post_batch(runtime, {"rerun_online": "jobs/f"}).status == 409


def test_shard_events_delivered_at_once_in_one_process_make_one_job_each(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    sim.configure(api_key=API_KEY, batch_hold=True)
    images = upload_pictures(bucket, 10, height=30, colour="green")
    manifest = upload(
        bucket,
        "jobs/twice.batch.json",
        json.dumps({"images": images, "mode": "batch"}).encode(),
        None,
    )
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    shards = list(bucket.list_blobs(prefix=SHARDS))
    outcomes: list[str] = []
    failures: list[BaseException] = []

    def deliver(blob: storage.Blob) -> None:
        try:
            outcomes.append(handle_storage_event(runtime, event_data(blob)))
        except TransientFailure as exc:  # a redelivery asked for: the event comes again
            failures.append(exc)

    # WHEN every shard's event is delivered three times at once, in one process
    threads = [threading.Thread(target=deliver, args=(b,)) for b in shards for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # AND the redeliveries asked for come
    for blob in shards:
        outcomes.append(handle_storage_event(runtime, event_data(blob)))
    # THEN each shard made exactly one job
    assert sim.stats.batch_jobs_created == 2
    assert len(set(sim.stats.batch_displayed_names)) == 2
    assert outcomes.count("batch_submitted") == 2
    jobs = _status(bucket, "jobs/twice")["jobs"]
    assert len({j["name"] for j in jobs.values()}) == 2


def test_a_job_the_batch_api_refuses_is_recorded_failed_and_rerun_online(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN a Batch API that refuses the model (404), and a manifest in batch mode
    sim.configure(api_key=API_KEY, known_models=["some-other-model"])
    images = upload_pictures(bucket, 3, height=30, colour="red")
    body = json.dumps({"images": images, "mode": "batch"}).encode()
    manifest = upload(bucket, "jobs/no.batch.json", body, None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    # WHEN its shard's event arrives THEN the refusal ends the event, recorded as failed, and
    # neither a redelivery nor a collect asks again
    assert deliver_all(runtime, bucket, SHARDS) == ["batch_ended"]
    shard = next(iter(bucket.list_blobs(prefix=SHARDS)))
    assert handle_storage_event(runtime, event_data(shard)) == "already_submitted"
    entry = _status(bucket, "jobs/no")["jobs"]["0"]
    assert entry["state"] == "failed" and "404" in entry["error"] and "name" not in entry
    assert _collect(runtime)["collected"] == 0
    # WHEN the model exists again and a rerun is asked for THEN the shard runs online
    sim.configure(api_key=API_KEY)
    assert post_batch(runtime, {"rerun_online": "jobs/no"}).status == 202
    assert deliver_all(runtime, bucket, SHARDS)[-1] == "merged"
    assert sim.stats.calls == 3
    assert _status(bucket, "jobs/no")["complete"] is True


def test_a_merge_that_fails_after_the_last_landing_is_done_by_the_next_collect(
    make_batch_runtime: Callable[..., Runtime],
    batch_relay: RunningRelay,
    bucket: storage.Bucket,
    sim: RunningSimulator,
) -> None:
    runtime = make_batch_runtime(store_timeout_s=1.0)
    sim.configure(api_key=API_KEY)
    images = upload_pictures(bucket, 4, height=30, colour="green")
    body = json.dumps({"images": images, "mode": "batch"}).encode()
    manifest = upload(bucket, "jobs/m.batch.json", body, None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    assert deliver_all(runtime, bucket, SHARDS) == ["batch_submitted"]
    wait_for(_jobs_ended(sim, 1), "the job to end")
    # GIVEN storage that holds every compose (the batch's merge) past the client's timeout
    batch_relay.set_faults(hold_composes=True)
    # WHEN a collect lands the only job THEN its shard is recorded but the merge fails
    assert _collect(runtime)["counts"] == {"retry": 1}
    status = _status(bucket, "jobs/m")
    assert "0" in status["finished_shards"] and not status["complete"]
    # WHEN storage is well again and the next collect comes THEN it merges
    batch_relay.set_faults()
    assert _collect(runtime)["counts"] == {"landed": 1}
    assert _status(bucket, "jobs/m")["complete"] is True
    assert [r["source"] for r in _records(bucket, f"{BATCHES}jobs/m.jsonl")] == images
    assert _collect(runtime)["collected"] == 0
    assert sim.stats.calls == 0


def test_batch_mode_over_sends_large_manifests_that_name_no_mode_to_the_batch_api(
    make_batch_runtime: Callable[..., Runtime], bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    runtime = make_batch_runtime(batch_mode_over=4)
    sim.configure(api_key=API_KEY)
    images = upload_pictures(bucket, 6, height=30, colour="blue")
    # GIVEN BATCH_MODE_OVER 4: a manifest of 3 and one of 6, neither naming a mode, and one
    # of 6 that asks for online
    small = upload(bucket, "a.batch.json", json.dumps({"images": images[:3]}).encode(), None)
    large = upload(bucket, "b.batch.json", json.dumps({"images": images}).encode(), None)
    online = json.dumps({"images": images, "mode": "online"}).encode()
    asked = upload(bucket, "c.batch.json", online, None)
    # THEN the small one is described online at once, the large one sharded in batch mode,
    # and the one that asked stays online
    assert handle_storage_event(runtime, event_data(small)) == "described_manifest"
    assert sim.stats.calls == 3
    assert handle_storage_event(runtime, event_data(large)) == "sharded"
    assert _status(bucket, "b")["mode"] == "batch"
    assert handle_storage_event(runtime, event_data(asked)) == "sharded"
    assert _status(bucket, "c")["mode"] == "online"


def test_batch_mode_needs_buckets_the_settings_name(
    make_batch_runtime: Callable[..., Runtime], bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN no RESULTS_BUCKET nor SHARDS_BUCKET: a collect could not find the jobs
    runtime = make_batch_runtime(results_bucket=None)
    images = upload_pictures(bucket, 2, height=30, colour="red")
    body = json.dumps({"images": images, "mode": "batch"}).encode()
    manifest = upload(bucket, "n.batch.json", body, None)
    # THEN the manifest is refused with a report saying what to set, and nothing runs
    assert handle_storage_event(runtime, event_data(manifest)) == "manifest_invalid"
    report = bucket.get_blob(f"{BATCHES}n.error.json")
    assert report is not None
    error = json.loads(report.download_as_bytes())["error"]
    assert error["code"] == "batch_mode_unavailable" and "RESULTS_BUCKET" in error["message"]
    backfill = post_batch(runtime, {"backfill": f"gs://{bucket.name}/in/", "mode": "batch"})
    assert backfill.status == 400 and backfill.body["error"]["code"] == "batch_mode_unavailable"
    assert sim.stats.calls == 0 and sim.stats.batch_jobs_created == 0
    # AND an HTTPS batch cannot ask for it: its answer is its reply
    refused = post_batch(runtime, {"images": images, "mode": "batch"})
    assert refused.status == 400 and refused.body["error"]["code"] == "invalid_request"


def test_vertex_answers_are_told_apart_by_their_object_name_whatever_the_batch_is_called() -> None:
    # A manifest's batch is its path: slashes and all
    name = "describer-shards/jobs/2026/night/123/00002.results/prediction-model-x/predictions.jsonl"
    assert parse_vertex_results_name("describer-shards/", name) == ("jobs/2026/night", "123", 2)
    assert (
        parse_vertex_results_name("describer-shards/", "describer-shards/b/1/00000.batch.json")
        is None
    )
    assert parse_vertex_results_name("describer-shards/", "other/b/1/00000.results/x.jsonl") is None


def test_a_collect_while_a_job_is_being_created_leaves_its_registration(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN a shard whose job is created, its creator still waiting for the answer
    sim.configure(api_key=API_KEY, batch_hold_create_answers=True)
    images = upload_pictures(bucket, 3, height=30, colour="green")
    body = json.dumps({"images": images, "mode": "batch"}).encode()
    manifest = upload(bucket, "jobs/w.batch.json", body, None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    shard = next(iter(bucket.list_blobs(prefix=SHARDS)))
    outcomes: list[str] = []
    creator = threading.Thread(
        target=lambda: outcomes.append(handle_storage_event(runtime, event_data(shard)))
    )
    creator.start()
    wait_for(lambda: sim.stats.batch_creates_held == 1, "the job's create held")
    # WHEN a collect comes in that moment THEN the job is pending, its registration kept
    assert _collect(runtime)["counts"] == {"pending": 1}
    sim.adjust(batch_hold_create_answers=False)
    creator.join()
    assert outcomes == ["batch_submitted"]
    # AND once the job ends, a collect lands it
    wait_for(_jobs_ended(sim, 1), "the job to end")
    assert _collect(runtime)["counts"] == {"landed": 1}
    assert _status(bucket, "jobs/w")["complete"] is True


def test_a_manifest_uploaded_again_starts_afresh_and_its_old_job_is_cancelled(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN a manifest in batch mode whose job is running
    sim.configure(api_key=API_KEY, batch_hold=True)
    images = upload_pictures(bucket, 3, height=30, colour="blue")
    first = {"images": images, "mode": "batch", "prompt": "Name the colour."}
    manifest = upload(bucket, "jobs/again.batch.json", json.dumps(first).encode(), None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    assert deliver_all(runtime, bucket, SHARDS) == ["batch_submitted"]
    # WHEN it is uploaded again with another prompt, and its shard's event arrives
    second = {**first, "prompt": "Name the shape."}
    manifest = upload(bucket, "jobs/again.batch.json", json.dumps(second).encode(), None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    assert deliver_all(runtime, bucket, SHARDS)[-1] == "batch_submitted"
    # THEN the new run made a job of its own, from its own requests
    assert sim.stats.batch_jobs_created == 2
    # AND the first collect cancels the old run's job and keeps the new one
    assert _collect(runtime)["counts"] == {"superseded": 1, "pending": 1}
    assert sim.stats.batch_cancelled == 1
    sim.release_batches()
    wait_for(
        lambda: (
            sorted(sim.stats.batch_states.values())
            == ["JOB_STATE_CANCELLED", "JOB_STATE_SUCCEEDED"]
        ),
        "the new job to end",
    )
    assert _collect(runtime)["counts"] == {"landed": 1}
    records = _records(bucket, f"{BATCHES}jobs/again.jsonl")
    assert [r["prompt"] for r in records] == ["Name the shape."] * 3
    assert all(r["status"] == "ok" for r in records)


def test_a_shard_whose_event_stopped_before_its_job_was_recorded_is_settled_by_a_collect(
    make_batch_runtime: Callable[..., Runtime], bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    runtime = make_batch_runtime(event_retry_window_s=60.0)
    sim.configure(api_key=API_KEY)
    images = upload_pictures(bucket, 2, height=30, colour="red")
    body = json.dumps({"images": images, "mode": "batch"}).encode()
    manifest = upload(bucket, "jobs/stopped.batch.json", body, None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    shard = next(iter(bucket.list_blobs(prefix=SHARDS)))
    # GIVEN what a delivery leaves when it dies after its claim and registration, before it
    # made a job, and no redelivery comes: a claim that lapsed longer ago than they go on
    name = f"{BATCHES}jobs/stopped.status.json"
    status = _status(bucket, "jobs/stopped")
    lapsed = (datetime.now(UTC) - timedelta(seconds=600)).isoformat()
    status["jobs"] = {
        "0": {
            "state": "submitting",
            "claim": "dead",
            "claim_until": lapsed,
            "shard": f"gs://{bucket.name}/{shard.name}",
            "generation": str(shard.generation),
        }
    }
    bucket.blob(name).upload_from_string(json.dumps(status), content_type="application/json")
    registration = bucket.blob(
        job_registry_name(runtime.settings, "jobs/stopped", status["run"], 0)
    )
    registration.metadata = {OUTPUT_MARKER_KEY: "true"}  # as the function marks what it writes
    registration.upload_from_string(
        json.dumps({"batch": "jobs/stopped", "run": status["run"], "index": 0}),
        content_type="application/json",
    )
    # WHEN a collect comes THEN, finding no job of the shard's name, it records the shard failed
    assert _collect(runtime)["counts"] == {"ended": 1}
    entry = _status(bucket, "jobs/stopped")["jobs"]["0"]
    assert entry["state"] == "failed" and "stopped" in entry["error"]
    # AND a rerun online completes the batch
    assert post_batch(runtime, {"rerun_online": "jobs/stopped"}).status == 202
    assert deliver_all(runtime, bucket, SHARDS)[-1] == "merged"
    assert _status(bucket, "jobs/stopped")["complete"] is True


def test_a_batch_mode_backfill_waiting_hours_on_its_jobs_still_holds_its_bucket(
    runtime: Runtime, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    sim.configure(api_key=API_KEY, batch_hold=True)
    for i in range(3):
        upload(bucket, f"cam/{i}.png", make_image(40 + i, 30, "green", "PNG"), "image/png")
    where = {"backfill": f"gs://{bucket.name}/cam/", "mode": "batch"}
    started = post_batch(runtime, where)
    assert started.status == 202, started.body
    assert deliver_all(runtime, bucket, SHARDS)[-1] == "batch_submitted"
    name = f"{BATCHES}{started.body['batch']}.status.json"

    def quiet_for(hours: float) -> None:
        status = _status(bucket, started.body["batch"])
        status["updated_at"] = (datetime.now(UTC) - timedelta(hours=hours)).isoformat()
        bucket.blob(name).upload_from_string(json.dumps(status), content_type="application/json")

    # GIVEN its jobs running for hours with nothing new in its status (longer than the
    # retry window after which an online backfill counts as abandoned)
    quiet_for(3)
    # THEN another backfill of the bucket is still refused: the first is waiting, not dead
    again = post_batch(runtime, where)
    assert again.status == 409 and again.body["error"]["code"] == "backfill_in_progress"
    # AND after two days, when no job of it could still run, another may start
    quiet_for(49)
    assert post_batch(runtime, where).status == 202
