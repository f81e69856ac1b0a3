"""The image decoder's record: reference photos whose decoded pixels tell two decoders apart."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from catalog_enrichment.data import images
from catalog_enrichment.data.decoding import (
    current_digest,
    decoded_digest,
    decoder_problem,
    decoder_record,
    reference_photos,
)

pytestmark = pytest.mark.timeout(60)


def one_level_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand in another decoder: the same pixels but one value of each image one level apart."""
    decode = images._decode

    def other(*args: Any, **kwargs: Any) -> tuple[np.ndarray | None, str | None]:
        pixels, why = decode(*args, **kwargs)
        if pixels is not None:
            pixels = pixels.copy()
            pixels[0, 0, 0] ^= 1
        return pixels, why

    monkeypatch.setattr(images, "_decode", other)
    current_digest.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_digests() -> Any:
    current_digest.cache_clear()
    yield
    current_digest.cache_clear()


def test_the_reference_photos_are_the_same_photos_and_take_every_decode_path() -> None:
    photos = reference_photos(224)
    assert photos == reference_photos(224)
    sizes = {name: Image.open(images.io.BytesIO(data)).size for name, data in photos.items()}
    # a 2:3 photo in partial 16-pixel blocks, one PIL decodes at a reduced scale, full chroma, a
    # WebP, and one already at the model's side (simplejpeg's path)
    expected = {"portrait": (360, 540), "large": (1200, 800), "full_chroma": (250, 375), "webp": (360, 540)}
    assert sizes == {**expected, "square": (224, 224)}
    assert all(data[:3] == b"\xff\xd8\xff" for name, data in photos.items() if name != "webp")
    assert photos["webp"][8:12] == b"WEBP"
    # a large side: the large photo still twice the side, so PIL still decodes it at a reduced scale
    assert Image.open(images.io.BytesIO(reference_photos(448)["large"])).size == (1344, 896)
    # a side under the smallest image a product may have: no square (that path is never taken), and
    # the rest still decode
    assert set(reference_photos(8)) == set(expected)
    assert decoder_problem(decoder_record(8, "bicubic", 2), 8, "bicubic", 2) is None


def test_the_same_decoder_passes_and_one_level_in_one_pixel_is_told_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = decoder_record(224, "bicubic", images.DECODE_VERSION)
    assert decoder_problem(record, 224, "bicubic", images.DECODE_VERSION) is None
    one_level_off(monkeypatch)
    problem = decoder_problem(record, 224, "bicubic", images.DECODE_VERSION)
    assert problem is not None
    assert "decodes them to other pixels" in problem
    assert f"pillow=={Image.__version__}" in problem


def test_a_decoder_that_cannot_decode_the_photos_refuses_rather_than_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Pillow built without a decoder the reference photos need: a refusal naming it, no crash."""
    record = decoder_record(224, "bicubic", images.DECODE_VERSION)
    monkeypatch.setattr(images, "_decode", lambda *args, **kwargs: (None, images.IMAGE_DECODABLE))
    problem = decoder_problem(record, 224, "bicubic", images.DECODE_VERSION)
    assert problem is not None and "cannot decode its reference photos" in problem


def test_the_digest_is_of_the_model_s_decode() -> None:
    """Another size or filter reads other pixels of the same photos."""
    photos = reference_photos(64)
    digests = {
        decoded_digest(photos, 64, "bicubic", 2),
        decoded_digest(photos, 64, "bilinear", 2),
        decoded_digest(photos, 96, "bicubic", 2),
    }
    assert len(digests) == 3
    assert current_digest(64, "bicubic", 2) == decoded_digest(photos, 64, "bicubic", 2)
