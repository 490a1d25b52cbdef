"""The Gemini simulator checks requests as the real API does (through the real google-genai)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from localdev.gemini_sim import RunningSimulator, describe_image, structured_answer

from .conftest import API_KEY, make_image, wait_for


def _generate(
    sim: RunningSimulator, parts: list[Any], *, key: str = API_KEY, api_version: str | None = None
) -> types.GenerateContentResponse:
    async def call() -> types.GenerateContentResponse:
        options = types.HttpOptions(base_url=sim.url, api_version=api_version)
        async with genai.Client(api_key=key, http_options=options).aio as client:
            return await client.models.generate_content(model="gemini-test", contents=parts)

    return asyncio.run(call())


@pytest.mark.parametrize("api_version", [None, "v1beta"])
def test_an_image_gets_its_deterministic_description(
    sim: RunningSimulator, api_version: str | None
) -> None:
    data = make_image(50, 50, "red", "PNG")
    response = _generate(
        sim,
        [types.Part.from_bytes(data=data, mime_type="image/png"), "Describe."],
        api_version=api_version,
    )
    assert response.text == describe_image(data)
    assert response.usage_metadata is not None
    assert response.usage_metadata.prompt_token_count == 258 + 1


def test_unsupported_mime_type_is_invalid_argument(sim: RunningSimulator) -> None:
    data = make_image(20, 20, "red", "GIF")
    with pytest.raises(errors.ClientError) as caught:
        _generate(sim, [types.Part.from_bytes(data=data, mime_type="image/gif"), "x"])
    assert caught.value.code == 400
    assert caught.value.status == "INVALID_ARGUMENT"


def test_bytes_that_do_not_match_their_mime_type_are_invalid(sim: RunningSimulator) -> None:
    data = make_image(20, 20, "red", "PNG")
    with pytest.raises(errors.ClientError) as caught:
        _generate(sim, [types.Part.from_bytes(data=data, mime_type="image/jpeg"), "x"])
    assert caught.value.code == 400


def test_an_image_seen_before_is_answered_alike_and_checked_against_its_type_again(
    sim: RunningSimulator,
) -> None:
    # GIVEN an image the simulator has decoded once (it remembers what recent images
    # decoded to, so the benchmark's repeated photos cost it no CPU)
    data = make_image(30, 21, "green", "PNG")
    png = types.Part.from_bytes(data=data, mime_type="image/png")
    first = _generate(sim, [png, "Describe."])
    decodes = sim.stats.decodes
    # WHEN the same bytes come again THEN the answer is the same, and nothing is decoded
    again = _generate(sim, [png, "Describe."])
    assert again.text == first.text == describe_image(data)
    assert sim.stats.decodes == decodes
    assert [i["digest"] for i in sim.stats.images[-2:]] == [sim.stats.images[-1]["digest"]] * 2
    # AND WHEN they come declared as another type THEN they are refused as before
    with pytest.raises(errors.ClientError) as caught:
        _generate(sim, [types.Part.from_bytes(data=data, mime_type="image/jpeg"), "x"])
    assert caught.value.code == 400


def test_a_wrong_key_is_rejected(sim: RunningSimulator) -> None:
    with pytest.raises(errors.ClientError) as caught:
        _generate(sim, ["hello"], key="wrong")
    assert caught.value.code == 400
    assert "API key not valid" in str(caught.value.message)


def test_rate_limit_answers_carry_retry_info(sim: RunningSimulator) -> None:
    sim.configure(api_key=API_KEY, rate_429=1.0, retry_delay_s=7)
    with pytest.raises(errors.ClientError) as caught:
        _generate(sim, ["hello"])
    assert caught.value.code == 429
    details = caught.value.details["error"]["details"]
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"} in details


def test_calls_above_the_in_flight_limit_get_429(sim: RunningSimulator) -> None:
    # The calls let in are held unanswered, so the four overlap whatever the timing.
    sim.configure(api_key=API_KEY, max_in_flight=2)
    sim.hold()
    results: list[BaseException | types.GenerateContentResponse] = []

    async def burst() -> None:
        options = types.HttpOptions(base_url=sim.url)
        async with genai.Client(api_key=API_KEY, http_options=options).aio as client:
            calls = [client.models.generate_content(model="m", contents="hi") for _ in range(4)]
            results.extend(await asyncio.gather(*calls, return_exceptions=True))

    thread = threading.Thread(target=asyncio.run, args=(burst(),))
    thread.start()
    try:
        wait_for(
            lambda: sim.stats.held == 2 and sim.stats.by_status.get("429") == 2,
            "two calls held and two refused",
        )
    finally:
        sim.release()
        thread.join(60)
    limited = [r for r in results if isinstance(r, errors.ClientError) and r.code == 429]
    assert len(limited) == 2
    assert sim.stats.by_status == {"200": 2, "429": 2}


# --- structured answers -------------------------------------------------------------------------

RICH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "minLength": 1},
        "text_seen": {"type": "string"},
        "labels": {"type": "array", "items": {"type": "string"}},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "outdoor": {"type": "boolean"},
        "size": {
            "type": "object",
            "properties": {"width": {"type": "number"}, "unit": {"enum": ["px", "cm"]}},
            "required": ["width", "unit"],
        },
    },
    "required": ["caption", "text_seen", "labels", "count", "outdoor", "size"],
    "additionalProperties": False,
}


def _generate_json(
    sim: RunningSimulator, data: bytes, config: types.GenerateContentConfig
) -> types.GenerateContentResponse:
    """Ask for a structured answer about a PNG, through the real google-genai client."""

    parts: list[types.PartUnion] = [
        types.Part.from_bytes(data=data, mime_type="image/png"),
        "Describe.",
    ]

    async def call() -> types.GenerateContentResponse:
        options = types.HttpOptions(base_url=sim.url)
        async with genai.Client(api_key=API_KEY, http_options=options).aio as client:
            return await client.models.generate_content(
                model="gemini-test", contents=parts, config=config
            )

    return asyncio.run(call())


def _json_config(schema: dict[str, Any]) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(
        response_mime_type="application/json", response_json_schema=schema
    )


def test_a_json_schema_gets_a_fitting_object_drawn_from_the_image(sim: RunningSimulator) -> None:
    # GIVEN a schema with strings, an array, numbers, a boolean and a nested object
    data = make_image(60, 30, "blue", "PNG")
    # WHEN an image is described with it
    response = _generate_json(sim, data, _json_config(RICH_SCHEMA))
    # THEN the answer is JSON of that shape, the same every time for the same image
    answer = json.loads(response.text or "")
    assert answer == structured_answer(data, RICH_SCHEMA)
    assert answer["caption"] == describe_image(data)
    # A string that may be empty is: the simulator reads no text in images.
    assert answer["text_seen"] == ""
    assert answer["labels"] and all(isinstance(label, str) for label in answer["labels"])
    assert isinstance(answer["count"], int) and 1 <= answer["count"] <= 9
    assert isinstance(answer["outdoor"], bool)
    assert isinstance(answer["size"]["width"], float) and answer["size"]["unit"] in ("px", "cm")
    # AND the schema arrived as the SDK sent it, with the JSON mime type
    assert sim.stats.structured == 1
    assert sim.stats.schemas == [RICH_SCHEMA]


def test_string_lengths_in_the_schema_are_honoured(sim: RunningSimulator) -> None:
    schema = {
        "type": "object",
        "properties": {
            "short": {"type": "string", "minLength": 1, "maxLength": 10},
            "long": {"type": "string", "minLength": 80},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}},
        },
        "required": ["short", "long", "tags"],
    }
    answer = json.loads(
        _generate_json(sim, make_image(40, 40, "red", "PNG"), _json_config(schema)).text or ""
    )
    assert 0 < len(answer["short"]) <= 10
    assert len(answer["long"]) >= 80
    assert all(0 < len(tag) <= 4 for tag in answer["tags"])


def test_the_openapi_response_schema_is_answered_too(sim: RunningSimulator) -> None:
    # GIVEN Gemini's older OpenAPI-style schema (upper-case types), sent as responseSchema
    schema = types.Schema(
        type=types.Type.OBJECT,
        properties={"caption": types.Schema(type=types.Type.STRING, min_length=1, max_length=12)},
        required=["caption"],
    )
    config = types.GenerateContentConfig(
        response_mime_type="application/json", response_schema=schema
    )
    # WHEN an image is described THEN the answer fits it
    answer = json.loads(_generate_json(sim, make_image(40, 40, "red", "PNG"), config).text or "")
    assert list(answer) == ["caption"] and 0 < len(answer["caption"]) <= 12
    assert sim.stats.structured == 1


def test_misfits_come_as_invalid_json_then_an_over_long_string_then_a_missing_key(
    sim: RunningSimulator,
) -> None:
    # GIVEN a simulator told to misfit each image's first three structured answers
    sim.configure(api_key=API_KEY, schema_misfits=3)
    schema = {
        "type": "object",
        "properties": {"alt": {"type": "string", "maxLength": 20}, "tags": {"type": "array"}},
        "required": ["alt", "tags"],
    }
    data = make_image(40, 40, "red", "PNG")
    # WHEN the same image is described four times
    texts = [_generate_json(sim, data, _json_config(schema)).text or "" for _ in range(4)]
    # THEN the answers are broken JSON, too long, lacking a key, and finally fitting
    with pytest.raises(json.JSONDecodeError):
        json.loads(texts[0])
    assert len(json.loads(texts[1])["alt"]) > 20
    assert "alt" not in json.loads(texts[2])
    assert json.loads(texts[3]) == structured_answer(data, schema)
    assert (sim.stats.misfits, sim.stats.structured) == (3, 4)


# --- abandoned calls --------------------------------------------------------------------------


def _call_then_hang_up(sim: RunningSimulator, hang_up_when: Callable[[], bool]) -> None:
    """Send one generateContent call over raw aiohttp and close the connection mid-call."""
    data = make_image(30, 30, "red", "PNG")
    body = {
        "contents": [
            {
                "parts": [
                    {
                        "inlineData": {
                            "mimeType": "image/png",
                            "data": base64.b64encode(data).decode(),
                        }
                    },
                    {"text": "Describe."},
                ]
            }
        ]
    }

    async def run() -> None:
        async with aiohttp.ClientSession() as session:

            async def call() -> None:
                async with session.post(
                    f"{sim.url}/v1beta/models/gemini-test:generateContent",
                    json=body,
                    headers={"x-goog-api-key": API_KEY},
                ) as response:
                    await response.read()

            task = asyncio.create_task(call())
            while not hang_up_when():
                assert not task.done(), "the call was answered before the client hung up"
                await asyncio.sleep(0.01)
            task.cancel()  # aiohttp closes the connection of a cancelled request
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(run())


def test_a_held_call_whose_caller_hung_up_is_abandoned_not_answered(sim: RunningSimulator) -> None:
    # GIVEN a simulator holding every call, and a caller whose call is held
    sim.configure(api_key=API_KEY, answer_limit=0)
    # WHEN the caller closes its connection and then the hold is lifted
    _call_then_hang_up(sim, lambda: sim.stats.held == 1)
    sim.release()
    # THEN the call is counted as abandoned, and nothing as answered
    wait_for(lambda: sim.stats.abandoned == 1, "the held call to be abandoned", 5.0, poll_s=0.01)
    assert (sim.stats.ok, sim.stats.by_status, sim.stats.images) == (0, {}, [])
    assert sim.stats.answered_fingerprints() == Counter()


def test_a_call_whose_caller_hung_up_during_latency_is_abandoned(sim: RunningSimulator) -> None:
    # GIVEN a slow model, and a caller that hangs up while its answer is being prepared
    sim.configure(api_key=API_KEY, latency_ms=300)
    _call_then_hang_up(sim, lambda: sim.stats.in_flight == 1)
    # WHEN the latency has passed THEN the answer was never given nor counted
    wait_for(lambda: sim.stats.abandoned == 1, "the slow call to be abandoned", 5.0, poll_s=0.01)
    assert (sim.stats.ok, sim.stats.by_status, sim.stats.images) == (0, {}, [])


def test_answered_calls_are_counted_per_image(sim: RunningSimulator) -> None:
    # GIVEN two distinct images WHEN one is described twice and the other once
    red, blue = make_image(50, 50, "red", "PNG"), make_image(40, 60, "blue", "PNG")
    for data in (red, red, blue):
        _generate(sim, [types.Part.from_bytes(data=data, mime_type="image/png"), "Describe."])
    # THEN the answers per digest of the bytes received say so
    assert sorted(sim.stats.answered_digests().values()) == [1, 2]
    # AND per fingerprint too, though it is a perceptual hash: make_image's gradient gives
    # every image it makes the same one, whatever the colour or size
    assert sim.stats.answered_fingerprints() == Counter({sim.stats.images[0]["fingerprint"]: 3})
