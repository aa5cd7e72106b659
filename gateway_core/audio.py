"""Audio input: fetch it from a URL within limits and measure its duration from the bytes themselves."""

from __future__ import annotations

import io
import ipaddress
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import httpx
import mutagen

from gateway_core.errors import PayloadTooLargeError, ValidationFailedError
from gateway_core.models import CONTENT_TYPE_LENGTH


def measure_seconds(data: bytes) -> float:
    """Duration of an audio file in seconds; ValidationFailedError when it is not audio we can read."""
    try:
        parsed = mutagen.File(io.BytesIO(data))
    except Exception as exc:  # mutagen raises many unrelated types for corrupt input
        raise _not_audio(f"audio could not be parsed: {exc}") from None
    length = getattr(getattr(parsed, "info", None), "length", None)
    if parsed is None or not length or length <= 0:
        raise _not_audio("the upload is not a supported audio file (wav, mp3, flac, ogg, m4a)")
    return float(length)


def _not_audio(message: str) -> ValidationFailedError:
    return ValidationFailedError(message, details={"fields": [{"field": "file", "message": message}]})


# IPv6 prefixes whose last 32 bits are an IPv4 address a gateway translates to: NAT64 (well-known and
# local-use) and the deprecated IPv4-compatible form.
_EMBEDDING_IPV4 = [ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96")]


def is_public_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast, including the IPv4 address an IPv6 one embeds (mapped, 6to4, Teredo,
    NAT64, IPv4-compatible): 100.64.0.0/10, multicast, reserved, private, loopback and link-local are not."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is None and any(addr in net for net in _EMBEDDING_IPV4):
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
    return addr.is_global and not addr.is_multicast


def content_type(value: str | None) -> str | None:
    """A content type as stored: the media type alone (no parameters), when it is printable and fits the
    column; None otherwise (the bytes are measured, not trusted by their label)."""
    media = (value or "").split(";", 1)[0].strip().lower()
    if not media or len(media) > CONTENT_TYPE_LENGTH or not media.isprintable() or not media.isascii():
        return None
    return media


def resolve_public(host: str) -> str:
    """The address to connect to for ``host``: every address it resolves to must be public (a name that
    resolves to one private address among public ones is refused too)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise _bad_url(f"audio_url host {host!r} does not resolve") from None
    addrs = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addrs or not all(is_public_address(a) for a in addrs):
        raise _bad_url(f"audio_url host {host!r} is not on the public internet")
    return str(addrs[0])


def _bad_url(message: str) -> ValidationFailedError:
    return ValidationFailedError(message, details={"fields": [{"field": "audio_url", "message": message}]})


def fetch_audio(url: str, *, max_bytes: int, timeout: float, allow_private: bool) -> tuple[bytes, str]:
    """Download audio_url (bytes, content type), refusing private hosts unless allowed and bodies over max_bytes."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    request_url, headers, extensions = url, {}, {}
    if not allow_private:
        # Connect to the address just checked, so a name that resolves anew (DNS rebinding) cannot
        # move the request elsewhere; the Host header and TLS server name stay the URL's.
        address = resolve_public(host)
        literal = f"[{address}]" if ":" in address else address
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        request_url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        headers = {"Host": parts.netloc.rpartition("@")[2]}
        extensions = {"sni_hostname": host}
    deadline = time.monotonic() + timeout  # httpx's timeout is per read; a trickle must end too
    try:
        # Redirects are not followed: a 3xx is refused like any answer but 200. No proxy from the
        # environment: it would resolve the name again, and see the pinned address as the TLS server name.
        with (
            httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
            client.stream("GET", request_url, headers=headers, extensions=extensions) as resp,
        ):
            if resp.status_code != 200:
                raise _bad_url(f"audio_url answered HTTP {resp.status_code}")
            chunks: list[bytes] = []
            size = 0
            for chunk in resp.iter_bytes():
                if time.monotonic() > deadline:
                    raise _bad_url(f"audio_url took longer than {timeout:g} s to download")
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLargeError(
                        f"audio at audio_url is larger than {max_bytes} bytes", details={"limit": max_bytes}
                    )
                chunks.append(chunk)
            return b"".join(chunks), content_type(resp.headers.get("content-type")) or "application/octet-stream"
    except httpx.HTTPError as exc:
        raise _bad_url(f"audio_url could not be fetched: {exc.__class__.__name__}") from None
