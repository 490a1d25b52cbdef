"""Structured descriptions ("schema": "alt_text") and galleries, through the real function."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from google.cloud import storage

from describer import Runtime, handle_storage_event
from describer.schemas import ALT_TEXT_MAX_CHARS
from localdev.gemini_sim import RunningSimulator, describe_image
from tests.browser import Browser, browser_fixture

from .conftest import API_KEY, RESULTS_BUCKET, event_data, post_batch, send_event, upload

browser = browser_fixture()
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


def _post(url: str, body: Any) -> requests.Response:
    return requests.post(url, json=body, timeout=120)


def test_alt_text_schema_over_http_gives_validated_data_and_a_gallery_a_browser_renders(
    http_function: str,
    image_server: str,
    image_dir: Path,
    gcs: storage.Client,
    sim: RunningSimulator,
    browser: Browser,
    tmp_path: Path,
) -> None:
    # GIVEN a batch asking for alt text, with one source that cannot be described
    names = ["chelsea.png", "rocket.jpg", "astronaut.png"]
    images = [f"{image_server}/{n}" for n in names] + [f"{image_server}/missing.jpg"]

    # WHEN it is posted
    response = _post(http_function, {"images": images, "schema": "alt_text"})

    # THEN every described record carries the structured answer beside its description
    assert response.status_code == 200
    body = response.json()
    ok = body["results"][:3]
    for record, name in zip(ok, names, strict=True):
        assert record["schema"] == "alt_text"
        data = record["data"]
        assert set(data) == {"alt_text", "description", "tags", "text_in_image"}
        assert 0 < len(data["alt_text"]) <= ALT_TEXT_MAX_CHARS
        assert record["description"] == data["description"]
        assert data["description"] == describe_image((image_dir / name).read_bytes())
        assert all(isinstance(t, str) and t for t in data["tags"])
    assert body["results"][3]["error"]["code"] == "not_found"
    # AND the schema reached the model over HTTP, once per image
    assert sim.stats.structured == 3

    # AND the gallery beside the JSONL loads in a real browser with one card per source
    name = body["gallery_uri"].removeprefix(f"gs://{RESULTS_BUCKET}/")
    blob = gcs.bucket(RESULTS_BUCKET).get_blob(name)
    assert blob is not None
    page_path = tmp_path / "gallery.html"
    page_path.write_bytes(blob.download_as_bytes())
    page = browser.open(page_path)
    assert page.errors() == []
    assert page.count(".card") == len(images)
    assert page.count(".card.error") == 1
    assert page.images_loaded()
    assert page.count(".card img") == 3
    texts = page.texts(".card")
    for text, source in zip(texts, images, strict=True):
        assert source in text
    assert ok[0]["data"]["alt_text"] in texts[0]
    assert "not_found" in texts[3]
    shot = page.screenshot(OUTPUT / "gallery-from-function.png")
    assert shot.stat().st_size > 10_000


def test_an_unknown_schema_is_a_400_naming_the_choices(
    http_function: str, image_server: str, sim: RunningSimulator
) -> None:
    response = _post(http_function, {"images": [f"{image_server}/coffee.png"], "schema": "xml"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "'alt_text'" in error["message"] and "'text'" in error["message"]
    assert sim.stats.calls == 0


def test_an_answer_that_misfits_twice_is_a_model_error_and_once_is_retried(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    runtime = make_runtime()
    # GIVEN a model whose first two structured answers per image do not fit
    sim.configure(api_key=API_KEY, schema_misfits=2)
    reply = post_batch(runtime, {"images": [f"{image_server}/coffee.png"], "schema": "alt_text"})
    (record,) = reply.body["results"]
    # THEN the record is a model_error after exactly two calls, saying why
    assert record["error"]["code"] == "model_error"
    assert "did not fit the alt_text schema twice" in record["error"]["message"]
    assert record["attempts"] == 2 and sim.stats.calls == 2
    # AND both billed calls are in its usage, though neither answer was kept
    assert record["usage"]["prompt_tokens"] > 0 and record["usage"]["output_tokens"] > 0

    # GIVEN one misfit only THEN the second answer is used
    sim.configure(api_key=API_KEY, schema_misfits=1)
    reply = post_batch(runtime, {"images": [f"{image_server}/chelsea.png"], "schema": "alt_text"})
    (record,) = reply.body["results"]
    assert record["status"] == "ok" and record["attempts"] == 2
    assert record["data"]["alt_text"]


@pytest.mark.slow  # a real deadline
def test_a_misfit_whose_second_call_the_deadline_cuts_counts_both_calls_and_the_first_usage(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN a model whose first structured answer misfits and that answers nothing after it
    sim.configure(api_key=API_KEY, schema_misfits=1, answer_limit=1)
    runtime = make_runtime(function_timeout_s=3.0, deadline_margin_s=1.0)
    # WHEN the deadline cuts the second call short
    reply = post_batch(runtime, {"images": [f"{image_server}/coffee.png"], "schema": "alt_text"})
    (record,) = reply.body["results"]
    # THEN the record counts both calls, and the first answer's tokens, which were billed
    assert record["error"]["code"] == "deadline_exceeded"
    assert record["attempts"] == 2 and sim.stats.calls == 2
    assert record["usage"]["prompt_tokens"] > 0 and record["usage"]["output_tokens"] > 0
    assert reply.body["usage"] == record["usage"]


def test_text_schema_in_a_request_overrides_a_structured_default(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    runtime = make_runtime(schema="alt_text")
    source = {"images": [f"{image_server}/coffee.png"]}
    (default,) = post_batch(runtime, source).body["results"]
    (text,) = post_batch(runtime, {**source, "schema": "text"}).body["results"]
    assert default["schema"] == "alt_text" and "data" in default
    assert "schema" not in text and "data" not in text
    assert sim.stats.structured == 1 and sim.stats.calls == 2


def test_uploads_follow_describe_schema_and_a_changed_schema_describes_again(
    make_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    image_dir: Path,
    sim: RunningSimulator,
) -> None:
    # GIVEN DESCRIBE_SCHEMA=alt_text
    structured = make_runtime(schema="alt_text", results_bucket=None)
    blob = upload(bucket, "a.jpg", (image_dir / "rocket.jpg").read_bytes(), "image/jpeg")
    # WHEN an upload is described THEN its sidecar carries the structured answer
    assert handle_storage_event(structured, event_data(blob)) == "described"
    sidecar = bucket.get_blob("descriptions/a.jpg.json")
    assert sidecar is not None
    record = json.loads(sidecar.download_as_bytes())
    assert record["schema"] == "alt_text" and set(record["data"]) >= {"alt_text", "tags"}
    # AND the same event again is skipped
    assert handle_storage_event(structured, event_data(blob)) == "already_done"
    assert sim.stats.calls == 1
    # WHEN the function is redeployed with free text THEN the same event is described again
    plain = make_runtime(results_bucket=None)
    assert handle_storage_event(plain, event_data(blob)) == "described"
    sidecar = bucket.get_blob("descriptions/a.jpg.json")
    assert sidecar is not None
    assert "data" not in json.loads(sidecar.download_as_bytes())
    assert sim.stats.calls == 2


def test_a_manifest_asking_for_alt_text_gets_structured_records_and_a_gallery(
    gcs_function: str, bucket: storage.Bucket, image_dir: Path, sim: RunningSimulator
) -> None:
    upload(bucket, "in/a.jpg", (image_dir / "rocket.jpg").read_bytes(), "image/jpeg")
    images = [f"gs://{bucket.name}/in/a.jpg", f"gs://{bucket.name}/in/nope.jpg"]
    manifest = upload(
        bucket,
        "alt.batch.json",
        json.dumps({"images": images, "schema": "alt_text"}).encode(),
        "application/json",
    )
    assert send_event(gcs_function, manifest).status_code == 200
    jsonl = bucket.get_blob("describer-batches/alt.jsonl")
    gallery = bucket.get_blob("describer-batches/alt.html")
    assert jsonl is not None and gallery is not None
    records = [json.loads(line) for line in jsonl.download_as_text().splitlines()]
    assert records[0]["data"]["alt_text"] and records[1]["error"]["code"] == "not_found"
    html = gallery.download_as_text()
    assert html.count('class="card') == 2
    assert records[0]["data"]["alt_text"] in html
    assert (gallery.metadata or {}).get("describer-output") == "true"


def test_with_gallery_false_a_batch_gets_its_jsonl_and_no_gallery(
    make_runtime: Callable[..., Runtime], image_server: str, gcs: storage.Client
) -> None:
    # GIVEN GALLERY=false WHEN a batch is described over HTTP
    runtime = make_runtime(gallery=False)
    reply = post_batch(runtime, {"images": [f"{image_server}/rocket.jpg"]})
    # THEN its JSONL is written, and no page beside it
    assert reply.status == 200 and reply.body["gallery_uri"] is None
    jsonl = reply.body["results_uri"].removeprefix(f"gs://{RESULTS_BUCKET}/")
    results = gcs.bucket(RESULTS_BUCKET)
    assert results.get_blob(jsonl) is not None
    assert results.get_blob(jsonl.removesuffix(".jsonl") + ".html") is None
