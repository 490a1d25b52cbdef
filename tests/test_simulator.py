"""The Gemini simulator checks requests as the real API does (through the real google-genai)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from google import genai
from google.genai import errors, types

from localdev.gemini_sim import RunningSimulator, describe_image

from .conftest import API_KEY, make_image


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
    sim.configure(api_key=API_KEY, max_in_flight=2, latency_ms=200)

    async def burst() -> list[BaseException | types.GenerateContentResponse]:
        options = types.HttpOptions(base_url=sim.url)
        async with genai.Client(api_key=API_KEY, http_options=options).aio as client:
            calls = [client.models.generate_content(model="m", contents="hi") for _ in range(4)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(burst())
    limited = [r for r in results if isinstance(r, errors.ClientError) and r.code == 429]
    assert len(limited) == 2
    assert sim.stats.by_status == {"200": 2, "429": 2}
