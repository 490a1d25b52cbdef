"""Structured logs a batch can be followed by, and settings the function refuses to start with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
from google.cloud import storage

from localdev import procs
from localdev.events import finalized_event
from localdev.gemini_sim import RunningSimulator

from .conftest import function_env, make_image, upload


def _lines_of(log_path: Path, batch_id: str) -> list[dict[str, Any]]:
    """Every JSON log line of one batch (the log is shared by the whole session)."""
    lines = []
    for raw in log_path.read_text().splitlines():
        if raw.startswith("{"):
            entry = json.loads(raw)
            if entry.get("batch_id") == batch_id:
                lines.append(entry)
    return lines


@pytest.mark.parametrize(
    ("header", "value", "trace"),
    [
        ("X-Cloud-Trace-Context", "4bf92f3577b34da6a3ce929d0e0e4736/1;o=1", "4bf92f35"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "0af76519",
        ),
    ],
)
def test_every_line_of_a_batch_carries_its_id_and_trace(
    http_function: str,
    function_logs: Path,
    image_server: str,
    sim: RunningSimulator,
    header: str,
    value: str,
    trace: str,
) -> None:
    """One batch's lines share batch_id and trace; each source's line names it and its outcome."""
    # GIVEN a traced request with one good and one missing image
    images = [f"{image_server}/chelsea.png", f"{image_server}/missing.png"]
    # WHEN it is served
    reply = requests.post(http_function, json={"images": images}, headers={header: value})
    assert reply.status_code == 200
    batch_id = reply.json()["batch_id"]
    lines = _lines_of(function_logs / "describe_http.log", batch_id)
    # THEN every line is Cloud Logging's shape and carries the trace
    assert lines, "no log line carries the batch id"
    for entry in lines:
        assert {"severity", "message", "time", "batch_id"} <= set(entry)
        assert entry["logging.googleapis.com/trace"].startswith(trace)
    # AND each source has its own line with its status or error code
    by_source = {e["source"]: e for e in lines if "source" in e and "status" in e}
    assert by_source[images[0]]["status"] == "ok"
    assert by_source[images[0]]["severity"] == "INFO"
    assert by_source[images[1]]["error_code"] == "not_found"
    assert by_source[images[1]]["severity"] == "WARNING"
    # AND the batch's end is logged with where the results went
    assert any(e["message"] == "batch done" and e["uri"].startswith("gs://") for e in lines)


def test_the_function_refuses_to_start_when_results_would_retrigger_it(
    emulator_url: str, sim_server: RunningSimulator, tmp_path: Path
) -> None:
    """No RESULTS_PREFIX and no RESULTS_BUCKET: the instance does not start, and says why."""
    env = function_env(emulator_url, sim_server.url, RESULTS_PREFIX="")
    log_path = tmp_path / "refused.log"
    with pytest.raises(RuntimeError, match="exited"):
        procs.start_function(
            "describe_gcs", procs.free_port(), env, cloudevent=True, log_path=log_path
        )
    assert "RESULTS_PREFIX is empty and RESULTS_BUCKET is unset" in _refusal(log_path)["message"]


def test_the_function_refuses_to_start_with_no_time_to_work(
    emulator_url: str, sim_server: RunningSimulator, tmp_path: Path
) -> None:
    """A deadline margin as long as the timeout leaves no time to work: refused at start."""
    env = function_env(
        emulator_url, sim_server.url, FUNCTION_TIMEOUT_S="30", DEADLINE_MARGIN_S="30"
    )
    log_path = tmp_path / "refused.log"
    with pytest.raises(RuntimeError, match="exited"):
        procs.start_function("describe_http", procs.free_port(), env, log_path=log_path)
    message = _refusal(log_path)["message"]
    assert "DEADLINE_MARGIN_S (30.0) must be less than FUNCTION_TIMEOUT_S" in message


def _refusal(log_path: Path) -> dict[str, Any]:
    """The one line a refused instance logs: JSON, critical, no traceback around it."""
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    entry: dict[str, Any] = json.loads(lines[0])
    assert entry["severity"] == "CRITICAL"
    assert entry["error_code"] == "invalid_configuration"
    return entry


def test_an_instance_without_credentials_refuses_in_one_line(
    emulator_url: str, sim_server: RunningSimulator, tmp_path: Path
) -> None:
    """No Gemini key: the process exits 1 after a single JSON line naming what to set."""
    env = function_env(emulator_url, sim_server.url, GEMINI_API_KEY="", GOOGLE_API_KEY="")
    log_path = tmp_path / "refused.log"
    with pytest.raises(RuntimeError, match="exited with 1"):
        procs.start_function("describe_http", procs.free_port(), env, log_path=log_path)
    assert "no Gemini credentials: set GEMINI_API_KEY" in _refusal(log_path)["message"]


def test_an_instance_whose_results_bucket_is_missing_names_it_at_start(
    emulator_url: str, sim_server: RunningSimulator, gcs: storage.Client, tmp_path: Path
) -> None:
    """A RESULTS_BUCKET that does not exist stops the instance at start, named, not at the
    first request as a 500."""
    env = function_env(emulator_url, sim_server.url, RESULTS_BUCKET="no-such-results-bucket")
    log_path = tmp_path / "refused.log"
    with pytest.raises(RuntimeError, match="exited with 1"):
        procs.start_function("describe_http", procs.free_port(), env, log_path=log_path)
    message = _refusal(log_path)["message"]
    assert "RESULTS_BUCKET 'no-such-results-bucket' does not exist" in message
    assert "gcloud storage buckets create gs://no-such-results-bucket" in message


def test_an_events_lines_carry_the_cloudevent_traceparent(
    gcs_function: str, function_logs: Path, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    """A storage event's log lines carry the trace Eventarc sends as the traceparent extension."""
    blob = upload(bucket, "traced.png", make_image(40, 30, "red", "PNG"), "image/png")
    headers, body = finalized_event(blob)
    headers["ce-traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert requests.post(gcs_function, data=body, headers=headers, timeout=60).status_code == 200
    lines = _lines_of(
        function_logs / "describe_gcs.log", f"{bucket.name}/traced.png#{blob.generation}"
    )
    assert lines, "no log line carries the event's batch id"
    assert all(
        e["logging.googleapis.com/trace"] == "0af7651916cd43dd8448eb211c80319c" for e in lines
    )
