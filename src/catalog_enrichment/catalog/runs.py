"""Runs over the catalog as a whole: which partitions a backfill runs, and rolling runs back."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from catalog_enrichment.catalog import Catalog
from catalog_enrichment.catalog.base import RollbackResult
from catalog_enrichment.catalog.reports import (
    BLOCKED,
    FULL,
    RETRY,
    ROLLED_BACK,
    check_run_id,
    last_run,
    of_scope,
)
from catalog_enrichment.contracts import load_contract
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.faults import fault_point
from catalog_enrichment.types import Say
from catalog_enrichment.versions import ModelVersion

__all__ = ["ROLLED_BACK", "PlannedRun", "backfill_plan", "rollback"]


class PlannedRun(NamedTuple):
    """A backfill's run over one partition: its run id (None: the partition is done), and whether
    it reads the whole partition or, incremental, only what changed since its last run and the
    products that run left to retry (their image could not be read then)."""

    partition: str
    run_id: str | None
    full: bool = True


def backfill_plan(
    catalog: Catalog,
    model: ModelVersion,
    date_from: dt.date,
    date_to: dt.date,
    *,
    force: bool = False,
) -> list[PlannedRun]:
    """The run per ``ingest_date`` partition in ``[date_from, date_to]``, in date order.

    Resumable: the run id is None for a partition already done by the same model version (of the
    same registered model; a succeeded full run whose health checks kept nothing out) unless
    ``force``; run ids are deterministic per (partition, model version), so a partition interrupted
    half-way is finished, not written twice. A forced or rolled-back partition gets a fresh run id,
    and so does one whose runs by this version all kept values out, or whose last run did - the
    incremental run of the products left to retry, say (it is run again, whole). A done
    partition whose last run left products to retry gets an incremental run under a fresh id: a
    backfill during an image host's outage is not done until they are read again. A run id another
    products table's run already took (``--products``) gets a suffix of this table's name, and a
    model name a run id cannot hold as it is a hash of the name: a run of the same id would find
    that run done and do nothing.
    """
    if date_from > date_to:
        raise CatalogEnrichError(f"--from {date_from} is after --to {date_to}")
    column = load_contract("products").partition_by[0]
    days = ((d, _date(d)) for d in catalog.list_partitions(column))
    dates = [d for d, day in days if day is not None and date_from <= day <= date_to]
    if not dates:
        raise CatalogEnrichError(
            f"no {column} partitions between {date_from} and {date_to} in {catalog.describe()}"
        )
    products = catalog.products_name()
    reports = catalog.read_reports()
    table_reports = [r for r in reports if of_scope(r, r.partition, products)]
    taken = {r.run_id for r in reports} - {r.run_id for r in table_reports}
    suffix = hashlib.sha256(products.encode()).hexdigest()[:8]
    # the model's name as a run id can hold it: a name that needs changing for that keeps a hash of
    # itself, so "shop/tiny" and "shop_tiny" never plan one id (the second would find it done)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", model.name)
    if name != model.name:
        name += "-" + hashlib.sha256(model.name.encode()).hexdigest()[:6]
    plan: list[PlannedRun] = []
    for day in dates:
        scope = f"{column}={day}"
        runs = [r for r in table_reports if r.partition == scope]
        mine = [
            r
            for r in runs
            if r.status == "succeeded" and (r.model_name, r.model_version) == (model.name, model.version)
        ]
        run_id = f"backfill-{day}-{name}-v{model.version}"
        if run_id in taken:
            run_id = f"{run_id}-{suffix}"
        fresh = f"{run_id}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}"
        # done: a run of the whole partition that kept nothing out (an incremental run of it scored
        # what had changed since some other version's run; reports from before runs recorded it count)
        # ... and whose last run kept nothing out either (a later one, the run of the products left
        # to retry say, whose checks did: its products never got those values - run it again)
        last = last_run(runs, scope, products=products)
        kept_out = last is not None and last in mine and last.summary().get(BLOCKED)
        done = any(r.summary().get(FULL, True) and not r.summary().get(BLOCKED) for r in mine)
        if not force and done and not kept_out:
            retry = last is not None and last in mine and last.summary().get(RETRY)
            plan.append(PlannedRun(scope, fresh, full=False) if retry else PlannedRun(scope, None))
            continue
        if force or any(r.run_id == run_id and r.status == ROLLED_BACK for r in runs) or mine:
            run_id = fresh
        plan.append(PlannedRun(scope, run_id))
    return plan


def _date(value: str) -> dt.date | None:
    """A partition's date; None for a folder of rows without one (``__HIVE_DEFAULT_PARTITION__``)."""
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return None


def rollback(
    catalog: Catalog,
    *,
    run_id: str | None = None,
    model_version: str | None = None,
    model_name: str | None = None,
    progress: Say = print,
    before: Callable[[list[str]], None] | None = None,
    linked: Mapping[str, Sequence[str]] | None = None,
) -> list[RollbackResult]:
    """Undo one run, or every run of a model version (newest first, in one commit); marks their reports.
    ``before`` is called with the run ids once they are found, before anything changes (an error
    it raises leaves the catalog as it was). The vectors the runs stored in the embedding store are
    deleted first, so the run that reads their products again encodes them afresh. ``linked``: the taxonomy's
    :meth:`~catalog_enrichment.contracts.Taxonomy.held_together`, so a merchant's colour family
    keeps the model's shades out, as it does in a run.

    The reports are marked rolled back before the commit, and put back where later runs changed
    again every pair a run changed, or the rollback raised: one killed after its commit must not
    leave reports saying "succeeded", which would keep the next run from reading those products
    again and which no later rollback could mark (it finds the runs rolled back). Killed before its
    commit, it leaves them marked, which only has the next run read their products again."""
    if (run_id is None) == (model_version is None):
        raise CatalogEnrichError("rollback needs exactly one of --run-id or --model-version")
    if model_version is not None and not model_name:
        raise CatalogEnrichError("rolling back a model version needs the registered model's name")
    with catalog.lock("rollback", progress):
        runs = [run_id] if run_id else catalog.runs_of_model_version(str(model_name), str(model_version))
        if not runs:
            raise CatalogEnrichError(
                f"{model_name} v{model_version} has no runs to roll back in {catalog.describe()} "
                "(another registered model's version: --set mlflow.registered_model=NAME)"
            )
        if before is not None:
            before(runs)
        ids = [check_run_id(str(rid)) for rid in runs]
        was = {r.run_id: r.status for r in catalog.read_reports() if r.run_id in ids}
        for rid in was:
            catalog.set_report_status(rid, ROLLED_BACK)
        try:
            # first (a cache: losing it costs an encode): the next run must read these runs'
            # products afresh, not fuse what a night of wrong photos behind the same URLs made
            forgotten = catalog.forget_embeddings(ids)
            if forgotten:
                progress(f"removed the {forgotten:,} vectors these runs stored from the embedding store")
            results = catalog.rollback_runs(ids, linked)
        except Exception:  # an interrupt leaves them marked: the safe side
            for rid, status in was.items():
                catalog.set_report_status(rid, status)
            raise
        fault_point("after_rollback")
        for result in results:
            _report(catalog, result, progress, was.get(result.run_id))
        return results


def _report(catalog: Catalog, result: RollbackResult, progress: Say, status: str | None) -> None:
    """Say what one run's rollback did; where later runs changed again every pair it changed (the
    run stands, and its values are wherever they left them) put its report's ``status`` back. A
    run that changed nothing keeps the mark: its position is all there is to undo (a version's run
    whose products all scored below the thresholds stood as the last run, and the products of the
    version's runs before it, their values taken out, were not read again)."""
    rid = result.run_id
    if not result.pairs_restored and result.superseded:
        if status is not None:
            catalog.set_report_status(rid, status)
        progress(
            f"nothing rolled back of {rid}: each of the {len(result.superseded):,} pairs it changed was "
            "changed again by a later run"
        )
        return
    if not result.pairs_restored:
        progress(
            f"{rid} changed no value: its report is marked rolled back, so its position no longer counts"
        )
        return
    progress(
        f"rolled back {rid}: {result.pairs_restored:,} (product, attribute) pairs restored, "
        f"{result.rows_removed:,} values removed, {result.rows_restored:,} previous values back"
        + (
            f"; {len(result.superseded):,} pairs changed by later runs were left alone"
            if result.superseded
            else ""
        )
        + (f" (version {result.version})" if result.version is not None else "")
    )
