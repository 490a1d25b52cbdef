"""The command line, run as a real process against the simulator and the storage emulator."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from google.cloud import storage

from describer.schemas import SCHEMAS
from localdev import procs
from localdev.gemini_sim import RunningSimulator, describe_image

from .conftest import API_KEY, make_image

# Each test starts the command line as a process of its own: left out of the fast tier.
pytestmark = pytest.mark.slow

SAMPLE_NAMES = ["astronaut.png", "chelsea.png", "coffee.png", "grace_hopper.jpg", "rocket.jpg"]


def _env(sim: RunningSimulator, emulator_url: str | None = None, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "GOOGLE_GEMINI_BASE_URL": sim.url,
        "GEMINI_API_KEY": API_KEY,
        "ALLOW_PRIVATE_URLS": "true",
        "MODEL_BACKOFF_S": "0.01",
        **extra,
    }
    if emulator_url:
        env["STORAGE_EMULATOR_HOST"] = emulator_url
    return env


def _cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "describer", *args],
        env=env,
        cwd=cwd or procs.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def photos(tmp_path: Path, image_dir: Path) -> Path:
    """A folder of the sample photos with a nested folder, a hidden file and a text file."""
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for name in SAMPLE_NAMES[:3]:
        (folder / name).write_bytes((image_dir / name).read_bytes())
    (folder / "nested" / "rocket.jpg").write_bytes((image_dir / "rocket.jpg").read_bytes())
    (folder / ".hidden.jpg").write_bytes((image_dir / "rocket.jpg").read_bytes())
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_a_folder_a_file_and_a_url_are_described_in_order_with_failures_in_the_exit_status(
    photos: Path, image_dir: Path, image_server: str, sim: RunningSimulator
) -> None:
    # GIVEN a folder, a missing file and a URL
    missing = photos / "missing.jpg"
    url = f"{image_server}/grace_hopper.jpg"

    # WHEN the CLI describes them as JSON lines
    done = _cli("describe", str(photos), str(missing), url, "--format", "jsonl", env=_env(sim))

    # THEN the folder's images come first (sorted, recursively, hidden and non-image files
    # left out), then the missing file's error, then the URL, one record each
    records = [json.loads(line) for line in done.stdout.splitlines()]
    expected = [
        str(photos / n) for n in ["astronaut.png", "chelsea.png", "coffee.png", "nested/rocket.jpg"]
    ]
    assert [r["source"] for r in records] == [*expected, str(missing), url]
    for record, name in zip(records[:4], [*SAMPLE_NAMES[:3], "rocket.jpg"], strict=True):
        assert record["description"] == describe_image((image_dir / name).read_bytes())
    assert records[4]["error"]["code"] == "not_found"
    assert records[5]["status"] == "ok"
    assert sim.stats.calls == 5
    # AND one image failed, so the exit status says so; stderr has the summary and no
    # progress bar (not a terminal) and no log line per failure
    assert done.returncode == 1, done.stderr
    assert "5 described, 1 failed" in done.stderr
    assert "No such file" not in done.stderr
    assert "\r" not in done.stderr


def test_text_output_names_each_source_and_exit_status_is_zero_when_all_succeed(
    image_dir: Path, sim: RunningSimulator
) -> None:
    done = _cli(
        "describe", str(image_dir / "rocket.jpg"), str(image_dir / "coffee.png"), env=_env(sim)
    )
    assert done.returncode == 0, done.stderr
    blocks = done.stdout.strip().split("\n\n")
    assert blocks == [
        f"{image_dir / name}\n  {describe_image((image_dir / name).read_bytes())}"
        for name in ["rocket.jpg", "coffee.png"]
    ]


def test_json_output_with_the_alt_text_schema_carries_validated_data(
    image_dir: Path, sim: RunningSimulator
) -> None:
    done = _cli(
        "describe",
        str(image_dir / "chelsea.png"),
        "--schema",
        "alt_text",
        "--format",
        "json",
        "--prompt",
        "Alt text for a museum site.",
        env=_env(sim),
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["counts"] == {"ok": 1, "error": 0}
    assert document["usage"]["prompt_tokens"] > 0
    (record,) = document["results"]
    assert record["schema"] == "alt_text"
    assert record["prompt"] == "Alt text for a museum site."
    assert set(record["data"]) == {"alt_text", "description", "tags", "text_in_image"}
    assert 0 < len(record["data"]["alt_text"]) <= 125
    assert record["description"] == record["data"]["description"]
    assert sim.stats.structured == 1


def test_out_folder_gets_the_jsonl_and_a_gallery_with_one_card_per_source(
    photos: Path, tmp_path: Path, sim: RunningSimulator
) -> None:
    out = tmp_path / "out"
    sources = [str(photos / "chelsea.png"), str(photos / "notes.txt"), str(photos / "coffee.png")]
    done = _cli("describe", *sources, "--out", str(out), "--format", "json", env=_env(sim))
    assert done.returncode == 1, done.stderr
    document = json.loads(done.stdout)
    assert document["results_uri"].startswith("file:///")
    jsonl = Path(unquote(urlsplit(document["results_uri"]).path))
    gallery = Path(unquote(urlsplit(document["gallery_uri"]).path))
    assert jsonl.parent == gallery.parent == (out / "batches").resolve()
    assert gallery.name == jsonl.name.removesuffix(".jsonl") + ".html"
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert lines == document["results"]
    html = gallery.read_text()
    assert html.count('class="card') == 3
    # thumbnails for the two images; the text file has none
    assert html.count("data:image/jpeg;base64,") == 2
    assert "not_an_image" in html


def test_out_bucket_and_a_gs_prefix_as_source(
    gcs: storage.Client,
    bucket: storage.Bucket,
    emulator_url: str,
    image_dir: Path,
    sim: RunningSimulator,
) -> None:
    # GIVEN images (and a non-image) under a prefix in a bucket
    for name in ["rocket.jpg", "coffee.png"]:
        bucket.blob(f"in/{name}").upload_from_filename(str(image_dir / name))
    bucket.blob("in/readme.txt").upload_from_string(b"text", content_type="text/plain")
    bucket.blob("elsewhere/chelsea.png").upload_from_filename(str(image_dir / "chelsea.png"))

    # WHEN the CLI describes the prefix and writes to the bucket
    done = _cli(
        "describe",
        f"gs://{bucket.name}/in/",
        "--out",
        f"gs://{bucket.name}/runs/one/",
        "--format",
        "jsonl",
        env=_env(sim, emulator_url),
    )

    # THEN the two images under the prefix are described, and the JSONL and gallery are there
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["source"] for r in records] == [
        f"gs://{bucket.name}/in/coffee.png",
        f"gs://{bucket.name}/in/rocket.jpg",
    ]
    names = sorted(b.name for b in gcs.list_blobs(bucket.name, prefix="runs/one/"))
    assert [n.rsplit(".", 1)[1] for n in names] == ["html", "jsonl"]
    assert all(n.startswith("runs/one/batches/") for n in names)
    assert f"results: gs://{bucket.name}/runs/one/batches/" in done.stderr


def test_concurrency_flag_bounds_model_calls_in_flight(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    sim.configure(api_key=API_KEY, latency_ms=150)
    for i in range(12):
        (tmp_path / f"{i:02d}.png").write_bytes(make_image(64 + i, 48, "green", "PNG"))
    done = _cli("describe", str(tmp_path), "--concurrency", "3", env=_env(sim))
    assert done.returncode == 0, done.stderr
    assert sim.stats.calls == 12
    assert sim.stats.max_in_flight == 3


def test_progress_bar_is_drawn_on_a_terminal(tmp_path: Path, sim: RunningSimulator) -> None:
    # GIVEN stderr is a terminal (a pseudo-terminal here), and a quota of 2 calls in flight
    sim.configure(api_key=API_KEY, latency_ms=100, max_in_flight=2, retry_delay_s=0.05)
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(make_image(40 + i, 30, "red", "PNG"))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "describer", "describe", str(tmp_path)],
            env=_env(sim),
            cwd=procs.ROOT,
            stdout=subprocess.PIPE,
            stderr=follower,
        )
        os.close(follower)
        stdout, _ = proc.communicate(timeout=120)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
    # THEN the bar counts up to every image, and stdout still has only the results
    assert proc.returncode == 0
    assert b"4/4" in drawn
    assert b"image" in drawn
    assert stdout.count(b"Mostly") == 4
    # AND it shows the limit on calls the quota allowed, and the 429s ridden out
    assert re.search(rb"limit=[12]\b", drawn), drawn
    assert re.search(rb"throttled=[1-9]", drawn), drawn


def test_usage_errors_exit_2_with_a_reason(
    image_dir: Path, tmp_path: Path, sim: RunningSimulator
) -> None:
    no_key = _env(sim)
    del no_key["GEMINI_API_KEY"]
    done = _cli("describe", str(image_dir / "rocket.jpg"), env=no_key)
    assert done.returncode == 2
    assert "no Gemini credentials" in done.stderr
    done = _cli("describe", str(image_dir / "rocket.jpg"), "--concurrency", "0", env=_env(sim))
    assert done.returncode == 2
    assert "--concurrency" in done.stderr
    done = _cli("describe", str(image_dir / "rocket.jpg"), "--out", "gs://", env=_env(sim))
    assert done.returncode == 2
    assert "error: --out names no valid bucket" in done.stderr
    # A source is named as the source, not as an output
    done = _cli("describe", "gs://Bad_Bucket!/x/", env=_env(sim))
    assert done.returncode == 2
    assert "error: the source 'gs://Bad_Bucket!/x/' names no valid bucket" in done.stderr
    # A prompt has the limits a request's has
    long_prompt = "describe " * 1000
    done = _cli("describe", str(image_dir / "rocket.jpg"), "--prompt", long_prompt, env=_env(sim))
    assert done.returncode == 2
    assert "error: --prompt is longer than 8000 characters" in done.stderr
    # A folder without images says which, and what it looked for
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    done = _cli("describe", str(empty), env=_env(sim))
    assert done.returncode == 2
    assert f"error: no images in {empty}: a folder gives the files" in done.stderr
    assert sim.stats.calls == 0


def test_unwritable_out_exits_3_and_still_prints_the_results(
    image_dir: Path, tmp_path: Path, sim: RunningSimulator
) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "batches").write_text("a file where the folder should be")
    done = _cli("describe", str(image_dir / "rocket.jpg"), "--out", str(blocker), env=_env(sim))
    assert done.returncode == 3
    assert "could not write the results" in done.stderr
    assert describe_image((image_dir / "rocket.jpg").read_bytes()) in done.stdout


def test_help_explains_sources_formats_and_exit_status() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "describer", "describe", "--help"],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for needle in [
        "--prompt",
        "--schema",
        "--out",
        "--format",
        "--concurrency",
        "gs://BUCKET/PFX/",
        "exit status",
        "GEMINI_API_KEY",
    ]:
        assert needle in done.stdout


def test_local_paths_are_refused_by_the_function(
    http_function: str, image_dir: Path, sim: RunningSimulator
) -> None:
    """Local files are the command line's sources only, never a request's."""
    import requests

    path = str(image_dir / "rocket.jpg")
    reply = requests.post(
        http_function, json={"images": [path, f"file://{path}"]}, timeout=60
    ).json()
    codes = [r["error"]["code"] for r in reply["results"]]
    assert codes == ["invalid_source", "forbidden_source"]
    assert sim.stats.calls == 0


def test_ctrl_c_keeps_what_is_finished_and_marks_the_rest_interrupted(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    # GIVEN six images and a model that answers two calls and then holds every other
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(make_image(50 + i, 40, "blue", "PNG"))
    sim.configure(api_key=API_KEY, answer_limit=2)
    out = tmp_path / "out"
    command = ["describe", str(tmp_path), "--format", "jsonl", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "describer", *command, "--concurrency", "3"],
        env=_env(sim),
        cwd=procs.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        # Two answered, and each of the three describers holding a call.
        while sim.stats.held < 3 or sim.stats.ok < 2:
            assert time.monotonic() < deadline, "the run never reached the held calls"
            time.sleep(0.05)
        # WHEN Ctrl-C is pressed once
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # THEN the two finished records are kept, the rest say interrupted, all are written
    records = [json.loads(line) for line in stdout.splitlines()]
    assert len(records) == 6
    statuses = [r["status"] if r["status"] == "ok" else r["error"]["code"] for r in records]
    assert statuses.count("ok") == 2
    assert statuses.count("interrupted") == 4
    # AND the three calls cut short are counted in their records' attempts, with the size
    # found in preparation, and the gallery shows every picture prepared
    assert sum(r["attempts"] for r in records) == sim.stats.calls == 5
    held = [r for r in records if r["status"] != "ok" and r["attempts"]]
    assert len(held) == 3
    assert all((r["width"], r["height"]) == (50 + int(Path(r["source"]).stem), 40) for r in held)
    (gallery,) = (out / "batches").glob("*.html")
    prepared = sum(1 for r in records if "width" in r)
    assert gallery.read_text().count('src="data:image/jpeg;base64,') == prepared >= 5
    assert proc.returncode == 130, stderr
    (written,) = (out / "batches").glob("*.jsonl")
    assert [json.loads(line) for line in written.read_text().splitlines()] == records
    assert "stopping" in stderr


def test_file_names_that_are_not_utf8_come_back_as_file_uris(
    tmp_path: Path, image_dir: Path, sim: RunningSimulator
) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    (folder / name).write_bytes((image_dir / "coffee.png").read_bytes())
    out = tmp_path / "out"
    done = _cli(
        "describe", str(folder), "--format", "json", "--out", str(out),
        env={**_env(sim), "PYTHONIOENCODING": "utf-8:strict"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (record,) = json.loads(done.stdout)["results"]
    assert record["source"] == (folder / name).as_uri()
    assert record["source"].endswith("caf%E9.png")
    assert record["status"] == "ok"
    assert len(list((out / "batches").glob("*.html"))) == 1


def test_other_schemes_are_refused_and_the_schema_brings_its_prompt(
    image_dir: Path, sim: RunningSimulator
) -> None:
    done = _cli(
        "describe", "s3://bucket/a.jpg", "localhost:8080/a.jpg", str(image_dir / "rocket.jpg"),
        "--schema", "alt_text", "--format", "jsonl", env=_env(sim),
    )  # fmt: skip
    refused, unschemed, described = (json.loads(line) for line in done.stdout.splitlines())
    assert refused["error"]["code"] == "forbidden_source"
    # The message names what the command line takes, local files among them.
    assert "give a file or folder" in refused["error"]["message"]
    # host:port is a URL without its scheme, or a local name with a colon
    assert unschemed["error"]["code"] == "invalid_source"
    assert "no scheme" in unschemed["error"]["message"]
    assert "./name" in unschemed["error"]["message"]
    # With DESCRIBE_PROMPT at its three-word default, alt_text asks for a real description.
    assert described["prompt"] == SCHEMAS["alt_text"].default_prompt
    assert done.returncode == 1


def test_names_in_any_script_are_described_from_folders_and_gs_prefixes(
    tmp_path: Path,
    bucket: storage.Bucket,
    emulator_url: str,
    image_dir: Path,
    sim: RunningSimulator,
) -> None:
    """A local `café.png` and a gs:// `日本/写真.png` are described and named as written,
    with no percent-encoding asked of the user."""
    folder = tmp_path / "été"
    folder.mkdir()
    (folder / "café.png").write_bytes((image_dir / "coffee.png").read_bytes())
    bucket.blob("日本/写真.png").upload_from_filename(str(image_dir / "chelsea.png"))

    done = _cli(
        "describe",
        str(folder),
        f"gs://{bucket.name}/日本/",
        "--format",
        "jsonl",
        env=_env(sim, emulator_url),
    )

    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["source"], r["status"]) for r in records] == [
        (str(folder / "café.png"), "ok"),
        (f"gs://{bucket.name}/日本/写真.png", "ok"),
    ]
