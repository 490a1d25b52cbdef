"""What a newcomer meets first: the demo, start-up refusals, stray requests, missing buckets,
and answers that did not come from Gemini."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import requests
from google.cloud import storage

from describer import Runtime
from localdev import procs
from localdev.gemini_sim import RunningSimulator

from .conftest import API_KEY, INPUT_BUCKET, RESULTS_BUCKET, post_batch

# The variables that make the demo use a real Gemini: a test picks its own.
_GEMINI_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI")


def _run_demo(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in _GEMINI_VARIABLES}
    clean.pop("GOOGLE_GEMINI_BASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "localdev.demo"],
        cwd=procs.ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
def test_the_demo_with_a_key_gemini_refuses_stops_cleanly(sim: RunningSimulator) -> None:
    """A key Gemini refuses ends the demo after its first step with the reason, no traceback."""
    # GIVEN a Gemini endpoint that accepts only another key
    # WHEN the demo runs with the wrong one
    result = _run_demo(GEMINI_API_KEY="any-key", GOOGLE_GEMINI_BASE_URL=sim.url)
    # THEN it says what happened and what to do, and fails without a traceback
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Nothing was described, so the demo stops here" in result.stdout
    assert "model_error: Gemini answered 400" in result.stdout
    assert "run `make demo` with no key" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert "2. Upload event" not in result.stdout


@pytest.mark.slow
def test_the_demo_runs_every_step_on_the_simulator() -> None:
    """`make demo` with no key: the simulator says so, and all four steps describe the samples."""
    result = _run_demo()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Gemini: the local SIMULATOR" in result.stdout
    for step in ("1. POST describe_http", "2. Upload event", "3. Manifest event", "4. Command"):
        assert step in result.stdout
    for sample in ("astronaut.png", "chelsea.png", "coffee.png", "grace_hopper.jpg", "rocket.jpg"):
        assert result.stdout.count(sample) >= 3, sample
    assert "ERROR" not in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_stray_requests_to_the_event_function_get_json_that_echoes_nothing(
    gcs_function: str,
) -> None:
    """A GET, or a POST that is no CloudEvent, gets a JSON error instead of the framework's
    HTML page, which echoed the request's headers."""
    got = requests.get(gcs_function, timeout=30)
    assert got.status_code == 405
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["Allow"] == "POST"
    assert got.json()["error"]["code"] == "method_not_allowed"

    stray = requests.post(
        gcs_function,
        json={"hello": "world"},
        headers={"X-Private": "canary-3f9a"},
        timeout=30,
    )
    assert stray.status_code == 400
    assert stray.headers["Content-Type"] == "application/json"
    error = stray.json()["error"]
    assert error["code"] == "invalid_event"
    assert "google.cloud.storage.object.v1.finalized" in error["message"]
    assert "canary-3f9a" not in stray.text


def test_what_the_framework_itself_serves_is_json_too(http_function: str) -> None:
    """The framework's own 404s (robots.txt, favicon.ico) answer JSON, not an HTML page."""
    for path in ("robots.txt", "favicon.ico"):
        got = requests.get(http_function + path, timeout=30)
        assert got.status_code == 404
        assert got.headers["Content-Type"] == "application/json"
        assert got.json()["error"]["code"] == "not_found"


def test_a_missing_bucket_is_told_from_a_missing_object(
    make_runtime: Callable[..., Runtime], gcs: storage.Client
) -> None:
    """An allowed bucket that does not exist is named as such, not as "No such object."."""
    runtime = make_runtime(allowed_buckets=frozenset({INPUT_BUCKET, "no-such-photos"}))
    reply = post_batch(
        runtime,
        {"images": ["gs://no-such-photos/a.png", f"gs://{INPUT_BUCKET}/not-there.png"]},
    )
    assert reply.status == 200
    missing_bucket, missing_object = (r["error"] for r in reply.body["results"])
    assert missing_bucket == {
        "code": "not_found",
        "message": "No such bucket: 'no-such-photos' does not exist.",
    }
    assert missing_object == {
        "code": "not_found",
        "message": f"No such object in bucket {INPUT_BUCKET!r}.",
    }


def _gallery(gcs: storage.Client, reply: Any) -> str:
    name = reply.body["gallery_uri"].removeprefix(f"gs://{RESULTS_BUCKET}/")
    return str(gcs.bucket(RESULTS_BUCKET).blob(name).download_as_text())


def test_answers_from_the_simulator_say_so_in_records_and_gallery(
    make_runtime: Callable[..., Runtime],
    sim: RunningSimulator,
    image_server: str,
    gcs: storage.Client,
) -> None:
    """The simulator's answers are marked `simulated` and the gallery says so on top; an
    answer shaped like Gemini's is not."""
    runtime = make_runtime()
    body = {"images": [f"{image_server}/coffee.png"]}
    # WHEN the simulator answers as itself
    simulated = post_batch(runtime, body)
    record = simulated.body["results"][0]
    assert record["status"] == "ok"
    assert record["simulated"] is True
    page = _gallery(gcs, simulated)
    assert "<b>Simulated.</b> Every description on this page came from" in page
    assert '<span class="sim">simulated</span>' in page
    # WHEN it answers the way Gemini does
    sim.configure(api_key=API_KEY, impersonate=True)
    real = post_batch(runtime, body)
    assert "simulated" not in real.body["results"][0]
    assert "Simulated." not in _gallery(gcs, real)
