"""Image decoding never raises on bad bytes; the renderer paints what it is told."""

from __future__ import annotations

import numpy as np
import pytest

from catalog_enrichment.data.images import COLOR_RGB, ImageParts, decode_image, encode_image, render_product


def _image(fmt: str = "JPEG") -> bytes:
    parts = ImageParts("dress", ("red",), "solid", ("silk",))
    return encode_image(render_product(parts, np.random.default_rng(0)), fmt)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_real_images(fmt: str) -> None:
    pixels = decode_image(_image(fmt))
    assert pixels is not None and pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8
    assert decode_image(_image(fmt), size=32).shape == (32, 32, 3)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "data",
    [
        None,
        b"",
        b"not an image",
        b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        _image()[: len(_image()) // 2],
        _image("PNG")[:200],
    ],
    ids=["none", "empty", "text", "corrupt-jpeg", "truncated-jpeg", "truncated-png"],
)
def test_bad_bytes_decode_to_none(data: bytes | None) -> None:
    assert decode_image(data) is None


def test_two_color_product_is_split_top_and_bottom() -> None:
    parts = ImageParts("dress", ("blue", "yellow"), "solid", ("cotton",))
    pixels = np.asarray(render_product(parts, np.random.default_rng(1), texture_strength=0.0), float)
    column = pixels[:, pixels.shape[1] // 2]
    blue, yellow = np.array(COLOR_RGB["blue"]), np.array(COLOR_RGB["yellow"])

    def nearest_is(target: np.ndarray, other: np.ndarray, row: np.ndarray) -> bool:
        return np.linalg.norm(row / row.max() - target / target.max()) < np.linalg.norm(
            row / row.max() - other / other.max()
        )

    assert nearest_is(blue, yellow, column[30]) and nearest_is(yellow, blue, column[80])


def test_renderer_is_deterministic_per_rng_seed() -> None:
    parts = ImageParts("hat", ("green",), "dotted", ("wool", "cotton"), "red")
    one = np.asarray(render_product(parts, np.random.default_rng(5)))
    two = np.asarray(render_product(parts, np.random.default_rng(5)))
    other = np.asarray(render_product(parts, np.random.default_rng(6)))
    assert np.array_equal(one, two) and not np.array_equal(one, other)
