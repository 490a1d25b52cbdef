"""Gemini's Batch API in the simulator, for the Gemini Developer API and for Vertex AI.

Routes the simulator (localdev/gemini_sim.py) serves besides generateContent, in the
REST shapes google-genai reads:

Gemini Developer API (an API key, as for generateContent):
  Files API   POST /upload/{v}/files (resumable: start, then upload[, finalize] chunks),
              GET|DELETE /{v}/files/{id}, GET /{v}/files, GET /{v}/files/{id}:download
  Batches     POST /{v}/models/{model}:batchGenerateContent, GET /{v}/batches[/{id}],
              POST /{v}/batches/{id}:cancel, DELETE /{v}/batches/{id}
  A batch is a long-running operation, {"name": "batches/<id>", "metadata":
  GenerateContentBatch, "done", "response" | "error"}, its state BATCH_STATE_*. Inline
  requests get their responses in metadata.output.inlinedResponses, in input order with
  each request's metadata; a JSONL file of {"key", "request"} lines gets a generated
  file, files/batch-<id>, of {"key", "response"} or {"key", "error"} lines in input order.
  As on the real API, that file's ID is 42 characters, over the Files API's limit of 40
  for GET and DELETE (which answer 400), while its download works.

Vertex AI (a bearer token), under /{v}/projects/{p}/locations/{l}:
  POST|GET batchPredictionJobs, GET|DELETE batchPredictionJobs/{id},
  POST batchPredictionJobs/{id}:cancel, states JOB_STATE_*. A job reads its JSONL input
  from Cloud Storage and writes <outputUriPrefix>/prediction-model-<create time>/
  predictions.jsonl (outputInfo.gcsOutputDirectory names the folder) through the JSON
  API at SimConfig.storage_url, with aiohttp, so that a relay in front of the storage
  emulator raises the object's finalize event. Each output line is its input line
  (``key`` and any other field, ``request``) with ``status`` ("" or the error),
  ``processed_time`` and, on success, ``response``; as on Vertex, not in input order.

Every request inside a job is answered by GeminiSimulator.answer, as generateContent
would answer it, with none of the online quotas, faults or latency. A job is PENDING
when created, RUNNING batch_start_s later, and ends batch_delay_s after its creation:
as batch_outcome says (succeeded, failed or expired), unless cancelled first.
batch_hold keeps jobs RUNNING until released (POST /_sim/batch/finish, /_sim/release).
batch_error_rate of the requests in each job, chosen from the seed, get a per-request
batch_error_code error; an invalid image gets a per-request 400, not a failed job.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

import aiohttp
from aiohttp import web
from yarl import URL

if TYPE_CHECKING:
    from localdev.gemini_sim import GeminiSimulator

BATCH_OUTCOMES = frozenset({"succeeded", "failed", "expired"})
# The per-request errors batch_error_code may name: its status and message.
BATCH_ERROR_CODES: dict[int, tuple[str, str]] = {
    500: ("INTERNAL", "An internal error has occurred. Please retry."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
}
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# The Files API refuses GET and DELETE of IDs longer than this (batch outputs included).
MAX_FILE_ID_CHARS = 40
FILE_TTL = timedelta(hours=48)
# Gemini's limit on a batchGenerateContent request with inline requests.
MAX_INLINE_BYTES = 20 * 1024 * 1024
STORAGE_TIMEOUT_S = 30.0

_ENDED = frozenset(
    {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}
)
_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
_DELETE_TYPE = "type.googleapis.com/google.cloud.aiplatform.v1.DeleteOperationMetadata"
_REASONS = {400: "Bad Request", 429: "Too Many Requests", 500: "Internal Server Error"}
_FILE_ID = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_FILTER_TERM = re.compile(r'\s*(\w+)\s*(!=|=|:)\s*("[^"]*"|\S+)\s*')

log = logging.getLogger(__name__)


@dataclass
class _File:
    """A Files API file: uploaded by a caller, or a batch's generated responses."""

    id: str
    mime_type: str
    data: bytes
    display_name: str | None
    generated: bool
    created: datetime
    origin: str  # scheme://host:port the simulator was reached at, for uri and downloadUri
    version: str

    def resource(self) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "name": f"files/{self.id}",
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": _rfc3339(self.created),
            "updateTime": _rfc3339(self.created),
            "expirationTime": _rfc3339(self.created + FILE_TTL),
            "sha256Hash": base64.b64encode(hashlib.sha256(self.data).digest()).decode(),
            "uri": f"{self.origin}/{self.version}/files/{self.id}",
            "state": "ACTIVE",
            "source": "GENERATED" if self.generated else "UPLOADED",
        }
        if self.display_name:
            resource["displayName"] = self.display_name
        if self.generated:
            resource["downloadUri"] = (
                f"{self.origin}/download/{self.version}/files/{self.id}:download?alt=media"
            )
        return resource


@dataclass
class _Upload:
    """A resumable upload in progress."""

    file_id: str
    mime_type: str
    display_name: str | None
    size: int | None  # as declared at the start
    origin: str
    version: str
    data: bytearray = field(default_factory=bytearray)


class _Line(NamedTuple):
    """One request of a job: its input line (file input) or item (inline), and the request."""

    entry: dict[str, Any]  # the line's other fields (key, ...) or the item's metadata
    request: Any  # the GenerateContentRequest JSON; None if the line could not be read
    problem: str | None  # why the line could not be read


class _Outcome(NamedTuple):
    """How one request was answered: a response, or an error's code, status and message."""

    response: dict[str, Any] | None
    code: int = 200
    status: str = ""
    message: str = ""


@dataclass
class _Job:
    """A batch job of either API, and what became of it."""

    vertex: bool
    id: str
    name: str
    seq: int  # creation order: listings go newest first
    parent: str  # projects/p/locations/l (Vertex), "" (Developer)
    display_name: str
    model: str  # models/<m> (Developer) or publishers/google/models/<m> (Vertex)
    created: datetime
    created_at: float  # the loop's clock at creation
    origin: str
    version: str
    lines: list[_Line]
    input_config: dict[str, Any]
    output_config: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] | None = None
    inline: bool = False
    state: str = "JOB_STATE_PENDING"
    updated: datetime | None = None
    started: datetime | None = None
    ended: datetime | None = None
    error: dict[str, Any] | None = None
    output_dir: str | None = None  # gs://... (Vertex), once running
    inlined: list[dict[str, Any]] | None = None  # Developer inline responses
    responses_file: str | None = None  # Developer file output: files/batch-<id>
    successful: int = 0
    failed: int = 0
    released: bool = False  # let through batch_hold by name
    task: asyncio.Task[None] | None = None

    @property
    def ended_yet(self) -> bool:
        return self.state in _ENDED

    @property
    def model_id(self) -> str:
        return self.model.rsplit("/", 1)[-1]


class _JobFailed(Exception):
    """A job cannot go on: it ends FAILED with this google.rpc.Status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.status = {"code": code, "message": message}


class BatchSimulator:
    """The Batch and Files APIs of one GeminiSimulator: its jobs, files and uploads."""

    def __init__(self, simulator: GeminiSimulator) -> None:
        self._sim = simulator
        self._jobs: dict[str, _Job] = {}
        self._files: dict[str, _File] = {}
        self._uploads: dict[str, _Upload] = {}
        self._seq = 0
        self._file_seq = 0
        self._changed = asyncio.Event()
        self._storage: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        router = app.router
        router.add_post("/{version}/models/{model:[^/:]+}:batchGenerateContent", self._create_batch)
        router.add_get("/{version}/batches", self._list_batches)
        router.add_get("/{version}/batches/{id:[^/:]+}", self._get_batch)
        router.add_delete("/{version}/batches/{id:[^/:]+}", self._delete_batch)
        router.add_post("/{version}/batches/{id:[^/:]+}:cancel", self._cancel_batch)
        router.add_post("/upload/{version}/files", self._upload)
        router.add_get("/{version}/files", self._list_files)
        router.add_get("/{version}/files/{id:[^/:]+}", self._get_file)
        router.add_delete("/{version}/files/{id:[^/:]+}", self._delete_file)
        router.add_get("/{version}/files/{id:[^/:]+}:download", self._download_file)
        router.add_get("/download/{version}/files/{id:[^/:]+}:download", self._download_file)
        jobs = "/{version}/projects/{project}/locations/{location}/batchPredictionJobs"
        router.add_post(jobs, self._create_job)
        router.add_get(jobs, self._list_jobs)
        router.add_get(jobs + "/{id:[^/:]+}", self._get_job)
        router.add_delete(jobs + "/{id:[^/:]+}", self._delete_job)
        router.add_post(jobs + "/{id:[^/:]+}:cancel", self._cancel_job)
        app.on_cleanup.append(self._cleanup)

    # --- control (on the simulator's loop) ----------------------------------------------------

    def reset(self) -> None:
        """Forget every job, file and upload (their tasks cancelled), as after a restart."""
        for job in self._jobs.values():
            if job.task is not None:
                job.task.cancel()
        self._jobs, self._files, self._uploads = {}, {}, {}
        self._seq = self._file_seq = 0
        self.wake()

    def wake(self) -> None:
        """Make held jobs look at the configuration again."""
        self._changed.set()
        self._changed = asyncio.Event()

    def finish(self, *names: str) -> None:
        """Let the named jobs past batch_hold, or, with none named, lift batch_hold."""
        if names:
            for name in names:
                if name in self._jobs:
                    self._jobs[name].released = True
        else:
            self._sim.config.batch_hold = False
        self.wake()

    async def _hold_create_answer(self, request: web.Request) -> None:
        """While batch_hold_create_answers holds: the job exists, its creator waits."""
        stats = self._sim.stats
        while self._sim.config.batch_hold_create_answers and stats is self._sim.stats:
            stats.batch_creates_held += 1
            try:
                await self._changed.wait()
            finally:
                stats.batch_creates_held -= 1
            if request.transport is None or request.transport.is_closing():
                return  # the creator is gone (killed): nobody reads the answer

    async def _cleanup(self, _app: web.Application) -> None:
        for job in self._jobs.values():
            if job.task is not None:
                job.task.cancel()
        if self._storage is not None:
            await self._storage.close()

    # --- Developer API: batches ---------------------------------------------------------------

    async def _create_batch(self, request: web.Request) -> web.Response:
        refusal = self._sim.refuse(request, vertex=False)
        if refusal is not None:
            return refusal
        version, model = request.match_info["version"], request.match_info["model"]
        known = self._sim.config.known_models
        if known is not None and model not in known:
            return _error(
                404,
                "NOT_FOUND",
                f"models/{model} is not found for API version {version}, or is not supported "
                "for batchGenerateContent.",
            )
        raw = await request.read()
        if len(raw) > MAX_INLINE_BYTES:
            return _error(
                400,
                "INVALID_ARGUMENT",
                f"Request payload size exceeds the limit: {MAX_INLINE_BYTES} bytes.",
            )
        try:
            batch = json.loads(raw)["batch"]
            input_config = batch["inputConfig"]
            if not isinstance(input_config, dict):
                raise TypeError("inputConfig is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}")
        inline = input_config.get("requests")
        file_name = input_config.get("fileName") or input_config.get("file_name")
        if (inline is None) == (file_name is None):
            return _error(
                400,
                "INVALID_ARGUMENT",
                "batch.input_config must set exactly one of requests and file_name.",
            )
        if inline is not None:
            items = inline.get("requests") if isinstance(inline, dict) else None
            if not isinstance(items, list) or not items:
                return _error(
                    400, "INVALID_ARGUMENT", "batch.input_config.requests.requests is empty."
                )
            if not all(isinstance(i, dict) and isinstance(i.get("request"), dict) for i in items):
                return _error(
                    400,
                    "INVALID_ARGUMENT",
                    "Each of batch.input_config.requests.requests needs a request object.",
                )
            lines = [_Line(dict(i.get("metadata") or {}), i["request"], None) for i in items]
            stored_input: dict[str, Any] = {}
        else:
            file_id = str(file_name).removeprefix("files/")
            source = self._files.get(file_id)
            if source is None:
                return _error(404, "NOT_FOUND", f"File {file_name} was not found.")
            lines = _read_lines(source.data)
            if not lines:
                return _error(400, "INVALID_ARGUMENT", f"File {file_name} holds no requests.")
            stored_input = {"fileName": f"files/{file_id}"}
        job_id = self._next_id(vertex=False)
        job = self._start(
            _Job(
                vertex=False,
                id=job_id,
                name=f"batches/{job_id}",
                seq=self._seq,
                parent="",
                display_name=str(batch.get("displayName") or batch.get("display_name") or ""),
                model=f"models/{model}",
                created=_now(),
                created_at=asyncio.get_running_loop().time(),
                origin=_origin(request),
                version=version,
                lines=lines,
                input_config=stored_input,
                inline=inline is not None,
            )
        )
        await self._hold_create_answer(request)
        return web.json_response(_operation(job))

    async def _get_batch(self, request: web.Request) -> web.Response:
        refusal = self._sim.refuse(request, vertex=False)
        if refusal is not None:
            return refusal
        job = self._jobs.get(f"batches/{request.match_info['id']}")
        if job is None or job.vertex:
            return _not_found()
        return web.json_response(_operation(job))

    async def _list_batches(self, request: web.Request) -> web.Response:
        refusal = self._sim.refuse(request, vertex=False)
        if refusal is not None:
            return refusal
        jobs = [job for job in self._jobs.values() if not job.vertex]
        page = _page(request, jobs)
        if isinstance(page, web.Response):
            return page
        listed, token = page
        body: dict[str, Any] = {"operations": [_operation(job) for job in listed]}
        if token:
            body["nextPageToken"] = token
        return web.json_response(body)

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        refusal = self._sim.refuse(request, vertex=False)
        if refusal is not None:
            return refusal
        job = self._jobs.get(f"batches/{request.match_info['id']}")
        if job is None or job.vertex:
            return _not_found()
        if job.ended_yet:
            return _error(
                400, "FAILED_PRECONDITION", f"Batch {job.name} has ended: it cannot be cancelled."
            )
        self._cancel(job, {"code": 1, "message": "CANCELLED"})
        return web.json_response({})

    async def _delete_batch(self, request: web.Request) -> web.Response:
        refusal = self._sim.refuse(request, vertex=False)
        if refusal is not None:
            return refusal
        job = self._jobs.get(f"batches/{request.match_info['id']}")
        if job is None or job.vertex:
            return _not_found()
        # Deleting an operation only says its result is no longer wanted: the job is gone.
        if job.task is not None:
            job.task.cancel()
        del self._jobs[job.name]
        return web.json_response({})

    # --- Developer API: files -----------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        if "upload_id" in request.query:
            return await self._upload_chunk(request)
        refusal = self._sim.refuse(request, vertex=False)
        if refusal is not None:
            return refusal
        protocol = request.headers.get("X-Goog-Upload-Protocol", "")
        command = request.headers.get("X-Goog-Upload-Command", "")
        if protocol != "resumable" or command != "start":
            return _error(
                400,
                "INVALID_ARGUMENT",
                "Only resumable uploads are simulated: X-Goog-Upload-Protocol: resumable, "
                "X-Goog-Upload-Command: start.",
            )
        try:
            raw = await request.read()
            described = (json.loads(raw) if raw else {}).get("file") or {}
            if not isinstance(described, dict):
                raise TypeError("file is not an object")
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}")
        size_header = request.headers.get("X-Goog-Upload-Header-Content-Length")
        mime = (
            request.headers.get("X-Goog-Upload-Header-Content-Type")
            or described.get("mimeType")
            or described.get("mime_type")
            or "application/octet-stream"
        )
        wanted = described.get("name")
        if wanted:
            file_id = str(wanted).removeprefix("files/")
            if len(file_id) > MAX_FILE_ID_CHARS or not _FILE_ID.fullmatch(file_id):
                return _error(
                    400,
                    "INVALID_ARGUMENT",
                    "File name may contain only lowercase letters, digits and dashes, "
                    f"at most {MAX_FILE_ID_CHARS} characters.",
                )
            if file_id in self._files:
                return _error(409, "ALREADY_EXISTS", f"File files/{file_id} already exists.")
        else:
            file_id = self._next_file_id()
        upload_id = hashlib.sha256(f"upload:{file_id}:{self._file_seq}".encode()).hexdigest()
        self._uploads[upload_id] = _Upload(
            file_id=file_id,
            mime_type=str(mime),
            display_name=described.get("displayName") or described.get("display_name"),
            size=int(size_header) if size_header and size_header.isdigit() else None,
            origin=_origin(request),
            version=request.match_info["version"],
        )
        url = (
            f"{_origin(request)}/upload/{request.match_info['version']}/files"
            f"?upload_id={upload_id}&upload_protocol=resumable"
        )
        return web.Response(
            headers={
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-URL": url,
                "X-Goog-Upload-Chunk-Granularity": str(8 * 1024 * 1024),
            }
        )

    async def _upload_chunk(self, request: web.Request) -> web.Response:
        # The upload URL is the capability: chunks carry no API key.
        upload_id = request.query["upload_id"]
        upload = self._uploads.get(upload_id)
        if upload is None:
            return _error(404, "NOT_FOUND", "No such upload.", upload_status="final")
        commands = {c.strip() for c in request.headers.get("X-Goog-Upload-Command", "").split(",")}
        offset = request.headers.get("X-Goog-Upload-Offset", "")
        chunk = await request.read()
        if "upload" in commands:
            if offset != str(len(upload.data)):
                return _error(
                    400,
                    "INVALID_ARGUMENT",
                    f"X-Goog-Upload-Offset {offset!r} is not the {len(upload.data)} bytes "
                    "received.",
                    upload_status="final",
                )
            upload.data.extend(chunk)
        if "finalize" not in commands:
            return web.Response(headers={"X-Goog-Upload-Status": "active"})
        del self._uploads[upload_id]
        if upload.size is not None and upload.size != len(upload.data):
            return _error(
                400,
                "INVALID_ARGUMENT",
                f"The upload declared {upload.size} bytes and sent {len(upload.data)}.",
                upload_status="final",
            )
        stored = _File(
            id=upload.file_id,
            mime_type=upload.mime_type,
            data=bytes(upload.data),
            display_name=upload.display_name,
            generated=False,
            created=_now(),
            origin=upload.origin,
            version=upload.version,
        )
        self._files[stored.id] = stored
        self._sim.stats.files_uploaded += 1
        return web.json_response(
            {"file": stored.resource()}, headers={"X-Goog-Upload-Status": "final"}
        )

    async def _get_file(self, request: web.Request) -> web.Response:
        found = self._file(request, "GetFileRequest")
        if isinstance(found, web.Response):
            return found
        return web.json_response(found.resource())

    async def _delete_file(self, request: web.Request) -> web.Response:
        found = self._file(request, "DeleteFileRequest")
        if isinstance(found, web.Response):
            return found
        del self._files[found.id]
        return web.json_response({})

    async def _download_file(self, request: web.Request) -> web.Response:
        refusal = self._sim.refuse(request, vertex=False)
        if refusal is not None:
            return refusal
        found = self._files.get(request.match_info["id"])
        if found is None:
            return _not_found()
        if not found.generated:
            return _error(400, "INVALID_ARGUMENT", "Only generated files can be downloaded.")
        stats = self._sim.stats
        while self._sim.config.batch_hold_downloads and stats is self._sim.stats:
            stats.downloads_held += 1
            try:
                await self._changed.wait()
            finally:
                stats.downloads_held -= 1
        return web.Response(body=found.data, content_type=found.mime_type)

    async def _list_files(self, request: web.Request) -> web.Response:
        refusal = self._sim.refuse(request, vertex=False)
        if refusal is not None:
            return refusal
        files = list(self._files.values())[::-1]
        size = _page_size(request)
        if isinstance(size, web.Response):
            return size
        token = request.query.get("pageToken") or "0"
        if not token.isdigit():
            return _error(400, "INVALID_ARGUMENT", "Invalid page token.")
        start = int(token)
        body: dict[str, Any] = {"files": [f.resource() for f in files[start : start + size]]}
        if start + size < len(files):
            body["nextPageToken"] = str(start + size)
        return web.json_response(body)

    def _file(self, request: web.Request, method: str) -> _File | web.Response:
        refusal = self._sim.refuse(request, vertex=False)
        if refusal is not None:
            return refusal
        file_id = request.match_info["id"]
        if len(file_id) > MAX_FILE_ID_CHARS:
            # The real API's own check, which refuses its batch output files too.
            return _error(
                400,
                "INVALID_ARGUMENT",
                f"* {method}.name: File ID (name excluding 'files/') cannot be more than "
                f"{MAX_FILE_ID_CHARS} characters.\n",
            )
        found = self._files.get(file_id)
        return _not_found() if found is None else found

    # --- Vertex AI ----------------------------------------------------------------------------

    async def _create_job(self, request: web.Request) -> web.Response:
        refusal = self._sim.refuse(request, vertex=True)
        if refusal is not None:
            return refusal
        try:
            body = await request.json()
            model = str(body["model"])
            input_config, output_config = body["inputConfig"], body["outputConfig"]
            uris = input_config["gcsSource"]["uris"]
            prefix = output_config["gcsDestination"]["outputUriPrefix"]
        except (ValueError, KeyError, TypeError) as exc:
            return _error(
                400, "INVALID_ARGUMENT", f"Invalid BatchPredictionJob: {exc!r} is missing."
            )
        display_name = body.get("displayName")
        if not display_name:
            return _error(400, "INVALID_ARGUMENT", "BatchPredictionJob.display_name is required.")
        if isinstance(uris, str):
            uris = [uris]
        if input_config.get("instancesFormat") != "jsonl" or not uris:
            return _error(
                400, "INVALID_ARGUMENT", "Only jsonl input from gcsSource.uris is simulated."
            )
        if output_config.get("predictionsFormat") != "jsonl":
            return _error(
                400, "INVALID_ARGUMENT", "Only jsonl output to gcsDestination is simulated."
            )
        for uri in [*uris, prefix]:
            if _gs_parts(uri) is None:
                return _error(400, "INVALID_ARGUMENT", f"{uri!r} is not a gs:// URI.")
        model_id = model.rsplit("/", 1)[-1]
        known = self._sim.config.known_models
        if not model.startswith(("publishers/", "projects/")) or (
            known is not None and model_id not in known
        ):
            return _error(404, "NOT_FOUND", f"The PublisherModel {model_id} does not exist.")
        info = request.match_info
        parent = f"projects/{info['project']}/locations/{info['location']}"
        job_id = self._next_id(vertex=True)
        job = self._start(
            _Job(
                vertex=True,
                id=job_id,
                name=f"{parent}/batchPredictionJobs/{job_id}",
                seq=self._seq,
                parent=parent,
                display_name=str(display_name),
                model=model,
                created=_now(),
                created_at=asyncio.get_running_loop().time(),
                origin=_origin(request),
                version=info["version"],
                lines=[],
                input_config={**input_config, "gcsSource": {"uris": list(uris)}},
                output_config=output_config,
                labels=body.get("labels"),
            )
        )
        await self._hold_create_answer(request)
        return web.json_response(_vertex_job(job))

    async def _get_job(self, request: web.Request) -> web.Response:
        found = self._vertex(request)
        if isinstance(found, web.Response):
            return found
        return web.json_response(_vertex_job(found))

    async def _list_jobs(self, request: web.Request) -> web.Response:
        refusal = self._sim.refuse(request, vertex=True)
        if refusal is not None:
            return refusal
        info = request.match_info
        parent = f"projects/{info['project']}/locations/{info['location']}"
        jobs = [job for job in self._jobs.values() if job.vertex and job.parent == parent]
        try:
            jobs = _filtered(jobs, request.query.get("filter", ""))
        except ValueError as exc:
            return _error(400, "INVALID_ARGUMENT", f"Invalid filter: {exc}")
        page = _page(request, jobs)
        if isinstance(page, web.Response):
            return page
        listed, token = page
        body: dict[str, Any] = {"batchPredictionJobs": [_vertex_job(job) for job in listed]}
        if token:
            body["nextPageToken"] = token
        return web.json_response(body)

    async def _cancel_job(self, request: web.Request) -> web.Response:
        found = self._vertex(request)
        if isinstance(found, web.Response):
            return found
        if found.ended_yet:
            return _error(
                400,
                "FAILED_PRECONDITION",
                f"Cannot cancel BatchPredictionJob {found.name} in state {found.state}.",
            )
        self._cancel(found, {"code": 1, "message": "CANCELED"})
        return web.json_response({})

    async def _delete_job(self, request: web.Request) -> web.Response:
        found = self._vertex(request)
        if isinstance(found, web.Response):
            return found
        if not found.ended_yet:
            return _error(
                400,
                "FAILED_PRECONDITION",
                f"BatchPredictionJob {found.name} is in state {found.state}: only jobs that "
                "have finished can be deleted.",
            )
        del self._jobs[found.name]
        return web.json_response(
            {
                "name": f"{found.parent}/operations/{found.id}",
                "metadata": {
                    "@type": _DELETE_TYPE,
                    "genericMetadata": {
                        "createTime": _rfc3339(_now()),
                        "updateTime": _rfc3339(_now()),
                    },
                },
                "done": True,
                "response": {"@type": "type.googleapis.com/google.protobuf.Empty"},
            }
        )

    def _vertex(self, request: web.Request) -> _Job | web.Response:
        refusal = self._sim.refuse(request, vertex=True)
        if refusal is not None:
            return refusal
        info = request.match_info
        name = (
            f"projects/{info['project']}/locations/{info['location']}"
            f"/batchPredictionJobs/{info['id']}"
        )
        job = self._jobs.get(name)
        return _not_found() if job is None else job

    # --- running jobs -------------------------------------------------------------------------

    def _next_id(self, *, vertex: bool) -> str:
        """A job ID from the seed, shaped as the API's: 19 digits, or 36 of [a-z0-9]."""
        self._seq += 1
        digest = hashlib.sha256(f"batch:{self._sim.config.seed}:{self._seq}".encode()).digest()
        number = int.from_bytes(digest, "big")
        if vertex:
            return str(10**18 + number % (9 * 10**18))
        return _base36(number)[:36]

    def _next_file_id(self) -> str:
        self._file_seq += 1
        digest = hashlib.sha256(f"file:{self._sim.config.seed}:{self._file_seq}".encode())
        return _base36(int.from_bytes(digest.digest(), "big"))[:12]

    def _start(self, job: _Job) -> _Job:
        stats = self._sim.stats
        self._jobs[job.name] = job
        stats.batch_jobs_created += 1
        stats.batch_displayed_names.append(job.display_name)
        stats.batch_states[job.name] = job.state
        job.updated = job.created
        job.task = asyncio.get_running_loop().create_task(self._run(job), name=job.name)
        return job

    def _set_state(self, job: _Job, state: str, error: dict[str, Any] | None = None) -> None:
        job.state, job.updated = state, _now()
        if state == "JOB_STATE_RUNNING":
            job.started = job.updated
            if job.vertex:
                prefix = str(job.output_config["gcsDestination"]["outputUriPrefix"]).rstrip("/")
                stamp = job.created.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                job.output_dir = f"{prefix}/prediction-model-{stamp}"
        if state in _ENDED:
            job.ended = job.updated
        if error is not None:
            job.error = error
        if job.name in self._jobs:
            self._sim.stats.batch_states[job.name] = state

    def _cancel(self, job: _Job, error: dict[str, Any]) -> None:
        if job.task is not None:
            job.task.cancel()
        self._set_state(job, "JOB_STATE_CANCELLED", error)
        self._sim.stats.batch_cancelled += 1

    async def _run(self, job: _Job) -> None:
        """The job's life: pending, running, held if asked, then its end."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(max(0.0, self._sim.config.batch_start_s))
            self._set_state(job, "JOB_STATE_RUNNING")
            await asyncio.sleep(
                max(0.0, job.created_at + self._sim.config.batch_delay_s - loop.time())
            )
            stats = self._sim.stats
            while self._sim.config.batch_hold and not job.released:
                stats.batch_held += 1
                try:
                    await self._changed.wait()
                finally:
                    stats.batch_held -= 1
            outcome = self._sim.config.batch_outcome
            if outcome == "expired":
                self._set_state(job, "JOB_STATE_EXPIRED")
            elif outcome == "failed":
                self._set_state(
                    job,
                    "JOB_STATE_FAILED",
                    {"code": 13, "message": "System error. Please try this operation again."},
                )
            elif job.vertex:
                await self._run_vertex(job)
            else:
                await self._run_developer(job)
        except _JobFailed as exc:
            self._set_state(job, "JOB_STATE_FAILED", exc.status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a job's own failure must not pass unseen
            log.exception("batch job %s failed unexpectedly", job.name)
            failure = {"code": 13, "message": f"System error: {exc}"}
            self._set_state(job, "JOB_STATE_FAILED", failure)

    async def _answer_all(self, job: _Job, lines: list[_Line]) -> list[_Outcome]:
        """Each request answered as generateContent would, or given the error it is due."""
        cfg = self._sim.config
        count = round(len(lines) * cfg.batch_error_rate)
        failing = set(random.Random(f"{cfg.seed}:{job.id}").sample(range(len(lines)), count))
        error_status, error_message = BATCH_ERROR_CODES[cfg.batch_error_code]
        outcomes = []
        stats = self._sim.stats
        for index, line in enumerate(lines):
            if index in failing:
                outcome = _Outcome(None, cfg.batch_error_code, error_status, error_message)
            elif line.request is None:
                outcome = _Outcome(None, 400, "INVALID_ARGUMENT", str(line.problem))
            else:
                try:
                    code, body = self._sim.answer(job.model_id, line.request)
                except Exception as exc:  # one request's failure is that request's error
                    log.exception("request %d of batch job %s failed", index, job.name)
                    code, body = 500, {"error": {"status": "INTERNAL", "message": str(exc)}}
                if code == 200:
                    outcome = _Outcome(body)
                else:
                    error = body.get("error") or {}
                    status, message = error.get("status", ""), error.get("message", "")
                    outcome = _Outcome(None, code, status, message)
            stats.batch_requests += 1
            if outcome.response is None:
                stats.batch_errors += 1
                job.failed += 1
            else:
                job.successful += 1
            outcomes.append(outcome)
            await asyncio.sleep(0)  # a large job must not keep GETs waiting
        return outcomes

    async def _run_developer(self, job: _Job) -> None:
        outcomes = await self._answer_all(job, job.lines)
        if job.inline:
            job.inlined = []
            for line, outcome in zip(job.lines, outcomes, strict=True):
                item: dict[str, Any] = _developer_result(outcome)
                if line.entry:
                    item["metadata"] = line.entry
                job.inlined.append(item)
        else:
            text = "".join(
                json.dumps({**line.entry, **_developer_result(outcome)}) + "\n"
                for line, outcome in zip(job.lines, outcomes, strict=True)
            )
            generated = _File(
                id=f"batch-{job.id}",
                mime_type="application/jsonl",
                data=text.encode(),
                display_name=None,
                generated=True,
                created=_now(),
                origin=job.origin,
                version=job.version,
            )
            self._files[generated.id] = generated
            job.responses_file = f"files/{generated.id}"
            self._sim.stats.batch_outputs.append(job.responses_file)
        self._set_state(job, "JOB_STATE_SUCCEEDED")

    async def _run_vertex(self, job: _Job) -> None:
        lines: list[_Line] = []
        for uri in job.input_config["gcsSource"]["uris"]:
            data = await self._read(uri)
            for number, line in enumerate(_read_lines(data), 1):
                if line.request is None:
                    # Vertex imports the whole file first: one bad line fails the job.
                    raise _JobFailed(
                        3,
                        "Failed to import data. Please check 'Prepare input' section of the "
                        f"batch predictions documentation. Line {number} of {uri}: "
                        f"{line.problem}",
                    )
                lines.append(line)
        job.lines = lines
        outcomes = await self._answer_all(job, lines)
        written = []
        for line, outcome in zip(lines, outcomes, strict=True):
            row: dict[str, Any] = {**line.entry, "request": line.request}
            row["status"] = "" if outcome.response is not None else _vertex_status(outcome)
            row["processed_time"] = _now().isoformat(timespec="milliseconds")
            if outcome.response is not None:
                row["response"] = outcome.response
            written.append(json.dumps(row) + "\n")
        # Vertex writes rows as they finish, not in input order: callers join on a key.
        random.Random(f"{self._sim.config.seed}:{job.id}:order").shuffle(written)
        assert job.output_dir is not None
        target = f"{job.output_dir}/predictions.jsonl"
        await self._write(target, "".join(written).encode())
        self._sim.stats.batch_outputs.append(target)
        self._set_state(job, "JOB_STATE_SUCCEEDED")

    # --- Cloud Storage ------------------------------------------------------------------------

    def _session(self) -> tuple[aiohttp.ClientSession, str]:
        url = self._sim.config.storage_url
        if not url:
            raise _JobFailed(
                9, "No Cloud Storage to read or write: the simulator has no storage_url."
            )
        if self._storage is None:
            self._storage = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=STORAGE_TIMEOUT_S)
            )
        return self._storage, url.rstrip("/")

    async def _read(self, uri: str) -> bytes:
        session, base = self._session()
        bucket, name = _gs_parts(uri) or ("", "")
        url = URL(
            f"{base}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}?alt=media",
            encoded=True,
        )
        try:
            async with session.get(url) as response:
                body = await response.read()
                if response.status != 200:
                    raise _JobFailed(
                        3,
                        f"Failed to import data. Could not read {uri}: Cloud Storage answered "
                        f"{response.status} {body[:200].decode(errors='replace')}",
                    )
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _JobFailed(3, f"Failed to import data. Could not read {uri}: {exc!r}") from exc

    async def _write(self, uri: str, data: bytes) -> None:
        session, base = self._session()
        bucket, name = _gs_parts(uri) or ("", "")
        url = URL(
            f"{base}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
            f"?uploadType=media&name={quote(name, safe='')}",
            encoded=True,
        )
        try:
            async with session.post(
                url, data=data, headers={"Content-Type": "application/x-ndjson"}
            ) as response:
                body = await response.read()
                if response.status not in (200, 201):
                    raise _JobFailed(
                        13,
                        f"Failed to export data. Could not write {uri}: Cloud Storage answered "
                        f"{response.status} {body[:200].decode(errors='replace')}",
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _JobFailed(13, f"Failed to export data. Could not write {uri}: {exc!r}") from exc


# --- resources --------------------------------------------------------------------------------


def _operation(job: _Job) -> dict[str, Any]:
    """A Developer API batch as the API answers it: a long-running operation."""
    stats: dict[str, str] = {"requestCount": str(len(job.lines))}
    if job.state in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING"):
        stats["pendingRequestCount"] = str(len(job.lines))
    if job.successful:
        stats["successfulRequestCount"] = str(job.successful)
    if job.failed:
        stats["failedRequestCount"] = str(job.failed)
    metadata: dict[str, Any] = {
        "@type": _BATCH_TYPE,
        "model": job.model,
        "displayName": job.display_name,
        "createTime": _rfc3339(job.created),
        "updateTime": _rfc3339(job.updated or job.created),
        "batchStats": stats,
        "state": job.state.replace("JOB_STATE_", "BATCH_STATE_"),
        "name": job.name,
    }
    if job.input_config:
        metadata["inputConfig"] = job.input_config
    if job.ended is not None:
        metadata["endTime"] = _rfc3339(job.ended)
    output: dict[str, Any] | None = None
    if job.inlined is not None:
        output = {"inlinedResponses": {"inlinedResponses": job.inlined}}
    elif job.responses_file is not None:
        output = {"responsesFile": job.responses_file}
    if output is not None:
        metadata["output"] = output
    operation: dict[str, Any] = {"name": job.name, "metadata": metadata}
    if job.ended_yet:
        operation["done"] = True
        if job.error is not None:
            operation["error"] = job.error
        elif output is not None:
            operation["response"] = {"@type": _OUTPUT_TYPE, **output}
    return operation


def _vertex_job(job: _Job) -> dict[str, Any]:
    """A Vertex AI BatchPredictionJob resource."""
    resource: dict[str, Any] = {
        "name": job.name,
        "displayName": job.display_name,
        "model": job.model,
        "inputConfig": job.input_config,
        "outputConfig": job.output_config,
        "state": job.state,
        "createTime": _rfc3339(job.created),
        "updateTime": _rfc3339(job.updated or job.created),
    }
    if job.labels:
        resource["labels"] = job.labels
    if job.started is not None:
        resource["startTime"] = _rfc3339(job.started)
    if job.ended is not None:
        resource["endTime"] = _rfc3339(job.ended)
    if job.output_dir is not None:
        resource["outputInfo"] = {"gcsOutputDirectory": job.output_dir}
    if job.successful or job.failed:
        counts = {"successfulCount": str(job.successful)}
        if job.failed:
            counts["failedCount"] = str(job.failed)
        resource["completionStats"] = counts
    if job.error is not None:
        resource["error"] = job.error
    return resource


def _developer_result(outcome: _Outcome) -> dict[str, Any]:
    """One request's result in the Developer API's output: a response, or an error (a
    google.rpc.Status: code and message, no status name)."""
    if outcome.response is not None:
        return {"response": outcome.response}
    return {"error": {"code": outcome.code, "message": outcome.message}}


def _vertex_status(outcome: _Outcome) -> str:
    """A failed row's ``status`` on Vertex: the HTTP reason, then the error as JSON."""
    error = {"error": {"code": outcome.code, "message": outcome.message, "status": outcome.status}}
    return f"{_REASONS.get(outcome.code, 'Error')}: {json.dumps(error)}"


# --- helpers ----------------------------------------------------------------------------------


def _read_lines(data: bytes) -> list[_Line]:
    """The requests of a JSONL input: one {"request": ..., other fields} object a line."""
    lines = []
    for text in data.decode("utf-8", errors="replace").splitlines():
        if not text.strip():
            continue
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            lines.append(_Line({}, None, f"Invalid JSON payload received. {exc}"))
            continue
        if not isinstance(parsed, dict) or not isinstance(parsed.get("request"), dict):
            entry = {"key": parsed["key"]} if isinstance(parsed, dict) and "key" in parsed else {}
            lines.append(_Line(entry, None, "Each line needs a request object."))
            continue
        entry = {k: v for k, v in parsed.items() if k != "request"}
        lines.append(_Line(entry, parsed["request"], None))
    return lines


def _page(request: web.Request, jobs: list[_Job]) -> tuple[list[_Job], str] | web.Response:
    """One page of ``jobs``, newest first, and the token of the next page ("" at the end)."""
    size = _page_size(request)
    if isinstance(size, web.Response):
        return size
    ordered = sorted(jobs, key=lambda job: job.seq, reverse=True)
    token = request.query.get("pageToken")
    if token:
        try:
            after = int(base64.urlsafe_b64decode(token.encode()).decode())
        except ValueError:
            return _error(400, "INVALID_ARGUMENT", "Invalid page token.")
        ordered = [job for job in ordered if job.seq < after]
    listed = ordered[:size]
    more = len(ordered) > size
    next_token = base64.urlsafe_b64encode(str(listed[-1].seq).encode()).decode() if more else ""
    return listed, next_token


def _page_size(request: web.Request) -> int | web.Response:
    raw = request.query.get("pageSize")
    if not raw:
        return DEFAULT_PAGE_SIZE
    if not raw.isdigit():
        return _error(400, "INVALID_ARGUMENT", f"Invalid pageSize {raw!r}.")
    return min(int(raw), MAX_PAGE_SIZE) or DEFAULT_PAGE_SIZE


def _filtered(jobs: list[_Job], expression: str) -> list[_Job]:
    """The jobs an AIP-160 filter keeps: terms on display_name and state joined by AND,
    with =, != or : (a value ending in * matches by prefix)."""
    if not expression.strip():
        return jobs
    kept = jobs
    for term in re.split(r"\s+AND\s+", expression.strip(), flags=re.IGNORECASE):
        match = _FILTER_TERM.fullmatch(term)
        if match is None:
            raise ValueError(f"cannot read {term!r}")
        field_name, operator, value = match.groups()
        value = value.strip('"')
        if field_name in ("display_name", "displayName"):
            kept = [job for job in kept if _matches(job.display_name, operator, value)]
        elif field_name == "state":
            kept = [job for job in kept if _matches(job.state, operator, value)]
        else:
            raise ValueError(f"unknown field {field_name!r}")
    return kept


def _matches(actual: str, operator: str, value: str) -> bool:
    if operator == "!=":
        return actual != value
    if operator == ":" and value.endswith("*"):
        return actual.startswith(value[:-1])
    return actual == value


def _gs_parts(uri: Any) -> tuple[str, str] | None:
    """(bucket, object name) of a gs:// URI (the name may be empty), or None."""
    if not isinstance(uri, str) or not uri.startswith("gs://"):
        return None
    bucket, _, name = uri[len("gs://") :].partition("/")
    return (bucket, name) if bucket else None


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while number:
        number, digit = divmod(number, 36)
        text += digits[digit]
    return text or "0"


def _origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _now() -> datetime:
    return datetime.now(UTC)


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _not_found() -> web.Response:
    return _error(404, "NOT_FOUND", "Requested entity was not found.")


def _error(
    code: int, status: str, message: str, *, upload_status: str | None = None
) -> web.Response:
    headers = {"X-Goog-Upload-Status": upload_status} if upload_status else None
    return web.json_response(
        {"error": {"code": code, "message": message, "status": status}},
        status=code,
        headers=headers,
    )
