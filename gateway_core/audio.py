"""Audio input: fetch it from a URL within limits and measure its duration from the bytes themselves."""

from __future__ import annotations

import io
import ipaddress
import socket
from urllib.parse import urlsplit

import httpx
import mutagen

from gateway_core.errors import PayloadTooLargeError, ValidationFailedError


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


def _check_public(host: str) -> None:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise _bad_url(f"audio_url host {host!r} does not resolve") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved:
            raise _bad_url(f"audio_url host {host!r} is on a private network")


def _bad_url(message: str) -> ValidationFailedError:
    return ValidationFailedError(message, details={"fields": [{"field": "audio_url", "message": message}]})


def fetch_audio(url: str, *, max_bytes: int, timeout: float, allow_private: bool) -> tuple[bytes, str]:
    """Download audio_url (bytes, content type), refusing private hosts unless allowed and bodies over max_bytes."""
    host = urlsplit(url).hostname or ""
    if not allow_private:
        _check_public(host)
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=False) as resp:
            if resp.status_code != 200:
                raise _bad_url(f"audio_url answered HTTP {resp.status_code}")
            chunks: list[bytes] = []
            size = 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLargeError(
                        f"audio at audio_url is larger than {max_bytes} bytes", details={"limit": max_bytes}
                    )
                chunks.append(chunk)
            return b"".join(chunks), resp.headers.get("content-type", "application/octet-stream")
    except httpx.HTTPError as exc:
        raise _bad_url(f"audio_url could not be fetched: {exc.__class__.__name__}") from None
