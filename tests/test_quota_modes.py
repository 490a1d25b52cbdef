"""The process-wide adaptive limit on Gemini calls, against each kind of quota.

The real function (in-process with real threads, or served by functions-framework)
against the Gemini simulator's quota modes: calls in flight, calls per window (a
per-minute quota scaled down), a quota cut during the run, and a per-day quota.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from google.cloud import storage

from describer import Runtime
from describer.events import handle_storage_event
from localdev import procs
from localdev.gemini_sim import RunningSimulator

from .conftest import (
    API_KEY,
    deliver_all,
    event_data,
    function_env,
    post_batch,
    upload,
    upload_pictures,
    wait_for,
)


def _share_429(sim: RunningSimulator) -> float:
    return sim.stats.by_status.get("429", 0) / max(1, sim.stats.calls)


def test_invocations_in_threads_share_one_limit_of_model_concurrency(
    make_runtime: Callable[..., Runtime], bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    """Four invocations at once in one process, each in its own thread and event loop, as
    functions-framework runs them: together they never have more than MODEL_CONCURRENCY
    calls in flight (each alone would have had MODEL_CONCURRENCY)."""
    sim.configure(api_key=API_KEY, latency_ms=80)
    runtime = make_runtime(
        results_bucket=bucket.name, allowed_buckets=frozenset({bucket.name}), model_concurrency=6
    )
    batches = [
        upload_pictures(bucket, 15, folder=f"b{n}", height=20 + n, colour="green") for n in range(4)
    ]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda images: post_batch(runtime, {"images": images}), batches))
    assert all(r.status == 200 for r in replies)
    assert all(rec["status"] == "ok" for r in replies for rec in r.body["results"])
    assert sim.stats.calls == 60
    assert sim.stats.max_in_flight <= 6
    # AND the shared limit grew to the ceiling while every invocation kept it full
    assert runtime.calls.state.limit == 6


def _serve(
    emulator_url: str, sim: RunningSimulator, bucket: storage.Bucket, tmp_path: Path, **env: str
) -> Any:
    """describe_http served by functions-framework, reading and writing ``bucket``."""
    settings = function_env(
        emulator_url, sim.url, RESULTS_BUCKET=bucket.name, ALLOWED_BUCKETS=bucket.name, **env
    )
    port = procs.free_port()
    log = tmp_path / "describe_http.log"
    return procs.start_function("describe_http", port, settings, log_path=log), (
        f"http://127.0.0.1:{port}/"
    )


def _batch(url: str, images: list[str]) -> dict[str, Any]:
    reply = requests.post(url, json={"images": images}, timeout=300)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_quota_of_8_calls_in_flight_is_found_and_held(
    emulator_url: str, bucket: storage.Bucket, sim: RunningSimulator, tmp_path: Path
) -> None:
    """MODEL_CONCURRENCY 64 against a quota of 8 in flight: with a fixed limit most calls
    came back 429 and images ran out of attempts; the limit finds the quota instead."""
    images = upload_pictures(bucket, 200, folder="q8", height=24, colour="red")
    sim.configure(api_key=API_KEY, latency_ms=60, max_in_flight=8, retry_delay_s=0.1)
    proc, url = _serve(emulator_url, sim, bucket, tmp_path, MODEL_CONCURRENCY="64")
    try:
        body = _batch(url, images)
    finally:
        procs.stop(proc)
    # THEN every image is described, few calls met 429, and the limit settled at the quota
    assert body["counts"]["ok"] == 200, body["counts"]
    assert _share_429(sim) <= 0.05, sim.stats.by_status
    assert body["model_calls"]["throttled"] == sim.stats.by_status.get("429", 0)
    assert 6 <= body["model_calls"]["limit"] <= 9
    # AND a log line said when the limit moved a lot, not one per call
    moves = (tmp_path / "describe_http.log").read_text().count("model call limit moved")
    assert 1 <= moves <= 10


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_four_batches_at_once_share_a_per_window_quota(
    emulator_url: str, bucket: storage.Bucket, sim: RunningSimulator, tmp_path: Path
) -> None:
    """A per-minute quota scaled down (30 calls a second) shared by four batches at once in
    one functions-framework process: 429s tell the one limit, RetryInfo pauses them all."""
    batches = [
        upload_pictures(bucket, 30, folder=f"w{n}", height=30 + n, colour="blue") for n in range(4)
    ]
    sim.configure(api_key=API_KEY, latency_ms=50, window_quota=30, window_s=1.0)
    proc, url = _serve(emulator_url, sim, bucket, tmp_path, MODEL_CONCURRENCY="32")
    try:
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda images: _batch(url, images), batches))
    finally:
        procs.stop(proc)
    assert [b["counts"]["ok"] for b in bodies] == [30] * 4
    assert _share_429(sim) <= 0.15, sim.stats.by_status
    assert sum(b["model_calls"]["throttled"] for b in bodies) == sim.stats.by_status.get("429", 0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_quota_cut_by_three_quarters_during_a_run_is_followed(
    emulator_url: str, bucket: storage.Bucket, sim: RunningSimulator, tmp_path: Path
) -> None:
    images = upload_pictures(bucket, 240, folder="cut", height=28, colour="green")
    sim.configure(api_key=API_KEY, latency_ms=60, max_in_flight=16, retry_delay_s=0.1)
    proc, url = _serve(emulator_url, sim, bucket, tmp_path, MODEL_CONCURRENCY="32")
    try:
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(_batch(url, images)))
        thread.start()
        # WHEN a third of the images are answered, the quota drops from 16 to 4
        wait_for(lambda: sim.stats.ok >= 80, "a third of the answers", 120)
        sim.adjust(max_in_flight=4)
        thread.join(240)
    finally:
        procs.stop(proc)
    # THEN every image is still described, and the limit came down to the new quota
    assert result["counts"]["ok"] == 240, result["counts"]
    assert result["model_calls"]["limit"] <= 5
    assert _share_429(sim) <= 0.1, sim.stats.by_status


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_per_day_quota_ends_each_record_and_leaves_the_limit_alone(
    emulator_url: str, bucket: storage.Bucket, sim: RunningSimulator, tmp_path: Path
) -> None:
    images = upload_pictures(bucket, 6, folder="day", height=22, colour="red")
    sim.configure(api_key=API_KEY, daily_quota_exhausted=True)
    proc, url = _serve(emulator_url, sim, bucket, tmp_path)
    try:
        body = _batch(url, images)
    finally:
        procs.stop(proc)
    assert [r["error"]["code"] for r in body["results"]] == ["quota_exhausted"] * 6
    assert [r["attempts"] for r in body["results"]] == [1] * 6
    assert body["model_calls"]["throttled"] == 0
    assert body["model_calls"]["limit"] == 4  # where it started: a per-day quota says nothing


def test_a_sharded_batch_counts_the_429s_it_rode_out_in_its_status(
    make_runtime: Callable[..., Runtime], bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    """First calls meet 429: the shards ride them out, and the status object says how many."""
    sim.configure(api_key=API_KEY, fail_first=1, retry_delay_s=0.01)
    runtime = make_runtime(results_bucket=None, shard_size=4, allowed_buckets=frozenset())
    images = upload_pictures(bucket, 10, folder="thr", height=26, colour="blue")
    manifest = upload(bucket, "thr.batch.json", json.dumps({"images": images}).encode(), None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    assert deliver_all(runtime, bucket, runtime.settings.shards_prefix)[-1] == "merged"
    blob = bucket.get_blob("describer-batches/thr.status.json")
    assert blob is not None
    status = json.loads(blob.download_as_bytes())
    # (the simulator fails each image fingerprint's first call; alike images share one)
    assert status["ok"] == 10
    assert status["throttled"] == sim.stats.by_status["429"] > 0
    assert status["throttled"] == sum(s["throttled"] for s in status["finished_shards"].values())
