"""Image decoding never raises on bad bytes; the renderer paints what it is told."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from catalog_enrichment.contracts import IMAGE_DECODABLE, IMAGE_URI_ALLOWED
from catalog_enrichment.data.images import (
    DECODE_VERSION,
    ImagePolicy,
    check_images,
    decode_image,
    encode_image,
)
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.data.render import COLOR_RGB, ImageParts, render_product
from catalog_enrichment.errors import ConfigError


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


def _saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _red_on_transparent(mode: str) -> bytes:
    """A red square in the middle of a transparent 16 x 16 picture whose transparent pixels store black."""
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[4:12, 4:12] = (255, 0, 0, 255)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":  # a palette with a transparent index, as GIFs and small PNGs have
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        palette = np.array(image.getpalette(), np.int64).reshape(-1, 3)
        black = int(np.flatnonzero(palette.sum(axis=1) == 0)[0])
        return _saved(image, "PNG", transparency=black)
    return _saved(image.convert(mode), "PNG")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_shown_over_white_as_a_viewer_shows_them(mode: str) -> None:
    data = _red_on_transparent(mode)
    shown = decode_image(data)
    assert shown is not None
    assert (shown[0, 0] == 255).all() and (shown[-1, -1] == 255).all()  # the background: white
    middle = (255, 0, 0) if mode != "LA" else (76, 76, 76)  # LA is grey: red's luma, 0.299 x 255
    assert tuple(shown[8, 8]) == middle
    # the first models' decode is kept for them: transparent pixels show the black they store
    assert (decode_image(data, decode=1)[0, 0] == 0).all()  # type: ignore[index]


def _sixteen_bit(levels: list[int], **options: object) -> bytes:
    """A 16 x 16 16-bit greyscale PNG of four-pixel-wide columns of ``levels`` (four of them)."""
    grey = np.array([levels], np.uint16).repeat(16, axis=0).repeat(4, axis=1)
    return _saved(Image.fromarray(grey), "PNG", **options)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    data = _sixteen_bit([0, 256 * 64, 32896, 65535])
    shown = decode_image(data)
    assert shown is not None and shown.shape == (16, 16, 3)
    assert shown[0, ::4, 0].tolist() == [0, 64, 128, 255] and (shown[..., 0] == shown[..., 2]).all()
    assert decode_image(data, decode=1)[0, ::4, 0].tolist() == [0, 255, 255, 255]  # type: ignore[index]


def test_sixteen_bit_greyscale_keeps_its_transparent_grey_level() -> None:
    """A 16-bit grey PNG names one 16-bit level transparent (its tRNS chunk): those pixels show
    white, and only those, not the others that scale to the same 8-bit level."""
    shown = decode_image(_sixteen_bit([0, 1000, 1100, 40000], transparency=1000))
    assert shown is not None
    assert shown[0, ::4].tolist() == [[0] * 3, [255] * 3, [4] * 3, [156] * 3]  # 1100 / 257 = 4.3


@pytest.mark.parametrize("size", [None, 16], ids=["native", "model-size"])
def test_a_photo_is_turned_upright_by_its_exif_orientation(size: int | None) -> None:
    # stored sideways: the red half on the right; orientation 6 says "rotate 90 degrees clockwise to view"
    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:, :8] = (0, 0, 255)
    stored[:, 8:] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _saved(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    upright = decode_image(data, size)  # at the model's size a JPEG with EXIF data skips the fast path
    assert upright is not None
    assert upright[3, 8, 2] > 200 and upright[12, 8, 0] > 200  # blue on top, red below
    sideways = decode_image(data, size, decode=1)
    assert sideways is not None and sideways[8, 3, 2] > 200 and sideways[8, 12, 0] > 200


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_malformed_exif_block_is_no_reason_to_refuse_the_pixels() -> None:
    data = _saved(Image.new("RGB", (16, 16), (0, 128, 0)), "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    shown = decode_image(data, 16)
    assert shown is not None and abs(int(shown[8, 8, 1]) - 128) <= 2


def test_plain_photos_decode_to_the_same_pixels_under_every_version() -> None:
    for data in (_image("JPEG"), _image("PNG")):
        assert np.array_equal(decode_image(data, 32), decode_image(data, 32, decode=1))  # type: ignore[arg-type]


def test_a_model_keeps_the_decode_it_was_trained_with() -> None:
    fresh = ImagePreprocessing(32)
    assert fresh.decode == DECODE_VERSION and ImagePreprocessing.from_dict(fresh.to_dict()) == fresh
    # a bundle from before decode versions names none: version 1, and its dict (so its embedding
    # store fingerprint) stays as it was
    legacy = {"size": 32, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    old = ImagePreprocessing.from_dict(legacy)
    assert old.decode == 1 and old.to_dict() == {**legacy, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    with pytest.raises(ConfigError, match="decodes images with version 9"):
        ImagePreprocessing.from_dict({**legacy, "decode": 9})


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
