"""The catalog's attribute table (Delta): one atomic MERGE per run, idempotent, reversible.

Write rules:

* For every (product, attribute) a run scored, the model's previous values are replaced by the new
  set (possibly empty); merchant rows are never changed, and a pair that has a merchant row gets no
  model value at all.
* One MERGE commit per run, tagged with the run id in the commit metadata; a run id whose commit is
  already in the history is not merged again (re-running a run changes nothing).
* :func:`rollback_run` restores, for every pair the run changed, the values the table had right
  before the run's commit (Delta time travel) - unless a later run has changed the pair since, in
  which case that pair is left alone and reported.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.catalog.base import MergeResult, RollbackResult
from catalog_enrichment.contracts import load_contract
from catalog_enrichment.errors import CatalogEnrichError

__all__ = [
    "META_MODEL_VERSION",
    "META_OPERATION",
    "META_RUN_ID",
    "MergeResult",
    "RollbackResult",
    "attributes_schema",
    "ensure_attributes_table",
    "find_run_commit",
    "merchant_rows",
    "merge_run",
    "rollback_run",
    "runs_of_model_version",
]

META_RUN_ID = "catalog_enrich.run_id"
META_OPERATION = "catalog_enrich.operation"
META_MODEL_VERSION = "catalog_enrich.model_version"
META_ROLLBACK_OF = "catalog_enrich.rollback_of"
KEY = ("product_id", "attribute", "value")
PAIR = ("product_id", "attribute")
_MERGE_ON = " AND ".join(f"t.{k} = s.{k}" for k in KEY)


def attributes_schema() -> pa.Schema:
    return load_contract("attributes").arrow_schema()


def ensure_attributes_table(path: str | Path) -> None:
    """Create an empty attribute table at ``path`` when there is none."""
    from deltalake import write_deltalake

    if not (Path(path) / "_delta_log").is_dir():
        Path(path).mkdir(parents=True, exist_ok=True)
        write_deltalake(str(path), attributes_schema().empty_table(), mode="error")


def merchant_rows(products: pa.Table, written_at: dt.datetime) -> pa.Table:
    """Merchant-source attribute rows from the products' ``merchant_attributes`` (catalog seeding)."""
    rows: dict[str, list[Any]] = {k: [] for k in attributes_schema().names}
    for pid, merchant in zip(
        products["product_id"].to_pylist(), products["merchant_attributes"].to_pylist(), strict=True
    ):
        if pid is None or not merchant:
            continue
        for attribute, values in merchant:
            for value in values or []:
                for k, v in (
                    ("product_id", pid),
                    ("attribute", attribute),
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


def _history(path: str | Path) -> list[dict[str, Any]]:
    from deltalake import DeltaTable

    return DeltaTable(str(path)).history()


def find_run_commit(path: str | Path, run_id: str, operation: str = "enrich") -> int | None:
    """The table version the run committed, ``None`` when it never committed."""
    for entry in _history(path):
        if entry.get(META_RUN_ID) == run_id and entry.get(META_OPERATION) == operation:
            return int(entry["version"])
    return None


def _rolled_back(path: str | Path) -> set[str]:
    return {str(e[META_ROLLBACK_OF]) for e in _history(path) if e.get(META_ROLLBACK_OF)}


def runs_of_model_version(path: str | Path, model_version: str) -> list[tuple[int, str]]:
    """(table version, run id) of every not-rolled-back run of a model version, newest first."""
    done = _rolled_back(path)
    runs = [
        (int(e["version"]), str(e[META_RUN_ID]))
        for e in _history(path)
        if e.get(META_OPERATION) == "enrich"
        and str(e.get(META_MODEL_VERSION)) == str(model_version)
        and e.get(META_RUN_ID) not in done
    ]
    return sorted(runs, reverse=True)


def _tagged(table: pa.Table, action: str) -> pa.Table:
    return table.append_column("_action", pa.array([action] * table.num_rows, pa.string()))


def _merge_model_rows(
    path: str | Path, put: pa.Table, delete: pa.Table, metadata: dict[str, str]
) -> dict[str, Any]:
    """One MERGE commit on model rows only: ``put`` rows are updated or inserted, ``delete`` rows
    removed; merchant rows are never matched for change. Returns deltalake's merge metrics."""
    from deltalake import CommitProperties, DeltaTable
    from deltalake.exceptions import CommitFailedError

    schema = attributes_schema()
    source = pa.concat_tables([_tagged(put.cast(schema), "put"), _tagged(delete.cast(schema), "delete")])
    columns = {c: f"s.{c}" for c in schema.names}
    merge = (
        DeltaTable(str(path))
        .merge(
            source,
            predicate=_MERGE_ON,
            source_alias="s",
            target_alias="t",
            commit_properties=CommitProperties(custom_metadata=metadata),
        )
        .when_matched_update(updates=columns, predicate="s._action = 'put' AND t.source = 'model'")
        .when_matched_delete(predicate="s._action = 'delete' AND t.source = 'model'")
        .when_not_matched_insert(updates=columns, predicate="s._action = 'put'")
    )
    try:
        return dict(merge.execute())
    except CommitFailedError as exc:  # optimistic concurrency: a writer outside the catalog lock
        raise CatalogEnrichError(
            f"another writer committed to {path} while this MERGE ran, so it was not committed and the "
            f"table holds none of it ({str(exc).splitlines()[0][:200]}); run it again"
        ) from None


def _rows_for(table: Any, product_ids: pa.Array, version: int | None = None) -> pa.Table:
    """Rows of the attribute table (optionally at ``version``) for the given products."""
    from deltalake import DeltaTable

    # Read, then filter in memory: files written by different writers hold string or string_view,
    # which pyarrow's statistics pruning cannot compare.
    data = DeltaTable(str(table), version=version).to_pyarrow_table().cast(attributes_schema())
    return data.filter(pc.is_in(data["product_id"], value_set=product_ids.cast(pa.string())))


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
    values: pa.Table,
    scored: pa.Table,
    *,
    run_id: str,
    model_name: str,
    model_version: str,
    written_at: dt.datetime,
    retract: pa.Table | None = None,
) -> MergeResult:
    """Replace the model's values of every scored (product, attribute) pair in one commit.

    ``values``: (product_id, attribute, value, confidence, threshold) of what clears the thresholds;
    ``scored``: (product_id, attribute) of every pair the run scored; ``retract``: (product_id,
    attribute, value) removed in the same commit where ``model_version`` wrote them.
    """
    from deltalake import DeltaTable

    ensure_attributes_table(path)
    committed = find_run_commit(path, run_id)
    if committed is not None:
        return MergeResult(committed, already_committed=True)
    schema = attributes_schema()
    retract = _KEY_SCHEMA.empty_table() if retract is None else retract.select(list(KEY)).cast(_KEY_SCHEMA)
    ids = pc.unique(
        pa.chunked_array(
            [*scored["product_id"].cast(pa.string()).chunks, *retract["product_id"].chunks], type=pa.string()
        )
    )
    current = _rows_for(path, ids) if len(ids) else schema.empty_table()
    merchant = current.filter(pc.equal(current["source"], "merchant"))
    merchant_pairs = _pairs(merchant)
    scored_pairs = _semi(_pairs(scored), merchant_pairs, PAIR, anti=True)
    new = _semi(values.select([*KEY, "confidence", "threshold"]), scored_pairs, PAIR)
    old_model = _semi(current.filter(pc.equal(current["source"], "model")), scored_pairs, PAIR)
    gone = _semi(old_model, new, KEY, anti=True)
    mine = current.filter(
        pc.and_(pc.equal(current["source"], "model"), pc.equal(current["model_version"], str(model_version)))
    )
    # rejected values the scored pairs did not already drop (a new value is never a rejected one)
    rejected = _semi(_semi(_semi(mine, retract, KEY), gone, KEY, anti=True), new, KEY, anti=True)
    gone = pa.concat_tables([gone, rejected])
    n = new.num_rows
    upserts = pa.table(
        {
            **{k: new[k] for k in KEY},
            "confidence": new["confidence"],
            "threshold": new["threshold"],
            "source": pa.array(["model"] * n, pa.string()),
            "model_name": pa.array([model_name] * n, pa.string()),
            "model_version": pa.array([str(model_version)] * n, pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
            "written_at": pa.array([written_at] * n, schema.field("written_at").type),
        },
        schema=schema,
    )
    skipped = _pairs(scored).num_rows - scored_pairs.num_rows if scored.num_rows else 0
    if upserts.num_rows + gone.num_rows == 0:
        return MergeResult(None, merchant_pairs_skipped=skipped)
    metrics = _merge_model_rows(
        path,
        upserts,
        gone,
        {META_RUN_ID: run_id, META_OPERATION: "enrich", META_MODEL_VERSION: str(model_version)},
    )
    return MergeResult(
        int(DeltaTable(str(path)).version()),
        inserted=int(metrics["num_target_rows_inserted"]),
        updated=int(metrics["num_target_rows_updated"]),
        deleted=int(metrics["num_target_rows_deleted"]),
        merchant_pairs_skipped=skipped,
    )


def _pair_state(table: pa.Table) -> dict[tuple[str, str], frozenset[tuple[str, str | None]]]:
    state: dict[tuple[str, str], set[tuple[str, str | None]]] = {}
    for pid, attr, value, run in zip(
        table["product_id"].to_pylist(),
        table["attribute"].to_pylist(),
        table["value"].to_pylist(),
        table["run_id"].to_pylist(),
        strict=True,
    ):
        state.setdefault((pid, attr), set()).add((value, run))
    return {k: frozenset(v) for k, v in state.items()}


def rollback_run(path: str | Path, run_id: str) -> RollbackResult:
    """Undo one run's commit: its values go, the values it replaced come back.

    Raises:
        CatalogEnrichError: the run never committed to this table, or was already rolled back.
    """
    from deltalake import DeltaTable

    version = find_run_commit(path, run_id)
    if version is None:
        raise CatalogEnrichError(f"run {run_id!r} has no commit in {path}: nothing to roll back")
    if run_id in _rolled_back(path):
        raise CatalogEnrichError(f"run {run_id!r} was already rolled back")
    schema = attributes_schema()
    after_all = DeltaTable(str(path), version=version).to_pyarrow_table().cast(schema)
    written = after_all.filter(pc.equal(after_all["run_id"], run_id))
    before_all = DeltaTable(str(path), version=version - 1).to_pyarrow_table().cast(schema)
    before_model = before_all.filter(pc.equal(before_all["source"], "model"))
    after_model = after_all.filter(pc.equal(after_all["source"], "model"))
    removed = _semi(before_model, after_model.select(list(KEY)), KEY, anti=True)
    replaced = _semi(before_model, written, KEY)
    touched = _pairs(pa.concat_tables([_pairs(written), _pairs(removed), _pairs(replaced)]))
    if touched.num_rows == 0:
        return RollbackResult(run_id, None)
    ids = pc.unique(touched["product_id"])
    current = (
        DeltaTable(str(path))
        .to_pyarrow_dataset()
        .to_table(filter=pc.field("product_id").isin(ids))
        .cast(schema)
    )
    current_model = _semi(current.filter(pc.equal(current["source"], "model")), touched, PAIR)
    after_state = _pair_state(_semi(after_model, touched, PAIR))
    now_state = _pair_state(current_model)
    restorable: list[tuple[str, str]] = []
    superseded: list[tuple[str, str]] = []
    for pid, attr in zip(touched["product_id"].to_pylist(), touched["attribute"].to_pylist(), strict=True):
        same = now_state.get((pid, attr), frozenset()) == after_state.get((pid, attr), frozenset())
        (restorable if same else superseded).append((pid, attr))
    if not restorable:
        return RollbackResult(run_id, None, superseded=superseded)
    keep = pa.table({"product_id": [p for p, _ in restorable], "attribute": [a for _, a in restorable]})
    restore = _semi(before_model, keep, PAIR)
    drop = _semi(_semi(current_model, keep, PAIR), restore, KEY, anti=True)
    _merge_model_rows(path, restore, drop, {META_OPERATION: "rollback", META_ROLLBACK_OF: run_id})
    return RollbackResult(
        run_id,
        int(DeltaTable(str(path)).version()),
        pairs_restored=len(restorable),
        rows_removed=drop.num_rows,
        rows_restored=restore.num_rows,
        superseded=superseded,
    )
