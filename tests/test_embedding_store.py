"""The embedding store through the real job on both catalogs: a first run stores what it encoded, a
new head over the same encoders re-scores every product from the store (no encoder runs) and
writes what a run without the store writes; a rollback forgets what its runs stored; vacuum removes
what no live version uses."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from deltalake import DeltaTable

from catalog_enrichment.catalog import open_catalog
from catalog_enrichment.catalog.lakehouse import read_table, write_table
from catalog_enrichment.catalog.postgres import PostgresCatalog
from catalog_enrichment.catalog.runs import rollback
from catalog_enrichment.enrich import RunScope, run_enrichment
from catalog_enrichment.inference.bundle import BundleFolder, load_bundle
from catalog_enrichment.versions import ModelVersion
from tests.conftest import save_with_model, tiny_config, tiny_registry

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def new_head(scoring_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second version of the scoring model: other fusion and head weights, the same encoders."""
    bundle = load_bundle(scoring_bundle)
    model = copy.deepcopy(bundle.model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return save_with_model(bundle, model, tmp_path_factory.mktemp("new-head") / "tiny-v2")


def _catalog(kind: str, tmp: Path, products: Any, server: Any, store: bool) -> tuple[Any, Any]:
    inference = {"batch_size": 64, "device": "cpu", "embedding_store": store}
    if kind == "lakehouse":
        write_table(tmp / "products", products)
        cfg = tiny_config(catalog={"root": str(tmp / "lake")}, inference=inference)
        return cfg, open_catalog(cfg.catalog, products=tmp / "products")
    cfg = tiny_config(
        catalog={
            "kind": "postgres",
            "root": str(tmp / "pg-staging"),
            "postgres": {"db_schema": "embedding_store"},
        },
        inference=inference,
    )
    catalog = PostgresCatalog(cfg.catalog, dsn=server.dsn())
    catalog.load_products(products)
    return cfg, catalog


def _stored(catalog: Any, spark: Any, encoder: str) -> int:
    rows = catalog.stored_embeddings(spark, encoder)
    return 0 if rows is None else int(rows.count())


def _model_rows(catalog: Any) -> dict[tuple[str, str, str], float]:
    return {
        (r["product_id"], r["attribute"], r["value"]): r["confidence"]
        for r in catalog.attribute_rows().to_pylist()
        if r["source"] == "model"
    }


@pytest.mark.parametrize("kind", ["lakehouse", "postgres"])
def test_a_new_head_rescores_from_the_store_and_writes_what_a_fresh_encode_writes(  # type: ignore[no-untyped-def]
    kind, spark, pg_server, incoming, taxonomy, scoring_bundle, new_head, tmp_path, monkeypatch
) -> None:
    products = read_table(incoming.products).slice(0, 600)
    cfg, catalog = _catalog(kind, tmp_path, products, pg_server, store=True)
    encoder = BundleFolder(scoring_bundle).encoder_fingerprint()
    assert encoder is not None and BundleFolder(new_head).encoder_fingerprint() == encoder

    def run(bundle: Path, version: str, run_id: str, config: Any = cfg) -> dict[str, Any]:
        outcome = run_enrichment(
            spark,
            config,
            taxonomy,
            model=ModelVersion("tiny", version, bundle_dir=bundle),
            scope=RunScope(full=True, run_id=run_id),
            progress=lambda _m: None,
            catalog=catalog,
        )
        return {"scored": outcome.report.rows_scored, **outcome.report.summary()}

    first = run(scoring_bundle, "1", "store-1")
    scored = first["scored"]
    assert scored > 500  # the rows that broke a rule or whose image failed are quarantined
    assert (first["embeddings_reused"], first["embeddings_encoded"], first["embeddings_stored"]) == (
        0,
        scored,
        scored,
    )
    assert catalog.embedding_counts() == {encoder: scored}

    second = run(new_head, "2", "store-2")
    assert (second["embeddings_reused"], second["embeddings_encoded"]) == (scored, 0)  # no encoder ran
    from_store = _model_rows(catalog)

    without_store = cfg.model_copy(
        update={"inference": cfg.inference.model_copy(update={"embedding_store": False})}
    )
    third = run(new_head, "2", "store-3", without_store)
    assert "embeddings_reused" not in third
    fresh = _model_rows(catalog)
    assert from_store.keys() == fresh.keys()  # the same values written
    keys = sorted(fresh)
    np.testing.assert_allclose([from_store[k] for k in keys], [fresh[k] for k in keys], atol=1e-6)

    assert _stored(catalog, spark, "0" * 32) == 0  # other encoders: nothing stored for them
    assert _stored(catalog, spark, encoder) == scored
    everyone = catalog.stored_embeddings(spark, encoder).select("product_id")
    two = sorted(r["product_id"] for r in everyone.limit(2).collect())
    asked = spark.createDataFrame([(p,) for p in [*two, *two, "no-such-product"]], "product_id string")
    if kind == "postgres":  # looked up by the store's key: the JDBC reads name the products asked
        from pyspark.sql.readwriter import DataFrameReader

        read, queries = DataFrameReader.jdbc, []

        def jdbc(self: Any, *args: Any, predicates: Any = None, **kwargs: Any) -> Any:
            queries.extend(predicates or ["the whole store"])
            return read(self, *args, predicates=predicates, **kwargs)

        monkeypatch.setattr(DataFrameReader, "jdbc", jdbc)
    few = catalog.stored_embeddings(spark, encoder, asked)  # a run's products only, each once
    assert sorted(r["product_id"] for r in few.select("product_id").collect()) == two
    if kind == "postgres":
        (lookup,) = queries
        assert lookup.startswith("product_id = ANY(") and all(p in lookup for p in two)
        assert "whole" not in lookup and lookup.count("'") <= 2 * 3 + 2  # the 3 ids asked, no more
    assert catalog.vacuum_embeddings([encoder]) == 0
    # a rollback forgets what its runs stored (the next run reads their photos afresh): store-2
    # reused every vector and stored none, store-1 encoded them all
    said: list[str] = []
    rollback(catalog, run_id="store-2", progress=said.append)
    assert catalog.embedding_counts() == {encoder: scored} and not any("vectors" in m for m in said)
    rollback(catalog, run_id="store-1", progress=said.append)
    assert f"removed the {scored:,} vectors these runs stored from the embedding store" in said
    assert catalog.embedding_counts() == {} and _stored(catalog, spark, encoder) == 0
    assert catalog.vacuum_embeddings([]) == 0


def test_vectors_the_store_cannot_take_leave_the_committed_run_as_it_is(  # type: ignore[no-untyped-def]
    spark, incoming, taxonomy, scoring_bundle, tmp_path, monkeypatch
) -> None:
    """The vectors are staged after the commit: a staging disk that is full then costs the next run
    the encoding, never tonight's values."""
    from catalog_enrichment.enrich import stages

    cfg, catalog = _catalog("lakehouse", tmp_path, read_table(incoming.products).slice(0, 200), None, True)

    def full_disk(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stages, "stage_vectors", full_disk)
    outcome = run_enrichment(
        spark, cfg, taxonomy, model=ModelVersion("tiny", "1", bundle_dir=scoring_bundle),
        scope=RunScope(full=True, run_id="full-disk"), progress=lambda _m: None, catalog=catalog,
    )  # fmt: skip
    assert outcome.report.status == "succeeded" and _model_rows(catalog)
    assert "No space left on device" in outcome.report.summary()["embeddings_store_error"]
    assert catalog.embedding_counts() == {}


def test_a_store_that_cannot_be_read_costs_the_run_its_encoding_not_its_values(  # type: ignore[no-untyped-def]
    spark, incoming, taxonomy, scoring_bundle, tmp_path
) -> None:
    """The store is a cache: a file of it cut short (a crash, a disk) has the run encode every
    product and say why, as a full staging disk does, instead of failing every night."""
    from catalog_enrichment.catalog import lakehouse

    cfg, catalog = _catalog("lakehouse", tmp_path, read_table(incoming.products).slice(0, 200), None, True)

    def run(run_id: str) -> Any:
        return run_enrichment(
            spark, cfg, taxonomy, model=ModelVersion("tiny", "1", bundle_dir=scoring_bundle),
            scope=RunScope(full=True, run_id=run_id), progress=lambda _m: None, catalog=catalog,
        ).report  # fmt: skip

    first = run("first").summary()
    assert first["embeddings_stored"] == first["embeddings_encoded"] > 0
    written = _model_rows(catalog)
    (part, *_) = lakehouse.data_files(cfg.catalog.table("embeddings"))
    Path(part).write_bytes(b"PAR1 cut short")
    second = run("second")
    summary = second.summary()
    assert second.status == "succeeded" and _model_rows(catalog).keys() == written.keys()
    assert summary["embeddings_reused"] == 0 and summary["embeddings_encoded"] == first["embeddings_encoded"]
    assert "parquet" in summary["embeddings_store_error"].lower()


@pytest.mark.timeout(300)
def test_embeddings_lists_the_store_and_vacuums_what_no_live_version_uses(  # type: ignore[no-untyped-def]
    tmp_path, incoming, scoring_bundle, capsys
) -> None:
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from catalog_enrichment import registry
    from catalog_enrichment.catalog.embeddings import embeddings_schema
    from catalog_enrichment.cli import main

    client, uri, version, _ = tiny_registry(tmp_path, scoring_bundle, incoming)
    encoder, retired = BundleFolder(scoring_bundle).encoder_fingerprint(), "ab" * 16
    assert encoder is not None
    assert registry.live_encoders(client, "tiny") == {encoder: [version]}  # tagged at registration
    now = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    rows = [(encoder, f"p{i}") for i in range(2)] + [(retired, f"p{i}") for i in range(3)]
    staged = tmp_path / "staged"
    staged.mkdir()
    pq.write_table(
        pa.table(
            {
                "encoder": [e for e, _ in rows],
                "product_id": [p for _, p in rows],
                "content": ["c"] * 5,
                "embedding": [b"\0" * 8] * 5,
                "run_id": ["r"] * 5,
                "written_at": [now] * 5,
            }
        ).cast(embeddings_schema()),
        staged / "part-0.parquet",
    )
    lake = tmp_path / "lake"
    catalog = open_catalog(tiny_config(catalog={"root": str(lake)}).catalog)
    assert catalog.write_embeddings(str(staged)) == 5
    # the files a write replaced are deleted past the table's retention (0 hours here, 7 days by
    # default): the store does not grow by its size with every write
    DeltaTable(str(lake / "embeddings")).alter.set_table_properties(
        {"delta.deletedFileRetentionDuration": "interval 0 hours"}
    )
    assert catalog.write_embeddings(str(staged)) == 5  # an upsert: the same keys replaced, not doubled
    assert catalog.embedding_counts() == {encoder: 2, retired: 3}
    live = {Path(f).name for f in DeltaTable(str(lake / "embeddings")).file_uris()}
    assert {f.name for f in (lake / "embeddings").rglob("*.parquet")} == live
    flags = [
        "--catalog",
        str(lake),
        "--set",
        f"mlflow.tracking_uri={uri}",
        "--set",
        "mlflow.registered_model=tiny",
    ]
    assert main(["embeddings", *flags]) == 0
    listed = capsys.readouterr().out
    assert (
        f"{encoder}             2  tiny v{version}" in listed
        and f"{retired}             3  no live version" in listed
    )
    # before the first training registers (the documented `--fill` first), the store is listed and
    # not vacuumed: nothing tells which vectors the coming version uses
    unregistered = [*flags[:-1], "mlflow.registered_model=coming"]
    assert main(["embeddings", *unregistered]) == 0
    assert "model 'coming' is not registered yet" in capsys.readouterr().out
    assert main(["embeddings", *unregistered, "--vacuum"]) == 2
    assert "vacuum after a training registers" in capsys.readouterr().err
    assert catalog.embedding_counts() == {encoder: 2, retired: 3}
    assert main(["embeddings", *flags, "--vacuum"]) == 0
    assert "removed 3 vectors" in capsys.readouterr().out
    assert catalog.embedding_counts() == {encoder: 2}


def _store_of(tmp_path: Path, writes: list[list[tuple[str, str]]]) -> Any:
    """A lakehouse catalog whose store holds, per write (its own files), (encoder, product) rows."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from catalog_enrichment.catalog.embeddings import embeddings_schema

    catalog = open_catalog(tiny_config(catalog={"root": str(tmp_path / "lake")}).catalog)
    for k, rows in enumerate(writes):
        staged = tmp_path / f"staged-{k}"
        staged.mkdir()
        table = pa.table(
            {
                "encoder": [e for e, _ in rows],
                "product_id": [p for _, p in rows],
                "content": [f"c-{e[:2]}-{p}" for e, p in rows],
                "embedding": [f"{e[:2]}{p}".encode() for e, p in rows],
                "run_id": ["r"] * len(rows),
                "written_at": [dt.datetime(2026, 11, 1, tzinfo=dt.UTC)] * len(rows),
            }
        )
        pq.write_table(table.cast(embeddings_schema()), staged / "part-0.parquet")
        catalog.write_embeddings(str(staged))
    return catalog


@pytest.mark.timeout(120)
def test_a_store_with_deletion_vectors_is_read_with_the_same_filter(spark: Any, tmp_path: Path) -> None:
    """A store with deletion vectors (another writer's: Delta-Spark, Databricks) gives the encoder's
    asked rows only, its deleted rows left out - to training, streamed file by file, and to the
    run's Spark join alike - and counts them alike."""
    from tests.delta_protocol import delete_with_deletion_vector

    ours, other = "ab" * 16, "cd" * 16
    catalog = _store_of(tmp_path, [[(ours, "p0"), (other, "p1"), (ours, "p2"), (ours, "p3")]])
    delete_with_deletion_vector(tmp_path / "lake" / "embeddings", [0])  # the file's first row
    deleted = read_table(tmp_path / "lake" / "embeddings")
    assert deleted.num_rows == 3
    found = catalog.embeddings_of(ours, ["p0", "p1", "p2", "p3"])
    left = {r["product_id"] for r in deleted.to_pylist() if r["encoder"] == ours}
    assert sorted(found["product_id"].to_pylist()) == sorted(left)
    joined = catalog.stored_embeddings(spark, ours).select("product_id").collect()
    assert sorted(r["product_id"] for r in joined) == sorted(left)
    assert catalog.embedding_counts() == {ours: len(left), other: 1}


@pytest.mark.timeout(120)
def test_the_store_s_counts_stream_the_encoder_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted a batch at a time: the store's encoder column is never read whole."""
    from catalog_enrichment.catalog import lakehouse

    ours, other = "ab" * 16, "cd" * 16
    catalog = _store_of(tmp_path, [[(ours, f"p{i}") for i in range(5)], [(other, "p0")]])

    def whole(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the whole table was read")

    monkeypatch.setattr(lakehouse, "read_table", whole)
    assert catalog.embedding_counts() == {ours: 5, other: 1}


def _staged(folder: Path, encoder: str, ids: list[str], content: str) -> Path:
    """Store rows of 10,000 incompressible bytes each, staged as Parquet under ``folder``."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from catalog_enrichment.catalog.embeddings import embeddings_schema

    rng = np.random.default_rng(len(ids))
    folder.mkdir()
    table = pa.table(
        {
            "encoder": [encoder] * len(ids),
            "product_id": ids,
            "content": [f"{content}-{p}" for p in ids],
            "embedding": [rng.bytes(10_000) for _ in ids],
            "run_id": ["r"] * len(ids),
            "written_at": [dt.datetime(2026, 11, 1, tzinfo=dt.UTC)] * len(ids),
        }
    )
    pq.write_table(table.cast(embeddings_schema()), folder / "part-0.parquet")
    return folder


@pytest.mark.timeout(120)
def test_the_store_is_written_a_part_at_a_time_and_a_merge_too_large_for_memory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append into a new store commits a part of about ``STORE_PART_BYTES`` at a time; a merge
    into one that exists commits the whole night at once where memory allows, in parts where it
    allows only those (an upsert either way, never a doubled key); a merge the process's memory
    cannot hold is refused with what it takes and what to do, and leaves the store as it was."""
    from catalog_enrichment.catalog import embedded
    from catalog_enrichment.errors import CatalogEnrichError

    monkeypatch.setattr(embedded, "STORE_PART_BYTES", 25_000)  # about two rows of 10,000 bytes
    ours = "ab" * 16
    catalog = open_catalog(tiny_config(catalog={"root": str(tmp_path / "lake")}).catalog)
    store = tmp_path / "lake" / "embeddings"

    def operations() -> list[str]:
        return [h["operation"] for h in DeltaTable(str(store)).history()]

    first = [f"p{i}" for i in range(6)]
    assert catalog.write_embeddings(str(_staged(tmp_path / "first", ours, first, "old"))) == 6
    assert operations().count("WRITE") == 3
    again = [f"p{i}" for i in range(3, 9)]  # three stored, three new
    monkeypatch.setattr(embedded, "available_memory", lambda: 2**30)  # it holds the night
    assert catalog.write_embeddings(str(_staged(tmp_path / "again", ours, again, "new"))) == 6
    assert operations().count("MERGE") == 1
    stored_bytes = sum(DeltaTable(str(store)).get_add_actions(flatten=True)["size_bytes"].to_pylist())
    # room beside the store (three times it) for ten times a part: two rows a merge
    monkeypatch.setattr(embedded, "available_memory", lambda: 3 * stored_bytes + 10 * 25_000)
    later = [f"p{i}" for i in range(6, 12)]  # three stored, three new
    assert catalog.write_embeddings(str(_staged(tmp_path / "later", ours, later, "later"))) == 6
    assert operations().count("MERGE") == 1 + 3
    stored = read_table(store, columns=["product_id", "content"])
    rows = dict(zip(*stored.columns, strict=True))
    assert {str(p): str(c) for p, c in rows.items()} == {
        **{p: f"old-{p}" for p in first[:3]},
        **{p: f"new-{p}" for p in again[:3]},
        **{p: f"later-{p}" for p in later},
    }
    version = DeltaTable(str(store)).version()
    monkeypatch.setattr(embedded, "available_memory", lambda: 100_000)
    refused = r"holds 0.1 MB of vectors: .* takes about .* \(catalog\.kind: postgres\)"
    with pytest.raises(CatalogEnrichError, match=refused):
        catalog.write_embeddings(str(_staged(tmp_path / "third", ours, ["p0", "q1"], "third")))
    assert DeltaTable(str(store)).version() == version
    assert catalog.embedding_counts() == {ours: 12}


def test_free_memory_is_the_tightest_of_this_process_s_cgroups_less_their_usage_but_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cgroup v2: the process's own cgroup and each parent up to the mount, page cache counted free;
    a limit of ``max`` is none. cgroup v1 in a namespace (the listed folder is not mounted): the
    mount's own files. The machine's available memory caps both."""
    import types

    import psutil

    from catalog_enrichment.catalog import embedded

    gib = 2**30
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=64 * gib))
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    monkeypatch.setattr(
        embedded,
        "_CGROUP_MEMORY",
        {2: (v2, *embedded._CGROUP_MEMORY[2][1:]), 1: (v1, *embedded._CGROUP_MEMORY[1][1:])},
    )

    def cgroup(folder: Path, limit: str, used: str, cache: str, files: tuple[str, str, str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / files[0]).write_text(limit + "\n")
        (folder / files[1]).write_text(used + "\n")
        (folder / "memory.stat").write_text(f"anon 5\n{files[2]} {cache}\nfile 7\n")

    names = ("memory.max", "memory.current", "inactive_file")
    cgroup(v2 / "kubepods" / "pod1", str(4 * gib), str(3 * gib), str(gib), names)  # 2 GiB left
    cgroup(v2 / "kubepods", "max", str(3 * gib), "0", names)
    listing = tmp_path / "cgroup"
    listing.write_text("0::/kubepods/pod1\n")
    assert embedded.available_memory(listing) == 2 * gib
    cgroup(v2 / "kubepods", str(gib * 7 // 2), str(3 * gib), "0", names)  # the parent's is tighter
    assert embedded.available_memory(listing) == gib // 2
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    cgroup(v1, str(6 * gib), str(5 * gib), str(3 * gib), names)  # 4 GiB left
    listing.write_text("9:cpu,cpuacct:/yarn/c1\n4:memory:/yarn/c1\n")
    assert embedded.available_memory(listing) == 4 * gib
    listing.write_text("4:memory:/\n")
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # unlimited
    assert embedded.available_memory(listing) == 64 * gib
