"""Frozen encoders: every product embedded once, and batches of the stored encoder outputs.

With ``training.encoders: frozen`` only the fusion and heads train (paper 002's two-stage set-up), so
the encoders' outputs for a product never change during training: they are computed once for the
whole labelled table and every epoch, fold model and evaluation reads them from memory.

Where they are kept between trainings: for a model whose fusion reads pooled vectors
(:func:`catalog_enrichment.embeddings.vectors.storable`) and a catalog given, the catalog's embedding
store - the vectors the enrichment job reads and fills, per product and encoder fingerprint, so
training and serving encode a product once between them (:func:`embed_products`' ``store``).
Otherwise a private cache file keyed on the data (each product's text and image - its inline bytes,
or the digest of the bytes a check read behind its ``image_uri`` - in canonical order) and on the
encoders (their weights, the tokenizer, the image preprocessing and what the fusion reads), so a
changed snapshot, photo or model is embedded afresh and an unchanged one is read back in seconds. A
cache file no training read or wrote for :data:`CACHE_KEEP_DAYS` days is deleted.

A vector is kept (cache or store) only where the bytes its encode read are those the check read
(``ProductRecords.image_digest``): a photo replaced, or an outage tile served, between the two is
encoded again next time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from catalog_enrichment.catalog.embeddings import split_content, stored_content
from catalog_enrichment.data.dataset import Collator, EncodedLabels, ProductDataset, ProductRecords
from catalog_enrichment.data.images import read_pixels
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.embeddings import vectors as embedding
from catalog_enrichment.embeddings.vectors import encoder_fingerprint
from catalog_enrichment.models.fusion import FusionInputs
from catalog_enrichment.models.lexical import as_bags
from catalog_enrichment.models.model import MultimodalModel, deterministic_algorithms, full_float32
from catalog_enrichment.progress import progress
from catalog_enrichment.types import Say

if TYPE_CHECKING:
    from catalog_enrichment.catalog.base import Catalog

__all__ = [
    "CACHE_KEEP_DAYS",
    "EmbeddedDataset",
    "Embeddings",
    "default_cache_dir",
    "embed_products",
    "inputs_to",
    "save_atomically",
]

# token-level outputs are large (L or N vectors per product); they are cached in half precision
_HALF = ("text_tokens", "image_tokens")

# a private cache file no training read or wrote for this many days is deleted (each training whose
# data changed writes a new one)
CACHE_KEEP_DAYS = 14
# the names of its files (an entry, or save_atomically's temporary file of one): nothing else in
# the folder is touched (a user may point training.embedding_cache at a folder that holds more)
_CACHE_FILE = re.compile(r"\.?[0-9a-f]{32}\.pt(\.[^/]*\.partial)?")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "catalog-enrichment" / "embeddings"


def _flatten(inputs: FusionInputs) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for f in fields(FusionInputs):
        value = getattr(inputs, f.name)
        if isinstance(value, torch.Tensor):
            flat[f.name] = value
        elif f.name == "field_pooled" and value is not None:
            flat.update(
                {f"field_pooled.{e}.{k}": t for e, per in enumerate(value) for k, t in enumerate(per)}
            )
        elif f.name == "field_present" and value is not None:
            flat.update({f"field_present.{k}": t for k, t in enumerate(value)})
    return flat


def _unflatten(flat: dict[str, torch.Tensor]) -> FusionInputs:
    plain: dict[str, Any] = {k: v.float() if k in _HALF else v for k, v in flat.items() if "." not in k}
    inputs = FusionInputs(**plain)
    pooled = sorted(k for k in flat if k.startswith("field_pooled."))
    if pooled:
        n_enc = 1 + max(int(k.split(".")[1]) for k in pooled)
        n_fields = 1 + max(int(k.split(".")[2]) for k in pooled)
        inputs.field_pooled = [[flat[f"field_pooled.{e}.{k}"] for k in range(n_fields)] for e in range(n_enc)]
        inputs.field_present = [flat[f"field_present.{k}"] for k in range(n_fields)]
    return inputs


@dataclass(frozen=True)
class Embeddings:
    """The encoder outputs of N products, as flat ``(N, ...)`` tensors named after FusionInputs, and
    for a lexical fusion their texts' hashed n-gram counts (``lexical``, a SciPy CSR matrix; counted
    on NFKC-normalised texts where ``lexical_nfkc``, which the stack fitted on them records)."""

    tensors: dict[str, torch.Tensor]
    lexical: Any = None
    lexical_nfkc: bool = False

    def __len__(self) -> int:
        return int(self.tensors["image_present"].shape[0])

    def inputs(self, idx: torch.Tensor) -> FusionInputs:
        inputs = _unflatten({k: v[idx] for k, v in self.tensors.items()})
        if self.lexical is not None:
            inputs.lexical = as_bags(self.lexical[idx.numpy()])
        return inputs


def _pad_tokens(flat: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Token outputs padded to ``length`` positions (the collator pads each batch to its longest)."""
    if "text_tokens" not in flat:
        return flat
    missing = length - flat["text_tokens"].shape[1]
    if missing > 0:
        flat["text_tokens"] = torch.nn.functional.pad(flat["text_tokens"], (0, 0, 0, missing))
        flat["text_mask"] = torch.nn.functional.pad(flat["text_mask"], (0, missing))
    return flat


def _fingerprint(
    model: MultimodalModel, tokenizer: Any, records: ProductRecords, max_length: int
) -> str | None:
    """Hash of the data (each product's texts and image: inline bytes, or the digest of the bytes
    the check read behind ``image_uri``) and of everything that shapes the encoders' outputs; None
    where a product's image is read from its URI unchecked (``records.image_digest`` empty): the
    photo behind a URI is not known before it is read, so no key names it."""
    h = hashlib.sha256(encoder_fingerprint(model, tokenizer, max_length).encode())
    for i in range(len(records)):
        image, uri = records.image[i], records.image_uri[i]
        if image is None and uri and not records.image_digest:
            return None
        digest = _image_digest(records, i)
        h.update(repr((records.title[i], records.description[i], uri, len(image or b""), digest)).encode())
        if image:
            h.update(image)
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class _Reading(ProductRecords):
    """``ProductRecords`` whose image reads note the digest of the bytes each read (``read``, by row;
    :func:`~catalog_enrichment.data.images.read_pixels`): what a vector was encoded from."""

    read: dict[int, str | None] = field(default_factory=dict)

    @classmethod
    def of(cls, records: ProductRecords) -> _Reading:
        return cls(**{f.name: getattr(records, f.name) for f in fields(ProductRecords)})

    def pixels(self, i: int, prep: ImagePreprocessing) -> tuple[np.ndarray | None, str | None]:
        size, policy = prep.decode_size, self.image_policy
        pixels, reason, self.read[i] = read_pixels(
            self.image[i], self.image_uri[i], size, prep.interpolation, policy, prep.decode
        )
        return pixels, reason


@torch.inference_mode()
def embed_products(
    model: MultimodalModel,
    records: ProductRecords,
    collator: Collator,
    *,
    batch_size: int,
    device: torch.device,
    cache_dir: Path | None,
    say: Say,
    store: Catalog | None = None,
) -> Embeddings:
    """Every product's encoder outputs: with a catalog ``store`` and a storable model, the stored
    vectors of products whose content is unchanged and the others encoded and stored; else read from
    ``cache_dir`` when this data and model were embedded before, or computed (with a progress bar)
    and written there (not where a product's image comes from its URI unchecked: see
    :func:`_fingerprint`). ``collator`` tokenizes the texts (its tokenizer and length are part of
    the vectors' key)."""
    if store is not None and embedding.storable(model) and device.type == "cpu":  # as the job's
        return _embed_through_store(model, records, collator, batch_size, device, store, say)
    tokenizer, max_length = collator.tokenizer, collator.max_length
    key = _fingerprint(model, tokenizer, records, max_length)
    path = cache_dir / f"{key}.pt" if cache_dir is not None and key is not None else None
    cached = _read_cached(path) if path is not None else None
    if cached is not None:
        say(f"frozen encoders: embeddings of {len(records):,} products read from {path}")
        return Embeddings(cached)
    parts: dict[str, list[torch.Tensor]] = {}
    every, reading = np.arange(len(records)), _Reading.of(records)
    for flat in _encoded(model, reading, every, collator, batch_size, device, say):
        for name, tensor in _pad_tokens(flat, max_length).items():  # token outputs kept in half
            parts.setdefault(name, []).append(tensor.half() if name in _HALF else tensor)
    tensors = {name: torch.cat(chunks) for name, chunks in parts.items()}
    unfit = _not_to_keep(model, reading, tensors)
    if path is not None and unfit:
        say(
            f"frozen encoders: {len(records):,} products embedded, not cached: {unfit:,} of them had an "
            "image that did not load this time or changed since it was checked, or a vector that is "
            "not finite (encoded again next time)"
        )
    elif path is not None:
        save_atomically(tensors, path)
        _evict(path.parent)
        say(f"frozen encoders: {len(records):,} products embedded, cached in {path}")
    return Embeddings(tensors)


def _read_cached(path: Path) -> dict[str, torch.Tensor] | None:
    """The cache file at ``path``, marked used now (kept another :data:`CACHE_KEEP_DAYS` days); None
    when there is none (or another training's :func:`_evict` just deleted it)."""
    try:
        tensors: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    with contextlib.suppress(OSError):  # a read-only cache is read all the same
        os.utime(path)
    return tensors


def _evict(cache_dir: Path) -> None:
    """Delete the cache files (and temporary files a killed write left) of ``cache_dir`` that no
    training read or wrote for :data:`CACHE_KEEP_DAYS` days (one another training deletes or
    replaces meanwhile is left to it)."""
    oldest = time.time() - CACHE_KEEP_DAYS * 86_400
    for entry in cache_dir.iterdir():
        if _CACHE_FILE.fullmatch(entry.name):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < oldest:
                    entry.unlink()


def _not_to_keep(model: MultimodalModel, records: _Reading, tensors: dict[str, torch.Tensor]) -> int:
    """How many products' outputs no later training may reuse (:func:`_reusable`)."""
    n = len(records)
    finite = np.ones(n, bool)
    for t in tensors.values():
        finite &= torch.isfinite(t.float().reshape(n, -1)).all(dim=1).numpy()
    present = tensors["image_present"].numpy() > 0
    return int((~_reusable(records, np.arange(n), present, finite, model.image_encoder is not None)).sum())


def _reusable(
    records: _Reading, rows: np.ndarray, present: np.ndarray, finite: np.ndarray, images: bool
) -> np.ndarray:
    """Which of ``records[rows]``' encoder outputs a later run may reuse (cache or store): finite, not
    imageless where the product has an image (its read failed this time: a later run tries again),
    and encoded from the bytes the check read (``records.image_digest``, where known; another
    read's bytes - a photo replaced since, an outage tile - are encoded again by a later run).
    ``present``/``finite``: per row, whether the outputs hold the image and are finite."""
    has = np.array([records.image[i] is not None or records.image_uri[i] is not None for i in rows], bool)
    checked = np.array([records.read.get(int(i)) == _image_digest(records, int(i)) for i in rows], bool)
    return finite & (present | ~has | (not images)) & (checked | (not records.image_digest))


def _encoded(
    model: MultimodalModel,
    records: ProductRecords,
    rows: np.ndarray,
    collator: Collator,
    batch_size: int,
    device: torch.device,
    say: Say,
) -> Iterator[dict[str, torch.Tensor]]:
    """The encoder outputs of ``records[rows]``, batch by batch (flat tensors, on the CPU)."""
    dataset = ProductDataset(records, rows, preprocessing=model.preprocessing)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    model.eval()
    if model.image_encoder is not None:  # convolutions run faster channels-last (oneDNN)
        model.image_encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # a forward pass alone on the CPU gives the same numbers without the deterministic kernels; on
    # a GPU in full float32, as the predictor encodes
    with deterministic_algorithms(device.type == "cuda"), full_float32():
        batches = progress(
            loader, desc="embedding products", unit="product", total=len(rows),
            size=lambda batch: len(batch["image_present"]), say=say,
        )  # fmt: skip
        for batch in batches:
            batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            yield {k: v.cpu() for k, v in _flatten(model.encode(batch)).items()}


def _embed_through_store(
    model: MultimodalModel,
    records: ProductRecords,
    collator: Collator,
    batch_size: int,
    device: torch.device,
    store: Catalog,
    say: Say,
) -> Embeddings:
    """:func:`embed_products` over the catalog's embedding store (pooled vectors, float32)."""
    encoder = embedding.encoder_fingerprint(model, collator.tokenizer, collator.max_length)
    text, images = model.fusion.needs_text, model.image_encoder is not None
    content = [
        embedding.content_digest(*row, text=text, images=images)
        for row in zip(records.title, records.description, records.image, records.image_uri, strict=True)
    ]
    ids = [p for p in records.product_id if p is not None]
    try:
        found = store.embeddings_of(encoder, ids)
    except Exception as exc:  # a cache: without it every product is encoded
        logging.getLogger(__name__).warning("could not read the embedding store: %s", exc)
        found = pa.table({"product_id": [], "content": [], "embedding": []})
    stored = dict(
        zip(
            found["product_id"].to_pylist(),
            zip(found["content"].to_pylist(), found["embedding"].to_pylist(), strict=True),
            strict=True,
        )
    )
    width = embedding.width(model)
    matrix = np.zeros((len(records), width), np.float32)
    missing = []
    for i, (pid, digest) in enumerate(zip(records.product_id, content, strict=True)):
        have = stored.get(pid) if pid is not None else None
        if have is not None and _fits(have, digest, _image_digest(records, i), width):
            matrix[i] = np.frombuffer(have[1], np.float32)
        else:
            missing.append(i)
    storable = missing
    if missing:
        reading = _Reading.of(records)
        batches = _encoded(model, reading, np.array(missing), collator, batch_size, device, say)
        matrix[missing] = np.concatenate([embedding.pack(model, _unflatten(flat)) for flat in batches])
        present = embedding.unpack(model, matrix[missing]).image_present.numpy() > 0
        finite = np.asarray(np.isfinite(matrix[missing]).all(axis=1), bool)
        reusable = _reusable(reading, np.array(missing), present, finite, images)
        storable = [i for i, keep in zip(missing, reusable, strict=True) if keep]
        _store(store, encoder, reading, content, matrix, storable)
    say(
        f"frozen encoders: {len(records) - len(missing):,} of {len(records):,} products read from the "
        f"embedding store, {len(missing):,} encoded, {len(storable):,} stored"
        + (
            f" ({len(missing) - len(storable):,} not: an image that did not load or changed since it "
            "was checked, or a non-finite vector)"
            if len(storable) < len(missing)
            else ""
        )
    )
    return Embeddings(_flatten(embedding.unpack(model, matrix)))


def _image_digest(records: ProductRecords, i: int) -> str | None:
    return records.image_digest[i] if records.image_digest else None


def _fits(stored: tuple[str, bytes], content: str, image: str | None, width: int) -> bool:
    """Whether a stored (content, vector) is this product's: the same content digest and width, and
    read from the image bytes the check read now (``image``), where both sides know them: a vector
    of bytes an image host served before (a placeholder, or a photo since replaced behind the same
    URI) is encoded again."""
    had, had_image = split_content(stored[0])
    same_image = had_image is None or image is None or had_image == image
    return had == content and len(stored[1]) == 4 * width and same_image


def _store(
    store: Catalog,
    encoder: str,
    records: _Reading,
    content: list[str],
    matrix: np.ndarray,
    rows: list[int],
) -> None:
    """The newly encoded vectors into the catalog's store (one per product id, beside the digest of
    the image bytes it was encoded from; a failure is a warning: the store is a cache)."""
    import pyarrow.parquet as pq

    from catalog_enrichment.catalog.embeddings import embeddings_schema

    first: dict[str, int] = {}
    for i in rows:
        pid = records.product_id[i]
        if pid is not None:
            first.setdefault(pid, i)
    keep = list(first.values())
    now = dt.datetime.now(dt.UTC)
    table = pa.table(
        {
            "encoder": [encoder] * len(keep),
            "product_id": [records.product_id[i] for i in keep],
            "content": [stored_content(content[i], records.read.get(i)) for i in keep],
            "embedding": [matrix[i].tobytes() for i in keep],
            "run_id": ["training"] * len(keep),
            "written_at": [now] * len(keep),
        }
    ).cast(embeddings_schema())
    with tempfile.TemporaryDirectory(prefix="embeddings-") as tmp:
        pq.write_table(table, Path(tmp) / "part-0.parquet")
        try:
            store.write_embeddings(tmp)
        except Exception as exc:  # the vectors are in memory; the next training encodes them again
            logging.getLogger(__name__).warning("could not store the training's embeddings: %s", exc)


def save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` to a temporary file of its own beside ``path``, then an atomic rename: a crash
    mid-write never leaves a truncated entry, and two trainings writing the same entry at once each
    rename a whole file (the last one wins; both hold the same embeddings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        torch.save(tensors, name)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


class EmbeddedDataset(Dataset[int]):
    """Positions into :class:`Embeddings`; :meth:`collate` builds a batch of cached encoder outputs."""

    def __init__(self, embeddings: Embeddings, indices: np.ndarray, labels: EncodedLabels) -> None:
        self.embeddings = embeddings
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = labels

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, k: int) -> int:
        return int(self.indices[k])

    def collate(self, rows: list[int]) -> dict[str, Any]:
        idx = torch.tensor(rows, dtype=torch.long)
        np_idx = idx.numpy()
        return {
            "inputs": self.embeddings.inputs(idx),
            "targets": {a: torch.from_numpy(t[np_idx]) for a, t in self.labels.targets.items()},
            "known": {a: torch.from_numpy(k[np_idx]) for a, k in self.labels.known.items()},
            "partial": {a: torch.from_numpy(p[np_idx]) for a, p in self.labels.partial.items()},
        }


def inputs_to(inputs: FusionInputs, device: torch.device) -> FusionInputs:
    """A copy of encoder outputs on ``device``."""
    moved = _unflatten({k: v.to(device, non_blocking=True) for k, v in _flatten(inputs).items()})
    if inputs.lexical is not None:
        ids, counts, offsets = (t.to(device) for t in inputs.lexical)
        moved.lexical = (ids, counts, offsets)
    return moved
