"""The papers' training techniques end to end on tiny models: confident-learning noise pruning
(001 §3.2.1) and ensembles (001 §3.4)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from catalog_enrichment.config import SyntheticConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import EncodedLabels, encode_labels
from catalog_enrichment.data.synthetic import products_batches
from catalog_enrichment.inference.bundle import load_bundle
from catalog_enrichment.inference.predictor import BatchPredictor, PredictorOptions
from catalog_enrichment.models.model import EnsembleModel, combine_members
from catalog_enrichment.training.noise import find_label_issues
from catalog_enrichment.training.pipeline import train
from tests.conftest import save_trained, tiny_config


def _labels(taxonomy: Taxonomy, pattern: list[int]) -> EncodedLabels:
    n = len(pattern)
    targets: dict[str, np.ndarray] = {}
    known: dict[str, np.ndarray] = {}
    for attr in taxonomy:
        if attr.kind == "multilabel":
            targets[attr.name] = np.zeros((n, len(attr.values)), np.float32)
            known[attr.name] = np.zeros(n, bool)
        else:
            targets[attr.name] = np.full(n, -1, np.int64)
            known[attr.name] = np.zeros(n, bool)
    targets["pattern"] = np.array(pattern, np.int64)
    known["pattern"] = targets["pattern"] >= 0
    return EncodedLabels(targets, known)


def _no_forking(*args: object, **kwargs: object) -> None:
    raise AssertionError("a process pool forked the (threaded) training process")


def test_cleanlab_ranks_the_labels_the_model_contradicts_first_and_caps_the_share(
    taxonomy: Taxonomy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # in this process: cleanlab's default pool forks it with Spark's and torch's threads running,
    # and a forked worker can wait for ever on a lock one of them held (seen in make test)
    monkeypatch.setattr(multiprocessing, "Pool", _no_forking)
    rng = np.random.default_rng(0)
    n = 200
    truth = rng.integers(0, 6, n)
    given = truth.copy()
    flipped = np.arange(0, n, 10)  # 20 labels (10 %) flipped to another value
    given[flipped] = (truth[flipped] + 1) % 6
    given[7] = -1  # an unlabelled product is never pruned
    probs = {a.name: np.full((n, len(a.values)), 1 / len(a.values), np.float32) for a in taxonomy}
    confident = np.full((n, 6), 0.02, np.float32)
    confident[np.arange(n), truth] = 0.9  # the out-of-fold model knows the truth
    confident[flipped, truth[flipped]] = np.linspace(0.9, 0.6, flipped.size)  # less sure further on
    confident /= confident.sum(axis=1, keepdims=True)
    probs["pattern"] = confident
    issues = find_label_issues(probs, _labels(taxonomy, given.tolist()), taxonomy, fraction=0.05)
    # the cap: 5 % of the 199 labelled products -> 9, the most confidently contradicted first
    assert issues.labelled["pattern"] == 199 and issues.flagged["pattern"] == 20
    assert issues.positions["pattern"].tolist() == flipped[:9].tolist()
    # a fraction above the flagged share removes only what cleanlab flags
    issues = find_label_issues(probs, _labels(taxonomy, given.tolist()), taxonomy, fraction=0.5)
    assert sorted(issues.positions["pattern"].tolist()) == flipped.tolist()
    assert all(issues.positions[a.name].size == 0 for a in taxonomy if a.name != "pattern")
    # pruning makes exactly those labels unknown, in the full label set the rows map into
    labels = _labels(taxonomy, given.tolist())
    rows = np.arange(n) + 5
    full = _labels(taxonomy, [0] * 5 + given.tolist())
    verdicts = np.zeros((n + 5, 6), np.int8)
    verdicts[7 + 5, 2], verdicts[7 + 5, 4] = 1, -1  # people's verdicts on the unlabelled product
    full = EncodedLabels(full.targets, full.known, {"pattern": verdicts})
    pruned = issues.prune(full, rows)
    assert np.flatnonzero(~pruned.known["pattern"]).tolist() == sorted([*(flipped + 5), 7 + 5])
    assert (pruned.targets["pattern"][flipped + 5] == -1).all()
    assert pruned.partial["pattern"] is verdicts  # they still teach the model
    table = issues.table(taxonomy, labels, probs, [f"p{i}" for i in range(n)])
    first = table.iloc[0]
    assert first["product_id"] == "p0" and first["attribute"] == "pattern" and first["rank"] == 1
    assert first["given"] == taxonomy["pattern"].values[given[0]]
    assert first["model_top"] == taxonomy["pattern"].values[truth[0]]


def test_multilabel_label_issues_come_from_cleanlab_too(
    taxonomy: Taxonomy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multiprocessing, "Pool", _no_forking)  # as above
    rng = np.random.default_rng(1)
    n, v = 300, len(taxonomy["color"].values)
    truth = np.zeros((n, v), np.float32)
    truth[np.arange(n), rng.integers(0, v, n)] = 1
    given = truth.copy()
    flipped = np.arange(0, n, 15)
    given[flipped] = np.roll(truth[flipped], 3, axis=1)
    labels = _labels(taxonomy, [-1] * n)
    labels.targets["color"][:] = given  # type: ignore[index]
    labels.known["color"][:] = True  # type: ignore[index]
    probs = {a.name: np.full((n, len(a.values)), 0.1, np.float32) for a in taxonomy}
    probs["color"] = np.where(truth > 0, 0.95, 0.03).astype(np.float32)
    issues = find_label_issues(probs, labels, taxonomy, fraction=0.1)
    assert sorted(issues.positions["color"].tolist()) == flipped.tolist()


def _noisy_marketplace(n: int, taxonomy: Taxonomy) -> tuple[pa.Table, pa.Table]:
    batches = list(
        products_batches(SyntheticConfig(products=n, seed=4, image_size=32, label_noise=0.2), taxonomy)
    )
    return pa.Table.from_batches([b for b, _ in batches]), pa.Table.from_batches([t for _, t in batches])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_noise_pruning_leaves_out_mostly_flipped_labels_before_the_final_training(taxonomy: Taxonomy) -> None:
    table, truth = _noisy_marketplace(1200, taxonomy)
    cfg = tiny_config(
        epochs=3,
        training={
            "noise_pruning": {"enabled": True, "fraction": 0.1},
            "selection_metric": "average_precision",
        },
    )
    lines: list[str] = []
    trained = train(table, taxonomy, cfg, progress=lines.append)
    summary = next(line for line in lines if line.startswith("noise pruning: color"))
    assert "; validation " in summary  # the labels epochs are selected on are pruned too
    assert any(line.startswith("epoch 1/3") and "val AP" in line for line in lines)
    removed = trained.label_issues
    assert removed is not None and len(removed) > 0
    # every removed label belongs to a training-split product, at most 10 % per attribute
    per_attribute = removed.groupby("attribute").size()
    assert (per_attribute <= 0.1 * trained.splits.train.size + 1).all()
    # precision of the removed set against the injected flips: 20 % of the labels were flipped, so
    # ~210 labels picked at random would be right 20 % +- 2.8 points (one sigma); 3 sigma above is 0.28
    ids = table["product_id"].to_pylist()
    given = encode_labels(table, taxonomy)
    clean = encode_labels(
        truth.select([f"true_{a.name}" for a in taxonomy]).rename_columns([a.name for a in taxonomy]),
        taxonomy,
    )
    row = {pid: i for i, pid in enumerate(ids)}
    hits = []
    for pid, attr in zip(removed["product_id"], removed["attribute"], strict=True):
        i = row[pid]
        hits.append(not np.array_equal(given.targets[attr][i], clean.targets[attr][i]))
    assert len(hits) > 150 and np.mean(hits) > 0.28, (len(hits), np.mean(hits))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_ensemble_is_calibrated_saved_and_served_as_one_model(taxonomy: Taxonomy, tmp_path: Path) -> None:
    table, _ = _noisy_marketplace(800, taxonomy)
    cfg = tiny_config(
        epochs=1, model={"ensemble": {"members": 2, "fusions": ["concat", "text_only"], "combine": "vote"}}
    )
    trained = train(table, taxonomy, cfg)
    assert isinstance(trained.model, EnsembleModel)
    assert list(trained.test_report.members) == ["1:concat", "2:text_only"]
    bundle = load_bundle(save_trained(trained, tmp_path / "ensemble"))
    assert isinstance(bundle.model, EnsembleModel) and bundle.model_config.ensemble.members == 2
    frame = table.slice(0, 40).to_pandas()
    predictor = BatchPredictor(bundle, PredictorOptions(batch_size=64))
    served = predictor.score(frame)
    # one forward pass per member inside the predictor, combined by vote
    (batch,) = list(predictor.prepared(frame))
    with torch.inference_mode():
        members = [m(batch.inputs).probs for m in bundle.model.member_models]
        trained.model.eval()
        in_memory = trained.model(batch.inputs).probs
    for attr in taxonomy:
        combined = combine_members([m[attr.name] for m in members], attr.kind, "vote").numpy()
        assert np.allclose(served[attr.name], combined, atol=1e-6)
        assert np.allclose(served[attr.name], in_memory[attr.name].numpy(), atol=1e-6)
