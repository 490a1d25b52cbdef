"""Refusing http(s) sources that point into private networks (server-side request forgery).

The check lives in the resolver that aiohttp connects through, so the address
that was checked is the address that gets the connection: DNS cannot answer
differently between the check and the connect. IP literals never reach a
resolver in aiohttp, so :func:`check_literal_host` covers them, and every
redirect hop passes through both again.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

# The metadata server is link-local (caught by address) but also has names
# that resolve only inside Google Cloud; refuse them by name as well.
_FORBIDDEN_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog"})


class ForbiddenAddress(OSError):
    """The host is, or resolves only to, an address the function must not reach."""


def is_public(address: str) -> bool:
    """True for globally routable unicast addresses, IPv4-mapped IPv6 included."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            ip = mapped
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


AddressCheck = Callable[[str], bool]


def check_literal_host(host: str, allowed: AddressCheck = is_public) -> None:
    """Refuse a host that is an IP literal (or forbidden name) outside the public internet."""
    bare = host.strip("[]").rstrip(".").lower()
    if bare in _FORBIDDEN_NAMES:
        raise ForbiddenAddress(f"{host} is the metadata server")
    try:
        ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        bare = _legacy_ipv4(bare)
        if not bare:
            return  # a name: the resolver checks what it resolves to
    if not allowed(bare):
        raise ForbiddenAddress(f"{host} is not a public address")


def _legacy_ipv4(host: str) -> str:
    """Decimal, hex and octal spellings (``2130706433``, ``0x7f.1``) as dotted quads, or ''."""
    if not host or any(c not in "0123456789abcdefx." for c in host):
        return ""
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return ""


class GuardedResolver(AbstractResolver):
    """A resolver that drops every non-public answer and fails if none is left."""

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
            seen = ", ".join(sorted({a["host"] for a in answers})) or "nothing"
            raise ForbiddenAddress(f"{host.rstrip('.')} resolves to {seen}, not a public address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
