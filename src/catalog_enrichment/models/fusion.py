"""Fusion methods of the papers in one registry: ``create_fusion(name, **cfg)``, ``list_fusions()``.

Every fusion takes the encoders' features and returns per-attribute probabilities (one forward
pass scores every attribute), the logits its training loss is computed on, optional per-product
modality weights and an auxiliary loss.

==================  ======================================================================  =======
name                method                                                                  paper
==================  ======================================================================  =======
text_only           pooled text -> linear heads                                             004
image_only          pooled image -> linear heads                                            004
late                separate text and image heads; probabilities interpolated with alpha    000
                    per attribute, alpha picked on held-out data after training
decision            unimodal heads, then small NNs on both modalities' probabilities,       001
                    cross-validated on held-out data after the unimodal training
concat              early shallow: [text, image] -> MLP -> heads                            000/004
cross_attention     SA(h,h,h) + VG * SA(h,v,v), VG = sigmoid(W1 h_i + W2 v0 + b),           000
                    summed tokens -> linear heads (eqs. 1-4)
hierarchical        fields (title, description) merged within each text encoder, then       002
                    across encoders, then with the image (each add | concat | average)
modality_attention  LayerNorm per modality; per product and attribute p_txt = sigmoid(      004
                    W[x_t, x_i] + b); heads on [p x_t, (1-p) x_i]; lambda * KL(p || uniform)
stack               linear learners per block (n-gram TF-IDF, text, image, colour), each    001
                    standardised and fitted in closed form; a meta-learner per attribute
                    over their out-of-fold scores (training.stack)
==================  ======================================================================  =======

Over 600 lines because the nine methods sit side by side in one registry, each a short class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import numpy as np
import torch
from torch import nn

from catalog_enrichment.contracts import AttributeKind
from catalog_enrichment.errors import ConfigError
from catalog_enrichment.metrics import f1_scores

__all__ = [
    "Fusion",
    "FusionInputs",
    "FusionOutput",
    "HeadSpec",
    "create_fusion",
    "list_fusions",
    "register_fusion",
    "trained_fusions",
]


# ----------------------------------------------------------------------------- pure functions


def kl_to_uniform(weights: torch.Tensor) -> torch.Tensor:
    """``KL(p || uniform)`` per row of ``(..., M)`` modality weights = log M - H(p) (004 eq. 5)."""
    p = weights.clamp_min(1e-8)
    return (p * p.log()).sum(dim=-1) + math.log(weights.shape[-1])


def probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Sigmoid for a multi-label head, softmax for a multi-class one, in float32 whatever the
    autocast around it (bf16 probabilities near 1 are 2^-8 apart: calibrated thresholds above 0.996
    could no longer be told apart)."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()
        return torch.sigmoid(logits) if kind == "multilabel" else torch.softmax(logits, dim=-1)


def in_float32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in float32 whatever the autocast around it: the layers that make the calibrated
    scores (heads, decision networks) run one numeric path on every device; the encoders may not."""
    with torch.autocast(x.device.type, enabled=False):
        return module(x.float())


def merge(vectors: Sequence[torch.Tensor], how: str) -> torch.Tensor:
    """Merge same-shaped vectors by ``add``, ``average`` or ``concat`` (002's level operations)."""
    if how == "add":
        return torch.stack(list(vectors)).sum(dim=0)
    if how == "average":
        return torch.stack(list(vectors)).mean(dim=0)
    if how == "concat":
        return torch.cat(list(vectors), dim=-1)
    raise ConfigError(f"unknown merge {how!r}; use add, average or concat")


# ----------------------------------------------------------------------------- small modules


@dataclass(frozen=True)
class HeadSpec:
    """One taxonomy attribute's head: name, kind, number of values."""

    name: str
    kind: AttributeKind
    num_values: int


class AttributeHeads(nn.Module):
    """One linear head per attribute on a shared input vector."""

    def __init__(self, in_dim: int, heads: Sequence[HeadSpec]) -> None:
        super().__init__()
        self.specs = {h.name: h for h in heads}
        self.heads = nn.ModuleDict({h.name: nn.Linear(in_dim, h.num_values) for h in heads})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: in_float32(head, x) for name, head in self.heads.items()}


@dataclass
class FusionInputs:
    """What the encoders produced for a batch.

    ``text_tokens`` (B, L, H), ``text_mask`` (B, L), ``text_pooled`` (B, H); ``image_tokens``
    (B, N, C), ``image_pooled`` (B, C), ``image_present`` (B,); ``field_pooled`` (hierarchical only):
    ``[encoder][field]`` -> (B, H_e) with ``field_present[field]`` (B,); ``lexical`` (stack only):
    the hashed n-grams, :data:`catalog_enrichment.models.lexical.LexicalBatch`.
    """

    image_present: torch.Tensor
    text_tokens: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None
    image_pooled: torch.Tensor | None = None
    field_pooled: list[list[torch.Tensor]] | None = None
    field_present: list[torch.Tensor] | None = None
    lexical: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


Tensors = Mapping[str, torch.Tensor]  # attribute -> a tensor per attribute
BranchProbs = Mapping[str, Tensors]  # branch name ("text", "image") -> attribute -> (B, V)


@dataclass
class FusionOutput:
    """A fusion's result for a batch of B products.

    Attributes:
        probs: attribute -> (B, V) probabilities (the scores that get calibrated and written).
        train_logits: logits sets the loss is computed on (one per supervised branch),
            each attribute -> (B, V).
        modality_weights: attribute -> (B, 2) [text, image] weights (modality_attention only).
        aux_loss: scalar regulariser added to the loss (0 when none).
        branch_probs: branch name -> attribute -> (B, V), for fusions fitted on held-out data.
    """

    probs: dict[str, torch.Tensor]
    train_logits: list[dict[str, torch.Tensor]]
    aux_loss: torch.Tensor
    modality_weights: dict[str, torch.Tensor] | None = None
    branch_probs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class Fusion(nn.Module):
    """Base class. Subclasses declare which encoder outputs they need."""

    needs_text: ClassVar[bool] = True
    needs_image: ClassVar[bool] = True
    needs_tokens: ClassVar[bool] = False
    needs_fields: ClassVar[bool] = False
    fits_on_heldout: ClassVar[bool] = False
    needs_lexical: ClassVar[bool] = False  # the hashed n-grams of models.lexical
    # told how many of the image vector's values are colour and close-up (model.image.close_up)
    splits_colour: ClassVar[bool] = False

    def __init__(self, text_dim: int, image_dim: int, heads: Sequence[HeadSpec]) -> None:
        super().__init__()
        self.text_dim, self.image_dim = text_dim, image_dim
        self.specs = {h.name: h for h in heads}

    @property
    def nfkc(self) -> bool:
        """Whether the n-grams (``needs_lexical``) are counted on NFKC-normalised texts."""
        return False

    def _probs(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {a: probabilities(lg, self.specs[a].kind) for a, lg in logits.items()}

    def _output(self, logits: dict[str, torch.Tensor], device: torch.device, **extra: Any) -> FusionOutput:
        return FusionOutput(self._probs(logits), [logits], torch.zeros((), device=device), **extra)

    def extra_text_encoders(self) -> list[dict[str, Any]]:
        """Config overrides of additional text encoders this fusion needs (hierarchical)."""
        return []

    def fit_heldout(self, branch_probs: BranchProbs, targets: Tensors, known: Tensors) -> dict[str, Any]:
        """Fit the parts picked on held-out data (late: alpha; decision: the decision net)."""
        return {}


_REGISTRY: dict[str, type[Fusion]] = {}


def register_fusion(name: str) -> Callable[[type[Fusion]], type[Fusion]]:
    """Class decorator adding a fusion to the registry under ``name``."""

    def add(cls: type[Fusion]) -> type[Fusion]:
        if name in _REGISTRY:
            raise ValueError(f"fusion {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return add


def list_fusions() -> list[str]:
    """Names of all registered fusion methods."""
    return sorted(_REGISTRY)


def trained_fusions() -> list[str]:
    """The fusions trained by gradient steps with their encoders (every one but ``stack``, which
    is fitted in closed form over frozen pretrained encoders): what ``bench quality`` runs by default."""
    return [name for name in list_fusions() if not _REGISTRY[name].needs_lexical]


def fusion_class(name: str) -> type[Fusion]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown fusion {name!r}; available: {', '.join(list_fusions())}") from None


def fusion_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` (``model.fusion_kwargs``) checked against the fusion's keyword arguments, their
    names and types read from its constructor: unknown names and wrong types are one
    :class:`ConfigError` naming them. Training checks them before it reads any data."""
    import inspect
    import typing

    import pydantic

    cls = fusion_class(name)
    hints = typing.get_type_hints(cls.__init__)
    fields: dict[str, Any] = {
        p.name: (hints[p.name], p.default)
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    model = pydantic.create_model(
        f"{cls.__name__}Options", __config__=pydantic.ConfigDict(extra="forbid"), **fields
    )
    try:
        return model(**options).model_dump(exclude_unset=True)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        allowed = ", ".join(f"{k} ({getattr(t, '__name__', t)})" for k, (t, _) in fields.items())
        raise ConfigError(f"fusion {name!r}: {problems} (model.fusion_kwargs takes {allowed})") from None


def create_fusion(
    name: str, *, text_dim: int, image_dim: int, heads: Sequence[HeadSpec], **cfg: Any
) -> Fusion:
    """Build a registered fusion; unknown names and options (:func:`fusion_options`) are a
    :class:`ConfigError`."""
    return fusion_class(name)(text_dim, image_dim, heads, **fusion_options(name, cfg))


# ----------------------------------------------------------------------------- the methods


class _Unimodal(Fusion):
    """One modality's pooled vector -> LayerNorm -> dropout -> linear heads (paper 004's classifier)."""

    modality: ClassVar[str]

    def __init__(
        self, text_dim: int, image_dim: int, heads: Sequence[HeadSpec], *, dropout: float = 0.1
    ) -> None:
        super().__init__(text_dim, image_dim, heads)
        dim = text_dim if self.modality == "text" else image_dim
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.heads = AttributeHeads(dim, heads)

    def forward(self, x: FusionInputs) -> FusionOutput:
        pooled = x.text_pooled if self.modality == "text" else x.image_pooled
        assert pooled is not None
        return self._output(self.heads(self.dropout(self.norm(pooled))), pooled.device)


@register_fusion("text_only")
class TextOnly(_Unimodal):
    needs_image = False
    modality = "text"


@register_fusion("image_only")
class ImageOnly(_Unimodal):
    needs_text = False
    modality = "image"


class _TwoBranches(Fusion):
    """Separate text and image heads trained together (no shared parameters = trained apart)."""

    fits_on_heldout = True

    def __init__(
        self, text_dim: int, image_dim: int, heads: Sequence[HeadSpec], *, dropout: float = 0.1
    ) -> None:
        super().__init__(text_dim, image_dim, heads)
        self.text_branch = TextOnly(text_dim, image_dim, heads, dropout=dropout)
        self.image_branch = ImageOnly(text_dim, image_dim, heads, dropout=dropout)

    def _branches(self, x: FusionInputs) -> tuple[FusionOutput, FusionOutput]:
        return self.text_branch(x), self.image_branch(x)

    @staticmethod
    def _combined(probs: dict[str, torch.Tensor], text: FusionOutput, image: FusionOutput) -> FusionOutput:
        """The fused ``probs``, trained through both branches' logits (their probabilities kept
        for the held-out fit)."""
        return FusionOutput(
            probs,
            text.train_logits + image.train_logits,
            text.aux_loss,
            branch_probs={"text": text.probs, "image": image.probs},
        )


@register_fusion("late")
class LateFusion(_TwoBranches):
    """000: p = alpha * p_text + (1 - alpha) * p_image, alpha per attribute picked on held-out data."""

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        heads: Sequence[HeadSpec],
        *,
        dropout: float = 0.1,
        alpha_grid: int = 21,
    ) -> None:
        super().__init__(text_dim, image_dim, heads, dropout=dropout)
        self.alpha_grid = alpha_grid
        self.alpha: torch.Tensor
        self.register_buffer("alpha", torch.full((len(heads),), 0.5))
        self.order = [h.name for h in heads]

    def forward(self, x: FusionInputs) -> FusionOutput:
        text, image = self._branches(x)
        probs = {
            a: self.alpha[k] * text.probs[a] + (1 - self.alpha[k]) * image.probs[a]
            for k, a in enumerate(self.order)
        }
        return self._combined(probs, text, image)

    def fit_heldout(self, branch_probs: BranchProbs, targets: Tensors, known: Tensors) -> dict[str, Any]:
        from catalog_enrichment.metrics import attribute_r_at_p

        chosen = {}
        for k, a in enumerate(self.order):
            kind = self.specs[a].kind
            mask = known[a].numpy()
            y = targets[a].numpy()[mask]
            pt, pi = branch_probs["text"][a].numpy()[mask], branch_probs["image"][a].numpy()[mask]
            best = (-1.0, 0.5)
            for alpha in np.linspace(0, 1, self.alpha_grid):
                score = attribute_r_at_p(alpha * pt + (1 - alpha) * pi, y, kind).pooled
                if score > best[0] + 1e-12:
                    best = (score, float(alpha))
            self.alpha[k] = best[1]
            chosen[a] = best[1]
        return {"alpha": chosen}


@register_fusion("decision")
class DecisionFusion(_TwoBranches):
    """001 §3.3.2 / §4.1: unimodal heads, then per attribute a 2-layer network (hidden size 6) on
    [p_text, p_image], fitted on the held-out split by K-fold cross-validation (8 folds): each fold's
    network trains on the other folds (Adam, lr 0.01, 40 epochs) and keeps the epoch with the best
    macro-F1 on its own fold. The K networks' probabilities are averaged (001 majority-votes them;
    an average is a score that can be calibrated)."""

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        heads: Sequence[HeadSpec],
        *,
        dropout: float = 0.1,
        hidden: int = 6,
        folds: int = 8,
        epochs: int = 40,
        batch_size: int = 32,
        lr: float = 0.01,
    ) -> None:
        super().__init__(text_dim, image_dim, heads, dropout=dropout)
        if folds < 2:
            raise ConfigError(f"fusion 'decision': folds must be at least 2, not {folds}")
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.decision = nn.ModuleDict(
            {
                h.name: nn.ModuleList(
                    nn.Sequential(
                        nn.Linear(2 * h.num_values, hidden), nn.ReLU(), nn.Linear(hidden, h.num_values)
                    )
                    for _ in range(folds)
                )
                for h in heads
            }
        )
        self.fitted: torch.Tensor
        self.register_buffer("fitted", torch.zeros(()))

    def _decide(
        self, pt: Mapping[str, torch.Tensor], pi: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = {}
        for a, nets in self.decision.items():
            x = torch.cat([pt[a], pi[a]], dim=-1)
            out[a] = torch.stack(
                [probabilities(in_float32(net, x), self.specs[a].kind) for net in cast(nn.ModuleList, nets)]
            ).mean(dim=0)
        return out

    def forward(self, x: FusionInputs) -> FusionOutput:
        text, image = self._branches(x)
        if self.fitted.item():
            probs = self._decide(text.probs, image.probs)
        else:  # before the decision nets are fitted, report the average (used for early stopping)
            probs = {a: (text.probs[a] + image.probs[a]) / 2 for a in text.probs}
        return self._combined(probs, text, image)

    def fit_heldout(self, branch_probs: BranchProbs, targets: Tensors, known: Tensors) -> dict[str, Any]:
        from sklearn.model_selection import KFold

        report: dict[str, float] = {}
        for a, module in self.decision.items():
            nets = cast(nn.ModuleList, module)
            kind = self.specs[a].kind
            rows = torch.nonzero(known[a].bool()).flatten()
            x = torch.cat([branch_probs["text"][a], branch_probs["image"][a]], dim=-1).detach()[rows].float()
            y = targets[a][rows]
            if rows.numel() < 2 * len(nets):
                raise ConfigError(
                    f"fusion 'decision': attribute {a!r} has {rows.numel()} labelled held-out products, "
                    f"too few for {len(nets)}-fold cross-validation; lower fusion_kwargs.folds"
                )
            folds = KFold(len(nets), shuffle=True, random_state=0).split(np.arange(rows.numel()))
            best = [
                _fit_decision_net(net, kind, x, y, fold, self.epochs, self.batch_size, self.lr)
                for net, fold in zip(nets, folds, strict=True)
            ]
            report[a] = round(float(np.mean(best)), 4)
        self.fitted.fill_(1.0)
        return {"decision_fold_macro_f1": report}


def _fit_decision_net(
    net: nn.Module,
    kind: str,
    x: torch.Tensor,
    y: torch.Tensor,
    fold: tuple[np.ndarray, np.ndarray],
    epochs: int,
    batch_size: int,
    lr: float,
) -> float:
    """Train one fold's decision network on its fit rows (``fold``: fit and check rows); keep the
    epoch with the best macro-F1 on the check rows (001 §4.1); returns that F1."""
    fit_rows, check_rows = (torch.from_numpy(rows) for rows in fold)
    generator = torch.Generator().manual_seed(len(fit_rows))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    check_y = y[check_rows].numpy()
    best, best_state = -1.0, None
    with torch.enable_grad():
        for _ in range(epochs):
            net.train()
            order = fit_rows[torch.randperm(len(fit_rows), generator=generator)]
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                logits = net(x[batch])
                if kind == "multilabel":
                    loss = nn.functional.binary_cross_entropy_with_logits(logits, y[batch].float())
                else:
                    loss = nn.functional.cross_entropy(logits, y[batch].long())
                opt.zero_grad()
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                scores = probabilities(net(x[check_rows]), kind).numpy()
            f1 = f1_scores(scores, check_y, kind)["macro_f1"]  # type: ignore[arg-type]
            if f1 > best:
                best, best_state = f1, {k: v.clone() for k, v in net.state_dict().items()}
    assert best_state is not None
    net.load_state_dict(best_state)
    return best


@register_fusion("concat")
class ConcatFusion(Fusion):
    """000/004 early shallow fusion: concatenate the two vectors, one hidden layer, heads."""

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        heads: Sequence[HeadSpec],
        *,
        dropout: float = 0.1,
        hidden_dim: int = 256,
    ) -> None:
        super().__init__(text_dim, image_dim, heads)
        self.mlp = nn.Sequential(nn.Linear(text_dim + image_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout))
        self.heads = AttributeHeads(hidden_dim, heads)

    def forward(self, x: FusionInputs) -> FusionOutput:
        assert x.text_pooled is not None and x.image_pooled is not None
        return self._output(
            self.heads(self.mlp(torch.cat([x.text_pooled, x.image_pooled], -1))), x.text_pooled.device
        )


@register_fusion("cross_attention")
class CrossAttentionFusion(Fusion):
    """000 eqs. 1-4: h' = SA(h,h,h) + VG * SA(h,v,v), VG_i = sigmoid(W1 h_i + W2 v0 + b); heads(sum h')."""

    needs_tokens = True

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        heads: Sequence[HeadSpec],
        *,
        dropout: float = 0.1,
        num_heads: int = 4,
    ) -> None:
        super().__init__(text_dim, image_dim, heads)
        self.project_image = nn.Linear(image_dim, text_dim)
        self.self_attention = nn.MultiheadAttention(text_dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(text_dim, num_heads, dropout=dropout, batch_first=True)
        self.gate_text = nn.Linear(text_dim, text_dim)
        self.gate_image = nn.Linear(text_dim, text_dim, bias=False)
        self.norm = nn.LayerNorm(text_dim)
        self.heads = AttributeHeads(text_dim, heads)

    def forward(self, x: FusionInputs) -> FusionOutput:
        assert x.text_tokens is not None and x.text_mask is not None
        assert x.image_tokens is not None and x.image_pooled is not None
        h, pad = x.text_tokens, x.text_mask == 0
        v = self.project_image(x.image_tokens)
        v0 = self.project_image(x.image_pooled)
        sa, _ = self.self_attention(h, h, h, key_padding_mask=pad, need_weights=False)
        ca, _ = self.cross_attention(h, v, v, need_weights=False)
        gate = torch.sigmoid(self.gate_text(h) + self.gate_image(v0)[:, None, :])
        fused = sa + gate * ca * x.image_present[:, None, None]
        pooled = (fused * x.text_mask[..., None]).sum(dim=1)
        return self._output(
            self.heads(self.norm(pooled)),
            pooled.device,
            modality_weights={
                a: torch.stack([1 - gate.mean(dim=(1, 2)), gate.mean(dim=(1, 2))], dim=-1) for a in self.specs
            },
        )


@register_fusion("hierarchical")
class HierarchicalFusion(Fusion):
    """002 eq. 1, y = f(Z(P, Z(Z(T_1, D_1), Z(T_2, D_2)))): the fields (title T, description D) merged
    within each text encoder (``level1``), those merged across the encoders (``level2``), the text
    merged with the image P (``image``; P projected to the text's width where an add or average
    needs it, as 002's 1-D convolution does), then a fully connected classifier ``f``.

    Over frozen pretrained encoders (``training.encoders: frozen``) only this module and the heads
    train: 002's set-up of fine-tuned unimodal encoders under a small fusion head.
    """

    needs_fields = True

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        heads: Sequence[HeadSpec],
        *,
        dropout: float = 0.1,
        level1: str = "average",
        level2: str = "average",
        image: str = "concat",
        second_encoder: str | None = "distilbert",
        second_encoder_path: str | None = None,
        hidden_dim: int = 256,
    ) -> None:
        super().__init__(text_dim, image_dim, heads)
        for level in (level1, level2, image):
            merge([torch.zeros(1)], level)  # validates the name
        self.level1, self.level2, self.image_merge = level1, level2, image
        self.second_encoder, self.second_encoder_path = second_encoder, second_encoder_path
        n_encoders = 2 if second_encoder else 1
        encoder_dim = text_dim * (2 if level1 == "concat" else 1)  # two fields per encoder
        text_out = encoder_dim * (n_encoders if level2 == "concat" else 1)
        self.text_norm = nn.LayerNorm(text_out)
        self.image_norm = nn.LayerNorm(image_dim)
        # add / average need the image at the text's width
        self.project_image: nn.Module = (
            nn.Linear(image_dim, text_out) if image != "concat" and image_dim != text_out else nn.Identity()
        )
        joint = text_out + image_dim if image == "concat" else text_out
        self.mlp = nn.Sequential(nn.Linear(joint, hidden_dim), nn.GELU(), nn.Dropout(dropout))
        self.heads = AttributeHeads(hidden_dim, heads)

    def extra_text_encoders(self) -> list[dict[str, Any]]:
        if not self.second_encoder:
            return []
        return [{"model_type": self.second_encoder, "pretrained_path": self.second_encoder_path}]

    def text_vector(self, x: FusionInputs) -> torch.Tensor:
        """Level 1 (fields within each encoder), then level 2 (across encoders); an absent field is 0."""
        assert x.field_pooled is not None and x.field_present is not None
        per_encoder = [
            merge([fields[f] * x.field_present[f][:, None] for f in range(len(fields))], self.level1)
            for fields in x.field_pooled
        ]
        return merge(per_encoder, self.level2)

    def joint_vector(self, x: FusionInputs) -> torch.Tensor:
        """The text merged with the image (0 where the product has none): the classifier's input."""
        assert x.image_pooled is not None
        image = self.project_image(self.image_norm(x.image_pooled)) * x.image_present[:, None]
        return merge([self.text_norm(self.text_vector(x)), image], self.image_merge)

    def forward(self, x: FusionInputs) -> FusionOutput:
        joint = self.joint_vector(x)
        return self._output(self.heads(self.mlp(joint)), joint.device)


@register_fusion("modality_attention")
class ModalityAttentionFusion(Fusion):
    """004 eqs. 2-4, one merger per attribute: LayerNorm each modality, p_txt = sigmoid(W[x_t, x_i] + b),
    head input [p_txt x_t, p_img x_i], loss + lambda * mean KL(p || uniform)."""

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        heads: Sequence[HeadSpec],
        *,
        dropout: float = 0.1,
        kl_lambda: float = 1.0,
    ) -> None:
        super().__init__(text_dim, image_dim, heads)
        self.kl_lambda = kl_lambda
        self.text_norm = nn.LayerNorm(text_dim)
        self.image_norm = nn.LayerNorm(image_dim)
        self.dropout = nn.Dropout(dropout)
        self.gates = nn.ModuleDict({h.name: nn.Linear(text_dim + image_dim, 1) for h in heads})
        self.heads = nn.ModuleDict({h.name: nn.Linear(text_dim + image_dim, h.num_values) for h in heads})

    def forward(self, x: FusionInputs) -> FusionOutput:
        assert x.text_pooled is not None and x.image_pooled is not None
        xt, xi = self.text_norm(x.text_pooled), self.image_norm(x.image_pooled)
        both = torch.cat([xt, xi], dim=-1)
        logits, weights = {}, {}
        kl = torch.zeros((), device=both.device)
        for name, gate in self.gates.items():
            p_txt = torch.sigmoid(gate(both))  # (B, 1)
            w = torch.cat([p_txt, 1 - p_txt], dim=-1)
            weights[name] = w
            kl = kl + kl_to_uniform(w).mean()
            mixed = self.dropout(torch.cat([p_txt * xt, (1 - p_txt) * xi], dim=-1))
            logits[name] = in_float32(self.heads[name], mixed)
        out = self._output(logits, both.device, modality_weights=weights)
        out.aux_loss = self.kl_lambda * kl / len(self.gates)
        return out


# the stack's blocks, in the order of its ``mix`` columns (a close-up's after them)
STACK_BLOCKS = ("ngrams", "text", "image", "colour")
# the block of a model whose image encoder reads a close-up (model.image.close_up), after the others
CLOSE_UP = "close_up"
# the blocks that read the photo: they count only for a product with one
_IMAGE_BLOCKS = ("image", "colour", CLOSE_UP)


@register_fusion("stack")
class StackFusion(Fusion):
    """001 §3.3.2/§3.4, decision-level stacking over linear learners. Blocks: the lexical
    modality's TF-IDF (``models.lexical``), the pooled text vector, the image backbone's pooled
    features and the photo's colour statistics (the image vector's last ``color_dims``), and with
    ``close_up_dims`` the close-up's features (between the two, :data:`CLOSE_UP`). Each dense
    block is standardised with its training statistics and has its own linear head per attribute;
    per attribute, a meta-learner adds the blocks' log-probabilities (multi-class) or logits
    (multi-label), each block weighed by a weight the values share plus each value's own part of
    it (``meta_weight``), plus a bias per value. Image blocks count only for products with a
    photo.

    Every weight is fitted in closed form over cached encoder outputs (``training.stack``); nothing
    here trains by gradient steps. A single-valued multi-label attribute (``single``: every labelled
    product has one value) is one softmax, a distribution its value groups sum over; the taxonomy
    the model is saved with marks it single-valued, so that only each product's first-ranked value
    can be written (:meth:`catalog_enrichment.contracts.Taxonomy.derive`).

    The n-grams of a model built here are counted on NFKC-normalised texts (``lex_nfkc``, saved with
    it); one loaded from weights saved without that mark counts them on the texts as typed, as it
    was trained.
    """

    needs_lexical: ClassVar[bool] = True
    splits_colour: ClassVar[bool] = True
    lex_rows: torch.Tensor  # bucket -> vocabulary row, -1 outside it
    lex_idf: torch.Tensor
    lex_nfkc: torch.Tensor  # whether the n-grams are counted on NFKC-normalised texts
    single: torch.Tensor  # per attribute: single-valued multi-label

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        heads: Sequence[HeadSpec],
        *,
        dropout: float = 0.0,
        color_dims: int = 0,
        close_up_dims: int = 0,
    ) -> None:
        del dropout  # a closed-form fit has no dropout
        super().__init__(text_dim, image_dim, heads)
        self.names = [h.name for h in heads]
        sizes = [h.num_values for h in heads]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        total = int(self.offsets[-1])
        # the image vector is [whole photo, close-up, colour]; a block of each
        self.dims = {"text": text_dim, "image": image_dim - color_dims - close_up_dims, "colour": color_dims}
        self.blocks: tuple[str, ...] = STACK_BLOCKS
        if close_up_dims:
            self.dims[CLOSE_UP] = close_up_dims
            self.blocks = (*STACK_BLOCKS, CLOSE_UP)
        from catalog_enrichment.models.lexical import BUCKETS

        self.register_buffer("lex_rows", torch.full((BUCKETS,), -1, dtype=torch.long))
        self.register_buffer("lex_idf", torch.zeros(0))
        self.register_buffer("lex_nfkc", torch.tensor(True))
        self.lex_weight = nn.Parameter(torch.zeros(0, total), requires_grad=False)
        self.lex_bias = nn.Parameter(torch.zeros(total), requires_grad=False)
        for block, dim in self.dims.items():
            self.register_buffer(f"{block}_mean", torch.zeros(dim))
            self.register_buffer(f"{block}_scale", torch.ones(dim))
            self.register_parameter(
                f"{block}_weight", nn.Parameter(torch.zeros(dim, total), requires_grad=False)
            )
            self.register_parameter(f"{block}_bias", nn.Parameter(torch.zeros(total), requires_grad=False))
        self.mix = nn.Parameter(torch.zeros(len(heads), len(self.blocks)), requires_grad=False)
        # each value's own part of its block weights, beside the attribute's shared ``mix``
        self.meta_weight = nn.Parameter(torch.zeros(len(self.blocks), total), requires_grad=False)
        self.meta_bias = nn.Parameter(torch.zeros(total), requires_grad=False)
        self.register_buffer("single", torch.zeros(len(heads), dtype=torch.bool))

    @property
    def nfkc(self) -> bool:
        return bool(self.lex_nfkc)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # weights saved before the mark were fitted on n-grams of the texts as typed
        state_dict.setdefault(prefix + "lex_nfkc", torch.tensor(False))
        # weights saved before a value had its own part of the block weights: the shared ones alone
        state_dict.setdefault(prefix + "meta_weight", torch.zeros_like(self.meta_weight))
        # the vocabulary's size is the fitted model's: take it from the weights being loaded
        for name in ("lex_idf", "lex_weight"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                current = getattr(self, name)
                resized = current.new_zeros(saved.shape)
                if isinstance(current, nn.Parameter):
                    setattr(self, name, nn.Parameter(resized, requires_grad=False))
                else:
                    setattr(self, name, resized)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def kind(self, k: int) -> str:
        """How attribute ``k``'s scores are made: ``multiclass`` (one softmax) or ``multilabel``."""
        return (
            "multiclass"
            if self.specs[self.names[k]].kind == "multiclass" or bool(self.single[k])
            else "multilabel"
        )

    def block_logits(self, x: FusionInputs) -> dict[str, torch.Tensor]:
        """Block -> ``(B, total values)`` linear scores (before the per-attribute normalisation)."""
        from catalog_enrichment.models.lexical import bag_tfidf

        if x.lexical is None:
            raise ConfigError("fusion 'stack' reads the lexical modality: the batch carries no n-grams")
        with torch.autocast(x.image_present.device.type, enabled=False):
            rows, weights = bag_tfidf(x.lexical, self.lex_rows, self.lex_idf)
            out = {
                "ngrams": nn.functional.embedding_bag(
                    rows, self.lex_weight, x.lexical[2], mode="sum", per_sample_weights=weights
                )
                + self.lex_bias
            }
            assert x.text_pooled is not None and x.image_pooled is not None
            vectors = {"text": x.text_pooled, **self.image_blocks(x.image_pooled)}
            for block, v in vectors.items():
                standard = (v.float() - getattr(self, f"{block}_mean")) / getattr(self, f"{block}_scale")
                out[block] = standard @ getattr(self, f"{block}_weight") + getattr(self, f"{block}_bias")
        return out

    def image_blocks(self, image: Any) -> dict[str, Any]:
        """The image vectors ``(B, image_dim)`` (a tensor or an array) split into the blocks that read
        the photo: the whole photo's features, the close-up's where there is one, the colour's."""
        whole, close_up = self.dims["image"], self.dims.get(CLOSE_UP, 0)
        parts = {"image": image[:, :whole], "colour": image[:, whole + close_up :]}
        if close_up:
            parts[CLOSE_UP] = image[:, whole : whole + close_up]
        return parts

    def normalised(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """One attribute's block scores as the meta-learner reads them."""
        return torch.log_softmax(logits, dim=-1) if self.kind(k) == "multiclass" else logits

    def forward(self, x: FusionInputs) -> FusionOutput:
        blocks = self.block_logits(x)
        probs, logits = {}, {}
        for k, name in enumerate(self.names):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            z = [self.normalised(blocks[block][:, lo:hi], k) for block in self.blocks]
            logits[name], probs[name] = stack_scores(
                z,
                x.image_present,
                self.mix[k][:, None] + self.meta_weight[:, lo:hi],
                self.meta_bias[lo:hi],
                self.kind(k),
                self.blocks,
            )
        return FusionOutput(probs, [logits], torch.zeros((), device=x.image_present.device))


def stack_scores(
    z: Sequence[torch.Tensor],
    present: torch.Tensor,
    mix: torch.Tensor,
    bias: torch.Tensor,
    kind: str,
    blocks: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stack's meta-learner for one attribute: ``(logits, probabilities)`` from the normalised
    scores ``z`` of ``blocks`` (in that order) weighed by ``mix`` (blocks, values); image blocks
    count where ``present``."""
    gate = present.float()[:, None]
    total = bias.expand(gate.shape[0], -1)
    for b, block in enumerate(blocks):
        total = total + mix[b] * (z[b] * gate if block in _IMAGE_BLOCKS else z[b])
    return total, torch.sigmoid(total) if kind != "multiclass" else torch.softmax(total, dim=-1)
