"""A Gemini simulator: a real HTTP server speaking generateContent's REST shape.

Used by the tests and the local demo in place of the real API.
It checks requests the way the real API does (an API key or bearer token; each
inline image of a supported MIME type whose bytes decode as that type) and
answers with descriptions that are deterministic and depend on the image, so a
test can tell which image a description belongs to. Its quotas act as Gemini's do
(429 RESOURCE_EXHAUSTED with a QuotaFailure and a RetryInfo): calls in flight
(``max_in_flight``), calls per window (``window_quota`` per ``window_s``: a
per-minute quota scaled down, its RetryInfo the wait to the next window), per day
(``daily_quota_exhausted``), and any of them changed mid-run with
``/_sim/adjust``. Asked for JSON with a schema
(``responseMimeType: application/json`` and ``responseJsonSchema`` or
``responseSchema``), it answers with an object that fits the schema, its values
drawn from the same description. It can be told to add latency, refuse calls
above a number in flight, answer 429 with RetryInfo, 500s, hang past the
client's timeout, exhaust a daily quota, block images, or give structured
answers that do not fit their schema.

A call whose caller has gone (its connection closed while the call was held
or sleeping out its latency) is not answered and not counted as answered, only
as abandoned: a test can kill a client mid-call and still count answers exactly.

It also speaks the Batch API, for the Gemini Developer API (Files API uploads,
``batchGenerateContent``, ``batches/*``) and for Vertex AI (``batchPredictionJobs``
reading and writing Cloud Storage through ``storage_url``): see
localdev/gemini_batch_sim.py. Each request inside a batch job is answered by the
same code as generateContent (:meth:`GeminiSimulator.answer`), without the online
quotas, latency or faults; ``batch_*`` settings say how jobs run and end.

Run it alone:  python -m localdev.gemini_sim --port 8090 --latency-ms 500
Control it:    POST /_sim/config {"latency_ms": 200, ...}, GET /_sim/stats, POST /_sim/reset,
               POST /_sim/release (lift answer_limit and batch_hold, keeping the stats),
               POST /_sim/adjust {"max_in_flight": 4} (change settings, keeping the stats),
               POST /_sim/batch/finish {"names": [...]} (let held batch jobs finish)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import io
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from aiohttp import web
from PIL import Image

from describer.gemini import SIMULATOR_MODEL_VERSION_PREFIX
from localdev.gemini_batch_sim import BATCH_ERROR_CODES, BATCH_OUTCOMES, BatchSimulator
from localdev.threaded import Served, serve_in_thread

SUPPORTED = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/webp": "WEBP",
    "image/heic": "HEIF",
    "image/heif": "HEIF",
}
_COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (220, 200, 50),
    "orange": (220, 130, 40),
    "purple": (130, 60, 160),
    "brown": (120, 80, 50),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "pink": (230, 150, 170),
    "teal": (40, 150, 150),
}


@dataclass
class SimConfig:
    """What the simulator does; every field can be changed at run time."""

    latency_ms: float = 0.0
    api_key: str | None = None  # None: any non-empty key is accepted
    known_models: list[str] | None = None  # None: every model name exists
    max_in_flight: int | None = None  # above this many concurrent calls: 429
    # Gemini's per-minute quota, scaled down: at most window_quota calls are let through in
    # each window of window_s seconds; the rest get 429 with a RetryInfo delay to the
    # window's end. Calls answered 429 do not count against it.
    window_quota: int | None = None
    window_s: float = 1.0
    rate_429: float = 0.0  # share of calls answered 429 with RetryInfo
    rate_500: float = 0.0
    rate_hang: float = 0.0  # share of calls that hang for hang_ms
    rate_drop: float = 0.0  # share of calls whose connection is closed without an answer
    hang_ms: float = 120_000.0
    retry_delay_s: float = 1.0  # RetryInfo.retryDelay in 429 answers
    fail_first: int = 0  # every distinct image gets this many 429s first
    daily_quota_exhausted: bool = False
    block_colours: list[str] = field(default_factory=list)
    # Every distinct image's first this many structured answers misfit their
    # schema: invalid JSON first, then an over-long string and a missing key in turn.
    schema_misfits: int = 0
    # After this many answers, further calls are held (unanswered) until the
    # configuration changes: a way to stop a run at a known point and kill it.
    answer_limit: int | None = None
    # Answer with the bare model name as modelVersion, as Gemini does, instead of the
    # simulator's mark: how tests see what a real answer looks like to the function.
    impersonate: bool = False
    seed: int = 0
    # Batch jobs (localdev/gemini_batch_sim.py). A job is PENDING when created, RUNNING
    # batch_start_s later, and ends batch_delay_s after it was created (or when its
    # requests are answered, if later); batch_hold keeps jobs RUNNING until released.
    # The requests inside a job meet none of the online quotas, faults and latency above;
    # block_colours, schema_misfits and impersonate apply to them, and api_key and
    # known_models are checked when a job is created.
    batch_start_s: float = 0.0
    batch_delay_s: float = 0.2
    batch_hold: bool = False
    # Make each job, then hold the answer to its create until this is lifted: the job
    # exists and its creator does not know its name yet (a moment to kill the creator at).
    batch_hold_create_answers: bool = False
    # Hold every download of a job's answers file until this is lifted (a landing stopped
    # halfway, its claim taken).
    batch_hold_downloads: bool = False
    batch_outcome: str = "succeeded"  # what jobs end as: succeeded, failed or expired
    batch_error_rate: float = 0.0  # share of the requests in each job given a per-request error
    batch_error_code: int = 500  # that error: 500 INTERNAL, 429 RESOURCE_EXHAUSTED or 400
    # The Cloud Storage JSON API Vertex AI batch jobs read and write (the emulator, or the
    # relay in front of it so that written objects raise finalize events).
    storage_url: str | None = None

    def __post_init__(self) -> None:
        if self.batch_outcome not in BATCH_OUTCOMES:
            raise ValueError(f"batch_outcome must be one of {sorted(BATCH_OUTCOMES)}")
        if self.batch_error_code not in BATCH_ERROR_CODES:
            raise ValueError(f"batch_error_code must be one of {sorted(BATCH_ERROR_CODES)}")


@dataclass
class SimStats:
    calls: int = 0
    ok: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    held: int = 0  # calls waiting at answer_limit right now
    # The simulator's clock (seconds) at each 429 a quota answered, and at each /_sim/adjust:
    # how long a client took to follow a quota that changed.
    throttled_at: list[float] = field(default_factory=list)
    adjusted_at: list[float] = field(default_factory=list)
    dropped: int = 0  # connections closed without an answer (rate_drop)
    abandoned: int = 0  # calls whose caller was gone when the answer was due: never answered
    media_resolutions: list[str] = field(default_factory=list)  # per answered call
    structured: int = 0  # answered calls that asked for JSON with a schema
    schemas: list[Any] = field(default_factory=list)  # the schema of each of those calls
    misfits: int = 0  # structured answers made not to fit (schema_misfits)
    decodes: int = 0  # images decoded afresh: a recent image is remembered, not decoded again
    # One entry per image of each answered call: its size, colour, shape, fingerprint,
    # MIME type, bytes and digest (sha256 of the bytes received, 16 hex digits).
    images: list[dict[str, Any]] = field(default_factory=list)
    # Batch jobs. calls, ok, by_status and images above count online generateContent
    # only; decodes, structured, schemas, misfits and media_resolutions count both.
    batch_jobs_created: int = 0
    batch_displayed_names: list[str] = field(default_factory=list)  # at create, in order
    batch_states: dict[str, str] = field(default_factory=dict)  # job name -> JOB_STATE_*
    batch_requests: int = 0  # requests answered inside jobs, errors included
    batch_errors: int = 0  # of those, answered with a per-request error
    batch_cancelled: int = 0  # jobs cancelled while pending or running
    batch_held: int = 0  # jobs waiting at batch_hold right now
    batch_creates_held: int = 0  # create answers held at batch_hold_create_answers right now
    downloads_held: int = 0  # answers-file downloads held at batch_hold_downloads right now
    tokens_issued: int = 0  # OAuth access tokens handed out at /token
    batch_outputs: list[str] = field(default_factory=list)  # files/... and gs://... written
    batch_images: list[dict[str, Any]] = field(default_factory=list)  # as images, in jobs
    files_uploaded: int = 0  # Files API uploads finalised

    def count(self, status: int) -> None:
        self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1

    def answered_fingerprints(self) -> collections.Counter[str]:
        """How many answered calls each image fingerprint had (an image answered twice: 2)."""
        return collections.Counter(image["fingerprint"] for image in list(self.images))

    def answered_digests(self) -> collections.Counter[str]:
        """The same by the digest of the bytes received: exact where fingerprints may collide."""
        return collections.Counter(image["digest"] for image in list(self.images))


class _Abandoned(Exception):
    """The caller closed its connection before its answer was due."""


@dataclass
class _Prepared:
    """A request that passed the checks: what its images show, and its text."""

    images: list[dict[str, Any]]
    text: str


class GeminiSimulator:
    """The aiohttp application and its state."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.stats = SimStats()
        self._rng = random.Random(self.config.seed)
        self._failures: dict[str, int] = {}
        self._misfits: dict[str, int] = {}
        self._released = asyncio.Event()
        self._admitted = 0  # calls let past answer_limit since the last reset
        self._window_start = 0.0  # loop time the current quota window began
        self._window_calls = 0  # calls the window_quota let through in it
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        # Before generateContent's route, which would take ...:batchGenerateContent too.
        self.batches = BatchSimulator(self)
        self.batches.add_routes(self.app)
        self.app.router.add_post("/{version}/models/{call}", self._generate)
        self.app.router.add_post(
            "/{version}/projects/{project}/locations/{location}/publishers/google/models/{call}",
            self._generate,
        )
        self.app.router.add_get("/_sim/stats", self._get_stats)
        self.app.router.add_post("/_sim/config", self._set_config)
        self.app.router.add_post("/_sim/reset", self._reset)
        self.app.router.add_post("/_sim/release", self._release)
        self.app.router.add_post("/_sim/adjust", self._adjust)
        self.app.router.add_post("/_sim/batch/finish", self._finish_batches)
        # Google's OAuth token endpoint, for credentials whose token_uri points here (Vertex
        # AI's Application Default Credentials in tests: an authorized_user file).
        self.app.router.add_post("/token", self._token)

    def reset(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.stats = SimStats()
        self._rng = random.Random(self.config.seed)
        self._failures = {}
        self._misfits = {}
        self._admitted = 0
        self._window_start, self._window_calls = 0.0, 0
        # Wake the calls held at the old answer_limit; they re-check the new one.
        self._released.set()
        self._released = asyncio.Event()
        self.batches.reset()

    def hold(self) -> None:
        """Hold every call from now on (answer_limit at the calls admitted), keeping the stats."""
        self.config.answer_limit = self._admitted

    def adjust(self, **changes: Any) -> None:
        """Change some settings mid-run, keeping the stats and the rest (a quota that changes
        while calls go on, as another program starts or a tier changes)."""
        self.config = replace(self.config, **changes)
        self.stats.adjusted_at.append(asyncio.get_running_loop().time())
        self.batches.wake()

    def release(self) -> None:
        """Lift answer_limit and batch_hold and wake what they held, keeping the stats
        (unlike reset)."""
        self.config.answer_limit = None
        self._released.set()
        self._released = asyncio.Event()
        self.batches.finish()

    async def _generate(self, request: web.Request) -> web.Response:
        self.stats.calls += 1
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            response = await self._answer(request)
        except _Abandoned:
            # Nobody will read this; it is counted as abandoned, not by status.
            self.stats.abandoned += 1
            return web.Response(status=503)
        finally:
            self.stats.in_flight -= 1
        self.stats.count(response.status)
        if response.status == 429:
            self.stats.throttled_at.append(asyncio.get_running_loop().time())
        if response.status == 200:
            self.stats.ok += 1
        return response

    def _window_wait(self, quota: int, window_s: float) -> float | None:
        """Count a call against the window's quota; None if it fits, else the wait to the next."""
        now = asyncio.get_running_loop().time()
        if now >= self._window_start + window_s:
            # Windows follow on from the first: a quiet spell does not shift their edges.
            elapsed = (now - self._window_start) % window_s if self._window_start else 0.0
            self._window_start, self._window_calls = now - elapsed, 0
        if self._window_calls >= quota:
            return max(0.001, self._window_start + window_s - now)
        self._window_calls += 1
        return None

    def refuse(self, request: web.Request, *, vertex: bool) -> web.Response | None:
        """The answer to a caller without the credentials the API asks for, or None."""
        if vertex:
            if not request.headers.get("Authorization", "").startswith("Bearer "):
                return _error(401, "UNAUTHENTICATED", "Request is missing a bearer token.")
            return None
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            return _error(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers. Please use an API key.",
            )
        if self.config.api_key is not None and key != self.config.api_key:
            return _error(
                400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key."
            )
        return None

    async def _answer(self, request: web.Request) -> web.Response:
        cfg = self.config
        version = request.match_info["version"]
        model, _, method = request.match_info["call"].partition(":")
        if method != "generateContent":
            return _error(404, "NOT_FOUND", f"Method {method!r} is not simulated.")
        refusal = self.refuse(request, vertex="project" in request.match_info)
        if refusal is not None:
            return refusal
        if cfg.known_models is not None and model not in cfg.known_models:
            return _error(
                404,
                "NOT_FOUND",
                f"models/{model} is not found for API version {version}, or is not supported "
                "for generateContent.",
            )
        try:
            body = await request.json()
        except ValueError as exc:
            return _error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}")
        prepared = self._prepare(body)
        if isinstance(prepared, tuple):
            status, error = prepared
            return web.json_response(error, status=status)
        decoded = prepared.images
        if cfg.daily_quota_exhausted:
            return _quota_error(cfg.retry_delay_s, per_day=True)
        if cfg.max_in_flight is not None and self.stats.in_flight > cfg.max_in_flight:
            return _quota_error(cfg.retry_delay_s)
        if cfg.window_quota is not None:
            wait = self._window_wait(cfg.window_quota, cfg.window_s)
            if wait is not None:
                return _quota_error(wait)
        fingerprint = decoded[0]["fingerprint"] if decoded else "text"
        if cfg.fail_first and self._failures.get(fingerprint, 0) < cfg.fail_first:
            self._failures[fingerprint] = self._failures.get(fingerprint, 0) + 1
            return _quota_error(cfg.retry_delay_s)
        roll = self._rng.random()
        if roll < cfg.rate_429:
            return _quota_error(cfg.retry_delay_s)
        if roll < cfg.rate_429 + cfg.rate_500:
            return _error(500, "INTERNAL", "An internal error has occurred. Please retry.")
        if roll < cfg.rate_429 + cfg.rate_500 + cfg.rate_hang:
            await asyncio.sleep(cfg.hang_ms / 1000)
        elif roll < cfg.rate_429 + cfg.rate_500 + cfg.rate_hang + cfg.rate_drop:
            self.stats.dropped += 1
            if request.transport is not None:
                request.transport.close()  # the client sees the server disconnect
            return _error(503, "UNAVAILABLE", "The connection was dropped.")
        stats = self.stats
        while (limit := self.config.answer_limit) is not None and self._admitted >= limit:
            stats.held += 1
            try:
                await self._released.wait()
            finally:
                stats.held -= 1
        if _caller_gone(request):
            raise _Abandoned
        if stats is not self.stats:
            return _error(503, "UNAVAILABLE", "The simulator was reset during the call.")
        self._admitted += 1
        if cfg.latency_ms:
            await asyncio.sleep(cfg.latency_ms / 1000)
            if _caller_gone(request):
                if stats is self.stats:
                    self._admitted -= 1  # not an answer: it does not use up answer_limit
                raise _Abandoned
        return web.json_response(self._reply(model, body, prepared, batch=False))

    def answer(self, model: str, body: Any) -> tuple[int, dict[str, Any]]:
        """generateContent's answer to the request JSON ``body`` for ``model``: (status, body).

        How a request inside a batch job is answered: checked and answered as an online
        call would be, but without the online quotas, faults and latency, and recorded
        in ``batch_images`` instead of ``images``.
        """
        prepared = self._prepare(body)
        if isinstance(prepared, tuple):
            return prepared
        return 200, self._reply(model, body, prepared, batch=True)

    def _prepare(self, body: Any) -> _Prepared | tuple[int, dict[str, Any]]:
        """The request's images, checked and decoded, and its text; or the 400 it earns."""
        try:
            images, text = _parse_contents(body)
        except (ValueError, KeyError, TypeError) as exc:
            return 400, _error_body(
                400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}"
            )
        decoded = []
        for mime, data in images:
            if mime not in SUPPORTED:
                return 400, _error_body(400, "INVALID_ARGUMENT", f"Unsupported MIME type: {mime}")
            try:
                info, fresh = _decode(mime, data)
            except ValueError as exc:
                return 400, _error_body(
                    400, "INVALID_ARGUMENT", f"Provided image is not valid: {exc}"
                )
            decoded.append(info)
            self.stats.decodes += fresh
        return _Prepared(decoded, text)

    def _reply(
        self, model: str, body: dict[str, Any], prepared: _Prepared, *, batch: bool
    ) -> dict[str, Any]:
        """The 200 answer to a checked request, recorded in the stats."""
        cfg = self.config
        decoded, text = prepared.images, prepared.text
        if batch:
            self.stats.batch_images.extend(decoded)
        else:
            self.stats.images.extend(decoded)
        generation = body.get("generationConfig") or {}
        resolution = str(generation.get("mediaResolution") or "")
        self.stats.media_resolutions.append(resolution)
        schema = _requested_schema(generation)
        if schema is not None:
            self.stats.structured += 1
            self.stats.schemas.append(schema)
        prompt_tokens = _image_tokens(model, resolution) * len(decoded) + len(text.split())
        if any(d["colour"] in cfg.block_colours for d in decoded):
            return {
                "promptFeedback": {
                    "blockReason": "SAFETY",
                    "safetyRatings": [
                        {
                            "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                            "probability": "HIGH",
                            "blocked": True,
                        }
                    ],
                },
                "usageMetadata": {
                    "promptTokenCount": prompt_tokens,
                    "totalTokenCount": prompt_tokens,
                },
                "modelVersion": self._model_version(model),
            }
        if schema is not None:
            answer = self._structured(schema, decoded[0] if decoded else _text_info(text))
        else:
            answer = " / ".join(d["description"] for d in decoded) or f"Text: {text[:40]}"
        output_tokens = len(answer.split())
        response_id = (
            f"sim-batch-{self.stats.batch_requests}" if batch else f"sim-{self.stats.calls}"
        )
        return {
            "candidates": [
                {
                    "content": {"parts": [{"text": answer}], "role": "model"},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": output_tokens,
                "totalTokenCount": prompt_tokens + output_tokens,
            },
            "modelVersion": self._model_version(model),
            "responseId": response_id,
        }

    def _model_version(self, model: str) -> str:
        return model if self.config.impersonate else SIMULATOR_MODEL_VERSION_PREFIX + model

    def _structured(self, schema: Any, info: dict[str, Any]) -> str:
        """The JSON text answering for the image ``info``, made to misfit if configured."""
        schema = _camel_case(schema)
        answer = _fill(schema, info)
        fingerprint = info["fingerprint"]
        given = self._misfits.get(fingerprint, 0)
        if given >= self.config.schema_misfits:
            return json.dumps(answer)
        self._misfits[fingerprint] = given + 1
        self.stats.misfits += 1
        return _misfit(schema, answer, given)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") not in (
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:jwt-bearer",
        ):
            return web.json_response(
                {"error": "unsupported_grant_type", "error_description": "Bad grant type."},
                status=400,
            )
        self.stats.tokens_issued += 1
        return web.json_response(
            {
                "access_token": f"sim-token-{self.stats.tokens_issued}",
                "expires_in": 3600,
                "token_type": "Bearer",
            }
        )

    async def _get_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(asdict(self.stats))

    async def _set_config(self, request: web.Request) -> web.Response:
        changes = await request.json()
        names = {f.name for f in fields(SimConfig)}
        unknown = set(changes) - names
        if unknown:
            return _error(400, "INVALID_ARGUMENT", f"unknown settings {sorted(unknown)}")
        try:
            config = SimConfig(**{**asdict(self.config), **changes})
        except ValueError as exc:
            return _error(400, "INVALID_ARGUMENT", str(exc))
        self.reset(config)
        return web.json_response(asdict(self.config))

    async def _reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response(asdict(self.config))

    async def _release(self, _request: web.Request) -> web.Response:
        self.release()
        return web.json_response(asdict(self.config))

    async def _adjust(self, request: web.Request) -> web.Response:
        changes = await request.json()
        unknown = set(changes) - {f.name for f in fields(SimConfig)}
        if unknown:
            return _error(400, "INVALID_ARGUMENT", f"unknown settings {sorted(unknown)}")
        try:
            self.adjust(**changes)
        except ValueError as exc:
            return _error(400, "INVALID_ARGUMENT", str(exc))
        return web.json_response(asdict(self.config))

    async def _finish_batches(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        names = body.get("names") if isinstance(body, dict) else None
        self.batches.finish(*(names or []))
        return web.json_response(asdict(self.config))


def _caller_gone(request: web.Request) -> bool:
    """Whether the caller has closed its connection (aiohttp does not cancel the handler)."""
    return request.transport is None or request.transport.is_closing()


def describe_image(data: bytes) -> str:
    """The simulator's description of an image: its colour, shape and a fingerprint."""
    return _decode_pil(*_open_small(data))["description"]


def structured_answer(data: bytes, schema: Any) -> Any:
    """The simulator's structured answer for an image: ``schema`` filled from its description."""
    return _fill(_camel_case(schema), _decode_pil(*_open_small(data)))


def _fill(schema: Any, info: dict[str, Any], index: int | None = None) -> Any:
    """A value fitting ``schema`` (JSON Schema or Gemini's OpenAPI form), drawn from ``info``.

    Strings are the image's description (empty where the schema allows it), or
    one of its facts (colour, shape, fingerprint) as the ``index``-th item of an
    array, cut to ``maxLength`` and padded to ``minLength``; numbers and
    booleans come from the fingerprint; every property is filled, required or not.
    """
    if not isinstance(schema, dict):
        return info["description"]
    for union in ("anyOf", "oneOf"):
        if isinstance(schema.get(union), list) and schema[union]:
            return _fill(schema[union][0], info, index)
    seed = int(info["fingerprint"], 16)
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][seed % len(schema["enum"])]
    kind = _schema_type(schema)
    if kind == "object":
        properties = schema.get("properties") or {}
        value = {name: _fill(sub, info) for name, sub in properties.items()}
        for name in schema.get("required") or []:
            value.setdefault(name, info["description"])
        return value
    if kind == "array":
        count = max(int(schema.get("minItems", 0)), min(int(schema.get("maxItems", 3)), 3))
        return [_fill(schema.get("items"), info, i) for i in range(count)]
    if kind in ("integer", "number"):
        low, high = schema.get("minimum", 0), schema.get("maximum", 100)
        number = min(max(seed % 100, int(low)), int(high))
        return number if kind == "integer" else float(number)
    if kind == "boolean":
        return bool(seed & 1)
    if kind == "null":
        return None
    if index is None and not int(schema.get("minLength", 0)):
        # A string the schema lets be empty (text_in_image, say) stays empty: the
        # simulator reads no text in images, and must not seem to.
        return ""
    facts = (info["colour"], info["shape"], info["fingerprint"])
    text = info["description"] if index is None else facts[index % len(facts)]
    if "maxLength" in schema:
        text = text[: int(schema["maxLength"])].rstrip()
    return text.ljust(int(schema.get("minLength", 0)), "#")


def _camel_case(schema: Any) -> Any:
    """``schema`` with camelCase keywords throughout.

    The API reads proto JSON, which takes ``max_length`` as well as ``maxLength``,
    and google-genai sends ``responseSchema`` in snake_case. Property names are
    the caller's own and stay as they are.
    """
    if isinstance(schema, list):
        return [_camel_case(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result: dict[str, Any] = {}
    for key, value in schema.items():
        head, *rest = key.split("_")
        name = head + "".join(part.title() for part in rest)
        if name == "properties" and isinstance(value, dict):
            result[name] = {prop: _camel_case(sub) for prop, sub in value.items()}
        elif name in ("enum", "required", "propertyOrdering", "example", "default"):
            result[name] = value
        else:
            result[name] = _camel_case(value)
    return result


def _schema_type(schema: dict[str, Any]) -> str:
    """The lower-case type a schema describes (Gemini's OpenAPI form says ``STRING``)."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if str(k).lower() != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    return str(kind).lower()


def _requested_schema(generation: dict[str, Any]) -> Any:
    """The schema a generationConfig asks the answer to fit, or None for free text."""
    if generation.get("responseMimeType") != "application/json":
        return None
    return generation.get("responseJsonSchema") or generation.get("responseSchema")


def _misfit(schema: Any, answer: Any, given: int) -> str:
    """``answer`` spoilt: invalid JSON first, then an over-long string, a missing key, ..."""
    text = json.dumps(answer)
    if given == 0 or not isinstance(answer, dict) or not answer:
        return text[: len(text) // 2]  # cut off mid-way, as at an output token limit
    properties = schema.get("properties") or {}
    limited = [
        name
        for name, sub in properties.items()
        if isinstance(sub, dict) and "maxLength" in sub and isinstance(answer.get(name), str)
    ]
    if given % 2 == 1 and limited:
        longest = int(properties[limited[0]]["maxLength"])
        while len(answer[limited[0]]) <= longest:
            answer[limited[0]] += " and more"  # just over the limit, as a model overshoots
        return json.dumps(answer)
    del answer[next(iter(schema.get("required") or answer))]
    return json.dumps(answer)


def _text_info(text: str) -> dict[str, Any]:
    """What a structured answer for a request without an image is drawn from."""
    fingerprint = f"{sum(text.encode()) & 0xFFFF_FFFF_FFFF_FFFF:016x}"
    return {
        "colour": "none",
        "shape": "text",
        "fingerprint": fingerprint,
        "description": f"Text: {text[:40]}",
    }


# What the last few distinct images decoded to, by MIME type and digest. The answer is
# a function of the bytes alone, so a repeated image need not be decoded again: the
# benchmark cycles over ten photos, and Gemini's decoding happens on Google's machines,
# not on the CPUs the function under test shares with the simulator here.
_DECODED_CAPACITY = 64
_decoded: collections.OrderedDict[tuple[str, str], dict[str, Any]] = collections.OrderedDict()


def _decode(mime: str, data: bytes) -> tuple[dict[str, Any], bool]:
    """What the image shows, and whether it was decoded afresh (not remembered)."""
    digest = hashlib.sha256(data).hexdigest()
    key = (mime, digest)
    known = _decoded.get(key)
    if known is not None:
        _decoded.move_to_end(key)
        return dict(known), False
    info = _decode_fresh(mime, data)
    info.update(mime_type=mime, bytes=len(data), digest=digest[:16])
    _decoded[key] = dict(info)
    if len(_decoded) > _DECODED_CAPACITY:
        _decoded.popitem(last=False)
    return info, True


def _decode_fresh(mime: str, data: bytes) -> dict[str, Any]:
    if SUPPORTED[mime] == "HEIF":
        # Pillow reads HEIF through pillow-heif (libheif applies irot/imir), then it is
        # decoded and described below like any other picture.
        from pillow_heif import register_heif_opener

        register_heif_opener()
    try:
        image, size = _open_small(data)
        image.load()
    except Exception as exc:  # noqa: BLE001 - any decode failure is the caller's fault
        raise ValueError(f"cannot decode as {mime}: {exc}") from None
    if image.format != SUPPORTED[mime]:
        raise ValueError(f"the data is {image.format}, not {mime}")
    return _decode_pil(image, size)


def _open_small(data: bytes) -> tuple[Image.Image, tuple[int, int]]:
    """Open an image, decoding a JPEG at reduced scale: only an 8x8 summary is needed.

    Full decodes of 12 MP photos would make the simulator, not the code under
    test, the bottleneck of a benchmark on a small machine.
    """
    image = Image.open(io.BytesIO(data))
    size = image.size  # the image's own size, before draft shrinks what is decoded
    image.draft("RGB", (64, 64))
    return image, size


def _decode_pil(image: Image.Image, size: tuple[int, int]) -> dict[str, Any]:
    width, height = size
    rgb = image.convert("RGB")
    small = rgb.resize((8, 8), Image.Resampling.BOX)
    raw = small.tobytes()
    pixels = [tuple(raw[i : i + 3]) for i in range(0, len(raw), 3)]
    mean = tuple(sum(p[i] for p in pixels) / len(pixels) for i in range(3))
    colour = min(
        _COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(_COLOURS[c], mean, strict=True))
    )
    grey = [sum(p) / 3 for p in pixels]
    average = sum(grey) / len(grey)
    fingerprint = f"{sum(1 << i for i, g in enumerate(grey) if g > average):016x}"
    shape = (
        "square"
        if abs(width - height) <= min(width, height) * 0.05
        else ("wide" if width > height else "tall")
    )
    return {
        "width": width,
        "height": height,
        "colour": colour,
        "fingerprint": fingerprint,
        "shape": shape,
        "description": f"Mostly {colour}, {shape} picture #{fingerprint}",
    }


# Gemini 3 bills an image by media resolution; earlier models ~258 tokens a tile.
_GEMINI3_IMAGE_TOKENS = {
    "MEDIA_RESOLUTION_LOW": 280,
    "MEDIA_RESOLUTION_MEDIUM": 560,
    "MEDIA_RESOLUTION_HIGH": 1120,
}


def _image_tokens(model: str, resolution: str) -> int:
    if model.startswith("gemini-3"):
        return _GEMINI3_IMAGE_TOKENS.get(resolution, 1120)
    return 258


def _parse_contents(body: Any) -> tuple[list[tuple[str, bytes]], str]:
    images: list[tuple[str, bytes]] = []
    texts: list[str] = []
    for content in body["contents"]:
        for part in content["parts"]:
            if "inlineData" in part or "inline_data" in part:
                inline = part.get("inlineData") or part.get("inline_data")
                mime = inline.get("mimeType") or inline.get("mime_type")
                raw = inline["data"]
                try:
                    # The SDK may send the URL-safe alphabet; the API accepts both.
                    data = base64.b64decode(raw.replace("-", "+").replace("_", "/"), validate=True)
                except binascii.Error as exc:
                    raise ValueError(f"inline data is not base64: {exc}") from None
                images.append((mime, data))
            elif "text" in part:
                texts.append(part["text"])
    return images, " ".join(texts)


def _error(code: int, status: str, message: str, details: list[Any] | None = None) -> web.Response:
    return web.json_response(_error_body(code, status, message, details), status=code)


def _error_body(
    code: int, status: str, message: str, details: list[Any] | None = None
) -> dict[str, Any]:
    """Google's JSON error envelope."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def _quota_error(retry_delay_s: float, *, per_day: bool = False) -> web.Response:
    quota_id = (
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
        if per_day
        else "GenerateRequestsPerMinutePerProjectPerModel"
    )
    details: list[Any] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                    "quotaId": quota_id,
                    "quotaDimensions": {"location": "global"},
                }
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        },
    ]
    if not per_day:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": f"{retry_delay_s:g}s",
            }
        )
    return _error(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
        details,
    )


class RunningSimulator:
    """A simulator serving on loopback from a background thread (for tests)."""

    def __init__(self, served: Served[GeminiSimulator]) -> None:
        self._served = served
        self.simulator = served.app
        self.url = served.url

    def configure(self, **changes: Any) -> None:
        """Replace the configuration (defaults for what is not given) and clear the stats."""
        self._call(lambda: self.simulator.reset(SimConfig(**changes)))

    def hold(self) -> None:
        """Hold every further call until release(), keeping the stats."""
        self._call(self.simulator.hold)

    def release(self) -> None:
        """Lift answer_limit and batch_hold and let what they held go on, keeping the stats."""
        self._call(self.simulator.release)

    def release_batches(self, *names: str) -> None:
        """Let held batch jobs finish: those named (batches/... or projects/.../
        batchPredictionJobs/...), or, with none named, every job (batch_hold is lifted)."""
        self._call(lambda: self.simulator.batches.finish(*names))

    def adjust(self, **changes: Any) -> None:
        """Change some settings, keeping the rest and the stats (unlike configure)."""
        self._call(lambda: self.simulator.adjust(**changes))

    @property
    def stats(self) -> SimStats:
        return self.simulator.stats

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the simulator's loop, where its state lives."""

        async def call() -> None:
            fn()

        self._served.run(call(), 5)

    def stop(self) -> None:
        # Release held calls first, or shutting down would wait for them.
        self._call(self.simulator.reset)
        self._served.stop()


def start_in_thread(config: SimConfig | None = None, host: str = "127.0.0.1") -> RunningSimulator:
    simulator = GeminiSimulator(config)

    def build() -> tuple[GeminiSimulator, web.AppRunner]:
        # Calls hanging on purpose (rate_hang) must not hold up shutdown.
        return simulator, web.AppRunner(simulator.app, access_log=None, shutdown_timeout=1.0)

    return RunningSimulator(serve_in_thread(build, name="gemini-sim", host=host))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--config", default="{}", help="JSON object of SimConfig fields")
    args = parser.parse_args()
    simulator = GeminiSimulator(SimConfig(**json.loads(args.config)))

    async def serve() -> None:
        runner = web.AppRunner(simulator.app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        print(
            f"Gemini simulator listening on http://{args.host}:{runner.addresses[0][1]}", flush=True
        )
        while True:
            await asyncio.sleep(3600)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
