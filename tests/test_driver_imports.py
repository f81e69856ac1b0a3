"""The enrichment job's driver imports no torch: it reads the bundle's files (thresholds, manifest)
and builds the scoring spec; only the Spark Python workers, which load the model, import torch,
transformers and timm (several CPU-seconds a process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a fresh interpreter (mlflow, pyspark, Great Expectations): not the fast tier

# what a job's driver imports: the command line, the job and its stages, the Spark glue, the bundle
# folder, the registry, the validation checkpoint and the embedding store's catalog side
_DRIVER = (
    "catalog_enrichment.cli",
    "catalog_enrichment.commands",
    "catalog_enrichment.enrich.run",
    "catalog_enrichment.enrich.stages",
    "catalog_enrichment.inference.spark",
    "catalog_enrichment.inference.bundle",
    "catalog_enrichment.inference.decide",
    "catalog_enrichment.registry",
    "catalog_enrichment.runtime",
    "catalog_enrichment.validation.checkpoint",
    "catalog_enrichment.catalog.embeddings",
)


@pytest.mark.timeout(120)
def test_the_job_driver_imports_no_torch() -> None:
    code = (
        f"import sys, importlib; [importlib.import_module(m) for m in {_DRIVER!r}]; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'timm'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
