"""Run health through the real job on both catalogs: a run of products like the held-out ones passes
every check; the same products with their photos' red and blue swapped fail the colour's value mix
and, with that check in block mode, the colour keeps the values the clean run wrote while the other
attributes commit; titles stripped to ids fail the input checks, which under the default modes keeps
every attribute out. The ``run_health`` table holds every check; ``report --health --check`` exits 0
and 1 on the runs. A night that blocked is read again by the next incremental run."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from catalog_enrichment.bench.drift import colour_shift, placeholder_images, stripped_titles
from catalog_enrichment.catalog import open_catalog
from catalog_enrichment.catalog.lakehouse import read_table, write_table
from catalog_enrichment.cli import main
from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import image_key
from catalog_enrichment.data.images import decode_image
from catalog_enrichment.enrich import RunScope, run_enrichment
from catalog_enrichment.versions import ModelVersion
from tests.conftest import tiny_config

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(900)]


def _with_health(cfg: AppConfig, **modes: str) -> AppConfig:
    health = cfg.validation.health.model_copy(update=modes)
    return cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"health": health})})


def _values(catalog: Any, attribute: str) -> list[tuple[Any, ...]]:
    rows = catalog.attribute_rows().to_pylist()
    return sorted((r["product_id"], r["value"], r["run_id"]) for r in rows if r["attribute"] == attribute)


def _runs(spark: Any, cfg: AppConfig, taxonomy: Any, bundle: Path, catalog: Any, load: Any) -> None:
    """The clean products; the same with colour-shifted photos, only value mix in block mode; the
    same with titles stripped, the defaults (every check blocks) - through ``catalog`` (``load`` puts
    a products table in it)."""
    model = ModelVersion("tiny", "1", bundle_dir=bundle)

    def run(config: AppConfig, run_id: str) -> dict[str, Any]:
        outcome = run_enrichment(
            spark,
            config,
            taxonomy,
            model=model,
            scope=RunScope(full=True, run_id=run_id),
            progress=lambda _m: None,
            catalog=catalog,
        )
        return outcome.report.summary()

    def failed(summary: dict[str, Any]) -> set[tuple[str, str]]:
        return {(h["scope"], h["check"]) for h in summary["health"] if h["status"] == "failed"}

    products = load(None)
    clean = run(cfg, "clean")
    assert clean["health_failures"] == [] and clean["health_blocked"] == {}
    checks = catalog.keyed_rows("run_health").to_pylist()
    names = taxonomy.outputs.names  # color_family (derived from color) too
    assert len(checks) == 4 * len(names) + 6  # 4 per attribute, 6 on the inputs
    assert {c["run_id"] for c in checks} == {"clean"}
    # every check passes; an attribute the model writes nothing of has no precision to estimate
    assert all(c["status"] == "passed" or c["message"] == "nothing written" for c in checks)
    before = {a: _values(catalog, a) for a in names}
    assert before["color"] and before["color_family"]

    load(colour_shift(products))
    shifted = run(_with_health(cfg, score_drift="warn", coverage="warn", inputs="warn"), "shifted")
    # both levels come from the colour scores: blocking one blocks the other
    assert ("color", "value_mix") in failed(shifted)
    assert list(shifted["health_blocked"]) == ["color", "color_family"]
    assert shifted["health_blocked"]["color"].startswith("color: value mix PSI")
    assert "color: value mix PSI" in shifted["health_blocked"]["color_family"]
    for attribute in names:
        after = _values(catalog, attribute)
        if attribute in ("color", "color_family"):  # what the clean run wrote, untouched
            assert after == before[attribute]
        else:  # this run's decisions replaced the clean run's
            assert {r[2] for r in after} <= {"shifted"}, attribute
            assert len(after) == shifted_written(catalog, attribute)
    rows = catalog.keyed_rows("run_health")
    mine = rows.filter(pc.equal(rows["run_id"], "shifted")).to_pylist()
    # the shifted photos move the families' mix as well as the colours'
    assert [(r["scope"], r["check"]) for r in mine if r["blocked"]] == [
        ("color", "value_mix"),
        ("color_family", "value_mix"),
    ]
    assert {r["mode"] for r in mine if r["check"] == "value_mix"} == {"block"}
    assert all(r["model_version"] == "1" and r["message"] for r in mine if r["status"] == "failed")

    before = {a: _values(catalog, a) for a in names}
    load(stripped_titles(products))
    stripped = run(cfg, "stripped")
    assert {("input", "title_length"), ("input", "description")} <= failed(stripped)
    assert list(stripped["health_blocked"]) == names  # every attribute reads the title
    assert "input title length" in stripped["health_blocked"]["color"]
    assert {a: _values(catalog, a) for a in names} == before  # nothing of it written


def _on_lakehouse(tmp_path: Path) -> AppConfig:
    """The tiny config on a lakehouse under ``tmp_path``, its products table at ``tmp_path / "products"``."""
    return tiny_config(
        catalog={"root": str(tmp_path / "lake"), "products": str(tmp_path / "products")},
        inference={"batch_size": 64, "device": "cpu"},
    )


def _night(spark: Any, cfg: AppConfig, taxonomy: Any, catalog: Any, model: ModelVersion, run_id: str,
           said: list[str], *, full: bool = False) -> dict[str, Any]:  # fmt: skip
    """One enrichment run of ``model`` into ``catalog`` (its log into ``said``); its summary."""
    scope = RunScope(full=full, run_id=run_id)
    outcome = run_enrichment(
        spark, cfg, taxonomy, model=model, scope=scope, progress=said.append, catalog=catalog
    )
    return outcome.report.summary()


def _written(catalog: Any, run_id: str) -> set[str]:
    """The products ``run_id`` wrote a value for."""
    return {r["product_id"] for r in catalog.attribute_rows().to_pylist() if r["run_id"] == run_id}


def shifted_written(catalog: Any, attribute: str) -> int:
    """Values the ``shifted`` run reported writing for ``attribute``."""
    return {r.run_id: r for r in catalog.read_reports()}["shifted"].written_per_attribute[attribute]


def test_health_on_the_lakehouse_and_report_health_check(  # type: ignore[no-untyped-def]
    spark, incoming, taxonomy, scoring_bundle, tmp_path, capsys
) -> None:
    source = read_table(incoming.products)
    clean = source.filter(pc.is_valid(source["product_id"])).slice(0, 1000)
    cfg = _on_lakehouse(tmp_path)

    def load(products: pa.Table | None) -> pa.Table:
        write_table(tmp_path / "products", clean if products is None else products, mode="overwrite")
        return clean

    _runs(spark, cfg, taxonomy, scoring_bundle, open_catalog(cfg.catalog), load)
    for run_id, code, says in (
        ("clean", 0, "every check passed"),
        ("shifted", 1, "blocked color (values not written): color: value mix PSI"),
        ("stripped", 1, "failed: "),
    ):
        capsys.readouterr()
        args = ["report", "--health", "--check", "--catalog", str(tmp_path / "lake"), "--run-id", run_id]
        assert main(args) == code
        out = capsys.readouterr().out
        assert says in out and ("PSI" in out) == (run_id != "clean")


def test_the_products_of_a_blocked_night_are_filled_by_the_next_clean_run(  # type: ignore[no-untyped-def]
    spark, incoming, taxonomy, scoring_bundle, tmp_path
) -> None:
    source = read_table(incoming.products)
    clean = source.filter(pc.is_valid(source["product_id"])).slice(0, 600)
    cfg = _on_lakehouse(tmp_path)
    catalog, model = open_catalog(cfg.catalog), ModelVersion("tiny", "1", bundle_dir=scoring_bundle)
    said: list[str] = []

    def run(products: pa.Table, run_id: str) -> dict[str, Any]:
        write_table(tmp_path / "products", products, mode="overwrite")
        return _night(spark, cfg, taxonomy, catalog, model, run_id, said)

    first = run(clean, "night-1")
    assert first["health_blocked"] == {} and first["embeddings_stored"] == first["embeddings_encoded"] > 0
    # the next night every product changed (after night 1's watermark, which is at most its start),
    # and its titles arrived stripped: nothing of it is written, and none of its vectors is stored
    now = pa.array([dt.datetime.now(dt.UTC)] * clean.num_rows, clean.schema.field("updated_at").type)
    later = clean.set_column(clean.schema.get_field_index("updated_at"), "updated_at", now)
    second = run(stripped_titles(later), "night-2")
    assert list(second["health_blocked"]) == taxonomy.outputs.names
    assert second["embeddings_encoded"] > 0 and second["embeddings_stored"] == 0
    assert {r["run_id"] for r in catalog.attribute_rows().to_pylist() if r["source"] == "model"} == {
        "night-1"
    }
    # the feed is fixed without touching updated_at: the next run reads night 2's products again
    third = run(later, "night-3")
    assert third["health_blocked"] == {} and "run night-2 kept color" in "\n".join(said)
    assert "reading on from run night-1" in "\n".join(said)
    runs = {r.run_id: r for r in catalog.read_reports()}
    # every row: read, or a repeat of one read (the copies with one updated_at now, and alike)
    assert runs["night-3"].rows_read + third.get("repeated_rows", 0) == clean.num_rows
    written = catalog.attribute_rows().to_pylist()  # a value decided alike again keeps night 1's row
    assert "night-3" in {r["run_id"] for r in written if r["source"] == "model"}


def imageless_of(products: pa.Table) -> set[str]:
    """The products without a photo."""
    ids, present = products["product_id"].to_pylist(), pc.is_valid(products["image"]).to_pylist()
    return {p for p, h in zip(ids, present, strict=True) if not h}


def test_placeholder_photos_are_quarantined_and_read_again_when_the_cdn_is_back(  # type: ignore[no-untyped-def]
    spark, incoming, taxonomy, scoring_bundle, tmp_path
) -> None:
    source = read_table(incoming.products)
    ids = source["product_id"].to_pylist()
    copies = Counter(ids)  # products on one row each: no copy of a placeholder row elsewhere
    clean = source.filter(pa.array([p is not None and copies[p] == 1 for p in ids])).slice(0, 400)
    cfg = _on_lakehouse(tmp_path)
    catalog, model = open_catalog(cfg.catalog), ModelVersion("tiny", "1", bundle_dir=scoring_bundle)
    said: list[str] = []

    def run(products: pa.Table, run_id: str, *, full: bool = False) -> dict[str, Any]:
        write_table(tmp_path / "products", products, mode="overwrite")
        return _night(spark, cfg, taxonomy, catalog, model, run_id, said, full=full)

    def quarantined(run_id: str) -> dict[str, list[str]]:
        rows = catalog.quarantine_rows().to_pylist()
        return {r["product_id"]: r["reasons"] for r in rows if r["run_id"] == run_id}

    def written(run_id: str) -> set[str]:
        return _written(catalog, run_id)

    # 30 % of the products arrive with the CDN's placeholder (the first 120, those with a photo)
    hit = pc.is_valid(clean["image"]).to_pylist()[:120]
    broken = pa.concat_tables([placeholder_images(clean.slice(0, 120)), clean.slice(120)])
    outage = run(broken, "outage")
    shared = {p for p, reasons in quarantined("outage").items() if "image_shared" in reasons}
    assert shared == {p for p, h in zip(clean["product_id"].to_pylist()[:120], hit, strict=True) if h}
    assert written("outage") and not written("outage") & shared  # the rest is written
    assert outage["health_blocked"] == {} and outage["row_rules"]["image_shared"] == len(shared)
    # the image check counts the products quarantined for their placeholder alone as having a photo,
    # as they did: the products left would hold the broken feed's photo-less ones at twice their
    # share (one that also broke a rule is no valid product, counted by no input check; the products
    # read are in the files' order, so the first 120 may hold such a row)
    retried = {p for p, reasons in quarantined("outage").items() if reasons == ["image_shared"]}
    (image,) = [c for c in outage["health"] if c["check"] == "image"]
    scored = {r.run_id: r for r in catalog.read_reports()}["outage"].rows_scored
    assert image["products"] >= scored + len(retried) and image["status"] == "passed"
    assert sum("image_shared: the image is on more than 20 products" in line for line in said) == 1
    assert {p for p, _n in outage["retry_images"]} == retried
    # the CDN is back, the rows unchanged: the next run reads those products again and fills them
    run(clean, "back")
    reports = {r.run_id: r for r in catalog.read_reports()}
    assert reports["back"].rows_read == len(retried) and written("back") and written("back") <= retried
    # every photo the placeholder: nothing written, and not a circuit breaker's abort either
    everything = run(placeholder_images(clean), "all-grey", full=True)
    imageless = imageless_of(clean)
    assert written("all-grey") <= imageless  # scored from their text, as every night
    assert everything["row_rules"]["image_shared"] == clean.num_rows - len(imageless)
    # a later night the feed sends the same tile for 5 changed products with a model colour, far
    # under the limit: the outage's report named it, so they are quarantined again and nothing is
    # written for them; the merchant gave the first one a colour, which takes the model's out (it
    # stood beside the merchant's while the tile did: only scored rows settled a pair)
    (tile,) = {k for k in outage["placeholder_images"] if k.startswith("sha256:")}

    def coloured() -> set[str]:
        rows = catalog.attribute_rows().to_pylist()
        return {r["product_id"] for r in rows if r["source"] == "model" and r["attribute"] == "color"}

    with_photo = clean.filter(pc.is_valid(clean["image"]))
    has_colour = pc.is_in(with_photo["product_id"], pa.array(sorted(coloured())))
    few = placeholder_images(with_photo.filter(has_colour).slice(0, 5))
    merchant = few["merchant_attributes"].to_pylist()
    merchant[0] = [("color", [taxonomy["color"].values[0]])]
    few = few.set_column(
        few.schema.get_field_index("merchant_attributes"), "merchant_attributes",
        pa.array(merchant, few.schema.field("merchant_attributes").type),
    )  # fmt: skip
    now = pa.array([dt.datetime.now(dt.UTC)] * 5, few.schema.field("updated_at").type)
    night = run(few.set_column(few.schema.get_field_index("updated_at"), "updated_at", now), "few-grey")
    assert night["placeholder_images"] == {tile: 5} and night["row_rules"]["image_shared"] == 5
    assert not written("few-grey")
    ids = few["product_id"].to_pylist()
    assert coloured() & set(ids) == set(ids[1:])


def test_a_model_that_reads_no_image_scores_the_products_a_placeholder_reached(  # type: ignore[no-untyped-def]
    spark, incoming, taxonomy, tmp_path
) -> None:
    """A text-only model has no placeholder to fear: the products a CDN outage's grey tile reached
    are scored from their text like the rest, none quarantined as ``image_shared``."""
    from catalog_enrichment.data.synthetic import generate_marketplace
    from catalog_enrichment.training.pipeline import train
    from tests.conftest import QUICK_TRAIN, save_trained

    market = generate_marketplace(tmp_path / "train", QUICK_TRAIN, taxonomy=taxonomy)
    trained = train(read_table(market.products), taxonomy, tiny_config(fusion="text_only", epochs=1))
    model = ModelVersion("text", "1", bundle_dir=save_trained(trained, tmp_path / "text-only"))
    source = read_table(incoming.products)
    ids = source["product_id"].to_pylist()
    copies = Counter(ids)
    clean = source.filter(pa.array([p is not None and copies[p] == 1 for p in ids])).slice(0, 200)
    write_table(
        tmp_path / "products", pa.concat_tables([placeholder_images(clean.slice(0, 100)), clean.slice(100)])
    )
    cfg = _on_lakehouse(tmp_path)
    catalog = open_catalog(cfg.catalog)
    outage = _night(spark, cfg, taxonomy, catalog, model, "outage", [])
    assert "image_shared" not in outage["row_rules"] and "placeholder_images" not in outage
    photo = {c["check"]: c["message"] for c in outage["health"] if c["check"].startswith("image")}
    assert photo == dict.fromkeys(("image", "image_tone"), "the model reads no photo")
    assert not any("image_shared" in r["reasons"] for r in catalog.quarantine_rows().to_pylist())
    report = {r.run_id: r for r in catalog.read_reports()}["outage"]
    assert report.rows_scored == report.rows_valid > 150


def test_a_placeholder_behind_the_products_own_urls_is_quarantined_and_never_stored(  # type: ignore[no-untyped-def]
    spark, incoming, taxonomy, scoring_bundle, tmp_path
) -> None:
    """Photos read from ``image_uri``: during an outage the CDN answers 120 products' own URLs with
    its placeholder, which no URL shows and validation cannot see. Scoring finds the same bytes on
    those products: they are quarantined as ``image_shared``, nothing is written for them and their
    vectors are not stored (a stored vector is fused by every later run instead of reading the photo
    again); when the CDN is back the next run reads them again and writes them."""
    source = read_table(incoming.products)
    ids = source["product_id"].to_pylist()
    copies = Counter(ids)
    clean = source.filter(pa.array([p is not None and copies[p] == 1 for p in ids]))
    clean = clean.filter(pc.is_valid(clean["image"])).slice(0, 300)
    photos = tmp_path / "photos"
    photos.mkdir()
    uris = []
    for i, data in enumerate(clean["image"].to_pylist()):
        (photos / f"{i}.jpg").write_bytes(data)
        uris.append(str(photos / f"{i}.jpg"))
    by_uri = clean.set_column(
        clean.schema.get_field_index("image"), "image", pa.nulls(clean.num_rows, pa.binary())
    )
    by_uri = by_uri.set_column(
        by_uri.schema.get_field_index("image_uri"), "image_uri", pa.array(uris, pa.string())
    )
    cfg = tiny_config(
        catalog={"root": str(tmp_path / "lake"), "products": str(tmp_path / "products")},
        inference={"batch_size": 64, "device": "cpu"},
        images={"roots": [str(photos)]},
    )
    # every attribute's check blocks (the defaults): the run health judges the products written,
    # not the placeholders' scores and grey photos, so the outage blocks nothing of the rest of the
    # night; the input checks warn (these 300 products all have a photo, against 97 % at training)
    cfg = _with_health(cfg, inputs="warn")
    catalog, model = open_catalog(cfg.catalog), ModelVersion("tiny", "1", bundle_dir=scoring_bundle)
    write_table(tmp_path / "products", by_uri)
    said: list[str] = []

    def run(run_id: str) -> dict[str, Any]:
        return _night(spark, cfg, taxonomy, catalog, model, run_id, said)

    def written(run_id: str) -> set[str]:
        return _written(catalog, run_id)

    placeholder_bytes = placeholder_images(clean.slice(0, 1))["image"][0].as_py()
    for i in range(120):
        (photos / f"{i}.jpg").write_bytes(placeholder_bytes)
    outage = run("outage")
    quarantined = {r["product_id"]: r["reasons"] for r in catalog.quarantine_rows().to_pylist()}
    hit = {p for p, reasons in quarantined.items() if "image_shared" in reasons}
    other = {p for p, reasons in quarantined.items() if "image_shared" not in reasons}  # corrupt rows
    assert hit == set(clean["product_id"].to_pylist()[:120]) - other and len(hit) > 100
    assert written("outage") and not written("outage") & hit
    assert outage["row_rules"]["image_shared"] == len(hit) and outage["health_blocked"] == {}
    failures = [(c["scope"], c["check"]) for c in outage["health"] if c["status"] == "failed"]
    assert failures == [("input", "image")]
    (tone,) = [c for c in outage["health"] if c["check"] == "image_tone"]
    assert 0 < tone["products"] <= clean.num_rows - len(hit)  # the placeholders' tones not counted
    assert outage["embeddings_stored"] == outage["embeddings_encoded"] - len(hit) > 0
    assert (
        sum(f"image_shared: {len(hit)} products' photos, as read, are placeholders" in line for line in said)
        == 1
    )
    # the CDN is back, the rows unchanged: the next run reads those products again and fills them
    for i in range(120):
        (photos / f"{i}.jpg").write_bytes(clean["image"][i].as_py())
    back = run("back")
    assert {r.run_id: r for r in catalog.read_reports()}["back"].rows_read == len(hit)
    # products read again for their photo have one by that choice: the image check counts none of
    # them (a night of them alone would otherwise find every photo there, against training's share)
    (image,) = [c for c in back["health"] if c["check"] == "image"]
    assert image["status"] == "skipped" and image["products"] == 0
    real = dict(zip(clean["product_id"].to_pylist(), clean["image"].to_pylist(), strict=True))
    decodes = sum(decode_image(real[p]) is not None for p in hit)  # some real photos are corrupt
    assert back["embeddings_encoded"] == decodes == back["embeddings_stored"] > 100
    assert written("back") and written("back") <= hit
    # a later night 5 products get new photos, and the CDN serves the same placeholder for them, far
    # under the limit: the outage's report named its bytes, so they are placeholders again and
    # nothing is written for them (their stored vectors are of the old URLs: not fused)
    (digest,) = outage["placeholder_images"]
    assert outage["placeholder_images"] == {digest: len(hit)} and "placeholder_images" not in back
    assert digest == image_key(placeholder_bytes)  # as validation names the bytes inline: one key
    rows = [clean["product_id"].to_pylist().index(p) for p in sorted(hit & written("back"))[:5]]
    new = [str(photos / f"new-{i}.jpg") for i in rows]
    for uri in new:
        Path(uri).write_bytes(placeholder_bytes)
    changed = by_uri.take(rows)
    for name, column in (
        ("image_uri", pa.array(new, pa.string())),
        ("updated_at", pa.array([dt.datetime.now(dt.UTC)] * 5, changed.schema.field("updated_at").type)),
    ):
        changed = changed.set_column(changed.schema.get_field_index(name), name, column)
    write_table(tmp_path / "products", changed, mode="overwrite")
    night = run("small-outage")
    assert night["placeholder_images"] == {digest: 5} and night["row_rules"]["image_shared"] == 5
    assert not written("small-outage") and night["embeddings_stored"] == 0


@pytest.mark.postgres
def test_health_on_postgres(spark, incoming, taxonomy, scoring_bundle, pg_catalog_config) -> None:  # type: ignore[no-untyped-def]
    source = read_table(incoming.products)
    clean = source.filter(pc.is_valid(source["product_id"])).slice(0, 1000)
    cfg = tiny_config(inference={"batch_size": 64, "device": "cpu"})
    cfg = cfg.model_copy(update={"catalog": pg_catalog_config})
    catalog = open_catalog(cfg.catalog)

    def load(products: pa.Table | None) -> pa.Table:
        catalog.load_products(clean if products is None else products)  # upserts by id
        return clean

    _runs(spark, cfg, taxonomy, scoring_bundle, catalog, load)
