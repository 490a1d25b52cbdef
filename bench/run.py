"""The benchmark: describe_http served for real, against the cookbook's two approaches.

One command (``make bench``, or ``python -m bench.run [--quick]``) starts the
local stand-ins the tests use, each as a process of its own: the Gemini simulator
with a set latency and a quota on calls in flight (429 above it), the Cloud
Storage emulator, and functions-framework serving main.py's describe_http; plus a
loopback image server holding the sample photos and 12-megapixel JPEGs
(bench/corpus.py). Then, in one run:

1. times describer.images.prepare on the 12-megapixel JPEGs against a plain
   open-and-resize (bench/prep.py);
2. POSTs batches of N image URLs to the function: at its default settings for
   each N, at MODEL_CONCURRENCY=32 for the largest N, and the largest N of
   12-megapixel JPEGs only at default settings. A fresh function process serves
   each batch (after a one-image warm-up), so its peak RSS is that batch's own;
3. runs the notebook's sequential loop (on a few images, extrapolated per image:
   at 500 ms a call it would take minutes for 1000) and its unbounded
   ``as_completed`` for each N (bench/baselines.py), in processes of their own;
4. measures the speed-up pair again on the small sample photos only (the function
   at MODEL_CONCURRENCY=32 and the sequential loop), where decoding 12-MP JPEGs
   does not use up the CPUs: it tells the concurrency apart from the CPU bound.

For each it measures wall time against the ideal (ceil(N / MODEL_CONCURRENCY) x
latency), images per second, CPU milliseconds per image of the function's
processes (utime + stime from /proc of functions-framework's process group),
peak RSS (VmHWM), the bytes and pixels the simulator received per image, and the
429s it answered (both from its /_sim/stats). The harness shares the machine
with the function, so the CPU the simulator, the emulator and the image server
spent is shown beside it, and so is the CPU everything else on the machine spent
(/proc/stat): on a small machine they bound what the function can reach.

It prints a table, checks the targets of issue 4, and writes
bench-results/latest.json and bench-results/latest.md (for docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import procstat, report
from bench.corpus import Corpus, build
from bench.prep import time_preparation
from describer.settings import DEFAULT_MODEL_CONCURRENCY
from localdev import procs

RESULTS_DIR = procs.ROOT / "bench-results"
RESULTS_BUCKET = "results"
API_KEY = "bench-key"
# The speed-up target is stated at this concurrency.
TARGET_CONCURRENCY = 32
# A quota above the function's concurrency (16 by default, 32 in the speed-up
# scenario) and far below what the unbounded approach sends at once.
DEFAULT_QUOTA = 50
# The unbounded approach on a thousand images wants several GB; this many MiB is
# enough to show it without taking memory the machine's other users need.
DEFAULT_BASELINE_MEMORY_MB = 4096
# The settings that shape performance: passed empty (their defaults) unless a
# scenario sets one, so an exported variable in the caller's shell cannot leak in.
_PERFORMANCE_SETTINGS = (
    "MODEL_CONCURRENCY",
    "DOWNLOAD_CONCURRENCY",
    "IMAGE_MAX_SIDE",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MODEL_MAX_ATTEMPTS",
    "MODEL_TIMEOUT_S",
    "MODEL_BACKOFF_S",
    "DOWNLOAD_TIMEOUT_S",
)


@dataclass(frozen=True)
class Options:
    ns: list[int]
    latency_ms: float
    quota: int
    sequential_n: int
    prep_repetitions: int
    quick: bool
    out: Path
    # Settings given to every function scenario (--set); empty means the defaults.
    function_env: dict[str, str]
    baseline_memory_mb: int


@dataclass
class Stack:
    """The running stand-ins and where their logs go."""

    logs: Path
    corpus: Corpus
    image_url: str
    sim_url: str
    sim: subprocess.Popen[bytes]
    emulator_url: str
    emulator: subprocess.Popen[bytes]
    latency_ms: float
    quota: int
    function_env: dict[str, str]
    baseline_memory_mb: int

    def reset_simulator(self) -> None:
        """Latency and quota as the run wants them, and empty stats."""
        _post_json(
            f"{self.sim_url}/_sim/config",
            {"latency_ms": self.latency_ms, "max_in_flight": self.quota},
        )

    def simulator_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.sim_url}/_sim/stats", timeout=60) as response:
            stats: dict[str, Any] = json.load(response)
        return stats

    def snapshot(self, function_pgid: int | None = None) -> procstat.Snapshot:
        return procstat.Snapshot(
            function=procstat.group_cpu_seconds(function_pgid) if function_pgid else 0.0,
            simulator=procstat.cpu_seconds(self.sim.pid),
            emulator=procstat.cpu_seconds(self.emulator.pid),
            own=procstat.own_cpu_seconds(),
            machine=procstat.machine_busy_seconds(),
        )


@contextmanager
def running_stack(options: Options, corpus: Corpus, logs: Path) -> Iterator[Stack]:
    started: list[subprocess.Popen[bytes]] = []
    server = None
    try:
        sim_port = procs.free_port()
        sim = procs.start_simulator(sim_port, logs / "simulator.log")
        started.append(sim)
        emulator_port = procs.free_port()
        emulator = procs.start_storage_emulator(emulator_port, logs / "storage.log")
        started.append(emulator)
        emulator_url = f"http://127.0.0.1:{emulator_port}"
        _post_json(f"{emulator_url}/storage/v1/b?project=bench", {"name": RESULTS_BUCKET})
        # In this process: it only waits on the function while the server works,
        # and its CPU time (every thread) then is the server's.
        server, image_url = procs.serve_directory(corpus.directory)
        # A client that gives up mid-download (the unbounded baseline out of memory)
        # is no error of the server's: no traceback for each one.
        server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        stack = Stack(
            logs=logs,
            corpus=corpus,
            image_url=image_url,
            sim_url=f"http://127.0.0.1:{sim_port}",
            sim=sim,
            emulator_url=emulator_url,
            emulator=emulator,
            latency_ms=options.latency_ms,
            quota=options.quota,
            function_env=options.function_env,
            baseline_memory_mb=options.baseline_memory_mb,
        )
        stack.reset_simulator()
        yield stack
    finally:
        if server is not None:
            server.shutdown()
        for proc in reversed(started):
            procs.stop(proc)


def run_function(
    stack: Stack,
    *,
    scenario: str,
    names: tuple[str, ...],
    n: int,
    model_concurrency: int | None,
) -> dict[str, Any]:
    """One batch of ``n`` URLs through a fresh describe_http process."""
    concurrency = model_concurrency or DEFAULT_MODEL_CONCURRENCY
    _progress(f"{scenario}: N={n}, MODEL_CONCURRENCY={concurrency}")
    env = {
        "STORAGE_EMULATOR_HOST": stack.emulator_url,
        "GOOGLE_GEMINI_BASE_URL": stack.sim_url,
        "GEMINI_API_KEY": API_KEY,
        "GOOGLE_API_KEY": "",
        "GOOGLE_GENAI_USE_VERTEXAI": "false",
        # The images come from loopback; never set this in production.
        "ALLOW_PRIVATE_URLS": "true",
        "RESULTS_BUCKET": RESULTS_BUCKET,
        # The batch must finish, however slow the machine: no deadline records.
        "FUNCTION_TIMEOUT_S": "3600",
        "MAX_BATCH_SIZE": str(max(n, 1000)),
        **dict.fromkeys(_PERFORMANCE_SETTINGS, ""),
        **stack.function_env,
    }
    if model_concurrency is not None:
        env["MODEL_CONCURRENCY"] = str(model_concurrency)
    port = procs.free_port()
    function = procs.start_function(
        "describe_http", port, env, log_path=stack.logs / f"function-{scenario}-{n}.log"
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        # The first request builds the process's runtime and imports what is
        # imported lazily; a warm instance is what serves batches in production.
        _describe(url, stack.corpus.urls(stack.image_url, stack.corpus.samples, 1))
        stack.reset_simulator()
        urls = stack.corpus.urls(stack.image_url, names, n)
        before = stack.snapshot(function.pid)
        started = time.perf_counter()
        reply = _describe(url, urls)
        wall = time.perf_counter() - started
        after = stack.snapshot(function.pid)
        peak = procstat.group_peak_rss_mb(function.pid)
        stats = stack.simulator_stats()
    finally:
        procs.stop(function)
    counts = reply.get("counts", {})
    errors: dict[str, int] = {}
    for record in reply.get("results", []):
        if record.get("status") != "ok":
            code = (record.get("error") or {}).get("code", "unknown")
            errors[code] = errors.get(code, 0) + 1
    ideal = math.ceil(n / concurrency) * stack.latency_ms / 1000
    return {
        "scenario": scenario,
        "approach": "function",
        "images": _images_label(stack.corpus, names),
        "n": n,
        "n_measured": n,
        "extrapolated": False,
        "model_concurrency": concurrency,
        "wall_s": wall,
        "ideal_s": ideal,
        "efficiency": ideal / wall,
        "images_per_s": n / wall,
        "ok": int(counts.get("ok", 0)),
        "errors": errors,
        "cpu_ms_per_image": (after.function - before.function) / n * 1000,
        "peak_rss_mb": peak,
        **_harness(before, after, after.function - before.function, wall, n),
        **_sent(stats, n),
    }


def run_baseline(
    stack: Stack,
    *,
    approach: str,
    n: int,
    n_target: int,
    names: tuple[str, ...] | None = None,
    scenario: str | None = None,
) -> dict[str, Any]:
    """A notebook approach on ``n`` URLs; the sequential one is scaled to ``n_target``."""
    names = names or stack.corpus.mixed
    scenario = scenario or f"notebook-{approach}"
    _progress(f"{scenario}: N={n}")
    stack.reset_simulator()
    urls = stack.corpus.urls(stack.image_url, names, n)
    url_file = stack.logs / f"urls-{scenario}-{n}.txt"
    url_file.write_text("\n".join(urls))
    command = [sys.executable, "-m", "bench.baselines", approach, "--sim", stack.sim_url]
    command += ["--urls", str(url_file), "--memory-mb", str(stack.baseline_memory_mb)]
    before = stack.snapshot()
    outer = time.perf_counter()
    with open(stack.logs / f"baseline-{scenario}-{n}.log", "wb") as log:
        child = subprocess.Popen(command, cwd=procs.ROOT, stdout=subprocess.PIPE, stderr=log)
        assert child.stdout is not None
        report_text = child.stdout.read()
        # wait4 gives the child's own CPU time and peak RSS, even if it crashed.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        child.stdout.close()
    outer_wall = time.perf_counter() - outer
    after = stack.snapshot()
    stats = stack.simulator_stats()
    try:
        outcome = json.loads(report_text)
    except ValueError:
        # It died without a report (killed, say): the row says so instead of the run failing.
        _progress(f"the {approach} baseline exited with {child.returncode} and no report")
        outcome = {
            "wall_s": outer_wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "ok": 0,
            "failures": {f"exit {child.returncode}": n},
        }
    cpu = float(outcome["cpu_s"])
    wall = float(outcome["wall_s"])
    extrapolated = n != n_target
    # The sequential loop does the same for every image, one at a time: its time
    # per image times N is what N images would take.
    wall_target = wall / n * n_target
    # One call at a time at the set latency; the unbounded approach has no such ideal.
    ideal = n_target * stack.latency_ms / 1000
    # All the child's CPU, start and imports too: they fall inside the outer window.
    harness = _harness(before, after, usage.ru_utime + usage.ru_stime, outer_wall, n)
    return {
        "scenario": scenario,
        "approach": approach,
        "images": _images_label(stack.corpus, names),
        "n": n_target,
        "n_measured": n,
        "extrapolated": extrapolated,
        "model_concurrency": 1 if approach == "sequential" else None,
        "wall_s": wall_target,
        "measured_wall_s": wall,
        "ideal_s": ideal if approach == "sequential" else None,
        "efficiency": ideal / wall_target if approach == "sequential" else None,
        "images_per_s": n / wall,
        "memory_cap_mb": stack.baseline_memory_mb,
        "ok": int(outcome["ok"]) if not extrapolated else None,
        "ok_measured": int(outcome["ok"]),
        "errors": dict(outcome["failures"]),
        "cpu_ms_per_image": cpu / n * 1000,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        **harness,
        **_sent(stats, n),
    }


def _images_label(corpus: Corpus, names: tuple[str, ...]) -> str:
    if names == corpus.photos:
        return "12-MP only"
    if names == corpus.samples:
        return "sample photos only"
    return "mixed"


def _harness(
    before: procstat.Snapshot, after: procstat.Snapshot, measured_cpu: float, wall: float, n: int
) -> dict[str, Any]:
    """CPU the stand-ins spent per image, and the cores everything else kept busy."""
    sim = after.simulator - before.simulator
    emulator = after.emulator - before.emulator
    server = after.own - before.own
    machine = after.machine - before.machine
    return {
        "simulator_cpu_ms_per_image": sim / n * 1000,
        "image_server_cpu_ms_per_image": server / n * 1000,
        "emulator_cpu_ms_per_image": emulator / n * 1000,
        "harness_cpu_ms_per_image": (sim + emulator + server) / n * 1000,
        # Busy CPU on the machine not spent by anything this run started.
        "other_load_cores": max(0.0, machine - measured_cpu - sim - emulator - server) / wall,
    }


def _sent(stats: dict[str, Any], n: int) -> dict[str, Any]:
    """What reached the model, per answered image, and how many 429s the quota caused."""
    images = stats.get("images", [])
    answered = len(images)
    total_bytes = sum(int(i.get("bytes") or 0) for i in images)
    total_pixels = sum(int(i.get("width") or 0) * int(i.get("height") or 0) for i in images)
    by_status = stats.get("by_status", {})
    return {
        "model_calls": int(stats.get("calls", 0)),
        "answered": answered,
        "bytes_sent_per_image": total_bytes / answered if answered else None,
        "pixels_sent_per_image": total_pixels / answered if answered else None,
        "http_429": int(by_status.get("429", 0)),
        "by_status": by_status,
        "max_in_flight": int(stats.get("max_in_flight", 0)),
    }


def _describe(url: str, images: list[str]) -> dict[str, Any]:
    return _post_json(url, {"images": images}, timeout=3600)


def _post_json(url: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer: dict[str, Any] = json.load(response)
    return answer


def _code_version() -> dict[str, Any]:
    """The commit measured, and the files that differed from it when the run started."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=procs.ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.rstrip()  # not strip(): porcelain lines start with a space

    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "modified": changed}


def _progress(message: str) -> None:
    # Progress goes to stderr so that stdout carries only the table.
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(options: Options) -> dict[str, Any]:
    started = time.perf_counter()
    machine = procstat.machine_info()
    code = _code_version()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = options.out / "logs" / stamp
    logs.mkdir(parents=True, exist_ok=True)
    _progress("making the image corpus (once; kept in bench-results/images)")
    corpus = build(options.out / "images")
    largest = max(options.ns)
    _progress(f"timing preparation of {len(corpus.photos)} 12-MP JPEGs")
    preparation = time_preparation(corpus.photo_paths(), repetitions=options.prep_repetitions)
    rows: list[dict[str, Any]] = []
    # The function's batches after the default-settings ones: (scenario, images,
    # MODEL_CONCURRENCY), each at the largest N.
    batches = (
        ("function-mc32", corpus.mixed, TARGET_CONCURRENCY),
        ("function-12mp", corpus.photos, None),
    )
    with running_stack(options, corpus, logs) as stack:
        for n in options.ns:
            rows.append(
                run_function(
                    stack, scenario="function", names=corpus.mixed, n=n, model_concurrency=None
                )
            )
        for scenario, names, concurrency in batches:
            rows.append(
                run_function(
                    stack, scenario=scenario, names=names, n=largest, model_concurrency=concurrency
                )
            )
        rows.append(
            run_baseline(stack, approach="sequential", n=options.sequential_n, n_target=largest)
        )
        for n in options.ns:
            rows.append(run_baseline(stack, approach="unbounded", n=n, n_target=n))
        # The speed-up pair again where the CPU does not bound it: the small sample
        # photos only. On a small machine the mixed batch is bound by decoding 12-MP
        # JPEGs; this pair shows what the concurrency gives.
        rows.append(
            run_function(
                stack,
                scenario="function-samples-mc32",
                names=corpus.samples,
                n=largest,
                model_concurrency=TARGET_CONCURRENCY,
            )
        )
        rows.append(
            run_baseline(
                stack,
                approach="sequential",
                n=options.sequential_n,
                n_target=largest,
                names=corpus.samples,
                scenario="notebook-sequential-samples",
            )
        )
    machine["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results: dict[str, Any] = {
        "machine": machine,
        "code": code,
        "settings": {
            "ns": options.ns,
            "latency_ms": options.latency_ms,
            "quota_max_in_flight": options.quota,
            "sequential_n": options.sequential_n,
            "prep_repetitions": options.prep_repetitions,
            "quick": options.quick,
            "function_env": options.function_env,
            "baseline_memory_cap_mb": options.baseline_memory_mb,
            "default_model_concurrency": DEFAULT_MODEL_CONCURRENCY,
            "corpus": {
                "samples": list(corpus.samples),
                "photos_12mp": list(corpus.photos),
            },
        },
        "scenarios": rows,
        "preparation": preparation,
        "logs": str(logs),
    }
    results["targets"] = report.targets(results)
    results["run_time_s"] = time.perf_counter() - started
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark describe_http against the cookbook's two approaches."
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--n", help="batch sizes, comma-separated (default 100,1000; quick 50)")
    parser.add_argument("--latency-ms", type=float, default=500.0, help="simulated model latency")
    parser.add_argument(
        "--quota", type=int, default=DEFAULT_QUOTA, help="model calls in flight before 429"
    )
    parser.add_argument(
        "--sequential-n",
        type=int,
        help="images the sequential loop is timed on (40; quick 10): whole cycles of the corpus",
    )
    parser.add_argument("--prep-reps", type=int, help="repetitions per photo (5; quick 2)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a function setting for every function scenario, e.g. DOWNLOAD_CONCURRENCY=8 "
        "(the targets assume the defaults)",
    )
    parser.add_argument(
        "--baseline-memory-mb",
        type=int,
        default=DEFAULT_BASELINE_MEMORY_MB,
        help="heap cap of the baselines' process (the unbounded one needs gigabytes)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = parser.parse_args()
    ns = [int(v) for v in args.n.split(",")] if args.n else ([50] if args.quick else [100, 1000])
    function_env = dict(item.split("=", 1) for item in args.set)
    options = Options(
        ns=ns,
        latency_ms=args.latency_ms,
        quota=args.quota,
        sequential_n=args.sequential_n or (10 if args.quick else 40),
        prep_repetitions=args.prep_reps or (2 if args.quick else 5),
        quick=args.quick,
        out=args.out.resolve(),
        function_env=function_env,
        baseline_memory_mb=args.baseline_memory_mb,
    )
    results = run(options)
    print(report.render_text(results))
    report.write(results, options.out)
    _progress(
        f"done in {results['run_time_s']:.0f} s; wrote {options.out / 'latest.json'} "
        f"and {options.out / 'latest.md'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
