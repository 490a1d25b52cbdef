"""Describing one prepared image with Gemini, riding out rate limits and server errors.

The google-genai client keeps one aiohttp session per event loop and never
closes sessions of loops that are gone. Each invocation runs its own loop, so
the invocation hands the client an aiohttp session it owns and closes itself:
nothing outlives the invocation. The expensive parts (TLS context, Vertex AI
credentials) are built once per process in :class:`GeminiConnector`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re
import ssl
import threading
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from .errors import Code, SourceError
from .images import PreparedImage
from .quota import CallGate, CallOutcome
from .records import Usage
from .schemas import SCHEMAS, Schema, SchemaMismatch, validate
from .settings import GeminiAccess

# 408 and 5xx are transient on Google's side; 429 is a rate limit unless the
# quota that ran out is a per-day one, which no retry within a call can outlast.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# The project's Gemini simulator (localdev/gemini_sim.py) answers with this prefix on
# modelVersion, so records and galleries can say that no real model wrote them.
SIMULATOR_MODEL_VERSION_PREFIX = "describer-simulator/"
_BLOCK_FINISH = frozenset(
    {"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY", "RECITATION"}
)
BACKOFF_CAP_S = 30.0
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)s\s*$")
log = logging.getLogger(__name__)
_MEDIA_RESOLUTION = {
    "low": types.MediaResolution.MEDIA_RESOLUTION_LOW,
    "medium": types.MediaResolution.MEDIA_RESOLUTION_MEDIUM,
    "high": types.MediaResolution.MEDIA_RESOLUTION_HIGH,
}


@dataclass(frozen=True)
class Described:
    """The model's answer for one image, and what it took to get it."""

    text: str
    usage: Usage | None
    attempts: int
    model: str
    data: dict[str, Any] | None = None  # the validated answer, when a schema was asked for
    simulated: bool = False  # answered by the project's simulator, not by Gemini


@dataclass
class Spent:
    """The calls made for one image so far, and the usage of answers already received.

    Kept up to date while the calls go on, so that a record cut short by the deadline
    or Ctrl-C still counts the calls Gemini may bill.
    """

    attempts: int = 0
    usage: Usage | None = None


class GeminiConnector:
    """Process-wide: what every invocation's client shares (TLS context, credentials)."""

    def __init__(self, access: GeminiAccess, *, credentials: Any = None) -> None:
        self._access = access
        self._ssl = ssl.create_default_context()
        # Vertex AI's credentials: found once with google.auth.default unless given (tests).
        self._credentials: Any = credentials
        self._lock = threading.Lock()

    @property
    def vertex(self) -> bool:
        return self._access.use_vertexai

    @property
    def ssl_context(self) -> ssl.SSLContext:
        return self._ssl

    def open_session(self) -> aiohttp.ClientSession:
        """The aiohttp session one invocation's Gemini calls run on; the caller closes it."""
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=self._ssl))

    def client(self, session: aiohttp.ClientSession, *, timeout_s: float) -> genai.Client:
        """A client bound to ``session``: cheap, because the TLS context is reused."""
        access = self._access
        options = types.HttpOptions(
            # GOOGLE_GEMINI_BASE_URL is the Developer API's override, GOOGLE_VERTEX_BASE_URL
            # Vertex AI's.
            base_url=access.vertex_base_url if access.use_vertexai else access.base_url,
            timeout=int(timeout_s * 1000),
            aiohttp_client=session,
            # One attempt per call: without retry options the SDK silently resends
            # on connection errors after 1-10 s, which our own retries cannot see,
            # count or bound.
            retry_options=types.HttpRetryOptions(attempts=1),
            client_args={"verify": self._ssl},
            async_client_args={"verify": self._ssl, "ssl": self._ssl},
        )
        if access.use_vertexai:
            return genai.Client(
                vertexai=True,
                project=access.project,
                location=access.location,
                credentials=self._vertex_credentials(),
                http_options=options,
            )
        # The SDK refuses to build a client without a key; the simulator accepts any.
        return genai.Client(api_key=access.api_key or "unset", http_options=options)

    def _vertex_credentials(self) -> Any:
        with self._lock:
            if self._credentials is None:
                import google.auth

                self._credentials, _ = google.auth.default(
                    scopes=["https://www.googleapis.com/auth/cloud-platform"]
                )
            return self._credentials


class ModelSwitch:
    """Process-wide: which model to call, GEMINI_MODEL or, once that is not found,
    GEMINI_FALLBACK_MODEL, for every invocation from then on."""

    def __init__(self, model: str, fallback: str | None) -> None:
        self.configured = model
        self.fallback = fallback if fallback != model else None
        self._current = model
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        return self._current

    def after_missing(self, missing: str) -> bool:
        """Whether to call again after ``missing`` was not found (switching if need be).

        Calls that failed on the old model at the same time just follow the switch.
        """
        with self._lock:
            if missing != self._current:
                return True  # another call already switched
            if self.fallback is None or missing == self.fallback:
                return False
            self._current = self.fallback
        log.warning(
            "model not found; switching to GEMINI_FALLBACK_MODEL",
            extra={"model": missing, "fallback": self.fallback},
        )
        return True


class Describer:
    """Calls the model for one image at a time, with bounded, jittered retries.

    One per invocation; the limit on calls in flight (``gate``) and the model
    switch are the process's, shared by every invocation.
    """

    def __init__(
        self,
        client: genai.Client,
        *,
        gate: CallGate,
        switch: ModelSwitch,
        max_attempts: int,
        backoff_s: float,
        media_resolution: str = "default",
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._gate = gate
        self._switch = switch
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._rng = rng or random.Random()
        self._media_resolution = _MEDIA_RESOLUTION.get(media_resolution)
        self.throttled = 0  # rate-limit 429s this invocation's calls met (and rode out)

    @property
    def gate(self) -> CallGate:
        return self._gate

    def calls(self) -> dict[str, int]:
        state = self._gate.state
        return {"limit": state.limit, "ceiling": state.ceiling, "throttled": self.throttled}

    async def answer(
        self,
        position: int,
        image: PreparedImage,
        prompt: str,
        *,
        schema: str | None,
        spent: Spent,
    ) -> Described:
        """The pipeline's model stage (:class:`describer.pipeline.ModelBackend`): ask now."""
        return await self.describe(image, prompt, schema=schema, spent=spent)

    def _config(self, model: str, shape: Schema | None) -> types.GenerateContentConfig | None:
        """The call's options: media resolution and, for a structured answer, its schema.

        Media resolution is sent to Gemini 3 models only, which bill image tokens by it.
        """
        resolution = (
            self._media_resolution if model.removeprefix("models/").startswith("gemini-3") else None
        )
        if resolution is None and shape is None:
            return None
        return types.GenerateContentConfig(
            media_resolution=resolution,
            response_mime_type="application/json" if shape is not None else None,
            response_json_schema=dict(shape.json_schema) if shape is not None else None,
        )

    async def describe(
        self,
        image: PreparedImage,
        prompt: str,
        *,
        schema: str | None = None,
        spent: Spent | None = None,
    ) -> Described:
        """Describe ``image`` as ``prompt`` asks, in free text or as schema ``schema``.

        ``schema`` is a name in :data:`describer.schemas.SCHEMAS` (KeyError if not);
        the answer is then validated, ``text`` is its description and ``data`` the
        whole validated object. An answer that does not fit is asked for once more:
        that second call counts in ``attempts``, and ``usage`` is the sum of both
        calls. Two misfits end in a ``model_error`` that is not transient.

        ``spent``, when given, is kept up to date as the calls go: the calls made and
        the usage of the answers received. It is how a caller learns what a failure,
        or a deadline that cancels this coroutine, still cost.
        """
        spent = spent if spent is not None else Spent()
        picture = types.Part.from_bytes(data=image.data, mime_type=image.mime_type)
        if schema is None:
            return await self._generate([picture, prompt], None, spent=spent)
        shape = SCHEMAS[schema]
        contents: list[types.PartUnion] = [picture, f"{prompt}\n\n{shape.instruction}"]
        first = await self._generate(contents, shape, spent=spent)
        try:
            return _structured(first, shape)
        except SchemaMismatch as exc:
            log.warning(
                "the answer did not fit the schema; asking once more",
                extra={"schema": shape.name, "reason": str(exc), "attempts": first.attempts},
            )
        spent.usage = first.usage  # billed, whatever becomes of the second call
        second = await self._generate(contents, shape, attempts_before=first.attempts, spent=spent)
        second = replace(second, usage=_sum_usage(first.usage, second.usage))
        spent.usage = second.usage
        try:
            return _structured(second, shape)
        except SchemaMismatch as exc:
            raise SourceError(
                Code.MODEL_ERROR,
                f"Gemini's answer did not fit the {shape.name} schema twice: {exc}",
                attempts=second.attempts,
            ) from None

    async def _generate(
        self,
        contents: list[types.PartUnion],
        shape: Schema | None,
        *,
        spent: Spent,
        attempts_before: int = 0,
    ) -> Described:
        """One answer, retrying 408, 429, 5xx, timeouts and lost connections.

        ``attempts_before`` are the calls already made for this image: attempts
        are numbered on from them, and this call gets a budget of its own.
        """
        attempt, budget = attempts_before, attempts_before + self._max_attempts
        while True:
            attempt += 1
            final = attempt >= budget
            spent.attempts = attempt
            try:
                response, model = await self._call(contents, shape)
            except _ModelCallError as failed:
                if failed.error.code == 404 and self._switch.after_missing(failed.model):
                    budget += 1  # a call to a model that does not exist is not a retry
                    continue
                delay = self._classify(failed.error, failed.model, attempt, final)
            except TimeoutError:
                if final:
                    raise SourceError(
                        Code.TIMEOUT,
                        f"The model did not answer in time ({attempt} attempts).",
                        attempts=attempt,
                        transient=True,
                    ) from None
                delay = self._backoff(attempt)
            except aiohttp.ClientError as exc:
                if final:
                    raise SourceError(
                        Code.MODEL_ERROR,
                        f"The model could not be reached after {attempt} attempts: "
                        f"{_connection_problem(exc)}.",
                        attempts=attempt,
                        transient=True,
                    ) from None
                delay = self._backoff(attempt)
            else:
                return _answer(response, attempt, model)
            await asyncio.sleep(delay)

    async def _call(
        self, contents: list[types.PartUnion], shape: Schema | None
    ) -> tuple[types.GenerateContentResponse, str]:
        """One call, inside the process's limit, telling the limit how it went; the answer
        and the model that gave it (chosen once the limit let the call in: a switch to the
        fallback while it waited is followed)."""
        async with self._gate.slot() as slot:
            model = self._switch.current
            try:
                response = await self._client.aio.models.generate_content(
                    model=model, contents=contents, config=self._config(model, shape)
                )
            except genai_errors.APIError as exc:
                if exc.code == 429 and not _is_daily_quota(exc.details):
                    self.throttled += 1
                    slot.settle(CallOutcome.THROTTLED, retry_after_s=_retry_delay(exc.details))
                raise _ModelCallError(exc, model) from exc
            slot.settle(CallOutcome.OK)
            return response, model

    def _classify(self, exc: genai_errors.APIError, model: str, attempt: int, final: bool) -> float:
        """Return how long to wait before retrying, or raise the final SourceError.

        ``model`` is the one the failed call went to (another call may have switched since).
        """
        code = exc.code
        if code == 429 and _is_daily_quota(exc.details):
            raise SourceError(
                Code.QUOTA_EXHAUSTED,
                f"The daily Gemini quota for {model} is used up: {exc.message}",
                attempts=attempt,
            ) from None
        if code == 404:
            missing = f"Model {self._switch.configured!r} (GEMINI_MODEL) was not found"
            if model != self._switch.configured:
                missing += f", nor {model!r} (GEMINI_FALLBACK_MODEL)"
            raise SourceError(
                Code.MODEL_ERROR, f"{missing}: {exc.message}", attempts=attempt
            ) from None
        if code not in _RETRY_STATUSES:
            raise SourceError(
                Code.MODEL_ERROR,
                f"Gemini answered {code} {exc.status}: {exc.message}",
                attempts=attempt,
            ) from None
        if final:
            raise SourceError(
                Code.QUOTA_EXHAUSTED if code == 429 else Code.MODEL_ERROR,
                f"Gemini answered {code} {exc.status} on all {attempt} attempts: {exc.message}",
                attempts=attempt,
                transient=True,
            ) from None
        hinted = _retry_delay(exc.details)
        if hinted is not None:
            # The server knows when capacity returns; a little jitter keeps the
            # workers that were told the same delay from returning in lockstep.
            return hinted + self._rng.uniform(0, self._backoff_s)
        return self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        return self._rng.uniform(0, min(BACKOFF_CAP_S, self._backoff_s * 2 ** (attempt - 1)))


class _ModelCallError(Exception):
    """An API error, and the model the call that met it went to."""

    def __init__(self, error: genai_errors.APIError, model: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.model = model


def request_json(
    image: PreparedImage,
    prompt: str,
    *,
    schema: str | None,
    model: str,
    media_resolution: str,
) -> dict[str, Any]:
    """The GenerateContentRequest an online call for ``image`` sends, as REST JSON: what a
    Batch API job is given for it, so a batch answer is asked exactly as an online one."""
    shape = SCHEMAS[schema] if schema else None
    text = f"{prompt}\n\n{shape.instruction}" if shape else prompt
    data = base64.b64encode(image.data).decode("ascii")
    request: dict[str, Any] = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"inlineData": {"mimeType": image.mime_type, "data": data}},
                    {"text": text},
                ],
            }
        ]
    }
    generation: dict[str, Any] = {}
    resolution = _MEDIA_RESOLUTION.get(media_resolution)
    if resolution is not None and model.removeprefix("models/").startswith("gemini-3"):
        generation["mediaResolution"] = resolution.value
    if shape is not None:
        generation["responseMimeType"] = "application/json"
        generation["responseJsonSchema"] = dict(shape.json_schema)
    if generation:
        request["generationConfig"] = generation
    return request


def parse_answer(body: Any, *, model: str, schema: str | None) -> Described:
    """A GenerateContentResponse as REST JSON (a Batch API job's answer), judged as an online
    answer is: a refusal or an empty answer raises SourceError, and a structured answer that
    does not fit its schema raises SchemaMismatch."""
    response = types.GenerateContentResponse.model_validate(body)
    answer = _answer(response, 1, model)
    return _structured(answer, SCHEMAS[schema]) if schema else answer


def _answer(response: types.GenerateContentResponse, attempts: int, model: str) -> Described:
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        reason = str(getattr(feedback.block_reason, "value", feedback.block_reason))
        detail = f" ({feedback.block_reason_message})" if feedback.block_reason_message else ""
        raise SourceError(
            Code.BLOCKED, f"Gemini refused the image: {reason}{detail}.", attempts=attempts
        )
    candidates = response.candidates or []
    finish = candidates[0].finish_reason if candidates else None
    finish_name = str(getattr(finish, "value", finish)) if finish is not None else None
    if finish_name in _BLOCK_FINISH:
        raise SourceError(
            Code.BLOCKED, f"Gemini stopped its answer: {finish_name}.", attempts=attempts
        )
    text = (response.text or "").strip()
    if not text:
        raise SourceError(
            Code.MODEL_ERROR,
            f"Gemini gave an empty answer (finish reason {finish_name or 'none'}).",
            attempts=attempts,
        )
    meta = response.usage_metadata
    usage = (
        Usage(
            prompt_tokens=meta.prompt_token_count or 0,
            output_tokens=meta.candidates_token_count or 0,
        )
        if meta is not None
        else None
    )
    simulated = (response.model_version or "").startswith(SIMULATOR_MODEL_VERSION_PREFIX)
    return Described(text=text, usage=usage, attempts=attempts, model=model, simulated=simulated)


def _structured(answer: Described, shape: Schema) -> Described:
    """``answer`` with its text parsed and checked; raises SchemaMismatch if it does not fit."""
    data = validate(shape.name, answer.text)
    return replace(answer, text=data[shape.text_key], data=data)


def _sum_usage(first: Usage | None, second: Usage | None) -> Usage | None:
    """The tokens billed for both calls (either alone when the other reported none)."""
    if first is None or second is None:
        return second or first
    return Usage(
        prompt_tokens=first.prompt_tokens + second.prompt_tokens,
        output_tokens=first.output_tokens + second.output_tokens,
    )


def _connection_problem(exc: aiohttp.ClientError) -> str:
    """A stable sentence for a connection failure (no object reprs or addresses in it)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return f"could not connect to {exc.host}:{exc.port} ({reason.lower()})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    return f"{type(exc).__name__}"


def _details(body: Any) -> list[dict[str, Any]]:
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _retry_delay(body: Any) -> float | None:
    """The server's ``RetryInfo.retryDelay`` in seconds (the SDK ignores it)."""
    for detail in _details(body):
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION_RE.match(str(detail.get("retryDelay", "")))
            if match:
                return min(float(match.group(1)), BACKOFF_CAP_S * 2)
    return None


def _is_daily_quota(body: Any) -> bool:
    for detail in _details(body):
        if str(detail.get("@type", "")).endswith("google.rpc.QuotaFailure"):
            for violation in detail.get("violations") or []:
                if isinstance(violation, dict) and "PerDay" in str(violation.get("quotaId", "")):
                    return True
    return False
