"""What the run health checks count: a model version's profile (its held-out scores and its
training products' inputs, kept in the bundle) and the tallies the scoring tasks count the same way
(one counting function per quantity, shared by both)."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.contracts import RESERVED_NAMES
from catalog_enrichment.metrics import decision_matrix, truth_matrix

__all__ = [
    "ATTRIBUTE_CHECKS",
    "INPUT",
    "INPUT_CHECKS",
    "MISSING_TEXT",
    "AttributeBaseline",
    "AttributeTally",
    "HealthProfile",
    "HealthTally",
    "InputBaseline",
    "InputBaselineCounts",
    "InputTally",
    "ProductInputs",
    "attribute_baseline",
    "cluster_design_effect",
    "input_baseline",
    "share_design_effect",
    "title_script",
]

SCORE_BINS = 10  # deciles of the top score
CONFIDENCE_BINS = 20  # equal-width bins of a written value's confidence
TITLE_BINS = 10  # deciles of the title length (characters)
TONE_BINS = 10  # deciles of a photo's colour balance (data.images.image_tone)
MAX_CATEGORIES = 30  # merchant categories kept by name; the rest count as OTHER
MIN_EXPECTED = 10  # a chi-square bin expects at least this many products on each side
_FLOOR = 1e-4  # PSI's share floor: an empty bin is not an infinite drift
OTHER, NONE = "(other)", "(none)"
INPUT = RESERVED_NAMES[0]  # the scope of the input checks (they concern every attribute)
ATTRIBUTE_CHECKS = ("score_drift", "coverage", "value_mix", "estimated_precision")
INPUT_CHECKS = ("title_length", "script", "category", "description", "image", "image_tone")
# A missing value written out as text - pandas' (str() of nan, None, NaT, <NA>; what read_csv reads as
# missing), a spreadsheet's (#N/A) or a database client's (NULL) - when it is the whole text, in any
# case, whitespace around: a regex Python's re and Java's (Spark's rlike) read alike. A description
# so written counts as none (:func:`_presence`); a title so written breaks ``title_is_text``.
MISSING_TEXT = r"[-+]?nan|none|null|nat|na|n/a|#n/a( n/a)?|#na|<na>|[-+]?1\.#(ind|qnan)|undefined"
_MISSING = re.compile(rf"(?i)\s*({MISSING_TEXT})\s*")
SCRIPTS = (
    "latin",
    "cyrillic",
    "greek",
    "arabic",
    "hebrew",
    "cjk",
    "hangul",
    "devanagari",
    "thai",
    "other",
    "none",
)
_SCRIPT_OF = {
    "LATIN": "latin",
    "CYRILLIC": "cyrillic",
    "GREEK": "greek",
    "ARABIC": "arabic",
    "HEBREW": "hebrew",
    "CJK": "cjk",
    "HIRAGANA": "cjk",
    "KATAKANA": "cjk",
    "HANGUL": "hangul",
    "DEVANAGARI": "devanagari",
    "THAI": "thai",
}
IMAGE_STATES = ("absent", "usable", "unusable")


# -- counting: one function per quantity, shared by training's baseline and the scoring tasks --------


@functools.lru_cache(maxsize=8192)
def _char_script(ch: str) -> str:
    return _SCRIPT_OF.get(unicodedata.name(ch, "").split(" ", 1)[0], "other")


def title_script(title: str | None) -> int:
    """The index in :data:`SCRIPTS` of the script most of a title's letters are written in."""
    text = title or ""
    if text.isascii():
        return SCRIPTS.index("latin") if any(c.isalpha() for c in text) else SCRIPTS.index("none")
    letters = [_char_script(c) for c in text if c.isalpha()]
    if not letters:
        return SCRIPTS.index("none")
    return SCRIPTS.index(max(sorted(set(letters)), key=letters.count))


def _bin_counts(edges: Sequence[float], values: np.ndarray) -> list[int]:
    """Counts of ``values`` in the bins the inner ``edges`` cut (``len(edges) + 1`` bins)."""
    bins = np.searchsorted(np.asarray(edges, np.float64), np.asarray(values, np.float64), side="right")
    return np.bincount(bins, minlength=len(edges) + 1).tolist()


def _confidence_bin(confidence: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(confidence) * CONFIDENCE_BINS).astype(int), 0, CONFIDENCE_BINS - 1)


def _quantile_edges(values: np.ndarray, bins: int) -> list[float]:
    return (
        [float(e) for e in np.unique(np.quantile(values, np.arange(1, bins) / bins))] if len(values) else []
    )


def _top(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    return scores.max(axis=1) if scores.shape[1] else np.zeros(len(scores))


def _add(a: Sequence[int], b: Sequence[int]) -> list[int]:
    return [int(x) + int(y) for x, y in zip(a, b, strict=True)]


def _neg(a: Sequence[int]) -> list[int]:
    return [-int(x) for x in a]


# -- baselines ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeBaseline:
    """One attribute's held-out scores, as the checks read them (counts, so ``m`` is kept)."""

    edges: list[float]  # inner edges of the top score's deciles
    scores: list[int]  # held-out products per top-score bin
    covered: int  # of them, products the thresholds give a value
    values: list[int]  # held-out products per top value (the attribute's values, in order)
    written: list[int]  # labelled written values per confidence bin
    correct: list[int]  # of them, right
    # the held-out products were drawn in groups (a split takes whole groups of variants and
    # templated texts), whose products score alike: the variance of the shares above, as a multiple
    # of independent products' (see cluster_design_effect; the largest of the score, value and
    # coverage shares'), and of the written values' per confidence bin and outcome; 1: one by one
    design_effect: float = 1.0
    precision_design_effect: float = 1.0

    @property
    def products(self) -> int:
        return sum(self.scores)


def attribute_baseline(
    scores: np.ndarray,
    labels: np.ndarray,
    kind: str,
    thresholds: np.ndarray,
    known: np.ndarray | None = None,
    written: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> AttributeBaseline | None:
    """The baseline of one attribute from held-out scores ``(m, V)`` of the model that serves and
    their labels (``known``: the rows labelled, besides multi-class ``-1``; unlabelled rows count for
    every quantity but precision; ``written``: the ``(m, V)`` decisions, where more than the
    thresholds decides them; ``groups``: the group each product was drawn into the held-out split
    with, None: one by one); None: no products."""
    scores = np.asarray(scores, np.float64)
    if not len(scores):
        return None
    top = _top(scores)
    edges = _quantile_edges(top, SCORE_BINS)
    if written is None:
        written = decision_matrix(scores, kind, thresholds)  # type: ignore[arg-type]
    truth, labelled = truth_matrix(labels, scores.shape[1], kind)  # type: ignore[arg-type]
    if known is not None:
        labelled &= np.asarray(known, bool)
    if groups is not None and len(groups) != len(scores):
        raise ValueError(f"{len(groups)} groups for {len(scores)} products")
    judged = written & labelled[:, None]
    bins = _confidence_bin(scores[judged])
    right = truth[judged].astype(np.int64)
    score_bins = np.asarray(np.searchsorted(np.asarray(edges, np.float64), top, side="right"), np.int64)
    covered = written.any(axis=1)
    top_value = np.asarray(scores.argmax(axis=1) if scores.shape[1] else np.zeros(len(scores)), np.int64)
    return AttributeBaseline(
        edges=edges,
        scores=np.bincount(score_bins, minlength=len(edges) + 1).tolist(),
        covered=int(covered.sum()),
        values=np.bincount(top_value, minlength=scores.shape[1]).tolist(),
        written=np.bincount(bins, minlength=CONFIDENCE_BINS).tolist(),
        correct=np.bincount(bins, weights=truth[judged], minlength=CONFIDENCE_BINS).astype(int).tolist(),
        design_effect=max(
            cluster_design_effect(b, groups) for b in (score_bins, top_value, np.asarray(covered, np.int64))
        ),
        precision_design_effect=_precision_design_effect(
            bins, right, None if groups is None else np.asarray(groups)[np.nonzero(judged)[0]]
        ),
    )


def _precision_design_effect(bins: np.ndarray, right: np.ndarray, groups: np.ndarray | None) -> float:
    """The largest design effect of a confidence bin's share of right values (each written value's
    bin, whether it was right, the group of its product), at least 1. A bin whose values were all
    right (or all wrong) shows no spread to estimate it from: it takes the mean group size a value
    of it is in, as if each group's values were all alike."""
    if groups is None:
        return 1.0
    each = [share_design_effect(right[bins == b], groups[bins == b]) for b in np.unique(bins)]
    return max([1.0, *each])


def share_design_effect(right: np.ndarray, groups: np.ndarray | None) -> float:
    """The design effect of the share of ``right`` values (one per value, each in the group of its
    product), at least 1: :func:`cluster_design_effect` of the right / wrong split; where every value
    was right (or every one wrong) there is no spread to estimate it from, and it is the mean size
    of the group a value is in, as if each group's values were all alike."""
    right = np.asarray(right, bool)
    if groups is None or right.size < 2:
        return 1.0
    if right.all() or not right.any():
        return max(1.0, _design_effect(groups))
    return cluster_design_effect(right.astype(np.int64), groups)


def cluster_design_effect(bins: np.ndarray, groups: np.ndarray | None) -> float:
    """How much more the share of products in each of ``bins`` (one bin per product) varies when
    the products were drawn in ``groups`` than when drawn one by one: the largest of the bins' own
    design effects (each the ratio of the share's between-group variance, the linearised estimator
    of a cluster sample's, to the binomial one), at least 1. Rao and Scott's mean of them
    understates the variance of a share carried by a few large groups (a templated title's); the
    largest is nearer their correction's conservative bound (the design matrix's largest
    eigenvalue), not above it. Every product of a group in one bin, groups of one
    size: about that size (``k / (k - 1)`` times it for ``k`` groups); larger where the larger
    groups gather in a bin. Groups whose products fall apart over the bins add little; 1 without
    groups or with one bin; every product in one group: their number."""
    bins = np.asarray(bins, np.int64)
    n = bins.size
    if groups is None or n < 2:
        return 1.0
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    counts = np.zeros((int(g.max()) + 1, int(bins.max()) + 1))
    np.add.at(counts, (g, bins), 1.0)
    sizes = counts.sum(axis=1)
    share = counts.sum(axis=0) / n
    seen = (share > 0) & (share < 1)
    if not seen.any():
        return 1.0
    k = len(sizes)
    if k < 2:
        return float(n)
    residual = counts[:, seen] - sizes[:, None] * share[seen]
    clustered = k / (k - 1) * (residual**2).sum(axis=0) / n**2
    each = clustered / (share[seen] * (1 - share[seen]) / n)
    return float(np.clip(each.max(), 1.0, n))


@dataclass(frozen=True)
class InputBaseline:
    """What the training products looked like, label-free."""

    title_edges: list[float]  # inner edges of the title length's deciles (characters)
    title_lengths: list[int]  # products per title-length bin
    scripts: list[int]  # products per title script (:data:`SCRIPTS`)
    categories: dict[str, int]  # products per merchant category (the commonest), OTHER and NONE
    description: list[int]  # products without / with a description
    image: list[int]  # products per :data:`IMAGE_STATES`
    tone_edges: list[float]  # inner edges of the photos' colour balance deciles
    tones: list[int]  # decoded photos per colour-balance bin
    # products come in groups that share title and description (colour or size variants); the mean
    # group size a product is in, sum(n_g^2) / sum(n_g), is the tests' design effect (see assess)
    design_effect: float = 1.0
    # a baseline counted before an empty image_uri was no photo (as the scoring reads it) counted
    # it as one: its runs count so too, or every night would seem to have lost photos
    empty_uri_is_photo: bool = True
    # likewise a description written as a missing value (:data:`MISSING_TEXT`): a baseline counted
    # before such was none counted it as one, and so do its runs
    missing_text_is_description: bool = True

    @property
    def products(self) -> int:
        return sum(self.title_lengths)


def _image_states(present: Sequence[bool], errors: Sequence[str | None]) -> list[int]:
    states = [0 if not p else (2 if e is not None else 1) for p, e in zip(present, errors, strict=True)]
    return np.bincount(np.asarray(states, np.int64), minlength=len(IMAGE_STATES)).tolist()


def _category_counts(known: Iterable[str], categories: Sequence[str | None]) -> dict[str, int]:
    named = set(known)
    counts = dict.fromkeys([*sorted(named), OTHER, NONE], 0)
    for c in categories:
        counts[NONE if c is None else (c if c in named else OTHER)] += 1
    return counts


def _measured(tones: Sequence[float | None]) -> np.ndarray:
    return np.array([t for t in tones if t is not None], np.float64)


@dataclass(frozen=True)
class ProductInputs:
    """What the input checks count of some products: one entry per product in each field."""

    titles: Sequence[str | None]
    descriptions: Sequence[str | None]
    image_present: Sequence[bool]  # an image or image_uri is there
    image_errors: Sequence[str | None]  # why the image cannot be used; None: usable or absent
    categories: Sequence[str | None]
    tones: Sequence[float | None]  # each decoded photo's colour balance; None: no photo decoded

    @classmethod
    def of(
        cls,
        rows: pa.Table | pa.RecordBatch,
        image_errors: Sequence[str | None],
        tones: Sequence[float | None],
        *,
        empty_uri_is_photo: bool = False,
    ) -> ProductInputs:
        """The inputs of products table rows (or a batch of them) whose images were read
        (``empty_uri_is_photo``: as an old baseline counted them, :class:`InputBaseline`)."""
        names = rows.schema.names

        def column(name: str) -> list[Any]:
            return rows.column(name).to_pylist() if name in names else [None] * rows.num_rows

        # as the image is read (data.images.read_pixels): inline bytes, else a non-empty URI
        present = np.zeros(rows.num_rows, bool)
        if "image" in names:
            present |= rows.column("image").is_valid().to_numpy(zero_copy_only=False)
        if "image_uri" in names:
            uri = rows.column("image_uri")
            given = (
                uri.is_valid()
                if empty_uri_is_photo
                else pc.fill_null(pc.greater(pc.utf8_length(uri), 0), False)
            )
            present |= given.to_numpy(zero_copy_only=False)
        return cls(
            column("title"), column("description"), present.tolist(), image_errors, column("category"), tones
        )

    def subset(self, keep: Sequence[bool]) -> ProductInputs:
        """The inputs of the ``keep`` products alone."""
        return ProductInputs(
            *([v for v, k in zip(getattr(self, f.name), keep, strict=True) if k] for f in fields(self))
        )


def input_baseline(inputs: ProductInputs, groups: np.ndarray | None = None) -> InputBaseline:
    """The input baseline of the training products (``groups``: each product's group of variants,
    None: every product its own)."""
    counts = InputBaselineCounts()
    counts.add(inputs)
    return counts.baseline(groups)


@dataclass
class InputBaselineCounts:
    """An :class:`InputBaseline` counted batch by batch (the streamed reading's survey): what it
    needs of each product - title length and script, category, description present, image state,
    colour balance - and never the texts themselves."""

    lengths: list[np.ndarray] = field(default_factory=list)
    tones: list[np.ndarray] = field(default_factory=list)
    scripts: np.ndarray = field(default_factory=lambda: np.zeros(len(SCRIPTS), np.int64))
    categories: Counter[str | None] = field(default_factory=Counter)
    description: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))
    image: np.ndarray = field(default_factory=lambda: np.zeros(len(IMAGE_STATES), np.int64))

    def add(self, inputs: ProductInputs) -> None:
        titles = inputs.titles
        self.lengths.append(np.array([len(t or "") for t in titles], np.int64))
        self.tones.append(_measured(inputs.tones))
        scripts = np.asarray([title_script(t) for t in titles], np.int64)
        self.scripts += np.bincount(scripts, minlength=len(SCRIPTS))
        self.categories.update(inputs.categories)
        self.description += np.asarray(_presence(inputs.descriptions), np.int64)
        self.image += np.asarray(_image_states(inputs.image_present, inputs.image_errors), np.int64)

    def found_unusable(self, products: int) -> None:
        """``products`` counted with a usable image turned out to have none (a placeholder's,
        found once every product was counted)."""
        self.image[IMAGE_STATES.index("usable")] -= products
        self.image[IMAGE_STATES.index("unusable")] += products

    def baseline(self, groups: np.ndarray | None = None) -> InputBaseline:
        lengths = np.concatenate([np.zeros(0, np.int64), *self.lengths]).astype(np.float64)
        tones = np.concatenate([np.zeros(0), *self.tones])
        edges, tone_edges = _quantile_edges(lengths, TITLE_BINS), _quantile_edges(tones, TONE_BINS)
        named = {c: n for c, n in self.categories.items() if c is not None}
        common = set(sorted(named, key=lambda c: (-named[c], c))[:MAX_CATEGORIES])
        categories = dict.fromkeys([*sorted(common), OTHER, NONE], 0)
        for c, n in self.categories.items():
            categories[NONE if c is None else (c if c in common else OTHER)] += n
        return InputBaseline(
            title_edges=edges,
            title_lengths=_bin_counts(edges, lengths),
            scripts=self.scripts.tolist(),
            categories=categories,
            description=self.description.tolist(),
            image=self.image.tolist(),
            tone_edges=tone_edges,
            tones=_bin_counts(tone_edges, tones),
            design_effect=_design_effect(groups),
            empty_uri_is_photo=False,
            missing_text_is_description=False,
        )


def _design_effect(groups: np.ndarray | None) -> float:
    """The mean size of the group a product is in, ``sum(n_g^2) / sum(n_g)`` (1: no two products
    share a group). Variants of one product share most of what the checks count, so a batch of
    ``n`` products carries about ``n / design_effect`` products' worth of evidence."""
    if groups is None or not len(groups):
        return 1.0
    sizes = np.unique(np.asarray(groups), return_counts=True)[1].astype(np.float64)
    return float((sizes**2).sum() / sizes.sum())


def _presence(texts: Sequence[str | None], *, missing_text_is_one: bool = False) -> list[int]:
    """Products without / with a text: none, empty or a missing value written out (:data:`MISSING_TEXT`;
    ``missing_text_is_one``: that is a text, as an old baseline counted it) is without."""
    present = sum(1 for t in texts if t and (missing_text_is_one or not _MISSING.fullmatch(t)))
    return [len(texts) - present, present]


@dataclass(frozen=True)
class HealthProfile:
    """The baselines a model version's runs are checked against."""

    attributes: dict[str, AttributeBaseline]
    inputs: InputBaseline | None = None

    VERSION = 2  # calibration.json's "health" format; bundles with another (or none) have no checks

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "attributes": {a: asdict(b) for a, b in self.attributes.items()},
            "inputs": None if self.inputs is None else asdict(self.inputs),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> HealthProfile | None:
        """The profile of :meth:`to_dict`; None for a bundle written before this format."""
        if not d or d.get("version") != cls.VERSION:
            return None
        inputs = d.get("inputs")
        return cls(
            {a: AttributeBaseline(**b) for a, b in d["attributes"].items()},
            None if inputs is None else InputBaseline(**inputs),
        )


# -- tallies -----------------------------------------------------------------------------------------


@dataclass
class AttributeTally:
    """What the scoring tasks count of one attribute."""

    scores: list[int]  # scored products per baseline top-score bin
    covered: int  # of them, products given a value
    values: list[int]  # per top value
    written: list[int]  # written values per confidence bin

    def merge(self, other: AttributeTally) -> AttributeTally:
        return AttributeTally(
            _add(self.scores, other.scores),
            self.covered + other.covered,
            _add(self.values, other.values),
            _add(self.written, other.written),
        )

    def negated(self) -> AttributeTally:
        return AttributeTally(_neg(self.scores), -self.covered, _neg(self.values), _neg(self.written))


@dataclass
class InputTally:
    """What the scoring tasks count of the products' inputs (every valid product)."""

    title_lengths: list[int]
    scripts: list[int]
    categories: dict[str, int]
    description: list[int]
    image: list[int]
    tones: list[int]

    def merge(self, other: InputTally) -> InputTally:
        return InputTally(
            _add(self.title_lengths, other.title_lengths),
            _add(self.scripts, other.scripts),
            {k: v + other.categories.get(k, 0) for k, v in self.categories.items()},
            _add(self.description, other.description),
            _add(self.image, other.image),
            _add(self.tones, other.tones),
        )

    def negated(self) -> InputTally:
        return InputTally(
            _neg(self.title_lengths),
            _neg(self.scripts),
            {k: -v for k, v in self.categories.items()},
            _neg(self.description),
            _neg(self.image),
            _neg(self.tones),
        )


@dataclass
class HealthTally:
    """A run's (or a batch's) counts; tallies add up (:meth:`merge`), as Spark's accumulator does."""

    attributes: dict[str, AttributeTally] = field(default_factory=dict)
    inputs: InputTally | None = None

    def merge(self, other: HealthTally) -> HealthTally:
        attrs = dict(self.attributes)
        for a, t in other.attributes.items():
            attrs[a] = attrs[a].merge(t) if a in attrs else t
        inputs = self.inputs if other.inputs is None else other.inputs
        if self.inputs is not None and other.inputs is not None:
            inputs = self.inputs.merge(other.inputs)
        return HealthTally(attrs, inputs)

    def without(self, part: HealthTally) -> HealthTally:
        """These counts less ``part``, counts of some of the same products (scored, then
        quarantined: their values are not written)."""
        negated = HealthTally(
            {a: t.negated() for a, t in part.attributes.items()},
            None if part.inputs is None else part.inputs.negated(),
        )
        return self.merge(negated)

    def photos_quarantined(self, products: int) -> None:
        """``products`` quarantined for their photo (a placeholder's, found before scoring or by it
        and taken out of the scoring's counts): not counted by the scoring tasks, they had one (the
        image check's share, :func:`checks._scorable`)."""
        if self.inputs is not None and products:
            self.inputs.image[IMAGE_STATES.index("unusable")] += products

    def take(self) -> HealthTally:
        """The counts so far, as a new tally; this one starts again from zero."""
        out = HealthTally(self.attributes, self.inputs)
        self.attributes, self.inputs = {}, None
        return out

    def add_attribute(
        self, name: str, base: AttributeBaseline, scores: np.ndarray, covered: int, confidences: np.ndarray
    ) -> None:
        """Count one batch of an attribute: the scores ``(n, V)`` of the products scored for it, how
        many of them were given a value, and the confidences of the values written."""
        scores = np.asarray(scores, np.float64)
        top_value = scores.argmax(axis=1) if len(scores) else np.zeros(0, np.int64)
        batch = AttributeTally(
            _bin_counts(base.edges, _top(scores)),
            int(covered),
            np.bincount(top_value, minlength=len(base.values)).tolist(),
            np.bincount(_confidence_bin(confidences), minlength=CONFIDENCE_BINS).tolist(),
        )
        self.attributes[name] = self.attributes[name].merge(batch) if name in self.attributes else batch

    def add_inputs(
        self, base: InputBaseline, inputs: ProductInputs, photos: Sequence[bool] | None = None
    ) -> None:
        """Count one batch of products' inputs (``photos``: the products whose image state counts;
        None: every one)."""
        titles = inputs.titles
        pictured = inputs if photos is None else inputs.subset(photos)
        batch = InputTally(
            _bin_counts(base.title_edges, np.array([len(t or "") for t in titles], np.float64)),
            np.bincount([title_script(t) for t in titles], minlength=len(SCRIPTS)).tolist(),
            _category_counts([c for c in base.categories if c not in (OTHER, NONE)], inputs.categories),
            _presence(inputs.descriptions, missing_text_is_one=base.missing_text_is_description),
            _image_states(pictured.image_present, pictured.image_errors),
            _bin_counts(base.tone_edges, _measured(inputs.tones)),
        )
        self.inputs = batch if self.inputs is None else self.inputs.merge(batch)
