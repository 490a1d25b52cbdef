"""Decoding memory: hostile images are refused by their cost in bytes, and decodes share a budget.

Each hostile image is built by hand (a 10000x10000 32-bit TIFF in under 1 MB, a 16-bit PNG,
an ICO whose directory hides a large PNG) and prepared in a fresh process, whose peak
resident memory (``ru_maxrss``, which sees Pillow's C buffers) shows whether anything was
decoded. The batch runs through functions-framework in a process of its own, and its worker's
peak (``VmHWM``) is held to the sizing deploy.sh derives from the same budget.
"""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from describer import Runtime
from describer.errors import Code, SourceError
from describer.images import prepare
from describer.memory import DecodeBudget
from describer.settings import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_IMAGE_BYTES
from localdev import procs
from localdev.gemini_sim import RunningSimulator

from .conftest import RESULTS_BUCKET, function_env, make_image, png_bytes, post_batch, wait_for

MIB = 1024 * 1024
# What deploy.sh allows for the runtime itself, beside the images held and the decode budget.
RUNTIME_BYTES = 512 * MIB
# A fresh process that decoded nothing grows by a few MB at most (imports, the bytes read).
NOTHING_DECODED = 64 * MIB
SIDE = 10_000


# --- hostile images, built by hand ------------------------------------------------------------


def _tiff(
    width: int,
    height: int,
    *,
    photometric: int,
    pixel: bytes,
    bits: tuple[int, ...],
    extra_samples: tuple[int, ...] = (),
    sample_format: int | None = None,
) -> bytes:
    """A deflate TIFF whose strips all point at the same compressed 100 rows.

    A 10000x10000 picture then takes a few KB to build and store, however many bytes a
    pixel it declares, and libtiff still decodes every row.
    """
    rows = 100
    strip = zlib.compress(pixel * width * rows, 9)
    count = -(-height // rows)
    strip_at = 8
    arrays_at = strip_at + len(strip)
    arrays = struct.pack(f"<{count}I", *([strip_at] * count))
    arrays += struct.pack(f"<{count}I", *([len(strip)] * count))
    bits_at = arrays_at + len(arrays)
    arrays += struct.pack(f"<{len(bits)}H", *bits)
    short, long_ = 3, 4
    entries: list[tuple[int, int, int, int]] = [
        (256, long_, 1, width),
        (257, long_, 1, height),
        (258, short, len(bits), bits[0] if len(bits) == 1 else bits_at),
        (259, short, 1, 8),  # Adobe deflate: decoded by libtiff
        (262, short, 1, photometric),
        (273, long_, count, arrays_at),
        (277, short, 1, len(bits)),
        (278, long_, 1, rows),
        (279, long_, count, arrays_at + 4 * count),
    ]
    if extra_samples:
        entries.append((338, short, 1, extra_samples[0]))
    if sample_format is not None:
        entries.append((339, short, 1, sample_format))
    ifd_at = bits_at + 2 * len(bits)
    ifd = struct.pack("<H", len(entries))
    for tag, kind, n, value in entries:
        packed = struct.pack("<H", value) + b"\0\0" if kind == short and n == 1 else None
        ifd += struct.pack("<HHI", tag, kind, n) + (packed or struct.pack("<I", value))
    ifd += struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", ifd_at) + strip + arrays + ifd


def _png(width: int, height: int, bit_depth: int, colour_type: int, row: bytes) -> bytes:
    """A PNG of ``height`` copies of ``row`` (without its filter byte), compressed as it goes."""
    packer = zlib.compressobj(9)
    line = b"\0" + row
    body = b"".join(packer.compress(line) for _ in range(height)) + packer.flush()
    return png_bytes(width, height, bit_depth, colour_type, body)


def _icon(picture: bytes) -> bytes:
    """An ICO whose one directory entry says 256x256 (the 0 bytes) over ``picture``."""
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(picture), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + picture


def _int32_tiff(side: int = SIDE) -> bytes:
    """32-bit integer samples of 100000, beyond 16 bits: the review's 0.75 MB, 1.6 GB TIFF."""
    return _tiff(
        side,
        side,
        photometric=1,
        pixel=(100_000).to_bytes(4, "little"),
        bits=(32,),
        sample_format=1,
    )


def _rgb_tiff(side: int = SIDE) -> bytes:
    return _tiff(side, side, photometric=2, pixel=b"\x10\x20\x30", bits=(8, 8, 8))


# name -> (the file, the start of its message, the bytes its decode took before this change,
# measured in a fresh process)
HOSTILE: dict[str, tuple[Callable[[], bytes], str, float]] = {
    "32-bit TIFF": (_int32_tiff, "a TIFF image of 10000x10000 pixels in mode I", 1.70e9),
    "16-bit PNG": (
        lambda: _png(SIDE, SIDE, 16, 0, b"\x9c\x40" * SIDE),
        "a PNG image of 10000x10000 pixels in mode I;16",
        1.10e9,
    ),
    "RGBA TIFF": (
        lambda: _tiff(
            SIDE, SIDE, photometric=2, pixel=b"\1\2\3\4", bits=(8, 8, 8, 8), extra_samples=(2,)
        ),
        "a TIFF image of 10000x10000 pixels in mode RGBA",
        0.85e9,
    ),
    "CMYK TIFF": (
        lambda: _tiff(SIDE, SIDE, photometric=5, pixel=b"\1\2\3\4", bits=(8, 8, 8, 8)),
        "a TIFF image of 10000x10000 pixels in mode CMYK",
        0.85e9,
    ),
    "LAB TIFF": (
        lambda: _tiff(SIDE, SIDE, photometric=8, pixel=b"\x80\0\0", bits=(8, 8, 8)),
        "a TIFF image of 10000x10000 pixels in mode LAB",
        0.85e9,
    ),
}


# --- preparing in a fresh process -------------------------------------------------------------

# Runs prepare() once and reports its outcome and how far the process grew above what it held
# before: the peak (VmHWM) is reset first, so what imports took and gave back does not hide it.
# With "budget" it also reports the estimate: the bytes the decode held of a budget of its own.
_CHILD = """
import json, re, sys
from pathlib import Path
from describer.errors import SourceError
from describer.images import prepare

def kib(key):
    return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

data = Path(sys.argv[1]).read_bytes()
options = json.loads(sys.argv[2])
budget = None
if options.pop("budget", False):
    from describer.memory import DecodeBudget
    budget = options["budget"] = DecodeBudget(1 << 40)
Path("/proc/self/clear_refs").write_text("5")
before = kib("VmRSS")
try:
    prepare(data, **options)
    out = {"code": "ok", "message": ""}
except SourceError as exc:
    out = {"code": str(exc.code), "message": exc.message}
out["grown"] = (kib("VmHWM") - before) * 1024
out["estimate"] = budget.peak if budget is not None else None
print(json.dumps(out))
"""


def _prepare_alone(tmp_path: Path, data: bytes, **options: Any) -> dict[str, Any]:
    """prepare() in a fresh process: its code, message, peak growth (and estimate)."""
    path = tmp_path / f"source-{time.monotonic_ns()}"
    path.write_bytes(data)
    options = {"max_side": 1024, "max_pixels": 100_000_000, **options}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), json.dumps(options)],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def _amount(message: str) -> float:
    """The bytes a too_large message says the decode would take."""
    found = re.search(r"about ([\d.]+) (MB|GB)", message)
    assert found, message
    return float(found.group(1)) * (1e9 if found.group(2) == "GB" else 1e6)


# --- the reproductions ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", HOSTILE)
def test_an_image_too_costly_to_decode_is_refused_from_its_header(
    tmp_path: Path, name: str
) -> None:
    """A 10000x10000 32-bit TIFF, 16-bit PNG or RGBA, CMYK or LAB TIFF within MAX_IMAGE_PIXELS
    is too_large by its cost in bytes, with a message that names its mode and a cost at least
    what decoding it really took, and the process never grows by it."""
    build, what, really_took = HOSTILE[name]
    # GIVEN a file under a few MB that would take 0.85 to 1.7 GB to prepare
    data = build()
    assert len(data) < 1_000_000 or name == "16-bit PNG"
    # WHEN it is prepared with the defaults, in a process of its own
    result = _prepare_alone(tmp_path, data)
    # THEN it is too_large, saying its mode and what decoding it would take
    assert result["code"] == "too_large", result
    assert result["message"].startswith(f"The source is {what}; decoding it would take about ")
    assert result["message"].endswith(
        f", more than MAX_DECODE_BYTES ({DEFAULT_MAX_DECODE_BYTES}); it was not decoded."
    )
    assert _amount(result["message"]) >= really_took
    # AND it was not decoded: the process's peak stayed where it was
    assert result["grown"] < NOTHING_DECODED, result


def test_an_icon_hiding_a_large_png_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    """An ICO whose directory says 256x256 over a 14000x14000 PNG is too_large, and its record
    says it was not decoded because it was not: the process does not grow by the 196 MB."""
    # GIVEN an icon of 30 KB whose one entry is a 14000x14000 PNG
    data = _icon(_png(14_000, 14_000, 1, 0, bytes(14_000 // 8)))
    # WHEN it is prepared, in a process of its own
    result = _prepare_alone(tmp_path, data)
    # THEN it is refused for the entry's true size, before Image.open could decode it
    assert result == {
        "code": "too_large",
        "message": "The source is an ICO icon whose entry 1 of 1 holds 14000x14000 pixels, "
        "more than the 256x256 an icon can hold; it was not decoded.",
        "grown": result["grown"],
        "estimate": None,
    }
    assert result["grown"] < NOTHING_DECODED, result


def test_an_icon_whose_png_names_two_sizes_is_refused_before_it_is_opened() -> None:
    """Pillow keeps a PNG's last IHDR: an entry whose first IHDR says 16x16 and whose second
    says 14000x14000 is refused as unreadable, not measured by the first and decoded."""
    big = _png(14_000, 14_000, 1, 0, bytes(14_000 // 8))
    small_header = _png(16, 16, 1, 0, bytes(2))[8:33]  # its IHDR chunk: length, type, body, CRC
    two_headers = big[:8] + small_header + big[8:]
    with pytest.raises(SourceError) as caught:
        prepare(_icon(two_headers), max_side=1024, max_pixels=100_000_000)
    assert caught.value.code is Code.UNSUPPORTED_IMAGE
    assert "it was not decoded" in caught.value.message


def test_an_icon_hiding_a_large_bitmap_is_refused_and_a_damaged_one_unsupported() -> None:
    """A BMP entry is measured by its own header too (its height counts the mask rows), and an
    entry that points past the file is refused rather than guessed at."""
    # GIVEN an icon whose entry is a bitmap header declaring 14000 wide, 2 x 9000 high
    bitmap = struct.pack("<IiiHHIIiiII", 40, 14_000, 18_000, 1, 1, 0, 0, 0, 0, 0, 0)
    # WHEN it is prepared, and one whose entry points past the end of the file
    with pytest.raises(SourceError) as big:
        prepare(_icon(bitmap), max_side=1024, max_pixels=100_000_000)
    damaged = _icon(bitmap)[:-30]
    damaged = damaged[:18] + struct.pack("<I", 10_000) + damaged[22:]
    with pytest.raises(SourceError) as unreadable:
        prepare(damaged, max_side=1024, max_pixels=100_000_000)
    # THEN the first is too_large for 14000x9000 pixels, the second unsupported_image
    assert big.value.code is Code.TOO_LARGE
    assert "holds 14000x9000 pixels" in big.value.message
    assert unreadable.value.code is Code.UNSUPPORTED_IMAGE
    assert "entry 1 of 1 is not a PNG or BMP picture that can be read" in unreadable.value.message


# --- the budget shared by a process's decodes -------------------------------------------------


def test_a_decode_waits_for_its_share_of_the_budget() -> None:
    """While other decodes hold the budget a decode waits, in its worker thread, and runs as
    soon as its bytes are free; the bytes held never exceed the budget."""
    data = make_image(1500, 1000, "red", "PNG", mode="RGBA")
    budget = DecodeBudget(100 * MIB)
    with ThreadPoolExecutor(1) as pool:
        # GIVEN a budget of 100 MiB of which 90 are held
        with budget.hold(90 * MIB):
            # WHEN a decode estimated above the 10 MiB left is started
            job = pool.submit(prepare, data, max_side=1024, max_pixels=10**8, budget=budget)
            wait_for(lambda: budget.waiting == 1, "the decode to wait for its bytes")
            # THEN it waits while the bytes are held
            assert not job.done()
        # AND it runs once they are given back, and gives its own back
        assert job.result(timeout=30).sent_width == 1024
    # AND its bytes never came on top of the 90 MiB held
    assert (budget.in_use, budget.peak) == (0, 90 * MIB)


def test_a_decode_larger_than_the_budget_runs_alone() -> None:
    """A decode estimated above the whole budget (but within the per-decode cap) is not refused:
    it waits until nothing else is held, then runs alone."""
    data = make_image(1500, 1000, "blue", "PNG", mode="RGBA")
    budget = DecodeBudget(1 * MIB)
    with ThreadPoolExecutor(1) as pool:
        # GIVEN a budget of 1 MiB of which 1 byte is held
        with budget.hold(1):
            # WHEN a decode estimated at tens of MiB is started
            job = pool.submit(prepare, data, max_side=1024, max_pixels=10**8, budget=budget)
            wait_for(lambda: budget.waiting == 1, "the decode to wait for the budget to empty")
            assert not job.done()
        # THEN it runs once nothing else is held, alone
        assert job.result(timeout=30).sent_width == 1024
    assert budget.in_use == 0
    assert budget.peak > budget.total


def test_a_cancelled_wait_holds_no_bytes() -> None:
    """A decode given up while it waits (its run cancelled) leaves without taking any bytes, and
    decodes nothing."""
    data = make_image(1500, 1000, "green", "PNG", mode="RGBA")
    budget = DecodeBudget(10 * MIB)
    cancelled = threading.Event()
    with ThreadPoolExecutor(1) as pool, budget.hold(10 * MIB):
        # GIVEN a decode waiting for a budget another holds in full
        job = pool.submit(
            prepare, data, max_side=1024, max_pixels=10**8, budget=budget, cancelled=cancelled
        )
        wait_for(lambda: budget.waiting == 1, "the decode to wait")
        # WHEN its run is cancelled
        cancelled.set()
        # THEN it gives up as deadline_exceeded, holding nothing
        with pytest.raises(SourceError) as caught:
            job.result(timeout=5)
        assert caught.value.code is Code.DEADLINE_EXCEEDED
        assert (budget.in_use, budget.waiting) == (10 * MIB, 0)
    assert (budget.in_use, budget.peak) == (0, 10 * MIB)


def test_a_batch_cut_short_while_its_decodes_wait_gives_every_byte_back(
    make_runtime: Callable[..., Runtime], image_server: str, sim: RunningSimulator
) -> None:
    """When the deadline cancels a batch whose decodes wait for the process's budget, they give
    up without decoding, and the budget is whole again for the next invocation."""
    runtime = make_runtime(function_timeout_s=3.0, deadline_margin_s=1.0)
    budget = runtime.decode_budget
    uris = [f"{image_server}/big.jpg", f"{image_server}/rocket.jpg", f"{image_server}/big.jpg"]
    # GIVEN another invocation holding the whole decode budget
    with budget.hold(budget.total):
        # WHEN a batch runs into its 2 s deadline while its decodes wait
        reply = post_batch(runtime, {"images": uris})
    # THEN its sources are deadline_exceeded, none reached the model
    assert reply.status == 200
    assert [r["error"]["code"] for r in reply.body["results"]] == ["deadline_exceeded"] * 3
    assert sim.stats.calls == 0
    # AND the budget holds nothing and nobody waits on it
    wait_for(lambda: (budget.in_use, budget.waiting) == (0, 0), "the waits to give up", 5)
    assert budget.peak == budget.total


# --- a hostile batch through the real function ------------------------------------------------


def _group(pgid: int) -> list[Path]:
    """The /proc directories of a process group's processes (functions-framework and its worker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                found.append(stat.parent)
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return found


def _kib(proc: Path, key: str) -> int:
    found = re.search(rf"^{key}:\s+(\d+) kB", (proc / "status").read_text(), re.M)
    return int(found.group(1)) if found else 0


def _settle(pgid: int) -> int:
    """Reset the group's peak resident memory to what it holds now; the largest, in bytes."""
    for proc in _group(pgid):
        (proc / "clear_refs").write_text("5")
    return max(_kib(proc, "VmRSS") for proc in _group(pgid)) * 1024


def _peak(pgid: int) -> int:
    """The largest peak resident memory (VmHWM) in the group since it was settled, in bytes."""
    return max(_kib(proc, "VmHWM") for proc in _group(pgid)) * 1024


@pytest.mark.slow
def test_a_hostile_batch_stays_within_the_memory_deploy_sizes_for(
    tmp_path: Path, emulator_url: str, sim: RunningSimulator, gcs: Any
) -> None:
    """One HTTPS request naming the 32-bit TIFF twice and a 100 MP RGB TIFF four times, served by
    functions-framework: the TIFFs are too_large, the RGB ones described one after the other,
    and the worker never grows by more than MAX_DECODE_BYTES, so it stays within what deploy.sh
    sizes an instance for (the runtime, the images held, the decode budget)."""
    (tmp_path / "int32.tif").write_bytes(_int32_tiff())
    (tmp_path / "rgb.tif").write_bytes(_rgb_tiff())
    (tmp_path / "small.png").write_bytes(make_image(64, 48, "red", "PNG"))
    server, images = procs.serve_directory(tmp_path)
    port = procs.free_port()
    env = function_env(emulator_url, sim.url, RESULTS_BUCKET=RESULTS_BUCKET)
    function = procs.start_function("describe_http", port, env, log_path=tmp_path / "function.log")
    url = f"http://127.0.0.1:{port}/"
    try:
        # GIVEN a fresh function that has served one small image (its runtime is warm)
        warm = requests.post(url, json={"images": [f"{images}/small.png"]}, timeout=60)
        assert warm.json()["results"][0]["status"] == "ok"
        settled = _settle(function.pid)
        # WHEN one request names the 32-bit TIFF twice and the RGB TIFF four times
        names = ["int32.tif", "int32.tif", "rgb.tif", "rgb.tif", "rgb.tif", "rgb.tif"]
        reply = requests.post(url, json={"images": [f"{images}/{n}" for n in names]}, timeout=240)
        peak = _peak(function.pid)
    finally:
        procs.stop(function)
        server.shutdown()
    # THEN the 32-bit TIFFs are too_large and the RGB ones described
    records = reply.json()["results"]
    assert [r["status"] for r in records] == ["error"] * 2 + ["ok"] * 4, records
    assert {r["error"]["code"] for r in records[:2]} == {"too_large"}
    # AND the worker grew by less than one decode budget: the four 0.45 GB decodes, which two
    # vCPUs would otherwise run two at a time, took turns
    assert peak - settled < DEFAULT_MAX_DECODE_BYTES, (settled, peak)
    # AND it stayed within deploy.sh's sizing: the runtime, the images this request held (at
    # most MAX_IMAGE_BYTES each), and the decode budget
    assert settled < RUNTIME_BYTES
    held = len(names) * DEFAULT_MAX_IMAGE_BYTES
    assert peak < RUNTIME_BYTES + held + DEFAULT_MAX_DECODE_BYTES


def test_deploy_sizes_instances_for_the_functions_default_decode_budget() -> None:
    """deploy.sh's default MAX_DECODE_BYTES, from which it sizes memory, is the function's."""
    script = (procs.ROOT / "deploy" / "deploy.sh").read_text()
    found = re.search(r"EXTRA_ENV\[MAX_DECODE_BYTES\]:-(\d+)", script)
    assert found and int(found.group(1)) == DEFAULT_MAX_DECODE_BYTES


# --- the estimate against the real peak -------------------------------------------------------


def _save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


CALIBRATION: dict[str, Callable[[], bytes]] = {
    "32-bit TIFF": lambda: _int32_tiff(4000),
    "16-bit grey PNG": lambda: _png(4000, 4000, 16, 0, b"\x9c\x40" * 4000),
    "CMYK TIFF": lambda: _tiff(4000, 4000, photometric=5, pixel=b"\1\2\3\4", bits=(8, 8, 8, 8)),
    "RGB TIFF in one strip": lambda: _save(
        Image.new("RGB", (4000, 4000), (1, 2, 3)),
        "TIFF",
        compression="tiff_adobe_deflate",
        strip_size=2**31,
    ),
    "palette PNG with transparency": lambda: _save(
        Image.new("P", (4000, 4000), 1), "PNG", transparency=0
    ),
    "lossless RGBA WebP": lambda: _save(
        Image.new("RGBA", (4000, 4000), (1, 2, 3, 4)), "WEBP", lossless=True, method=0
    ),
    "progressive 4:4:4 JPEG": lambda: _save(
        Image.new("RGB", (4000, 4000), (9, 90, 200)), "JPEG", progressive=True, subsampling=0
    ),
    "JPEG 2000": lambda: _save(Image.new("RGB", (2000, 2000), (9, 90, 200)), "JPEG2000"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CALIBRATION)
def test_the_estimate_is_never_below_the_real_peak(tmp_path: Path, name: str) -> None:
    """Each format and mode, decoded in a fresh process, peaks below the estimate it was held to
    (describer/memory.py has the table at 100 MP)."""
    # GIVEN a 16 MP (JPEG 2000: 4 MP) image of a costly mode or decoder
    data = CALIBRATION[name]()
    # WHEN it is prepared in a fresh process, holding its estimate of a budget
    result = _prepare_alone(tmp_path, data, budget=True)
    # THEN it is described, and its peak stayed under the estimate
    assert result["code"] == "ok", result
    assert 0 < result["grown"] <= result["estimate"], result
