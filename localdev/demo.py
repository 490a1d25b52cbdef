"""The local demo: the whole path on a laptop, against local stand-ins.

Starts the Cloud Storage emulator, the Gemini simulator (unless a real key or
Vertex AI is configured), a loopback image server and functions-framework
with both targets; uploads the sample images; calls describe_http with a
batch; sends finalize CloudEvents to describe_gcs for an upload and for a
manifest; runs the command line on the samples with structured descriptions;
then prints each description, where it was written, and where the galleries are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from google.api_core.exceptions import NotFound
from google.cloud import storage

from localdev import procs
from localdev.events import finalized_event
from localdev.gemini_sim import SimConfig, start_in_thread

SAMPLES = procs.ROOT / "samples"
UPLOADS = "demo-uploads"
RESULTS = "demo-results"


def main() -> int:
    real = bool(
        os.environ.get("GEMINI_API_KEY")
        or os.environ.get("GOOGLE_API_KEY")
        or os.environ.get("GOOGLE_GENAI_USE_VERTEXAI", "").lower() in ("1", "true")
    )
    logs = Path(tempfile.mkdtemp(prefix="describer-demo-"))
    started: list[Any] = []
    try:
        storage_port = procs.free_port()
        started.append(procs.start_storage_emulator(storage_port, logs / "storage.log"))
        emulator = f"http://127.0.0.1:{storage_port}"
        env = {
            "STORAGE_EMULATOR_HOST": emulator,
            "RESULTS_BUCKET": RESULTS,
            "ALLOWED_BUCKETS": UPLOADS,
            # The demo serves its images from loopback; never set this in production.
            "ALLOW_PRIVATE_URLS": "true",
        }
        endpoint = os.environ.get("GOOGLE_GEMINI_BASE_URL")
        if real and endpoint:
            print(f"Gemini: the endpoint {endpoint} (GOOGLE_GEMINI_BASE_URL is set).")
        elif real:
            print("Gemini: the real API (credentials found in the environment).")
        else:
            sim = start_in_thread(SimConfig(latency_ms=300))
            env |= {"GOOGLE_GEMINI_BASE_URL": sim.url, "GEMINI_API_KEY": "demo-key"}
            print("Gemini: the local SIMULATOR (no GEMINI_API_KEY or Vertex AI set), so the")
            print(
                "descriptions below are synthetic: colour, shape and a fingerprint of each image."
            )
        os.environ["STORAGE_EMULATOR_HOST"] = emulator
        client = storage.Client()
        for bucket in (UPLOADS, RESULTS):
            client.create_bucket(bucket)
        images = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
        for path in images:
            client.bucket(UPLOADS).blob(f"photos/{path.name}").upload_from_filename(str(path))
        server, base = procs.serve_directory(SAMPLES)
        http_port, gcs_port = procs.free_port(), procs.free_port()
        started.append(
            procs.start_function(
                "describe_http", http_port, env, log_path=logs / "describe_http.log"
            )
        )
        started.append(
            procs.start_function(
                "describe_gcs", gcs_port, env, cloudevent=True, log_path=logs / "describe_gcs.log"
            )
        )
        print(
            f"Storage emulator {emulator}; functions on :{http_port} (http) and :{gcs_port} "
            f"(cloudevent); logs in {logs}\n"
        )

        batch = [f"{base}/{p.name}" for p in images[:3]] + [
            f"gs://{UPLOADS}/photos/{p.name}" for p in images[3:]
        ]
        print(f"1. POST describe_http with {len(batch)} images")
        reply = _post_json(f"http://127.0.0.1:{http_port}/", {"images": batch})
        for record in reply.get("results", []):
            _print_record(record)
        if reply.get("error"):
            print(f"   the function answered {reply['error']['code']}: {reply['error']['message']}")
        print(f"   counts {reply.get('counts')}; written to {reply.get('results_uri')}")
        if not reply.get("counts", {}).get("ok"):
            # Nothing was described: the rest would only fail the same way, slower.
            print(_nothing_described(reply.get("results", []), logs))
            return 1
        if reply.get("gallery_uri"):
            # The emulator keeps everything in memory: copy the gallery out to open it later.
            gallery = logs / "http-batch-gallery.html"
            _, gallery_name = reply["gallery_uri"].removeprefix("gs://").split("/", 1)
            client.bucket(RESULTS).blob(gallery_name).download_to_filename(str(gallery))
            print(f"   gallery {reply['gallery_uri']}, copied to {gallery.as_uri()}")
        print()

        upload = f"photos/{images[0].name}"
        print(f"2. Upload event for gs://{UPLOADS}/{upload} -> describe_gcs")
        blob = client.bucket(UPLOADS).get_blob(upload)
        _send_event(gcs_port, blob)
        sidecar = f"descriptions/{upload}.json"
        failed = 0
        written = _read(client, sidecar)
        if written is None:
            failed += 1
            print(f"   no sidecar was written: see {logs / 'describe_gcs.log'}")
        else:
            _print_record(json.loads(written))
            print(f"   written to gs://{RESULTS}/{sidecar}")
        print()

        manifest = client.bucket(UPLOADS).blob("demo.batch.json")
        manifest.upload_from_string(
            json.dumps({"images": [f"gs://{UPLOADS}/photos/{p.name}" for p in images]}),
            content_type="application/json",
        )
        manifest.reload()
        print(f"3. Manifest event for gs://{UPLOADS}/{manifest.name} -> describe_gcs")
        _send_event(gcs_port, manifest)
        jsonl = "describer-batches/demo.jsonl"
        written = _read(client, jsonl)
        if written is None:
            failed += 1
            print(f"   no JSONL was written: see {logs / 'describe_gcs.log'}")
        else:
            for line in written.decode().splitlines():
                _print_record(json.loads(line))
            print(f"   written to gs://{RESULTS}/{jsonl}")
        print()
        server.shutdown()

        out = logs / "cli"
        command = ["describe", str(SAMPLES), "--schema", "alt_text", "--out", str(out)]
        print(f"4. Command line: python -m describer {' '.join(command)}")
        cli = subprocess.run(
            [sys.executable, "-m", "describer", *command],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(textwrap.indent(cli.stdout.rstrip(), "   "))
        print(textwrap.indent(cli.stderr.rstrip(), "   "))
        failed += cli.returncode != 0
        if not real:
            print("\nEvery description above came from the local simulator, not from Gemini.")
        if failed:
            print(
                f"\nThe demo ran, but {failed} of its 4 steps did not end as expected: see above."
            )
        return 0 if not failed else 1
    finally:
        for proc in reversed(started):
            procs.stop(proc)


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """The function's JSON answer, whatever its status: error answers carry records too."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())  # type: ignore[no-any-return]


def _read(client: storage.Client, name: str) -> bytes | None:
    """A results object, or None when the function wrote none."""
    try:
        return client.bucket(RESULTS).blob(name).download_as_bytes()  # type: ignore[no-any-return]
    except NotFound:
        return None


def _nothing_described(records: list[dict[str, Any]], logs: Path) -> str:
    """Why the demo stops after its first step, in words a newcomer can act on."""
    errors = [r["error"] for r in records if r.get("error")]
    first = errors[0] if errors else {"code": "none", "message": "no records came back"}
    return textwrap.dedent(
        f"""
        Nothing was described, so the demo stops here. Every image ended as an error; the
        first: {first["code"]}: {first["message"]}
        Gemini could not be reached, or refused the calls. Check GEMINI_API_KEY (or the Vertex
        AI settings) and that this machine can reach Gemini, or run `make demo` with no key
        set to use the local simulator. The function logs are in {logs}."""
    ).rstrip()


def _send_event(port: int, blob: storage.Blob) -> None:
    """A binary-mode CloudEvent, as Eventarc delivers object.v1.finalized."""
    headers, body = finalized_event(blob)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        # describe_gcs fails an event to have it redelivered (e.g. Gemini unreachable).
        print(f"   the function failed the event ({exc.code}): Eventarc would redeliver it")


def _print_record(record: dict[str, Any]) -> None:
    what = (
        record.get("description")
        if record["status"] == "ok"
        else (f"ERROR {record['error']['code']}: {record['error']['message']}")
    )
    print(f"   {record['source']}\n      -> {what}")


if __name__ == "__main__":
    sys.exit(main())
