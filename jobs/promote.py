"""Promotion job: move 'champion' to 'challenger' only if it passes the gate on the frozen eval set.

Run:
    python jobs/promote.py --eval-data lakehouse/eval [--dry-run]
Same as ``catalog-enrich promote ...``.
"""

from __future__ import annotations

import sys

from catalog_enrichment.cli import run

if __name__ == "__main__":
    run(["promote", *sys.argv[1:]])
