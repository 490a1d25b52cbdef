"""What an uploader or an HTTPS caller can do with what they send: each hole a hostile review
reproduced, as a test that fails on the code it was found in."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
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

from .conftest import (
    RESULTS_BUCKET,
    deliver_all,
    event_data,
    function_env,
    make_image,
    post_batch,
    upload,
)


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
    deliver_all(runtime, bucket, runtime.settings.shards_prefix)
    for name in NON_ASCII:
        blob = bucket.get_blob(f"descriptions/{name}.json")
        assert blob is not None, name
        assert json.loads(blob.download_as_bytes())["status"] == "ok"


def _name(blob: storage.Blob) -> str:
    return str(blob.name)


def _forged_shard(
    bucket: storage.Bucket,
    name: str,
    *,
    batch: str,
    run: str,
    images: list[str],
    output: str,
    kind: str = "manifest",
) -> tuple[storage.Blob, str]:
    """A shard body an uploader can write, and its digest, as the function computes it."""
    body: dict[str, Any] = {
        "images": images,
        "prompt": "The uploader's own prompt.",
        "schema": "text",
        "output": output,
        "shard": {
            "batch": batch,
            "index": 0,
            "count": 1,
            "offset": 0,
            "total": len(images),
            "run": run,
            "kind": kind,
            "source": images[0],
        },
    }
    if kind == "backfill":
        body["generations"] = ["1"] * len(images)
        body["sidecar_generations"] = [0] * len(images)
    raw = json.dumps(body, sort_keys=True).encode()
    return upload(bucket, name, raw, "application/json"), hashlib.sha256(raw).hexdigest()[:32]


def _forged_status(
    bucket: storage.Bucket, name: str, *, batch: str, run: str, digest: str, source: str
) -> None:
    """A status object as the function writes one, planted where a shard's body points."""
    status = {
        "batch": batch,
        "kind": "manifest",
        "source": source,
        "run": run,
        "total": 1,
        "shards": 1,
        "shard_size": 1,
        "pending_shards": [],
        "finished_shards": {},
        "shard_digests": [digest],
        "output": f"gs://{bucket.name}/forged/",
        "files": f"gs://{bucket.name}/forged/batches/",
        "created_at": "2026-12-01T00:00:00.000+00:00",
        "updated_at": "2026-12-01T00:00:00.000+00:00",
    }
    upload(bucket, name, json.dumps(status).encode(), "application/json")


def _forge(
    bucket: storage.Bucket,
    secret: storage.Bucket,
    shards_prefix: str,
    *,
    status_at: str,
    batch: str = "evil",
    kind: str = "manifest",
    output: str = "forged/",
) -> storage.Blob:
    """A shard naming the secret bucket's picture, and a status object vouching for it."""
    upload(secret, "private.png", make_image(64, 48, "red", "PNG"), "image/png")
    forged, digest = _forged_shard(
        bucket,
        f"{shards_prefix}{batch}/1/00000.batch.json",
        batch=batch,
        run="1",
        images=[f"gs://{secret.name}/private.png"],
        output=f"gs://{bucket.name}/{output}",
        kind=kind,
    )
    _forged_status(
        bucket,
        status_at,
        batch=batch,
        run="1",
        digest=digest,
        source=f"gs://{secret.name}/private.png",
    )
    return forged


def test_a_forged_shard_and_status_cannot_read_other_buckets_or_touch_a_real_batch(
    make_runtime: Callable[..., Runtime],
    gcs: storage.Client,
    bucket: storage.Bucket,
    sim: RunningSimulator,
) -> None:
    """An uploader who writes a shard and a status object into a watched bucket makes the
    function read nothing outside ALLOWED_BUCKETS and delete nothing of a real batch: a
    shard's status is looked up where the settings say (RESULTS_BUCKET), never where its
    body points."""
    runtime = make_runtime(shard_size=2, allowed_buckets=frozenset({bucket.name}))
    shards = runtime.settings.shards_prefix
    secret = gcs.create_bucket(f"secret-{bucket.name}")
    # GIVEN a forged shard naming an object outside ALLOWED_BUCKETS, with a status object
    # carrying its digest where its body's output points
    forged = _forge(bucket, secret, shards, status_at="forged/batches/evil.status.json")
    # WHEN its event arrives THEN nothing is described and nothing written beside it
    assert handle_storage_event(runtime, event_data(forged)) == "superseded"
    assert sim.stats.calls == 0
    assert [b.name for b in bucket.list_blobs(prefix="forged/")] == [
        "forged/batches/evil.status.json"
    ]
    # GIVEN a real sharded batch, and an object of the uploader's among its shards
    images = [f"gs://{bucket.name}/in/{i}.png" for i in range(4)]
    for i in range(4):
        upload(bucket, f"in/{i}.png", make_image(70 + i, 40, "blue", "PNG"), "image/png")
    manifest = upload(bucket, "real.batch.json", json.dumps({"images": images}).encode(), None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    run = str(manifest.generation)
    real_shards = sorted(b.name for b in bucket.list_blobs(prefix=f"{shards}real/"))
    upload(bucket, f"{shards}real/{run}/notes.txt", b"the uploader's", "text/plain")
    # WHEN a forged shard of that batch and run arrives, its status saying nothing is pending
    intruder, digest = _forged_shard(
        bucket,
        f"{shards}real/{run}/00009.batch.json",
        batch="real",
        run=run,
        images=[f"gs://{secret.name}/private.png"],
        output=f"gs://{bucket.name}/forged/",
    )
    _forged_status(
        bucket,
        "forged/batches/real.status.json",
        batch="real",
        run=run,
        digest=digest,
        source=f"gs://{secret.name}/private.png",
    )
    # THEN it is refused: no call, and the real batch's shards are all still there
    assert handle_storage_event(runtime, event_data(intruder)) == "shard_invalid"
    assert sim.stats.calls == 0
    left = {b.name for b in bucket.list_blobs(prefix=f"{shards}real/")}
    assert set(real_shards) <= left
    # AND the real batch completes; its merge deletes its own shards, not the uploader's
    outcomes = [
        handle_storage_event(runtime, event_data(bucket.get_blob(name))) for name in real_shards
    ]
    assert outcomes[-1] == "merged"
    assert sim.stats.calls == 4
    assert {b.name for b in bucket.list_blobs(prefix=f"{shards}real/")} == {
        f"{shards}real/{run}/notes.txt",
        f"{shards}real/{run}/00009.batch.json",
    }


def test_a_forged_status_in_a_bucket_uploaders_write_cannot_widen_reads_or_move_sidecars(
    make_runtime: Callable[..., Runtime],
    gcs: storage.Client,
    bucket: storage.Bucket,
    sim: RunningSimulator,
) -> None:
    """Where the state bucket is one uploaders write to (RESULTS_BUCKET is also the watched
    bucket), a forged status is found, but what a shard reads still comes from the settings,
    and a backfill shard's sidecars only go where sidecars go."""
    runtime = make_runtime(results_bucket=bucket.name, allowed_buckets=frozenset())
    shards = runtime.settings.shards_prefix
    secret = gcs.create_bucket(f"hidden-{bucket.name}")
    forged = _forge(bucket, secret, shards, status_at="describer-batches/evil.status.json")
    # WHEN the shard runs THEN the other bucket is not read: its source is forbidden
    handle_storage_event(runtime, event_data(forged))
    assert sim.stats.calls == 0
    jsonl = bucket.get_blob("forged/batches/evil.shards/00000.jsonl")
    assert jsonl is not None
    (record,) = (json.loads(line) for line in jsonl.download_as_text().splitlines())
    assert record["error"]["code"] == "forbidden_source"
    # WHEN a forged backfill shard would write its sidecars outside RESULTS_PREFIX THEN it
    # is refused
    elsewhere = _forge(
        bucket,
        secret,
        shards,
        status_at="describer-batches/planted.status.json",
        batch="planted",
        kind="backfill",
        output="planted/",
    )
    assert handle_storage_event(runtime, event_data(elsewhere)) == "shard_invalid"
    assert not list(bucket.list_blobs(prefix="planted/"))
    assert sim.stats.calls == 0


def test_an_upload_named_like_a_batch_file_cannot_replace_it(
    make_runtime: Callable[..., Runtime],
    gcs: storage.Client,
    bucket: storage.Bucket,
    sim: RunningSimulator,
) -> None:
    """Uploads named after a batch's status object (in its old place and its new one) leave
    the batch to merge; and a sidecar never replaces an object that is not a sidecar."""
    runtime = make_runtime(results_bucket=None, shard_size=2, allowed_buckets=frozenset())
    images = [f"gs://{bucket.name}/in/{i}.png" for i in range(4)]
    for i in range(4):
        upload(bucket, f"in/{i}.png", make_image(80 + i, 40, "green", "PNG"), "image/png")
    manifest = upload(bucket, "big.batch.json", json.dumps({"images": images}).encode(), None)
    assert handle_storage_event(runtime, event_data(manifest)) == "sharded"
    status = "describer-batches/big.status.json"
    before = bucket.get_blob(status)
    assert before is not None
    # WHEN images are uploaded under the names that reached the status object
    png = make_image(30, 30, "red", "PNG")
    old_place = upload(bucket, "batches/big.status", png, "image/png")
    new_place = upload(bucket, "describer-batches/big.status", png, "image/png")
    assert handle_storage_event(runtime, event_data(old_place)) == "described"
    assert handle_storage_event(runtime, event_data(new_place)) == "ignored_batch_file"
    # THEN the status object is the one the batch wrote, and the batch merges
    after = bucket.get_blob(status)
    assert after is not None and after.generation == before.generation
    assert deliver_all(runtime, bucket, runtime.settings.shards_prefix)[-1] == "merged"
    # GIVEN results with no RESULTS_PREFIX in a bucket of their own, where a user keeps a file
    results = gcs.create_bucket(f"r-{bucket.name}")
    upload(results, "notes/readme.json", b'{"mine": true}', "application/json")
    flat = make_runtime(results_bucket=results.name, results_prefix="")
    photo = upload(bucket, "notes/readme", png, "image/png")
    # WHEN an upload's sidecar would take that file's name THEN the file is left alone
    assert handle_storage_event(flat, event_data(photo)) == "name_taken"
    kept = results.get_blob("notes/readme.json")
    assert kept is not None and kept.download_as_bytes() == b'{"mine": true}'


def test_a_backfill_with_its_own_prompt_never_replaces_the_deployments_sidecars(
    make_runtime: Callable[..., Runtime], bucket: storage.Bucket, sim: RunningSimulator
) -> None:
    """Any describe_http caller may backfill, but a prompt or schema of their own only fills
    images without a sidecar: one written with DESCRIBE_PROMPT stays."""
    runtime = make_runtime(results_bucket=None, shard_size=5, allowed_buckets={bucket.name})
    for i in range(2):
        upload(bucket, f"photos/{i}.png", make_image(60 + i, 40, "blue", "PNG"), "image/png")
    described = bucket.get_blob("photos/0.png")
    assert described is not None
    assert handle_storage_event(runtime, event_data(described)) == "described"
    sidecar = bucket.get_blob("descriptions/photos/0.png.json")
    assert sidecar is not None
    # WHEN a caller backfills with a prompt of their own
    reply = post_batch(
        runtime, {"backfill": f"gs://{bucket.name}/photos/", "prompt": "Name every colour."}
    )
    # THEN only the image without a sidecar is taken, and the deployment's sidecar is kept
    assert reply.status == 202, reply.body
    assert (reply.body["images"], reply.body["kept_sidecars"]) == (1, 1)
    deliver_all(runtime, bucket, runtime.settings.shards_prefix)
    again = bucket.get_blob("descriptions/photos/0.png.json")
    assert again is not None and again.generation == sidecar.generation
    other = json.loads(bucket.blob("descriptions/photos/1.png.json").download_as_bytes())
    assert other["prompt"] == "Name every colour."
    # GIVEN the deployment's prompt changed since the first sidecar was written
    redeployed = make_runtime(
        results_bucket=None,
        shard_size=5,
        allowed_buckets={bucket.name},
        prompt="A prompt of the new deployment.",
    )
    # WHEN a caller backfills with yet another prompt THEN no sidecar is replaced
    third = post_batch(
        redeployed, {"backfill": f"gs://{bucket.name}/photos/", "prompt": "Count the shapes."}
    )
    assert third.status == 200 and third.body["images"] == 0, third.body
    assert third.body["kept_sidecars"] == 2
    kept = bucket.get_blob("descriptions/photos/0.png.json")
    assert kept is not None and kept.generation == sidecar.generation
