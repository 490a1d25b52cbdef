"""A sharded batch's status object, ``BATCHES_PREFIX<batch>.status.json``, shared by its shards.

Every shard that finishes records its tally in the same object. Writers race,
so each update is a read-modify-write under a generation precondition,
retried with jitter when another shard wrote in between. Each shard's entry is
keyed by its index, so recording the same shard twice (a redelivery) changes
nothing, and the totals are recomputed from the entries every time.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .errors import TransientFailure
from .records import JSON_TYPE, dumps_json
from .store import Store

log = logging.getLogger(__name__)

# Ten shards finishing in the same second need a few rounds; each round re-reads.
UPDATE_ATTEMPTS = 12
_BACKOFF_S = 0.05


def new_status(
    *,
    batch: str,
    kind: str,
    source: str,
    run: str,
    total: int,
    shards: int,
    model: str,
    prompt: str,
    schema: str | None,
    **extra: Any,
) -> dict[str, Any]:
    now = now_iso()
    return {
        "batch": batch,
        "kind": kind,
        "source": source,
        "run": run,
        "model": model,
        "prompt": prompt,
        "schema": schema or "text",
        "total": total,
        "shards": shards,
        "done": 0,
        "ok": 0,
        "errors": 0,
        "usage": {"prompt_tokens": 0, "output_tokens": 0},
        "cost_usd": 0.0,
        "throttled": 0,
        "pending_shards": list(range(shards)),
        "stalled_shards": [],
        "finished_shards": {},
        "created_at": now,
        "updated_at": now,
        "elapsed_s": 0.0,
        "images_per_s": None,
        "complete": False,
        "results_uri": None,
        "gallery_uri": None,
        **extra,
    }


def record_shard(
    status: dict[str, Any], index: int, tally: dict[str, int], *, stalled: bool = False
) -> dict[str, Any]:
    """The status with shard ``index`` finished with ``tally``; totals recomputed.

    A ``stalled`` shard gave up on some sources (past the retry window): it counts
    as finished, so the batch still completes, and ``stalled_shards`` names it.
    """
    finished: dict[str, Any] = status["finished_shards"]
    finished[str(index)] = {**tally, "finished_at": now_iso(), "stalled": stalled}
    status["stalled_shards"] = sorted(int(i) for i, s in finished.items() if s.get("stalled"))
    status["ok"] = sum(int(s["ok"]) for s in finished.values())
    status["errors"] = sum(int(s["error"]) for s in finished.values())
    status["done"] = status["ok"] + status["errors"]
    status["usage"] = {
        key: sum(int(s[key]) for s in finished.values())
        for key in ("prompt_tokens", "output_tokens")
    }
    status["cost_usd"] = round(
        sum(int(s.get("cost_micro_usd", 0)) for s in finished.values()) / 1_000_000, 6
    )
    # Rate-limit 429s ridden out, by the invocation that finished each shard.
    status["throttled"] = sum(int(s.get("throttled", 0)) for s in finished.values())
    status["pending_shards"] = [i for i in range(status["shards"]) if str(i) not in finished]
    status["updated_at"] = now_iso()
    elapsed = (
        datetime.fromisoformat(status["updated_at"]) - datetime.fromisoformat(status["created_at"])
    ).total_seconds()
    status["elapsed_s"] = round(elapsed, 3)
    status["images_per_s"] = round(status["done"] / elapsed, 2) if elapsed > 0 else None
    return status


async def update_status(
    store: Store,
    bucket: str,
    name: str,
    change: Callable[[dict[str, Any]], dict[str, Any] | None],
) -> dict[str, Any] | None:
    """Apply ``change`` to the stored status; the status as written (or as left).

    ``change`` gets a copy and returns the new status, or None to leave it as
    it is. Returns None when there is no status object at all.
    """
    for attempt in range(UPDATE_ATTEMPTS):
        current, generation = await store.read_json(bucket, name)
        if current is None or generation is None:
            return None
        updated = change(copy.deepcopy(current))
        if updated is None:
            return current
        if await store.write(
            bucket,
            name,
            dumps_json(updated),
            content_type=JSON_TYPE,
            if_generation_match=generation,
        ):
            return updated
        # Another shard wrote in between: read its update and apply ours on top.
        await asyncio.sleep(random.uniform(0, _BACKOFF_S * 2 ** min(attempt, 5)))
    # Redelivery retries the whole update later, when the crowd has passed.
    raise TransientFailure(
        f"gs://{bucket}/{name}", f"the status object kept changing ({UPDATE_ATTEMPTS} attempts)"
    )


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
