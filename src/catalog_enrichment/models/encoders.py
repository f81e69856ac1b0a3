"""Headless encoders from their libraries: transformers for text, timm for images.

Weights load only from local paths (``pretrained_path``); otherwise the encoders are built from
their configs with random initialisation (tests, the demo, and this repo's benchmarks). A saved
model (:mod:`catalog_enrichment.inference.bundle`) rebuilds its encoders from the backbone config
and preprocessing it stored, never from the original paths.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from catalog_enrichment.config import ImageEncoderConfig, TextEncoderConfig
from catalog_enrichment.data.dataset import transformers_folder
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.errors import ConfigError
from catalog_enrichment.models.color import COLOR_FEATURES, color_features
from catalog_enrichment.progress import library_bars

__all__ = [
    "ImageEncoder",
    "ImageFeatures",
    "TextEncoder",
    "TextFeatures",
    "pool_tokens",
]


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


@dataclass(frozen=True)
class TextFeatures:
    """``tokens``: (B, L, H) last hidden states; ``mask``: (B, L); ``pooled``: (B, H)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


@dataclass(frozen=True)
class ImageFeatures:
    """``tokens``: (B, N, C) spatial features; ``pooled``: (B, C), zero where the image is absent."""

    tokens: torch.Tensor
    pooled: torch.Tensor


class TextEncoder(nn.Module):
    """Any transformers ``AutoModel`` as a headless encoder with cls / mean / sum pooling.

    Built, in this order of preference, from ``backbone_config`` (a saved model's architecture; the
    weights come from its state dict), from ``cfg.pretrained_path``, or from ``cfg``'s size fields.
    """

    def __init__(
        self,
        cfg: TextEncoderConfig,
        *,
        vocab_size: int | None = None,
        pad_token_id: int = 0,
        backbone_config: Any = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.cfg = cfg
        if backbone_config is not None:
            self.backbone = AutoModel.from_config(backbone_config)
        elif cfg.pretrained_path:
            folder = transformers_folder(cfg.pretrained_path, "model.text.pretrained_path")
            try:
                with library_bars():
                    self.backbone = AutoModel.from_pretrained(str(folder))
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"model.text.pretrained_path: cannot load a model from {folder}: {exc}"
                ) from None
        else:
            config = AutoConfig.for_model(
                cfg.model_type, **self._config_kwargs(cfg, vocab_size, pad_token_id)
            )
            self.backbone = AutoModel.from_config(config)
        rows = self.backbone.get_input_embeddings().num_embeddings
        if vocab_size is not None and vocab_size > rows:
            raise ConfigError(
                f"the tokenizer has {vocab_size} tokens but the text model's embedding has {rows} rows: "
                "the tokenizer does not belong to this model (model.text.pretrained_path)"
            )
        positions = getattr(self.backbone.config, "max_position_embeddings", None)
        if isinstance(positions, int) and cfg.max_length > positions:  # a long text would fail its task
            raise ConfigError(
                f"model.text.max_length is {cfg.max_length} but the text model has {positions} positions: "
                f"set model.text.max_length to at most {positions}"
            )
        self.hidden_size = int(getattr(self.backbone.config, "hidden_size", None) or self.backbone.config.dim)
        self.takes_token_types = "token_type_ids" in inspect.signature(self.backbone.forward).parameters
        self.graph: Any = None  # the exported backbone that serves instead (models.runtime.attach)

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
        if self.takes_token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.graph is None:
            tokens = self.backbone(**kwargs).last_hidden_state
        else:
            if self.takes_token_types:
                kwargs.setdefault("token_type_ids", torch.zeros_like(input_ids))
            tokens = self.graph(**kwargs)
        return TextFeatures(
            tokens, attention_mask, pool_tokens(tokens, attention_mask, pooling or self.cfg.pooling)
        )


def _mean_and_sd(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, 2C)``: each channel's mean and standard deviation over a ``(B, C, H, W)`` map's space."""
    mean = feature_map.mean(dim=(2, 3))
    centred = feature_map - mean[:, :, None, None]
    return torch.cat([mean, centred.square().mean(dim=(2, 3)).sqrt()], dim=1)


def _with_color(
    pooled: torch.Tensor, tokens: torch.Tensor, color: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour statistics ``(B, K)`` appended to the pooled ``(B, C)`` vector and, for fusions that
    attend over the image's tokens ``(B, N, C)``, as one more token: every token is ``C + K`` wide,
    spatial tokens with zeros in the colour part, the colour token with zeros in the backbone's."""
    b, n, c = tokens.shape
    k = color.shape[1]
    spatial = torch.cat([tokens, tokens.new_zeros(b, n, k)], dim=2)
    color_token = torch.cat([tokens.new_zeros(b, 1, c), color[:, None, :]], dim=2)
    return torch.cat([pooled, color], dim=1), torch.cat([spatial, color_token], dim=1)


class ImageEncoder(nn.Module):
    """Any timm model, created with ``num_classes=0``; exposes pooled and spatial features.

    ``pixel_values`` are either normalised float or the decoded uint8 pixels, normalised here with
    :attr:`preprocessing`, on the model's device (serving sends a GPU a quarter of the bytes).
    ``preprocessing`` given = a saved model rebuilt: no pretrained weights are loaded. With
    ``close_up`` the pixels are decoded at twice the input size and the pooled vector is the whole
    photo's stage features, the close-up's (:meth:`_with_close_up`), then the colour statistics.
    """

    def __init__(self, cfg: ImageEncoderConfig, *, preprocessing: ImagePreprocessing | None = None) -> None:
        super().__init__()
        import timm

        self.cfg = cfg
        kwargs: dict[str, Any] = dict(cfg.timm_kwargs)
        load_weights = bool(cfg.pretrained_path) and preprocessing is None
        try:
            self.backbone: Any = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
        except (RuntimeError, TypeError) as exc:  # timm: RuntimeError for unknown names
            raise ConfigError(f"model.image: {exc}") from None
        if load_weights:
            assert cfg.pretrained_path is not None
            self._load_weights(cfg.pretrained_path)
        backbone: Any = self.backbone
        self.backbone_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        if cfg.pooling == "stages":  # mean and SD of every stage's map, the last stage's included
            stages = [int(info["num_chs"]) for info in backbone.feature_info]
            self.backbone_features = 2 * (sum(stages) + int(backbone.num_features))
        # the close-up's stage features, as wide as the whole photo's (model.image.close_up)
        self.close_up_features = self.backbone_features if cfg.close_up else 0
        # the pooled vector: the backbone's features of the whole photo, of its close-up, then the
        # foreground's colour statistics
        self.num_features = (
            self.backbone_features + self.close_up_features + (COLOR_FEATURES if cfg.color_features else 0)
        )
        self.preprocessing = preprocessing or ImagePreprocessing.resolve(cfg, backbone)
        self.graph: Any = None  # the exported backbone that serves instead (models.runtime.attach)

    def _load_weights(self, path: str) -> None:
        """Load a local timm state dict; classifier weights are dropped (the model is headless)."""
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"model.image.pretrained_path: no such file: {path}")
        state: Any
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(file))
            else:
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch/safetensors raise many types for a file that is not weights
            raise ConfigError(f"model.image.pretrained_path: {path} is not a weights file: {exc}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ConfigError(f"model.image.pretrained_path: {path} does not hold a state dict")
        classifier = self.backbone.pretrained_cfg.get("classifier") or "classifier"
        state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
        own = self.backbone.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            parts = [
                f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                f"{len(wrong)} of another shape (e.g. {wrong[:3]})" if wrong else "",
            ]
            raise ConfigError(
                f"model.image.pretrained_path: the weights in {path} do not fit timm's {self.cfg.name!r}: "
                + ", ".join(p for p in parts if p)
            )
        self.backbone.load_state_dict(state)

    def backbone_output(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the backbone computes (and an exported graph serves): its last feature map, or with
        ``pooling: stages`` the ``(B, backbone_features)`` mean and SD of every stage's map."""
        if self.cfg.pooling == "head":
            return self.backbone.forward_features(pixel_values)
        last, stages = self.backbone.forward_intermediates(pixel_values)
        return torch.cat([_mean_and_sd(m) for m in (*stages, last)], dim=1)

    def _run(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.backbone_output(pixel_values)
        return self.graph(pixel_values=pixel_values)

    def _with_close_up(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 2 * backbone_features)``: the stage features of the whole photo (decoded at twice the
        input size, averaged 2 x 2 down to it) and of its centre at the decoded resolution (the middle
        half of each side), through the backbone as one batch of ``2B``."""
        size = self.preprocessing.size
        whole = nn.functional.avg_pool2d(pixel_values, 2)
        start = size // 2
        centre = pixel_values[:, :, start : start + size, start : start + size]
        feats = self._run(torch.cat([whole, centre]))
        return torch.cat(feats.chunk(2), dim=1)

    def forward(self, pixel_values: torch.Tensor, image_present: torch.Tensor) -> ImageFeatures:
        raw = pixel_values
        if pixel_values.dtype == torch.uint8:
            pixel_values = self.preprocessing.normalize(pixel_values)
        feats = self._with_close_up(pixel_values) if self.cfg.close_up else self._run(pixel_values)
        if self.cfg.pooling == "stages":  # already pooled; one token for fusions that attend
            pooled, tokens = feats, feats[:, None, :]
        else:
            pooled = self.backbone.forward_head(feats, pre_logits=True)
            tokens = feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats
        if self.cfg.color_features:
            color = color_features(raw if raw.dtype == torch.uint8 else self.preprocessing.unnormalize(raw))
            # float32 beside the colour statistics: bf16 would round them to 3 digits
            pooled, tokens = _with_color(pooled.float(), tokens.float(), color)
        present = image_present.to(pooled.dtype)
        return ImageFeatures(tokens * present[:, None, None], pooled * present[:, None])
