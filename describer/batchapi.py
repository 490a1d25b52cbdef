"""Gemini's Batch API through google-genai, for either backend, and its answers as records.

The Gemini API reads a job's requests from a file uploaded through the Files API and
answers in a generated file; Vertex AI reads a gs:// JSONL and writes its answers under
a gs:// prefix. :class:`JobService` hides the difference behind create, find, get and
answers. :func:`answer_record` judges one answer line as an online answer is judged
(:func:`describer.gemini.parse_answer`), so a record says the same in both modes.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from .errors import Code, DescriberError, SourceError, TransientFailure
from .gemini import parse_answer
from .records import OK, Record
from .runtime import Runtime
from .schemas import SchemaMismatch
from .settings import Prices
from .store import Store

log = logging.getLogger(__name__)

# The SDK's job states, as the status object names them.
_STATES = {
    "JOB_STATE_QUEUED": "pending",
    "JOB_STATE_PENDING": "pending",
    "JOB_STATE_RUNNING": "running",
    "JOB_STATE_UPDATING": "running",
    "JOB_STATE_PAUSED": "running",
    "JOB_STATE_CANCELLING": "running",
    "JOB_STATE_SUCCEEDED": "succeeded",
    "JOB_STATE_PARTIALLY_SUCCEEDED": "succeeded",
    "JOB_STATE_FAILED": "failed",
    "JOB_STATE_CANCELLED": "cancelled",
    "JOB_STATE_EXPIRED": "expired",
}
# States after which a job answers nothing more: its sources may be run online.
ENDED_WITHOUT_ANSWERS = frozenset({"failed", "cancelled", "expired"})
# Jobs looked through for one a dead claim's holder may have created (newest first).
FIND_LIMIT = 2000
# Batch API answers that no retry changes: the job is recorded as failed instead.
_REFUSALS = frozenset({400, 403, 404})
# A request that failed inside a job for one of these may well succeed asked again online.
_PASSING_CODES = frozenset({408, 429, 500, 502, 503, 504})
_PASSING_STATUSES = frozenset(
    {"RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"}
)
# Vertex AI echoes each request beside its answer: this label carries the line's key in it.
VERTEX_KEY_LABEL = "describer-key"
# The one object a Vertex AI job writes its answers to, in its output directory.
_VERTEX_ANSWERS = "predictions.jsonl"


class BatchRefused(DescriberError):
    """The Batch API refused for good (a model without batch support, no permission, gone)."""


@dataclass(frozen=True)
class JobView:
    """What the Batch API says of a job."""

    name: str
    state: str  # pending, running, succeeded, failed, cancelled or expired
    error: str | None = None
    # Where its answers are: the Gemini API's generated file (files/...), or the gs://
    # directory a Vertex AI job wrote to.
    output: str | None = None


class JobService:
    """One invocation's Batch API calls (the client is bound to the invocation's loop)."""

    def __init__(self, store: Store, client: genai.Client, *, vertex: bool) -> None:
        self._store = store
        self._client = client
        self._vertex = vertex

    async def create(
        self, *, display_name: str, model: str, bucket: str, name: str, dest: str
    ) -> tuple[JobView, str | None]:
        """Create a job from the JSONL at gs://``bucket``/``name``; the job, and the Files
        API name of its input (the Gemini API's, to delete once landed).

        ``dest``: where a Vertex AI job writes its answers (a gs:// prefix).
        """
        config = types.CreateBatchJobConfig(display_name=display_name)
        input_file = None
        if self._vertex:
            config.dest = dest
            src = f"gs://{bucket}/{name}"
        else:
            # The Gemini API reads a job's requests from the Files API: the shard's JSONL,
            # read once into memory (about SHARD_SIZE times a prepared image) and uploaded.
            data = await self._store.read_bytes(bucket, name)
            if data is None:
                raise TransientFailure(f"gs://{bucket}/{name}", "the job's requests are gone")
            upload = types.UploadFileConfig(mime_type="jsonl", display_name=display_name)
            uploaded = await self._call(
                self._client.aio.files.upload(file=io.BytesIO(data), config=upload)
            )
            src = input_file = str(uploaded.name)
        job = await self._call(self._client.aio.batches.create(model=model, src=src, config=config))
        return view(job), input_file

    async def find(self, name: str) -> JobView | None:
        """The job of display name ``name``, unless it ended without answers.

        Vertex AI filters by name; the Gemini API lists newest first, and a job created
        within a claim's lease is among the newest FIND_LIMIT.
        """
        config = types.ListBatchJobsConfig(page_size=100)
        if self._vertex:
            config.filter = f'display_name="{name}"'

        async def search() -> JobView | None:
            seen = 0
            async for job in await self._client.aio.batches.list(config=config):
                seen += 1
                if job.display_name == name:
                    found = view(job)
                    if found.state not in ENDED_WITHOUT_ANSWERS:
                        return found
                if seen >= FIND_LIMIT:
                    break
            return None

        found: JobView | None = await self._call(search())
        return found

    async def get(self, name: str) -> JobView:
        return view(await self._call(self._client.aio.batches.get(name=name)))

    async def cancel(self, name: str) -> None:
        await self._call(self._client.aio.batches.cancel(name=name))

    async def answers(self, job: JobView) -> dict[str, dict[str, Any]]:
        """The job's answer lines by key; a key answered twice is left out (asked again
        online), since only a forger writes one twice."""
        if not job.output:
            return {}  # nothing says where its answers are: every source is asked online
        if self._vertex:
            # Only the object the job wrote, in the directory the API names: anything
            # else under the destination prefix is not an answer.
            where = (job.output or "").removeprefix("gs://")
            bucket, _, folder = where.partition("/")
            data = await self._store.read_bytes(bucket, f"{folder.rstrip('/')}/{_VERTEX_ANSWERS}")
        else:
            data = await self._call(self._client.aio.files.download(file=job.output or ""))
        by_key: dict[str, dict[str, Any]] = {}
        twice: set[str] = set()
        for line in jsonl_lines(data or b""):
            # A Vertex AI line carries its whole request again: not kept.
            request = line.pop("request", None)
            key = line.get("key")
            if key is None and isinstance(request, dict):
                key = (request.get("labels") or {}).get(VERTEX_KEY_LABEL)
            if not isinstance(key, str):
                continue
            if key in by_key:
                twice.add(key)
            by_key[key] = line
        for key in twice:
            del by_key[key]
        return by_key

    async def delete_input(self, name: str) -> None:
        """Delete a job's input from the Files API (it would expire in 48 h anyway). Its
        answers file cannot be: its generated name is longer than the Files API accepts for
        a delete (a known bug of the API), so it expires."""
        try:
            await self._client.aio.files.delete(name=name)
        except genai_errors.APIError as exc:
            log.warning("could not delete a batch job's input", extra={"reason": str(exc)})

    async def _call(self, call: Any) -> Any:
        """A Batch API call. A refusal no retry can change (400, 403, 404) is BatchRefused;
        any other failure a TransientFailure: the event, or the next collect, comes again."""
        try:
            return await call
        except genai_errors.APIError as exc:
            reason = f"{exc.code} {exc.status}: {exc.message}"
            if exc.code in _REFUSALS:
                raise BatchRefused(reason) from exc
            raise TransientFailure("the Batch API", reason) from exc
        except (TimeoutError, OSError) as exc:
            raise TransientFailure("the Batch API", f"could not be reached: {exc!r}") from exc


@asynccontextmanager
async def open_jobs(runtime: Runtime) -> AsyncIterator[JobService]:
    """The Batch API for one invocation, on a session of its own, closed on the way out."""
    connector = runtime.gemini
    async with connector.open_session() as session:
        client = connector.client(session, timeout_s=runtime.settings.model_timeout_s)
        try:
            yield JobService(runtime.store, client, vertex=connector.vertex)
        finally:
            await client.aio.aclose()


def view(job: types.BatchJob) -> JobView:
    state = job.state.value if job.state is not None else "JOB_STATE_PENDING"
    error = None
    if job.error is not None:
        error = f"{job.error.code or ''} {job.error.message or ''}".strip() or None
    output = None
    if job.output_info is not None and job.output_info.gcs_output_directory:
        output = job.output_info.gcs_output_directory
    elif job.dest is not None and job.dest.file_name:
        output = job.dest.file_name
    return JobView(
        name=str(job.name), state=_STATES.get(str(state), "running"), error=error, output=output
    )


def jsonl_lines(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (an answers file, a shard's queued sources); a line
    that is not one is skipped."""
    lines = []
    for raw in data.splitlines():
        if raw.strip():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                lines.append(line)
    return lines


def answer_record(
    known: Mapping[str, Any],
    line: Mapping[str, Any] | None,
    *,
    job: str,
    model: str,
    prompt: str,
    schema: str | None,
    prices: Prices,
) -> Record | None:
    """The record of one queued source from its line of the job's answers; None when it is
    better asked again online (no answer, a passing error, an answer that did not fit)."""
    if line is None:
        return None
    thumbnail = known.get("thumbnail")
    common: dict[str, Any] = {
        "mime_type": known.get("mime_type"),
        "width": known.get("width"),
        "height": known.get("height"),
        "latency_ms": int(known.get("latency_ms") or 0),
        "thumbnail": base64.b64decode(thumbnail) if isinstance(thumbnail, str) else None,
        "batch_job": job,
        "attempts": 1,
        "schema": schema,
    }
    source = str(known["source"])
    error = _line_error(line)
    if error is not None:
        code, message = error
        if code is None or code in _PASSING_CODES:
            return None
        failed = SourceError(
            Code.MODEL_ERROR, f"The batch job {job} answered {code} for this image: {message}"
        )
        return Record.failed(source, failed, model=model, prompt=prompt, **common)
    try:
        answer = parse_answer(line.get("response"), model=model, schema=schema)
    except SchemaMismatch:
        return None  # online, it is asked once more; so it is here
    except SourceError as exc:
        return Record.failed(source, exc, model=model, prompt=prompt, **common)
    except ValueError:
        return None  # an answer that is not a GenerateContentResponse: ask again
    record = Record(
        source=source,
        status=OK,
        model=answer.model,
        simulated=answer.simulated,
        prompt=prompt,
        description=answer.text,
        data=answer.data,
        usage=answer.usage,
        **common,
    )
    return record.priced(prices)


def _line_error(line: Mapping[str, Any]) -> tuple[int | None, str] | None:
    """A per-request error in an answer line: (its code, None when passing or unknown; its
    message), or None when the line has an answer."""
    error = line.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        status = str(error.get("status") or "")
        message = str(error.get("message") or status or "no message")
        if status in _PASSING_STATUSES:
            return None, message
        return (int(code) if isinstance(code, int) else None), message
    said = line.get("status")
    if isinstance(said, str) and said and line.get("response") is None:
        # Vertex AI says only a message: a request it calls invalid is final, the rest passing.
        invalid = "400" in said or "INVALID_ARGUMENT" in said or "invalid" in said.lower()
        return (400 if invalid else None), said
    if line.get("response") is None:
        return None, "the line has no answer"
    return None
