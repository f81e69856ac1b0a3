"""The run health stage (``health.py`` applied to a run): its checks, what they block, and where
they go - the ``run_health`` rows, the run report's summary, the MLflow metrics and plots."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from catalog_enrichment.catalog.base import keyed_schema
from catalog_enrichment.catalog.reports import BLOCKED
from catalog_enrichment.config import HealthConfig
from catalog_enrichment.contracts import mlflow_name
from catalog_enrichment.health import INPUT, Check, HealthTally, assess, blocked_attributes, plot_scores
from catalog_enrichment.inference.decide import DecisionPolicy
from catalog_enrichment.types import Say

__all__ = ["RunHealth", "check_run"]


@dataclass(frozen=True)
class RunHealth:
    """A run's health checks, the attributes they keep out of the commit, and what they compared."""

    checks: list[Check]
    blocked: dict[str, str]  # attribute -> why its values are kept out
    modes: dict[str, str]
    policy: DecisionPolicy
    tally: HealthTally

    def summary(self) -> dict[str, Any]:
        """The run report's summary entries: every check, the failures' messages, what they block."""
        failures = [str(c.message) for c in self.checks if c.status == "failed"]
        return {
            "health": [c.to_dict() for c in self.checks],
            "health_failures": failures,
            BLOCKED: self.blocked,
        }

    def rows(self, run_id: str, model_name: str, model_version: str, checked_at: dt.datetime) -> pa.Table:
        """The run's ``run_health`` rows (contract ``schemas/run_health.yaml``)."""
        schema = keyed_schema("run_health")
        rows = []
        for c in self.checks:
            mode = self.modes["inputs" if c.scope == INPUT else c.check]
            run = {"run_id": run_id, "model_name": model_name, "model_version": model_version}
            row = {**c.to_dict(), **run, "mode": mode, "checked_at": checked_at}
            row["blocked"] = c.status == "failed" and mode == "block"
            rows.append({k: row[k] for k in schema.names})
        return pa.Table.from_pylist(rows, schema=schema)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``health_<check>_<scope>`` (the check's observed value: PSI, share or
        estimated precision), ``health_failures`` and ``health_blocked``."""
        metrics: dict[str, float] = {
            f"health_{c.check}_{mlflow_name(c.scope)}": c.observed
            for c in self.checks
            if c.observed is not None
        }
        metrics["health_failures"] = sum(c.status == "failed" for c in self.checks)
        metrics["health_blocked"] = len(self.blocked)
        return metrics

    def tags(self) -> dict[str, str]:
        """MLflow tags: ``catalog_enrich.blocked.<attribute>`` -> why its values were kept out."""
        return {f"catalog_enrich.blocked.{mlflow_name(a)}": why[:5000] for a, why in self.blocked.items()}

    def plots(self, folder: Path) -> list[Path]:
        """One plot per attribute scored: the top score tonight over the held-out one."""
        return [] if self.policy.health is None else plot_scores(self.policy.health, self.tally, folder)


def check_run(
    policy: DecisionPolicy, tally: HealthTally, cfg: HealthConfig, say: Say, *, reads_images: bool = True
) -> RunHealth | None:
    """The run's health checks against the model's profile (None: a model trained before them);
    ``reads_images``: whether the model reads the photo (:func:`assess`)."""
    if policy.health is None:
        return None
    checks = assess(
        policy.health,
        tally,
        target=policy.target_precision,
        false_alarm=cfg.false_alarm,
        min_products=cfg.min_products,
        min_psi=cfg.min_psi,
        min_share_change=cfg.min_share_change,
        changed=[name for name, gone in policy.dropped.items() if gone],
        reads_images=reads_images,
    )
    modes = cfg.modes()
    levels = {d.name: d.parent for d in policy.taxonomy.derived.values()}
    blocked = blocked_attributes(checks, modes, policy.taxonomy.names, levels)
    health = RunHealth(checks, blocked, modes, policy, tally)
    failures = health.summary()["health_failures"]
    say(f"  run health: {len(failures)} failed check(s)" + "".join(f"\n    {f}" for f in failures))
    for attribute, why in health.blocked.items():
        say(f"  run health: {attribute} blocked, no value written: {why}")
    return health
