"""Focused tests of parsing, records, settings, image preparation and the address guard."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import time

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image

from describer import Code, ConfigError, Record, RequestError, Settings, SourceError
from describer.batch import GcsSource, HttpSource, parse_body, parse_source
from describer.images import prepare
from describer.netguard import ForbiddenAddress, GuardedResolver, check_literal_host, is_public
from describer.records import Usage, counts, dumps_jsonl
from describer.results import write_gallery
from localdev.memory_store import MemoryStore

from .conftest import make_image

# --- batch parsing -------------------------------------------------------------------------


def test_a_valid_body_parses_with_its_optional_fields() -> None:
    body = json.dumps({"images": ["gs://b1/x.png"], "prompt": "Hi", "output": "gs://out-b/p"})
    request = parse_body(body.encode(), max_batch_size=10)
    assert request.images == ["gs://b1/x.png"]
    assert request.prompt == "Hi"
    assert request.output is not None
    assert (request.output.bucket, request.output.prefix) == ("out-b", "p/")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 400, "invalid_json"),
        (b"[" * 100_000, 400, "invalid_json"),
        (b'{"images": ["a"], "prompt": "\\ud800"}', 400, "invalid_request"),
        (b"null", 400, "invalid_request"),
        (b'{"images": null}', 400, "invalid_request"),
        (b'{"images": [], "prompt": "x"}', 400, "invalid_request"),
        (b'{"images": ["a"], "prompt": 5}', 400, "invalid_request"),
        (b'{"images": ["a"], "output": "gs://UPPER/x"}', 400, "invalid_request"),
        (b'{"images": ["a", "b", "c"]}', 413, "batch_too_large"),
    ],
)
def test_invalid_bodies_raise_request_errors(body: bytes, status: int, code: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_body(body, max_batch_size=2)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert caught.value.message


def test_sources_are_classified_by_scheme() -> None:
    assert parse_source("https://example.com/a.jpg") == HttpSource("https://example.com/a.jpg")
    assert parse_source("gs://my-bucket/dir/a b.png") == GcsSource(
        "gs://my-bucket/dir/a b.png", "my-bucket", "dir/a b.png"
    )


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "example.com/a.jpg",
        "gs://bucket-only",
        "gs://bucket/folder/",
        "gs://Bad_Bucket/x.png",
        "http:///no-host",
        "http://user:pw@example.com/a.png",
        "http://example.com:99999/a.png",
        "http://example.com/a b.png",
        "https://example.com/" + "a" * 2100,
        "http://[::1/x.png",
        "http://\uff11\uff12\uff17.0.0.1/x.png",
        "http://127\u30020\u30020\u30021/x.png",
        "http://\ud800.example/x.png",
    ],
)
def test_unusable_uris_are_invalid_sources(uri: str) -> None:
    with pytest.raises(SourceError) as caught:
        parse_source(uri)
    assert caught.value.code is Code.INVALID_SOURCE


# --- records -------------------------------------------------------------------------------


def test_ok_record_json_has_the_documented_fields() -> None:
    record = Record(
        source="s",
        status="ok",
        model="m",
        prompt="p",
        description="Cat.",
        mime_type="image/png",
        width=4,
        height=3,
        usage=Usage(10, 2),
        attempts=1,
        latency_ms=5,
    )
    assert record.to_json() == {
        "source": "s",
        "status": "ok",
        "description": "Cat.",
        "model": "m",
        "prompt": "p",
        "mime_type": "image/png",
        "width": 4,
        "height": 3,
        "usage": {"prompt_tokens": 10, "output_tokens": 2},
        "attempts": 1,
        "latency_ms": 5,
        "error": None,
    }


def test_error_record_json_carries_code_and_message_and_no_description() -> None:
    record = Record.failed(
        "s", SourceError(Code.TOO_LARGE, "Too big.", attempts=0), model="m", prompt="p"
    )
    out = record.to_json()
    assert out["status"] == "error"
    assert out["error"] == {"code": "too_large", "message": "Too big."}
    assert "description" not in out and "usage" not in out


def test_counts_and_jsonl_follow_the_records() -> None:
    ok = Record(source="a", status="ok", model="m", prompt="p", description="x")
    bad = Record.failed("b", SourceError(Code.NOT_FOUND, "No."), model="m", prompt="p")
    assert counts([ok, bad, ok]) == {"ok": 2, "error": 1}
    lines = dumps_jsonl(r.to_json() for r in [ok, bad]).decode().splitlines()
    assert [json.loads(line)["source"] for line in lines] == ["a", "b"]


# --- settings ------------------------------------------------------------------------------


def test_settings_defaults_match_the_documented_table() -> None:
    settings = Settings.from_env({})
    assert settings.model == "gemini-3.5-flash-lite"
    assert settings.prompt == "Describe this image in just 3 words."
    assert settings.results_bucket is None
    assert settings.results_prefix == "descriptions/"
    assert settings.allowed_buckets == frozenset()
    assert settings.allow_private_urls is False
    assert (settings.max_batch_size, settings.max_image_bytes) == (1000, 20971520)
    assert (settings.download_concurrency, settings.model_concurrency) == (16, 16)
    assert settings.image_max_side == 1024


def test_settings_read_every_variable() -> None:
    settings = Settings.from_env(
        {
            "GEMINI_MODEL": "gemini-x",
            "DESCRIBE_PROMPT": "Alt text.",
            "RESULTS_BUCKET": "r",
            "RESULTS_PREFIX": "out",
            "ALLOWED_BUCKETS": "a, b,",
            "ALLOW_PRIVATE_URLS": "true",
            "MAX_BATCH_SIZE": "5",
            "MAX_IMAGE_BYTES": "100",
            "DOWNLOAD_CONCURRENCY": "2",
            "MODEL_CONCURRENCY": "3",
            "IMAGE_MAX_SIDE": "64",
            "GOOGLE_API_KEY": "k",
            "GOOGLE_GEMINI_BASE_URL": "http://x",
        }
    )
    assert (settings.model, settings.prompt, settings.results_bucket) == (
        "gemini-x",
        "Alt text.",
        "r",
    )
    assert settings.results_prefix == "out/"
    assert settings.allowed_buckets == frozenset({"a", "b"})
    assert settings.allow_private_urls is True
    assert (settings.max_batch_size, settings.max_image_bytes) == (5, 100)
    assert (settings.download_concurrency, settings.model_concurrency) == (2, 3)
    assert settings.image_max_side == 64
    assert (settings.gemini.api_key, settings.gemini.base_url) == ("k", "http://x")
    both = Settings.from_env({"GEMINI_API_KEY": "g", "GOOGLE_API_KEY": "k"})
    assert both.gemini.api_key == "k"  # the SDK's own precedence


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"MODEL_CONCURRENCY": "many"}, "MODEL_CONCURRENCY"),
        ({"DOWNLOAD_CONCURRENCY": "0"}, "DOWNLOAD_CONCURRENCY"),
        ({"ALLOW_PRIVATE_URLS": "maybe"}, "ALLOW_PRIVATE_URLS"),
        ({"MODEL_TIMEOUT_S": "-1"}, "MODEL_TIMEOUT_S"),
        ({"GEMINI_MODEL": " "}, "GEMINI_MODEL"),
        ({"RESULTS_PREFIX": ""}, "RESULTS_PREFIX"),
    ],
)
def test_bad_settings_refuse_to_start_naming_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(names)):
        Settings.from_env(env)


def test_empty_prefix_is_allowed_with_a_separate_results_bucket() -> None:
    settings = Settings.from_env({"RESULTS_PREFIX": "", "RESULTS_BUCKET": "results"})
    assert settings.results_prefix == ""


# --- image preparation ---------------------------------------------------------------------


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_small_supported_images_are_passed_through_untouched() -> None:
    data = make_image(200, 100, "red", "PNG")
    prepared = prepare(data, max_side=1536, max_pixels=10**8)
    assert prepared.data is data
    assert (prepared.mime_type, prepared.width, prepared.height) == ("image/png", 200, 100)


def test_large_jpegs_are_downscaled_to_the_max_side() -> None:
    data = make_image(4000, 3000, "blue", "JPEG")
    prepared = prepare(data, max_side=1536, max_pixels=10**8)
    assert (prepared.width, prepared.height) == (4000, 3000)
    assert (prepared.sent_width, prepared.sent_height) == (1536, 1152)
    assert _open(prepared.data).size == (1536, 1152)
    assert prepared.mime_type == "image/jpeg"


@pytest.mark.parametrize(
    ("fmt", "mode", "sent"),
    [
        ("GIF", "P", "image/jpeg"),
        ("BMP", "RGB", "image/jpeg"),
        ("TIFF", "RGB", "image/jpeg"),
        ("JPEG", "CMYK", "image/jpeg"),
        ("PNG", "RGBA", "image/png"),
    ],
)
def test_formats_gemini_lacks_are_converted(fmt: str, mode: str, sent: str) -> None:
    data = make_image(60, 40, "green", fmt, mode=mode)
    if mode == "RGBA":  # a PNG with alpha but too large keeps its transparency as PNG
        prepared = prepare(data, max_side=30, max_pixels=10**8)
    else:
        prepared = prepare(data, max_side=1536, max_pixels=10**8)
    assert prepared.mime_type == sent
    assert _open(prepared.data).format == sent.split("/")[1].upper()


def test_exif_orientation_is_applied_when_reencoding() -> None:
    image = Image.new("RGB", (400, 200), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    prepared = prepare(buffer.getvalue(), max_side=100, max_pixels=10**8)
    assert (prepared.sent_width, prepared.sent_height) == (50, 100)


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        (b"", "an empty file"),
        (b"<!DOCTYPE html><html></html>", "an HTML page"),
        (b"%PDF-1.7 ...", "a PDF document"),
        (b'{"a": 1}', "JSON"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"\x00\x01\x02garbage", "unknown kind"),
    ],
)
def test_non_images_are_named_in_the_error(data: bytes, phrase: str) -> None:
    with pytest.raises(SourceError) as caught:
        prepare(data, max_side=100, max_pixels=10**8)
    assert caught.value.code is Code.NOT_AN_IMAGE
    assert phrase in caught.value.message


def test_too_many_pixels_is_refused_before_decoding() -> None:
    data = make_image(300, 300, "red", "PNG")
    with pytest.raises(SourceError) as caught:
        prepare(data, max_side=100, max_pixels=300 * 299)
    assert caught.value.code is Code.TOO_LARGE
    assert "300x300" in caught.value.message


def test_a_truncated_image_is_unsupported() -> None:
    data = make_image(300, 300, "red", "JPEG")
    with pytest.raises(SourceError) as caught:
        prepare(data[: len(data) // 2], max_side=1536, max_pixels=10**8)
    assert caught.value.code is Code.UNSUPPORTED_IMAGE


def test_bytes_that_only_claim_to_be_heif_are_an_unsupported_image() -> None:
    """An ftyp box saying HEIC is recognised, but bytes libheif cannot decode are not passed on."""
    data = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    with pytest.raises(SourceError) as caught:
        prepare(data, max_side=100, max_pixels=10**8)
    assert caught.value.code is Code.UNSUPPORTED_IMAGE
    assert "HEIC" in caught.value.message


# --- address guard -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("not-an-ip", False),
    ],
)
def test_only_globally_routable_unicast_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(address) is public


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "[::1]", "10.0.0.1", "metadata.google.internal", "METADATA.google.internal."],
)
def test_private_literals_and_metadata_names_are_refused(host: str) -> None:
    with pytest.raises(ForbiddenAddress):
        check_literal_host(host)


class _FixedResolver(AbstractResolver):
    """Answers every name with fixed addresses (a fake the project owns)."""

    def __init__(self, *addresses: str) -> None:
        self._addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self._addresses
        ]

    async def close(self) -> None:
        pass


def test_resolver_drops_private_answers_and_fails_when_none_remain() -> None:
    mixed = GuardedResolver(_FixedResolver("10.0.0.5", "93.184.216.34"))
    answers = asyncio.run(mixed.resolve("example.com", 443))
    assert [a["host"] for a in answers] == ["93.184.216.34"]
    private = GuardedResolver(_FixedResolver("127.0.0.1"))
    with pytest.raises(ForbiddenAddress, match=re.escape("127.0.0.1")):
        asyncio.run(private.resolve("rebind.example", 80))


def test_allow_private_urls_is_refused_on_cloud_run() -> None:
    """The local-testing escape hatch cannot be switched on in a Cloud Run service."""
    with pytest.raises(ConfigError, match="local testing only"):
        Settings.from_env({"ALLOW_PRIVATE_URLS": "true", "K_SERVICE": "describe-http"})
    assert Settings.from_env({"ALLOW_PRIVATE_URLS": "true"}).allow_private_urls


@pytest.mark.parametrize(
    "env",
    [
        {"SHARDS_PREFIX": "descriptions/shards/"},  # under RESULTS_PREFIX: the loop guard eats them
        {"RESULTS_PREFIX": "describer-shards/out/"},  # results taken for shards
        {"RESULTS_BUCKET": "r", "RESULTS_PREFIX": "", "SHARDS_BUCKET": "r"},  # no shard could run
        {"DESCRIBE_SCHEMA": "xml"},
    ],
)
def test_settings_that_would_break_sharding_or_schemas_refuse_to_start(
    env: dict[str, str],
) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_describe_schema_ignores_case_and_text_means_free_text() -> None:
    assert Settings.from_env({"DESCRIBE_SCHEMA": "ALT_TEXT"}).schema == "alt_text"
    assert Settings.from_env({"DESCRIBE_SCHEMA": "text"}).schema is None


def test_no_gallery_is_written_once_the_margin_is_half_gone() -> None:
    """A page of several MB is not started when the invocation may be killed while writing it."""
    store = MemoryStore()
    record = {"source": "a", "status": "ok", "description": "x"}

    async def write(unless_after: float) -> str | None:
        return await write_gallery(
            store,
            "out",
            "batches/b.jsonl",
            [record],
            [None],
            title="b",
            elapsed_s=None,
            unless_after=unless_after,
        )

    assert asyncio.run(write(time.monotonic() - 1)) is None
    assert store.names("out") == []
    assert asyncio.run(write(time.monotonic() + 60)) == "gs://out/batches/b.html"
    assert store.names("out") == ["batches/b.html"]


def test_the_memory_store_pages_and_ranges_listings_as_cloud_storage_does() -> None:
    """The in-memory double keeps the Store protocol whole: pages in name order, ranges."""
    store = MemoryStore()
    for c in "gacebfd":
        store.put("b", f"p/{c}", b"{}")
    store.put("b", "q/other", b"{}")

    async def pages() -> list[list[str]]:
        found, token = [], None
        while True:
            page, token = await store.list_page("b", "p/", page_token=token, page_size=3)
            found.append([o.name for o in page])
            if token is None:
                return found

    assert asyncio.run(pages()) == [["p/a", "p/b", "p/c"], ["p/d", "p/e", "p/f"], ["p/g"]]
    ranged = asyncio.run(store.list("b", "p/", start="p/b", end="p/e"))
    assert [o.name for o in ranged] == ["p/b", "p/c", "p/d"]
