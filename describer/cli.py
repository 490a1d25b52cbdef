"""The command line: describe local files, folders, URLs and gs:// objects with the same pipeline.

    python -m describer describe PATH|DIR|URL|gs://... [options]

Results go to stdout (text, json or jsonl), a progress bar to stderr when it
is a terminal, and with ``--out`` the batch JSONL and its gallery to a folder
or a bucket, laid out as the function lays out its batches. The exit status
says whether every image was described (0), some failed (1), the command was
wrong or could not start (2), or the results could not be written (3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from .batch import GcsSource, Location, parse_local_source, parse_output, parse_prompt
from .errors import ConfigError, RequestError, SourceError, StorageUnavailable
from .expand import check_prefixes, expand
from .layout import batch_object, gallery_name
from .logs import configure as configure_logging
from .records import JSONL_TYPE, Record, counts, dumps_jsonl, total_usage
from .results import HTML_TYPE, gallery_page
from .runtime import Runtime, new_batch_id, open_pipeline
from .schemas import ALT_TEXT_MAX_CHARS, SCHEMA_NAMES
from .settings import DEFAULT_MODEL_CONCURRENCY, Settings

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_UNWRITTEN = 3
EXIT_INTERRUPTED = 130
# --out to a bucket is not squeezed into a function's deadline margin: a gallery of a
# thousand images is several MB, and a laptop's uplink may be slow.
_STORE_TIMEOUT_S = 300.0

_EPILOG = """\
sources:
  PATH              an image file on this machine (or a file:// URI)
  DIR               every image file under a folder (recursively, sorted; hidden files and
                    symlinked folders skipped)
  URL               an http:// or https:// image; private addresses need ALLOW_PRIVATE_URLS=true
  gs://BUCKET/NAME  an object in Cloud Storage (your gcloud application-default credentials)
  gs://BUCKET/PFX/  every image object under a prefix (the trailing / makes it a prefix)

Results go to stdout in input order; a progress bar (on a terminal), a summary and the
paths written go to stderr. Ctrl-C stops the run: finished images are still printed and
written, the rest get 'interrupted' records; a second Ctrl-C quits at once.

Gemini is reached as the function reaches it: GEMINI_API_KEY (or GOOGLE_API_KEY), or
GOOGLE_GENAI_USE_VERTEXAI=true with GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_LOCATION;
GOOGLE_GEMINI_BASE_URL points it at another endpoint (the local simulator). Every other
setting (GEMINI_MODEL, IMAGE_MAX_SIDE, MEDIA_RESOLUTION, ...) is read from the environment
too; see docs/settings.md.

exit status: 0 every image described, 1 some failed (see their records),
2 the command could not start (arguments, settings, credentials, a listing that failed),
3 the --out results could not be written, 130 interrupted.

examples:
  python -m describer describe samples/
  python -m describer describe photo.jpg --schema alt_text --format json
  python -m describer describe gs://my-photos/2026/ --out gs://my-results/run1/ --concurrency 32
"""


@dataclass(frozen=True)
class Options:
    sources: list[str]
    prompt: str | None
    schema: str | None
    out: str | None
    format: str
    concurrency: int | None
    gallery: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m describer",
        description="Describe images with Gemini, concurrently.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    describe = commands.add_parser(
        "describe",
        help="describe images from files, folders, URLs or Cloud Storage",
        description="Describe images with Gemini: one record per source, in the order given.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    describe.add_argument("sources", nargs="+", metavar="SOURCE", help="see 'sources' below")
    describe.add_argument(
        "--prompt", help="what to ask about each image (default: DESCRIBE_PROMPT or the built-in)"
    )
    describe.add_argument(
        "--schema",
        choices=SCHEMA_NAMES,
        help="text: free text (default, or DESCRIBE_SCHEMA); alt_text: JSON with alt_text "
        f"(<= {ALT_TEXT_MAX_CHARS} characters), description, tags and text_in_image, "
        "under each record's 'data'",
    )
    describe.add_argument(
        "--out",
        metavar="DIR|gs://BUCKET/PREFIX/",
        help="also write the batch JSONL and its HTML gallery there, under batches/",
    )
    describe.add_argument(
        "--format",
        choices=["text", "json", "jsonl"],
        default="text",
        help="stdout: text (one block per image), json (one document with counts and "
        "usage) or jsonl (one record per line); default text",
    )
    describe.add_argument(
        "--concurrency",
        type=_positive,
        metavar="N",
        help=f"model calls in flight (default: MODEL_CONCURRENCY, {DEFAULT_MODEL_CONCURRENCY})",
    )
    describe.add_argument(
        "--no-gallery", action="store_true", help="with --out, write the JSONL only"
    )
    describe.add_argument(
        "--verbose",
        action="store_true",
        help="log every step to stderr as JSON lines (default: errors only)",
    )
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:
    stdout = stdout or sys.stdout
    args = build_parser().parse_args(argv)
    # Failed images are in the results already; the log adds only what is not.
    configure_logging(logging.INFO if args.verbose else logging.ERROR, stream=sys.stderr)
    options = Options(
        sources=args.sources,
        prompt=args.prompt,
        schema=args.schema,
        out=args.out,
        format=args.format,
        concurrency=args.concurrency,
        gallery=not args.no_gallery,
    )
    try:
        return run(options, Settings.from_env(), stdout=stdout)
    except (ConfigError, RequestError) as exc:  # ListingFailed is a ConfigError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(options: Options, settings: Settings, *, stdout: TextIO) -> int:
    """Describe ``options.sources`` with ``settings``; write to ``stdout`` and ``--out``."""
    if options.concurrency is not None:
        settings = replace(settings, model_concurrency=options.concurrency)
    if options.prompt is not None:
        # The same limits as a request's prompt: the CLI runs the function's pipeline.
        parse_prompt(options.prompt, what="--prompt")
    output = _output(options.out)
    check_prefixes(options.sources)
    prompt, schema = settings.prompt_and_schema(options.prompt, options.schema)
    uses_storage = isinstance(output, Location) or any(
        s.lower().startswith("gs://") for s in options.sources
    )
    runtime = Runtime.create(
        settings, storage_needed=uses_storage, store_timeout_s=_STORE_TIMEOUT_S
    )
    gallery = output is not None and options.gallery and settings.gallery
    try:
        uris = list(expand(options.sources, runtime.storage_client))
        if not uris:
            given = ", ".join(options.sources)
            raise ConfigError(
                f"no images in {given}: a folder gives the files whose names end like an "
                "image's (.jpg, .png, .webp, .heic, .gif, .tiff and others Pillow reads)"
            )
        started = time.monotonic()
        records, interrupted = asyncio.run(_describe(runtime, uris, prompt, schema, gallery))
        elapsed = time.monotonic() - started
        results = [r.to_json() for r in records]
        batch_id = new_batch_id()
        written = _write_out(runtime, output, batch_id, records, results, gallery, elapsed)
    finally:
        runtime.close()
    _print(stdout, options.format, batch_id, records, results, elapsed, written)
    if interrupted:
        return EXIT_INTERRUPTED
    if written is None:
        return EXIT_UNWRITTEN
    return EXIT_OK if all(r.status == "ok" for r in records) else EXIT_SOME_FAILED


async def _describe(
    runtime: Runtime, uris: list[str], prompt: str, schema: str | None, gallery: bool
) -> tuple[list[Record], bool]:
    """The records, and whether Ctrl-C cut the run short."""
    allowed = {s.bucket for s in map(_gcs_or_none, uris) if s is not None}
    interrupt = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_ctrl_c() -> None:
        if interrupt.is_set():
            # The second Ctrl-C: Python's own handler, and a KeyboardInterrupt at once.
            loop.remove_signal_handler(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            return
        print("\nstopping: keeping what is finished (Ctrl-C again to quit)", file=sys.stderr)
        interrupt.set()

    loop.add_signal_handler(signal.SIGINT, on_ctrl_c)
    try:
        with tqdm(
            total=len(uris),
            unit="image",
            file=sys.stderr,
            # Hidden unless stderr is a terminal: pipes and CI logs get no bar.
            disable=None,
            dynamic_ncols=True,
        ) as bar:
            failed = 0
            calls = runtime.calls

            async def progress(_index: int, record: Record) -> None:
                nonlocal failed
                failed += record.status != "ok"
                # The limit the quota allows so far, and the 429s ridden out on the way.
                state = calls.state
                bar.set_postfix(
                    failed=failed, limit=state.limit, throttled=state.throttled, refresh=False
                )
                bar.update(1)

            async with open_pipeline(
                runtime,
                prompt=prompt,
                allowed_buckets=allowed,
                schema=schema,
                thumbnails=gallery,
                local_files=True,
            ) as pipeline:
                records = await pipeline.run(uris, on_record=progress, interrupt=interrupt)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return records, interrupt.is_set()


def _write_out(
    runtime: Runtime,
    output: Location | Path | None,
    batch_id: str,
    records: list[Record],
    results: list[dict[str, Any]],
    gallery: bool,
    elapsed_s: float,
) -> dict[str, str] | None:
    """Write the JSONL (and gallery) to --out: what was written where, or None on failure."""
    if output is None:
        return {}
    # --out names a folder of the user's own: the batch goes under its batches/.
    jsonl_name = batch_object(Location("", "batches/"), batch_id, ".jsonl")
    files = {"results": (jsonl_name, dumps_jsonl(results), JSONL_TYPE)}
    if gallery:
        page = gallery_page(
            results,
            [r.thumbnail for r in records],
            title=f"{len(records)} images",
            elapsed_s=elapsed_s,
        )
        files["gallery"] = (gallery_name(jsonl_name), page, HTML_TYPE)
    try:
        if isinstance(output, Path):
            # file:// URIs, like the gs:// ones: absolute, and a terminal can open them.
            return {
                key: _write_file(output / name, data).resolve().as_uri()
                for key, (name, data, _) in files.items()
            }
        return asyncio.run(_upload(runtime, output, files))
    except (OSError, StorageUnavailable) as exc:
        print(f"error: could not write the results: {exc}", file=sys.stderr)
        return None


def _write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


async def _upload(
    runtime: Runtime, output: Location, files: dict[str, tuple[str, bytes, str]]
) -> dict[str, str]:
    for name, data, content_type in files.values():
        await runtime.store.write(
            output.bucket, output.prefix + name, data, content_type=content_type
        )
    return {key: output.uri(name) for key, (name, _, _) in files.items()}


def _print(
    out: TextIO,
    fmt: str,
    batch_id: str,
    records: list[Record],
    results: list[dict[str, Any]],
    elapsed_s: float,
    written: dict[str, str] | None,
) -> None:
    tally = counts(records)
    usage = total_usage(results)
    if fmt == "jsonl":
        out.write(dumps_jsonl(results).decode())
    elif fmt == "json":
        document = {
            "batch_id": batch_id,
            "counts": tally,
            "usage": usage,
            "elapsed_s": round(elapsed_s, 3),
            **{f"{key}_uri": where for key, where in (written or {}).items()},
            "results": results,
        }
        out.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    else:
        for record in records:
            out.write(_text_block(record))
    out.flush()
    summary = (
        f"{tally['ok']} described, {tally['error']} failed in {elapsed_s:.1f} s; "
        f"{usage['prompt_tokens']} prompt + {usage['output_tokens']} output tokens"
    )
    print(summary, file=sys.stderr)
    for key, where in (written or {}).items():
        print(f"{key}: {where}", file=sys.stderr)


def _text_block(record: Record) -> str:
    lines = [record.source]
    if record.error_code is not None:
        lines.append(f"  error {record.error_code}: {record.error_message}")
    elif record.data is not None:
        for key, value in record.data.items():
            shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            lines.append(f"  {key}: {_one_line(shown) or '(none)'}")
    else:
        lines.append(f"  {_one_line(record.description or '')}")
    return "\n".join(lines) + "\n\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _output(out: str | None) -> Location | Path | None:
    if out is None:
        return None
    if out.lower().startswith("gs://"):
        return parse_output(out, what="--out")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder or gs://bucket/prefix/")
    return path


def _gcs_or_none(uri: str) -> GcsSource | None:
    try:
        source = parse_local_source(uri)
    except SourceError:
        return None
    return source if isinstance(source, GcsSource) else None


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number
