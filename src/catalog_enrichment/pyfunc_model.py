"""MLflow "model from code" entry: MLflow copies this file into each logged model and runs it at load
time. Logging the model from code (not a pickled Python object) keeps arbitrary pickles out of the
registry; the artifacts (weights state dict, configs, tokenizer, calibration) carry the rest."""

import mlflow

from catalog_enrichment.registry import CatalogEnrichmentPyfunc

mlflow.models.set_model(CatalogEnrichmentPyfunc())
