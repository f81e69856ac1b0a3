"""Print an enrichment run report (--check: exit non-zero unless it succeeded).

Run:
    python jobs/report.py [--run-id ID] [--check] [--config FILE]
Same as ``catalog-enrich report ...``.
"""

from __future__ import annotations

import sys

from catalog_enrichment.cli import run

if __name__ == "__main__":
    run(["report", *sys.argv[1:]])
