"""The multimodal attribute model: encoders -> fusion -> one head per taxonomy attribute.

One forward pass scores every attribute. The model never picks a device; callers move it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from catalog_enrichment.config import ModelConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.errors import ConfigError, TaxonomyError
from catalog_enrichment.models.color import COLOR_FEATURES
from catalog_enrichment.models.encoders import ImageEncoder, TextEncoder
from catalog_enrichment.models.fusion import FusionInputs, HeadSpec, create_fusion, fusion_class

__all__ = [
    "EnsembleModel",
    "ModelOutput",
    "MultimodalModel",
    "build_model",
    "check_heads",
    "combine_members",
    "deterministic_algorithms",
    "full_float32",
    "head_specs",
    "lexical_inputs",
]


@dataclass
class ModelOutput:
    """Scores for a batch of B products.

    Attributes:
        probs: attribute -> (B, V) probabilities (sigmoid for multi-label, softmax for multi-class).
        train_logits: logits sets the training loss is computed on, each attribute -> (B, V).
        aux_loss: scalar regulariser (e.g. 004's KL term), 0 when none.
        modality_weights: attribute -> (B, 2) [text, image] weights, where the fusion has them.
        branch_probs: per-modality probabilities of late/decision fusion, branch -> attribute -> (B, V).
    """

    probs: dict[str, torch.Tensor]
    train_logits: list[dict[str, torch.Tensor]]
    aux_loss: torch.Tensor
    modality_weights: dict[str, torch.Tensor] | None
    branch_probs: dict[str, dict[str, torch.Tensor]]


def head_specs(taxonomy: Taxonomy) -> list[HeadSpec]:
    """One head per taxonomy attribute, in taxonomy order."""
    return [HeadSpec(a.name, a.kind, len(a.values)) for a in taxonomy]


class MultimodalModel(nn.Module):
    """Text encoder(s) + image encoder + a registered fusion with per-attribute heads.

    ``text_backbones`` (one transformers config per text encoder) and ``preprocessing`` rebuild a
    saved model's architecture without its original pretrained paths; the weights then come from
    the saved state dict.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        heads: list[HeadSpec],
        *,
        vocab_size: int,
        pad_token_id: int = 0,
        text_backbones: Iterable[Any] | None = None,
        preprocessing: ImagePreprocessing | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.heads = heads
        cls = fusion_class(cfg.fusion)
        backbones = iter(text_backbones or [])
        rebuilt = text_backbones is not None
        self.text_encoders = nn.ModuleList()
        self.image_encoder: ImageEncoder | None = None
        if cls.needs_text:
            self.text_encoders.append(
                TextEncoder(
                    cfg.text,
                    vocab_size=vocab_size,
                    pad_token_id=pad_token_id,
                    backbone_config=next(backbones, None),
                )
            )
        if cls.needs_image:
            self.image_encoder = ImageEncoder(cfg.image, preprocessing=preprocessing)
        text_dim = cast(TextEncoder, self.text_encoders[0]).hidden_size if cls.needs_text else 0
        image_dim = self.image_encoder.num_features if self.image_encoder is not None else 0
        kwargs: dict[str, Any] = {"dropout": cfg.dropout, **cfg.fusion_kwargs}
        if cfg.fusion in ("concat", "hierarchical") and "hidden_dim" not in kwargs:
            kwargs["hidden_dim"] = cfg.hidden_dim
        if cls.splits_colour:
            kwargs["color_dims"] = COLOR_FEATURES if cls.needs_image and cfg.image.color_features else 0
            kwargs["close_up_dims"] = self.image_encoder.close_up_features if self.image_encoder else 0
        self.fusion = create_fusion(cfg.fusion, text_dim=text_dim, image_dim=image_dim, heads=heads, **kwargs)
        extra = self.fusion.extra_text_encoders()
        if not rebuilt:
            _check_shared_vocabulary(cfg, extra)
        for override in extra:
            extra_cfg = cfg.text.model_copy(update=override)
            self.text_encoders.append(
                TextEncoder(
                    extra_cfg,
                    vocab_size=vocab_size,
                    pad_token_id=pad_token_id,
                    backbone_config=next(backbones, None),
                )
            )
        widths = sorted({cast(TextEncoder, e).hidden_size for e in self.text_encoders})
        if len(widths) > 1:
            raise ConfigError(
                f"fusion {cfg.fusion!r}: its text encoders are {widths} wide; they are merged vector by "
                "vector, so they need the same hidden size"
            )

    @property
    def preprocessing(self) -> ImagePreprocessing:
        """How images are prepared for this model (the default for a text-only model)."""
        return self.image_encoder.preprocessing if self.image_encoder is not None else ImagePreprocessing()

    def text_backbone_configs(self) -> list[Any]:
        """The transformers config of every text encoder, in order (saved with the model)."""
        return [cast(TextEncoder, e).backbone.config for e in self.text_encoders]

    def _fields(self, batch: dict[str, torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """Encode title (segment 0) and description (segment 1) separately with every text encoder."""
        mask, segments = batch["attention_mask"], batch["token_type_ids"]
        pooling = "mean" if self.cfg.text.pooling == "cls" else self.cfg.text.pooling
        field_masks, present = [], []
        for seg in (0, 1):
            m = mask * (segments == seg).to(mask.dtype)
            present.append((m.sum(dim=1) > (1 if seg == 1 else 2)).to(torch.float32))  # more than [SEP]s
            m = m.clone()
            m[:, 0] = 1  # never an all-masked row (attention over nothing is NaN)
            field_masks.append(m)
        pooled = []
        for encoder in self.text_encoders:
            per_field = []
            for m in field_masks:
                per_field.append(encoder(batch["input_ids"], m, segments, pooling=pooling).pooled)
            pooled.append(per_field)
        return pooled, present

    def encode(self, batch: dict[str, torch.Tensor]) -> FusionInputs:
        """The encoders' outputs the fusion reads (token-level ones only for a fusion that attends
        over tokens: frozen training keeps every product's outputs, and tokens are tens of times the
        pooled vectors)."""
        fusion = self.fusion
        inputs = FusionInputs(image_present=batch["image_present"])
        if fusion.needs_fields:
            inputs.field_pooled, inputs.field_present = self._fields(batch)
        elif fusion.needs_text:
            text = self.text_encoders[0](
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
            )
            inputs.text_pooled = text.pooled
            if fusion.needs_tokens:
                inputs.text_tokens, inputs.text_mask = text.tokens, text.mask
        if self.image_encoder is not None:
            image = self.image_encoder(batch["pixel_values"], batch["image_present"])
            inputs.image_pooled = image.pooled
            if fusion.needs_tokens:
                inputs.image_tokens = image.tokens
        if fusion.needs_lexical and LEXICAL_KEYS[0] in batch:  # embedding for the store reads none
            inputs.lexical = lexical_inputs(batch)
        return inputs

    def fuse(self, inputs: FusionInputs) -> ModelOutput:
        """Fusion and heads over encoder outputs (training over cached embeddings starts here)."""
        out = self.fusion(inputs)
        return ModelOutput(out.probs, out.train_logits, out.aux_loss, out.modality_weights, out.branch_probs)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        return self.fuse(self.encode(batch))


LEXICAL_KEYS = ("lexical_ids", "lexical_counts", "lexical_offsets")


def lexical_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's hashed n-grams (``models.lexical``), which a collator adds for a lexical fusion."""
    ids, counts, offsets = (batch[k] for k in LEXICAL_KEYS)
    return ids, counts, offsets


def _check_shared_vocabulary(cfg: ModelConfig, extra: list[dict[str, Any]]) -> None:
    """Every text encoder reads the same token ids (one tokenizer per model): a second pretrained
    encoder must come with the first's vocabulary, as BERT and DistilBERT uncased do (paper 002)."""
    from catalog_enrichment.data.dataset import load_tokenizer

    for override in extra:
        path = override.get("pretrained_path")
        if bool(path) != bool(cfg.text.pretrained_path):
            raise ConfigError(
                f"fusion {cfg.fusion!r}: model.text.pretrained_path and fusion_kwargs.second_encoder_path "
                "must both be set (two pretrained text encoders) or both be unset (both from scratch)"
            )
        if not path:
            continue
        first = load_tokenizer(cfg.text).get_vocab()
        second = load_tokenizer(cfg.text.model_copy(update={"pretrained_path": path})).get_vocab()
        if first != second:
            raise ConfigError(
                f"fusion {cfg.fusion!r}: the second text encoder ({path}) has another vocabulary than "
                f"model.text.pretrained_path ({len(second)} and {len(first)} tokens); both read the same "
                "token ids, so they need the same tokenizer (e.g. BERT and DistilBERT uncased)"
            )


def combine_members(probs: list[torch.Tensor], kind: str, how: str) -> torch.Tensor:
    """One attribute's ``(B, V)`` scores from its members' (001 §3.4).

    ``mean``: the average probability. ``vote``: majority vote as a calibratable score,
    ``(votes + mean) / (members + 1)``: products ranked by their votes, ties broken by the mean
    probability. A member votes for the value it ranks first (multi-class) or every value it scores
    at 0.5 or more (multi-label).
    """
    stacked = torch.stack(probs)  # (M, B, V)
    mean = stacked.mean(dim=0)
    if how == "mean":
        return mean
    if how != "vote":
        raise ConfigError(f"unknown ensemble combine {how!r}; use mean or vote")
    if kind == "multilabel":
        votes = (stacked >= 0.5).sum(dim=0)
    else:
        votes = torch.nn.functional.one_hot(stacked.argmax(dim=-1), stacked.shape[-1]).sum(dim=0)
    return (votes.to(mean.dtype) + mean) / (len(probs) + 1)


class EnsembleModel(nn.Module):
    """001 §3.4: members trained apart (another seed and/or fusion), one forward pass each, their
    scores combined per attribute; calibrated, saved and served as one model."""

    def __init__(self, cfg: ModelConfig, members: list[MultimodalModel]) -> None:
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(members)
        self.heads = members[0].heads
        self.kinds = {h.name: h.kind for h in self.heads}

    @property
    def image_encoder(self) -> ImageEncoder | None:
        """The first member's image encoder (they all read the same preprocessed pixels)."""
        return next((m.image_encoder for m in self.member_models if m.image_encoder is not None), None)

    @property
    def member_models(self) -> list[MultimodalModel]:
        return [cast(MultimodalModel, m) for m in self.members]

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [e for m in self.member_models for e in m.text_encoders]

    @property
    def preprocessing(self) -> ImagePreprocessing:
        encoder = self.image_encoder
        return encoder.preprocessing if encoder is not None else ImagePreprocessing()

    def text_backbone_configs(self) -> list[Any]:
        return [c for m in self.member_models for c in m.text_backbone_configs()]

    def combine(self, outputs: list[ModelOutput]) -> ModelOutput:
        probs = {
            a: combine_members([o.probs[a] for o in outputs], kind, self.cfg.ensemble.combine)
            for a, kind in self.kinds.items()
        }
        zero = next(iter(probs.values())).new_zeros(())
        return ModelOutput(probs, [], zero, None, {})

    def fuse(self, inputs: FusionInputs) -> ModelOutput:
        return self.combine([m.fuse(inputs) for m in self.member_models])

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        return self.combine([m(batch) for m in self.member_models])


AnyModel = MultimodalModel | EnsembleModel


def needs_image(cfg: ModelConfig) -> bool:
    """Whether any of the model's (members') fusions reads the image."""
    return any(fusion_class(m.fusion).needs_image for m in cfg.member_configs())


def build_model(
    cfg: ModelConfig,
    taxonomy: Taxonomy,
    *,
    vocab_size: int,
    pad_token_id: int = 0,
    text_backbones: Iterable[Any] | None = None,
    preprocessing: ImagePreprocessing | None = None,
) -> MultimodalModel | EnsembleModel:
    """The model for ``taxonomy`` (random init unless the encoder configs name local weights; see
    :class:`MultimodalModel` for rebuilding a saved one); an :class:`EnsembleModel` of fresh members
    when ``cfg.ensemble.members`` > 1 (``text_backbones`` then lists every member's, in order)."""
    backbones = None if text_backbones is None else iter(text_backbones)
    members = [
        MultimodalModel(
            member,
            head_specs(taxonomy),
            vocab_size=vocab_size,
            pad_token_id=pad_token_id,
            text_backbones=backbones,
            preprocessing=preprocessing,
        )
        for member in cfg.member_configs()
    ]
    return members[0] if cfg.ensemble.members == 1 else EnsembleModel(cfg, members)


def check_heads(heads: list[HeadSpec], taxonomy: Taxonomy) -> None:
    """Raise :class:`TaxonomyError` naming every difference between a model's heads and a taxonomy."""
    have = {h.name: h for h in heads}
    want = {h.name: h for h in head_specs(taxonomy)}
    problems = [f"the model has no head for attribute {n!r}" for n in want if n not in have]
    problems += [f"the taxonomy lacks attribute {n!r} that the model predicts" for n in have if n not in want]
    problems += [
        f"attribute {n!r}: model head is {have[n].kind} with {have[n].num_values} values, "
        f"taxonomy says {want[n].kind} with {want[n].num_values}"
        for n in want
        if n in have and have[n] != want[n]
    ]
    if problems:
        raise TaxonomyError("model/taxonomy mismatch: " + "; ".join(problems))


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """torch's deterministic-kernels setting for the block, the caller's restored after."""
    before, warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Float32 convolutions (cuDNN) and matrix products (CUDA) in float32, not TF32's 10-bit
    mantissa, until the block ends; then the previous settings again. Every forward pass whose
    scores meet thresholds runs under it: the predictor's, the held-out splits' in training
    (``training.evaluation.predict``) and the frozen encoders' whose vectors training fits and
    calibrates on (``embeddings.frozen``). No effect on a CPU."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul  # type: ignore[attr-defined]
    previous = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = previous
