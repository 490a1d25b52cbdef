"""The result record: one per source, the same in responses, JSONL and sidecars."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import Code, SourceError
from .settings import Prices

OK = "ok"
ERROR = "error"
# Prepared and queued in a Batch API job: a submission's record, never a result's.
QUEUED = "queued"
JSON_TYPE = "application/json"
JSONL_TYPE = "application/x-ndjson"


@dataclass(frozen=True)
class Usage:
    """Tokens the model billed for one image."""

    prompt_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class Record:
    """What happened to one source. ``error`` is set exactly when status is error."""

    source: str
    status: str
    model: str
    prompt: str
    description: str | None = None
    # The validated structured answer when a schema was asked for.
    data: dict[str, Any] | None = None
    schema: str | None = None
    mime_type: str | None = None
    width: int | None = None
    height: int | None = None
    usage: Usage | None = None
    # What the usage costs at the prices of the way it was asked (online, or a batch job).
    cost_usd: float | None = None
    attempts: int = 0
    latency_ms: int = 0
    error_code: Code | None = None
    error_message: str | None = None
    generation: str | None = None
    # The Batch API job that answered it (``batches/...`` or a Vertex AI job's name).
    batch_job: str | None = None
    # The answer came from the project's Gemini simulator, not from Gemini.
    simulated: bool = False
    # Not serialised: whether a later retry could turn this error into a description.
    transient: bool = False
    # Not serialised: the gallery's thumbnail, when one was made.
    thumbnail: bytes | None = field(default=None, repr=False)

    @classmethod
    def failed(
        cls, source: str, error: SourceError, *, model: str, prompt: str, **known: Any
    ) -> Record:
        """An error record carrying whatever was learnt before the failure."""
        known.setdefault("attempts", error.attempts)
        return cls(
            source=source,
            status=ERROR,
            model=model,
            prompt=prompt,
            error_code=error.code,
            error_message=error.message,
            transient=error.transient,
            **known,
        )

    def with_generation(self, generation: str) -> Record:
        return replace(self, generation=generation)

    def priced(self, prices: Prices) -> Record:
        """The record with ``cost_usd`` reckoned from its usage at ``prices``."""
        if self.usage is None:
            return self
        cost = prices.cost(self.usage.prompt_tokens, self.usage.output_tokens)
        return replace(self, cost_usd=round(cost, 8))

    def to_json(self) -> dict[str, Any]:
        """The documented JSON shape: optional facts appear only when known."""
        out: dict[str, Any] = {"source": self.source, "status": self.status}
        if self.description is not None:
            out["description"] = self.description
        if self.data is not None:
            out["data"] = self.data
        out["model"] = self.model
        if self.simulated:
            out["simulated"] = True
        out["prompt"] = self.prompt
        if self.schema is not None:
            out["schema"] = self.schema
        if self.mime_type is not None:
            out["mime_type"] = self.mime_type
        if self.width is not None and self.height is not None:
            out["width"] = self.width
            out["height"] = self.height
        if self.usage is not None:
            out["usage"] = {
                "prompt_tokens": self.usage.prompt_tokens,
                "output_tokens": self.usage.output_tokens,
            }
        if self.cost_usd is not None:
            out["cost_usd"] = self.cost_usd
        out["attempts"] = self.attempts
        out["latency_ms"] = self.latency_ms
        if self.generation is not None:
            out["generation"] = self.generation
        if self.batch_job is not None:
            out["batch_job"] = self.batch_job
        out["error"] = (
            None
            if self.error_code is None
            else {"code": str(self.error_code), "message": self.error_message}
        )
        return out


def counts(records: Iterable[Record]) -> dict[str, int]:
    """How many records ended ok and how many in error."""
    tally = {OK: 0, ERROR: 0}
    for record in records:
        tally[record.status] += 1
    return tally


def total_cost(records: Iterable[dict[str, Any]]) -> float:
    """USD a batch's answers cost, summed over its records' ``cost_usd``."""
    return round(sum(float(r.get("cost_usd") or 0) for r in records), 6)


def total_usage(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Tokens billed for a whole batch, summed over its records' ``usage``."""
    total = {"prompt_tokens": 0, "output_tokens": 0}
    for record in records:
        usage = record.get("usage") or {}
        for key in total:
            total[key] += int(usage.get(key) or 0)
    return total


def dumps_jsonl(objects: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in objects)


def dumps_json(obj: Any) -> bytes:
    """A single JSON document (a sidecar, a report), indented for people who open it."""
    return json.dumps(obj, indent=1).encode()
