"""The scoring tasks' pure parts without a SparkSession: a batch's decisions as the task's Arrow
output (the same as the per-product decisions), values people rejected."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from catalog_enrichment.contracts import SCORES_FINITE, Taxonomy
from catalog_enrichment.data.images import IMAGE_DECODABLE
from catalog_enrichment.inference.decide import merchant_attributes
from catalog_enrichment.inference.predictor import Scores
from catalog_enrichment.inference.spark import ENCODED_SCHEMA, OUTPUT_SCHEMA, decide_batch, encoded_batch
from tests.inference.test_decide import MERCHANT, policy_at

pytestmark = pytest.mark.timeout(60)


def test_a_batch_decision_is_the_per_product_decision_as_arrow(taxonomy: Taxonomy) -> None:
    """``decide_batch`` builds its Arrow output from arrays; it must say what ``decide`` says per product."""
    rng = np.random.default_rng(0)
    n = 64
    probs = {a.name: rng.random((n, len(a.values))).astype(np.float32) for a in taxonomy}
    merchant = [
        [("color", ["red"])] if i % 3 == 0 else ([("material", [])] if i % 3 == 1 else None) for i in range(n)
    ]
    errors = [IMAGE_DECODABLE if i % 7 == 0 else None for i in range(n)]
    batch = pa.RecordBatch.from_arrays(
        [pa.array([f"p{i}" for i in range(n)]), pa.array(merchant, MERCHANT)],
        names=["product_id", "merchant_attributes"],
    )
    policy = policy_at(taxonomy, value=0.7)
    out = decide_batch(
        policy,
        batch.slice(5),
        Scores({k: v[5:] for k, v in probs.items()}, errors[5:], [None] * len(errors[5:])),
    )
    assert out.schema == OUTPUT_SCHEMA and out.num_rows == n - 5
    values, scored = policy.decide(
        {k: v[5:] for k, v in probs.items()},
        [merchant_attributes(m) for m in merchant[5:]],
        np.array([e is not None for e in errors[5:]]),
    )
    assert out.column("scored").to_pylist() == scored
    assert out.column("values").to_pylist() == [
        [
            {"attribute": d.attribute, "value": d.value, "confidence": d.confidence, "threshold": d.threshold}
            for d in row
        ]
        for row in values
    ]
    assert out.column("image_error").to_pylist() == errors[5:]
    assert out.column("product_id").to_pylist() == [f"p{i}" for i in range(5, n)]
    # the known answer, product 6 (i % 3 == 0: merchant colour; no image error):
    # every attribute but colour scored; multi-class writes at most its top value, at >= 0.7
    row = out.column("values")[1].as_py()
    assert out.column("scored")[1].as_py() == [a for a in taxonomy.names if a != "color"]
    for a in taxonomy:
        p6 = probs[a.name][6].astype(np.float64)
        want = [] if a.name == "color" else [v for v, q in zip(a.values, p6, strict=True) if q >= 0.7]
        if a.kind == "multiclass":
            want = [a.values[int(p6.argmax())]] if p6.max() >= 0.7 else []
        assert [d["value"] for d in row if d["attribute"] == a.name] == want
    # product 7 (i % 7 == 0: undecodable image) is not decided at all
    assert out.column("values")[2].as_py() == [] and out.column("scored")[2].as_py() == []
    # product 6's merchant colour settles colour and its family (the catalog keeps no model value
    # there); product 21's too, though it is not decided (undecodable image: its merchant's values
    # need none); product 5 has none
    settled = out.column("settled").to_pylist()
    assert settled[1] == settled[16] == ["color", "color_family"] and settled[0] == []
    # an empty batch gives an empty output of the same schema
    empty = decide_batch(policy, batch.slice(0, 0), Scores({k: v[:0] for k, v in probs.items()}, [], []))
    assert empty.schema == OUTPUT_SCHEMA and empty.num_rows == 0


def test_a_product_scored_nan_is_marked_for_the_quarantine_and_the_rest_is_decided(
    taxonomy: Taxonomy,
) -> None:
    """A model fault that scores one product NaN (or infinite) costs that product, not the batch."""
    probs = {a.name: np.full((3, len(a.values)), 0.9, np.float32) for a in taxonomy}
    probs["pattern"][1, 0] = np.nan
    probs["color"][2, 1] = np.inf
    batch = pa.RecordBatch.from_arrays(
        [pa.array(["p0", "p1", "p2"]), pa.array([None] * 3, MERCHANT)],
        names=["product_id", "merchant_attributes"],
    )
    policy = policy_at(taxonomy, value=0.7)
    vectors = [b"a", b"nan", None]  # the store's vectors: the NaN product's is not kept
    out = decide_batch(
        policy, batch, Scores(probs, [None, None, IMAGE_DECODABLE], [None] * 3, ["d0", "d1", "d2"], vectors)
    )
    assert out.column("image_error").to_pylist() == [None, SCORES_FINITE, IMAGE_DECODABLE]
    assert out.column("embedding").to_pylist() == [b"a", None, None]
    assert out.column("scored").to_pylist()[1:] == [[], []] and out.column("values")[1].as_py() == []
    clean = decide_batch(
        policy, batch.slice(0, 1), Scores({k: v[:1] for k, v in probs.items()}, [None], [None])
    )
    assert out.column("values")[0] == clean.column("values")[0] and clean.column("values")[0].as_py()
    # `embeddings --fill` keeps no NaN product's vector either: it is a failure, as in the job
    encoded = encoded_batch(
        batch, Scores(probs, [None, None, IMAGE_DECODABLE], [None] * 3, ["d0", "d1", "d2"], vectors)
    )
    assert encoded.schema == ENCODED_SCHEMA
    assert encoded.column("image_error").to_pylist() == [None, SCORES_FINITE, IMAGE_DECODABLE]
    assert encoded.column("embedding").to_pylist() == [b"a", None, None]


def test_values_people_rejected_are_never_written_and_the_pair_is_still_scored(taxonomy: Taxonomy) -> None:
    probs = {a.name: np.full((2, len(a.values)), 0.9, np.float32) for a in taxonomy}
    for a in taxonomy:
        if a.kind == "multiclass":
            probs[a.name][:, 0] = 0.95  # the top value
    batch = pa.RecordBatch.from_arrays(
        [pa.array(["p0", "p1"]), pa.array([None, None], MERCHANT)],
        names=["product_id", "merchant_attributes"],
    )
    policy = policy_at(taxonomy, value=0.7)
    plain = decide_batch(policy, batch, Scores(probs, [None, None], [None, None]))
    color, pattern = taxonomy["color"], taxonomy["pattern"]
    rejected = {
        "p0": [f"color={color.values[1]}", f"pattern={pattern.values[0]}", "color=ultraviolet", "fit=slim"],
        "p9": [f"color={color.values[0]}"],  # a product not in the batch
    }
    out = decide_batch(policy, batch, Scores(probs, [None, None], [None, None]), rejected)
    before, after = plain.column("values")[0].as_py(), out.column("values")[0].as_py()
    gone = [(d["attribute"], d["value"]) for d in before if d not in after]
    # exactly the two rejected values; pattern's rejected top value is not replaced by its runner-up
    assert gone == [("color", color.values[1]), ("pattern", pattern.values[0])]
    assert not [d for d in after if d["attribute"] == "pattern"]
    assert out.column("scored").to_pylist() == plain.column("scored").to_pylist()
    assert out.column("values")[1] == plain.column("values")[1]  # p1: untouched


def test_a_valid_product_missing_from_the_decisions_stops_the_run_before_any_write() -> None:
    """Three rows read, none invalid, two decided: the books would balance on counts alone (valid is
    read less invalid), so the decided rows are counted too."""
    import datetime as dt

    from catalog_enrichment.enrich.stages import Validated, collect_decisions
    from catalog_enrichment.errors import CatalogEnrichError
    from catalog_enrichment.inference.spark import OUTPUT_SCHEMA
    from catalog_enrichment.validation.rules import ValidationCounts

    scored = pa.Table.from_pylist(
        [{"product_id": p, "scored": [], "settled": [], "values": []} for p in ("p1", "p2")],
        schema=OUTPUT_SCHEMA,
    )
    validated = Validated(None, ValidationCounts(3, 0), dt.datetime(2026, 11, 1, tzinfo=dt.UTC))  # type: ignore[arg-type]
    with pytest.raises(CatalogEnrichError, match=r"read 3 != valid 3 \(decided 2\) \+ quarantined 0"):
        collect_decisions(scored, validated, "r1")
    ok = Validated(None, ValidationCounts(2, 0), None)  # type: ignore[arg-type]
    assert collect_decisions(scored, ok, "r1").rows_scored == 2


def test_runs_zipping_one_bundle_at_once_each_find_it_whole(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two runs on one machine ship the same model version: each zips it under a name of its own
    and renames the whole zip into place (one shared temporary name made the slower rename fail)."""
    import threading
    import zipfile
    from pathlib import Path

    from catalog_enrichment.inference.spark import zipped_bundle

    bundle = tmp_path / "tiny-v1"
    (bundle / "weights").mkdir(parents=True)
    for i in range(40):
        (bundle / "weights" / f"part-{i}.bin").write_bytes(bytes(range(256)) * 400)
    start, found, errors = threading.Barrier(8), [], []

    def ship() -> None:
        start.wait()
        try:
            found.append(zipped_bundle(bundle))
        except Exception as exc:  # what the test is about: collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ship) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(found) == {tmp_path / "tiny-v1.zip"}
    with zipfile.ZipFile(tmp_path / "tiny-v1.zip") as z:
        assert len([n for n in z.namelist() if n.endswith(".bin")]) == 40 and z.testzip() is None
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["tiny-v1", "tiny-v1.zip"]


def test_a_zip_that_fails_part_way_is_not_left_beside_the_bundle(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A full disk stops the zip half-written: the error reaches the run and the partial zip is
    removed (each retry would otherwise leave one more in ``_models/``)."""
    import shutil

    from catalog_enrichment.inference.spark import zipped_bundle

    bundle = tmp_path / "tiny-v1"
    bundle.mkdir()
    (bundle / "weights.bin").write_bytes(b"\0" * 1000)

    def disk_full(base_name: str, *args: object, **kwargs: object) -> str:
        with open(base_name + ".zip", "wb") as half:
            half.write(b"PK\3\4")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "make_archive", disk_full)
    for _ in range(2):
        with pytest.raises(OSError, match="No space left"):
            zipped_bundle(bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-v1"]


def test_shipping_a_version_prunes_the_downloads_no_run_shipped_for_a_week(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``_models/`` holds one folder and one zip per downloaded version: shipping one removes the
    others no run shipped for UNUSED_FOR, never the one shipped, one shipped since (a backfill on
    an older version) or what registry.download_bundle did not name."""
    import os
    import time
    from types import SimpleNamespace

    from catalog_enrichment.inference import spark as spark_glue

    def made(name: str, days_ago: float, *, folder: bool = True) -> None:
        path = tmp_path / name
        if folder:
            path.mkdir()
            (path / "weights.pt").write_bytes(b"w")
        else:
            path.write_bytes(b"PK")
        stamp = time.time() - days_ago * 86400
        os.utime(path, (stamp, stamp))

    run = "0123456789ab"
    made(f"tiny-v3-{run}", 30)  # the version shipped now: downloaded a month ago
    made(f"tiny-v2-{run}", 8)
    made(f"tiny-v2-{run}.zip", 8, folder=False)
    made(f"tiny-v1-{run}", 2)  # a backfill shipped it two days ago
    made(f"tiny-v1-{run}.zip", 2, folder=False)
    made("my-bundle", 30)  # not a download
    made("notes.zip", 30, folder=False)
    shipped: list[str] = []
    monkeypatch.setattr(spark_glue, "_SHIPPED", {})
    fake = SimpleNamespace(sparkContext=SimpleNamespace(addArchive=shipped.append))
    assert spark_glue.ship_bundle(fake, tmp_path / f"tiny-v3-{run}") == f"tiny-v3-{run}.zip"  # type: ignore[arg-type]
    assert shipped == [str(tmp_path / f"tiny-v3-{run}.zip")]
    versions = [f"tiny-v{v}-{run}{zip_}" for v in (1, 3) for zip_ in ("", ".zip")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["my-bundle", "notes.zip", *versions])
    # the version shipped is marked used: a run on another version a week later keeps it until then
    week = spark_glue.UNUSED_FOR
    assert spark_glue.prune_downloads(tmp_path / f"tiny-v1-{run}", now=time.time() + week - 3600) == []
    later = spark_glue.prune_downloads(tmp_path / f"tiny-v1-{run}", now=time.time() + week + 3600)
    assert sorted(p.name for p in later) == [f"tiny-v3-{run}", f"tiny-v3-{run}.zip"]
    # a bundle given by path (not a download) prunes nothing beside it
    made(f"tiny-v0-{run}", 30)
    assert spark_glue.prune_downloads(tmp_path / "my-bundle") == []
    assert (tmp_path / f"tiny-v0-{run}").is_dir()


def test_a_version_a_run_finds_downloaded_is_marked_used_before_it_ships(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A run that reuses a version downloaded long ago marks it (folder and zip) when it finds it, so
    another run's pruning meanwhile - while this one validates its products - leaves it."""
    import os
    import time

    from catalog_enrichment import registry
    from catalog_enrichment.inference import spark as spark_glue
    from catalog_enrichment.versions import ModelVersion

    run = "0123456789ab"
    folder, archive = tmp_path / f"tiny-v4-{run}", tmp_path / f"tiny-v4-{run}.zip"
    folder.mkdir()
    archive.write_bytes(b"PK")
    stamp = time.time() - 8 * 86400
    for path in (folder, archive):
        os.utime(path, (stamp, stamp))
    monkeypatch.setattr(registry, "bundle_problems", lambda bundle: [])
    found = registry.download_bundle(None, ModelVersion("tiny", "4", run + "cd"), tmp_path)  # type: ignore[arg-type]
    assert found.bundle_dir == folder
    (tmp_path / f"tiny-v5-{run}").mkdir()
    assert spark_glue.prune_downloads(tmp_path / f"tiny-v5-{run}") == []
    assert folder.is_dir() and archive.is_file()


def test_each_photo_s_source_is_its_uri_s_host_and_a_source_is_out_only_when_none_of_its_photos_was_used(
    taxonomy: Taxonomy,
) -> None:
    """The task names where each photo was read from (none for inline bytes, which win over the
    URI, nor for a stored vector fused: no photo read); the driver calls a source out when it gave
    no usable photo and at least the minimum of its products not read again failed, and their
    retries are not spent that night."""
    from catalog_enrichment.contracts import IMAGE_SHARED
    from catalog_enrichment.data.images import IMAGE_READABLE
    from catalog_enrichment.enrich.stages import image_outages, retry_next

    uris = [
        "https://CDN.example.com:8443/a.jpg",
        "/photos/b.jpg",
        "file:///photos/c.jpg",
        "s3://bucket/d.jpg",
    ]
    uris += [None, "", "/e.jpg", "https://cdn.example.com/f.jpg"]
    batch = pa.RecordBatch.from_arrays(
        [
            pa.array([f"p{i}" for i in range(8)]),
            pa.array([None] * 6 + [b"x", None], pa.binary()),
            pa.array(uris),
        ],
        names=["product_id", "image", "image_uri"],
    )
    probs = {a.name: np.zeros((8, len(a.values)), np.float32) for a in taxonomy}
    policy = policy_at(taxonomy, value=0.7)
    out = decide_batch(policy, batch, Scores(probs, [None] * 8, [None] * 8))
    want = [
        "https://cdn.example.com:8443",
        "file",
        "file",
        "s3://bucket",
        None,
        None,
        None,
        "https://cdn.example.com",
    ]
    assert out.column("image_source").to_pylist() == want
    fused = [False, True, False, False, False, False, False, True]
    out = decide_batch(policy, batch, Scores(probs, [None] * 8, [None] * 8, fused=fused))
    assert out.column("image_source").to_pylist() == [
        None if f else w for w, f in zip(want, fused, strict=True)
    ]

    def staged(rows: list[tuple[str, str | None, str | None, str | None]]) -> pa.Table:
        names = ("product_id", "image_source", "image_error", "image_digest")
        return pa.Table.from_pylist([dict(zip(names, r, strict=True)) for r in rows], schema=OUTPUT_SCHEMA)

    night = staged(
        [
            # a: every photo failed (503s, its outage tile); b: one failed beside one read
            ("a1", "https://a", IMAGE_READABLE, None),
            ("a2", "https://a", IMAGE_SHARED, "sha256:tile"),
            ("a3", "https://a", IMAGE_READABLE, None),
            ("a4", None, None, "sha256:a4"),  # fused from its stored vector: no source
            ("b1", "https://b", IMAGE_READABLE, None),
            ("b2", "https://b", None, "sha256:b2"),
            # c: one failure, under the minimum; d: an undecodable photo is no outage's
            ("c1", "https://c", IMAGE_READABLE, None),
            ("d1", "https://d", IMAGE_DECODABLE, "sha256:d1"),
            ("d2", "https://d", IMAGE_DECODABLE, "sha256:d2"),
            ("i1", None, IMAGE_SHARED, "sha256:tile"),  # inline bytes: no source
            # e: two dead links read again, nothing else of the host read tonight
            ("e1", "https://e", IMAGE_READABLE, None),
            ("e2", "https://e", IMAGE_READABLE, None),
        ]
    )
    out_sources, waiting = image_outages(night, 2, retried={"a1", "e1", "e2"})
    assert out_sources == {"https://a": 3} and waiting == {"a1", "a2", "a3"}
    assert image_outages(night, 2)[0] == {"https://a": 3, "https://e": 2}  # not read again: out
    assert image_outages(night, 3, retried={"a1"}) == ({}, set())  # a: two fresh failures
    assert image_outages(night, 0) == ({}, set()) and image_outages(night.slice(0, 0), 2) == ({}, set())
    quarantine = pa.table(
        {
            "product_id": ["a1", "a2", "a3", "b1", "c1", "d1", "i1"],
            "reasons": [["image_readable"], ["image_shared"], ["image_readable", "title_not_blank"],
                        ["image_readable"], ["image_readable"], ["image_decodable"], ["image_shared"]],
        }
    )  # fmt: skip
    # a3 broke a row rule too (waits for a change); b1 and c1 spend a retry, a1 and a2 keep theirs
    tried = {"a1": 2, "b1": 1, "c1": 2}
    assert retry_next(quarantine, tried, 2, waiting) == ([("a1", 2), ("a2", 0), ("b1", 2), ("i1", 1)], 0)
    assert retry_next(quarantine, tried, 2) == ([("a2", 1), ("b1", 2), ("i1", 1)], 0)
    assert retry_next(quarantine, tried, 0, waiting) == ([], 0)
    # more than a run lists: the fewest attempts first, then the lowest ids
    assert retry_next(quarantine, tried, 2, waiting, limit=2) == ([("a2", 0), ("i1", 1)], 2)
    assert retry_next(quarantine, tried, 2, limit=2) == ([("a2", 1), ("i1", 1)], 1)
