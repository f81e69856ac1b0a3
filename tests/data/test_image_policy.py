"""What happens to every kind of image and image_uri: pixels, or one precise reason (never a raise).

Each case names its outcome: ``None`` (decoded), or the quarantine reason the job records.
"""

from __future__ import annotations

import dataclasses
import http.server
import io
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from catalog_enrichment.config import ImagesConfig
from catalog_enrichment.data.images import (
    IMAGE_DECODABLE,
    IMAGE_READABLE,
    IMAGE_URI_ALLOWED,
    IMAGE_WITHIN_LIMITS,
    ImagePolicy,
    encode_image,
    load_pixels,
)
from catalog_enrichment.data.remote import HOSTS, HttpLimits

pytestmark = pytest.mark.timeout(120)

SIZE = 32


def _save(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with one tiny data chunk: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8), "RGB")
JPEG = encode_image(RGB)
GIF_FRAMES = [Image.new("P", (20, 20), i) for i in range(3)]

# name -> (bytes, expected reason); every one is decoded or refused with its reason
IMAGE_CASES: dict[str, tuple[bytes, str | None]] = {
    "jpeg": (JPEG, None),
    "png": (encode_image(RGB, "PNG"), None),
    "jpeg at the model's size (libjpeg-turbo path)": (encode_image(RGB.resize((SIZE, SIZE))), None),
    "cmyk jpeg": (_save(RGB.convert("CMYK"), "JPEG"), None),
    "grayscale png": (_save(RGB.convert("L"), "PNG"), None),
    "16-bit png": (_save(Image.fromarray(np.full((20, 20), 40000, np.uint16)), "PNG"), None),
    "palette png": (_save(RGB.convert("P"), "PNG"), None),
    "rgba png": (_save(RGB.convert("RGBA"), "PNG"), None),
    "animated gif (first frame)": (
        _save(GIF_FRAMES[0], "GIF", save_all=True, append_images=GIF_FRAMES[1:]),
        None,
    ),
    "webp": (_save(RGB, "WEBP"), None),
    "truncated jpeg": (JPEG[: len(JPEG) // 2], IMAGE_DECODABLE),
    "truncated png header": (encode_image(RGB, "PNG")[:30], IMAGE_DECODABLE),
    "zero-length": (b"", IMAGE_DECODABLE),
    "one byte": (b"\xff", IMAGE_DECODABLE),
    "jpeg magic then garbage": (b"\xff\xd8\xff" + b"\x00" * 200, IMAGE_DECODABLE),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>', IMAGE_DECODABLE),
    "text": (b"not an image at all\n", IMAGE_DECODABLE),
    "pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", IMAGE_DECODABLE),
    "html error page": (b"<html><body>404 Not Found</body></html>", IMAGE_DECODABLE),
    "bomb over max_pixels (8000 x 8000, 1-bit)": (
        _save(Image.new("1", (8000, 8000)), "PNG"),
        IMAGE_WITHIN_LIMITS,
    ),
    "bomb over Pillow's own limit (header only)": (_png_header_only(30000, 30000), IMAGE_WITHIN_LIMITS),
    "over max_bytes": (JPEG + b"\0" * 2_000_000, IMAGE_WITHIN_LIMITS),
    # formats outside images.formats never reach a decoder (EPS would run Ghostscript)
    "bmp (not in images.formats)": (_save(RGB, "BMP"), IMAGE_DECODABLE),
    "tiff (not in images.formats)": (_save(RGB, "TIFF"), IMAGE_DECODABLE),
    "eps (not in images.formats)": (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        IMAGE_DECODABLE,
    ),
}
POLICY = ImagePolicy(max_bytes=1_000_000, max_pixels=40_000_000)


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_every_kind_of_image_bytes_decodes_or_gets_its_reason(name: str) -> None:
    data, reason = IMAGE_CASES[name]
    pixels, got = load_pixels(data, None, SIZE, policy=POLICY)
    assert got == reason
    if reason is None:
        assert pixels is not None and pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    else:
        assert pixels is None


def test_formats_are_an_allowlist_the_config_extends() -> None:
    bmp = _save(RGB, "BMP")
    policy = ImagePolicy.from_config(ImagesConfig(formats=["jpeg", "png", "bmp"]))
    pixels, reason = load_pixels(bmp, None, SIZE, policy=policy)
    assert reason is None and pixels is not None
    # JPEG left out: not even the libjpeg-turbo path decodes it
    assert load_pixels(JPEG, None, SIZE, policy=ImagePolicy(formats=("PNG",)))[1] == IMAGE_DECODABLE
    assert (
        load_pixels(encode_image(RGB.resize((SIZE, SIZE))), None, SIZE, policy=ImagePolicy(formats=("PNG",)))[
            1
        ]
        == IMAGE_DECODABLE
    )


def test_a_tracking_pixel_or_an_icon_is_refused_by_the_decoder_and_the_header_check_alike() -> None:
    """A 1 x 1 GIF or a strip under ``images.min_side`` is no product photo: scored, it would be one
    flat colour; a stored vector's bytes (``allows_bytes``) are held to the same rule."""
    policy = ImagePolicy.from_config(ImagesConfig(min_side=20))
    for (width, height), reason in {
        (1, 1): IMAGE_WITHIN_LIMITS,
        (19, 48): IMAGE_WITHIN_LIMITS,
        (48, 19): IMAGE_WITHIN_LIMITS,
        (20, 20): None,
    }.items():
        for fmt in ("JPEG", "PNG", "GIF"):
            data = _save(RGB.resize((width, height)), fmt)
            assert load_pixels(data, None, SIZE, policy=policy)[1] == reason, (width, height, fmt)
            assert policy.allows_bytes(data) == (reason is None), (width, height, fmt)
    # a JPEG at the model's own size (the libjpeg-turbo path) is held to it too
    assert load_pixels(encode_image(RGB.resize((8, 8))), None, 8)[1] == IMAGE_WITHIN_LIMITS
    # the default lets through every image the synthetic generator draws (16 px and up)
    assert ImagePolicy().min_side == ImagesConfig().min_side <= 16


def test_no_image_at_all_is_not_an_error() -> None:
    assert load_pixels(None, None, SIZE) == (None, None)
    assert load_pixels(None, "", SIZE) == (None, None)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """``root/`` (allowed) with an image, a link to it, a link out, a FIFO; ``outside/`` beside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (root / "images" / "a.jpg").write_bytes(JPEG)
    (root / "images" / "blue dress é.jpg").write_bytes(JPEG)
    (outside / "secret.jpg").write_bytes(JPEG)
    (root / "images" / "inside-link.jpg").symlink_to(root / "images" / "a.jpg")
    (root / "images" / "out-link.jpg").symlink_to(outside / "secret.jpg")
    (root / "images" / "dir-link").symlink_to(outside, target_is_directory=True)
    os.mkfifo(root / "images" / "pipe.jpg")
    (root / "images" / "big.jpg").write_bytes(JPEG + b"\0" * 3_000_000)
    yield tmp_path


def _uri_cases(t: Path) -> dict[str, tuple[str, str | None]]:
    images = t / "root" / "images"
    return {
        "absolute path under the root": (str(images / "a.jpg"), None),
        "file:// URI under the root": (f"file://{images / 'a.jpg'}", None),
        "file:// URI percent-encoded": ((images / "blue dress é.jpg").as_uri(), None),
        "file://localhost URI": (f"file://localhost{images / 'a.jpg'}", None),
        "file:/ URI, as Spark's binaryFile writes it": (f"file:{images / 'a.jpg'}", None),
        "FILE:// URI in upper case": (f"FILE://{images / 'a.jpg'}", None),
        "file:// URI of another host": (f"file://elsewhere{images / 'a.jpg'}", IMAGE_URI_ALLOWED),
        "dot-dot percent-encoded": (f"file://{images}/%2e%2e/%2e%2e/outside/secret.jpg", IMAGE_URI_ALLOWED),
        "symlink inside the root": (str(images / "inside-link.jpg"), None),
        "symlink out of the root": (str(images / "out-link.jpg"), IMAGE_URI_ALLOWED),
        "directory symlink out of the root": (str(images / "dir-link" / "secret.jpg"), IMAGE_URI_ALLOWED),
        "path outside the root": (str(t / "outside" / "secret.jpg"), IMAGE_URI_ALLOWED),
        "dot-dot out of the root": (f"{images}/../../outside/secret.jpg", IMAGE_URI_ALLOWED),
        "dot-dot staying inside": (f"{images}/../images/a.jpg", IMAGE_URI_ALLOWED),
        "relative path": ("images/a.jpg", IMAGE_URI_ALLOWED),
        "/etc/passwd": ("/etc/passwd", IMAGE_URI_ALLOWED),
        "/proc/self/environ": ("/proc/self/environ", IMAGE_URI_ALLOWED),
        "/dev/zero": ("/dev/zero", IMAGE_URI_ALLOWED),
        "a FIFO under the root": (str(images / "pipe.jpg"), IMAGE_URI_ALLOWED),
        "a directory under the root": (str(images), IMAGE_URI_ALLOWED),
        "missing file under the root": (str(images / "gone.jpg"), IMAGE_READABLE),
        "file over max_bytes": (str(images / "big.jpg"), IMAGE_WITHIN_LIMITS),
        "NUL byte in the path": (f"{images}/a.jpg\x00.png", IMAGE_URI_ALLOWED),
        "https not configured": ("https://example.com/a.jpg", IMAGE_URI_ALLOWED),
        "s3 not configured": ("s3://bucket/a.jpg", IMAGE_URI_ALLOWED),
        "unknown scheme": ("gopher://host/a.jpg", IMAGE_URI_ALLOWED),
    }


def test_image_uris_are_read_only_under_the_roots_and_schemes(tree: Path) -> None:
    policy = ImagePolicy.from_config(ImagesConfig(max_bytes=1_000_000), [tree / "root"])
    for name, (uri, reason) in _uri_cases(tree).items():
        pixels, got = load_pixels(None, uri, SIZE, policy=policy)
        assert got == reason, name
        assert (pixels is not None) == (reason is None), name


def test_what_the_policy_refuses_without_reading_is_what_reading_refuses(tree: Path) -> None:
    """``refuses`` (checked before a stored vector is reused) refuses what ``read`` refuses for where
    the URI points; only what reading alone shows (a FIFO, a directory) is left to the read."""
    policy = ImagePolicy.from_config(ImagesConfig(max_bytes=1_000_000), [tree / "root"])
    found_by_reading = {"a FIFO under the root", "a directory under the root"}
    for name, (uri, reason) in _uri_cases(tree).items():
        expected = IMAGE_URI_ALLOWED if reason == IMAGE_URI_ALLOWED and name not in found_by_reading else None
        assert policy.refuses(uri) == expected, name
    assert ImagePolicy(schemes=("s3",), hosts=("cdn",)).refuses("s3://other/a.jpg") == IMAGE_URI_ALLOWED
    assert ImagePolicy(schemes=("s3",), hosts=("cdn",)).refuses("s3://cdn/a.jpg") is None
    assert ImagePolicy(schemes=("http",)).refuses("http://[::1/a.jpg") == IMAGE_URI_ALLOWED  # malformed


def test_the_default_policy_reads_no_uri_at_all(tree: Path) -> None:
    uri = str(tree / "root" / "images" / "a.jpg")
    assert load_pixels(None, uri, SIZE) == (None, IMAGE_URI_ALLOWED)
    # inline bytes win over a URI, whatever the URI is
    pixels, reason = load_pixels(JPEG, "/etc/passwd", SIZE)
    assert reason is None and pixels is not None


class _Server:
    """A real HTTP server on a loopback port: ``/a.jpg`` (the JPEG), ``/redirect`` (302 to it),
    ``/flaky`` (503 twice, then the JPEG), ``/stall`` (headers, then a body that never comes),
    ``/silent`` (no answer at all), ``/busy`` (503 always), ``/trickle`` (a body slower than any
    image's time); ``paths`` records every request, ``hosts`` its Host header."""

    def __init__(self, root: Path) -> None:
        self.paths: list[str] = []
        self.hosts: list[str | None] = []
        self.flaky = 0
        paths, hosts, server = self.paths, self.hosts, self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kw: object) -> None:
                super().__init__(*args, directory=str(root), **kw)  # type: ignore[arg-type]

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                paths.append(self.path)
                hosts.append(self.headers.get("Host"))
                if self.path == "/silent":
                    threading.Event().wait(5)
                    return
                if self.path == "/redirect":  # to the image: a client that follows it gets pixels
                    self.send_response(302)
                    self.send_header("Location", "/a.jpg")
                    self.end_headers()
                    return
                if self.path == "/busy":
                    self.send_error(503)
                    return
                if self.path == "/trickle":  # a byte every 0.1 s: never done in an image's time
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    try:
                        for _ in range(50):
                            self.wfile.write(b"\xff")
                            self.wfile.flush()
                            time.sleep(0.1)
                    except OSError:  # the client gave up
                        pass
                    return
                if self.path == "/flaky":
                    server.flaky += 1
                    if server.flaky <= 2:
                        self.send_error(503)
                        return
                    self.path = "/a.jpg"
                if self.path == "/stall":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"\xff\xd8")
                    self.wfile.flush()
                    threading.Event().wait(5)
                    return
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[_Server]:
    (tmp_path / "a.jpg").write_bytes(JPEG)
    server = _Server(tmp_path)
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


FAST = HttpLimits(connect_timeout=0.5, total_timeout=1.0, retries=2, backoff=0.05)


def test_remote_uris_never_reach_private_addresses_unless_allowed(http_server: _Server) -> None:
    uri = f"{http_server.url}/a.jpg"
    closed = ImagePolicy(roots=("/",))
    assert load_pixels(None, uri, SIZE, policy=closed)[1] == IMAGE_URI_ALLOWED  # http not configured
    public_only = ImagePolicy(schemes=("http",))
    assert load_pixels(None, uri, SIZE, policy=public_only)[1] == IMAGE_URI_ALLOWED  # loopback
    for host in ("localhost", "10.0.0.1", "169.254.169.254", "[::1]", "192.168.1.1", "0.0.0.0"):
        assert public_only.read(f"http://{host}/a.jpg") == (None, IMAGE_URI_ALLOWED), host
    for port in ("99999", "abc"):  # not a port: refused, not an error
        assert public_only.read(f"http://cdn.example:{port}/a.jpg") == (None, IMAGE_URI_ALLOWED), port
    assert http_server.paths == []
    allowed = ImagePolicy(schemes=("http",), allow_private_addresses=True, http=FAST)
    pixels, reason = load_pixels(None, uri, SIZE, policy=allowed)
    assert reason is None and pixels is not None
    assert load_pixels(None, f"{http_server.url}/gone.jpg", SIZE, policy=allowed)[1] == IMAGE_READABLE
    # a redirect is refused, not followed (it could lead anywhere): its target is never asked for
    http_server.paths.clear()
    assert load_pixels(None, f"{http_server.url}/redirect", SIZE, policy=allowed)[1] == IMAGE_URI_ALLOWED
    assert http_server.paths == ["/redirect"]
    small = ImagePolicy(schemes=("http",), allow_private_addresses=True, max_bytes=100, http=FAST)
    assert load_pixels(None, uri, SIZE, policy=small)[1] == IMAGE_WITHIN_LIMITS


def test_a_host_is_resolved_once_so_a_rebinding_answer_reaches_nothing(
    http_server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name resolves to a public address for the check, then to the loopback server: the
    connection goes to the checked address (unreachable here), never to the second answer."""
    real = socket.getaddrinfo
    answers = iter(["93.184.216.34"] + ["127.0.0.1"] * 50)

    def rebinding(host: object, port: object, *args: object, **kw: object) -> object:
        if host == "images.example":
            address = next(answers)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]
        return real(host, port, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    policy = ImagePolicy(
        schemes=("http",), http=HttpLimits(connect_timeout=0.5, total_timeout=1.0, retries=0)
    )
    assert policy.read(f"http://images.example:{http_server.port}/a.jpg") == (None, IMAGE_READABLE)
    assert http_server.paths == []


def test_a_name_that_does_not_resolve_now_is_read_again_not_refused(
    http_server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS down (EAI_AGAIN) is transient, as a host that does not answer is; and resolving counts
    against the image's time: a name that resolves only after it is spent reaches nothing."""
    real = socket.getaddrinfo

    def resolve(host: object, port: object, *args: object, **kw: object) -> object:
        if host == "down.example":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host == "slow.example":
            time.sleep(FAST.total_timeout + 0.1)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]
        return real(host, port, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    policy = ImagePolicy(schemes=("http", "https"), allow_private_addresses=True, http=FAST)
    assert policy.read("https://down.example/a.jpg") == (None, IMAGE_READABLE)
    assert policy.read(f"http://slow.example:{http_server.port}/a.jpg") == (None, IMAGE_READABLE)
    assert http_server.paths == []
    # an address refused is still refused for good
    assert ImagePolicy(schemes=("http",), http=FAST).read(f"{http_server.url}/a.jpg") == (
        None,
        IMAGE_URI_ALLOWED,
    )


def test_a_page_answered_in_the_images_place_is_read_again_not_undecodable(
    http_server: _Server, tmp_path: Path
) -> None:
    """A CDN in maintenance answers ``200`` with an HTML (or plain text) page where the image should
    be: unreadable now (the next runs read it again), not a product whose image is no image. A
    photo a host labels ``text/plain`` (an extension-less URL) is read as the photo it is."""
    (tmp_path / "maintenance.html").write_bytes(b"<html><body>Back soon</body></html>")
    (tmp_path / "maintenance.txt").write_bytes(b"Service temporarily unavailable")
    policy = ImagePolicy(schemes=("http",), allow_private_addresses=True, http=FAST)
    for name in ("maintenance.html", "maintenance.txt"):
        assert load_pixels(None, f"{http_server.url}/{name}", SIZE, policy=policy) == (None, IMAGE_READABLE)
    pixels, reason = load_pixels(None, f"{http_server.url}/a.jpg", SIZE, policy=policy)  # image/jpeg
    assert reason is None and pixels is not None
    (tmp_path / "labelled.txt").write_bytes((tmp_path / "a.jpg").read_bytes())
    labelled, reason = load_pixels(None, f"{http_server.url}/labelled.txt", SIZE, policy=policy)
    assert reason is None and labelled is not None and np.array_equal(labelled, pixels)


def test_slow_and_flaky_hosts_are_bounded_and_retried(http_server: _Server) -> None:
    policy = ImagePolicy(schemes=("http",), allow_private_addresses=True, http=FAST)
    pixels, reason = load_pixels(None, f"{http_server.url}/flaky", SIZE, policy=policy)
    assert reason is None and pixels is not None and http_server.paths == ["/flaky"] * 3
    no_retries = ImagePolicy(schemes=("http",), allow_private_addresses=True, http=HttpLimits(retries=0))
    http_server.flaky = 0
    assert load_pixels(None, f"{http_server.url}/flaky", SIZE, policy=no_retries)[1] == IMAGE_READABLE
    started = time.monotonic()
    assert load_pixels(None, f"{http_server.url}/stall", SIZE, policy=policy)[1] == IMAGE_READABLE
    assert time.monotonic() - started < 4 * FAST.total_timeout  # not the 5 s the server stalls


def test_a_host_that_never_answers_takes_the_images_time_once_not_per_attempt(http_server: _Server) -> None:
    policy = ImagePolicy(schemes=("http",), allow_private_addresses=True, http=FAST)
    started = time.monotonic()
    assert policy.read(f"{http_server.url}/silent") == (None, IMAGE_READABLE)
    assert time.monotonic() - started < FAST.total_timeout + 0.5  # three attempts took three times it
    assert http_server.paths == ["/silent"]  # no time left to try again


def test_a_host_that_stops_answering_is_paused_then_tried_again(
    http_server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    """After ``host_failures`` images in a row without an answer (here 503 to the last retry), the
    host is asked for nothing until its pause is over - even a good photo is a transient failure at
    once - then one image tries it: a failure pauses it again at once, an answer resumes it. An
    answer that is no image (404) resets the count: dead links never pause a host."""
    limits = HttpLimits(connect_timeout=0.5, total_timeout=1.0, retries=0, host_failures=2, host_pause=1.0)
    policy = ImagePolicy(schemes=("http",), allow_private_addresses=True, http=limits)
    url = http_server.url
    for path in ("/busy", "/gone.jpg", "/busy", "/gone.jpg", "/gone.jpg", "/gone.jpg"):
        assert policy.read(url + path) == (None, IMAGE_READABLE), path
    assert policy.read(url + "/a.jpg")[1] is None  # a 404 between two 503s: never two in a row
    for path in ("/busy", "/busy"):
        assert policy.read(url + path) == (None, IMAGE_READABLE)
    asked = len(http_server.paths)
    assert "paused for 1 s: 2 in a row got no answer" in caplog.text
    for _ in range(10):
        assert policy.read(url + "/a.jpg") == (None, IMAGE_READABLE)
    assert len(http_server.paths) == asked  # paused: nothing asked
    time.sleep(limits.host_pause)
    assert policy.read(url + "/busy") == (None, IMAGE_READABLE)  # the one image that tries it again
    assert policy.read(url + "/a.jpg") == (None, IMAGE_READABLE)  # failed: paused again at once
    assert http_server.paths[asked:] == ["/busy"]
    time.sleep(limits.host_pause)
    for _ in range(3):
        assert policy.read(url + "/a.jpg")[1] is None  # answered: resumed
    # a body still coming at the image's deadline got no answer in time either
    trickled = ImagePolicy(
        schemes=("http",), allow_private_addresses=True, http=dataclasses.replace(FAST, host_failures=2)
    )
    for _ in range(2):
        assert trickled.read(url + "/trickle") == (None, IMAGE_READABLE)
    asked = len(http_server.paths)
    assert trickled.read(url + "/a.jpg") == (None, IMAGE_READABLE) and len(http_server.paths) == asked
    never = ImagePolicy(
        schemes=("http",), allow_private_addresses=True, http=dataclasses.replace(limits, host_failures=0)
    )
    for path in ("/busy", "/busy", "/busy", "/a.jpg"):
        assert never.read(url + path)[1] == (None if path == "/a.jpg" else IMAGE_READABLE)


def test_a_silent_host_costs_its_pause_threshold_in_timeouts_not_one_per_image(
    http_server: _Server, tmp_path: Path
) -> None:
    """A host that takes no request (a dead CDN) costs ``host_failures`` timeouts, not one per image;
    another host is read as before."""
    limits = dataclasses.replace(FAST, host_failures=2, host_pause=60.0)
    policy = ImagePolicy(schemes=("http",), allow_private_addresses=True, http=limits)
    started = time.monotonic()
    for _ in range(20):
        assert policy.read(f"{http_server.url}/silent") == (None, IMAGE_READABLE)
    assert time.monotonic() - started < 2 * FAST.total_timeout + 1.0  # 20 timeouts without the pause
    assert http_server.paths == ["/silent"] * 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.jpg").write_bytes(JPEG)
    other = _Server(tmp_path / "other")
    thread = threading.Thread(target=other.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        assert policy.read(f"{other.url}/a.jpg")[1] is None
    finally:
        other.httpd.shutdown()
        other.httpd.server_close()
    assert ImagePolicy.from_config(ImagesConfig(host_failures=7, host_pause_seconds=5)).http == HttpLimits(
        host_failures=7, host_pause=5.0
    )
    assert HOSTS.admits(("127.0.0.1", http_server.port), limits) is False


def test_internationalized_host_names_are_asked_for_in_their_ascii_form(
    http_server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS, TLS and the Host header name an IDN host as ``xn--``: the raw name in a header failed
    the whole scoring task (Latin-1 cannot encode it). A name with no ASCII form is refused."""
    real = socket.getaddrinfo
    asked: list[object] = []

    def resolve(host: object, port: object, *args: object, **kw: object) -> object:
        asked.append(host)
        if str(host).startswith("xn--"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]
        return real(host, port, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    policy = ImagePolicy(schemes=("http",), allow_private_addresses=True, http=FAST)
    for name, ascii_name in (("例え.jp", "xn--r8jz45g.jp"), ("bücher.example", "xn--bcher-kva.example")):
        body, reason = policy.read(f"http://{name}:{http_server.port}/a.jpg")
        assert reason is None and body == JPEG, name
        assert http_server.hosts[-1] == f"{ascii_name}:{http_server.port}"
        assert ascii_name in asked and name not in asked
    assert policy.read(f"http://{'ü' * 70}.example/a.jpg") == (None, IMAGE_URI_ALLOWED)  # label too long


def test_hosts_allowlist_and_object_stores_need_listing(http_server: _Server) -> None:
    listed = ImagePolicy(
        schemes=("http", "s3"), allow_private_addresses=True, hosts=("cdn.example",), http=FAST
    )
    assert listed.read(f"{http_server.url}/a.jpg") == (None, IMAGE_URI_ALLOWED)  # 127.0.0.1 not listed
    assert http_server.paths == []
    # s3 is read with the job's own credentials: only a bucket named in images.hosts
    assert ImagePolicy(schemes=("s3",)).read("s3://marketplace-private/secrets.jpg") == (
        None,
        IMAGE_URI_ALLOWED,
    )
    assert listed.read("s3://marketplace-private/secrets.jpg") == (None, IMAGE_URI_ALLOWED)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_remote_host_that_does_not_answer_is_unreadable_not_an_error() -> None:
    policy = ImagePolicy(schemes=("http",), allow_private_addresses=True, http=FAST)
    assert (
        load_pixels(None, f"http://127.0.0.1:{_free_port()}/a.jpg", SIZE, policy=policy)[1] == IMAGE_READABLE
    )


REASONS = {None, IMAGE_DECODABLE, IMAGE_WITHIN_LIMITS}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=512).map(lambda b: b"\xff\xd8\xff" + b),  # JPEG magic, then anything
        st.binary(max_size=512).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
        st.integers(0, len(JPEG)).map(lambda n: JPEG[:n]),  # every truncation
        st.tuples(st.integers(0, len(JPEG) - 1), st.integers(0, 255)).map(
            lambda p: JPEG[: p[0]] + bytes([p[1]]) + JPEG[p[0] + 1 :]  # one corrupted byte
        ),
    )
)
def test_any_bytes_give_pixels_or_a_reason_and_never_raise(data: bytes) -> None:
    pixels, reason = load_pixels(data, None, SIZE, policy=POLICY)
    assert reason in REASONS
    assert (pixels is None) == (reason is not None)
    if pixels is not None:
        assert pixels.shape == (SIZE, SIZE, 3)


SEGMENTS = st.sampled_from(
    ["..", ".", "images", "a.jpg", "outside", "secret.jpg", "out-link.jpg", "dir-link", ""]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(SEGMENTS, max_size=6), st.sampled_from(["root", "outside", ""]), st.booleans())
def test_no_generated_path_reads_a_file_outside_the_root(
    tree: Path, parts: list[str], start: str, uri: bool
) -> None:
    policy = ImagePolicy(roots=(str(tree / "root"),))
    path = "/".join([str(tree / start) if start else str(tree), *parts])
    data, reason = policy.read(f"file://{path}" if uri else path)
    if data is not None:  # only ever the one image under the root
        real = os.path.realpath(path)
        assert real.startswith(str(tree / "root") + os.sep) and data == JPEG
    else:
        assert reason in {IMAGE_URI_ALLOWED, IMAGE_READABLE}
