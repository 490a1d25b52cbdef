"""gcp-storage-emulator, in memory, without rewriting its whole index on every write.

The emulator serialises the metadata of every object it holds to a file after
each write, so the N-th write costs O(N): 5000 uploads took minutes, and a
test suite's objects slow every later test. In memory that file only serves a
restart that never comes, so this launcher builds the same server (the
emulator's own APIThread and handlers) over a Storage that skips it. Every
request is still answered by the emulator's code; only the bookkeeping goes.

    python -m localdev.storage_emulator --port 9023 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import signal
import threading

from gcp_storage_emulator.server import APIThread
from gcp_storage_emulator.storage import Storage

# The one method overridden below is the emulator's own, not an API: if an upgrade
# renames it, the override would silently do nothing and every write turn slow again.
if not hasattr(Storage, "_write_config_to_file"):
    raise RuntimeError("gcp-storage-emulator no longer has Storage._write_config_to_file")


class InMemoryStorage(Storage):  # type: ignore[misc]  # the emulator has no type hints
    """The emulator's storage with no index file: the dicts in memory are the index."""

    def __init__(self) -> None:
        super().__init__(use_memory_fs=True)

    def _write_config_to_file(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9023)
    args = parser.parse_args()
    api = APIThread(args.host, args.port, InMemoryStorage(), daemon=True)
    api.start()
    api.is_running.wait()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    api.join(timeout=1)


if __name__ == "__main__":
    main()
