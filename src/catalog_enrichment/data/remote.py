"""Reading a product image over HTTP(S) from a merchant's URI without trusting its host.

* **Resolved once**: the host is resolved, every address it has is checked (no loopback, private,
  link-local, reserved or multicast address unless allowed) and the connection goes to the address
  that was checked — the client never resolves the name again, so a DNS answer that changes between
  the check and the connection (rebinding to 169.254.169.254) reaches nothing. TLS still verifies
  the certificate against the host name (SNI and ``Host`` are the name).
* **Bounded**: a connect timeout, and a total time per image across attempts, backoff and a slow
  body: each attempt gets only the time left.
* **Retried**: connection errors, timeouts and 429 / 5xx answers are tried again with exponential
  backoff while time is left; what still fails is a *transient* failure (:data:`IMAGE_READABLE`,
  read again by the next runs), as is a name that does not resolve now (DNS down or slow) and a
  ``200`` with a ``text/*`` body that is no image (a CDN's maintenance page where the image should
  be; an image a host labelled ``text/plain`` is read as one).
* **Internationalized names** are asked for in their ASCII (``xn--``) form; a name that has none
  is refused (:data:`IMAGE_URI_ALLOWED`).
* **No redirects**: a 3xx answer is refused (:data:`IMAGE_URI_ALLOWED`): its target was never
  checked.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from catalog_enrichment.contracts import IMAGE_READABLE, IMAGE_URI_ALLOWED, IMAGE_WITHIN_LIMITS

__all__ = ["HttpLimits", "checked_address", "read_http"]

RETRY_STATUSES = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class HttpLimits:
    """How long and how often one image is tried."""

    connect_timeout: float = 3.0
    total_timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5  # seconds before the first retry; doubles after each


def checked_address(host: str, port: int, *, allow_private: bool) -> tuple[str | None, str | None]:
    """The address to connect to for ``host``, resolved once, every address public (unless private
    ones are allowed); or ``(None, reason)``: :data:`IMAGE_URI_ALLOWED` for an address refused or a
    name no DNS query can carry, :data:`IMAGE_READABLE` for a name that does not resolve now."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:  # e.g. a label over 63 characters
        return None, IMAGE_URI_ALLOWED
    except OSError:  # socket.gaierror: DNS down, slow or without an answer today
        return None, IMAGE_READABLE
    addresses = [str(info[4][0]).split("%")[0] for info in infos]
    if not addresses:
        return None, IMAGE_READABLE
    if not allow_private:
        for text in addresses:
            address = ipaddress.ip_address(text)
            if not address.is_global or address.is_multicast:
                return None, IMAGE_URI_ALLOWED
    return addresses[0], None


def _pool(address: str, port: int, host: str, https: bool, limits: HttpLimits) -> Any:
    """A one-connection pool to the checked ``address`` (TLS: the certificate checked for ``host``)
    that retries nothing and follows no redirect: :func:`read_http` tries again within its
    deadline."""
    import urllib3

    timeout = urllib3.Timeout(connect=limits.connect_timeout, read=limits.total_timeout)
    if not https:
        return urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False, maxsize=1)
    return urllib3.HTTPSConnectionPool(
        address, port, timeout=timeout, retries=False, maxsize=1, server_hostname=host, assert_hostname=host
    )


def _ascii_host(host: str) -> str | None:
    """``host`` as DNS, TLS and the ``Host`` header name it (an internationalized name in its
    ``xn--`` form), or ``None`` where it has none."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def _body(response: Any, max_bytes: int, deadline: float) -> tuple[bytes | None, str | None]:
    """The response's body, read within ``max_bytes`` and the ``deadline``, or why not."""
    if 300 <= response.status < 400:
        return None, IMAGE_URI_ALLOWED
    if response.status != 200:
        return None, IMAGE_READABLE
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        return None, IMAGE_WITHIN_LIMITS
    chunks, size = [], 0
    while size <= max_bytes:
        if time.monotonic() > deadline:
            return None, IMAGE_READABLE
        chunk = response.read1(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > max_bytes:
        return None, IMAGE_WITHIN_LIMITS
    body = b"".join(chunks)
    text = response.headers.get("Content-Type", "").strip().lower().startswith("text/")
    if text and not body.startswith(_IMAGE_MAGIC):
        return None, IMAGE_READABLE  # a maintenance or error page answered in the image's place
    return body, None


# how the image formats the decoder reads begin: a text/* answer that begins so is an image a host
# labelled wrong (an extension-less URL on a server whose default type is text/plain)
_IMAGE_MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"RIFF",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)


def read_http(
    uri: str, *, max_bytes: int, limits: HttpLimits, allow_private: bool
) -> tuple[bytes | None, str | None]:
    """The body at an ``http``/``https`` URI, or ``(None, reason)`` (see the module docstring)."""
    import urllib3

    parts = urlsplit(uri)
    https = parts.scheme.lower() == "https"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError:  # a port out of range or not a number
        return None, IMAGE_URI_ALLOWED
    host = _ascii_host(parts.hostname or "")
    if not host:
        return None, IMAGE_URI_ALLOWED
    deadline = time.monotonic() + limits.total_timeout  # resolving counts against the image's time too
    address, reason = checked_address(host, port, allow_private=allow_private)
    if address is None:
        return None, reason
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    name = host if ":" not in host else f"[{host}]"
    headers = {"Host": name if parts.port is None else f"{name}:{parts.port}"}
    with _pool(address, port, host, https, limits) as pool:
        for attempt in range(limits.retries + 1):
            if attempt:  # exponential backoff, within the image's time
                pause = limits.backoff * 2 ** (attempt - 1)
                if time.monotonic() + pause >= deadline:
                    break
                time.sleep(pause)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            timeout = urllib3.Timeout(connect=min(limits.connect_timeout, left), read=left)
            try:
                response = pool.urlopen(
                    "GET", path, headers=headers, redirect=False, preload_content=False, timeout=timeout
                )
            except urllib3.exceptions.HTTPError:  # connection, timeout, TLS: tried again
                continue
            except (UnicodeError, ValueError):  # a request that cannot be sent as asked
                return None, IMAGE_URI_ALLOWED
            try:
                if response.status in RETRY_STATUSES and attempt < limits.retries:
                    response.close()  # its body unread: the next attempt connects afresh
                    continue
                return _body(response, max_bytes, deadline)
            except urllib3.exceptions.HTTPError:  # the body stalled past the deadline or broke off
                return None, IMAGE_READABLE
            finally:
                response.release_conn()
    return None, IMAGE_READABLE
