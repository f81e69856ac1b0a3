"""Judge written attribute values against a generated marketplace's ground truth (``truth`` table).

Used by the demo, the enrichment tests and the benchmarks: realized precision of what the job
wrote, per attribute, with a Wilson interval, and a sample of written values next to the truth.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.calibration import wilson_lower, wilson_upper
from catalog_enrichment.contracts import Taxonomy

__all__ = [
    "format_precision",
    "judge_from_truth",
    "sample_against_truth",
    "truth_lookup",
    "truth_verdicts",
    "written_precision",
]


def truth_lookup(truth: pa.Table, taxonomy: Taxonomy) -> dict[tuple[str, str], set[str]]:
    """(product_id, attribute) -> true values, from the good rows of the truth table."""
    good = truth.filter(pc.is_null(truth["bad_kind"])) if "bad_kind" in truth.column_names else truth
    out: dict[tuple[str, str], set[str]] = {}
    ids = good["product_id"].to_pylist()
    for attr in taxonomy.learned:
        for pid, val in zip(ids, good[f"true_{attr.name}"].to_pylist(), strict=True):
            if pid is None or val is None:
                continue
            out[(pid, attr.name)] = set(val) if isinstance(val, list) else {val}
    for d in taxonomy.derived.values():  # a derived attribute's truth: its parent's values' groups
        parent = taxonomy[d.parent]
        out.update(
            {(pid, d.name): d.groups_of(v, parent) for (pid, a), v in list(out.items()) if a == d.parent}
        )
    return out


def _model_rows(attributes: pa.Table) -> pa.Table:
    return attributes.filter(pc.equal(attributes["source"], "model"))


def written_precision(attributes: pa.Table, truth: pa.Table, taxonomy: Taxonomy) -> dict[str, dict[str, Any]]:
    """Per attribute: written model values, how many are right, precision, one-sided Wilson 95 % bounds."""
    lookup = truth_lookup(truth, taxonomy)
    rows = _model_rows(attributes)
    result: dict[str, dict[str, Any]] = {}
    for attr in taxonomy.outputs:
        mine = rows.filter(pc.equal(rows["attribute"], attr.name))
        pairs = zip(mine["product_id"].to_pylist(), mine["value"].to_pylist(), strict=True)
        judged = [v in lookup[(p, attr.name)] for p, v in pairs if (p, attr.name) in lookup]
        n, k = len(judged), int(sum(judged))
        result[attr.name] = {
            "written": mine.num_rows,
            "judged": n,
            "correct": k,
            "precision": k / n if n else None,
            "wilson_lower": float(wilson_lower(k, n)) if n else None,
            "wilson_upper": float(wilson_upper(k, n)) if n else None,
        }
    return result


def format_precision(result: dict[str, dict[str, Any]]) -> str:
    lines = ["attribute      written  correct  precision  (Wilson 95 %)"]
    for name, r in result.items():
        p = "   -   " if r["precision"] is None else f"{r['precision']:.3f}"
        bounds = "" if r["precision"] is None else f"[{r['wilson_lower']:.3f}, {r['wilson_upper']:.3f}]"
        lines.append(f"{name:<14} {r['written']:>7,}  {r['correct']:>7,}  {p:>9}  {bounds}")
    return "\n".join(lines)


def sample_against_truth(
    attributes: pa.Table, truth: pa.Table, taxonomy: Taxonomy, *, n: int = 12, seed: int = 0
) -> str:
    """A table of ``n`` written values beside the true values (a visual check for the demo)."""
    import random

    lookup = truth_lookup(truth, taxonomy)
    rows = _model_rows(attributes).to_pylist()
    random.Random(seed).shuffle(rows)
    lines = [f"{'product':<14} {'attribute':<13} {'written':<12} {'conf':>5}  {'true':<24} ok"]
    for r in rows[:n]:
        true = lookup.get((r["product_id"], r["attribute"]), set())
        ok = "yes" if r["value"] in true else "NO"
        lines.append(
            f"{r['product_id']:<14} {r['attribute']:<13} {r['value']:<12} {r['confidence']:>5.2f}  "
            f"{', '.join(sorted(true)) or '?':<24} {ok}"
        )
    return "\n".join(lines)


def truth_verdicts(values: pa.Table, lookup: dict[tuple[str, str], set[str]]) -> list[str]:
    """Per (product_id, attribute, value) row: "yes" when the value is one of the product's true
    values, "no" when it is not, "unsure" when the truth does not say (a bad row; ``lookup`` from
    :func:`truth_lookup`)."""
    out = []
    for pid, attr, value in zip(
        values["product_id"].to_pylist(),
        values["attribute"].to_pylist(),
        values["value"].to_pylist(),
        strict=True,
    ):
        true = lookup.get((pid, attr))
        out.append("unsure" if true is None else "yes" if value in true else "no")
    return out


def judge_from_truth(
    sample: pa.Table, truth: pa.Table, taxonomy: Taxonomy, *, reviewer: str, reviewed_at: str
) -> pa.Table:
    """A review sample file with its ``verdict`` column filled from the ground truth, as a careful
    person would (:func:`truth_verdicts`); ``reviewer`` and ``reviewed_at`` are filled too."""
    verdicts = truth_verdicts(sample, truth_lookup(truth, taxonomy))
    n = sample.num_rows
    filled = {"verdict": verdicts, "reviewer": [reviewer] * n, "reviewed_at": [reviewed_at] * n}
    for name, column in filled.items():
        sample = sample.set_column(sample.schema.get_field_index(name), name, pa.array(column, pa.string()))
    return sample
