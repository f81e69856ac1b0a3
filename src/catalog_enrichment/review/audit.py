"""``catalog-enrich report --audit``: the realized precision of what was written, from people's verdicts.

A sample (``review sample``) drew written values per (attribute, value, category) cell, more from rare
cells than their share; the audit weights each judged value back to its cell's population. Within a
cell the judged values are a simple random sample of it (the drawing order inside a cell is random;
values not judged yet or judged "unsure" are left out, so each judged value stands for
``cell size / judged in the cell`` written values). A cell of the population nobody judged is
represented by the judged cells of the same value, and a value nobody judged by the attribute's
judged values (reported as the share of the population judged directly).

Per attribute (and per category with at least ``min_support`` verdicts): the weighted precision and a
two-sided Wilson interval at ``confidence``, computed at the effective sample size: the smaller of
Kish's ``(sum w)^2 / sum w^2`` and ``p(1 - p) / var``, where ``var`` is the stratified variance
estimate (each cell's within-cell variance, finite-population corrected). An attribute whose upper
bound is below the target is flagged: with the stated confidence, less than the target share of its
written values is right.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.calibration import wilson_lower
from catalog_enrichment.catalog.reviews import ITEM, latest_verdicts
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.review.sample import of_one_run

__all__ = ["Audit", "Estimate", "audit_sample", "format_audit", "plot_audit", "weighted_precision"]

BELOW, MEETS, INCONCLUSIVE = "below target", "meets target", "inconclusive"


@dataclass
class Estimate:
    """Realized precision of one attribute (or one attribute within a category)."""

    population: float  # written values it stands for
    sampled: int
    judged: int  # yes + no
    right: int
    unsure: int
    precision: float | None
    lower: float | None
    upper: float | None
    n_effective: float
    judged_share: float  # share of the population in cells (or values) someone judged
    status: str = INCONCLUSIVE


def weighted_precision(
    cell: list[tuple[str, str]],
    right: np.ndarray,
    cell_size: dict[tuple[str, str], int],
    value_size: dict[str, int],
    attribute_size: int,
    *,
    confidence: float,
    domain: np.ndarray | None = None,
) -> tuple[float | None, float | None, float | None, float, float]:
    """Weighted precision, Wilson interval, effective size and judged share of one attribute's judged
    values (see the module docstring).

    ``cell[i]`` is judged value i's (value, category); ``right[i]`` its verdict (True = yes);
    ``cell_size`` the population of every sampled cell, ``value_size`` of every sampled value;
    ``domain``: a mask of the judged values to estimate over (a category), each weighted by its
    cell alone (another category's cells nobody judged are not the domain's to stand for).
    """
    m = len(cell)
    if m == 0:
        return None, None, None, 0.0, 0.0
    y = np.asarray(right, np.float64)
    judged_in: dict[tuple[str, str], int] = defaultdict(int)
    for c in cell:
        judged_in[c] += 1
    w = np.array([cell_size[c] / judged_in[c] for c in cell])
    by_value: dict[str, float] = defaultdict(float)
    for c in judged_in:
        by_value[c[0]] += cell_size[c]
    judged_share = sum(by_value.values()) / attribute_size
    if domain is None:
        # cells nobody judged: their value's judged cells stand for them; values nobody judged: the
        # attribute's (a domain - a category - is estimated over its own judged cells alone: a
        # value's cells in other categories are not this category's)
        w *= np.array([value_size[c[0]] / by_value[c[0]] for c in cell])
        w *= attribute_size / sum(value_size[v] for v in by_value)
    else:
        keep = np.asarray(domain, bool)
        if not keep.any():
            return None, None, None, 0.0, 0.0
        w, y, cell = w[keep], y[keep], [c for c, k in zip(cell, keep, strict=True) if k]
        # of the domain's categories' sampled cells, the share in cells judged (here: in the domain)
        categories = {c[1] for c in cell}
        sampled = sum(size for c, size in cell_size.items() if c[1] in categories)
        judged_share = sum(cell_size[c] for c in set(cell)) / sampled
    p = float(np.sum(w * y) / np.sum(w))
    kish = float(np.sum(w) ** 2 / np.sum(w**2))
    total = float(np.sum(w))
    variance = 0.0
    for c in set(cell):
        members = np.array([x == c for x in cell])
        n_c, big_w = int(members.sum()), float(np.sum(w[members])) / total
        if n_c > 1:
            s2 = float(np.var(y[members], ddof=1))
            variance += big_w**2 * s2 / n_c * max(0.0, 1 - n_c / cell_size[c])
    n_eff = kish if variance <= 0 else min(kish, p * (1 - p) / variance)
    n_eff = max(min(n_eff, float(len(cell))), 1.0)
    two_sided = 1 - (1 - confidence) / 2
    lower = float(wilson_lower(p * n_eff, n_eff, confidence=two_sided))
    upper = float(1 - wilson_lower((1 - p) * n_eff, n_eff, confidence=two_sided))
    return p, lower, upper, n_eff, judged_share


@dataclass
class Audit:
    sample_id: str
    model_name: str
    model_version: str
    drawn_at: str
    target: float
    confidence: float
    attributes: dict[str, Estimate] = field(default_factory=dict)
    categories: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    other_samples: list[str] = field(default_factory=list)
    run_id: str | None = None  # the run a sample of one run (``--run-id``) drew from: it stands for it alone

    @property
    def failed(self) -> list[str]:
        return [a for a, e in self.attributes.items() if e.status == BELOW]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"failed": self.failed}


def _status(e: Estimate, target: float) -> str:
    if e.upper is not None and e.upper < target:
        return BELOW
    if e.lower is not None and e.lower >= target:
        return MEETS
    return INCONCLUSIVE


def _reviewed_samples(
    samples: pa.Table,
    reviews: pa.Table,
    model_version: str | None,
    sample_id: str | None,
    model_name: str | None = None,
) -> list[dict[str, Any]]:
    """The samples asked for that have verdicts, oldest first: the one ``sample_id``; else those of
    the whole ``model_version`` (of every version without one; ``model_name``'s, where given) - a
    sample of a single run is audited by its id alone, as it stands for that run only.

    Raises:
        CatalogEnrichError: no such sample, a sample of another version than ``model_version``, or
            no verdict on it yet.
    """
    reviewed = set(reviews["sample_id"].to_pylist())
    drawn = (
        samples.group_by(["sample_id", "model_name", "model_version", "drawn_at"]).aggregate([]).to_pylist()
    )

    def of_version(d: dict[str, Any]) -> bool:
        return d["model_version"] == str(model_version) and model_name in (None, d["model_name"])

    if sample_id is not None:
        drawn = [d for d in drawn if d["sample_id"] == sample_id]
        other = {f"{d['model_name']} v{d['model_version']}" for d in drawn if not of_version(d)}
        if model_version is not None and other:  # its verdict would decide another version's fate
            raise CatalogEnrichError(
                f"sample {sample_id} judged {', '.join(sorted(other))}, not "
                f"{'model' if model_name is None else model_name} v{model_version}"
            )
    else:  # a sample of one run stands for that run alone: audited by its id only
        if model_version is not None:
            drawn = [d for d in drawn if of_version(d)]
        runs = sorted(d["sample_id"] for d in drawn if of_one_run(d["sample_id"]))
        drawn = [d for d in drawn if not of_one_run(d["sample_id"])]
        if not drawn and runs:
            of = "any model version" if model_version is None else f"model version {model_version}"
            draw = "" if model_version is None else f" --model-version {model_version}"
            raise CatalogEnrichError(
                f"no review sample of the whole of {of}, only of single runs ({', '.join(runs)}): draw "
                f"one with `catalog-enrich review sample{draw}`, or audit a run's with --sample"
            )
    which = (
        f"sample {sample_id}"
        if sample_id
        else f"model version {model_version}"
        if model_version
        else "any version"
    )
    if not drawn:
        raise CatalogEnrichError(
            f"no review sample for {which}; draw one with `catalog-enrich review sample`"
        )
    with_verdicts = sorted((d for d in drawn if d["sample_id"] in reviewed), key=lambda d: d["drawn_at"])
    if not with_verdicts:
        raise CatalogEnrichError(
            f"no verdict yet on the review sample(s) of {which}: {', '.join(d['sample_id'] for d in drawn)}; "
            "import one with `catalog-enrich review import FILE`"
        )
    return with_verdicts


def audit_sample(
    samples: pa.Table,
    reviews: pa.Table,
    *,
    model_version: str | None,
    sample_id: str | None,
    target_of: Callable[[str, str], float],
    confidence: float,
    min_support: int,
    model_name: str | None = None,
) -> Audit:
    """The audit of one sample: ``sample_id``, else the latest sample of the whole ``model_version``
    (``model_name``'s where given; of any version without one; not one of a single run,
    :func:`of_one_run`) that has verdicts, against the precision target ``target_of(model name,
    version)`` of the version that wrote it.

    Raises:
        CatalogEnrichError: no such sample, or no verdict on it yet.
    """
    with_verdicts = _reviewed_samples(samples, reviews, model_version, sample_id, model_name)
    chosen = with_verdicts[-1]
    target = target_of(chosen["model_name"], chosen["model_version"])
    mine = samples.filter(pc.equal(samples["sample_id"], chosen["sample_id"]))
    verdicts = latest_verdicts(reviews.filter(pc.equal(reviews["sample_id"], chosen["sample_id"])))
    verdict_of = {
        tuple(r[k] for k in ITEM): r["verdict"] for r in verdicts.select([*ITEM, "verdict"]).to_pylist()
    }
    audit = Audit(
        chosen["sample_id"],
        chosen["model_name"],
        chosen["model_version"],
        str(chosen["drawn_at"]),
        target,
        confidence,
        other_samples=[d["sample_id"] for d in with_verdicts[:-1]],
    )
    rows = mine.to_pylist()
    if of_one_run(audit.sample_id) and rows:
        audit.run_id = rows[0]["run_id"]
    for attr in sorted({r["attribute"] for r in rows}):
        items = [r for r in rows if r["attribute"] == attr]
        audit.attributes[attr], audit.categories[attr] = _attribute_audit(
            items, verdict_of, target=target, confidence=confidence, min_support=min_support
        )
    return audit


def _attribute_audit(
    items: list[dict[str, Any]],
    verdict_of: dict[tuple[Any, ...], str],
    *,
    target: float,
    confidence: float,
    min_support: int,
) -> tuple[Estimate, dict[str, Estimate]]:
    """One attribute's sampled rows -> its estimate and its categories' (those with the support)."""

    def verdict(r: dict[str, Any]) -> str | None:
        return verdict_of.get(tuple(r[k] for k in ITEM))

    def cell(r: dict[str, Any]) -> tuple[str, str]:
        return (r["value"], r["category"] or "")

    judged = [r for r in items if verdict(r) in ("yes", "no")]
    cells = [cell(r) for r in judged]
    right = np.array([verdict(r) == "yes" for r in judged], bool)
    cell_size = {cell(r): r["stratum_size"] for r in items}
    value_size = {r["value"]: r["value_size"] for r in items}

    def estimate(domain: np.ndarray | None, in_domain: list[dict[str, Any]], population: float) -> Estimate:
        p, lo, hi, n_eff, share = weighted_precision(
            cells,
            right,
            cell_size,
            value_size,
            items[0]["attribute_size"],
            confidence=confidence,
            domain=domain,
        )
        keep = right if domain is None else right[domain]
        e = Estimate(
            population=population,
            sampled=len(in_domain),
            judged=int(keep.size),
            right=int(keep.sum()),
            unsure=sum(verdict(r) == "unsure" for r in in_domain),
            precision=p,
            lower=lo,
            upper=hi,
            n_effective=round(n_eff, 1),
            judged_share=round(share, 4),
        )
        e.status = _status(e, target)
        return e

    whole = estimate(None, items, float(items[0]["attribute_size"]))
    per_category: dict[str, Estimate] = {}
    for category in sorted({c for _, c in cells}):
        domain = np.array([c == category for _, c in cells], bool)
        if domain.sum() >= min_support:
            mine = [r for r in items if cell(r)[1] == category]
            population = float(sum(cell_size[k] for k in {cell(r) for r in mine}))
            per_category[category or "(none)"] = estimate(domain, mine, population)
    return whole, per_category


def _bounds(e: Estimate) -> str:
    if e.precision is None:
        return "     -                     "
    return f"{e.precision:>6.3f}  [{e.lower:.3f}, {e.upper:.3f}]"


def format_audit(audit: Audit) -> str:
    """The audit as a text table."""
    run = "" if audit.run_id is None else f" (run {audit.run_id} alone)"
    head = (
        f"audit of {audit.model_name} v{audit.model_version}{run}, sample {audit.sample_id} "
        f"(drawn {audit.drawn_at}); "
        f"target {audit.target:.0%}, {audit.confidence:.0%} Wilson intervals weighted to the written values"
    )
    lines = [
        head,
        f"{'attribute':<22} {'written':>8} {'judged':>6} {'right':>5} {'unsure':>6}  precision  interval"
        f"           n_eff  status",
    ]
    for attr, e in audit.attributes.items():
        lines.append(
            f"{attr:<22} {e.population:>8,.0f} {e.judged:>6} {e.right:>5} {e.unsure:>6}  {_bounds(e)} "
            f"{e.n_effective:>6.1f}  {e.status}"
            + (
                ""
                if round(e.judged_share, 3) >= 1
                else f" ({e.judged_share:.1%} of it in cells judged directly)"
            )
        )
        for category, c in audit.categories.get(attr, {}).items():
            lines.append(
                f"  {category[:20]:<20} {c.population:>8,.0f} {c.judged:>6} {c.right:>5} {c.unsure:>6}  "
                f"{_bounds(c)} {c.n_effective:>6.1f}  {c.status}"
            )
    if audit.failed and audit.run_id is not None:
        lines.append(
            f"FAILED: {', '.join(audit.failed)} below {audit.target:.0%} in what run {audit.run_id} wrote; "
            f"roll it back with `catalog-enrich rollback --run-id {audit.run_id}`"
        )
    elif audit.failed:
        lines.append(
            f"FAILED: {', '.join(audit.failed)} below {audit.target:.0%}; roll back what this version "
            f"wrote with `catalog-enrich rollback --model-version {audit.model_version} --set "
            f"mlflow.registered_model={audit.model_name}`"
        )
    if audit.other_samples:
        lines.append(f"(earlier samples of this version with verdicts: {', '.join(audit.other_samples)})")
    return "\n".join(lines)


def plot_audit(audit: Audit, out: Path) -> Path:
    """A PNG: each attribute's precision with its interval, the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [a for a, e in audit.attributes.items() if e.precision is not None]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * max(len(names), 1)))
    for i, name in enumerate(names):
        e = audit.attributes[name]
        assert e.precision is not None and e.lower is not None and e.upper is not None
        colour = {BELOW: "#c62828", MEETS: "#2e7d32"}.get(e.status, "#f9a825")
        ax.errorbar(
            e.precision,
            i,
            xerr=[[e.precision - e.lower], [e.upper - e.precision]],
            fmt="o",
            color=colour,
            capsize=4,
        )
    ax.axvline(audit.target, color="black", linestyle="--", linewidth=1, label=f"target {audit.target:.0%}")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(f"realized precision ({audit.confidence:.0%} Wilson interval, weighted)")
    ax.set_title(f"{audit.model_name} v{audit.model_version}: {audit.sample_id}", fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
