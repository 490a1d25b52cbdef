"""The fleet scenario: a backfill sharded across several function processes.

``make bench-fleet`` (``python -m bench.fleet [--images N] [--processes K] ...``)
starts the storage emulator behind the project's relay (generation
preconditions, and a finalize CloudEvent per object written into the photos
bucket, delivered to one of K describe_gcs processes as Eventarc would), a
describe_http process for the backfill request, and the Gemini simulator with
a set latency and a quota on calls in flight. It uploads N small distinct
images, asks for a backfill of them, and waits for the status object to say
complete. Not part of the test suite's pass/fail (tests/test_fleet.py is).

It measures wall time from the request to the merged JSONL against the ideal
(N x latency / calls that may be in flight), images per second, the function
processes' CPU milliseconds per image and peak RSS, the 429s the quota caused,
how many images were answered more than once, and whether the status object
and the merged JSONL agree. It measures the merge on its own too: the relay
holds the batch's first compose, the harness restarts every function process's
peak RSS count from its resident memory then (``clear_refs``), lets the merge
go, and reads the merging process's peak afterwards. ``--images 1000,5000``
runs each size in turn, to show whether that peak grows with the batch. It
prints a table and writes bench-results/fleet.json and fleet.md.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from PIL import Image

from bench import procstat
from localdev import procs

RESULTS_DIR = procs.ROOT / "bench-results"
API_KEY = "bench-key"
# The relay's deliveries in flight: shards running at once across the fleet.
DELIVERIES_AT_ONCE = 8


@dataclass(frozen=True)
class Options:
    images: int  # of one run; main() takes several sizes and runs each
    processes: int
    shard_size: int
    model_concurrency: int
    latency_ms: float
    quota: int
    out: Path


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--images",
        default="1000,5000",
        help="images per run; several, comma-separated, run one after the other",
    )
    parser.add_argument("--processes", type=int, default=3, help="describe_gcs processes")
    parser.add_argument("--shard-size", type=int, default=500, help="SHARD_SIZE")
    parser.add_argument(
        "--model-concurrency", type=int, default=16, help="MODEL_CONCURRENCY of the functions"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=200.0, help="the simulator's latency per call"
    )
    parser.add_argument("--quota", type=int, default=64, help="model calls in flight before 429")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="where fleet.json and fleet.md go"
    )
    args = parser.parse_args()
    results = []
    for size in (int(n) for n in args.images.split(",")):
        options = Options(
            images=size,
            processes=args.processes,
            shard_size=args.shard_size,
            model_concurrency=args.model_concurrency,
            latency_ms=args.latency_ms,
            quota=args.quota,
            out=args.out.resolve(),
        )
        results.append(run(options))
    text = "\n\n".join(render(result) for result in results)
    if len(results) > 1:
        text += "\n\n" + render_merges(results)
    print(text)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "fleet.md").write_text(text + "\n")
    return 0 if all(result["correct"] for result in results) else 1


def run(options: Options) -> dict[str, Any]:
    logs = options.out / "fleet-logs"
    logs.mkdir(parents=True, exist_ok=True)
    started: list[Any] = []
    try:
        sim_port, emulator_port = procs.free_port(), procs.free_port()
        sim = procs.start_simulator(sim_port, logs / "simulator.log")
        started.append(sim)
        sim_url = f"http://127.0.0.1:{sim_port}"
        _post(f"{sim_url}/_sim/config", {"api_key": API_KEY, "latency_ms": options.latency_ms,
                                         "max_in_flight": options.quota})  # fmt: skip
        emulator = procs.start_storage_emulator(emulator_port, logs / "storage.log")
        started.append(emulator)
        emulator_url = f"http://127.0.0.1:{emulator_port}"
        client = storage.Client(
            project="bench",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": emulator_url},
        )
        tag = uuid.uuid4().hex[:8]
        photos = client.create_bucket(f"photos-{tag}")
        results = client.create_bucket(f"results-{tag}")
        _progress(f"uploading {options.images} images")
        _upload(photos, options.images)
        # A process of its own, so its CPU is its own and not the harness's.
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
        }
        http_port = procs.free_port()
        started.append(
            procs.start_function("describe_http", http_port, env, log_path=logs / "http.log")
        )
        workers, urls = [], []
        for i in range(options.processes):
            port = procs.free_port()
            workers.append(
                procs.start_function(
                    "describe_gcs", port, env, cloudevent=True, log_path=logs / f"gcs-{i}.log"
                )
            )
            urls.append(f"http://127.0.0.1:{port}/")
        started.extend(workers)
        relay = procs.start_relay(
            relay_port,
            emulator_url,
            trigger_buckets=[photos.name],
            targets=urls,
            extra_args=["--max-deliveries-at-once", str(DELIVERIES_AT_ONCE), "--retry-max-s", "2"],
            log_path=logs / "relay.log",
        )
        started.append(relay)
        _progress(f"backfill of {options.images} across {options.processes} processes")
        _put(f"{relay_url}/_relay/faults", {"hold_composes": True})
        begin = time.monotonic()
        reply = _post(
            f"http://127.0.0.1:{http_port}/",
            {"backfill": f"gs://{photos.name}/cam/", "max_images": options.images},
        )
        status_name = f"describer-batches/{reply['batch']}.status.json"
        # The merge starts: every process's peak RSS count restarts from now, and it goes on.
        _wait_for_compose(relay_url)
        before = {w.pid: _group_rss_mb(w.pid) for w in workers}
        for worker in workers:
            for pid in procstat.group_pids(worker.pid):
                procstat.reset_peak_rss(pid)
        _put(f"{relay_url}/_relay/faults", {})
        status = _wait_complete(results, status_name)
        wall = time.monotonic() - begin
        merger = next(
            (w for i, w in enumerate(workers) if "batch merged" in _log(logs / f"gcs-{i}.log")),
            workers[0],
        )
        merge_rss = {
            "rss_before_mb": round(before[merger.pid], 1),
            "peak_mb": round(procstat.group_peak_rss_mb(merger.pid), 1),
        }
        cpu = sum(procstat.group_cpu_seconds(w.pid) for w in workers)
        # The stand-ins share the machine: their CPU bounds what the functions can reach.
        stand_ins = {
            "emulator_s": round(procstat.cpu_seconds(emulator.pid), 1),
            "simulator_s": round(procstat.cpu_seconds(sim.pid), 1),
            "relay_s": round(procstat.cpu_seconds(relay.pid), 1),
        }
        rss = max(procstat.group_peak_rss_mb(w.pid) for w in workers)
        with urllib.request.urlopen(f"{relay_url}/_relay/stats", timeout=60) as response:
            relay_stats = json.load(response)
        with urllib.request.urlopen(f"{sim_url}/_sim/stats", timeout=60) as response:
            sim_stats = json.load(response)
        merged = results.get_blob(f"describer-batches/{reply['batch']}.jsonl")
        lines = merged.download_as_text().splitlines() if merged else []
    finally:
        for proc in reversed(started):
            procs.stop(proc)
    answered = Counter(image["digest"] for image in sim_stats["images"])
    in_flight = min(
        options.quota,
        min(DELIVERIES_AT_ONCE, reply["shards"]) * options.model_concurrency,
    )
    ideal = options.images * options.latency_ms / 1000 / in_flight
    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "machine": procstat.machine_info(),
        "shards": reply["shards"],
        "calls_in_flight_at_most": in_flight,
        "wall_s": round(wall, 2),
        "ideal_s": round(ideal, 2),
        "efficiency": round(ideal / wall, 3),
        "images_per_s": round(options.images / wall, 1),
        "status_images_per_s": status.get("images_per_s"),
        "cpu_ms_per_image": round(cpu * 1000 / options.images, 1),
        "peak_rss_mb_per_process": round(rss, 1),
        "merging_process": merge_rss,
        "stand_ins_cpu": stand_ins,
        "answered_images": len(answered),
        "answered_twice": sum(1 for n in answered.values() if n > 1),
        "http_429": int(sim_stats["by_status"].get("429", 0)),
        # Every request the functions made to storage went through the relay.
        "storage_requests_per_image": round(relay_stats["requests"] / options.images, 2),
        "events": relay_stats["queued"],
        "redelivered": relay_stats["redelivered"],
        "status": {k: status[k] for k in ("total", "done", "ok", "errors", "pending_shards")},
        "merged_lines": len(lines),
        "correct": (
            status["done"] == options.images
            and len(lines) == options.images
            and len(answered) == options.images
            and all(n == 1 for n in answered.values())
        ),
    }


def render(result: dict[str, Any]) -> str:
    o = result["options"]
    rows = [
        ("images / shards / processes", f"{o['images']} / {result['shards']} / {o['processes']}"),
        ("model latency, quota", f"{o['latency_ms']:.0f} ms, {o['quota']} calls in flight"),
        ("calls in flight allowed", str(result["calls_in_flight_at_most"])),
        ("wall (ideal)", f"{result['wall_s']} s ({result['ideal_s']} s)"),
        ("efficiency", str(result["efficiency"])),
        ("images/s (status object)", f"{result['images_per_s']} ({result['status_images_per_s']})"),
        ("CPU ms per image (functions)", str(result["cpu_ms_per_image"])),
        ("peak RSS per process", f"{result['peak_rss_mb_per_process']} MB"),
        (
            "merging process: RSS at the merge, peak during it",
            "{rss_before_mb} MB, {peak_mb} MB".format(**result["merging_process"]),
        ),
        (
            "CPU s: emulator / simulator / relay",
            "{emulator_s} / {simulator_s} / {relay_s}".format(**result["stand_ins_cpu"]),
        ),
        ("429s", str(result["http_429"])),
        ("answered twice", str(result["answered_twice"])),
        ("storage requests per image", str(result["storage_requests_per_image"])),
        ("events (redelivered)", f"{result['events']} ({result['redelivered']})"),
        ("status", json.dumps(result["status"])),
        ("merged JSONL lines", str(result["merged_lines"])),
        ("correct", "yes" if result["correct"] else "NO"),
    ]
    machine = result["machine"]
    width = max(len(k) for k, _ in rows)
    lines = ["| scenario: sharded backfill | |", "|---|---|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    lines.append("")
    lines.append(
        f"Machine: {machine['cpu']}, {machine['cores_usable']} cores usable, "
        f"{machine['ram_gb']} GB, Python {machine['python']}, {machine['date']}."
    )
    return "\n".join(lines)


def render_merges(results: list[dict[str, Any]]) -> str:
    """The merging process's memory at each size, side by side."""
    lines = [
        "| images | shards | RSS at the merge MB | peak during the merge MB |",
        "|---:|---:|---:|---:|",
    ]
    for result in results:
        merge = result["merging_process"]
        lines.append(
            f"| {result['options']['images']} | {result['shards']} | {merge['rss_before_mb']} "
            f"| {merge['peak_mb']} |"
        )
    return "\n".join(lines)


def _group_rss_mb(pgid: int) -> float:
    return max([0.0, *(procstat.rss_mb(pid) for pid in procstat.group_pids(pgid))])


def _wait_for_compose(relay_url: str, timeout_s: float = 3600) -> None:
    """Until the relay holds a compose: the batch's merge has begun."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{relay_url}/_relay/stats", timeout=60) as response:
            if json.load(response)["composes_held"] >= 1:
                return
        time.sleep(0.05)
    raise TimeoutError(f"no merge began within {timeout_s} s")


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _put(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=60):
        pass


def _upload(bucket: storage.Bucket, n: int) -> None:
    """N small PNGs, each a size of its own, so their bytes tell them apart."""

    def one(i: int) -> None:
        buffer = io.BytesIO()
        Image.new("RGB", (20 + i % 100, 20 + i // 100), (40, 160, 60)).save(buffer, "PNG")
        bucket.blob(f"cam/{i:05d}.png").upload_from_string(
            buffer.getvalue(), content_type="image/png"
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


def _wait_complete(bucket: storage.Bucket, name: str, timeout_s: float = 3600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        blob = bucket.get_blob(name)
        if blob is not None:
            status: dict[str, Any] = json.loads(blob.download_as_bytes())
            if status.get("complete"):
                return status
        time.sleep(0.5)
    raise TimeoutError(f"the backfill did not complete within {timeout_s} s")


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)  # type: ignore[no-any-return]


def _progress(message: str) -> None:
    print(f"[fleet] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
