"""Fuzzing describe_http: a malformed request gets a 4xx JSON error, never a 500 or a trace.

Two fuzzers drive the real function (functions-framework serving main.py in a
subprocess, against the storage emulator and the Gemini simulator) over HTTP:

- schemathesis, from the OpenAPI description in ``openapi.yaml``: positive
  requests (the contract accepts them: 200, or the documented 503 when a
  generated ``output`` names a bucket that does not exist) and negative ones
  (400, 413, 415, and 405 for other methods), every answer checked against
  the description;
- hypothesis, with raw HTTP/1.1 requests no schema tool writes: arbitrary
  bytes, invalid UTF-8, lone surrogates, 100k-deep nesting, huge numbers, NaN,
  duplicate keys, hostile source URIs, odd content types and charsets, chunked
  and broken chunked bodies, a Content-Length over 4 MiB, other methods.

The function runs as deployed, with ALLOW_PRIVATE_URLS off: generated sources
are refused before any connection (private and reserved addresses), or name
hosts under ``.invalid``, which never resolve; DOWNLOAD_TIMEOUT_S bounds a slow
resolver. Nothing reaches the internet and every valid batch ends in
milliseconds.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from google.cloud import storage
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from localdev import procs
from localdev.gemini_sim import RunningSimulator

from .conftest import RESULTS_BUCKET, function_env

OPENAPI = procs.ROOT / "openapi.yaml"
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Whole-request error codes (README, "The contract"); 503's body is checked by the schema.
REQUEST_ERROR_CODES = frozenset(
    {
        "invalid_json",
        "invalid_request",
        "output_required",
        "method_not_allowed",
        "batch_too_large",
        "request_too_large",
        "unsupported_media_type",
        # Backfills
        "forbidden_bucket",
        "max_images_required",
        "backfill_in_progress",
        "storage_refused",
        "storage_unavailable",
        # Batch mode: backfills that ask for it, reruns online
        "batch_mode_unavailable",
        "batch_not_found",
        "nothing_to_rerun",
        "shard_gone",
    }
)
SOURCE_ERROR_CODES = frozenset(
    {
        "invalid_source",
        "forbidden_source",
        "not_found",
        "download_failed",
        "too_large",
        "not_an_image",
        "unsupported_image",
        "blocked",
        "quota_exhausted",
        "model_error",
        "timeout",
        "deadline_exceeded",
    }
)
# A Python traceback, in a body or a log line (the package logs one as "stack_trace").
TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File "[^"]+", line \d+|stack_trace')

CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"mode": "all"},
        # The schema has no examples, and one operation has no links to follow.
        "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
        "checks": {
            # The contract's only 5xx: every source done but the JSONL not written, here
            # because a generated `output` names no real bucket. The schema holds the
            # 503 to its body (code results_write_failed, the records still there).
            # A generated `output` that names no real bucket is a 400 output_unwritable
            # (the records still there), since a retry would fail the same way.
            "not_a_server_error": {"expected-statuses": ["2xx", "4xx", 503]},
            # A generated backfill names a bucket outside ALLOWED_BUCKETS (403); a generated
            # rerun names a batch that is not there (404).
            "positive_data_acceptance": {"expected-statuses": [200, 202, 400, 403, 404, 503]},
            "negative_data_rejection": {"expected-statuses": [400, 405, 413, 415]},
        },
    }
)
SCHEMA = schemathesis.openapi.from_path(OPENAPI, config=CONFIG)


@dataclass(frozen=True)
class Served:
    url: str
    port: int
    log: Path


@pytest.fixture(scope="module")
def fuzz_function(
    emulator_url: str,
    sim_server: RunningSimulator,
    gcs: storage.Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """describe_http as deployed (no private URLs), its stdout and stderr kept in a log."""
    port = procs.free_port()
    log = tmp_path_factory.mktemp("fuzz-logs") / "describe_http.log"
    # `gcs` made the results bucket. MAX_BATCH_SIZE stays at its default, the maxItems
    # openapi.yaml states: a batch of sources refused before any download costs
    # milliseconds, even a thousand of them.
    env = function_env(
        emulator_url,
        sim_server.url,
        RESULTS_BUCKET=RESULTS_BUCKET,
        ALLOW_PRIVATE_URLS="false",
        DOWNLOAD_TIMEOUT_S="2",
        MODEL_MAX_ATTEMPTS="1",
    )
    proc = procs.start_function("describe_http", port, env, log_path=log)
    yield Served(f"http://127.0.0.1:{port}", port, log)
    procs.stop(proc)


# --- schemathesis, from openapi.yaml ------------------------------------------------------


# The generated requests (100 here, 200 below) are left out of the fast tier, which still
# sends KNOWN_HOSTILE through the log check at the end.
@pytest.mark.slow
@SCHEMA.parametrize()
@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_answer_conforms_to_the_openapi_description(
    case: schemathesis.Case, fuzz_function: Served
) -> None:
    """Valid and invalid requests generated from openapi.yaml get the documented answers."""
    response = case.call_and_validate(base_url=fuzz_function.url, timeout=60)
    assert not TRACEBACK.search(response.text), response.text
    if 400 <= response.status_code < 500:
        body = response.json()
        if "results" in body:  # output_unwritable: the batch was done, its output refused
            assert body["error"]["code"] == "output_unwritable", body
            assert body["results_uri"] is None, body
        else:
            _assert_error_body(body)


# --- hypothesis, raw HTTP/1.1 -------------------------------------------------------------


@dataclass(frozen=True)
class RawRequest:
    """One request, written byte by byte so no client library tidies it on the way."""

    body: bytes = b""
    method: str = "POST"
    content_type: str | None = "application/json"
    # length: a true Content-Length. chunked: Transfer-Encoding: chunked, no length.
    # broken: chunked, a size that is not hex at the end. truncated: chunked, cut off.
    # declared: a Content-Length over 4 MiB in front of a short body.
    framing: str = "length"
    chunk_size: int = 1024
    declared_length: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    # The status the contract gives this request, when its kind alone decides it.
    expect: int | None = None

    def __repr__(self) -> str:
        # Bodies run to megabytes: show their size and a sample, not all of them.
        sample = self.body if len(self.body) <= 120 else self.body[:100] + b"..." + self.body[-20:]
        return (
            f"RawRequest({self.method} {self.content_type!r} {self.framing} "
            f"declared={self.declared_length} chunk={self.chunk_size} headers={self.headers} "
            f"expect={self.expect} body[{len(self.body)}]={sample!r})"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # how hypothesis prints a failing example

    def encode(self) -> bytes:
        lines = [f"{self.method} / HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        if self.content_type is not None:
            lines.append(f"Content-Type: {self.content_type}")
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        payload = self.body
        if self.framing == "length":
            lines.append(f"Content-Length: {len(self.body)}")
        elif self.framing == "declared":
            lines.append(f"Content-Length: {self.declared_length}")
        else:
            lines.append("Transfer-Encoding: chunked")
            size = self.chunk_size
            chunks = [self.body[i : i + size] for i in range(0, len(self.body), size)]
            payload = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks)
            if self.framing == "chunked":
                payload += b"0\r\n\r\n"
            elif self.framing == "broken":
                payload += b"zz\r\n"
            else:  # truncated: announces ten bytes more than it sends
                payload = f"{len(self.body) + 10:x}\r\n".encode() + self.body
        return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + payload


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def send(served: Served, request: RawRequest) -> Answer:
    """Send the raw request on a fresh connection and read the whole answer."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as sock:
        sock.sendall(request.encode())
        # Half-close, as a client that hangs up would: a truncated body then ends
        # instead of keeping the server waiting for the rest.
        sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock, method=request.method)
        response.begin()
        return Answer(response.status, response.headers, response.read())


def _json(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Hosts that are private, reserved or the metadata server in one spelling or another,
# or names under .invalid (RFC 6761: they never resolve). None is on the internet.
_HOSTS = [
    "127.0.0.1",
    "0x7f.1",
    "2130706433",
    "0177.0.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[fe80::1%25eth0]",
    "169.254.169.254",
    "metadata.google.internal",
    "10.0.0.1",
    "100.64.0.1",
    "224.0.0.1",
    "0.0.0.0",
    "192.0.2.1",
    "localhost",
    "a.invalid",
    "xn--e1afmkfd.invalid",
    "\u0661\u0662\u0667.0.0.1",
    "127.0.0.1.",
    "",
    "[",
]
source_uris = st.one_of(
    st.builds(
        "{}://{}{}{}/{}".format,
        st.sampled_from(["http", "https", "HTTP", "gs", "ftp", "file", ""]),
        st.sampled_from(["", "user:pw@", "@", "a@b@"]),
        st.sampled_from(_HOSTS),
        st.sampled_from(["", ":0", ":80", ":65536", ":-1", ":a", ":"]),
        st.text(max_size=20),
    ),
    st.text(max_size=20).map(f"gs://{RESULTS_BUCKET}/".__add__),
    st.text(max_size=40),
    st.integers(2040, 2060).map(lambda n: "http://a.invalid/" + "a" * (n - 17)),
)
# Anything in a field: hostile values, and plausible ones a bad value hides among.
field_values = st.one_of(
    json_values.map(_json),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0"]),
    st.integers(300, 20_000).map(lambda n: "9" * n),
    st.lists(source_uris.map(_json), max_size=6).map(lambda xs: f"[{', '.join(xs)}]"),
    st.integers(0xD800, 0xDFFF).map(lambda c: f'["\\u{c:04x}"]'),
    st.integers(0xD800, 0xDFFF).map(lambda c: f'"\\u{c:04x}"'),
    st.integers(1, 5000).map(lambda n: "[" * n + "]" * n),
)
field_names = st.sampled_from(["images", "prompt", "output"]) | st.text(max_size=10).map(
    lambda name: _json(name)[1:-1]
)


@st.composite
def json_objects(draw: st.DrawFn) -> bytes:
    """A JSON object text with hostile members, keys possibly repeated."""
    members = draw(st.lists(st.tuples(field_names, field_values), max_size=5))
    if draw(st.booleans()):
        # A well-formed batch the hostile members (or repeats of its key) come after.
        members.insert(0, ("images", f'["gs://{RESULTS_BUCKET}/a.png"]'))
    return ("{" + ", ".join(f'"{k}": {v}' for k, v in members) + "}").encode()


@st.composite
def with_invalid_utf8(draw: st.DrawFn, texts: st.SearchStrategy[bytes]) -> bytes:
    """A body with bytes that are not UTF-8 spliced in somewhere."""
    text = draw(texts)
    at = draw(st.integers(0, len(text)))
    bad = draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80"]))
    return text[:at] + bad + text[at:]


bodies = st.one_of(
    st.binary(max_size=300),
    json_objects(),
    with_invalid_utf8(json_objects()),
    json_values.map(lambda value: _json(value).encode()),
    st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 100_000).map(lambda n: b'{"images": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(1, 50_000).map(lambda n: b'{"a": ' * n + b"1" + b"}" * n),
)
json_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "application/json; charset=utf-16",
        'application/json; charset=""',
        "APPLICATION/JSON ; CHARSET=UTF-8",
        "application/problem+json",
        "application/json; boundary=x; charset=utf-8; charset=ascii",
    ]
)
# Visible Latin-1: what a header value may carry without the server refusing the request.
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
)
other_types = (
    st.sampled_from(
        [
            "text/plain",
            "text/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonl",
            "application/json-seq",
            "application/octet-stream",
            "*/*",
            "",
            ";",
        ]
    )
    | header_text
)
other_methods = st.sampled_from(
    ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"]
) | st.from_regex(r"[A-Z]{3,20}", fullmatch=True).filter(lambda method: method != "POST")
trace_headers = st.dictionaries(
    st.sampled_from(["X-Cloud-Trace-Context", "traceparent"]), header_text, max_size=2
)


def _is_json_type(content_type: str) -> bool:
    """README: application/json or application/*+json, whatever the parameters."""
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


@st.composite
def hostile_requests(draw: st.DrawFn) -> RawRequest:
    """A request no caller should send: another method, another type, or a bad body."""
    kind = draw(st.sampled_from(["body", "body", "body", "type", "method", "declared"]))
    body = draw(bodies)
    framing = draw(st.sampled_from(["length", "chunked", "broken", "truncated"]))
    headers = draw(trace_headers)
    if kind == "method":
        return RawRequest(body, method=draw(other_methods), headers=headers, expect=405)
    if kind == "type":
        content_type = draw(other_types)
        expect = None if _is_json_type(content_type) else 415
        return RawRequest(body, content_type=content_type, framing=framing, expect=expect)
    if kind == "declared":
        declared = draw(st.integers(MAX_REQUEST_BYTES + 1, 10**15))
        return RawRequest(body[:100], framing="declared", declared_length=declared, expect=413)
    return RawRequest(
        body,
        content_type=draw(json_types),
        framing=framing,
        chunk_size=draw(st.integers(1, 64 * 1024)),
        headers=headers,
    )


# The hostile requests every run sends, whatever hypothesis draws: the fuzzer below tries them
# first, and the log check at the end sends them itself, so that it checks them when run alone.
KNOWN_HOSTILE = (
    RawRequest(b"[" * 100_000 + b"]" * 100_000),
    RawRequest(b"[" * 100_000 + b"]" * 100_000, framing="chunked"),
    RawRequest(b'{"images": ["x"], "prompt": ' + b"9" * 5000 + b"}"),
    RawRequest(b'{"images": ["x"], "prompt": NaN}'),
    RawRequest(b'{"images": ["\\ud800"], "prompt": "\\udfff"}'),
    RawRequest(b'{"images": ["gs://results/a.png"], "images": "x"}'),
    RawRequest(b'{"images": ["x"]}', content_type=None, expect=415),
    RawRequest(b'{"images": ["x"]}', content_type="text/plain", expect=415),
    RawRequest(b"{}", framing="declared", declared_length=MAX_REQUEST_BYTES + 1),
    RawRequest(b" " * (MAX_REQUEST_BYTES + 1), expect=413),
    RawRequest(b" " * (MAX_REQUEST_BYTES + 1), framing="chunked", chunk_size=2**20, expect=413),
    RawRequest(b'{"images": ["x"]}', framing="broken"),
    RawRequest(b'{"images": ["x"]}', framing="truncated"),
    RawRequest(b"", method="GET", content_type=None, expect=405),
    RawRequest(b'{"images": ["x"]}', method="HEAD", expect=405),
    RawRequest(b'{"images": ["x"]}', method="OPTIONS", framing="broken", expect=405),
)


def _tried_first(test: Any) -> Any:
    """Hypothesis's @example for each of KNOWN_HOSTILE."""
    for request in KNOWN_HOSTILE:
        test = example(request=request)(test)
    return test


@pytest.mark.slow
@given(request=hostile_requests())
@_tried_first
@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_hostile_raw_requests_get_a_json_answer_below_500(
    request: RawRequest, fuzz_function: Served
) -> None:
    """Raw requests no schema tool writes get JSON below 500: a stable error, or records."""
    answer = send(fuzz_function, request)

    assert answer.status < 500, (answer.status, answer.body[:500])
    if request.expect is not None or request.framing == "declared":
        assert answer.status == (request.expect or 413), (answer.status, answer.body[:500])
    assert answer.headers.get_content_type() == "application/json", answer.headers
    assert not TRACEBACK.search(answer.body.decode("utf-8", "replace")), answer.body[:2000]
    if answer.status == 405:
        assert answer.headers["Allow"] == "POST"
    if request.method == "HEAD":
        return  # no body, by HTTP
    body = json.loads(answer.body)
    if answer.status == 200:
        _assert_batch_body(body)
    else:
        _assert_error_body(body)


@pytest.mark.parametrize(
    "output",
    [
        f"gs://{RESULTS_BUCKET}\n",
        f"gs://{RESULTS_BUCKET}\n/runs/",
        f"gs://{RESULTS_BUCKET}/a\rb/",
        f"gs://{RESULTS_BUCKET}/a\nb/",
        f"gs://{RESULTS_BUCKET}/\ud800/",
        f"gs://{RESULTS_BUCKET}/" + "a" * 1000,
        f"gs://{RESULTS_BUCKET}/.well-known/acme-challenge/",
    ],
    ids=["bucket-newline", "bucket-newline-prefix", "cr", "lf", "surrogate", "long", "acme"],
)
def test_an_output_no_results_object_can_be_named_under_is_a_400(
    output: str, fuzz_function: Served
) -> None:
    """An output Cloud Storage cannot hold a results object under is refused before any work."""
    body = json.dumps({"images": [f"gs://{RESULTS_BUCKET}/a.png"], "output": output}).encode()
    answer = send(fuzz_function, RawRequest(body))
    assert answer.status == 400, (answer.status, answer.body[:300])
    assert _assert_error_body(json.loads(answer.body))["code"] == "invalid_request"


def test_the_function_logged_no_traceback_while_fuzzed(fuzz_function: Served) -> None:
    """The hostile requests, and all the fuzzers sent before, leave no traceback in the log."""
    # GIVEN the function's stdout and stderr, where every request it answered left its lines
    # WHEN the known hostile requests are sent, then a batch that ends in a log line of its own
    for request in KNOWN_HOSTILE:
        assert send(fuzz_function, request).status < 500, request
    batch = json.dumps({"images": [f"gs://{RESULTS_BUCKET}/no-such-image.png"]}).encode()
    answer = send(fuzz_function, RawRequest(batch))
    assert answer.status == 200, answer.body[:500]
    # THEN the log holds that batch's lines (it is the function's log, written up to now)
    log = fuzz_function.log.read_text(errors="replace")
    assert json.loads(answer.body)["batch_id"] in log
    # AND no traceback
    found = TRACEBACK.search(log)
    assert found is None, log[max(0, found.start() - 1500) : found.end() + 2500]


def _assert_error_body(body: Any) -> dict[str, str]:
    """``{"error": {"code": <stable code>, "message": <a sentence>}}`` and nothing else."""
    assert isinstance(body, dict) and list(body) == ["error"], body
    error = body["error"]
    assert isinstance(error, dict) and sorted(error) == ["code", "message"], error
    assert error["code"] in REQUEST_ERROR_CODES, error
    message = error["message"]
    assert isinstance(message, str) and " " in message, error
    assert re.fullmatch(r"[A-Z0-9'].*\.", message, re.DOTALL), f"not a sentence: {message!r}"
    return error


def _assert_batch_body(body: Any) -> None:
    """A 200: the batch id, where the JSONL went, the counts, the limit on model calls, and one
    record per source."""
    assert set(body) == {
        "batch_id",
        "results_uri",
        "gallery_uri",
        "counts",
        "usage",
        "model_calls",
        "results",
    }, body
    assert set(body["model_calls"]) == {"limit", "ceiling", "throttled"}, body
    assert body["results_uri"].startswith(f"gs://{RESULTS_BUCKET}/"), body
    assert sum(body["counts"].values()) == len(body["results"]) > 0, body
    for record in body["results"]:
        # Nothing generated is an image: every source ends as an error record.
        assert record["status"] == "error" and "description" not in record, record
        assert record["error"]["code"] in SOURCE_ERROR_CODES, record
        assert record["error"]["message"], record
