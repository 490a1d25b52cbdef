"""The cookbook notebook's two approaches, ported to google-genai: the baselines.

- ``sequential``: for each image in turn, download it, then await its model call
  (the notebook's first example, with the download its second example adds).
- ``unbounded``: one coroutine per image chaining download and model call, all
  started at once by ``asyncio.as_completed`` (the notebook's second example).

Both download with aiohttp and open the bytes with PIL, as the notebook did, and
send the downloaded bytes unchanged: no downscaling. (Handing google-genai the
PIL image, the literal port, would make it re-encode every picture at full size,
which costs the baselines more CPU; the bytes are their best case.) Neither
retries: the notebook adds no retry of its own, and google-genai has none by default.
Where the notebook would stop at the first failure, these count it and go on, so
every image is accounted for.

Run by bench.run in a process of its own, so the CPU time and peak memory it
reports are the approach's alone:

    python -m bench.baselines {sequential,unbounded} --sim URL --urls FILE [--memory-mb M]

It prints one JSON object: wall time, CPU time, images described, failures by
cause (its peak RSS is read from outside, by bench.run). The unbounded
approach holds every image in memory at once, gigabytes for a thousand photos;
``--memory-mb`` caps its heap (RLIMIT_DATA) so that it fails alone, with the
failures counted, rather than starving a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image

from describer.settings import DEFAULT_MODEL, DEFAULT_PROMPT

API_KEY = "bench-key"


@dataclass
class Outcome:
    wall_s: float = 0.0
    # CPU time of the approach itself, without the interpreter's start and imports,
    # as the function's is counted after its warm-up.
    cpu_s: float = 0.0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, object]:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting them.
        return {
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "ok": self.ok,
            "failures": dict(self.failures),
        }

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, genai_errors.APIError):
            self.failures[str(exc.code)] += 1
        else:
            self.failures[type(exc).__name__] += 1


async def download_image(session: aiohttp.ClientSession, url: str) -> tuple[bytes, str]:
    """The downloaded bytes and their MIME type, read by PIL from the header."""
    async with session.get(url) as response:
        data = await response.read()
    return data, Image.open(io.BytesIO(data)).get_format_mimetype() or "image/jpeg"


async def process_image(client: genai.Client, image: Awaitable[tuple[bytes, str]]) -> str:
    """Describe the image once its download (chained in, as in the notebook) is done."""
    data, mime_type = await image
    contents: list[types.PartUnion] = [
        DEFAULT_PROMPT,
        types.Part.from_bytes(data=data, mime_type=mime_type),
    ]
    response = await client.aio.models.generate_content(model=DEFAULT_MODEL, contents=contents)
    return response.text or ""


async def sequential(client: genai.Client, urls: list[str], outcome: Outcome) -> None:
    async with aiohttp.ClientSession() as session:
        for url in urls:
            try:
                await process_image(client, download_image(session, url))
            except Exception as exc:  # noqa: BLE001 - counted, as a failed image
                outcome.fail(exc)
            else:
                outcome.ok += 1


async def unbounded(client: genai.Client, urls: list[str], outcome: Outcome) -> None:
    async with aiohttp.ClientSession() as session:
        futures = [process_image(client, download_image(session, url)) for url in urls]
        for response in asyncio.as_completed(futures):
            try:
                await response
            except Exception as exc:  # noqa: BLE001 - counted, as a failed image
                outcome.fail(exc)
            else:
                outcome.ok += 1


async def _run(approach: str, sim_url: str, urls: list[str], outcome: Outcome) -> None:
    client = genai.Client(api_key=API_KEY, http_options=types.HttpOptions(base_url=sim_url))
    started, cpu = time.perf_counter(), _cpu_seconds()
    try:
        await (sequential if approach == "sequential" else unbounded)(client, urls, outcome)
    finally:
        outcome.wall_s = time.perf_counter() - started
        outcome.cpu_s = _cpu_seconds() - cpu
        await client.aio.aclose()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("approach", choices=("sequential", "unbounded"))
    parser.add_argument("--sim", required=True, help="the Gemini simulator's URL")
    parser.add_argument("--urls", required=True, type=Path, help="a file of image URLs")
    parser.add_argument("--memory-mb", type=int, help="cap on the heap, in MiB")
    args = parser.parse_args()
    urls = args.urls.read_text().split()
    if args.memory_mb:
        cap = args.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    outcome = Outcome()
    try:
        asyncio.run(_run(args.approach, args.sim, urls, outcome))
    except Exception as exc:  # noqa: BLE001 - out of memory, the loop itself fails
        # Every image not yet counted is lost with the loop.
        lost = len(urls) - outcome.ok - outcome.failures.total()
        if lost:
            outcome.failures[f"run aborted ({type(exc).__name__})"] += lost
    print(json.dumps(outcome.to_json()))


if __name__ == "__main__":
    main()
