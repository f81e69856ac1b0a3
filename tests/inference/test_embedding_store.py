"""The embedding store in the predictor, without Spark: what is encoded again and what is not, and
that a stored vector fuses to the scores of a fresh encode."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from catalog_enrichment.catalog.embeddings import stored_content
from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.data.images import (
    IMAGE_DECODABLE,
    IMAGE_FORMATS,
    IMAGE_URI_ALLOWED,
    IMAGE_WITHIN_LIMITS,
    ImagePolicy,
)
from catalog_enrichment.embeddings import vectors as embedding
from catalog_enrichment.inference.bundle import (
    BundleFolder,
    ModelBundle,
    load_bundle,
)
from catalog_enrichment.inference.predictor import BatchPredictor, PredictorOptions, Scores
from tests.conftest import save_with_model, tiny_config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bundle(quick_bundle: Path) -> ModelBundle:
    return load_bundle(quick_bundle)


@pytest.fixture(scope="module")
def products(incoming: Any) -> pa.Table:
    """Products with a title (the job scores no other)."""
    table = read_table(incoming.products).slice(0, 200)
    return table.filter(pc.is_valid(table["title"]))


def _encoded_rows(predictor: BatchPredictor) -> list[int]:
    """Counts, per encoder call, of the rows the encoders ran on."""
    model = predictor.bundle.model
    calls: list[int] = []
    original = model.encode

    def counting(batch: dict[str, torch.Tensor]) -> Any:
        calls.append(int(batch["image_present"].shape[0]))
        return original(batch)

    model.encode = counting  # type: ignore[method-assign]
    return calls


def _with_store(table: pa.Table, scores: Scores) -> pa.Table:
    """``table`` with the vectors a first scoring produced joined on, as the job stores them
    (:func:`stored_content`) and joins the store."""
    assert scores.content is not None and scores.embedding is not None and scores.image_digest is not None
    stored = [stored_content(c, d) for c, d in zip(scores.content, scores.image_digest, strict=True)]
    return table.append_column("stored_content", pa.array(stored, pa.string())).append_column(
        "stored_embedding", pa.array(scores.embedding, pa.binary())
    )


def _usable(table: pa.Table, scores: Scores) -> pa.Table:
    return table.filter(pa.array([e is None for e in scores.image_error]))


def test_a_stored_vector_is_fused_without_encoding_and_scores_like_a_fresh_encode(bundle, products) -> None:  # type: ignore[no-untyped-def]
    first = BatchPredictor(copy.deepcopy(bundle), PredictorOptions(batch_size=32, embedding_store=True))
    fresh = first.score_arrow(products)
    good = _usable(products, fresh)
    fresh = first.score_arrow(good)
    assert fresh.reused == 0 and all(e is not None for e in fresh.embedding or [None])
    second = BatchPredictor(copy.deepcopy(bundle), PredictorOptions(batch_size=32, embedding_store=True))
    calls = _encoded_rows(second)
    again = second.score_arrow(_with_store(good, fresh))
    assert calls == [] and again.reused == good.num_rows  # not one product encoded again
    assert again.embedding == [None] * good.num_rows  # nothing new to store
    plain = BatchPredictor(copy.deepcopy(bundle), PredictorOptions(batch_size=32)).score_arrow(good)
    for attr in bundle.taxonomy.names:
        # float32 vectors: the fusion sees the very numbers the encoders gave
        np.testing.assert_allclose(again.probs[attr], plain.probs[attr], atol=1e-6)


def test_a_stored_vector_of_a_photo_later_found_a_placeholder_is_not_fused(bundle, products) -> None:  # type: ignore[no-untyped-def]
    """A vector stored from bytes a later run found to be a placeholder (a CDN's "image not found",
    on too few products the night it was read) is not fused: the product is read again. A vector
    fused says which bytes it came from, so tonight's count of products per image includes it."""
    predictor = BatchPredictor(copy.deepcopy(bundle), PredictorOptions(batch_size=32, embedding_store=True))
    good = _usable(products, predictor.score_arrow(products))
    good = good.filter(pc.is_valid(good["image"])).slice(0, 6)
    first = predictor.score_arrow(good)
    assert first.image_digest is not None and None not in first.image_digest
    again = predictor.score_arrow(_with_store(good, first))
    assert again.reused == 6 and again.image_digest == first.image_digest
    found = frozenset(first.image_digest[:2])
    options = PredictorOptions(batch_size=32, embedding_store=True, placeholders=found)
    later = BatchPredictor(copy.deepcopy(bundle), options)
    calls = _encoded_rows(later)
    scored = later.score_arrow(_with_store(good, first))
    assert scored.reused == 4 and sum(calls) == 2  # the two placeholders' products read and encoded
    assert scored.image_digest == first.image_digest
    # which were fused (no photo read: they tell nothing of their image host tonight)
    assert first.fused == [False] * 6 and scored.fused == [False, False, True, True, True, True]


def test_vectors_encoded_under_bf16_autocast_are_not_offered_to_the_store(bundle, products) -> None:  # type: ignore[no-untyped-def]
    """Autocast runs only on a GPU; here the flag is set by hand (torch disables CUDA autocast on a
    machine without one): the scores come, the vectors for the store do not."""
    predictor = BatchPredictor(copy.deepcopy(bundle), PredictorOptions(batch_size=32, embedding_store=True))
    good = _usable(products, predictor.score_arrow(products))
    assert any(e is not None for e in predictor.score_arrow(good).embedding or [])
    predictor.autocast = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CUDA is not available. Disabling"
        scores = predictor.score_arrow(good)
    assert scores.embedding == [None] * good.num_rows and scores.content is not None


def test_a_changed_title_or_image_is_encoded_again_and_a_foreign_vector_is_ignored(bundle, products) -> None:  # type: ignore[no-untyped-def]
    predictor = BatchPredictor(copy.deepcopy(bundle), PredictorOptions(batch_size=500, embedding_store=True))
    good = _usable(products, predictor.score_arrow(products))
    first = predictor.score_arrow(good)
    stored = _with_store(good, first)
    titles = stored["title"].to_pylist()
    titles[0] = titles[0] + " (new)"
    images = stored["image"].to_pylist()
    k = next(i for i, b in enumerate(images) if b is not None and i > 0)
    other = next(b for i, b in enumerate(images) if b is not None and i != k and b != images[k])
    images[k] = other  # another product's photo: different bytes
    vectors = stored["stored_embedding"].to_pylist()
    vectors[-1] = vectors[-1][:-4]  # a vector of another width (other encoders' layout)
    changed = (
        stored.set_column(stored.schema.get_field_index("title"), "title", pa.array(titles, pa.string()))
        .set_column(stored.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
        .set_column(
            stored.schema.get_field_index("stored_embedding"),
            "stored_embedding",
            pa.array(vectors, pa.binary()),
        )
    )
    calls = _encoded_rows(predictor)
    again = predictor.score_arrow(changed)
    assert sum(calls) == 3 and again.reused == good.num_rows - 3
    assert [i for i, e in enumerate(again.embedding or []) if e is not None] == sorted(
        {0, k, good.num_rows - 1}
    )
    assert again.content is not None and first.content is not None
    assert again.content[0] != first.content[0] and again.content[k] != first.content[k]


def test_a_stored_vector_is_fused_only_while_today_s_image_policy_allows_its_image(
    bundle, products, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """A policy tightened since a vector was stored (a root or host no longer trusted, a smaller
    byte limit) holds for the products fused from the store too: they are read again and fail as
    the policy says, the others are still fused without encoding."""
    good = _usable(products, BatchPredictor(copy.deepcopy(bundle), PredictorOptions()).score_arrow(products))
    good = good.filter(pc.is_valid(good["image"])).slice(0, 8)
    trusted, dropped = tmp_path / "trusted", tmp_path / "dropped"
    uris: list[str | None] = []
    images = good["image"].to_pylist()
    for i, data in enumerate(images):
        folder = trusted if i < 3 else dropped
        folder.mkdir(exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(data)
        uris.append(str(folder / f"{i}.jpg") if i < 6 else None)  # 6, 7: inline bytes
        images[i] = None if i < 6 else data
    table = good.set_column(good.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    table = table.set_column(
        table.schema.get_field_index("image_uri"), "image_uri", pa.array(uris, pa.string())
    )
    both = ImagePolicy(roots=(str(trusted), str(dropped)))
    options = PredictorOptions(batch_size=32, embedding_store=True, image_policy=both)
    first = BatchPredictor(copy.deepcopy(bundle), options).score_arrow(table)
    assert first.image_error == [None] * 8 and first.reused == 0
    small = max(len(images[6]), len(images[7])) - 1  # one of the inline photos is now too big
    tightened = ImagePolicy(roots=(str(trusted),), max_bytes=small)
    predictor = BatchPredictor(
        copy.deepcopy(bundle), PredictorOptions(batch_size=32, embedding_store=True, image_policy=tightened)
    )
    calls = _encoded_rows(predictor)
    again = predictor.score_arrow(_with_store(table, first))
    too_big = 6 if len(images[6]) > small else 7
    assert again.image_error == [None] * 3 + [IMAGE_URI_ALLOWED] * 3 + [
        IMAGE_WITHIN_LIMITS if i == too_big else None for i in (6, 7)
    ]
    assert again.reused == 4 and sum(calls) == 4  # the trusted three and the small inline photo
    # a decoder or a pixel limit tightened holds for the inline photos too, judged on their header
    import io

    from PIL import Image

    kinds = [Image.open(io.BytesIO(images[i])).format for i in (6, 7)]
    without = ImagePolicy(roots=both.roots, formats=tuple(f for f in IMAGE_FORMATS if f != kinds[0]))
    fewer = ImagePolicy(roots=both.roots, max_pixels=16)
    for policy in (without, fewer):
        options = PredictorOptions(batch_size=32, embedding_store=True, image_policy=policy)
        fresh = BatchPredictor(copy.deepcopy(bundle), options).score_arrow(table).image_error
        assert fresh[6] == IMAGE_DECODABLE or policy is fewer
        again = BatchPredictor(copy.deepcopy(bundle), options).score_arrow(_with_store(table, first))
        assert again.image_error == [None] * 6 + fresh[6:]  # the URIs' photos are not read to judge


def test_a_text_only_model_s_vector_does_not_depend_on_the_image(bundle, products) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(fusion="text_only").model
    from catalog_enrichment.models.model import build_model

    model = build_model(cfg, bundle.taxonomy, vocab_size=len(bundle.tokenizer))
    text_only = ModelBundle(model, bundle.tokenizer, bundle.taxonomy, bundle.calibration, cfg, {}, "f" * 32)
    predictor = BatchPredictor(text_only, PredictorOptions(batch_size=64, embedding_store=True))
    first = predictor.score_arrow(products)
    stored = _with_store(products, first)
    no_images = stored.set_column(
        stored.schema.get_field_index("image"), "image", pa.nulls(stored.num_rows, pa.binary())
    )
    assert predictor.score_arrow(no_images).reused == products.num_rows


def test_the_fingerprint_follows_the_encoders_not_the_heads(bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = copy.deepcopy(bundle.model)
    fingerprint = embedding.encoder_fingerprint(model, bundle.tokenizer, bundle.model_config.text.max_length)
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(0.5)  # a new head
    assert (
        embedding.encoder_fingerprint(model, bundle.tokenizer, bundle.model_config.text.max_length)
        == fingerprint
    )
    saved = save_with_model(bundle, model, tmp_path / "new-head")
    assert BundleFolder(saved).encoder_fingerprint() == fingerprint == load_bundle(saved).encoder_fingerprint
    with torch.no_grad():
        next(model.text_encoders.parameters()).add_(1e-3)  # retrained encoders
    assert (
        embedding.encoder_fingerprint(model, bundle.tokenizer, bundle.model_config.text.max_length)
        != fingerprint
    )
    assert embedding.encoder_fingerprint(model, bundle.tokenizer, 8) != embedding.encoder_fingerprint(
        model, bundle.tokenizer, bundle.model_config.text.max_length
    )
    # the same weights under another timm pooling or architecture name compute other vectors
    before = embedding.encoder_fingerprint(model, bundle.tokenizer, 8)
    for change in ({"timm_kwargs": {"global_pool": "max"}}, {"name": "tf_" + model.cfg.image.name}):
        other = copy.copy(model)
        other.cfg = model.cfg.model_copy(update={"image": model.cfg.image.model_copy(update=change)})
        assert embedding.encoder_fingerprint(other, bundle.tokenizer, 8) != before


def test_the_fingerprint_follows_the_image_decoder(bundle, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Photos decoded by another decoder (Pillow, libjpeg-turbo) are other pixels, so other vectors."""
    from catalog_enrichment.data.decoding import current_digest
    from tests.data.test_decoding import one_level_off

    before = embedding.encoder_fingerprint(bundle.model, bundle.tokenizer, 8)
    one_level_off(monkeypatch)
    try:
        assert embedding.encoder_fingerprint(bundle.model, bundle.tokenizer, 8) != before
    finally:
        current_digest.cache_clear()


def test_models_that_read_tokens_fields_or_members_are_not_stored(taxonomy) -> None:  # type: ignore[no-untyped-def]
    from catalog_enrichment.models.model import build_model

    for fusion, stored in (("cross_attention", False), ("hierarchical", False), ("concat", True)):
        model = build_model(tiny_config(fusion=fusion).model, taxonomy, vocab_size=200)
        assert embedding.storable(model) is stored, fusion
