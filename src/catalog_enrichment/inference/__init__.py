"""Batch scoring: the model bundle, the per-batch predictor (Spark glue comes with the enrichment job)."""
