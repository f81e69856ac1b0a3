"""Pretrained encoders end to end: the model's own tokenizer, timm's preprocessing, a bundle that
needs nothing outside itself, the training modes, and a clear error for each kind of bad weights."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.config import ImageEncoderConfig, SyntheticConfig, load_config
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import Collator, ProductDataset, ProductRecords
from catalog_enrichment.data.images import encode_image
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.data.synthetic import generate_marketplace
from catalog_enrichment.embeddings import vectors as embedding
from catalog_enrichment.errors import ConfigError
from catalog_enrichment.inference.bundle import BundleFolder, ModelBundle, load_bundle
from catalog_enrichment.inference.predictor import BatchPredictor, PredictorOptions
from catalog_enrichment.models import runtime
from catalog_enrichment.models.model import build_model
from catalog_enrichment.training.fit import param_groups
from catalog_enrichment.training.pipeline import train
from tests.conftest import assert_trained_on_verdicts_only, save_trained, tiny_config, verdicts_only

# A vocabulary no tokenizer trained on the data would produce: special tokens at odd ids, words the
# synthetic catalog uses placed after filler, characters last.
_SPECIAL = ["[UNK]", "~0", "[MASK]", "[PAD]", "~1", "[SEP]", "~2", "[CLS]"]
_WORDS = ["shirt", "cotton", "red", "blue", "dress", "black", "wool", "striped", "jeans", "leather"]
_CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789-")
VOCAB = _SPECIAL + _WORDS + _CHARS + [f"##{c}" for c in _CHARS]

# timm's test_byobnet with a pretrained config unlike the defaults: 40 px, bicubic, its own mean/std
IMAGE_OVERLAY = {
    "mean": [0.2, 0.4, 0.6],
    "std": [0.3, 0.2, 0.1],
    "input_size": [3, 40, 40],
    "interpolation": "bicubic",
}
EXPECTED_PREP = ImagePreprocessing(40, "bicubic", (0.2, 0.4, 0.6), (0.3, 0.2, 0.1))


def _save_text_model(folder: Path, vocab: list[str], *, embedding_rows: int | None = None) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=embedding_rows or len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=vocab.index("[PAD]"),
    )
    BertModel(config).save_pretrained(str(folder))
    return folder


def _save_image_weights(path: Path) -> Path:
    import timm

    torch.manual_seed(1)
    torch.save(timm.create_model("test_byobnet", num_classes=0).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    return {
        "text": _save_text_model(root / "text", VOCAB),
        "image": _save_image_weights(root / "image.pth"),
    }


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, taxonomy: Taxonomy) -> pa.Table:
    market = generate_marketplace(
        tmp_path_factory.mktemp("pt-market"),
        SyntheticConfig(products=500, seed=4, image_size=32),
        taxonomy=taxonomy,
    )
    return read_table(market.products)


def _cfg(paths: dict[str, Path], **training: Any) -> Any:
    text = {"pretrained_path": str(paths["text"]), "pooling": "mean", "max_length": 32}
    cfg = tiny_config(
        epochs=1, model={"text": text}, training={"calibration_fraction": 0.2, "batch_size": 32, **training}
    )
    # the image size is left to timm's pretrained config (the tiny config's 32 px would win a merge)
    image = ImageEncoderConfig(
        name="test_byobnet",
        pretrained_path=str(paths["image"]),
        timm_kwargs={"pretrained_cfg_overlay": IMAGE_OVERLAY},
    )
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"image": image})})


def _score(bundle_dir: str, table: pa.Table) -> np.ndarray:
    bundle = load_bundle(bundle_dir)
    probs = BatchPredictor(bundle, PredictorOptions(batch_size=64)).score(table)
    return np.concatenate([probs[a.name] for a in bundle.taxonomy.outputs], axis=1)


_SCORE_IN_FRESH_PROCESS = """
import sys
import numpy as np
import pyarrow.parquet as pq
from tests.models.test_pretrained import _score
np.save(sys.argv[3], _score(sys.argv[1], pq.read_table(sys.argv[2])))
"""


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.timeout(600)
def test_a_pretrained_bundle_carries_its_tokenizer_and_preprocessing_and_needs_no_source(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy, labelled: pa.Table, spark
) -> None:
    from transformers import AutoTokenizer

    source = tmp_path / "weights"
    shutil.copytree(Path(_save_text_model(tmp_path / "t", VOCAB)), source / "text")
    paths = {"text": source / "text", "image": _save_image_weights(tmp_path / "image.pth")}
    cfg = _cfg(paths)
    trained = train(labelled, taxonomy, cfg)
    products = labelled.select(["product_id", "title", "description", "image"]).slice(0, 150)
    live = ModelBundle(trained.model, trained.tokenizer, taxonomy, trained.calibration, cfg.model, {})
    in_process = BatchPredictor(live, PredictorOptions(batch_size=64)).score(
        products
    )  # the trained model, in memory
    in_process_flat = np.concatenate([in_process[a.name] for a in taxonomy.outputs], axis=1)  # derived too
    bundle_dir = save_trained(trained, tmp_path / "bundle")
    reference = AutoTokenizer.from_pretrained(str(paths["text"]))
    shutil.rmtree(source)
    paths["image"].unlink()  # nothing the model was trained from is left

    bundle = load_bundle(bundle_dir)
    assert bundle.preprocessing == EXPECTED_PREP
    titles = products["title"].to_pylist()
    descriptions = [d or "" for d in products["description"].to_pylist()]
    ids = Collator(bundle.tokenizer, 32).tokenize(titles, descriptions)["input_ids"]
    expected = reference(titles, descriptions, padding=True, truncation="longest_first", max_length=32)
    assert ids.tolist() == expected["input_ids"]
    assert ids[0, 0] == VOCAB.index("[CLS]") and bundle.tokenizer.pad_token_id == VOCAB.index("[PAD]")

    loaded = BatchPredictor(bundle, PredictorOptions(batch_size=64)).score(products)
    np.testing.assert_allclose(
        np.concatenate([loaded[a.name] for a in taxonomy.outputs], axis=1), in_process_flat, atol=1e-5
    )

    import pyarrow.parquet as pq

    pq.write_table(products, tmp_path / "products.parquet")
    subprocess.run(
        [sys.executable, "-c", _SCORE_IN_FRESH_PROCESS, str(bundle_dir), str(tmp_path / "products.parquet"),
         str(tmp_path / "fresh.npy")],
        check=True, cwd=Path(__file__).resolve().parents[2], timeout=300,
    )  # fmt: skip
    np.testing.assert_allclose(np.load(tmp_path / "fresh.npy"), in_process_flat, atol=1e-5)

    def on_executor(batches: Any) -> Any:
        from catalog_enrichment.inference.bundle import load_bundle as load
        from catalog_enrichment.inference.predictor import BatchPredictor as Predictor
        from catalog_enrichment.inference.predictor import PredictorOptions as Options

        predictor = Predictor(load(str(bundle_dir)), Options(batch_size=64))
        for batch in batches:
            probs = predictor.score(batch)
            flat = np.concatenate([probs[a] for a in probs], axis=1).astype(np.float64)
            yield pa.RecordBatch.from_arrays(
                [batch.column("product_id"), pa.array(list(flat), pa.list_(pa.float64()))],
                ["product_id", "scores"],
            )

    frame = spark.createDataFrame(products.to_pandas()).repartition(2)  # type: ignore[attr-defined]
    rows = frame.mapInArrow(on_executor, "product_id string, scores array<double>").collect()
    by_id = {r["product_id"]: r["scores"] for r in rows}
    from_spark = np.array([by_id[p] for p in products["product_id"].to_pylist()])
    np.testing.assert_allclose(from_spark, in_process_flat, atol=1e-5)


def test_training_and_serving_prepare_an_image_with_the_models_own_config(
    pretrained: dict[str, Path], taxonomy: Taxonomy
) -> None:
    """One flat-coloured photo: training's dataset + the encoder and serving's prepare threads give
    exactly (x / 255 - mean) / std per channel, at the model's 40 px."""
    cfg = _cfg(pretrained)
    from catalog_enrichment.data.dataset import build_tokenizer

    tokenizer = build_tokenizer(cfg.model.text, [])
    model = build_model(cfg.model, taxonomy, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    assert model.preprocessing == EXPECTED_PREP
    rgb = (200, 100, 30)
    photo = encode_image(np.full((90, 60, 3), rgb, np.uint8), "PNG")
    expected = (
        torch.tensor(
            [(c / 255 - m) / s for c, m, s in zip(rgb, EXPECTED_PREP.mean, EXPECTED_PREP.std, strict=True)]
        )
        .view(3, 1, 1)
        .expand(3, 40, 40)
    )
    table = pa.table({"product_id": ["p"], "title": ["t"], "description": ["d"], "image": [photo]})
    item = ProductDataset(ProductRecords.from_arrow(table), [0], preprocessing=model.preprocessing)[0]
    assert item["image_present"] and item["pixel_values"].shape == (3, 40, 40)
    torch.testing.assert_close(
        model.preprocessing.normalize(item["pixel_values"]), expected, atol=1e-5, rtol=0
    )
    bundle = ModelBundle(model, tokenizer, taxonomy, None, cfg.model, {})  # type: ignore[arg-type]
    served = BatchPredictor(bundle).prepare(["t"], ["d"], [photo], [None])
    torch.testing.assert_close(served.inputs["pixel_values"][0], expected, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_frozen_training_embeds_once_and_reads_the_cache_back(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy, labelled: pa.Table, pretrained: dict[str, Path]
) -> None:
    cfg = _cfg(pretrained, encoders="frozen", embedding_cache=str(tmp_path / "cache"), epochs=3)
    first: list[str] = []
    one = train(labelled, taxonomy, cfg, progress=first.append)
    assert any("products embedded, cached" in line for line in first)
    second: list[str] = []
    two = train(labelled, taxonomy, cfg, progress=second.append)
    assert any("read from" in line for line in second) and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert one.calibration.to_dict() == two.calibration.to_dict()
    # the encoders were not trained: their weights are the pretrained ones
    from transformers import AutoModel

    source = AutoModel.from_pretrained(str(pretrained["text"])).state_dict()
    for name, tensor in one.model.text_encoders[0].backbone.state_dict().items():
        torch.testing.assert_close(tensor, source[name], atol=0, rtol=0)
    # a different snapshot is embedded afresh, beside the first
    train(labelled.slice(0, 450), taxonomy, cfg)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_embeddings_of_a_photo_that_did_not_load_are_not_cached(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy, labelled: pa.Table, pretrained: dict[str, Path], monkeypatch
) -> None:
    """A product whose photo did not load this time (a timeout) is encoded imageless: kept in the
    cache, every later training would learn and calibrate it so without trying again."""
    from catalog_enrichment.embeddings import frozen

    real = frozen._encoded

    def first_lost(model, records, rows, *args):  # type: ignore[no-untyped-def]
        for k, flat in enumerate(real(model, records, rows, *args)):
            if k == 0:
                flat["image_present"][0] = 0.0
            yield flat

    monkeypatch.setattr(frozen, "_encoded", first_lost)
    cfg = _cfg(pretrained, encoders="frozen", embedding_cache=str(tmp_path / "cache"), epochs=1)
    said: list[str] = []
    train(labelled.slice(0, 450), taxonomy, cfg, progress=said.append)
    assert any("not cached: 1 of them had an image that did not load" in line for line in said), said
    assert not list((tmp_path / "cache").glob("*.pt"))


def _count_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The products each driver-side encode of a frozen training encodes, appended as they happen."""
    from catalog_enrichment.embeddings import frozen as embeddings

    encoded: list[int] = []
    real = embeddings._encoded

    def counting(model, records, rows, *args):  # type: ignore[no-untyped-def]
        encoded.append(len(rows))
        return real(model, records, rows, *args)

    monkeypatch.setattr(embeddings, "_encoded", counting)
    return encoded


@pytest.mark.slow
def test_frozen_training_reads_and_fills_the_catalog_s_embedding_store(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy, labelled: pa.Table, pretrained: dict[str, Path], monkeypatch
) -> None:
    """The first training encodes and stores every product; a second one encodes none and trains
    the same model as the private cache does; a changed title is encoded again."""
    from catalog_enrichment.catalog import open_catalog

    cfg = _cfg(pretrained, encoders="frozen", embedding_cache=str(tmp_path / "cache"), epochs=2)
    catalog = open_catalog(cfg.catalog.model_copy(update={"root": str(tmp_path / "lake")}))
    encoded = _count_encodes(monkeypatch)
    n = labelled.num_rows
    messages: list[str] = []
    first = train(labelled, taxonomy, cfg, store=catalog, progress=messages.append)
    assert encoded == [n] and sum(catalog.embedding_counts().values()) == n
    second = train(labelled, taxonomy, cfg, store=catalog, progress=messages.append)
    assert encoded == [n]  # nothing encoded again
    assert f"{n:,} of {n:,} products read from the embedding store" in "\n".join(messages)
    private = train(labelled, taxonomy, cfg)  # the private cache file: encodes all
    for trained in (second, private):
        for name, tensor in first.model.state_dict().items():
            assert torch.equal(tensor, trained.model.state_dict()[name]), name
    assert first.calibration.to_dict() == second.calibration.to_dict() == private.calibration.to_dict()
    titles = labelled["title"].to_pylist()
    titles[0] = f"{titles[0]} (new)"
    changed = labelled.set_column(labelled.schema.get_field_index("title"), "title", pa.array(titles))
    train(changed, taxonomy, cfg, store=catalog)
    assert encoded == [n, n, 1]  # the changed product alone

    # an image that loaded in the survey and not when embedded (a CDN's bad minute): the product is
    # trained on as imageless, and its vector is not stored, so the next training encodes it again
    from catalog_enrichment.contracts import IMAGE_READABLE
    from catalog_enrichment.embeddings import frozen

    failing = next(image for image in labelled["image"].to_pylist() if image is not None)
    read = frozen.read_pixels

    def flaky(raw, *args):  # type: ignore[no-untyped-def]
        return (None, IMAGE_READABLE, None) if raw == failing else read(raw, *args)

    fresh = open_catalog(cfg.catalog.model_copy(update={"root": str(tmp_path / "lake2")}))
    with monkeypatch.context() as patch:
        patch.setattr(frozen, "read_pixels", flaky)
        train(labelled, taxonomy, cfg, store=fresh, progress=messages.append)
    assert any(f"{n:,} encoded, {n - 1:,} stored (1 not: an image that did not load" in m for m in messages)
    assert sum(fresh.embedding_counts().values()) == n - 1
    train(labelled, taxonomy, cfg, store=fresh)
    assert encoded[-2:] == [n, 1] and sum(fresh.embedding_counts().values()) == n


@pytest.mark.slow
def test_frozen_training_keeps_a_photo_s_digest_beside_its_stored_vector(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy, labelled: pa.Table, pretrained: dict[str, Path], monkeypatch
) -> None:
    """Photos behind URIs: a vector is stored with the digest of the bytes it was encoded from, so
    new bytes behind the same URI are encoded again, and a run's placeholder bytes (the nightly
    refuses a stored vector of them) are left out of training as the job quarantines them."""
    import datetime as dt

    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.catalog.embeddings import split_content
    from catalog_enrichment.catalog.reports import PLACEHOLDERS, RunReport
    from catalog_enrichment.contracts import image_key

    rows = labelled.filter(pc.is_valid(labelled["image"])).slice(0, 200)
    photos = tmp_path / "photos"
    photos.mkdir()
    uris = []
    for pid, data in zip(rows["product_id"].to_pylist(), rows["image"].to_pylist(), strict=True):
        (photos / f"{pid}.png").write_bytes(data)
        uris.append(str(photos / f"{pid}.png"))
    rows = rows.drop_columns(["image", "image_uri"]).append_column("image_uri", pa.array(uris))
    cfg = _cfg(pretrained, encoders="frozen", embedding_cache=str(tmp_path / "cache"), epochs=1)
    cfg = cfg.model_copy(
        update={
            "images": cfg.images.model_copy(update={"roots": [str(photos)]}),
            "validation": cfg.validation.model_copy(update={"max_products_per_image": 3}),
        }
    )
    catalog = open_catalog(cfg.catalog.model_copy(update={"root": str(tmp_path / "lake")}))
    encoded = _count_encodes(monkeypatch)
    n, first = rows.num_rows, rows["product_id"][0].as_py()

    def stored_image(pid: str) -> str | None:
        (encoder,) = catalog.embedding_counts()
        found = catalog.embeddings_of(encoder, [pid])
        return split_content(found["content"][0].as_py())[1]

    train(rows, taxonomy, cfg, store=catalog)
    assert encoded == [n] and stored_image(first) == image_key((photos / f"{first}.png").read_bytes())
    # the image host now serves other bytes behind the first URI (the outage's placeholder)
    placeholder = encode_image(np.full((32, 32, 3), 200, np.uint8), "PNG")
    (photos / f"{first}.png").write_bytes(placeholder)
    train(rows, taxonomy, cfg, store=catalog)
    assert encoded == [n, 1] and stored_image(first) == image_key(placeholder)
    # a run found those bytes on 4 products (over the limit of 3): the product is left out, and the
    # nightly, told the same placeholders, does not fuse the vector stored from them
    report = RunReport(
        run_id="outage",
        started_at=dt.datetime.now(dt.UTC),
        validation_summary=json.dumps({PLACEHOLDERS: {image_key(placeholder): 4}}),
    )
    catalog.upsert_report(report)
    said: list[str] = []
    train(rows, taxonomy, cfg, store=catalog, progress=said.append)
    assert encoded == [n, 1]
    assert any("left out 1 products whose image cannot be used: {'image_shared': 1}" in m for m in said), said


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.timeout(600)
def test_a_filled_store_gives_the_model_a_training_that_encodes_everything_itself_gives(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy, labelled: pa.Table, pretrained: dict[str, Path], spark, monkeypatch
) -> None:
    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.embeddings import frozen as embeddings
    from catalog_enrichment.training.pipeline import train
    from catalog_enrichment.training.store_fill import fill_embedding_store

    cfg = _cfg(pretrained, encoders="frozen", embedding_cache=str(tmp_path / "cache"), epochs=2)
    catalog = open_catalog(cfg.catalog.model_copy(update={"root": str(tmp_path / "lake")}))
    data = tmp_path / "labelled.parquet"
    pq.write_table(labelled, data)
    n = labelled.num_rows
    first = fill_embedding_store(spark, cfg, taxonomy, data, catalog, say=lambda m: None)
    assert (first.products, first.reused, first.encoded, first.stored, first.image_errors) == (n, 0, n, n, 0)
    assert catalog.embedding_counts() == {first.encoder: n}
    again = fill_embedding_store(spark, cfg, taxonomy, data, catalog, say=lambda m: None)
    assert (again.encoder, again.reused, again.encoded, again.stored) == (first.encoder, n, 0, 0)

    encoded = _count_encodes(monkeypatch)
    from_store = train(labelled, taxonomy, cfg, store=catalog)
    assert encoded == []  # every vector came from the executors' fill
    itself = train(labelled, taxonomy, cfg)  # encodes every product on the driver
    assert encoded == [n]
    # The executors batch and thread differently from the driver, so float32 sums run in another
    # order: each vector agrees to a few ulps (relative 1e-5 allows ~80 of float32's 1.2e-7), and so
    # do the models trained over them. Per vector: one element can move by more than its own 1e-5
    # (a square-rooted colour share near 0 moves 1 / (2 sqrt(SHARE_FLOOR)) times as much as its
    # share, a colour quantile by up to the gap between two neighbouring pixels' values).
    stored = catalog.embeddings_of(first.encoder, labelled["product_id"].to_pylist())
    by_id = dict(zip(stored["product_id"].to_pylist(), stored["embedding"].to_pylist(), strict=True))
    executors = np.stack([np.frombuffer(by_id[p], np.float32) for p in labelled["product_id"].to_pylist()])
    records = ProductRecords.from_arrow(labelled)
    driver = embeddings.embed_products(
        itself.model, records, Collator(itself.tokenizer, 32), batch_size=64,
        device=torch.device("cpu"), cache_dir=None, say=lambda m: None,
    )  # fmt: skip
    packed = embedding.pack(itself.model, embeddings.Embeddings(driver.tensors).inputs(torch.arange(n)))
    error = np.linalg.norm(executors - packed, axis=1) / np.linalg.norm(packed, axis=1)
    assert error.max() <= 1e-5, error.max()
    # Two epochs of Adam carry that rounding into the weights a few times over (an input column
    # that differs moves its weights): each tensor agrees to relative 1e-4, the predictions to 1e-5.
    for name, tensor in itself.model.state_dict().items():
        other = from_store.model.state_dict()[name]
        if tensor.is_floating_point():
            assert (tensor - other).norm() <= 1e-4 * tensor.norm() + 1e-6, name
        else:
            assert torch.equal(tensor, other), name
    for attr in taxonomy.names:
        np.testing.assert_allclose(
            itself.test_predictions.probs[attr], from_store.test_predictions.probs[attr], atol=1e-5
        )
        np.testing.assert_allclose(
            itself.calibration.thresholds(attr), from_store.calibration.thresholds(attr), atol=1e-5
        )
    # an outage's placeholder on 4 products (over a limit of 3): their vectors are left out, so the
    # products are encoded again once their photos are back
    from catalog_enrichment.bench.drift import placeholder_images

    photo = pc.is_valid(labelled["image"]).to_numpy(zero_copy_only=False)
    first_four = np.isin(np.arange(n), np.flatnonzero(photo)[:4])
    hit = placeholder_images(labelled.filter(pa.array(first_four)))
    pq.write_table(pa.concat_tables([hit, labelled.filter(pa.array(~first_four))]), data)
    strict = cfg.model_copy(
        update={"validation": cfg.validation.model_copy(update={"max_products_per_image": 3})}
    )
    outage = fill_embedding_store(spark, strict, taxonomy, data, catalog, say=lambda m: None)
    assert (outage.encoded, outage.stored, outage.placeholders, outage.image_errors) == (4, 0, 4, 0)
    pq.write_table(labelled, data)
    back = fill_embedding_store(spark, strict, taxonomy, data, catalog, say=lambda m: None)
    assert (back.reused, back.encoded, back.placeholders) == (n, 0, 0)
    # once an enrichment run's report names the placeholder's bytes (validation found them inline,
    # under their key), one product is enough
    import datetime as dt

    from catalog_enrichment.catalog.reports import PLACEHOLDERS, RunReport
    from catalog_enrichment.contracts import image_key

    digest = image_key(hit["image"][0].as_py())
    found = RunReport(
        run_id="outage",
        started_at=dt.datetime.now(dt.UTC),
        validation_summary=f'{{"{PLACEHOLDERS}": {{"{digest}": 4}}}}',
    )
    catalog.upsert_report(found)
    pq.write_table(pa.concat_tables([hit.slice(0, 1), labelled.filter(pa.array(~first_four))]), data)
    once = fill_embedding_store(spark, strict, taxonomy, data, catalog, say=lambda m: None)
    assert (once.encoded, once.stored, once.placeholders) == (1, 0, 1)


@pytest.mark.spark
@pytest.mark.timeout(300)
def test_a_fill_needs_frozen_encoders_a_storable_fusion_and_a_store_it_can_merge_into(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    taxonomy: Taxonomy,
    labelled: pa.Table,
    pretrained: dict[str, Path],
    spark,
    capsys,
    monkeypatch,
) -> None:
    import datetime as dt
    import os

    from deltalake import write_deltalake

    from catalog_enrichment.catalog import embedded, open_catalog
    from catalog_enrichment.catalog.embeddings import embeddings_schema
    from catalog_enrichment.cli import main
    from catalog_enrichment.errors import CatalogEnrichError
    from catalog_enrichment.training import store_fill
    from catalog_enrichment.training.store_fill import fill_embedding_store

    data = tmp_path / "labelled.parquet"
    pq.write_table(labelled.slice(0, 10), data)
    frozen = _cfg(pretrained, encoders="frozen")
    tokens = frozen.model.model_copy(update={"fusion": "cross_attention"})
    refused = (
        (_cfg(pretrained, encoders="finetune"), "training.encoders: frozen"),
        (frozen.model_copy(update={"model": tokens}), "pooled vectors"),
    )
    for cfg, words in refused:
        catalog = open_catalog(cfg.catalog.model_copy(update={"root": str(tmp_path / "lake")}))
        with pytest.raises(ConfigError, match=words):
            fill_embedding_store(spark, cfg, taxonomy, data, catalog, say=lambda m: None)
    assert not (tmp_path / "lake").exists() or not any((tmp_path / "lake").rglob("*.parquet"))
    # a lakehouse store no merge fits beside in this process's memory: refused before anything is
    # read or encoded, not after hours of encoding vectors it cannot keep
    row = {"encoder": "ab" * 16, "product_id": "p0", "content": "c", "embedding": os.urandom(10_000),
           "run_id": "r", "written_at": dt.datetime(2026, 11, 1, tzinfo=dt.UTC)}  # fmt: skip
    write_deltalake(str(tmp_path / "lake" / "embeddings"), pa.Table.from_pylist([row], embeddings_schema()))
    catalog = open_catalog(frozen.catalog.model_copy(update={"root": str(tmp_path / "lake")}))
    catalog.check_embeddings_storable()
    monkeypatch.setattr(embedded, "available_memory", lambda: 20_000)
    monkeypatch.setattr(store_fill, "read_products", lambda *a, **k: pytest.fail("read before the check"))
    with pytest.raises(CatalogEnrichError, match=r"merging into it takes about .* 0.0 MB is free"):
        fill_embedding_store(spark, frozen, taxonomy, data, catalog, say=lambda m: None)
    capsys.readouterr()  # the progress bars of the loads above
    missing = ["embeddings", "--fill", "--data", str(tmp_path / "none"), "--catalog", str(tmp_path / "lake")]
    assert main(missing) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"catalog-enrich: error: table not found: {tmp_path / 'none'} (a Delta or Parquet products or "
        "labelled table)"
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_frozen_training_learns_from_peoples_verdicts_in_the_cached_batches(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy, labelled: pa.Table, pretrained: dict[str, Path]
) -> None:
    table, people = verdicts_only(labelled, taxonomy)
    cfg = _cfg(pretrained, encoders="frozen", embedding_cache=str(tmp_path / "cache"), crossfit_folds=0)
    assert_trained_on_verdicts_only(train(table, taxonomy, cfg), people)


def test_a_pretrained_tokenizer_reads_full_width_text_as_typed_elsewhere_and_its_bundle_keeps_so(
    tmp_path: Path, pretrained: dict[str, Path], taxonomy: Taxonomy
) -> None:
    """Training's pretrained tokenizer NFKC-normalises first (a BERT vocabulary has no full-width
    letters: ``ＲＥＤ`` would be unknown); BERT's loader rebuilds its normaliser, so the bundle marks
    it and loading applies it again, under the fingerprint training computed; a bundle saved
    without the mark loads its tokenizer as it was."""

    from catalog_enrichment.calibration import Calibration
    from catalog_enrichment.data.dataset import build_tokenizer
    from catalog_enrichment.inference.bundle import save_bundle

    cfg = _cfg(pretrained)
    tok = build_tokenizer(cfg.model.text, [])
    ascii_ids = tok("red cotton shirt")["input_ids"]
    assert VOCAB.index("[UNK]") not in ascii_ids
    assert tok("ＲＥＤ ｃｏｔｔｏｎ\u3000ｓｈｉｒｔ")["input_ids"] == ascii_ids

    model = build_model(cfg.model, taxonomy, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    calibration = Calibration(0.95, 0.95, "clopper_pearson", 20, {})
    folder = save_bundle(tmp_path / "bundle", ModelBundle(model, tok, taxonomy, calibration, cfg.model, {}))
    loaded = load_bundle(folder)
    assert loaded.tokenizer("ＲＥＤ ｃｏｔｔｏｎ\u3000ｓｈｉｒｔ")["input_ids"] == ascii_ids
    fingerprint = embedding.encoder_fingerprint(loaded.model, loaded.tokenizer, cfg.model.text.max_length)  # type: ignore[arg-type]
    assert BundleFolder(folder).encoder_fingerprint() == fingerprint

    meta = json.loads(BundleFolder(folder).meta.read_text())
    assert meta["requires"] == ["tokenizer_nfkc"]  # a version that cannot apply it refuses the bundle
    del meta["tokenizer_nfkc"]  # the list decides where there is one
    BundleFolder(folder).meta.write_text(json.dumps(meta))
    assert load_bundle(folder).tokenizer("ＲＥＤ ｃｏｔｔｏｎ\u3000ｓｈｉｒｔ")["input_ids"] == ascii_ids
    del meta["requires"]
    BundleFolder(folder).meta.write_text(json.dumps(meta))
    older = load_bundle(folder).tokenizer
    assert older("red cotton shirt")["input_ids"] == ascii_ids
    assert VOCAB.index("[UNK]") in older("ＲＥＤ ｃｏｔｔｏｎ")["input_ids"]


def test_learning_rates_and_the_layers_each_mode_trains(
    pretrained: dict[str, Path], taxonomy: Taxonomy
) -> None:
    from catalog_enrichment.data.dataset import build_tokenizer

    def groups(mode: str, **training: Any) -> tuple[Any, list[dict[str, Any]]]:
        cfg = _cfg(pretrained, encoders=mode, unfreeze_layers=1, learning_rate=1e-3, **training)
        tok = build_tokenizer(cfg.model.text, [])
        model = build_model(cfg.model, taxonomy, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
        return model, param_groups(model, cfg.training)

    model, finetune = groups("finetune")
    assert [g["lr"] for g in finetune] == [1e-3, 3e-5, 3e-5]  # heads, then the pretrained encoders
    assert sum(len(g["params"]) for g in finetune) == len(list(model.parameters()))
    model, last = groups("last_n")
    assert [g["lr"] for g in last] == [1e-3, 3e-5, 3e-5]
    text = model.text_encoders[0].backbone
    trained = {n for n, p in text.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("encoder.layer.1.", "pooler.")) for n in trained)
    assert not any(p.requires_grad for p in text.embeddings.parameters())
    model, frozen = groups("frozen", encoder_learning_rate=5e-5)
    assert len(frozen) == 1 and not any(p.requires_grad for p in model.text_encoders.parameters())


def test_bad_pretrained_inputs_are_clear_errors(
    tmp_path: Path, pretrained: dict[str, Path], taxonomy: Taxonomy
) -> None:
    from catalog_enrichment.data.dataset import build_tokenizer

    def build(**paths: Path) -> None:
        cfg = _cfg({**pretrained, **paths})
        tok = build_tokenizer(cfg.model.text, [])
        build_model(cfg.model, taxonomy, vocab_size=len(tok), pad_token_id=tok.pad_token_id)

    with pytest.raises(ConfigError, match="is not a directory"):
        build(text=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no config\.json, so it is not a transformers model folder"):
        build(text=tmp_path / "empty")
    # a model whose embedding is smaller than its tokenizer's vocabulary: they do not belong together
    short = _save_text_model(tmp_path / "short", VOCAB, embedding_rows=len(VOCAB) - 10)
    with pytest.raises(
        ConfigError, match=r"tokenizer has \d+ tokens but the text model's embedding has \d+ rows"
    ):
        build(text=short)
    # a max_length past the model's positions: a long text would fail its scoring task
    cfg = _cfg(pretrained)
    long = cfg.model.model_copy(update={"text": cfg.model.text.model_copy(update={"max_length": 65})})
    tok = build_tokenizer(cfg.model.text, [])
    with pytest.raises(ConfigError, match=r"max_length is 65 but the text model has 64 positions"):
        build_model(long, taxonomy, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    with pytest.raises(ConfigError, match="no such file"):
        build(image=tmp_path / "missing.pth")
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(ConfigError, match="is not a weights file"):
        build(image=tmp_path / "notes.pth")
    import timm

    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ConfigError, match=r"do not fit timm's 'test_byobnet': \d+ missing"):
        build(image=tmp_path / "resnet.pth")
    with pytest.raises(ConfigError, match="frozen trains only the fusion and heads"):
        train(pa.table({"title": ["x"]}), taxonomy, tiny_config(training={"encoders": "frozen"}))


def test_weight_paths_in_a_config_file_are_relative_to_it(tmp_path: Path) -> None:
    folder = tmp_path / "deploy" / "config"
    folder.mkdir(parents=True)
    (folder / "c.yaml").write_text(
        "model:\n  text: {pretrained_path: ../../weights/text}\n  image: {pretrained_path: /abs/image.pth}\n"
        "catalog: {root: lakehouse}\n"
    )
    cfg = load_config(folder / "c.yaml", environ={})
    assert cfg.model.text.pretrained_path == str(tmp_path / "weights" / "text")
    assert cfg.model.image.pretrained_path == "/abs/image.pth" and cfg.catalog.root == "lakehouse"
    assert json.loads(json.dumps(cfg.model.model_dump(mode="json")))  # still plain JSON in a bundle


def _save_distilbert(folder: Path, vocab: list[str], *, dim: int = 32) -> Path:
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertModel

    folder.mkdir(parents=True)
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(str(folder))
    torch.manual_seed(2)
    config = DistilBertConfig(
        vocab_size=len(vocab), dim=dim, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64,
        pad_token_id=vocab.index("[PAD]"),
    )  # fmt: skip
    DistilBertModel(config).save_pretrained(str(folder))
    return folder


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hierarchical_loads_each_text_encoder_from_its_own_path(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy, labelled: pa.Table, pretrained: dict[str, Path]
) -> None:
    """Paper 002's BERT + DistilBERT pair, both pretrained: each from its own folder, one vocabulary,
    and the saved model needs neither folder."""
    second = _save_distilbert(tmp_path / "distil", VOCAB)
    cfg = _cfg(pretrained)
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(
                update={"fusion": "hierarchical", "fusion_kwargs": {"second_encoder_path": str(second)}}
            )
        }
    )
    trained = train(labelled, taxonomy, cfg)
    first, other = trained.model.text_encoders
    assert first.backbone.config.model_type == "bert" and other.backbone.config.model_type == "distilbert"
    from transformers import AutoModel

    source = AutoModel.from_pretrained(str(second)).state_dict()
    # loaded from its folder: after one epoch at 3e-5 its embeddings are still close to the saved ones
    torch.testing.assert_close(
        other.backbone.embeddings.word_embeddings.weight,
        source["embeddings.word_embeddings.weight"],
        atol=1e-3,
        rtol=0,
    )
    bundle_dir = save_trained(trained, tmp_path / "bundle")
    shutil.rmtree(second)
    products = labelled.slice(0, 40)
    live = ModelBundle(trained.model, trained.tokenizer, taxonomy, trained.calibration, cfg.model, {})
    expected = BatchPredictor(live).score(products)
    got = BatchPredictor(load_bundle(bundle_dir)).score(products)
    for a in taxonomy:
        np.testing.assert_allclose(got[a.name], expected[a.name], atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hierarchical_trains_its_fusion_head_over_frozen_pretrained_encoders(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy, labelled: pa.Table, pretrained: dict[str, Path]
) -> None:
    """002's set-up: separately trained encoders frozen under the small hierarchical fusion head
    (fields within each encoder, then across encoders, then the image)."""
    second = _save_distilbert(tmp_path / "distil", VOCAB)
    cfg = _cfg(pretrained, encoders="frozen", embedding_cache=str(tmp_path / "cache"), epochs=2)
    fusion_kwargs = {
        "second_encoder_path": str(second),
        "level1": "concat",
        "level2": "average",
        "image": "add",
    }
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"fusion": "hierarchical", "fusion_kwargs": fusion_kwargs})
        }
    )
    lines: list[str] = []
    trained = train(labelled, taxonomy, cfg, progress=lines.append)
    assert any("products embedded, cached" in line for line in lines)
    from transformers import AutoModel

    for encoder, folder in zip(trained.model.text_encoders, (pretrained["text"], second), strict=True):
        source = AutoModel.from_pretrained(str(folder)).state_dict()
        for name, tensor in encoder.backbone.state_dict().items():
            torch.testing.assert_close(tensor, source[name], atol=0, rtol=0)
    assert trained.history[-1].train_loss < trained.history[0].train_loss


def test_hierarchical_refuses_text_encoders_that_cannot_share_token_ids(
    tmp_path: Path, taxonomy: Taxonomy, pretrained: dict[str, Path]
) -> None:
    from catalog_enrichment.data.dataset import build_tokenizer

    def build(**fusion_kwargs: Any) -> None:
        cfg = _cfg(pretrained)
        cfg = cfg.model_copy(
            update={
                "model": cfg.model.model_copy(
                    update={"fusion": "hierarchical", "fusion_kwargs": fusion_kwargs}
                )
            }
        )
        tok = build_tokenizer(cfg.model.text, [])
        build_model(cfg.model, taxonomy, vocab_size=len(tok), pad_token_id=tok.pad_token_id)

    with pytest.raises(ConfigError, match="must both be set"):
        build()  # a pretrained first encoder and a second from scratch
    other_vocab = [*VOCAB[:8], "zebra", *VOCAB[8:]]
    with pytest.raises(ConfigError, match="has another vocabulary"):
        build(second_encoder_path=str(_save_distilbert(tmp_path / "other", other_vocab)))
    with pytest.raises(ConfigError, match=r"\[32, 48\] wide"):
        build(second_encoder_path=str(_save_distilbert(tmp_path / "wide", VOCAB, dim=48)))


# -- model.encoder_runtime: onnx ------------------------------------------------------------


def _onnx(cfg: object) -> object:
    model = cfg.model.model_copy(update={"encoder_runtime": "onnx"})  # type: ignore[attr-defined]
    return cfg.model_copy(update={"model": model})  # type: ignore[attr-defined]


def _onnx_scores(bundle: object, table: pa.Table) -> dict[str, np.ndarray]:
    return BatchPredictor(bundle, PredictorOptions(batch_size=64)).score(table)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_onnx_encoders_are_exported_calibrated_on_and_served_with_the_decisions_of_torch(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy, labelled: pa.Table, pretrained: dict[str, Path]
) -> None:
    torch_cfg = _cfg(pretrained, encoders="frozen", embedding_cache=str(tmp_path / "cache"), epochs=2)
    messages: list[str] = []
    trained = train(labelled, taxonomy, _onnx(torch_cfg), progress=messages.append)
    assert "model.encoder_runtime onnx: exporting the encoders" in messages
    folder = save_trained(trained, tmp_path / "bundle")
    graphs = sorted(p.name for p in BundleFolder(folder).onnx.iterdir())
    assert graphs == ["image_encoder.onnx", "text_encoders.0.onnx"]
    # the export is a function of the weights: the bundle's graphs are the ones training scored with
    again = runtime.export_encoders(trained.model, tmp_path / "again")
    for name in graphs:
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (folder / "onnx", again)]
        assert digest[0] == digest[1], name

    served = load_bundle(folder)
    encoders = [served.model.image_encoder, served.model.text_encoders[0]]
    assert all(e.graph is not None for e in encoders)  # type: ignore[union-attr]
    # products no split saw: the graphs' scores and decisions against the same weights in torch
    unseen = read_table(
        generate_marketplace(
            tmp_path / "unseen", SyntheticConfig(products=300, seed=11, image_size=32), taxonomy=taxonomy
        ).products
    )
    fast = _onnx_scores(served, unseen)
    for e in encoders:
        e.graph = None  # type: ignore[union-attr]
    eager = _onnx_scores(served, unseen)
    for attribute in taxonomy:
        np.testing.assert_allclose(fast[attribute.name], eager[attribute.name], atol=1e-5)
        thresholds = served.calibration.thresholds(attribute.name)
        np.testing.assert_array_equal(fast[attribute.name] >= thresholds, eager[attribute.name] >= thresholds)
    # the store keeps the graphs' vectors apart from the torch encoders' vectors
    torch_bundle = save_trained(train(labelled, taxonomy, torch_cfg), tmp_path / "torch-bundle")
    assert BundleFolder(folder).encoder_fingerprint() != BundleFolder(torch_bundle).encoder_fingerprint()


def _assert_encoders_as_loaded(model: Any, paths: dict[str, Path]) -> None:
    """The model's encoders hold the pretrained weights, bit for bit (BatchNorm statistics included)."""
    from transformers import AutoModel

    text = AutoModel.from_pretrained(str(paths["text"])).state_dict()
    for name, tensor in model.text_encoders[0].backbone.state_dict().items():
        torch.testing.assert_close(tensor, text[name], atol=0, rtol=0)
    image = torch.load(paths["image"], weights_only=True)
    for name, tensor in model.image_encoder.backbone.state_dict().items():
        torch.testing.assert_close(tensor, image[name], atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.timeout(600)
def test_frozen_encoders_train_streamed_in_one_process_and_on_two_ranks(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy, labelled: pa.Table, pretrained: dict[str, Path], spark
) -> None:
    from catalog_enrichment.catalog.lakehouse import write_table
    from catalog_enrichment.training.pipeline import train
    from catalog_enrichment.training.stream import table_source

    write_table(tmp_path / "labelled", labelled)
    streaming = {"enabled": True, "batch_rows": 128}
    one = train(
        table_source(tmp_path / "labelled", batch_rows=128),
        taxonomy,
        _cfg(pretrained, encoders="frozen", epochs=2, streaming=streaming),
    )
    _assert_encoders_as_loaded(one.model, pretrained)
    assert one.history[1].train_loss < one.history[0].train_loss  # the fusion and heads learned
    # two ranks (local mode), the thresholds computed on the exported graphs that serve
    two_ranks = _onnx(
        _cfg(pretrained, encoders="frozen", epochs=2, streaming=streaming, distributed={"processes": 2})
    )
    messages: list[str] = []
    source = table_source(tmp_path / "labelled", batch_rows=128)
    two = train(source, taxonomy, two_ranks, progress=messages.append)  # type: ignore[arg-type]
    assert "model.encoder_runtime onnx: exporting the encoders" in messages
    assert any(m.startswith("training: ") and "2 process(es)" in m for m in messages), messages
    _assert_encoders_as_loaded(two.model, pretrained)
    assert two.model.image_encoder.graph is None  # torch weights again: the bundle exports them
    assert two.history[1].train_loss < two.history[0].train_loss


def _stack_cfg(paths: dict[str, Path], **training: Any) -> Any:
    """:func:`_cfg` with frozen encoders under the ``stack`` fusion."""
    cfg = _cfg(paths, encoders="frozen", **training)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"fusion": "stack"})})


def test_streaming_refuses_the_stack_on_several_processes_by_name(
    pretrained: dict[str, Path], labelled: pa.Table, taxonomy: Taxonomy
) -> None:
    from catalog_enrichment.training.pipeline import train

    cfg = _stack_cfg(pretrained, streaming={"enabled": True}, distributed={"processes": 2})
    with pytest.raises(
        ConfigError, match=r"training\.streaming does not support model\.fusion: stack on several processes"
    ):
        train(labelled, taxonomy, cfg)


def test_the_stack_refuses_noise_pruning_by_name(
    pretrained: dict[str, Path], labelled: pa.Table, taxonomy: Taxonomy
) -> None:
    # the stack's own fit has no pruning step: the switch would be silently ignored
    cfg = _stack_cfg(pretrained, noise_pruning={"enabled": True})
    with pytest.raises(ConfigError, match=r"fusion 'stack' .* set training\.noise_pruning\.enabled: false"):
        train(labelled, taxonomy, cfg)  # type: ignore[arg-type]


def test_onnx_needs_frozen_encoders(
    pretrained: dict[str, Path], labelled: pa.Table, taxonomy: Taxonomy
) -> None:
    cfg = _onnx(_cfg(pretrained, encoders="finetune"))
    with pytest.raises(ConfigError, match=r"set training\.encoders: frozen"):
        train(labelled, taxonomy, cfg)  # type: ignore[arg-type]
