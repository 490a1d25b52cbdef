"""Fixtures: real servers (storage emulator, Gemini simulator, image server, functions).

Every test talks to real processes over HTTP: gcp-storage-emulator through the
real google-cloud-storage client, the project's Gemini simulator through the
real google-genai client, and functions-framework serving main.py.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from PIL import Image

from describer import Runtime, Settings
from describer.events import handle_storage_event
from describer.gemini import GeminiConnector
from describer.settings import GeminiAccess
from localdev import procs
from localdev.events import finalized_event
from localdev.gemini_sim import RunningSimulator, start_in_thread
from localdev.relay import RelayConfig, RunningRelay
from localdev.relay import start_in_thread as start_relay

SAMPLES = procs.ROOT / "samples"
API_KEY = "test-key"
RESULTS_BUCKET = "results"
INPUT_BUCKET = "inputs"


@pytest.fixture(scope="session")
def emulator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = procs.free_port()
    proc = procs.start_storage_emulator(port, tmp_path_factory.mktemp("logs") / "storage.log")
    yield f"http://127.0.0.1:{port}"
    procs.stop(proc)


@pytest.fixture(scope="session")
def gcs(emulator_url: str) -> storage.Client:
    """The real storage client, pointed at the emulator."""
    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": emulator_url},
    )
    for name in (RESULTS_BUCKET, INPUT_BUCKET):
        client.create_bucket(name)
    return client


@pytest.fixture(scope="session")
def sim_server() -> Iterator[RunningSimulator]:
    sim = start_in_thread()
    yield sim
    sim.stop()


@pytest.fixture
def sim(sim_server: RunningSimulator) -> RunningSimulator:
    """The Gemini simulator, reset to defaults (and empty stats) for each test."""
    sim_server.configure(api_key=API_KEY)
    return sim_server


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("images")
    for path in SAMPLES.iterdir():
        shutil.copy(path, directory / path.name)
    (directory / "notes.txt").write_text("not an image at all")
    (directory / "page.html").write_text("<!doctype html><html><body>hi</body></html>")
    (directory / "big.jpg").write_bytes(make_image(3000, 2000, "blue", "JPEG"))
    (directory / "anim.gif").write_bytes(make_image(64, 48, "red", "GIF"))
    return directory


@pytest.fixture(scope="session")
def image_server(image_dir: Path) -> Iterator[str]:
    """A static file server on loopback holding the sample photos and a few odd files."""
    server, url = procs.serve_directory(image_dir)
    yield url
    server.shutdown()


@pytest.fixture
def bucket(gcs: storage.Client) -> storage.Bucket:
    """A fresh, empty bucket for one test."""
    return gcs.create_bucket(f"t-{uuid.uuid4().hex[:16]}")


def function_env(emulator_url: str, sim_url: str, **extra: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": emulator_url,
        "GOOGLE_GEMINI_BASE_URL": sim_url,
        "GEMINI_API_KEY": API_KEY,
        "ALLOW_PRIVATE_URLS": "true",
        "MODEL_BACKOFF_S": "0.01",
        **extra,
    }


@pytest.fixture(scope="session")
def function_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the served functions' stdout (their JSON log lines) goes."""
    return tmp_path_factory.mktemp("function-logs")


@pytest.fixture(scope="session")
def http_function(
    emulator_url: str, sim_server: RunningSimulator, gcs: storage.Client, function_logs: Path
) -> Iterator[str]:
    """describe_http served by functions-framework, results to the 'results' bucket."""
    port = procs.free_port()
    env = function_env(
        emulator_url, sim_server.url, RESULTS_BUCKET=RESULTS_BUCKET, ALLOWED_BUCKETS=INPUT_BUCKET
    )
    proc = procs.start_function(
        "describe_http", port, env, log_path=function_logs / "describe_http.log"
    )
    yield f"http://127.0.0.1:{port}/"
    procs.stop(proc)


@pytest.fixture(scope="session")
def gcs_function(
    emulator_url: str, sim_server: RunningSimulator, gcs: storage.Client, function_logs: Path
) -> Iterator[str]:
    """describe_gcs served by functions-framework; results go to the event's bucket."""
    port = procs.free_port()
    env = function_env(emulator_url, sim_server.url)
    proc = procs.start_function(
        "describe_gcs",
        port,
        env,
        cloudevent=True,
        log_path=function_logs / "describe_gcs.log",
    )
    yield f"http://127.0.0.1:{port}/"
    procs.stop(proc)


def send_event(url: str, blob: storage.Blob, **overrides: Any) -> requests.Response:
    """POST a binary-mode object.v1.finalized CloudEvent for ``blob``, as Eventarc does."""
    headers, body = finalized_event(blob, **overrides)
    return requests.post(url, data=body, headers=headers, timeout=120)


def event_data(blob: storage.Blob) -> dict[str, Any]:
    """The data of the finalize CloudEvent Eventarc would send for ``blob``."""
    _, body = finalized_event(blob)
    data: dict[str, Any] = json.loads(body)
    return data


def deliver_all(runtime: Runtime, bucket: storage.Bucket, prefix: str) -> list[str]:
    """Deliver the finalize event of every object under ``prefix``, as Eventarc would, and of
    those the deliveries create (a backfill's next listing step, its shards), until no new
    one appears; the outcomes in order."""
    delivered: set[tuple[str, int]] = set()
    outcomes = []
    while True:
        blobs = sorted(bucket.list_blobs(prefix=prefix), key=lambda b: str(b.name))
        new = [b for b in blobs if (b.name, b.generation) not in delivered]
        if not new:
            return outcomes
        for blob in new:
            delivered.add((blob.name, blob.generation))
            outcomes.append(handle_storage_event(runtime, event_data(blob)))


def wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float = 30.0, *, poll_s: float = 0.02
) -> None:
    """Poll real state (storage, simulator stats) until it holds; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def upload(
    bucket: storage.Bucket, name: str, data: bytes, content_type: str | None
) -> storage.Blob:
    blob = bucket.blob(name)
    blob.upload_from_string(data, content_type=content_type or "application/octet-stream")
    fresh = bucket.get_blob(name)
    assert fresh is not None
    return fresh


def upload_pictures(
    bucket: storage.Bucket, n: int, *, folder: str = "in", height: int, colour: str
) -> list[str]:
    """Upload n distinct PNGs, ``folder``/000.png on, of widths 100, 101, ...; their gs:// URIs."""
    uris = []
    for i in range(n):
        name = f"{folder}/{i:03d}.png"
        upload(bucket, name, make_image(100 + i, height, colour, "PNG"), "image/png")
        uris.append(f"gs://{bucket.name}/{name}")
    return uris


COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 210), "green": (40, 160, 60)}


def make_image(width: int, height: int, colour: str, fmt: str, mode: str = "RGB") -> bytes:
    """A synthetic image with a gradient (so fingerprints differ) over a base colour."""
    base = COLOURS[colour]
    image = Image.new("RGB", (width, height), base)
    pixels = image.load()
    assert pixels is not None
    step = max(1, width // 16)
    for x in range(0, width, step):
        for y in range(0, height, max(1, height // 16)):
            shade = (x * 40 // max(width, 1)) - 20
            pixels[x, y] = tuple(max(0, min(255, c + shade)) for c in base)  # type: ignore[index]
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def make_runtime(gcs: storage.Client, sim: RunningSimulator) -> Iterator[Callable[..., Runtime]]:
    """Build a Runtime with given settings (and optionally its store and address check).

    Clients are passed in; nothing global is patched.
    """
    made: list[Runtime] = []

    def build(*, store: Any = None, address_allowed: Any = None, **overrides: Any) -> Runtime:
        settings = replace(
            Settings(
                results_bucket=RESULTS_BUCKET,
                allowed_buckets=frozenset({INPUT_BUCKET}),
                allow_private_urls=True,
                model_backoff_s=0.01,
                gemini=GeminiAccess(api_key=API_KEY, base_url=sim.url),
            ),
            **overrides,
        )
        extras: dict[str, Any] = {"store": store}
        if address_allowed is not None:
            extras["address_allowed"] = address_allowed
        runtime = Runtime(
            settings=settings,
            storage_client=gcs,
            gemini=GeminiConnector(settings.gemini),
            **extras,
        )
        made.append(runtime)
        return runtime

    yield build
    for runtime in made:
        runtime.close()


def post_batch(runtime: Runtime, body: Any, **kwargs: Any) -> Any:
    """Call handle_http in-process the way main.describe_http does."""
    from describer import handle_http

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return handle_http(
        runtime,
        method=kwargs.get("method", "POST"),
        content_type=kwargs.get("content_type", "application/json"),
        content_length=len(raw),
        read_body=lambda: raw,
        headers=kwargs.get("headers", {}),
    )


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG written by hand around compressed ``idat``, for what Pillow cannot save (16-bit
    RGB, bombs, hostile headers)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.fixture
def fleet_buckets(gcs: storage.Client) -> tuple[storage.Bucket, storage.Bucket]:
    """A photos bucket whose writes raise events, and a results bucket, both fresh."""
    tag = uuid.uuid4().hex[:10]
    return gcs.create_bucket(f"photos-{tag}"), gcs.create_bucket(f"results-{tag}")


@pytest.fixture
def relay(
    emulator_url: str, fleet_buckets: tuple[storage.Bucket, storage.Bucket]
) -> Iterator[RunningRelay]:
    """The relay in front of the emulator, raising the photos bucket's finalize events."""
    running = fleet_relay(emulator_url, fleet_buckets[0])
    yield running
    running.stop()


def fleet_relay(emulator_url: str, photos: storage.Bucket, **config: Any) -> RunningRelay:
    """A relay raising ``photos``' events, redelivering quickly (and ``config``'s options)."""
    return start_relay(
        RelayConfig(
            emulator_url=emulator_url,
            trigger_buckets=frozenset({photos.name}),
            **{"retry_initial_s": 0.2, "retry_max_s": 2.0, **config},
        )
    )


class Functions:
    """functions-framework processes of one test, each with its log, all stopped at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, target: str, **kw: Any) -> str:
        port = procs.free_port()
        log = self.logs / f"{target}-{len(self.started)}.log"
        self.started.append(procs.start_function(target, port, self.env, log_path=log, **kw))
        return f"http://127.0.0.1:{port}/"

    def stop_all(self) -> None:
        while self.started:
            procs.stop(self.started.pop())
