"""A backfill larger than one invocation can list: the listing goes on step by step, each
step in an event of its own, while the shards planned so far run.

Real components only: functions-framework processes for describe_http and describe_gcs,
gcp-storage-emulator behind the project's relay (which pages listings as Cloud Storage
does, answers each page late on purpose, and delivers every finalize event), and the
Gemini simulator. LIST_PAGE_SIZE is small and FUNCTION_TIMEOUT_S short, so no single
invocation can list the prefix.
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

IMAGES = 110
OTHERS = 15  # objects under the prefix that are not images
PAGE = 5  # (IMAGES + OTHERS) / PAGE = 25 pages
FUNCTION_TIMEOUT_S = 8
PAGE_DELAY_S = 0.25  # each page answers this late: listing all of them takes > 6 s


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_backfill_listed_over_many_invocations_describes_every_image_once(
    gcs: storage.Client,
    fleet_buckets: tuple[storage.Bucket, storage.Bucket],
    relay: RunningRelay,
    sim: RunningSimulator,
    tmp_path: Path,
) -> None:
    photos, results = fleet_buckets
    names = [f"cam/{i:04d}.png" for i in range(IMAGES)]
    for i, name in enumerate(names):
        photos.blob(name).upload_from_string(
            make_image(30 + i, 24, "green", "PNG"), content_type="image/png"
        )
    for i in range(OTHERS):
        photos.blob(f"cam/{i:04d}.txt").upload_from_string(b"notes", content_type="text/plain")
    env = function_env(
        relay.url,
        sim.url,
        RESULTS_BUCKET=results.name,
        ALLOWED_BUCKETS=photos.name,
        SHARD_SIZE="10",
        LIST_PAGE_SIZE=str(PAGE),
        FUNCTION_TIMEOUT_S=str(FUNCTION_TIMEOUT_S),
        DEADLINE_MARGIN_S="2",
        MODEL_CONCURRENCY="4",
        GALLERY="false",
    )
    functions = Functions(env, tmp_path)
    start = functions.start
    where = {"backfill": f"gs://{photos.name}/cam/"}

    def status(batch: str) -> dict[str, Any]:
        blob = results.get_blob(f"describer-batches/{batch}.status.json")
        return json.loads(blob.download_as_bytes()) if blob else {}

    try:
        http = start("describe_http")
        relay.set_targets([start("describe_gcs", cloudevent=True) for _ in range(2)])
        sim.configure(api_key=API_KEY, latency_ms=20)
        relay.set_faults(list_page_delay_s=PAGE_DELAY_S)
        # GIVEN a prefix that takes longer to list than an invocation may run
        # WHEN it is backfilled without max_images THEN the answer says the listing goes on,
        # and asks how many images at most, since it cannot know how many there are
        refused = requests.post(http, json=where, timeout=60)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "max_images_required"
        assert "more remain" in refused.json()["error"]["message"]
        # AND a dry run says that it is partial
        dry = requests.post(http, json={**where, "dry_run": True}, timeout=60).json()
        assert dry["partial"] is True and dry["listing_complete"] is False
        assert 0 < dry["images"] < IMAGES
        # WHEN it is confirmed with max_images
        reply = requests.post(http, json={**where, "max_images": 1000}, timeout=60)
        assert reply.status_code == 202, reply.text
        body = reply.json()
        assert body["listing_complete"] is False and 0 < body["images"] < IMAGES
        batch = body["batch"]
        wait_for(lambda: bool(status(batch).get("complete")), "the merged backfill", timeout_s=400)
        relay.wait_idle(timeout=120)
    finally:
        functions.stop_all()
    stats = relay.stats()
    assert stats.dead_lettered == 0
    # THEN the listing took many pages over several invocations, one event per step
    final = status(batch)
    listing = final["listing"]
    assert listing["done"] and listing["pages"] >= 20, listing
    assert listing["listed"] == IMAGES + OTHERS
    steps = [n for n in stats.objects if n.endswith(".listing.json")]
    assert len(steps) == listing["step"] >= 3
    # AND every image was described exactly once, and nothing else was
    assert (final["total"], final["done"], final["ok"], final["errors"]) == (IMAGES,) * 3 + (0,)
    assert final["shards"] == len(final["shard_digests"]) and final["pending_shards"] == []
    assert sim.stats.calls == IMAGES
    assert sorted(set(sim.stats.answered_digests().values())) == [1]
    for name in names:
        sidecar = results.get_blob(f"descriptions/{name}.json")
        assert sidecar is not None, name
    assert results.get_blob("descriptions/cam/0000.txt.json") is None
    # AND the merged JSONL holds every image once, in listing order
    merged = results.get_blob(f"describer-batches/{batch}.jsonl")
    assert merged is not None
    lines = [json.loads(line) for line in merged.download_as_text().splitlines()]
    assert [r["source"] for r in lines] == [f"gs://{photos.name}/{n}" for n in names]
    # AND the listing's plans and steps were cleaned up with the shards
    assert not list(results.list_blobs(prefix=f"describer-batches/{batch}.listing/"))
    assert not list(photos.list_blobs(prefix="describer-shards/"))
    # WHEN the same backfill runs again THEN every page finds its sidecars: no model call
    try:
        relay.set_targets([start("describe_gcs", cloudevent=True)])
        again = requests.post(start("describe_http"), json={**where, "max_images": 1000})
        assert again.status_code == 202, again.text
        assert again.json()["images"] == 0
        wait_for(lambda: bool(status(batch).get("complete")), "the second run", timeout_s=300)
    finally:
        functions.stop_all()
    second = status(batch)
    assert second["total"] == 0 and second["listing"]["already_described"] == IMAGES
    assert sim.stats.calls == IMAGES
