"""Image decoding never raises on bad bytes; the renderer paints what it is told."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from catalog_enrichment.contracts import IMAGE_DECODABLE, IMAGE_URI_ALLOWED
from catalog_enrichment.data.images import ImagePolicy, check_images, decode_image, encode_image
from catalog_enrichment.data.render import COLOR_RGB, ImageParts, render_product


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
@pytest.mark.parametrize("size", [None, 96], ids=["native", "model-size"])
def test_bad_bytes_decode_to_none(data: bytes | None, size: int | None) -> None:
    # at the model's size JPEGs take the libjpeg-turbo path first; bad bytes still come back None
    assert decode_image(data, size) is None


def test_the_fast_jpeg_path_gives_pils_pixels_and_pil_decides_what_it_cannot() -> None:
    image = render_product(ImageParts("dress", ("red",), "solid", ("silk",)), np.random.default_rng(0))
    rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
    jpeg = encode_image(rgb)
    pil = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert np.array_equal(decode_image(jpeg, 96), pil)  # type: ignore[arg-type]  # same pixels, not close ones
    # grayscale and CMYK JPEGs (libjpeg-turbo cannot turn CMYK into RGB) come back as RGB
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, format="JPEG")
        pixels = decode_image(buf.getvalue(), 96)
        assert pixels is not None and pixels.shape == (96, 96, 3)
    # a large photo is decoded at a reduced DCT scale, then resized: close to a full decode + resize
    big = Image.fromarray(rgb).resize((400, 400), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)
    full = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize((96, 96)), np.float64)
    drafted = decode_image(buf.getvalue(), 96)
    assert drafted is not None and drafted.shape == (96, 96, 3)
    assert np.abs(drafted - full).mean() < 4.0


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


def test_training_checks_a_table_and_its_batches_alike_and_names_each_unusable_image() -> None:
    """The one image-usability check of training (in memory and streamed): a usable photo, none,
    corrupt bytes and a URI outside the policy's roots; a red photo is warm."""
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 200
    rows = pa.table(
        {
            "title": ["a", "b", "c", "d"],
            "image": [encode_image(red, "PNG"), None, b"not an image", None],
            "image_uri": [None, None, None, "/elsewhere/d.jpg"],
        }
    )
    inputs, errors, digests = check_images(rows, ImagePolicy())
    assert errors == [None, None, IMAGE_DECODABLE, IMAGE_URI_ALLOWED]
    assert list(inputs.image_present) == [True, False, True, True]
    assert inputs.tones[0] == pytest.approx(200.0) and list(inputs.tones[1:]) == [None, None, None]
    assert [d is not None for d in digests] == [True, False, False, False]  # an image read: a digest
    assert check_images(rows.to_batches()[0], ImagePolicy()) == (inputs, errors, digests)


def test_the_same_photo_behind_many_products_urls_is_a_placeholder_training_leaves_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Three products' URLs serve one grey tile (a CDN's outage image under each product's own URL)
    and two serve their own photos: with a limit of 2 products per image, the tile's three are
    :data:`IMAGE_SHARED`; inline bytes count alike, and the limit 0 turns the rule off."""
    from catalog_enrichment.contracts import IMAGE_DECODABLE, IMAGE_SHARED, image_key
    from catalog_enrichment.data.images import read_pixels, shared_images

    grey = encode_image(np.full((40, 40, 3), 128, np.uint8), "PNG")
    photos = [encode_image(np.full((40, 40, 3), v, np.uint8), "PNG") for v in (10, 250)]
    for name, data in {"a": grey, "b": grey, "c": grey, "d": photos[0], "e": photos[1]}.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    policy = ImagePolicy(roots=(str(tmp_path),))
    uris = [str(tmp_path / f"{n}.png") for n in "abcde"]
    read = [read_pixels(None, u, 8, policy=policy) for u in uris]
    digests = [d for _, _, d in read]
    assert len(set(digests)) == 3 and digests[0] == digests[1] == digests[2]
    assert read_pixels(grey, None, 8)[2] == digests[0]  # inline bytes: the same digest
    assert digests[0] == image_key(grey)  # the key validation gives the bytes inline
    assert read_pixels(None, None, 8) == (None, None, None)  # no image: nothing read
    assert read_pixels(b"", None, 8) == (None, IMAGE_DECODABLE, None)  # no image to count either
    assert shared_images(list("abcde"), digests, 2) == {digests[0]}
    assert shared_images(list("aaade"), digests, 2) == set()  # one product's three rows: not shared
    # bytes found to be a placeholder before are one on however few products; the limit 0 still rules
    assert shared_images(list("de"), digests[3:], 2, known={digests[4], "elsewhere"}) == {digests[4]}
    assert shared_images(list("de"), digests[3:], 0, known={digests[4]}) == set()
    rows = pa.table({"product_id": list("abcde"), "image": [None] * 5, "image_uri": uris})
    _, errors, read_digests = check_images(rows, policy, shared_limit=2)
    assert errors == [IMAGE_SHARED] * 3 + [None, None] and read_digests == digests
    assert check_images(rows, policy)[1] == [None] * 5  # the rule off
