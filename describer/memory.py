"""What decoding an image costs in bytes, and the one budget per process decodes are paid from.

MAX_IMAGE_PIXELS caps pixels, but an instance runs out of bytes: 100 megapixels are
0.45 GB as 8-bit RGB and 1.7 GB as a 32-bit TIFF on its way to 8 bits. So before a
decode, :func:`decode_cost` estimates its peak from what the header says (mode, size
after the draft, how the format's decoder buffers), following the steps
``images.prepare`` takes after it: decode, convert to 8 bits, downscale, rotate,
encode. An image whose estimate is above MAX_DECODE_BYTES is refused; the others are
decoded inside :class:`DecodeBudget`, so that decodes running at once in a process
never add up to more than that, whatever the number of invocations or threads.

The estimate is calibrated against the real thing: each format and mode decoded in a
fresh process, its peak resident memory (``ru_maxrss``, which sees the C buffers that
``tracemalloc`` misses) compared with the estimate, at 10000x10000 pixels unless noted
(1 B/px is 100 MB there). The estimate is never below the peak:

    source, 10000x10000 unless noted       measured MB   estimated MB
    JPEG RGB baseline (drafted to 1/8)              16             39
    JPEG RGB 4:2:0 progressive                     307            354
    JPEG RGB 4:4:4 progressive                     607            684
    JPEG CMYK progressive                          807            904
    PNG 1-bit / L / P                      213 / 113 / 546  291 / 181 / 621
    PNG RGB, 8 or 16 bits                          446            511
    PNG RGBA or LA, 8 or 16 bits                   847            951
    PNG P with transparency                        946           1061
    PNG 16-bit grey (I;16)                        1100           1227
    TIFF I, 32-bit (one strip or many)            1701           1887
    TIFF F                                         901           1007
    TIFF CMYK, LAB or RGBA                         847            951
    TIFF PA                                       1247           1391
    TIFF RGB in one 300 MB strip                   700            897
    GIF P / BMP 8-bit RLE / PSD RGB          546 / 547 / 446  621 / 621 / 511
    QOI RGB / RGBA                           701 / 847       1007 / 1007
    WebP RGB / RGBA, lossless               1600 / 1646      1777 / 1831
    JPEG 2000 RGB, 5000x5000                       483            581
    HEIC 8-bit 4:2:0, 8000x6000                    349            466
    HEIC 10-bit 4:4:4, 4000x3000                   187            228
    AVIF 8-bit 4:4:4 / RGBA 4000x3000       1082 / 177       1777 / 281

Bytes a pixel of Pillow's own storage: 1 for modes 1, L and P, 2 for I;16, 4 for all
others (RGB is stored as 4 bytes, like RGBA). On top of the image itself:

- JPEG: nothing beyond row buffers, except when libjpeg must hold the whole image's
  DCT coefficients (progressive, or a first scan without every component): 2 bytes a
  sample at the source's full size, whatever the draft scale.
- TIFF through libtiff (any compression): one strip or tile of raw samples, at least 4
  bytes a pixel (YCbCr and old JPEG go through an RGBA buffer).
- WebP: libwebp's canvas, a second one while decoding, and Pillow's copy of the frame:
  4 bytes a pixel each, the canvas and the copy held until the file is closed.
- JPEG 2000: OpenJPEG's 32-bit samples and its working buffers, about 5.1 bytes a sample.
- HEIF: libheif's planes at their bit depth and chroma, the 8-bit planes when
  converting from more bits, and the interleaved RGB(A) handed to Pillow.
- AVIF: Pillow does not say the depth or chroma, so the worst: 16-bit 4:4:4 planes
  (and alpha), the RGB(A) buffer libavif converts into and Pillow's copy of it.
- QOI, BMP with RLE and plain PPM are decoded in Python into a bytearray (and, but for
  QOI, a copy of it).

Then the steps of ``images._eight_bit`` (16-bit and 32-bit images go through two
32-bit copies on their way to 8 bits, CMYK and LAB through an RGB one), the resize
(Pillow premultiplies LA and RGBA into a full-size copy first) and the small picture
at the end. The peak is the largest of those phases; the estimate adds a tenth and
16 MiB for what is not modelled (allocator rounding, codec state, encoders, thumbnails).
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import ImageFile

from .errors import Code, SourceError

# Pillow stores every pixel in 1, 2 or 4 bytes; only these modes use fewer than 4.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# What is not modelled: a tenth more, and 16 MiB (codec state, encoders, thumbnails).
_MARGIN = 1.1
_SLACK = 16 * 1024 * 1024
# Bytes a sample OpenJPEG takes while decoding: a 32-bit sample and its working buffers
# (5.1 measured on RGB, RGBA and grey).
_J2K_SAMPLE_BYTES = 5.5
# AVIF decoded by libavif: Pillow does not say its depth or chroma, so planes of up to
# 16 bits in 4:4:4 (2 bytes a sample), then the RGB(A) buffer it converts into and
# Pillow's copy of that (a byte a band each).
_AVIF_SAMPLE_BYTES = 2
# WebP: libwebp's canvas and Pillow's copy of the frame stay until the file is closed;
# a second canvas lives only while decoding.
_WEBP_HELD_BYTES = 8
_WEBP_DECODING_BYTES = 4
# Decoders written in Python build the whole image in a bytearray (grown by an eighth
# at a time) and, but for QOI, hand over a bytes copy of it: per byte of Pillow storage.
_PYTHON_DECODERS = {"qoi": 1.25, "bmp_rle": 2.5, "ppm": 2.5, "ppm_plain": 2.5}
# Chroma samples per pixel of a HEIF by its chroma format (monochrome, 4:2:0, 4:2:2, 4:4:4).
_HEIF_SAMPLES = {400: 1.0, 420: 1.5, 422: 2.0, 444: 3.0}
# JPEG start-of-frame markers of progressive coding, which always buffers the whole image.
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Markers without a length field: TEM and the restart markers.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# glibc's mallopt() parameter M_MMAP_THRESHOLD (malloc.h), and the size from which every
# allocation gets a mapping of its own: decode buffers are tens to hundreds of MB, Pillow
# allocates images in 16 MiB blocks, and Python's own objects stay far below 1 MiB.
_M_MMAP_THRESHOLD = -3
_OWN_MAPPING_FROM = 1024 * 1024


def return_freed_buffers() -> None:
    """Have glibc give large freed buffers back to the system at once, process-wide.

    The budget bounds the bytes decodes hold; without this the process would not
    shrink after them. glibc raises its mmap threshold to the largest buffer freed
    (up to 32 MiB), after which Pillow's blocks come from per-thread heaps that keep
    them once freed: four 0.45 GB decodes taking turns on two threads left a process
    0.85 GB larger, not 0.45, and still 0.52 GB larger afterwards. With the threshold
    fixed, each buffer is a mapping of its own, unmapped when freed (0.45 GB, then
    3 MB). Does nothing where the C library has no mallopt (macOS).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _OWN_MAPPING_FROM)


def _stored_bytes(mode: str) -> int:
    """Bytes a pixel of ``mode`` takes in Pillow's memory."""
    return _STORED_BYTES.get(mode, 4)


def decode_cost(
    image: ImageFile.ImageFile,
    data: bytes,
    *,
    source_size: tuple[int, int],
    target: tuple[int, int],
) -> int:
    """The most bytes preparing ``image`` will hold at once, from its header alone.

    ``image`` is opened but not loaded, with any draft already applied (its size
    is what will be decoded); ``source_size`` is the size before the draft, and
    ``target`` the size the picture is brought down to.
    """
    width, height = image.size
    pixels = width * height
    mode = image.mode
    held, decoding = _decoder_bytes(image, data, source_size)
    picture = _stored_bytes(mode) * pixels
    base = picture + held
    extra, eight_bit = _eight_bit_bytes(mode, "transparency" in image.info)
    phases = [base + decoding, base + extra * pixels]
    if target[0] < width or target[1] < height:
        converted = 0 if eight_bit == mode else _stored_bytes(eight_bit) * pixels
        # Pillow premultiplies alpha into a full-size copy before resizing LA and RGBA.
        premultiplied = 4 * pixels if eight_bit in ("LA", "RGBA") else 0
        # Horizontal pass first: target width x source height, then the result (and the
        # un-premultiplied copy of it).
        passes = 4 * target[0] * height + 8 * target[0] * target[1]
        phases.append(base + converted + premultiplied + passes)
    # The finished picture, turned upright, its alpha premultiplied for the thumbnail.
    phases.append(base + 12 * target[0] * target[1])
    return math.ceil(max(phases) * _MARGIN) + _SLACK


def _eight_bit_bytes(mode: str, transparent: bool) -> tuple[int, str]:
    """Bytes a pixel held beyond the image while ``images._eight_bit`` runs, and its result.

    Mirrors ``_eight_bit`` step by step: a change there is a change here.
    """
    if mode in ("L", "LA", "RGB", "RGBA"):
        return 0, mode
    if mode == "P":
        return 4, "RGBA" if transparent else "RGB"
    if mode in ("PA", "RGBa"):
        return 4, "RGBA"
    if mode == "La":
        return 4, "LA"
    if mode == "1":
        return 1, "L"
    if mode.startswith("I;16"):
        # convert("I"), point() on it, convert("L"): 4 + 4 + 1.
        return 9, "L"
    if mode == "I":
        # A range beyond 16 bits (unknown before decoding) takes the float path:
        # convert("I"), convert("F"), point(), convert("L"): 4 + 4 + 4 + 1.
        return 13, "L"
    if mode == "F":
        return 5, "L"
    # CMYK, YCbCr, LAB, HSV, RGBX: one RGB copy.
    return 4, "RGB"


def _decoder_bytes(
    image: ImageFile.ImageFile, data: bytes, source_size: tuple[int, int]
) -> tuple[int, int]:
    """What the format's decoder holds beyond the image: (until closed, while decoding)."""
    fmt = image.format or ""
    width, height = image.size
    pixels = width * height
    codecs = {tile.codec_name for tile in image.tile}
    if fmt in ("JPEG", "MPO"):
        return 0, _jpeg_coefficients(image, data, source_size)
    if "libtiff" in codecs:
        return 0, _tiff_strip(image)
    if fmt == "WEBP":
        return len(data) + _WEBP_HELD_BYTES * pixels, _WEBP_DECODING_BYTES * pixels
    if fmt == "JPEG2000":
        return 0, math.ceil(_J2K_SAMPLE_BYTES * len(image.getbands()) * pixels)
    if fmt == "HEIF":
        return len(data), _heif_bytes(image, pixels)
    if fmt == "AVIF":
        bands = len(image.getbands())
        return len(data), (_AVIF_SAMPLE_BYTES * bands + 2 * bands) * pixels
    python = max((_PYTHON_DECODERS.get(codec, 0.0) for codec in codecs), default=0.0)
    return 0, math.ceil(python * _stored_bytes(image.mode) * pixels)


def _jpeg_coefficients(
    image: ImageFile.ImageFile, data: bytes, source_size: tuple[int, int]
) -> int:
    """Bytes of DCT coefficients libjpeg buffers for the whole image, 0 when it streams.

    The buffer is at the source's full size even when the draft decodes at 1/8:
    each component's blocks (rounded up to its sampling factors) x 64 x 2 bytes.
    """
    if not _jpeg_buffers_whole_image(data):
        return 0
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * 4
    h_max = max(max(1, layer[1]) for layer in layers)
    v_max = max(max(1, layer[2]) for layer in layers)
    width, height = source_size
    total = 0
    for layer in layers:
        h, v = max(1, layer[1]), max(1, layer[2])
        blocks_wide = -(-width * h // (h_max * 8))
        blocks_high = -(-height * v // (v_max * 8))
        total += (-(-blocks_wide // h) * h) * (-(-blocks_high // v) * v) * 128
    return total


def _jpeg_buffers_whole_image(data: bytes) -> bool:
    """Whether libjpeg will buffer every coefficient: progressive, or a partial first scan.

    Reads the markers up to the first scan; anything it cannot follow counts as
    buffered, the expensive answer.
    """
    at, components = 2, 0
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return True
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        if marker in _PROGRESSIVE_SOF:
            return True
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and at + 9 < len(data):
            components = data[at + 9]
        if marker == 0xDA:  # start of scan: its component count
            return data[at + 4] < components
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return True


def _tiff_strip(image: ImageFile.ImageFile) -> int:
    """Bytes of the strip or tile buffer libtiff decodes into, whatever the image's size."""
    tags = getattr(image, "tag_v2", {})
    width, height = image.size
    samples = _tag_int(tags.get(277), 1)
    bits = tags.get(258, 1)
    if isinstance(bits, tuple):
        depth = sum(_tag_int(b, 8) for b in bits) if len(bits) == samples else 0
        depth = depth or _tag_int(bits[0] if bits else 8, 8) * samples
    else:
        depth = _tag_int(bits, 1) * samples
    if 322 in tags and 323 in tags:  # TileWidth, TileLength: one tile at a time
        area = _tag_int(tags[322], width) * _tag_int(tags[323], height)
    else:  # RowsPerStrip (2**32 - 1 when absent): one strip at a time
        area = width * min(height, _tag_int(tags.get(278), height))
    return area * max(4, -(-depth // 8))


def _tag_int(value: object, default: int) -> int:
    """A TIFF tag as a positive whole number, or ``default`` when it is not one."""
    if isinstance(value, tuple) and value:
        value = value[0]
    return value if isinstance(value, int) and value > 0 else default


def _heif_bytes(image: ImageFile.ImageFile, pixels: int) -> int:
    """libheif's planes, their 8-bit copy when the source has more bits, and the RGB(A) buffer."""
    info = image.info
    bands = len(image.getbands())
    depth = info.get("bit_depth")
    deep = not isinstance(depth, int) or depth > 8
    chroma = info.get("chroma")
    samples = _HEIF_SAMPLES.get(chroma, 3.0) if isinstance(chroma, int) else 3.0
    if bands in (2, 4):  # an alpha plane
        samples += 1
    planes = samples * (2 if deep else 1) + (samples if deep else 0)
    return math.ceil((planes + bands) * pixels)


class DecodeBudget:
    """Bytes the decodes of one process may hold at once; a decode waits for its share.

    Shared by every invocation (each on its own event loop and thread) and every
    worker thread of the process. Waiting happens in the worker thread that is about
    to decode, never on an event loop. Waiters are served in turn, so a large decode
    is not starved by a stream of small ones. A decode larger than the whole budget
    (when the per-decode cap allows one) runs alone, once nothing else is held.
    """

    # How often a waiting decode checks whether it was given up (its run cancelled).
    RECHECK_S = 0.05

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a decode budget needs at least 1 byte, got {total}")
        self.total = total
        self._changed = threading.Condition()
        self._in_use = 0
        self._queue: deque[object] = deque()
        # The most bytes ever held at once: what tests and logs can hold the budget to.
        self.peak = 0

    @property
    def in_use(self) -> int:
        """Bytes held now."""
        with self._changed:
            return self._in_use

    @property
    def waiting(self) -> int:
        """Decodes waiting for their bytes now."""
        with self._changed:
            return len(self._queue)

    @contextmanager
    def hold(self, nbytes: int, *, cancelled: threading.Event | None = None) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the block, waiting until they are free.

        Raises SourceError (deadline_exceeded) without holding anything when
        ``cancelled`` is set while waiting: nobody wants the result any more.
        """
        self._acquire(nbytes, cancelled)
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= nbytes
                self._changed.notify_all()

    def _acquire(self, nbytes: int, cancelled: threading.Event | None) -> None:
        turn = object()
        with self._changed:
            self._queue.append(turn)
            try:
                while self._queue[0] is not turn or not self._fits(nbytes):
                    if cancelled is not None and cancelled.is_set():
                        raise SourceError(
                            Code.DEADLINE_EXCEEDED,
                            "The source was given up while it waited for memory to decode it.",
                            transient=True,
                        )
                    self._changed.wait(self.RECHECK_S if cancelled is not None else None)
            finally:
                # Served or given up, this turn is over; whoever is next may now fit.
                self._queue.remove(turn)
                self._changed.notify_all()
            self._in_use += nbytes
            self.peak = max(self.peak, self._in_use)

    def _fits(self, nbytes: int) -> bool:
        return self._in_use == 0 or self._in_use + nbytes <= self.total
