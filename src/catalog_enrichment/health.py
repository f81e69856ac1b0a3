"""Health of a run: does tonight's scoring still look like the products the thresholds were proven on?

The 95 % guarantee is proven on held-out products and holds for products that look like them. At
training, a :class:`HealthProfile` is kept in the bundle (``calibration.json: health``): per
attribute, the final model's scores on held-out products it never trained on (the test split, or
the validation split when the test products are a separate table) - the top score's deciles, the
share the thresholds give a value, the mix of top values and the precision of written values per
confidence bin - and, over every training product, the inputs: title lengths, title scripts,
merchant categories, descriptions and images present or unusable. Each scoring task counts the same
for the products it scores (:class:`HealthTally`, summed by a Spark accumulator in the scoring pass
itself: no second read), and the driver compares (:func:`assess`).

Every distribution (score deciles, coverage, value mix and the input checks) is compared with one
two-sample test: Pearson's chi-square test of homogeneity between the baseline's ``m`` products and
tonight's ``n``, with sparse bins pooled until each expects :data:`MIN_EXPECTED` products (so the
chi-square approximation holds). Estimated precision - what was written, each value weighted by the
held-out precision at its confidence (label-free, in the spirit of NannyML's CBPE) - fails when even
its upper confidence bound is below the target.

The levels are Bonferroni-split: with ``K`` checks evaluated in a run, each fails at
``false_alarm / K``, so a clean run - products drawn from the baseline's distribution - raises any
alarm at most ``false_alarm`` (1 %) of the time, at every batch size (``tests/test_health.py``
simulates it). Products that come in groups of variants (the same title and description: colours
and sizes of one article) count alike in every check, so a batch holds fewer independent products
than rows: each statistic is divided by the training products' design effect (Rao and Scott's
first-order correction for cluster samples). A significant difference must also be large enough to matter (``min_psi``,
``min_share_change``), so a backfill of millions does not alarm on a negligible shift. An attribute
with fewer than ``min_products`` scored products is not judged.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from catalog_enrichment.metrics import decision_matrix, truth_matrix

__all__ = [
    "ATTRIBUTE_CHECKS",
    "INPUT",
    "INPUT_CHECKS",
    "AttributeBaseline",
    "Check",
    "HealthProfile",
    "HealthTally",
    "InputBaseline",
    "assess",
    "attribute_baseline",
    "blocked_attributes",
    "format_health",
    "homogeneity",
    "input_baseline",
    "plot_scores",
    "psi",
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
INPUT = "input"  # the scope of the input checks (they concern every attribute)
ATTRIBUTE_CHECKS = ("score_drift", "coverage", "value_mix", "estimated_precision")
INPUT_CHECKS = ("title_length", "script", "category", "description", "image", "image_tone")
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

    @property
    def products(self) -> int:
        return sum(self.scores)


def attribute_baseline(
    scores: np.ndarray,
    labels: np.ndarray,
    kind: str,
    thresholds: np.ndarray,
    known: np.ndarray | None = None,
) -> AttributeBaseline | None:
    """The baseline of one attribute from held-out scores ``(m, V)`` of the model that serves and
    their labels (``known``: the rows labelled, besides multi-class ``-1``; unlabelled rows count for
    every quantity but precision); None: no products."""
    scores = np.asarray(scores, np.float64)
    if not len(scores):
        return None
    top = _top(scores)
    edges = _quantile_edges(top, SCORE_BINS)
    written = decision_matrix(scores, kind, thresholds)  # type: ignore[arg-type]
    truth, labelled = truth_matrix(labels, scores.shape[1], kind)  # type: ignore[arg-type]
    if known is not None:
        labelled &= np.asarray(known, bool)
    judged = written & labelled[:, None]
    bins = _confidence_bin(scores[judged])
    return AttributeBaseline(
        edges=edges,
        scores=_bin_counts(edges, top),
        covered=int(written.any(axis=1).sum()),
        values=np.bincount(scores.argmax(axis=1), minlength=scores.shape[1]).tolist(),
        written=np.bincount(bins, minlength=CONFIDENCE_BINS).tolist(),
        correct=np.bincount(bins, weights=truth[judged], minlength=CONFIDENCE_BINS).astype(int).tolist(),
    )


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


def input_baseline(
    titles: Sequence[str | None],
    descriptions: Sequence[str | None],
    image_present: Sequence[bool],
    image_errors: Sequence[str | None],
    categories: Sequence[str | None],
    tones: Sequence[float | None],
    groups: np.ndarray | None = None,
) -> InputBaseline:
    """The input baseline of the training products (one entry per product in each sequence;
    ``tones``: each decoded photo's colour balance, None where there is none; ``groups``: each
    product's group of variants, None: every product its own)."""
    lengths = np.array([len(t or "") for t in titles], np.float64)
    edges = _quantile_edges(lengths, TITLE_BINS)
    tone_edges = _quantile_edges(_measured(tones), TONE_BINS)
    named = [c for c in categories if c is not None]
    common = sorted(set(named), key=lambda c: (-named.count(c), c))[:MAX_CATEGORIES]
    return InputBaseline(
        title_edges=edges,
        title_lengths=_bin_counts(edges, lengths),
        scripts=np.bincount([title_script(t) for t in titles], minlength=len(SCRIPTS)).tolist(),
        categories=_category_counts(common, categories),
        description=_presence(descriptions),
        image=_image_states(image_present, image_errors),
        tone_edges=tone_edges,
        tones=_bin_counts(tone_edges, _measured(tones)),
        design_effect=_design_effect(groups),
    )


def _design_effect(groups: np.ndarray | None) -> float:
    """The mean size of the group a product is in, ``sum(n_g^2) / sum(n_g)`` (1: no two products
    share a group). Variants of one product share most of what the checks count, so a batch of
    ``n`` products carries about ``n / design_effect`` products' worth of evidence."""
    if groups is None or not len(groups):
        return 1.0
    sizes = np.unique(np.asarray(groups), return_counts=True)[1].astype(np.float64)
    return float((sizes**2).sum() / sizes.sum())


def _presence(texts: Sequence[str | None]) -> list[int]:
    present = sum(1 for t in texts if t)
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
        self,
        base: InputBaseline,
        titles: Sequence[str | None],
        descriptions: Sequence[str | None],
        image_present: Sequence[bool],
        image_errors: Sequence[str | None],
        categories: Sequence[str | None],
        tones: Sequence[float | None],
    ) -> None:
        """Count one batch of products' inputs (one entry per product in each sequence; ``tones``:
        the colour balance of each photo decoded, None where none was)."""
        batch = InputTally(
            _bin_counts(base.title_edges, np.array([len(t or "") for t in titles], np.float64)),
            np.bincount([title_script(t) for t in titles], minlength=len(SCRIPTS)).tolist(),
            _category_counts([c for c in base.categories if c not in (OTHER, NONE)], categories),
            _presence(descriptions),
            _image_states(image_present, image_errors),
            _bin_counts(base.tone_edges, _measured(tones)),
        )
        self.inputs = batch if self.inputs is None else self.inputs.merge(batch)


# -- statistics ----------------------------------------------------------------------------------------


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of ``actual`` against ``expected`` (counts or shares; each is
    normalised, and shares are floored so an empty bin is not an infinite drift)."""
    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    e = np.maximum(e / max(e.sum(), 1e-300), _FLOOR)
    a = np.maximum(a / max(a.sum(), 1e-300), _FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def homogeneity(
    baseline: Sequence[float], counts: Sequence[float], design_effect: float = 1.0
) -> tuple[float, float, int]:
    """Pearson's chi-square test that two count vectors over the same bins come from one
    distribution: (statistic, p-value, degrees of freedom). ``design_effect``: products come in
    groups (variants) that count alike; the statistic is divided by it (Rao and Scott's first-order
    correction for cluster samples).

    Bins are pooled, smallest baseline count first, until each pooled bin expects at least
    :data:`MIN_EXPECTED` products on both sides at the baseline's shares; the pooling looks at the
    baseline only, never at tonight's counts (choosing bins after seeing the data would inflate the
    statistic). One bin left tests nothing (p 1).
    """
    from scipy.stats import chi2

    b = np.asarray(baseline, np.float64)
    c = np.asarray(counts, np.float64)
    m, n = b.sum(), c.sum()
    if m == 0 or n == 0:
        return 0.0, 1.0, 0
    need = MIN_EXPECTED * m / min(m, n)  # baseline products a pooled bin needs
    groups: list[list[float]] = []
    acc = [0.0, 0.0]
    for i in np.argsort(b, kind="stable"):
        acc = [acc[0] + b[i], acc[1] + c[i]]
        if acc[0] >= need:
            groups.append(acc)
            acc = [0.0, 0.0]
    if sum(acc) > 0:
        if groups:
            groups[-1] = [groups[-1][0] + acc[0], groups[-1][1] + acc[1]]
        else:
            groups.append(acc)
    if len(groups) < 2:
        return 0.0, 1.0, 0
    table = np.asarray(groups, np.float64)  # (bins, 2): baseline, tonight
    expected = table.sum(axis=1, keepdims=True) * np.array([[m, n]]) / (m + n)
    statistic = float(np.sum((table - expected) ** 2 / expected)) / max(1.0, design_effect)
    dof = len(groups) - 1
    return statistic, float(chi2.sf(statistic, dof)), dof


# -- checks -------------------------------------------------------------------------------------------

Status = Literal["passed", "failed", "skipped"]


@dataclass(frozen=True)
class Check:
    """One check of one run: a ``run_health`` row without the run's own columns.

    ``observed``/``expected``: the population stability index and None for a distribution; the
    share tonight and at training for a proportion; the estimated precision and the target for
    ``estimated_precision`` (whose ``statistic`` is its upper confidence bound).
    """

    scope: str  # an attribute, or INPUT
    check: str
    status: Status
    products: int
    baseline_products: int
    statistic: float | None = None
    p_value: float | None = None
    alpha: float | None = None
    observed: float | None = None
    expected: float | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Pending:
    """A check ready to be judged once the run's level per check is known."""

    scope: str
    check: str
    products: int
    baseline_products: int
    baseline: Sequence[float] | None = None  # a distribution (None: estimated precision)
    counts: Sequence[float] | None = None
    share_bin: int | None = None  # a proportion: the bin whose share is shown
    precision: tuple[float, float] | None = None  # the estimate and its standard error


def _distribution(scope: str, check: str, baseline: Sequence[float], counts: Sequence[float]) -> _Pending:
    return _Pending(scope, check, int(sum(counts)), int(sum(baseline)), baseline, counts)


def _proportion(
    scope: str, check: str, baseline: Sequence[float], counts: Sequence[float], shown: int
) -> _Pending:
    return _Pending(scope, check, int(sum(counts)), int(sum(baseline)), baseline, counts, shown)


def _estimated_precision(base: AttributeBaseline, tally: AttributeTally) -> tuple[float, float] | None:
    """What was written, each value at the held-out precision of its confidence bin (a bin with no
    held-out value takes the overall held-out precision), and the estimate's standard error: the
    curve's (binomial per bin) and the written mix's (multinomial over the bins) together."""
    written = np.asarray(tally.written, np.float64)
    n_bin, k_bin = np.asarray(base.written, np.float64), np.asarray(base.correct, np.float64)
    if not written.sum() or not n_bin.sum():
        return None
    overall = k_bin.sum() / n_bin.sum()
    curve = np.where(n_bin > 0, k_bin / np.maximum(n_bin, 1), overall)
    support = np.where(n_bin > 0, n_bin, n_bin.sum())
    smoothed = np.where(n_bin > 0, (k_bin + 0.5) / (n_bin + 1), (k_bin.sum() + 0.5) / (n_bin.sum() + 1))
    w = written / written.sum()
    estimate = float(w @ curve)
    curve_var = np.sum(w**2 * smoothed * (1 - smoothed) / (support + 1))
    mix_var = max(0.0, float(w @ curve**2) - estimate**2) / written.sum()
    return estimate, float(math.sqrt(curve_var + mix_var))


@dataclass(frozen=True)
class _Limits:
    """What a run's checks are judged by (see :func:`assess`)."""

    alpha: float  # the level each check fails at
    target: float
    min_psi: float
    min_share_change: float
    design_effect: float


def _pending(
    profile: HealthProfile, tally: HealthTally, min_products: int
) -> tuple[list[_Pending], list[Check]]:
    """Every check the profile and tally allow, and those skipped for too few products."""
    pending: list[_Pending] = []
    skipped: list[Check] = []
    for name, base in profile.attributes.items():
        t = tally.attributes.get(name)
        n = 0 if t is None else sum(t.scores)
        if t is None or n < min_products:
            why = f"{n} products scored (fewer than {min_products})"
            skipped += [Check(name, c, "skipped", n, base.products, message=why) for c in ATTRIBUTE_CHECKS]
            continue
        covered = [base.products - base.covered, base.covered]
        pending += [
            _distribution(name, "score_drift", base.scores, t.scores),
            _proportion(name, "coverage", covered, [n - t.covered, t.covered], 1),
            _distribution(name, "value_mix", base.values, t.values),
        ]
        estimate = _estimated_precision(base, t)
        if estimate is None:
            why = "nothing written" if sum(t.written) == 0 else "no labelled held-out value was written"
            skipped.append(Check(name, "estimated_precision", "skipped", n, base.products, message=why))
        else:
            pending.append(
                _Pending(name, "estimated_precision", sum(t.written), sum(base.written), precision=estimate)
            )
    inputs, counted = profile.inputs, tally.inputs
    if inputs is not None:
        n = 0 if counted is None else sum(counted.title_lengths)
        if counted is None or n < min_products:
            why = f"{n} products scored (fewer than {min_products})"
            skipped += [Check(INPUT, c, "skipped", n, inputs.products, message=why) for c in INPUT_CHECKS]
        else:
            keys = list(inputs.categories)
            pending += [
                _distribution(INPUT, "title_length", inputs.title_lengths, counted.title_lengths),
                _distribution(INPUT, "script", inputs.scripts, counted.scripts),
                _distribution(
                    INPUT,
                    "category",
                    [inputs.categories[k] for k in keys],
                    [counted.categories[k] for k in keys],
                ),
                _proportion(INPUT, "description", inputs.description, counted.description, 1),
                _proportion(INPUT, "image", inputs.image, counted.image, IMAGE_STATES.index("usable")),
            ]
            photos = sum(counted.tones)  # products whose photo was decoded (not read from the store)
            if photos < min_products or sum(inputs.tones) < min_products:
                why = f"{photos} photos decoded (fewer than {min_products})"
                skipped.append(Check(INPUT, "image_tone", "skipped", photos, sum(inputs.tones), message=why))
            else:
                pending.append(_distribution(INPUT, "image_tone", inputs.tones, counted.tones))
    return pending, skipped


def _judge(p: _Pending, limits: _Limits) -> Check:
    from scipy.stats import norm

    alpha, target = limits.alpha, limits.target
    where = p.check.replace("_", " ") if p.scope == INPUT else f"{p.scope}: {p.check.replace('_', ' ')}"
    if p.precision is not None:
        estimate, error = p.precision
        error *= math.sqrt(max(1.0, limits.design_effect))
        upper = min(1.0, estimate + float(norm.ppf(1 - alpha)) * error)
        failed = upper < target
        message = f"{where} {estimate:.3f} (upper bound {upper:.3f}) < {target:.2f}" if failed else None
        return Check(
            p.scope, p.check, "failed" if failed else "passed", p.products, p.baseline_products,
            upper, None, alpha, estimate, target, message,
        )  # fmt: skip
    assert p.baseline is not None and p.counts is not None
    statistic, p_value, _ = homogeneity(p.baseline, p.counts, limits.design_effect)
    if p.share_bin is None:
        observed, expected = psi(p.baseline, p.counts), None
        large = observed >= limits.min_psi
        effect = f"PSI {observed:.3f}"
    else:
        observed = p.counts[p.share_bin] / max(1, sum(p.counts))
        expected = p.baseline[p.share_bin] / max(1, sum(p.baseline))
        large = abs(observed - expected) >= limits.min_share_change
        effect = f"share {observed:.3f} against {expected:.3f} at training"
    failed = p_value < alpha and large
    message = f"{where} {effect} (chi-square p {p_value:.2g} < {alpha:.2g})" if failed else None
    return Check(
        p.scope, p.check, "failed" if failed else "passed", p.products, p.baseline_products,
        statistic, p_value, alpha, observed, expected, message,
    )  # fmt: skip


def assess(
    profile: HealthProfile,
    tally: HealthTally,
    *,
    target: float,
    false_alarm: float = 0.01,
    min_products: int = 50,
    min_psi: float = 0.05,
    min_share_change: float = 0.03,
) -> list[Check]:
    """Every check of a run (see the module docstring): attributes in the profile's order, then the
    inputs; each check evaluated fails at ``false_alarm / K`` (``K`` checks evaluated). Products
    that come in groups of variants count once per group's worth: every statistic is divided by the
    training products' design effect (the estimated precision's variance multiplied by it)."""
    pending, skipped = _pending(profile, tally, min_products)
    deff = 1.0 if profile.inputs is None else profile.inputs.design_effect
    limits = _Limits(false_alarm / max(1, len(pending)), target, min_psi, min_share_change, deff)
    judged = {(p.scope, p.check): _judge(p, limits) for p in pending}
    judged.update({(c.scope, c.check): c for c in skipped})
    scopes = [*profile.attributes, INPUT]
    order = {s: i for i, s in enumerate(scopes)}
    names = {c: i for i, c in enumerate((*ATTRIBUTE_CHECKS, *INPUT_CHECKS))}
    return sorted(judged.values(), key=lambda c: (order[c.scope], names[c.check]))


def blocked_attributes(
    checks: Iterable[Check], modes: Mapping[str, str], attributes: Sequence[str]
) -> list[str]:
    """The attributes whose values a run must not commit: a failed check whose mode (``modes``: check
    name -> warn | block; the input checks under ``"inputs"``) is block; a failed input check in
    block mode blocks every attribute."""
    blocked: set[str] = set()
    for c in checks:
        if c.status != "failed":
            continue
        if c.scope == INPUT and modes.get("inputs") == "block":
            blocked.update(attributes)
        elif c.scope != INPUT and modes.get(c.check) == "block":
            blocked.add(c.scope)
    return [a for a in attributes if a in blocked]


def format_health(run_id: str, checks: Sequence[Mapping[str, Any]], blocked: Sequence[str] = ()) -> str:
    """The health checks of one run as a table, then what failed and what it blocked."""
    if not checks:
        return f"run {run_id}: no health checks (nothing scored, or a model trained before them)"

    def num(x: Any, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        f"run {run_id}: health against the model's held-out products",
        f"  {'scope':<16}{'check':<21}{'status':<9}{'n':>8}{'observed':>10}{'expected':>10}"
        f"{'p':>10}{'level':>10}",
    ]
    for c in checks:
        lines.append(
            f"  {c['scope']:<16}{c['check']:<21}{c['status']:<9}{c['products']:>8}{num(c['observed']):>10}"
            f"{num(c['expected']):>10}{num(c['p_value'], '.2g'):>10}{num(c['alpha'], '.2g'):>10}"
        )
    failures = [c["message"] for c in checks if c["status"] == "failed"]
    lines.append("failed: " + "; ".join(failures) if failures else "every check passed")
    if blocked:
        lines.append("blocked (values not written): " + ", ".join(blocked))
    return "\n".join(lines)


def plot_scores(profile: HealthProfile, tally: HealthTally, out: Path) -> list[Path]:
    """One PNG per attribute scored in the run (``out/health_<attribute>.png``): the top score's
    histogram tonight over the held-out one, on the baseline's decile bins (as densities, so the
    unequal bins compare)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, base in profile.attributes.items():
        counted = tally.attributes.get(name)
        if counted is None or not sum(counted.scores):
            continue
        edges = np.array([0.0, *base.edges, 1.0])
        widths = np.maximum(np.diff(edges), 1e-9)
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for counts, label, fill in (
            (base.scores, f"held-out at training (m={base.products:,})", True),
            (counted.scores, f"this run (n={sum(counted.scores):,})", False),
        ):
            density = np.asarray(counts, np.float64) / max(1, sum(counts)) / widths
            ax.stairs(density, edges, label=label, fill=fill, alpha=0.35 if fill else 1.0, linewidth=2)
        ax.set_xlabel("top score")
        ax.set_ylabel("density")
        ax.set_title(f"{name}: top score, this run over training's held-out products")
        ax.legend()
        fig.tight_layout()
        path = out / f"health_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
