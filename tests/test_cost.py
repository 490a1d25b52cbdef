"""What a batch costs: the media resolution sent to Gemini 3 and the tokens summed per batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from describer import Runtime, Settings
from describer.errors import ConfigError
from localdev.gemini_sim import RunningSimulator

from .conftest import post_batch


def _body(reply: Any) -> dict[str, Any]:
    assert reply.status == 200, reply.body
    return reply.body  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("model", "setting", "sent", "image_tokens"),
    [
        ("gemini-3.5-flash-lite", "medium", "MEDIA_RESOLUTION_MEDIUM", 560),
        ("gemini-3.5-flash-lite", "low", "MEDIA_RESOLUTION_LOW", 280),
        ("gemini-3-pro", "high", "MEDIA_RESOLUTION_HIGH", 1120),
        # The model's own default: nothing is sent, and Gemini 3 bills it as high.
        ("gemini-3.5-flash-lite", "default", "", 1120),
        # Earlier models tile images instead: the setting is not theirs, so it is not sent.
        ("gemini-2.5-flash", "low", "", 258),
    ],
)
def test_media_resolution_is_sent_to_gemini_3_models_only(
    make_runtime: Callable[..., Runtime],
    image_server: str,
    sim: RunningSimulator,
    model: str,
    setting: str,
    sent: str,
    image_tokens: int,
) -> None:
    """MEDIA_RESOLUTION reaches Gemini 3 calls as generationConfig.mediaResolution."""
    runtime = make_runtime(model=model, media_resolution=setting, prompt="Three words.")
    (record,) = _body(post_batch(runtime, {"images": [f"{image_server}/chelsea.png"]}))["results"]
    assert record["status"] == "ok"
    assert sim.stats.media_resolutions == [sent]
    # The simulator bills as Gemini does: the image's tokens plus the prompt's words.
    assert record["usage"]["prompt_tokens"] == image_tokens + 2


def test_tokens_are_recorded_per_image_and_summed_per_batch(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """The response's usage is the sum of its records' usage; failed sources add nothing."""
    runtime = make_runtime()
    images = [
        f"{image_server}/chelsea.png",
        f"{image_server}/coffee.png",
        f"{image_server}/missing.png",
    ]
    body = _body(post_batch(runtime, {"images": images}))
    records = body["results"]
    assert [r["status"] for r in records] == ["ok", "ok", "error"]
    assert body["usage"] == {
        "prompt_tokens": sum(r["usage"]["prompt_tokens"] for r in records[:2]),
        "output_tokens": sum(r["usage"]["output_tokens"] for r in records[:2]),
    }
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["output_tokens"] > 0


def test_an_unknown_media_resolution_refuses_to_start() -> None:
    """A typo in MEDIA_RESOLUTION is a configuration error naming the allowed values."""
    with pytest.raises(ConfigError, match="MEDIA_RESOLUTION must be one of low, medium, high"):
        Settings.from_env({"MEDIA_RESOLUTION": "ultra"})
    assert Settings.from_env({"MEDIA_RESOLUTION": "LOW"}).media_resolution == "low"
