"""The training loop: per-epoch metrics, determinism, calibrated output, clear errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from catalog_enrichment.calibration import wilson_upper
from catalog_enrichment.config import AppConfig, SyntheticConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.synthetic import products_batches
from catalog_enrichment.errors import CatalogEnrichError, ContractError, TaxonomyError
from catalog_enrichment.models.model import check_heads, head_specs
from catalog_enrichment.training.loop import train_and_calibrate, warmup_cosine
from catalog_enrichment.training.splits import stratified_splits
from tests.conftest import tiny_config


def _table(n: int, taxonomy: Taxonomy, seed: int = 0, size: int = 32) -> pa.Table:
    cfg = SyntheticConfig(products=n, seed=seed, image_size=size)
    return pa.Table.from_batches([b for b, _ in products_batches(cfg, taxonomy)])


def _cfg(fusion: str = "concat", epochs: int = 2) -> AppConfig:
    # a large calibration split: a value needs >= 52 straight hits there to prove 95 %
    return tiny_config(
        fusion=fusion,
        epochs=epochs,
        training={"learning_rate": 3e-3, "calibration_fraction": 0.3, "test_fraction": 0.15},
    )


def test_warmup_then_cosine() -> None:
    factors = [warmup_cosine(s, total=100, warmup=10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5, abs=0.02)
    assert factors[-1] < 0.01 and all(a >= b for a, b in itertools.pairwise(factors[10:]))


def test_splits_are_disjoint_reproducible_and_stratified(taxonomy: Taxonomy) -> None:
    from catalog_enrichment.data.dataset import encode_labels

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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_returns_metrics_is_deterministic_and_calibrates(taxonomy: Taxonomy) -> None:
    table = _table(1500, taxonomy)
    lines: list[str] = []
    one = train_and_calibrate(table, taxonomy, _cfg(epochs=4), progress=lines.append)
    two = train_and_calibrate(table, taxonomy, _cfg(epochs=4))
    assert [h.epoch for h in one.history] == [1, 2, 3, 4]
    assert one.history[-1].train_loss < one.history[0].train_loss
    assert any(line.startswith("epoch 4/4") for line in lines)  # progress is visible
    assert [h.val_mean_r_at_p95 for h in one.history] == [h.val_mean_r_at_p95 for h in two.history]
    assert one.calibration.to_dict() == two.calibration.to_dict()
    # what the thresholds write on the never-seen test split is not provably below 95 % precise
    # (a point estimate on a few dozen values is too noisy to assert >= 0.95 on its own)
    for attr in taxonomy:
        entry = one.test_report[attr.name]
        if entry["written"]:
            upper = float(wilson_upper(entry["written_correct"], entry["written"]))
            assert upper >= 0.95, (attr.name, entry["written_correct"], entry["written"])
    assert sum(one.test_report[a.name]["written"] for a in taxonomy) > 0


def test_too_few_rows_is_a_clear_error(taxonomy: Taxonomy) -> None:
    with pytest.raises(CatalogEnrichError, match="labelled products"):
        train_and_calibrate(_table(4, taxonomy), taxonomy, _cfg(epochs=1))


def test_label_values_outside_the_taxonomy_are_named(taxonomy: Taxonomy) -> None:
    table = _table(60, taxonomy)
    bad = table.set_column(
        table.schema.get_field_index("pattern"),
        "pattern",
        pa.array(["plaid-ish", *table["pattern"].to_pylist()[1:]]),
    )
    with pytest.raises(
        TaxonomyError, match=r"label column 'pattern' has values outside the taxonomy: \['plaid-ish'\]"
    ):
        train_and_calibrate(bad, taxonomy, _cfg(epochs=1))


def test_missing_label_column_is_named(taxonomy: Taxonomy) -> None:
    table = _table(60, taxonomy).drop_columns(["material"])
    with pytest.raises(ContractError, match=r"lacks label columns for attributes \['material'\]"):
        train_and_calibrate(table, taxonomy, _cfg(epochs=1))


def test_taxonomy_head_mismatch_is_named(taxonomy: Taxonomy, tmp_path: Path) -> None:
    heads = head_specs(taxonomy)
    other = Taxonomy.from_dict(
        {
            "attributes": {
                "color": {"kind": "multilabel", "values": ["red", "blue"]},
                "size": {"kind": "multiclass", "values": ["s", "m"]},
            }
        }
    )
    with pytest.raises(TaxonomyError) as info:
        check_heads(heads, other)
    message = str(info.value)
    assert "no head for attribute 'size'" in message
    assert "lacks attribute 'material'" in message
    assert "'color': model head is multilabel with 12 values, taxonomy says multilabel with 2" in message
    check_heads(heads, taxonomy)  # the same taxonomy passes
