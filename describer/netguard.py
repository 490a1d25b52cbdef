"""Refusing http(s) sources that point into private networks (server-side request forgery).

The check lives in the resolver that aiohttp connects through, so the address
that was checked is the address that gets the connection: DNS cannot answer
differently between the check and the connect. IP literals never reach a
resolver in aiohttp, so :func:`check_literal_host` covers them (and names that
are private by definition), and every redirect hop passes through both again.

What counts as public is spelled out here rather than left to
``ipaddress.is_global`` alone, whose tables change between Python patch
releases: the function must refuse the same addresses on every runtime.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

AddressCheck = Callable[[str], bool]

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# IANA's IPv4 special-purpose registry (the blocks not globally reachable),
# plus multicast and the reserved class E. The first match names the reason,
# so narrower blocks come before the blocks that contain them.
_V4_NOT_PUBLIC: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("169.254.169.254/32"), "the metadata server's address"),
    (_V4("0.0.0.0/8"), "an unspecified address"),
    (_V4("10.0.0.0/8"), "a private address"),
    (_V4("100.64.0.0/10"), "a carrier-grade NAT address"),
    (_V4("127.0.0.0/8"), "a loopback address"),
    (_V4("169.254.0.0/16"), "a link-local address"),
    (_V4("172.16.0.0/12"), "a private address"),
    (_V4("192.0.0.0/24"), "an IETF protocol address"),
    (_V4("192.0.2.0/24"), "a documentation address"),
    (_V4("192.88.99.0/24"), "a 6to4 relay address"),
    (_V4("192.168.0.0/16"), "a private address"),
    (_V4("198.18.0.0/15"), "a benchmarking address"),
    (_V4("198.51.100.0/24"), "a documentation address"),
    (_V4("203.0.113.0/24"), "a documentation address"),
    (_V4("224.0.0.0/4"), "a multicast address"),
    (_V4("255.255.255.255/32"), "the broadcast address"),
    (_V4("240.0.0.0/4"), "a reserved address"),
)

# IPv6 forms that carry an IPv4 address inside them. Only IPv4-mapped
# addresses are judged by the address they carry (a dual-stack socket connects
# to it); the tunnelling and translation forms are refused outright, because
# what they reach depends on gateways outside this function's view, and a
# public IPv4 host is reachable directly anyway.
_MAPPED = _V6("::ffff:0:0/96")
_V6_EMBEDDING: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/96"), "an IPv4-compatible form"),
    (_V6("64:ff9b::/96"), "a NAT64 form"),
    (_V6("2002::/16"), "a 6to4 form"),
)
_V6_NOT_PUBLIC: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("64:ff9b:1::/48"), "a local NAT64 address"),
    (_V6("100::/64"), "a discard-only address"),
    (_V6("2001::/32"), "a Teredo tunnel address"),
    (_V6("2001::/23"), "an IETF protocol address"),
    (_V6("2001:db8::/32"), "a documentation address"),
    (_V6("3fff::/20"), "a documentation address"),
    (_V6("fc00::/7"), "a unique local (private) address"),
    (_V6("fe80::/10"), "a link-local address"),
    (_V6("fec0::/10"), "a site-local address"),
    (_V6("ff00::/8"), "a multicast address"),
)
# Only this block is allocated for global unicast; the rest is reserved.
_V6_GLOBAL_UNICAST = _V6("2000::/3")

# Names that are private by definition, refused before any lookup (so the
# refusal does not depend on what the local DNS happens to answer):
# the metadata server's names, and the special-use domains localhost
# (RFC 6761) and internal (reserved by ICANN for private use).
_METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog"})
_PRIVATE_DOMAINS = ("localhost", "internal")
# A host name as DNS and every URL parser agree on it: LDH labels (underscores
# occur in real names). Anything else (percent-encoding, backslashes, other
# punctuation) is read differently by browsers, yarl and getaddrinfo.
_HOST_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")


class ForbiddenAddress(OSError):
    """The host is, or resolves only to, an address the function must not reach.

    The message is a clause saying why ("127.0.0.1 is a loopback address"),
    for the caller to put into a sentence.
    """


def address_problem(address: str) -> str | None:
    """Why ``address`` is not on the public internet, as a clause; None if it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address} is not an IP address"
    what = _not_public(ip)
    return f"{ip} is {what}" if what else None


def _not_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What kind of non-public address ``ip`` is ("a loopback address"), or None."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _not_public_v4(ip)
    if ip == ipaddress.IPv6Address("::"):
        return "the unspecified address"
    if ip == ipaddress.IPv6Address("::1"):
        return "the loopback address"
    if ip in _MAPPED:
        inner = ip.ipv4_mapped
        assert inner is not None
        kind = _not_public_v4(inner)
        return f"the IPv4-mapped form of {inner}, {kind}" if kind else None
    for v6_network, form in _V6_EMBEDDING:
        if ip in v6_network:
            return f"{form} of {_embedded_v4(ip, v6_network)}, refused whatever address it carries"
    for v6_network, kind in _V6_NOT_PUBLIC:
        if ip in v6_network:
            return kind
    if ip not in _V6_GLOBAL_UNICAST:
        return "a reserved address"
    return None if ip.is_global else "not globally routable"


def _not_public_v4(ip: ipaddress.IPv4Address) -> str | None:
    for network, kind in _V4_NOT_PUBLIC:
        if ip in network:
            return kind
    return None if ip.is_global else "not globally routable"


def is_public(address: str) -> bool:
    """True for globally routable unicast addresses (IPv4-mapped IPv6 judged by its IPv4)."""
    return address_problem(address) is None


def check_literal_host(host: str, allowed: AddressCheck = is_public) -> None:
    """Refuse a host that is an IP literal outside the allowed addresses, or a private name.

    ``host`` is the host exactly as the HTTP client will use it (yarl's
    ``raw_host``). Names that pass are left to :class:`GuardedResolver`.
    """
    bare = host.strip("[]").rstrip(".").lower()
    if ":" in bare:
        # aiohttp takes any host with a colon for an IPv6 literal and connects
        # to it without a resolver, so it must be one and must be allowed.
        address = bare.replace("%25", "%", 1)
        try:
            ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            raise ForbiddenAddress(f"{host} is not a valid IPv6 address") from None
        _require(address, allowed)
        return
    try:
        ipaddress.IPv4Address(bare)
    except ValueError:
        pass
    else:
        _require(bare, allowed)
        return
    legacy = _legacy_ipv4(bare)
    if legacy:
        # 2130706433, 0x7f.1, 0177.0.0.1: no real URL is written like this,
        # and each parser decodes (or rejects) these spellings its own way.
        what = None if allowed(legacy) else _not_public_v4(ipaddress.IPv4Address(legacy))
        why = f", {what}" if what else f"; write it as {legacy}"
        raise ForbiddenAddress(f"{host} is a decimal, hex or octal spelling of {legacy}{why}")
    if not _HOST_NAME.match(bare):
        raise ForbiddenAddress(
            f"{host!r} is not a plain host name (letters, digits, '-', '_' and dots only)"
        )
    if bare in _METADATA_NAMES:
        raise ForbiddenAddress(f"{host} is the metadata server's name")
    for domain in _PRIVATE_DOMAINS:
        if bare == domain or bare.endswith("." + domain):
            under = "" if bare == domain else "a name under "
            raise ForbiddenAddress(
                f"{host} is {under}the special-use domain .{domain}, which is never public"
            )


def _require(address: str, allowed: AddressCheck) -> None:
    if not allowed(address):
        raise ForbiddenAddress(address_problem(address) or f"{address} is not an allowed address")


def _embedded_v4(ip: ipaddress.IPv6Address, network: ipaddress.IPv6Network) -> str:
    if network.prefixlen == 16:  # 6to4: the IPv4 address follows the 2002: prefix
        return str(ip.sixtofour)
    return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))


def _legacy_ipv4(host: str) -> str:
    """Decimal, hex and octal spellings (``2130706433``, ``0x7f.1``) as dotted quads, or ''."""
    if not host or any(c not in "0123456789abcdefx." for c in host):
        return ""
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return ""


class GuardedResolver(AbstractResolver):
    """A resolver that drops every non-public answer and fails if none is left.

    aiohttp connects only to the addresses this returns (see the test
    ``test_guarded_resolver_answers_are_exactly_where_aiohttp_connects``), so a
    name cannot be checked against one answer and connected to another.
    """

    def __init__(
        self, inner: AbstractResolver | None = None, allowed: AddressCheck = is_public
    ) -> None:
        self._inner = inner or DefaultResolver()
        # Tests swap in a check that also admits one loopback address standing
        # for "the internet"; production always uses is_public.
        self._allowed = allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        check_literal_host(host, self._allowed)
        answers = await self._inner.resolve(host, port, family)
        allowed = [a for a in answers if self._allowed(a["host"])]
        if not allowed:
            refused = sorted({a["host"] for a in answers})
            if not refused:
                # Not a refusal: the name has no address (a download failure).
                raise OSError(f"{host.rstrip('.')} resolves to no address")
            reasons = "; ".join(
                address_problem(a) or f"{a} is not an allowed address" for a in refused
            )
            raise ForbiddenAddress(
                f"{host.rstrip('.')} resolves only to refused addresses: {reasons}"
            )
        return allowed

    async def close(self) -> None:
        await self._inner.close()
