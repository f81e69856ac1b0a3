"""Run health checks with known answers: PSI and the chi-square test of homogeneity on fixed arrays,
the estimated precision against the held-out curve, what blocks, and a false-alarm rate on clean
runs that stays within the 1 % the levels are split for."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import binom, chi2, chi2_contingency, fisher_exact, norm

from catalog_enrichment.config import HealthConfig
from catalog_enrichment.health import (
    CONFIDENCE_BINS,
    INPUT,
    MIN_WRITTEN,
    AttributeBaseline,
    Check,
    HealthProfile,
    HealthTally,
    InputBaselineCounts,
    ProductInputs,
    assess,
    attribute_baseline,
    blocked_attributes,
    format_health,
    homogeneity,
    input_baseline,
    plot_scores,
    psi,
    title_script,
)
from catalog_enrichment.metrics import decision_matrix

pytestmark = [pytest.mark.timeout(300)]


def test_psi_of_fixed_arrays() -> None:
    assert psi([0.5, 0.5], [50, 50]) == 0.0
    expected = 0.25 * math.log(1.5) + 0.25 * math.log(2)  # (0.75-0.5)ln(0.75/0.5) + (0.25-0.5)ln(0.25/0.5)
    assert psi([0.5, 0.5], [75, 25]) == pytest.approx(expected, abs=1e-12)
    assert psi([500, 500], [0.75, 0.25]) == pytest.approx(expected, abs=1e-12)  # counts or shares
    assert math.isfinite(psi([0.5, 0.5], [100, 0]))  # an empty bin is floored, not infinite


def test_homogeneity_is_pearsons_chi_square_of_the_two_by_k_table() -> None:
    statistic, p, dof = homogeneity([50, 50], [75, 25])
    # totals 125 / 75 per bin, 100 per side: expected 62.5 and 37.5; 2 * 12.5^2/62.5 + 2 * 12.5^2/37.5
    assert statistic == pytest.approx(2 * 12.5**2 / 62.5 + 2 * 12.5**2 / 37.5) == pytest.approx(40 / 3)
    assert dof == 1 and p == pytest.approx(chi2.sf(40 / 3, 1))
    table = np.array([[300, 200, 150, 350], [40, 30, 10, 20]])
    reference = chi2_contingency(table, correction=False)
    assert homogeneity(table[0], table[1])[:2] == pytest.approx((reference.statistic, reference.pvalue))
    # a bin that expects fewer than 10 on a side is pooled with the next smallest
    assert homogeneity([500, 500, 1], [500, 500, 0])[2] == 1
    assert homogeneity([10, 0], [0, 0]) == (0.0, 1.0, 0)  # nothing tonight: nothing to test
    assert homogeneity([0, 2000], [0, 60]) == (0.0, 1.0, 0)  # one bin on both sides: no difference


def test_a_night_gathered_in_a_bin_rare_at_training_is_not_pooled_away() -> None:
    """Bins too rare to stand alone, pooled into a common bin, are also compared with the rest by
    Fisher's exact test (training had no product without a photo; tonight 60 of 60 have none): the
    smaller p-value, doubled, or Fisher's alone where the chi-square has one pooled bin. A bin empty
    at training that tonight fills (300 of 1,000) stands alone in the chi-square."""
    _, p, dof = homogeneity([0, 2000], [300, 700])
    assert dof == 1 and p == pytest.approx(
        chi2_contingency(np.array([[0, 2000], [300, 700]]), correction=False).pvalue
    )
    # a rare bin (5 < 10 x 2,000 / 100) pooled with the 995: two pooled bins and the exact test
    pooled = chi2_contingency(np.array([[1000, 70], [1000, 30]]), correction=False).pvalue
    exact = fisher_exact([[5, 1995], [40, 60]]).pvalue
    assert homogeneity([5, 1000, 995], [40, 30, 30])[1:] == pytest.approx((2 * min(pooled, exact), 1))
    scripts = np.zeros((2, 5))
    scripts[0, :2] = [1992, 8]  # training: Latin, a few Cyrillic titles
    scripts[1, 1] = 1000  # tonight: every title Cyrillic
    assert homogeneity(scripts[0], scripts[1])[1] < 1e-100
    assert homogeneity([0, 2000], [60, 0])[1] == pytest.approx(fisher_exact([[0, 2000], [60, 0]]).pvalue)
    # the design effect divides the counts Fisher's test reads
    assert homogeneity([0, 2000], [60, 0], design_effect=2.0)[1] == pytest.approx(
        fisher_exact([[0, 1000], [30, 0]]).pvalue
    )
    assert homogeneity([4, 2000], [1, 59])[1] > 0.1  # one product in a rare bin: nothing to see
    # decile bins hold equal baseline counts: none is rare, the chi-square alone decides (neighbours
    # pooled in pairs: 400 baseline products each for 50 tonight)
    deciles = [200] * 10
    assert homogeneity(deciles, [5, 6, 13, 3, 2, 2, 4, 9, 4, 2], quantiles=True)[1] == pytest.approx(
        chi2_contingency(
            np.array([[400, 11], [400, 16], [400, 4], [400, 13], [400, 6]]), correction=False
        ).pvalue
    )


def test_a_many_valued_mix_of_clean_nights_fails_at_the_tests_level() -> None:
    """99 values of Zipf-like frequencies, as hm-fashion's product types: 600 clean nights of 1,000
    products against baselines of 2,000 drawn from the same shares fail at 5 % about 30 times.
    Pooling the values the baseline's sample happened to under-count (ranking bins by the baseline
    alone) failed about 230 times. The bound is binomial(600, 0.05)'s 99.99 % quantile."""
    rng = np.random.default_rng(7)
    shares = 1 / np.arange(1, 100) ** 1.2
    shares /= shares.sum()
    failed = sum(
        homogeneity(rng.multinomial(2000, shares), rng.multinomial(1000, shares))[1] < 0.05
        for _ in range(600)
    )
    assert failed <= binom.ppf(0.9999, 600, 0.05)


def test_title_scripts() -> None:
    names = ["Red cotton shirt", "Красная рубашка", "赤いシャツ", "", "1234 !", "Ελληνικά", "Chemise à col"]
    scripts = [title_script(t) for t in names]
    from catalog_enrichment.health import SCRIPTS

    assert [SCRIPTS[s] for s in scripts] == ["latin", "cyrillic", "cjk", "none", "none", "greek", "latin"]


def _curve_baseline() -> AttributeBaseline:
    """A held-out curve: 100 written values at confidence [0.90, 0.95) of which 93 right, 400 at
    [0.95, 1] of which 396 right; top scores in two bins split at 0.5; 1,000 products."""
    written, correct = [0] * CONFIDENCE_BINS, [0] * CONFIDENCE_BINS
    written[18], correct[18] = 100, 93
    written[19], correct[19] = 400, 396
    return AttributeBaseline([0.5], [500, 500], 500, [600, 400], written, correct)


def _tally(base: AttributeBaseline, confidences: np.ndarray, n: int = 100) -> HealthTally:
    tally = HealthTally()
    scores = np.tile([[0.3, 0.7], [0.9, 0.1]], (n // 2, 1))  # the baseline's halves and value mix
    tally.add_attribute("color", base, scores, len(confidences), confidences)
    return tally


def _check(checks: list[Check], name: str) -> Check:
    return next(c for c in checks if c.check == name)


def test_the_estimated_precision_is_the_held_out_curve_at_the_written_confidences() -> None:
    base = _curve_baseline()
    profile = HealthProfile({"color": base})
    confidences = np.array([0.92] * 25 + [0.97] * 25)
    checks = assess(profile, _tally(base, confidences), target=0.95)
    est = _check(checks, "estimated_precision")
    assert est.observed == pytest.approx((25 * 0.93 + 25 * 0.99) / 50) and est.expected == 0.95
    assert est.status == "passed" and est.products == 50 and est.baseline_products == 500
    # a bin the held-out values never fell in, with none below it, takes the nearest bin above
    # (0.90-0.95: 93 of 100), not their overall precision (489 / 500)
    other = assess(profile, _tally(base, np.full(50, 0.5)), target=0.95)
    assert _check(other, "estimated_precision").observed == pytest.approx(93 / 100)
    # with some below it, the held-out values written at lower confidences (0.60-0.65: 3 of 5)
    written, correct = list(base.written), list(base.correct)
    written[12], correct[12] = 5, 3
    low = AttributeBaseline([0.5], [500, 500], 505, [600, 400], written, correct)
    checks = assess(HealthProfile({"color": low}), _tally(low, np.full(50, 0.77)), target=0.95)
    assert _check(checks, "estimated_precision").observed == pytest.approx(3 / 5)


def test_bins_that_borrow_one_held_out_bin_count_its_noise_once() -> None:
    """Writes at eight confidences no held-out value fell at, with none below, all read the nearest
    bin above (372 of 400 right): the estimate is that bin's precision, its error that bin's binomial
    error whole - not an eighth of its variance, as if the eight bins were independent evidence."""
    written, correct = [0] * CONFIDENCE_BINS, [0] * CONFIDENCE_BINS
    written[18], correct[18] = 400, 372
    written[19], correct[19] = 400, 396
    base = AttributeBaseline([0.5], [500, 500], 500, [600, 400], written, correct)
    confidences = np.repeat(np.arange(10, 18) / CONFIDENCE_BINS + 0.01, 10)  # ten in each of bins 10-17
    est = _check(
        assess(HealthProfile({"color": base}), _tally(base, confidences), target=0.95), "estimated_precision"
    )
    smoothed = 372.5 / 401
    spread = 0.5 * 0.5 * (0.99 - 0.93) ** 2  # the held-out mix's (see the next test)
    assert est.alpha == pytest.approx(0.01 / 4) and est.observed == pytest.approx(0.93)
    assert est.statistic == pytest.approx(
        0.93 + norm.ppf(1 - 0.01 / 4) * math.sqrt(smoothed * (1 - smoothed) / 401 + spread / 80)
    )
    assert est.status == "passed"  # 0.93 on 400 held-out values cannot rule out 0.95


def test_a_few_writes_in_one_bin_vary_by_the_held_out_mix_and_a_handful_is_not_judged() -> None:
    """Tonight's writes all at one confidence have no spread of their own; a clean night's writes
    are a draw from the held-out mix (2,000 at 0.93, 8,000 at 0.99), whose spread is part of their
    error. One write near the threshold is too few to judge: its estimate is that bin's precision."""
    written, correct = [0] * CONFIDENCE_BINS, [0] * CONFIDENCE_BINS
    written[18], correct[18] = 2000, 1860
    written[19], correct[19] = 8000, 7920
    base = AttributeBaseline([0.5], [5000, 5000], 5000, [6000, 4000], written, correct)
    profile = HealthProfile({"color": base})
    est = _check(assess(profile, _tally(base, np.full(20, 0.92)), target=0.9), "estimated_precision")
    spread = 0.2 * 0.8 * (0.99 - 0.93) ** 2  # the held-out mix's variance of the curve
    smoothed = 1860.5 / 2001
    error = math.sqrt(smoothed * (1 - smoothed) / 2001 + spread / 20)
    assert est.observed == pytest.approx(0.93)
    assert est.statistic == pytest.approx(0.93 + norm.ppf(1 - est.alpha) * error)
    few = np.full(MIN_WRITTEN - 1, 0.92)
    one = _check(assess(profile, _tally(base, few), target=0.95), "estimated_precision")
    assert one.status == "skipped"
    assert one.message == f"{MIN_WRITTEN - 1} values written (fewer than {MIN_WRITTEN})"


def test_estimated_precision_fails_only_when_its_upper_bound_is_below_the_target() -> None:
    written, correct = [0] * CONFIDENCE_BINS, [0] * CONFIDENCE_BINS
    written[18], correct[18] = 4000, 3600  # 0.90 on 4,000 held-out values: a tight curve
    written[19], correct[19] = 4000, 3960
    base = AttributeBaseline([0.5], [5000, 5000], 5000, [6000, 4000], written, correct)
    profile = HealthProfile({"color": base})
    low = assess(profile, _tally(base, np.full(50, 0.91)), target=0.95)
    est = _check(low, "estimated_precision")
    assert est.status == "failed" and est.observed == pytest.approx(0.9)
    assert est.statistic is not None and 0.9 < est.statistic < 0.95  # the upper bound
    assert est.message is not None and est.message.startswith("color: estimated precision 0.900")
    # the same estimate on a curve from 10 values: too uncertain to call
    written[18], correct[18] = 10, 9
    loose = HealthProfile(
        {"color": AttributeBaseline([0.5], [5000, 5000], 5000, [6000, 4000], written, correct)}
    )
    assert _check(
        assess(loose, _tally(base, np.full(50, 0.91)), target=0.95), "estimated_precision"
    ).status == ("passed")


def test_coverage_is_not_judged_where_the_configured_taxonomy_keeps_values_out() -> None:
    """The configured taxonomy dropped one of colour's three values: a clean night writes less than
    training's thresholds did, by design, not by drift; its coverage is skipped, the rest judged."""
    rng = np.random.default_rng(3)
    scores, labels = _draw(rng, 4000, 3)
    base = attribute_baseline(scores, labels, "multiclass", np.full(3, 0.8))
    assert base is not None
    night, _ = _draw(rng, 2000, 3)
    thresholds = np.array([0.8, 0.8, np.nan])  # the policy's: the third value is not written
    tally = HealthTally()
    written = decision_matrix(night, "multiclass", thresholds)
    tally.add_attribute("color", base, night, int(written.any(axis=1).sum()), night[written])
    profile = HealthProfile({"color": base})
    assert _check(assess(profile, tally, target=0.5), "coverage").status == "failed"
    checks = assess(profile, tally, target=0.5, changed=["color"])
    coverage = _check(checks, "coverage")
    assert coverage.status == "skipped" and "configured taxonomy" in (coverage.message or "")
    assert {c.check: c.status for c in checks if c.check != "coverage"} == {
        "score_drift": "passed",
        "value_mix": "passed",
        "estimated_precision": "passed",
    }


def test_a_shifted_batch_fails_score_drift_and_coverage_naming_statistic_and_level() -> None:
    rng = np.random.default_rng(0)
    scores, labels = _draw(rng, 4000, 3)
    base = attribute_baseline(scores, labels, "multiclass", np.full(3, 0.8))
    assert base is not None
    shifted, _ = _draw(rng, 1000, 3, shift=2.0)
    tally = HealthTally()
    written = decision_matrix(shifted, "multiclass", np.full(3, 0.8))
    tally.add_attribute("color", base, shifted, int(written.any(axis=1).sum()), shifted[written])
    checks = assess(HealthProfile({"color": base}), tally, target=0.5)
    failed = {c.check for c in checks if c.status == "failed"}
    assert {"score_drift", "coverage", "value_mix"} <= failed
    drift = _check(checks, "score_drift")
    assert drift.alpha == pytest.approx(0.01 / 4)  # four checks evaluated
    assert drift.message is not None and drift.message.startswith("color: score drift PSI")
    assert f"< {drift.alpha:.2g}" in drift.message


def test_too_few_products_are_not_judged_and_the_table_says_so() -> None:
    base = _curve_baseline()
    checks = assess(HealthProfile({"color": base}), _tally(base, np.full(5, 0.97), n=10), target=0.95)
    assert {c.status for c in checks} == {"skipped"}
    assert checks[0].message == "10 products scored (fewer than 50)"
    text = format_health("r1", [c.to_dict() for c in checks])
    assert "skipped" in text and "every check passed" in text
    assert "no health checks" in format_health("r1", [])


def test_block_mode_blocks_the_failed_attribute_and_an_input_failure_blocks_every_attribute() -> None:
    def failed(scope: str, check: str) -> Check:
        return Check(scope, check, "failed", 100, 1000)

    attributes = ["color", "material", "pattern"]
    modes = {"score_drift": "warn", "estimated_precision": "block", "inputs": "warn"}
    checks = [failed("color", "score_drift"), failed("pattern", "estimated_precision")]
    assert blocked_attributes(checks, modes, attributes) == {"pattern": "estimated_precision"}
    assert blocked_attributes([failed(INPUT, "script")], modes, attributes) == {}
    script = Check(INPUT, "script", "failed", 100, 1000, message="script PSI 2.1")
    blocked = blocked_attributes([script], {**modes, "inputs": "block"}, attributes)
    assert blocked == dict.fromkeys(attributes, "input script PSI 2.1")
    passed = Check("color", "estimated_precision", "passed", 100, 1000)
    assert blocked_attributes([passed], modes, attributes) == {}
    defaults = HealthConfig().modes()  # a broken night writes nothing wrong: every check blocks
    assert set(defaults.values()) == {"block"}
    assert list(blocked_attributes(checks, defaults, attributes)) == ["color", "pattern"]
    # a derived attribute and its parent share their scores: blocking one blocks the other
    levels, both = {"color_family": "color"}, [*attributes, "color_family"]
    mix = Check("color", "value_mix", "failed", 100, 1000, message="color: value mix PSI 0.4")
    assert blocked_attributes([mix], defaults, both, levels) == dict.fromkeys(
        ["color", "color_family"], "color: value mix PSI 0.4"
    )
    family = Check("color_family", "coverage", "failed", 100, 1000, message="color_family: coverage")
    assert blocked_attributes([family], defaults, both, levels) == dict.fromkeys(
        ["color", "color_family"], "color_family: coverage"
    )
    # a second grouping of the same colours comes from those scores too: one failure blocks all three
    levels, three = {**levels, "color_tone": "color"}, [*both, "color_tone"]
    assert blocked_attributes([family], defaults, three, levels) == dict.fromkeys(
        ["color", "color_family", "color_tone"], "color_family: coverage"
    )
    # an attribute whose name begins like an input check's message still passes its reason on
    voltage = Check("input voltage", "value_mix", "failed", 100, 1000, message="input voltage: value mix")
    levels = {"input voltage class": "input voltage"}
    assert blocked_attributes(
        [voltage], defaults, ["input voltage", "input voltage class"], levels
    ) == dict.fromkeys(["input voltage", "input voltage class"], "input voltage: value mix")


def test_a_profile_round_trips_tallies_merge_and_the_plot_is_drawn(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pop = _population(rng, 3000)
    profile = _profile(pop, np.arange(1500))
    assert HealthProfile.from_dict(profile.to_dict()) == profile
    assert HealthProfile.from_dict({"color": {"edges": []}}) is None  # the first format: no checks
    whole = _count(profile, pop, np.arange(1500, 3000))
    parts = _count(profile, pop, np.arange(1500, 2000)).merge(_count(profile, pop, np.arange(2000, 3000)))
    assert parts == whole and sum(whole.attributes["color"].scores) == 1500
    assert whole.inputs is not None and sum(whole.inputs.title_lengths) == 1500
    paths = plot_scores(profile, whole, tmp_path)
    assert [p.name for p in paths] == ["health_color.png", "health_material.png", "health_size.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    # an attribute's name is not a file name: "size/fit" is drawn in the folder, not under "size"
    renamed = HealthProfile({"size/fit": profile.attributes["size"]}, profile.inputs)
    moved = HealthTally({"size/fit": whole.attributes["size"]}, whole.inputs)
    (tmp_path / "odd").mkdir()
    (drawn,) = plot_scores(renamed, moved, tmp_path / "odd")
    assert drawn.parent == tmp_path / "odd" and drawn.name == "health_size_fit.png" and drawn.exists()


# -- the false-alarm rate of clean runs ------------------------------------------------------------------

THRESHOLDS = {"color": np.full(3, 0.8), "material": np.full(12, 0.6), "size": np.full(4, 0.85)}
KINDS = {"color": "multiclass", "material": "multiclass", "size": "multilabel"}


def _draw(
    rng: np.random.Generator, n: int, values: int, shift: float = 0.0, kind: str = "multiclass"
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated scores: multi-class softmax whose top value is right as often as its score says
    (skewed value frequencies); multi-label sigmoids, each value true with its score."""
    logits = rng.normal(0, 1.6, (n, values)) + np.linspace(1.0, 0.0, values) + np.eye(values)[0] * shift
    if kind == "multilabel":
        scores = 1 / (1 + np.exp(-logits))
        return scores, (rng.random(scores.shape) < scores).astype(np.float32)
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    cumulative = scores.cumsum(axis=1)
    labels = (rng.random((n, 1)) > cumulative).sum(axis=1).clip(0, values - 1)
    return scores, labels


def _population(rng: np.random.Generator, size: int) -> dict[str, object]:
    """Products of one marketplace: three attributes' scores and labels, and their inputs (mostly
    Latin titles of varied length, a few Cyrillic; Zipf-like merchant categories past the 30 kept
    by name; some without a description or image, a few unusable images)."""
    pop: dict[str, object] = {}
    for name, thresholds in THRESHOLDS.items():
        pop[name] = _draw(rng, size, len(thresholds), kind=KINDS[name])
    lengths = rng.integers(8, 90, size)
    cyrillic = rng.random(size) < 0.004
    pop["titles"] = ["Ж" * n if c else "a" * n for n, c in zip(lengths, cyrillic, strict=True)]
    ranks = np.arange(1, 61)
    pop["categories"] = [f"cat-{c}" for c in rng.choice(60, size, p=(1 / ranks) / (1 / ranks).sum())]
    pop["descriptions"] = ["d" if p else None for p in rng.random(size) < 0.85]
    state = rng.choice(3, size, p=[0.05, 0.94, 0.01])
    pop["present"] = (state > 0).tolist()
    pop["errors"] = ["image_decodable" if s == 2 else None for s in state]
    warm = rng.normal(20, 30, size).round(1)  # photos' colour balance, one decimal (ties, as real ones)
    pop["tones"] = [float(t) if s == 1 else None for t, s in zip(warm, state, strict=True)]
    return pop


def test_an_input_baseline_counted_in_batches_is_the_one_counted_at_once() -> None:
    """The streamed reading's survey counts batch by batch and keeps no text; its baseline is the
    in-memory one exactly (60 categories, past the 30 kept by name; some without a category)."""
    pop = _population(np.random.default_rng(3), 2_000)
    pop["categories"] = [None if i % 17 == 0 else c for i, c in enumerate(pop["categories"])]  # type: ignore[arg-type]
    every = np.arange(2_000)
    counts = InputBaselineCounts()
    for part in [*np.array_split(every, 7), every[:0]]:  # an empty batch counts nothing
        counts.add(_inputs(pop, part))
    assert counts.baseline() == input_baseline(_inputs(pop, every))
    categories = counts.baseline().categories
    assert categories["(none)"] == len(range(0, 2_000, 17)) and categories["(other)"] > 0


def _pick(pop: dict[str, object], key: str, idx: np.ndarray) -> list[object]:
    values = pop[key]
    assert isinstance(values, list)
    return [values[i] for i in idx]


def _profile(pop: dict[str, object], idx: np.ndarray, groups: np.ndarray | None = None) -> HealthProfile:
    attributes = {}
    for name, thresholds in THRESHOLDS.items():
        scores, labels = pop[name]  # type: ignore[misc]
        base = attribute_baseline(scores[idx], labels[idx], KINDS[name], thresholds)
        assert base is not None
        attributes[name] = base
    inputs = input_baseline(_inputs(pop, idx), None if groups is None else groups[idx])
    return HealthProfile(attributes, inputs)


def _variants(pop: dict[str, object], k: int) -> dict[str, object]:
    """Every product of ``pop`` ``k`` times in a row: a group of variants that count alike."""
    out: dict[str, object] = {}
    for key, value in pop.items():
        if isinstance(value, tuple):
            out[key] = tuple(np.repeat(v, k, axis=0) for v in value)
        else:
            assert isinstance(value, list)
            out[key] = [v for v in value for _ in range(k)]
    return out


def _count(profile: HealthProfile, pop: dict[str, object], idx: np.ndarray) -> HealthTally:
    """What the scoring tasks count for the products ``idx``."""
    tally = HealthTally()
    for name, thresholds in THRESHOLDS.items():
        scores = pop[name][0][idx]  # type: ignore[index]
        written = decision_matrix(scores, KINDS[name], thresholds)  # type: ignore[arg-type]
        tally.add_attribute(
            name, profile.attributes[name], scores, int(written.any(axis=1).sum()), scores[written]
        )
    assert profile.inputs is not None
    tally.add_inputs(profile.inputs, _inputs(pop, idx))
    return tally


def _inputs(pop: dict[str, object], idx: np.ndarray) -> ProductInputs:
    keys = ("titles", "descriptions", "present", "errors", "categories", "tones")
    return ProductInputs(*(_pick(pop, k, idx) for k in keys))  # type: ignore[arg-type]


def _target(pop: dict[str, object]) -> float:
    """The lowest precision any attribute writes over the whole population: clean runs sit at or
    above the target, one attribute exactly at it (the hardest null for estimated precision)."""
    out = []
    for name, thresholds in THRESHOLDS.items():
        scores, labels = pop[name]  # type: ignore[misc]
        written = decision_matrix(scores, KINDS[name], thresholds)  # type: ignore[arg-type]
        truth = (
            labels.astype(bool)
            if KINDS[name] == "multilabel"
            else np.eye(len(thresholds), dtype=bool)[labels]
        )
        out.append((written & truth).sum() / written.sum())
    return float(min(out))


@pytest.mark.slow
@pytest.mark.parametrize(("n", "variants"), [(60, 1), (1000, 1), (5000, 1), (999, 3)])
def test_clean_runs_raise_any_alarm_at_most_one_time_in_a_hundred(n: int, variants: int) -> None:
    """300 clean runs per batch size, each against a fresh baseline of about 2,000 held-out
    products drawn from the same marketplace (18 checks per run: 4 per attribute, 6 on the inputs).
    A run alarms when any check fails; the levels are split so that happens at most 1 % of the
    time. With ``variants`` > 1 every product comes with that many variants (identical here, the
    hardest case), drawn as whole groups, which only the design effect keeps at 1 %. 10 or more
    alarms in 300 has probability 0.0011 for a rate of exactly 1 % (binomial(300, 0.01)), so the
    test fails only when the levels are wrong."""
    rng = np.random.default_rng(n)
    pop = _population(rng, 60_000 // variants)
    target = _target(pop)
    pop = _variants(pop, variants)
    groups = np.arange(60_000 // variants * variants) // variants
    base, night = 2000 // variants, n // variants
    alarms = 0
    for _ in range(300):
        chosen = rng.choice(60_000 // variants, base + night, replace=False)
        idx = (chosen[:, None] * variants + np.arange(variants)).ravel()
        profile = _profile(pop, idx[: base * variants], groups)
        checks = assess(profile, _count(profile, pop, idx[base * variants :]), target=target)
        few = f"(fewer than {MIN_WRITTEN})"  # a small night's attribute may write too few to judge
        assert sum(c.status != "skipped" or (c.message or "").endswith(few) for c in checks) == 18
        alarms += any(c.status == "failed" for c in checks)
    assert alarms < 10


@pytest.mark.slow
def test_a_held_out_split_drawn_in_whole_templates_keeps_clean_runs_at_one_alarm_in_a_hundred() -> None:
    """A split takes whole groups: products that share a title template (identical here, the
    hardest case) fall on one side together, so 600 held-out products are 30 products' worth of
    evidence. 300 clean nights of 1,000 products drawn one by one from the same marketplace, each
    against a fresh held-out split of 30 templates of 20 and the training products' inputs: the
    attribute baselines' design effect (estimated from the split's groups) keeps the run's alarms
    at 1 % (binomial bound as above); counted as if drawn one by one, nearly every night alarms."""
    rng = np.random.default_rng(11)
    size, templates = 20, 3_000
    pop = _population(rng, templates)
    target = _target(pop)
    pop = _variants(pop, size)
    groups = np.arange(templates * size) // size
    alarms, naive = 0, 0
    for run in range(300):
        chosen = rng.choice(templates, 30, replace=False)
        held = (chosen[:, None] * size + np.arange(size)).ravel()
        night = rng.choice(np.setdiff1d(np.arange(templates * size), held), 1_000, replace=False)
        attributes = {}
        for name, thresholds in THRESHOLDS.items():
            scores, labels = pop[name]  # type: ignore[misc]
            kind = KINDS[name]
            base = attribute_baseline(scores[held], labels[held], kind, thresholds, groups=groups[held])
            assert base is not None and base.design_effect > 1
            attributes[name] = base
        inputs = input_baseline(_inputs(pop, rng.choice(templates, 2_000, replace=False) * size))
        profile = HealthProfile(attributes, inputs)
        tally = _count(profile, pop, night)
        alarms += any(c.status == "failed" for c in assess(profile, tally, target=target))
        if run < 20:  # the same nights against the split counted one by one
            plain = {
                a: dataclasses.replace(b, design_effect=1.0, precision_design_effect=1.0)
                for a, b in attributes.items()
            }
            flat = HealthProfile(plain, inputs)
            naive += any(c.status == "failed" for c in assess(flat, _count(flat, pop, night), target=target))
    assert alarms < 10
    assert naive >= 15


def test_the_design_effect_of_a_split_drawn_in_groups_is_known_for_extreme_groups() -> None:
    """Every product of a group in one bin: the group size times ``k / (k - 1)`` for ``k`` groups
    (each bin's share between groups varies as the groups' own); bins drawn independently of the
    groups: about 1; no groups, or one bin: 1; large groups gathered in one bin: more than the mean
    group size a product is in."""
    from catalog_enrichment.health import cluster_design_effect

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(200), 10)
    alike = np.repeat(rng.integers(0, 4, 200), 10)
    assert cluster_design_effect(alike, groups) == pytest.approx(10 * 200 / 199)
    # the largest of four noisy estimates (200 groups): above 1.29 about one time in a hundred
    assert 1.0 <= cluster_design_effect(rng.integers(0, 4, 2_000), groups) < 1.4
    assert cluster_design_effect(alike, None) == 1.0
    assert cluster_design_effect(np.zeros(2_000, np.int64), groups) == 1.0
    # three groups of 1, 1 and 8 products, each in one bin: the estimate's own formula (bin 0 holds
    # a tenth of the products; its residual per group 0.9, -0.1, -0.8)
    uneven = np.repeat(np.arange(3), [1, 1, 8])
    expected = 3 / 2 * (0.9**2 + 0.1**2 + 0.8**2) / 10**2 / (0.1 * 0.9 / 10)
    assert cluster_design_effect(np.repeat([0, 1, 1], [1, 1, 8]), uneven) == pytest.approx(expected)
    # 20 templates of 50 products in bin 1 beside 2,000 single products in bin 0: the mean group
    # size a product is in is 17.3, the share of bin 1 varies as 20 products' worth would
    templates = np.concatenate([np.repeat(np.arange(20), 50), np.arange(20, 2_020)])
    gathered = np.concatenate([np.ones(1_000, np.int64), np.zeros(2_000, np.int64)])
    assert cluster_design_effect(gathered, templates) > (20 * 50**2 + 2_000) / 3_000
    assert cluster_design_effect(np.zeros(5, np.int64) + np.arange(5) % 2, np.zeros(5)) == 5.0


def test_the_precision_design_effect_of_bins_whose_values_were_all_right_is_their_mean_group_size() -> None:
    """A confidence bin of 20 templates' 10 alike values each, all right, shows no spread: its values
    count as 20 products' worth (design effect 10); a bin of 100 single products half right: 100 /
    99 (the between-group variance's small-sample factor); no groups: 1."""
    from catalog_enrichment.health.profile import _precision_design_effect

    bins = np.concatenate([np.full(200, 19), np.full(100, 12)])
    right = np.concatenate([np.ones(200, np.int64), np.arange(100) % 2])
    groups = np.concatenate([np.repeat(np.arange(20), 10), np.arange(20, 120)])
    assert _precision_design_effect(bins, right, groups) == pytest.approx(10.0)
    assert _precision_design_effect(bins[200:], right[200:], groups[200:]) == pytest.approx(100 / 99)
    assert _precision_design_effect(bins, right, None) == 1.0
    # the share right of one set of values (what the calibration bound divides its counts by)
    from catalog_enrichment.health import share_design_effect

    assert share_design_effect(right[:200].astype(bool), groups[:200]) == pytest.approx(10.0)
    assert share_design_effect(right[200:].astype(bool), groups[200:]) == pytest.approx(100 / 99)
    assert share_design_effect(right[:200].astype(bool), None) == 1.0


def test_a_text_only_model_s_runs_judge_no_photo() -> None:
    """A model that reads no photo does not decode one when scoring, so its runs count images as
    training did not; and a feed that drops its photos changes nothing it reads. Tonight every
    photo is gone: the image checks are skipped, saying why."""
    pop = _population(np.random.default_rng(5), 3_000)
    profile = _profile(pop, np.arange(2_000))
    pop["present"], pop["tones"] = [False] * 3_000, [None] * 3_000
    night = np.arange(2_000, 3_000)
    checks = assess(profile, _count(profile, pop, night), target=0.9, reads_images=False)
    photo = [c for c in checks if c.check.startswith("image")]
    assert [(c.check, c.status, c.message) for c in photo] == [
        ("image", "skipped", "the model reads no photo"),
        ("image_tone", "skipped", "the model reads no photo"),
    ]
    failed = [
        c.check for c in assess(profile, _count(profile, pop, night), target=0.9) if c.status == "failed"
    ]
    assert "image" in failed  # a model that reads the photo: the same night fails


def test_the_design_effect_is_the_mean_group_size_a_product_is_in_and_divides_the_statistic() -> None:
    from catalog_enrichment.health.profile import _design_effect

    assert _design_effect(np.array([0, 0, 0, 1])) == (3**2 + 1**2) / 4
    assert _design_effect(np.arange(5)) == 1.0 and _design_effect(None) == 1.0
    plain, _, _ = homogeneity([50, 50], [75, 25])
    assert homogeneity([50, 50], [75, 25], design_effect=2.5)[0] == pytest.approx(plain / 2.5)


def test_the_image_check_fails_on_photos_gone_missing_not_on_unusable_ones_the_quarantine_keeps_out() -> None:
    """Tonight 10 % of the products' photos cannot be decoded (quarantined and retried: the circuit
    breaker's to count), or 10 % come without a photo (scored from their text alone): only the second
    moves the share of scored products with a photo."""
    rng = np.random.default_rng(5)
    pop = _population(rng, 6_000)
    profile = _profile(pop, np.arange(3_000))
    night = np.arange(3_000, 4_000)

    def image_check(spoiled: dict[str, object]) -> str:
        checks = assess(profile, _count(profile, spoiled, night), target=_target(pop))
        return next(c.status for c in checks if c.check == "image")

    broken, missing = dict(pop), dict(pop)
    hit = set(rng.choice(night, 100, replace=False).tolist())
    broken["errors"] = ["image_decodable" if i in hit else e for i, e in enumerate(pop["errors"])]  # type: ignore[arg-type]
    missing["present"] = [p and i not in hit for i, p in enumerate(pop["present"])]  # type: ignore[arg-type]
    missing["errors"] = [None if i in hit else e for i, e in enumerate(pop["errors"])]  # type: ignore[arg-type]
    assert image_check(pop) == image_check(broken) == "passed"
    assert image_check(missing) == "failed"


def test_a_photo_is_present_where_the_scoring_would_read_one_and_an_empty_uri_is_none() -> None:
    """A feed that exports ``image_uri = ""`` has lost its photos: the products are scored from their
    text (``read_pixels`` reads nothing), and the image check must count them as without a photo."""
    from catalog_enrichment.data.images import read_pixels
    from catalog_enrichment.health import ProductInputs

    image = [None, None, None, b"", b"\xff"]
    uri = [None, "", "file:///x.jpg", None, ""]
    rows = pa.table({"title": ["t"] * 5, "image": pa.array(image, pa.binary()), "image_uri": uri})
    assert ProductInputs.of(rows, [None] * 5, [None] * 5).image_present == [False, False, True, True, True]
    assert read_pixels(None, "", 8) == (None, None, None)  # as read: no image at all
    # a model trained before counted an empty URI as a photo: its runs count as its baseline did,
    # or every night of a catalog with empty URIs would seem to have lost photos
    base = input_baseline(ProductInputs.of(rows, [None] * 5, [None] * 5))
    assert base.empty_uri_is_photo is False
    old = {k: v for k, v in vars(base).items() if k != "empty_uri_is_photo"}  # as such bundles hold it
    legacy = HealthProfile.from_dict({"version": HealthProfile.VERSION, "attributes": {}, "inputs": old})
    assert legacy is not None and legacy.inputs is not None and legacy.inputs.empty_uri_is_photo
    as_then = ProductInputs.of(rows, [None] * 5, [None] * 5, empty_uri_is_photo=True)
    assert as_then.image_present == [False, True, True, True, True]


def test_photos_gone_missing_fail_the_image_check_where_training_had_every_photo() -> None:
    """The CDN outage of a catalog whose training products all had a photo: a night of 1,000 products
    of which 300 come without one (and a small night of 60, all without) fails the image check and
    blocks every attribute; the same night with its photos passes."""
    rng = np.random.default_rng(7)
    pop = _population(rng, 6_000)
    pop["present"] = [True] * 6_000
    pop["errors"] = [None] * 6_000
    profile = _profile(pop, np.arange(3_000))
    modes = {"inputs": "block"}
    for night, gone in ((np.arange(3_000, 4_000), 300), (np.arange(4_000, 4_060), 60)):
        missing = dict(pop)
        hit = set(night[:gone].tolist())
        missing["present"] = [i not in hit for i in range(6_000)]
        missing["tones"] = [None if i in hit else t for i, t in enumerate(pop["tones"])]  # type: ignore[arg-type]
        checks = assess(profile, _count(profile, missing, night), target=_target(pop))
        image = next(c for c in checks if c.check == "image")
        assert image.status == "failed" and image.p_value is not None and image.p_value < 1e-10
        assert set(blocked_attributes(checks, modes, list(THRESHOLDS))) == set(THRESHOLDS)
        clean = assess(profile, _count(profile, pop, night), target=_target(pop))
        assert next(c for c in clean if c.check == "image").status == "passed"


def test_a_description_written_as_a_missing_value_counts_as_none() -> None:
    """A feed that writes ``nan`` (or ``<NA>``, ``N/A``, ``NULL``) for every missing description
    has none: the description check counts them so, at training and at night alike; a model
    trained before counted them as descriptions, and its runs count as its baseline did."""
    texts = ["nan", " N/A ", "<NA>", "NULL", "None", "-nan", "#N/A", "", None, "Cotton tee", "N/A brand"]
    rows = pa.table({"title": ["t"] * len(texts), "description": pa.array(texts, pa.string())})
    inputs = ProductInputs.of(rows, [None] * len(texts), [None] * len(texts))
    base = input_baseline(inputs)
    assert base.description == [9, 2] and base.missing_text_is_description is False
    tally = HealthTally()
    tally.add_inputs(base, inputs)
    assert tally.inputs is not None and tally.inputs.description == [9, 2]
    old = {
        k: v for k, v in vars(base).items() if k != "missing_text_is_description"
    }  # as such bundles hold it
    legacy = HealthProfile.from_dict({"version": HealthProfile.VERSION, "attributes": {}, "inputs": old})
    assert legacy is not None and legacy.inputs is not None and legacy.inputs.missing_text_is_description
    as_then = HealthTally()
    as_then.add_inputs(legacy.inputs, inputs)
    assert as_then.inputs is not None and as_then.inputs.description == [2, 9]


def test_every_mlflow_name_of_an_attribute_named_with_parentheses_is_one_mlflow_takes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """MLflow refuses a metric or tag name holding parentheses (among others): an attribute named
    ``size (EU)`` failed the run's whole MLflow logging. Every metric and tag the run logs for it
    is a name MLflow takes, the attribute still recognisable in it."""
    import datetime as dt
    from types import SimpleNamespace

    from mlflow.utils.validation import _validate_metric_name, _validate_tag_name

    from catalog_enrichment import registry
    from catalog_enrichment.catalog.reports import RunReport
    from catalog_enrichment.config import MLflowConfig
    from catalog_enrichment.contracts import mlflow_name
    from catalog_enrichment.enrich.checks import RunHealth
    from catalog_enrichment.enrich.run import EnrichOutcome, _log_mlflow

    name = "size (EU)"
    checks = [
        Check(
            name, "coverage", "failed", 500, 900, observed=0.2, expected=0.6, message="size (EU): coverage"
        ),
        Check(INPUT, "description", "passed", 500, 900, observed=0.9, expected=0.9),
    ]
    policy = SimpleNamespace(health=None)  # no profile: no plots
    health = RunHealth(checks, {name: "size (EU): coverage"}, {}, policy, HealthTally())  # type: ignore[arg-type]
    report = RunReport(
        run_id="r1",
        started_at=dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
        written_per_attribute={name: 3},
        coverage_per_attribute={name: 0.5},
    )
    logged: dict[str, object] = {}
    monkeypatch.setattr(registry, "log_enrichment_run", lambda _client, **kw: logged.update(kw) or "run")
    _log_mlflow(object(), MLflowConfig(), EnrichOutcome(report, health=health))  # type: ignore[arg-type]
    metrics, tags = logged["metrics"], logged["tags"]
    assert isinstance(metrics, dict) and isinstance(tags, dict)
    for key in [*health.metrics(), *metrics]:
        _validate_metric_name(key)
    for key in [*health.tags(), *tags]:
        _validate_tag_name(key)
    assert {"written_size _EU_", "coverage_size _EU_", "health_coverage_size _EU_"} <= set(metrics)
    assert tags["catalog_enrich.blocked.size _EU_"] == "size (EU): coverage"
    # only what MLflow refuses is replaced: two attributes in another script stay two names
    assert {mlflow_name("größe"), mlflow_name("grüße"), mlflow_name("颜色")} == {"größe", "grüße", "颜色"}
    _validate_metric_name(f"written_{mlflow_name('a/')}")  # MLflow refuses a path not normalised


def test_a_placeholder_the_scoring_found_counts_once_in_the_image_check() -> None:
    """The image check's photos: a product validation quarantined for a placeholder was never
    scored, so it is added as a quarantined photo; one the scoring found is added only where its
    counts were taken out of the tally (else the tally holds it already), and one read again for
    its photo never (it has one by that choice)."""
    from catalog_enrichment.enrich.stages import photos_quarantined

    quarantine = pa.table(
        {
            "product_id": ["before", "found", "retried", "broken"],
            "reasons": [["image_shared"], ["image_shared"], ["image_shared"], ["image_readable"]],
        }
    )
    scored = pa.table(
        {
            "product_id": ["found", "retried", "broken", "ok"],
            "image_error": ["image_shared", "image_shared", "image_readable", None],
        }
    )
    assert photos_quarantined(quarantine, scored, {"retried"}) == 2  # before, found
    assert photos_quarantined(quarantine, scored, {"retried"}, shared_counted=True) == 1  # before


def test_a_trained_version_s_baselines_are_counted_with_its_split_s_groups(quick_bundle: Path) -> None:
    """End to end: the generator's templated titles make groups of products, which the splits keep
    together, and the baselines a training stores are counted with them (were the groups lost on
    the way, every attribute's design effect would be exactly 1)."""
    from catalog_enrichment.inference.bundle import load_bundle

    health = load_bundle(quick_bundle).calibration.health
    assert health is not None
    effects = {a: b.design_effect for a, b in health.attributes.items()}
    assert max(effects.values()) > 1.5, effects
