"""The outbound URL policy: every address class, odd spellings, credentials, schemes, and requests that go to
the checked address with each redirect hop checked again (against a server on 127.0.0.1 only)."""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.settings import Settings
from shared.urlpolicy import OutboundError, OutboundPolicy, URLRefused, address_problem, open_url

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"


def numeric_only(host: str, port: int) -> list[str]:
    """The system resolver limited to numeric hosts: the tests never send a DNS query."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    return [str(info[4][0]) for info in infos]


def table_resolver(table: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        if host in table:
            return list(table[host])
        return numeric_only(host, port)

    return resolve


def policy(**overrides) -> OutboundPolicy:
    return OutboundPolicy(**({"resolver": numeric_only, "timeout": 5.0} | overrides))


def refusal(url: str, **overrides) -> str:
    with pytest.raises(URLRefused) as info:
        policy(**overrides).check(url)
    return info.value.message


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # IPv4 classes
        ("http://127.0.0.1/", "127.0.0.1 is a loopback address"),
        ("http://127.255.255.254:8080/", "127.255.255.254 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://169.254.170.2/v2/credentials", "169.254.170.2 is a link-local address"),
        ("http://10.1.2.3/", "10.1.2.3 is a private address"),
        ("http://172.16.0.1/", "172.16.0.1 is a private address"),
        ("http://172.31.255.255/", "172.31.255.255 is a private address"),
        ("http://192.168.1.1/", "192.168.1.1 is a private address"),
        ("http://100.64.0.1/", "100.64.0.1 is a carrier-grade NAT"),
        ("http://100.127.255.254/", "carrier-grade NAT"),
        ("http://0.0.0.0/", "0.0.0.0 is an unspecified address"),
        ("http://0.1.2.3/", "'this network'"),
        ("http://224.0.0.1/", "224.0.0.1 is a multicast address"),
        ("http://239.255.255.250/", "multicast"),
        ("http://240.0.0.1/", "240.0.0.1 is a reserved address"),
        ("http://255.255.255.255/", "broadcast"),
        ("http://192.0.2.10/", "reserved"),
        ("http://198.18.0.1/", "reserved"),
        ("http://192.0.0.8/", "reserved"),
        # IPv6 classes
        ("http://[::1]/", "::1 is a loopback address"),
        ("http://[::]/", ":: is an unspecified address"),
        ("http://[fe80::1]/", "fe80::1 is a link-local address"),
        ("http://[febf:ffff::1]/", "link-local"),
        ("http://[fd00:ec2::254]/", "fd00:ec2::254 is a private (unique local fc00::/7) address"),
        ("http://[fc00::1]/", "unique local"),
        ("http://[fec0::1]/", "site-local"),
        ("http://[ff02::1]/", "ff02::1 is a multicast address"),
        ("http://[2001:db8::1]/", "reserved"),
        ("http://[100::1]/", "reserved"),
        ("http://[2001::1]/", "reserved"),  # Teredo
        ("http://[::7f00:1]/", "outside 2000::/3"),  # IPv4-compatible ::127.0.0.1
        ("http://[64:ff9b:1::a00:1]/", "NAT64"),
        # IPv4 inside IPv6
        ("http://[::ffff:127.0.0.1]/", "IPv4-mapped address of 127.0.0.1, a loopback address"),
        ("http://[::ffff:7f00:1]/", "IPv4-mapped address of 127.0.0.1"),
        ("http://[::ffff:169.254.169.254]/", "IPv4-mapped address of 169.254.169.254, a link-local"),
        ("http://[::ffff:10.0.0.1]/", "IPv4-mapped address of 10.0.0.1, a private address"),
        ("http://[::ffff:100.64.0.1]/", "carrier-grade NAT"),
        ("http://[2002:a9fe:a9fe::]/", "6to4 address of 169.254.169.254"),
        ("http://[2002:7f00:1::]/", "6to4 address of 127.0.0.1"),
        ("http://[64:ff9b::a9fe:a9fe]/", "NAT64 address of 169.254.169.254"),
        # Spellings the resolver reads as an address
        ("http://2130706433/", "2130706433 resolves to 127.0.0.1; 127.0.0.1 is a loopback address"),
        ("http://0x7f.1/", "0x7f.1 resolves to 127.0.0.1; 127.0.0.1 is a loopback"),
        ("http://0x7f000001/", "resolves to 127.0.0.1"),
        ("http://0177.0.0.1/", "resolves to 127.0.0.1"),
        ("http://017700000001/", "resolves to 127.0.0.1"),
        ("http://127.1/", "resolves to 127.0.0.1"),
        ("http://0/", "resolves to 0.0.0.0; 0.0.0.0 is an unspecified"),
        ("http://2852039166/", "resolves to 169.254.169.254; 169.254.169.254 is a link-local"),
        ("http://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254 is a link-local"),
        ("http://0251.0376.0251.0376/", "169.254.169.254 is a link-local"),
        ("http://169.254.43518/", "169.254.169.254 is a link-local"),
        ("http://10.1/", "10.0.0.1 is a private address"),
        ("http://127.0.0.1./", "loopback"),
    ],
)
def test_refuses_every_non_public_address(url, message):
    assert message in refusal(url)


def test_metadata_services_are_named():
    assert "cloud metadata" in refusal("http://169.254.169.254/")
    assert "cloud metadata" in refusal("http://[fd00:ec2::254]/")


@pytest.mark.parametrize(
    "url",
    [
        f"http://{PUBLIC_V4}/data.jsonl",
        f"https://{PUBLIC_V4}:8443/a/b?c=d",
        f"http://[{PUBLIC_V6}]/",
        "http://[::ffff:93.184.216.34]/",  # mapped public
        "http://[64:ff9b::5db8:d822]/",  # NAT64 of a public address
        "http://[2002:5db8:d822::1]/",  # 6to4 of a public address
        "http://1572395042/",  # 93.184.216.34 as one number
        "HTTPS://93.184.216.34/",
    ],
)
def test_public_addresses_pass(url):
    checked = policy().check(url)
    assert checked.addresses


def test_every_resolved_address_is_checked():
    resolver = table_resolver({"mixed.example.com": [PUBLIC_V4, "10.0.0.7"]})
    message = refusal("https://mixed.example.com/hook", resolver=resolver)
    assert message == "mixed.example.com resolves to 10.0.0.7; 10.0.0.7 is a private address"
    resolver = table_resolver({"v6.example.com": [PUBLIC_V4, "::ffff:169.254.169.254"]})
    assert "169.254.169.254, a link-local" in refusal("https://v6.example.com/", resolver=resolver)
    resolver = table_resolver({"ok.example.com": [PUBLIC_V4, PUBLIC_V6]})
    checked = policy(resolver=resolver).check("https://OK.Example.COM./x?y=1#frag")
    assert checked.host == "ok.example.com"
    assert checked.url == "https://ok.example.com/x?y=1"
    assert [str(a) for a in checked.addresses] == [PUBLIC_V4, PUBLIC_V6]


def test_unresolvable_hosts_are_refused():
    def fail(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    assert refusal("https://nowhere.example.com/", resolver=fail) == (
        "cannot resolve nowhere.example.com: Name or service not known"
    )
    assert "no IPv4 or IPv6" in refusal("https://empty.example.com/", resolver=lambda h, p: [])


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:secret@{PUBLIC_V4}/",
        f"http://user@{PUBLIC_V4}/",
        f"http://:@{PUBLIC_V4}/",
        f"https://token@{PUBLIC_V4}:443/",
        f"http://{PUBLIC_V4}@127.0.0.1/",
    ],
)
def test_credentials_are_refused(url):
    assert "credentials in the URL" in refusal(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://93.184.216.34/data.jsonl", "got 'ftp'"),
        ("file:///etc/passwd", "got 'file'"),
        ("gopher://93.184.216.34:70/", "got 'gopher'"),
        ("javascript:alert(1)", "got 'javascript'"),
        ("data:text/plain,hello", "got 'data'"),
        ("s3://bucket/key", "got 's3'"),
        ("//93.184.216.34/x", "no scheme given"),
        ("93.184.216.34/x", "no scheme given"),
    ],
)
def test_only_http_and_https(url, message):
    text = refusal(url)
    assert "only http:// and https:// URLs are allowed" in text
    assert message in text


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("http:///path", "no host"),
        ("http://exa mple.com/", "whitespace"),
        ("http://example.com/\n", "control characters"),
        ("http://93.184.216.34\\@127.0.0.1/", "backslashes"),
        ("http://%31%32%37.0.0.1/", "percent-encoding"),
        ("http://[fe80::1%25eth0]/", "zone ids"),
        ("http://93.184.216.34:0/", "port 0"),
        ("http://93.184.216.34:70000/", "malformed"),
        ("http://[::1/", "malformed"),
        ("http://exa$mple.com/", "not a valid host name"),
        ("http://" + "a" * 2100 + ".com/", "longer than 2048"),
    ],
)
def test_malformed_urls_are_refused(url, message):
    assert message in refusal(url)


def test_https_only():
    assert "only https://" in refusal(f"http://{PUBLIC_V4}/", https_only=True)
    policy(https_only=True).check(f"https://{PUBLIC_V4}/")


def test_allow_list_of_host_patterns():
    resolver = table_resolver(
        {
            "hooks.example.com": [PUBLIC_V4],
            "data.example.com": [PUBLIC_V4],
            "example.com.evil.net": [PUBLIC_V4],
            "internal.example.com": ["10.0.0.3"],
        }
    )
    allowed = ("*.example.com", "203.0.113.9")
    for url in ("https://hooks.example.com/x", "https://DATA.example.com./y"):
        policy(resolver=resolver, allowed_hosts=allowed).check(url)
    message = refusal("https://example.com.evil.net/", resolver=resolver, allowed_hosts=allowed)
    assert "example.com.evil.net is not in this deployment's outbound allow-list" in message
    # The allow-list narrows; it never lets a private address through.
    assert "private" in refusal("https://internal.example.com/", resolver=resolver, allowed_hosts=allowed)


def test_loopback_allowance_covers_loopback_only():
    allow = {"allow_loopback": True}
    policy(**allow).check("http://127.0.0.1:8080/")
    policy(**allow).check("http://[::1]:8080/")
    policy(**allow).check("http://[::ffff:127.0.0.1]/")
    policy(**allow).check("http://2130706433/")
    for url in ("http://169.254.169.254/", "http://10.0.0.1/", "http://[fd00:ec2::254]/", "http://0.0.0.0/"):
        refusal(url, **allow)


def test_loopback_hatch_is_honoured_only_in_tests(tmp_path):
    test = OutboundPolicy.from_settings(
        Settings(home=tmp_path, environment="test", outbound_allow_loopback=True)
    )
    assert test.allow_loopback
    # Outside the test environment the settings refuse to start with the hatch open.
    with pytest.raises(ValueError, match="test hook"):
        Settings(home=tmp_path, outbound_allow_loopback=True)
    assert not OutboundPolicy.from_settings(Settings(home=tmp_path, environment="test")).allow_loopback


def test_settings_feed_the_policy(tmp_path):
    settings = Settings(
        home=tmp_path,
        outbound_https_only=True,
        outbound_allowed_hosts=["*.Example.com"],
        outbound_max_redirects=1,
        outbound_timeout_seconds=7,
    )
    built = OutboundPolicy.from_settings(settings)
    assert (built.https_only, built.allowed_hosts, built.max_redirects, built.timeout) == (
        True,
        ("*.example.com",),
        1,
        7,
    )
    assert OutboundPolicy.from_settings(settings, timeout=2).timeout == 2


def test_address_problem_table():
    cases = {
        "8.8.8.8": None,
        "1.1.1.1": None,
        PUBLIC_V6: None,
        "127.0.0.1": "a loopback address",
        "::ffff:192.168.0.1": "an IPv4-mapped address of 192.168.0.1, a private address",
    }
    for address, expected in cases.items():
        assert address_problem(ipaddress.ip_address(address)) == expected
    assert address_problem(ipaddress.ip_address("127.0.0.1"), allow_loopback=True) is None


# Requests, against a server on 127.0.0.1.


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class LocalServer:
    """A threading HTTP server on 127.0.0.1; `routes[path](seen) -> (status, headers, body)`."""

    routes: dict[str, Callable[[Seen], tuple[int, dict[str, str], bytes]]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                seen = Seen(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
                server.seen.append(seen)
                route = server.routes.get(self.path.split("?", 1)[0])
                status, headers, body = route(seen) if route else (404, {}, b"no such path")
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "X-No-Length" not in headers:  # without it the body ends when the connection closes
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def fetch(url: str, pol: OutboundPolicy, method: str = "GET", content: bytes | None = None) -> bytes:
    with open_url(method, url, policy=pol, content=content) as response:
        return response.read()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    local = LocalServer()
    yield local
    local.close()


def test_requests_go_to_the_checked_address_with_the_name_in_host(server):
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        # First answer loopback (allowed here), then an address that must never be contacted.
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["10.255.255.1"]

    server.routes["/data"] = lambda seen: (200, {}, b"hello")
    pinned = OutboundPolicy(allow_loopback=True, resolver=rebinding, timeout=5)
    with open_url("GET", server.url("/data", host="data.example.test"), policy=pinned) as response:
        assert response.read() == b"hello"
    assert calls == ["data.example.test"]
    assert server.seen[0].headers["Host"] == f"data.example.test:{server.port}"
    assert server.seen[0].headers["User-Agent"].startswith("Tuneforge/")


def test_loopback_server_is_refused_without_the_allowance(server):
    with pytest.raises(URLRefused, match=re.escape("127.0.0.1 is a loopback address")):
        fetch(server.url("/"), policy())
    assert server.seen == []


def test_each_redirect_hop_is_checked_again(server):
    server.routes["/to-metadata"] = lambda seen: (302, {"Location": "http://169.254.169.254/latest/"}, b"")
    server.routes["/to-decimal"] = lambda seen: (301, {"Location": "http://2852039166/"}, b"")
    server.routes["/to-ftp"] = lambda seen: (307, {"Location": "ftp://example.com/x"}, b"")
    loopback = policy(allow_loopback=True)
    for path, message in (
        ("/to-metadata", "169.254.169.254 is a link-local address"),
        ("/to-decimal", "169.254.169.254 is a link-local address"),
        ("/to-ftp", "got 'ftp'"),
    ):
        with pytest.raises(URLRefused, match=re.escape(message)):
            fetch(server.url(path), loopback)


def test_redirects_are_followed_up_to_the_limit(server):
    server.routes["/a"] = lambda seen: (302, {"Location": "/b"}, b"")
    server.routes["/b"] = lambda seen: (307, {"Location": server.url("/c")}, b"")
    server.routes["/c"] = lambda seen: (200, {}, seen.method.encode() + b" " + seen.body)
    assert fetch(server.url("/a"), policy(allow_loopback=True, max_redirects=2)) == b"GET "
    with pytest.raises(OutboundError, match="stopped after 1 redirects"):
        fetch(server.url("/a"), policy(allow_loopback=True, max_redirects=1))
    # 307 keeps the method and body; 302 after a POST continues as a GET.
    loopback = policy(allow_loopback=True)
    assert fetch(server.url("/b"), loopback, "POST", b"payload") == b"POST payload"
    assert fetch(server.url("/a"), loopback, "POST", b"payload") == b"GET "


def test_unreachable_server_is_an_outbound_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OutboundError, match="could not connect"):
        fetch(f"http://127.0.0.1:{port}/", policy(allow_loopback=True))


def _certificates(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A throw-away CA and a leaf certificate for `name` (openssl CLI): (ca, leaf cert, leaf key)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=Tuneforge test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        f"/CN={name}",
    )
    (folder / "ext.cnf").write_text(f"subjectAltName=DNS:{name}\n")
    run(
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    )
    return folder / "ca.pem", folder / "leaf.pem", folder / "leaf.key"


@pytest.mark.skipif(
    subprocess.run(["which", "openssl"], capture_output=True).returncode != 0, reason="no openssl"
)
def test_https_to_the_pinned_address_verifies_the_certificate_for_the_name(tmp_path):
    ca, cert, key = _certificates(tmp_path, "hooks.example.test")
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    server = LocalServer(tls=served)
    server.routes["/hook"] = lambda seen: (200, {}, b"secure")
    names: list[str] = []
    server.tls.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[union-attr]
    trusting = ssl.create_default_context(cafile=str(ca))
    resolver = table_resolver({"hooks.example.test": ["127.0.0.1"], "other.example.test": ["127.0.0.1"]})
    pinned = OutboundPolicy(allow_loopback=True, resolver=resolver, verify=trusting, timeout=5)
    try:
        assert fetch(server.url("/hook", host="hooks.example.test"), pinned) == b"secure"
        assert names == ["hooks.example.test"]
        assert server.seen[0].headers["Host"] == f"hooks.example.test:{server.port}"
        # The certificate is checked against the URL's name, not the address connected to.
        with pytest.raises(OutboundError, match=r"CERTIFICATE_VERIFY_FAILED.*(Hostname|IP address) mismatch"):
            fetch(server.url("/hook", host="other.example.test"), pinned)
        with pytest.raises(OutboundError, match=r"CERTIFICATE_VERIFY_FAILED.*(Hostname|IP address) mismatch"):
            fetch(server.url("/hook"), pinned)
    finally:
        server.close()
