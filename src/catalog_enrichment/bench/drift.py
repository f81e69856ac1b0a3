"""``catalog-enrich bench drift``: do the run health checks catch a drifted night and stay quiet on
a clean one?

A model is trained on a generated marketplace that holds no product of one type (the ``lamp``
family: "a new product type absent from training"). From a second marketplace of the same
generator, ``batches`` clean batches of ``batch_size`` products are drawn (no lamp either), and from
each clean batch one drifted batch per kind, where a ``share`` of its products come from a broken
feed (:data:`KINDS`). On a real catalog (``data``: its training and test tables), the model trains
on the training table without the ``new_type`` products and the batches are drawn from the test
table (each batch on its own when the table is too small for disjoint ones); the products of the
new type come from both tables. The kinds:

* ``colour_shift``: photos with their red and blue channels swapped (an RGB/BGR export bug);
* ``placeholder_images``: every photo replaced by the CDN's "no image" placeholder;
* ``missing_images``: the photos gone (neither bytes nor an ``image_uri``: a feed that drops them);
* ``new_product_type``: products of the type the model never saw (new merchant category, new shape);
* ``other_language``: titles and descriptions in German;
* ``stripped_titles``: titles stripped to the product id, descriptions gone.

Every batch goes through the real job with the configuration given (the defaults block), each on a
lakehouse of its own in one Spark session, then through the check ``report --health --check`` runs
(a failed check in the run's ``run_health`` rows). A clean batch with a failed check is a false
alarm; a drifted one with a failed check is detected (a run a critical expectation stopped counts
as failing the check ``expectations``, every attribute held back). After each drifted run the
catalog is read:

* no value of a blocked attribute may carry the run's id;
* the values it wrote that the drift made wrong: on the broken feed's products, not among the
  product's labels and not written by the clean run of the same batch;
* then the feed is fixed (the clean batch, rows unchanged) and the next incremental run goes; of
  the values the clean run wrote for what the drifted night held back (a blocked attribute's
  values, a placeholder's product), the share the catalog holds after it (filled).
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.config import AppConfig, SyntheticConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.types import Say

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = [
    "KINDS",
    "NEW_TYPE",
    "DriftPlan",
    "colour_shift",
    "drifted_batch",
    "format_drift",
    "missing_images",
    "other_language",
    "placeholder_images",
    "run_drift_bench",
    "stripped_titles",
]

KINDS = (
    "colour_shift",
    "placeholder_images",
    "missing_images",
    "new_product_type",
    "other_language",
    "stripped_titles",
)
NEW_TYPE = "lamp"  # held out of training; its merchant category ("Home & Living") is new too


def _set(products: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    return products.set_column(products.schema.get_field_index(name), name, values)


def _map_images(products: pa.Table, change: Callable[[bytes], bytes]) -> pa.Table:
    images = [None if b is None else change(b) for b in products["image"].to_pylist()]
    return _set(products, "image", pa.array(images, pa.binary()))


def colour_shift(products: pa.Table) -> pa.Table:
    """Every photo with its red and blue channels swapped (re-encoded as JPEG)."""
    from PIL import Image

    from catalog_enrichment.data.images import encode_image

    def swap(data: bytes) -> bytes:
        try:
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except Exception:  # an unreadable image stays as it was (the job quarantines it)
            return data
        return encode_image(np.ascontiguousarray(pixels[:, :, ::-1]))

    return _map_images(products, swap)


def placeholder() -> bytes:
    """The CDN's placeholder: light grey with a darker frame and a crossed box."""
    from catalog_enrichment.data.images import encode_image

    pixels = np.full((64, 64, 3), 225, np.uint8)
    pixels[[4, 59], 4:60] = pixels[4:60, [4, 59]] = 150
    idx = np.arange(16, 48)
    pixels[idx, idx] = pixels[idx, 63 - idx] = 150
    return encode_image(pixels)


def placeholder_images(products: pa.Table) -> pa.Table:
    """Every product's photo replaced by :func:`placeholder` (a product without one stays without)."""
    image = placeholder()
    return _map_images(products, lambda _data: image)


def missing_images(products: pa.Table) -> pa.Table:
    """Every product's photo gone: neither image bytes nor an ``image_uri``."""
    for name in ("image", "image_uri"):
        if name in products.column_names:
            products = _set(products, name, pa.nulls(products.num_rows, products.schema.field(name).type))
    return products


def stripped_titles(products: pa.Table) -> pa.Table:
    """Titles stripped to the product id, descriptions gone."""
    return _set(
        _set(products, "title", products["product_id"]),
        "description",
        pa.nulls(products.num_rows, pa.string()),
    )


# The generated marketplace's words in German (generator vocabulary: taxonomy values, synonyms,
# pattern and material words, fillers); other words (brands, numbers) stay as they are.
GERMAN = {
    "black": "schwarz", "white": "weiß", "grey": "grau", "gray": "grau", "red": "rot", "blue": "blau",
    "green": "grün", "yellow": "gelb", "orange": "orange", "pink": "rosa", "purple": "lila",
    "brown": "braun", "beige": "beige", "charcoal": "anthrazit", "slate": "schiefergrau",
    "crimson": "karmesin", "scarlet": "scharlachrot", "burgundy": "bordeaux", "navy": "marineblau",
    "cobalt": "kobaltblau", "azure": "himmelblau", "olive": "oliv", "emerald": "smaragdgrün",
    "khaki": "khaki", "mustard": "senfgelb", "lemon": "zitronengelb", "rust": "rostrot",
    "tangerine": "mandarine", "rose": "rosé", "blush": "zartrosa", "fuchsia": "pink", "violet": "violett",
    "lilac": "flieder", "plum": "pflaume", "chocolate": "schokobraun", "tan": "hellbraun",
    "camel": "kamel", "cream": "creme", "sand": "sandfarben", "ivory": "elfenbein", "jet": "tief",
    "onyx": "onyx", "snow": "schnee", "off-white": "cremeweiß", "cotton": "Baumwolle",
    "polyester": "Polyester", "wool": "Wolle", "leather": "Leder", "denim": "Jeansstoff", "silk": "Seide",
    "linen": "Leinen", "nylon": "Nylon", "metal": "Metall", "wood": "Holz", "organic": "Bio",
    "recycled": "recyceltes", "merino": "Merino", "genuine": "echtes", "mulberry": "Maulbeer",
    "ripstop": "Ripstop", "brushed": "gebürsteter", "steel": "Stahl", "oak": "Eichen",
    "t-shirt": "T-Shirt", "tee": "Shirt", "tshirt": "T-Shirt", "shirt": "Hemd", "dress": "Kleid",
    "jeans": "Jeanshose", "jacket": "Jacke", "sweater": "Pullover", "jumper": "Strickpulli",
    "pullover": "Pulli", "skirt": "Rock", "shorts": "kurze Hose", "sneakers": "Turnschuhe",
    "trainers": "Sportschuhe", "running": "Lauf", "shoes": "Schuhe", "boots": "Stiefel",
    "handbag": "Handtasche", "purse": "Geldbörse", "tote": "Umhängetasche", "backpack": "Rucksack",
    "hat": "Mütze", "scarf": "Schal", "lamp": "Lampe", "solid": "einfarbig", "plain": "schlicht",
    "solid-color": "unifarben", "striped": "gestreift", "stripe": "Streifen", "pinstripe": "Nadelstreifen",
    "checked": "kariert", "plaid": "Karo", "gingham": "Vichykaro", "polka": "Tupfen", "dot": "Punkte",
    "dotted": "gepunktet", "floral": "geblümt", "flower": "Blumen", "print": "Druck", "camo": "Tarn",
    "camouflage": "Tarnmuster", "classic": "klassisch", "premium": "hochwertig", "slim": "schmal",
    "fit": "Passform", "oversized": "übergroß", "vintage": "Retro", "essential": "Basis", "new": "neue",
    "season": "Saison", "color": "Farbe", "made": "hergestellt", "of": "aus", "and": "und",
    "blend": "Mischung", "pairs": "passt", "well": "gut", "with": "zu", "perfect": "perfekt",
    "for": "für", "everyday": "jeden", "use": "Tag", "easy": "pflegeleicht", "care": "Pflege",
    "machine": "Maschine", "washable": "waschbar", "ships": "Versand", "in": "in", "days": "Tagen",
    "a": "ein", "customer": "Kunden", "favourite": "Liebling", "timeless": "zeitloses",
    "design": "Design", "comfortable": "bequeme", "limited": "limitierte", "edition": "Auflage",
}  # fmt: skip
_WORD = re.compile(r"[A-Za-z][A-Za-z-]*")


def _german(text: str | None) -> str | None:
    if text is None:
        return None

    def word(match: re.Match[str]) -> str:
        w = match.group(0)
        german = GERMAN.get(w.lower())
        if german is None:
            return w
        return german[0].upper() + german[1:] if w[0].isupper() else german

    return _WORD.sub(word, text)


def other_language(products: pa.Table) -> pa.Table:
    """Titles and descriptions in German, word by word (:data:`GERMAN`)."""
    for name in ("title", "description"):
        products = _set(
            products, name, pa.array([_german(t) for t in products[name].to_pylist()], pa.string())
        )
    return products


def drifted_batch(kind: str, batch: pa.Table, share: float, newcomers: pa.Table, seed: int) -> pa.Table:
    """``batch`` with its first ``share`` of products from a feed broken in the ``kind`` way
    (``new_product_type``: replaced by as many ``newcomers``, drawn with ``seed``)."""
    n = round(share * batch.num_rows)
    head, rest = batch.slice(0, n), batch.slice(n)
    if kind == "new_product_type":
        pick = np.random.default_rng(seed).choice(newcomers.num_rows, n, replace=False)
        head = newcomers.take(pa.array(np.sort(pick))).select(batch.column_names).cast(batch.schema)
    else:
        change = {
            "colour_shift": colour_shift,
            "placeholder_images": placeholder_images,
            "missing_images": missing_images,
            "other_language": other_language,
            "stripped_titles": stripped_titles,
        }[kind]
        head = change(head)
    return pa.concat_tables([head, rest])


def _generated(
    workdir: Path, taxonomy: Taxonomy, *, train: int, pool: int, seed: int, say: Say
) -> tuple[pa.Table, pa.Table]:
    """A training marketplace and a second one of the same generator to draw the batches from."""
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.data.synthetic import generate_marketplace

    tables = []
    for name, n, offset in (("train", train, 0), ("pool", pool, 1)):
        say(f"generating the {name} marketplace ({n:,} products)")
        market = SyntheticConfig(products=n, seed=seed + offset, image_size=32)
        tables.append(read_table(generate_marketplace(workdir / name, market, taxonomy=taxonomy).products))
    return tables[0], tables[1]


def _split_new_type(
    train: pa.Table, pool: pa.Table, new_type: str, batch_size: int, share: float
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(training products without ``new_type``, batch products without it, every product of it).

    Raises:
        ValueError: too few products for one batch, or for a drifted batch's share of ``new_type``.
    """

    def of_type(table: pa.Table) -> pa.ChunkedArray:
        return pc.fill_null(pc.equal(table["product_type"], new_type), False)

    newcomers = pa.concat_tables([t.filter(of_type(t)) for t in (train, pool)], promote_options="default")
    clean = pool.filter(pc.invert(of_type(pool)))
    if clean.num_rows < batch_size or newcomers.num_rows < share * batch_size:
        raise ValueError(
            f"too few products for batches of {batch_size:,} ({clean.num_rows:,}) or their drifted share "
            f"of {new_type!r} ({newcomers.num_rows:,})"
        )
    return train.filter(pc.invert(of_type(train))), clean, newcomers


@dataclass(frozen=True)
class DriftPlan:
    """The nights ``bench drift`` runs: ``batches`` clean batches of ``batch_size`` products and as
    many per drift kind of ``kinds``, each drifting ``share`` of its products; ``train_products``
    generated for training (without ``new_type``, kept for the new-type drift); ``seed`` draws
    everything."""

    batches: int = 20
    batch_size: int = 1000
    share: float = 0.5
    kinds: Sequence[str] = KINDS
    train_products: int = 4000
    new_type: str = NEW_TYPE
    seed: int = 0


def run_drift_bench(
    spark: SparkSession,
    cfg: AppConfig,
    taxonomy: Taxonomy,
    workdir: Path,
    plan: DriftPlan = DriftPlan(),
    *,
    data: tuple[pa.Table, pa.Table] | None = None,
    say: Say = print,
) -> dict[str, Any]:
    """Train, then run the job and the check on every clean and drifted batch (module docstring).

    ``cfg``: the model, training and health settings (as a user runs them: the defaults block);
    ``data``: a real catalog's (training, test) tables instead of generated marketplaces."""
    batches, batch_size, share, kinds = plan.batches, plan.batch_size, plan.share, plan.kinds
    new_type, seed = plan.new_type, plan.seed
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown drift kinds {unknown}; known: {', '.join(KINDS)}")
    started = time.perf_counter()
    if data is None:
        # enough clean products for the batches, and newcomers for a drifted batch (lamps are ~2 %)
        pool = max(round(batches * batch_size * 1.15), round(share * batch_size / 0.015)) + 1000
        data = _generated(workdir, taxonomy, train=plan.train_products, pool=pool, seed=seed, say=say)
    train, clean, newcomers = _split_new_type(*data, new_type, batch_size, share)
    say(f"training on {train.num_rows:,} products without a {new_type} ({new_type}s kept for the drift)")
    trained, model = _train(train, taxonomy, cfg, workdir, say)
    runs: list[dict[str, Any]] = []
    disjoint = clean.num_rows >= batches * batch_size  # else each batch drawn on its own
    for i, batch in enumerate(_clean_batches(clean, batches, batch_size, seed, disjoint)):
        labels = _labels(batch, taxonomy)
        broken = set(batch["product_id"].to_pylist()[: round(share * batch.num_rows)])
        reference: set[tuple[str, str, str]] = set()
        for kind in ("clean", *kinds):
            table = batch if kind == "clean" else drifted_batch(kind, batch, share, newcomers, seed + i)
            run_id = f"{kind}-{i:02d}"
            night = _Night(spark, cfg, taxonomy, model, workdir, run_id)
            run = {"kind": kind, "batch": i, **night.run(table)}
            if kind == "clean":
                reference = night.written()
            else:
                wrong = {(p, a, v) for p, a, v in night.written() - reference if p in broken}
                run["wrong_written"] = sum(v not in labels.get((p, a), {v}) for p, a, v in wrong)
                held = {(p, a, v) for p, a, v in reference if a in run["blocked"] or p in run["placeholders"]}
                run["held_back"] = len(held)
                if held:  # the feed is fixed, its rows unchanged: the next run reads them again
                    night.run(batch, next_night=True)
                    run["filled"] = len(held & night.written(everything=True))
            runs.append(run)
            say(f"[{len(runs)}/{batches * (1 + len(kinds))}] {run_id}: {_describe(run)}")
    result = _summary(runs, plan, trained, time.perf_counter() - started)
    return {**result, "new_type": new_type, "disjoint_batches": disjoint}


def _labels(batch: pa.Table, taxonomy: Taxonomy) -> dict[tuple[str, str], set[str]]:
    """(product id, attribute) -> the product's labelled values, where it has any."""
    out: dict[tuple[str, str], set[str]] = {}
    ids = batch["product_id"].to_pylist()
    for attr in taxonomy.names:
        for pid, val in zip(ids, batch[attr].to_pylist(), strict=True):
            if pid is not None and val:
                out[(pid, attr)] = set(val) if isinstance(val, list) else {val}
    return out


def _describe(run: dict[str, Any]) -> str:
    failed, blocked = run["failed"], run["blocked"]
    said = f"{len(failed)} failed check(s): {', '.join(failed)}" if failed else "every check passed"
    if blocked:
        said += f"; blocked {', '.join(blocked)} ({run['blocked_written']} of their values written)"
    if run["placeholders"]:
        said += f"; {len(run['placeholders'])} placeholder photos quarantined"
    if "wrong_written" in run:
        said += f"; {run['wrong_written']} values the drift made wrong written"
    if run.get("held_back"):
        said += f"; the next run filled {run.get('filled', 0)} of {run['held_back']} values held back"
    return said


class _Night:
    """One batch's products table and lakehouse (``workdir / run_id``): its run, the check, and
    (``next_night``) the run after it over the same catalog."""

    def __init__(
        self, spark: SparkSession, cfg: AppConfig, taxonomy: Taxonomy, model: Any, workdir: Path, run_id: str
    ) -> None:
        from catalog_enrichment.catalog import open_catalog

        self.spark, self.taxonomy, self.model, self.run_id = spark, taxonomy, model, run_id
        self.products = workdir / "batches" / run_id
        catalog = cfg.catalog.model_copy(
            update={"kind": "lakehouse", "root": str(workdir / "lakes" / run_id)}
        )
        self.cfg = cfg.model_copy(update={"catalog": catalog})
        self.catalog = open_catalog(self.cfg.catalog, products=self.products)

    def run(self, table: pa.Table, *, next_night: bool = False) -> dict[str, Any]:
        """The batch through the job (incremental: the first run of a lakehouse reads everything),
        then the check: the checks that failed (what ``report --health --check`` reads), the
        attributes blocked, how many of their values carry the run's id, the products quarantined
        as placeholders."""
        from catalog_enrichment.catalog.lakehouse import write_table
        from catalog_enrichment.catalog.reports import BLOCKED, blocked_why
        from catalog_enrichment.contracts import IMAGE_SHARED
        from catalog_enrichment.enrich import RunScope, run_enrichment
        from catalog_enrichment.validation.checkpoint import ExpectationsFailed

        run_id = f"{self.run_id}-next" if next_night else self.run_id
        write_table(self.products, table, mode="overwrite")
        try:
            outcome = run_enrichment(
                self.spark,
                self.cfg,
                self.taxonomy,
                model=self.model,
                scope=RunScope(run_id=run_id),
                progress=lambda _m: None,
                catalog=self.catalog,
            )
        except ExpectationsFailed:  # a critical expectation stopped the run: nothing of it written
            written = self.catalog.attribute_rows()
            leaked = written.filter(pc.equal(written["run_id"], run_id)).num_rows
            stopped = {"failed": ["expectations"], "blocked": list(self.taxonomy.outputs.names)}
            return {**stopped, "blocked_written": leaked, "placeholders": []}
        rows = self.catalog.keyed_rows("run_health")
        mine = rows.filter(pc.equal(rows["run_id"], run_id)).to_pylist()
        failed = [f"{r['scope']}:{r['check']}" for r in mine if r["status"] == "failed"]
        blocked = sorted(blocked_why(outcome.report.summary().get(BLOCKED)))
        written = self.catalog.attribute_rows()
        written = written.filter(pc.equal(written["run_id"], run_id))
        leaked = written.filter(pc.is_in(written["attribute"], pa.array(blocked, pa.string()))).num_rows
        quarantine = self.catalog.quarantine_rows().to_pylist()
        placeholders = sorted(
            r["product_id"] for r in quarantine if r["run_id"] == run_id and IMAGE_SHARED in r["reasons"]
        )
        return {"failed": failed, "blocked": blocked, "blocked_written": leaked, "placeholders": placeholders}

    def written(self, *, everything: bool = False) -> set[tuple[str, str, str]]:
        """(product, attribute, value) the model wrote in this night's first run (``everything``:
        what the catalog holds now)."""
        rows = self.catalog.attribute_rows()
        rows = rows.filter(pc.equal(rows["source"], "model"))
        if not everything:
            rows = rows.filter(pc.equal(rows["run_id"], self.run_id))
        cols = (rows[c].to_pylist() for c in ("product_id", "attribute", "value"))
        return set(zip(*cols, strict=True))


def _clean_batches(clean: pa.Table, batches: int, size: int, seed: int, disjoint: bool) -> Iterator[pa.Table]:
    """``batches`` random batches of ``size`` clean products: disjoint slices of one shuffle, or
    (a table too small for that) each drawn on its own."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(clean.num_rows)
    for i in range(batches):
        pick = (
            order[i * size : (i + 1) * size] if disjoint else rng.choice(clean.num_rows, size, replace=False)
        )
        yield clean.take(pa.array(np.sort(pick)))


def _train(table: pa.Table, taxonomy: Taxonomy, cfg: AppConfig, workdir: Path, say: Say) -> tuple[Any, Any]:
    """The model every batch is scored with, trained and saved as a bundle under ``workdir``."""
    from catalog_enrichment.inference.bundle import save_bundle
    from catalog_enrichment.training.pipeline import train
    from catalog_enrichment.versions import ModelVersion

    # the taxonomy keeps the new product type no training product carries: the night meets it unseen
    trained = train(table, taxonomy, cfg, progress=lambda m: say("  " + m))
    bundle = save_bundle(workdir / "model", trained.bundle())
    return trained, ModelVersion("drift", "1", bundle_dir=bundle)


def _summary(runs: list[dict[str, Any]], plan: DriftPlan, trained: Any, seconds: float) -> dict[str, Any]:
    per_kind: dict[str, Any] = {}
    for kind in ("clean", *plan.kinds):
        mine = [r for r in runs if r["kind"] == kind]
        checks: dict[str, int] = {}
        for r in mine:
            for f in r["failed"]:
                checks[f] = checks.get(f, 0) + 1
        per_kind[kind] = {
            "batches": len(mine),
            "alarmed": sum(bool(r["failed"]) for r in mine),
            "blocked_runs": sum(bool(r["blocked"]) for r in mine),
            "blocked_values_written": sum(r["blocked_written"] for r in mine),
            "placeholders_quarantined": sum(len(r["placeholders"]) for r in mine),
            "wrong_written": sum(r.get("wrong_written", 0) for r in mine),
            "held_back": sum(r.get("held_back", 0) for r in mine),
            "filled_next_run": sum(r.get("filled", 0) for r in mine),
            "checks": dict(sorted(checks.items(), key=lambda kv: -kv[1])),
        }
    return {
        "batches": plan.batches,
        "batch_size": plan.batch_size,
        "share": plan.share,
        "training_products": len(trained.product_ids),
        "seconds": round(seconds, 1),
        "kinds": per_kind,
        "runs": runs,
    }


def format_drift(result: dict[str, Any]) -> str:
    """The result as a markdown table."""
    lines = [
        f"Run health on {result['batches']} clean batches and {result['batches']} per drift kind, "
        f"{result['batch_size']:,} products each ({result['share']:.0%} of a drifted batch from the broken "
        f"feed); the configuration's health modes",
        "",
        "| batches | alarmed | blocked runs | values of blocked attributes written | placeholder photos "
        "quarantined | values the drift made wrong, written | held back: filled by the next run "
        "| checks that failed (runs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in result["kinds"].items():
        top = ", ".join(f"{c} {n}" for c, n in list(r["checks"].items())[:6]) or "-"
        label = "false alarms" if kind == "clean" else "detected"
        wrong, filled = (
            ("-", "-")
            if kind == "clean"
            else (r["wrong_written"], f"{r['filled_next_run']:,} of {r['held_back']:,}")
        )
        lines.append(
            f"| {kind} | {label} {r['alarmed']}/{r['batches']} | {r['blocked_runs']} | "
            f"{r['blocked_values_written']} | {r['placeholders_quarantined']:,} | {wrong} | {filled} "
            f"| {top} |"
        )
    return "\n".join(lines) + "\n"
