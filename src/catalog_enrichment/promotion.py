"""The promotion gate: should ``challenger`` replace ``champion``?

Both versions are scored on a frozen evaluation set (a labelled table at a pinned version) with
their own calibrated thresholds. The challenger is promoted only if

(a) on every attribute it writes, the realized precision of what it writes is >= the target, and
(b) (when a champion exists) no attribute loses more than ``max_coverage_loss`` of coverage and the
    mean coverage over attributes goes up.

The decision and every reason are recorded as tags on the challenger version and appended to the
promotion log (a Delta table: MLflow aliases keep no history, so the log is the audit trail).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from catalog_enrichment.catalog.lakehouse import read_table, table_format, table_version, write_table
from catalog_enrichment.data.dataset import encode_labels
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.metrics import written_precision_and_coverage

__all__ = ["GateResult", "evaluate_bundle", "gate", "promote", "read_promotion_log"]

AttributeMetrics = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class GateResult:
    """``promote`` and the reasons, one line per check (pass or fail)."""

    promote: bool
    reasons: list[str] = field(default_factory=list)


def gate(
    challenger: AttributeMetrics,
    champion: AttributeMetrics | None,
    *,
    target: float,
    max_coverage_loss: float,
) -> GateResult:
    """Pure decision from per-attribute ``{"precision", "coverage", "written"}`` of both versions."""
    reasons: list[str] = []
    ok = True
    for attr, m in challenger.items():
        if m["written"] == 0:
            reasons.append(f"{attr}: writes nothing (precision check not applicable)")
            continue
        if m["precision"] < target:
            ok = False
            reasons.append(f"FAIL {attr}: realized precision {m['precision']:.4f} < target {target}")
        else:
            reasons.append(f"ok {attr}: realized precision {m['precision']:.4f} >= {target}")
    if all(m["written"] == 0 for m in challenger.values()):
        return GateResult(
            False, [*reasons, "FAIL overall: the challenger writes nothing on the evaluation set"]
        )
    if champion is None:
        reasons.append("no champion yet: precision alone decides")
        return GateResult(ok, reasons)
    for attr, m in challenger.items():
        before = champion.get(attr, {}).get("coverage", 0.0)
        loss = before - m["coverage"]
        if loss > max_coverage_loss:
            ok = False
            reasons.append(
                f"FAIL {attr}: coverage {m['coverage']:.4f} loses {loss:.4f} vs champion {before:.4f} "
                f"(> {max_coverage_loss})"
            )
        else:
            reasons.append(f"ok {attr}: coverage {m['coverage']:.4f} vs champion {before:.4f}")
    mean_new = float(np.mean([m["coverage"] for m in challenger.values()]))
    mean_old = float(np.mean([champion.get(a, {}).get("coverage", 0.0) for a in challenger]))
    if mean_new <= mean_old:
        ok = False
        reasons.append(f"FAIL overall: mean coverage {mean_new:.4f} does not beat champion {mean_old:.4f}")
    else:
        reasons.append(f"ok overall: mean coverage {mean_new:.4f} > champion {mean_old:.4f}")
    return GateResult(ok, reasons)


def evaluate_bundle(bundle: Any, table: pa.Table) -> dict[str, dict[str, float]]:
    """Realized precision / coverage / written of a bundle's thresholds on a labelled table."""
    from catalog_enrichment.inference.predictor import BatchPredictor

    labels = encode_labels(table, bundle.taxonomy)
    scores = BatchPredictor(bundle).score(table.to_pandas())
    out = {}
    for attr in bundle.taxonomy:
        s, y = scores[attr.name], labels.targets[attr.name]
        if attr.kind == "multilabel":
            known = labels.known[attr.name]
            s, y = s[known], y[known]
        m = written_precision_and_coverage(s, y, attr.kind, bundle.calibration.thresholds(attr.name))
        out[attr.name] = {
            "precision": float(m["precision"]),
            "coverage": float(m["coverage"]),
            "written": float(m["written"]),
        }
    return out


_LOG_SCHEMA = pa.schema(
    [
        ("decided_at", pa.timestamp("us", tz="UTC")),
        ("registered_model", pa.string()),
        ("challenger_version", pa.string()),
        ("champion_version", pa.string()),
        ("promoted", pa.bool_()),
        ("dry_run", pa.bool_()),
        ("eval_data", pa.string()),
        ("eval_version", pa.string()),
        ("reasons", pa.list_(pa.string())),
        ("metrics", pa.string()),
    ]
)


def read_promotion_log(path: str | Path) -> pa.Table:
    return read_table(path)


def promote(
    client: Any,
    *,
    registered_model: str,
    eval_data: str | Path,
    eval_version: int | None,
    target: float,
    max_coverage_loss: float,
    log_path: str | Path,
    dry_run: bool = False,
    progress: Any = print,
) -> dict[str, Any]:
    """Run the gate for ``challenger`` vs ``champion`` of ``registered_model`` (see module docstring)."""
    from catalog_enrichment import registry

    registry.check_tracking_server(client)
    challenger = registry.resolve_alias(client, registered_model, registry.CHALLENGER)
    if challenger is None:
        raise CatalogEnrichError(
            f"registered model {registered_model!r} has no '{registry.CHALLENGER}' alias; "
            "run 'catalog-enrich train' first"
        )
    champion = registry.resolve_alias(client, registered_model, registry.CHAMPION)
    if table_format(eval_data) == "delta":
        pinned = table_version(eval_data) if eval_version is None else eval_version
        table = read_table(eval_data, version=pinned)
    else:
        pinned = None
        table = read_table(eval_data)
    progress(
        f"evaluating challenger v{challenger}"
        + (f" and champion v{champion}" if champion else "")
        + f" on {eval_data} (version {pinned}, {table.num_rows:,} products)"
    )
    metrics = {
        "challenger": evaluate_bundle(
            registry.load_bundle_from_uri(f"models:/{registered_model}/{challenger}"), table
        )
    }
    if champion is not None and champion != challenger:
        metrics["champion"] = evaluate_bundle(
            registry.load_bundle_from_uri(f"models:/{registered_model}/{champion}"), table
        )
    result = gate(
        metrics["challenger"], metrics.get("champion"), target=target, max_coverage_loss=max_coverage_loss
    )
    if champion == challenger:
        result = GateResult(False, ["challenger is already champion: nothing to do"])
    decided = dt.datetime.now(dt.UTC)
    summary = {
        "registered_model": registered_model,
        "challenger": challenger,
        "champion": champion,
        "promote": result.promote,
        "reasons": result.reasons,
        "metrics": metrics,
        "dry_run": dry_run,
        "eval_data": str(eval_data),
        "eval_version": pinned,
    }
    if dry_run:
        return summary
    registry.tag_version(
        client,
        registered_model,
        challenger,
        {
            "promotion.decision": "promoted" if result.promote else "rejected",
            "promotion.reasons": json.dumps(result.reasons),
            "promotion.eval_data": str(eval_data),
            "promotion.eval_version": "" if pinned is None else str(pinned),
            "promotion.champion_before": champion or "",
            "promotion.decided_at": decided.isoformat(),
        },
    )
    row = pa.table(
        {
            "decided_at": [decided],
            "registered_model": [registered_model],
            "challenger_version": [challenger],
            "champion_version": [champion],
            "promoted": [result.promote],
            "dry_run": [False],
            "eval_data": [str(eval_data)],
            "eval_version": ["" if pinned is None else str(pinned)],
            "reasons": [result.reasons],
            "metrics": [json.dumps(metrics)],
        },
        schema=_LOG_SCHEMA,
    )
    write_table(log_path, row, mode="append")
    if result.promote:
        registry.set_alias(client, registered_model, registry.CHAMPION, challenger)
        progress(f"promoted version {challenger} to '{registry.CHAMPION}'")
    else:
        progress(f"kept champion {champion}: challenger {challenger} rejected")
    return summary


def format_comparison(summary: Mapping[str, Any]) -> str:
    """The comparison table printed by ``promote`` (and ``--dry-run``)."""
    metrics = summary["metrics"]
    lines = [f"{'attribute':<14} {'challenger prec':>15} {'cov':>7} {'champion prec':>14} {'cov':>7}"]
    for attr, m in metrics["challenger"].items():
        c = metrics.get("champion", {}).get(attr)
        lines.append(
            f"{attr:<14} {m['precision']:>15.4f} {m['coverage']:>7.4f} "
            + (f"{c['precision']:>14.4f} {c['coverage']:>7.4f}" if c else f"{'—':>14} {'—':>7}")
        )
    lines.append(
        "decision: "
        + ("PROMOTE" if summary["promote"] else "KEEP CHAMPION")
        + (" (dry run, nothing changed)" if summary["dry_run"] else "")
    )
    lines += [f"  {r}" for r in summary["reasons"]]
    return "\n".join(lines)
