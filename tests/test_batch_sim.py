"""The Gemini simulator's Batch API, driven through the real google-genai client.

Both backends: the Gemini Developer API (Files API upload, batchGenerateContent with a
JSONL file or inline requests, its generated responses file) and Vertex AI
(batchPredictionJobs reading their input from, and writing their output to, the storage
emulator through the relay, which raises the output's finalize event). Jobs are stopped
at known points with batch_hold and let go with a release; the only waiting is a bounded
poll of the batch's own state, because the API itself is asynchronous.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from google import genai
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.genai import errors, types
from google.genai.client import AsyncClient
from google.oauth2.credentials import Credentials

from localdev.gemini_sim import RunningSimulator, SimConfig, describe_image
from localdev.relay import RelayConfig, RunningRelay
from localdev.relay import start_in_thread as start_relay

from .conftest import API_KEY, SAMPLES, wait_for

MODEL = "gemini-test"
PHOTOS = ("astronaut.png", "chelsea.png", "grace_hopper.jpg")
BROKEN = b"\x89PNG\r\n\x1a\n but not a picture at all"
ENDED = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}
PROJECT, LOCATION = "p", "us-central1"


# --- helpers --------------------------------------------------------------------------------


def _developer(sim: RunningSimulator, key: str = API_KEY) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=sim.url))


def _vertex(sim: RunningSimulator) -> genai.Client:
    return genai.Client(
        vertexai=True,
        project=PROJECT,
        location=LOCATION,
        credentials=Credentials("sim-token"),  # type: ignore[no-untyped-call]
        http_options=types.HttpOptions(base_url=sim.url),
    )


def _request(data: bytes, mime: str) -> dict[str, Any]:
    """A GenerateContentRequest in the REST API's JSON: one inline image and a prompt."""
    inline = {"mimeType": mime, "data": base64.b64encode(data).decode()}
    return {
        "contents": [{"role": "user", "parts": [{"inlineData": inline}, {"text": "Describe."}]}]
    }


def _inline(part: types.Part, metadata: dict[str, str] | None = None) -> types.InlinedRequest:
    """An inline batch request: the part and a prompt, with the request's metadata."""
    content = types.Content(role="user", parts=[part, types.Part(text="Describe.")])
    return types.InlinedRequest(contents=[content], metadata=metadata)


def _photos() -> dict[str, tuple[bytes, str]]:
    """The sample photos by key: their bytes and MIME type."""
    mimes = {".png": "image/png", ".jpg": "image/jpeg"}
    return {
        name.split(".")[0]: ((SAMPLES / name).read_bytes(), mimes[name[name.index(".") :]])
        for name in PHOTOS
    }


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _input_lines() -> list[dict[str, Any]]:
    """Three sample photos and one broken image, as {"key", "request"} lines."""
    lines = [
        {"key": key, "request": _request(data, mime)} for key, (data, mime) in _photos().items()
    ]
    lines.append({"key": "broken", "request": _request(BROKEN, "image/png")})
    return lines


async def _until_ended(client: AsyncClient, name: str, timeout_s: float = 15.0) -> types.BatchJob:
    """Poll the job until it ends (the API is asynchronous); fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = await client.batches.get(name=name)
        assert job.state is not None
        if job.state.name in ENDED:
            return job
        assert time.monotonic() < deadline, f"{name} still {job.state.name} after {timeout_s} s"
        await asyncio.sleep(0.02)


def _held(sim: RunningSimulator, count: int) -> None:
    """Wait until ``count`` jobs are RUNNING and held at batch_hold."""
    wait_for(lambda: sim.stats.batch_held == count, f"{count} held batch jobs", 10.0, poll_s=0.01)


def _text(response: dict[str, Any]) -> str:
    return str(response["candidates"][0]["content"]["parts"][0]["text"])


def _online(sim: RunningSimulator, data: bytes, mime: str) -> str:
    """What generateContent answers for the image, through the real client."""

    async def call() -> str:
        async with _developer(sim).aio as client:
            parts: list[types.PartUnion] = [types.Part.from_bytes(data=data, mime_type=mime)]
            response = await client.models.generate_content(
                model=MODEL, contents=[*parts, "Describe."]
            )
            return response.text or ""

    return asyncio.run(call())


def _raw(sim: RunningSimulator, path: str) -> requests.Response:
    """A GET as the REST API answers it, before google-genai reads it."""
    return requests.get(f"{sim.url}{path}", headers={"x-goog-api-key": API_KEY}, timeout=10)


# --- Gemini Developer API: a JSONL file ------------------------------------------------------


def test_a_file_batch_answers_every_line_as_generate_content_does(sim: RunningSimulator) -> None:
    # GIVEN a held simulator and a JSONL of three photos and a broken image
    sim.configure(api_key=API_KEY, batch_hold=True)
    photos = _photos()

    async def run() -> tuple[types.BatchJob, types.BatchJob, types.BatchJob, bytes]:
        async with _developer(sim).aio as client:
            uploaded = await client.files.upload(
                file=io.BytesIO(_jsonl(_input_lines())),
                config={"mime_type": "application/jsonl", "display_name": "shard-1.jsonl"},
            )
            # WHEN a batch is created from the uploaded file
            created = await client.batches.create(
                model=MODEL, src=str(uploaded.name), config={"display_name": "shard-1"}
            )
            await asyncio.to_thread(_held, sim, 1)
            running = await client.batches.get(name=str(created.name))
            sim.release_batches()
            done = await _until_ended(client, str(created.name))
            assert done.dest is not None and done.dest.file_name is not None
            output = await client.files.download(file=done.dest.file_name)
            return created, running, done, output

    created, running, done, output = asyncio.run(run())
    # THEN the batch was pending when created, running while held, and succeeded once let go
    assert created.state == types.JobState.JOB_STATE_PENDING
    assert created.display_name == "shard-1" and created.model == f"models/{MODEL}"
    assert re.fullmatch(r"batches/[a-z0-9]{36}", str(created.name))
    assert running.state == types.JobState.JOB_STATE_RUNNING and running.dest is None
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    assert done.create_time is not None and done.end_time is not None
    assert done.end_time >= done.create_time
    # AND its responses file holds one line per input line, in order, under the same keys
    assert done.dest is not None
    assert done.dest.file_name == f"files/batch-{str(created.name).removeprefix('batches/')}"
    lines = [json.loads(line) for line in output.decode().splitlines()]
    assert [line["key"] for line in lines] == [*photos, "broken"]
    # AND each photo's answer is generateContent's, for a batch without a single online call
    assert (sim.stats.calls, sim.stats.images) == (0, [])
    assert sim.stats.batch_requests == 4 and sim.stats.batch_errors == 1
    assert [image["mime_type"] for image in sim.stats.batch_images] == [
        mime for _, mime in photos.values()
    ]
    for line, (data, mime) in zip(lines, photos.values(), strict=False):
        assert set(line) == {"key", "response"}
        assert _text(line["response"]) == describe_image(data) == _online(sim, data, mime)
        assert line["response"]["modelVersion"].endswith(MODEL)
        assert line["response"]["usageMetadata"]["promptTokenCount"] == 258 + 1
    # AND the broken image is that request's own 400, not a failed batch
    assert set(lines[3]) == {"key", "error"}
    assert lines[3]["error"]["code"] == 400
    assert "Provided image is not valid" in lines[3]["error"]["message"]
    assert sim.stats.files_uploaded == 1
    assert sim.stats.batch_displayed_names == ["shard-1"]
    assert sim.stats.batch_states == {str(created.name): "JOB_STATE_SUCCEEDED"}
    assert sim.stats.batch_outputs == [done.dest.file_name]


def test_the_responses_file_id_is_too_long_for_get_and_delete_as_on_the_real_api(
    sim: RunningSimulator,
) -> None:
    # GIVEN a finished file batch
    sim.configure(api_key=API_KEY, batch_delay_s=0)
    data, mime = _photos()["chelsea"]

    async def run() -> tuple[types.File, types.File, str, errors.ClientError, errors.ClientError]:
        async with _developer(sim).aio as client:
            jsonl = _jsonl([{"key": "only", "request": _request(data, mime)}])
            uploaded = await client.files.upload(
                file=io.BytesIO(jsonl), config={"mime_type": "application/jsonl"}
            )
            job = await client.batches.create(model=MODEL, src=str(uploaded.name))
            done = await _until_ended(client, str(job.name))
            assert done.dest is not None and done.dest.file_name is not None
            result = done.dest.file_name
            # WHEN the uploaded file is read back, and the generated one is read and deleted
            again = await client.files.get(name=str(uploaded.name))
            with pytest.raises(errors.ClientError) as get:
                await client.files.get(name=result)
            with pytest.raises(errors.ClientError) as delete:
                await client.files.delete(name=result)
            # (a generated file is listed, and its listing says how to download it)
            listed = [f async for f in await client.files.list()]
            generated = next(f for f in listed if f.name == result)
            output = await client.files.download(file=result)
            return again, generated, output.decode(), get.value, delete.value

    again, generated, output, get, delete = asyncio.run(run())
    # THEN the upload is an ACTIVE, UPLOADED file of the bytes sent
    assert again.state == types.FileState.ACTIVE and again.source == types.FileSource.UPLOADED
    assert again.mime_type == "application/jsonl" and again.download_uri is None
    assert re.fullmatch(r"files/[a-z0-9]{12}", str(again.name))
    # AND the generated file cannot be fetched or deleted by name (42 characters), only
    # downloaded, as on the real Files API
    for refused, method in ((get, "GetFileRequest"), (delete, "DeleteFileRequest")):
        assert refused.code == 400 and refused.status == "INVALID_ARGUMENT"
        assert f"{method}.name: File ID (name excluding 'files/') cannot be more than 40" in str(
            refused.message
        )
    assert generated.source == types.FileSource.GENERATED and generated.download_uri
    assert _text(json.loads(output)["response"]) == describe_image(data)


def test_a_large_file_is_uploaded_in_chunks(sim: RunningSimulator) -> None:
    # GIVEN a file larger than the SDK's 8 MiB upload chunk
    blob = b"x" * (9 * 1024 * 1024) + b"\n"

    async def run() -> types.File:
        async with _developer(sim).aio as client:
            # WHEN it is uploaded THEN it arrives whole, resumed at the right offset
            return await client.files.upload(
                file=io.BytesIO(blob), config={"mime_type": "text/plain", "name": "big-one"}
            )

    uploaded = asyncio.run(run())
    assert uploaded.name == "files/big-one" and uploaded.size_bytes == len(blob)
    assert uploaded.sha256_hash == base64.b64encode(hashlib.sha256(blob).digest()).decode()


# --- Gemini Developer API: inline requests, listing, cancelling --------------------------------


def test_inline_requests_are_answered_in_order_with_their_metadata(sim: RunningSimulator) -> None:
    # GIVEN inline requests for three photos, each with its own metadata
    sim.configure(api_key=API_KEY, batch_delay_s=0)
    photos = _photos()
    inlined = [
        _inline(types.Part.from_bytes(data=data, mime_type=mime), metadata={"key": key})
        for key, (data, mime) in photos.items()
    ]

    async def run() -> types.BatchJob:
        async with _developer(sim).aio as client:
            job = await client.batches.create(
                model=MODEL, src=inlined, config={"display_name": "inline"}
            )
            return await _until_ended(client, str(job.name))

    done = asyncio.run(run())
    # THEN the responses come inline, in input order, each with its request's metadata
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    assert done.dest is not None and done.dest.file_name is None
    responses = done.dest.inlined_responses or []
    assert [r.metadata for r in responses] == [{"key": key} for key in photos]
    for response, (data, _) in zip(responses, photos.values(), strict=True):
        assert response.error is None and response.response is not None
        assert response.response.text == describe_image(data)
    assert sim.stats.calls == 0 and sim.stats.batch_requests == 3


def test_batches_are_listed_newest_first_a_page_at_a_time(sim: RunningSimulator) -> None:
    # GIVEN five held batches
    sim.configure(api_key=API_KEY, batch_hold=True)

    async def run() -> tuple[list[str], list[str], int, str | None]:
        async with _developer(sim).aio as client:
            created = []
            for i in range(5):
                job = await client.batches.create(
                    model=MODEL,
                    src=[_inline(types.Part(text=f"n{i}"))],
                    config={"display_name": f"shard-{i}"},
                )
                created.append(str(job.name))
            # WHEN they are listed two to a page
            pager = await client.batches.list(config={"page_size": 2})
            first_page = len(pager.page)
            token = pager.config.get("page_token")
            listed = [str(job.name) async for job in pager]
            return created, listed, first_page, token

    created, listed, first_page, token = asyncio.run(run())
    # THEN the pager walks every page, newest first
    assert first_page == 2 and token
    assert listed == created[::-1]
    assert sim.stats.batch_displayed_names == [f"shard-{i}" for i in range(5)]
    # AND an unreadable page token is refused
    bad = _raw(sim, "/v1beta/batches?pageToken=%21%21")
    assert bad.status_code == 400


def test_a_cancelled_batch_ends_cancelled_without_output(sim: RunningSimulator) -> None:
    # GIVEN a held batch
    sim.configure(api_key=API_KEY, batch_hold=True)
    data, mime = _photos()["astronaut"]

    async def run() -> tuple[types.BatchJob, errors.ClientError, dict[str, Any]]:
        async with _developer(sim).aio as client:
            job = await client.batches.create(
                model=MODEL, src=[_inline(types.Part.from_bytes(data=data, mime_type=mime))]
            )
            await asyncio.to_thread(_held, sim, 1)
            # WHEN it is cancelled, and then everything held is let go
            await client.batches.cancel(name=str(job.name))
            sim.release()
            cancelled = await client.batches.get(name=str(job.name))
            # THEN a second cancel is refused: the batch has ended
            with pytest.raises(errors.ClientError) as again:
                await client.batches.cancel(name=str(job.name))
            raw = _raw(sim, f"/v1beta/{job.name}").json()
            return cancelled, again.value, raw

    cancelled, again, raw = asyncio.run(run())
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED and cancelled.dest is None
    assert again.code == 400 and again.status == "FAILED_PRECONDITION"
    # AND the operation is done with the CANCELLED status, as long-running operations end
    assert raw["done"] is True and raw["error"]["code"] == 1 and "response" not in raw
    assert raw["metadata"]["state"] == "BATCH_STATE_CANCELLED"
    assert sim.stats.batch_cancelled == 1 and sim.stats.batch_requests == 0
    assert sim.stats.batch_states == {cancelled.name: "JOB_STATE_CANCELLED"}


def test_a_deleted_batch_is_gone(sim: RunningSimulator) -> None:
    sim.configure(api_key=API_KEY, batch_hold=True)

    async def run() -> errors.ClientError:
        async with _developer(sim).aio as client:
            job = await client.batches.create(model=MODEL, src=[_inline(types.Part(text="x"))])
            await client.batches.delete(name=str(job.name))
            with pytest.raises(errors.ClientError) as gone:
                await client.batches.get(name=str(job.name))
            return gone.value

    gone = asyncio.run(run())
    assert gone.code == 404
    assert sim.stats.batch_held == 0 and sim.stats.batch_requests == 0


@pytest.mark.parametrize(
    ("outcome", "state", "api_state"),
    [
        ("failed", types.JobState.JOB_STATE_FAILED, "BATCH_STATE_FAILED"),
        ("expired", types.JobState.JOB_STATE_EXPIRED, "BATCH_STATE_EXPIRED"),
    ],
)
def test_failed_and_expired_batches_end_so_without_output(
    sim: RunningSimulator, outcome: str, state: types.JobState, api_state: str
) -> None:
    # GIVEN a simulator whose batches end badly
    sim.configure(api_key=API_KEY, batch_outcome=outcome, batch_delay_s=0)

    async def run() -> types.BatchJob:
        async with _developer(sim).aio as client:
            job = await client.batches.create(model=MODEL, src=[_inline(types.Part(text="x"))])
            return await _until_ended(client, str(job.name))

    # WHEN a batch runs THEN it ends so, with nothing answered and no output
    done = asyncio.run(run())
    assert done.state == state and done.dest is None and done.end_time is not None
    assert sim.stats.batch_requests == 0 and sim.stats.batch_outputs == []
    raw = _raw(sim, f"/v1beta/{done.name}").json()
    assert raw["done"] is True and raw["metadata"]["state"] == api_state
    assert "response" not in raw and "output" not in raw["metadata"]
    # AND a failed batch's operation carries its error (google-genai does not read it)
    if outcome == "failed":
        assert raw["error"]["code"] == 13 and raw["error"]["message"]
        assert done.error is None
    else:
        assert "error" not in raw


def test_per_request_errors_follow_the_rate_and_code_the_same_way_for_a_seed(
    sim: RunningSimulator,
) -> None:
    # GIVEN half the requests of each batch to fail with 429
    lines = [
        {"key": f"k{i}", "request": {"contents": [{"parts": [{"text": f"t{i}"}]}]}}
        for i in range(6)
    ]

    def run_once() -> list[dict[str, Any]]:
        sim.configure(api_key=API_KEY, batch_delay_s=0, batch_error_rate=0.5, batch_error_code=429)

        async def run() -> bytes:
            async with _developer(sim).aio as client:
                uploaded = await client.files.upload(
                    file=io.BytesIO(_jsonl(lines)), config={"mime_type": "application/jsonl"}
                )
                job = await client.batches.create(model=MODEL, src=str(uploaded.name))
                done = await _until_ended(client, str(job.name))
                assert done.state == types.JobState.JOB_STATE_SUCCEEDED
                assert done.dest is not None and done.dest.file_name is not None
                return await client.files.download(file=done.dest.file_name)

        return [json.loads(line) for line in asyncio.run(run()).decode().splitlines()]

    # WHEN the same batch runs twice from the same seed
    first, second = run_once(), run_once()
    # THEN exactly half the requests got the 429, the same ones both times
    failed = [line["key"] for line in first if "error" in line]
    assert len(failed) == 3 and failed == [line["key"] for line in second if "error" in line]
    assert all(line["error"]["code"] == 429 for line in first if "error" in line)
    assert all(
        _text(line["response"]).startswith("Text: t") for line in first if "response" in line
    )
    assert (sim.stats.batch_requests, sim.stats.batch_errors) == (6, 3)


def test_only_the_known_error_codes_and_outcomes_can_be_configured(sim: RunningSimulator) -> None:
    with pytest.raises(ValueError, match="batch_error_code"):
        SimConfig(batch_error_code=418)
    answer = requests.post(f"{sim.url}/_sim/config", json={"batch_outcome": "late"}, timeout=10)
    assert answer.status_code == 400 and "batch_outcome" in answer.text
    assert sim.simulator.config.batch_outcome == "succeeded"


def test_online_quotas_faults_and_latency_do_not_touch_batch_requests(
    sim: RunningSimulator,
) -> None:
    # GIVEN every online limit at its harshest: no quota left, every call 429, a minute of
    # latency, and no answer let through
    sim.configure(
        api_key=API_KEY,
        batch_delay_s=0,
        daily_quota_exhausted=True,
        rate_429=1.0,
        max_in_flight=0,
        window_quota=0,
        fail_first=5,
        answer_limit=0,
        latency_ms=60_000,
    )
    data, mime = _photos()["chelsea"]

    async def run() -> types.BatchJob:
        async with _developer(sim).aio as client:
            job = await client.batches.create(
                model=MODEL,
                src=[_inline(types.Part.from_bytes(data=data, mime_type=mime))],
            )
            return await _until_ended(client, str(job.name), timeout_s=10)

    # WHEN a batch runs THEN it is answered at once, and in full
    done = asyncio.run(run())
    assert done.dest is not None and done.dest.inlined_responses is not None
    (only,) = done.dest.inlined_responses
    assert only.response is not None and only.response.text == describe_image(data)
    assert sim.stats.batch_errors == 0 and sim.stats.calls == 0
    # AND an online call meets the limits all the same
    with pytest.raises(errors.ClientError) as refused:
        _online(sim, data, mime)
    assert refused.value.code == 429


def test_batch_calls_need_the_same_credentials_as_generate_content(sim: RunningSimulator) -> None:
    # GIVEN a wrong API key, and a Vertex AI call without a bearer token
    async def run() -> errors.ClientError:
        async with _developer(sim, key="wrong").aio as client:
            with pytest.raises(errors.ClientError) as refused:
                await client.batches.list()
            return refused.value

    # WHEN either lists batch jobs THEN it is refused as generateContent refuses it
    developer = asyncio.run(run())
    assert developer.code == 400 and "API key not valid" in str(developer.message)
    path = f"/v1beta1/projects/{PROJECT}/locations/{LOCATION}/batchPredictionJobs"
    vertex = requests.get(f"{sim.url}{path}", timeout=10)
    assert vertex.status_code == 401 and vertex.json()["error"]["status"] == "UNAUTHENTICATED"


# --- Vertex AI --------------------------------------------------------------------------------


@pytest.fixture
def storage_relay(
    emulator_url: str,
) -> Iterator[Callable[..., tuple[RunningRelay, storage.Client]]]:
    """A relay in front of the emulator raising a bucket's finalize events, and a storage
    client going through it."""
    started: list[RunningRelay] = []

    def make(trigger: str) -> tuple[RunningRelay, storage.Client]:
        relay = start_relay(RelayConfig(emulator_url, trigger_buckets=frozenset({trigger})))
        started.append(relay)
        client = storage.Client(
            project="test",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": relay.url},
        )
        return relay, client

    yield make
    for relay in started:
        relay.stop()


def test_a_vertex_job_reads_its_input_from_storage_and_writes_its_output_through_the_relay(
    sim: RunningSimulator, storage_relay: Callable[..., tuple[RunningRelay, storage.Client]]
) -> None:
    # GIVEN an input JSONL in one bucket, an output bucket whose writes raise events, and a
    # held simulator that reaches storage through the relay
    tag = uuid.uuid4().hex[:10]
    relay, gcs = storage_relay(f"out-{tag}")
    inputs, outputs = gcs.create_bucket(f"in-{tag}"), gcs.create_bucket(f"out-{tag}")
    lines = _input_lines()
    lines[0]["request"]["labels"] = {"shard": "1"}
    inputs.blob("batch/requests.jsonl").upload_from_string(_jsonl(lines))
    sim.configure(api_key=API_KEY, storage_url=relay.url, batch_hold=True)
    photos = _photos()

    async def run() -> tuple[types.BatchJob, types.BatchJob, types.BatchJob]:
        async with _vertex(sim).aio as client:
            # WHEN a batch prediction job is created from it
            created = await client.batches.create(
                model=MODEL,
                src=f"gs://{inputs.name}/batch/requests.jsonl",
                config={"display_name": "vertex-shard", "dest": f"gs://{outputs.name}/results"},
            )
            await asyncio.to_thread(_held, sim, 1)
            running = await client.batches.get(name=str(created.name))
            sim.release_batches(str(created.name))
            return created, running, await _until_ended(client, str(created.name))

    created, running, done = asyncio.run(run())
    # THEN the job went pending, running (its output folder named), succeeded
    pattern = rf"projects/{PROJECT}/locations/{LOCATION}/batchPredictionJobs/\d{{19}}"
    assert re.fullmatch(pattern, str(created.name))
    assert created.state == types.JobState.JOB_STATE_PENDING
    assert created.model == f"publishers/google/models/{MODEL}"
    assert created.src is not None and created.src.gcs_uri == [
        f"gs://{inputs.name}/batch/requests.jsonl"
    ]
    assert running.state == types.JobState.JOB_STATE_RUNNING and running.start_time is not None
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED and done.error is None
    assert done.dest is not None and done.dest.gcs_uri == f"gs://{outputs.name}/results"
    assert done.output_info is not None and done.output_info.gcs_output_directory
    folder = done.output_info.gcs_output_directory
    assert re.fullmatch(
        rf"gs://{outputs.name}/results/prediction-model-\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{6}}Z",
        folder,
    )
    assert done.completion_stats is not None
    assert (done.completion_stats.successful_count, done.completion_stats.failed_count) == (3, 1)
    # AND predictions.jsonl in that folder answers each line, joined by its key
    name = folder.removeprefix(f"gs://{outputs.name}/") + "/predictions.jsonl"
    rows = {
        row["key"]: row
        for row in map(json.loads, outputs.blob(name).download_as_text().splitlines())
    }
    assert set(rows) == {*photos, "broken"}
    for key, (data, _) in photos.items():
        row = rows[key]
        assert row["status"] == "" and row["processed_time"]
        assert row["request"] == next(line["request"] for line in lines if line["key"] == key)
        assert _text(row["response"]) == describe_image(data)
    assert rows["astronaut"]["request"]["labels"] == {"shard": "1"}
    assert "response" not in rows["broken"]
    assert rows["broken"]["status"].startswith("Bad Request: ")
    status = json.loads(rows["broken"]["status"].removeprefix("Bad Request: "))
    assert status["error"]["code"] == 400 and status["error"]["status"] == "INVALID_ARGUMENT"
    # AND the write went through the relay, which raised the object's finalize event
    (event,) = relay.stats().objects[name]
    assert event.bucket == outputs.name
    assert sim.stats.batch_outputs == [f"gs://{outputs.name}/{name}"]
    assert (sim.stats.calls, sim.stats.batch_requests, sim.stats.batch_errors) == (0, 4, 1)


def test_vertex_jobs_are_listed_by_filter_cancelled_and_deleted(sim: RunningSimulator) -> None:
    # GIVEN three held jobs, two of one name (their input is never read while held)
    sim.configure(api_key=API_KEY, batch_hold=True)

    async def run() -> dict[str, Any]:
        async with _vertex(sim).aio as client:
            names = []
            for display in ("alpha", "beta", "alpha"):
                job = await client.batches.create(
                    model=MODEL,
                    src="gs://in/requests.jsonl",
                    config={"display_name": display, "dest": "gs://out/x"},
                )
                names.append(str(job.name))
            await asyncio.to_thread(_held, sim, 3)
            # WHEN they are listed by display name, a page at a time
            pager = await client.batches.list(
                config={"filter": 'display_name="alpha"', "page_size": 1}
            )
            alphas = [str(job.name) async for job in pager]
            # AND a running job is deleted (refused), cancelled, then deleted
            with pytest.raises(errors.ClientError) as running_delete:
                await client.batches.delete(name=names[1])
            await client.batches.cancel(name=names[1])
            cancelled = await client.batches.get(name=names[1])
            deleted = await client.batches.delete(name=names[1])
            with pytest.raises(errors.ClientError) as gone:
                await client.batches.get(name=names[1])
            # AND the other two are let go over the simulator's own control endpoint
            requests.post(f"{sim.url}/_sim/batch/finish", json={}, timeout=10).raise_for_status()
            remaining = [await _until_ended(client, name) for name in (names[0], names[2])]
            return {
                "names": names,
                "alphas": alphas,
                "running_delete": running_delete.value,
                "cancelled": cancelled,
                "deleted": deleted,
                "gone": gone.value,
                "remaining": remaining,
            }

    seen = asyncio.run(run())
    names = seen["names"]
    # THEN the filter kept the two alphas, newest first
    assert seen["alphas"] == [names[2], names[0]]
    # AND only a finished job could be deleted
    assert seen["running_delete"].code == 400
    assert seen["running_delete"].status == "FAILED_PRECONDITION"
    cancelled = seen["cancelled"]
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED
    assert cancelled.error is not None and cancelled.error.code == 1
    assert seen["deleted"].done is True and seen["gone"].code == 404
    # AND the released jobs, with no storage to read from, failed saying so
    for job in seen["remaining"]:
        assert job.state == types.JobState.JOB_STATE_FAILED
        assert job.error is not None and "storage_url" in str(job.error.message)
    assert sim.stats.batch_cancelled == 1
    assert sim.stats.batch_displayed_names == ["alpha", "beta", "alpha"]


@pytest.mark.parametrize(
    ("outcome", "state", "error_code"),
    [
        ("failed", types.JobState.JOB_STATE_FAILED, 13),
        ("expired", types.JobState.JOB_STATE_EXPIRED, None),
    ],
)
def test_failed_and_expired_vertex_jobs_end_so_without_output(
    sim: RunningSimulator, outcome: str, state: types.JobState, error_code: int | None
) -> None:
    # GIVEN a simulator whose jobs end badly (before they would read their input)
    sim.configure(api_key=API_KEY, batch_outcome=outcome, batch_delay_s=0)

    async def run() -> types.BatchJob:
        async with _vertex(sim).aio as client:
            job = await client.batches.create(
                model=MODEL,
                src="gs://in/requests.jsonl",
                config={"display_name": outcome, "dest": "gs://out/x"},
            )
            return await _until_ended(client, str(job.name))

    # WHEN a job runs THEN it ends so, its error (if failed) read by google-genai
    done = asyncio.run(run())
    assert done.state == state and done.end_time is not None
    assert (done.error.code if done.error else None) == error_code
    assert done.completion_stats is None and sim.stats.batch_requests == 0
    assert sim.stats.batch_outputs == []


def test_a_vertex_job_whose_storage_fails_ends_failed_saying_so(
    sim: RunningSimulator, storage_relay: Callable[..., tuple[RunningRelay, storage.Client]]
) -> None:
    # GIVEN a relay refusing every write, one input that exists and one that does not
    tag = uuid.uuid4().hex[:10]
    relay, gcs = storage_relay(f"out-{tag}")
    inputs, outputs = gcs.create_bucket(f"in-{tag}"), gcs.create_bucket(f"out-{tag}")
    line = {"key": "a", "request": {"contents": [{"parts": [{"text": "hello"}]}]}}
    inputs.blob("ok.jsonl").upload_from_string(_jsonl([line]))
    relay.set_faults(refuse_writes=True)
    sim.configure(api_key=API_KEY, storage_url=relay.url, batch_delay_s=0)

    async def run(source: str) -> types.BatchJob:
        async with _vertex(sim).aio as client:
            job = await client.batches.create(
                model=MODEL,
                src=f"gs://{inputs.name}/{source}",
                config={"display_name": source, "dest": f"gs://{outputs.name}/out"},
            )
            return await _until_ended(client, str(job.name))

    # WHEN the jobs run THEN the unreadable input and the refused write each fail their job
    unread, unwritten = asyncio.run(run("missing.jsonl")), asyncio.run(run("ok.jsonl"))
    assert unread.state == types.JobState.JOB_STATE_FAILED and unread.error is not None
    assert unread.error.code == 3
    assert f"Could not read gs://{inputs.name}/missing.jsonl" in str(unread.error.message)
    assert unwritten.state == types.JobState.JOB_STATE_FAILED and unwritten.error is not None
    assert "Could not write" in str(unwritten.error.message)
    assert relay.stats().refused_writes == 1 and sim.stats.batch_outputs == []
