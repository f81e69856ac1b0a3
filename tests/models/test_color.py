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
    HUE_BINS,
    L_BINS,
    LAB_FEATURES,
    LCH_C,
    LCH_FEATURES,
    LCH_L,
    PERCENTILES,
    SHARE_FLOOR,
    _weighted_quantiles,
    color_features,
    lab_histogram,
    lch_histogram,
    rgb_to_lab,
)
from catalog_enrichment.models.encoders import ImageEncoder

N_HIST = L_BINS * AB_BINS * AB_BINS
N_LCH = len(LCH_L) * (1 + (len(LCH_C) - 1) * HUE_BINS)


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


def test_colour_statistics_stay_float32_under_a_bf16_autocast():
    """A GPU runs the encoders under bf16 autocast: the colour statistics beside them are computed
    and kept in float32, so a photo gives the same features on every device (under bf16 the colour
    conversion's products moved them by about 4e-3, and the pooled vector rounded them to 3 digits)."""
    pixels = torch.randint(
        0, 256, (2, 3, 48, 48), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    plain = color_features(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = color_features(pixels)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=0, atol=0)
    torch.manual_seed(0)
    encoder = ImageEncoder(ImageEncoderConfig(image_size=48)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = encoder(pixels, torch.ones(2)).pooled
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[:, -COLOR_FEATURES:], plain, rtol=0, atol=0)


def _lch(
    rgb: tuple[int, int, int], background: tuple[int, int, int] = (255, 255, 255)
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A flat colour's lightness x chroma x hue features: (grey axis (L,), coloured (L, C-1, H)
    shares, percentiles (4, P), mean hue (2,))."""
    pixels, _ = _photo(rgb, background=background)
    f = lch_histogram(pixels)[0].numpy().astype(np.float64)
    hist = (f[:N_LCH] + SHARE_FLOOR**0.5) ** 2 - SHARE_FLOOR  # undo the smooth square root
    grey, coloured = hist[: len(LCH_L)], hist[len(LCH_L) :].reshape(len(LCH_L), len(LCH_C) - 1, HUE_BINS)
    return grey, coloured, f[N_LCH:-2].reshape(4, len(PERCENTILES)), f[-2:]


def test_colour_features_are_the_lab_histogram_then_lightness_chroma_hue():
    pixels, _ = _photo((120, 52, 160))
    f = color_features(pixels)
    assert f.shape == (1, COLOR_FEATURES) and COLOR_FEATURES == LAB_FEATURES + LCH_FEATURES
    np.testing.assert_allclose(f[:, :LAB_FEATURES].numpy(), lab_histogram(pixels).numpy(), atol=1e-6)
    np.testing.assert_allclose(f[:, LAB_FEATURES:].numpy(), lch_histogram(pixels).numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("rgb", "background"),
    [((20, 20, 20), (255, 255, 255)), ((128, 128, 128), (255, 255, 255)), ((240, 240, 240), (60, 60, 60))],
)
def test_black_grey_and_white_sit_on_the_grey_axis_by_lightness(rgb, background):
    grey, coloured, percentiles, mean_hue = _lch(rgb, background)
    lightness, a, b = _lab(rgb)
    assert grey.sum() == pytest.approx(1.0, abs=1e-4) and coloured.sum() == pytest.approx(0.0, abs=1e-4)
    # the mass sits on the two lightness centres around the colour's L*
    upper = int(np.searchsorted(LCH_L, lightness))
    assert grey[max(upper - 1, 0) : upper + 1].sum() == pytest.approx(1.0, abs=1e-4)
    # one flat colour: every percentile is its L*, a*, b* and chroma
    np.testing.assert_allclose(percentiles[0] * 100, lightness, atol=0.5)
    np.testing.assert_allclose(percentiles[3] * AB_RANGE, np.hypot(a, b), atol=0.5)
    np.testing.assert_allclose(mean_hue, 0.0, atol=0.02)  # no hue to speak of


def test_a_saturated_colour_lands_in_its_hue_and_chroma_and_dark_blue_is_darker_than_blue():
    _, coloured, _, mean_hue = _lch((200, 32, 36))  # a red
    _, a, b = _lab((200, 32, 36))
    hue, chroma = np.degrees(np.arctan2(b, a)) % 360, np.hypot(a, b)
    first = int(hue // (360 / HUE_BINS))
    upper = int(np.searchsorted(LCH_C, chroma))  # chroma's centres: LCH_C[upper - 1], LCH_C[upper]
    near = coloured[:, upper - 2 : upper, :][:, :, [first, (first + 1) % HUE_BINS]]
    assert near.sum() == pytest.approx(1.0, abs=1e-4)
    assert np.degrees(np.arctan2(mean_hue[1], mean_hue[0])) % 360 == pytest.approx(hue, abs=0.5)
    dark_blue, blue = _lch((20, 30, 90))[1], _lch((40, 80, 210))[1]
    mean_lightness = [(x.sum(axis=(1, 2)) * np.array(LCH_L)).sum() / x.sum() for x in (dark_blue, blue)]
    assert mean_lightness[0] + 10 < mean_lightness[1]


def test_weighted_quantiles_interpolate_so_rounding_moves_them_by_as_little() -> None:
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    weight = torch.ones(1, 4)
    # the median of four equal weights lies at the second value's cumulative weight exactly
    assert _weighted_quantiles(values, weight, (0.5,)).item() == pytest.approx(1.0)
    assert _weighted_quantiles(values, weight, (0.625,)).item() == pytest.approx(1.5)  # halfway on
    # float32 rounding of the weights (relative 1e-6) moves it by about as much, not to a neighbour
    rng = np.random.default_rng(0)
    for _ in range(20):
        jitter = torch.tensor(1 + 1e-6 * rng.standard_normal((1, 4)), dtype=torch.float32)
        moved = _weighted_quantiles(values, weight * jitter, (0.5,)).item()
        assert abs(moved - 1.0) < 1e-4
