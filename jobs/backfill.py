"""Backfill job: one committed enrichment run per ingest_date partition, resumable.

Run (spark-submit or plain Python):
    spark-submit jobs/backfill.py --from 2026-11-01 --to 2026-11-07 [--force] [--config FILE]
Same as ``catalog-enrich backfill ...``.
"""

from __future__ import annotations

import sys

from catalog_enrichment.cli import run

if __name__ == "__main__":
    run(["backfill", *sys.argv[1:]])
