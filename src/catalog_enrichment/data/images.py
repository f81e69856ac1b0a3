"""Image bytes: encoding pictures, and reading and decoding any product image under the image
policy (the synthetic pictures are drawn by :mod:`.render`)."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import simplejpeg
from PIL import ExifTags, Image

from catalog_enrichment.config import IMAGE_FORMATS, ImagesConfig
from catalog_enrichment.contracts import (
    IMAGE_DECODABLE,
    IMAGE_READABLE,
    IMAGE_SHARED,
    IMAGE_URI_ALLOWED,
    IMAGE_WITHIN_LIMITS,
    image_key,
)
from catalog_enrichment.data.remote import HttpLimits, read_http
from catalog_enrichment.health import ProductInputs

__all__ = [
    "DECODE_VERSION",
    "DECODE_VERSIONS",
    "IMAGE_DECODABLE",
    "IMAGE_READABLE",
    "IMAGE_URI_ALLOWED",
    "IMAGE_WITHIN_LIMITS",
    "ImagePolicy",
    "check_images",
    "decode_image",
    "encode_image",
    "image_source",
    "image_tone",
    "load_pixels",
    "read_pixels",
    "shared_images",
    "usable_images",
]

# How image bytes become RGB pixels. 1: the first models' decode (alpha dropped, so transparent
# pixels show whatever colour they store, often black; 16-bit samples clipped to 255; the EXIF
# orientation ignored). 2: as an image viewer shows the image (transparent pixels over white,
# 16-bit samples scaled to 8 bits, turned upright by its EXIF orientation). A model keeps the decode
# it was trained with (:class:`~catalog_enrichment.data.preprocess.ImagePreprocessing`); new models
# get the latest.
DECODE_VERSIONS = (1, 2)
DECODE_VERSION = DECODE_VERSIONS[-1]


_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def encode_image(image: Image.Image | np.ndarray, fmt: str = "JPEG", quality: int = 88) -> bytes:
    """Encode an RGB image (PIL or ``(H, W, 3)`` uint8 array) as JPEG or PNG bytes."""
    buf = io.BytesIO()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, "RGB")
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# Never read, whatever the configured roots say: kernel and device files.
_NEVER = ("/proc", "/dev", "/sys")


@dataclass(frozen=True)
class ImagePolicy:
    """What may be read for a product image: ``image_uri`` only under ``roots`` (resolved, so a
    symlink out of them is refused; never ``/proc``, ``/dev``, ``/sys``, ``..`` or anything but a
    regular file) and with an allowed scheme; http(s) through :mod:`.remote` (resolved once, never to
    a loopback, private or link-local address unless allowed, timeouts and retries), only from
    ``hosts`` when it is not empty; other remote schemes (object stores, read with the job's own
    credentials) through fsspec only for buckets listed in ``hosts``; at most ``max_bytes`` read and
    ``max_pixels`` decoded, no side under ``min_side`` (a tracking pixel or an icon is no product
    photo), and only by the Pillow decoders of ``formats``. The default policy reads no
    ``image_uri`` at all (inline bytes only).
    """

    roots: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ("file",)
    allow_private_addresses: bool = False
    hosts: tuple[str, ...] = ()
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    min_side: int = 16
    formats: tuple[str, ...] = IMAGE_FORMATS
    http: HttpLimits = field(default_factory=HttpLimits)

    @classmethod
    def from_config(cls, cfg: ImagesConfig, roots: Iterable[str | Path] = ()) -> ImagePolicy:
        """``cfg``'s policy with ``roots`` (e.g. the products table's folder) allowed besides its own."""
        return cls(
            roots=tuple(str(r) for r in [*roots, *cfg.roots]),
            schemes=tuple(s.lower() for s in cfg.schemes),
            allow_private_addresses=cfg.allow_private_addresses,
            hosts=tuple(h.lower() for h in cfg.hosts),
            max_bytes=cfg.max_bytes,
            max_pixels=cfg.max_pixels,
            min_side=cfg.min_side,
            formats=tuple(f.upper() for f in cfg.formats),
            http=HttpLimits(
                cfg.connect_timeout_seconds,
                cfg.timeout_seconds,
                cfg.retries,
                host_failures=cfg.host_failures,
                host_pause=cfg.host_pause_seconds,
            ),
        )

    def allows_bytes(self, data: bytes) -> bool:
        """Whether inline image bytes are within the policy - their size, a format of ``formats``,
        at most ``max_pixels`` and no side under ``min_side`` - judged on the header alone, nothing
        decoded: a product fused from its stored vector is held to today's policy, as a fresh read
        would be."""
        if len(data) > self.max_bytes:
            return False
        try:
            with Image.open(io.BytesIO(data), formats=self.formats) as image:
                return _within_limits(image, self.max_pixels, self.min_side)
        except Exception:  # not an image of these formats, or over Pillow's own limit
            return False

    def refuses(self, uri: str) -> str | None:
        """:data:`IMAGE_URI_ALLOWED` where ``uri`` lies outside the policy (its scheme, host, bucket or
        local root), else None: decided without reading it, so a product fused from its stored
        vector is held to the policy of today's run, not to the one its image was read under."""
        scheme, host = _scheme_and_host(uri)
        if scheme in ("", "file"):
            return None if self._local_path(_file_path(uri)) else IMAGE_URI_ALLOWED
        if scheme not in self.schemes or (self.hosts and host not in self.hosts):
            return IMAGE_URI_ALLOWED
        # an object store answers with the job's credentials: listed buckets only
        if scheme not in ("http", "https") and not self.hosts:
            return IMAGE_URI_ALLOWED
        return None

    def read(self, uri: str) -> tuple[bytes | None, str | None]:
        """The bytes at ``uri``, or ``(None, reason)``: :data:`IMAGE_URI_ALLOWED` (outside the
        policy), :data:`IMAGE_WITHIN_LIMITS` (too big), :data:`IMAGE_READABLE` (cannot be read now)."""
        refused = self.refuses(uri)
        if refused is not None:
            return None, refused
        scheme, _ = _scheme_and_host(uri)
        if scheme in ("", "file"):
            return self._read_local(_file_path(uri))
        if scheme in ("http", "https"):
            return read_http(
                uri, max_bytes=self.max_bytes, limits=self.http, allow_private=self.allow_private_addresses
            )
        try:
            import fsspec

            with fsspec.open(uri, "rb") as f:
                return self._capped(f.read(self.max_bytes + 1))
        except Exception:  # fsspec backends raise their own error types
            return None, IMAGE_READABLE

    def _capped(self, data: bytes) -> tuple[bytes | None, str | None]:
        return (data, None) if len(data) <= self.max_bytes else (None, IMAGE_WITHIN_LIMITS)

    def _local_path(self, text: str) -> str | None:
        """The real path of a local image the policy allows, else None."""
        if (
            "file" not in self.schemes
            or "\x00" in text
            or not os.path.isabs(text)
            or ".." in Path(text).parts
        ):
            return None
        real = os.path.realpath(text)
        return None if _under(real, _NEVER) or not _under(real, _real_roots(self.roots)) else real

    def _read_local(self, text: str) -> tuple[bytes | None, str | None]:
        real = self._local_path(text)
        if real is None:
            return None, IMAGE_URI_ALLOWED
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block
        except OSError:
            return None, IMAGE_READABLE
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # a directory, FIFO, device or socket
                return None, IMAGE_URI_ALLOWED
            if info.st_size > self.max_bytes:
                return None, IMAGE_WITHIN_LIMITS
            return self._capped(_read_fd(fd, self.max_bytes + 1))
        except OSError:
            return None, IMAGE_READABLE
        finally:
            os.close(fd)


def _file_path(uri: str) -> str:
    """The local path of a bare path or a ``file:`` URI (its scheme in any case): ``file:///a%20b.jpg``
    (what ``Path.as_uri`` writes), ``file://localhost/a%20b.jpg`` and ``file:/a%20b.jpg`` (what
    Spark's ``binaryFile`` source and Hadoop write) are ``/a b.jpg``; a bare path is taken as it is
    (a ``%`` in a file name is one)."""
    if uri[:5].lower() != "file:":
        return uri
    rest = uri[5:]
    if rest.startswith("//"):
        rest = rest[2:]
        rest = rest[len("localhost") :] if rest[:10].lower() == "localhost/" else rest
    return unquote(rest)


def _scheme_and_host(uri: str) -> tuple[str, str]:
    """A URI's scheme ("" for a bare path) and host, lower case."""
    if "://" not in uri:
        return "", ""
    try:
        parts = urlsplit(uri)
        return parts.scheme.lower(), (parts.hostname or "").lower()
    except ValueError:  # e.g. an unbalanced IPv6 bracket: no scheme a policy lists
        return "?", ""


def image_source(uri: object) -> str | None:
    """Where an ``image_uri`` is read from: ``scheme://host``, with the port where the URI names
    one (an object store's bucket is its host), ``file`` for a local path; None for no URI. The
    photos of one source fail together when its host is down or answers every request with its
    outage image."""
    if not isinstance(uri, str) or not uri:
        return None
    scheme, host = _scheme_and_host(uri)
    if scheme in ("", "file"):
        return "file"
    try:
        port = urlsplit(uri).port
    except ValueError:  # not a port: the reader refuses the URI
        port = None
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def _read_fd(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd``."""
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


@cache
def _real_roots(roots: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(os.path.realpath(r) for r in roots)


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def load_pixels(
    raw: object,
    uri: object,
    size: int,
    interpolation: str = "bilinear",
    policy: ImagePolicy | None = None,
    decode: int = DECODE_VERSION,
) -> tuple[np.ndarray | None, str | None]:
    """A product's image as ``(size, size, 3)`` uint8 pixels, and why not when it cannot be used.

    The one image path of training, evaluation and serving: inline bytes win over ``image_uri``,
    which is read under ``policy`` (default: :class:`ImagePolicy`'s, no URI at all). Returns
    ``(pixels, None)``; ``(None, None)`` when the product has no image at all; else ``(None,
    reason)``: :data:`IMAGE_URI_ALLOWED`, :data:`IMAGE_READABLE`, :data:`IMAGE_WITHIN_LIMITS` (too
    many bytes or pixels, or a side under the policy's ``min_side``) or :data:`IMAGE_DECODABLE` (the
    bytes are not an image).
    """
    pixels, reason, _ = read_pixels(raw, uri, size, interpolation, policy, decode)
    return pixels, reason


def read_pixels(
    raw: object,
    uri: object,
    size: int,
    interpolation: str = "bilinear",
    policy: ImagePolicy | None = None,
    decode: int = DECODE_VERSION,
) -> tuple[np.ndarray | None, str | None, str | None]:
    """:func:`load_pixels`, and the digest of the image bytes read, inline or from ``image_uri``
    (:func:`~catalog_enrichment.contracts.image_key`, the key validation gives inline bytes; None
    when none were read or they are no image). The same bytes on many products are a placeholder
    (:func:`shared_images`): a CDN's outage image served under each product's own URL is found only
    by reading it."""
    policy = policy or _DEFAULT_POLICY
    data: bytes | None
    if isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
        if len(data) > policy.max_bytes:
            return None, IMAGE_WITHIN_LIMITS, None
    elif isinstance(uri, str) and uri:
        data, reason = policy.read(uri)
        if data is None:
            return None, reason, None
    else:
        return None, None, None
    pixels, reason = _decode(data, size, interpolation, policy, decode)
    return pixels, reason, image_key(data) if reason is None else None


def shared_images(
    product_ids: Sequence[object] | pa.ChunkedArray,
    digests: Sequence[str | None] | pa.ChunkedArray,
    limit: int,
    known: Iterable[str] = (),
) -> set[str]:
    """The image digests (:func:`read_pixels`) on more than ``limit`` distinct products, and those of
    ``known`` (placeholders found before) that are there: placeholders (none when ``limit`` is 0,
    the rule off, as ``validation.max_products_per_image`` says)."""
    if not limit:
        return set()
    if not isinstance(digests, pa.ChunkedArray):
        digests = pa.chunked_array([pa.array(digests, pa.string())])
    rows = pa.table({"product_id": product_ids, "digest": digests})
    per_image = (
        rows.filter(pc.is_valid(rows["digest"]))
        .group_by("digest")
        .aggregate([("product_id", "count_distinct")])
    )
    over = pc.greater(per_image["product_id_count_distinct"], limit)
    again = pc.is_in(per_image["digest"], value_set=pa.array(sorted(set(known)), pa.string()))
    return set(per_image.filter(pc.or_(over, again))["digest"].to_pylist())


_DEFAULT_POLICY = ImagePolicy()


def image_tone(pixels: np.ndarray) -> float:
    """A photo's colour balance, mean red minus mean blue of ``(H, W, 3)`` uint8 pixels (warm > 0 >
    cool; 0 for a grey or black-and-white photo): the run health checks' photo-style statistic."""
    means = pixels.reshape(-1, 3).mean(axis=0, dtype=np.float64)
    return float(means[0] - means[2])


# usable or not, and the colour balance, hardly depend on the size an image is read at
_CHECK_SIZE = 32


def check_images(
    rows: pa.Table | pa.RecordBatch, policy: ImagePolicy, shared_limit: int = 0, known: Iterable[str] = ()
) -> tuple[ProductInputs, list[str | None], list[str | None]]:
    """Training's image-usability check of products table rows (a table or a batch of one): each
    row's image read as serving reads it; returns the rows' inputs for the run health baseline
    (image state and colour balance included), per row why its image cannot be used (None: usable
    or absent) and the digest of its image bytes (None: none read). Serving quarantines a product
    whose image exists but cannot be used, so training leaves those out; with ``shared_limit``,
    also the products whose image bytes are on more than that many products of ``rows`` or are
    among ``known`` (placeholders earlier runs found; :data:`IMAGE_SHARED`: a placeholder, not their
    photo)."""
    names = rows.schema.names

    def column(name: str) -> list[object]:
        return rows.column(name).to_pylist() if name in names else [None] * rows.num_rows

    read = [
        read_pixels(b, u, _CHECK_SIZE, policy=policy)
        for b, u in zip(column("image"), column("image_uri"), strict=True)
    ]
    digests = [d for _, _, d in read]
    shared = shared_images(column("product_id"), digests, shared_limit, known)
    errors = [IMAGE_SHARED if d in shared and e is None else e for (_, e, d) in read]
    tones = [None if p is None else image_tone(p) for p, _, _ in read]
    return ProductInputs.of(rows, errors, tones), errors, digests


def usable_images(
    rows: pa.Table | pa.RecordBatch, policy: ImagePolicy
) -> tuple[np.ndarray, list[str | None]]:
    """Which rows have an image that can be used (present, and :func:`check_images` finds nothing
    wrong with it), what pre-training on images reads, and each row's image digest (None: none read)."""
    inputs, errors, digests = check_images(rows, policy)
    return np.asarray(inputs.image_present, bool) & np.array([e is None for e in errors], bool), digests


def decode_image(
    data: bytes | None,
    size: int | None = None,
    interpolation: str = "bilinear",
    decode: int = DECODE_VERSION,
) -> np.ndarray | None:
    """Decode image bytes to an RGB ``(H, W, 3)`` uint8 array, or ``None`` when they are not an image
    (or one outside :class:`ImagePolicy`'s default pixel limits); ``decode`` is a :data:`DECODE_VERSIONS`.

    Empty, truncated and corrupt bytes all return ``None`` (never raise): the caller decides whether
    that quarantines the row or scores it as a product without an image.
    """
    return _decode(data, size, interpolation, _DEFAULT_POLICY, decode)[0]


def _within_limits(image: Image.Image, max_pixels: int, min_side: int) -> bool:
    """Whether an opened image's size (from its header) is within the policy's pixel limits."""
    return bool(image.width * image.height <= max_pixels and min(image.width, image.height) >= min_side)


def _decode(
    data: bytes | None, size: int | None, interpolation: str, policy: ImagePolicy, decode: int
) -> tuple[np.ndarray | None, str | None]:
    """Pixels, or ``(None, IMAGE_DECODABLE / IMAGE_WITHIN_LIMITS)``.

    JPEGs already at the model's size go through libjpeg-turbo (``simplejpeg``: about 3x faster than PIL
    on small images, the same pixels); everything else, and any JPEG libjpeg-turbo rejects, through PIL,
    which has the last word on what is an image - with only the decoders of the ``policy``'s ``formats``
    (Pillow tries no other plugin on the bytes: EPS would run Ghostscript). PIL reads the header first:
    an image over ``max_pixels``, or with a side under ``min_side``, is refused before anything is
    decoded. PIL decodes large JPEGs at a reduced DCT scale (``draft``) before the resize, so an 800 px
    photo costs little more than a thumbnail. Other modes (CMYK, 16-bit, palette, alpha) are converted
    to RGB as ``decode`` says (:data:`DECODE_VERSIONS`); an animation gives its first frame. A JPEG that
    carries EXIF data goes through PIL from version 2, which reads its orientation.
    """
    if not data:
        return None, IMAGE_DECODABLE
    formats = policy.formats
    if (
        size is not None
        and size >= policy.min_side  # the fast path's JPEGs are size x size
        and data[:3] == b"\xff\xd8\xff"
        and "JPEG" in formats
        and (decode == 1 or data.find(_EXIF, 0, _EXIF_WITHIN) < 0)
    ):
        fast = _decode_jpeg(data, size)
        if fast is not None:
            return fast, None
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            if not _within_limits(image, policy.max_pixels, policy.min_side):
                return None, IMAGE_WITHIN_LIMITS
            if size is not None and image.format == "JPEG":
                image.draft("RGB", (size, size))
            image.load()
            rgb = image.convert("RGB") if decode == 1 else _as_shown(image)
    except Image.DecompressionBombError:  # over Pillow's own limit, found while opening
        return None, IMAGE_WITHIN_LIMITS
    except Exception:  # PIL raises many types for bad data: UnidentifiedImageError, OSError, ...
        return None, IMAGE_DECODABLE
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), _RESAMPLING[interpolation])
    return np.asarray(rgb), None


# A JPEG's EXIF data sits in an APP1 segment (at most 64 KiB) before the image data.
_EXIF = b"Exif\x00\x00"
_EXIF_WITHIN = 1 << 16

# EXIF orientation -> the transpose that turns the stored pixels upright (as ``ImageOps.exif_transpose``)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _as_shown(image: Image.Image) -> Image.Image:
    """A loaded image as RGB the way a viewer shows it (decode version 2): turned upright by its EXIF
    orientation (unreadable EXIF data is ignored, not an undecodable image), 16-bit and 32-bit integer
    greyscale scaled from 0-65535 to 0-255 (its transparent grey level kept), transparent pixels
    composited over white."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a malformed EXIF block: the pixels are still there
        orientation = 1
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = _eight_bit_grey(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _eight_bit_grey(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer greyscale image as 8-bit ``L``, 0-65535 rounded to 0-255 in
    integers (no full-size float copy); ``LA`` where its ``transparency`` names a grey level, the
    pixels of that level transparent."""
    wide = np.asarray(image)
    grey = np.clip(wide, 0, 65535).astype(np.int32, copy=False)
    grey += 128  # round to the nearest: (v + 128) // 257 is rint(v / 257) for any integer v
    grey //= 257
    narrow = Image.fromarray(grey.astype(np.uint8), "L")
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return narrow
    alpha = np.where(wide == transparent, np.uint8(0), np.uint8(255))
    return Image.merge("LA", (narrow, Image.fromarray(alpha, "L")))


def _decode_jpeg(data: bytes, size: int) -> np.ndarray | None:
    """A ``size`` x ``size`` JPEG through libjpeg-turbo, or None (other size, not decodable here)."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        if (height, width) != (size, size):
            return None
        return simplejpeg.decode_jpeg(data, "RGB", strict=True)
    except ValueError:  # corrupt, truncated, CMYK, ...: PIL decides
        return None
