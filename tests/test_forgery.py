"""Server-side request forgery: no URI, spelling or redirect makes the function reach inside.

A canary HTTP server on 127.0.0.1 (and on [::1] when the machine has IPv6
loopback) counts every connection it accepts. Every trick aims at the canary's
port, so a count above zero is a forgery that got through. A second server on
127.0.0.2, on the same port, stands for a web server on the internet: the
in-process runtime's address check admits exactly that one loopback address
besides the public internet, which is how redirects from an allowed server to
forbidden targets are tested. Production keeps ``netguard.is_public``; the
functions-framework test at the end runs the deployed default, widened for
nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import pytest
import requests
from aiohttp.abc import AbstractResolver, ResolveResult
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from describer import Code, Runtime, Settings, SourceError
from describer.batch import HttpSource
from describer.fetch import Fetcher
from describer.gemini import GeminiConnector
from describer.netguard import ForbiddenAddress, GuardedResolver, check_literal_host, is_public
from describer.runtime import open_pipeline
from describer.settings import GeminiAccess
from localdev import procs
from localdev.gemini_sim import RunningSimulator

from .conftest import API_KEY, INPUT_BUCKET, RESULTS_BUCKET, make_image, post_batch

PUBLIC_HOST = "127.0.0.2"  # stands for a web server on the internet
HINT = "ALLOW_PRIVATE_URLS"
_PNG = make_image(16, 16, "green", "PNG")


def _stand_in_internet(address: str) -> bool:
    """The tests' internet: every public address, plus 127.0.0.2 playing a public web server."""
    return address == PUBLIC_HOST or is_public(address)


# --- the servers ----------------------------------------------------------------------------


class _Tally:
    """Connections accepted and requests seen by a server, safe across its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections = 0
        self.requests: list[str] = []

    def connected(self) -> None:
        with self._lock:
            self.connections += 1

    def requested(self, line: str) -> None:
        with self._lock:
            self.requests.append(line)

    def reset(self) -> None:
        with self._lock:
            self.connections = 0
            self.requests = []


class _Server(ThreadingHTTPServer):
    """An HTTP server that counts every connection it accepts, before reading a byte."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        tally: _Tally,
        family: socket.AddressFamily = socket.AF_INET,
    ) -> None:
        self.address_family = family
        self.tally = tally
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, a reverse DNS query
        # that can stall offline; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", int(self.server_address[1])

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.tally.connected()
        return True


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _CanaryHandler(_Handler):
    """Answers anything with a real PNG, so a request that got through would even be described."""

    def do_GET(self) -> None:
        self.server.tally.requested(self.requestline)
        self._send(200, _PNG, Content_Type="image/png")

    do_POST = do_HEAD = do_PUT = do_GET


_HOPS = re.compile(r"/hops/(\d+)/(\d{3})/(abs|rel)")


class _PublicHandler(_Handler):
    """The "internet" server: /image.png is an image; /hops/N/CODE/STYLE?TARGET redirects.

    A /hops path redirects N times with status CODE, through itself (with
    absolute or relative Locations, per STYLE), and the last Location is
    TARGET exactly as given, sent as raw UTF-8 bytes.
    """

    def do_GET(self) -> None:
        self.server.tally.requested(self.path)
        path, _, query = self.path.partition("?")
        if path == "/image.png":
            self._send(200, _PNG, Content_Type="image/png")
            return
        match = _HOPS.fullmatch(path)
        if match is None:
            self._send(404)
            return
        hops, code, style = int(match[1]), int(match[2]), match[3]
        if hops > 1:
            location = f"/hops/{hops - 1}/{code}/{style}?{query}"
            if style == "abs":
                location = f"http://{PUBLIC_HOST}:{self.server.server_port}{location}"
        else:
            location = unquote(query)
        # http.server writes headers as latin-1; this puts the UTF-8 bytes on the wire.
        self._send(code, Location=location.encode().decode("latin-1"))


@dataclass
class Servers:
    port: int
    canary: _Tally
    public: _Tally
    ipv6: bool

    def redirect(self, target: str, *, hops: int = 1, code: int = 302, style: str = "abs") -> str:
        """A URL on the public stand-in that redirects ``hops`` times, the last time to target."""
        return (
            f"http://{PUBLIC_HOST}:{self.port}/hops/{hops}/{code}/{style}?{quote(target, safe='')}"
        )

    def fill(self, template: str) -> str:
        return template.replace("{port}", str(self.port)).replace("{public}", PUBLIC_HOST)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _bind_on_one_port(canary: _Tally, public: _Tally) -> tuple[list[_Server], int]:
    """The canary on 127.0.0.1 (and [::1]) and the public stand-in on 127.0.0.2, one port."""
    ipv6 = _has_ipv6_loopback()
    for _ in range(20):
        servers = [_Server(("127.0.0.1", 0), _CanaryHandler, canary)]
        port = int(servers[0].server_address[1])
        try:
            servers.append(_Server((PUBLIC_HOST, port), _PublicHandler, public))
            if ipv6:
                servers.append(_Server(("::1", port), _CanaryHandler, canary, socket.AF_INET6))
        except OSError:  # the port is taken on another address: try another one
            for server in servers:
                server.server_close()
            continue
        return servers, port
    raise RuntimeError("no port was free on 127.0.0.1, 127.0.0.2 and ::1 at once")


@pytest.fixture(scope="module")
def _running_servers() -> Iterator[Servers]:
    canary, public = _Tally(), _Tally()
    servers, port = _bind_on_one_port(canary, public)
    for server in servers:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield Servers(port=port, canary=canary, public=public, ipv6=len(servers) == 3)
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def servers(_running_servers: Servers) -> Servers:
    """The canary and the public stand-in, with their counts zeroed for this test."""
    _running_servers.canary.reset()
    _running_servers.public.reset()
    return _running_servers


def _settings(sim_url: str, **overrides: Any) -> Settings:
    base = Settings(
        results_bucket=RESULTS_BUCKET,
        allowed_buckets=frozenset({INPUT_BUCKET}),
        allow_private_urls=False,
        model_backoff_s=0.01,
        gemini=GeminiAccess(api_key=API_KEY, base_url=sim_url),
    )
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def guarded(gcs: storage.Client, sim_server: RunningSimulator) -> Iterator[Runtime]:
    """The production guard (ALLOW_PRIVATE_URLS off), with 127.0.0.2 admitted as "public"."""
    settings = _settings(sim_server.url)
    runtime = Runtime(
        settings=settings,
        storage_client=gcs,
        gemini=GeminiConnector(settings.gemini),
        address_allowed=_stand_in_internet,
    )
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def unguarded(gcs: storage.Client, sim_server: RunningSimulator) -> Iterator[Runtime]:
    """ALLOW_PRIVATE_URLS=true, the local-testing escape hatch: no address is refused."""
    settings = _settings(sim_server.url, allow_private_urls=True)
    runtime = Runtime(
        settings=settings, storage_client=gcs, gemini=GeminiConnector(settings.gemini)
    )
    yield runtime
    runtime.close()


def _results(runtime: Runtime, images: list[str]) -> list[dict[str, Any]]:
    reply = post_batch(runtime, {"images": images})
    assert reply.status == 200, reply.body
    results: list[dict[str, Any]] = reply.body["results"]
    return results


def _assert_refused(record: dict[str, Any], code: str, why: str) -> None:
    """The record is an error with this code and a sentence saying ``why``."""
    assert record["status"] == "error", record
    error = record["error"]
    assert error["code"] == code, error
    message = error["message"]
    assert message[0].isupper() and message.endswith("."), message
    assert why.lower() in message.lower(), message
    # Refusals of a place end with the escape hatch; refusals of a URL's shape do not,
    # since ALLOW_PRIVATE_URLS would change nothing for them.
    about_a_place = code == "forbidden_source" and not any(s in why for s in _SHAPES)
    hinted = message.endswith(f"{HINT} lifts this check, for local testing only.")
    assert hinted is about_a_place, message


_SHAPES = (
    "scheme",
    "not an http or https URL",
    "backslash",
    "no usable host",
    "not a well-formed URL",
    "redirected more than",
)


# --- the tricks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Trick:
    """A source URI ({port} is the canary's) and the reason its refusal must give."""

    uri: str
    why: str
    code: str = "forbidden_source"


LOOPBACK = "a loopback address"
SPELLING = "spelling of 127.0.0.1, a loopback address"
MAPPED = "IPv4-mapped form of 127.0.0.1, a loopback address"
PLAIN = "not a plain host name"
SCHEME = "scheme"

# Aimed at the canary: each would reach it if it were not refused.
AT_CANARY = [
    Trick("http://localhost:{port}/", "special-use domain .localhost"),
    Trick("http://LOCALHOST:{port}/", "special-use domain .localhost"),
    Trick("http://localhost.:{port}/", "special-use domain .localhost"),
    Trick("http://canary.localhost:{port}/", "a name under the special-use domain .localhost"),
    Trick("http://127.0.0.1:{port}/", LOOPBACK),
    Trick("https://127.0.0.1:{port}/", LOOPBACK),
    Trick("HTTP://127.0.0.1:{port}/", LOOPBACK),
    Trick("http://127.0.0.1.:{port}/", LOOPBACK),
    Trick("http://127.42.0.7:{port}/", LOOPBACK),
    Trick("http://127.1:{port}/", SPELLING),
    Trick("http://127.0.1:{port}/", SPELLING),
    Trick("http://0177.0.0.1:{port}/", SPELLING),
    Trick("http://0x7f.0.0.1:{port}/", SPELLING),
    Trick("http://0X7F.0.0.1:{port}/", SPELLING),
    Trick("http://0x7f000001:{port}/", SPELLING),
    Trick("http://2130706433:{port}/", SPELLING),
    Trick("http://017700000001:{port}/", SPELLING),
    Trick("http://127.000.000.001:{port}/", SPELLING),
    Trick("http://[::1]:{port}/", "::1 is the loopback address"),
    Trick("http://[0:0:0:0:0:0:0:1]:{port}/", "::1 is the loopback address"),
    Trick("http://[::ffff:127.0.0.1]:{port}/", MAPPED),
    Trick("http://[::ffff:7f00:1]:{port}/", MAPPED),
    Trick("http://[0:0:0:0:0:ffff:7f00:1]:{port}/", MAPPED),
    Trick("http://[::127.0.0.1]:{port}/", "IPv4-compatible form of 127.0.0.1"),
    Trick("http://[::ffff:0:7f00:1]:{port}/", "a reserved address"),
    Trick("http://[2002:7f00:1::]:{port}/", "6to4 form of 127.0.0.1"),
    Trick("http://[64:ff9b::7f00:1]:{port}/", "NAT64 form of 127.0.0.1"),
    Trick("http://0.0.0.0:{port}/", "0.0.0.0 is an unspecified address"),
    Trick("http://0:{port}/", "spelling of 0.0.0.0, an unspecified address"),
    Trick("http://[::]:{port}/", ":: is the unspecified address"),
    Trick("http://127.0.0.1:{port}#@example.com/", LOOPBACK),
    Trick("http://127.0.0.1:{port}?@example.com/", LOOPBACK),
    Trick("http://%31%32%37.0.0.1:{port}/", PLAIN),
    Trick("http://%6c%6f%63%61%6c%68%6f%73%74:{port}/", PLAIN),
    Trick("http://127.0.0.1%2e:{port}/", PLAIN),
    Trick("http://127.0.0.1\\.example.com:{port}/", "backslash in its host part"),
    Trick("http://[v1.127.0.0.1]:{port}/", "no usable host"),
    Trick("http://[fe80::1%25lo]:{port}/", "fe80::1 is a link-local address"),
    Trick("ftp://127.0.0.1:{port}/", SCHEME),
    Trick("gopher://127.0.0.1:{port}/_GET%20/%20HTTP/1.0%0D%0A%0D%0A", SCHEME),
    Trick("dict://127.0.0.1:{port}/info", SCHEME),
    Trick("ws://127.0.0.1:{port}/", SCHEME),
    # Credentials are refused before the host is even looked at (docs/http-api.md: invalid_source).
    Trick("http://example.com@127.0.0.1:{port}/", "credentials", "invalid_source"),
    Trick("http://example.com:443@127.0.0.1:{port}/", "credentials", "invalid_source"),
    Trick("http://example.com\\@127.0.0.1:{port}/", "credentials", "invalid_source"),
    Trick("http://127.0.0.1:{port}\\@example.com/", "credentials", "invalid_source"),
    # Not URLs at all: no scheme, or no host.
    Trick("//127.0.0.1:{port}/", "no scheme", "invalid_source"),
    Trick("127.0.0.1:{port}/x.png", "no scheme", "invalid_source"),
    Trick("localhost:{port}/x.png", "no scheme", "invalid_source"),
    Trick("http:\\\\127.0.0.1:{port}\\x.png", "no host", "invalid_source"),
    Trick("http:127.0.0.1:{port}/", "no host", "invalid_source"),
]

# Forbidden places the canary cannot stand in for: refused all the same.
ELSEWHERE = [
    Trick("http://10.0.0.1/", "10.0.0.1 is a private address"),
    Trick("http://10.255.255.254/", "a private address"),
    Trick("http://172.16.0.1/", "a private address"),
    Trick("http://172.31.255.254/", "a private address"),
    Trick("http://192.168.0.1/", "a private address"),
    Trick("http://169.254.169.254/computeMetadata/v1/", "the metadata server's address"),
    Trick("http://0xa9fea9fe/computeMetadata/v1/", "spelling of 169.254.169.254"),
    Trick("http://2852039166/computeMetadata/v1/", "spelling of 169.254.169.254"),
    Trick("http://[::ffff:169.254.169.254]/", "IPv4-mapped form of 169.254.169.254"),
    Trick("http://169.254.0.1/", "a link-local address"),
    Trick("http://metadata.google.internal/computeMetadata/v1/", "the metadata server's name"),
    Trick("http://METADATA.GOOGLE.INTERNAL./computeMetadata/v1/", "the metadata server's name"),
    Trick("http://metadata/computeMetadata/v1/", "the metadata server's name"),
    Trick("http://metadata.goog/computeMetadata/v1/", "the metadata server's name"),
    Trick("http://db.prod.internal/", "special-use domain .internal"),
    Trick("http://100.64.0.1/", "a carrier-grade NAT address"),
    Trick("http://100.127.255.254/", "a carrier-grade NAT address"),
    Trick("http://224.0.0.1/", "a multicast address"),
    Trick("http://239.255.255.250/", "a multicast address"),
    Trick("http://240.0.0.1/", "a reserved address"),
    Trick("http://255.255.255.255/", "the broadcast address"),
    Trick("http://198.18.0.1/", "a benchmarking address"),
    Trick("http://192.0.2.1/", "a documentation address"),
    Trick("http://[fe80::1]/", "a link-local address"),
    Trick("http://[fc00::1]/", "a unique local (private) address"),
    Trick("http://[fd00:ec2::254]/", "a unique local (private) address"),
    Trick("http://[fec0::1]/", "a site-local address"),
    Trick("http://[ff02::1]/", "a multicast address"),
    Trick("http://[100::1]/", "a discard-only address"),
    Trick("http://[2001:db8::1]/", "a documentation address"),
    Trick("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "a Teredo tunnel address"),
    Trick("http://[::ffff:10.0.0.1]/", "IPv4-mapped form of 10.0.0.1, a private address"),
    Trick("http://[64:ff9b::a9fe:a9fe]/", "NAT64 form of 169.254.169.254"),
    Trick("http://[2002:a9fe:a9fe::]/", "6to4 form of 169.254.169.254"),
    Trick("http://[2002:808:808::]/", "6to4 form of 8.8.8.8"),
    Trick("file:///etc/passwd", SCHEME),
    Trick("FILE:///etc/passwd", SCHEME),
    Trick("file://localhost/etc/passwd", SCHEME),
    Trick("data:image/png;base64,iVBORw0KGgo=", SCHEME),
    Trick("javascript:alert(1)", SCHEME),
    Trick("jar:http://example.com/a.jar!/x.png", SCHEME),
    Trick("netdoc:///etc/passwd", SCHEME),
]

# Where the public stand-in redirects to; {port} is the canary's.
REDIRECT_TARGETS = [
    Trick("http://127.0.0.1:{port}/", LOOPBACK),
    Trick("https://127.0.0.1:{port}/", LOOPBACK),
    Trick("HTTP://127.0.0.1:{port}/", LOOPBACK),
    Trick("http://localhost:{port}/", "special-use domain .localhost"),
    Trick("http://127.1:{port}/", SPELLING),
    Trick("http://2130706433:{port}/", SPELLING),
    Trick("http://0x7f.0.0.1:{port}/", SPELLING),
    Trick("http://0.0.0.0:{port}/", "unspecified address"),
    Trick("http://[::1]:{port}/", "the loopback address"),
    Trick("http://[::ffff:127.0.0.1]:{port}/", MAPPED),
    Trick("http://[::]:{port}/", "unspecified address"),
    Trick("//127.0.0.1:{port}/", LOOPBACK),
    Trick("http://example.com@127.0.0.1:{port}/", LOOPBACK),
    Trick("http://%31%32%37.0.0.1:{port}/", PLAIN),
    Trick("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{port}/", LOOPBACK),
    Trick("/\\127.0.0.1:{port}/", "backslash"),
    Trick("\\\\127.0.0.1:{port}/", "backslash"),
    Trick("http://127.0.0.1\\.example.com:{port}/", "backslash"),
    Trick("http://[v1.127.0.0.1]:{port}/", "no usable host"),
    Trick("http://[::ffff:127.1]:{port}/", "not a well-formed URL"),
    Trick("http://169.254.169.254/computeMetadata/v1/", "the metadata server's address"),
    Trick("http://metadata.google.internal/computeMetadata/v1/", "the metadata server's name"),
    Trick("http://10.0.0.1/", "a private address"),
    Trick("http://[fd00::1]/", "a unique local (private) address"),
    Trick("file:///etc/passwd", "not an http or https URL"),
    Trick("ftp://127.0.0.1:{port}/", "not an http or https URL"),
    Trick("gopher://127.0.0.1:{port}/_GET%20/", "not an http or https URL"),
    Trick("dict://127.0.0.1:{port}/info", "not an http or https URL"),
    Trick("data:image/png;base64,iVBORw0KGgo=", "not an http or https URL"),
]


@pytest.mark.parametrize("trick", AT_CANARY + ELSEWHERE, ids=lambda t: t.uri)
def test_every_trick_is_refused_and_the_canary_sees_nothing(
    trick: Trick, guarded: Runtime, servers: Servers
) -> None:
    """A source aimed at a forbidden address in any spelling is refused before it connects."""
    # GIVEN the canary listening on loopback and the production guard
    # WHEN a batch names the trick
    (record,) = _results(guarded, [servers.fill(trick.uri)])
    # THEN it is refused, saying why, and nothing reached the canary
    _assert_refused(record, trick.code, trick.why)
    assert (servers.canary.connections, servers.canary.requests) == (0, [])


@pytest.mark.parametrize("trick", REDIRECT_TARGETS, ids=lambda t: t.uri)
def test_a_redirect_to_a_forbidden_target_is_refused(
    trick: Trick, guarded: Runtime, servers: Servers
) -> None:
    """A public server's redirect is checked like a source, and the forbidden hop is never made."""
    # GIVEN a public server that redirects once to the trick
    source = servers.redirect(servers.fill(trick.uri))
    # WHEN a batch names that public URL
    (record,) = _results(guarded, [source])
    # THEN the public server was asked, the target refused, and the canary saw nothing
    _assert_refused(record, "forbidden_source", trick.why)
    assert "redirected to" in record["error"]["message"]
    assert len(servers.public.requests) == 1
    assert (servers.canary.connections, servers.canary.requests) == (0, [])


@pytest.mark.parametrize("style", ["abs", "rel"])
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("hops", [1, 2, 3, 4, 5])
def test_every_hop_of_a_redirect_chain_is_checked(
    hops: int, code: int, style: str, guarded: Runtime, servers: Servers
) -> None:
    """Whatever the status and however many allowed hops come first, a loopback hop is refused."""
    # GIVEN a chain of `hops` redirects through the public server, the last to loopback
    source = servers.redirect(
        f"http://127.0.0.1:{servers.port}/", hops=hops, code=code, style=style
    )
    # WHEN a batch names it
    (record,) = _results(guarded, [source])
    # THEN each public hop was followed, the loopback one refused, the canary untouched
    _assert_refused(record, "forbidden_source", LOOPBACK)
    assert len(servers.public.requests) == hops
    assert (servers.canary.connections, servers.canary.requests) == (0, [])


def test_five_redirects_are_followed_and_a_sixth_is_refused(
    guarded: Runtime, servers: Servers, sim: RunningSimulator
) -> None:
    """At most 5 redirects are followed: 5 reach the image, a 6th is refused wherever it points."""
    image = f"http://{PUBLIC_HOST}:{servers.port}/image.png"
    canary = f"http://127.0.0.1:{servers.port}/"
    # GIVEN chains of 5 and 6 redirects to a public image, and 7 towards the canary
    five, six = servers.redirect(image, hops=5), servers.redirect(image, hops=6, style="rel")
    seven = servers.redirect(canary, hops=7)
    # WHEN a batch names them
    ok, too_many, toward_canary = _results(guarded, [five, six, seven])
    # THEN five is described; six and seven stop after the fifth redirect
    assert ok["status"] == "ok", ok
    _assert_refused(too_many, "forbidden_source", "redirected more than 5 times")
    _assert_refused(toward_canary, "forbidden_source", "redirected more than 5 times")
    assert len(servers.public.requests) == 6 + 6 + 6
    assert (servers.canary.connections, servers.canary.requests) == (0, [])


@pytest.mark.parametrize(
    "uri",
    [
        "http://localhost:{port}/a.png",
        "http://127.0.0.1:{port}/a.png",
        "http://0x7f.0.0.1:{port}/a.png",
        "http://0.0.0.0:{port}/a.png",
        "http://[::ffff:127.0.0.1]:{port}/a.png",
        "http://[::1]:{port}/a.png",
        "redirect:http://127.0.0.1:{port}/a.png",
    ],
)
def test_with_the_guard_off_the_tricks_do_reach_the_canary(
    uri: str, unguarded: Runtime, servers: Servers, sim: RunningSimulator
) -> None:
    """The canary counts and the tricks are real: with ALLOW_PRIVATE_URLS=true they reach it."""
    if "[" in uri and not servers.ipv6:
        pytest.skip("this machine has no IPv6 loopback")
    source = servers.fill(uri)
    if source.startswith("redirect:"):
        source = servers.redirect(source.removeprefix("redirect:"))
    # GIVEN ALLOW_PRIVATE_URLS=true WHEN the trick is named
    (record,) = _results(unguarded, [source])
    # THEN the canary answered it (and its image was described)
    assert record["status"] == "ok", record
    assert servers.canary.connections == 1
    assert len(servers.canary.requests) == 1


def test_the_escape_hatch_lifts_only_the_address_checks(
    unguarded: Runtime, servers: Servers
) -> None:
    """ALLOW_PRIVATE_URLS=true admits private addresses, never other schemes or longer chains."""
    image = f"http://{PUBLIC_HOST}:{servers.port}/image.png"
    # GIVEN ALLOW_PRIVATE_URLS=true WHEN sources use other schemes or too many redirects
    records = _results(
        unguarded,
        [
            "file:///etc/passwd",
            servers.redirect("file:///etc/passwd"),
            servers.redirect(f"gopher://127.0.0.1:{servers.port}/_x"),
            servers.redirect(image, hops=6),
        ],
    )
    # THEN they are refused all the same, and the canary heard nothing
    _assert_refused(records[0], "forbidden_source", SCHEME)
    _assert_refused(records[1], "forbidden_source", "not an http or https URL")
    _assert_refused(records[2], "forbidden_source", "not an http or https URL")
    _assert_refused(records[3], "forbidden_source", "redirected more than 5 times")
    assert servers.canary.connections == 0


@pytest.mark.parametrize(
    "host",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.215.14",
        "[2001:4860:4860::8888]",
        "[2606:4700:4700::1111]",
        "[::ffff:8.8.8.8]",
        "example.com",
        "EXAMPLE.com.",
        "storage.googleapis.com",
        "xn--bcher-kva.example",
        "my_host.example.com",
        "100.128.0.1",
        "172.32.0.1",
        "192.169.0.1",
    ],
)
def test_public_addresses_and_names_pass_the_literal_check(host: str) -> None:
    """The guard does not over-block: public addresses and ordinary names go on to be fetched."""
    check_literal_host(host)


# --- DNS rebinding ---------------------------------------------------------------------------


class _ScriptedResolver(AbstractResolver):
    """A DNS stand-in that gives each successive lookup the next scripted answer.

    A rebinding attacker's DNS server does this with a TTL of 0: a public
    address while the name is checked, a private one when it is used.
    """

    def __init__(self, *answers: list[str]) -> None:
        self._answers = list(answers)
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        addresses = self._answers[min(len(self.lookups), len(self._answers)) - 1]
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        pass


def test_guarded_resolver_answers_are_exactly_where_aiohttp_connects(servers: Servers) -> None:
    """Private answers among public ones are dropped, and the connection goes to what is left."""
    # GIVEN a name whose DNS answer lists the canary first, then other private
    # addresses, then the one "public" address (all on the canary's port)
    mixed = ["127.0.0.1", "::1", "10.0.0.5", "169.254.169.254", PUBLIC_HOST]
    url = f"http://rebind.test:{servers.port}/image.png"

    async def fetch(resolver: AbstractResolver) -> int:
        # Why the connection cannot go anywhere else: aiohttp's TCPConnector
        # turns each ResolveResult the resolver returns into a numeric
        # sockaddr (_convert_hosts_to_addr_infos) and hands those to
        # aiohappyeyeballs, whose sock_connect sees an IP literal and never
        # calls getaddrinfo again. Its DNS cache only ever stores the
        # resolver's filtered list, IP-literal hosts skip resolvers (which is
        # why fetch.py checks them with check_literal_host), and the session
        # ignores proxy variables (trust_env is off), so no other lookup or
        # hop sits between the check and the connect.
        connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(url) as response,
        ):
            await response.read()
            return response.status

    # WHEN the guard resolves the name, and aiohttp fetches through the guard
    guard = GuardedResolver(_ScriptedResolver(mixed), allowed=_stand_in_internet)
    kept = asyncio.run(guard.resolve("rebind.test", servers.port))
    status = asyncio.run(fetch(guard))
    # THEN only the public address survives, and that is where the request went:
    # the canary, first in the answer and on the same port, heard nothing
    assert [k["host"] for k in kept] == [PUBLIC_HOST]
    assert status == 200
    assert servers.public.requests == ["/image.png"]
    assert servers.canary.connections == 0
    # AND without the guard the same answer connects to the canary, so the
    # guard's filtering is what made the difference
    assert asyncio.run(fetch(_ScriptedResolver(mixed))) == 200
    assert servers.canary.connections == 1
    assert servers.public.requests == ["/image.png"]


def test_a_name_that_rebinds_to_loopback_is_refused_on_the_lookup_that_connects(
    guarded: Runtime, servers: Servers
) -> None:
    """Every lookup that leads to a connection is checked, so a rebinding answer is refused."""
    # GIVEN DNS that answers the public address first and loopback afterwards
    dns = _ScriptedResolver([PUBLIC_HOST], ["127.0.0.1"])
    settings = _settings("http://unused.invalid")
    source = HttpSource(f"http://rebind.test:{servers.port}/image.png")

    async def fetch_twice() -> tuple[bytes, SourceError]:
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(dns, allowed=_stand_in_internet),
            # No DNS cache, so the second fetch looks the name up again, as it
            # would once a real cache entry expired.
            use_dns_cache=False,
            force_close=True,
        )
        async with aiohttp.ClientSession(connector=connector) as session:
            fetcher = Fetcher(
                session=session,
                storage_client=guarded.storage_client,
                io_executor=guarded.io_executor,
                settings=settings,
                allowed_buckets=(),
                address_allowed=_stand_in_internet,
            )
            first = await fetcher.fetch(source)
            with pytest.raises(SourceError) as caught:
                await fetcher.fetch(source)
            return first, caught.value

    # WHEN the same source is fetched twice
    first, refused = asyncio.run(fetch_twice())
    # THEN the first went to the public server; the second, rebound to loopback,
    # was refused with the reason, and the canary saw nothing
    assert first == _PNG
    assert dns.lookups == ["rebind.test", "rebind.test"]
    assert refused.code is Code.FORBIDDEN_SOURCE
    assert "rebind.test resolves only to refused addresses" in refused.message
    assert "127.0.0.1 is a loopback address" in refused.message
    assert refused.message.endswith(f"{HINT} lifts this check, for local testing only.")
    assert servers.public.requests == ["/image.png"]
    assert servers.canary.connections == 0


def test_a_name_resolving_only_to_loopback_is_refused_with_every_reason() -> None:
    """When every answer is refused, the error names each address and why."""
    guard = GuardedResolver(_ScriptedResolver(["127.0.0.1", "10.1.2.3", "fe80::1"]))
    with pytest.raises(ForbiddenAddress) as caught:
        asyncio.run(guard.resolve("internal-looking.example", 80))
    assert str(caught.value) == (
        "internal-looking.example resolves only to refused addresses: "
        "10.1.2.3 is a private address; 127.0.0.1 is a loopback address; "
        "fe80::1 is a link-local address"
    )


# --- gs:// ----------------------------------------------------------------------------------


class _StorageHandler(_Handler):
    """A stand-in Cloud Storage endpoint that knows no objects."""

    def do_GET(self) -> None:
        self.server.tally.requested(self.path)
        body = json.dumps({"error": {"code": 404, "message": "No such object."}}).encode()
        self._send(404, body, Content_Type="application/json")


@pytest.fixture
def storage_tally() -> Iterator[tuple[storage.Client, _Tally]]:
    """A storage client whose every request lands on a counting server."""
    tally = _Tally()
    server = _Server(("127.0.0.1", 0), _StorageHandler, tally)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": f"http://127.0.0.1:{server.server_address[1]}"},
    )
    yield client, tally
    server.shutdown()
    server.server_close()


def test_gs_sources_outside_the_allowed_buckets_are_refused_without_a_storage_request(
    storage_tally: tuple[storage.Client, _Tally], sim_server: RunningSimulator
) -> None:
    """A bucket outside ALLOWED_BUCKETS is refused before any request to Cloud Storage."""
    client, tally = storage_tally
    settings = _settings(sim_server.url)
    runtime = Runtime(
        settings=settings, storage_client=client, gemini=GeminiConnector(settings.gemini)
    )
    refused = [
        "gs://someone-elses-bucket/secret.png",
        f"gs://{INPUT_BUCKET}.evil.example/x.png",
        f"gs://{INPUT_BUCKET}-copy/x.png",
        "GS://someone-elses-bucket/secret.png",
    ]

    async def run(uris: list[str]) -> list[Any]:
        async with open_pipeline(
            runtime, prompt="p", allowed_buckets={INPUT_BUCKET, RESULTS_BUCKET}
        ) as pipeline:
            return await pipeline.run(uris)

    try:
        # WHEN the pipeline meets sources in buckets that are not allowed
        records = asyncio.run(run(refused))
        # THEN each is forbidden_source, naming the bucket, and storage heard nothing
        for record in records:
            assert record.error_code is Code.FORBIDDEN_SOURCE, record
            assert "is not in ALLOWED_BUCKETS" in (record.error_message or "")
        assert (tally.connections, tally.requests) == (0, [])
        # AND the counter works: an allowed bucket is asked for
        (allowed,) = asyncio.run(run([f"gs://{INPUT_BUCKET}/missing.png"]))
        assert allowed.error_code is Code.NOT_FOUND
        assert tally.connections >= 1
    finally:
        runtime.close()


# --- the deployed default, through functions-framework --------------------------------------


@pytest.fixture(scope="module")
def default_function(
    emulator_url: str, sim_server: RunningSimulator, gcs: storage.Client, function_logs: Path
) -> Iterator[str]:
    """describe_http served by functions-framework as deployed: ALLOW_PRIVATE_URLS not set."""
    port = procs.free_port()
    env = {
        "STORAGE_EMULATOR_HOST": emulator_url,
        "GOOGLE_GEMINI_BASE_URL": sim_server.url,
        "GEMINI_API_KEY": API_KEY,
        "RESULTS_BUCKET": RESULTS_BUCKET,
        "ALLOWED_BUCKETS": INPUT_BUCKET,
        # Empty reads as unset; it also masks a value this test process inherited.
        "ALLOW_PRIVATE_URLS": "",
    }
    proc = procs.start_function(
        "describe_http", port, env, log_path=function_logs / "describe_http_default.log"
    )
    yield f"http://127.0.0.1:{port}/"
    procs.stop(proc)


def test_the_deployed_default_refuses_every_trick(default_function: str, servers: Servers) -> None:
    """As deployed (ALLOW_PRIVATE_URLS unset) the function refuses every trick, reaching nothing."""
    # GIVEN the function as deployed; redirects go through 127.0.0.2, which is
    # loopback to the real check, so they are refused at their first hop
    tricks = AT_CANARY + ELSEWHERE
    redirects = [servers.redirect(servers.fill(t.uri)) for t in REDIRECT_TARGETS]
    images = [servers.fill(t.uri) for t in tricks] + redirects
    # WHEN one batch names them all
    response = requests.post(default_function, json={"images": images}, timeout=120)
    # THEN every one is refused with its reason and no server was reached
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(images)
    for trick, record in zip(tricks, results[: len(tricks)], strict=True):
        _assert_refused(record, trick.code, trick.why)
    for record in results[len(tricks) :]:
        _assert_refused(record, "forbidden_source", f"{PUBLIC_HOST} is a loopback address")
    assert response.json()["counts"] == {"ok": 0, "error": len(images)}
    assert (servers.canary.connections, servers.canary.requests) == (0, [])
    assert (servers.public.connections, servers.public.requests) == (0, [])
