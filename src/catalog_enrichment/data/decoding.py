"""Which image decoder a model's photos were decoded by, so that it is served by the same one.

The same JPEG bytes decode to different pixels under different releases of the decoding libraries
(Pillow, the libjpeg-turbo it bundles, simplejpeg): a decoder's rounding of partial blocks, its
chroma upsampling or its resampling moves pixel values by a few levels. A model's image features,
and so its scores, move with them, and the thresholds calibrated on one decoder's pixels no longer
keep their promise on another's. A bundle therefore keeps a few reference photos and the digest of
their decoded pixels (:func:`decoder_record`); loading decodes them again (:func:`decoder_problem`)
and refuses the bundle where the pixels differ.

The photos are made when a model is saved (seeded pixels, so the same photos each time, encoded by
the Pillow at hand) and travel in the bundle as bytes: checking them reads no encoder, only the
decoder.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Mapping
from functools import cache
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, features

from catalog_enrichment.data.images import ImagePolicy, read_pixels

__all__ = [
    "current_digest",
    "decoded_digest",
    "decoder_problem",
    "decoder_record",
    "decoder_versions",
    "reference_photos",
]


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like pixels: smooth colour gradients, a dark band, a saturated disc and grain."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack(
        [180 + 60 * np.sin(6 * x + 2 * y), 120 + 80 * np.cos(5 * y - 3 * x), 90 + 70 * np.sin(9 * x * y)], -1
    )
    pixels[(x - 0.5) ** 2 + (y - 0.6) ** 2 < 0.05] = (200, 40, 60)
    pixels[int(height * 0.2) : int(height * 0.35), int(width * 0.1) : int(width * 0.9)] = (30, 30, 35)
    pixels += np.random.default_rng(seed).normal(0, 5, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def reference_photos(side: int) -> dict[str, bytes]:
    """Photos that take each decode path of a model decoding ``side`` x ``side`` pixels: a 2:3 JPEG
    with 4:2:0 chroma whose sides are not whole 16-pixel blocks, a large one (PIL decodes it at a
    reduced DCT scale), one with full chroma (4:4:4), a lossy WebP, and a JPEG already ``side`` x
    ``side`` (decoded by libjpeg-turbo through simplejpeg, not PIL; none where the side is under
    the smallest image a product may have, which never takes that path)."""
    shapes: dict[str, tuple[int, int, str, dict[str, int]]] = {
        "portrait": (360, 540, "JPEG", {}),
        "large": (max(1200, 3 * side), max(800, 2 * side), "JPEG", {}),
        "full_chroma": (250, 375, "JPEG", {"subsampling": 0}),
        "webp": (360, 540, "WEBP", {}),
    }
    if side >= ImagePolicy().min_side:
        shapes["square"] = (side, side, "JPEG", {})
    out = {}
    for seed, (name, (width, height, kind, options)) in enumerate(shapes.items()):
        buffer = io.BytesIO()
        _photo(width, height, seed).save(buffer, kind, quality=80, **options)
        out[name] = buffer.getvalue()
    return out


def decoded_digest(photos: Mapping[str, bytes], size: int, interpolation: str, decode: int) -> str:
    """SHA-256 of ``photos``' pixels as a model decoding ``size`` x ``size`` pixels reads them."""
    h = hashlib.sha256()
    for name in sorted(photos):
        pixels, why = read_pixels(photos[name], None, size, interpolation, decode=decode)[:2]
        if pixels is None:
            raise ValueError(f"reference photo {name!r} was not decoded: {why}")
        h.update(name.encode())
        h.update(pixels.tobytes())
    return h.hexdigest()


@cache
def current_digest(size: int, interpolation: str, decode: int) -> str:
    """:func:`decoded_digest` of this machine's :func:`reference_photos` (the embedding store's key
    holds it: vectors of photos decoded by another decoder are other vectors)."""
    return decoded_digest(reference_photos(size), size, interpolation, decode)


def decoder_versions() -> dict[str, str]:
    """The decoding libraries at hand: Pillow, the libjpeg-turbo it bundles, and simplejpeg."""
    return {
        "pillow": Image.__version__,
        "libjpeg_turbo": str(features.version("libjpeg_turbo") or "none"),
        "simplejpeg": simplejpeg.__version__,
    }


def decoder_record(size: int, interpolation: str, decode: int) -> dict[str, Any]:
    """What a bundle keeps of the decoder its model's photos were decoded by: the reference photos,
    the digest of their pixels at the model's decode, and the libraries' versions (for the message)."""
    return {
        "photos": {name: base64.b64encode(data).decode() for name, data in reference_photos(size).items()},
        "digest": current_digest(size, interpolation, decode),  # the embedding fingerprint's, once
        "libraries": decoder_versions(),
    }


def decoder_problem(record: Mapping[str, Any], size: int, interpolation: str, decode: int) -> str | None:
    """Why this machine's decoder cannot serve a model whose bundle keeps ``record``: it decodes the
    reference photos to other pixels (None: to the same)."""
    photos = {name: base64.b64decode(data) for name, data in record["photos"].items()}
    then, now = dict(record.get("libraries") or {}), decoder_versions()
    pins = " ".join(f"{name}=={then[name]}" for name in ("pillow", "simplejpeg") if name in then)
    remedy = f"install the decoders it was trained with ({pins}) or train it again here"
    try:
        if decoded_digest(photos, size, interpolation, decode) == record["digest"]:
            return None
    except ValueError as exc:  # a Pillow built without a decoder the photos need
        return f"this machine's {_named(now)} cannot decode its reference photos ({exc}): {remedy}"
    return (
        f"its photos were decoded by {_named(then)} and this machine's {_named(now)} decodes them to "
        f"other pixels, on which its thresholds were not calibrated: {remedy}"
    )


def _named(versions: Mapping[str, str]) -> str:
    return (
        f"Pillow {versions.get('pillow', '?')} (libjpeg-turbo {versions.get('libjpeg_turbo', '?')}), "
        f"simplejpeg {versions.get('simplejpeg', '?')}"
    )
