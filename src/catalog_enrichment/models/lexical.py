"""The lexical modality: word 1-2-grams and character 3-5-grams of a product's texts (title,
description and the merchant's category label), hashed.

The texts are NFKC-normalised first where the model says so (:attr:`StackFusion.nfkc
<catalog_enrichment.models.fusion.StackFusion.nfkc>`: full-width ``ＢＬＵＥ`` and half-width katakana
count as the ``blue`` and katakana a merchant typed elsewhere, ``ﬁ`` as ``fi``); a model saved
without that mark counts them as typed, as it was trained.

What a TF-IDF logistic regression sees, served by the same model as the encoders. The n-grams are
hashed (scikit-learn's ``HashingVectorizer``: stateless, so the predictor needs nothing fitted to
count them) into :data:`BUCKETS` columns; a model keeps the buckets seen in at least two of its
training products (its vocabulary; the :data:`MAX_VOCABULARY` in the most products) with their
inverse document frequencies. A product's vector is
sklearn's ``TfidfVectorizer(sublinear_tf=True)`` row over that vocabulary: ``(1 + log count) * idf``,
L2-normalised. :func:`tfidf` computes it with SciPy for training, :func:`bag_tfidf` with torch in the
forward pass; both give the same numbers.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "BUCKETS",
    "MAX_VOCABULARY",
    "LexicalBatch",
    "bag_tfidf",
    "document_frequency",
    "ngram_counts",
    "texts",
    "tfidf",
]

BUCKETS = 1 << 20
MIN_DF = 2
# the most buckets a vocabulary keeps: an n-gram learner's weights are vocabulary x values, and an
# L-BFGS fit holds about 40 copies of them, which hundreds of thousands of training products would
# otherwise fill with every bucket (a model, its bundle and every fit grow with it)
MAX_VOCABULARY = 1 << 18

# (ids, counts, offsets): the hashed n-grams of B products, flattened, as torch.nn.EmbeddingBag takes
LexicalBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@functools.cache
def _vectorizers() -> tuple[Any, Any]:
    from sklearn.feature_extraction.text import HashingVectorizer

    common = {"n_features": BUCKETS, "alternate_sign": False, "norm": None, "dtype": np.float32}
    return (
        HashingVectorizer(ngram_range=(1, 2), **common),
        HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), **common),
    )


def texts(
    titles: Sequence[Any],
    descriptions: Sequence[Any],
    categories: Sequence[Any] | None = None,
    *,
    nfkc: bool = False,
) -> list[str]:
    """What the n-grams are counted in: ``"<title> . <description> . <category>"`` (the merchant's
    own category label; a missing text is empty), NFKC-normalised where ``nfkc``."""

    def text(x: Any) -> str:
        return x if isinstance(x, str) else ""

    cats = categories if categories is not None else [None] * len(titles)
    docs = [f"{text(t)} . {text(d)} . {text(c)}" for t, d, c in zip(titles, descriptions, cats, strict=True)]
    return [unicodedata.normalize("NFKC", d) for d in docs] if nfkc else docs


def ngram_counts(
    titles: Sequence[Any],
    descriptions: Sequence[Any],
    categories: Sequence[Any] | None = None,
    *,
    nfkc: bool = False,
) -> Any:
    """``(n, BUCKETS)`` SciPy CSR matrix: how often each hashed n-gram occurs in each product
    (its texts NFKC-normalised first where ``nfkc``)."""
    words, chars = _vectorizers()
    docs = texts(titles, descriptions, categories, nfkc=nfkc)
    counts = (words.transform(docs) + chars.transform(docs)).tocsr()
    counts.sort_indices()
    return counts


def document_frequency(counts: Any, max_vocabulary: int = MAX_VOCABULARY) -> tuple[np.ndarray, np.ndarray]:
    """The vocabulary (buckets in at least :data:`MIN_DF` rows of ``counts``; of more than
    ``max_vocabulary``, those in the most rows - ties to the lower bucket), in bucket order, and its
    smoothed inverse document frequencies,
    ``ln((1 + n) / (1 + df)) + 1`` as in scikit-learn."""
    df = np.bincount(counts.indices, minlength=BUCKETS)
    vocabulary = np.flatnonzero(df >= MIN_DF)
    if vocabulary.size > max_vocabulary:
        vocabulary = np.sort(vocabulary[np.argsort(-df[vocabulary], kind="stable")[:max_vocabulary]])
    n = counts.shape[0]
    idf = np.log((1 + n) / (1 + df[vocabulary])) + 1
    return vocabulary, idf.astype(np.float32)


def tfidf(counts: Any, vocabulary: np.ndarray, idf: np.ndarray) -> Any:
    """``(n, len(vocabulary))`` CSR: sublinear TF-IDF rows over the vocabulary, L2-normalised."""
    from sklearn.preprocessing import normalize

    x = counts[:, vocabulary].tocsr().astype(np.float32)
    x.data = (1 + np.log(x.data)) * idf[x.indices]
    return normalize(x, norm="l2", copy=False)


def as_bags(counts: Any) -> LexicalBatch:
    """A CSR count matrix as the ``(ids, counts, offsets)`` tensors a batch carries."""
    return (
        torch.from_numpy(counts.indices.astype(np.int64)),
        torch.from_numpy(counts.data.astype(np.float32)),
        torch.from_numpy(counts.indptr[:-1].astype(np.int64)),
    )


def bag_tfidf(bags: LexicalBatch, rows: torch.Tensor, idf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of :func:`tfidf` for ``F.embedding_bag``: each n-gram's vocabulary row
    (``rows``: bucket -> row, -1 outside the vocabulary; those get row 0 and weight 0) and weight."""
    ids, counts, offsets = bags
    row = rows[ids]
    known = row >= 0
    row = row.clamp_min(0)
    weight = torch.where(known, (1 + counts.log()) * idf[row], torch.zeros_like(counts))
    bag = torch.repeat_interleave(
        torch.arange(offsets.numel(), device=ids.device),
        torch.diff(offsets, append=offsets.new_tensor([ids.numel()])),
    )
    norm = torch.zeros(offsets.numel(), device=ids.device).index_add_(0, bag, weight.square()).sqrt()
    return row, weight / norm.clamp_min(1e-12)[bag]
