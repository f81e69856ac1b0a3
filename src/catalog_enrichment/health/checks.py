"""The run health checks: the test every distribution and share is judged by, the estimated
precision's bound, the level split over a run's checks, what blocks, and how a run's checks read
(a table, plots)."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from catalog_enrichment.health.profile import (
    _FLOOR,
    ATTRIBUTE_CHECKS,
    IMAGE_STATES,
    INPUT,
    INPUT_CHECKS,
    MIN_EXPECTED,
    AttributeBaseline,
    AttributeTally,
    HealthProfile,
    HealthTally,
    InputBaseline,
    InputTally,
)

__all__ = [
    "MIN_WRITTEN",
    "Check",
    "assess",
    "blocked_attributes",
    "format_health",
    "homogeneity",
    "plot_scores",
    "psi",
]


IMAGE_CHECKS = ("image", "image_tone")  # the input checks of the photo
# the fewest values written whose estimated precision is judged: a handful of writes' estimate is far
# from normal (one write near the threshold reads as that bin's precision)
MIN_WRITTEN = 10

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
    baseline: Sequence[float], counts: Sequence[float], design_effect: float = 1.0, *, quantiles: bool = False
) -> tuple[float, float, int]:
    """Pearson's chi-square test that two count vectors over the same bins come from one
    distribution: (statistic, p-value, degrees of freedom). ``design_effect``: products come in
    groups (variants) that count alike; the statistic is divided by it (Rao and Scott's first-order
    correction for cluster samples).

    Sparse bins are pooled, smallest first, until each pooled bin expects at least
    :data:`MIN_EXPECTED` products on both sides. Bins that are categories (values, scripts,
    merchant categories, a share's two sides) are ranked by both sides' counts together: given
    each bin's total the test holds its level whatever bins those totals pool, whereas
    ranking by the baseline's counts alone pools the values the baseline's sample happened to
    under-count, which inflates the statistic (a 99-value mix alarms many times its level).
    ``quantiles``: the bins are the baseline's quantiles, equal at training by construction; they
    are ranked by the baseline's counts alone (equal ones stay in order: neighbours pool), never by
    tonight's (ranking equal baseline counts by both sides would rank by tonight's alone). Bins too
    rare to stand alone that were pooled into a common one (a night whose products all lack the
    photo every training product had, or whose titles are all in a script training saw a few times)
    are also compared, together, with the rest by Fisher's exact test, on counts divided by the
    design effect; the p-value is the smaller of the two, doubled (Bonferroni), or Fisher's alone
    where the chi-square has one pooled bin (its statistic then ``nan``, 1 degree of freedom). With
    no rare bin, one bin tests nothing (p 1).
    """
    from scipy.special import chdtrc  # chi-squared survival function (scipy.stats' chi2.sf)

    b = np.asarray(baseline, np.float64)
    c = np.asarray(counts, np.float64)
    m, n = b.sum(), c.sum()
    if m == 0 or n == 0:
        return 0.0, 1.0, 0
    # what ranks the bins, and how much of it a pooled bin needs to expect MIN_EXPECTED on each side
    if quantiles:
        size, need = b, MIN_EXPECTED * m / min(m, n)
    else:
        size, need = b + c, MIN_EXPECTED * (m + n) / min(m, n)
    groups: list[list[float]] = []
    acc = np.zeros(3)  # baseline, tonight, size
    for i in np.argsort(size, kind="stable"):
        acc += (b[i], c[i], size[i])
        if acc[2] >= need:
            groups.append(acc[:2].tolist())
            acc = np.zeros(3)
    if acc[:2].sum() > 0:
        if groups:
            groups[-1] = [groups[-1][0] + acc[0], groups[-1][1] + acc[1]]
        else:
            groups.append(acc[:2].tolist())
    rare = size < need
    # rare bins that could not form a pooled bin of their own, and were seen on either side
    exact = None
    if rare.any() and not rare.all() and size[rare].sum() < need and (b[rare].sum() + c[rare].sum()) > 0:
        exact = _fisher(b, c, rare, design_effect)
    if len(groups) < 2:
        return (0.0, 1.0, 0) if exact is None else (float("nan"), exact, 1)
    table = np.asarray(groups, np.float64)  # (bins, 2): baseline, tonight
    expected = table.sum(axis=1, keepdims=True) * np.array([[m, n]]) / (m + n)
    statistic = float(np.sum((table - expected) ** 2 / expected)) / max(1.0, design_effect)
    dof = len(groups) - 1
    p = float(chdtrc(dof, statistic))
    return statistic, p if exact is None else min(1.0, 2 * min(p, exact)), dof


def _fisher(b: np.ndarray, c: np.ndarray, rare: np.ndarray, design_effect: float) -> float:
    """Fisher's exact two-sided p-value of the 2 x 2 table: the ``rare`` bins together against the
    others, for the baseline ``b`` and tonight ``c``, each count divided by the design effect."""
    from scipy.stats import fisher_exact

    def split(x: np.ndarray) -> list[int]:
        scaled = x / max(1.0, design_effect)
        return [round(float(scaled[rare].sum())), round(float(scaled[~rare].sum()))]

    return float(fisher_exact([split(b), split(c)]).pvalue)


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
    quantiles: bool = False  # the bins are the baseline's quantiles (see homogeneity)
    # the baseline's own design effect where it was drawn otherwise than tonight's products (an
    # attribute's held-out split, drawn in whole groups; see _design_effect); None: the run's
    baseline_design_effect: float | None = None


def _distribution(
    scope: str,
    check: str,
    baseline: Sequence[float],
    counts: Sequence[float],
    *,
    quantiles: bool = False,
    drawn: float | None = None,
) -> _Pending:
    m, n = int(sum(baseline)), int(sum(counts))
    return _Pending(scope, check, n, m, baseline, counts, quantiles=quantiles, baseline_design_effect=drawn)


def _proportion(
    scope: str,
    check: str,
    baseline: Sequence[float],
    counts: Sequence[float],
    shown: int,
    *,
    drawn: float | None = None,
) -> _Pending:
    m, n = int(sum(baseline)), int(sum(counts))
    return _Pending(scope, check, n, m, baseline, counts, shown, baseline_design_effect=drawn)


def _scorable(image: Sequence[int]) -> list[int]:
    """Products without and with a photo: an unusable photo (quarantined, read again by the next
    runs) was there, and counts so - a night whose placeholders are quarantined keeps its share of
    photos, not that of the products left; a feed whose photos go missing does not."""
    return [
        image[IMAGE_STATES.index("absent")],
        image[IMAGE_STATES.index("usable")] + image[IMAGE_STATES.index("unusable")],
    ]


def _estimated_precision(
    base: AttributeBaseline, tally: AttributeTally, tonight: float = 1.0
) -> tuple[float, float] | None:
    """What was written, each value at the held-out precision of its confidence bin, and the
    estimate's standard error. A bin with no held-out value takes the precision of every held-out
    value written at lower confidences (precision does not rise as confidence falls), or, with none
    below it, of the nearest bin above that has some.

    The estimate is a weighted sum of the held-out bins' precisions; its variance is the curve's
    (binomial per held-out bin, each counted once with every weight that reads it: bins that borrow
    the same held-out values are not independent evidence) and the written mix's. A clean night's
    writes are a draw from the held-out mix, so the mix's spread is the larger of the held-out
    writes' and tonight's own (which is none when tonight wrote in one bin). Products come in
    groups that score alike: the curve's bins count their written values divided by the design
    effect of the held-out written values' confidences and outcomes (at least ``tonight``'s), and
    the mix's variance is multiplied by ``tonight``'s."""
    written = np.asarray(tally.written, np.float64)
    n_bin, k_bin = np.asarray(base.written, np.float64), np.asarray(base.correct, np.float64)
    if not written.sum() or not n_bin.sum():
        return None
    n_below = np.cumsum(n_bin) - n_bin
    bins = np.arange(n_bin.size)
    above = np.minimum.accumulate(np.where(n_bin > 0, bins, n_bin.size)[::-1])[::-1]  # nearest at or above
    above = np.minimum(above, n_bin.size - 1)
    reads = np.zeros((n_bin.size, n_bin.size))  # row: a bin's curve as shares of the held-out bins
    for i in bins:
        if n_bin[i] > 0:
            reads[i, i] = 1.0
        elif n_below[i] > 0:
            reads[i, :i] = n_bin[:i] / n_below[i]
        else:
            reads[i, above[i]] = 1.0
    curve = reads @ (k_bin / np.maximum(n_bin, 1))
    w, held_out = written / written.sum(), n_bin / n_bin.sum()
    estimate = float(w @ curve)
    drawn, tonight = max(base.precision_design_effect, tonight, 1.0), max(tonight, 1.0)
    n_eff, k_eff = n_bin / drawn, k_bin / drawn  # each bin's products' worth of evidence
    smoothed = (k_eff + 0.5) / (n_eff + 1)
    curve_var = float(np.sum((w @ reads) ** 2 * smoothed * (1 - smoothed) / (n_eff + 1)))
    spread = max(float(m @ curve**2) - float(m @ curve) ** 2 for m in (w, held_out))
    return estimate, float(math.sqrt(curve_var + tonight * max(0.0, spread) / written.sum()))


@dataclass(frozen=True)
class _Limits:
    """What a run's checks are judged by (see :func:`assess`)."""

    alpha: float  # the level each check fails at
    target: float
    min_psi: float
    min_share_change: float
    design_effect: float


def _pending(
    profile: HealthProfile,
    tally: HealthTally,
    min_products: int,
    changed: Collection[str],
    reads_images: bool,
) -> tuple[list[_Pending], list[Check]]:
    """Every check the profile and tally allow, and those skipped: for too few products, the
    coverage of the ``changed`` attributes, and the photo's checks of a model that reads none."""
    pending: list[_Pending] = []
    skipped: list[Check] = []
    tonight = 1.0 if profile.inputs is None else profile.inputs.design_effect
    for name, base in profile.attributes.items():
        t = tally.attributes.get(name)
        n = 0 if t is None else sum(t.scores)
        if t is None or n < min_products:
            why = f"{n} products scored (fewer than {min_products})"
            skipped += [Check(name, c, "skipped", n, base.products, message=why) for c in ATTRIBUTE_CHECKS]
            continue
        drawn = base.design_effect
        pending += [
            _distribution(name, "score_drift", base.scores, t.scores, quantiles=True, drawn=drawn),
            _distribution(name, "value_mix", base.values, t.values, drawn=drawn),
        ]
        if name in changed:
            why = "the configured taxonomy keeps values out: training's coverage is not tonight's to reach"
            skipped.append(Check(name, "coverage", "skipped", n, base.products, message=why))
        else:
            covered = [base.products - base.covered, base.covered]
            pending.append(_proportion(name, "coverage", covered, [n - t.covered, t.covered], 1, drawn=drawn))
        writes = sum(t.written)
        estimate = _estimated_precision(base, t, tonight) if writes >= MIN_WRITTEN else None
        if estimate is None:
            why = (
                "nothing written"
                if writes == 0
                else f"{writes} values written (fewer than {MIN_WRITTEN})"
                if writes < MIN_WRITTEN
                else "no labelled held-out value was written"
            )
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
                _distribution(
                    INPUT, "title_length", inputs.title_lengths, counted.title_lengths, quantiles=True
                ),
                _distribution(INPUT, "script", inputs.scripts, counted.scripts),
                _distribution(
                    INPUT,
                    "category",
                    [inputs.categories[k] for k in keys],
                    [counted.categories[k] for k in keys],
                ),
                _proportion(INPUT, "description", inputs.description, counted.description, 1),
            ]
            if not reads_images:
                why = "the model reads no photo"
                skipped += [Check(INPUT, c, "skipped", n, inputs.products, message=why) for c in IMAGE_CHECKS]
            else:
                pending += _photo_checks(inputs, counted, min_products, skipped)
    return pending, skipped


def _photo_checks(
    inputs: InputBaseline, counted: InputTally, min_products: int, skipped: list[Check]
) -> list[_Pending]:
    """The image and image-tone checks (each skipped into ``skipped`` where it counts too few
    products: the image check does not count those read again because their photo could not be used,
    which have a photo by that choice)."""
    pending = []
    base, present = _scorable(inputs.image), _scorable(counted.image)
    if sum(present) < min_products:  # products read again for their photo are not counted
        why = f"{sum(present)} products counted (fewer than {min_products}; not those read again for a photo)"
        skipped.append(Check(INPUT, "image", "skipped", sum(present), sum(base), message=why))
    else:
        pending.append(_proportion(INPUT, "image", base, present, 1))
    photos = sum(counted.tones)  # products whose photo was decoded (not read from the store)
    if photos < min_products or sum(inputs.tones) < min_products:
        why = f"{photos} photos decoded (fewer than {min_products})"
        skipped.append(Check(INPUT, "image_tone", "skipped", photos, sum(inputs.tones), message=why))
    else:
        pending.append(_distribution(INPUT, "image_tone", inputs.tones, counted.tones, quantiles=True))
    return pending


def _design_effect(p: _Pending, tonight: float) -> float:
    """The design effect a check's statistic is divided by: ``tonight``'s (the training products'
    variants, as a night's products come) on both sides, or, where the baseline was drawn otherwise,
    each side's weighted by the variance it adds to the difference of shares - ``(d_b / m + d_t / n) /
    (1 / m + 1 / n)`` for ``m`` baseline and ``n`` tonight's products (Rao and Scott's correction for
    two independent samples), the baseline's at least the variants' (they were drawn together)."""
    if p.baseline_design_effect is None or not p.products or not p.baseline_products:
        return tonight
    m, n, tonight = p.baseline_products, p.products, max(1.0, tonight)
    return (max(p.baseline_design_effect, tonight) / m + tonight / n) / (1 / m + 1 / n)


def _judge(p: _Pending, limits: _Limits) -> Check:
    from scipy.special import ndtri  # the normal quantile (scipy.stats' norm.ppf)

    alpha, target = limits.alpha, limits.target
    where = p.check.replace("_", " ") if p.scope == INPUT else f"{p.scope}: {p.check.replace('_', ' ')}"
    if p.precision is not None:
        estimate, error = p.precision
        upper = min(1.0, estimate + float(ndtri(1 - alpha)) * error)
        failed = upper < target
        message = f"{where} {estimate:.3f} (upper bound {upper:.3f}) < {target:.2f}" if failed else None
        return Check(
            p.scope, p.check, "failed" if failed else "passed", p.products, p.baseline_products,
            upper, None, alpha, estimate, target, message,
        )  # fmt: skip
    assert p.baseline is not None and p.counts is not None
    deff = _design_effect(p, limits.design_effect)
    statistic, p_value, _ = homogeneity(p.baseline, p.counts, deff, quantiles=p.quantiles)
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
    exact = math.isnan(statistic)  # Fisher's exact test alone (see homogeneity)
    message = f"{where} {effect} (p {p_value:.2g} < {alpha:.2g})" if failed else None
    return Check(
        p.scope, p.check, "failed" if failed else "passed", p.products, p.baseline_products,
        None if exact else statistic, p_value, alpha, observed, expected, message,
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
    changed: Collection[str] = (),
    reads_images: bool = True,
) -> list[Check]:
    """Every check of a run (see the module docstring): attributes in the profile's order, then the
    inputs; each check evaluated fails at ``false_alarm / K`` (``K`` checks evaluated). Products
    that come in groups of variants count once per group's worth: every statistic is divided by the
    training products' design effect (the estimated precision's variance multiplied by it); an
    attribute's by each side's weighted by the variance it adds, the held-out products' where they
    were drawn in larger groups (see :func:`_design_effect`), and its estimated precision counts
    the held-out written values divided by theirs (see :func:`_estimated_precision`).
    ``changed``: the attributes some of whose values the run does not write (the configured taxonomy
    dropped or added values), whose coverage is not compared with training's; ``reads_images``
    False: the model reads no photo, and scoring decodes none, so the photo's checks are skipped."""
    pending, skipped = _pending(profile, tally, min_products, changed, reads_images)
    deff = 1.0 if profile.inputs is None else profile.inputs.design_effect
    limits = _Limits(false_alarm / max(1, len(pending)), target, min_psi, min_share_change, deff)
    judged = {(p.scope, p.check): _judge(p, limits) for p in pending}
    judged.update({(c.scope, c.check): c for c in skipped})
    scopes = [*profile.attributes, INPUT]
    order = {s: i for i, s in enumerate(scopes)}
    names = {c: i for i, c in enumerate((*ATTRIBUTE_CHECKS, *INPUT_CHECKS))}
    return sorted(judged.values(), key=lambda c: (order[c.scope], names[c.check]))


def blocked_attributes(
    checks: Iterable[Check],
    modes: Mapping[str, str],
    attributes: Sequence[str],
    levels: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The attributes whose values a run must not commit, each with why (in ``attributes`` order): a
    failed check whose mode (``modes``: check name -> warn | block; the input checks under
    ``"inputs"``) is block. A failed input check in block mode blocks every attribute: every
    attribute reads the title and, in a multimodal model, the photo. ``levels`` (derived attribute ->
    its parent): an attribute and its groupings come from the same scores, so blocking one blocks
    them all."""
    why: dict[str, list[str]] = {}
    own: dict[str, list[str]] = {}  # an attribute's own failures, which its groupings share
    for c in checks:
        if c.status != "failed":
            continue
        if c.scope == INPUT and modes.get("inputs") == "block":
            for a in attributes:
                why.setdefault(a, []).append(f"input {c.message or c.check}")
        elif c.scope != INPUT and modes.get(c.check) == "block":
            why.setdefault(c.scope, []).append(c.message or c.check)
            own.setdefault(c.scope, []).append(c.message or c.check)
    families: dict[str, set[str]] = {}
    for derived, parent in (levels or {}).items():
        families.setdefault(parent, {parent}).add(derived)
    family = {a: members for members in families.values() for a in members}
    for a, reasons in own.items():
        for other in sorted(family.get(a, set()) - {a}):
            why.setdefault(other, []).extend(reasons)  # each message names its attribute
    return {a: "; ".join(why[a]) for a in attributes if a in why}


def format_health(
    run_id: str, checks: Sequence[Mapping[str, Any]], blocked: Mapping[str, str] | None = None
) -> str:
    """The health checks of one run as a table, then what failed and what it blocked (attribute ->
    why)."""
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
    for attribute, why in (blocked or {}).items():
        lines.append(f"blocked {attribute} (values not written): {why}")
    return "\n".join(lines)


def plot_scores(profile: HealthProfile, tally: HealthTally, out: Path) -> list[Path]:
    """One PNG per attribute scored in the run (``out/health_<attribute>.png``): the share of
    products in each of the baseline's top-score bins (its deciles, what the drift check compares),
    tonight beside the held-out products. Shares, not densities: a bin of one score (where a tenth
    of the held-out products score exactly 1) has no width to divide by."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, base in profile.attributes.items():
        counted = tally.attributes.get(name)
        if counted is None or not sum(counted.scores):
            continue
        edges = [0.0, *base.edges, 1.0]
        labels = [
            f"{lo:.2f}" if hi - lo < 5e-3 else f"{lo:.2f}-{hi:.2f}" for lo, hi in itertools.pairwise(edges)
        ]
        x = np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(7.2, 4.0))
        for k, (counts, label) in enumerate(
            (
                (base.scores, f"held-out at training (m={base.products:,})"),
                (counted.scores, f"this run (n={sum(counted.scores):,})"),
            )
        ):
            share = np.asarray(counts, np.float64) / max(1, sum(counts))
            ax.bar(x + (k - 0.5) * 0.4, share, width=0.4, label=label, alpha=0.6 if k == 0 else 0.9)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("top score (the held-out products' decile bins)")
        ax.set_ylabel("share of products")
        ax.set_title(f"{name}: top score, this run beside training's held-out products")
        ax.legend()
        fig.tight_layout()
        path = out / f"health_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"  # any attribute name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
