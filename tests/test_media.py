"""Media from the wild: every format, mode and orientation the function meets, end to end.

Each file is served by a real loopback server under a misleading ``.jpg`` name (so
the Content-Type says image/jpeg for all of them), described through the real
pipeline and the real google-genai client, and judged by what the project's
Gemini simulator received: a type it accepts, upright, with the same pixels as
the original picture.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageCms

import describer.images  # noqa: F401 - registers the HEIF opener that describe_image needs
from describer import Runtime
from localdev import procs
from localdev.gemini_sim import SUPPORTED, RunningSimulator, describe_image

from .conftest import API_KEY, png_bytes, post_batch

RED = (220, 30, 30)
YELLOW = (220, 200, 50)
GREEN = (40, 160, 60)


def _upright() -> Image.Image:
    """A wide picture no rotation or mirror leaves unchanged: red, yellow bottom-left quarter.

    Flat colours on the simulator's 8x8 grid keep its average hash stable through
    JPEG, HEVC and AV1 noise; the yellow quarter moves under every transposition.
    """
    image = Image.new("RGB", (96, 48), RED)
    image.paste(YELLOW, (0, 24, 48, 48))
    return image


# EXIF orientation -> how the camera stored an upright scene (the inverse of the display fix).
_STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _rotated(fmt: str, orientation: int, **options: Any) -> bytes:
    """The upright picture stored sideways, with the EXIF orientation that puts it right."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = _upright().transpose(_STORED[orientation])
    return _save(stored, fmt, exif=exif.tobytes(), **options)


def _frames(fmt: str, **options: Any) -> bytes:
    """The picture as the first of two frames (or pages); the second is plain green."""
    first = _upright()
    return _save(
        first, fmt, save_all=True, append_images=[Image.new("RGB", first.size, GREEN)], **options
    )


def _grey16() -> Image.Image:
    """The picture's grey levels on 16 bits (v * 257), as a scanner or a raw converter writes."""
    return _upright().convert("L").convert("I").point(lambda v: v * 257).convert("I;16")


_png = png_bytes


def _rgb16_png() -> bytes:
    """The picture as a 48-bit RGB PNG: each 8-bit sample v stored as v * 257."""
    image = _upright()
    raw, stride = image.tobytes(), image.width * 3
    rows = b"".join(
        b"\x00" + b"".join(struct.pack(">H", v * 257) for v in raw[y * stride : (y + 1) * stride])
        for y in range(image.height)
    )
    return _png(image.width, image.height, 16, 2, zlib.compress(rows))


def _png_bomb(side: int = 30_000) -> bytes:
    """About 110 KB that decode to side x side pixels (900 MB at one byte a pixel)."""
    packer = zlib.compressobj(9)
    row = bytes(1 + side // 8)  # filter byte + one bit per pixel, all black
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return _png(side, side, 1, 0, body)


def _heif_declaring(width: int, height: int) -> bytes:
    """A real HEIC whose header (ispe) claims width x height: the HEVC data stays 64x64."""
    small = _save(Image.new("RGB", (64, 64), RED), "HEIF")
    at = small.index(b"ispe")
    return small[: at + 8] + struct.pack(">II", width, height) + small[at + 16 :]


def _to_lab(image: Image.Image) -> Image.Image:
    """The picture in CIE L*a*b*, as prepress TIFFs store it."""
    srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    return ImageCms.buildTransform(srgb, lab, "RGB", "LAB").apply(image)


def _transparent_gif() -> bytes:
    """A two-colour GIF whose yellow is its transparent index, as web graphics have."""
    palette = _upright().convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    return _save(palette, "GIF", transparency=palette.getpixel((0, 47)))


def _one_bit(image: Image.Image) -> Image.Image:
    """Black and white, thresholded (no dither), so the flat areas stay flat."""
    return image.convert("L").point(lambda v: 255 if v > 128 else 0).convert("1")


# --- the served files -------------------------------------------------------------------------

# name -> (bytes, the record's mime_type, what Gemini must be sent, the reference picture)
Case = tuple[bytes, str, str, bytes]


def _cases() -> dict[str, Case]:
    upright = _upright()
    colour = _save(upright, "PNG")
    grey = _save(upright.convert("L"), "PNG")
    heif = _save(upright, "HEIF", quality=90)
    cases: dict[str, Case] = {
        "gif": (_save(upright, "GIF"), "image/gif", "image/jpeg", colour),
        "gif-animated": (_frames("GIF"), "image/gif", "image/jpeg", colour),
        "tiff": (_save(upright, "TIFF"), "image/tiff", "image/jpeg", colour),
        "tiff-multipage": (_frames("TIFF"), "image/tiff", "image/jpeg", colour),
        "tiff-cmyk": (_save(upright.convert("CMYK"), "TIFF"), "image/tiff", "image/jpeg", colour),
        "tiff-rgba": (_save(upright.convert("RGBA"), "TIFF"), "image/tiff", "image/png", colour),
        "tiff-lab": (_save(_to_lab(upright), "TIFF"), "image/tiff", "image/jpeg", colour),
        "tiff-16bit-grey": (_save(_grey16(), "TIFF"), "image/tiff", "image/jpeg", grey),
        "tiff-orientation-3": (_rotated("TIFF", 3), "image/tiff", "image/jpeg", colour),
        "bmp": (_save(upright, "BMP"), "image/bmp", "image/jpeg", colour),
        "ico": (
            _save(upright.convert("RGBA"), "ICO", sizes=[(96, 48)]),
            "image/x-icon",
            "image/png",
            colour,
        ),
        "ppm": (_save(upright, "PPM"), "image/x-portable-pixmap", "image/jpeg", colour),
        "pgm-16bit": (_save(_grey16(), "PPM"), "image/x-portable-graymap", "image/jpeg", grey),
        "jpeg2000": (_save(upright, "JPEG2000"), "image/jp2", "image/jpeg", colour),
        "qoi": (_save(upright, "QOI"), "image/qoi", "image/jpeg", colour),
        "jpeg-cmyk": (_save(upright.convert("CMYK"), "JPEG"), "image/jpeg", "image/jpeg", colour),
        "png-16bit-grey": (_save(_grey16(), "PNG"), "image/png", "image/jpeg", grey),
        "png-16bit-rgb": (_rgb16_png(), "image/png", "image/jpeg", colour),
        "gif-transparent": (_transparent_gif(), "image/gif", "image/png", colour),
        "tiff-1bit": (
            _save(_one_bit(upright), "TIFF"),
            "image/tiff",
            "image/jpeg",
            _save(_one_bit(upright).convert("L"), "PNG"),
        ),
        "tiff-grey-alpha": (_save(upright.convert("LA"), "TIFF"), "image/tiff", "image/png", grey),
        "apng": (_frames("PNG"), "image/apng", "image/jpeg", colour),
        "webp-animated": (_frames("WEBP", lossless=True), "image/webp", "image/jpeg", colour),
        "avif": (_save(upright, "AVIF", quality=90), "image/avif", "image/jpeg", colour),
        "heic": (heif, "image/heic", "image/jpeg", colour),
    }
    for orientation in range(2, 9):
        cases[f"jpeg-orientation-{orientation}"] = (
            _rotated("JPEG", orientation, quality=95),
            "image/jpeg",
            "image/jpeg",
            colour,
        )
    cases["png-orientation-6"] = (_rotated("PNG", 6), "image/png", "image/jpeg", colour)
    cases["webp-orientation-8"] = (
        _rotated("WEBP", 8, lossless=True),
        "image/webp",
        "image/jpeg",
        colour,
    )
    # pillow-heif turns the EXIF orientation into irot/imir boxes, as iPhones write them.
    cases["heic-orientation-6"] = (
        _rotated("HEIF", 6, quality=90),
        "image/heic",
        "image/jpeg",
        colour,
    )
    cases["avif-orientation-8"] = (
        _rotated("AVIF", 8, quality=90),
        "image/avif",
        "image/jpeg",
        colour,
    )
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the served files live; each test adds its own, under names of its own."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def media(media_dir: Path) -> Iterator[str]:
    """A static file server on loopback over ``media_dir``."""
    server, url = procs.serve_directory(media_dir)
    yield url
    server.shutdown()


def _describe(
    make_runtime: Callable[..., Runtime],
    media: str,
    media_dir: Path,
    files: dict[str, bytes],
    **settings: Any,
) -> list[dict[str, Any]]:
    """Serve ``files`` and describe them in one batch; the records, in the files' order."""
    for name, data in files.items():
        (media_dir / name).write_bytes(data)
    # http.server listens with a backlog of 5: more simultaneous connections wait for
    # a SYN retry (a second), so the downloads are kept below it.
    settings.setdefault("download_concurrency", 4)
    reply = post_batch(make_runtime(**settings), {"images": [f"{media}/{n}" for n in files]})
    assert reply.status == 200, reply.body
    return reply.body["results"]  # type: ignore[no-any-return]


# --- what is converted, and how -------------------------------------------------------------


def test_every_convertible_format_reaches_the_model_supported_and_upright(
    make_runtime: Callable[..., Runtime], media: str, media_dir: Path, sim: RunningSimulator
) -> None:
    """Each format, mode and orientation arrives as a type Gemini accepts, upright, same picture."""
    # GIVEN files Gemini would refuse or see sideways, all named .jpg (served as image/jpeg)
    files = {f"{name}.jpg": data for name, (data, *_) in CASES.items()}
    # WHEN they are described one after the other (so the simulator sees them in order)
    records = _describe(
        make_runtime, media, media_dir, files, download_concurrency=1, model_concurrency=1
    )
    # THEN each is described, its record naming the source's true type and upright size,
    # AND the model received a supported type, re-encoded (never the downloaded bytes),
    # upright, and described exactly as the upright original
    assert [r["status"] for r in records] == ["ok"] * len(CASES), [r["error"] for r in records]
    problems = []
    for record, seen, (name, case) in zip(records, sim.stats.images, CASES.items(), strict=True):
        data, source_mime, sent_mime, reference = case
        got = (
            (record["mime_type"], record["width"], record["height"]),
            (seen["mime_type"], seen["width"], seen["height"]),
            seen["bytes"] == len(data),
            record["description"],
        )
        wanted = (
            (source_mime, 96, 48),
            (sent_mime, 96, 48),
            False,
            describe_image(reference),
        )
        if got != wanted:
            problems.append((name, got, wanted))
    assert problems == []
    assert {seen["mime_type"] for seen in sim.stats.images} <= set(SUPPORTED)


def test_sixteen_bit_grey_is_scaled_not_clipped_to_white(
    make_runtime: Callable[..., Runtime], media: str, media_dir: Path, sim: RunningSimulator
) -> None:
    """A mid-grey 16-bit PNG reaches the model mid-grey, where a plain convert() gives white."""
    # GIVEN a 16-bit PNG whose every sample is 40000 of 65535 (about 155 of 255)
    data = _save(Image.new("I;16", (64, 64), 40000), "PNG")
    # WHEN it is described
    (record,) = _describe(make_runtime, media, media_dir, {"grey16.png": data})
    # THEN the model saw grey, described as the same picture on 8 bits is
    assert record["status"] == "ok"
    (seen,) = sim.stats.images
    assert seen["colour"] == "grey"
    assert record["description"] == describe_image(_save(Image.new("L", (64, 64), 155), "PNG"))


def test_small_upright_supported_images_are_sent_byte_for_byte(
    make_runtime: Callable[..., Runtime], media: str, media_dir: Path, sim: RunningSimulator
) -> None:
    """Small upright 8-bit PNG, JPEG and WebP files reach the model as the very bytes downloaded."""
    exif = Image.Exif()
    exif[0x0112] = 1
    files = {
        "tagged.jpg": _save(_upright(), "JPEG", exif=exif.tobytes()),
        "untagged.jpg": _save(_upright(), "JPEG"),
        "photo.webp": _save(_upright(), "WEBP", lossless=True),
        "palette.png": _save(_upright().convert("P"), "PNG", transparency=0),
        "line-art.png": _save(_one_bit(_upright()), "PNG"),
    }
    # WHEN small JPEG (Orientation 1 or no tag), WebP, palette and 1-bit PNG files are described
    records = _describe(make_runtime, media, media_dir, files)
    # THEN each is ok and the model received exactly the bytes of each file
    assert [r["status"] for r in records] == ["ok"] * len(files)
    assert sorted(s["bytes"] for s in sim.stats.images) == sorted(len(d) for d in files.values())
    assert {s["mime_type"] for s in sim.stats.images} == {"image/jpeg", "image/webp", "image/png"}


def test_a_large_rotated_photo_is_downscaled_and_turned_upright(
    make_runtime: Callable[..., Runtime], media: str, media_dir: Path, sim: RunningSimulator
) -> None:
    """Downscaling (with JPEG draft decoding) and the EXIF rotation combine correctly."""
    # GIVEN a 3000x1500 scene stored sideways (1500x3000) with Orientation 6, IMAGE_MAX_SIDE 600
    big = _upright().resize((3000, 1500), Image.Resampling.NEAREST)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(big.transpose(_STORED[6]), "JPEG", exif=exif.tobytes(), quality=90)
    # WHEN it is described
    (record,) = _describe(make_runtime, media, media_dir, {"big.jpg": data}, image_max_side=600)
    # THEN the record gives the upright source size and the model saw it upright at 600 px
    assert (record["width"], record["height"]) == (3000, 1500)
    (seen,) = sim.stats.images
    assert (seen["mime_type"], seen["width"], seen["height"]) == ("image/jpeg", 600, 300)
    assert record["description"] == describe_image(_save(_upright(), "PNG"))


# --- what cannot be read ----------------------------------------------------------------------

NOT_IMAGES = {
    "page": (b"<!DOCTYPE html>\n<html><body>Moved</body></html>", "an HTML page"),
    "doc": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "a PDF document"),
    "api": (b'{"error": {"code": 403, "message": "denied"}}', "JSON"),
    "notes": (b"Just some notes, not a picture.\n", "plain text"),
    "logo": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
    "empty": (b"", "an empty file"),
    "clip": (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + bytes(64), "MP4 video"),
    "movie": (b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00qt  " + bytes(64), "QuickTime (MOV)"),
    "old-movie": (b"\x00\x00\x10\x00moov\x00\x00\x00\x6cmvhd" + bytes(64), "QuickTime (MOV)"),
    "phone-video": (b"\x00\x00\x00\x18ftyp3gp4\x00\x00\x02\x003gp4" + bytes(64), "3GP video"),
    "archive": (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(40), "a ZIP archive"),
    "web-video": (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01webm" + bytes(40), "WebM video"),
    "sound": (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40), "a WAV audio file"),
    "noise": (bytes(range(7, 200)) * 3, "bytes of an unknown kind"),
}


def test_what_is_not_an_image_is_named_in_the_error(
    make_runtime: Callable[..., Runtime], media: str, media_dir: Path, sim: RunningSimulator
) -> None:
    """Pages, documents, text, drawings, videos and archives are not_an_image, each named."""
    # GIVEN files that are not pictures, all named .jpg (and so served as image/jpeg)
    files = {f"{name}.jpg": data for name, (data, _) in NOT_IMAGES.items()}
    # WHEN they are described
    records = _describe(make_runtime, media, media_dir, files)
    # THEN each is not_an_image with a sentence saying what it is, and no model call is made
    for record, (_, phrase) in zip(records, NOT_IMAGES.values(), strict=True):
        assert record["error"]["code"] == "not_an_image", record
        message = record["error"]["message"]
        assert message.startswith("The source is not an image: it is ") and message.endswith(".")
        assert phrase in message, message
    assert sim.stats.calls == 0


def _truncated_jpeg() -> bytes:
    data = _save(_upright().resize((400, 200)), "JPEG")
    return data[: len(data) // 2]


def _corrupt_png() -> bytes:
    data = bytearray(_save(_upright(), "PNG"))
    at = data.index(b"IDAT") + 20
    data[at : at + 8] = b"\xff" * 8
    return bytes(data)


def _bmp_with_jpeg_inside() -> bytes:
    """A BMP header Pillow reads, declaring a compression (BI_JPEG) it does not decode."""
    data = _save(_upright(), "BMP")
    return data[:30] + struct.pack("<I", 4) + data[34:]


UNSUPPORTED = {
    "cut.jpg": (_truncated_jpeg(), "a JPEG image"),
    "head-only.jpg": (_save(_upright(), "JPEG")[:24], "a JPEG image"),
    "broken.png": (_corrupt_png(), "a PNG image"),
    "cut.gif": (_save(_upright(), "GIF")[:60], "a GIF image"),
    "odd.bmp": (_bmp_with_jpeg_inside(), "a BMP image"),
    "new.jxl": (b"\xff\x0a\xfa\x7f\x01\x90\x08" + bytes(64), "a JPEG XL image"),
    "fake.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "a HEIC image"),
    "raw.cr3": (b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom" + bytes(64), "a Canon CR3"),
}


def test_images_that_cannot_be_decoded_are_unsupported_naming_the_format(
    make_runtime: Callable[..., Runtime], media: str, media_dir: Path, sim: RunningSimulator
) -> None:
    """Truncated, corrupt or undecodable images are unsupported_image, their format named."""
    # GIVEN images cut short, damaged, or in a format or variant that is not decoded
    files = {name: data for name, (data, _) in UNSUPPORTED.items()}
    # WHEN they are described
    records = _describe(make_runtime, media, media_dir, files)
    # THEN each is unsupported_image, and its sentence starts by naming the format
    for record, (_, phrase) in zip(records, UNSUPPORTED.values(), strict=True):
        assert record["error"]["code"] == "unsupported_image", record
        assert record["error"]["message"].startswith(f"The source is {phrase}"), record
    assert sim.stats.calls == 0


# --- the pixel cap ----------------------------------------------------------------------------


def _bombs() -> dict[str, bytes]:
    """Files that would take 900 MB or more once decoded, over the default cap (100 M pixels)."""
    return {"bomb.png": _png_bomb(), "bomb.heic": _heif_declaring(30_000, 30_000)}


def test_decompression_bombs_are_refused_from_the_header_without_decoding(
    make_runtime: Callable[..., Runtime], media: str, media_dir: Path, sim: RunningSimulator
) -> None:
    """A 110 KB PNG and a HEIC declaring 900 million pixels are too_large, naming the cap."""
    # GIVEN files that would take 900 MB or more once decoded, and the default cap (100 M)
    # WHEN they are described
    records = _describe(make_runtime, media, media_dir, _bombs())
    # THEN both are too_large with a sentence giving the count and the setting
    for record, what in zip(records, ("a PNG image", "a HEIC image"), strict=True):
        assert record["error"]["code"] == "too_large", record
        assert record["error"]["message"] == (
            f"The source is {what} of 900000000 pixels, more than MAX_IMAGE_PIXELS (100000000); "
            "it was not decoded."
        )
    assert sim.stats.calls == 0


def _describe_in_a_fresh_process(
    urls: list[str], sim: RunningSimulator, out: Path
) -> tuple[list[dict[str, Any]], float]:
    """Describe ``urls`` with the command line in a new process: its records and its peak RSS.

    The peak (ru_maxrss) is a process's highest ever, so only a process that did
    nothing else measures what this work took; os.wait4 reads that child's own.
    """
    env = {
        "PATH": os.environ["PATH"],
        "GOOGLE_GEMINI_BASE_URL": sim.url,
        "GEMINI_API_KEY": API_KEY,
        "ALLOW_PRIVATE_URLS": "true",
    }
    with out.open("wb") as stdout:
        child = subprocess.Popen(
            [sys.executable, "-m", "describer", "describe", "--format", "jsonl", *urls],
            cwd=procs.ROOT,
            env=env,
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
        assert child.stderr is not None
        errors = child.stderr.read().decode()
        _, status, usage = os.wait4(child.pid, 0)
        child.stderr.close()
    child.returncode = os.waitstatus_to_exitcode(status)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(urls), errors
    return records, usage.ru_maxrss / 1024  # KiB on Linux


@pytest.mark.slow
def test_refusing_a_bomb_takes_no_more_memory_than_describing_a_small_picture(
    media: str, media_dir: Path, sim: RunningSimulator, tmp_path: Path
) -> None:
    """Nothing of a bomb is decoded: a process refusing two peaks as low as one describing two."""
    # GIVEN the bombs, and two small pictures of the same formats
    bombs = _bombs()
    small = {"small.png": _save(_upright(), "PNG"), "small.heic": _save(_upright(), "HEIF")}
    for name, data in {**bombs, **small}.items():
        (media_dir / name).write_bytes(data)
    # WHEN each pair is described by a process of its own
    refused, bombs_peak_mib = _describe_in_a_fresh_process(
        [f"{media}/{name}" for name in bombs], sim, tmp_path / "bombs.jsonl"
    )
    described, small_peak_mib = _describe_in_a_fresh_process(
        [f"{media}/{name}" for name in small], sim, tmp_path / "small.jsonl"
    )
    # THEN the bombs are refused and the pictures described
    assert [r["error"]["code"] for r in refused] == ["too_large"] * 2, refused
    assert [r["status"] for r in described] == ["ok"] * 2, described
    # AND the refusing process peaked no higher than the other, give or take 100 MiB
    # (decoding the PNG alone would add 900)
    assert bombs_peak_mib < small_peak_mib + 100, (bombs_peak_mib, small_peak_mib)


def test_the_pixel_cap_applies_to_every_format_from_its_header(
    make_runtime: Callable[..., Runtime], media: str, media_dir: Path, sim: RunningSimulator
) -> None:
    """MAX_IMAGE_PIXELS refuses a 96x48 picture in each format, HEIC and AVIF included."""
    # GIVEN the same 96x48 (4608 pixel) picture in eight formats
    upright = _upright()
    kinds = {
        "cap.png": ("PNG", "a PNG image"),
        "cap.jpg": ("JPEG", "a JPEG image"),
        "cap.webp": ("WEBP", "a WebP image"),
        "cap.gif": ("GIF", "a GIF image"),
        "cap.tif": ("TIFF", "a TIFF image"),
        "cap.bmp": ("BMP", "a BMP image"),
        "cap.heic": ("HEIF", "a HEIC image"),
        "cap.avif": ("AVIF", "an AVIF image"),
    }
    files = {name: _save(upright, fmt) for name, (fmt, _) in kinds.items()}
    # WHEN they are described with MAX_IMAGE_PIXELS=4000
    records = _describe(make_runtime, media, media_dir, files, max_image_pixels=4000)
    # THEN each is too_large, naming its format, its size and the setting; none reaches the model
    for record, (_, what) in zip(records, kinds.values(), strict=True):
        assert record["error"] == {
            "code": "too_large",
            "message": f"The source is {what} of 96x48 pixels, "
            "more than MAX_IMAGE_PIXELS (4000); it was not decoded.",
        }
    assert sim.stats.calls == 0
