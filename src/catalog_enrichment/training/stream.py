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
* **Every later pass uses the survey's list**: it reads the rows the survey kept (by their place in
  the table order, so a recovered image changes nothing) and must read each one's image again; an
  image that no longer reads (its ``image_uri`` file changed, a read failed) or a table whose rows
  changed stops the run with the products named (:class:`CatalogEnrichError`), as labels kept from
  the survey would otherwise no longer line up with the products read.
* **Epochs** read the table again: a rank's training rows pass through a shuffle buffer of
  ``shuffle_rows`` rows (seeded by the seed, the epoch and the rank) into mini-batches, and every
  rank takes the same number of steps: the smallest shard's full batches, so an epoch leaves out
  the rows of a larger shard past them (drawn from the last fills of the shuffle buffer: rows near
  the end of the table order, other ones each epoch). Scoring a held-out split reads its rows in
  table order, the order the survey kept their labels in. Table order is the files sorted by the
  products they hold (:func:`~catalog_enrichment.catalog.lakehouse.scan`), so a rewrite of the same
  rows trains the same model.

Memory holds a few record batches, the shuffle buffer (each entry its own product's texts, image
bytes and labels, never its record batch; not pixels), the product ids, labels, image digest
prefixes, the table rows the survey left out and held-out scores, a trained tokenizer's texts, and
for the stack a digest of each product's title and description (its cross-fit folds' groups);
never the table or its decoded images.
"""

from __future__ import annotations

import hashlib
import itertools
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


@dataclass(slots=True)
class _Row:
    """One product of a pass holding only its own data (a shuffle buffer entry), so the record
    batch it came from is freed once it has been read."""

    product_id: Any
    title: str
    description: str | None
    image: bytes | None
    image_uri: str | None
    targets: dict[str, Any]
    known: dict[str, bool]
    partial: dict[str, np.ndarray]


@dataclass
class _Rows:
    """One record batch's rows that belong to a split (and rank), with their labels."""

    product_id: list[Any]
    title: list[str]
    description: list[str | None]
    image: list[bytes | None]
    image_uri: list[str | None]
    labels: EncodedLabels

    def __len__(self) -> int:
        return len(self.title)

    def row(self, i: int) -> _Row:
        """Row ``i`` on its own: its labels copied out of the batch's arrays."""
        labels = self.labels
        return _Row(
            self.product_id[i],
            self.title[i],
            self.description[i],
            self.image[i],
            self.image_uri[i],
            {a: t[i].copy() for a, t in labels.targets.items()},
            {a: bool(k[i]) for a, k in labels.known.items()},
            {a: p[i].copy() for a, p in labels.partial.items()},
        )


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

    def keep(self, batch: pa.RecordBatch) -> np.ndarray:
        keep = self.codes(batch) == self.split
        if self.world > 1:
            keep &= rank_of(_column(batch, "product_id"), seed=self.seed, world=self.world) == self.rank
        return keep


def _item(row: _Row, pixels: np.ndarray | None, size: int) -> dict[str, Any]:
    """Product ``row`` as the model's collator takes it (see ``data.dataset.ProductDataset``)."""
    return {
        "title": row.title,
        "description": row.description or "",
        "pixel_values": torch.zeros(3, size, size, dtype=torch.uint8)
        if pixels is None
        else torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
        "image_present": pixels is not None,
        "targets": row.targets,
        "known": row.known,
        "partial": row.partial,
    }


def _named(products: Sequence[Any]) -> str:
    more = f" and {len(products) - 5:,} more" if len(products) > 5 else ""
    return ", ".join(map(repr, products[:5])) + more


def _image_changed(products: Sequence[Any], where: str) -> CatalogEnrichError:
    """A later pass cannot use the image of ``products`` that the survey found usable."""
    return CatalogEnrichError(
        f"{where} cannot use the image of {len(products):,} product(s) the survey pass found usable "
        f"({_named(products)}): the image or its image_uri file changed, or failed to read, between "
        "passes over the table; the run stops rather than train or score on labels that no longer "
        "line up with the products read - rerun it (once the images are stable)"
    )


def _table_changed(where: str, what: str) -> CatalogEnrichError:
    """A later pass reads other rows than the survey did."""
    return CatalogEnrichError(
        f"{where} read other products than the survey pass: {what}; the table changed between passes "
        "(a Delta table should be read at one version) - rerun the training"
    )


class _Expected:
    """The survey's products of a split in table order, checked against what a later pass reads."""

    def __init__(self, products: Sequence[Any], where: str) -> None:
        self.products, self.where, self.read = products, where, 0

    def add(self, ids: Sequence[Any]) -> None:
        want = self.products[self.read : self.read + len(ids)]
        for got, was in itertools.zip_longest(ids, want):
            if got != was:
                surveyed = "none" if was is None else repr(was)
                raise _table_changed(self.where, f"product {got!r} where the survey read {surveyed}")
        self.read += len(ids)

    def done(self) -> None:
        if self.read != len(self.products):
            raise _table_changed(
                self.where, f"{self.read:,} products where the survey read {len(self.products):,}"
            )


@dataclass(frozen=True)
class _Reader:
    """What every pass needs to turn a split's rows into the model's items."""

    source: Source
    taxonomy: Taxonomy
    policy: ImagePolicy
    preprocessing: ImagePreprocessing
    shared: frozenset[int] = frozenset()  # the survey's placeholders (:func:`digest_prefix`): left out
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # the job's row rules
    # the table rows (places in table order, sorted) the survey left out: every later pass skips them
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False)

    def batches(self) -> Iterator[tuple[int, pa.RecordBatch]]:
        """The table's record batches, each with the place of its first row in the table order."""
        offset = 0
        for batch in self.source.batches():
            yield offset, batch
            offset += batch.num_rows

    def kept(self, offset: int, rows: int) -> np.ndarray:
        """Which of the ``rows`` rows from place ``offset`` on the survey kept."""
        keep = np.ones(rows, bool)
        lo, hi = np.searchsorted(self.skipped, [offset, offset + rows])
        keep[self.skipped[lo:hi] - offset] = False
        return keep

    def rows(self, offset: int, batch: pa.RecordBatch, selection: _Selection) -> _Rows | None:
        """The ``selection``'s rows of ``batch`` (at place ``offset``) the survey kept, with labels."""
        keep = selection.keep(batch) & self.kept(offset, batch.num_rows)
        if not keep.any():
            return None
        picked = batch.filter(pa.array(keep))
        return _Rows(
            _column(picked, "product_id"),
            [t or "" for t in _column(picked, "title")],
            _column(picked, "description"),
            _column(picked, "image"),
            _column(picked, "image_uri"),
            encode_labels(pa.Table.from_batches([picked]), self.taxonomy),
        )

    def pixels(
        self, image: bytes | None, uri: str | None, prep: ImagePreprocessing
    ) -> tuple[np.ndarray | None, str | None]:
        pixels, error, digest = read_pixels(
            image, uri, prep.decode_size, prep.interpolation, self.policy, prep.decode
        )
        if error is None and digest_prefix(digest) in self.shared:
            return None, IMAGE_SHARED
        return pixels, error

    def item(self, row: _Row) -> dict[str, Any] | None:
        """``row`` as the model's collator takes it; None when its image cannot be used now."""
        prep = self.preprocessing
        pixels, error = self.pixels(row.image, row.image_uri, prep)
        return _item(row, pixels, prep.decode_size) if error is None else None

    def records(self, products: Sequence[Any]) -> Iterator[tuple[ProductRecords, list[Any]]]:
        """The survey's ``products`` (its usable ones, in its order), a record batch at a time, with
        their merchant categories (None without a ``category`` column).

        Raises:
            CatalogEnrichError: a product's image no longer reads, or the table changed.
        """
        where = "the embedding pass"
        expected = _Expected(products, where)
        for offset, batch in self.batches():
            keep = self.kept(offset, batch.num_rows)
            usable, digests, _ = self.usable(batch, InputBaselineCounts(), Counter())
            ids = _column(batch, "product_id")
            broken = [p for p, k, u in zip(ids, keep, usable, strict=True) if k and not u]
            if broken:
                raise _image_changed(broken, where)
            kept = batch.filter(pa.array(keep))
            expected.add(_column(kept, "product_id"))
            if kept.num_rows:
                table = pa.Table.from_batches([kept])
                # each photo's digest as checked: the embedding cache's key names it
                read = [d for d, k in zip(digests, keep, strict=True) if k]
                records = replace(ProductRecords.from_arrow(table, self.policy), image_digest=read)
                yield records, _column(kept, "category")
        expected.done()

    def usable(
        self, batch: pa.RecordBatch, inputs: InputBaselineCounts, unusable: Counter[str]
    ) -> tuple[np.ndarray, list[str | None], np.ndarray]:
        """Which of the batch's products have an image that decodes or none (and no placeholder of
        ``shared``), their images' digests (None: no image) and which of them the
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
        return np.array([e is None for e in errors], bool), digests, scored


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
    ``take`` items (the same count on every rank: steps per epoch times the batch size).

    ``expected``: the survey's count of the shard's rows; each must read (a product whose image no
    longer reads, or another count, raises :class:`CatalogEnrichError`). None (pre-training, no
    labels to keep in line): the rows whose image does not read are skipped."""

    def __init__(
        self,
        reader: _Reader,
        selection: _Selection,
        *,
        take: int,
        shuffle_rows: int,
        kill_at: int | None = None,
        expected: int | None = None,
    ) -> None:
        self.reader, self.selection, self.take, self.shuffle_rows = reader, selection, take, shuffle_rows
        self.expected = expected
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
        """Items in buffer order: rows enter a buffer of ``shuffle_rows`` and leave it at random;
        decoding happens on the way out (the buffer holds each row's own bytes, not pixels)."""
        buffer: list[_Row] = []
        entered = 0
        for offset, batch in self.reader.batches():
            rows = self.reader.rows(offset, batch, self.selection)
            if rows is None:
                continue
            entered += len(rows)
            for i in range(len(rows)):
                buffer.append(rows.row(i))
                if len(buffer) >= self.shuffle_rows:
                    yield from self._pop(buffer, int(rng.integers(len(buffer))))
        if self.expected is not None and entered != self.expected:
            read = f"{entered:,} training rows where the survey read {self.expected:,}"
            raise _table_changed("an epoch", read)
        for j in rng.permutation(len(buffer)).tolist():
            yield from self._out(buffer[j])

    def _pop(self, buffer: list[_Row], j: int) -> Iterator[dict[str, Any]]:
        row = buffer[j]
        buffer[j] = buffer[-1]
        buffer.pop()
        yield from self._out(row)

    def _out(self, row: _Row) -> Iterator[dict[str, Any]]:
        item = self.reader.item(row)
        if item is not None:
            yield item
        elif self.expected is not None:
            raise _image_changed([row.product_id], "an epoch")


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
    """A held-out split's products (the survey's ``products`` of it, in table order, which its
    labels follow) collated in batches; iterable again and again (an epoch's validation scores, the
    final scores).

    Raises:
        CatalogEnrichError: while iterated, a product's image no longer reads or the table changed.
    """

    def __init__(
        self,
        reader: _Reader,
        selection: _Selection,
        collator: Collator,
        batch_size: int,
        products: Sequence[Any],
    ) -> None:
        self.reader, self.selection, self.collator, self.batch_size = reader, selection, collator, batch_size
        self.products = products

    def __iter__(self) -> Iterator[dict[str, Any]]:
        where = "scoring a held-out split"
        expected = _Expected(self.products, where)
        items: list[dict[str, Any]] = []
        for offset, batch in self.reader.batches():
            rows = self.reader.rows(offset, batch, self.selection)
            if rows is None:
                continue
            expected.add(rows.product_id)
            for i in range(len(rows)):
                item = self.reader.item(rows.row(i))
                if item is None:  # named with the batch's other such products
                    rest = range(i + 1, len(rows))
                    broken = [rows.product_id[k] for k in rest if self.reader.item(rows.row(k)) is None]
                    raise _image_changed([rows.product_id[i], *broken], where)
                items.append(item)
                if len(items) == self.batch_size:
                    yield self.collator(items)
                    items = []
        expected.done()
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
    # the table rows (places in table order, sorted) left out: every later pass skips them
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

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

    def shard_rows(self) -> list[int]:
        """Each rank's training rows."""
        return np.bincount(self.shards[self.codes == TRAIN], minlength=self.world).tolist()

    def steps(self, batch_size: int) -> int:
        """Steps per epoch every rank takes: the smallest shard's full batches."""
        return min(self.shard_rows()) // batch_size

    def products(self, code: int) -> list[Any]:
        """The products of split ``code``, in table order."""
        return [self.product_ids[i] for i in np.flatnonzero(self.codes == code)]


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
    codes, groups, shards, labels, train_texts, prefixes, counted, places = [], [], [], [], [], [], [], []
    title_keys: list[str] = []
    description_keys: list[str | None] = []  # for fold_groups
    inputs, unusable = InputBaselineCounts(), Counter[str]()
    everything = _Selection(seed, fractions, split=-1)
    table_rows = 0
    for offset, batch in reader.batches():
        keep, digests, scored = reader.usable(batch, inputs, unusable)
        read = np.array([digest_prefix(d) for d in digests], np.uint64)
        usable = batch.filter(pa.array(keep))
        table_rows = offset + batch.num_rows
        places.append(offset + np.flatnonzero(keep))
        prefixes.append(read[keep])
        counted.append(scored[keep])
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
    every, kept = np.concatenate(prefixes), np.concatenate(places)
    shared = placeholder_prefixes(every, shared_limit)
    if shared:
        out = np.isin(every, np.fromiter(shared, np.uint64, len(shared)))
        found = _without(found, ~out)
        kept = kept[~out]
        unusable[IMAGE_SHARED] += int(out.sum())
        inputs.found_unusable(int((out & np.concatenate(counted)).sum()))  # those the baseline counted
        found.inputs, found.shared = inputs.baseline(found.groups), shared
    if not found.product_ids:
        raise CatalogEnrichError(_NOTHING)
    _check_splits(found, fractions)
    found.skipped = np.setdiff1d(np.arange(table_rows, dtype=np.int64), kept, assume_unique=True)
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
