"""Training input that streams (``training.streaming``): a labelled Delta or Parquet table read in
Arrow record batches, so a table larger than memory trains, in one process or as one rank of a
distributed run (:mod:`.distributed`).

* **Splits by hash**: a product's split is a hash of its group key and the seed - the title and
  description together, case and whitespace folded, so variants with the same text never straddle
  two splits. That is narrower than :func:`.splits.group_ids` in memory, which joins products that
  share either text (a per-row hash cannot follow such chains): variants whose descriptions differ
  (one naming its colour) can land in two splits. A rank's share of the training split is a hash
  of the product id. Neither depends on the order of the files or on the number of workers. (The
  in-memory path stratifies instead; over the hundreds of thousands of products streaming is for,
  a hash split holds every value at its rate within a fraction of a percent.)
* **One survey pass** reads every row once, images included: the labels (small arrays, kept),
  which images cannot be used (those products are left out, as in memory, and so are the products
  whose image bytes are on more than ``validation.max_products_per_image`` products of the table:
  a placeholder, counted by an 8-byte prefix of each image's digest), the run health input
  baseline (counted per batch: lengths, scripts, categories, never the texts), the training texts
  a trained tokenizer learns from (none for a pretrained one), and the usable rows per split and
  rank.
* **Epochs** read the table again: a rank's training rows pass through a shuffle buffer of
  ``shuffle_rows`` rows (seeded by the seed, the epoch and the rank) into mini-batches, and every
  rank takes the same number of steps: the smallest shard's full batches, so an epoch leaves out
  the rows of a larger shard past them (drawn from the last fills of the shuffle buffer: rows near
  the end of the table order, other ones each epoch). Scoring a held-out split reads its rows in
  table order, the order the survey kept their labels in. Table order is the files sorted by the
  products they hold (:func:`~catalog_enrichment.catalog.lakehouse.scan`), so a rewrite of the same
  rows trains the same model.

Memory holds a few record batches, the shuffle buffer (text and image bytes, not pixels), the
product ids, labels, image digest prefixes and held-out scores, a trained tokenizer's texts, and
for the stack a digest of each product's title and description (its cross-fit folds' groups);
never the table or its decoded images.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset

from catalog_enrichment.catalog import lakehouse
from catalog_enrichment.catalog.groups import folded, group_ids
from catalog_enrichment.config import ValidationConfig
from catalog_enrichment.contracts import IMAGE_KEY, IMAGE_SHARED, Taxonomy
from catalog_enrichment.data.dataset import (
    Collator,
    EncodedLabels,
    ProductRecords,
    check_unique_ids,
    encode_labels,
)
from catalog_enrichment.data.images import ImagePolicy, check_images, read_pixels
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.faults import kill_this_process
from catalog_enrichment.health import InputBaseline, InputBaselineCounts
from catalog_enrichment.training.splits import Splits
from catalog_enrichment.validation.rules import text_failures

__all__ = [
    "CALIBRATION",
    "TEST",
    "TRAIN",
    "VALIDATION",
    "Source",
    "SplitBatches",
    "Survey",
    "TrainingRows",
    "arrow_source",
    "digest_prefix",
    "group_of",
    "placeholder_prefixes",
    "rank_of",
    "split_of",
    "survey",
    "table_source",
    "unlabelled_rows",
]

TRAIN, VALIDATION, CALIBRATION, TEST = 0, 1, 2, 3
_NOTHING = "no labelled product has a usable image or none: nothing to train on"


@dataclass(frozen=True)
class Source:
    """A labelled table that can be read again, batch by batch, in the same order each time."""

    batches: Callable[[], Iterator[pa.RecordBatch]]
    rows: int
    names: tuple[str, ...]
    folder: str | None = None  # where its image_uri paths may point (the table's folder)
    table: pa.Table | None = None  # the table itself, when it is in memory already

    def read(self) -> pa.Table:
        """The whole table in memory (training in memory reads it once); a table of one row or more."""
        if self.table is not None:
            return self.table
        return pa.Table.from_batches(list(self.batches()))


def table_source(path: str | Path, *, version: int | None = None, batch_rows: int = 4096) -> Source:
    """A Delta (at ``version``: pin it, so every pass reads the same rows) or Parquet table."""
    return Source(
        lambda: lakehouse.scan(path, version=version, batch_rows=batch_rows),
        lakehouse.count_rows(path, version=version),
        tuple(lakehouse.schema_of(path, version=version).names),
        str(Path(path).resolve()),
    )


def arrow_source(table: pa.Table, *, batch_rows: int = 4096) -> Source:
    """A table already in memory, read as a stream (tests and small data)."""
    return Source(
        lambda: iter(table.to_batches(max_chunksize=batch_rows)),
        table.num_rows,
        tuple(table.column_names),
        table=table,
    )


def _unit(keys: Iterable[str], salt: str) -> np.ndarray:
    """Each key's uniform draw in [0, 1): the first 8 bytes of its BLAKE2b digest under ``salt``."""
    prefix = salt.encode() + b"\x1f"
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "little") / 2.0**64
            for k in keys
        ],
        np.float64,
    )


def split_of(
    titles: Sequence[str | None],
    descriptions: Sequence[str | None],
    *,
    seed: int,
    validation: float,
    calibration: float,
    test: float,
) -> np.ndarray:
    """Each product's split (:data:`TRAIN`, :data:`VALIDATION`, :data:`CALIBRATION`, :data:`TEST`)
    from its group key: products with the same text (variants) always share one."""
    u = _unit(_group_keys(titles, descriptions), f"split:{seed}")
    edges = np.cumsum([validation, calibration, test])
    codes = np.searchsorted(edges, u, side="right") + 1  # 1, 2, 3 below the edges, 4 above
    return np.where(codes == 4, TRAIN, codes).astype(np.int8)


def _group_keys(titles: Sequence[str | None], descriptions: Sequence[str | None]) -> Iterator[str]:
    """Each product's group key: its title and description, case and whitespace folded."""
    return (folded(t) + "\x1e" + folded(d) for t, d in zip(titles, descriptions, strict=True))


def _text_digests(
    titles: Sequence[str | None], descriptions: Sequence[str | None]
) -> tuple[list[str], list[str | None]]:
    """A short digest of each product's title and description (case and whitespace folded; an
    empty description stays None, which links nothing): what :func:`group_ids` needs of the texts,
    kept on the driver for every product instead of the texts themselves."""

    def digest(text: str | None) -> str | None:
        text = folded(text)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest() if text else None

    return [digest(t) or "" for t in titles], [digest(d) for d in descriptions]


def group_of(titles: Sequence[str | None], descriptions: Sequence[str | None]) -> np.ndarray:
    """Each product's group (variants share one): a digest of its group key, in [0, 1)."""
    return _unit(_group_keys(titles, descriptions), "group")


def rank_of(product_ids: Sequence[str | None], *, seed: int, world: int) -> np.ndarray:
    """The rank (of ``world``) whose shard each product's training row is in."""
    u = _unit((p or "" for p in product_ids), f"rank:{seed}")
    return np.minimum((u * world).astype(np.int64), world - 1)


def _column(batch: pa.RecordBatch, name: str) -> list[Any]:
    return batch.column(name).to_pylist() if name in batch.schema.names else [None] * batch.num_rows


@dataclass
class _Rows:
    """One record batch's rows that belong to a split (and rank), with their labels."""

    product_id: list[Any]
    title: list[str]
    description: list[str | None]
    image: list[bytes | None]
    image_uri: list[str | None]
    labels: EncodedLabels


@dataclass(frozen=True)
class _Selection:
    """Which rows of a batch a pass reads: one split, and for training one rank's shard."""

    seed: int
    fractions: tuple[float, float, float]  # validation, calibration, test
    split: int
    rank: int = 0
    world: int = 1

    def codes(self, batch: pa.RecordBatch) -> np.ndarray:
        validation, calibration, test = self.fractions
        return split_of(
            _column(batch, "title"),
            _column(batch, "description"),
            seed=self.seed,
            validation=validation,
            calibration=calibration,
            test=test,
        )

    def rows(self, batch: pa.RecordBatch, taxonomy: Taxonomy) -> _Rows | None:
        keep = self.codes(batch) == self.split
        if self.world > 1:
            keep &= rank_of(_column(batch, "product_id"), seed=self.seed, world=self.world) == self.rank
        if not keep.any():
            return None
        picked = batch.filter(pa.array(keep))
        return _Rows(
            _column(picked, "product_id"),
            [t or "" for t in _column(picked, "title")],
            _column(picked, "description"),
            _column(picked, "image"),
            _column(picked, "image_uri"),
            encode_labels(pa.Table.from_batches([picked]), taxonomy),
        )


def _item(rows: _Rows, i: int, pixels: np.ndarray | None, size: int) -> dict[str, Any]:
    """Product ``i`` as the model's collator takes it (see ``data.dataset.ProductDataset``)."""
    labels = rows.labels
    return {
        "title": rows.title[i],
        "description": rows.description[i] or "",
        "pixel_values": torch.zeros(3, size, size, dtype=torch.uint8)
        if pixels is None
        else torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
        "image_present": pixels is not None,
        "targets": {a: t[i] for a, t in labels.targets.items()},
        "known": {a: bool(k[i]) for a, k in labels.known.items()},
        "partial": {a: p[i] for a, p in labels.partial.items()},
    }


@dataclass(frozen=True)
class _Reader:
    """What every pass needs to turn a split's rows into the model's items."""

    source: Source
    taxonomy: Taxonomy
    policy: ImagePolicy
    preprocessing: ImagePreprocessing
    shared: frozenset[int] = frozenset()  # the survey's placeholders (:func:`digest_prefix`): left out
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # the job's row rules

    def pixels(
        self, image: bytes | None, uri: str | None, prep: ImagePreprocessing
    ) -> tuple[np.ndarray | None, str | None]:
        pixels, error, digest = read_pixels(
            image, uri, prep.size, prep.interpolation, self.policy, prep.decode
        )
        if error is None and digest_prefix(digest) in self.shared:
            return None, IMAGE_SHARED
        return pixels, error

    def items(self, rows: _Rows, order: Iterable[int]) -> Iterator[dict[str, Any]]:
        """The usable products among ``rows`` (those whose image decodes or is absent), in ``order``."""
        prep = self.preprocessing
        for i in order:
            pixels, error = self.pixels(rows.image[i], rows.image_uri[i], prep)
            if error is None:
                yield _item(rows, i, pixels, prep.size)

    def records(self) -> Iterator[tuple[ProductRecords, list[Any]]]:
        """Every usable product (in the survey's order), a record batch at a time, with its merchant
        categories (None without a ``category`` column)."""
        for batch in self.source.batches():
            usable, _, _ = self.usable(batch, InputBaselineCounts(), Counter())
            if usable.num_rows:
                table = pa.Table.from_batches([usable])
                yield ProductRecords.from_arrow(table, self.policy), _column(usable, "category")

    def usable(
        self, batch: pa.RecordBatch, inputs: InputBaselineCounts, unusable: Counter[str]
    ) -> tuple[pa.RecordBatch, np.ndarray, np.ndarray]:
        """The batch's products whose image decodes or is absent (and is no placeholder of
        ``shared``), with their images' digest prefixes (0: no image) and which of them the
        enrichment job would score for their title and description (its row rules quarantine the
        others, so no night's health checks count them); the inputs of every product it would score
        (image state and colour balance included) counted in ``inputs``, the others' image reasons
        in ``unusable``."""
        products, errors, digests = check_images(batch, self.policy)
        prefixes = np.array([digest_prefix(d) for d in digests], np.uint64)
        if self.shared:
            errors = [
                IMAGE_SHARED if e is None and int(p) in self.shared else e
                for e, p in zip(errors, prefixes, strict=True)
            ]
            products = replace(products, image_errors=errors)
        texts = text_failures(products.titles, products.descriptions, self.validation)
        scored = np.array([not broken for broken in texts], bool)
        inputs.add(products.subset(scored.tolist()))
        unusable.update(e for e in errors if e is not None)
        keep = np.array([e is None for e in errors], bool)
        return batch.filter(pa.array(keep)), prefixes[keep], scored[keep]


def digest_prefix(digest: str | None) -> int:
    """An image digest's first 8 bytes as an integer (0: no image): what the survey counts products
    per image by, 8 bytes a row however large the table."""
    return 0 if digest is None else int(digest.removeprefix(IMAGE_KEY)[:16], 16)


def placeholder_prefixes(prefixes: np.ndarray, limit: int) -> frozenset[int]:
    """The image digest prefixes (:func:`digest_prefix`; 0, no image, never) on more than ``limit``
    of the products ``prefixes`` holds one each of: placeholders (none when ``limit`` is 0)."""
    if not limit:
        return frozenset()
    images, counts = np.unique(prefixes[prefixes != 0], return_counts=True)
    return frozenset(int(p) for p in images[counts > limit])


class TrainingRows(IterableDataset[dict[str, Any]]):
    """A rank's training rows for one epoch per iteration, through a seeded shuffle buffer: exactly
    ``take`` items (the same count on every rank: steps per epoch times the batch size)."""

    def __init__(
        self,
        reader: _Reader,
        selection: _Selection,
        *,
        take: int,
        shuffle_rows: int,
        kill_at: int | None = None,
    ) -> None:
        self.reader, self.selection, self.take, self.shuffle_rows = reader, selection, take, shuffle_rows
        self.kill_at = kill_at  # fault hook (catalog_enrichment.faults): SIGKILL this process there
        self.epoch = 0

    def __len__(self) -> int:
        return self.take

    def __iter__(self) -> Iterator[dict[str, Any]]:
        sel = self.selection
        rng = np.random.default_rng([sel.seed, self.epoch, sel.rank])
        self.epoch += 1
        for emitted, item in enumerate(self._shuffled(rng)):
            if emitted == self.take:
                return
            if emitted == self.kill_at:
                kill_this_process()
            yield item

    def _shuffled(self, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        """Usable items in buffer order: rows enter a buffer of ``shuffle_rows`` and leave it at
        random; decoding happens on the way out (the buffer holds bytes, not pixels)."""
        buffer: list[tuple[_Rows, int]] = []
        for batch in self.reader.source.batches():
            rows = self.selection.rows(batch, self.reader.taxonomy)
            if rows is None:
                continue
            for i in range(len(rows.title)):
                buffer.append((rows, i))
                if len(buffer) >= self.shuffle_rows:
                    yield from self._pop(buffer, int(rng.integers(len(buffer))))
        for j in rng.permutation(len(buffer)).tolist():
            rows, i = buffer[j]
            yield from self.reader.items(rows, [i])

    def _pop(self, buffer: list[tuple[_Rows, int]], j: int) -> Iterator[dict[str, Any]]:
        rows, i = buffer[j]
        buffer[j] = buffer[-1]
        buffer.pop()
        yield from self.reader.items(rows, [i])


def unlabelled_rows(
    source: Source,
    policy: ImagePolicy,
    preprocessing: ImagePreprocessing,
    *,
    seed: int,
    take: int,
    shuffle_rows: int,
    shared: frozenset[int] = frozenset(),
) -> TrainingRows:
    """Every usable row of an unlabelled table, ``take`` per epoch, through the seeded shuffle buffer
    (pre-training's epochs: no split, no labels read); those whose image is a placeholder of
    ``shared`` (:func:`placeholder_prefixes`) left out."""
    reader = _Reader(source, Taxonomy({}, source="unlabelled"), policy, preprocessing, shared)
    every = _Selection(seed, (0.0, 0.0, 0.0), TRAIN)
    return TrainingRows(reader, every, take=take, shuffle_rows=shuffle_rows)


class SplitBatches:
    """A held-out split's usable products in table order, collated in batches; iterable again and
    again (an epoch's validation scores, the final scores)."""

    def __init__(self, reader: _Reader, selection: _Selection, collator: Collator, batch_size: int) -> None:
        self.reader, self.selection, self.collator, self.batch_size = reader, selection, collator, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for batch in self.reader.source.batches():
            rows = self.selection.rows(batch, self.reader.taxonomy)
            if rows is None:
                continue
            for item in self.reader.items(rows, range(len(rows.title))):
                items.append(item)
                if len(items) == self.batch_size:
                    yield self.collator(items)
                    items = []
        if items:
            yield self.collator(items)


@dataclass
class Survey:
    """What one pass over the whole table learns (see the module docstring), for the usable products
    in table order."""

    product_ids: list[Any]
    codes: np.ndarray  # each product's split
    groups: np.ndarray  # each product's group (:func:`group_of`: one title and description)
    shards: np.ndarray  # each product's rank (of ``world``); its training row is read there
    world: int
    labels: EncodedLabels
    texts: list[str]  # the training split's "title description": what a trained tokenizer learns from
    inputs: InputBaseline
    left_out: dict[str, int] = field(default_factory=dict)  # unusable images, by reason
    shared: frozenset[int] = frozenset()  # placeholders' digest prefixes: every later pass leaves them out
    # each product's title and description digests (:func:`_text_digests`; empty unless asked for)
    text_keys: tuple[list[str], list[str | None]] = field(default_factory=lambda: ([], []))

    def fold_groups(self) -> np.ndarray:
        """Products sharing a title or a description, chains joined by the in-memory rule
        (:func:`~catalog_enrichment.catalog.groups.group_ids`, over the texts' digests, so ties at
        its group cap break on digests): cross-fit folds never cut one."""
        if len(self.text_keys[0]) != len(self.product_ids):
            raise ValueError("the survey kept no text digests (survey(..., fold_groups=True))")
        return group_ids(*self.text_keys)

    @property
    def splits(self) -> Splits:
        return Splits(
            *(np.flatnonzero(self.codes == code) for code in (TRAIN, VALIDATION, CALIBRATION, TEST))
        )

    def steps(self, batch_size: int) -> int:
        """Steps per epoch every rank takes: the smallest shard's full batches."""
        train = self.shards[self.codes == TRAIN]
        return int(np.bincount(train, minlength=self.world).min()) // batch_size


def survey(
    reader: _Reader,
    fractions: tuple[float, float, float],
    *,
    seed: int,
    world: int,
    say: Callable[[str], None],
    texts: bool = True,
    shared_limit: int = 0,
    fold_groups: bool = False,
) -> Survey:
    """The survey pass (see the module docstring); ``texts`` False: the training texts are not kept
    (a pretrained tokenizer learns nothing from them); ``shared_limit``: the products whose image
    bytes are on more than that many products are left out (0: none); ``fold_groups``: each
    product's text digests are kept for :meth:`Survey.fold_groups` (the stack's)."""
    ids: list[Any] = []
    codes, groups, shards, labels, train_texts, prefixes, counted = [], [], [], [], [], [], []
    title_keys: list[str] = []
    description_keys: list[str | None] = []  # for fold_groups
    inputs, unusable = InputBaselineCounts(), Counter[str]()
    everything = _Selection(seed, fractions, split=-1)
    for batch in reader.source.batches():
        usable, read, scored = reader.usable(batch, inputs, unusable)
        prefixes.append(read)
        counted.append(scored)
        code = everything.codes(usable)
        pids = _column(usable, "product_id")
        ids += pids
        codes.append(code)
        groups.append(group_of(_column(usable, "title"), _column(usable, "description")))
        if fold_groups:  # the stack's cross-fit folds (Survey.fold_groups)
            title_digests, description_digests = _text_digests(
                _column(usable, "title"), _column(usable, "description")
            )
            title_keys += title_digests
            description_keys += description_digests
        shards.append(rank_of(pids, seed=seed, world=world))
        labels.append(encode_labels(pa.Table.from_batches([usable]), reader.taxonomy))
        if texts:
            pairs = zip(_column(usable, "title"), _column(usable, "description"), code, strict=True)
            train_texts += [f"{t or ''} {d or ''}" for t, d, c in pairs if c == TRAIN]
    if not ids:
        raise CatalogEnrichError(_NOTHING)
    check_unique_ids(ids)
    group = np.concatenate(groups)
    found = Survey(
        ids,
        np.concatenate(codes),
        group,
        np.concatenate(shards),
        world,
        _concat_labels(labels, reader.taxonomy),
        train_texts,
        inputs.baseline(group),  # variants (one title and description) make the design effect
        text_keys=(title_keys, description_keys),
    )
    every = np.concatenate(prefixes)
    shared = placeholder_prefixes(every, shared_limit)
    if shared:
        out = np.isin(every, np.fromiter(shared, np.uint64, len(shared)))
        found = _without(found, ~out)
        unusable[IMAGE_SHARED] += int(out.sum())
        inputs.found_unusable(int((out & np.concatenate(counted)).sum()))  # those the baseline counted
        found.inputs, found.shared = inputs.baseline(found.groups), shared
    if not found.product_ids:
        raise CatalogEnrichError(_NOTHING)
    _check_splits(found, fractions)
    found.left_out = dict(sorted(unusable.items()))
    if unusable:
        say(f"left out {unusable.total():,} products whose image cannot be used: {found.left_out}")
    return found


def _check_splits(found: Survey, fractions: tuple[float, float, float]) -> None:
    """Every split the run needs (training, and each held-out one with a share in ``fractions``)
    holds a product: the hash of a few groups' texts can leave one empty, which would fail only
    after training.

    Raises:
        CatalogEnrichError: a needed split is empty (named, with each split's products and groups).
    """
    codes = {"train": TRAIN, "validation": VALIDATION, "calibration": CALIBRATION, "test": TEST}
    needed = dict(zip(codes, (True, *(f > 0 for f in fractions)), strict=True))
    empty = [name for name, code in codes.items() if needed[name] and not (found.codes == code).any()]
    if not empty:
        return
    held = ", ".join(
        f"{name} {int((found.codes == code).sum())} in {np.unique(found.groups[found.codes == code]).size}"
        for name, code in codes.items()
    )
    splits = "splits" if len(empty) > 1 else "split"
    raise CatalogEnrichError(
        f"the {' and '.join(empty)} {splits} would hold no product: a product's split is a hash of its "
        f"title and description, and the {len(found.product_ids)} usable products have only "
        f"{np.unique(found.groups).size} distinct ones (products in groups per split: {held}); label "
        f"more distinct products, or change training.validation_fraction, calibration_fraction or "
        f"test_fraction"
    )


def _without(found: Survey, keep: np.ndarray) -> Survey:
    """``found`` with only the ``keep`` products (a training text is kept with its product)."""
    train = found.codes == TRAIN
    kept_texts = [t for t, k in zip(found.texts, keep[train], strict=True) if k] if found.texts else []
    return replace(
        found,
        product_ids=[p for p, k in zip(found.product_ids, keep, strict=True) if k],
        codes=found.codes[keep],
        groups=found.groups[keep],
        text_keys=_kept(found.text_keys, keep),
        shards=found.shards[keep],
        labels=found.labels.subset(np.flatnonzero(keep)),
        texts=kept_texts,
    )


def _kept(keys: tuple[list[str], list[str | None]], keep: np.ndarray) -> tuple[list[str], list[str | None]]:
    titles, descriptions = keys
    if not titles:
        return keys
    return [t for t, k in zip(titles, keep, strict=True) if k], [
        d for d, k in zip(descriptions, keep, strict=True) if k
    ]


def _concat_labels(parts: list[EncodedLabels], taxonomy: Taxonomy) -> EncodedLabels:
    partial_names = sorted({a for p in parts for a in p.partial})
    partial = {}
    for a in partial_names:
        width = len(taxonomy[a].values)
        partial[a] = np.concatenate(
            [p.partial.get(a, np.zeros((len(p.known[a]), width), np.int8)) for p in parts]
        )
    return EncodedLabels(
        {a.name: np.concatenate([p.targets[a.name] for p in parts]) for a in taxonomy},
        {a.name: np.concatenate([p.known[a.name] for p in parts]) for a in taxonomy},
        partial,
    )
