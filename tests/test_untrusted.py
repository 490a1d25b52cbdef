"""What an uploader or an HTTPS caller can do with what they send: each hole a hostile review
reproduced, as a test that fails on the code it was found in."""

from __future__ import annotations

import html
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urljoin

import pathspec
import pytest
import requests
from google.cloud import storage

from describer import Runtime, handle_storage_event
from describer.gallery import render_index
from describer.http_api import MAX_REQUEST_BYTES
from localdev import procs
from localdev.gemini_sim import RunningSimulator

from .conftest import RESULTS_BUCKET, event_data, function_env, make_image, post_batch, upload


def _session_peaks(session: int) -> dict[int, int]:
    """VmHWM (peak resident KiB) of every process in a session: a function and its workers."""
    peaks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        # The session id is the 6th field, after the parenthesised command name.
        if int(stat.rsplit(")", 1)[1].split()[3]) != session:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[int(pid)] = int(line.split()[1])
    return peaks


@pytest.fixture
def lone_http_function(
    emulator_url: str, sim_server: RunningSimulator, gcs: storage.Client, tmp_path: Path
) -> Iterator[tuple[str, int]]:
    """describe_http in a process of its own, so its memory is this test's alone (``gcs``
    makes the results bucket it must find at start)."""
    port = procs.free_port()
    env = function_env(emulator_url, sim_server.url, RESULTS_BUCKET=RESULTS_BUCKET)
    proc = procs.start_function("describe_http", port, env, log_path=tmp_path / "http.log")
    yield f"http://127.0.0.1:{port}/", proc.pid
    procs.stop(proc)


def test_an_oversized_body_is_refused_without_being_held_in_memory(
    lone_http_function: tuple[str, int],
) -> None:
    """A 64 MiB POST is answered 413 while no process of the function grows by more than a
    few MiB (it was read whole before the 413, +64 MiB and more)."""
    url, session = lone_http_function
    # GIVEN a warmed-up function (its first answer allocates what every answer needs)
    assert requests.post(url, json={"images": []}, timeout=60).status_code == 400
    before = _session_peaks(session)
    # WHEN a body sixteen times the limit arrives, with its length declared
    size = 16 * MAX_REQUEST_BYTES
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n" + f"Content-Length: {size}\r\n\r\n".encode()
        )
        chunk = b" " * (1 << 20)
        for _ in range(size // len(chunk)):
            sock.sendall(chunk)
        answer = sock.makefile("rb").read()
    # THEN it is refused as too large
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"request_too_large"' in answer
    # AND no process of the function held the body
    after = _session_peaks(session)
    grown = {pid: (after[pid] - before.get(pid, 0)) // 1024 for pid in after}
    assert grown and max(grown.values()) < 16, f"MiB grown per process: {grown}"


@pytest.mark.parametrize(
    "manifest",
    ["javascript:alert(1)", "JaVaScRiPt:alert(1)", "data:text/html,x", "//evil.example/x"],
)
def test_a_sharded_batchs_index_links_stay_relative_whatever_the_manifest_name(
    manifest: str,
) -> None:
    """A manifest named like a URL scheme (or a network path) links its shard galleries as
    paths beside the index page, percent-encoded, never as that scheme or host."""
    page = render_index({"batch": manifest}, [f"{manifest}.shards/00000.html"]).decode()
    (href,) = re.findall(r'<a href="([^"]*)"', page)
    index_uri = "https://storage.example/b/describer/batches/page.html"
    assert href.startswith("./")
    assert urljoin(index_uri, html.unescape(href)).startswith(
        "https://storage.example/b/describer/batches/"
    )
    assert ":" not in href


def _deployed(root: Path) -> set[str]:
    """The files under ``root`` that gcloud would upload, by .gcloudignore's gitignore rules."""
    spec = pathspec.GitIgnoreSpec.from_lines(
        (procs.ROOT / ".gcloudignore").read_text().splitlines()
    )
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    return {f for f in files if not spec.match_file(f)}


def test_only_the_function_s_own_files_are_deployed_whatever_lies_beside_them(
    tmp_path: Path,
) -> None:
    """Stray secrets and outputs in the project root (a key, .env, test-output/, a CLI --out
    folder, files slipped into describer/) are not uploaded; the function's files are."""
    # GIVEN the project's own files, and strays a developer may leave beside them
    for name in ("main.py", "requirements.txt", "describer/__init__.py", "describer/store.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    strays = [
        ".env",
        "key.json",
        "service-account.json",
        "deploy/config.env",
        "test-output/gallery.png",
        "results/batches/run.jsonl",
        "describer/secret.json",
        "describer/__pycache__/store.cpython-311.pyc",
        "notes.md",
        ".venv/bin/python",
    ]
    for name in strays:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("secret")
    # THEN only the function's files would be deployed
    assert _deployed(tmp_path) == {
        "main.py",
        "requirements.txt",
        "describer/__init__.py",
        "describer/store.py",
    }
    # AND the repository itself deploys its package and entry point, nothing else
    shipped = _deployed(procs.ROOT)
    assert {"main.py", "requirements.txt", "describer/runtime.py"} <= shipped
    assert all(f in ("main.py", "requirements.txt") or f.startswith("describer/") for f in shipped)
    assert all(f.endswith(".py") for f in shipped if f.startswith("describer/"))


NON_ASCII = ["photos/café.png", "photos/日本/写真.png", "photos/naïve 1.png"]


def test_non_ascii_names_are_described_as_uploads_manifests_and_backfills(
    make_runtime: Callable[..., Runtime],
    bucket: storage.Bucket,
    image_dir: Path,
    image_server: str,
    sim: RunningSimulator,
) -> None:
    """Names in any script work as they are, with no percent-encoding by the user: an upload
    of `photos/café.png` gets its description (it got a permanent invalid_source), and so do
    such names in a batch, over http(s), and in a backfill."""
    runtime = make_runtime(
        results_bucket=None, shard_size=2, allowed_buckets=frozenset({bucket.name})
    )
    for width, name in enumerate(NON_ASCII, start=120):
        upload(bucket, name, make_image(width, 50, "green", "PNG"), "image/png")
    (image_dir / "été.png").write_bytes(make_image(90, 40, "red", "PNG"))
    # WHEN the first is uploaded THEN its sidecar holds its description
    first = bucket.get_blob(NON_ASCII[0])
    assert first is not None
    assert handle_storage_event(runtime, event_data(first)) == "described"
    sidecar = json.loads(bucket.blob(f"descriptions/{NON_ASCII[0]}.json").download_as_bytes())
    assert sidecar["status"] == "ok" and sidecar["source"] == f"gs://{bucket.name}/{NON_ASCII[0]}"
    # WHEN a batch names one in gs:// and one over http, each as written
    batch = post_batch(
        runtime,
        {
            "images": [f"gs://{bucket.name}/{NON_ASCII[1]}", f"{image_server}/été.png"],
            "output": f"gs://{bucket.name}/out/",
        },
    )
    # THEN both are described, and the records keep the names as given
    assert [r["status"] for r in batch.body["results"]] == ["ok", "ok"], batch.body
    assert batch.body["results"][1]["source"] == f"{image_server}/été.png"
    # AND a percent-encoded gs:// name is another name, not an escape
    escaped = post_batch(
        runtime,
        {
            "images": [f"gs://{bucket.name}/photos/caf%C3%A9.png"],
            "output": f"gs://{bucket.name}/out/",
        },
    )
    assert escaped.body["results"][0]["error"]["code"] == "not_found"
    # WHEN the folder is backfilled THEN the two others get sidecars too
    started = post_batch(runtime, {"backfill": f"gs://{bucket.name}/photos/"})
    assert started.status == 202 and started.body["images"] == 2, started.body
    for shard in sorted(bucket.list_blobs(prefix=runtime.settings.shards_prefix), key=_name):
        handle_storage_event(runtime, event_data(shard))
    for name in NON_ASCII:
        blob = bucket.get_blob(f"descriptions/{name}.json")
        assert blob is not None, name
        assert json.loads(blob.download_as_bytes())["status"] == "ok"


def _name(blob: storage.Blob) -> str:
    return str(blob.name)
