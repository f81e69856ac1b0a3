"""The splits: disjoint, reproducible, stratified; variants of one product in one split or fold;
products only people labelled always train; the calibration data's size rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from catalog_enrichment.catalog.groups import variant_ids
from catalog_enrichment.config import SyntheticConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import EncodedLabels, encode_labels
from catalog_enrichment.data.synthetic import products_batches
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.training.splits import (
    MAX_GROUP,
    FoldPlan,
    calibration_fraction,
    crossfit_folds,
    group_folds,
    group_ids,
    split_labels,
    stratified_splits,
)

pytestmark = pytest.mark.timeout(120)


def _table(n: int, taxonomy: Taxonomy, seed: int = 0, size: int = 32) -> pa.Table:
    cfg = SyntheticConfig(products=n, seed=seed, image_size=size)
    return pa.Table.from_batches([b for b, _ in products_batches(cfg, taxonomy)])


def test_splits_are_disjoint_reproducible_and_stratified(taxonomy: Taxonomy) -> None:
    y = encode_labels(_table(800, taxonomy), taxonomy).stratification_matrix()
    a = stratified_splits(y, validation=0.1, calibration=0.15, test=0.15, seed=3)
    b = stratified_splits(y, validation=0.1, calibration=0.15, test=0.15, seed=3)
    parts = [a.train, a.validation, a.calibration, a.test]
    assert all(
        np.array_equal(p, q)
        for p, q in zip(parts, [b.train, b.validation, b.calibration, b.test], strict=True)
    )
    assert sorted(np.concatenate(parts).tolist()) == list(range(800))
    assert abs(a.test.size - 120) <= 3 and abs(a.calibration.size - 120) <= 3
    # every value common enough shows up in test at roughly its overall rate
    overall, test_rate = y.mean(axis=0), y[a.test].mean(axis=0)
    common = overall > 0.05
    assert np.all(np.abs(test_rate[common] - overall[common]) < 0.03)


def test_variants_that_share_a_title_or_a_description_are_one_group() -> None:
    # 0 and 1: the same text up to case and spaces; 2 shares 0's title with another description
    # (a colour variant whose text was edited); 3 shares 2's description under another title, so it
    # joins too (transitively); 4 shares nothing; 5 and 6 share an empty description only
    titles = ["Luna skinny RW", "luna  SKINNY rw", "Luna skinny RW", "Luna skinny", "Other", "A", "B"]
    descriptions = ["Soft denim", "soft denim ", "Stretch denim", "Stretch denim", None, "", None]
    assert group_ids(titles, descriptions).tolist() == [0, 0, 0, 0, 1, 2, 3]
    # the health checks' design effect: only the same title and description (an empty one too)
    assert variant_ids(titles, descriptions).tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert variant_ids(["Tee", " tee", "Tee"], [None, "", "Soft"]).tolist() == [0, 0, 1]


def test_a_template_text_does_not_chain_a_catalog_into_one_group() -> None:
    # 200 products in 50 variant groups of 4 (each group's own title); every product also carries
    # one of two boilerplate descriptions. Linked through those, all 200 would be one group: a
    # shared text joins groups only while the result stays within max_group products.
    titles = [f"product {i // 4}" for i in range(200)]
    descriptions = ["Ships in 2 days." if i % 2 else "A customer favourite." for i in range(200)]
    groups = group_ids(titles, descriptions, max_group=16)
    sizes = np.bincount(groups)
    assert sizes.max() <= 16
    # the variants (one title) always stay together, whatever the template joined
    for g in range(50):
        assert len(set(groups[4 * g : 4 * g + 4].tolist())) == 1
    # without the cap the two templates chain everything
    assert group_ids(titles, descriptions, max_group=200).max() == 0


def test_the_variants_a_full_group_leaves_out_still_group_together() -> None:
    # 64 variants share a description; the first is also titled "Basic Tee" as two other products
    # are. The rarer title joins first (3 products), so the description's group fills at 61 of its
    # variants: the 2 left over form a group of their own, not two singletons
    titles = ["Basic Tee"] + [f"Tee {i}" for i in range(1, 64)] + ["Basic Tee", "basic tee"]
    descriptions = ["Soft cotton tee."] * 64 + ["Organic cotton.", "Ribbed cotton."]
    assert group_ids(titles, descriptions).tolist() == [0] * 62 + [1, 1] + [0, 0]


def test_a_shared_title_without_a_description_is_held_by_the_cap() -> None:
    # no description: the same title alone, which the cap holds like any shared title
    groups = group_ids(["T-shirt"] * 200, [None] * 100 + [""] * 100)
    assert np.bincount(groups).tolist() == [MAX_GROUP, MAX_GROUP, MAX_GROUP, 200 - 3 * MAX_GROUP]
    # the same title and description are one group whatever their number
    assert group_ids(["T-shirt"] * 200, ["Plain."] * 200).max() == 0


def test_no_validation_split_leaves_every_product_to_train() -> None:
    # what the stack asks for: it stops nothing early and selects out of fold
    y = np.eye(4, dtype=np.int64)[np.arange(200) % 4]
    splits = stratified_splits(y, validation=0.0, calibration=0.0, test=0.0, seed=0)
    assert splits.train.tolist() == list(range(200))
    assert splits.validation.size == splits.calibration.size == splits.test.size == 0


def test_a_group_of_variants_never_spans_two_splits_or_folds(taxonomy: Taxonomy) -> None:
    y = encode_labels(_table(800, taxonomy), taxonomy).stratification_matrix()
    groups = np.arange(800) // 4  # 200 products with 4 variants each
    splits = stratified_splits(y, validation=0.1, calibration=0.15, test=0.15, seed=3, groups=groups)
    parts = [splits.train, splits.validation, splits.calibration, splits.test]
    assert sorted(np.concatenate(parts).tolist()) == list(range(800))
    owner = {}
    for name, part in enumerate(parts):
        for g in set(groups[part].tolist()):
            assert owner.setdefault(g, name) == name, f"group {g} is in two splits"
    # whole groups, still close to the asked sizes (20 and 30 groups of 4)
    assert abs(splits.test.size - 120) <= 8 and abs(splits.validation.size - 80) <= 8
    for fit_rows, fold_rows in group_folds(y[splits.train], groups[splits.train], 3, seed=0):
        assert not set(groups[splits.train][fit_rows].tolist()) & set(
            groups[splits.train][fold_rows].tolist()
        )
        assert fit_rows.size + fold_rows.size == splits.train.size


def test_no_test_split_when_tested_on_another_table(taxonomy: Taxonomy) -> None:
    y = encode_labels(_table(200, taxonomy), taxonomy).stratification_matrix()
    splits = stratified_splits(y, validation=0.1, calibration=0.2, test=0.0, seed=0)
    assert (
        splits.test.size == 0 and splits.train.size + splits.validation.size + splits.calibration.size == 200
    )


def test_products_only_people_labelled_train_and_never_calibrate_or_evaluate(taxonomy: Taxonomy) -> None:
    labels = encode_labels(_table(400, taxonomy), taxonomy)
    partial = np.zeros((400, len(taxonomy["color"].values)), np.int8)
    people = np.arange(0, 400, 10)  # 40 products whose labels are only verdicts
    partial[people, 0] = 1
    known = {a: k.copy() for a, k in labels.known.items()}
    for k in known.values():
        k[people] = False
    labels = dataclasses.replace(labels, known=known, partial={"color": partial})
    splits = split_labels(labels, validation=0.1, calibration=0.15, test=0.15, seed=3)
    assert set(people.tolist()) <= set(splits.train.tolist())
    held_out = np.concatenate([splits.validation, splits.calibration, splits.test])
    assert not set(people.tolist()) & set(held_out.tolist())
    assert sorted(np.concatenate([splits.train, held_out]).tolist()) == list(range(400))
    # each people-labelled product a variant of the next product (one group): those whose variant
    # is held out are left out, the others train
    groups = np.arange(400)
    groups[people] = people + 1
    grouped = split_labels(labels, validation=0.1, calibration=0.15, test=0.15, seed=3, groups=groups)
    held = set(np.concatenate([grouped.validation, grouped.calibration, grouped.test]).tolist())
    out = {int(p) for p in people if p + 1 in held}
    assert out and not out & set(grouped.train.tolist())
    assert set(people.tolist()) - out <= set(grouped.train.tolist())
    assert len(grouped.train) + len(held) == 400 - len(out)
    # a variant of a separate test table's product is left out too
    apart = split_labels(
        labels,
        validation=0.1,
        calibration=0.15,
        test=0.15,
        seed=3,
        groups=groups,
        held_groups=groups[people[:1]],
    )
    assert people[0] not in apart.train and set(people[1:].tolist()) - out <= set(apart.train.tolist())


def _one_column(kind: str) -> EncodedLabels:
    """300 products in 150 pairs of variants, 1 pair in 3 labelled with one value: a multi-label
    attribute of one value, or a multi-class one labelled with its first value only (the others
    unlabelled), one stratification column either way."""
    value = np.arange(300) // 2 % 3 == 0
    if kind == "multilabel":
        return EncodedLabels({"a": value[:, None].astype(np.float32)}, {"a": np.ones(300, bool)})
    return EncodedLabels({"a": np.where(value, 0, -1)}, {"a": value})


@pytest.mark.parametrize("kind", ["multilabel", "multiclass"])
def test_labels_of_one_column_split_and_fold_stratified(kind: str) -> None:
    labels = _one_column(kind)
    groups = np.arange(300) // 2
    assert labels.stratification_matrix().shape == (300, 1)
    value = labels.stratification_matrix()[:, 0]
    splits = split_labels(labels, validation=0.1, calibration=0.2, test=0.15, seed=3, groups=groups)
    parts = [splits.train, splits.validation, splits.calibration, splits.test]
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))
    for part, share in zip(parts, (0.55, 0.1, 0.2, 0.15), strict=True):
        assert abs(part.size - share * 300) <= 6  # whole pairs, near the asked share
        assert abs(value[part].mean() - 1 / 3) < 0.05  # a third of each split has the value
    folds = FoldPlan(splits.train, labels, groups, 3, seed=0).folds()
    assert sorted(np.concatenate([fold for _, fold in folds]).tolist()) == list(range(splits.train.size))
    for fit, fold in folds:
        assert not set(groups[splits.train][fit].tolist()) & set(groups[splits.train][fold].tolist())
        assert abs(value[splits.train][fold].mean() - 1 / 3) < 0.05


def test_too_few_groups_for_the_folds_or_the_splits_are_named_with_the_products() -> None:
    labels = _one_column("multilabel")
    with pytest.raises(
        CatalogEnrichError, match=r"300 labelled products in 3 groups .* too few for 5 cross-fit folds"
    ):
        FoldPlan(np.arange(300), labels, np.arange(300) % 3, 5, seed=0).folds()
    with pytest.raises(
        CatalogEnrichError, match=r"300 labelled products in 45 groups .* \(need at least 50 groups\)"
    ):
        split_labels(labels, validation=0.1, calibration=0.2, test=0.15, seed=0, groups=np.arange(300) % 45)
    with pytest.raises(CatalogEnrichError, match=r"^45 labelled products are too few .* 50 products"):
        stratified_splits(
            np.eye(3, dtype=np.int64)[np.arange(45) % 3], validation=0.1, calibration=0.2, test=0.15, seed=0
        )


def test_the_calibration_data_rules_have_known_answers() -> None:
    # cross-fitted (3 folds) below 10,000 labelled products, a held-out split from there on
    assert crossfit_folds(9_999, None) == 3 and crossfit_folds(10_000, None) == 0
    assert crossfit_folds(500, 0) == 0 and crossfit_folds(50_000, 5) == 5  # a configured count wins
    # a held-out split: 600 products, kept between 15 % and 30 % of the table
    assert calibration_fraction(3000, None) == pytest.approx(0.2)
    assert calibration_fraction(1000, None) == 0.3 and calibration_fraction(10_000, None) == 0.15
    assert calibration_fraction(3000, 0.25) == 0.25  # a configured share wins
