"""A stand-in for Eventarc and for Cloud Storage's preconditions, in front of the storage emulator.

gcp-storage-emulator ignores generation preconditions, and nothing delivers its
objects' finalize events. The relay is a real HTTP server placed between the
storage clients and the emulator (clients set STORAGE_EMULATOR_HOST to its URL):

- It forwards every request to the emulator and returns the answer unchanged,
  except that links to the emulator (Location, mediaLink, selfLink) are rewritten
  to the relay, so that follow-up requests come back through it.
- It enforces ``ifGenerationMatch`` (0: the object must not exist),
  ``ifGenerationNotMatch``, ``ifMetagenerationMatch`` and
  ``ifMetagenerationNotMatch`` on object writes (JSON API media, multipart and
  resumable uploads, the resumable PUT that finalises, PATCH, DELETE, and the
  destination of copyTo, rewriteTo and compose) and object reads (metadata GET,
  media download), answering as Cloud Storage does: 412 with its JSON error body,
  or 304 for a read whose not-match condition fails. Every object write through
  the relay holds a per-object lock from the check to the emulator's answer, so a
  check and its write are atomic with respect to everything else through the relay.
  Downloads get the X-Goog-Generation headers Cloud Storage sends and the emulator
  does not (the storage client reads a blob's generation from them).
- It pages object listings as Cloud Storage does (``maxResults``, ``pageToken``,
  ``startOffset``, ``endOffset``, in name order), which the emulator ignores by
  answering every object at once: code that lists a page at a time meets pages.
- After each object created or replaced in one of its trigger buckets, it queues an
  ``object.v1.finalized`` CloudEvent in binary mode (data: the object resource the
  emulator returned) and delivers it in the background to one of its function URLs
  in turn, a bounded number at once. A failed delivery (no connection, a timeout, an
  answer other than 2xx) is retried after an exponential backoff with jitter on the
  next URL, with the same ``ce-id``, until it is delivered or dead-lettered after
  ``max_attempts``, as Eventarc does.

Not covered, forwarded as they are: the XML API, batch requests, the Node
client's paths without ``/storage/v1``, source-object conditions
(``ifSourceGenerationMatch``), reads of a given ``generation``, paging of
listings with a ``delimiter``.

In-process (tests):  relay = start_in_thread(RelayConfig(emulator_url, ...), targets=[...])
Run it alone:        python -m localdev.relay --emulator http://127.0.0.1:9023 --port 9024 \\
                         --trigger-bucket inputs --target http://127.0.0.1:8081/
Observe, control:    GET /_relay/stats, PUT /_relay/targets {"targets": [...]},
                     GET /_relay/idle?timeout=30 (200 once idle, 504 if not within the timeout)
Faults (tests):      PUT /_relay/faults {"refuse_writes": true, "hang_writes_s": 0,
                     "lose_write_replies": 0, "list_page_delay_s": 0, "hold_composes": false,
                     "hold_next_pages": false} (see Faults): what Cloud Storage does on a bad day
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import email.message
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from localdev.events import finalized_event_from_resource
from localdev.threaded import Served, serve_in_thread

DEFAULT_MAX_DELIVERIES_AT_ONCE = 8
DEFAULT_MAX_ATTEMPTS = 20
DEFAULT_DELIVERY_TIMEOUT_S = 120.0
DEFAULT_RETRY_INITIAL_S = 0.2
DEFAULT_RETRY_MAX_S = 5.0
# The emulator serves one request at a time with a listen backlog of 5: more
# connections at once only make the kernel drop SYNs, which costs a 1 s retransmit.
DEFAULT_EMULATOR_CONNECTIONS = 4
# Uploads are read whole (a multipart's object name is in its body); the storage
# client's resumable chunks are 100 MiB by default.
MAX_REQUEST_BYTES = 1024 * 1024 * 1024

PRECONDITION_FAILED_MESSAGE = "At least one of the pre-conditions you specified did not hold."

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayConfig:
    """Where the emulator is, which buckets raise events, and how events are delivered."""

    emulator_url: str
    trigger_buckets: frozenset[str] = frozenset()
    max_deliveries_at_once: int = DEFAULT_MAX_DELIVERIES_AT_ONCE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S
    retry_initial_s: float = DEFAULT_RETRY_INITIAL_S
    retry_max_s: float = DEFAULT_RETRY_MAX_S
    emulator_connections: int = DEFAULT_EMULATOR_CONNECTIONS


@dataclass
class Faults:
    """Storage misbehaving on purpose, for object writes (media, multipart and resumable
    uploads, PATCH, DELETE, copy, rewrite and compose); reads and events are left alone.

    ``refuse_writes``: answer every write 503 without forwarding it (an outage);
    ``refuse_writes_s``: the same for this many seconds from when the faults are set.
    ``hang_writes_s``: hold every write this long before forwarding it (a slow backend).
    ``hold_composes``: hold every compose (a batch's merge) until the faults change;
    ``RelayStats.composes_held`` counts those waiting, so a test can kill a process mid-merge.
    ``lose_write_replies``: do the next N writes, then close the connection instead of
    answering (the write happened; the client cannot know): a client that retries a
    create-only write then meets 412.
    ``list_page_delay_s``: answer each page of an object listing this much later (a
    bucket so large that listing it outlasts an invocation).
    ``hold_next_pages``: hold every listing request that carries a page token (a listing
    carried on from an earlier page) until the faults change; ``RelayStats.pages_held``
    counts those waiting, so a test can kill a process in the middle of a listing.
    """

    refuse_writes: bool = False
    refuse_writes_s: float = 0.0
    hang_writes_s: float = 0.0
    hold_composes: bool = False
    lose_write_replies: int = 0
    list_page_delay_s: float = 0.0
    hold_next_pages: bool = False


@dataclass
class Delivery:
    """One attempt to deliver an event: where, and what came of it."""

    target: str
    status: int | None  # the HTTP status answered; None when no answer came
    error: str | None  # why no answer came (connection refused, timeout, ...)
    seconds: float


@dataclass
class EventRecord:
    """One finalize event and every attempt to deliver it."""

    id: str
    bucket: str
    name: str
    generation: str
    outcome: str = "pending"  # pending, delivered or dead_lettered
    deliveries: list[Delivery] = field(default_factory=list)


@dataclass
class RelayStats:
    """Counters, and per object name the events raised for it (in order)."""

    requests: int = 0  # requests forwarded to the emulator for clients
    finalized: int = 0  # objects created or replaced through the relay (any bucket)
    precondition_failed: int = 0  # 412s answered
    refused_writes: int = 0  # writes answered 503 by Faults.refuse_writes
    lost_replies: int = 0  # writes done whose answer Faults.lose_write_replies dropped
    composes_held: int = 0  # composes waiting now under Faults.hold_composes
    not_modified: int = 0  # 304s answered (reads whose not-match condition failed)
    list_pages: int = 0  # pages of object listings answered
    pages_held: int = 0  # listing pages waiting now under Faults.hold_next_pages
    queued: int = 0  # events raised
    delivered: int = 0  # events delivered (a 2xx answer)
    failed_attempts: int = 0  # deliveries that failed (no answer, timeout, not 2xx)
    redelivered: int = 0  # delivery attempts after an event's first
    dead_lettered: int = 0  # events given up after max_attempts
    in_flight: int = 0  # deliveries awaiting their answer now
    outstanding: int = 0  # events neither delivered nor dead-lettered yet
    objects: dict[str, list[EventRecord]] = field(default_factory=dict)


class _Upstream(NamedTuple):
    """The emulator's answer, read whole."""

    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass(frozen=True)
class _Conditions:
    """The generation preconditions a request carries."""

    generation_match: int | None = None
    generation_not_match: int | None = None
    metageneration_match: int | None = None
    metageneration_not_match: int | None = None

    def __bool__(self) -> bool:
        return any(
            value is not None
            for value in (
                self.generation_match,
                self.generation_not_match,
                self.metageneration_match,
                self.metageneration_not_match,
            )
        )

    def verdict(self, current: Mapping[str, Any] | None, *, read: bool) -> int | None:
        """The status to answer instead of proceeding (412 or 304), or None to proceed.

        ``current`` is the live object's resource, None when there is none.
        """
        generation = int(current["generation"]) if current else None
        metageneration = int(current["metageneration"]) if current else None
        if self.generation_match is not None and (generation or 0) != self.generation_match:
            return 412
        if self.metageneration_match is not None and metageneration != self.metageneration_match:
            return 412
        # A not-match condition fails when it matches, and when there is no live object.
        for wanted, actual in (
            (self.generation_not_match, generation),
            (self.metageneration_not_match, metageneration),
        ):
            if wanted is not None and (actual is None or actual == wanted):
                return 304 if read and actual is not None else 412
        return None


class _BadRequest(Exception):
    """A request the relay refuses as Cloud Storage would (400)."""


@dataclass
class _Session:
    """A resumable upload, from its start: where it writes and under what conditions."""

    bucket: str
    name: str
    conditions: _Conditions


@dataclass
class _Event:
    headers: dict[str, str]
    body: bytes
    record: EventRecord
    attempts: int = 0
    last_target: str | None = None


class _ObjectLocks:
    """One asyncio lock per object, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, bucket: str, name: str) -> AsyncIterator[None]:
        key = (bucket, name)
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]


# Paths as the JSON API client sends them: object names percent-encoded, "/" included.
_SEGMENT = r"[^/]+"
_UPLOAD = re.compile(rf"/upload/storage/v1/b/(?P<bucket>{_SEGMENT})/o")
_OBJECT = re.compile(rf"/storage/v1/b/(?P<bucket>{_SEGMENT})/o/(?P<name>{_SEGMENT})")
_DOWNLOAD = re.compile(rf"/download/storage/v1/b/(?P<bucket>{_SEGMENT})/o/(?P<name>{_SEGMENT})")
_COPY = re.compile(
    rf"/storage/v1/b/{_SEGMENT}/o/{_SEGMENT}/(?P<verb>copyTo|rewriteTo)"
    rf"/b/(?P<bucket>{_SEGMENT})/o/(?P<name>{_SEGMENT})"
)
_COMPOSE = re.compile(rf"/storage/v1/b/(?P<bucket>{_SEGMENT})/o/(?P<name>{_SEGMENT})/compose")
_LIST = re.compile(rf"/storage/v1/b/(?P<bucket>{_SEGMENT})/o")
_CONTENT_RANGE = re.compile(r"bytes (?:(?P<start>\d+)-(?P<end>\d+|\*)|\*)/(?P<total>\d+|\*)")

# Not forwarded either way: they describe one connection, or are recomputed.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
_LINK_KEYS = frozenset({"mediaLink", "selfLink"})
# What Cloud Storage says of the object in a download's headers, from its resource.
_DOWNLOAD_HEADERS = {
    "X-Goog-Generation": "generation",
    "X-Goog-Metageneration": "metageneration",
    "X-Goog-Stored-Content-Length": "size",
    "X-Goog-Storage-Class": "storageClass",
}
_INT64_KEYS = ("generation", "metageneration", "size")


class Relay:
    """The aiohttp application: forwarding, preconditions and event delivery.

    Lives on one event loop; ``start`` and ``close`` run on it.
    """

    def __init__(self, config: RelayConfig, targets: Sequence[str] = ()) -> None:
        self.config = config
        self.stats = RelayStats()
        self.faults = Faults()
        self._refuse_until = 0.0  # loop time until which Faults.refuse_writes_s refuses
        self._faults_changed = asyncio.Event()
        self._emulator = config.emulator_url.rstrip("/")
        self._targets: list[str] = list(targets)
        self._targets_changed = asyncio.Event()
        self._round_robin = 0
        self._locks = _ObjectLocks()
        self._sessions: dict[str, _Session] = {}
        self._queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers: list[asyncio.Task[None]] = []
        self._storage: aiohttp.ClientSession | None = None
        self._functions: aiohttp.ClientSession | None = None
        self.app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        self.app.router.add_get("/_relay/stats", self._get_stats)
        self.app.router.add_get("/_relay/idle", self._get_idle)
        self.app.router.add_put("/_relay/targets", self._put_targets)
        self.app.router.add_put("/_relay/faults", self._put_faults)
        self.app.router.add_route("*", "/{tail:.*}", self._proxy)
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)

    # --- life cycle ---------------------------------------------------------------------------

    async def _on_startup(self, _app: web.Application) -> None:
        self._storage = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.config.emulator_connections),
            auto_decompress=False,  # bodies pass through as the emulator sent them
            skip_auto_headers=("Accept-Encoding", "Content-Type", "User-Agent"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
        )
        # A fresh connection per delivery: a pooled one to a killed instance would
        # fail the next event sent on it, which Eventarc's front end would not.
        self._functions = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
        )
        self._workers = [
            asyncio.create_task(self._deliver_forever(), name=f"relay-delivery-{i}")
            for i in range(self.config.max_deliveries_at_once)
        ]

    async def _on_cleanup(self, _app: web.Application) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for client in (self._storage, self._functions):
            if client is not None:
                await client.close()

    # --- the in-process API (call on the relay's loop) ----------------------------------------

    def set_targets(self, urls: Iterable[str]) -> None:
        """Replace the function URLs events are delivered to (from now on)."""
        self._targets = list(urls)
        self._targets_changed.set()
        self._targets_changed = asyncio.Event()

    def snapshot(self) -> RelayStats:
        """A copy of the stats, safe to read while the relay goes on.

        A Delivery is never changed once recorded, so the copies share them.
        """
        objects = {
            name: [replace(record, deliveries=list(record.deliveries)) for record in records]
            for name, records in self.stats.objects.items()
        }
        return replace(self.stats, objects=objects)

    async def wait_idle(self, timeout: float) -> RelayStats:
        """Wait until every event raised is delivered or dead-lettered; TimeoutError if not."""
        try:
            async with asyncio.timeout(timeout):
                while self.stats.outstanding:
                    await self._idle.wait()
        except TimeoutError:
            stats = self.stats
            raise TimeoutError(
                f"the relay was not idle within {timeout} s: {stats.outstanding} events "
                f"outstanding, {stats.in_flight} in flight, {self._queue.qsize()} queued"
            ) from None
        return self.snapshot()

    # --- control endpoints --------------------------------------------------------------------

    async def _get_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(asdict(self.stats))

    async def _get_idle(self, request: web.Request) -> web.Response:
        try:
            stats = await self.wait_idle(float(request.query.get("timeout", "30")))
        except TimeoutError as exc:
            return web.json_response({"error": str(exc)}, status=504)
        return web.json_response(asdict(stats))

    async def _put_faults(self, request: web.Request) -> web.Response:
        self.set_faults(Faults(**await request.json()))
        return web.json_response(asdict(self.faults))

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self._refuse_until = asyncio.get_running_loop().time() + faults.refuse_writes_s
        self._faults_changed.set()
        self._faults_changed = asyncio.Event()

    async def _put_targets(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.set_targets(body["targets"])
        return web.json_response({"targets": self._targets})

    # --- forwarding ---------------------------------------------------------------------------

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.raw_path.partition("?")[0]
        faults = self.faults
        writes = _is_write(request.method, path, request.query)
        refusing = faults.refuse_writes or asyncio.get_running_loop().time() < self._refuse_until
        if writes and refusing:
            self.stats.refused_writes += 1
            return _error(503, "backendError", "the relay refuses every write (Faults)")
        if writes and faults.hang_writes_s > 0:
            await asyncio.sleep(faults.hang_writes_s)
        while request.method == "POST" and _COMPOSE.fullmatch(path) and self.faults.hold_composes:
            self.stats.composes_held += 1
            try:
                await self._faults_changed.wait()
            finally:
                self.stats.composes_held -= 1
        try:
            conditions = _conditions(request)
            upstream = await self._route(request, path, body, conditions)
        except _BadRequest as exc:
            return _error(400, "invalid", str(exc))
        except aiohttp.ClientError as exc:
            return _error(502, "backendError", f"the emulator did not answer: {exc}")
        if writes and self.faults.lose_write_replies > 0 and upstream.status < 300:
            # Done, and never told: drop the connection as a lost reply would.
            self.faults.lose_write_replies -= 1
            self.stats.lost_replies += 1
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=204)
        if upstream.status == 412:
            self.stats.precondition_failed += 1
        elif upstream.status == 304:
            self.stats.not_modified += 1
        return self._respond(request, upstream)

    async def _route(
        self, request: web.Request, path: str, body: bytes, conditions: _Conditions
    ) -> _Upstream:
        """Forward the request, applying preconditions and raising events where they belong."""
        method = request.method
        query = request.query
        if method in ("POST", "PUT") and (match := _UPLOAD.fullmatch(path)):
            bucket = unquote(match["bucket"])
            if "upload_id" in query:  # the emulator takes a POST here as a PUT
                return await self._resumable_chunk(request, bucket, body)
            if method == "POST":
                return await self._insert(request, bucket, body, conditions)
        if method == "POST" and (match := _COPY.fullmatch(path) or _COMPOSE.fullmatch(path)):
            bucket, name = unquote(match["bucket"]), unquote(match["name"])
            return await self._write(request, body, bucket, name, conditions)
        if method in ("PATCH", "DELETE") and (match := _OBJECT.fullmatch(path)):
            bucket, name = unquote(match["bucket"]), unquote(match["name"])
            return await self._write(request, body, bucket, name, conditions, creates=False)
        if method == "GET":
            match = _OBJECT.fullmatch(path)
            media = _DOWNLOAD.fullmatch(path) or (match if query.get("alt") == "media" else None)
            if media:
                bucket, name = unquote(media["bucket"]), unquote(media["name"])
                return await self._read_media(request, bucket, name, conditions)
            if match and conditions:
                return await self._read_metadata(request, conditions)
            if _LIST.fullmatch(path) and "delimiter" not in query:
                return await self._list(request, body)
        return await self._forward(request, body)

    async def _list(self, request: web.Request, body: bytes) -> _Upstream:
        """One page of a listing, as Cloud Storage pages it.

        The emulator answers every object at once and ignores ``maxResults``,
        ``pageToken``, ``startOffset`` and ``endOffset``: the relay applies them, in
        name order, so that code listing page by page meets pages here.
        """
        query = request.query
        while self.faults.hold_next_pages and query.get("pageToken"):
            self.stats.pages_held += 1
            try:
                await self._faults_changed.wait()
            finally:
                self.stats.pages_held -= 1
        upstream = await self._forward(request, body)
        if upstream.status != 200:
            return upstream
        items = sorted(_json_object(upstream.body).get("items") or [], key=lambda o: o["name"])
        start, after = query.get("startOffset", ""), _token_name(query.get("pageToken"))
        end = query.get("endOffset")
        items = [
            o
            for o in items
            if o["name"] >= start
            and (not after or o["name"] > after)
            and (end is None or o["name"] < end)
        ]
        size = int(query.get("maxResults") or 1000)
        page: dict[str, Any] = {"kind": "storage#objects", "items": items[:size]}
        if len(items) > size:
            page["nextPageToken"] = _page_token(items[size - 1]["name"])
        if self.faults.list_page_delay_s > 0:
            await asyncio.sleep(self.faults.list_page_delay_s)
        self.stats.list_pages += 1
        headers = CIMultiDict(upstream.headers)
        headers.popall("Content-Length", None)
        return _Upstream(200, "OK", headers, json.dumps(page).encode())

    async def _insert(
        self, request: web.Request, bucket: str, body: bytes, conditions: _Conditions
    ) -> _Upstream:
        kind = request.query.get("uploadType")
        name = request.query.get("name")
        if kind == "multipart" and name is None:
            name = _multipart_metadata(request.headers.get("Content-Type", ""), body).get("name")
        if kind == "resumable":
            if name is None and body:
                name = _json_object(body).get("name")
            upstream = await self._forward(request, body)
            upload_id = _upload_id(upstream.headers.get("Location", ""))
            if upload_id and name:
                # Cloud Storage checks a resumable upload's conditions when it finalises.
                self._sessions[upload_id] = _Session(bucket, name, conditions)
            return upstream
        if not name:
            return await self._forward(request, body)  # the emulator says what is wrong
        return await self._write(request, body, bucket, name, conditions)

    async def _resumable_chunk(self, request: web.Request, bucket: str, body: bytes) -> _Upstream:
        upload_id = request.query["upload_id"]
        session = self._sessions.get(upload_id)
        if session is None or not _may_finalise(request.headers.get("Content-Range")):
            return await self._forward(request, body)
        upstream = await self._write(
            request, body, session.bucket, session.name, session.conditions
        )
        if upstream.status in (200, 201):
            # Kept after a 412, so that a retried last chunk is checked again.
            self._sessions.pop(upload_id, None)
        return upstream

    async def _write(
        self,
        request: web.Request,
        body: bytes,
        bucket: str,
        name: str,
        conditions: _Conditions,
        *,
        creates: bool = True,
    ) -> _Upstream:
        """A write of one object: checked and done under its lock; an event if it created one."""
        async with self._locks.hold(bucket, name):
            if conditions:
                current = await self._current(bucket, name)
                if current is None and not creates:
                    return await self._forward(request, body)  # 404 from the emulator
                refusal = conditions.verdict(current, read=False)
                if refusal is not None:
                    return _refusal(refusal)
            upstream = await self._forward(request, body)
        if creates and upstream.status in (200, 201):
            resource = _json_object(upstream.body)
            resource = resource.get("resource", resource)  # rewriteTo wraps it
            if isinstance(resource, dict) and "generation" in resource:
                self._finalized(_relink(resource, self._emulator, _public_url(request)))
        return upstream

    async def _read_metadata(self, request: web.Request, conditions: _Conditions) -> _Upstream:
        # One request to the emulator: its answer is both the check and the read.
        upstream = await self._forward(request, b"")
        if upstream.status != 200:
            return upstream
        refusal = conditions.verdict(_json_object(upstream.body), read=True)
        return upstream if refusal is None else _refusal(refusal)

    async def _read_media(
        self, request: web.Request, bucket: str, name: str, conditions: _Conditions
    ) -> _Upstream:
        """A download, with the generation headers Cloud Storage sends and the emulator does not.

        google-cloud-storage sets a blob's generation from X-Goog-Generation after a
        download: without it a read-modify-write would go on with generation None.
        The lock keeps the headers true to the bytes.
        """
        async with self._locks.hold(bucket, name):
            current = await self._current(bucket, name)
            if current is None:
                return await self._forward(request, b"")  # 404 from the emulator
            refusal = conditions.verdict(current, read=True)
            if refusal is not None:
                return _refusal(refusal)
            upstream = await self._forward(request, b"")
        if upstream.status in (200, 206):
            for header, key in _DOWNLOAD_HEADERS.items():
                if header not in upstream.headers and current.get(key) is not None:
                    upstream.headers[header] = str(current[key])
        return upstream

    async def _current(self, bucket: str, name: str) -> dict[str, Any] | None:
        """The live object's resource, as the emulator has it, or None."""
        assert self._storage is not None
        url = URL(f"{self._emulator}/storage/v1/b/{_quote(bucket)}/o/{_quote(name)}", encoded=True)
        async with self._storage.get(url) as response:
            body = await response.read()
            if response.status == 404:
                return None
            response.raise_for_status()
        return _json_object(body)

    async def _forward(self, request: web.Request, body: bytes) -> _Upstream:
        assert self._storage is not None
        self.stats.requests += 1
        headers = CIMultiDict(
            (key, value) for key, value in request.headers.items() if key.lower() not in _HOP_BY_HOP
        )
        url = URL(self._emulator + request.raw_path, encoded=True)
        async with self._storage.request(
            request.method, url, data=body or None, headers=headers, allow_redirects=False
        ) as response:
            return _Upstream(
                response.status,
                response.reason or "",
                CIMultiDict(response.headers),
                await response.read(),
            )

    def _respond(self, request: web.Request, upstream: _Upstream) -> web.Response:
        relay = _public_url(request)
        headers = CIMultiDict(
            (key, value)
            for key, value in upstream.headers.items()
            if key.lower() not in _HOP_BY_HOP
        )
        location = headers.get("Location")
        if location and location.startswith(self._emulator):
            headers["Location"] = relay + location[len(self._emulator) :]
        body = upstream.body
        if self._emulator.encode() in body and "json" in headers.get("Content-Type", ""):
            body = json.dumps(_relink(json.loads(body), self._emulator, relay)).encode()
        return web.Response(
            status=upstream.status, reason=upstream.reason, headers=headers, body=body
        )

    # --- events -------------------------------------------------------------------------------

    def _finalized(self, resource: dict[str, Any]) -> None:
        """Count a created object and, in a trigger bucket, raise its finalize event."""
        self.stats.finalized += 1
        if resource.get("bucket") not in self.config.trigger_buckets:
            return
        # The JSON API gives int64 fields as strings; the emulator's compose does not.
        data = {
            key: str(value) if key in _INT64_KEYS and value is not None else value
            for key, value in resource.items()
        }
        headers, body = finalized_event_from_resource(data)
        record = EventRecord(headers["ce-id"], data["bucket"], data["name"], data["generation"])
        self.stats.objects.setdefault(record.name, []).append(record)
        self.stats.queued += 1
        self.stats.outstanding += 1
        self._idle.clear()
        self._queue.put_nowait(_Event(headers, body, record))

    async def _deliver_forever(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._attempt(event)
            except Exception as exc:  # a worker must outlive whatever one delivery does
                log.exception("delivery of event %s failed unexpectedly", event.record.id)
                self._failed(event, Delivery(event.last_target or "", None, repr(exc), 0.0))

    async def _attempt(self, event: _Event) -> None:
        target = await self._next_target(event)
        assert self._functions is not None
        event.attempts += 1
        if event.attempts > 1:
            self.stats.redelivered += 1
        self.stats.in_flight += 1
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            async with self._functions.post(
                target,
                data=event.body,
                headers=event.headers,
                timeout=aiohttp.ClientTimeout(total=self.config.delivery_timeout_s),
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            self.stats.in_flight -= 1
        delivery = Delivery(target, status, error, round(time.monotonic() - started, 4))
        if status is not None and 200 <= status < 300:
            event.record.deliveries.append(delivery)
            event.record.outcome = "delivered"
            self.stats.delivered += 1
            self._settled()
        else:
            self._failed(event, delivery)

    def _failed(self, event: _Event, delivery: Delivery) -> None:
        event.record.deliveries.append(delivery)
        self.stats.failed_attempts += 1
        if event.attempts >= self.config.max_attempts:
            event.record.outcome = "dead_lettered"
            self.stats.dead_lettered += 1
            log.warning(
                "event %s for %s dead-lettered after %d attempts",
                event.record.id,
                event.record.name,
                event.attempts,
            )
            self._settled()
            return
        delay = min(
            self.config.retry_max_s, self.config.retry_initial_s * 2 ** (event.attempts - 1)
        )
        asyncio.get_running_loop().call_later(
            random.uniform(delay / 2, delay), self._queue.put_nowait, event
        )

    def _settled(self) -> None:
        self.stats.outstanding -= 1
        if not self.stats.outstanding:
            self._idle.set()

    async def _next_target(self, event: _Event) -> str:
        """Round robin for a first attempt; a retry goes to the URL after the one that failed."""
        while not self._targets:  # no instance yet: the event waits, as for a cold start
            await self._targets_changed.wait()
        targets = self._targets
        if event.last_target in targets:
            index = (targets.index(event.last_target) + 1) % len(targets)
        else:
            index = self._round_robin % len(targets)
            self._round_robin += 1
        event.last_target = targets[index]
        return event.last_target


def _is_write(method: str, path: str, query: Mapping[str, str]) -> bool:
    """Whether the request writes an object (what Faults apply to)."""
    if method in ("POST", "PUT") and _UPLOAD.fullmatch(path):
        return True
    if method == "POST" and (_COPY.fullmatch(path) or _COMPOSE.fullmatch(path)):
        return True
    return method in ("PATCH", "DELETE") and _OBJECT.fullmatch(path) is not None


def _conditions(request: web.Request) -> _Conditions:
    query = request.query

    def number(*names: str) -> int | None:
        for name in names:
            if name in query:
                try:
                    return int(query[name])
                except ValueError:
                    raise _BadRequest(f"Invalid value for {name}: {query[name]!r}") from None
        return None

    return _Conditions(
        generation_match=number("ifGenerationMatch"),
        generation_not_match=number("ifGenerationNotMatch"),
        metageneration_match=number("ifMetagenerationMatch"),
        # google-cloud-storage spells it ifMetaGenerationNotMatch on uploads.
        metageneration_not_match=number("ifMetagenerationNotMatch", "ifMetaGenerationNotMatch"),
    )


def _refusal(status: int) -> _Upstream:
    """Cloud Storage's answer to a failed precondition."""
    if status == 304:
        return _Upstream(304, "Not Modified", CIMultiDict(), b"")
    body = {
        "error": {
            "code": 412,
            "message": PRECONDITION_FAILED_MESSAGE,
            "errors": [
                {
                    "message": PRECONDITION_FAILED_MESSAGE,
                    "domain": "global",
                    "reason": "conditionNotMet",
                    "locationType": "header",
                    "location": "If-Match",
                }
            ],
        }
    }
    headers = CIMultiDict({"Content-Type": "application/json; charset=UTF-8"})
    return _Upstream(412, "Precondition Failed", headers, json.dumps(body).encode())


def _error(status: int, reason: str, message: str) -> web.Response:
    body = {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }
    return web.json_response(body, status=status)


def _may_finalise(content_range: str | None) -> bool:
    """Whether a resumable PUT with this Content-Range can complete the upload."""
    if content_range is None:
        return True  # the whole object in one request
    match = _CONTENT_RANGE.fullmatch(content_range.strip())
    if match is None or match["total"] == "*":
        return False
    end = match["end"]
    return end is None or end == "*" or int(end) + 1 >= int(match["total"])


def _multipart_metadata(content_type: str, body: bytes) -> dict[str, Any]:
    """The JSON metadata of a multipart/related upload: its first part."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str):
        return {}
    delimiter = b"--" + boundary.encode()
    start = body.find(delimiter)
    head_end = body.find(b"\r\n\r\n", start)
    end = body.find(b"\r\n" + delimiter, head_end)
    if min(start, head_end, end) < 0:
        return {}
    return _json_object(body[head_end + 4 : end])


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _upload_id(location: str) -> str | None:
    return URL(location).query.get("upload_id") if location else None


def _page_token(last_name: str) -> str:
    """An opaque token for the page after ``last_name`` (Cloud Storage's are opaque too)."""
    return base64.urlsafe_b64encode(last_name.encode()).decode()


def _token_name(token: str | None) -> str:
    if not token:
        return ""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError as exc:
        raise _BadRequest(f"invalid pageToken {token!r}") from exc


def _quote(value: str) -> str:
    return quote(value, safe="~")  # as google-cloud-storage quotes object names


def _public_url(request: web.Request) -> str:
    """The relay's URL as this client addressed it."""
    return f"{request.scheme}://{request.host}"


def _relink(value: Any, emulator: str, relay: str) -> Any:
    """``value`` with the emulator's links (mediaLink, selfLink) pointing at the relay."""
    if isinstance(value, list):
        return [_relink(item, emulator, relay) for item in value]
    if not isinstance(value, dict):
        return value
    relinked: dict[str, Any] = {}
    for key, item in value.items():
        if key in _LINK_KEYS and isinstance(item, str) and item.startswith(emulator):
            relinked[key] = relay + item[len(emulator) :]
        else:
            relinked[key] = _relink(item, emulator, relay)
    return relinked


class RunningRelay:
    """A relay serving on loopback from a background thread (for tests)."""

    def __init__(self, served: Served[Relay]) -> None:
        self._served = served
        self.relay = served.app
        self.url = served.url

    def stats(self) -> RelayStats:
        """A consistent copy of the relay's stats."""
        return self._served.run(self._snapshot())

    def set_targets(self, urls: Iterable[str]) -> None:
        """Replace the function URLs events go to (a test kills an instance, starts another).

        In effect when this returns: every delivery attempt from then on uses the new list.
        """
        self._served.run(self._set_targets(list(urls)))

    def wait_idle(self, timeout: float = 30.0) -> RelayStats:
        """Wait until every event is delivered or dead-lettered: the stats then, or TimeoutError."""
        return self._served.run(self.relay.wait_idle(timeout), timeout + 5)

    def set_faults(self, **faults: Any) -> None:
        """Replace the faults in force (Faults' fields; none given: storage behaves)."""
        self._served.run(self._set_faults(Faults(**faults)))

    def stop(self) -> None:
        self._served.stop()

    async def _set_faults(self, faults: Faults) -> None:
        self.relay.set_faults(faults)

    async def _snapshot(self) -> RelayStats:
        return self.relay.snapshot()

    async def _set_targets(self, urls: list[str]) -> None:
        self.relay.set_targets(urls)


def start_in_thread(
    config: RelayConfig, *, targets: Sequence[str] = (), host: str = "127.0.0.1", port: int = 0
) -> RunningRelay:
    """Start a relay on its own event loop in a daemon thread; returns once it listens."""

    def build() -> tuple[Relay, web.AppRunner]:
        relay = Relay(config, targets)  # made on the loop it serves from
        return relay, _runner(relay)

    return RunningRelay(serve_in_thread(build, name="storage-relay", host=host, port=port))


def _runner(relay: Relay) -> web.AppRunner:
    # Bodies pass through as sent (auto_decompress=False); a delivery stuck on a hung
    # function must not hold up shutdown.
    return web.AppRunner(relay.app, access_log=None, auto_decompress=False, shutdown_timeout=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulator", required=True, help="the storage emulator's URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9024)
    parser.add_argument("--trigger-bucket", action="append", default=[], dest="trigger_buckets")
    parser.add_argument("--target", action="append", default=[], dest="targets")
    parser.add_argument(
        "--max-deliveries-at-once", type=int, default=DEFAULT_MAX_DELIVERIES_AT_ONCE
    )
    parser.add_argument("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS)
    parser.add_argument("--delivery-timeout-s", type=float, default=DEFAULT_DELIVERY_TIMEOUT_S)
    parser.add_argument("--retry-initial-s", type=float, default=DEFAULT_RETRY_INITIAL_S)
    parser.add_argument("--retry-max-s", type=float, default=DEFAULT_RETRY_MAX_S)
    args = parser.parse_args()
    config = RelayConfig(
        emulator_url=args.emulator,
        trigger_buckets=frozenset(args.trigger_buckets),
        max_deliveries_at_once=args.max_deliveries_at_once,
        max_attempts=args.max_attempts,
        delivery_timeout_s=args.delivery_timeout_s,
        retry_initial_s=args.retry_initial_s,
        retry_max_s=args.retry_max_s,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def serve() -> None:
        runner = _runner(Relay(config, args.targets))
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        print(f"Storage relay listening on http://{args.host}:{runner.addresses[0][1]}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
