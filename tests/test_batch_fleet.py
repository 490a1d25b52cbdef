"""Batch mode end to end: functions-framework processes, the relay, the emulator, the simulator.

Real components only: describe_http and describe_gcs served by functions-framework, the
storage emulator behind the project's relay (generation preconditions, and a finalize event
per object written into the photos bucket, delivered as Eventarc would), and the Gemini
simulator's Batch API through the real google-genai client: the Gemini API (Files API input,
landed by collects), and Vertex AI (gs:// JSONL in and out through the relay, landed by the
answers' own finalize event).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from localdev import procs
from localdev.gemini_sim import RunningSimulator
from localdev.relay import RunningRelay

from .conftest import API_KEY, Functions, function_env, make_image, wait_for

IMAGES = 12
SHARD_SIZE = 5  # 3 shards
# A claim on a job's creation holds for FUNCTION_TIMEOUT_S + DEADLINE_MARGIN_S.
FUNCTION_TIMEOUT_S = 8


def _upload(photos: storage.Bucket) -> list[str]:
    names = [f"cam/{i:03d}.png" for i in range(IMAGES)]
    for i, name in enumerate(names):
        photos.blob(name).upload_from_string(
            make_image(40 + i, 30, "blue", "PNG"), content_type="image/png"
        )
    return names


def _status(results: storage.Bucket, batch: str) -> dict[str, Any]:
    blob = results.get_blob(f"describer-batches/{batch}.status.json")
    return json.loads(blob.download_as_bytes()) if blob else {}


def _check_results(
    gcs: storage.Client,
    photos: storage.Bucket,
    results: storage.Bucket,
    names: list[str],
    batch: str,
) -> list[dict[str, Any]]:
    """The merged JSONL: every image once, in listing order, answered by a batch job; and
    every image's sidecar."""
    merged = results.get_blob(f"describer-batches/{batch}.jsonl")
    assert merged is not None
    records = [json.loads(line) for line in merged.download_as_text().splitlines()]
    assert [r["source"] for r in records] == [f"gs://{photos.name}/{n}" for n in names]
    assert all(r["status"] == "ok" and r.get("batch_job") for r in records), records
    for name in names:
        sidecar = results.get_blob(f"descriptions/{name}.json")
        assert sidecar is not None and json.loads(sidecar.download_as_bytes())["batch_job"]
    # Nothing of the jobs is left behind: their files, registrations and the shards.
    leftovers = [
        b.name
        for b in gcs.list_blobs(results.name, prefix="describer-batches/")
        if ".job/" in b.name or "/.jobs/" in b.name or b.name.startswith("describer-batches/.jobs/")
    ]
    assert not leftovers
    assert not list(photos.list_blobs(prefix="describer-shards/"))
    return records


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_creator_never_makes_a_second_job_and_collects_land_the_backfill(
    gcs: storage.Client,
    fleet_buckets: tuple[storage.Bucket, storage.Bucket],
    relay: RunningRelay,
    sim: RunningSimulator,
    tmp_path: Path,
) -> None:
    photos, results = fleet_buckets
    names = _upload(photos)
    env = function_env(
        relay.url,
        sim.url,
        RESULTS_BUCKET=results.name,
        ALLOWED_BUCKETS=photos.name,
        SHARD_SIZE=str(SHARD_SIZE),
        FUNCTION_TIMEOUT_S=str(FUNCTION_TIMEOUT_S),
        DEADLINE_MARGIN_S="2",
        GALLERY="true",
    )
    functions = Functions(env, tmp_path)
    try:
        http = functions.start("describe_http")
        victim = functions.start("describe_gcs", cloudevent=True)
        relay.set_targets([victim])
        # GIVEN a simulator that makes each job, then holds the answer to its creator
        sim.configure(api_key=API_KEY, batch_hold=True, batch_hold_create_answers=True)
        reply = requests.post(
            http, json={"backfill": f"gs://{photos.name}/cam/", "mode": "batch"}, timeout=60
        )
        assert reply.status_code == 202, reply.text
        batch = reply.json()["batch"]
        assert reply.json()["mode"] == "batch"
        # WHEN the only describe_gcs process is killed while a job exists that it has not
        # recorded (SIGKILL, without waiting for anything)
        wait_for(lambda: sim.stats.batch_creates_held >= 1, "a job created, its answer held", 60)
        procs.kill_hard(functions.started[1])
        relay.set_targets([functions.start("describe_gcs", cloudevent=True) for _ in range(2)])
        sim.adjust(batch_hold_create_answers=False)
        # THEN the redelivered events take over the dead claim, find that job by its name and
        # adopt it: one job per shard, whatever was killed
        wait_for(
            lambda: (
                len([j for j in _status(results, batch).get("jobs", {}).values() if j.get("name")])
                == 3
            ),
            "every shard's job recorded",
            120,
            poll_s=0.1,
        )
        assert sim.stats.batch_jobs_created == 3
        assert len(set(sim.stats.batch_displayed_names)) == 3
        assert sim.stats.calls == 0

        # WHEN a collect comes while the jobs run THEN they are pending
        collected = requests.post(http, json={"collect": True}, timeout=60).json()
        assert collected["counts"] == {"pending": 3}, collected
        # WHEN they end and two collects come at once: the first holds the landings it
        # claimed (the simulator holds their answers' downloads) while the second runs
        sim.adjust(batch_hold_downloads=True)
        sim.release_batches()
        wait_for(
            lambda: sorted(sim.stats.batch_states.values()) == ["JOB_STATE_SUCCEEDED"] * 3,
            "the jobs to end",
            60,
        )
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(lambda: requests.post(http, json={"collect": True}, timeout=120))
            # Two at once: the collect lands two jobs at a time
            wait_for(lambda: sim.stats.downloads_held >= 2, "the first collect's landings", 60)
            second = pool.submit(lambda: requests.post(http, json={"collect": True}, timeout=120))
            wait_for(lambda: sim.stats.downloads_held >= 3, "the second collect's landing", 60)
            sim.adjust(batch_hold_downloads=False)
            answers = [first.result().json(), second.result().json()]
        # THEN the second found the first's two landings busy and landed the third itself
        assert answers[1]["counts"].get("busy") == 2, answers
        # THEN each job is landed once between them, and the backfill is complete
        landed = [j for a in answers for j in a["jobs"] if j["outcome"] == "landed"]
        assert sorted(j["shard"] for j in landed) == [0, 1, 2], answers
        status = _status(results, batch)
        assert status["complete"] is True, status
        records = _check_results(gcs, photos, results, names, batch)
        assert sim.stats.calls == 0 and sim.stats.batch_requests == IMAGES
        assert status["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in records), abs=1e-5)
        assert results.get_blob(f"describer-batches/{batch}.html") is not None
    finally:
        functions.stop_all()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vertex_ai_answers_arrive_as_an_event_and_land_the_backfill_without_a_collect(
    gcs: storage.Client,
    fleet_buckets: tuple[storage.Bucket, storage.Bucket],
    relay: RunningRelay,
    sim: RunningSimulator,
    tmp_path: Path,
) -> None:
    photos, results = fleet_buckets
    names = _upload(photos)
    # Application Default Credentials: a service account key whose token endpoint is the
    # simulator's, so the real google-auth signs and exchanges its JWT, offline.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    adc = tmp_path / "adc.json"
    adc.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "sim-project",
                "private_key_id": "sim",
                "private_key": pem.decode(),
                "client_email": "describer@sim-project.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"{sim.url}/token",
            }
        )
    )
    env = function_env(
        relay.url,
        sim.url,
        RESULTS_BUCKET=results.name,
        ALLOWED_BUCKETS=photos.name,
        SHARD_SIZE=str(SHARD_SIZE),
        GALLERY="false",
        GOOGLE_GENAI_USE_VERTEXAI="true",
        GOOGLE_CLOUD_PROJECT="sim-project",
        GOOGLE_CLOUD_LOCATION="us-central1",
        GOOGLE_VERTEX_BASE_URL=sim.url,
        GOOGLE_APPLICATION_CREDENTIALS=str(adc),
    )
    functions = Functions(env, tmp_path)
    try:
        http = functions.start("describe_http")
        relay.set_targets([functions.start("describe_gcs", cloudevent=True) for _ in range(2)])
        # GIVEN Vertex AI jobs that read and write Cloud Storage through the relay
        sim.configure(storage_url=relay.url, batch_hold=True)
        reply = requests.post(
            http, json={"backfill": f"gs://{photos.name}/cam/", "mode": "batch"}, timeout=60
        )
        assert reply.status_code == 202, reply.text
        batch, run = reply.json()["batch"], reply.json()["run"]
        wait_for(lambda: sim.stats.batch_jobs_created == 3, "every shard's job", 60)
        # AND answers forged by someone who may write to the bucket, beside where the real
        # ones will be: their own event arrives while the jobs still run
        forged = {"key": "000000", "status": "", "response": {"candidates": [
            {"content": {"role": "model", "parts": [{"text": "FORGED"}]}, "finishReason": "STOP"}
        ]}}  # fmt: skip
        through_relay = storage.Client(
            project="test",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": relay.url},
        )
        through_relay.bucket(photos.name).blob(
            f"describer-shards/{batch}/{run}/00000.results/prediction-model-x/predictions.jsonl"
        ).upload_from_string(json.dumps(forged) + "\n", content_type="application/x-ndjson")
        sim.release_batches()
        # WHEN the jobs end and write their answers beside the shards
        # THEN those objects' events land the jobs: the backfill completes with no collect
        wait_for(
            lambda: _status(results, batch).get("complete") is True,
            "the backfill to complete",
            180,
            poll_s=0.2,
        )
        assert sim.stats.batch_jobs_created == 3 and sim.stats.calls == 0
        assert all(name.startswith("projects/sim-project/") for name in sim.stats.batch_states)
        assert sim.stats.tokens_issued >= 1
        records = _check_results(gcs, photos, results, names, batch)
        assert all("/batchPredictionJobs/" in r["batch_job"] for r in records)
        # AND only what each job wrote, in the directory the API names, was read as answers
        assert not any("FORGED" in r["description"] for r in records)
        # AND a collect afterwards finds nothing left to land
        collected = requests.post(http, json={"collect": True}, timeout=60).json()
        assert collected["collected"] == 0, collected
    finally:
        functions.stop_all()
