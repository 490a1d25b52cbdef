"""Remake docs/gallery.png, the README's picture of a gallery, from the sample photos.

Run from the repository root after scripts/ensure-browser.sh:

    .venv/bin/python -m scripts.gallery_screenshot

The descriptions are written by hand to look like Gemini's, and the times are fixed, so the
picture changes only when the gallery's look does.
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from describer.gallery import GalleryEntry, render_gallery
from describer.images import THUMBNAIL_SIDE, prepare
from describer.settings import DEFAULT_IMAGE_MAX_SIDE, DEFAULT_MAX_IMAGE_PIXELS
from tests.browser import Browser

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
DEFAULT_OUTPUT = ROOT / "docs" / "gallery.png"
WIDTH = 1200
MODEL = "gemini-2.5-flash"
PROMPT = "Describe this image in one or two sentences for someone who cannot see it."
BASE_URL = "https://images.example.com/samples/"
GENERATED_AT = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)


def _thumbnail(path: Path) -> bytes:
    """The thumbnail the function makes of the photo while preparing it."""
    made = prepare(
        path.read_bytes(),
        max_side=DEFAULT_IMAGE_MAX_SIDE,
        max_pixels=DEFAULT_MAX_IMAGE_PIXELS,
        thumbnail_side=THUMBNAIL_SIDE,
    ).thumbnail
    if made is None:
        raise ValueError(f"no thumbnail could be made of {path}")
    return made


def _ok(
    name: str, description: str, output_tokens: int, latency_ms: int, **extra: Any
) -> GalleryEntry:
    path = SAMPLES / name
    with Image.open(path) as image:
        width, height = image.size
    record: dict[str, Any] = {
        "source": BASE_URL + name,
        "status": "ok",
        "description": description,
        "model": MODEL,
        "prompt": PROMPT,
        "mime_type": "image/png" if name.endswith(".png") else "image/jpeg",
        "width": width,
        "height": height,
        "usage": {"prompt_tokens": 276, "output_tokens": output_tokens},
        "attempts": 1,
        "latency_ms": latency_ms,
        "error": None,
    } | extra
    return GalleryEntry(record, _thumbnail(path))


def sample_entries() -> list[GalleryEntry]:
    """Five described sample photos (one structured) and one download that failed."""
    missing = {
        "source": BASE_URL + "lighthouse.jpg",
        "status": "error",
        "model": MODEL,
        "prompt": PROMPT,
        "attempts": 1,
        "latency_ms": 212,
        "error": {
            "code": "not_found",
            "message": "The server answered 404 Not Found for this URL.",
        },
    }
    return [
        _ok(
            "chelsea.png",
            "A close-up of a tabby cat with green eyes looking slightly to the left, "
            "against a soft pinkish background.",
            38,
            1840,
        ),
        _ok(
            "rocket.jpg",
            "A white Falcon 9 rocket stands upright on its launch pad at dusk, lit by "
            "floodlights and flanked by lightning towers.",
            61,
            2310,
            data={
                "alt_text": "A Falcon 9 rocket on its floodlit launch pad at dusk.",
                "description": "A white Falcon 9 rocket stands upright on its launch pad at "
                "dusk, lit by floodlights and flanked by lightning towers.",
                "tags": ["rocket", "launch pad", "dusk", "spaceflight"],
                "text_in_image": "",
            },
        ),
        _ok(
            "coffee.png",
            "A cup of espresso with crema on a red saucer with a small spoon, "
            "seen from above on a wooden table.",
            35,
            1622,
        ),
        GalleryEntry(missing, None),
        _ok(
            "astronaut.png",
            "An astronaut in an orange launch and entry suit smiles in front of an "
            "American flag, holding a helmet.",
            42,
            1975,
        ),
        _ok(
            "grace_hopper.jpg",
            "A formal portrait of a woman in a dark naval uniform with medals and an "
            "officer's cap, in front of a U.S. flag.",
            44,
            2104,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    page = render_gallery(
        sample_entries(), title="Sample batch", elapsed_s=4.8, generated_at=GENERATED_AT
    )
    with tempfile.TemporaryDirectory() as scratch, Browser(width=WIDTH) as browser:
        html_path = Path(scratch) / "gallery.html"
        html_path.write_bytes(page)
        shown = browser.open(html_path)
        if problems := shown.errors() or shown.broken_images():
            raise SystemExit(f"the gallery did not load cleanly: {problems}")
        shot = shown.screenshot(args.output)
    # Screenshots of photos compress poorly as PNG: keep the README's copy small.
    with Image.open(shot) as image:
        image.convert("RGB").save(shot, "PNG", optimize=True)
    print(f"wrote {shot.relative_to(ROOT) if shot.is_relative_to(ROOT) else shot}")


if __name__ == "__main__":
    main()
