"""Streaming training input: hash splits that ignore row order (variants together), rank shards, and
the streamed reading in one process: it reads the table only in small batches, refuses what it does
not do by name, and trains the same model from the same rows written twice."""

from __future__ import annotations

import gc
import hashlib
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from catalog_enrichment.catalog.lakehouse import write_table
from catalog_enrichment.config import SyntheticConfig, ValidationConfig
from catalog_enrichment.contracts import Taxonomy, image_key
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.data.synthetic import products_batches
from catalog_enrichment.errors import CatalogEnrichError, ConfigError, ContractError
from catalog_enrichment.training.pipeline import train
from catalog_enrichment.training.splits import calibration_fraction
from catalog_enrichment.training.stream import (
    CALIBRATION,
    TEST,
    TRAIN,
    VALIDATION,
    Source,
    SplitBatches,
    TrainingRows,
    _Reader,
    _Rows,
    _Selection,
    arrow_source,
    rank_of,
    split_of,
    survey,
    table_source,
)
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(300)

FRACTIONS = {"validation": 0.1, "calibration": 0.2, "test": 0.15}


def test_a_products_split_is_a_hash_of_its_text_not_of_its_position() -> None:
    n = 20_000
    titles = [f"Product {i} cotton shirt" for i in range(n)]
    descriptions = [None if i % 3 else f"Soft fabric {i}" for i in range(n)]
    codes = split_of(titles, descriptions, seed=3, **FRACTIONS)
    order = np.random.default_rng(0).permutation(n)
    shuffled = split_of([titles[i] for i in order], [descriptions[i] for i in order], seed=3, **FRACTIONS)
    assert np.array_equal(shuffled, codes[order])
    # a variant (case and spacing aside, the same text) lands with its product
    variant = split_of(["PRODUCT 7  cotton SHIRT"], [None], seed=3, **FRACTIONS)
    assert variant[0] == codes[7]
    # each split holds its share: within 4 standard deviations of a binomial share over n products
    for code, share in ((VALIDATION, 0.1), (CALIBRATION, 0.2), (TEST, 0.15), (TRAIN, 0.55)):
        assert abs(float(np.mean(codes == code)) - share) < 4 * math.sqrt(share * (1 - share) / n), code
    # another seed is another split
    assert np.mean(split_of(titles, descriptions, seed=4, **FRACTIONS) != codes) > 0.4


def test_ranks_shard_products_by_id_evenly_whatever_the_order() -> None:
    ids = [f"P{i:07d}" for i in range(10_000)]
    ranks = rank_of(ids, seed=0, world=2)
    assert set(ranks.tolist()) == {0, 1} and abs(float(ranks.mean()) - 0.5) < 4 * math.sqrt(0.25 / 10_000)
    assert np.array_equal(rank_of(ids[::-1], seed=0, world=2), ranks[::-1])
    assert rank_of(ids, seed=0, world=1).tolist() == [0] * len(ids)


def _labelled(n: int, taxonomy: Taxonomy) -> pa.Table:
    return pa.Table.from_batches(
        [b for b, _ in products_batches(SyntheticConfig(products=n, seed=1, image_size=32), taxonomy)]
    )


def _cfg(**streaming: object):  # type: ignore[no-untyped-def]
    return tiny_config(epochs=2, training={"streaming": {"enabled": True, "batch_rows": 128, **streaming}})


def _digest(trained) -> str:  # type: ignore[no-untyped-def]
    h = hashlib.sha256()
    for name, tensor in sorted(trained.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    h.update(repr(sorted(trained.calibration.to_dict().items())).encode())
    return h.hexdigest()


class _Counted:
    """A source that records every batch it hands out (how big, how many passes)."""

    def __init__(self, source: Source) -> None:
        self.source, self.passes, self.largest = source, 0, 0

    def batches(self) -> Iterator[pa.RecordBatch]:
        self.passes += 1
        for batch in self.source.batches():
            self.largest = max(self.largest, batch.num_rows)
            yield batch


@pytest.mark.slow
def test_streaming_trains_from_small_batches_the_same_model_twice(tmp_path: Path, taxonomy: Taxonomy) -> None:
    table = _labelled(1500, taxonomy)
    write_table(tmp_path / "labelled", table)
    counted = _Counted(table_source(tmp_path / "labelled", batch_rows=128))
    source = Source(counted.batches, counted.source.rows, counted.source.names, counted.source.folder)
    first = train(source, taxonomy, _cfg(shuffle_rows=300))
    # the survey, two epochs with a validation pass each, the three held-out splits scored
    assert counted.passes == 1 + 2 * 2 + 3 and counted.largest <= 128
    # it learned: the loss fell, and colour (the easiest attribute) is written at 95 % precision
    assert first.history[1].train_loss < first.history[0].train_loss
    assert first.test_report["color"]["r_at_p95"] > 0.1
    assert first.calibration.target_precision == 0.95 and first.best_epoch in (1, 2)
    # the same rows written again (other file names, maybe another log order) train the same model
    write_table(tmp_path / "again", table)
    again = train(table_source(tmp_path / "again", batch_rows=128), taxonomy, _cfg(shuffle_rows=300))
    assert _digest(again) == _digest(first)


def test_the_same_products_are_held_out_whatever_the_order_the_rows_are_stored_in(
    tmp_path: Path, taxonomy: Taxonomy
) -> None:
    from catalog_enrichment.data.images import ImagePolicy
    from catalog_enrichment.data.preprocess import ImagePreprocessing
    from catalog_enrichment.training.stream import _Reader, survey

    table = _labelled(600, taxonomy)
    write_table(tmp_path / "labelled", table)
    write_table(tmp_path / "reversed", table.take(pa.array(np.arange(table.num_rows)[::-1])))

    def placed(folder: str) -> dict[str, tuple[int, int]]:
        """Each product's split and rank."""
        source = table_source(tmp_path / folder, batch_rows=128)
        reader = _Reader(source, taxonomy, ImagePolicy(), ImagePreprocessing(32))
        found = survey(reader, (0.1, 0.2, 0.15), seed=0, world=2, say=lambda m: None)
        return {
            pid: (int(code), int(rank))
            for pid, code, rank in zip(found.product_ids, found.codes, found.shards, strict=True)
        }

    first = placed("labelled")
    assert placed("reversed") == first and len(first) == 600
    assert {code for code, _ in first.values()} == {TRAIN, VALIDATION, CALIBRATION, TEST}


@pytest.mark.parametrize(
    ("training", "named"),
    [
        ({"crossfit_folds": 3}, "training.crossfit_folds"),
        ({"noise_pruning": {"enabled": True}}, "training.noise_pruning"),
        ({"train_fraction": 0.5}, "training.train_fraction"),
        (
            {"batch_size": 33, "distributed": {"processes": 2}},
            "must divide by training.distributed.processes 2",
        ),
    ],
)
def test_what_streaming_does_not_do_is_refused_by_name(
    taxonomy: Taxonomy, training: dict, named: str
) -> None:
    from catalog_enrichment.training.stream import arrow_source

    cfg = tiny_config(training={"streaming": {"enabled": True}, **training})
    with pytest.raises(ConfigError, match=named):
        train(arrow_source(_labelled(60, taxonomy)), taxonomy, cfg)


def test_streaming_refuses_a_separate_test_table_by_name(taxonomy: Taxonomy) -> None:
    with pytest.raises(ConfigError, match=r"training\.streaming does not support a separate test table"):
        train(_labelled(60, taxonomy), taxonomy, _cfg(), test_table=_labelled(60, taxonomy))


def test_in_memory_a_table_and_a_stored_source_of_it_train_the_same_model(
    tmp_path: Path, taxonomy: Taxonomy
) -> None:
    """An in-memory table is a source: read whole from its Delta table (the training job's path) it
    trains the model it trains when handed over in memory, in another row order."""
    table = _labelled(500, taxonomy)
    write_table(tmp_path / "labelled", table.take(pa.array(np.arange(table.num_rows)[::-1])))
    cfg = tiny_config(epochs=1)
    from_table = train(table, taxonomy, cfg)
    from_source = train(table_source(tmp_path / "labelled", batch_rows=128), taxonomy, cfg)
    assert from_source.splits.sizes() == from_table.splits.sizes()
    assert _digest(from_source) == _digest(from_table)


def test_distributed_training_needs_streaming() -> None:
    with pytest.raises(ConfigError, match=r"distributed\.processes > 1 needs streaming\.enabled"):
        tiny_config(training={"distributed": {"processes": 2}})


def test_the_survey_keeps_the_training_texts_only_for_a_tokenizer_it_trains(taxonomy: Taxonomy) -> None:
    from catalog_enrichment.data.images import ImagePolicy
    from catalog_enrichment.data.preprocess import ImagePreprocessing
    from catalog_enrichment.training.stream import _Reader, arrow_source, survey

    reader = _Reader(
        arrow_source(_labelled(300, taxonomy), batch_rows=64), taxonomy, ImagePolicy(), ImagePreprocessing(32)
    )
    fractions = (0.1, 0.2, 0.15)
    kept = survey(reader, fractions, seed=0, world=1, say=lambda m: None)
    bare = survey(reader, fractions, seed=0, world=1, say=lambda m: None, texts=False)
    assert len(kept.texts) == int((kept.codes == TRAIN).sum()) > 0 and bare.texts == []
    assert (bare.product_ids, bare.inputs) == (kept.product_ids, kept.inputs)
    assert np.array_equal(bare.codes, kept.codes)


def test_the_streamed_cross_fit_folds_keep_products_sharing_either_text_together(taxonomy: Taxonomy) -> None:
    """Two variants with the same description and titles edited apart (one names its colour): one
    group for the stack's cross-fit folds, as in memory - a fold's learner trained on one would
    otherwise score the other out of fold."""
    from catalog_enrichment.catalog.groups import table_groups
    from catalog_enrichment.data.images import ImagePolicy
    from catalog_enrichment.data.preprocess import ImagePreprocessing
    from catalog_enrichment.training.stream import _Reader, arrow_source, survey

    table = _labelled(300, taxonomy)
    titles = table["title"].to_pylist()
    descriptions = table["description"].to_pylist()
    for i in range(0, 40, 2):  # pairs: the same description, the second title edited
        descriptions[i + 1] = descriptions[i] = f"Soft jersey piece number {i} with a round neck"
        titles[i + 1] = f"{titles[i]} (black)"
    table = table.set_column(table.schema.get_field_index("title"), "title", pa.array(titles))
    table = table.set_column(
        table.schema.get_field_index("description"), "description", pa.array(descriptions)
    )
    reader = _Reader(arrow_source(table, batch_rows=64), taxonomy, ImagePolicy(), ImagePreprocessing(32))
    found = survey(reader, (0.1, 0.2, 0.15), seed=0, world=1, say=lambda m: None, fold_groups=True)
    folds = found.fold_groups()
    at = {pid: i for i, pid in enumerate(found.product_ids)}
    ids = table["product_id"].to_pylist()
    pairs = [(at[ids[i]], at[ids[i + 1]]) for i in range(0, 40, 2)]
    assert all(folds[a] == folds[b] for a, b in pairs)
    assert all(found.groups[a] != found.groups[b] for a, b in pairs)  # the split's hash keeps the pair apart
    # the same partition of the products as in memory (both numbered by first appearance)
    assert len(found.product_ids) == 300
    assert np.array_equal(folds[[at[p] for p in ids]], table_groups(table))


def test_the_streamed_health_baseline_counts_variants_as_in_memory(taxonomy: Taxonomy) -> None:
    """Products that share a title and description (a product's variants) carry less evidence than
    as many products: the run health checks divide by the baseline's design effect, streamed as in
    memory."""
    from catalog_enrichment.data.images import ImagePolicy
    from catalog_enrichment.data.preprocess import ImagePreprocessing
    from catalog_enrichment.training.memory import _usable_images
    from catalog_enrichment.training.stream import _Reader, survey

    table = _labelled(300, taxonomy)
    thrice = [i - i % 3 for i in range(300)]  # each text on three products: groups of three
    for name in ("title", "description"):
        column = table[name].to_pylist()
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.array([column[i] for i in thrice], pa.string())
        )
    reader = _Reader(arrow_source(table, batch_rows=64), taxonomy, ImagePolicy(), ImagePreprocessing(32))
    streamed = survey(reader, (0.1, 0.2, 0.15), seed=0, world=1, say=lambda m: None).inputs
    _, in_memory, _ = _usable_images(table, ImagePolicy(), ValidationConfig(), lambda m: None)
    assert streamed.design_effect == in_memory.design_effect == 3.0


def test_the_input_baseline_counts_only_the_titles_the_job_would_score(taxonomy: Taxonomy) -> None:
    """Titles the enrichment job's row rules quarantine (blank, a number, too long) never reach a
    night's checks, so the input baseline does not count them either - streamed as in memory - or
    every night's script and title-length checks would find them gone."""
    from catalog_enrichment.data.images import ImagePolicy
    from catalog_enrichment.data.preprocess import ImagePreprocessing
    from catalog_enrichment.health import SCRIPTS
    from catalog_enrichment.training.memory import _usable_images
    from catalog_enrichment.training.stream import _Reader, survey

    table = _labelled(300, taxonomy)
    titles = table["title"].to_pylist()
    titles[:30] = ["1234567"] * 10 + ["   "] * 10 + ["y" * 301] * 10
    table = table.set_column(table.schema.get_field_index("title"), "title", pa.array(titles, pa.string()))
    reader = _Reader(arrow_source(table, batch_rows=64), taxonomy, ImagePolicy(), ImagePreprocessing(32))
    streamed = survey(reader, (0.1, 0.2, 0.15), seed=0, world=1, say=lambda m: None).inputs
    _, in_memory, _ = _usable_images(table, ImagePolicy(), ValidationConfig(), lambda m: None)
    assert streamed.products == in_memory.products == 270
    assert streamed.scripts == in_memory.scripts and streamed.scripts[SCRIPTS.index("none")] == 0
    assert streamed.title_edges == in_memory.title_edges and max(streamed.title_edges) <= 300


def test_a_split_the_hash_leaves_empty_is_refused_by_the_survey(taxonomy: Taxonomy) -> None:
    """60 products in 6 articles of 10 variants: the hash of 6 texts, seed 1, puts none in the
    validation split, which would fail only after training; the survey names it instead."""
    from catalog_enrichment.data.images import ImagePolicy
    from catalog_enrichment.data.preprocess import ImagePreprocessing
    from catalog_enrichment.errors import CatalogEnrichError
    from catalog_enrichment.training.stream import _Reader, survey

    table = _labelled(60, taxonomy)
    for name, text in (("title", "Article {} cotton shirt"), ("description", "Soft fabric, article {}")):
        texts = [text.format(i // 10) for i in range(60)]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(texts, pa.string()))
    reader = _Reader(arrow_source(table, batch_rows=64), taxonomy, ImagePolicy(), ImagePreprocessing(32))
    fractions = (0.1, 0.3, 0.15)  # the defaults, with the automatic calibration share of 60 products
    with pytest.raises(
        CatalogEnrichError,
        match=r"^the validation split would hold no product: .* the 60 usable products have only 6 "
        r"distinct ones \(products in groups per split: train 40 in 4, validation 0 in 0, "
        r"calibration 10 in 1, test 10 in 1\); label more distinct products, or change",
    ):
        survey(reader, fractions, seed=1, world=1, say=lambda m: None)
    # another seed fills every split; a split the run does not hold out (the stack's) may be empty
    assert (np.bincount(survey(reader, fractions, seed=2, world=1, say=lambda m: None).codes) > 0).all()
    stack = survey(reader, (0.0, 0.0, 0.15), seed=2, world=1, say=lambda m: None)
    assert np.bincount(stack.codes, minlength=4).tolist() == [40, 0, 0, 20]
    with pytest.raises(CatalogEnrichError, match=r"^the test split would hold no product: .* train 60 in 6"):
        survey(reader, (0.0, 0.0, 0.15), seed=1, world=1, say=lambda m: None)


def test_a_product_twice_in_the_streamed_table_is_refused_by_the_survey(taxonomy: Taxonomy) -> None:
    table = _labelled(200, taxonomy)
    twice = pa.concat_tables([table, table.slice(7, 1)])
    with pytest.raises(ContractError, match=r"1 product id\(s\) appear more than once"):
        train(arrow_source(twice, batch_rows=64), taxonomy, _cfg())


def test_a_placeholder_behind_many_products_is_left_out_of_the_survey_and_every_pass(
    taxonomy: Taxonomy,
) -> None:
    """The same image bytes on more than ``validation.max_products_per_image`` products of the table
    (spread over record batches, none of which holds that many) are left out as in memory: not in
    the survey's labels, texts or baseline as usable images, and never read by an epoch or a
    held-out pass (which the labels of the scored splits would not line up with otherwise)."""
    from catalog_enrichment.contracts import IMAGE_SHARED
    from catalog_enrichment.data.images import ImagePolicy
    from catalog_enrichment.data.preprocess import ImagePreprocessing
    from catalog_enrichment.training.stream import _Reader, survey

    table = _labelled(300, taxonomy)
    images = table["image"].to_pylist()
    placeholder = next(b for b in images if b is not None)
    tiled = list(range(0, 300, 10))  # 30 products, at most 7 in a batch of 64
    for i in tiled:
        images[i] = placeholder
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    holders = {table["product_id"][i].as_py() for i, b in enumerate(images) if b == placeholder}
    reader = _Reader(arrow_source(table, batch_rows=64), taxonomy, ImagePolicy(), ImagePreprocessing(32))
    kept = survey(reader, (0.1, 0.2, 0.15), seed=0, world=1, say=lambda m: None)
    found = survey(reader, (0.1, 0.2, 0.15), seed=0, world=1, say=lambda m: None, shared_limit=20)
    assert len(holders) >= 30 and holders <= set(kept.product_ids)
    assert found.product_ids == [p for p in kept.product_ids if p not in holders]
    assert found.left_out == {**kept.left_out, IMAGE_SHARED: len(holders)}
    assert len(found.texts) == int((found.codes == TRAIN).sum())
    assert found.inputs.image[1] == kept.inputs.image[1] - len(holders)
    assert found.inputs.image[2] == kept.inputs.image[2] + len(holders)
    cfg = _cfg()
    assert cfg.validation.max_products_per_image == 20  # the default
    trained = train(arrow_source(table, batch_rows=64), taxonomy, cfg)
    assert set(trained.product_ids) == set(found.product_ids) and not holders & set(trained.product_ids)


def test_the_shuffle_buffer_holds_its_rows_not_their_record_batches(taxonomy: Taxonomy) -> None:
    """A buffer entry owns its own product's texts, image bytes and labels: were it to point into
    its record batch's rows, a batch would stay in memory until its last row left the buffer at
    random - about ``shuffle_rows * ln(batch_rows)`` rows held, not ``shuffle_rows``."""
    batch_rows, shuffle_rows = 64, 200
    reader = _Reader(
        arrow_source(_labelled(1500, taxonomy), batch_rows=batch_rows),
        taxonomy,
        ImagePolicy(),
        ImagePreprocessing(32),
    )
    rows = TrainingRows(reader, _Selection(0, (0.1, 0.2, 0.15), TRAIN), take=10**6, shuffle_rows=shuffle_rows)
    alive = [sum(type(o) is _Rows for o in gc.get_objects()) for k, _ in enumerate(rows) if k % 40 == 0]
    assert len(alive) > 15 and max(alive) <= math.ceil(shuffle_rows / batch_rows) + 2


def _passes(first: pa.Table, later: pa.Table) -> Source:
    """A source whose first pass (the survey) reads ``first`` and every later pass ``later``."""
    passes = itertools.count()

    def batches() -> Iterator[pa.RecordBatch]:
        return iter((later if next(passes) else first).to_batches(max_chunksize=64))

    return Source(batches, first.num_rows, tuple(first.column_names))


def _broken(table: pa.Table, rows: list[int]) -> pa.Table:
    """``table`` with the image of ``rows`` no image any more (a rewritten file, a failed read)."""
    images = table["image"].to_pylist()
    for i in rows:
        images[i] = b"not an image"
    return table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))


def _imaged(table: pa.Table, code: int, fractions: tuple[float, float, float]) -> int:
    """The first product of split ``code`` (seed 0) with an image."""
    codes = split_of(table["title"].to_pylist(), table["description"].to_pylist(), seed=0,
                     validation=fractions[0], calibration=fractions[1], test=fractions[2])  # fmt: skip
    images = table["image"].to_pylist()
    return next(i for i in range(table.num_rows) if codes[i] == code and images[i] is not None)


def test_a_validation_image_that_stops_reading_after_the_survey_stops_training_by_name(
    taxonomy: Taxonomy,
) -> None:
    """The survey keeps the labels of the products whose image reads; a validation product whose
    image no longer reads when an epoch scores the split would shift every later score against its
    label (or end the epoch on a shape mismatch): the run stops naming it instead."""
    table = _labelled(300, taxonomy)
    cfg = tiny_config(epochs=1, training={"streaming": {"enabled": True, "batch_rows": 64}})
    tcfg = cfg.training
    fractions = (
        tcfg.validation_fraction,
        calibration_fraction(300, tcfg.calibration_fraction),
        tcfg.test_fraction,
    )
    lost = _imaged(table, VALIDATION, fractions)
    pid = table["product_id"][lost].as_py()
    with pytest.raises(
        CatalogEnrichError,
        match=rf"^scoring a held-out split cannot use the image of 1 product\(s\) the survey pass found "
        rf"usable \('{pid}'\): .* changed, or failed to read, between passes .* rerun it",
    ):
        train(_passes(table, _broken(table, [lost])), taxonomy, cfg)


def _surveyed(source: Source, fractions: tuple[float, float, float], taxonomy: Taxonomy):  # type: ignore[no-untyped-def]
    """The survey of ``source``, its reader for the later passes (as the streamed reading makes it),
    an epoch of its training rows and its validation split's items (a list a batch)."""
    reader = _Reader(source, taxonomy, ImagePolicy(), ImagePreprocessing(32))
    found = survey(reader, fractions, seed=0, world=1, say=lambda m: None)
    reader = _Reader(source, taxonomy, ImagePolicy(), ImagePreprocessing(32), skipped=found.skipped)
    train_rows = int((found.codes == TRAIN).sum())
    epoch = TrainingRows(
        reader, _Selection(0, fractions, TRAIN), take=10**6, shuffle_rows=50, expected=train_rows
    )
    held_out = SplitBatches(
        reader, _Selection(0, fractions, VALIDATION), list, 16, found.products(VALIDATION)
    )
    return found, reader, epoch, held_out


def test_every_later_pass_reads_the_surveys_products_whatever_their_images_read_now(
    taxonomy: Taxonomy,
) -> None:
    """An image the survey could not use that reads later stays left out (its label was never
    kept); one the survey used that no longer reads stops the epoch, the held-out scoring and the
    stack's embedding pass, each naming the product."""
    table = _labelled(300, taxonomy)
    fractions = (0.1, 0.2, 0.15)
    val, trained = _imaged(table, VALIDATION, fractions), _imaged(table, TRAIN, fractions)
    names = [table["product_id"][i].as_py() for i in (val, trained)]
    codes = split_of(table["title"].to_pylist(), table["description"].to_pylist(), seed=0,
                     validation=0.1, calibration=0.2, test=0.15)  # fmt: skip
    # recovered after the survey: still left out, so every pass lines up with the survey's labels
    found, reader, epoch, held_out = _surveyed(
        _passes(_broken(table, [val, trained]), table), fractions, taxonomy
    )
    assert len(found.product_ids) == 298 and not set(names) & set(found.product_ids)
    assert len(list(epoch)) == int((codes == TRAIN).sum()) - 1
    assert sum(map(len, held_out)) == len(found.products(VALIDATION)) == int((codes == VALIDATION).sum()) - 1
    passed = [records for records, _ in reader.records(found.product_ids)]
    assert [p for records in passed for p in records.product_id] == found.product_ids
    # each carries the digests its images were checked by: the embedding cache's key names them
    for records in passed:
        assert len(records.image_digest) == len(records)
        for image, digest in zip(records.image, records.image_digest, strict=True):
            assert digest == (None if image is None else image_key(image))
    # lost after the survey: each pass stops, naming the product
    found, reader, epoch, held_out = _surveyed(
        _passes(table, _broken(table, [val, trained])), fractions, taxonomy
    )
    with pytest.raises(CatalogEnrichError, match=rf"^an epoch cannot use the image of 1 .*\('{names[1]}'\)"):
        list(epoch)
    with pytest.raises(CatalogEnrichError, match=rf"^scoring a held-out split .* 1 .*\('{names[0]}'\)"):
        list(held_out)
    with pytest.raises(CatalogEnrichError, match=r"^the embedding pass cannot use the image of 2 product"):
        list(reader.records(found.product_ids))
