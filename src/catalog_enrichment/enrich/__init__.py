"""The enrichment run, one straight line:

    lock -> read -> validate -> breaker -> score + decide -> stage -> commit -> report

on a :class:`~catalog_enrichment.catalog.base.Catalog` (the embedded lakehouse or PostgreSQL,
``catalog.kind``):

0. **lock** the catalog (one run at a time) and remove what a killed run staged;
1. **read** the products (partition filter; incremental, unless ``full``: ``updated_at`` past the
   watermark of the last succeeded run over the same scope less ``catalog.lookback_seconds``,
   without the rows that run already read; a watermark is never later than its run's start);
2. **validate**: every rule counted and the duplicated ids found in one Spark job that reads no
   image, then the Great Expectations suite (it reports; the row rules decide); the circuit
   breaker aborts before anything is scored or written when too many rows fail;
3. **score + decide** the valid rows with ``mapInArrow`` (the model loaded once per Python worker):
   thresholds, taxonomy, merchant-filled attributes, values people rejected for this model version
   (``review import``) never written again; an image that cannot be read (outside the
   allowed roots, too large) or does not decode is found here; the decisions are staged as
   Parquet under ``<catalog.root>/_staging/<run id>``; the **run health** checks compare the run
   with the model's held-out products (``health.py``) and may block an attribute's values;
4. **write**: the catalog commits the values with the run's **quarantine** rows (idempotent per run
   id; a process killed before the commit leaves the tables as they were): one Delta MERGE, or
   COPY into a staging table and one PostgreSQL transaction;
5. **report**: a run-report row and an MLflow run in the enrichment experiment.

The run is :func:`run_enrichment` (``enrich/run.py``: the stages on one screen and the record its
report is built from); each stage is a function of ``enrich/stages.py`` with typed inputs and a
typed result; the run health stage is ``enrich/checks.py``. The caller passes the SparkSession, the
MLflow client and the model version (DESIGN: only jobs/ and the CLI create those).
"""

from __future__ import annotations

from catalog_enrichment.enrich.run import (
    BackfillRange,
    EnrichOutcome,
    RunScope,
    backfill_partitions,
    check_model_fits,
    new_run_id,
    run_enrichment,
)
from catalog_enrichment.enrich.stages import flatten_scores

__all__ = [
    "BackfillRange",
    "EnrichOutcome",
    "RunScope",
    "backfill_partitions",
    "check_model_fits",
    "flatten_scores",
    "new_run_id",
    "run_enrichment",
]
