"""Which hosts a payload's URL may be fetched from (no SSRF through a payload).

A URL is fetched only when its host is on FALHOOK_ARCHIVE_HOSTS (an entry covers its
subdomains; an entry without a port allows the scheme's default port only), and only
from public addresses: a name that resolves to a private, loopback, link-local or other
special address is refused unless that exact host is listed. The address checked is the
address connected to (`Resolved.address`), so a second DNS answer cannot swap it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from falhook.receiver.errors import ArchiveError, MediaFailure
from falhook.receiver.settings import split_host_entry

__all__ = ["HostRule", "Resolved", "Resolver"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Resolved:
    """A URL allowed by the rule, and the address to connect to for it."""

    scheme: str
    host: str
    port: int
    address: str  # the IP connected to; the request still names `host` (Host, TLS SNI)

    def url_for(self, url: str) -> str:
        """`url` with its host replaced by the checked address."""
        parts = urlsplit(url)
        netloc = f"[{self.address}]" if ":" in self.address else self.address
        return parts._replace(netloc=f"{netloc}:{self.port}").geturl()

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if _DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"


# (host, port) -> its addresses; the system's resolver unless a test brings its own DNS.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class HostRule:
    """FALHOOK_ARCHIVE_HOSTS, checked against a URL and the addresses its host has."""

    def __init__(self, entries: Sequence[str], *, resolver: Resolver | None = None) -> None:
        self.entries = tuple(entries)
        self._entries = [split_host_entry(entry) for entry in entries]
        self._resolver = resolver or _getaddrinfo

    def _refused(self, url: str, why: str) -> ArchiveError:
        return ArchiveError(MediaFailure.HOST_REFUSED, f"not fetched: {why} ({url})")

    def check(self, url: str) -> tuple[str, str, int, bool]:
        """(scheme, host, port, listed exactly) for an allowed URL; ArchiveError if not."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError:
            raise self._refused(url, "not a URL") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not host:
            raise self._refused(url, "only http(s) URLs are fetched")
        if parts.username or parts.password:
            raise self._refused(url, "a URL with credentials")
        port = port or _DEFAULT_PORTS[scheme]
        host = host.lower().rstrip(".")
        for entry_host, entry_port in self._entries:
            if entry_port is None and port != _DEFAULT_PORTS[scheme]:
                continue
            if entry_port is not None and port != entry_port:
                continue
            if host == entry_host:
                return scheme, host, port, True
            if host.endswith("." + entry_host):
                return scheme, host, port, False
        raise self._refused(url, f"{host}:{port} is not on FALHOOK_ARCHIVE_HOSTS")

    async def resolve(self, url: str) -> Resolved:
        """Check `url` and resolve its host: the address to connect to. ArchiveError
        (host_refused) for a host off the list or one with a non-public address that is
        not listed exactly; (unavailable) when DNS cannot answer now."""
        scheme, host, port, exact = self.check(url)
        try:
            literal: Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses: list[Address] = [literal]
        else:
            try:
                found = await self._resolver(host, port)
            except OSError as exc:
                raise ArchiveError(
                    MediaFailure.UNAVAILABLE, f"cannot resolve {host}: {exc}"
                ) from exc
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in found]
        if not addresses:
            raise ArchiveError(MediaFailure.UNAVAILABLE, f"{host} has no address")
        if not exact:
            private = [str(a) for a in addresses if not _public(a)]
            if private:
                raise self._refused(
                    url,
                    f"{host} has a private, loopback or link-local address ({private[0]}); "
                    "list that exact host to allow it",
                )
        return Resolved(scheme, host, port, str(addresses[0]))
