"""Settings, read once from the environment into one frozen, typed object.

Nothing else in the package reads ``os.environ``: every function receives the
values it needs from :class:`Settings`, so tests build one directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigError
from .schemas import SCHEMA_NAMES, SCHEMAS, TEXT_SCHEMA

DEFAULT_MODEL = "gemini-3.5-flash-lite"
DEFAULT_PROMPT = "Describe this image in just 3 words."
DEFAULT_RESULTS_PREFIX = "descriptions/"
DEFAULT_MAX_BATCH_SIZE = 1000
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Downloads beyond what preparation can take in only hold bytes in memory: 16
# keeps a 2-vCPU instance busy while a batch of 12 MP photos stays near 200 MB.
DEFAULT_DOWNLOAD_CONCURRENCY = 16
DEFAULT_MODEL_CONCURRENCY = 16
# Gemini 3 bills an image by MEDIA_RESOLUTION and samples it down itself; 1024 px
# keeps every detail a description needs while a 12 MP photo sends ~3% of its bytes.
DEFAULT_IMAGE_MAX_SIDE = 1024
# Pillow's own warning threshold is ~89 MP; a 100 MP cap still admits every
# real camera photo while refusing decompression bombs before any decoding.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# The most one instance's decodes may hold at once, and so one decode at most (see
# describer/memory.py). 512 MiB admits 100 MP RGB JPEGs (and progressive 4:2:0 ones),
# 48 MP HEICs, 100 MP 8-bit RGB PNGs and 50 MP RGBA ones, and still fits the 2 GiB
# instance deploy.sh sizes for the default concurrency; it refuses what takes more,
# such as a 100 MP 16-bit PNG (1.2 GB) or 32-bit TIFF (1.9 GB).
DEFAULT_MAX_DECODE_BYTES = 512 * 1024 * 1024
DEFAULT_MODEL_MAX_ATTEMPTS = 5
# A Gemini call on a large image rarely takes more than ~20 s; 30 s leaves room
# for a slow answer while a stuck call can still be retried inside the default
# time budget (FUNCTION_TIMEOUT_S - DEADLINE_MARGIN_S = 50 s).
DEFAULT_MODEL_TIMEOUT_S = 30.0
# First backoff step for model retries; doubles per attempt (full jitter, 30 s cap).
DEFAULT_MODEL_BACKOFF_S = 1.0
DEFAULT_DOWNLOAD_TIMEOUT_S = 60.0
# Cloud Run functions' own default timeout: a function deployed without
# choosing one is stopped at 60 s, so the budget must not assume more.
DEFAULT_FUNCTION_TIMEOUT_S = 60.0
# Time kept back from the budget for writing the finished records.
DEFAULT_DEADLINE_MARGIN_S = 10.0
# Gemini 3 bills an image by its media resolution, not its pixels: low 280,
# medium 560, high 1120 tokens. Medium keeps the detail a caption or alt text
# needs at half the model's own default (high).
DEFAULT_MEDIA_RESOLUTION = "medium"
# Eventarc redelivers a failed event for up to 24 h; an hour of redeliveries
# rides out any outage worth waiting for without paying for a whole day of them.
DEFAULT_EVENT_RETRY_WINDOW_S = 3600.0
MEDIA_RESOLUTIONS = ("low", "medium", "high", "default")
# A manifest with more sources than this is split into shards, one invocation each: 500
# images at MODEL_CONCURRENCY 16 and ~1 s a call take about 30 s, inside the default budget.
DEFAULT_SHARD_SIZE = 500
DEFAULT_SHARDS_PREFIX = "describer-shards/"
# Everything the function writes but sidecars: batch JSONL, galleries, status objects,
# checkpoints, locks. Outside RESULTS_PREFIX, so no upload's sidecar name can reach it.
DEFAULT_BATCHES_PREFIX = "describer-batches/"
# A sharded manifest may list this many sources (its JSON is at most 16 MiB).
DEFAULT_MAX_MANIFEST_IMAGES = 100_000
# A backfill of more images than this must say how many it means (max_images).
DEFAULT_BACKFILL_CONFIRM_OVER = 1000
# Images one backfill run describes at most: its status object keeps a line per shard,
# and every finishing shard rewrites it, so a run stays at a size that object carries.
DEFAULT_MAX_BACKFILL_IMAGES = 1_000_000
# Cloud Storage's largest page: fewest round trips when a backfill lists a bucket.
DEFAULT_LIST_PAGE_SIZE = 1000
# USD per million tokens for the dry-run estimate; Gemini Flash-Lite's list prices when
# written. Set them to your model's prices: estimates are only as good as these.
DEFAULT_PRICE_INPUT_PER_MTOK = 0.10
DEFAULT_PRICE_OUTPUT_PER_MTOK = 0.40
# The Batch API's prices: half the online ones, for answers within 24 hours.
DEFAULT_BATCH_PRICE_INPUT_PER_MTOK = 0.05
DEFAULT_BATCH_PRICE_OUTPUT_PER_MTOK = 0.20
# Backfills and manifests of more images than this run as Batch API jobs unless they
# say "mode"; 0: only those that ask. Batch answers can take up to a day, so it is opt-in.
DEFAULT_BATCH_MODE_OVER = 0
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Prices:
    """USD per million tokens, in and out: what a record's ``cost_usd`` is reckoned at."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: int, output_tokens: int) -> float:
        return (
            prompt_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok
        ) / 1_000_000


@dataclass(frozen=True)
class GeminiAccess:
    """How to reach Gemini: the SDK's own variables, read here once."""

    api_key: str | None = None
    use_vertexai: bool = False
    project: str | None = None
    location: str | None = None
    base_url: str | None = None
    # Vertex AI's endpoint override (the SDK's GOOGLE_VERTEX_BASE_URL): the simulator locally.
    vertex_base_url: str | None = None


@dataclass(frozen=True)
class Settings:
    """Everything an invocation needs to know, with the documented defaults."""

    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_PROMPT
    results_bucket: str | None = None
    results_prefix: str = DEFAULT_RESULTS_PREFIX
    allowed_buckets: frozenset[str] = field(default_factory=frozenset)
    allow_private_urls: bool = False
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    download_concurrency: int = DEFAULT_DOWNLOAD_CONCURRENCY
    model_concurrency: int = DEFAULT_MODEL_CONCURRENCY
    # Find the quota (describer/quota.py) below MODEL_CONCURRENCY; off: always MODEL_CONCURRENCY.
    adaptive_limit: bool = True
    image_max_side: int = DEFAULT_IMAGE_MAX_SIDE
    model_max_attempts: int = DEFAULT_MODEL_MAX_ATTEMPTS
    model_timeout_s: float = DEFAULT_MODEL_TIMEOUT_S
    model_backoff_s: float = DEFAULT_MODEL_BACKOFF_S
    download_timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S
    function_timeout_s: float = DEFAULT_FUNCTION_TIMEOUT_S
    deadline_margin_s: float = DEFAULT_DEADLINE_MARGIN_S
    fallback_model: str | None = None
    media_resolution: str = DEFAULT_MEDIA_RESOLUTION
    # A structured answer's schema for batches and uploads that name none; None is free text.
    schema: str | None = None
    # An HTML gallery beside every batch's JSONL.
    gallery: bool = True
    shard_size: int = DEFAULT_SHARD_SIZE
    shards_prefix: str = DEFAULT_SHARDS_PREFIX
    batches_prefix: str = DEFAULT_BATCHES_PREFIX
    # Where shard manifests go (a bucket with a describe_gcs trigger); None: the
    # manifest's own bucket, or the backfilled bucket.
    shards_bucket: str | None = None
    max_manifest_images: int = DEFAULT_MAX_MANIFEST_IMAGES
    backfill_confirm_over: int = DEFAULT_BACKFILL_CONFIRM_OVER
    max_backfill_images: int = DEFAULT_MAX_BACKFILL_IMAGES
    list_page_size: int = DEFAULT_LIST_PAGE_SIZE
    price_input_per_mtok: float = DEFAULT_PRICE_INPUT_PER_MTOK
    price_output_per_mtok: float = DEFAULT_PRICE_OUTPUT_PER_MTOK
    batch_price_input_per_mtok: float = DEFAULT_BATCH_PRICE_INPUT_PER_MTOK
    batch_price_output_per_mtok: float = DEFAULT_BATCH_PRICE_OUTPUT_PER_MTOK
    batch_mode_over: int = DEFAULT_BATCH_MODE_OVER
    event_retry_window_s: float = DEFAULT_EVENT_RETRY_WINDOW_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    gemini: GeminiAccess = field(default_factory=GeminiAccess)
    storage_emulator_host: str | None = None

    def prompt_and_schema(
        self, prompt: str | None = None, schema: str | None = None
    ) -> tuple[str, str | None]:
        """What a batch runs with: its own prompt and schema, else the settings'.

        A structured schema brings a prompt of its own when DESCRIBE_PROMPT was
        left at the default: three words make no "fuller description".
        """
        chosen = schema_setting(schema) if schema else self.schema
        if prompt:
            return prompt, chosen
        if chosen is not None and self.prompt == DEFAULT_PROMPT:
            return SCHEMAS[chosen].default_prompt, chosen
        return self.prompt, chosen

    def state_bucket(self, event_bucket: str) -> str:
        """Where a batch's status, checkpoints and locks live, from the settings alone.

        A manifest's event and each of its shards' events name the same bucket
        here (shards go to SHARDS_BUCKET, or back to the manifest's bucket), so a
        shard finds its batch's status without trusting a word of its own body.
        """
        return self.results_bucket or self.shards_bucket or event_bucket

    @property
    def job_bucket(self) -> str | None:
        """Where batch-mode jobs are registered, so a collect finds them without an event:
        a bucket the settings name (RESULTS_BUCKET, else SHARDS_BUCKET), or None, and then
        batch mode is refused."""
        return self.results_bucket or self.shards_bucket

    def online_prices(self) -> Prices:
        return Prices(self.price_input_per_mtok, self.price_output_per_mtok)

    def batch_prices(self) -> Prices:
        return Prices(self.batch_price_input_per_mtok, self.batch_price_output_per_mtok)

    def readable_buckets(self, *also: str) -> frozenset[str]:
        """Buckets gs:// sources may come from: ALLOWED_BUCKETS, RESULTS_BUCKET and ``also``."""
        return self.allowed_buckets | {b for b in (self.results_bucket, *also) if b}

    @property
    def work_budget_s(self) -> float:
        """How long after an invocation starts it may still start or finish work."""
        return self.function_timeout_s - self.deadline_margin_s

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_image_bytes",
            "max_image_pixels",
            "max_decode_bytes",
            "download_concurrency",
            "model_concurrency",
            "image_max_side",
            "model_max_attempts",
            "shard_size",
            "max_manifest_images",
            "backfill_confirm_over",
            "max_backfill_images",
            "list_page_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.upper()} must be at least 1, got {getattr(self, name)}")
        if self.batch_mode_over < 0:
            raise ConfigError(
                f"BATCH_MODE_OVER must be 0 (off) or more, got {self.batch_mode_over}"
            )
        if self.list_page_size > DEFAULT_LIST_PAGE_SIZE:
            raise ConfigError(
                f"LIST_PAGE_SIZE must be at most {DEFAULT_LIST_PAGE_SIZE} (Cloud Storage's "
                f"largest page), got {self.list_page_size}"
            )
        if not self.model.strip():
            raise ConfigError("GEMINI_MODEL must not be empty")
        if not self.prompt.strip():
            raise ConfigError("DESCRIBE_PROMPT must not be empty")
        if self.media_resolution not in MEDIA_RESOLUTIONS:
            raise ConfigError(
                f"MEDIA_RESOLUTION must be one of {', '.join(MEDIA_RESOLUTIONS)}, "
                f"got {self.media_resolution!r}"
            )
        if self.schema is not None and self.schema not in SCHEMAS:
            raise ConfigError(
                f"DESCRIBE_SCHEMA must be one of {', '.join(SCHEMA_NAMES)}, got {self.schema!r}"
            )
        if self.deadline_margin_s >= self.function_timeout_s:
            raise ConfigError(
                f"DEADLINE_MARGIN_S ({self.deadline_margin_s}) must be less than "
                f"FUNCTION_TIMEOUT_S ({self.function_timeout_s}), or no work could ever start"
            )
        if not self.shards_prefix:
            raise ConfigError("SHARDS_PREFIX must not be empty: shards are told apart by it")
        if self.results_prefix and (
            self.shards_prefix.startswith(self.results_prefix)
            or self.results_prefix.startswith(self.shards_prefix)
        ):
            # Shards under the results prefix would be ignored by the loop guard
            # (and results under the shards prefix taken for shards).
            raise ConfigError(
                f"SHARDS_PREFIX ({self.shards_prefix!r}) and RESULTS_PREFIX "
                f"({self.results_prefix!r}) must not contain one another"
            )
        if not self.batches_prefix:
            raise ConfigError("BATCHES_PREFIX must not be empty: batch files are told apart by it")
        for name, other in (
            ("RESULTS_PREFIX", self.results_prefix),
            ("SHARDS_PREFIX", self.shards_prefix),
        ):
            if other and (
                self.batches_prefix.startswith(other) or other.startswith(self.batches_prefix)
            ):
                # Under RESULTS_PREFIX an upload's sidecar name could be a batch file's.
                raise ConfigError(
                    f"BATCHES_PREFIX ({self.batches_prefix!r}) and {name} ({other!r}) must not "
                    "contain one another"
                )
        if (
            self.shards_bucket
            and self.shards_bucket == self.results_bucket
            and not (self.results_prefix)
        ):
            # Every event from the results bucket is refused when RESULTS_PREFIX is
            # empty (the loop guard): shards written there would never run.
            raise ConfigError(
                "SHARDS_BUCKET is RESULTS_BUCKET while RESULTS_PREFIX is empty, so no shard "
                "could ever run; set RESULTS_PREFIX or another SHARDS_BUCKET"
            )
        # Results written with no prefix into the bucket that triggers us would
        # re-trigger the function on its own output: refuse to start instead.
        if not self.results_prefix and not self.results_bucket:
            raise ConfigError(
                "RESULTS_PREFIX is empty and RESULTS_BUCKET is unset, so uploads would be "
                "described into the bucket that triggers the function with nothing to tell "
                "results from inputs; set RESULTS_PREFIX or a separate RESULTS_BUCKET"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables (``os.environ`` by default)."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        if reader.flag("ALLOW_PRIVATE_URLS") and env.get("K_SERVICE"):
            # K_SERVICE is set by Cloud Run: this is not a local test.
            raise ConfigError(
                "ALLOW_PRIVATE_URLS is for local testing only and is refused on Cloud Run: "
                "it would let any caller make the function fetch from your VPC and the "
                "metadata server"
            )
        return cls(
            model=reader.text("GEMINI_MODEL", DEFAULT_MODEL),
            prompt=reader.text("DESCRIBE_PROMPT", DEFAULT_PROMPT),
            results_bucket=reader.text("RESULTS_BUCKET", "") or None,
            results_prefix=normalize_prefix(reader.text("RESULTS_PREFIX", DEFAULT_RESULTS_PREFIX)),
            allowed_buckets=frozenset(
                b.strip() for b in reader.text("ALLOWED_BUCKETS", "").split(",") if b.strip()
            ),
            allow_private_urls=reader.flag("ALLOW_PRIVATE_URLS"),
            max_batch_size=reader.integer("MAX_BATCH_SIZE", DEFAULT_MAX_BATCH_SIZE),
            max_image_bytes=reader.integer("MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES),
            max_image_pixels=reader.integer("MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS),
            max_decode_bytes=reader.integer("MAX_DECODE_BYTES", DEFAULT_MAX_DECODE_BYTES),
            download_concurrency=reader.integer(
                "DOWNLOAD_CONCURRENCY", DEFAULT_DOWNLOAD_CONCURRENCY
            ),
            model_concurrency=reader.integer("MODEL_CONCURRENCY", DEFAULT_MODEL_CONCURRENCY),
            image_max_side=reader.integer("IMAGE_MAX_SIDE", DEFAULT_IMAGE_MAX_SIDE),
            model_max_attempts=reader.integer("MODEL_MAX_ATTEMPTS", DEFAULT_MODEL_MAX_ATTEMPTS),
            model_timeout_s=reader.number("MODEL_TIMEOUT_S", DEFAULT_MODEL_TIMEOUT_S),
            model_backoff_s=reader.number("MODEL_BACKOFF_S", DEFAULT_MODEL_BACKOFF_S),
            download_timeout_s=reader.number("DOWNLOAD_TIMEOUT_S", DEFAULT_DOWNLOAD_TIMEOUT_S),
            function_timeout_s=reader.number("FUNCTION_TIMEOUT_S", DEFAULT_FUNCTION_TIMEOUT_S),
            deadline_margin_s=reader.number("DEADLINE_MARGIN_S", DEFAULT_DEADLINE_MARGIN_S),
            fallback_model=reader.text("GEMINI_FALLBACK_MODEL", "") or None,
            media_resolution=reader.text("MEDIA_RESOLUTION", DEFAULT_MEDIA_RESOLUTION).lower(),
            schema=schema_setting(reader.text("DESCRIBE_SCHEMA", "").lower()),
            gallery=reader.flag("GALLERY", default=True),
            adaptive_limit=reader.flag("ADAPTIVE_LIMIT", default=True),
            shard_size=reader.integer("SHARD_SIZE", DEFAULT_SHARD_SIZE),
            shards_prefix=normalize_prefix(reader.text("SHARDS_PREFIX", DEFAULT_SHARDS_PREFIX)),
            shards_bucket=reader.text("SHARDS_BUCKET", "") or None,
            batches_prefix=normalize_prefix(reader.text("BATCHES_PREFIX", DEFAULT_BATCHES_PREFIX)),
            max_manifest_images=reader.integer("MAX_MANIFEST_IMAGES", DEFAULT_MAX_MANIFEST_IMAGES),
            backfill_confirm_over=reader.integer(
                "BACKFILL_CONFIRM_OVER", DEFAULT_BACKFILL_CONFIRM_OVER
            ),
            max_backfill_images=reader.integer("MAX_BACKFILL_IMAGES", DEFAULT_MAX_BACKFILL_IMAGES),
            list_page_size=reader.integer("LIST_PAGE_SIZE", DEFAULT_LIST_PAGE_SIZE),
            price_input_per_mtok=reader.number(
                "PRICE_INPUT_PER_MTOK", DEFAULT_PRICE_INPUT_PER_MTOK
            ),
            price_output_per_mtok=reader.number(
                "PRICE_OUTPUT_PER_MTOK", DEFAULT_PRICE_OUTPUT_PER_MTOK
            ),
            batch_price_input_per_mtok=reader.number(
                "BATCH_PRICE_INPUT_PER_MTOK", DEFAULT_BATCH_PRICE_INPUT_PER_MTOK
            ),
            batch_price_output_per_mtok=reader.number(
                "BATCH_PRICE_OUTPUT_PER_MTOK", DEFAULT_BATCH_PRICE_OUTPUT_PER_MTOK
            ),
            batch_mode_over=reader.integer("BATCH_MODE_OVER", DEFAULT_BATCH_MODE_OVER),
            event_retry_window_s=reader.number(
                "EVENT_RETRY_WINDOW_S", DEFAULT_EVENT_RETRY_WINDOW_S
            ),
            gemini=GeminiAccess(
                # The SDK's own precedence: GOOGLE_API_KEY wins when both are set.
                api_key=reader.text("GOOGLE_API_KEY", "")
                or reader.text("GEMINI_API_KEY", "")
                or None,
                use_vertexai=reader.flag("GOOGLE_GENAI_USE_VERTEXAI"),
                project=reader.text("GOOGLE_CLOUD_PROJECT", "") or None,
                location=reader.text("GOOGLE_CLOUD_LOCATION", "") or None,
                base_url=reader.text("GOOGLE_GEMINI_BASE_URL", "") or None,
                vertex_base_url=reader.text("GOOGLE_VERTEX_BASE_URL", "") or None,
            ),
            storage_emulator_host=reader.text("STORAGE_EMULATOR_HOST", "") or None,
        )


def schema_setting(name: str | None) -> str | None:
    """A schema name as settings hold it: "text" (or nothing) is free text, None."""
    return None if not name or name == TEXT_SCHEMA else name


def normalize_prefix(prefix: str) -> str:
    """An object prefix is a folder: ``out`` and ``out/`` both mean ``out/``."""
    prefix = prefix.strip().lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


class _Reader:
    """Typed reads of a string mapping, each error naming the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str, default: str) -> str:
        value = self._env.get(name)
        return default if value is None else value.strip()

    def flag(self, name: str, *, default: bool = False) -> bool:
        value = self._env.get(name, "").strip().lower()
        if not value:
            return default
        if value in ("0", "false", "no", "off"):
            return False
        if value in ("1", "true", "yes", "on"):
            return True
        raise ConfigError(f"{name} must be true or false, got {value!r}")

    def integer(self, name: str, default: int) -> int:
        value = self._env.get(name, "").strip()
        if not value:
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {value!r}") from None

    def number(self, name: str, default: float) -> float:
        value = self._env.get(name, "").strip()
        if not value:
            return default
        try:
            result = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not result > 0:
            raise ConfigError(f"{name} must be positive, got {value!r}")
        return result
