"""Benchmarks: generator speed, model quality, throughput against the raw model and MLflow's own path."""
