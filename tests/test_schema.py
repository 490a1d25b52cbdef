"""Structured answers: the schema reaches Gemini over HTTP, answers are checked, misfits retried.

The Describer runs with the real google-genai client from GeminiConnector against
the Gemini simulator; ``validate`` is tested on its own below.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from describer import Code, SourceError
from describer.gemini import Described, Describer, GeminiConnector, ModelSwitch
from describer.images import prepare
from describer.quota import CallGate
from describer.schemas import ALT_TEXT_MAX_CHARS, SCHEMAS, SchemaMismatch, validate
from describer.settings import GeminiAccess
from localdev.gemini_sim import RunningSimulator, describe_image, structured_answer

from .conftest import API_KEY, make_image

ALT_TEXT = SCHEMAS["alt_text"]


def _describe(
    sim: RunningSimulator,
    data: bytes,
    *,
    schema: str | None = "alt_text",
    model: str = "gemini-test",
    media_resolution: str = "default",
) -> Described:
    """Describe ``data`` as the pipeline does: a real client on a session of our own."""
    image = prepare(data, max_side=1568, max_pixels=50_000_000)

    async def run() -> Described:
        connector = GeminiConnector(GeminiAccess(api_key=API_KEY, base_url=sim.url))
        async with connector.open_session() as session:
            client = connector.client(session, timeout_s=10)
            try:
                describer = Describer(
                    client,
                    gate=CallGate(4),
                    switch=ModelSwitch(model, None),
                    max_attempts=3,
                    backoff_s=0.01,
                    media_resolution=media_resolution,
                )
                return await describer.describe(image, "Describe the image.", schema=schema)
            finally:
                await client.aio.aclose()

    return asyncio.run(run())


# --- the Describer against the simulator -----------------------------------------------------


def test_a_structured_answer_is_validated_and_its_description_is_the_text(
    sim: RunningSimulator,
) -> None:
    # GIVEN an image WHEN it is described with the alt_text schema
    data = make_image(60, 40, "red", "PNG")
    described = _describe(sim, data)
    # THEN the data is the simulator's answer for that image, and the text its description
    assert described.data is not None
    assert described.data == structured_answer(data, ALT_TEXT.json_schema)
    assert described.text == described.data["description"] == describe_image(data)
    assert set(described.data) == {"alt_text", "description", "tags", "text_in_image"}
    assert described.attempts == 1
    # AND the JSON mime type and the schema reached the server over HTTP
    assert sim.stats.structured == 1
    assert sim.stats.schemas == [ALT_TEXT.json_schema]


def test_the_schema_and_the_media_resolution_are_sent_together(sim: RunningSimulator) -> None:
    # GIVEN a Gemini 3 model with a media resolution WHEN a structured answer is asked for
    described = _describe(
        sim, make_image(40, 40, "blue", "PNG"), model="gemini-3-test", media_resolution="low"
    )
    # THEN one request carried both
    assert described.data is not None
    assert sim.stats.media_resolutions == ["MEDIA_RESOLUTION_LOW"]
    assert sim.stats.structured == 1


def test_free_text_is_unchanged_without_a_schema(sim: RunningSimulator) -> None:
    # GIVEN no schema WHEN an image is described THEN the text is free and nothing is structured
    data = make_image(40, 30, "green", "PNG")
    described = _describe(sim, data, schema=None)
    assert (described.text, described.data) == (describe_image(data), None)
    assert sim.stats.structured == 0


def test_one_misfit_is_asked_for_again_and_counts_as_an_attempt(sim: RunningSimulator) -> None:
    # GIVEN a model whose first structured answer for each image is not even JSON
    data = make_image(50, 50, "red", "PNG")
    alone = _describe(sim, data)
    sim.configure(api_key=API_KEY, schema_misfits=1)
    # WHEN an image is described
    described = _describe(sim, data)
    # THEN the second answer fits, both calls count, and the usage covers both
    assert described.data == alone.data
    assert described.attempts == 2
    assert (sim.stats.calls, sim.stats.misfits, sim.stats.structured) == (2, 1, 2)
    assert alone.usage is not None and described.usage is not None
    assert described.usage.prompt_tokens == 2 * alone.usage.prompt_tokens


def test_two_misfits_are_a_model_error_that_names_the_problem(sim: RunningSimulator) -> None:
    # GIVEN a model that misfits twice: invalid JSON, then an over-long alt_text
    sim.configure(api_key=API_KEY, schema_misfits=2)
    # WHEN an image is described THEN it fails for good after exactly two calls
    with pytest.raises(SourceError) as caught:
        _describe(sim, make_image(50, 50, "red", "PNG"))
    error = caught.value
    assert (error.code, error.attempts, error.transient) == (Code.MODEL_ERROR, 2, False)
    assert error.message.startswith("Gemini's answer did not fit the alt_text schema twice: ")
    assert re.search(r": alt_text is \d+ characters long, over the 125 allowed$", error.message)
    assert sim.stats.calls == 2


def test_a_rate_limit_on_a_structured_call_is_retried_by_the_normal_policy(
    sim: RunningSimulator,
) -> None:
    # GIVEN a model that answers each image's first call with 429
    sim.configure(api_key=API_KEY, fail_first=1, retry_delay_s=0.01)
    # WHEN a structured answer is asked for THEN the retry gets it
    described = _describe(sim, make_image(50, 50, "red", "PNG"))
    assert described.data is not None
    assert described.attempts == 2
    assert sim.stats.by_status == {"429": 1, "200": 1}
    assert sim.stats.structured == 1


def test_rate_limits_and_misfits_are_counted_in_one_tally(sim: RunningSimulator) -> None:
    # GIVEN a 429, then a misfit, then a fitting answer
    sim.configure(api_key=API_KEY, fail_first=1, retry_delay_s=0.01, schema_misfits=1)
    # WHEN an image is described THEN attempts are exactly the calls the server saw
    described = _describe(sim, make_image(50, 50, "red", "PNG"))
    assert described.data is not None
    assert described.attempts == sim.stats.calls == 3


# --- validate ------------------------------------------------------------------------------

GOOD = {
    "alt_text": "A red square.",
    "description": "A red square on a white ground.",
    "tags": ["red", "square"],
    "text_in_image": "",
}


def _with(**changes: object) -> str:
    return json.dumps({**GOOD, **changes})


def test_a_fitting_answer_is_returned_with_whitespace_trimmed() -> None:
    text = _with(alt_text="  A red square.\n", tags=[" red ", "square"], text_in_image="  ")
    assert validate("alt_text", f"\n{text}\n") == GOOD


def test_alt_text_of_exactly_the_limit_fits() -> None:
    alt = "x" * ALT_TEXT_MAX_CHARS
    assert validate("alt_text", _with(alt_text=alt))["alt_text"] == alt


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (_with(alt_text="x" * 126), "alt_text is 126 characters long, over the 125 allowed"),
        (_with(alt_text="   "), "alt_text is empty"),
        (_with(mood="sunny"), "the answer has unexpected key 'mood'"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "tags"}), "the answer lacks key 'tags'"),
        (_with(tags="red, square"), "tags is a string, not an array"),
        (_with(tags=["red", 3]), "tags[1] is an integer, not a string"),
        (_with(tags=["red", " "]), "tags[1] is empty"),
        (_with(alt_text=None), "alt_text is null, not a string"),
        (_with(text_in_image=False), "text_in_image is a boolean, not a string"),
        ('["A red square."]', "the answer is an array, not an object"),
        ('{"alt_text": "A red', "the answer is not JSON (Unterminated string"),
        ("", "the answer is not JSON (Expecting value: char 0)"),
    ],
)
def test_a_misfit_is_refused_saying_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(SchemaMismatch) as caught:
        validate("alt_text", text)
    assert str(caught.value).startswith(reason)


def test_a_misfit_message_stays_short_whatever_the_answer() -> None:
    # GIVEN an answer with a huge extra key and a huge alt_text
    text = _with(**{"k" * 5000: 1}, alt_text="x" * 100_000)
    # WHEN it is validated THEN the message names the problem without echoing the answer
    with pytest.raises(SchemaMismatch) as caught:
        validate("alt_text", text)
    assert len(str(caught.value)) < 120


def test_an_unknown_schema_name_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        validate("haiku", "{}")
