"""Turning downloaded bytes into what Gemini accepts, as cheaply as possible.

Runs in a worker thread (Pillow releases the GIL while decoding), never on the
event loop. The type comes from the bytes, not from the name or Content-Type.

    bytes ─► sniff ─► open (header only) ─► pixel cap ─► byte cap ─► decode ─┬─► as-is
             │        │                                                      └─► 8 bits, downscale,
             │        └─ unreadable: unsupported_image                           upright ─► JPEG/PNG
             └─ a known non-image (PDF, video, ZIP…): not_an_image

The pixel and byte caps refuse with too_large; the decode runs holding its bytes
of the process's budget.

Small PNG, JPEG and WebP pictures that are already upright, 8-bit and single-frame
are sent byte for byte; everything else is decoded and re-encoded as JPEG, or as
PNG when it has an alpha channel. What a decode will cost in bytes is estimated
from the header (``memory.decode_cost``): above MAX_DECODE_BYTES the image is
refused, below it the decode holds that much of the process's ``DecodeBudget``.
"""

from __future__ import annotations

import io
import re
import threading
from contextlib import nullcontext
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageCms, ImageFile, UnidentifiedImageError
from pillow_heif import register_heif_opener

from .errors import Code, SourceError
from .memory import DecodeBudget, decode_cost
from .settings import DEFAULT_MAX_DECODE_BYTES

# HEIC/HEIF open through pillow-heif (libheif), so they get the same pixel cap,
# downscaling and orientation as every other format. Registration only adds the
# format to Pillow's table, so doing it once per process, here, is enough.
register_heif_opener()

# Thumbnails are looked at by people at 1x in a grid; 70 looks the same there.
THUMBNAIL_QUALITY = 70
# Cards in a gallery show pictures about 180 px wide; 192 keeps them sharp at 1x.
THUMBNAIL_SIDE = 192
# Detail survives at 85 while the file is a fraction of the size at 95+.
JPEG_QUALITY = 85

# The Pillow formats we open, in the order they are tried. Pillow knows some forty;
# the rest are rare scientific, game or legacy formats, and a few accept nearly any
# bytes (TGA has no magic number, MPEG is a video), so an allowlist keeps odd files
# away from little-used decoders. AVIF comes before HEIF: both may carry the "mif1"
# brand, and pillow-heif (built without an AV1 decoder) would claim an AVIF and fail.
_OPEN_FORMATS = (
    "JPEG",
    "PNG",
    "WEBP",
    "GIF",
    "TIFF",
    "BMP",
    "AVIF",
    "HEIF",
    "ICO",
    "PPM",
    "JPEG2000",
    "PSD",
    "QOI",
)
# Content types that say nothing about the bytes: sniff them instead.
UNTYPED_CONTENT_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})


def media_type(content_type: str | None) -> str:
    """A Content-Type without its parameters, lower-cased: "image/jpeg; q=1" -> "image/jpeg"."""
    return (content_type or "").split(";", 1)[0].strip().lower()


# File name endings of the formats above: what a folder (CLI) or a backfill's untyped
# objects contribute. Bytes decide the type in the end; names only choose candidates.
IMAGE_SUFFIXES = frozenset(
    ext for ext, fmt in Image.registered_extensions().items() if fmt in _OPEN_FORMATS
)

# Sent byte for byte when small, single-frame, upright and 8-bit: the format's MIME
# type and the modes a plain decoder of that format reads without surprises. HEIC
# and HEIF are always re-encoded even though Gemini accepts them: their rotation
# travels in irot/imir boxes that libheif applies while decoding, and re-encoding
# bakes it into the pixels instead of trusting the model's decoder to honour it;
# a HEIF may also hold bursts, depth and auxiliary images, of which only the primary
# one is wanted. Almost every HEIC in the wild is a phone photo far above
# IMAGE_MAX_SIDE, so it would be decoded and re-encoded for the downscale anyway.
_AS_IS: dict[str, tuple[str, frozenset[str]]] = {
    "JPEG": ("image/jpeg", frozenset({"L", "RGB"})),
    "PNG": ("image/png", frozenset({"1", "L", "LA", "P", "RGB", "RGBA"})),
    "WEBP": ("image/webp", frozenset({"RGB", "RGBA"})),
}
# An MPO is a JPEG with more pictures appended (3D cameras, phone depth maps).
_SOURCE_MIME = {"MPO": "image/jpeg"}

# EXIF orientation -> the transposition that makes the stored pixels upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class PreparedImage:
    """The bytes to send and what we learnt about the source on the way.

    ``width`` and ``height`` are the source's size as displayed (EXIF orientation
    applied); ``sent_width`` and ``sent_height`` are those of ``data``.
    """

    data: bytes
    mime_type: str
    source_mime_type: str
    width: int | None
    height: int | None
    sent_width: int | None
    sent_height: int | None
    # A small upright JPEG for galleries, when one was asked for.
    thumbnail: bytes | None = None


def prepare(
    data: bytes,
    *,
    max_side: int,
    max_pixels: int,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    budget: DecodeBudget | None = None,
    cancelled: threading.Event | None = None,
    thumbnail_side: int = 0,
) -> PreparedImage:
    """Sniff, check and (only when needed) downscale, rotate upright or convert one image.

    An image whose decode would hold more than ``max_decode_bytes`` at its peak is
    refused before decoding; the others are decoded holding their estimate of
    ``budget`` (waiting for it when other decodes hold it; giving up once
    ``cancelled`` is set). With ``thumbnail_side`` > 0 a thumbnail that fits in
    that square is made from the pixels already decoded, so a gallery costs no
    second download or decode.
    """
    _keep_pillow_guard_above(max_pixels)
    kind = _sniff(data)
    if kind is not None and not kind.image:
        raise SourceError(Code.NOT_AN_IMAGE, f"The source is not an image: it is {kind.what}.")
    if data.startswith(_ICO_MAGIC):
        _check_icon(data, max_pixels)
    try:
        # Reads the header only: the size is known, no pixel is decoded yet.
        image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data, kind) from None
    except Image.DecompressionBombError as exc:
        raise _bomb(kind, exc, max_pixels) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt headers
        what = kind.what if kind is not None else "an image"
        raise SourceError(
            Code.UNSUPPORTED_IMAGE, f"The source is {what} whose header cannot be read: {exc}."
        ) from None
    with image:
        return _prepare_open(
            image,
            data,
            kind,
            max_side=max_side,
            max_pixels=max_pixels,
            max_decode_bytes=max_decode_bytes,
            budget=budget,
            cancelled=cancelled,
            thumbnail_side=thumbnail_side,
        )


def _prepare_open(
    image: ImageFile.ImageFile,
    data: bytes,
    kind: _Kind | None,
    *,
    max_side: int,
    max_pixels: int,
    max_decode_bytes: int,
    budget: DecodeBudget | None,
    cancelled: threading.Event | None,
    thumbnail_side: int,
) -> PreparedImage:
    fmt = image.format or "unknown"
    what = kind.what if kind is not None else f"a {fmt} image"
    width, height = image.size
    # Image.open has decoded an ICO already (its entries were measured before it, so
    # it took a few MB at most): its record must not say otherwise.
    fate = "it was decoded but not sent" if fmt == "ICO" else "it was not decoded"
    if width * height > max_pixels:
        raise SourceError(
            Code.TOO_LARGE,
            f"The source is {what} of {width}x{height} pixels, "
            f"more than MAX_IMAGE_PIXELS ({max_pixels}); {fate}.",
        )
    target = _fit(width, height, max_side)
    try:
        if target != (width, height):
            # JPEG decodes straight at 1/2, 1/4 or 1/8 size (HEIF may use an embedded
            # thumbnail); Lanczos does the rest. Three to four times faster on 12-48 MP
            # photos than decoding in full, and the DCT scaling averages like a box
            # filter, so the model sees no difference. Down to 9/10 of the target is
            # accepted: a 4000 px photo then decodes at 1/4 (1000 px) for a 1024 px
            # target, with no resize at all, instead of at 1/2 and then resized.
            image.draft(None, (max(1, target[0] * 9 // 10), max(1, target[1] * 9 // 10)))
        # After the draft: a JPEG decoded at 1/8 costs a 64th of its full size.
        cost = decode_cost(image, data, source_size=(width, height), target=target)
    except Exception as exc:  # noqa: BLE001 - a header Pillow read but cannot use
        raise SourceError(
            Code.UNSUPPORTED_IMAGE, f"The source is {what} that cannot be decoded: {exc}."
        ) from None
    if cost > max_decode_bytes:
        raise SourceError(
            Code.TOO_LARGE,
            f"The source is {what} of {width}x{height} pixels in mode {image.mode}; "
            f"decoding it would take about {_amount(cost)}, more than MAX_DECODE_BYTES "
            f"({max_decode_bytes}); {fate}.",
        )
    held = budget.hold(cost, cancelled=cancelled) if budget is not None else nullcontext()
    with held:
        return _decode(
            image,
            data,
            what,
            source_size=(width, height),
            target=target,
            thumbnail_side=thumbnail_side,
        )


def _decode(
    image: ImageFile.ImageFile,
    data: bytes,
    what: str,
    *,
    source_size: tuple[int, int],
    target: tuple[int, int],
    thumbnail_side: int,
) -> PreparedImage:
    """Decode the opened image and make what is sent from it: the part that costs memory."""
    fmt = image.format or "unknown"
    width, height = source_size
    source_mime = _SOURCE_MIME.get(fmt) or image.get_format_mimetype() or f"image/{fmt.lower()}"
    try:
        # Decode fully even when sending as-is, so a truncated file is caught here, not by
        # Gemini. Only the current frame is decoded: the first page or frame.
        image.load()
        orientation = _orientation(image)
        if target == (width, height) and _send_as_is(image, data, orientation):
            # Upright already (orientation 1), and in a mode Gemini takes.
            return PreparedImage(
                data,
                _AS_IS[fmt][0],
                source_mime,
                width,
                height,
                width,
                height,
                _thumbnail(image, thumbnail_side),
            )
        picture = _eight_bit(image)
        if picture.width > target[0]:  # never upscale what draft decoded a little smaller
            picture = picture.resize(target, Image.Resampling.LANCZOS)
        if orientation in _UPRIGHT:
            picture = picture.transpose(_UPRIGHT[orientation])
        thumbnail = _thumbnail(picture, thumbnail_side)
        out, mime = _encode(picture)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data surfaces here
        raise SourceError(
            Code.UNSUPPORTED_IMAGE, f"The source is {what} that cannot be decoded: {exc}."
        ) from None
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    return PreparedImage(
        out, mime, source_mime, width, height, picture.width, picture.height, thumbnail
    )


def _thumbnail(picture: Image.Image, side: int) -> bytes | None:
    """A small opaque JPEG of an upright picture (alpha laid on white), or None.

    None when ``side`` is 0 (no thumbnails asked for). The thumbnail is for the
    gallery only: if it cannot be made, the image is still described, and its
    card shows a placeholder.
    """
    if side <= 0:
        return None
    try:
        small = _eight_bit(picture)
        # A box reduction by a whole factor first, then bicubic for the rest: half the
        # CPU of reducing_gap=2.0 (about 1 ms instead of 2 from a 1000 px picture), and
        # within 1% of a Lanczos resize on average, less than the q70 JPEG changes.
        small = small.resize(_fit(*small.size, side), Image.Resampling.BICUBIC, reducing_gap=1.0)
        if small.mode in ("LA", "RGBA"):
            background = Image.new("RGB", small.size, "white")
            background.paste(small, mask=small.getchannel("A"))
            small = background
        elif small.mode != "RGB":
            small = small.convert("RGB")
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    except Exception:  # noqa: BLE001 - Pillow raises many types; the description matters more
        return None
    return buffer.getvalue()


def _keep_pillow_guard_above(max_pixels: int) -> None:
    """Stop Pillow's own decompression-bomb guard from refusing what MAX_IMAGE_PIXELS allows.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` (about 89.5 million by default, below
    our 100 million) and refuses above twice that, process-wide. Our header check is
    the limit that produces records; Pillow's stays on as a backstop for the sizes it
    checks while decoding (TIFF tiles, GIF frames larger than their screen), raised to
    our cap when that is higher. Only ever raised and to the same value for a given
    setting, so concurrent workers cannot undo each other.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and limit < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


# An ICO directory cannot state a side above 256 pixels (a 0 byte stands for 256).
_ICON_MAX_SIDE = 256
_ICO_MAGIC = b"\x00\x00\x01\x00"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The DIB headers Pillow's BMP reader takes: OS/2 core (12 bytes) and the Windows ones.
_DIB_HEADER_SIZES = frozenset({40, 52, 56, 64, 108, 124})


def _check_icon(data: bytes, max_pixels: int) -> None:
    """Refuse an ICO any entry of which is larger than an icon can be, before any is decoded.

    Pillow decodes an ICO's largest entry inside Image.open, at the size that entry's
    own PNG or BMP header gives, whatever the directory says: a directory saying
    256x256 over a 14000x14000 PNG took 861 MB before the pixel cap saw the size.
    So every entry's own header is read here first, and an entry over 256x256 (the
    most a directory can state, so no real icon holds more) or over
    MAX_IMAGE_PIXELS refuses the file. What is left costs at most a few MB to decode.
    An entry whose header cannot be read refuses it too, rather than be guessed at.
    """
    count = int.from_bytes(data[4:6], "little")
    for index in range(count):
        entry = data[6 + 16 * index : 22 + 16 * index]
        offset = int.from_bytes(entry[12:16], "little")
        size = _icon_entry_size(data, offset) if len(entry) == 16 else None
        if size is None:
            raise SourceError(
                Code.UNSUPPORTED_IMAGE,
                f"The source is an ICO icon whose entry {index + 1} of {count} "
                "is not a PNG or BMP picture that can be read; it was not decoded.",
            )
        width, height = size
        if width > _ICON_MAX_SIDE or height > _ICON_MAX_SIDE:
            raise SourceError(
                Code.TOO_LARGE,
                f"The source is an ICO icon whose entry {index + 1} of {count} holds "
                f"{width}x{height} pixels, more than the {_ICON_MAX_SIDE}x{_ICON_MAX_SIDE} "
                "an icon can hold; it was not decoded.",
            )
        if width * height > max_pixels:
            raise SourceError(
                Code.TOO_LARGE,
                f"The source is an ICO icon of {width}x{height} pixels, "
                f"more than MAX_IMAGE_PIXELS ({max_pixels}); it was not decoded.",
            )


def _icon_entry_size(data: bytes, offset: int) -> tuple[int, int] | None:
    """The size an ICO entry decodes to, read as Pillow reads it, or None when unreadable."""
    head = data[offset : offset + 24]
    if head.startswith(_PNG_MAGIC):
        return _png_size(data, offset + len(_PNG_MAGIC))
    if len(head) < 12:
        return None
    header_size = int.from_bytes(head[0:4], "little")
    if header_size == 12:
        width, height = int.from_bytes(head[4:6], "little"), int.from_bytes(head[6:8], "little")
    elif header_size in _DIB_HEADER_SIZES:
        width, height = int.from_bytes(head[4:8], "little"), int.from_bytes(head[8:12], "little")
        if head[11] == 0xFF:  # negative: rows stored top-down
            height = 2**32 - height
    else:
        return None
    # The bitmap's height counts its colour rows and its transparency mask's.
    return width, height // 2


def _png_size(data: bytes, position: int) -> tuple[int, int] | None:
    """The size of the PNG whose chunks start at ``position``, or None when unreadable.

    Pillow reads every chunk before the first IDAT and keeps the last IHDR it
    saw, so a first IHDR of 16x16 could hide a second of 14000x14000: a PNG
    with more than one, or none, is refused as unreadable.
    """
    size: tuple[int, int] | None = None
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if kind in (b"IDAT", b"IEND"):
            return size
        if kind == b"IHDR":
            if size is not None or length < 8 or position + 16 > len(data):
                return None
            body = data[position + 8 : position + 16]
            size = int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big")
        position += 12 + length
    return None


def _amount(nbytes: int) -> str:
    """Bytes the way the messages say them: 620 MB, 1.7 GB."""
    if nbytes >= 1_000_000_000:
        return f"{nbytes / 1e9:.1f} GB"
    return f"{max(1, round(nbytes / 1e6))} MB"


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size within max_side x max_side that keeps the source's aspect ratio."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _orientation(image: Image.Image) -> int:
    """The EXIF (or TIFF) orientation, 1 when absent, unreadable or out of range.

    pillow-heif has already applied a HEIF's irot/imir and reset its EXIF
    orientation to 1, as the HEIF specification wants, so it is not applied twice.
    """
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not cost the picture
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _send_as_is(image: Image.Image, data: bytes, orientation: int) -> bool:
    """Whether a picture that fits IMAGE_MAX_SIDE can go to Gemini byte for byte."""
    fmt = image.format or ""
    if fmt not in _AS_IS or image.mode not in _AS_IS[fmt][1] or orientation != 1:
        return False
    if getattr(image, "is_animated", False):  # APNG, animated WebP: send the first frame
        return False
    # Pillow reads a 16-bit RGB PNG as 8-bit RGB; the file itself still has 16-bit
    # samples, twice the bytes for detail the model cannot use.
    return not (fmt == "PNG" and data[12:16] == b"IHDR" and data[24] == 16)


def _eight_bit(image: Image.Image) -> Image.Image:
    """The picture as L, LA, RGB or RGBA with 8 bits a channel, whatever it was.

    ``memory._eight_bit_bytes`` counts the bytes each of these steps holds: change both.
    """
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in ("PA", "RGBa"):
        return image.convert("RGBA")
    if mode == "1":
        return image.convert("L")
    if mode == "La":  # premultiplied alpha
        return image.convert("LA")
    if mode.startswith("I;16") or mode == "I":
        # convert("L") would clip every sample above 255 to white. 16-bit samples span
        # 0..65535, and dividing by 257 maps that range exactly onto 0..255.
        # A 32-bit "I" image outside that range (a TIFF of counts, say) is stretched instead.
        wide = image.convert("I")
        low, high = _range(wide)
        if mode == "I" and (low < 0 or high > 65535):
            return _stretch(wide.convert("F"))
        return wide.point(lambda v: v / 257).convert("L")
    if mode == "F":
        return _stretch(image)
    if mode == "LAB":
        # convert("RGB") would copy L*a*b* bands as if they were red, green and blue.
        return _lab_to_srgb().apply(image)
    # CMYK, YCbCr, HSV, RGBX: Pillow converts all of them to RGB.
    return image.convert("RGB")


def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    """Made per image (about 10 ms, LAB is rare) rather than shared across worker threads."""
    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    return ImageCms.buildTransform(lab, srgb, "LAB", "RGB")


def _stretch(image: Image.Image) -> Image.Image:
    """Float samples to 8 bits: 0..1 is taken as black..white, any other range is stretched."""
    low, high = _range(image)
    if low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    span = (high - low) or 1.0
    return image.point(lambda v: (v - low) * (255 / span)).convert("L")


def _range(image: Image.Image) -> tuple[float, float]:
    """The smallest and largest sample of a one-band image."""
    low, high = image.getextrema()
    if not isinstance(low, int | float) or not isinstance(high, int | float):
        raise ValueError(f"expected one band, got mode {image.mode}")
    return float(low), float(high)


def _encode(image: Image.Image) -> tuple[bytes, str]:
    """JPEG for opaque pictures, PNG where an alpha channel must survive."""
    buffer = io.BytesIO()
    if image.mode in ("LA", "RGBA"):
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    # No optimize=True: its second pass over the Huffman tables took a 1000x750 encode
    # from 3.5 to 8.3 ms of CPU to make the file 1.4% smaller (102.1 -> 100.7 KB), and
    # every downscaled photo would pay it; 1.4% more bytes to send cost far less.
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), "image/jpeg"


# --- telling what the bytes are -------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    """What the first bytes say a file is: ``what`` completes "The source is …"."""

    what: str
    image: bool
    # False for image formats we recognise but do not decode (JPEG XL, OpenEXR…).
    decodable: bool = True


_IMAGE_MAGIC: tuple[tuple[bytes, str, bool], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image", True),
    (b"\xff\xd8\xff", "a JPEG image", True),
    (b"GIF87a", "a GIF image", True),
    (b"GIF89a", "a GIF image", True),
    (b"II*\x00", "a TIFF image", True),
    (b"MM\x00*", "a TIFF image", True),
    (b"II+\x00", "a BigTIFF image", True),
    (b"MM\x00+", "a BigTIFF image", True),
    (b"\x00\x00\x01\x00", "an ICO icon", True),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image", True),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 image", True),
    (b"8BPS", "a Photoshop (PSD) image", True),
    (b"qoif", "a QOI image", True),
    (b"\xff\x0a", "a JPEG XL image", False),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL image", False),
    (b"icns", "an Apple icon (ICNS) image", False),
    (b"DDS ", "a DirectDraw Surface (DDS) texture", False),
    (b"BPG\xfb", "a BPG image", False),
    (b"v/1\x01", "an OpenEXR image", False),
    (b"#?RADIANCE", "a Radiance HDR image", False),
    (b"#?RGBE", "a Radiance HDR image", False),
)
_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"%!PS", "a PostScript document, which Gemini does not accept as an image"),
    (b"\xc5\xd0\xd3\xc6", "an EPS drawing, which Gemini does not accept as an image"),
    (b"PK\x03\x04", "a ZIP archive (or a document stored as one, such as .docx)"),
    (b"PK\x05\x06", "an empty ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\x1a\x45\xdf\xa3", "a Matroska or WebM video"),
    (b"OggS", "an Ogg audio or video file"),
    (b"ID3", "an MP3 audio file"),
    (b"fLaC", "a FLAC audio file"),
    (b"FLV\x01", "a Flash video"),
    (b"\x00\x00\x01\xba", "an MPEG video"),
    (b"\x00\x00\x01\xb3", "an MPEG video"),
    (b"\x7fELF", "an executable program"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Microsoft Office document"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"wOFF", "a web font"),
    (b"wOF2", "a web font"),
)
_RIFF = {
    b"WEBP": _Kind("a WebP image", image=True),
    b"WAVE": _Kind("a WAV audio file", image=False),
    b"AVI ": _Kind("an AVI video", image=False),
}
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_AUDIO_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "})
# QuickTime files written before ftyp existed start straight with one of these atoms.
_QUICKTIME_ATOMS = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
# BMP info-header sizes: "BM" alone is too weak a signature (think "BMW…").
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def _sniff(data: bytes) -> _Kind | None:
    """Name the file from its magic number, or None when it has none we know."""
    for magic, what, decodable in _IMAGE_MAGIC:
        if data.startswith(magic):
            return _Kind(what, image=True, decodable=decodable)
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return _Kind("a BMP image", image=True)
    if data[:1] == b"P" and data[1:2] in b"1234567F" and data[2:3] in (b"\n", b"\r", b" ", b"\t"):
        return _Kind("a Netpbm (PBM/PGM/PPM) image", image=True)
    if data[:4] == b"RIFF":
        return _RIFF.get(data[8:12], _Kind("a RIFF media file", image=False))
    if data[4:8] == b"ftyp":
        return _iso_media(data)
    if data[4:8] in _QUICKTIME_ATOMS:
        return _Kind("a QuickTime (MOV) video", image=False)
    for magic, what in _OTHER_MAGIC:
        if data.startswith(magic):
            return _Kind(what, image=False)
    if len(data) > 188 and data[0] == data[188] == 0x47:
        return _Kind("an MPEG transport stream video", image=False)
    return None


def _iso_media(data: bytes) -> _Kind:
    """ISO media files (MP4, MOV, HEIF, AVIF, CR3) say what they hold in their ftyp brands."""
    major = data[8:12]
    box_end = min(int.from_bytes(data[0:4], "big"), len(data), 256)
    compatible = {data[i : i + 4] for i in range(16, box_end - 3, 4)}
    brand = major.decode("latin-1").strip()
    if major in _AVIF_BRANDS or (major in (b"mif1", b"msf1") and compatible & _AVIF_BRANDS):
        return _Kind("an AVIF image", image=True)
    if major in _HEIF_BRANDS:
        return _Kind("a HEIC image" if major.startswith(b"he") else "a HEIF image", image=True)
    if major == b"crx ":
        return _Kind("a Canon CR3 raw photo", image=True, decodable=False)
    if major == b"qt  ":
        return _Kind("a QuickTime (MOV) video (ftyp brand 'qt')", image=False)
    if major.startswith(b"3g"):
        return _Kind(f"a 3GP video (ftyp brand '{brand}')", image=False)
    if major in _AUDIO_BRANDS:
        return _Kind(f"an MP4 audio file (ftyp brand '{brand}')", image=False)
    return _Kind(f"an MP4 video (ftyp brand '{brand}')", image=False)


def _unidentified(data: bytes, kind: _Kind | None) -> SourceError:
    """The error for bytes no allowed Pillow format would open."""
    if kind is None:
        return SourceError(
            Code.NOT_AN_IMAGE, f"The source is not an image: it is {_describe_unknown(data)}."
        )
    if not kind.decodable:
        return SourceError(
            Code.UNSUPPORTED_IMAGE,
            f"The source is {kind.what}, a format this function cannot decode.",
        )
    return SourceError(
        Code.UNSUPPORTED_IMAGE,
        f"The source is {kind.what}, but it cannot be read: its header is damaged "
        "or cut short, or it is a variant this function does not decode.",
    )


_PIXELS = re.compile(r"\((\d+) pixels\)")


def _bomb(kind: _Kind | None, exc: Image.DecompressionBombError, max_pixels: int) -> SourceError:
    """Pillow refused the header itself: far more pixels than allowed."""
    what = kind.what if kind is not None else "an image"
    found = _PIXELS.search(str(exc))
    count = f" of {int(found.group(1))} pixels" if found else ""
    return SourceError(
        Code.TOO_LARGE,
        f"The source is {what}{count}, more than MAX_IMAGE_PIXELS ({max_pixels}); "
        "it was not decoded.",
    )


def _describe_unknown(data: bytes) -> str:
    """What bytes without a known magic number look like: empty, markup, JSON, text."""
    if not data:
        return "an empty file"
    head = data[:1024]
    for bom, codec in (
        (b"\xef\xbb\xbf", "utf-8"),
        (b"\xff\xfe", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be"),
    ):
        if head.startswith(bom):
            text = head[len(bom) :].decode(codec, errors="replace")
            break
    else:
        text = head.decode("utf-8", errors="replace")
    odd = sum(1 for c in text if c == "\ufffd" or (ord(c) < 32 and c not in "\t\n\r\f"))
    if odd > len(text) // 50:
        return f"{len(data)} bytes of an unknown kind"
    start = text.lstrip().lower()
    if start.startswith(("<!doctype html", "<html", "<head", "<body")):
        return "an HTML page"
    if start.startswith("<svg") or (start.startswith("<?xml") and "<svg" in start):
        return "an SVG drawing, which Gemini does not accept"
    if start.startswith("<?xml"):
        return "an XML document"
    if start.startswith(("{", "[")):
        return "JSON data"
    return "plain text"
