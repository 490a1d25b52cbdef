"""Turning downloaded bytes into what Gemini accepts, as cheaply as possible.

Runs in a worker thread (Pillow releases the GIL while decoding), never on the
event loop. The type comes from the bytes, not from the name or Content-Type.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import Code, SourceError

# What Gemini accepts as inline image data.
GEMINI_MIME_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"})
# Detail survives at 85 while the file is a fraction of the size at 95+.
JPEG_QUALITY = 85
_PIL_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "MPO": "image/jpeg"}
_HEIF_BRANDS = {
    b"heic": "image/heic",
    b"heix": "image/heic",
    b"heim": "image/heic",
    b"heis": "image/heic",
    b"mif1": "image/heif",
    b"msf1": "image/heif",
    b"hevc": "image/heic",
    b"hevx": "image/heic",
}


@dataclass(frozen=True)
class PreparedImage:
    """The bytes to send and what we learnt about the source on the way."""

    data: bytes
    mime_type: str
    source_mime_type: str
    width: int | None
    height: int | None
    sent_width: int | None
    sent_height: int | None


def prepare(data: bytes, *, max_side: int, max_pixels: int) -> PreparedImage:
    """Sniff, check and (only when needed) downscale or convert one image."""
    heif = _heif_mime(data)
    if heif is not None:
        # Pillow cannot decode HEIF without a plugin; Gemini can, so pass it on.
        return PreparedImage(data, heif, heif, None, None, None, None)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise SourceError(Code.NOT_AN_IMAGE, _not_an_image_message(data)) from None
    except Image.DecompressionBombError as exc:
        raise SourceError(Code.TOO_LARGE, f"The image has too many pixels: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt headers
        raise SourceError(
            Code.UNSUPPORTED_IMAGE, f"The image header cannot be read: {exc}"
        ) from None
    with image:
        return _prepare_open(image, data, max_side=max_side, max_pixels=max_pixels)


def _prepare_open(
    image: Image.Image, data: bytes, *, max_side: int, max_pixels: int
) -> PreparedImage:
    fmt = image.format or "unknown"
    width, height = image.size
    source_mime = _PIL_MIME.get(fmt) or Image.MIME.get(fmt) or f"image/{fmt.lower()}"
    if width * height > max_pixels:
        raise SourceError(
            Code.TOO_LARGE,
            f"The {fmt} image is {width}x{height} pixels, "
            f"more than MAX_IMAGE_PIXELS ({max_pixels}).",
        )
    supported = source_mime in GEMINI_MIME_TYPES and getattr(image, "n_frames", 1) == 1
    if (
        supported
        and max(width, height) <= max_side
        and image.mode in ("RGB", "RGBA", "L", "LA", "P")
    ):
        _verify(image, fmt)
        return PreparedImage(data, source_mime, source_mime, width, height, width, height)
    try:
        if fmt == "JPEG" and max(width, height) > max_side:
            # DCT-domain downscale: decode at 1/2, 1/4 or 1/8 size straight away.
            image.draft("RGB", (max_side, max_side))
        image.load()
        image = ImageOps.exif_transpose(image)
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        out, mime = _encode(image)
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data surfaces here
        raise SourceError(
            Code.UNSUPPORTED_IMAGE, f"The {fmt} image cannot be decoded: {exc}"
        ) from None
    return PreparedImage(out, mime, source_mime, width, height, image.width, image.height)


def _verify(image: Image.Image, fmt: str) -> None:
    """Decode fully before sending as-is, so a truncated file is caught here, not by Gemini."""
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001
        raise SourceError(
            Code.UNSUPPORTED_IMAGE, f"The {fmt} image cannot be decoded: {exc}"
        ) from None


def _encode(image: Image.Image) -> tuple[bytes, str]:
    """JPEG for opaque pictures, PNG where transparency must survive."""
    buffer = io.BytesIO()
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        image.convert("RGBA").save(buffer, format="PNG", optimize=False)
        return buffer.getvalue(), "image/png"
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue(), "image/jpeg"


def _heif_mime(data: bytes) -> str | None:
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return _HEIF_BRANDS.get(data[8:12])
    return None


def _not_an_image_message(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if not data:
        what = "an empty file"
    elif head.startswith((b"<!doctype html", b"<html")):
        what = "an HTML page"
    elif head.startswith(b"%pdf"):
        what = "a PDF document"
    elif head.startswith((b"{", b"[")):
        what = "JSON or other text"
    elif head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        what = "an SVG drawing, which Gemini does not accept"
    else:
        what = f"{len(data)} bytes of an unknown kind"
    return f"The source is not an image: it is {what}."
