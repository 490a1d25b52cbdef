"""describe_gcs served by functions-framework, driven with binary-mode CloudEvents."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from google.cloud import storage

from localdev.events import finalized_event
from localdev.gemini_sim import RunningSimulator, describe_image
from localdev.relay import RunningRelay

from .conftest import Functions, function_env, make_image, send_event, upload, wait_for


def _sidecar(bucket: storage.Bucket, name: str) -> storage.Blob | None:
    return bucket.get_blob(f"descriptions/{name}.json")


def test_an_uploaded_image_gets_a_sidecar_with_its_generation(
    gcs_function: str, bucket: storage.Bucket, image_dir: Path, sim: RunningSimulator
) -> None:
    # GIVEN an image uploaded into a folder of the bucket
    data = (image_dir / "chelsea.png").read_bytes()
    blob = upload(bucket, "cats/chelsea.png", data, "image/png")
    # WHEN its finalize event arrives
    response = send_event(gcs_function, blob)
    # THEN the sidecar sits under the results prefix, named after the object
    assert response.status_code == 200
    sidecar = _sidecar(bucket, "cats/chelsea.png")
    assert sidecar is not None
    record = json.loads(sidecar.download_as_bytes())
    assert record["source"] == f"gs://{bucket.name}/cats/chelsea.png"
    assert record["status"] == "ok"
    assert record["description"] == describe_image(data)
    assert record["generation"] == str(blob.generation)
    assert sidecar.metadata is not None and sidecar.metadata["describer-output"] == "true"
    assert sim.stats.calls == 1


def test_the_same_event_twice_makes_one_model_call_and_keeps_the_result(
    gcs_function: str, bucket: storage.Bucket, image_dir: Path, sim: RunningSimulator
) -> None:
    # GIVEN an upload that was already described once
    blob = upload(bucket, "rocket.jpg", (image_dir / "rocket.jpg").read_bytes(), "image/jpeg")
    assert send_event(gcs_function, blob).status_code == 200
    first = _sidecar(bucket, "rocket.jpg")
    assert first is not None
    # WHEN the same event (same bucket, name, generation) is delivered again
    assert send_event(gcs_function, blob).status_code == 200
    # THEN no second model call was made and the sidecar was not rewritten
    assert sim.stats.calls == 1
    again = _sidecar(bucket, "rocket.jpg")
    assert again is not None and again.generation == first.generation


def test_a_new_generation_of_the_object_is_described_again(
    gcs_function: str, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN an object described once, then overwritten with another image
    first = upload(bucket, "pic.png", make_image(64, 64, "red", "PNG"), "image/png")
    send_event(gcs_function, first)
    second_data = make_image(80, 40, "blue", "PNG")
    second = upload(bucket, "pic.png", second_data, "image/png")
    # WHEN the new generation's event arrives
    send_event(gcs_function, second)
    # THEN the sidecar now describes the new generation
    sidecar = _sidecar(bucket, "pic.png")
    assert sidecar is not None
    record = json.loads(sidecar.download_as_bytes())
    assert record["generation"] == str(second.generation)
    assert record["description"] == describe_image(second_data)
    assert sim.stats.calls == 2


def test_objects_under_the_results_prefix_are_ignored(
    gcs_function: str, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN an image placed under the results prefix (as a result would be)
    blob = upload(
        bucket, "descriptions/looks-like-input.png", make_image(32, 32, "red", "PNG"), "image/png"
    )
    # WHEN its event arrives
    assert send_event(gcs_function, blob).status_code == 200
    # THEN nothing is described and nothing is written: the loop guard
    assert sim.stats.calls == 0
    assert [b.name for b in bucket.list_blobs()] == ["descriptions/looks-like-input.png"]


def test_objects_marked_as_this_functions_output_are_ignored(
    gcs_function: str, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN an image carrying the output marker outside the results prefix
    blob = bucket.blob("elsewhere/marked.png")
    blob.metadata = {"describer-output": "true"}
    blob.upload_from_string(make_image(32, 32, "red", "PNG"), content_type="image/png")
    fresh = bucket.get_blob("elsewhere/marked.png")
    assert fresh is not None
    # WHEN its event arrives THEN it is not described
    assert send_event(gcs_function, fresh).status_code == 200
    assert sim.stats.calls == 0
    assert _sidecar(bucket, "elsewhere/marked.png") is None


def test_untyped_objects_are_sniffed_and_non_images_ignored(
    gcs_function: str, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN an untyped image, an untyped text file, and a typed text file
    image = upload(bucket, "raw-image", make_image(40, 30, "green", "JPEG"), None)
    blob = upload(bucket, "raw-text", b"hello there", None)
    text = upload(bucket, "notes.txt", b"hello", "text/plain")
    # WHEN their events arrive
    for b in (image, blob, text):
        assert send_event(gcs_function, b).status_code == 200
    # THEN only the image is described; the others leave no result
    assert sim.stats.calls == 1
    assert _sidecar(bucket, "raw-image") is not None
    assert _sidecar(bucket, "raw-text") is None
    assert _sidecar(bucket, "notes.txt") is None


def test_a_broken_image_upload_gets_an_error_sidecar(
    gcs_function: str, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN an object typed as an image whose bytes are not one
    blob = upload(bucket, "broken.jpg", b"this is not a jpeg", "image/jpeg")
    # WHEN its event arrives THEN the sidecar records the error, and no model call is made
    assert send_event(gcs_function, blob).status_code == 200
    sidecar = _sidecar(bucket, "broken.jpg")
    assert sidecar is not None
    record = json.loads(sidecar.download_as_bytes())
    assert record["status"] == "error"
    assert record["error"]["code"] == "not_an_image"
    assert sim.stats.calls == 0


def test_a_manifest_is_described_as_a_batch_named_after_it(
    gcs_function: str,
    bucket: storage.Bucket,
    image_dir: Path,
    image_server: str,
    sim: RunningSimulator,
) -> None:
    # GIVEN images in the bucket and a manifest listing them plus a web image
    upload(bucket, "in/a.jpg", (image_dir / "rocket.jpg").read_bytes(), "image/jpeg")
    upload(bucket, "in/b.png", (image_dir / "coffee.png").read_bytes(), "image/png")
    images = [
        f"gs://{bucket.name}/in/a.jpg",
        f"{image_server}/chelsea.png",
        f"gs://{bucket.name}/in/b.png",
        f"gs://{bucket.name}/in/missing.png",
    ]
    manifest = upload(
        bucket,
        "jobs/june.batch.json",
        json.dumps({"images": images, "prompt": "Two words."}).encode(),
        "application/json",
    )
    # WHEN the manifest's event arrives
    assert send_event(gcs_function, manifest).status_code == 200
    # THEN the JSONL sits under BATCHES_PREFIX, named after the manifest, one record a line
    blob = bucket.get_blob("describer-batches/jobs/june.jsonl")
    assert blob is not None
    records = [json.loads(line) for line in blob.download_as_text().splitlines()]
    assert [r["source"] for r in records] == images
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "error"]
    assert records[3]["error"]["code"] == "not_found"
    assert {r["prompt"] for r in records} == {"Two words."}
    assert sim.stats.calls == 3

    # AND the same manifest event again makes no model call
    assert send_event(gcs_function, manifest).status_code == 200
    assert sim.stats.calls == 3


def test_an_invalid_manifest_leaves_an_error_report(
    gcs_function: str, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN a manifest that is not a valid batch
    manifest = upload(bucket, "bad.batch.json", b'{"images": "nope"}', "application/json")
    # WHEN its event arrives THEN the function returns normally and writes why it was rejected
    assert send_event(gcs_function, manifest).status_code == 200
    report = bucket.get_blob("describer-batches/bad.error.json")
    assert report is not None
    body = json.loads(report.download_as_bytes())
    assert body["error"]["code"] == "invalid_request"
    assert body["manifest"] == f"gs://{bucket.name}/bad.batch.json"
    assert sim.stats.calls == 0


def test_an_outage_outlasting_retries_asks_for_redelivery_and_writes_nothing(
    gcs_function: str, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN a model answering 500 to every call
    sim.configure(api_key="test-key", rate_500=1.0)
    blob = upload(bucket, "later.png", make_image(40, 40, "green", "PNG"), "image/png")
    # WHEN the upload's event arrives
    response = send_event(gcs_function, blob)
    # THEN the function fails the delivery (so Eventarc retries) and records nothing final
    assert response.status_code == 500
    assert _sidecar(bucket, "later.png") is None
    assert sim.stats.calls == 5
    # AND once the model recovers, the redelivered event is described
    sim.configure(api_key="test-key")
    assert send_event(gcs_function, blob).status_code == 200
    sidecar = _sidecar(bucket, "later.png")
    assert sidecar is not None
    assert json.loads(sidecar.download_as_bytes())["status"] == "ok"


def test_a_late_event_for_an_older_generation_leaves_the_newer_result(
    gcs_function: str, bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    # GIVEN an object replaced once, whose newer generation was described first
    old = upload(bucket, "late.png", make_image(64, 64, "red", "PNG"), "image/png")
    new_data = make_image(90, 30, "blue", "PNG")
    new = upload(bucket, "late.png", new_data, "image/png")
    assert send_event(gcs_function, new).status_code == 200
    # WHEN the older generation's event arrives late
    assert send_event(gcs_function, old).status_code == 200
    # THEN no model call is made and the sidecar still describes the newer generation
    assert sim.stats.calls == 1
    sidecar = _sidecar(bucket, "late.png")
    assert sidecar is not None
    record = json.loads(sidecar.download_as_bytes())
    assert record["generation"] == str(new.generation)
    assert record["description"] == describe_image(new_data)


def test_one_upload_delivered_to_two_instances_at_once_is_written_once(
    fleet_buckets: tuple[storage.Bucket, storage.Bucket],
    relay: RunningRelay,
    sim: RunningSimulator,
    tmp_path: Path,
) -> None:
    """The measurement behind describing a duplicate delivery twice rather than locking: two
    processes get the same event at the same moment; both are inside their Gemini call at
    once. The duplicate costs exactly one call, and no write: one sidecar is kept."""
    photos, results = fleet_buckets
    blob = upload(photos, "dup/rocket.png", make_image(64, 48, "red", "PNG"), "image/png")
    env = function_env(relay.url, sim.url, RESULTS_BUCKET=results.name)
    functions = Functions(env, tmp_path)
    try:
        targets = [functions.start("describe_gcs", cloudevent=True) for _ in range(2)]
        sim.hold()
        headers, body = finalized_event(blob)
        with ThreadPoolExecutor(2) as pool:
            # WHEN the same event (same id) reaches both processes at once
            answers = [
                pool.submit(requests.post, url, data=body, headers=headers, timeout=60)
                for url in targets
            ]
            # THEN both are in their model call at the same moment
            wait_for(lambda: sim.stats.held == 2, "both calls in flight at once")
            sim.release()
            statuses = [answer.result().status_code for answer in answers]
    finally:
        functions.stop_all()
    # AND both answer done (no redelivery), one sidecar was written, the other write met 412
    assert statuses == [200, 200]
    assert sim.stats.calls == 2
    assert relay.stats().precondition_failed == 1
    sidecar = results.get_blob("descriptions/dup/rocket.png.json")
    assert sidecar is not None
    assert json.loads(sidecar.download_as_bytes())["status"] == "ok"
