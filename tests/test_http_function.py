"""describe_http served by functions-framework, driven over HTTP like a caller would."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
from google.cloud import storage

from localdev.gemini_sim import RunningSimulator, describe_image

from .conftest import INPUT_BUCKET, RESULTS_BUCKET, upload


def _post(url: str, body: object, **kwargs: object) -> requests.Response:
    return requests.post(url, json=body, timeout=120, **kwargs)  # type: ignore[arg-type]


def test_batch_results_come_back_in_input_order_and_match_the_jsonl(
    http_function: str,
    image_server: str,
    image_dir: Path,
    gcs: storage.Client,
    sim: RunningSimulator,
) -> None:
    # GIVEN a batch mixing http(s) and gs:// sources
    gcs.bucket(INPUT_BUCKET).blob("photos/rocket.jpg").upload_from_filename(
        str(image_dir / "rocket.jpg")
    )
    names = ["chelsea.png", "coffee.png", "astronaut.png", "grace_hopper.jpg"]
    images = [f"{image_server}/{n}" for n in names] + [f"gs://{INPUT_BUCKET}/photos/rocket.jpg"]

    # WHEN it is posted
    response = _post(http_function, {"images": images})

    # THEN each record is in input order and describes its own image
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert list(body) == [
        "batch_id",
        "results_uri",
        "gallery_uri",
        "counts",
        "usage",
        "model_calls",
        "results",
    ]
    # AND no 429 was met, and the process's limit on calls is within MODEL_CONCURRENCY
    calls = body["model_calls"]
    assert calls["throttled"] == 0 and 1 <= calls["limit"] <= calls["ceiling"]
    assert [r["source"] for r in body["results"]] == images
    for record, name in zip(body["results"], [*names, "rocket.jpg"], strict=True):
        assert record["status"] == "ok", record
        assert record["description"] == describe_image((image_dir / name).read_bytes())
        assert record["error"] is None
        assert record["attempts"] == 1
        assert record["usage"]["prompt_tokens"] > 0
    assert body["counts"] == {"ok": 5, "error": 0}
    assert sim.stats.calls == 5

    # AND the JSONL in the results bucket holds exactly the same records
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{12}", body["batch_id"])
    expected_uri = f"gs://{RESULTS_BUCKET}/describer-batches/{body['batch_id']}.jsonl"
    assert body["results_uri"] == expected_uri
    blob = gcs.bucket(RESULTS_BUCKET).get_blob(f"describer-batches/{body['batch_id']}.jsonl")
    assert blob is not None
    lines = blob.download_as_text().splitlines()
    assert [json.loads(line) for line in lines] == body["results"]
    assert blob.metadata == {"describer-output": "true"}

    # AND the gallery sits beside it, one card per source
    assert body["gallery_uri"] == expected_uri.removesuffix(".jsonl") + ".html"
    page = gcs.bucket(RESULTS_BUCKET).get_blob(f"describer-batches/{body['batch_id']}.html")
    assert page is not None
    assert (page.content_type or "").startswith("text/html")
    assert page.metadata == {"describer-output": "true"}
    html = page.download_as_text()
    assert html.count('class="card') == len(images)
    assert html.count("data:image/jpeg;base64,") == len(images)


def test_record_carries_source_facts_and_the_prompt_override(
    http_function: str, image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN a request with its own prompt WHEN posted
    body = _post(
        http_function, {"images": [f"{image_server}/chelsea.png"], "prompt": "Alt text, please."}
    ).json()
    # THEN the record names the prompt, model and the source's type and size
    (record,) = body["results"]
    assert record["prompt"] == "Alt text, please."
    assert record["model"] == "gemini-3.5-flash-lite"
    assert (record["mime_type"], record["width"], record["height"]) == ("image/png", 451, 300)
    assert isinstance(record["latency_ms"], int)


def test_output_field_overrides_results_bucket_and_prefix(
    http_function: str, image_server: str, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN an output location in another bucket, without a trailing slash
    output = f"gs://{bucket.name}/runs/today"
    # WHEN a batch names it
    body = _post(http_function, {"images": [f"{image_server}/coffee.png"], "output": output}).json()
    # THEN results go there, under the prefix taken as a folder
    assert body["results_uri"] == f"gs://{bucket.name}/runs/today/batches/{body['batch_id']}.jsonl"
    assert bucket.get_blob(f"runs/today/batches/{body['batch_id']}.jsonl") is not None


def test_bad_sources_become_error_records_and_the_rest_is_described(
    http_function: str, image_server: str, gcs: storage.Client, sim: RunningSimulator
) -> None:
    # GIVEN one good image among sources that each fail differently
    upload(gcs.bucket(INPUT_BUCKET), "doc.txt", b"plain text", "text/plain")
    images = [
        f"{image_server}/missing.png",
        "ftp://example.com/a.png",
        f"{image_server}/notes.txt",
        f"{image_server}/page.html",
        "gs://not-allowed-bucket/a.png",
        f"gs://{INPUT_BUCKET}/no-such-object.png",
        f"gs://{INPUT_BUCKET}/doc.txt",
        f"{image_server}/chelsea.png",
        "",
    ]
    # WHEN the batch is posted
    response = _post(http_function, {"images": images})
    # THEN the request succeeds, each bad source has its code, the good one is described
    assert response.status_code == 200
    results = response.json()["results"]
    codes = [r["error"]["code"] if r["error"] else r["status"] for r in results]
    assert codes == [
        "not_found",
        "forbidden_source",
        "not_an_image",
        "not_an_image",
        "forbidden_source",
        "not_found",
        "not_an_image",
        "ok",
        "invalid_source",
    ]
    assert all(r["error"] is None or r["error"]["message"] for r in results)
    assert "HTML page" in results[3]["error"]["message"]
    assert response.json()["counts"] == {"ok": 1, "error": 8}
    assert sim.stats.calls == 1


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        ({"method": "GET"}, 405, "method_not_allowed"),
        ({"method": "PUT", "json": {"images": ["x"]}}, 405, "method_not_allowed"),
        ({"data": "{}", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        (
            {"data": "{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
        ),
        (
            {"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
        ),
        ({"json": ["a"]}, 400, "invalid_request"),
        ({"json": {}}, 400, "invalid_request"),
        ({"json": {"images": []}}, 400, "invalid_request"),
        ({"json": {"images": "http://a/b.png"}}, 400, "invalid_request"),
        ({"json": {"images": [1, 2]}}, 400, "invalid_request"),
        ({"json": {"images": ["x"], "prompt": ""}}, 400, "invalid_request"),
        ({"json": {"images": ["x"], "output": "s3://b/"}}, 400, "invalid_request"),
        ({"json": {"images": ["x"], "imgaes": []}}, 400, "invalid_request"),
        ({"json": {"images": ["x"] * 1001}}, 413, "batch_too_large"),
    ],
)
def test_malformed_requests_get_a_json_error_with_their_status(
    http_function: str,
    request_kwargs: dict[str, object],
    status: int,
    code: str,
    sim: RunningSimulator,
) -> None:
    # GIVEN a malformed request WHEN it is sent
    method = str(request_kwargs.pop("method", "POST"))
    response = requests.request(method, http_function, timeout=30, **request_kwargs)  # type: ignore[arg-type]
    # THEN it gets its status and a JSON error with a code and a sentence, never a trace
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"] and "Traceback" not in response.text
    if status == 405:
        assert response.headers["Allow"] == "POST"
    assert sim.stats.calls == 0


def test_logs_are_json_lines_carrying_batch_source_code_and_trace(
    http_function: str, image_server: str, function_logs: Path, sim: RunningSimulator
) -> None:
    # GIVEN a traced request with one good and one missing image
    trace = "0af7651916cd43dd8448eb211c80319c"
    body = _post(
        http_function,
        {"images": [f"{image_server}/coffee.png", f"{image_server}/gone.png"]},
        headers={"X-Cloud-Trace-Context": f"{trace}/1;o=1"},
    ).json()
    # WHEN the function's stdout is read
    lines = (function_logs / "describe_http.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    mine = [e for e in entries if e.get("batch_id") == body["batch_id"]]
    # THEN every line of the batch is JSON with severity, message and the trace
    assert mine and all(e["severity"] and e["message"] for e in mine)
    assert all(e["logging.googleapis.com/trace"] == trace for e in mine)
    failed = [e for e in mine if e.get("error_code") == "not_found"]
    assert failed and failed[0]["source"] == f"{image_server}/gone.png"
    assert failed[0]["severity"] == "WARNING"
