"""What a generated marketplace holds: counts, value frequencies, modality shares, bad rows."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.contracts import Taxonomy, load_contract, load_taxonomy
from catalog_enrichment.data.synthetic import BAD_KINDS, truth_schema

__all__ = ["format_summary", "summarize_marketplace"]


def summarize_marketplace(root: str | Path, *, taxonomy: Taxonomy | None = None) -> dict[str, Any]:
    """Summarise ``<root>/products`` and ``<root>/truth`` into plain numbers (JSON-serialisable)."""
    taxonomy = taxonomy or load_taxonomy()
    base = Path(root)
    products = read_table(
        base / "products",
        schema=load_contract("labelled_products", taxonomy=taxonomy).arrow_schema(enforce_nullability=False),
    )
    truth = read_table(base / "truth", schema=truth_schema(taxonomy))
    good = truth.filter(pc.is_null(truth["bad_kind"]))
    n_good = good.num_rows

    partitions = Counter(d.isoformat() for d in products["ingest_date"].to_pylist())
    frequencies: dict[str, dict[str, int]] = {}
    multi_share: dict[str, float] = {}
    for attr in taxonomy:
        counts: Counter[str] = Counter()
        multi = 0
        for value in good[f"true_{attr.name}"].to_pylist():
            if value is None:
                continue
            if isinstance(value, list):
                counts.update(value)
                multi += len(value) > 1
            else:
                counts[value] += 1
        frequencies[attr.name] = {v: counts.get(v, 0) for v in attr.values}
        if attr.kind == "multilabel":
            multi_share[attr.name] = multi / max(n_good, 1)

    def share(column: str) -> float:
        return float(pc.sum(good[column]).as_py() or 0) / max(n_good, 1)

    bad = Counter(k for k in truth["bad_kind"].to_pylist() if k is not None)
    noisy = Counter(a for row in good["noisy_attributes"].to_pylist() for a in row)
    return {
        "rows": products.num_rows,
        "good_rows": n_good,
        "rows_per_partition": dict(sorted(partitions.items())),
        "value_frequencies": frequencies,
        "multilabel_share": multi_share,
        "color_in_text_share": share("color_in_text"),
        "color_text_decoy_share": share("color_text_decoy"),
        "image_decoy_share": share("image_decoy"),
        "material_in_text_share": share("material_in_text"),
        "merchant_values_share": share("has_merchant_values"),
        "missing_image_share": 1.0 - share("has_image"),
        "missing_description_share": _null_share(products, "description"),
        "label_noise_per_attribute": {a: noisy.get(a, 0) for a in taxonomy.names},
        "bad_rows_by_kind": {k: bad.get(k, 0) for k in BAD_KINDS},
    }


def _null_share(table: pa.Table, column: str) -> float:
    return table[column].null_count / max(table.num_rows, 1)


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text of :func:`summarize_marketplace`'s result."""
    lines = [f"Products: {summary['rows']:,} rows ({summary['good_rows']:,} good)", "", "Rows per partition:"]
    lines += [f"  ingest_date={day}  {n:>7,}" for day, n in summary["rows_per_partition"].items()]
    lines += ["", "Value frequencies (good rows; long-tailed on purpose):"]
    for attr, freq in summary["value_frequencies"].items():
        ordered = sorted(freq.items(), key=lambda kv: -kv[1])
        multi = summary["multilabel_share"].get(attr)
        suffix = f"   [{multi:.1%} multi-valued]" if multi is not None else ""
        lines.append(f"  {attr}{suffix}")
        lines.append("    " + ", ".join(f"{v} {n:,}" for v, n in ordered))
    pct = "{:.1%}".format
    lines += [
        "",
        "Modalities:",
        f"  text names the product's color       {pct(summary['color_in_text_share'])}",
        f"  text names a decoy color              {pct(summary['color_text_decoy_share'])}",
        f"  image shows a decoy color             {pct(summary['image_decoy_share'])}",
        f"  text names the material               {pct(summary['material_in_text_share'])}",
        f"  no image (legitimately)               {pct(summary['missing_image_share'])}",
        f"  no description                        {pct(summary['missing_description_share'])}",
        f"  merchant-provided values              {pct(summary['merchant_values_share'])}",
        "",
        "Label noise (flipped labels per attribute): "
        + ", ".join(f"{a} {n:,}" for a, n in summary["label_noise_per_attribute"].items()),
        "",
        "Bad rows by kind (validation must quarantine these):",
    ]
    lines += [f"  {kind:<16} {n:>6,}" for kind, n in summary["bad_rows_by_kind"].items()]
    lines.append(f"  {'total':<16} {sum(summary['bad_rows_by_kind'].values()):>6,}")
    return "\n".join(lines)
