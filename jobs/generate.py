"""Generate the synthetic marketplace (no Spark needed; a job so schedulers call it like the others).

Run:
    python jobs/generate.py --out lakehouse --products 5000 --bad-rate 0.02
which is the same as ``catalog-enrich generate ...``.
"""

from __future__ import annotations

import sys

from catalog_enrichment.cli import run

if __name__ == "__main__":
    run(["generate", *sys.argv[1:]])
