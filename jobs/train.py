"""Training job: labelled table -> calibrated model version registered as 'challenger'.

Run (embedded defaults, or point MLFLOW / config at production):
    python jobs/train.py --config deploy/config/local.yaml      # reads catalog.labelled (jobs/labels.py)
    spark-submit jobs/train.py --data /mnt/lakehouse/labelled --registered-model catalog-enrichment
Same as ``catalog-enrich train ...``.
"""

from __future__ import annotations

import sys

from catalog_enrichment.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
