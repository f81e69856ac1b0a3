"""Undo what one enrichment run or model version wrote (restores the values it replaced).

Run:
    python jobs/rollback.py (--run-id ID | --model-version V) [--config FILE]
Same as ``catalog-enrich rollback ...``.
"""

from __future__ import annotations

import sys

from catalog_enrichment.cli import run

if __name__ == "__main__":
    run(["rollback", *sys.argv[1:]])
