"""Preparing a 12-megapixel JPEG: the project's prepare() against a plain open-and-resize.

Both sides produce the same thing (a JPEG at quality 85 of the same size, at most
IMAGE_MAX_SIDE on its long side, resized with Lanczos), so the only difference
measured is the project's way of getting there: JPEG draft mode, which decodes at
1/2, 1/4 or 1/8 scale straight from the DCT coefficients. The two run alternately
on the same bytes, in one thread, so the machine's load falls on both alike.
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path
from typing import Any

from PIL import Image

from describer.images import JPEG_QUALITY, prepare
from describer.settings import DEFAULT_IMAGE_MAX_SIDE, DEFAULT_MAX_IMAGE_PIXELS


def plain_resize(data: bytes, size: tuple[int, int]) -> bytes:
    """What code without draft mode does: decode every pixel, then resize and encode."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        small = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def time_preparation(
    photos: list[Path], *, repetitions: int, max_side: int = DEFAULT_IMAGE_MAX_SIDE
) -> dict[str, Any]:
    """Median wall and CPU milliseconds per photo for both ways, and what each sends."""
    walls: dict[str, list[float]] = {"prepare": [], "plain": []}
    cpus: dict[str, list[float]] = {"prepare": [], "plain": []}
    files = []
    for path in photos:
        data = path.read_bytes()
        prepared = prepare(data, max_side=max_side, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
        size = (prepared.sent_width or 0, prepared.sent_height or 0)
        plain = plain_resize(data, size)
        files.append(
            {
                "file": path.name,
                "bytes": len(data),
                "width": prepared.width,
                "height": prepared.height,
                "sent_bytes": len(prepared.data),
                "sent_width": size[0],
                "sent_height": size[1],
                "sent_ratio": len(prepared.data) / len(data),
                "plain_bytes": len(plain),
            }
        )
        for rep in range(repetitions):
            # Alternate which goes first, so neither always runs on a warmer cache.
            order = ("prepare", "plain") if rep % 2 == 0 else ("plain", "prepare")
            for way in order:
                wall, cpu = time.perf_counter(), time.thread_time()
                if way == "prepare":
                    prepare(data, max_side=max_side, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
                else:
                    plain_resize(data, size)
                walls[way].append((time.perf_counter() - wall) * 1000)
                cpus[way].append((time.thread_time() - cpu) * 1000)
    prepare_ms = statistics.median(walls["prepare"])
    plain_ms = statistics.median(walls["plain"])
    return {
        "max_side": max_side,
        "repetitions": repetitions,
        "samples_per_way": len(walls["prepare"]),
        "prepare_ms": prepare_ms,
        "plain_ms": plain_ms,
        "prepare_cpu_ms": statistics.median(cpus["prepare"]),
        "plain_cpu_ms": statistics.median(cpus["plain"]),
        "speedup": plain_ms / prepare_ms,
        "files": files,
    }
