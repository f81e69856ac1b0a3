"""The realized-precision audit: known answers, and intervals that contain the truth as often as
they claim (a simulation with a computed margin)."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from catalog_enrichment.catalog.base import keyed_schema
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.review.audit import BELOW, MEETS, audit_sample, format_audit, weighted_precision
from catalog_enrichment.review.sample import NO_CATEGORY, stratified_sample

T0 = dt.datetime(2026, 11, 2, tzinfo=dt.UTC)


def test_weighted_precision_weights_each_verdict_by_its_cells_population() -> None:
    # cell A: 90 written, 3 judged (2 right) -> 30 each; cell B: 10 written, 2 judged (0 right) -> 5 each
    cells = [("a", "X")] * 3 + [("b", "X")] * 2
    right = np.array([True, True, False, False, False])
    p, lower, upper, n_eff, share = weighted_precision(
        cells, right, {("a", "X"): 90, ("b", "X"): 10}, {"a": 90, "b": 10}, 100, confidence=0.95
    )
    assert p == pytest.approx(60 / 100)
    assert share == 1.0 and lower < p < upper
    kish = 100**2 / (3 * 30**2 + 2 * 5**2)  # 3.64
    # stratified: cell A's weight 0.9, its variance 1/3 over 3 judged, finite-population corrected
    stratified = 0.6 * 0.4 / (0.9**2 * (1 / 3) / 3 * (1 - 3 / 90))  # 2.76
    assert n_eff == pytest.approx(min(kish, stratified))


def test_a_cell_nobody_judged_is_represented_by_its_values_other_cells() -> None:
    # value a: 60 in X (judged: all right), 40 in Y (nobody judged) -> a is 100 % right, weight 100
    # value b: 100 in X, 1 of 2 judged right -> 50 %; attribute 200 written -> 75 %
    cells = [("a", "X")] * 2 + [("b", "X")] * 2
    p, *_, share = weighted_precision(
        cells,
        np.array([True, True, True, False]),
        {("a", "X"): 60, ("b", "X"): 100},
        {"a": 100, "b": 100},
        200,
        confidence=0.95,
    )
    assert p == pytest.approx(0.75) and share == pytest.approx(160 / 200)


def test_a_category_is_estimated_over_its_own_cells() -> None:
    """Shoes: value a 100 written (30 judged, all wrong), value b 1,000 (30 judged, all right); a's
    9,000 hats nobody judged are not shoes: shoes are 1,000 / 1,100 right (a's hats once weighted its
    shoes 91 times up, to 0.10). Value c's 400 shoes nobody judged: 1,100 of the 1,500 shoes are in
    cells judged (the attribute's share, 1,100 / 10,500, is not the category's)."""
    cells = [("a", "shoes")] * 30 + [("b", "shoes")] * 30
    right = np.array([False] * 30 + [True] * 30)
    sizes = {("a", "shoes"): 100, ("b", "shoes"): 1000, ("a", "hats"): 9000, ("c", "shoes"): 400}
    p, *_, share = weighted_precision(
        cells,
        right,
        sizes,
        {"a": 9100, "b": 1000, "c": 400},
        10500,
        confidence=0.95,
        domain=np.ones(60, bool),
    )
    assert p == pytest.approx(1000 / 1100) and share == pytest.approx(1100 / 1500)


def _population(rng: np.random.Generator, worse: float = 0.0) -> dict[str, list]:
    """4,000 written values of two attributes; rare values and one category are worse (all of them
    by ``worse``)."""
    n = 4000
    attribute = rng.choice(["color", "pattern"], size=n)
    value = rng.choice(["v0", "v1", "v2", "v3"], size=n, p=[0.6, 0.25, 0.1, 0.05])
    category = rng.choice(["X", "Y", NO_CATEGORY], size=n, p=[0.6, 0.3, 0.1])
    precision = {"v0": 0.98, "v1": 0.93, "v2": 0.85, "v3": 0.7}
    right = np.array(
        [
            rng.random() < precision[v] - worse - (0.08 if c == "Y" else 0)
            for v, c in zip(value, category, strict=True)
        ]
    )
    return {"attribute": list(attribute), "value": list(value), "category": list(category), "right": right}


def _sample_tables(
    pop: dict[str, list], size: int, seed: int, judged_share: float = 1.0
) -> tuple[pa.Table, pa.Table]:
    """What ``review sample`` + ``review import`` would store: the sample rows and the verdicts."""
    a, v, c = pop["attribute"], pop["value"], pop["category"]
    picked = stratified_sample(a, v, c, size, seed)
    cells, values, attrs = Counter(zip(a, v, c, strict=True)), Counter(zip(a, v, strict=True)), Counter(a)
    sampled = Counter((a[i], v[i], c[i]) for i in picked)
    rng = np.random.default_rng(seed + 10_000)
    samples, reviews = [], []
    for i in picked.tolist():
        key = (a[i], v[i], c[i])
        row = {
            "sample_id": "s1", "product_id": f"p{i}", "attribute": a[i], "value": v[i],
            "category": None if c[i] == NO_CATEGORY else c[i], "confidence": 0.9, "model_name": "m",
            "model_version": "1", "run_id": "r", "stratum_size": cells[key], "stratum_sampled": sampled[key],
            "value_size": values[key[:2]], "attribute_size": attrs[a[i]], "drawn_at": T0,
        }  # fmt: skip
        samples.append(row)
        if rng.random() < judged_share:
            reviews.append(
                {
                    **{k: row[k] for k in ("sample_id", "product_id", "attribute", "value", "model_version")},
                    "verdict": "yes" if pop["right"][i] else "no",
                    "reviewer": "r1",
                    "reviewed_at": T0,
                    "source_file": "f.csv",
                    "imported_at": T0,
                }
            )
    return (
        pa.Table.from_pylist(samples, schema=keyed_schema("review_samples")),
        pa.Table.from_pylist(reviews, schema=keyed_schema("reviews")),
    )


def _audit(samples: pa.Table, reviews: pa.Table, model_version: str = "1", **kw) -> object:
    return audit_sample(
        samples,
        reviews,
        model_version=model_version,
        sample_id=None,
        target_of=lambda _name, _version: 0.95,
        confidence=0.95,
        min_support=30,
        **kw,
    )


@pytest.mark.slow
def test_the_intervals_contain_the_true_precision_at_least_as_often_as_they_claim() -> None:
    """300 samples of 400 from one population (balanced strata, so rare, worse values are
    oversampled ~4x): a 95 % interval must contain the true precision of everything written in at
    least 0.95 - 3 sd of the draws, sd = sqrt(0.95 * 0.05 / 300) = 0.0126 -> 0.912 (per attribute).
    The unweighted share of "yes" verdicts would miss far more often: it is checked to be biased."""
    pop = _population(np.random.default_rng(1))
    truth = {
        attr: float(np.mean([r for a, r in zip(pop["attribute"], pop["right"], strict=True) if a == attr]))
        for attr in ("color", "pattern")
    }
    inside, naive = Counter(), {attr: [] for attr in truth}
    for seed in range(300):
        samples, reviews = _sample_tables(pop, 400, seed)
        audit = _audit(samples, reviews)
        for attr, e in audit.attributes.items():
            inside[attr] += e.lower <= truth[attr] <= e.upper
            naive[attr].append(e.right / e.judged)
    for attr in truth:
        assert inside[attr] / 300 >= 0.912, (attr, inside[attr])
        assert np.mean(naive[attr]) < truth[attr] - 0.02  # oversampled bad values drag it down


def test_the_audit_flags_an_attribute_whose_upper_bound_is_below_target() -> None:
    pop = _population(np.random.default_rng(2), worse=0.1)
    samples, reviews = _sample_tables(pop, 600, 0)
    audit = _audit(samples, reviews)
    assert set(audit.attributes) == {"color", "pattern"}
    for e in audit.attributes.values():  # true precision ~0.84: below 95 %, every judged value counted
        assert e.judged == e.sampled and e.status == BELOW and e.upper < 0.95
    assert audit.failed == ["color", "pattern"]
    # the rollback named is of the model that wrote the sample, whatever the config's model is
    rollback = f"rollback --model-version 1 --set mlflow.registered_model={audit.model_name}`"
    assert "FAILED" in format_audit(audit) and rollback in format_audit(audit)
    # a category is reported once it has 30 verdicts
    judged = Counter(r["category"] or "(none)" for r in samples.to_pylist() if r["attribute"] == "color")
    cats = audit.categories["color"]
    assert set(cats) == {c for c, n in judged.items() if n >= 30}
    assert sum(c.judged for c in cats.values()) <= audit.attributes["color"].judged
    assert sum(c.population for c in cats.values()) <= audit.attributes["color"].population
    # a version whose values are all right meets the target
    good = reviews.set_column(
        reviews.schema.get_field_index("verdict"), "verdict", pa.array(["yes"] * reviews.num_rows)
    )
    assert all(e.status == MEETS for e in _audit(samples, good).attributes.values())


def test_unreviewed_and_unsure_values_are_left_out_not_counted_wrong() -> None:
    pop = _population(np.random.default_rng(3))
    samples, reviews = _sample_tables(pop, 300, 0, judged_share=0.5)
    unsure = reviews.set_column(
        reviews.schema.get_field_index("verdict"),
        "verdict",
        pa.array(["unsure", *reviews["verdict"].to_pylist()[1:]]),
    )
    audit = _audit(samples, unsure)
    assert sum(e.judged + e.unsure for e in audit.attributes.values()) == reviews.num_rows
    assert sum(e.sampled for e in audit.attributes.values()) == 300


def test_an_audit_without_sample_or_verdicts_says_what_to_do() -> None:
    pop = _population(np.random.default_rng(4))
    samples, reviews = _sample_tables(pop, 50, 0)
    with pytest.raises(CatalogEnrichError, match="no review sample for model version 7"):
        _audit(samples, reviews, model_version="7")
    with pytest.raises(CatalogEnrichError, match=r"no verdict yet.*review import"):
        _audit(samples, reviews.slice(0, 0))


def test_a_version_audit_passes_over_samples_of_a_single_run_of_it() -> None:
    """A sample drawn with --run-id counts one run's values in its strata: a later one of those does
    not stand in for the version's sample; alone, it is named, not audited as the version."""
    pop = _population(np.random.default_rng(5))
    samples, reviews = _sample_tables(pop, 60, 0)
    run_id = "review-v1-20261124T080000Z-s0-r0a1b2c"
    later = pc.add(samples["drawn_at"], pa.scalar(dt.timedelta(days=1)))

    def renamed(table: pa.Table) -> pa.Table:
        return table.set_column(
            table.schema.get_field_index("sample_id"), "sample_id", pa.array([run_id] * table.num_rows)
        )

    run_samples = renamed(samples).set_column(samples.schema.get_field_index("drawn_at"), "drawn_at", later)
    run_samples, run_reviews = run_samples.cast(samples.schema), renamed(reviews).cast(reviews.schema)
    both = pa.concat_tables([samples, run_samples]), pa.concat_tables([reviews, run_reviews])
    assert _audit(*both).sample_id == "s1"
    assert _audit(*both, model_version=None).sample_id == "s1"  # nor for any version
    for version in ("1", None):
        with pytest.raises(CatalogEnrichError, match=f"only of single runs \\({run_id}\\)"):
            _audit(run_samples, run_reviews, model_version=version)
    # audited by its id, it judges its run: a failure names that run's rollback, not the version's
    audit = audit_sample(
        *both, model_version=None, sample_id=run_id, target_of=lambda _n, _v: 0.999, confidence=0.95,
        min_support=30,
    )  # fmt: skip
    assert audit.run_id == "r" and audit.failed and audit.to_dict()["run_id"] == "r"
    said = format_audit(audit)
    assert "(run r alone)" in said and "rollback --run-id r`" in said and "--model-version" not in said


def test_the_audit_benchmark_counts_intervals_that_hold_the_truth(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from catalog_enrichment.bench.audit import format_audit_markdown, run_audit_benchmark
    from catalog_enrichment.contracts import Taxonomy
    from tests.review.conftest import COLORS, PATTERNS, written_catalog

    written = written_catalog(tmp_path / "lake", products=300)
    taxonomy = Taxonomy.from_dict(
        {
            "attributes": {
                "color": {"kind": "multilabel", "values": [*COLORS, "purple"]},
                "pattern": {"kind": "multiclass", "values": [*PATTERNS, "floral"]},
            }
        }
    )
    truth: dict[str, dict[str, object]] = {}
    for (pid, attr, value), right in written.truth.items():
        wrong = "purple" if attr == "color" else "floral"
        truth.setdefault(pid, {})[attr] = (
            [value if right else wrong] if attr == "color" else (value if right else wrong)
        )
    ids = sorted(truth)
    table = pa.table(
        {
            "product_id": ids,
            "true_color": pa.array([truth[p].get("color") for p in ids], pa.list_(pa.string())),
            "true_pattern": pa.array([truth[p].get("pattern") for p in ids], pa.string()),
        }
    )
    result = run_audit_benchmark(
        written.catalog, table, taxonomy, size=100, seeds=3, balances=[0.5], confidence=0.95, target=0.95
    )
    assert result["true_precision"] == pytest.approx(
        {a: written.true_precision(a) for a in ("color", "pattern")}
    )
    counts = result["balances"]["0.5"]
    assert set(counts["inside"]) == {"color", "pattern"} and all(
        0 <= n <= 3 for n in counts["inside"].values()
    )
    assert written.catalog.keyed_rows("review_samples").num_rows == 0  # nothing recorded
    assert "| 0.5 |" in format_audit_markdown(result)


def test_a_derived_attribute_is_sampled_and_audited_at_its_own_level(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Colour families written beside shades (issue 52): the sample draws them as an attribute of
    their own, stratified by family; the audit judges them against their own population. A wrong
    shade of the right family is a right family, so the family level is more precise than the
    shade level; each interval contains its level's known precision."""
    import pyarrow.csv as pcsv

    from catalog_enrichment.catalog.reviews import import_verdicts
    from catalog_enrichment.review.sample import draw_sample
    from tests.review.conftest import written_catalog

    families = {"black": "dark", "white": "light", "red": "warm", "blue": "cool", "green": "cool"}
    written = written_catalog(tmp_path / "lakehouse", families=families)
    catalog, truth = written.catalog, written.truth
    assert written.true_precision("color_family") > written.true_precision("color") + 0.03
    drawn = draw_sample(catalog, model_version="3", size=450, seed=2)
    rows = drawn.rows.to_pylist()
    family_rows = [r for r in rows if r["attribute"] == "color_family"]
    population = Counter(v for (_, a, v) in truth if a == "color_family")
    assert len(family_rows) >= 100 and {r["value"] for r in family_rows} == set(population)
    assert all(r["attribute_size"] == sum(population.values()) for r in family_rows)
    assert all(r["value_size"] == population[r["value"]] for r in family_rows)

    verdicts = pa.table(
        {
            **{c: [r[c] for r in rows] for c in ("sample_id", "product_id", "attribute", "value")},
            "verdict": [
                "yes" if truth[(r["product_id"], r["attribute"], r["value"])] else "no" for r in rows
            ],
            "reviewer": ["ana"] * len(rows),
            "reviewed_at": ["2026-11-03T10:00:00Z"] * len(rows),
        }
    )
    pcsv.write_csv(verdicts, tmp_path / "verdicts.csv")
    imported = import_verdicts(catalog, tmp_path / "verdicts.csv", now=T0 + dt.timedelta(days=2))
    assert imported.inserted == len(rows)
    audit = audit_sample(
        catalog.keyed_rows("review_samples"),
        catalog.keyed_rows("reviews"),
        model_version="3",
        sample_id=None,
        target_of=lambda _name, _version: 0.95,
        confidence=0.95,
        min_support=30,
    )
    assert set(audit.attributes) == {"color", "pattern", "color_family"}
    family = audit.attributes["color_family"]
    assert family.population == sum(population.values()) and family.judged == len(family_rows)
    for attr, e in audit.attributes.items():
        assert e.lower is not None and e.upper is not None
        assert e.lower <= written.true_precision(attr) <= e.upper, (attr, e)
    assert "color_family" in format_audit(audit)
