"""How a product photo becomes the image encoder's input: one definition for training and serving.

Pixels are decoded and resized by :func:`catalog_enrichment.data.images.load_pixels`; this module
holds how - the decode version, the size, the resampling filter - and the per-channel normalisation:
either the defaults of a model trained from scratch or timm's pretrained config for the backbone's
weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from catalog_enrichment.config import ImageEncoderConfig
from catalog_enrichment.data.images import DECODE_VERSION, DECODE_VERSIONS
from catalog_enrichment.errors import ConfigError

__all__ = ["ImagePreprocessing"]


# Without pretrained weights pixels are normalised as (x / 255 - 0.5) / 0.25, every channel alike.
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.25, 0.25, 0.25)
_DEFAULT_SIZE = 96


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an image becomes the image encoder's input; one definition for training and serving.

    The image is decoded to RGB and resized to ``size`` x ``size`` with ``interpolation`` (the whole
    picture, no crop: a product photo frames the product), then each channel is normalised as
    ``(x / 255 - mean) / std``. With pretrained weights the values are the timm model's pretrained
    config (``timm.data.resolve_data_config``); ``model.image.image_size`` overrides the size.
    ``decode`` is how the bytes become RGB (:data:`~catalog_enrichment.data.images.DECODE_VERSIONS`):
    a model is served with the decode it was trained with, and a bundle that names none is version 1.
    With ``close_up`` (``model.image.close_up``) the image is decoded at twice ``size``
    (:attr:`decode_size`): the encoder shrinks it to ``size`` and reads its centre as decoded.
    """

    size: int = _DEFAULT_SIZE
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = _DEFAULT_MEAN
    std: tuple[float, float, float] = _DEFAULT_STD
    decode: int = DECODE_VERSION
    close_up: bool = False

    @property
    def decode_size(self) -> int:
        """The side of the pixels an image is decoded to: ``size``, twice that with ``close_up``."""
        return 2 * self.size if self.close_up else self.size

    def __post_init__(self) -> None:
        if self.decode not in DECODE_VERSIONS:
            raise ConfigError(
                f"the model decodes images with version {self.decode}; this catalog-enrich knows "
                f"{', '.join(map(str, DECODE_VERSIONS))}: serve it with the release that trained it"
            )

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., 3, H, W)`` pixels (a channels-last view stays channels-last) to float32."""
        shape = (3, 1, 1)
        scale = torch.tensor([255.0 * s for s in self.std], device=pixels.device).view(shape)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std, strict=True)], device=pixels.device)
        return pixels.float().div_(scale).sub_(shift.view(shape))

    def unnormalize(self, values: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize`'s float output back to RGB in [0, 1]."""
        shape = (3, 1, 1)
        std = torch.tensor(self.std, device=values.device, dtype=values.dtype).view(shape)
        mean = torch.tensor(self.mean, device=values.device, dtype=values.dtype).view(shape)
        return values * std + mean

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.decode == 1:  # as the bundles (and embedding store fingerprints) from before versions
            del data["decode"]
        if not self.close_up:  # as those from before the close-up
            del data["close_up"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImagePreprocessing:
        return cls(
            int(data["size"]),
            str(data["interpolation"]),
            tuple(float(x) for x in data["mean"]),  # type: ignore[arg-type]
            tuple(float(x) for x in data["std"]),  # type: ignore[arg-type]
            int(data.get("decode", 1)),
            bool(data.get("close_up", False)),
        )

    @classmethod
    def resolve(cls, cfg: ImageEncoderConfig, backbone: Any) -> ImagePreprocessing:
        """The preprocessing of a freshly built encoder: timm's pretrained config with weights."""
        if not cfg.pretrained_path:
            return cls(cfg.image_size or _DEFAULT_SIZE, close_up=cfg.close_up)
        from timm.data import resolve_data_config

        data = resolve_data_config({}, model=backbone)
        mean, std = tuple(data["mean"]), tuple(data["std"])
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"model.image: timm's config for {cfg.name} is not for RGB input: {data}")
        interpolation = str(data.get("interpolation") or "bilinear")
        if interpolation not in _INTERPOLATIONS:
            interpolation = "bilinear"
        size = cfg.image_size or int(data["input_size"][-1])
        return cls(size, interpolation, mean, std, close_up=cfg.close_up)


# PIL resampling filters by timm's interpolation name
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
