"""``catalog-enrich review sample``: a stratified sample of written values for people to judge.

The population is the model values the catalog holds now for one run or one model version. The
strata are its (attribute, value, category) cells. Paper 004 §6.4 drew its human-evaluation sample
"to have a balanced distribution of all existing attribute values for the considered categories";
here each judged unit is one written value, so a unit sits in exactly one cell and the allocation is
explicit, level by level: the sample size evenly over the attributes; each attribute's share over its
values, and each value's over its categories, by :func:`allocate` — ``balance`` of it evenly (water
filling: rare values and categories get as many as common ones, capped by what exists), the rest in
proportion to size, so the large cells that hold most of what was written are sampled too and the
audit's weights stay moderate. Inside a cell the values are a seeded simple random sample, so each
stands for ``stratum_size / stratum_sampled`` written values. Same catalog, size, balance and seed:
the same sample.

(An iterative stratification over value and category labels together, tried first, sampled the
rare value-category combinations, mostly wrong values in odd categories, and left large cells
unsampled; weighting back could not recover what those cells held.)

The annotator files: ``FILE`` (CSV or Parquet) with the product's text, an image file per row under
``images/``, the written value and empty ``verdict`` / ``reviewer`` / ``reviewed_at`` columns, and
``FILE.html``, a page that shows the same rows with yes / no / unsure buttons and saves a verdict file
(:mod:`catalog_enrichment.review.page`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.catalog.base import keyed_schema
from catalog_enrichment.catalog.reviews import neutralize_formulas
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.errors import CatalogEnrichError

if TYPE_CHECKING:
    from catalog_enrichment.catalog.base import Catalog

__all__ = [
    "DrawnSample",
    "allocate",
    "draw_sample",
    "of_one_run",
    "sample_file_format",
    "stratified_sample",
    "water_fill",
    "write_annotator_files",
]

NO_CATEGORY = "(none)"
# what an annotator sees beside the sample's own columns
_TEXT = ("title", "description")


def water_fill(total: int, counts: dict[Any, int]) -> dict[Any, int]:
    """``total`` split as evenly as the ``counts`` allow: each key gets an equal share, capped by
    its count, the rest going on to the larger keys (a remainder to the largest)."""
    out: dict[Any, int] = {}
    keys = sorted(counts, key=lambda k: (counts[k], str(k)))
    left = min(total, sum(counts.values()))
    for i, key in enumerate(keys):
        out[key] = min(counts[key], left // (len(keys) - i))
        left -= out[key]
    return out


def allocate(total: int, counts: dict[Any, int], balance: float) -> dict[Any, int]:
    """``total`` units over strata of sizes ``counts``: ``balance`` of them evenly (water filling), the
    rest in proportion to what each stratum has left (largest remainders), never more than it has."""
    total = min(total, sum(counts.values()))
    out = water_fill(round(balance * total), counts)
    rest = total - sum(out.values())
    room = {k: counts[k] - out[k] for k in counts}
    spare = sum(room.values())
    if rest <= 0 or spare == 0:
        return out
    quota = {k: rest * room[k] / spare for k in counts}
    extra = {k: int(q) for k, q in quota.items()}
    order = sorted(counts, key=lambda k: (-(quota[k] - extra[k]), -room[k], str(k)))
    left = rest - sum(extra.values())
    for k in order:
        if left == 0:
            break
        if extra[k] < room[k]:
            extra[k] += 1
            left -= 1
    return {k: out[k] + extra[k] for k in counts}


def stratified_sample(
    attribute: Sequence[str],
    value: Sequence[str],
    category: Sequence[str | None],
    size: int,
    seed: int,
    balance: float = 0.5,
) -> np.ndarray:
    """Indices of ``size`` units (see the module docstring): attributes evenly, each attribute's
    share over its values, each value's over its categories (:func:`allocate` with ``balance``), a
    seeded simple random sample inside each cell; in a seeded random order, so people who judge the
    file from the top and stop judge a random part of every cell, as the audit assumes."""
    rng = np.random.default_rng(seed)
    cells: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(attribute, value, category, strict=True)):
        cells[(key[0], key[1], key[2] or NO_CATEGORY)].append(i)
    chosen: list[int] = []
    per_attribute = water_fill(size, dict(Counter(attribute)))
    for attr, quota in sorted(per_attribute.items()):
        values: Counter[str] = Counter()
        for cell, units in cells.items():
            if cell[0] == attr:
                values[cell[1]] += len(units)
        for v, n_v in sorted(allocate(quota, dict(values), balance).items()):
            mine = {c[2]: units for c, units in cells.items() if c[:2] == (attr, v)}
            for c, n_c in sorted(allocate(n_v, {k: len(u) for k, u in mine.items()}, balance).items()):
                units = mine[c]
                chosen += [units[j] for j in rng.permutation(len(units))[:n_c]]
    return rng.permutation(np.array(chosen, np.int64))


@dataclass(frozen=True)
class DrawnSample:
    sample_id: str
    rows: pa.Table  # the review_samples rows
    population: int  # written values it was drawn from


def _latest_products(catalog: Catalog, columns: list[str], product_ids: Iterable[str]) -> pa.Table:
    """One row per product of ``product_ids`` (its latest copy), ``columns`` only."""
    products = catalog.products_of(product_ids, [*columns, "updated_at"])
    products = products.filter(pc.is_valid(products["product_id"]))
    products = products.take(
        pc.sort_indices(products, sort_keys=[("product_id", "ascending"), ("updated_at", "descending")])
    )
    ids = products["product_id"].to_pylist()
    first = [i == 0 or ids[i] != ids[i - 1] for i in range(len(ids))]
    return products.filter(pa.array(first, pa.bool_())).select(columns)


_RUN_MARK = "-r"


def of_one_run(sample_id: str) -> bool:
    """Whether a sample was drawn from the values of one run (``--run-id``), not of a whole model
    version: its strata count that run's values only."""
    return re.search(re.escape(_RUN_MARK) + r"[0-9a-f]{6}$", sample_id) is not None


def draw_sample(
    catalog: Catalog,
    *,
    run_id: str | None = None,
    model_version: str | None = None,
    model_name: str | None = None,
    size: int = 500,
    seed: int = 0,
    balance: float = 0.5,
    now: dt.datetime | None = None,
    record: bool = True,
) -> DrawnSample:
    """Draw a sample of the model values one run (or one model version: ``model_name``'s, where
    given) wrote and (``record``) record it in the catalog's ``review_samples`` table.

    Raises:
        CatalogEnrichError: neither or both of ``run_id``/``model_version``, a size below 1, or no
            written value to draw from.
    """
    if (run_id is None) == (model_version is None):
        raise CatalogEnrichError("give one of --run-id and --model-version")
    if size < 1:
        raise CatalogEnrichError(f"--size must be at least 1, got {size}")
    now = now or dt.datetime.now(dt.UTC)
    rows = _written_by(catalog, run_id, model_version, model_name)
    categories = _latest_products(
        catalog, ["product_id", "category"], pc.unique(rows["product_id"]).to_pylist()
    )
    lookup = dict(zip(categories["product_id"].to_pylist(), categories["category"].to_pylist(), strict=True))
    attribute, value = rows["attribute"].to_pylist(), rows["value"].to_pylist()
    category = [lookup.get(p) or NO_CATEGORY for p in rows["product_id"].to_pylist()]
    picked = stratified_sample(attribute, value, category, size, seed, balance)
    version = rows["model_version"][0].as_py() if model_version is None else str(model_version)
    sample_id = f"review-v{_safe(version)}-{now:%Y%m%dT%H%M%SZ}-s{seed}"
    if run_id is not None:  # two runs of one version sampled in the same second: two samples
        sample_id += _RUN_MARK + hashlib.blake2b(run_id.encode(), digest_size=3).hexdigest()
    table = _sample_rows(rows, picked, list(zip(attribute, value, category, strict=True)), sample_id, now)
    if record and sample_id in set(catalog.keyed_rows("review_samples")["sample_id"].to_pylist()):
        raise CatalogEnrichError(f"a sample {sample_id} was drawn already; draw again in a second")
    if record:
        catalog.upsert_rows("review_samples", table)
    return DrawnSample(sample_id, table, rows.num_rows)


# a version number is a registered model's: another model's is read under its name
_ANOTHER_MODEL = " (another registered model's version: --set mlflow.registered_model=NAME)"


def _written_by(
    catalog: Catalog, run_id: str | None, model_version: str | None, model_name: str | None
) -> pa.Table:
    """The model values one run or one model version (``model_name``'s, where given) wrote, in
    (product, attribute, value) order.

    Raises:
        CatalogEnrichError: there is none.
    """
    if run_id is not None:
        wanted, what = {"run_id": run_id}, f"run {run_id}"
    else:
        named = {} if model_name is None else {"model_name": model_name}
        wanted = {**named, "model_version": str(model_version)}
        what = f"{model_name or 'model'} v{model_version}"
    rows = catalog.attribute_rows({"source": "model", **wanted})
    if rows.num_rows == 0:
        other = "" if run_id is not None or model_name is None else _ANOTHER_MODEL
        raise CatalogEnrichError(
            f"{catalog.describe()} holds no value written by {what}: nothing to review{other}"
        )
    return rows.take(
        pc.sort_indices(rows, sort_keys=[(k, "ascending") for k in ("product_id", "attribute", "value")])
    )


def _sample_rows(
    rows: pa.Table, picked: np.ndarray, cells: list[tuple[str, str, str]], sample_id: str, now: dt.datetime
) -> pa.Table:
    """The ``review_samples`` rows of the ``picked`` values, each with the size of its stratum
    ((attribute, value, category) ``cells``), value and attribute among everything written."""
    strata, values, attributes = Counter(cells), Counter(c[:2] for c in cells), Counter(c[0] for c in cells)
    keys = [cells[i] for i in picked]
    sampled = Counter(keys)
    chosen = rows.take(pa.array(picked))
    return pa.table(
        {
            "sample_id": [sample_id] * len(picked),
            "product_id": chosen["product_id"],
            "attribute": chosen["attribute"],
            "value": chosen["value"],
            "category": [None if k[2] == NO_CATEGORY else k[2] for k in keys],
            "confidence": chosen["confidence"],
            "model_name": chosen["model_name"],
            "model_version": chosen["model_version"],
            "run_id": chosen["run_id"],
            "stratum_size": [strata[k] for k in keys],
            "stratum_sampled": [sampled[k] for k in keys],
            "value_size": [values[k[:2]] for k in keys],
            "attribute_size": [attributes[k[0]] for k in keys],
            "drawn_at": [now] * len(picked),
        },
        schema=keyed_schema("review_samples"),
    )


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80]


_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"RIFF", ".webp"))


def _image_file(data: bytes, folder: Path, product_id: str) -> str:
    """The product's image under ``folder``, named by a digest of its id and of the bytes: two ids
    never share a file (``A/1`` and ``A:1``, or ids alike in their first characters, would by a
    sanitised name), nor do two photos of one product - a later sample written beside an earlier
    one never changes the photo the earlier one's reviewers see."""
    suffix = next((ext for magic, ext in _MAGIC if data.startswith(magic)), ".img")
    digest = hashlib.sha256(product_id.encode() + b"\x00" + hashlib.sha256(data).digest()).hexdigest()
    name = f"{digest[:32]}{suffix}"
    (folder / name).write_bytes(data)
    return f"{folder.name}/{name}"


def sample_file_format(out: Path) -> str:
    """``.csv`` or ``.parquet``, the suffix of the sample file ``out``.

    Raises:
        CatalogEnrichError: any other suffix.
    """
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise CatalogEnrichError(f"--out {out}: the sample is written as .csv or .parquet")
    return suffix


def write_annotator_files(
    catalog: Catalog, sample: DrawnSample, out: Path, images: ImagePolicy
) -> tuple[pa.Table, int]:
    """Write the sample for annotators: ``out`` (.csv or .parquet) and an image file per product under
    ``<out folder>/images`` (read from the product's bytes, or its ``image_uri`` under the images
    policy); the rows written and how many of them have no image.

    Raises:
        CatalogEnrichError: ``out`` is neither .csv nor .parquet.
    """
    suffix = sample_file_format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent / "images"
    folder.mkdir(exist_ok=True)
    ids = set(sample.rows["product_id"].to_pylist())
    products = _latest_products(catalog, ["product_id", *_TEXT, "image", "image_uri"], ids)
    info: dict[str, dict[str, Any]] = {}
    for p in products.to_pylist():
        data = p["image"]
        if data is None and p["image_uri"]:
            data, _ = images.read(p["image_uri"])
        info[p["product_id"]] = {
            "title": p["title"] or "",
            "description": p["description"] or "",
            "image": _image_file(data, folder, p["product_id"]) if data else "",
        }
    rows = sample.rows
    empty = {"title": "", "description": "", "image": ""}
    extra = [info.get(pid, empty) for pid in rows["product_id"].to_pylist()]
    table = pa.table(
        {
            **{
                c: rows[c]
                for c in ("sample_id", "product_id", "attribute", "value", "confidence", "category")
            },
            **{c: pa.array([e[c] for e in extra], pa.string()) for c in ("title", "description", "image")},
            "verdict": pa.array([""] * rows.num_rows, pa.string()),
            "reviewer": pa.array([""] * rows.num_rows, pa.string()),
            "reviewed_at": pa.array([""] * rows.num_rows, pa.string()),
        }
    )
    if suffix == ".csv":
        from pyarrow import csv

        csv.write_csv(neutralize_formulas(table), out)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, out)
    return table, sum(1 for e in extra if not e["image"])
