"""People's verdicts on written values: the two review tables and what reads them.

* ``review_samples`` (contract ``schemas/review_samples.yaml``): the written values a sample drew,
  each with the size of its (attribute, value, category) stratum in the population it was drawn
  from, so the audit can weight verdicts back to that population;
* ``reviews`` (``schemas/reviews.yaml``): verdicts (yes / no / unsure), keyed by the sampled value
  and the reviewer, with who, when and from which file.

:func:`read_verdict_file` + :func:`verdict_rows` check a verdict file whole before anything is
written (an unknown sample, product, attribute or value, an unknown verdict, a missing reviewer or
a bad time is an error that names the rows; nothing is half-imported); :func:`import_verdicts`
writes only what is new or changed, in one commit, so importing the same file twice changes nothing.
:func:`latest_verdicts` gives one verdict per sampled value (the latest ``reviewed_at``; ties: the
reviewer name last in order); :func:`verdicts_by_value` one per product and value over every sample
(the labels builder's input, ``catalog/labels.py``); :func:`rejected_values` the values people
rejected for a model version, which its runs never write again and remove (``enrich.py``).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.catalog.base import keyed_key, keyed_schema
from catalog_enrichment.errors import CatalogEnrichError

if TYPE_CHECKING:
    from catalog_enrichment.catalog.base import Catalog

__all__ = [
    "FILE_COLUMNS",
    "VERDICTS",
    "ImportResult",
    "import_verdicts",
    "latest_verdicts",
    "neutralize_formulas",
    "read_verdict_file",
    "rejected_values",
    "verdict_rows",
    "verdicts_by_value",
]

VERDICTS = ("yes", "no", "unsure")
ITEM = ("sample_id", "product_id", "attribute", "value")
# what a verdict file must hold (the sample file and the review page's download both do)
FILE_COLUMNS = (*ITEM, "verdict", "reviewer", "reviewed_at")
_SHOWN = 10  # problems listed in an error
# Reviewers open the CSV in a spreadsheet: a cell starting with = + - @ (or tab / CR) would be a
# live formula (=HYPERLINK(...) in a merchant's title). Export prefixes ' to such a cell (and to
# one that already starts with quotes before such a character, so the round trip is exact); import
# takes one ' off again. A spreadsheet that drops the ' on saving gives back the original text.
_FORMULA = re.compile(r"'*[=+\-@\t\r]")
_QUOTED_FORMULA = re.compile(r"'+[=+\-@\t\r]")
# ... and a key cell it would take for a number or a date ("00000131" saved back as 131, "10-12" as
# a date), which would then name no drawn item: quoted the same way
_NUMBER = re.compile(r"'*[0-9.]")
_QUOTED_NUMBER = re.compile(r"'+[0-9.]")
# A reviewed_at this far after the import is a clock's skew; later is refused (it would win over
# every later verdict forever).
CLOCK_SKEW = dt.timedelta(minutes=5)


def neutralize_formulas(table: pa.Table) -> pa.Table:
    """``table`` with every text cell that a spreadsheet would take for a formula quoted (``'``),
    and every cell of an item's key (:data:`ITEM`) it would take for a number or a date."""
    columns = []
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            values = [v if v is None or not _quoted(v, name) else "'" + v for v in column.to_pylist()]
            column = pa.chunked_array([pa.array(values, column.type)])
        columns.append(column)
    return pa.table(columns, names=table.column_names)


def _quoted(text: str, column: str) -> bool:
    """Whether export quotes this cell of ``column``."""
    return bool(_FORMULA.match(text) or (column in ITEM and _NUMBER.match(text)))


def _restored(text: str, column: str) -> str:
    """A cell of ``column`` of a CSV verdict file as it was before :func:`neutralize_formulas`."""
    quoted = _QUOTED_FORMULA.match(text) or (column in ITEM and _QUOTED_NUMBER.match(text))
    return text[1:] if quoted else text


@dataclass
class ImportResult:
    """What ``review import`` read and changed."""

    rows_read: int
    verdicts: int
    not_reviewed: int  # rows with an empty verdict: left for later
    inserted: int
    updated: int
    unchanged: int
    older: int = 0  # the reviewer's verdict stored is later: it stands

    def summary(self) -> str:
        older = f", {self.older:,} older than the same reviewer's stored one (kept)" if self.older else ""
        return (
            f"{self.rows_read:,} rows read: {self.verdicts:,} verdicts ({self.inserted:,} new, "
            f"{self.updated:,} changed, {self.unchanged:,} already imported{older}), {self.not_reviewed:,} "
            "rows without a verdict yet"
        )


class ReviewFileError(CatalogEnrichError):
    """A verdict file that cannot be imported; nothing of it was."""


def read_verdict_file(path: Path) -> pa.Table:
    """A verdict file (CSV or Parquet) as a table of strings (timestamps kept as they are).

    Raises:
        ReviewFileError: not found, not CSV/Parquet, unreadable, or lacking a needed column.
    """
    if not path.is_file():
        raise ReviewFileError(f"no verdict file at {path}")
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif path.suffix.lower() == ".csv":
            from pyarrow import csv

            # descriptions hold line breaks inside quotes (the sample's own CSV writes them so)
            parse = csv.ParseOptions(newlines_in_values=True)
            with path.open("rb") as f:
                header = csv.read_csv(
                    f, read_options=csv.ReadOptions(skip_rows_after_names=1 << 30), parse_options=parse
                )
            table = csv.read_csv(
                path,
                parse_options=parse,
                convert_options=csv.ConvertOptions(
                    column_types={c: pa.string() for c in header.column_names}, strings_can_be_null=False
                ),
            )
        else:
            raise ReviewFileError(f"{path}: a verdict file is .csv or .parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReviewFileError(
            f"{path} cannot be read as {path.suffix[1:]}: {str(exc).splitlines()[0]}"
        ) from None
    missing = [c for c in FILE_COLUMNS if c not in table.column_names]
    if missing:
        raise ReviewFileError(f"{path} lacks column(s) {missing}; a verdict file holds {list(FILE_COLUMNS)}")
    if path.suffix.lower() == ".csv":
        table = table.select(list(FILE_COLUMNS))
        table = pa.table(
            {c: pa.array([_restored(v, c) for v in table[c].to_pylist()], pa.string()) for c in FILE_COLUMNS}
        )
    return table


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _when(value: Any, default: dt.datetime) -> dt.datetime | None:
    """A time from the file (ISO 8601 text or a timestamp; naive = UTC); ``default`` when empty;
    None when it is not a time."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    text = _text(value)
    if not text:
        return default
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _row_problems(
    r: dict[str, Any], verdict: str, reviewer: str, when: dt.datetime | None, now: dt.datetime
) -> list[str]:
    """What is wrong with one verdict row of a drawn value: the verdict, the reviewer, the time."""
    problems = []
    if verdict not in VERDICTS:
        problems.append(f"verdict {r['verdict']!r} is not one of {'/'.join(VERDICTS)}")
    if not reviewer:
        problems.append("a verdict without a reviewer")
    if when is None:
        problems.append(f"reviewed_at {r['reviewed_at']!r} is not an ISO 8601 time")
    elif when > now + CLOCK_SKEW:
        problems.append(f"reviewed_at {r['reviewed_at']!r} is in the future (now {now:%Y-%m-%dT%H:%MZ})")
    return problems


def verdict_rows(
    file: pa.Table, samples: pa.Table, *, source_file: str, file_time: dt.datetime, now: dt.datetime
) -> tuple[pa.Table, int]:
    """The ``reviews`` rows of a verdict file, and how many of its rows have no verdict yet.

    Every row must name a value of a drawn sample (``samples``); a verdict is yes, no or unsure (any
    case) or empty (not reviewed yet: skipped); a verdict needs a reviewer; ``reviewed_at`` is ISO
    8601 (empty: ``file_time``) and not after ``now`` (beyond a few minutes of clock skew); one
    reviewer gives one verdict per value in a file.

    Raises:
        ReviewFileError: listing the offending rows (1-based, after the header), when any is wrong.
    """
    drawn = {
        tuple(r[k] for k in ITEM): r["model_version"]
        for r in samples.select([*ITEM, "model_version"]).to_pylist()
    }
    sample_ids = {k[0] for k in drawn}
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, ...], str] = {}
    skipped = 0
    for i, r in enumerate(file.select(list(FILE_COLUMNS)).to_pylist(), start=1):
        key = tuple("" if r[k] is None else str(r[k]) for k in ITEM)  # exactly as drawn: not stripped
        verdict = _text(r["verdict"]).lower()
        if not verdict:
            skipped += 1
            continue
        where = f"row {i} ({'/'.join(key[1:])})"
        if key[0] not in sample_ids:
            problems.append(f"{where}: unknown sample_id {key[0]!r}")
            continue
        if key not in drawn:
            problems.append(f"{where}: sample {key[0]} drew no such product/attribute/value {key[1:]!r}")
            continue
        reviewer, when = _text(r["reviewer"]), _when(r["reviewed_at"], file_time)
        problems += [f"{where}: {p}" for p in _row_problems(r, verdict, reviewer, when, now)]
        before = seen.setdefault((*key, reviewer), verdict)
        if before != verdict:
            problems.append(f"{where}: {reviewer} gave {before!r} and {verdict!r} to the same value")
        rows.append(
            {
                **dict(zip(ITEM, key, strict=True)),
                "model_version": drawn.get(key),
                "verdict": verdict,
                "reviewer": reviewer,
                "reviewed_at": when,
                "source_file": source_file,
                "imported_at": now,
            }
        )
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        shown = "; ".join(problems[:_SHOWN])
        raise ReviewFileError(f"{source_file}: {len(problems)} problem(s), nothing imported: {shown}{more}")
    # the same reviewer's same verdict twice in one file: once
    unique = {
        tuple(r[k] for k in ("sample_id", "product_id", "attribute", "value", "reviewer")): r for r in rows
    }
    return pa.Table.from_pylist(list(unique.values()), schema=keyed_schema("reviews")), skipped


def _changes(new: pa.Table, existing: pa.Table, file_time: dt.datetime) -> tuple[pa.Table, int, int, int]:
    """The rows of ``new`` that are not in ``existing`` as they are (provenance of the import
    aside), how many of them replace a row with the same key, and how many were left out as older
    than the row stored (an earlier file imported after a later one must not undo the reviewer's
    later verdict). A row timed by the file (``file_time``: no ``reviewed_at`` given) with the
    verdict already stored is no change: the same file copied or saved again must not make an old
    verdict the latest."""
    key = keyed_key("reviews")
    stored = {
        tuple(r[c] for c in key): (r["verdict"], r["reviewed_at"])
        for r in existing.select([*key, "verdict", "reviewed_at"]).to_pylist()
    }
    rows = new.select([*key, "verdict", "reviewed_at"]).to_pylist()
    befores = [stored.get(tuple(r[c] for c in key)) for r in rows]
    older = [b is not None and r["reviewed_at"] < b[1] for r, b in zip(rows, befores, strict=True)]
    keep = [
        b is None
        or (
            not late
            and (b[0] != r["verdict"] or (b[1] != r["reviewed_at"] and r["reviewed_at"] != file_time))
        )
        for r, b, late in zip(rows, befores, older, strict=True)
    ]
    changed = new.filter(pa.array(keep, pa.bool_()))
    updated = sum(b is not None for b, k in zip(befores, keep, strict=True) if k)
    return changed, changed.num_rows - updated, updated, sum(older)


def import_verdicts(catalog: Catalog, path: Path, *, now: dt.datetime | None = None) -> ImportResult:
    """Check a verdict file whole, then write its new and changed verdicts in one commit.

    Raises:
        ReviewFileError: the file cannot be imported (nothing was).
    """
    now = now or dt.datetime.now(dt.UTC)
    file = read_verdict_file(path)
    samples = catalog.keyed_rows("review_samples")
    if samples.num_rows == 0:
        raise ReviewFileError(f"{catalog.describe()} holds no review sample; draw one with `review sample`")
    file_time = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
    rows, skipped = verdict_rows(file, samples, source_file=path.name, file_time=file_time, now=now)
    changed, inserted, updated, older = _changes(rows, catalog.keyed_rows("reviews"), file_time)
    if changed.num_rows:
        catalog.upsert_rows("reviews", changed)
    unchanged = rows.num_rows - changed.num_rows - older
    return ImportResult(file.num_rows, rows.num_rows, skipped, inserted, updated, unchanged, older)


def latest_verdicts(reviews: pa.Table) -> pa.Table:
    """One row per sampled value: its latest verdict (latest ``reviewed_at``; ties: the reviewer
    last in name order)."""
    if reviews.num_rows == 0:
        return reviews
    order = reviews.take(
        pc.sort_indices(
            reviews,
            sort_keys=[
                *((k, "ascending") for k in ITEM),
                ("reviewed_at", "descending"),
                ("reviewer", "descending"),
            ],
        )
    )
    keys = [tuple(r) for r in zip(*(order[k].to_pylist() for k in ITEM), strict=True)]
    first = [i == 0 or keys[i] != keys[i - 1] for i in range(len(keys))]
    return order.filter(pa.array(first, pa.bool_()))


class Verdict(NamedTuple):
    """A value's latest verdict: what was said, of which model version's value, when, and in which
    sample (whose ``drawn_at`` is when the content the reviewer saw was copied)."""

    verdict: str
    model_version: str
    reviewed_at: dt.datetime
    sample_id: str


def verdicts_by_value(reviews: pa.Table) -> dict[tuple[str, str, str], Verdict]:
    """(product, attribute, value) -> its latest verdict over every sample and reviewer ("unsure"
    included)."""
    latest = latest_verdicts(reviews)
    out: dict[tuple[str, str, str], Verdict] = {}
    for r in latest.select(
        ["product_id", "attribute", "value", "verdict", "model_version", "reviewed_at", "sample_id"]
    ).to_pylist():
        key = (r["product_id"], r["attribute"], r["value"])
        if key not in out or r["reviewed_at"] >= out[key].reviewed_at:
            out[key] = Verdict(r["verdict"], r["model_version"], r["reviewed_at"], r["sample_id"])
    return out


def rejected_values(
    reviews: pa.Table,
    model_version: str | None = None,
    *,
    model_name: str | None = None,
    samples: pa.Table | None = None,
) -> set[tuple[str, str, str]]:
    """(product, attribute, value) whose latest verdict is "no" - the latest of the verdicts on the
    values ``model_version`` wrote, when given: another version's sample judging the same value
    later neither lifts that version's rejection nor adds one. With ``model_name`` and the
    ``samples`` the verdicts judge, not those of another registered model's samples (two models
    writing one catalog each have a version 1); a verdict of a sample not among them counts."""
    if model_version is not None:
        reviews = reviews.filter(pc.equal(reviews["model_version"], str(model_version)))
    if model_name is not None and samples is not None and samples.num_rows:
        theirs = samples.filter(pc.not_equal(samples["model_name"], model_name))["sample_id"]
        reviews = reviews.filter(pc.invert(pc.is_in(reviews["sample_id"], value_set=pc.unique(theirs))))
    return {key for key, judged in verdicts_by_value(reviews).items() if judged.verdict == "no"}
