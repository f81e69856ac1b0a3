"""Self-supervised adaptation of the text encoder on unlabelled products (003).

* ``simcse`` (003 §3.1): each product's text goes through the encoder twice; the two dropout masks
  make two views, a positive pair; the other products of the batch are the negatives (InfoNCE).
* ``convirt`` (003 §3.2): the product's own image is the positive of its text and the batch's other
  images the negatives, in both directions: ``alpha * L(t->v) + (1 - alpha) * L(v->t)``, with
  003's ``alpha = 0.75`` and ``tau = 0.1``. Both encoders adapt; only the text encoder is kept.

Texts are encoded as the model reads them ([CLS] title [SEP] description), mean-pooled and passed
through an MLP projection (003 §4.1; its width is the encoder's). The result is a transformers folder
(weights, config, tokenizer) that ``model.text.pretrained_path`` reads: a text-only model fine-tuned
from it needs no image at serving time. The encoder adapted is ``model.text``'s (its pretrained
weights, else one built from its config with a WordPiece tokenizer trained on these products) and,
for ConVIRT, ``model.image``'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import set_seed

from catalog_enrichment.config import AppConfig, TextEncoderConfig
from catalog_enrichment.data.dataset import (
    Collator,
    ProductDataset,
    ProductRecords,
    build_tokenizer,
    canonical_order,
)
from catalog_enrichment.data.images import ImagePolicy, shared_images, usable_images
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.models.encoders import ImageEncoder, TextEncoder
from catalog_enrichment.models.model import deterministic_algorithms
from catalog_enrichment.progress import progress
from catalog_enrichment.training.fit import Optimisation
from catalog_enrichment.training.stream import (
    Source,
    digest_prefix,
    placeholder_prefixes,
    unlabelled_rows,
)
from catalog_enrichment.types import Say

__all__ = ["PretrainResult", "contrastive_loss", "pretrain_text"]

Method = Literal["simcse", "convirt"]
# 003 §4.1 (ConVIRT); SimCSE's own paper uses 0.05
DEFAULT_TEMPERATURE = {"simcse": 0.05, "convirt": 0.1}
# 003 §4.1: AdamW at 1e-5 adapts a pretrained BERT; an encoder built from its config starts from
# random weights and takes training.learning_rate
PRETRAINED_LR = 1e-5
RECORD = "pretraining.json"


def contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE, 003 eqs. 3 and 6: row i of ``anchors`` against every row of ``positives``, row i the
    positive, the batch's other rows the negatives; cosine similarity over ``temperature``."""
    logits = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(anchors.shape[0], device=anchors.device))


def _projection(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


@dataclass(frozen=True)
class PretrainOptions:
    """How ``pretrain_text`` adapts the encoder: ``method``, ``epochs`` of ``batch_size`` products,
    ``learning_rate`` (None: :data:`PRETRAINED_LR`, 1e-5, for a pretrained encoder, else
    ``training.learning_rate``), ``temperature`` (None: the method's default) and ConVIRT's
    text-to-image weight ``alpha``."""

    method: Method
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float | None = None
    temperature: float | None = None
    alpha: float = 0.75


@dataclass(frozen=True)
class PretrainResult:
    """What ``pretrain_text`` wrote and how the loss went (``losses``: mean per epoch)."""

    path: str
    method: str
    products: int
    epochs: int
    batch_size: int
    learning_rate: float
    temperature: float
    alpha: float | None
    losses: list[float]
    seconds: float


@dataclass(frozen=True)
class _Input:
    """What pre-training reads: the usable products' count, the texts a trained tokenizer learns
    from, the image encoder (ConVIRT) and the loader of an epoch's batches for a collator."""

    products: int
    texts: Iterable[str]
    image_encoder: ImageEncoder | None
    loader: Callable[[Collator, int], DataLoader]  # (collator, batch size)


def _in_memory(
    table: pa.Table, cfg: AppConfig, method: Method, policy: ImagePolicy, device: torch.device, say: Say
) -> _Input:
    """The products of a table in memory (SimCSE: text only, no image read; ConVIRT: those whose
    image decodes, with the image encoder that reads them)."""
    if method == "simcse":  # text only: no image is read or decoded
        table = table.drop_columns([c for c in ("image", "image_uri") if c in table.column_names])
    ordered = canonical_order(table)
    records = ProductRecords.from_arrow(ordered, policy)
    rows = np.arange(len(records))
    image_encoder = ImageEncoder(cfg.model.image).to(device) if method == "convirt" else None
    prep = image_encoder.preprocessing if image_encoder is not None else ImagePreprocessing(size=1)
    if image_encoder is not None:  # and is not a placeholder: the same bytes on many products
        usable, digests = usable_images(ordered, policy)
        shared = shared_images(records.product_id, digests, cfg.validation.max_products_per_image)
        rows = rows[usable & np.array([d not in shared for d in digests], bool)]
        say(f"convirt: {rows.size:,} of {len(records):,} products have a usable image{_placeholders(shared)}")
    seed = cfg.training.seed

    def loader(collator: Collator, batch_size: int) -> DataLoader:
        return DataLoader(
            ProductDataset(records, rows, preprocessing=prep),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,  # a contrastive batch needs negatives; a 1-row tail has none
            collate_fn=collator,
            generator=torch.Generator().manual_seed(seed),
        )

    texts = (f"{records.title[i]} {records.description[i] or ''}" for i in rows)
    return _Input(int(rows.size), texts, image_encoder, loader)


def _streamed(
    source: Source, cfg: AppConfig, method: Method, policy: ImagePolicy, device: torch.device, say: Say
) -> _Input:
    """The products of a table read in record batches (``training.streaming``): one pass counts the
    usable ones (and keeps a trained tokenizer's texts); each epoch reads the table again through the
    seeded shuffle buffer. SimCSE reads no image column; ConVIRT skips products without an image."""
    image_encoder = ImageEncoder(cfg.model.image).to(device) if method == "convirt" else None
    prep = image_encoder.preprocessing if image_encoder is not None else ImagePreprocessing(size=1)
    view = _pretraining_view(source, image_encoder is not None)
    usable, texts = 0, []
    prefixes = [np.zeros(0, np.uint64)]  # the usable images' digest prefixes, 8 bytes a product
    for batch in view.batches():
        if image_encoder is not None:
            keep, digests = usable_images(batch, policy)
            batch = batch.filter(pa.array(keep))
            prefixes.append(
                np.array([digest_prefix(d) for d, k in zip(digests, keep, strict=True) if k], np.uint64)
            )
        usable += batch.num_rows
        if not cfg.model.text.pretrained_path:  # the tokenizer is trained on these texts
            titles, descriptions = batch.column("title").to_pylist(), batch.column("description").to_pylist()
            texts += [f"{t or ''} {d or ''}" for t, d in zip(titles, descriptions, strict=True)]
    # placeholders (the same bytes on many products) left out, as streamed training leaves them out
    every = np.concatenate(prefixes)
    shared = placeholder_prefixes(every, cfg.validation.max_products_per_image)
    usable -= int(np.isin(every, np.fromiter(shared, np.uint64, len(shared))).sum())
    if image_encoder is not None:
        say(f"convirt: {usable:,} of {source.rows:,} products have a usable image{_placeholders(shared)}")
    streaming = cfg.training.streaming

    def loader(collator: Collator, batch_size: int) -> DataLoader:
        rows = unlabelled_rows(
            view, policy, prep, seed=cfg.training.seed, take=usable // batch_size * batch_size,
            shuffle_rows=streaming.shuffle_rows, shared=shared,
        )  # fmt: skip
        return DataLoader(rows, batch_size=batch_size, drop_last=True, collate_fn=collator)

    return _Input(usable, texts, image_encoder, loader)


def _placeholders(shared: Collection[object]) -> str:
    return f" (placeholder images left out: {len(shared):,})" if shared else ""


def _pretraining_view(source: Source, images: bool) -> Source:
    """``source`` as pre-training reads it: without the image columns (SimCSE), or only the products
    with an image (ConVIRT)."""
    if not images:
        names = tuple(n for n in source.names if n not in ("image", "image_uri"))

        def texts() -> Iterator[pa.RecordBatch]:
            return (b.select(list(names)) for b in source.batches())

        return Source(texts, source.rows, names, source.folder)
    missing = [c for c in ("image", "image_uri") if c not in source.names]
    if missing:
        raise CatalogEnrichError(
            f"pretrain-text --method convirt: the products table has no {missing[0]} column"
        )

    def with_image(batch: pa.RecordBatch) -> pa.RecordBatch:
        image, uri = batch.column("image"), batch.column("image_uri")
        return batch.filter(pc.or_(pc.is_valid(image), pc.is_valid(uri)))

    return Source(lambda: (with_image(b) for b in source.batches()), source.rows, source.names, source.folder)


def _train(
    modules: nn.Module,
    loader: DataLoader,
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    optimisation: Optimisation,
    *,
    epochs: int,
    device: torch.device,
    tag: str,
    say: Say,
) -> list[float]:
    """``epochs`` of ``loader`` under ``optimisation``; the mean loss per epoch."""
    losses: list[float] = []
    with deterministic_algorithms(True):
        for epoch in range(1, epochs + 1):
            modules.train()
            epoch_losses = []
            for batch in progress(loader, desc=f"{tag} epoch {epoch}/{epochs}", unit="step", say=say):
                loss = loss_of({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
                optimisation.step(loss)
                epoch_losses.append(float(loss.detach()))
            losses.append(float(np.mean(epoch_losses)))
            say(f"{tag} epoch {epoch}/{epochs}  contrastive loss {losses[-1]:.4f}")
    return losses


@dataclass(frozen=True)
class _Contrastive:
    """The loss of a batch: SimCSE - two dropout masks, two views of the same text; ConVIRT - the
    text and its image, both directions weighted by ``alpha``."""

    text_encoder: TextEncoder
    heads: nn.ModuleDict
    image_encoder: ImageEncoder | None
    tau: float
    alpha: float

    def text_view(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        return self.heads["text"](self.text_encoder(ids, mask, types, pooling="mean").pooled)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.image_encoder is None:
            return contrastive_loss(self.text_view(batch), self.text_view(batch), self.tau)
        t = self.text_view(batch)
        v = self.heads["image"](self.image_encoder(batch["pixel_values"], batch["image_present"]).pooled)
        a, tau = self.alpha, self.tau
        return a * contrastive_loss(t, v, tau) + (1 - a) * contrastive_loss(v, t, tau)


def _encoder_and_heads(
    text_cfg: TextEncoderConfig, tokenizer: Any, image_encoder: ImageEncoder | None, device: torch.device
) -> tuple[TextEncoder, nn.ModuleDict]:
    """The text encoder to adapt and the projection heads of its views (text; ConVIRT: image)."""
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    text_encoder = TextEncoder(text_cfg, vocab_size=vocab, pad_token_id=pad).to(device)
    width = text_encoder.hidden_size
    heads = nn.ModuleDict({"text": _projection(width)})
    if image_encoder is not None:
        heads["image"] = nn.Sequential(
            nn.Linear(image_encoder.num_features, width), nn.ReLU(), nn.Linear(width, width)
        )
    return text_encoder, heads.to(device)


def _save(
    folder: Path, encoder: TextEncoder, tokenizer: Any, result: PretrainResult, base: dict[str, Any]
) -> None:
    """The adapted encoder and its tokenizer as a transformers folder, with the run's record."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder.backbone.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / RECORD).write_text(json.dumps({**asdict(result), "base": base}, indent=2))


def pretrain_text(
    data: pa.Table | Source,
    cfg: AppConfig,
    options: PretrainOptions,
    *,
    out: str | Path,
    image_roots: Sequence[str | Path] = (),
    device: torch.device | str = "cpu",
    progress: Say | None = None,
) -> PretrainResult:
    """Adapt ``model.text``'s encoder on the products of ``data`` (a table in memory, or a
    :class:`~.stream.Source` read in record batches) as ``options`` say (see the module docstring)
    and save it to ``out``. Labels, if the table has them, are not read.

    Raises:
        CatalogEnrichError: too few products (ConVIRT: with a usable image) for one batch.
    """
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    device = torch.device(device)
    method, epochs, batch_size, alpha = options.method, options.epochs, options.batch_size, options.alpha
    tau = options.temperature if options.temperature is not None else DEFAULT_TEMPERATURE[method]
    tcfg, text_cfg = cfg.training, cfg.model.text
    lr = options.learning_rate or (PRETRAINED_LR if text_cfg.pretrained_path else tcfg.learning_rate)
    set_seed(tcfg.seed)
    roots = [*image_roots, *([data.folder] if isinstance(data, Source) and data.folder else [])]
    policy = ImagePolicy.from_config(cfg.images, roots)  # the catalog's policy, as serving's
    found = (
        _streamed(data, cfg, method, policy, device, say)
        if isinstance(data, Source)
        else _in_memory(data, cfg, method, policy, device, say)
    )
    if found.products < 2 * batch_size:
        raise CatalogEnrichError(
            f"pretrain-text --method {method}: {found.products} usable products, too few for two batches "
            f"of {batch_size}"
        )
    tokenizer = build_tokenizer(text_cfg, found.texts)
    image_encoder = found.image_encoder
    text_encoder, heads = _encoder_and_heads(text_cfg, tokenizer, image_encoder, device)
    loader = found.loader(Collator(tokenizer, text_cfg.max_length), batch_size)
    loss_of = _Contrastive(text_encoder, heads, image_encoder, tau, alpha)
    modules = nn.ModuleList([text_encoder, heads, *([image_encoder] if image_encoder is not None else [])])
    optimisation = Optimisation.adamw(  # 003 §4.1: AdamW, warm-up + cosine, no weight decay to speak of
        modules.parameters(),
        lr=lr,
        weight_decay=1e-8,
        steps=epochs * len(loader),
        warmup_ratio=tcfg.warmup_ratio,
        clip_norm=tcfg.grad_clip_norm,
    )
    losses = _train(modules, loader, loss_of, optimisation, epochs=epochs, device=device, tag=method, say=say)
    folder = Path(out)
    result = PretrainResult(
        str(folder), method, found.products, epochs, batch_size, lr, tau,
        alpha if method == "convirt" else None, losses, round(time.perf_counter() - started, 1),
    )  # fmt: skip
    _save(folder, text_encoder, tokenizer, result, text_cfg.model_dump(mode="json"))
    say(f"{method}: text encoder saved to {folder} (use it with model.text.pretrained_path={folder})")
    return result
