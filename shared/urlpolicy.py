"""One policy for every URL Tuneforge itself requests (http(s) datasets, webhooks): no requests into the
deployment's own network.

A URL passes when:

* its scheme is http or https (https only when `TUNEFORGE_OUTBOUND_HTTPS_ONLY`);
* it carries no credentials (`user:password@`), no whitespace, control characters or backslashes;
* its host matches `TUNEFORGE_OUTBOUND_ALLOWED_HOSTS` (shell-style patterns such as `*.example.com`) when
  that list is set;
* the host resolves (getaddrinfo, so every spelling the system resolver accepts — `2130706433`, `0x7f.1`,
  `0177.0.0.1`, `[::ffff:7f00:1]` — is judged by the address it means) and EVERY address it resolves to is a
  public unicast address: not unspecified, loopback, link-local (the cloud metadata services
  169.254.169.254 and fd00:ec2::254 among them), private (10/8, 172.16/12, 192.168/16, fc00::/7, fec0::/10),
  carrier-grade NAT (100.64/10), multicast, reserved or documentation ranges; IPv4-mapped, 6to4 and NAT64
  IPv6 addresses are judged by the IPv4 address inside them.

The request then goes to the address that was checked (the URL's host is kept for the Host header and the
TLS server name), so a DNS answer that changes between the check and the connection cannot redirect it.
Redirects are followed by hand, at most `TUNEFORGE_OUTBOUND_MAX_REDIRECTS`, each hop checked again by the
same rules. Proxies from the environment are never used.

`TUNEFORGE_OUTBOUND_ALLOW_LOOPBACK` lets tests reach a server on 127.0.0.1/::1; it is honoured only when
`TUNEFORGE_ENVIRONMENT=test`.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx

from shared.settings import Environment, Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "169.254.170.23", "100.100.100.200")
)
USER_AGENT = "Tuneforge/0.1"


def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Checked in order; the first match names the refusal. Python's own is_global/is_private are not used:
# before 3.13 they misjudge IPv4-mapped and several special-purpose IPv6 ranges.
IPV4_RULES = (
    ("an unspecified", _nets("0.0.0.0/32")),
    ("a 'this network' (0.0.0.0/8)", _nets("0.0.0.0/8")),
    ("a loopback", _nets("127.0.0.0/8")),
    ("a link-local", _nets("169.254.0.0/16")),
    ("a private", _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    ("a carrier-grade NAT (100.64.0.0/10)", _nets("100.64.0.0/10")),
    ("a multicast", _nets("224.0.0.0/4")),
    ("a broadcast", _nets("255.255.255.255/32")),
    (
        "a reserved",
        _nets(
            "192.0.0.0/24",  # IETF protocol assignments
            "192.0.2.0/24",  # documentation
            "198.51.100.0/24",
            "203.0.113.0/24",
            "198.18.0.0/15",  # benchmarking
            "192.88.99.0/24",  # former 6to4 relay anycast
            "240.0.0.0/4",
        ),
    ),
)
IPV6_RULES = (
    ("an unspecified", _nets("::/128")),
    ("a loopback", _nets("::1/128")),
    ("a link-local", _nets("fe80::/10")),
    ("a private (unique local fc00::/7)", _nets("fc00::/7")),
    ("a private (site-local fec0::/10)", _nets("fec0::/10")),
    ("a multicast", _nets("ff00::/8")),
    ("a private NAT64 (64:ff9b:1::/48)", _nets("64:ff9b:1::/48")),
    (
        "a reserved",
        _nets(
            "100::/64",  # discard
            "2001::/23",  # IETF protocol assignments (Teredo among them)
            "2001:db8::/32",  # documentation
            "3fff::/20",
            "5f00::/16",  # SRv6
        ),
    ),
)
GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


class OutboundError(Exception):
    """An outbound request that could not be made (refused, unreachable, too many redirects)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class URLRefused(OutboundError):
    """The policy refused a URL; the message says why (e.g. "169.254.169.254 is a link-local address")."""


def system_resolver(host: str, port: int) -> list[str]:
    """Returns the addresses the system resolver gives for `host` (numeric spellings included)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


def address_problem(ip: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Returns why `ip` may not be contacted (e.g. "a link-local address"), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_problem(embedded, allow_loopback=allow_loopback)
            kind = "an IPv4-mapped" if ip.ipv4_mapped else ("a 6to4" if ip.sixtofour else "a NAT64")
            return f"{kind} address of {embedded}, {inner}" if inner else None
        rules, fallback = IPV6_RULES, None if ip in GLOBAL_UNICAST_V6 else "a reserved (outside 2000::/3)"
    else:
        rules, fallback = IPV4_RULES, None
    for kind, networks in rules:
        if any(ip in net for net in networks):
            if kind == "a loopback" and allow_loopback:
                return None
            note = " — a cloud metadata service" if ip in METADATA_ADDRESSES else ""
            return f"{kind} address{note}"
    if fallback:
        return f"{fallback} address"
    if isinstance(ip, ipaddress.IPv4Address) and not ip.is_global:
        return "a non-public address"
    return None


def _authority(scheme: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == (443 if scheme == "https" else 80) else f"{shown}:{port}"


@dataclass(frozen=True)
class CheckedURL:
    """A URL that passed the policy, with the addresses its host resolved to (all of them checked)."""

    url: str
    scheme: str
    host: str
    port: int
    target: str
    addresses: tuple[IPAddress, ...]

    @property
    def host_header(self) -> str:
        return _authority(self.scheme, self.host, self.port)

    def url_for(self, address: IPAddress) -> str:
        """The URL with its host replaced by `address` (the request keeps the name in Host and SNI)."""
        literal = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{literal}:{self.port}{self.target}"


@dataclass(frozen=True)
class OutboundPolicy:
    """The rules an outbound URL must pass; build it with `from_settings` outside tests."""

    https_only: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allow_loopback: bool = False
    max_redirects: int = 3
    timeout: float = 30.0
    resolver: Resolver | None = field(default=None, compare=False)
    # TLS verification as httpx takes it (tests pass a context trusting their own CA); never off.
    verify: ssl.SSLContext | bool = field(default=True, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout: float | None = None) -> OutboundPolicy:
        return cls(
            https_only=settings.outbound_https_only,
            allowed_hosts=tuple(p.lower().rstrip(".") for p in settings.outbound_allowed_hosts),
            # The settings refuse the test hook outside tests; a copy made without validation still cannot.
            allow_loopback=settings.outbound_allow_loopback and settings.environment == Environment.test,
            max_redirects=settings.outbound_max_redirects,
            timeout=timeout if timeout is not None else settings.outbound_timeout_seconds,
        )

    def check(self, url: str) -> CheckedURL:
        """Returns the checked URL with its resolved addresses, or raises URLRefused saying why."""
        if not isinstance(url, str) or not url:
            raise URLRefused("the URL is empty")
        if len(url) > 2048:
            raise URLRefused("the URL is longer than 2048 characters")
        if any(ch <= " " or ch == "\x7f" or ch == "\\" for ch in url):
            raise URLRefused("the URL contains whitespace, control characters or backslashes")
        try:
            parts = urlsplit(url)
            port_value = parts.port
        except ValueError as exc:
            raise URLRefused(f"the URL is malformed: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            shown = f"got {scheme!r}" if scheme else "no scheme given"
            raise URLRefused(f"only http:// and https:// URLs are allowed ({shown})")
        if scheme == "http" and self.https_only:
            raise URLRefused("only https:// URLs are allowed on this deployment")
        if "@" in parts.netloc:
            raise URLRefused("credentials in the URL (user:password@host) are not allowed")
        host = self._normalize_host(parts.hostname or "")
        port = port_value if port_value is not None else (443 if scheme == "https" else 80)
        if port == 0:
            raise URLRefused("port 0 is not a valid port")
        if self.allowed_hosts and not any(fnmatch.fnmatchcase(host, p) for p in self.allowed_hosts):
            raise URLRefused(
                f"{host} is not in this deployment's outbound allow-list "
                f"(TUNEFORGE_OUTBOUND_ALLOWED_HOSTS: {', '.join(self.allowed_hosts)})"
            )
        addresses = self._resolve(host, port)
        for address in addresses:
            problem = address_problem(address, allow_loopback=self.allow_loopback)
            if problem is not None:
                subject = str(address) if host == str(address) else f"{host} resolves to {address}; {address}"
                raise URLRefused(f"{subject} is {problem}")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        clean = f"{scheme}://{_authority(scheme, host, port)}{target}"
        return CheckedURL(clean, scheme, host, port, target, addresses)

    @staticmethod
    def _normalize_host(raw: str) -> str:
        host = raw.lower().rstrip(".")
        if not host:
            raise URLRefused("the URL has no host")
        if "%" in host:
            raise URLRefused(f"{raw!r}: percent-encoding and IPv6 zone ids are not allowed in the host")
        if ":" in host:  # an IPv6 literal (urlsplit strips the brackets)
            try:
                return str(ipaddress.IPv6Address(host))
            except ValueError:
                raise URLRefused(f"{raw!r} is not a valid IPv6 address") from None
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise URLRefused(f"{raw!r} is not a valid host name") from None
        if not HOSTNAME.match(host):
            raise URLRefused(f"{raw!r} is not a valid host name")
        return host

    def _resolve(self, host: str, port: int) -> tuple[IPAddress, ...]:
        resolver = self.resolver if self.resolver is not None else system_resolver
        try:
            raw = resolver(host, port)
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise URLRefused(f"cannot resolve {host}: {reason}") from None
        addresses: list[IPAddress] = []
        for value in raw:
            try:
                address = ipaddress.ip_address(value.split("%", 1)[0])
            except ValueError:
                raise URLRefused(f"{host} resolved to {value!r}, which is not an IP address") from None
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise URLRefused(f"cannot resolve {host}: no IPv4 or IPv6 address")
        return tuple(addresses)


def _connect_address(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _send_pinned(
    client: httpx.Client,
    checked: CheckedURL,
    method: str,
    headers: Mapping[str, str],
    content: bytes | None,
) -> httpx.Response:
    """Sends to the checked addresses in turn (the next one only when connecting fails)."""
    extensions = {"sni_hostname": checked.host} if checked.scheme == "https" else {}
    last: Exception | None = None
    for address in checked.addresses:
        request = client.build_request(
            method,
            checked.url_for(_connect_address(address)),
            headers={**headers, "Host": checked.host_header},
            content=content,
            extensions=extensions,
        )
        client.cookies.clear()
        try:
            return client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            last = exc
    raise OutboundError(f"could not connect to {checked.host_header}: {last}")


@contextmanager
def open_url(
    method: str,
    url: str,
    *,
    policy: OutboundPolicy,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
) -> Iterator[httpx.Response]:
    """Sends a request through the policy and yields the final (streamed, unread) response.

    Every hop is checked (scheme, credentials, allow-list, every resolved address) and sent to the address
    that was checked. 303, and 301/302 after a POST, continue as a GET without the body (as browsers do).
    Raises URLRefused when a hop is refused, OutboundError when the server cannot be reached, a hop times
    out or there are more than `policy.max_redirects` redirects.
    """
    current, body = url, content
    send_headers = {"User-Agent": USER_AGENT, **(headers or {})}
    with httpx.Client(
        trust_env=False, follow_redirects=False, timeout=policy.timeout, verify=policy.verify
    ) as client:
        for hop in range(policy.max_redirects + 1):
            checked = policy.check(current)
            try:
                response = _send_pinned(client, checked, method, send_headers, body)
            except httpx.TimeoutException as exc:
                raise OutboundError(f"{checked.host_header} did not answer in time ({exc!r})") from exc
            except httpx.HTTPError as exc:
                raise OutboundError(f"request to {checked.host_header} failed: {exc}") from exc
            location = response.headers.get("location")
            if response.status_code in REDIRECT_STATUSES and location:
                response.close()
                if hop == policy.max_redirects:
                    raise OutboundError(f"stopped after {policy.max_redirects} redirects (at {checked.url})")
                current = urljoin(checked.url, location.strip())
                if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
                    method, body = "GET", None
                    send_headers = {
                        k: v for k, v in send_headers.items() if k.lower() not in ("content-type",)
                    }
                continue
            try:
                yield response
            except httpx.TimeoutException as exc:
                raise OutboundError(f"{checked.host_header} stopped answering in time ({exc!r})") from exc
            except httpx.HTTPError as exc:
                raise OutboundError(f"reading from {checked.host_header} failed: {exc}") from exc
            finally:
                response.close()
            return
