"""The HTML gallery: escaped and self-contained in its markup, and right in a real browser."""

from __future__ import annotations

from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from describer.gallery import CONTENT_SECURITY_POLICY, GalleryEntry, render_gallery
from describer.images import THUMBNAIL_SIDE, prepare
from describer.settings import DEFAULT_IMAGE_MAX_SIDE, DEFAULT_MAX_IMAGE_PIXELS
from tests.browser import Browser, browser_fixture

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
OUTPUT = ROOT / "test-output"
HOSTILE = "<script>alert(1)</script>"
QUOTED_URL = 'https://example.com/it\'s "quoted".png'.replace(" ", "%20")

browser = browser_fixture()


def thumbnail(name: str) -> bytes:
    """The thumbnail the function makes of a sample photo while preparing it."""
    made = prepare(
        (SAMPLES / name).read_bytes(),
        max_side=DEFAULT_IMAGE_MAX_SIDE,
        max_pixels=DEFAULT_MAX_IMAGE_PIXELS,
        thumbnail_side=THUMBNAIL_SIDE,
    ).thumbnail
    assert made is not None
    return made


def record(source: str, **fields: Any) -> dict[str, Any]:
    """An ok record in the shape of Record.to_json(), with the given fields replaced."""
    base: dict[str, Any] = {
        "source": source,
        "status": "ok",
        "description": f"A photo from {source}.",
        "model": "gemini-2.5-flash",
        "prompt": "Describe this image.",
        "mime_type": "image/jpeg",
        "width": 640,
        "height": 480,
        "usage": {"prompt_tokens": 300, "output_tokens": 40},
        "attempts": 1,
        "latency_ms": 1234,
        "error": None,
    }
    return base | fields


def error_record(source: str, code: str, message: str) -> dict[str, Any]:
    out = record(source, status="error", error={"code": code, "message": message})
    for key in ("description", "mime_type", "width", "height", "usage"):
        del out[key]
    return out


def batch() -> list[GalleryEntry]:
    """Six entries: plain, structured, failed, hostile twice, and one from an older JSONL."""
    structured = record(
        "https://images.example.com/rocket.jpg",
        data={
            "alt_text": "A rocket on its launch pad at night.",
            "description": "A white rocket stands on its floodlit launch pad at dusk.",
            "tags": ["rocket", "launch", "night"],
            "text_in_image": "FALCON 9",
        },
    )
    return [
        GalleryEntry(record("https://images.example.com/chelsea.png"), thumbnail("chelsea.png")),
        GalleryEntry(structured, thumbnail("rocket.jpg")),
        GalleryEntry(
            error_record("https://images.example.com/gone.jpg", "download_failed", "HTTP 404"),
            None,
        ),
        GalleryEntry(
            record(QUOTED_URL + "?q=" + HOSTILE, description=f"{HOSTILE} a cup of coffee"),
            thumbnail("coffee.png"),
        ),
        GalleryEntry(
            error_record("javascript:alert(1)", "forbidden_source", f"{HOSTILE} refused"), None
        ),
        GalleryEntry(
            {"source": "gs://old-bucket/grace_hopper.jpg", "status": "ok", "description": "Old."},
            thumbnail("grace_hopper.jpg"),
        ),
    ]


class _Markup(HTMLParser):
    """What the tests read from the markup: links, summary numbers, meta tags."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[dict[str, str | None]] = []
        self.metas: list[dict[str, str | None]] = []
        self.stats: dict[str, str] = {}
        self.tags: list[str] = []
        self._stat: str | None = None
        self._in_dd = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attributes = dict(attrs)
        if tag == "a":
            self.links.append(attributes)
        elif tag == "meta":
            self.metas.append(attributes)
        elif "data-stat" in attributes:
            self._stat = attributes["data-stat"]
        elif tag == "dd" and self._stat:
            self._in_dd = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "dd":
            self._in_dd = False
            self._stat = None

    def handle_data(self, data: str) -> None:
        if self._in_dd and self._stat:
            self.stats[self._stat] = self.stats.get(self._stat, "") + data


def parse(page: bytes) -> _Markup:
    markup = _Markup()
    markup.feed(page.decode("utf-8"))
    return markup


def test_markup_escapes_untrusted_text_and_links_only_web_sources() -> None:
    """Hostile sources, descriptions and messages stay text; only http(s) sources are links."""
    # GIVEN a batch whose sources, descriptions and error messages carry markup and a script URL
    entries = batch()

    # WHEN it is rendered
    page = render_gallery(entries, title=f"Batch {HOSTILE}")
    markup = parse(page)

    # THEN no script element or script URL exists, and the policy forbids scripts and requests
    assert b"<script" not in page.lower()
    assert "script" not in markup.tags
    assert {"http-equiv": "Content-Security-Policy", "content": CONTENT_SECURITY_POLICY} in (
        markup.metas
    )
    # title and heading, a source as href and as text, a description and an error message
    assert page.count(b"&lt;script&gt;alert(1)&lt;/script&gt;") == 6
    # every link is one of the http(s) sources, exactly as given, and leaks nothing to its target
    web_sources = [e.record["source"] for e in entries if e.record["source"].startswith("http")]
    assert [link["href"] for link in markup.links] == web_sources
    assert all(link["rel"] == "noopener noreferrer" for link in markup.links)
    assert b"javascript:alert(1)" in page  # shown, as plain text


def test_gallery_in_a_real_browser(browser: Browser) -> None:
    """In Chromium the page loads cleanly: one card per entry in order, all thumbnails shown."""
    # GIVEN a rendered gallery of sample photos, a failure and hostile strings, written to disk
    entries = batch()
    OUTPUT.mkdir(exist_ok=True)
    html_path = OUTPUT / "gallery.html"
    html_path.write_bytes(render_gallery(entries, title="Gallery test", elapsed_s=12.5))

    # WHEN Chromium opens it
    page = browser.open(html_path)

    # THEN nothing was blocked or failed (a CSP violation or a failed load is SEVERE)
    assert page.errors() == []
    # one card per entry, in input order, each showing its number and its source as text
    cards = page.texts(".card")
    assert len(cards) == page.count("article") == len(entries)
    for number, (text, entry) in enumerate(zip(cards, entries, strict=True), start=1):
        assert f"#{number} {entry.record['source']}" in text
    # every thumbnail is drawn, and entries without one get a placeholder instead
    assert page.count(".card img") == sum(1 for e in entries if e.thumbnail)
    assert page.images_loaded(), page.broken_images()
    assert page.count(".thumb .none") == sum(1 for e in entries if e.thumbnail is None)
    # the failures read as errors with their codes; the hostile description is literal text
    errors = page.texts(".card.error")
    assert len(errors) == 2
    assert "download_failed HTTP 404" in errors[0]
    assert f"forbidden_source {HOSTILE} refused" in errors[1]
    assert f"{HOSTILE} a cup of coffee" in cards[3]
    assert page.count('a[href^="javascript"]') == 0
    # the structured record shows its alt text, tags as chips and the text in the image
    assert page.texts(".card:nth-child(2) .tags li") == ["rocket", "launch", "night"]
    assert "A rocket on its launch pad at night." in cards[1]
    assert "FALCON 9" in cards[1]
    # and the summary counts the batch
    assert page.texts('[data-stat="images"] dd') == ["6"]
    assert page.texts('[data-stat="errors"] dd') == ["2"]

    shot = page.screenshot(OUTPUT / "gallery.png")
    with Image.open(shot) as image:
        assert image.format == "PNG"
        assert image.width == browser.width
        assert image.height > 600  # the whole page, not just a blank window
    assert shot.stat().st_size > 50_000


def test_summary_numbers() -> None:
    """The summary counts images, ok and errors, sums tokens, and shows time, model and prompt."""
    # GIVEN two described images, one failure and one ok record with an odd usage field
    entries = [
        GalleryEntry(
            record("https://a.example/1.png", usage={"prompt_tokens": 1000, "output_tokens": 20}),
            None,
        ),
        GalleryEntry(
            record("https://a.example/2.png", usage={"prompt_tokens": 250, "output_tokens": 5}),
            None,
        ),
        GalleryEntry(error_record("https://a.example/3.png", "model_error", "Boom."), None),
        GalleryEntry(record("https://a.example/4.png", usage="lots", prompt="Other prompt."), None),
    ]

    # WHEN it is rendered with an elapsed time and a fixed generation time
    page = render_gallery(
        entries,
        title="t",
        elapsed_s=75.4,
        generated_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )

    # THEN the numbers are those of the batch
    assert parse(page).stats == {
        "images": "4",
        "ok": "3",
        "errors": "1",
        "prompt_tokens": "1,250",
        "output_tokens": "25",
        "elapsed": "1 min 15 s",
    }
    text = page.decode()
    assert "<code>gemini-2.5-flash</code>" in text
    assert "<q>Describe this image.</q><q>Other prompt.</q>" in text
    assert "2026-01-02 03:04:05 UTC" in text
    # and without an elapsed time there is no elapsed figure
    assert "elapsed" not in parse(render_gallery(entries, title="t")).stats


@pytest.mark.parametrize(
    "odd",
    [
        {},
        {"status": "ok"},
        {"status": "error", "error": "just a string"},
        {"status": "error", "error": {"code": 7, "message": ["no"]}},
        {
            "source": 42,
            "status": "ok",
            "description": None,
            "usage": {"prompt_tokens": "12", "output_tokens": None},
            "width": "wide",
            "height": 3.5,
            "latency_ms": float("nan"),
            "attempts": True,
            "model": ["m"],
            "data": {"alt_text": 1, "tags": "not-a-list", "text_in_image": {}},
        },
        {"status": "ok", "data": ["not", "a", "mapping"], "usage": [1, 2]},
    ],
)
def test_odd_records_still_render(odd: dict[str, Any]) -> None:
    """Records from older JSONL, missing or mistyping any field, still get a card."""
    page = render_gallery([GalleryEntry(odd, None)], title="old")

    assert page.count(b'<article class="card ') == 1
    assert parse(page).stats["images"] == "1"
