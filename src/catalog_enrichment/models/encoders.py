"""Headless encoders from their libraries: transformers for text, timm for images.

Weights load only from a local path (``pretrained_path``); otherwise the encoders are built from
their configs with random initialisation (tests, the demo, and this repo's benchmarks).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from catalog_enrichment.config import ImageEncoderConfig, TextEncoderConfig
from catalog_enrichment.errors import ConfigError

__all__ = ["ImageEncoder", "ImageFeatures", "TextEncoder", "TextFeatures", "pool_tokens"]


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(B, L, H)`` token vectors + ``(B, L)`` mask -> ``(B, H)`` (cls = first unmasked token)."""
    m = mask.to(tokens.dtype).unsqueeze(-1)
    if pooling == "sum":
        return (tokens * m).sum(dim=1)
    if pooling == "mean":
        return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    if pooling == "cls":
        first = mask.to(torch.long).argmax(dim=1)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), first]
    raise ConfigError(f"unknown pooling {pooling!r}; use cls, mean or sum")


@dataclass
class TextFeatures:
    """``tokens``: (B, L, H) last hidden states; ``mask``: (B, L); ``pooled``: (B, H)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


@dataclass
class ImageFeatures:
    """``tokens``: (B, N, C) spatial features; ``pooled``: (B, C), zero where the image is absent."""

    tokens: torch.Tensor
    pooled: torch.Tensor


class TextEncoder(nn.Module):
    """Any transformers ``AutoModel`` as a headless encoder with cls / mean / sum pooling."""

    def __init__(
        self, cfg: TextEncoderConfig, *, vocab_size: int | None = None, pad_token_id: int = 0
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.cfg = cfg
        if cfg.pretrained_path:
            self.backbone = AutoModel.from_pretrained(cfg.pretrained_path)
        else:
            config = AutoConfig.for_model(
                cfg.model_type, **self._config_kwargs(cfg, vocab_size, pad_token_id)
            )
            self.backbone = AutoModel.from_config(config)
        self.hidden_size = int(getattr(self.backbone.config, "hidden_size", None) or self.backbone.config.dim)
        self._takes_token_types = "token_type_ids" in inspect.signature(self.backbone.forward).parameters

    @staticmethod
    def _config_kwargs(cfg: TextEncoderConfig, vocab_size: int | None, pad_token_id: int) -> dict[str, Any]:
        size = {
            "vocab_size": vocab_size or cfg.vocab_size,
            "pad_token_id": pad_token_id,
            "max_position_embeddings": max(cfg.max_length, 64),
        }
        if cfg.model_type == "distilbert":
            return {
                **size,
                "dim": cfg.hidden_size,
                "n_layers": cfg.num_hidden_layers,
                "n_heads": cfg.num_attention_heads,
                "hidden_dim": cfg.intermediate_size,
            }
        return {
            **size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "intermediate_size": cfg.intermediate_size,
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        *,
        pooling: str | None = None,
    ) -> TextFeatures:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        tokens = self.backbone(**kwargs).last_hidden_state
        return TextFeatures(
            tokens, attention_mask, pool_tokens(tokens, attention_mask, pooling or self.cfg.pooling)
        )


# Pixels are normalised as (x / 255 - PIXEL_MEAN) / PIXEL_STD, every channel alike.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any layout; channels-last stays channels-last) to the float32 the backbone takes."""
    scale = 255.0 * PIXEL_STD
    return pixels.float().mul_(1.0 / scale).sub_(PIXEL_MEAN / PIXEL_STD)


class ImageEncoder(nn.Module):
    """Any timm model, created with ``num_classes=0``; exposes pooled and spatial features.

    ``pixel_values`` are either normalised float (training batches) or the decoded uint8 pixels,
    normalised here, on the model's device: serving sends a quarter of the bytes to a GPU, and the
    normalisation runs there instead of on the CPU threads that decode.
    """

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        import timm

        self.cfg = cfg
        kwargs: dict[str, Any] = dict(cfg.timm_kwargs)
        if cfg.pretrained_path:
            kwargs["pretrained_cfg_overlay"] = {"file": cfg.pretrained_path}
        try:
            self.backbone: Any = timm.create_model(
                cfg.name, pretrained=bool(cfg.pretrained_path), num_classes=0, **kwargs
            )
        except RuntimeError as exc:  # timm raises RuntimeError for unknown names
            raise ConfigError(f"model.image.name: {exc}") from None
        backbone: Any = self.backbone
        self.num_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)

    def forward(self, pixel_values: torch.Tensor, image_present: torch.Tensor) -> ImageFeatures:
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize_pixels(pixel_values)
        feats = self.backbone.forward_features(pixel_values)
        pooled = self.backbone.forward_head(feats, pre_logits=True)
        tokens = feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats
        present = image_present.to(pooled.dtype)
        return ImageFeatures(tokens * present[:, None, None], pooled * present[:, None])
