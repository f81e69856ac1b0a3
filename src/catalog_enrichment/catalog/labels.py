"""Labels for scheduled retraining: the catalog's own attribute values as training labels (paper 004).

``catalog-enrich labels`` builds the labelled products table (contract ``labelled_products``) from
the catalog:

* the products table, one row per product (its latest copy by ``updated_at``; rows without an id or a
  title are left out and counted);
* joined with the attribute table's rows whose source is a person - the values merchants provided
  (``LABEL_SOURCES``). The model's own values are never labels: training on them would teach the
  model its own mistakes;
* values the taxonomy does not allow, attributes it does not have, and several values for a
  single-valued attribute are dropped and counted (the taxonomy is what the model can learn);
* people's verdicts (``review import``; the latest per product and value): "yes" puts the value in
  the product's ``confirmed`` column, "no" in its ``rejected`` column (maps attribute -> values),
  where no merchant labelled the attribute. A group rejected (a colour family) rejects its members
  not judged themselves; a group confirmed does not say which member, and is not a label. These are
  partial labels: the value is known present (or absent), the attribute's other values stay
  unknown; training learns from them on the training split only, never calibrates or evaluates on
  them (the reviewed products are not a random sample);
* products in the frozen evaluation set are left out, and so are their variants (a catalog product
  grouped with one by a shared title or description, as training groups them), so the promotion
  gate never scores a product the challenger was trained on or on its twin;
* products with no label left are not written. A product labelled for some attributes only gets
  nulls for the others ("unknown", not "absent").

The table is overwritten in one Delta commit whose metadata records the source tables' versions.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.catalog.base import Catalog
from catalog_enrichment.catalog.reviews import verdicts_by_value
from catalog_enrichment.contracts import Taxonomy, check_attribute_names, load_contract
from catalog_enrichment.errors import CatalogEnrichError, ContractError

__all__ = ["LABEL_SOURCES", "LabelReport", "build_labels", "write_labels"]

# attribute-table sources whose values are ground truth for training
LABEL_SOURCES = ("merchant",)
# the partial-label columns people's verdicts fill: attribute -> values confirmed / rejected
PARTIAL_TYPE = pa.map_(pa.string(), pa.list_(pa.string()))
METADATA_KEY = "catalog_enrich.labels"


@dataclass
class LabelReport:
    """What ``labels`` read, dropped and wrote (also the commit's metadata)."""

    products_read: int = 0
    products_without_id_or_title: int = 0
    stale_copies: int = 0
    excluded_evaluation_products: int = 0
    products_without_labels: int = 0
    products_written: int = 0
    labels_per_attribute: dict[str, int] = field(default_factory=dict)
    dropped_values: dict[str, int] = field(default_factory=dict)  # "attr=value" outside the taxonomy
    dropped_attributes: dict[str, int] = field(default_factory=dict)  # attributes not in the taxonomy
    conflicting: dict[str, int] = field(default_factory=dict)  # several values for a multiclass attr
    confirmed_per_attribute: dict[str, int] = field(default_factory=dict)  # "yes" verdicts used
    rejected_per_attribute: dict[str, int] = field(default_factory=dict)  # "no" verdicts used
    unused_verdicts: dict[str, int] = field(default_factory=dict)  # why -> verdicts that are no label
    sources: dict[str, Any] = field(default_factory=dict)  # table -> {path, version}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        dropped = sum(self.dropped_values.values())
        lines = [
            f"{self.products_written:,} labelled products written "
            f"(of {self.products_read:,} read; {self.excluded_evaluation_products:,} in the evaluation "
            "set or its variants, "
            f"{self.products_without_labels:,} without a label, {self.stale_copies:,} stale copies and "
            f"{self.products_without_id_or_title:,} without id or title left out)",
            "labels per attribute: " + ", ".join(f"{a} {n:,}" for a, n in self.labels_per_attribute.items()),
        ]
        if self.confirmed_per_attribute or self.rejected_per_attribute:
            lines.append(
                f"people's verdicts: confirmed {self.confirmed_per_attribute}, "
                f"rejected {self.rejected_per_attribute}"
            )
        if self.unused_verdicts:
            lines.append(
                "verdicts that are no label: "
                + ", ".join(f"{n:,} {why}" for why, n in self.unused_verdicts.items())
            )
        if dropped or self.dropped_attributes or self.conflicting:
            top = sorted(self.dropped_values.items(), key=lambda kv: -kv[1])[:10]
            lines.append(
                f"dropped: {dropped:,} values outside the taxonomy {dict(top)}; attributes not in the "
                f"taxonomy {self.dropped_attributes}; several values for a single-valued attribute "
                f"{self.conflicting}"
            )
        return "\n".join(lines)


def _latest(products: pa.Table, report: LabelReport) -> pa.Table:
    """One row per product id, its latest copy (``updated_at``), where that copy has a title: an
    older copy's title is content the product no longer has (the job reads the latest copy)."""
    kept = products.filter(pc.is_valid(products["product_id"]))
    keys = [("product_id", "ascending")]
    if "updated_at" in kept.column_names:
        keys.append(("updated_at", "descending"))
    kept = kept.take(pc.sort_indices(kept, sort_keys=keys))
    ids = kept["product_id"].to_pylist()
    first = [i == 0 or ids[i] != ids[i - 1] for i in range(len(ids))]
    report.stale_copies = len(ids) - sum(first)
    latest = kept.filter(pa.array(first))
    titled = pc.greater(pc.utf8_length(pc.fill_null(latest["title"], "")), 0)
    report.products_without_id_or_title = products.num_rows - report.stale_copies - pc.sum(titled).as_py()
    return latest.filter(titled)


def build_labels(
    products: pa.Table,
    attributes: pa.Table,
    taxonomy: Taxonomy,
    *,
    evaluation: pa.Table | None = None,
    reviews: pa.Table | None = None,
    drawn: Mapping[str, dt.datetime] | None = None,
) -> tuple[pa.Table, LabelReport]:
    """The labelled products table and its report (pure Arrow + Python; see the module docstring);
    ``evaluation``: the frozen evaluation set (``product_id``, ``title``, ``description``), whose
    products and their variants are left out; ``drawn``: when each review sample was drawn (its
    ``sample_id`` -> ``drawn_at``), when the content its reviewers judged was copied.

    Raises:
        ContractError: the products table lacks ``product_id``/``title``, or the attribute table lacks
            ``product_id``/``attribute``/``value``/``source``.
    """
    for table, name, needed in (
        (products, "products", ("product_id", "title")),
        (attributes, "attributes", ("product_id", "attribute", "value", "source")),
    ):
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise ContractError(f"the {name} table lacks columns {missing}")
    check_attribute_names(taxonomy)
    report = LabelReport(products_read=products.num_rows)
    latest = _latest(products, report)
    values = _human_values(attributes, taxonomy, report)
    verdicts = _verdicts(reviews, taxonomy, values, _changed_at(latest), drawn or {}, report)
    ids = latest["product_id"].to_pylist()
    columns, conflicting = _label_columns(ids, values, taxonomy)
    labelled = [any(columns[a.name][i] is not None for a in taxonomy) for i in range(len(ids))]
    partial: dict[str, list[Any]] = {}
    for verdict, name in (("yes", "confirmed"), ("no", "rejected")):
        judged = verdicts[verdict]
        partial[name] = [sorted(judged[pid].items()) if pid in judged else None for pid in ids]
        labelled = [was or pid in judged for was, pid in zip(labelled, ids, strict=True)]
    product_columns = load_contract("products").names  # what the labelled table keeps, where present
    base = latest.select([c for c in product_columns if c in latest.column_names and c not in columns])
    for attr in taxonomy:
        kind = pa.list_(pa.string()) if attr.kind == "multilabel" else pa.string()
        base = base.append_column(attr.name, pa.array(columns[attr.name], kind))
    for name, column in partial.items():
        base = base.append_column(name, pa.array(column, PARTIAL_TYPE))
    out = base.filter(pa.array(labelled, pa.bool_()))
    if evaluation is not None and evaluation.num_rows:  # grouped over the labelled products alone
        held_out = _evaluation_groups(out, evaluation)
        report.excluded_evaluation_products = int(held_out.sum())
        out = out.filter(pa.array(~held_out))
    _count(report, out, taxonomy, len(ids) - report.excluded_evaluation_products, conflicting)
    return out, report


def _evaluation_groups(products: pa.Table, evaluation: pa.Table) -> np.ndarray:
    """Which ``products`` are evaluation products or grouped with one (:func:`group_ids` over both
    tables: a shared title or description)."""
    from catalog_enrichment.catalog.groups import group_ids

    def texts(table: pa.Table, name: str) -> list[Any]:
        return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows

    n = products.num_rows
    groups = group_ids(
        [t or "" for t in texts(products, "title") + texts(evaluation, "title")],
        texts(products, "description") + texts(evaluation, "description"),
    )
    held_out = pc.is_in(products["product_id"], pa.array(texts(evaluation, "product_id"), pa.string()))
    return np.isin(groups[:n], groups[n:]) | held_out.to_numpy(zero_copy_only=False)


def _human_values(
    attributes: pa.Table, taxonomy: Taxonomy, report: LabelReport
) -> dict[tuple[str, str], list[str]]:
    """(product, attribute) -> the values merchants gave or people confirmed, within the taxonomy;
    the report counts what was dropped as outside it."""
    human = attributes.filter(pc.is_in(attributes["source"], pa.array(LABEL_SOURCES)))
    allowed = {a.name: set(a.values) for a in taxonomy}
    values: dict[tuple[str, str], list[str]] = {}
    dropped_values: Counter[str] = Counter()
    dropped_attributes: Counter[str] = Counter()
    rows = zip(*(human[c].to_pylist() for c in ("product_id", "attribute", "value")), strict=True)
    for pid, attr, value in rows:
        if attr not in allowed:
            dropped_attributes[str(attr)] += 1
        elif value not in allowed[attr]:
            dropped_values[f"{attr}={value}"] += 1
        elif value not in (found := values.setdefault((pid, attr), [])):
            found.append(value)
    report.dropped_values, report.dropped_attributes = dict(dropped_values), dict(dropped_attributes)
    return values


def _changed_at(products: pa.Table) -> dict[str, dt.datetime]:
    """Product -> when its content last changed (``updated_at``, read as UTC where it has no zone;
    none without the column)."""
    if "updated_at" not in products.column_names:
        return {}
    times = products["updated_at"].to_pylist()
    zoned = [t if t is None or t.tzinfo is not None else t.replace(tzinfo=dt.UTC) for t in times]
    return dict(zip(products["product_id"].to_pylist(), zoned, strict=True))


def _verdicts(
    reviews: pa.Table | None,
    taxonomy: Taxonomy,
    values: dict[tuple[str, str], list[str]],
    changed: dict[str, dt.datetime],
    drawn: Mapping[str, dt.datetime],
    report: LabelReport,
) -> dict[str, dict[str, dict[str, list[str]]]]:
    """verdict (yes / no) -> product -> attribute -> the values people judged so, where the product
    has no full label for the attribute; a verdict on content from before the product last changed
    (``changed``: product -> ``updated_at``) judged other content and is not used: the content shown
    was copied when its sample was drawn (``drawn``: sample -> ``drawn_at``), and judged when
    reviewed, whichever was earlier. The report counts the verdicts that are no label, by why."""
    allowed = {a.name: set(a.values) for a in taxonomy}
    verdicts: dict[str, dict[str, dict[str, list[str]]]] = {"yes": {}, "no": {}}
    unused: Counter[str] = Counter()
    members = {d: taxonomy.members(d) for d in taxonomy.derived}  # group -> its parent's values
    judged = {} if reviews is None else verdicts_by_value(_on_current_content(reviews, changed, drawn))
    stale = {} if reviews is None else verdicts_by_value(reviews).keys() - judged.keys()
    if stale:
        unused["judged before the product changed"] += len(stale)
    for (pid, attr, value), (verdict, _, _, _) in judged.items():
        groups = members.get(attr, {})
        if verdict not in verdicts:
            unused[verdict] += 1  # unsure
            continue
        if value not in groups and value not in allowed.get(attr, ()):
            unused["outside the taxonomy"] += 1
            continue
        keys = [(attr, value)]
        if groups:  # a group rejected: none of its members (unless judged themselves)
            if verdict == "yes":
                unused["a value group confirmed (which member is unknown)"] += 1
                continue
            parent = taxonomy.derived[attr].parent
            keys = [(parent, v) for v in sorted(groups[value]) if (pid, parent, v) not in judged]
        elif (pid, attr) in values:
            unused["where a merchant labelled the attribute"] += 1
        for a, v in keys:
            if a in allowed and v in allowed[a] and (pid, a) not in values:
                verdicts[verdict].setdefault(pid, {}).setdefault(a, []).append(v)
    report.unused_verdicts = dict(unused)
    return verdicts


def _on_current_content(
    reviews: pa.Table, changed: Mapping[str, dt.datetime], drawn: Mapping[str, dt.datetime]
) -> pa.Table:
    """The verdicts on content the product still has (see :func:`_verdicts`): a later verdict on
    older content does not hide an earlier one on the current content."""
    keep = []
    for r in reviews.select(["product_id", "reviewed_at", "sample_id"]).to_pylist():
        since = changed.get(r["product_id"])
        seen = [t for t in (r["reviewed_at"], drawn.get(r["sample_id"])) if t is not None]
        keep.append(since is None or not seen or min(seen) >= since)
    return reviews.filter(pa.array(keep, pa.bool_()))


def _label_columns(
    ids: list[Any], values: dict[tuple[str, str], list[str]], taxonomy: Taxonomy
) -> tuple[dict[str, list[Any]], Counter[str]]:
    """Per attribute, each product's label (multi-label: its values in taxonomy order; multi-class:
    its one value, None when merchants disagree), and the disagreements per attribute."""
    columns: dict[str, list[Any]] = {}
    conflicting: Counter[str] = Counter()
    for attr in taxonomy:
        order = {v: i for i, v in enumerate(attr.values)}
        column: list[Any] = []
        for pid in ids:
            found = sorted(values.get((pid, attr.name), []), key=order.__getitem__)
            if attr.kind == "multiclass" and len(found) > 1:
                conflicting[attr.name] += 1
                found = []
            column.append(None if not found else found if attr.kind == "multilabel" else found[0])
        columns[attr.name] = column
    return columns, conflicting


def _count(
    report: LabelReport, out: pa.Table, taxonomy: Taxonomy, products: int, conflicting: Counter[str]
) -> None:
    """The report's counts of what the labelled table holds."""
    report.products_without_labels = products - out.num_rows
    report.products_written = out.num_rows
    report.labels_per_attribute = {a.name: out.num_rows - out[a.name].null_count for a in taxonomy}
    report.conflicting = dict(conflicting)
    for name, counts in (
        ("confirmed", report.confirmed_per_attribute),
        ("rejected", report.rejected_per_attribute),
    ):
        for entry in out[name].to_pylist():
            for attr_name, judged_values in entry or []:
                counts[attr_name] = counts.get(attr_name, 0) + len(judged_values)


def _read(path: Path, name: str, version: int | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The table at ``path`` (a Delta table at ``version``; None: its latest) and where it came from."""
    from catalog_enrichment.catalog.lakehouse import pinned_version, read_table

    if not path.exists():
        raise CatalogEnrichError(f"the {name} table was not found: {path}")
    pinned = pinned_version(path, version, "promotion.eval_version")
    return read_table(path, version=pinned), {"path": str(path.resolve()), "version": pinned}


def labels_sources(path: str | Path, version: int) -> dict[str, Any] | None:
    """The tables the labels committed as ``version`` of ``path`` were built from (``products``,
    ``attributes`` and, where one was left out, ``evaluation``: path and version); None where that
    commit is not one of :func:`write_labels`' (a table made otherwise) or the table is not there."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        history = DeltaTable(str(path)).history()
    except (TableNotFoundError, OSError):
        return None
    commit = next((c for c in history if c.get("version") == version), None)
    if commit is None or METADATA_KEY not in commit:
        return None
    sources = json.loads(commit[METADATA_KEY]).get("sources")
    return sources if isinstance(sources, dict) else None


def write_labels(
    *,
    catalog: Catalog,
    evaluation: Path | None,
    out: Path,
    taxonomy: Taxonomy,
    evaluation_version: int | None = None,
) -> LabelReport:
    """Read the catalog's products and attributes, build the labels and overwrite ``out`` (one Delta
    commit whose metadata holds the report, source versions included). The evaluation set's
    products are left out at ``evaluation_version`` (``promotion.eval_version``, the one the gate
    judges on; None: its latest; ``evaluation`` None: no evaluation set, nothing left out).

    Raises:
        CatalogEnrichError: ``evaluation`` is given and not found (its products would be trained on).
    """
    from deltalake import CommitProperties, write_deltalake

    product_table, product_source = catalog.snapshot("products")
    attribute_table, attribute_source = catalog.snapshot("attributes")
    sources = {"products": product_source, "attributes": attribute_source}
    eval_table = None
    if evaluation is not None:
        eval_table, sources["evaluation"] = _read(evaluation, "evaluation", evaluation_version)
    samples = catalog.keyed_rows("review_samples").select(["sample_id", "drawn_at"]).to_pylist()
    drawn = {r["sample_id"]: r["drawn_at"] for r in samples}
    table, report = build_labels(
        product_table,
        attribute_table,
        taxonomy,
        evaluation=eval_table,
        reviews=catalog.keyed_rows("reviews"),
        drawn=drawn,
    )
    report.sources = sources
    if table.num_rows == 0:
        raise CatalogEnrichError(
            f"no labelled product: the attribute table of {catalog.describe()} has no "
            f"{'/'.join(LABEL_SOURCES)} value "
            "or verdict for a product outside the evaluation set\n" + report.summary()
        )
    out.mkdir(parents=True, exist_ok=True)
    write_deltalake(
        str(out),
        table,
        mode="overwrite",
        schema_mode="overwrite",
        commit_properties=CommitProperties(custom_metadata={METADATA_KEY: json.dumps(report.to_dict())}),
    )
    return report
