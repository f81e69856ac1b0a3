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
* **A host that stopped answering is paused**: after ``host_failures`` of its images in a row got no
  answer in time (no connection, a timeout, a body still coming at the image's deadline, a name
  that does not resolve, 429 / 5xx to the last retry), this process asks it for nothing for
  ``host_pause`` seconds - its images are transient failures at once instead of each waiting out
  its timeout (a dead CDN would hold a night's scoring for hours) - then one image tries it again:
  an answer resumes it, another failure pauses it again. An answer that is no image (404, a text
  page) is an answer: a host with many dead links is never paused.
* **Internationalized names** are asked for in their ASCII (``xn--``) form; a name that has none
  is refused (:data:`IMAGE_URI_ALLOWED`).
* **No redirects**: a 3xx answer is refused (:data:`IMAGE_URI_ALLOWED`): its target was never
  checked.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from catalog_enrichment.contracts import IMAGE_READABLE, IMAGE_URI_ALLOWED, IMAGE_WITHIN_LIMITS

__all__ = ["HOSTS", "HostBreaker", "HttpLimits", "checked_address", "read_http"]

log = logging.getLogger(__name__)

RETRY_STATUSES = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class HttpLimits:
    """How long and how often one image is tried."""

    connect_timeout: float = 3.0
    total_timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5  # seconds before the first retry; doubles after each
    host_failures: int = 5  # images of one host in a row without an answer before it is paused (0: never)
    host_pause: float = 60.0  # seconds a paused host is asked for nothing


class HostBreaker:
    """Per host and port, how many images in a row it did not answer and until when it is paused
    (the module docstring); one per process (:data:`HOSTS`), shared by the threads that read
    images."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[tuple[str, int], tuple[int, float]] = {}  # (failures in a row, paused until)

    def admits(self, host: tuple[str, int], limits: HttpLimits) -> bool:
        """Whether ``host`` may be asked now; a pause that is over admits one image, and pauses the
        host again while that one is asked (the others need not wait on it)."""
        if not limits.host_failures:
            return True
        with self._lock:
            failures, until = self._hosts.get(host, (0, 0.0))
            now = time.monotonic()
            if now < until:
                return False
            if failures >= limits.host_failures:
                self._hosts[host] = (failures, now + limits.host_pause)
            return True

    def record(self, host: tuple[str, int], limits: HttpLimits, *, answered: bool) -> None:
        """What an image asked of ``host`` got: an answer resumes it, none counts towards a pause."""
        if not limits.host_failures:
            return
        with self._lock:
            if answered:
                self._hosts.pop(host, None)
                return
            failures = self._hosts.get(host, (0, 0.0))[0] + 1
            paused = failures >= limits.host_failures
            self._hosts[host] = (failures, time.monotonic() + limits.host_pause if paused else 0.0)
        if failures == limits.host_failures:
            log.warning(
                "images from %s:%d paused for %g s: %d in a row got no answer; their products are read "
                "again by the next runs",
                *host,
                limits.host_pause,
                failures,
            )

    def clear(self) -> None:
        """Forget every host."""
        with self._lock:
            self._hosts.clear()


HOSTS = HostBreaker()


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


def _body(response: Any, max_bytes: int, deadline: float) -> tuple[bytes | None, str | None, bool]:
    """The response's body, read within ``max_bytes`` and the ``deadline``, or why not; and whether
    it came in time (a body still coming at the deadline did not)."""
    if 300 <= response.status < 400:
        return None, IMAGE_URI_ALLOWED, True
    if response.status != 200:
        return None, IMAGE_READABLE, True
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        return None, IMAGE_WITHIN_LIMITS, True
    chunks, size = [], 0
    while size <= max_bytes:
        if time.monotonic() > deadline:
            return None, IMAGE_READABLE, False
        chunk = response.read1(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > max_bytes:
        return None, IMAGE_WITHIN_LIMITS, True
    body = b"".join(chunks)
    text = response.headers.get("Content-Type", "").strip().lower().startswith("text/")
    if text and not body.startswith(_IMAGE_MAGIC):
        return None, IMAGE_READABLE, True  # a maintenance or error page answered in the image's place
    return body, None, True


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
    parts = urlsplit(uri)
    https = parts.scheme.lower() == "https"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError:  # a port out of range or not a number
        return None, IMAGE_URI_ALLOWED
    host = _ascii_host(parts.hostname or "")
    if not host:
        return None, IMAGE_URI_ALLOWED
    if not HOSTS.admits((host, port), limits):
        return None, IMAGE_READABLE
    data, reason, answered = _ask(parts, host, port, https, max_bytes, limits, allow_private)
    if answered is not None:
        HOSTS.record((host, port), limits, answered=answered)
    return data, reason


def _ask(
    parts: SplitResult,
    host: str,
    port: int,
    https: bool,
    max_bytes: int,
    limits: HttpLimits,
    allow_private: bool,
) -> tuple[bytes | None, str | None, bool | None]:
    """:func:`read_http`'s read, and whether the host answered in time (None: it was not asked)."""
    import urllib3

    deadline = time.monotonic() + limits.total_timeout  # resolving counts against the image's time too
    address, reason = checked_address(host, port, allow_private=allow_private)
    if address is None:
        return None, reason, False if reason == IMAGE_READABLE else None
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
                return None, IMAGE_URI_ALLOWED, None
            try:
                if response.status in RETRY_STATUSES and attempt < limits.retries:
                    response.close()  # its body unread: the next attempt connects afresh
                    continue
                if response.status in RETRY_STATUSES:  # busy or failing to the last retry
                    return None, IMAGE_READABLE, False
                return _body(response, max_bytes, deadline)
            except urllib3.exceptions.HTTPError:  # the body stalled or broke off
                return None, IMAGE_READABLE, False
            finally:
                response.release_conn()
    return None, IMAGE_READABLE, False
