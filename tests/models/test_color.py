"""Known answers for the foreground colour statistics (models/color.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catalog_enrichment.config import ImageEncoderConfig
from catalog_enrichment.models.color import (
    AB_BINS,
    AB_RANGE,
    COLOR_FEATURES,
    L_BINS,
    color_features,
    rgb_to_lab,
)
from catalog_enrichment.models.encoders import ImageEncoder

N_HIST = L_BINS * AB_BINS * AB_BINS


def _photo(rgb: tuple[int, int, int], *, size: int = 96, background=(255, 255, 255), share: float = 0.25):
    """A flat-coloured square covering ``share`` of a ``size`` px photo, centred on ``background``."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = background
    side = round(size * share**0.5)
    lo = (size - side) // 2
    img[lo : lo + side, lo : lo + side] = rgb
    return torch.from_numpy(img).permute(2, 0, 1)[None], side * side / size / size


def _lab(rgb: tuple[int, int, int]) -> np.ndarray:
    return rgb_to_lab(torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) / 255).view(3).numpy()


def test_lab_of_known_colours():
    # reference values (CIE L*a*b*, D65) of sRGB white, black and pure red
    np.testing.assert_allclose(_lab((255, 255, 255)), [100.0, 0.0, 0.0], atol=0.05)
    np.testing.assert_allclose(_lab((0, 0, 0)), [0.0, 0.0, 0.0], atol=0.05)
    np.testing.assert_allclose(_lab((255, 0, 0)), [53.24, 80.09, 67.20], atol=0.05)


@pytest.mark.parametrize("rgb", [(200, 32, 36), (36, 70, 200), (25, 25, 28), (222, 202, 160)])
def test_flat_colour_on_white_background(rgb):
    pixels, share = _photo(rgb)
    feats = color_features(pixels)[0].numpy()
    assert feats.shape == (COLOR_FEATURES,)
    hist, stats = feats[:N_HIST] ** 2, feats[N_HIST:]
    assert hist.sum() == pytest.approx(1.0, abs=1e-5)
    # the moments are the product's colour alone: the white background is left out
    mean = stats[:3] * np.array([100.0, AB_RANGE, AB_RANGE])
    np.testing.assert_allclose(mean, _lab(rgb), atol=0.5)
    np.testing.assert_allclose(stats[3:6], 0.0, atol=0.01)  # one flat colour: no spread
    assert stats[6] == pytest.approx(share, abs=0.01)  # the foreground's share of the photo
    # all of the histogram's mass sits in the (soft) cell around that colour
    lightness, a, b = _lab(rgb)
    cells = hist.reshape(L_BINS, AB_BINS, AB_BINS)
    centre = [
        (lightness / 100 * L_BINS - 0.5),
        ((a + AB_RANGE) / (2 * AB_RANGE) * AB_BINS - 0.5),
        ((b + AB_RANGE) / (2 * AB_RANGE) * AB_BINS - 0.5),
    ]
    near = tuple(slice(max(0, int(np.floor(c))), int(np.floor(c)) + 2) for c in centre)
    assert cells[near].sum() == pytest.approx(1.0, abs=1e-5)


def test_two_colours_are_told_apart_and_background_does_not_matter():
    red_white, _ = _photo((200, 32, 36))
    red_grey, _ = _photo((200, 32, 36), background=(235, 235, 235))
    blue_white, _ = _photo((36, 70, 200))
    f = color_features(torch.cat([red_white, red_grey, blue_white]))
    np.testing.assert_allclose(f[0, :N_HIST], f[1, :N_HIST], atol=1e-5)
    assert float((f[0, :N_HIST] * f[2, :N_HIST]).sum()) == pytest.approx(0.0, abs=1e-6)  # no overlap


def test_product_of_the_background_colour_takes_the_whole_photo():
    white_on_white, _ = _photo((250, 250, 250))
    stats = color_features(white_on_white)[0, N_HIST:].numpy()
    assert stats[6] == pytest.approx(1.0)  # no foreground found: every pixel counts
    assert stats[0] * 100 == pytest.approx(_lab((253, 253, 253))[0], abs=1.0)


def test_float_pixels_and_uint8_give_the_same_features():
    pixels, _ = _photo((120, 52, 160), size=200)
    np.testing.assert_allclose(
        color_features(pixels).numpy(), color_features(pixels.float() / 255).numpy(), atol=1e-5
    )


def test_image_encoder_appends_colour_to_pooled_and_tokens():
    cfg = ImageEncoderConfig(image_size=32)
    torch.manual_seed(0)
    with_color = ImageEncoder(cfg)
    without = ImageEncoder(cfg.model_copy(update={"color_features": False}))
    assert with_color.num_features == without.num_features + COLOR_FEATURES
    pixels, _ = _photo((200, 32, 36), size=32)
    pixels = torch.cat([pixels, pixels])
    present = torch.tensor([1.0, 0.0])
    raw = with_color(pixels, present)
    # the same statistics whether the encoder gets uint8 pixels or the predictor's normalised floats
    normalised = with_color(with_color.preprocessing.normalize(pixels), present)
    np.testing.assert_allclose(raw.pooled.detach(), normalised.pooled.detach(), atol=1e-4)
    assert raw.pooled.shape == (2, with_color.num_features)
    assert raw.tokens.shape[2] == with_color.num_features
    np.testing.assert_allclose(
        raw.pooled[0, -COLOR_FEATURES:].detach(), color_features(pixels[:1])[0], atol=1e-6
    )
    assert float(raw.pooled[1].detach().abs().sum()) == 0.0  # no image: nothing, colour included
