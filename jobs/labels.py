"""Labels job: products + the attribute table's merchant values -> the labelled table training reads.

Run:
    python jobs/labels.py --config deploy/config/local.yaml
Same as ``catalog-enrich labels ...``.
"""

from __future__ import annotations

import sys

from catalog_enrichment.cli import run

if __name__ == "__main__":
    run(["labels", *sys.argv[1:]])
