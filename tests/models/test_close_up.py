"""The image encoder's close-up (``model.image.close_up``): the photo decoded at twice the input size,
the whole of it shrunk to the input size and its centre read as decoded (known answers)."""

from __future__ import annotations

import pytest
import torch

from catalog_enrichment.config import ImageEncoderConfig
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.errors import ConfigError
from catalog_enrichment.models.color import COLOR_FEATURES
from catalog_enrichment.models.encoders import ImageEncoder
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(120)

SIZE = 32


def _encoders() -> tuple[ImageEncoder, ImageEncoder]:
    """The same backbone weights with and without the close-up."""
    cfg = ImageEncoderConfig(image_size=SIZE, pooling="stages")
    torch.manual_seed(0)
    plain = ImageEncoder(cfg).eval()
    close_up = ImageEncoder(cfg.model_copy(update={"close_up": True})).eval()
    close_up.load_state_dict(plain.state_dict())
    return plain, close_up


def _photos() -> torch.Tensor:
    """Two ``2 * SIZE`` photos alike once shrunk 2 x 2: flat grey 150, and the same grey with a
    one-pixel checkerboard of 100 and 200 (150 on average over every 2 x 2 block) in its centre."""
    flat = torch.full((3, 2 * SIZE, 2 * SIZE), 150, dtype=torch.uint8)
    fine = flat.clone()
    y, x = torch.meshgrid(torch.arange(2 * SIZE), torch.arange(2 * SIZE), indexing="ij")
    centre = (y >= SIZE // 2) & (y < SIZE + SIZE // 2) & (x >= SIZE // 2) & (x < SIZE + SIZE // 2)
    fine[:, centre] = torch.where((y + x) % 2 == 0, 100, 200)[centre].to(torch.uint8)
    return torch.stack([flat, fine])


@torch.inference_mode()
def test_the_close_up_sees_a_texture_the_shrunk_photo_cannot() -> None:
    plain, close_up = _encoders()
    assert close_up.preprocessing.decode_size == 2 * SIZE and plain.preprocessing.decode_size == SIZE
    width = plain.backbone_features
    assert close_up.num_features == 2 * width + COLOR_FEATURES == plain.num_features + width
    photos = _photos()
    pooled = close_up(photos, torch.ones(2)).pooled
    whole, centre = pooled[:, :width], pooled[:, width : 2 * width]
    # shrunk, the two photos are the same pixels: the whole photo's features are equal ...
    torch.testing.assert_close(whole[0], whole[1])
    # ... and are what the encoder without a close-up computes from the photo shrunk 2 x 2
    shrunk = torch.nn.functional.avg_pool2d(photos.float(), 2).round().to(torch.uint8)
    torch.testing.assert_close(whole, plain(shrunk, torch.ones(2)).pooled[:, :width], atol=1e-4, rtol=1e-4)
    # the centre as decoded shows the checkerboard
    assert float((centre[0] - centre[1]).abs().max()) > 0.1
    # the colour statistics are the photo's, as without a close-up
    torch.testing.assert_close(pooled[:, 2 * width :], plain(photos, torch.ones(2)).pooled[:, width:])
    # the predictor's normalised floats give what the uint8 pixels give
    normalised = close_up(close_up.preprocessing.normalize(photos), torch.ones(2)).pooled
    torch.testing.assert_close(normalised, pooled, atol=1e-4, rtol=1e-4)
    # a product without a photo has nothing, close-up included
    assert float(close_up(photos, torch.tensor([1.0, 0.0])).pooled[1].abs().sum()) == 0.0


def test_the_close_up_travels_with_the_preprocessing_and_is_absent_from_what_was_saved_before() -> None:
    prep = ImagePreprocessing(SIZE, close_up=True)
    assert ImagePreprocessing.from_dict(prep.to_dict()) == prep
    plain = ImagePreprocessing(SIZE)
    # bundles and embedding-store fingerprints written before the close-up keep their bytes
    assert "close_up" not in plain.to_dict()
    assert ImagePreprocessing.from_dict(plain.to_dict()) == plain


def test_a_close_up_needs_stage_pooling() -> None:
    with pytest.raises(ConfigError, match="close_up needs pooling: stages"):
        tiny_config(model={"image": {"close_up": True, "pooling": "head"}})
