"""What one process shares across invocations, and what one invocation opens.

Each entry point runs exactly one event loop (``asyncio.run``) around one async
pipeline. Everything bound to that loop (aiohttp sessions, the Gemini client)
is opened and closed inside it by :func:`open_pipeline`; what is safe to share
across invocations and threads (settings, storage client, thread pools, TLS
context) lives in :class:`Runtime`, built once per process.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.auth.exceptions import GoogleAuthError
from google.cloud import storage

from .batch import Location, parse_local_source, parse_source
from .errors import ConfigError
from .fetch import Fetcher, open_http_session
from .gemini import Describer, GeminiConnector, ModelSwitch
from .images import THUMBNAIL_SIDE
from .memory import DecodeBudget, return_freed_buffers
from .netguard import AddressCheck, is_public
from .pipeline import DEFAULT_WRITE_CONCURRENCY, ModelBackend, Pipeline, StageLimits
from .quota import CallGate
from .settings import Settings
from .store import ResultStore, Store


@dataclass
class Runtime:
    """Process-wide resources, shared by every invocation and thread."""

    settings: Settings
    storage_client: storage.Client
    gemini: GeminiConnector
    # Which resolved addresses downloads may reach; tests widen it, nothing else does.
    address_allowed: AddressCheck = is_public
    # Where results go; Cloud Storage unless a test passes its own Store.
    store: Store = None  # type: ignore[assignment]
    # Each result write's timeout; by default half the deadline margin, where writes happen.
    store_timeout_s: float | None = None
    io_executor: ThreadPoolExecutor = field(init=False)
    store_executor: ThreadPoolExecutor = field(init=False)
    cpu_executor: ThreadPoolExecutor = field(init=False)
    # What all decodes in this process may hold at once, whichever invocation they serve.
    decode_budget: DecodeBudget = field(init=False)
    # Gemini calls in flight, for every invocation of the process together: adaptive,
    # at most MODEL_CONCURRENCY (describer/quota.py).
    calls: CallGate = field(init=False)
    # GEMINI_MODEL, or GEMINI_FALLBACK_MODEL once GEMINI_MODEL was not found.
    model_switch: ModelSwitch = field(init=False)
    # Model calls in flight plus answers not yet kept, for every invocation of the process
    # together: all a crash of the process can cost (describer/pipeline.py, HandOff).
    answer_room: CallGate = field(init=False)

    def __post_init__(self) -> None:
        self.calls = CallGate(
            self.settings.model_concurrency, adaptive=self.settings.adaptive_limit
        )
        self.model_switch = ModelSwitch(self.settings.model, self.settings.fallback_model)
        self.answer_room = CallGate(self.settings.model_concurrency, adaptive=False)
        self.io_executor = ThreadPoolExecutor(
            max_workers=self.settings.download_concurrency, thread_name_prefix="describer-io"
        )
        # Results get threads of their own: at the deadline, gs:// reads still
        # running on the I/O pool must not queue ahead of the final writes.
        self.store_executor = ThreadPoolExecutor(
            max_workers=DEFAULT_WRITE_CONCURRENCY, thread_name_prefix="describer-store"
        )
        if self.store is None:
            self.store = ResultStore(
                self.storage_client,
                self.store_executor,
                # Writes happen in the deadline margin: each must fit well inside it.
                timeout_s=self.store_timeout_s or max(2.0, self.settings.deadline_margin_s / 2),
            )
        self.cpu_executor = ThreadPoolExecutor(
            # The CPUs this process may run on (the instance's vCPUs on Cloud Run), not the host's.
            max_workers=len(os.sched_getaffinity(0)) or 1,
            thread_name_prefix="describer-cpu",
        )
        # The same number caps one decode: deploy.sh sizes an instance for one budget,
        # which the largest decode allowed fills alone.
        self.decode_budget = DecodeBudget(self.settings.max_decode_bytes)
        # So that memory a decode frees leaves the process too, whichever thread freed it.
        return_freed_buffers()

    @classmethod
    def create(
        cls,
        settings: Settings,
        *,
        storage_needed: bool = True,
        store_timeout_s: float | None = None,
    ) -> Runtime:
        """Build the shared clients; the storage client honours STORAGE_EMULATOR_HOST itself.

        Refuses (ConfigError) when Gemini or Cloud Storage has no credentials, so an
        instance that could only fail every image never starts. Without
        ``storage_needed`` (the command line on local files and URLs) the storage
        client is anonymous and no credentials are looked for.
        """
        access = settings.gemini
        if not access.api_key and not access.use_vertexai:
            raise ConfigError(
                "no Gemini credentials: set GEMINI_API_KEY (or GOOGLE_API_KEY), or "
                "GOOGLE_GENAI_USE_VERTEXAI=true with GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_LOCATION"
            )
        try:
            client = (
                storage.Client() if storage_needed else storage.Client.create_anonymous_client()
            )
        except GoogleAuthError as exc:
            raise ConfigError(
                f"no Cloud Storage credentials ({exc}): run 'gcloud auth application-default "
                "login', or locally set STORAGE_EMULATOR_HOST"
            ) from exc
        return cls(
            settings=settings,
            storage_client=client,
            gemini=GeminiConnector(access),
            store_timeout_s=store_timeout_s,
        )

    def close(self) -> None:
        self.io_executor.shutdown(wait=False)
        self.store_executor.shutdown(wait=False)
        self.cpu_executor.shutdown(wait=False)


@dataclass(frozen=True)
class ObjectEvent:
    """One object-finalized event, as the handlers of uploads, manifests and shards take it."""

    bucket: str
    name: str
    generation: str
    results: Location  # where this event's results go
    stop_at: float  # time.monotonic() at which work stops (the deadline)
    give_up: bool  # past EVENT_RETRY_WINDOW_S: passing failures are final


@asynccontextmanager
async def open_pipeline(
    runtime: Runtime,
    *,
    prompt: str,
    allowed_buckets: Collection[str],
    schema: str | None = None,
    thumbnails: bool = False,
    pinned_generations: Mapping[str, str] | None = None,
    local_files: bool = False,
    backend: ModelBackend | None = None,
) -> AsyncIterator[Pipeline]:
    """Open this invocation's loop-bound resources and close them all on the way out.

    ``thumbnails`` makes gallery thumbnails during preparation; ``local_files``
    (the command line only) accepts paths on this machine as sources. ``backend``
    replaces online calls as the model stage (a batch job's requests, queued).
    """
    settings = runtime.settings
    async with (
        open_http_session(
            settings, runtime.gemini.ssl_context, address_allowed=runtime.address_allowed
        ) as http,
        runtime.gemini.open_session() as model_session,
    ):
        client = runtime.gemini.client(model_session, timeout_s=settings.model_timeout_s)
        try:
            yield Pipeline(
                fetcher=Fetcher(
                    session=http,
                    storage_client=runtime.storage_client,
                    io_executor=runtime.io_executor,
                    settings=settings,
                    allowed_buckets=allowed_buckets,
                    pinned_generations=pinned_generations,
                    address_allowed=runtime.address_allowed,
                    local_files=local_files,
                ),
                describer=backend
                or Describer(
                    client,
                    gate=runtime.calls,
                    switch=runtime.model_switch,
                    media_resolution=settings.media_resolution,
                    max_attempts=settings.model_max_attempts,
                    backoff_s=settings.model_backoff_s,
                ),
                cpu_executor=runtime.cpu_executor,
                limits=StageLimits(
                    download_concurrency=settings.download_concurrency,
                    model_concurrency=settings.model_concurrency,
                    image_max_side=settings.image_max_side,
                    max_image_pixels=settings.max_image_pixels,
                    max_decode_bytes=settings.max_decode_bytes,
                    thumbnail_side=THUMBNAIL_SIDE if thumbnails else 0,
                ),
                model=settings.model,
                prompt=prompt,
                schema=schema,
                parse=parse_local_source if local_files else parse_source,
                decode_budget=runtime.decode_budget,
                answer_room=runtime.answer_room,
                prices=settings.online_prices(),
            )
        finally:
            await client.aio.aclose()


def new_batch_id() -> str:
    """Sortable by time, unique by its random tail."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}"
