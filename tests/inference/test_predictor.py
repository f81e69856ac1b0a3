"""The per-batch predictor, without Spark: scores, image problems, batching, tokenization."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.data.dataset import Collator, ProductDataset, ProductRecords
from catalog_enrichment.data.images import (
    IMAGE_DECODABLE,
    IMAGE_READABLE,
    IMAGE_URI_ALLOWED,
    ImagePolicy,
    check_images,
)
from catalog_enrichment.errors import ContractError
from catalog_enrichment.inference.bundle import load_bundle
from catalog_enrichment.inference.decide import DecisionPolicy
from catalog_enrichment.inference.predictor import BatchPredictor, PredictorOptions
from catalog_enrichment.inference.spark import decide_batch
from catalog_enrichment.training.evaluation import predict

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bundle(quick_bundle: Path):  # type: ignore[no-untyped-def]
    return load_bundle(quick_bundle)


@pytest.fixture(scope="module")
def products(incoming) -> pa.Table:  # type: ignore[no-untyped-def]
    return read_table(incoming.products).slice(0, 300)


@pytest.mark.slow
def test_scores_equal_the_training_loops_and_do_not_depend_on_batching(bundle, products) -> None:  # type: ignore[no-untyped-def]
    titled = products.filter(pa.compute.invert(pa.compute.is_null(products["title"])))
    # training's loop never sees an image the check refuses (its dataset stops on one)
    _, errors, _ = check_images(titled, ImagePolicy())
    good = titled.filter(pa.array([e is None for e in errors]))
    records = ProductRecords.from_arrow(good)
    loader = DataLoader(
        ProductDataset(records, np.arange(len(records)), preprocessing=bundle.preprocessing),
        batch_size=64,
        collate_fn=Collator(bundle.tokenizer, bundle.model_config.text.max_length),
    )
    expected = predict(bundle.model, loader, torch.device("cpu")).probs
    for batch_size, threads in ((128, 2), (7, 1), (1000, 3)):
        got = BatchPredictor(
            bundle, PredictorOptions(batch_size=batch_size, decode_threads=threads)
        ).score_arrow(good)
        for attr in bundle.taxonomy.names:
            # padding differs with the batch composition; scores may move in the last float bits
            np.testing.assert_allclose(got.probs[attr], expected[attr], atol=1e-5)
    # pandas in, same answer
    frame_scores = BatchPredictor(bundle).score(good.to_pandas())
    np.testing.assert_allclose(frame_scores["color"], expected["color"], atol=1e-5)


def _image_rows(products: pa.Table, tmp_path: Path) -> pa.Table:
    """One row per kind of image: good inline, corrupt, truncated, empty, none, good by URI, missing."""
    good_image = next(b for b in products["image"].to_pylist() if b)
    image_file = tmp_path / "ok.jpg"
    image_file.write_bytes(good_image)
    return pa.table(
        {
            "product_id": ["ok", "corrupt", "truncated", "empty", "none", "uri-ok", "uri-missing"],
            "title": ["red cotton shirt"] * 7,
            "description": [None] * 7,
            "image": [
                good_image,
                b"\xff\xd8\xff\xe0junk",
                good_image[: len(good_image) // 2],
                b"",
                None,
                None,
                None,
            ],
            "image_uri": [None, None, None, None, None, f"file://{image_file}", str(tmp_path / "gone.jpg")],
        }
    )


@pytest.mark.slow
def test_image_problems_are_reported_per_row_never_silently_scored(bundle, products, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = _image_rows(products, tmp_path)
    policy = ImagePolicy(roots=(str(tmp_path),))
    scores = BatchPredictor(bundle, PredictorOptions(batch_size=3, image_policy=policy)).score_arrow(rows)
    assert scores.image_error == [
        None,
        IMAGE_DECODABLE,
        IMAGE_DECODABLE,
        IMAGE_DECODABLE,
        None,  # no image at all: scored as an imageless product
        None,
        IMAGE_READABLE,
    ]
    # the same image inline or by URI scores the same
    np.testing.assert_allclose(scores.probs["color"][0], scores.probs["color"][5], atol=1e-6)
    assert scores.probs["color"].shape == (7, len(bundle.taxonomy["color"].values))
    # without a policy naming the folder, no URI is read at all
    assert BatchPredictor(bundle).score_arrow(rows).image_error[5:] == [IMAGE_URI_ALLOWED] * 2
    # the pyfunc's frame: those products get no scores (NaN), never an imageless product's
    frame = BatchPredictor(bundle).score_frame(rows.to_pandas())
    assert frame.notna().all(axis=1).tolist() == [True, False, False, False, True, False, False]
    assert frame.iloc[[1, 2, 3, 5, 6]].isna().all(axis=None)


@pytest.mark.slow
def test_a_text_only_model_decodes_no_image_and_quarantines_no_row_for_one(  # type: ignore[no-untyped-def]
    bundle, products, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """003's deployment saving: a text-only model never reads or decodes an image, so a row whose
    image is corrupt, truncated, empty or unreadable is scored on its text (no ``image_error``: the
    job quarantines nothing for it) exactly like a row with a good image."""
    from catalog_enrichment.inference import predictor as predictor_module
    from catalog_enrichment.inference.bundle import ModelBundle
    from catalog_enrichment.models.model import build_model

    torch.manual_seed(0)
    text_cfg = bundle.model_config.model_copy(update={"fusion": "text_only"})
    model = build_model(
        text_cfg,
        bundle.taxonomy,
        vocab_size=len(bundle.tokenizer),
        pad_token_id=bundle.tokenizer.pad_token_id,
    )
    text_only = ModelBundle(model, bundle.tokenizer, bundle.taxonomy, bundle.calibration, text_cfg, {})

    def never(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a text-only model decoded an image")

    monkeypatch.setattr(predictor_module, "read_pixels", never)
    rows = _image_rows(products, tmp_path)
    n = rows.num_rows
    scores = BatchPredictor(text_only, PredictorOptions(batch_size=4)).score_arrow(rows)
    assert scores.image_error == [None] * n
    for attr in bundle.taxonomy.names:  # same title, same scores, whatever the image
        np.testing.assert_allclose(
            scores.probs[attr], np.repeat(scores.probs[attr][:1], n, axis=0), atol=1e-6
        )
    # what the job keeps: every row decided, none with an image error to quarantine
    batch = pa.RecordBatch.from_arrays([rows["product_id"].combine_chunks()], names=["product_id"])
    out = decide_batch(DecisionPolicy(bundle.taxonomy, bundle.calibration, bundle.taxonomy), batch, scores)
    assert out.column("image_error").null_count == n
    assert all(out.column("scored").to_pylist())


@pytest.mark.slow
def test_a_stream_of_batches_scores_each_batch_as_on_its_own(bundle, products) -> None:  # type: ignore[no-untyped-def]
    good = products.filter(pa.compute.invert(pa.compute.is_null(products["title"])))
    parts = [good.slice(0, 70), good.slice(70, 0), good.slice(70, 1), good.slice(71, 130)]
    predictor = BatchPredictor(bundle, PredictorOptions(batch_size=32, decode_threads=2))
    streamed = list(predictor.score_stream(parts))
    assert [len(s.image_error) for _, s in streamed] == [70, 0, 1, 130]
    for (part, scores), original in zip(streamed, parts, strict=True):
        assert part is original
        alone = BatchPredictor(bundle, PredictorOptions(batch_size=32)).score_arrow(part)
        for attr in bundle.taxonomy.names:
            np.testing.assert_allclose(scores.probs[attr], alone.probs[attr], atol=1e-5)


def test_the_fast_tokenizer_path_gives_the_transformers_call_s_ids(bundle) -> None:  # type: ignore[no-untyped-def]
    collator = Collator(bundle.tokenizer, bundle.model_config.text.max_length)
    assert collator._backend is not None  # a fast tokenizer takes the backend path
    titles = ["red cotton shirt " * 40, "x", "", "Blue DENIM jeans, ünïcode ✓ [SEP]", "a b c"]
    descriptions = ["", "long description " * 60, "only a description", "short", "also " * 50]
    fast = collator.tokenize(titles, descriptions)
    slow = Collator(bundle.tokenizer, bundle.model_config.text.max_length)
    slow._backend = None  # the transformers call
    expected = slow.tokenize(titles, descriptions)
    assert fast["input_ids"].shape[1] == bundle.model_config.text.max_length  # truncated pairs
    for key, value in expected.items():
        assert torch.equal(fast[key], value), key


_FAULTS_SCRIPT = """
import resource, sys, torch
from catalog_enrichment.inference.predictor import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(5):
    torch.ones(10 << 20)  # 40 MiB, over glibc's largest dynamic mmap threshold (32 MiB)
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(10 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sorted(faults)[5])  # the median allocation
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_kept_memory_stops_a_forward_pass_faulting_its_tensors_in_again() -> None:
    """A fresh process each (the setting is per process and for good): a 40 MiB tensor allocated
    and freed over and over faults all of its 10,240 pages in every time under glibc's defaults, and
    none once the predictor has set the thresholds. The median allocation of 11 is compared: the
    machine may page out kept memory now and then (a kernel reclaimer such as DAMON's pageout
    scheme), which makes one allocation fault again, not most of them."""

    def run(mode: str) -> tuple[str, float]:
        command = [sys.executable, "-c", _FAULTS_SCRIPT, mode]
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout.split()
        return out[0], float(out[1])

    kept, faults = run("keep")
    default_kept, default_faults = run("default")
    assert (kept, default_kept) == ("True", "False")
    assert default_faults >= 10_000  # every page of the 40 MiB, every time
    assert faults < 100


def test_a_batch_without_titles_is_a_contract_error(bundle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ContractError, match="title"):
        BatchPredictor(bundle).score_arrow(pa.table({"product_id": ["a"]}))


def test_a_lone_surrogate_in_a_pandas_request_costs_one_character_not_the_request(bundle) -> None:  # type: ignore[no-untyped-def]
    """A served model's JSON request can carry half an emoji (a lone UTF-16 surrogate), which no
    tokenizer takes: the character is replaced, the rows are scored as with the replacement."""
    import pandas as pd

    predictor = BatchPredictor(bundle)
    cut = predictor.score_frame(
        pd.DataFrame({"title": ["red \ud83d shirt", "blue jeans"], "description": [None, "\udc00"]})
    )
    replaced = predictor.score_frame(
        pd.DataFrame({"title": ["red ? shirt", "blue jeans"], "description": [None, "?"]})
    )
    assert np.array_equal(cut.to_numpy(), replaced.to_numpy())
