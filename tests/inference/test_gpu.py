"""The GPU path against the CPU's on the same bundle and products: runs where torch sees a CUDA
device (skipped elsewhere, CI included; ``tools/gpu/check.py`` is the same check on a real bundle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.inference.bundle import load_bundle
from catalog_enrichment.inference.predictor import BatchPredictor
from catalog_enrichment.metrics import decision_matrix

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def test_cuda_scores_and_decides_as_the_cpu_does(scoring_bundle: Path, incoming) -> None:  # type: ignore[no-untyped-def]
    """Float32 on both (no autocast, no TF32): every decision the same, scores within float32's
    reordering noise."""
    products = _titled(incoming)
    cpu = BatchPredictor(load_bundle(scoring_bundle)).score(products)
    bundle = load_bundle(scoring_bundle, device="cuda")
    cuda = BatchPredictor(bundle, device="cuda").score(products)
    _assert_same_decisions(bundle, cuda, cpu, atol=1e-4)


def _titled(incoming) -> pa.Table:  # type: ignore[no-untyped-def]
    """The first 300 incoming products that have a title and no image the check refuses (training's
    dataset stops on one)."""
    from catalog_enrichment.data.images import ImagePolicy, check_images

    products = read_table(incoming.products).slice(0, 300)
    titled = products.filter(pa.compute.invert(pa.compute.is_null(products["title"])))
    _, errors, _ = check_images(titled, ImagePolicy())
    return titled.filter(pa.array([e is None for e in errors]))


def _assert_same_decisions(bundle, got, expected, *, atol: float) -> None:  # type: ignore[no-untyped-def]
    """Scores within ``atol`` of each other, and every decision the bundle's thresholds make the same."""
    for attr in bundle.taxonomy:
        thresholds = bundle.calibration.thresholds(attr.name)
        np.testing.assert_allclose(got[attr.name], expected[attr.name], atol=atol)
        np.testing.assert_array_equal(
            decision_matrix(got[attr.name], attr.kind, thresholds),
            decision_matrix(expected[attr.name], attr.kind, thresholds),
        )


def test_cuda_neither_reads_nor_fills_the_embedding_store(scoring_bundle: Path) -> None:
    """The store's fingerprint names the CPU's encoders: a GPU's encodes, which differ in the last
    bits, are never stored under it, nor are stored vectors fused on the GPU."""
    from catalog_enrichment.inference.options import PredictorOptions

    bundle = load_bundle(scoring_bundle, device="cuda")
    assert bundle.encoder_fingerprint is not None
    on = PredictorOptions(embedding_store=True)
    assert BatchPredictor(load_bundle(scoring_bundle), options=on).width > 0
    assert BatchPredictor(bundle, device="cuda", options=on).width == 0


def test_cuda_held_out_scores_are_the_predictors(scoring_bundle: Path, incoming) -> None:  # type: ignore[no-untyped-def]
    """The scores training calibrates on (``evaluation.predict``) are those the job's predictor gives
    the same products on the same GPU: both in full float32 (``full_float32``), neither in TF32."""
    import torch
    from torch.utils.data import DataLoader

    from catalog_enrichment.data.dataset import Collator, ProductDataset, ProductRecords
    from catalog_enrichment.training.evaluation import predict

    products = _titled(incoming)
    bundle = load_bundle(scoring_bundle, device="cuda")
    served = BatchPredictor(bundle, device="cuda").score(products)
    records = ProductRecords.from_arrow(products)
    loader = DataLoader(
        ProductDataset(records, np.arange(len(records)), preprocessing=bundle.preprocessing),
        batch_size=128,
        collate_fn=Collator(bundle.tokenizer, bundle.model_config.text.max_length),
    )
    held_out = predict(bundle.model, loader, torch.device("cuda")).probs
    _assert_same_decisions(bundle, held_out, served, atol=1e-5)
