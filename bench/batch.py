"""The batch-mode scenario: the same backfill online and through the Batch API, in one run.

``make bench-batch`` (``python -m bench.batch [--images N] [--job-s S] ...``) starts the
storage emulator behind the project's relay, a describe_http process, K describe_gcs
processes, and the Gemini simulator with a latency per call and a quota on calls in flight
(429 above it). It uploads N small distinct images under each of two prefixes, then
backfills the first online and the second with ``"mode": "batch"``, one after the other.
For the batch run the harness POSTs ``{"collect": true}`` every ``--collect-s`` seconds, as
deploy.sh's schedule does every few minutes; the simulator ends each job ``--job-s``
seconds after it was created (the real Batch API: minutes to hours, at most 24).

It reports, for each mode: the cost (the status object's ``cost_usd``, from the records),
tokens, wall time from the request to the merged JSONL, online Gemini calls and the 429s
they met, batch jobs and the requests answered inside them, and whether every image was
described exactly once. For the batch run it splits the wall time: preparing and
submitting every job, waiting for the jobs, and landing them. Not part of the test suite's
pass/fail (tests/test_batch_fleet.py is). Writes bench-results/batch.json and batch.md.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from PIL import Image

from bench import procstat
from bench.fleet import _post
from localdev import procs

RESULTS_DIR = procs.ROOT / "bench-results"
API_KEY = "bench-key"
DELIVERIES_AT_ONCE = 8


@dataclass(frozen=True)
class Options:
    images: int
    processes: int
    shard_size: int
    model_concurrency: int
    latency_ms: float
    quota: int
    job_s: float
    collect_s: float
    out: Path


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batch",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=5000, help="images per mode")
    parser.add_argument("--processes", type=int, default=2, help="describe_gcs processes")
    parser.add_argument("--shard-size", type=int, default=500, help="SHARD_SIZE")
    parser.add_argument("--model-concurrency", type=int, default=16, help="MODEL_CONCURRENCY")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="per online call")
    parser.add_argument("--quota", type=int, default=16, help="online calls in flight (429 above)")
    parser.add_argument("--job-s", type=float, default=30.0, help="a batch job's own time")
    parser.add_argument("--collect-s", type=float, default=2.0, help="between collects")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    options = Options(
        images=args.images,
        processes=args.processes,
        shard_size=args.shard_size,
        model_concurrency=args.model_concurrency,
        latency_ms=args.latency_ms,
        quota=args.quota,
        job_s=args.job_s,
        collect_s=args.collect_s,
        out=args.out,
    )
    options.out.mkdir(parents=True, exist_ok=True)
    result = run(options)
    (options.out / "batch.json").write_text(json.dumps(result, indent=1))
    table = render(result)
    (options.out / "batch.md").write_text(table + "\n")
    print(table)
    return 0 if all(r["correct"] for r in result["modes"].values()) else 1


def run(options: Options) -> dict[str, Any]:
    logs = options.out / "batch-logs"
    logs.mkdir(parents=True, exist_ok=True)
    started: list[Any] = []
    try:
        sim_port, emulator_port = procs.free_port(), procs.free_port()
        started.append(procs.start_simulator(sim_port, logs / "simulator.log"))
        sim_url = f"http://127.0.0.1:{sim_port}"
        _post(
            f"{sim_url}/_sim/config",
            {
                "api_key": API_KEY,
                "latency_ms": options.latency_ms,
                "max_in_flight": options.quota,
                "batch_delay_s": options.job_s,
            },
        )
        started.append(procs.start_storage_emulator(emulator_port, logs / "storage.log"))
        emulator_url = f"http://127.0.0.1:{emulator_port}"
        client = storage.Client(
            project="bench",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": emulator_url},
        )
        tag = uuid.uuid4().hex[:8]
        photos = client.create_bucket(f"photos-{tag}")
        results = client.create_bucket(f"results-{tag}")
        relay_port = procs.free_port()
        relay_url = f"http://127.0.0.1:{relay_port}"
        env = {
            "STORAGE_EMULATOR_HOST": relay_url,
            "GOOGLE_GEMINI_BASE_URL": sim_url,
            "GEMINI_API_KEY": API_KEY,
            "RESULTS_BUCKET": results.name,
            "ALLOWED_BUCKETS": photos.name,
            "SHARD_SIZE": str(options.shard_size),
            "MODEL_CONCURRENCY": str(options.model_concurrency),
            "FUNCTION_TIMEOUT_S": "600",
            "GALLERY": "false",
            "MODEL_BACKOFF_S": "0.2",
            "BACKFILL_CONFIRM_OVER": str(options.images),
        }
        http_port = procs.free_port()
        http = f"http://127.0.0.1:{http_port}/"
        started.append(
            procs.start_function("describe_http", http_port, env, log_path=logs / "http.log")
        )
        urls = []
        for i in range(options.processes):
            port = procs.free_port()
            started.append(
                procs.start_function(
                    "describe_gcs", port, env, cloudevent=True, log_path=logs / f"gcs-{i}.log"
                )
            )
            urls.append(f"http://127.0.0.1:{port}/")
        started.append(
            procs.start_relay(
                relay_port,
                emulator_url,
                trigger_buckets=[photos.name],
                targets=urls,
                extra_args=["--max-deliveries-at-once", str(DELIVERIES_AT_ONCE)],
                log_path=logs / "relay.log",
            )
        )
        modes: dict[str, Any] = {}
        for mode in ("online", "batch"):
            _progress(f"uploading {options.images} images for the {mode} run")
            _upload_under(photos, options.images, mode)
            _progress(f"backfill of {options.images} images, {mode}")
            modes[mode] = _backfill(options, http, sim_url, photos, results, mode)
    finally:
        for proc in reversed(started):
            procs.stop(proc)
    online, batch = modes["online"], modes["batch"]
    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "machine": procstat.machine_info(),
        "modes": modes,
        "cost_ratio": (
            round(batch["cost_usd"] / online["cost_usd"], 3) if online["cost_usd"] else None
        ),
    }


def _upload_under(bucket: storage.Bucket, n: int, folder: str) -> None:
    """N small PNGs under ``folder``/, each a size of its own, so their bytes tell them apart."""

    def one(i: int) -> None:
        buffer = io.BytesIO()
        Image.new("RGB", (20 + i % 100, 20 + i // 100), (40, 60, 160)).save(buffer, "PNG")
        bucket.blob(f"{folder}/{i:05d}.png").upload_from_string(
            buffer.getvalue(), content_type="image/png"
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


def _backfill(
    options: Options,
    http: str,
    sim_url: str,
    photos: storage.Bucket,
    results: storage.Bucket,
    mode: str,
) -> dict[str, Any]:
    before = _stats(sim_url)
    begin = time.monotonic()
    begin_at = datetime.now(UTC)
    reply = _post(
        http,
        {"backfill": f"gs://{photos.name}/{mode}/", "mode": mode, "max_images": options.images},
    )
    status_name = f"describer-batches/{reply['batch']}.status.json"
    collects = 0
    while True:
        status = _read(results, status_name)
        if status.get("complete"):
            break
        if mode == "batch":
            _post(http, {"collect": True})
            collects += 1
            time.sleep(options.collect_s)
        else:
            time.sleep(0.5)
    wall = time.monotonic() - begin
    after = _stats(sim_url)
    merged = results.get_blob(f"describer-batches/{reply['batch']}.jsonl")
    lines = [json.loads(line) for line in merged.download_as_text().splitlines()] if merged else []
    online_digests = after["images"][len(before["images"]) :]
    batch_digests = after["batch_images"][len(before["batch_images"]) :]
    answered: dict[str, int] = {}
    for image in online_digests + batch_digests:
        answered[image["digest"]] = answered.get(image["digest"], 0) + 1
    result: dict[str, Any] = {
        "shards": reply["shards"],
        "wall_s": round(wall, 1),
        "cost_usd": status["cost_usd"],
        "usage": status["usage"],
        "ok": status["ok"],
        "errors": status["errors"],
        "online_calls": after["calls"] - before["calls"],
        "http_429": int(after["by_status"].get("429", 0)) - int(before["by_status"].get("429", 0)),
        "batch_jobs": after["batch_jobs_created"] - before["batch_jobs_created"],
        "batch_requests": after["batch_requests"] - before["batch_requests"],
        "merged_lines": len(lines),
        "correct": (
            status["done"] == options.images
            and len(lines) == options.images
            and len(answered) == options.images
            and all(n == 1 for n in answered.values())
        ),
    }
    if mode == "batch":
        # From the status object: when each job was recorded, and when a collect first saw
        # it ended (within one collect interval of its end).
        jobs = status.get("jobs", {}).values()
        submitted = max(_since(begin_at, j["submitted_at"]) for j in jobs)
        ended = max(_since(begin_at, j["ended_at"]) for j in jobs)
        result.update(
            submitted_s=round(submitted, 1),
            jobs_ended_s=round(ended, 1),
            landed_after_end_s=round(wall - ended, 1),
            collects=collects,
            batch_marked=sum(1 for line in lines if line.get("batch_job")),
        )
    return result


def render(result: dict[str, Any]) -> str:
    o = result["options"]
    online, batch = result["modes"]["online"], result["modes"]["batch"]
    lines = [
        f"Batch mode against online, {o['images']} images each, SHARD_SIZE {o['shard_size']}, "
        f"{o['processes']} describe_gcs processes; online calls {o['latency_ms']:.0f} ms with a "
        f"quota of {o['quota']} in flight; each batch job ends {o['job_s']:g} s after it is "
        f"created; a collect every {o['collect_s']:g} s.",
        "",
        "| | online | batch |",
        "|---|---:|---:|",
        f"| cost USD (status object) | {online['cost_usd']} | {batch['cost_usd']} |",
        f"| prompt / output tokens | {online['usage']['prompt_tokens']} / "
        f"{online['usage']['output_tokens']} | {batch['usage']['prompt_tokens']} / "
        f"{batch['usage']['output_tokens']} |",
        f"| wall s (request to merged JSONL) | {online['wall_s']} | {batch['wall_s']} |",
        f"| online Gemini calls | {online['online_calls']} | {batch['online_calls']} |",
        f"| 429s | {online['http_429']} | {batch['http_429']} |",
        f"| batch jobs (requests in them) | {online['batch_jobs']} | "
        f"{batch['batch_jobs']} ({batch['batch_requests']}) |",
        f"| described once each, all merged | {online['correct']} | {batch['correct']} |",
        "",
        f"Cost ratio batch/online: {result['cost_ratio']}. The batch run's wall time: every "
        f"job submitted by {batch['submitted_s']} s, the last seen ended by a collect at "
        f"{batch['jobs_ended_s']} s, the batch merged {batch['landed_after_end_s']} s later "
        f"({batch['collects']} collects in all).",
    ]
    return "\n".join(lines)


def _since(begin: datetime, iso: str) -> float:
    return (datetime.fromisoformat(iso) - begin).total_seconds()


def _stats(sim_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{sim_url}/_sim/stats", timeout=60) as response:
        return json.load(response)  # type: ignore[no-any-return]


def _read(bucket: storage.Bucket, name: str) -> dict[str, Any]:
    blob = bucket.get_blob(name)
    return json.loads(blob.download_as_bytes()) if blob else {}


def _progress(message: str) -> None:
    print(f"[batch] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
