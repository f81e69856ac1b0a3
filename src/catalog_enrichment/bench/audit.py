"""``catalog-enrich bench audit``: do the audit's intervals hold the truth on a real enrichment run?

On a catalog the job wrote from a generated marketplace (a ``demo`` folder), many review samples are
drawn (seeds 0..K-1, for each ``review.balance`` asked for), judged from the ground truth as a careful
person would, and audited, in memory (nothing is recorded in the catalog). Per balance and attribute:
how often the interval contains the true precision of everything the version wrote, and its median
width. A 95 % interval should contain it in about 95 % of the samples or more.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.catalog.base import keyed_schema
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.truth import truth_lookup, truth_verdicts, written_precision
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.review.audit import audit_sample
from catalog_enrichment.review.sample import draw_sample

if TYPE_CHECKING:
    from catalog_enrichment.catalog.base import Catalog

__all__ = ["format_audit_markdown", "run_audit_benchmark"]

_T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _verdicts(sample: pa.Table, lookup: dict[tuple[str, str], set[str]]) -> pa.Table:
    """The sample judged from the truth ("unsure" where the truth does not say)."""
    verdict = truth_verdicts(sample, lookup)
    n = sample.num_rows
    return pa.table(
        {
            **{k: sample[k] for k in ("sample_id", "product_id", "attribute", "value", "model_version")},
            "verdict": verdict,
            "reviewer": ["truth"] * n,
            "reviewed_at": pa.array([_T0] * n, pa.timestamp("us", "UTC")),
            "source_file": ["truth"] * n,
            "imported_at": pa.array([_T0] * n, pa.timestamp("us", "UTC")),
        }
    ).cast(keyed_schema("reviews"))


def run_audit_benchmark(
    catalog: Catalog,
    truth: pa.Table,
    taxonomy: Taxonomy,
    *,
    size: int,
    seeds: int,
    balances: Sequence[float],
    confidence: float,
    target: float,
) -> dict[str, Any]:
    """Audit ``seeds`` samples per balance of the latest model version's values (see the module doc).

    Raises:
        CatalogEnrichError: the catalog holds no model value.
    """
    rows = catalog.attribute_rows()
    rows = rows.filter(pc.equal(rows["source"], "model"))
    if rows.num_rows == 0:
        raise CatalogEnrichError(f"{catalog.describe()} holds no model value to audit")
    version = max(set(rows["model_version"].to_pylist()), key=lambda v: (len(v), v))
    mine = rows.filter(pc.equal(rows["model_version"], version))
    written = written_precision(mine, truth, taxonomy)
    true = {a: r["precision"] for a, r in written.items() if r["precision"]}
    lookup = truth_lookup(truth, taxonomy)
    result: dict[str, Any] = {
        "model_version": version,
        "written": {a: r["written"] for a, r in written.items()},
        "true_precision": true,
        "size": size,
        "seeds": seeds,
        "confidence": confidence,
        "balances": {},
    }
    audited = _Audited(catalog, version, lookup, true)
    for balance in balances:
        result["balances"][str(balance)] = _balance(
            audited, balance, size, seeds, confidence=confidence, target=target
        )
    return result


@dataclass(frozen=True)
class _Audited:
    """A model version's values in ``catalog``, the truth's ``lookup`` of right values and the true
    precision of everything the version wrote, per attribute."""

    catalog: Catalog
    version: str
    lookup: dict[tuple[str, str], set[str]]
    true: dict[str, float]


def _balance(
    audited: _Audited, balance: float, size: int, seeds: int, *, confidence: float, target: float
) -> dict[str, Any]:
    """``seeds`` samples at one balance, judged from the truth and audited: per attribute how often
    the interval holds the true precision, and its median width."""
    catalog, version, lookup, true = audited.catalog, audited.version, audited.lookup, audited.true
    inside = dict.fromkeys(true, 0)
    widths: dict[str, list[float]] = {a: [] for a in true}
    every = 0
    for seed in range(seeds):
        drawn = draw_sample(
            catalog, model_version=version, size=size, seed=seed, balance=balance, record=False, now=_T0
        )
        audit = audit_sample(
            drawn.rows,
            _verdicts(drawn.rows, lookup),
            model_version=version,
            sample_id=drawn.sample_id,
            target_of=lambda _name, _version: target,
            confidence=confidence,
            min_support=10**9,
        )
        ok = True
        for attr, e in audit.attributes.items():
            if attr not in true or e.lower is None or e.upper is None:
                continue
            hit = e.lower <= true[attr] <= e.upper
            inside[attr] += hit
            ok &= hit
            widths[attr].append(e.upper - e.lower)
        every += ok
    return {
        "inside": inside,
        "every_attribute_inside": every,
        "median_width": {a: round(float(np.median(w)), 4) for a, w in widths.items() if w},
    }


def format_audit_markdown(result: dict[str, Any]) -> str:
    attrs = list(result["true_precision"])
    lines = [
        f"Audit intervals against the truth: model version {result['model_version']}, "
        f"{result['seeds']} samples of {result['size']} per balance, {result['confidence']:.0%} intervals",
        "",
        "| balance | "
        + " | ".join(f"{a} inside / median width" for a in attrs)
        + " | every attribute inside |",
        "|---|" + "---|" * (len(attrs) + 1),
    ]
    for balance, r in result["balances"].items():
        cells = [
            f"{r['inside'][a]}/{result['seeds']} / {r['median_width'].get(a, float('nan')):.3f}"
            for a in attrs
        ]
        lines.append(
            f"| {balance} | " + " | ".join(cells) + f" | {r['every_attribute_inside']}/{result['seeds']} |"
        )
    lines.append("")
    lines.append("true precision: " + ", ".join(f"{a} {p:.3f}" for a, p in result["true_precision"].items()))
    return "\n".join(lines) + "\n"
