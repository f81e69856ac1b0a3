"""Enrichment job: score new/changed products with the champion model, write calibrated values.

Run (spark-submit or plain Python):
    spark-submit jobs/enrich.py [--partition ingest_date=2026-11-01] [--full] [--run-id ID] [--config FILE]
Same as ``catalog-enrich enrich ...``.
"""

from __future__ import annotations

import sys

from catalog_enrichment.cli import run

if __name__ == "__main__":
    run(["enrich", *sys.argv[1:]])
