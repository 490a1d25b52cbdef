"""Starting the local stand-ins as real processes: storage emulator, functions, image server.

Shared by the demo and the tests, so both run the same way.
"""

from __future__ import annotations

import functools
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# Ports handed out by free_port() and still held for the server that will listen on them.
_held: dict[int, socket.socket] = {}
_held_lock = threading.Lock()


def free_port() -> int:
    """A loopback port kept for a server of ours: held until wait_for_port() sees it served.

    Closing the probe socket before the server binds would let the kernel hand the
    port to another process in between (for a server, or as the local end of a
    connection). On Linux a bound port is never chosen by bind() to port 0 nor by
    connect(), while a socket with SO_REUSEADDR may still bind it as long as nothing
    listens there (socket(7)); http.server, aiohttp and gunicorn all set it. Letting
    each server bind port 0 itself would be simpler, but functions-framework and the
    storage emulator cannot say which port they got.
    """
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    with _held_lock:
        _held[port] = probe
    return port


def _release(port: int) -> None:
    with _held_lock:
        probe = _held.pop(port, None)
    if probe is not None:
        probe.close()


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30
) -> None:
    """Poll until something accepts connections on the port (or the process dies).

    A port from free_port() is held until then, so what listens there is the
    server started for it; the port is released once it does (or cannot).
    """
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nothing listened on port {port} within {timeout} s")
    finally:
        _release(port)


def start_storage_emulator(port: int, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """gcp-storage-emulator, in memory, on loopback (see localdev/storage_emulator.py)."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "localdev.storage_emulator", "--port", str(port)],
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, proc)
    return proc


def start_simulator(port: int, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """The Gemini simulator in a process of its own (when the caller's memory must be its own)."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "localdev.gemini_sim", "--port", str(port)],
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, proc)
    return proc


def start_relay(
    port: int,
    emulator_url: str,
    *,
    trigger_buckets: Sequence[str] = (),
    targets: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """The storage relay (preconditions and finalize events) in front of the emulator.

    ``extra_args`` are more of its options, e.g. ``["--max-attempts", "5"]``.
    """
    args = [sys.executable, "-m", "localdev.relay", "--emulator", emulator_url, "--port", str(port)]
    for bucket in trigger_buckets:
        args += ["--trigger-bucket", bucket]
    for target in targets:
        args += ["--target", target]
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen([*args, *extra_args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    wait_for_port(port, proc)
    return proc


def start_function(
    target: str,
    port: int,
    env: Mapping[str, str],
    *,
    cloudevent: bool = False,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """functions-framework serving one target of main.py, as it runs in Cloud Run."""
    args = [
        str(BIN / "functions-framework"),
        "--target",
        target,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--source",
        str(ROOT / "main.py"),
    ]
    if cloudevent:
        args += ["--signature-type", "cloudevent"]
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
        # Its own process group: functions-framework serves from a forked
        # worker, and kill_hard must take the worker down with the parent.
        start_new_session=True,
    )
    wait_for_port(port, proc)
    return proc


def kill_hard(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a function's whole process group, as a crashed instance would die."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def copyfile(self, source: Any, outputfile: Any) -> None:
        # sendfile(2) instead of a Python read/write loop: the server shares the CPUs
        # with the function it serves, in the benchmark most of all. The headers have
        # gone out already (wfile is unbuffered), so the body follows them in order.
        self.connection.sendfile(source, offset=source.tell())


class _StaticServer(http.server.ThreadingHTTPServer):
    # The default backlog of 5 makes a batch with more downloads in flight wait
    # a second for a TCP retry; a real web server queues them.
    request_queue_size = 128


def serve_directory(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A static file server on loopback, in a background thread; returns it and its URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = _StaticServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
