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
  reached from one through a shared title or description, as training groups them), so the
  promotion gate never scores a product the challenger was trained on or on its twin;
* products with no label left are not written. A product labelled for some attributes only gets
  nulls for the others ("unknown", not "absent").

The joins run in Spark (a catalog of tens of millions of products never sits on the driver); the
rows are staged once, so every step sees the same read, and streamed into one Delta commit that
overwrites the table, whose metadata records the report and the source tables' versions.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import uuid
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.catalog.base import Catalog
from catalog_enrichment.catalog.reviews import verdicts_by_value
from catalog_enrichment.contracts import (
    RESERVED_NAMES,
    Taxonomy,
    check_attribute_names,
    load_contract,
    merchant_key,
)
from catalog_enrichment.errors import CatalogEnrichError, ContractError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["LABEL_SOURCES", "LabelReport", "build_labels", "write_labels"]

# attribute-table sources whose values are ground truth for training
LABEL_SOURCES = ("merchant",)
# the partial-label columns people's verdicts fill: attribute -> values confirmed / rejected
PARTIAL_TYPE = pa.map_(pa.string(), pa.list_(pa.string()))
METADATA_KEY = "catalog_enrich.labels"
# the report names the most frequent values (and attributes) outside the taxonomy, and counts all
REPORTED_DROPS = 100
# the staged column of the attributes a merchant labelled (a disagreement included: no verdict fills it)
MERCHANT, REVIEWED = RESERVED_NAMES[1:3]
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
STAGED_ROW_GROUP = 8 << 20  # bytes


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
    dropped_total: dict[str, int] = field(default_factory=dict)  # "values" / "attributes" -> rows
    conflicting: dict[str, int] = field(default_factory=dict)  # several values for a multiclass attr
    confirmed_per_attribute: dict[str, int] = field(default_factory=dict)  # "yes" verdicts used
    rejected_per_attribute: dict[str, int] = field(default_factory=dict)  # "no" verdicts used
    unused_verdicts: dict[str, int] = field(default_factory=dict)  # why -> verdicts that are no label
    sources: dict[str, Any] = field(default_factory=dict)  # table -> {path, version}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        dropped = self.dropped_total.get("values", 0)
        lines = [
            f"{self.products_written:,} labelled products written "
            f"(of {self.products_read:,} read; {self.excluded_evaluation_products:,} in the evaluation "
            "set or its variants, "
            f"{self.products_without_labels:,} without a label, {self.stale_copies:,} stale copies and "
            f"{self.products_without_id_or_title:,} without id, title or UTF-8 text left out)",
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


def build_labels(
    spark: SparkSession,
    products: DataFrame,
    attributes: DataFrame,
    taxonomy: Taxonomy,
    staging: Path,
    *,
    evaluation: pa.Table | None = None,
    reviews: pa.Table | None = None,
    drawn: Mapping[str, dt.datetime] | None = None,
) -> tuple[pa.RecordBatchReader, LabelReport]:
    """The labelled products table, as a reader of its record batches, and its report (complete
    before the reader is read); see the module docstring. ``products``: the products table (the
    products contract's columns it has); ``attributes``: the label sources' rows (``product_id``,
    ``attribute``, ``value``); ``staging``: a folder the latest labelled copies are staged in (read
    by the returned reader; the caller removes it); ``evaluation``: the frozen evaluation set
    (``product_id``, ``title``, ``description``), whose products and their variants are left out;
    ``drawn``: when each review sample was drawn (its ``sample_id`` -> ``drawn_at``), when the
    content its reviewers judged was copied.

    The joins run in Spark; the driver holds the taxonomy, people's verdicts (one row per value a
    person judged), the evaluation set and the products grouped with it, and one record batch at
    a time.

    Raises:
        ContractError: the products table lacks ``product_id``/``title``, or the attribute table lacks
            ``product_id``/``attribute``/``value``.
    """
    from pyspark.sql import functions as F

    for df, name, needed in (
        (products, "products", ("product_id", "title")),
        (attributes, "attributes", ("product_id", "attribute", "value")),
    ):
        missing = [c for c in needed if c not in df.columns]
        if missing:
            raise ContractError(f"the {name} table lacks columns {missing}")
    check_attribute_names(taxonomy)
    report = LabelReport()
    names = [a.name for a in taxonomy]
    reviewed = sorted({p for p in (reviews["product_id"].to_pylist() if reviews is not None else []) if p})
    kept = [c for c in load_contract("products").names if c in products.columns and c not in names]
    latest = _latest(products, report).select(*kept)
    labelled = latest.join(_label_columns(spark, latest, attributes, taxonomy, report), "product_id", "left")
    labelled = labelled.join(_ids(spark, reviewed).withColumn(REVIEWED, F.lit(True)), "product_id", "left")
    has_label = F.lit(False)
    for name in names:
        has_label = has_label | F.col(name).isNotNull()
    staged = staging / "labelled"
    chosen = labelled.where(has_label | F.col(REVIEWED).isNotNull()).select(*kept, *names, MERCHANT)
    # row groups of a few megabytes: the driver streams them into the commit one batch at a time
    chosen.write.mode("overwrite").option("parquet.block.size", STAGED_ROW_GROUP).parquet(str(staged))
    rows = spark.read.parquet(str(staged))  # every later step reads this one copy
    verdicts, bare = _verdicts_of(rows, has_label, reviewed, reviews, taxonomy, drawn or {}, report)
    judged = set(verdicts["yes"]) | set(verdicts["no"])
    unlabelled = [p for p in bare if p not in judged]
    left_out = set(unlabelled)
    if evaluation is not None and evaluation.num_rows:
        held = _evaluation_groups(
            spark, rows.join(_ids(spark, unlabelled), "product_id", "left_anti"), evaluation
        )
        left_out |= held
    written = rows.join(_ids(spark, sorted(left_out)), "product_id", "left_anti")
    counts = written.agg(F.count(F.lit(1)), *(F.count(name) for name in names)).first()
    assert counts is not None
    total = rows.count() - len(unlabelled)  # products labelled, the evaluation's among them
    report.excluded_evaluation_products = total - counts[0]
    titled = report.products_read - report.stale_copies - report.products_without_id_or_title
    report.products_without_labels, report.products_written = titled - total, counts[0]
    report.labels_per_attribute = dict(zip(names, counts[1:], strict=True))
    for verdict, count in (("yes", report.confirmed_per_attribute), ("no", report.rejected_per_attribute)):
        for pid, judged_values in verdicts[verdict].items():
            if pid not in left_out:
                for attr_name, values in judged_values.items():
                    count[attr_name] = count.get(attr_name, 0) + len(values)
    schema = _labelled_schema(kept, taxonomy)
    return pa.RecordBatchReader.from_batches(schema, _batches(staged, schema, verdicts, left_out)), report


# the text columns the run checks as UTF-8 (validation/rules.py UTF8_COLUMNS)
_TEXTS = ("product_id", "title", "description", "image_uri", "category")


def _ids(spark: SparkSession, ids: Sequence[str]) -> DataFrame:
    """A small DataFrame of product ids (joined broadcast)."""
    from pyspark.sql import functions as F

    return F.broadcast(spark.createDataFrame([(i,) for i in ids], "product_id string"))


def _latest(products: DataFrame, report: LabelReport) -> DataFrame:
    """One row per product id, its latest copy (``updated_at``), where that copy has a title and
    its texts are UTF-8 (the run quarantines a copy whose are not, and training could not read
    it): an older copy's title is content the product no longer has (the job reads the latest
    copy). Copies of the same time are ordered usable first, then by a hash of their content, so
    that every pass over the rows picks the same one. The report counts what was read and left out."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import MapType

    usable = F.length(F.coalesce(F.col("title"), F.lit(""))) > 0
    for text in [c for c in _TEXTS if c in products.columns]:
        usable = usable & F.coalesce(F.is_valid_utf8(text), F.lit(True))
    hashable = [f.name for f in products.schema.fields if not isinstance(f.dataType, MapType)]
    order = [usable.desc(), F.xxhash64(*hashable)]
    if "updated_at" in products.columns:
        order.insert(0, F.col("updated_at").desc_nulls_last())
    copies = products.where(F.col("product_id").isNotNull()).withColumn(
        "_copy", F.row_number().over(Window.partitionBy("product_id").orderBy(*order))
    )
    read = products.count()
    stale, latest = copies.agg(
        F.count(F.when(F.col("_copy") > 1, 1)), F.count(F.when((F.col("_copy") == 1) & usable, 1))
    ).first() or (0, 0)
    report.products_read, report.stale_copies = read, stale
    report.products_without_id_or_title = read - stale - latest
    return copies.where((F.col("_copy") == 1) & usable).drop("_copy")


def _label_columns(
    spark: SparkSession, products: DataFrame, attributes: DataFrame, taxonomy: Taxonomy, report: LabelReport
) -> DataFrame:
    """``product_id`` and one column per attribute: each product's label (multi-label: its values in
    taxonomy order; multi-class: its one value, null when merchants disagree), over the values within
    the taxonomy - a merchant's attribute or value written in another case, width or with spaces
    around it is the taxonomy's (:func:`~catalog_enrichment.contracts.merchant_key`, on the
    executors). The report counts what was dropped as outside it (the most frequent
    :data:`REPORTED_DROPS` of each kind, and how many in all) and the disagreements of the
    ``products`` (the latest titled copies)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    allowed = spark.createDataFrame(
        [
            (merchant_key(a.name), merchant_key(v), a.name, v, i)
            for a in taxonomy
            for i, v in enumerate(a.values)
        ],
        "_attribute_key string, _value_key string, _attribute string, _value string, _order int",
    )
    key = F.udf(lambda text: None if text is None else merchant_key(text), "string")
    rows = (
        attributes.select("product_id", "attribute", "value")
        .withColumns({"_attribute_key": key("attribute"), "_value_key": key("value")})
        .join(F.broadcast(allowed), ["_attribute_key", "_value_key"], "left")
    )
    attribute = F.coalesce(F.col("attribute"), F.lit("None"))
    known = F.col("_attribute_key").isin([merchant_key(a.name) for a in taxonomy])
    why = F.when(~F.coalesce(known, F.lit(False)), F.lit("attribute")).when(
        F.col("_order").isNull(), F.lit("value")
    )
    named = F.when(why == "attribute", attribute).otherwise(
        F.concat(attribute, F.lit("="), F.coalesce(F.col("value"), F.lit("None")))
    )
    dropped = rows.where(why.isNotNull()).groupBy(why.alias("why"), named.alias("name")).count()
    kind = Window.partitionBy("why")
    rank = F.row_number().over(kind.orderBy(F.desc("count"), "name"))
    found: dict[str, dict[str, int]] = {"attribute": {}, "value": {}}
    totals: dict[str, int] = {}
    ranked = dropped.withColumn("_rank", rank).withColumn("_total", F.sum("count").over(kind))
    for r in ranked.where(F.col("_rank") <= REPORTED_DROPS).collect():
        found[r["why"]][r["name"]], totals[r["why"]] = r["count"], r["_total"]
    report.dropped_attributes, report.dropped_values = found["attribute"], found["value"]
    report.dropped_total = {
        "attributes": int(totals.get("attribute", 0)),
        "values": int(totals.get("value", 0)),
    }
    pairs = (
        rows.where(why.isNull())
        .select(
            "product_id", F.col("_attribute").alias("attribute"), F.col("_value").alias("value"), "_order"
        )
        .distinct()
        .groupBy("product_id", "attribute")
        .agg(F.sort_array(F.collect_list(F.struct("_order", "value"))).alias("_found"))
    )
    single = [a.name for a in taxonomy if a.kind == "multiclass"]
    conflict = F.col("attribute").isin(single) & (F.size("_found") > 1)
    latest = products.select("product_id")
    conflicting = pairs.where(conflict).join(latest, "product_id", "left_semi").groupBy("attribute").count()
    report.conflicting = dict(conflicting.collect())
    values = F.transform(F.col("_found"), lambda x: x["value"])
    merchant = F.collect_list("attribute").alias(MERCHANT)  # attributes labelled, disagreeing or not
    columns = [
        F.first(
            F.when(
                F.col("attribute") == a.name,
                values
                if a.kind == "multilabel"
                else F.when(F.size("_found") == 1, F.col("_found")[0]["value"]),
            ),
            ignorenulls=True,
        ).alias(a.name)
        for a in taxonomy
    ]
    return pairs.groupBy("product_id").agg(*columns, merchant)


def _verdicts_of(
    rows: DataFrame,
    has_label: Any,
    reviewed: Sequence[str],
    reviews: pa.Table | None,
    taxonomy: Taxonomy,
    drawn: Mapping[str, dt.datetime],
    report: LabelReport,
) -> tuple[dict[str, dict[str, dict[str, list[str]]]], list[str]]:
    """:func:`_verdicts` over the staged ``rows`` of the reviewed products (when each last changed,
    which attributes a merchant labelled), kept for those products only: a product not in the
    catalog, or whose latest copy has no title, gets no label; and the reviewed staged products
    without a merchant's label (``has_label`` false)."""
    from pyspark.sql import functions as F

    if reviews is None or not reviewed:
        return _verdicts(None, taxonomy, set(), {}, drawn, report), []
    spark = rows.sparkSession
    changed: dict[str, dt.datetime] = {}
    labelled: set[tuple[str, str]] = set()
    staged: set[str] = set()
    bare: list[str] = []
    micros = F.unix_micros("updated_at") if "updated_at" in rows.columns else F.lit(None).cast("long")
    reviewed_rows = rows.join(_ids(spark, reviewed), "product_id")
    columns = ("product_id", micros.alias("_at"), MERCHANT, has_label.alias("_labelled"))
    for r in reviewed_rows.select(*columns).collect():
        if r["_at"] is not None:  # as a UTC instant, whatever the driver's time zone
            changed[r["product_id"]] = EPOCH + dt.timedelta(microseconds=r["_at"])
        labelled.update((r["product_id"], a) for a in r[MERCHANT] or ())
        staged.add(r["product_id"])
        if not r["_labelled"]:
            bare.append(r["product_id"])
    verdicts = _verdicts(reviews, taxonomy, labelled, changed, drawn, report)
    return {v: {p: j for p, j in by.items() if p in staged} for v, by in verdicts.items()}, bare


def _evaluation_groups(spark: SparkSession, products: DataFrame, evaluation: pa.Table) -> set[str]:
    """The ids to leave out: the evaluation products' own, and those of the ``products`` grouped with
    one - reachable from one through shared texts, transitively within
    :data:`~catalog_enrichment.catalog.groups.MAX_GROUP` hops (the most a group of that many
    products spans) - the same title and description, or the same title or description where at
    most ``MAX_GROUP`` products (evaluation ones included) share it (a text more share is a
    template, not one article's variants: :func:`~catalog_enrichment.catalog.groups.group_ids`).
    Texts compare case- and whitespace-insensitively; an empty description links nothing. The
    evaluation set and the products grouped with it are small; the catalog's texts stay in Spark."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from catalog_enrichment.catalog.groups import MAX_GROUP

    columns = [c for c in ("product_id", "title", "description") if c in evaluation.column_names]
    eval_rows = evaluation.select(columns).to_pylist()
    given = spark.createDataFrame(
        [(r.get("title"), r.get("description")) for r in eval_rows], "title string, description string"
    )
    edges = _text_keys(products).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        seeds = _text_keys(given.withColumn("product_id", F.lit(None).cast("string")))
        shared = edges.unionByName(seeds).groupBy("kind", "key").count()
        links = shared.where((F.col("kind") == "both") | (F.col("count") <= MAX_GROUP)).select("key")
        linked = (
            edges.join(links, "key", "left_semi")
            .select("product_id", "key")
            .persist(StorageLevel.MEMORY_AND_DISK)
        )
        keys = {r["key"] for r in seeds.join(links, "key", "left_semi").select("key").distinct().collect()}
        frontier, held = set(keys), set[str]()
        for _ in range(MAX_GROUP):  # a group of MAX_GROUP products spans fewer hops
            if not frontier:
                break
            reached = linked.join(
                F.broadcast(spark.createDataFrame([(k,) for k in frontier], "key long")), "key"
            ).select("product_id")
            # one Spark job a hop: the products the frontier reaches, with every key of theirs
            products = F.broadcast(reached.distinct())  # a few variants a hop
            their = linked.join(products, "product_id").select("product_id", "key").collect()
            held |= {r["product_id"] for r in their}
            frontier = {r["key"] for r in their} - keys
            keys |= frontier
        linked.unpersist()
    finally:
        edges.unpersist()
    return held | {r["product_id"] for r in eval_rows if r.get("product_id") is not None}


def _text_keys(products: DataFrame) -> DataFrame:
    """``product_id``, ``kind`` and ``key`` (a 64-bit hash of the folded text) of each product's
    title and description together (``both``), title, and non-empty description."""
    from pyspark.sql import functions as F

    def folded(name: str) -> Any:
        text = F.col(name) if name in products.columns else F.lit(None).cast("string")
        return F.trim(F.regexp_replace(F.lower(F.coalesce(text, F.lit(""))), r"(?U)\s+", " "))

    title, description = folded("title"), folded("description")
    keys = F.array(
        F.struct(F.lit("both").alias("kind"), F.xxhash64(F.lit("both"), title, description).alias("key")),
        F.struct(F.lit("title").alias("kind"), F.xxhash64(F.lit("title"), title).alias("key")),
        F.when(
            F.length(description) > 0,
            F.struct(
                F.lit("description").alias("kind"), F.xxhash64(F.lit("description"), description).alias("key")
            ),
        ),
    )
    return (
        products.select("product_id", F.explode(keys).alias("_k"))
        .where(F.col("_k").isNotNull())
        .select("product_id", "_k.kind", "_k.key")
    )


def _labelled_schema(kept: Sequence[str], taxonomy: Taxonomy) -> pa.Schema:
    """The labelled table's columns: the product columns kept (the contract's types), one per
    attribute, and the partial labels."""
    products = load_contract("products").arrow_schema(enforce_nullability=False)
    fields = [products.field(c) for c in kept]
    fields += [
        pa.field(a.name, pa.list_(pa.string()) if a.kind == "multilabel" else pa.string()) for a in taxonomy
    ]
    return pa.schema([*fields, pa.field("confirmed", PARTIAL_TYPE), pa.field("rejected", PARTIAL_TYPE)])


def _batches(
    staged: Path,
    schema: pa.Schema,
    verdicts: Mapping[str, Mapping[str, Mapping[str, list[str]]]],
    left_out: set[str],
) -> Iterator[pa.RecordBatch]:
    """The staged rows, less those ``left_out``, with their partial labels, one batch at a time."""
    import pyarrow.dataset as ds

    lost = pa.array(sorted(left_out), pa.string())
    from catalog_enrichment.catalog.lakehouse import LOW_MEMORY_SCAN

    for batch in ds.dataset(str(staged), format="parquet").to_batches(use_threads=False, **LOW_MEMORY_SCAN):
        batch = batch.filter(pc.invert(pc.is_in(batch["product_id"], lost)))
        if not batch.num_rows:
            continue
        ids = batch["product_id"].to_pylist()
        columns = {name: batch[name] for name in batch.schema.names}
        for verdict, name in (("yes", "confirmed"), ("no", "rejected")):
            judged = verdicts[verdict]
            columns[name] = pa.array(
                [sorted(judged[pid].items()) if pid in judged else None for pid in ids], PARTIAL_TYPE
            )
        yield pa.RecordBatch.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)


def _verdicts(
    reviews: pa.Table | None,
    taxonomy: Taxonomy,
    labelled: Collection[tuple[str, str]],
    changed: dict[str, dt.datetime],
    drawn: Mapping[str, dt.datetime],
    report: LabelReport,
) -> dict[str, dict[str, dict[str, list[str]]]]:
    """verdict (yes / no) -> product -> attribute -> the values people judged so, where no merchant
    labelled the attribute (``labelled``: product, attribute); a verdict on content from before the
    product last changed (``changed``: product -> ``updated_at``) judged other content and is not
    used: the content shown was copied when its sample was drawn (``drawn``: sample ->
    ``drawn_at``), and judged when reviewed, whichever was earlier. The report counts the verdicts
    that are no label, by why."""
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
        elif (pid, attr) in labelled:
            unused["where a merchant labelled the attribute"] += 1
        for a, v in keys:
            if a in allowed and v in allowed[a] and (pid, a) not in labelled:
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
    commit is not one of :func:`write_labels`' (a table made otherwise) or the table is not there.

    Raises:
        CatalogEnrichError: the table is there but its history cannot be read (a store that does
            not answer): what the labels left out is unknown, not absent.
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    try:
        history = DeltaTable(str(path)).history()
    except TableNotFoundError:
        return None
    except (DeltaError, OSError) as exc:
        raise CatalogEnrichError(
            f"cannot read the history of the training table {path}: {exc} (what its labels left out "
            "is not known; try again once it can be read)"
        ) from exc
    commit = next((c for c in history if c.get("version") == version), None)
    if commit is None or METADATA_KEY not in commit:
        return None
    sources = json.loads(commit[METADATA_KEY]).get("sources")
    return sources if isinstance(sources, dict) else None


def write_labels(
    spark: SparkSession,
    *,
    catalog: Catalog,
    evaluation: Path | None,
    out: Path,
    taxonomy: Taxonomy,
    evaluation_version: int | None = None,
) -> LabelReport:
    """Read the catalog's products and label sources in Spark, build the labels and overwrite ``out``
    (one Delta commit whose metadata holds the report, source versions included). The evaluation
    set's products are left out at ``evaluation_version`` (``promotion.eval_version``, the one the
    gate judges on; None: its latest; ``evaluation`` None: no evaluation set, nothing left out).
    The rows are staged beside ``out`` (a folder the executors and the driver both reach), and the
    staging is removed whatever happens.

    Raises:
        CatalogEnrichError: the products or attribute table is not there, or ``evaluation`` is given
            and not found (its products would be trained on), or no product is labelled.
    """
    from deltalake import CommitProperties, write_deltalake

    sources = {"products": catalog.source_of("products"), "attributes": catalog.source_of("attributes")}
    eval_table = None
    if evaluation is not None:
        eval_table, sources["evaluation"] = _read(evaluation, "evaluation", evaluation_version)
    samples = catalog.keyed_rows("review_samples").select(["sample_id", "drawn_at"]).to_pylist()
    drawn = {r["sample_id"]: r["drawn_at"] for r in samples}
    staging = out.parent / f"_{out.name}-staging-{uuid.uuid4().hex[:12]}"
    try:
        products = catalog.read_products(spark, load_contract("products"), require_columns=False)
        values = catalog.read_attribute_values(spark, LABEL_SOURCES)
        if not catalog.reads_snapshot:  # a query runs again per Spark action: every step reads one copy
            products.write.parquet(str(staging / "products"))
            values.write.parquet(str(staging / "values"))
            products, values = (
                spark.read.parquet(str(staging / "products")),
                spark.read.parquet(str(staging / "values")),
            )
        batches, report = build_labels(
            spark,
            products,
            values,
            taxonomy,
            staging,
            evaluation=eval_table,
            reviews=catalog.keyed_rows("reviews"),
            drawn=drawn,
        )
        report.sources = sources
        if report.products_written == 0:
            raise CatalogEnrichError(
                f"no labelled product: the attribute table of {catalog.describe()} has no "
                f"{'/'.join(LABEL_SOURCES)} value "
                "or verdict for a product outside the evaluation set\n" + report.summary()
            )
        out.mkdir(parents=True, exist_ok=True)
        write_deltalake(
            str(out),
            batches,
            mode="overwrite",
            schema_mode="overwrite",
            commit_properties=CommitProperties(custom_metadata={METADATA_KEY: json.dumps(report.to_dict())}),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
