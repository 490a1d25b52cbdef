"""Parsing a batch: the JSON body of a request or manifest, its sources and output."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

from .errors import Code, RequestError, SourceError
from .schemas import SCHEMA_NAMES
from .settings import normalize_prefix

MAX_URI_LENGTH = 2048
MAX_PROMPT_CHARS = 8000
_FIELDS = frozenset({"images", "prompt", "output", "schema", "mode"})
# How a manifest or backfill asks Gemini: calls now, or a Batch API job at half the price.
MODES = ("online", "batch")
# Only shard manifests, which this function writes, carry these.
_SHARD_FIELDS = frozenset({"shard", "generations", "sidecar_generations"})
SHARD_KINDS = ("manifest", "backfill")
# Bucket names per https://cloud.google.com/storage/docs/buckets#naming (dots allowed).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
# Characters outside ASCII, which an http(s) URI carries as their UTF-8 percent-escapes.
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# Cloud Storage object names: at most 1024 bytes of UTF-8, no CR or LF, and not
# under .well-known/acme-challenge/. A batch's results land at PREFIX + this tail.
MAX_OBJECT_NAME_BYTES = 1024
_RESULTS_TAIL_BYTES = len("batches/YYYYMMDDTHHMMSSZ-0123456789ab.jsonl")
# "example.com:8080/a.png" parses as scheme "example.com": it is a host and
# port with the scheme left out, not a URI of some other scheme.
_HOST_AND_PORT = re.compile(r"^[a-z0-9.+-]+:[0-9]", re.IGNORECASE)
# "s3://…", "file:…": a scheme of two letters or more (so "C:" stays a path's drive).
_SCHEME = re.compile(r"^[a-z][a-z0-9.+-]+:", re.IGNORECASE)


@dataclass(frozen=True)
class Location:
    """Where results go: a bucket and an object prefix ending in ``/`` (or empty)."""

    bucket: str
    prefix: str

    def uri(self, name: str) -> str:
        return f"gs://{self.bucket}/{self.prefix}{name}"


@dataclass(frozen=True)
class HttpSource:
    uri: str


@dataclass(frozen=True)
class GcsSource:
    uri: str
    bucket: str
    name: str


@dataclass(frozen=True)
class LocalSource:
    """A file on this machine: the command line's sources only, never a request's."""

    uri: str
    path: Path


Source = HttpSource | GcsSource | LocalSource


@dataclass(frozen=True)
class ShardInfo:
    """Where a shard sits in its batch: its slice of the sources and its run."""

    batch: str  # the batch's name: its files are BATCHES_PREFIX<batch>.*
    index: int
    count: int  # shards in the batch
    offset: int  # the position of the shard's first source in the batch
    total: int  # sources in the batch
    run: str  # the run the shard belongs to; the status object names the current one
    kind: str  # "manifest" or "backfill"
    source: str  # the manifest or backfilled prefix, for people reading the status


@dataclass(frozen=True)
class BatchRequest:
    """A validated batch: the image URIs as given, the prompt, the optional output."""

    images: list[str]
    prompt: str | None
    output: Location | None
    # A structured answer's schema; None leaves the choice to the function's settings.
    schema: str | None = None
    # Shard manifests only: the shard's place, and for backfills the generations of the
    # sources and of their sidecars (0: none) when they were listed.
    shard: ShardInfo | None = None
    generations: list[str] | None = None
    sidecar_generations: list[int] | None = None
    # "online" or "batch" as the manifest asked; None leaves it to BATCH_MODE_OVER.
    mode: str | None = None


def parse_body(body: bytes, *, max_batch_size: int, shard: bool = False) -> BatchRequest:
    """Validate a request or manifest body; raise :class:`RequestError` on any flaw.

    ``shard`` accepts (and requires) the fields of a shard manifest.
    """
    return parse_batch(decode_json(body), max_batch_size=max_batch_size, shard=shard)


def decode_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError(400, "invalid_json", "The body is not valid UTF-8 JSON.") from None


def parse_batch(data: Any, *, max_batch_size: int, shard: bool = False) -> BatchRequest:
    """Validate an already decoded batch object."""
    if not isinstance(data, dict):
        raise RequestError(400, "invalid_request", "The body must be a JSON object.")
    unknown = sorted(set(data) - _FIELDS - (_SHARD_FIELDS if shard else frozenset()))
    if unknown:
        raise RequestError(
            400,
            "invalid_request",
            f"Unknown field(s) {', '.join(map(repr, unknown))}; "
            "expected 'images', 'prompt', 'output', 'schema' and 'mode'.",
        )
    if "images" not in data:
        raise RequestError(400, "invalid_request", "The field 'images' is missing.")
    images = data["images"]
    if images is None:
        raise RequestError(400, "invalid_request", "'images' is null: give a list of URIs.")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RequestError(400, "invalid_request", "'images' must be a list of URI strings.")
    if not images:
        raise RequestError(400, "invalid_request", "'images' is empty: give at least one URI.")
    if len(images) > max_batch_size:
        raise RequestError(
            413,
            "batch_too_large",
            f"{len(images)} images is more than MAX_BATCH_SIZE ({max_batch_size}); "
            "split the batch.",
        )
    prompt = parse_prompt(data["prompt"]) if "prompt" in data else None
    output = data.get("output")
    if "output" in data:
        if not isinstance(output, str):
            raise RequestError(
                400, "invalid_request", "'output' must be a gs://bucket/prefix/ URI."
            )
        output = parse_output(output)
    schema = data.get("schema")
    if "schema" in data:
        schema = parse_schema(schema)
    mode = parse_mode(data["mode"]) if "mode" in data and not shard else None
    request = BatchRequest(images=images, prompt=prompt, output=output, schema=schema, mode=mode)
    return _with_shard(request, data) if shard else request


def _with_shard(request: BatchRequest, data: dict[str, Any]) -> BatchRequest:
    """A shard manifest's own fields, checked as strictly as a request's."""

    def bad(what: str) -> RequestError:
        return RequestError(400, "invalid_shard", f"The shard manifest {what}.")

    info = data.get("shard")
    if not isinstance(info, dict):
        raise bad("has no 'shard' object")
    numbers = {k: info.get(k) for k in ("index", "count", "offset", "total")}
    if not all(type(v) is int and v >= 0 for v in numbers.values()):
        raise bad("needs whole numbers index, count, offset and total")
    texts = {k: info.get(k) for k in ("batch", "run", "kind", "source")}
    if not all(isinstance(v, str) and v for v in texts.values()):
        raise bad("needs strings batch, run, kind and source")
    shard = ShardInfo(**numbers, **texts)  # type: ignore[arg-type]
    if shard.kind not in SHARD_KINDS or not shard.index < shard.count:
        raise bad("has an unknown kind or an index past its count")
    if shard.offset + len(request.images) > shard.total:
        raise bad("holds more sources than its batch")
    generations = data.get("generations")
    sidecars = data.get("sidecar_generations")
    if (generations is None) != (sidecars is None):
        raise bad("has generations without sidecar_generations or the other way round")
    if generations is not None:
        n = len(request.images)
        if not (
            isinstance(generations, list)
            and len(generations) == n
            and all(isinstance(g, str) and g.isdigit() for g in generations)
            and isinstance(sidecars, list)
            and len(sidecars) == n
            and all(type(g) is int and g >= 0 for g in sidecars)
        ):
            raise bad("has generations that do not match its images")
    return replace(request, shard=shard, generations=generations, sidecar_generations=sidecars)


def parse_mode(value: Any) -> str:
    if value not in MODES:
        raise RequestError(
            400, "invalid_request", f'\'mode\' must be "online" or "batch", not {value!r}.'
        )
    return str(value)


def choose_mode(settings_over: int, asked: str | None, count: int) -> str:
    """The mode a manifest or backfill of ``count`` images runs in: as asked, else batch
    above BATCH_MODE_OVER (``settings_over``; 0 never)."""
    if asked is not None:
        return asked
    return "batch" if settings_over and count > settings_over else "online"


def parse_prompt(prompt: Any, *, what: str = "'prompt'") -> str:
    """A prompt from a request: non-empty text of at most MAX_PROMPT_CHARS.

    ``what`` names the value in the messages: the request field by default.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(400, "invalid_request", f"{what} must be a non-empty string.")
    if not is_utf8(prompt):
        raise RequestError(400, "invalid_request", f"{what} is not valid Unicode text.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(
            400, "invalid_request", f"{what} is longer than {MAX_PROMPT_CHARS} characters."
        )
    return prompt


def parse_schema(value: Any) -> str:
    """A schema name from a request, CLI flag or setting: "text" or one of SCHEMAS."""
    if not isinstance(value, str) or value not in SCHEMA_NAMES:
        raise RequestError(
            400,
            "invalid_request",
            f"'schema' must be one of {', '.join(map(repr, SCHEMA_NAMES))}.",
        )
    return value


def parse_output(uri: str, *, what: str = "'output'") -> Location:
    """``gs://bucket/prefix/`` to a :class:`Location`, or a 400 saying what is wrong.

    ``what`` names the value in the messages: the request field by default.
    """
    try:
        bucket, name = _split_gs(uri)
    except ValueError as exc:
        raise RequestError(400, "invalid_request", f"{what} {str(exc).rstrip('.')}.") from None
    prefix = normalize_prefix(name)
    if "\r" in prefix or "\n" in prefix:
        raise RequestError(400, "invalid_request", f"{what} contains a line break.")
    if not is_utf8(prefix):
        raise RequestError(400, "invalid_request", f"{what} is not valid Unicode text.")
    if len(prefix.encode()) + _RESULTS_TAIL_BYTES > MAX_OBJECT_NAME_BYTES:
        raise RequestError(
            400,
            "invalid_request",
            f"{what} is too long: object names are at most {MAX_OBJECT_NAME_BYTES} bytes.",
        )
    if prefix.startswith(".well-known/acme-challenge/"):
        raise RequestError(
            400, "invalid_request", f"{what} may not be under .well-known/acme-challenge/."
        )
    return Location(bucket=bucket, prefix=prefix)


def parse_source(uri: str) -> Source:
    """Classify one image URI; raise ``SourceError(invalid_source)`` if it is not usable."""
    if len(uri) > MAX_URI_LENGTH:
        raise SourceError(
            Code.INVALID_SOURCE, f"The URI is longer than {MAX_URI_LENGTH} characters."
        )
    if uri[:5].lower() == "gs://":
        return _gcs_source(uri)
    try:
        parts = urlsplit(uri)
    except ValueError:
        raise SourceError(Code.INVALID_SOURCE, "The URI is malformed.") from None
    if not parts.netloc.isascii():
        # Non-ASCII hosts are normalised differently by each parser (fullwidth
        # digits become 127.0.0.1 in yarl but not in ipaddress): refuse them.
        raise SourceError(
            Code.INVALID_SOURCE,
            "The URI's host has non-ASCII characters; give its ASCII (xn--) form.",
        )
    if not is_utf8(uri):
        raise SourceError(Code.INVALID_SOURCE, "The URI is not valid Unicode text.")
    scheme = parts.scheme.lower()
    if not scheme or (scheme not in ("http", "https") and _HOST_AND_PORT.match(uri)):
        raise SourceError(
            Code.INVALID_SOURCE, "The URI has no scheme: start it with http://, https:// or gs://."
        )
    if scheme not in ("http", "https"):
        # file:, ftp:, gopher:, data: and the rest would reach what no caller
        # should reach through this function: refused, like private addresses.
        raise SourceError(
            Code.FORBIDDEN_SOURCE,
            f"The scheme {scheme!r} is refused: only http://, https:// and gs:// are accepted.",
        )
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise SourceError(Code.INVALID_SOURCE, "The URI has a malformed host or port.") from None
    if not host:
        raise SourceError(Code.INVALID_SOURCE, "The URI has no host.")
    if parts.username or parts.password:
        raise SourceError(Code.INVALID_SOURCE, "Credentials in the URI are not accepted.")
    if any(c.isspace() for c in uri):
        raise SourceError(Code.INVALID_SOURCE, "The URI contains whitespace.")
    # Percent-encoding is the transport's business: a path or query written in
    # any script is fetched as its UTF-8 escapes, as a browser would.
    return HttpSource(uri=_NON_ASCII.sub(lambda m: quote(m.group(), safe=""), uri))


def _gcs_source(uri: str) -> GcsSource:
    """A gs:// URI as gcloud writes it: the object name verbatim, in any script.

    A percent sign is a character of the name, never an escape (Cloud Storage
    names may hold one), so ``gs://b/caf%C3%A9.png`` names another object than
    ``gs://b/café.png``.
    """
    try:
        bucket, name = _split_gs("gs://" + uri[5:])
    except ValueError as exc:
        raise SourceError(Code.INVALID_SOURCE, f"The URI {exc}") from None
    if not name or name.endswith("/"):
        raise SourceError(Code.INVALID_SOURCE, "The gs:// URI names a folder, not an object.")
    if not is_utf8(name):
        raise SourceError(Code.INVALID_SOURCE, "The object name is not valid Unicode text.")
    if "\r" in name or "\n" in name or len(name.encode()) > MAX_OBJECT_NAME_BYTES:
        raise SourceError(
            Code.INVALID_SOURCE,
            f"The object name is not one Cloud Storage can hold (a line break, or over "
            f"{MAX_OBJECT_NAME_BYTES} bytes).",
        )
    return GcsSource(uri=uri, bucket=bucket, name=name)


def parse_local_source(uri: str) -> Source:
    """A command-line source: a URI as :func:`parse_source` reads it, or a local path.

    Anything without a scheme is a path; ``file://`` URIs are decoded (their
    percent-escapes are the bytes of the name, so names that are not UTF-8
    survive). Other schemes are refused as they are over HTTP.
    """
    scheme = uri.split(":", 1)[0].lower() if _SCHEME.match(uri) else ""
    if scheme in ("http", "https", "gs"):
        return parse_source(uri)
    if scheme and scheme != "file":
        if _HOST_AND_PORT.match(uri):
            raise SourceError(
                Code.INVALID_SOURCE,
                "The URI has no scheme: start it with http://, https:// or gs://, or give a "
                "local name with a colon as ./name.",
            )
        raise SourceError(
            Code.FORBIDDEN_SOURCE,
            f"The scheme {scheme!r} is refused: give a file or folder (a local name with a "
            "colon as ./name), or an http://, https://, gs:// or file:// URI.",
        )
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise SourceError(
                Code.INVALID_SOURCE, "A file:// URI must name a file on this machine."
            )
        return LocalSource(uri=uri, path=Path(os.fsdecode(unquote_to_bytes(parts.path))))
    return LocalSource(uri=uri, path=Path(uri).expanduser())


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (a name's undecodable bytes, as surrogate escapes,
    do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split_gs(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://"):
        raise ValueError("must start with gs://")
    bucket, _, name = uri[len("gs://") :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(f"names no valid bucket ({bucket!r}).")
    return bucket, name
