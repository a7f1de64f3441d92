"""Where webhooks may be sent: the `OCRSITE_WEBHOOK_ALLOWED_HOSTS` allow-list and the addresses a
target resolves to.

Entries of the list (comma-separated in the environment):
- `*`: any host name;
- `hooks.example.com`: that host; `.example.com` or `*.example.com`: it and its subdomains;
- `203.0.113.7`, `[2001:db8::1]`, `10.0.0.0/8`: addresses and networks.

A URL passes when it is http(s) without credentials, its host matches an entry (an IP address host must
be covered by an address entry, or be public under `*`), and every address its host resolves to is
public or covered by an address entry. Private, loopback, link-local, shared, reserved, multicast and
unspecified addresses (and IPv4 ones mapped into IPv6) are refused unless an address entry covers
them; so `localhost` is refused under `*`, and tests allow `127.0.0.1` explicitly. The check runs when
a URL is saved and again before every delivery, whose connection then goes to the address checked
(so a name that resolves differently the second time cannot reach an internal address).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SETTING = "OCRSITE_WEBHOOK_ALLOWED_HOSTS"
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


class TargetRefused(Exception):
    """A webhook URL that may not be used; the message says why, for the person who gave it."""


@dataclass(frozen=True)
class AllowList:
    any_host: bool
    names: frozenset[str]
    suffixes: tuple[str, ...]  # ".example.com": the domain and its subdomains
    networks: tuple[Network, ...]

    @classmethod
    def parse(cls, entries: list[str]) -> AllowList:
        """Raises ImproperlyConfigured naming a malformed entry."""
        any_host, names, suffixes, networks = False, set(), [], []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                any_host = True
            elif (network := _network(entry)) is not None:
                networks.append(network)
            elif _NAME.fullmatch(entry):
                names.add(entry)
            elif entry.startswith(("*.", ".")) and _NAME.fullmatch(entry.removeprefix("*").removeprefix(".")):
                suffixes.append("." + entry.removeprefix("*").removeprefix("."))
            else:
                raise ImproperlyConfigured(f"{SETTING}: {raw!r} is not a host name, *.domain, address or network.")
        return cls(any_host, frozenset(names), tuple(suffixes), tuple(networks))

    def covers(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def host_allowed(self, host: str) -> bool:
        address = _address(host)
        if address is not None:
            return self.covers(address) or (self.any_host and is_public(address))
        return self.any_host or host in self.names or any(host.endswith(suffix) or host == suffix[1:] for suffix in self.suffixes)

    def address_allowed(self, address: Address) -> bool:
        return is_public(address) or self.covers(address)


def _network(entry: str) -> Network | None:
    try:
        return ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return None


def _address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast and not address.is_unspecified


def allow_list() -> AllowList:
    return AllowList.parse(getattr(settings, SETTING))


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str  # lower-case, IPv6 without brackets
    port: int


def parse_target(url: str, allowed: AllowList | None = None) -> Target:
    """The URL's parts if its form and host may be used (no DNS); raises TargetRefused."""
    allowed = allowed or allow_list()
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise TargetRefused("This is not a valid URL.") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefused("Webhook URLs must start with http:// or https://.")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("Webhook URLs may not contain a user name or password; deliveries are signed instead.")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise TargetRefused("This URL has no host.")
    if not allowed.host_allowed(host):
        raise TargetRefused(f"{host} is not among the hosts this server may send webhooks to ({SETTING}).")
    return Target(url=url.strip(), scheme=parts.scheme, host=host, port=port or (443 if parts.scheme == "https" else 80))


def check_addresses(target: Target, infos: list, allowed: AllowList) -> Address:
    """The first resolved address, if every one may be used; raises TargetRefused."""
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not addresses:
        raise TargetRefused(f"{target.host} does not resolve to any address.")
    for address in addresses:
        if not allowed.address_allowed(address):
            raise TargetRefused(
                f"{target.host} resolves to {address}, a private or reserved address this server may not send "
                f"webhooks to (an address entry in {SETTING} allows it)."
            )
    return addresses[0]


def _resolve_error(target: Target, exc: OSError) -> TargetRefused:
    return TargetRefused(f"{target.host} could not be resolved ({exc.strerror or exc}).")


def check_url(url: str) -> Target:
    """For saving a URL: its form, host and current addresses; raises TargetRefused."""
    allowed = allow_list()
    target = parse_target(url, allowed)
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _resolve_error(target, exc) from None
    check_addresses(target, infos, allowed)
    return target


async def aresolve(url: str) -> tuple[Target, Address]:
    """For a delivery: the target and the checked address to connect to; raises TargetRefused."""
    allowed = allow_list()
    target = parse_target(url, allowed)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _resolve_error(target, exc) from None
    return target, check_addresses(target, infos, allowed)
