"""Invocations run in the test process, with real clients handed in (nothing patched).

These cover what needs settings other than the served functions': concurrency
bounds, retries and model failures, downscaling, private-address refusal, and
resources that must not leak across hundreds of invocations.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from google.cloud import storage

from describer import Runtime
from describer.errors import StorageUnavailable
from describer.pipeline import HandOff
from describer.records import Record
from describer.runtime import open_pipeline
from describer.settings import GeminiAccess
from localdev import procs
from localdev.gemini_sim import RunningSimulator
from localdev.memory_store import MemoryStore

from .conftest import API_KEY, RESULTS_BUCKET, post_batch, wait_for


def _records(reply: object) -> list[dict[str, object]]:
    body = reply.body  # type: ignore[attr-defined]
    assert reply.status == 200, body  # type: ignore[attr-defined]
    return body["results"]  # type: ignore[no-any-return]


def test_model_calls_in_flight_never_exceed_model_concurrency(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN a slow model and MODEL_CONCURRENCY=3
    sim.configure(api_key="test-key", latency_ms=60)
    runtime = make_runtime(model_concurrency=3, download_concurrency=5)
    images = [f"{image_server}/chelsea.png", f"{image_server}/coffee.png"] * 10
    # WHEN a batch of 20 is described
    records = _records(post_batch(runtime, {"images": images}))
    # THEN all are described, concurrently but never more than 3 at once
    assert all(r["status"] == "ok" for r in records)
    assert sim.stats.max_in_flight == 3
    assert sim.stats.calls == 20


def test_writers_falling_behind_hold_back_the_model_stage(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """While the sink (checkpoints, sidecars) is stuck, calls in flight plus answers not yet
    kept stay within MODEL_CONCURRENCY: a model worker takes room for its answer before it
    calls, so that is all a crash could lose."""
    runtime = make_runtime(model_concurrency=4, download_concurrency=4)
    uris = [f"{image_server}/chelsea.png", f"{image_server}/coffee.png"] * 30
    release = asyncio.Event()
    written: list[int] = []

    async def stuck_sink(index: int, record: Record) -> None:
        await release.wait()
        written.append(index)

    async def scenario() -> HandOff:
        async with open_pipeline(runtime, prompt="Describe.", allowed_buckets=()) as pipeline:
            run = asyncio.create_task(pipeline.run(uris, on_record=stuck_sink))
            # GIVEN writers that do not get through: wait until the four answers there is
            # room for are with them, and the model workers wait for room
            await _until(
                lambda: (
                    pipeline.handoff is not None
                    and pipeline.handoff.unwritten == 4
                    and pipeline.handoff.room_waits >= 1
                )
            )
            handoff = pipeline.handoff
            assert handoff is not None
            # THEN the model stage has asked for no more than that
            assert sim.stats.calls == handoff.room == 4
            assert sim.stats.in_flight == 0
            # WHEN the writers get through THEN every record is written, once
            release.set()
            records = await run
        assert [r.status for r in records] == ["ok"] * len(uris)
        assert sorted(written) == list(range(len(uris)))
        return handoff

    handoff = asyncio.run(scenario())
    assert handoff.answers_peak == 4 and handoff.answers == 0
    assert handoff.unwritten_peak == 4 and handoff.unwritten == 0


def test_the_room_for_answers_is_the_processs_whatever_the_invocations(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """Two invocations at once, each in its own thread and event loop, with stuck writers: calls
    in flight plus answers not yet kept stay within MODEL_CONCURRENCY for the process, not per
    invocation, so a crash of the process costs at most that many calls."""
    runtime = make_runtime(model_concurrency=4, download_concurrency=4)
    uris = [f"{image_server}/chelsea.png", f"{image_server}/coffee.png"] * 10
    release = threading.Event()
    pipelines: list[Any] = []
    results: list[list[Record]] = []

    async def stuck_sink(index: int, record: Record) -> None:
        await asyncio.to_thread(release.wait, 60)

    async def invocation() -> None:
        async with open_pipeline(runtime, prompt="Describe.", allowed_buckets=()) as pipeline:
            pipelines.append(pipeline)
            results.append(await pipeline.run(uris, on_record=stuck_sink))

    threads = [threading.Thread(target=asyncio.run, args=(invocation(),)) for _ in range(2)]
    for thread in threads:
        thread.start()

    def both_held_back() -> bool:
        handoffs = [p.handoff for p in pipelines if p.handoff is not None]
        return (
            len(handoffs) == 2
            and sum(h.unwritten for h in handoffs) == 4
            and all(h.room_waits >= 1 for h in handoffs)
        )

    try:
        # GIVEN both invocations' writers stuck, and model workers of both waiting for room
        wait_for(both_held_back, "both invocations held back")
        # THEN the process asked the model for four answers in all, not four each
        assert sim.stats.calls == 4 and sim.stats.in_flight == 0
    finally:
        release.set()
        for thread in threads:
            thread.join(120)
    assert [r.status for rs in results for r in rs] == ["ok"] * (2 * len(uris))
    assert runtime.answer_room.state.in_flight == 0


async def _until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    """Yield to the loop until ``condition`` holds (what the pipeline's tasks make true)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def test_rate_limits_are_retried_and_counted(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN a model that answers 429 with a RetryInfo twice for every image
    sim.configure(api_key="test-key", fail_first=2, retry_delay_s=0.01)
    runtime = make_runtime()
    # WHEN two images are described
    records = _records(
        post_batch(
            runtime, {"images": [f"{image_server}/chelsea.png", f"{image_server}/rocket.jpg"]}
        )
    )
    # THEN both end ok on their third attempt
    assert [(r["status"], r["attempts"]) for r in records] == [("ok", 3), ("ok", 3)]
    assert sim.stats.by_status == {"429": 4, "200": 2}


def test_attempts_are_bounded_by_model_max_attempts(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN a model that always fails with 500 and MODEL_MAX_ATTEMPTS=3
    sim.configure(api_key="test-key", rate_500=1.0)
    runtime = make_runtime(model_max_attempts=3)
    # WHEN an image is described THEN it fails after exactly 3 calls
    (record,) = _records(post_batch(runtime, {"images": [f"{image_server}/chelsea.png"]}))
    assert record["error"]["code"] == "model_error"  # type: ignore[index]
    assert record["attempts"] == 3
    assert sim.stats.calls == 3


def test_daily_quota_is_not_retried(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN a model whose per-day quota is exhausted
    sim.configure(api_key="test-key", daily_quota_exhausted=True)
    # WHEN an image is described THEN it is quota_exhausted after one call
    (record,) = _records(post_batch(make_runtime(), {"images": [f"{image_server}/coffee.png"]}))
    assert record["error"]["code"] == "quota_exhausted"  # type: ignore[index]
    assert record["attempts"] == 1
    assert sim.stats.calls == 1


def test_unknown_model_is_a_model_error_naming_it(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN a GEMINI_MODEL the API does not know
    sim.configure(api_key="test-key", known_models=["gemini-3.5-flash-lite"])
    runtime = make_runtime(model="gemini-0-imaginary")
    # WHEN an image is described THEN the error names the model and is not retried
    (record,) = _records(post_batch(runtime, {"images": [f"{image_server}/coffee.png"]}))
    assert record["error"]["code"] == "model_error"  # type: ignore[index]
    assert "gemini-0-imaginary" in record["error"]["message"]  # type: ignore[index]
    assert sim.stats.calls == 1


def test_a_blocked_image_is_reported_with_its_reason(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN a model that blocks blue images
    sim.configure(api_key="test-key", block_colours=["blue"])
    images = [f"{image_server}/big.jpg", f"{image_server}/chelsea.png"]
    # WHEN the blue image and another are described
    records = _records(post_batch(make_runtime(), {"images": images}))
    # THEN the blue one is blocked with the reason, the other is described
    assert records[0]["error"]["code"] == "blocked"  # type: ignore[index]
    assert "SAFETY" in records[0]["error"]["message"]  # type: ignore[index]
    assert records[1]["status"] == "ok"


def test_a_wrong_api_key_is_a_model_error(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN the simulator expects another key than the one configured
    sim.configure(api_key="the-right-key")
    (record,) = _records(post_batch(make_runtime(), {"images": [f"{image_server}/coffee.png"]}))
    # THEN the record says so and nothing is retried
    assert record["error"]["code"] == "model_error"  # type: ignore[index]
    assert "API key not valid" in record["error"]["message"]  # type: ignore[index]
    assert sim.stats.calls == 1


def test_large_images_are_downscaled_before_sending(
    make_runtime: Callable[..., Runtime],
    image_server: str,
    image_dir: Path,
    sim: RunningSimulator,
) -> None:
    # GIVEN a 3000x2000 JPEG and IMAGE_MAX_SIDE=1000
    runtime = make_runtime(image_max_side=1000)
    # WHEN it is described
    (record,) = _records(post_batch(runtime, {"images": [f"{image_server}/big.jpg"]}))
    # THEN the record gives the source's size, and the model saw at most 1000 px, as JPEG
    assert (record["width"], record["height"]) == (3000, 2000)
    (seen,) = sim.stats.images
    assert (seen["width"], seen["height"]) == (1000, 667)
    assert seen["mime_type"] == "image/jpeg"
    assert seen["bytes"] < (image_dir / "big.jpg").stat().st_size


def test_small_supported_images_are_sent_unchanged(
    make_runtime: Callable[..., Runtime],
    image_server: str,
    image_dir: Path,
    sim: RunningSimulator,
) -> None:
    # GIVEN a small PNG WHEN it is described THEN the model got exactly its bytes
    _records(post_batch(make_runtime(), {"images": [f"{image_server}/chelsea.png"]}))
    (seen,) = sim.stats.images
    assert seen["bytes"] == (image_dir / "chelsea.png").stat().st_size
    assert seen["mime_type"] == "image/png"


def test_a_gif_is_converted_to_a_type_gemini_accepts(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN a GIF, which Gemini does not accept WHEN it is described
    (record,) = _records(post_batch(make_runtime(), {"images": [f"{image_server}/anim.gif"]}))
    # THEN the record names the source type, and the model received a supported one
    assert record["status"] == "ok"
    assert record["mime_type"] == "image/gif"
    assert sim.stats.images[0]["mime_type"] in ("image/png", "image/jpeg")


def test_sources_over_max_image_bytes_are_too_large(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN MAX_IMAGE_BYTES below the size of a sample
    runtime = make_runtime(max_image_bytes=100_000)
    images = [f"{image_server}/astronaut.png", f"{image_server}/grace_hopper.jpg"]
    # WHEN both are described THEN only the larger is refused
    records = _records(post_batch(runtime, {"images": images}))
    assert records[0]["error"]["code"] == "too_large"  # type: ignore[index]
    assert records[1]["status"] == "ok"


def test_private_addresses_are_refused_unless_allowed(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN the default ALLOW_PRIVATE_URLS=false
    runtime = make_runtime(allow_private_urls=False)
    port = image_server.rsplit(":", 1)[1]
    images = [
        f"{image_server}/chelsea.png",
        f"http://localhost:{port}/chelsea.png",
        f"http://[::1]:{port}/chelsea.png",
        "http://169.254.169.254/computeMetadata/v1/",
        "http://metadata.google.internal/computeMetadata/v1/",
        f"http://2130706433:{port}/chelsea.png",
        f"http://0x7f.1:{port}/chelsea.png",
    ]
    # WHEN loopback, link-local and metadata sources are given
    records = _records(post_batch(runtime, {"images": images}))
    # THEN each is forbidden_source and nothing reaches the model
    assert [r["error"]["code"] for r in records] == ["forbidden_source"] * 7  # type: ignore[index]
    assert sim.stats.calls == 0


def test_request_without_output_needs_results_bucket(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN no RESULTS_BUCKET WHEN a request names no output THEN it is a 400 saying so
    reply = post_batch(make_runtime(results_bucket=None), {"images": [f"{image_server}/a.png"]})
    assert reply.status == 400
    assert reply.body["error"]["code"] == "output_required"


def test_unwritable_results_return_the_descriptions_with_a_503(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """A passing storage failure on the JSONL write is a 503 that still carries the records."""
    # GIVEN a results store whose writes fail for a passing cause (an outage)
    store = MemoryStore()

    async def outage(bucket: str, name: str) -> None:
        raise StorageUnavailable(f"gs://{bucket}/{name}", ConnectionError("503 from storage"))

    store.before_write = outage
    # WHEN a batch is described
    reply = post_batch(make_runtime(store=store), {"images": [f"{image_server}/coffee.png"]})
    # THEN the reply is a 503 that still carries the finished description
    assert reply.status == 503
    assert reply.body["error"]["code"] == "results_write_failed"
    assert reply.body["results"][0]["status"] == "ok"
    assert reply.body["results_uri"] is None


def _open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[str]:
    """A simulator in its own process, so its bookkeeping is not counted as ours."""
    port = procs.free_port()
    proc = procs.start_simulator(port, tmp_path / "sim.log")
    yield f"http://127.0.0.1:{port}"
    procs.stop(proc)


@pytest.mark.slow
def test_hundreds_of_invocations_leak_no_sockets_and_no_memory(
    make_runtime: Callable[..., Runtime], image_server: str, gcs: storage.Client, sim_process: str
) -> None:
    """300 invocations in one process leave file descriptors and Python memory flat."""
    # GIVEN one process-wide runtime, warmed up by a few invocations
    runtime = make_runtime(gemini=GeminiAccess(api_key=API_KEY, base_url=sim_process))
    body = {"images": [f"{image_server}/chelsea.png"]}
    for _ in range(5):
        _records(post_batch(runtime, body))
    # Sockets must be closed by the invocation itself, not whenever the
    # garbage collector happens to break a reference cycle.
    gc.disable()
    tracemalloc.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            before = _open_fds()
            # WHEN 300 more invocations run, each with its own event loop
            memory = []
            for _ in range(3):
                for _ in range(100):
                    _records(post_batch(runtime, body))
                gc.collect()
                memory.append(tracemalloc.get_traced_memory()[0])
            # THEN open file descriptors stay flat (a leaked session per call would add 300)
            after = _open_fds()
    finally:
        tracemalloc.stop()
        gc.enable()
    # AND every aiohttp session was closed by its invocation, not left to the collector
    unclosed = [w for w in caught if "Unclosed" in str(w.message)]
    assert not unclosed, unclosed[:3]
    assert after - before <= 5, (before, after)
    # AND Python memory levels off: interpreter caches fill during the first hundreds of
    # calls (measured here: +57, +21, +10 KB per hundred), while a leaked record, response
    # or session per call would add well over 300 bytes a call in every hundred
    assert memory[2] - memory[1] < 100 * 300, memory
    assert memory[2] - memory[1] < memory[1] - memory[0] + 100 * 100, memory
    stats = requests.get(f"{sim_process}/_sim/stats", timeout=10).json()
    assert stats["calls"] == 305
    assert len(list(gcs.bucket(RESULTS_BUCKET).list_blobs(prefix="describer-batches/"))) >= 305
