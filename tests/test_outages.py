"""A sharded backfill through a storage outage and lost replies: nothing reported done is missing.

Real components only: functions-framework processes for describe_http and
describe_gcs, gcp-storage-emulator behind the project's relay (which enforces
preconditions, delivers each shard's finalize event and redelivers failed ones),
and the Gemini simulator. The relay refuses every write for longer than the
storage client's retry budget in the middle of the backfill, then does writes
whose replies it drops, so that a retried create-only write meets 412.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
from google.cloud import storage

from localdev.gemini_sim import RunningSimulator
from localdev.relay import RunningRelay

from .conftest import API_KEY, Functions, function_env, make_image, wait_for

IMAGES = 120
SHARD_SIZE = 20
# The functions' writes time out after max(2, DEADLINE_MARGIN_S / 2) s and the storage
# client retries them for twice that: 4 s. The outage outlasts it.
DEADLINE_MARGIN_S = 4
OUTAGE_S = 7.0
LOST_REPLIES = 6


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_backfill_through_an_outage_and_lost_replies_ends_complete_and_exact(
    gcs: storage.Client,
    fleet_buckets: tuple[storage.Bucket, storage.Bucket],
    relay: RunningRelay,
    sim: RunningSimulator,
    tmp_path: Path,
) -> None:
    photos, results = fleet_buckets
    for i in range(IMAGES):
        photos.blob(f"cam/{i:04d}.png").upload_from_string(
            make_image(30 + i, 24, "blue", "PNG"), content_type="image/png"
        )
    env = function_env(
        relay.url,
        sim.url,
        RESULTS_BUCKET=results.name,
        ALLOWED_BUCKETS=photos.name,
        SHARD_SIZE=str(SHARD_SIZE),
        MODEL_CONCURRENCY="4",
        DEADLINE_MARGIN_S=str(DEADLINE_MARGIN_S),
        GALLERY="false",
    )
    functions = Functions(env, tmp_path)
    start = functions.start

    def sidecars() -> int:
        return sum(1 for _ in gcs.list_blobs(results.name, prefix="descriptions/cam/"))

    try:
        http = start("describe_http")
        relay.set_targets([start("describe_gcs", cloudevent=True) for _ in range(2)])
        sim.configure(api_key=API_KEY, latency_ms=40)
        # GIVEN a sharded backfill under way
        where = {"backfill": f"gs://{photos.name}/cam/"}
        reply = requests.post(http, json=where, timeout=120)
        assert reply.status_code == 202, reply.text
        batch = reply.json()["batch"]
        wait_for(lambda: sidecars() >= SHARD_SIZE, "the first shard's sidecars", timeout_s=120)
        # WHEN storage refuses every write for longer than the client retries, and then
        # does writes whose replies are lost
        relay.set_faults(refuse_writes_s=OUTAGE_S, lose_write_replies=LOST_REPLIES)
        status_name = f"describer-batches/{batch}.status.json"

        def status() -> dict[str, Any]:
            blob = results.get_blob(status_name)
            return json.loads(blob.download_as_bytes()) if blob else {}

        wait_for(lambda: bool(status().get("results_uri")), "the merged JSONL", timeout_s=400)
        relay.wait_idle(timeout=120)
    finally:
        functions.stop_all()
    stats = relay.stats()
    # THEN the faults happened
    assert stats.refused_writes > 0
    assert stats.lost_replies == LOST_REPLIES
    assert stats.precondition_failed > 0  # the retried create-only writes met 412
    assert stats.dead_lettered == 0
    # AND the status says done with no errors, and that is true of every sidecar and line
    final = status()
    assert (final["total"], final["done"], final["ok"], final["errors"]) == (IMAGES,) * 3 + (0,)
    assert final["complete"] and final["pending_shards"] == []
    merged = results.get_blob(f"describer-batches/{batch}.jsonl")
    assert merged is not None
    lines = [json.loads(line) for line in merged.download_as_text().splitlines()]
    names = [f"cam/{i:04d}.png" for i in range(IMAGES)]
    assert [r["source"] for r in lines] == [f"gs://{photos.name}/{n}" for n in names]
    assert all(r["status"] == "ok" for r in lines)
    for name in names:
        sidecar = results.get_blob(f"descriptions/{name}.json")
        assert sidecar is not None, name
        assert json.loads(sidecar.download_as_bytes())["status"] == "ok"
    # AND every image was answered; those whose results the outage refused were asked again
    calls = sim.stats.calls
    assert calls >= IMAGES
    # AND a second run of the same backfill makes no model call
    try:
        rerun = requests.post(start("describe_http"), json=where, timeout=120)
    finally:
        functions.stop_all()
    assert rerun.status_code == 200, rerun.text
    assert rerun.json()["images"] == 0
    assert sim.stats.calls == calls
