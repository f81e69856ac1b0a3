"""The catalog's attribute table (Delta): one atomic MERGE per run, idempotent, reversible.

Write rules:

* For every (product, attribute) a run scored, the model's previous values are replaced by the new
  set (possibly empty); merchant rows are never changed, and a pair that has a merchant value (a
  merchant row, or one the products table gives: the run passes those pairs too) keeps and gets no
  model value at all.
* One MERGE commit per run, carrying the run as a Delta application transaction
  (``catalog-enrich/enrich/<run id>``, which every checkpoint keeps): a run id the table holds a
  transaction for is not merged again, whatever log cleanup removed since.
* Before its commit, a run records what it changes in the attribute-changes table (one partition
  per run): the model rows of every pair it changes, before and after. Rollback reads that, never
  the table's history or an older version of it, so log cleanup and ``vacuum`` do not touch it.
* :func:`rollback_runs` undoes runs, newest first, in one commit: every pair they changed gets its
  previous values back, unless a later run has changed the pair since, in which case that pair is
  left alone and reported; a pair a merchant's value holds now gets no model value back.

A run reads the attribute rows of its own products only (streamed batch by batch), so its driver
memory follows the increment, not the table.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.catalog.base import MergeResult, RollbackResult, RunWrite
from catalog_enrichment.catalog.lakehouse import (
    is_delta,
    read_products_of,
    read_where,
    schema_of,
    table_version,
)
from catalog_enrichment.contracts import blank_value, load_contract, merchant_key, merchant_value_given
from catalog_enrichment.errors import CatalogEnrichError

__all__ = [
    "META_MODEL_VERSION",
    "META_OPERATION",
    "META_RUN_ID",
    "MergeResult",
    "RollbackResult",
    "attributes_schema",
    "changes_schema",
    "ensure_attributes_table",
    "find_run_commit",
    "merchant_rows",
    "merge_run",
    "rollback_runs",
    "runs_of_model_version",
]

META_RUN_ID = "catalog_enrich.run_id"
META_OPERATION = "catalog_enrich.operation"
META_MODEL_VERSION = "catalog_enrich.model_version"
META_ROLLBACK_OF = "catalog_enrich.rollback_of"
KEY = ("product_id", "attribute", "value")
PAIR = ("product_id", "attribute")
_MERGE_ON = " AND ".join(f"t.{k} = s.{k}" for k in KEY)


# Row groups of the files this job writes: small enough that a scan or a MERGE holds a few of them
# (memory), large enough for Parquet's compression and statistics
ROW_GROUP_ROWS = 65_536


def writer_properties() -> Any:
    """What the job's writes to the attribute tables use (row groups of :data:`ROW_GROUP_ROWS`)."""
    from deltalake import WriterProperties

    return WriterProperties(max_row_group_size=ROW_GROUP_ROWS)


def attributes_schema() -> pa.Schema:
    return load_contract("attributes").arrow_schema()


def ensure_attributes_table(path: str | Path) -> None:
    """Create an empty attribute table at ``path`` when there is none."""
    from deltalake import write_deltalake

    if not is_delta(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        write_deltalake(str(path), attributes_schema().empty_table(), mode="error")


def merchant_rows(products: pa.Table, written_at: dt.datetime, names: Collection[str] = ()) -> pa.Table:
    """Merchant-source attribute rows from the products' ``merchant_attributes`` (catalog seeding);
    a key that is one of the taxonomy's ``names`` written in another case, width or with spaces
    around it (:func:`~catalog_enrichment.contracts.merchant_key`) is written as that name, once
    however many of its spellings hold the value."""
    named = {merchant_key(n): n for n in names}
    rows: dict[str, list[Any]] = {k: [] for k in attributes_schema().names}
    seen: set[tuple[str, str, str]] = set()
    for pid, merchant in zip(
        products["product_id"].to_pylist(), products["merchant_attributes"].to_pylist(), strict=True
    ):
        if pid is None or not merchant:
            continue
        for attribute, values in merchant:
            for value in values or []:
                name = named.get(merchant_key(attribute), attribute)
                if blank_value(value) or (pid, name, value) in seen:  # a null or blank entry is no value
                    continue
                seen.add((pid, name, value))
                for k, v in (
                    ("product_id", pid),
                    ("attribute", name),
                    ("value", value),
                    ("confidence", None),
                    ("threshold", None),
                    ("source", "merchant"),
                    ("model_name", None),
                    ("model_version", None),
                    ("run_id", None),
                    ("written_at", written_at),
                ):
                    rows[k].append(v)
    return pa.table(rows, schema=attributes_schema())


_APP = "catalog-enrich"
CHANGED_BY, CHANGED_IN, IMAGE = "changed_by_run", "changed_by_model_version", "image"


def _transaction(run_id: str, operation: str = "enrich") -> str:
    return f"{_APP}/{operation}/{run_id}"


def changes_schema() -> pa.Schema:
    """The attribute-changes table: attribute rows, the run that changed them, before or after."""
    extra = [
        pa.field(CHANGED_IN, pa.string()),
        pa.field(CHANGED_BY, pa.string()),
        pa.field(IMAGE, pa.string()),
    ]
    return pa.schema([*attributes_schema(), *extra])


def find_run_commit(path: str | Path, run_id: str, operation: str = "enrich") -> int | None:
    """The table version the run committed (``operation="rollback"``: the version that rolled it
    back), ``None`` when it never committed; from the table's application transactions."""
    from deltalake import DeltaTable

    if not is_delta(path):
        return None
    version = DeltaTable(str(path)).transaction_version(_transaction(run_id, operation))
    return None if version is None else int(version)


def runs_of_model_version(
    path: str | Path,
    changes: str | Path,
    model_name: str,
    model_version: str,
    reported: Mapping[str, str],
    quiet: Sequence[str] = (),
) -> list[tuple[int, str]]:
    """(table version, run id) of every committed, not-rolled-back run of a registered model's
    version, newest first (the runs from the changes table's partitions, their state from the
    transactions). A run's model is the one its report names (``reported``: run id -> model
    name), else the one its written rows name; a run with neither is kept. ``quiet``: the runs
    the reports give to this model version, which count where they committed though they changed
    nothing (no changes partition names them), as PostgreSQL's run log counts them."""
    from deltalake import DeltaTable

    runs = _live_runs(path, changes, [(CHANGED_IN, "=", str(model_version))])
    unreported = [run for _, run in runs if run not in reported]
    written = _models_written(changes, unreported) if unreported else {}
    named = {**written, **reported}
    found = [(v, run) for v, run in runs if run not in named or named[run] == model_name]
    listed = {run for _, run in found}
    extra = [run for run in quiet if run not in listed]
    if extra and is_delta(path):
        table = DeltaTable(str(path))
        for run in extra:
            committed = table.transaction_version(_transaction(run))
            if committed is not None and table.transaction_version(_transaction(run, "rollback")) is None:
                found.append((int(committed), run))
    return sorted(found, reverse=True)


def _models_written(changes: str | Path, run_ids: Sequence[str]) -> dict[str, str]:
    """The model name of the values each of ``run_ids`` wrote (its after-image rows'); a run that
    only removed values has none."""
    wanted = pc.field(CHANGED_BY).isin(pa.array(list(run_ids), pa.string())) & (pc.field(IMAGE) == "after")
    rows = read_where(changes, wanted, [CHANGED_BY, "model_name"])
    names = zip(rows[CHANGED_BY].to_pylist(), rows["model_name"].to_pylist(), strict=True)
    return {str(r): str(m) for r, m in names if m}


def _live_runs(
    path: str | Path, changes: str | Path, partitions: list[tuple[str, str, str]] | None = None
) -> list[tuple[int, str]]:
    """(table version, run id) of every committed, not-rolled-back run that recorded a change (in
    the ``partitions`` of the changes table given), newest first."""
    from deltalake import DeltaTable

    if not is_delta(changes) or not is_delta(path):
        return []
    parts = DeltaTable(str(changes)).partitions(file_pruning_predicate=partitions)
    table = DeltaTable(str(path))
    live = []
    for run in {p[CHANGED_BY] for p in parts}:
        version = table.transaction_version(_transaction(run))
        if version is not None and table.transaction_version(_transaction(run, "rollback")) is None:
            live.append((int(version), run))
    return sorted(live, reverse=True)


def _tagged(table: pa.Table, action: str) -> pa.Table:
    return table.append_column("_action", pa.array([action] * table.num_rows, pa.string()))


def _merge_model_rows(
    path: str | Path,
    read_at: int,
    put: pa.Table,
    delete: pa.Table,
    metadata: dict[str, str],
    transactions: Sequence[str],
) -> tuple[int, dict[str, Any]]:
    """One MERGE commit on model rows only, on the snapshot ``read_at`` that ``put`` and ``delete``
    were computed from: ``put`` rows are updated or inserted, ``delete`` rows removed; merchant
    rows are never matched for change. The commit must be the next version (no retry: a writer
    that committed since the rows were read fails this one, so no pair keeps values of both) and
    carries the application transactions ``transactions`` with that version. Returns that version
    and deltalake's merge metrics (none where there was no row to merge: a MERGE of nothing
    commits nothing, so :func:`_commit_nothing` carries the transactions instead)."""
    from deltalake import CommitProperties, DeltaTable, Transaction
    from deltalake.exceptions import CommitFailedError

    version = read_at + 1
    if not put.num_rows and not delete.num_rows:
        _commit_nothing(path, read_at, metadata, transactions)
        return version, {}
    table = DeltaTable(str(path), version=read_at)
    properties = CommitProperties(
        custom_metadata=metadata,
        max_commit_retries=0,
        app_transactions=[Transaction(app_id=t, version=version) for t in transactions],
    )
    schema = attributes_schema()
    source = pa.concat_tables([_tagged(put.cast(schema), "put"), _tagged(delete.cast(schema), "delete")])
    columns = {c: f"s.{c}" for c in schema.names}
    merge = (
        table.merge(
            source,
            predicate=_MERGE_ON,
            source_alias="s",
            target_alias="t",
            streamed_exec=False,  # the source is one run's rows: its key ranges prune the target's files
            writer_properties=writer_properties(),
            commit_properties=properties,
        )
        .when_matched_update(updates=columns, predicate="s._action = 'put' AND t.source = 'model'")
        .when_matched_delete(predicate="s._action = 'delete' AND t.source = 'model'")
        .when_not_matched_insert(updates=columns, predicate="s._action = 'put'")
    )
    try:
        return version, dict(merge.execute())
    except CommitFailedError as exc:
        raise _concurrent(path, exc) from None


def _commit_nothing(
    path: str | Path, read_at: int, metadata: dict[str, str], transactions: Sequence[str]
) -> None:
    """A commit that changes no row, carrying ``transactions`` as the next version after
    ``read_at`` (as :func:`_merge_model_rows`' do): a run that changed nothing keeps its id, as
    PostgreSQL's run log does, so a later attempt of it finds it merged and its rollback finds
    nothing to undo."""
    from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
    from deltalake.exceptions import CommitFailedError

    version = read_at + 1
    properties = CommitProperties(
        custom_metadata=metadata,
        max_commit_retries=0,
        app_transactions=[Transaction(app_id=t, version=version) for t in transactions],
    )
    table = DeltaTable(str(path), version=read_at)
    try:
        write_deltalake(table, attributes_schema().empty_table(), mode="append", commit_properties=properties)
    except CommitFailedError as exc:
        raise _concurrent(path, exc) from None


def _version(path: str | Path) -> int:
    """The attribute table's current version: what a write reads its rows at and commits on."""
    version = table_version(path)
    if version is None:
        raise CatalogEnrichError(f"{path} is not a Delta table: the attribute table must be one")
    return version


def _rows_for(path: str | Path, product_ids: pa.Array, version: int) -> pa.Table:
    """The attribute rows of the given products at ``version``, streamed: memory follows the
    products, not the table."""
    if not len(product_ids):
        return attributes_schema().empty_table()
    return read_products_of(path, product_ids.to_pylist(), version=version).cast(attributes_schema())


_PAIR_SCHEMA = pa.schema([("product_id", pa.string()), ("attribute", pa.string())])
_KEY_SCHEMA = pa.schema([(k, pa.string()) for k in KEY])


def _pairs(table: pa.Table) -> pa.Table:
    return table.select(list(PAIR)).cast(_PAIR_SCHEMA).group_by(list(PAIR)).aggregate([]).select(list(PAIR))


def _semi(left: pa.Table, right: pa.Table, keys: Iterable[str], anti: bool = False) -> pa.Table:
    keys = list(keys)
    if left.num_rows == 0 or right.num_rows == 0:
        return left if anti else left.slice(0, 0)
    joined = left.join(right.select(keys), keys=keys, join_type="left anti" if anti else "left semi")
    return joined.select(left.column_names).cast(left.schema)  # joins drop field nullability


def merge_run(
    path: str | Path,
    run: RunWrite,
    *,
    changes: str | Path,
    linked: Mapping[str, Sequence[str]] | None = None,
) -> MergeResult:
    """Replace the model's values of every pair of the run (``run.pairs``) with ``run.values``
    in one commit, removing ``run.retract`` where this model version wrote them (:class:`RunWrite`);
    ``changes``: the attribute-changes table, where the run's before and after rows go first;
    ``linked``: as :func:`rollback_runs`' (a merchant row of a colour family holds the colour too).
    """
    values, scored, retract, run_id = run.values, run.pairs, run.retract, run.run_id
    model_name, model_version, written_at = run.model_name, run.model_version, run.written_at
    ensure_attributes_table(path)
    committed = find_run_commit(path, run_id)
    if committed is not None:
        return MergeResult(committed, already_committed=True)
    retract = _KEY_SCHEMA.empty_table() if retract is None else retract.select(list(KEY)).cast(_KEY_SCHEMA)
    ids = pc.unique(
        pa.chunked_array(
            [*scored["product_id"].cast(pa.string()).chunks, *retract["product_id"].chunks], type=pa.string()
        )
    )
    read_at = _version(path)
    current = _rows_for(path, ids, read_at)
    writer = (str(model_name), str(model_version))
    scored_pairs, new, gone = _replaced(current, scored, values, retract, writer, linked or {})
    upserts = _model_rows(new, model_name, str(model_version), run_id, written_at)
    skipped = _pairs(scored).num_rows - scored_pairs.num_rows if scored.num_rows else 0
    metadata = {META_RUN_ID: run_id, META_OPERATION: "enrich", META_MODEL_VERSION: str(model_version)}
    if upserts.num_rows + gone.num_rows == 0:  # no version changed, but the run id is committed
        _forget_changes(changes, run_id)  # what a killed attempt of it recorded is not this run's
        _commit_nothing(path, read_at, metadata, [_transaction(run_id)])
        return MergeResult(None, merchant_pairs_skipped=skipped)
    touched = _pairs(pa.concat_tables([_pairs(upserts), _pairs(gone)]))
    before = _semi(current.filter(pc.equal(current["source"], "model")), touched, PAIR)
    kept = _semi(_semi(before, gone, KEY, anti=True), upserts, KEY, anti=True)
    _record_changes(changes, run_id, str(model_version), before, pa.concat_tables([kept, upserts]))
    version, metrics = _merge_model_rows(
        path,
        read_at,
        upserts,
        gone,
        metadata,
        [_transaction(run_id)],
    )
    return MergeResult(
        version,
        inserted=int(metrics["num_target_rows_inserted"]),
        updated=int(metrics["num_target_rows_updated"]),
        deleted=int(metrics["num_target_rows_deleted"]),
        merchant_pairs_skipped=skipped,
        written={str(v["values"]): int(v["counts"]) for v in upserts["attribute"].value_counts().to_pylist()},
        products=_products_per_attribute(upserts),
    )


def _products_per_attribute(rows: pa.Table) -> dict[str, int]:
    """Per attribute, the distinct products of ``rows``."""
    per = rows.group_by("attribute").aggregate([("product_id", "count_distinct")])
    pairs = zip(per["attribute"].to_pylist(), per["product_id_count_distinct"].to_pylist(), strict=True)
    return {str(a): int(n) for a, n in pairs}


def _replaced(
    current: pa.Table,
    scored: pa.Table,
    values: pa.Table,
    retract: pa.Table,
    writer: tuple[str, str],
    linked: Mapping[str, Sequence[str]],
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Of the rows the catalog holds for the run's products: the scored pairs no merchant row holds
    (of the attribute - named in any case, width or spacing, :func:`merchant_key` - or of one
    ``linked`` to it), their new values, and the model rows that go (of the run's pairs, not among
    the new values - a pair the merchant holds keeps none - or rejected among the values the
    run's ``writer`` - registered model name, version - wrote)."""
    pairs = _pairs(scored)
    held = _pairs(current.filter(pc.equal(current["source"], "merchant")))
    spelled = {merchant_key(a): a for a in [*pc.unique(pairs["attribute"]).to_pylist(), *linked]}
    names = pa.array(pc.unique(held["attribute"]).to_pylist(), pa.string())
    ours = pa.array([spelled.get(merchant_key(a), a) for a in names.to_pylist()], pa.string())
    held = held.set_column(1, "attribute", ours.take(pc.index_in(held["attribute"], value_set=names)))
    merchant_pairs = _with_linked(held, linked)
    scored_pairs = _semi(pairs, merchant_pairs, PAIR, anti=True)
    new = _semi(values.select([*KEY, "confidence", "threshold"]), scored_pairs, PAIR)
    model = current.filter(pc.equal(current["source"], "model"))
    gone = _semi(_semi(model, pairs, PAIR), new, KEY, anti=True)
    mine = model.filter(
        pc.and_(pc.equal(model["model_name"], writer[0]), pc.equal(model["model_version"], writer[1]))
    )
    # rejected values the scored pairs did not already drop (a new value is never a rejected one)
    rejected = _semi(_semi(_semi(mine, retract, KEY), gone, KEY, anti=True), new, KEY, anti=True)
    return scored_pairs, new, pa.concat_tables([gone, rejected])


def _with_linked(pairs: pa.Table, linked: Mapping[str, Sequence[str]]) -> pa.Table:
    """``pairs`` and, for each, the pairs of its product and the attributes ``linked`` to its own."""
    tables = [pairs]
    for attribute, others in linked.items():
        ids = pairs.filter(pc.equal(pairs["attribute"], attribute))["product_id"]
        for other in others:
            tables.append(pa.table({"product_id": ids, "attribute": pa.repeat(pa.scalar(other), len(ids))}))
    return _pairs(pa.concat_tables([t.cast(_PAIR_SCHEMA) for t in tables]))


def _model_rows(
    values: pa.Table, model_name: str, model_version: str, run_id: str, written_at: dt.datetime
) -> pa.Table:
    """``values`` (key, confidence, threshold) as attribute rows the model wrote in this run."""
    schema, n = attributes_schema(), values.num_rows
    return pa.table(
        {
            **{k: values[k] for k in KEY},
            "confidence": values["confidence"],
            "threshold": values["threshold"],
            "source": pa.array(["model"] * n, pa.string()),
            "model_name": pa.array([model_name] * n, pa.string()),
            "model_version": pa.array([model_version] * n, pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
            "written_at": pa.array([written_at] * n, schema.field("written_at").type),
        },
        schema=schema,
    )


def _record_changes(
    changes: str | Path, run_id: str, model_version: str, before: pa.Table, after: pa.Table
) -> None:
    """The run's before and after rows, replacing any a killed attempt of the same run left."""
    from deltalake import write_deltalake
    from deltalake.exceptions import CommitFailedError, DeltaError

    def image(rows: pa.Table, name: str) -> pa.Table:
        n = rows.num_rows
        extra = {CHANGED_IN: model_version, CHANGED_BY: run_id, IMAGE: name}
        for column, value in extra.items():
            rows = rows.append_column(column, pa.array([value] * n, pa.string()))
        return rows

    rows = pa.concat_tables([image(before.cast(attributes_schema()), "before"), image(after, "after")])
    if not is_delta(changes):
        Path(changes).mkdir(parents=True, exist_ok=True)
        try:
            empty = changes_schema().empty_table()
            write_deltalake(str(changes), empty, partition_by=[CHANGED_IN, CHANGED_BY], mode="error")
        except DeltaError as exc:  # another writer created it first: as good
            if "already exists" not in str(exc):
                raise
    predicate = f"{CHANGED_BY} = '{run_id}'"
    try:
        write_deltalake(str(changes), rows.cast(changes_schema()), mode="overwrite", predicate=predicate)
    except CommitFailedError as exc:
        raise _concurrent(changes, exc) from None


def _forget_changes(changes: str | Path, run_id: str) -> None:
    """Remove the before and after rows a killed attempt of ``run_id`` recorded (no commit where
    there are none)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import CommitFailedError

    if not is_delta(changes):
        return
    try:
        DeltaTable(str(changes)).delete(f"{CHANGED_BY} = '{run_id}'")
    except CommitFailedError as exc:
        raise _concurrent(changes, exc) from None


def _concurrent(path: str | Path, exc: Exception) -> CatalogEnrichError:
    """Optimistic concurrency: a writer outside the catalog lock committed first."""
    return CatalogEnrichError(
        f"another writer committed to {path} while this run wrote, so it was not committed and the "
        f"table holds none of it ({str(exc).splitlines()[0][:200]}); run it again"
    )


def _read_changes(
    changes: str | Path, run_ids: Sequence[str], product_ids: pa.Array | None = None
) -> pa.Table:
    """The before and after rows of the given runs (their partitions only; of ``product_ids`` only
    when given)."""
    if not is_delta(changes) or not run_ids:
        return changes_schema().empty_table()
    wanted = pc.field(CHANGED_BY).isin(pa.array(list(run_ids), pa.string()))
    if product_ids is not None:
        wanted = wanted & pc.field("product_id").isin(product_ids.cast(pa.string()))
    return read_where(changes, wanted, changes_schema().names).cast(changes_schema())


def _changed_later(
    path: str | Path, changes: str | Path, committed: Mapping[str, int], product_ids: pa.Array
) -> dict[Pair, int]:
    """Per pair of ``product_ids``, the newest table version at which a live run committed after the
    oldest of ``committed`` (and not among them: they are being undone) changed it."""
    if not len(product_ids):
        return {}
    oldest = min(committed.values(), default=0)
    later = {run: v for v, run in _live_runs(path, changes) if v > oldest and run not in committed}
    rows = _read_changes(changes, sorted(later), product_ids)
    if not rows.num_rows:
        return {}
    runs = pa.array(sorted(later), pa.string())
    versions = pa.array([later[r] for r in runs.to_pylist()], pa.int64())
    at = pc.take(versions, pc.index_in(rows[CHANGED_BY], value_set=runs))
    newest = (
        pa.table({"product_id": rows["product_id"], "attribute": rows["attribute"], "at": at})
        .group_by(["product_id", "attribute"])
        .aggregate([("at", "max")])
    )  # one row a pair the rolled-back runs' products hold, whatever the number of later runs
    pairs = zip(newest["product_id"].to_pylist(), newest["attribute"].to_pylist(), strict=True)
    return dict(zip(pairs, newest["at_max"].to_pylist(), strict=True))


Row = dict[str, Any]
Pair = tuple[str, str]


def _by_pair(rows: pa.Table) -> dict[Pair, list[Row]]:
    out: dict[Pair, list[Row]] = {}
    for row in rows.select(attributes_schema().names).to_pylist():
        out.setdefault((row["product_id"], row["attribute"]), []).append(row)
    return out


def _state(rows: list[Row]) -> frozenset[tuple[str, str | None]]:
    return frozenset((r["value"], r["run_id"]) for r in rows)


def _commits(path: str | Path, run_ids: Sequence[str]) -> dict[str, int]:
    """The table version each run committed.

    Raises:
        CatalogEnrichError: a run never committed to this table, or was already rolled back.
    """
    from deltalake import DeltaTable

    table, committed = DeltaTable(str(path)), {}
    for run_id in run_ids:
        version = table.transaction_version(_transaction(run_id))
        if version is None:
            raise CatalogEnrichError(f"run {run_id!r} has no commit in {path}: nothing to roll back")
        if table.transaction_version(_transaction(run_id, "rollback")) is not None:
            raise CatalogEnrichError(f"run {run_id!r} was already rolled back")
        committed[run_id] = int(version)
    return committed


def _rolled_back(path: str | Path, run_ids: set[str]) -> set[str]:
    """Those of ``run_ids`` a committed rollback undid."""
    from deltalake import DeltaTable

    table = DeltaTable(str(path))
    return {r for r in run_ids if table.transaction_version(_transaction(r, "rollback")) is not None}


def _undo(
    run_id: str,
    images: pa.Table,
    state: dict[Pair, list[Row]],
    held: set[Pair],
    gone: set[str],
    later: Mapping[Pair, int],
    version: int,
) -> RollbackResult:
    """One run's rollback in ``state`` (pair -> the model rows it holds, updated in place): every
    pair that no live run committed after it changed (``later``: pair -> the newest version at
    which one did, against the run's ``version``: a later run that wrote a value and one that took
    it out again leave the pair as it was, but not the run's; one rolled back since is no later
    run, whatever its rollback left there) gets its before rows back - none where a merchant's value
    holds it now (``held``: product and :func:`~catalog_enrichment.contracts.merchant_key`
    of the attribute), nor a row of a run rolled back before (``gone``: its values were taken out
    and stay out); the others are reported superseded."""
    before = _by_pair(images.filter(pc.equal(images[IMAGE], "before")))
    after = _by_pair(images.filter(pc.equal(images[IMAGE], "after")))
    restored, superseded, removed, back = 0, [], 0, 0
    for pair in sorted(set(before) | set(after)):
        if later.get(pair, -1) > version:
            superseded.append(pair)
            continue
        given = (pair[0], merchant_key(pair[1])) in held
        rows = [] if given else [r for r in before.get(pair, []) if r["run_id"] not in gone]
        values = {r["value"] for r in rows}
        removed += sum(r["value"] not in values for r in state.get(pair, []))
        back += len(rows)
        state[pair] = rows
        restored += 1
    return RollbackResult(run_id, None, restored, removed, back, superseded)


_NEVER = dt.datetime.min.replace(tzinfo=dt.UTC)


def _merchant_pairs(products: str | Path | None, product_ids: pa.Array) -> set[Pair]:
    """The (product, attribute) pairs the products table's latest copy of each product gives a
    merchant value for, the attribute as its :func:`~catalog_enrichment.contracts.merchant_key`
    (``products`` None or not there: none)."""
    if products is None or not Path(products).exists() or not len(product_ids):
        return set()
    if "merchant_attributes" not in schema_of(products).names:
        return set()
    columns = ["product_id", "merchant_attributes", "updated_at"]
    latest: dict[str, dict[str, Any]] = {}
    for r in read_products_of(products, product_ids.to_pylist(), columns).to_pylist():
        seen = latest.get(r["product_id"])
        if seen is None or (r["updated_at"] or _NEVER) >= (seen["updated_at"] or _NEVER):
            latest[r["product_id"]] = r
    return {
        (str(pid), merchant_key(str(attribute)))
        for pid, r in latest.items()
        for attribute, values in (r["merchant_attributes"] or [])
        if merchant_value_given(values)
    }


def rollback_runs(
    path: str | Path,
    changes: str | Path,
    run_ids: Sequence[str],
    *,
    products: str | Path | None = None,
    linked: Mapping[str, Sequence[str]] | None = None,
) -> list[RollbackResult]:
    """Undo runs, newest first, in one commit: for every pair a run changed, its before rows come
    back when no live run committed since changed it - but not those an earlier rollback took out;
    otherwise a later run changed it, and it is left alone and reported (as PostgreSQL's run log
    decides).
    A pair a merchant's value holds now (a merchant row, or the ``products`` table's
    :func:`_merchant_pairs`, of the attribute or of one ``linked`` to it, their names compared as
    :func:`~catalog_enrichment.contracts.merchant_key`) gets no model value back.

    Raises:
        CatalogEnrichError: a run never committed to this table, or was already rolled back.
    """
    committed = _commits(path, run_ids)
    images = _read_changes(changes, list(committed))
    ids = pc.unique(images["product_id"])
    read_at = _version(path)
    current = _rows_for(path, ids, read_at)
    now = _by_pair(current.filter(pc.equal(current["source"], "model")))
    merchant = _by_pair(current.filter(pc.equal(current["source"], "merchant")))
    given = {(pid, merchant_key(a)) for pid, a in merchant} | _merchant_pairs(products, ids)
    links = {merchant_key(a): [merchant_key(o) for o in others] for a, others in (linked or {}).items()}
    held = given | {(pid, other) for pid, a in given for other in links.get(a, ())}
    state = dict(now)
    gone = _rolled_back(path, set(pc.unique(images["run_id"]).drop_null().to_pylist()))
    later = _changed_later(path, changes, committed, ids)
    results = [
        _undo(
            run_id,
            images.filter(pc.equal(images[CHANGED_BY], run_id)),
            state,
            held,
            gone,
            later,
            committed[run_id],
        )
        for run_id in sorted(committed, key=committed.__getitem__, reverse=True)
    ]
    done = [r.run_id for r in results if r.pairs_restored]
    if not done:
        return results
    changed = [p for p in state if _state(state[p]) != _state(now.get(p, []))]
    put = [r for p in changed for r in state[p]]
    keep = {(r["product_id"], r["attribute"], r["value"]) for r in put}
    drop = [
        r
        for p in changed
        for r in now.get(p, [])
        if (r["product_id"], r["attribute"], r["value"]) not in keep
    ]
    schema = attributes_schema()
    version, _ = _merge_model_rows(  # no row to change where merchants' values hold every pair
        path,
        read_at,
        pa.Table.from_pylist(put, schema=schema),
        pa.Table.from_pylist(drop, schema=schema),
        {META_OPERATION: "rollback", META_ROLLBACK_OF: ",".join(done)},
        [_transaction(run_id, "rollback") for run_id in done],
    )
    for result in results:
        if result.pairs_restored:
            result.version = version
    return results
