"""The synthetic marketplace: labelled products with real images and a known answer.

It is built so that the problems of the papers in ``shared/seeds`` show up:

* **color** is named in the text for only ``text_color_share`` of the products; for the rest only the
  image shows it. ``decoy_share`` of the images have a big box of another color behind the product
  (packaging), and some descriptions name another color ("pairs well with navy jeans"), so neither
  modality alone is enough and the better one varies per product (paper 004, Fig. 3).
* **material** is mostly in the text; the image has only a faint texture (004).
* **product_type** is in both: the silhouette, and a noun, synonym or typo in the title.
* long-tailed value frequencies, two-color products and material blends (multi-label). With
  ``long_tail`` the generator draws the long-tailed taxonomy (``schemas/taxonomy-longtail.yaml``:
  40 product types, 30 colors) with steeper Zipf frequencies, so most values are rare.
* merchant-provided values on ``merchant_share`` of the products.
* ``label_noise`` flips a known share of the labels (the clean ones are kept in the truth table).
* ``bad_rate`` injects bad rows of every kind the validation must catch (:data:`BAD_KINDS`), each
  kind at ``bad_rate / len(BAD_KINDS)``.

Output under ``out``: ``products/`` (the labelled products table, Delta or Parquet, partitioned by
``ingest_date``), ``truth/`` (per-row ground truth: clean labels, which modality names what, the
injected bad kind), ``images/`` when ``image_files`` is set, and ``generation.json``.
Everything is a pure function of the config: the same seed gives byte-identical data files.

Over 600 lines because each generator knob and the bad-row kinds are tied to one seeded draw order.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from catalog_enrichment.catalog.lakehouse import write_table
from catalog_enrichment.config import SyntheticConfig
from catalog_enrichment.contracts import Taxonomy, load_contract, load_taxonomy, schemas_dir
from catalog_enrichment.data.images import encode_image
from catalog_enrichment.data.render import (
    COLOR_RGB,
    LONG_TAIL_COLOR_RGB,
    MATERIALS,
    PATTERNS,
    SUBTYPES,
    ImageParts,
    render_product,
)
from catalog_enrichment.errors import TaxonomyError

__all__ = [
    "BAD_KINDS",
    "GeneratedMarketplace",
    "generate_marketplace",
    "products_batches",
    "synthetic_taxonomy",
    "truth_schema",
]

BAD_KINDS = (
    "null_id",  # product_id is null
    "duplicate_id",  # a stale copy of another product: same id, older updated_at, same partition
    "empty_title",  # "" or whitespace only
    "long_title",  # 2,000 to 6,000 characters
    "corrupt_image",  # random bytes behind a JPEG header
    "truncated_image",  # a real JPEG cut short
    "empty_image",  # zero bytes
    "wrong_type",  # title holds a stringified non-text value ("nan", "None", "12345.0", ...)
)
T = TypeVar("T")

_WRONG_TYPE_TITLES = ("nan", "None", "null", "NaN", "[object Object]", "12345.0", "{'title': None}", "0")

_BRANDS = (
    "Northwind",
    "Aster & Co",
    "Kestrel",
    "Lumen",
    "Oakridge",
    "Vela",
    "Brightline",
    "Marlow",
    "Nordhaus",
    "Juniper",
    "Fenwick",
    "Solace",
)
_TYPE_CATEGORY = {
    "t-shirt": "Clothing > Tops",
    "shirt": "Clothing > Tops",
    "sweater": "Clothing > Tops",
    "jacket": "Clothing > Outerwear",
    "dress": "Clothing > Dresses",
    "skirt": "Clothing > Bottoms",
    "jeans": "Clothing > Bottoms",
    "shorts": "Clothing > Bottoms",
    "sneakers": "Shoes",
    "boots": "Shoes",
    "handbag": "Bags",
    "backpack": "Bags",
    "hat": "Accessories",
    "scarf": "Accessories",
    "lamp": "Home & Living",
}
# Materials a product type is usually made of (4x the base weight): realistic, and a weak image cue.
_TYPE_MATERIALS = {
    "t-shirt": ("cotton", "polyester"),
    "shirt": ("cotton", "linen"),
    "sweater": ("wool", "cotton"),
    "jacket": ("leather", "nylon", "denim"),
    "dress": ("silk", "cotton", "polyester"),
    "skirt": ("denim", "linen"),
    "jeans": ("denim",),
    "shorts": ("denim", "cotton"),
    "sneakers": ("leather", "nylon"),
    "boots": ("leather",),
    "handbag": ("leather",),
    "backpack": ("nylon", "polyester"),
    "hat": ("wool", "cotton"),
    "scarf": ("wool", "silk"),
    "lamp": ("metal", "wood"),
}
_PATTERN_WORDS = {
    "solid": ("solid", "plain", "solid-color"),
    "striped": ("striped", "stripe", "pinstripe"),
    "checked": ("checked", "plaid", "gingham"),
    "dotted": ("polka dot", "dotted"),
    "floral": ("floral", "flower print"),
    "camouflage": ("camo", "camouflage"),
}
_MATERIAL_WORDS = {
    "cotton": ("cotton", "organic cotton"),
    "polyester": ("polyester", "recycled polyester"),
    "wool": ("wool", "merino wool"),
    "leather": ("leather", "genuine leather"),
    "denim": ("denim",),
    "silk": ("silk", "mulberry silk"),
    "linen": ("linen",),
    "nylon": ("nylon", "ripstop nylon"),
    "metal": ("metal", "brushed steel"),
    "wood": ("wood", "oak wood"),
}
_FILLERS = (
    "Perfect for everyday use.",
    "Easy care, machine washable.",
    "Ships in 2 days.",
    "A customer favourite.",
    "Timeless design.",
    "Comfortable fit.",
    "Limited edition.",
)
_EXTRAS = ("", "", "Classic", "Premium", "Slim Fit", "Oversized", "Vintage", "Essential", "New Season")
_PATTERN_WEIGHTS = np.array([6.0, 2.0, 1.5, 1.0, 0.7, 0.4])
LONG_TAIL_TAXONOMY = "taxonomy-longtail.yaml"
# Zipf exponents of the color and product-type frequencies: default and long-tailed marketplaces.
_ZIPF = {False: (0.9, 0.8), True: (1.1, 1.1)}


def _zipf(n: int, exponent: float = 1.0) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return w / w.sum()


def _pick(cdf: np.ndarray, u: float) -> int:
    """Index drawn from the distribution with cumulative ``cdf`` by the uniform number ``u``."""
    return min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)


def _choice(options: Sequence[T], rng: np.random.Generator) -> T:
    return options[int(rng.random() * len(options))]


def _randint(rng: np.random.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high)``; ``rng.integers`` costs ~15 us a call, this ~1 us."""
    return low + int(rng.random() * (high - low))


def _typo(word: str, rng: np.random.Generator) -> str:
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    if len(letters) < 4:
        return word + word[-1]
    i = letters[_randint(rng, 1, len(letters) - 1)]
    if rng.random() < 0.5 and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]  # swap two letters
    return word[:i] + word[i + 1 :]  # drop one


def synthetic_taxonomy(cfg: SyntheticConfig) -> Taxonomy:
    """The packaged taxonomy the generator draws: the default one, or the long-tailed one."""
    return load_taxonomy(schemas_dir() / LONG_TAIL_TAXONOMY) if cfg.long_tail else load_taxonomy()


def _base_type(ptype: str) -> str:
    """A sub-type's base product type (``ankle boots`` -> ``boots``); a base type is its own."""
    return SUBTYPES[ptype][0] if ptype in SUBTYPES else ptype


def _check_taxonomy(taxonomy: Taxonomy, long_tail: bool) -> None:
    expected = {
        "color": set(COLOR_RGB) | (set(LONG_TAIL_COLOR_RGB) if long_tail else set()),
        "material": set(MATERIALS),
        "product_type": set(_TYPE_CATEGORY) | (set(SUBTYPES) if long_tail else set()),
        "pattern": set(PATTERNS),
    }
    for name, values in expected.items():
        if name not in taxonomy.attributes or set(taxonomy[name].values) != values:
            which = (
                f"the long-tailed taxonomy (schemas/{LONG_TAIL_TAXONOMY})"
                if long_tail
                else ("the default taxonomy (schemas/taxonomy.yaml)")
            )
            raise TaxonomyError(
                f"the synthetic marketplace draws {which}; attribute {name!r} differs in {taxonomy.source}"
            )


@dataclass
class _Product:
    """One generated product before it becomes a row."""

    index: int
    product_id: str | None
    title: str
    description: str | None
    image: bytes | None
    category: str | None
    merchant: dict[str, list[str]] | None
    updated_at: dt.datetime
    ingest_date: dt.date
    labels: dict[str, Any]
    clean: dict[str, Any]
    flags: dict[str, Any] = field(default_factory=dict)


class _Generator:
    def __init__(self, cfg: SyntheticConfig, taxonomy: Taxonomy) -> None:
        self.cfg = cfg
        self.tax = taxonomy
        self.colors = list(taxonomy["color"].values)
        self.materials = list(taxonomy["material"].values)
        self.types = list(taxonomy["product_type"].values)
        self.patterns = list(taxonomy["pattern"].values)
        self.color_syn: dict[str, list[str]] = taxonomy["color"].extras.get("synonyms", {}) or {}
        self.type_syn: dict[str, list[str]] = taxonomy["product_type"].extras.get("synonyms", {}) or {}
        color_exponent, type_exponent = _ZIPF[cfg.long_tail]
        self.cdf_color = np.cumsum(_zipf(len(self.colors), color_exponent))
        self.cdf_type = np.cumsum(_zipf(len(self.types), type_exponent))
        self.cdf_pattern = np.cumsum(_PATTERN_WEIGHTS / _PATTERN_WEIGHTS.sum())
        self.cdf_material = {}
        for ptype in self.types:
            usual = _TYPE_MATERIALS[_base_type(ptype)]
            weights = np.array([4.0 if m in usual else 0.6 for m in self.materials])
            weights *= _zipf(len(self.materials), 0.5)
            self.cdf_material[ptype] = np.cumsum(weights / weights.sum())
        self.start = dt.date.fromisoformat(cfg.start_date)
        n = cfg.products
        plan = np.random.default_rng([cfg.seed, 0x5EED])
        self.day = np.sort(plan.integers(0, cfg.days, size=n))
        self.bad_kind: list[str | None] = [None] * n
        per_kind = round(n * cfg.bad_rate / len(BAD_KINDS))
        order = plan.permutation(n)
        for k, kind in enumerate(BAD_KINDS):
            for i in order[k * per_kind : (k + 1) * per_kind]:
                self.bad_kind[int(i)] = kind
        good = order[len(BAD_KINDS) * per_kind :]
        self.dup_of = (
            {int(i): int(good[plan.integers(len(good))]) for i in order[per_kind : 2 * per_kind]}
            if per_kind and len(good)
            else {}
        )

    # -- one product ------------------------------------------------------------------------------

    def _draw_values(self, rng: np.random.Generator) -> dict[str, Any]:
        u = rng.random(8)
        ptype = self.types[_pick(self.cdf_type, u[0])]
        colors = [self.colors[_pick(self.cdf_color, u[1])]]
        if u[2] < 0.2:
            second = self.colors[_pick(self.cdf_color, u[3])]
            if second != colors[0]:
                colors.append(second)
        cdf_material = self.cdf_material[ptype]
        materials = [self.materials[_pick(cdf_material, u[4])]]
        if u[5] < 0.25:
            second = self.materials[_pick(cdf_material, u[6])]
            if second != materials[0]:
                materials.append(second)
        pattern = self.patterns[_pick(self.cdf_pattern, u[7])]
        return {"color": colors, "material": materials, "product_type": ptype, "pattern": pattern}

    def _color_word(self, color: str, rng: np.random.Generator) -> str:
        synonyms = self.color_syn.get(color) or []
        if synonyms and rng.random() < 0.3:
            return str(_choice(synonyms, rng))
        return color

    def _type_word(self, ptype: str, rng: np.random.Generator) -> tuple[str, str]:
        roll = rng.random()
        synonyms = self.type_syn.get(ptype) or []
        if roll < 0.15 and synonyms:
            return str(_choice(synonyms, rng)), "synonym"
        if roll < 0.25:
            return _typo(ptype, rng), "typo"
        return ptype, "noun"

    def _text(
        self, values: dict[str, Any], rng: np.random.Generator
    ) -> tuple[str, str | None, dict[str, Any]]:
        cfg = self.cfg
        has_description = rng.random() >= cfg.missing_description_share
        title_parts = [_choice(_BRANDS, rng)]
        sentences: list[str] = []
        color_in_text = bool(rng.random() < cfg.text_color_share)
        color_phrase = " and ".join(self._color_word(c, rng) for c in values["color"])
        if color_in_text:
            if has_description and rng.random() < 0.35:
                sentences.append(f"Color: {color_phrase}.")
            else:
                title_parts.append(color_phrase.title())
        pattern_in_text = bool(rng.random() < 0.5)
        if pattern_in_text:
            words = _PATTERN_WORDS[values["pattern"]]
            title_parts.append(_choice(words, rng).title())
        material_in_text = bool(rng.random() < 0.85)
        if material_in_text:
            names = [_choice(_MATERIAL_WORDS[m], rng) for m in values["material"]]
            if has_description and rng.random() < 0.6:
                sentences.append(
                    f"Made of 100% {names[0]}."
                    if len(names) == 1
                    else f"{names[0].capitalize()} and {names[1]} blend."
                )
            else:
                title_parts.append(" ".join(n.title() for n in names))
        type_word, type_form = self._type_word(values["product_type"], rng)
        title_parts.append(type_word.title() if type_form != "typo" else type_word)
        extra = _choice(_EXTRAS, rng)
        if extra:
            title_parts.append(extra)
        text_decoy = bool(has_description and rng.random() < 0.15)
        if text_decoy:
            other = [c for c in self.colors if c not in values["color"]]
            decoy = _choice(other, rng)
            partner = _choice(self.types, rng)
            sentences.append(f"Pairs well with {self._color_word(decoy, rng)} {partner}s.")
        if has_description:
            sentences.append(_choice(_FILLERS, rng))
            order = rng.permutation(len(sentences))
            description: str | None = " ".join(sentences[i] for i in order)
        else:
            description = None
        flags = {
            "color_in_text": color_in_text,
            "color_text_decoy": text_decoy,
            "material_in_text": material_in_text,
            "pattern_in_text": pattern_in_text,
            "type_form": type_form,
        }
        return " ".join(title_parts), description, flags

    def _noisy(self, values: dict[str, Any], rng: np.random.Generator) -> tuple[dict[str, Any], list[str]]:
        noisy = {k: (list(v) if isinstance(v, list) else v) for k, v in values.items()}
        flipped = []
        for attr in self.tax:
            if rng.random() >= self.cfg.label_noise:
                continue
            flipped.append(attr.name)
            if attr.kind == "multiclass":
                others = [v for v in attr.values if v != values[attr.name]]
                noisy[attr.name] = _choice(others, rng)
            else:
                current = noisy[attr.name]
                others = [v for v in attr.values if v not in current]
                current[_randint(rng, 0, len(current))] = _choice(others, rng)
        return noisy, flipped

    def product(self, i: int) -> _Product:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, i])
        values = self._draw_values(rng)
        title, description, flags = self._text(values, rng)
        decoy = None
        if rng.random() < cfg.decoy_share:
            others = [c for c in self.colors if c not in values["color"]]
            decoy = _choice(others, rng)
        flags["image_decoy"] = decoy is not None
        image: bytes | None = None
        if rng.random() >= cfg.missing_image_share:
            parts = ImageParts(
                values["product_type"],
                tuple(values["color"]),
                values["pattern"],
                tuple(values["material"]),
                decoy,
            )
            pixels = render_product(parts, rng, size=cfg.image_size)
            image = encode_image(pixels, "PNG" if rng.random() < 0.05 else "JPEG")
        merchant = None
        if rng.random() < cfg.merchant_share:
            names = list(self.tax.names)
            chosen = rng.permutation(len(names))[: _randint(rng, 1, 3)]
            merchant = {}
            for k in sorted(int(c) for c in chosen):
                value = values[names[k]]
                merchant[names[k]] = list(value) if isinstance(value, list) else [value]
        labels, flipped = self._noisy(values, rng)
        flags["noisy_attributes"] = flipped
        ptype = values["product_type"]
        category = None if rng.random() < 0.1 else _TYPE_CATEGORY[_base_type(ptype)]
        ingest = self.start + dt.timedelta(days=int(self.day[i]))
        updated = dt.datetime.combine(ingest, dt.time(), dt.UTC) + dt.timedelta(
            seconds=_randint(rng, 0, 86400)
        )
        return _Product(
            i,
            f"P{i + 1:08d}",
            title,
            description,
            image,
            category,
            merchant,
            updated,
            ingest,
            labels,
            values,
            flags,
        )

    def row(self, i: int) -> _Product:
        """Product ``i`` as it lands in the table: good, or corrupted into its bad kind."""
        kind = self.bad_kind[i]
        if kind == "duplicate_id":
            original = self.product(self.dup_of[i])
            rng = np.random.default_rng([self.cfg.seed, i, 1])
            original.index = i
            original.updated_at -= dt.timedelta(seconds=_randint(rng, 3600, 48 * 3600))
            original.flags["bad_kind"] = kind
            return original
        prod = self.product(i)
        prod.flags["bad_kind"] = kind
        rng = np.random.default_rng([self.cfg.seed, i, 2])
        if kind == "null_id":
            prod.product_id = None
        elif kind == "empty_title":
            prod.title = " " * _randint(rng, 0, 3)
        elif kind == "long_title":
            target = _randint(rng, 2000, 6000)  # absurd: thousands of characters
            prod.title = ((prod.title + " ") * (target // (len(prod.title) + 1) + 1))[:target]
        elif kind == "corrupt_image":
            prod.image = b"\xff\xd8\xff\xe0" + rng.bytes(_randint(rng, 200, 2000))
        elif kind == "truncated_image":
            whole = prod.image or encode_image(
                render_product(
                    ImageParts(
                        prod.clean["product_type"],
                        tuple(prod.clean["color"]),
                        prod.clean["pattern"],
                        tuple(prod.clean["material"]),
                    ),
                    rng,
                    size=self.cfg.image_size,
                )
            )
            prod.image = whole[: int(len(whole) * rng.uniform(0.3, 0.7))]
        elif kind == "empty_image":
            prod.image = b""
        elif kind == "wrong_type":
            prod.title = _choice(_WRONG_TYPE_TITLES, rng)
        return prod


def truth_schema(taxonomy: Taxonomy) -> pa.Schema:
    """Schema of the ``truth`` table written next to the products."""
    fields = [
        pa.field("row_index", pa.int64(), nullable=False),
        pa.field("product_id", pa.string()),
        pa.field("ingest_date", pa.date32(), nullable=False),
        pa.field("bad_kind", pa.string()),
        pa.field("has_image", pa.bool_(), nullable=False),
        pa.field("color_in_text", pa.bool_(), nullable=False),
        pa.field("color_text_decoy", pa.bool_(), nullable=False),
        pa.field("image_decoy", pa.bool_(), nullable=False),
        pa.field("material_in_text", pa.bool_(), nullable=False),
        pa.field("pattern_in_text", pa.bool_(), nullable=False),
        pa.field("type_form", pa.string(), nullable=False),
        pa.field("has_merchant_values", pa.bool_(), nullable=False),
        pa.field("noisy_attributes", pa.list_(pa.string()), nullable=False),
    ]
    for attr in taxonomy:
        kind = pa.list_(pa.string()) if attr.kind == "multilabel" else pa.string()
        fields.append(pa.field(f"true_{attr.name}", kind))
    return pa.schema(fields)


def products_batches(
    cfg: SyntheticConfig,
    taxonomy: Taxonomy,
    *,
    image_dir: Path | None = None,
    batch_size: int = 2048,
) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """Yield ``(products, truth)`` record batches; memory is bounded by ``batch_size``."""
    _check_taxonomy(taxonomy, cfg.long_tail)
    gen = _Generator(cfg, taxonomy)
    schema = load_contract("labelled_products", taxonomy=taxonomy).arrow_schema(enforce_nullability=False)
    tschema = truth_schema(taxonomy)
    for start in range(0, cfg.products, batch_size):
        rows = [gen.row(i) for i in range(start, min(start + batch_size, cfg.products))]
        yield (
            pa.RecordBatch.from_pydict(_product_columns(rows, taxonomy, image_dir), schema=schema),
            pa.RecordBatch.from_pydict(_truth_columns(rows, taxonomy), schema=tschema),
        )


_TRUTH_FLAGS = (
    "color_in_text",
    "color_text_decoy",
    "image_decoy",
    "material_in_text",
    "pattern_in_text",
    "type_form",
    "noisy_attributes",
)


def _product_columns(
    rows: list[_Product], taxonomy: Taxonomy, image_dir: Path | None
) -> dict[str, list[Any]]:
    """The products table's columns of ``rows``; with ``image_dir`` the images go to files there
    (one folder per ingest date) and the rows name them in ``image_uri``."""
    uris: list[str | None] = [None] * len(rows)
    images = [p.image for p in rows]
    if image_dir is not None:
        for k, p in enumerate(rows):
            if p.image is None:
                continue
            folder = image_dir / p.ingest_date.isoformat()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"row{p.index:08d}.img"
            path.write_bytes(p.image)
            uris[k], images[k] = str(path.resolve()), None
    columns: dict[str, list[Any]] = {
        "product_id": [p.product_id for p in rows],
        "title": [p.title for p in rows],
        "description": [p.description for p in rows],
        "image": images,
        "image_uri": uris,
        "category": [p.category for p in rows],
        "merchant_attributes": [list(p.merchant.items()) if p.merchant else None for p in rows],
        "updated_at": [p.updated_at for p in rows],
        "ingest_date": [p.ingest_date for p in rows],
    }
    return {**columns, **{attr.name: [p.labels[attr.name] for p in rows] for attr in taxonomy}}


def _truth_columns(rows: list[_Product], taxonomy: Taxonomy) -> dict[str, list[Any]]:
    """The truth table's columns of ``rows``: clean labels, the bad kind, what names what."""
    return {
        "row_index": [p.index for p in rows],
        "product_id": [p.product_id for p in rows],
        "ingest_date": [p.ingest_date for p in rows],
        "bad_kind": [p.flags["bad_kind"] for p in rows],
        "has_image": [p.image is not None for p in rows],
        **{k: [p.flags[k] for p in rows] for k in _TRUTH_FLAGS},
        "has_merchant_values": [p.merchant is not None for p in rows],
        **{f"true_{attr.name}": [p.clean[attr.name] for p in rows] for attr in taxonomy},
    }


def _write(
    cfg: SyntheticConfig,
    taxonomy: Taxonomy,
    products_path: Path,
    truth_path: Path,
    image_dir: Path | None,
    progress_since: float | None,
) -> int:
    """Stream the products into their table (batch by batch), then the truth; the rows written.
    With ``progress_since`` (a start time) a progress line per batch."""
    import time

    schema = load_contract("labelled_products", taxonomy=taxonomy).arrow_schema(enforce_nullability=False)
    truth_batches: list[pa.RecordBatch] = []
    failures: list[BaseException] = []
    done = 0

    def product_stream() -> Iterator[pa.RecordBatch]:
        nonlocal done
        try:
            for batch, truth in products_batches(cfg, taxonomy, image_dir=image_dir):
                truth_batches.append(truth)
                done += batch.num_rows
                if progress_since is not None:
                    rate = done / max(time.perf_counter() - progress_since, 1e-9)
                    print(f"  generated {done:,}/{cfg.products:,} products ({rate:,.0f}/s)", flush=True)
                yield batch
        except BaseException as exc:  # the writer wraps it; keep the original to re-raise
            failures.append(exc)
            raise

    try:
        reader = pa.RecordBatchReader.from_batches(schema, product_stream())
        write_table(products_path, reader, fmt=cfg.format, partition_by=["ingest_date"])
    except Exception:
        if failures:
            raise failures[0] from None
        raise
    truth = pa.Table.from_batches(truth_batches, truth_schema(taxonomy))
    write_table(truth_path, truth, fmt=cfg.format, partition_by=[])
    return done


@dataclass(frozen=True)
class GeneratedMarketplace:
    """Where a generated marketplace was written."""

    root: Path
    products: Path
    truth: Path
    images: Path | None
    rows: int
    seconds: float


def generate_marketplace(
    out: str | Path,
    cfg: SyntheticConfig,
    *,
    taxonomy: Taxonomy | None = None,
    overwrite: bool = True,
    progress: bool = False,
) -> GeneratedMarketplace:
    """Generate the marketplace into ``out`` (see the module docstring for the layout)."""
    import time

    taxonomy = taxonomy or synthetic_taxonomy(cfg)
    _check_taxonomy(taxonomy, cfg.long_tail)
    root = Path(out)
    products_path, truth_path = root / "products", root / "truth"
    image_dir = root / "images" if cfg.image_files else None
    if overwrite:
        for path in (products_path, truth_path, root / "images"):
            if path.exists():
                shutil.rmtree(path)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = _write(cfg, taxonomy, products_path, truth_path, image_dir, started if progress else None)
    seconds = time.perf_counter() - started
    meta = {
        "config": cfg.model_dump(mode="json"),
        "taxonomy": taxonomy.to_dict(),
        "rows": done,
        "bad_kinds": list(BAD_KINDS),
        "seconds": round(seconds, 3),
    }
    (root / "generation.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return GeneratedMarketplace(root, products_path, truth_path, image_dir, done, seconds)
