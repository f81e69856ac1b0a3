"""The synthetic marketplace has the properties it promises, measured against its own text/images."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from catalog_enrichment.catalog.lakehouse import data_files, read_table
from catalog_enrichment.config import SyntheticConfig
from catalog_enrichment.contracts import Taxonomy, load_contract
from catalog_enrichment.data.images import decode_image
from catalog_enrichment.data.render import COLOR_RGB
from catalog_enrichment.data.synthetic import (
    _WRONG_TYPE_TITLES,
    BAD_KINDS,
    GeneratedMarketplace,
    generate_marketplace,
    truth_schema,
)
from catalog_enrichment.errors import TaxonomyError
from tests.conftest import MARKETPLACE


def _rows(market: GeneratedMarketplace, taxonomy: Taxonomy) -> list[dict[str, Any]]:
    """Products joined with their truth row (by the product's position in the generator)."""
    schema = load_contract("labelled_products", taxonomy=taxonomy).arrow_schema(enforce_nullability=False)
    products = read_table(market.products, schema=schema).to_pylist()
    truth = read_table(market.truth, schema=truth_schema(taxonomy)).sort_by("row_index").to_pylist()
    assert len(products) == len(truth) == MARKETPLACE.products
    # Products carry no row index; match good ones by id and bad ones by (kind-specific) content.
    by_id: dict[str | None, list[dict[str, Any]]] = {}
    for p in products:
        by_id.setdefault(p["product_id"], []).append(p)
    joined = []
    for t in truth:
        candidates = by_id.get(t["product_id"], [])
        if t["bad_kind"] == "duplicate_id":
            p = min(candidates, key=lambda c: c["updated_at"])
        elif t["bad_kind"] == "null_id":
            p = candidates.pop()
        else:
            p = max(candidates, key=lambda c: c["updated_at"])
        joined.append({**p, **{f"truth_{k}": v for k, v in t.items()}})
    return joined


@pytest.fixture(scope="module")
def rows(marketplace: GeneratedMarketplace, taxonomy: Taxonomy) -> list[dict[str, Any]]:
    return _rows(marketplace, taxonomy)


@pytest.fixture(scope="module")
def good(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["truth_bad_kind"] is None]


def _names_color(text: str, color: str, taxonomy: Taxonomy) -> bool:
    words = [color, *taxonomy["color"].extras["synonyms"].get(color, [])]
    return any(re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) for w in words)


def test_color_in_text_share_measured_from_the_text(good: list[dict[str, Any]], taxonomy: Taxonomy) -> None:
    named = []
    for r in good:
        text = f"{r['title']} {r['description'] or ''}"
        named.append(any(_names_color(text, c, taxonomy) for c in r["truth_true_color"]))
        assert named[-1] == r["truth_color_in_text"], (r["title"], r["description"], r["truth_true_color"])
    assert abs(np.mean(named) - MARKETPLACE.text_color_share) <= 0.05


def test_text_and_image_decoys_name_another_color(good: list[dict[str, Any]], taxonomy: Taxonomy) -> None:
    decoys = [r for r in good if r["truth_color_text_decoy"]]
    assert 0.08 <= len(decoys) / len(good) <= 0.2
    for r in decoys:
        sentence = re.search(r"Pairs well with ([^.]*)\.", r["description"]).group(1)  # type: ignore[union-attr]
        assert not any(_names_color(sentence, c, taxonomy) for c in r["truth_true_color"])
    assert abs(np.mean([r["truth_image_decoy"] for r in good]) - MARKETPLACE.decoy_share) <= 0.04


def test_material_mostly_in_text_and_product_type_in_title(good: list[dict[str, Any]]) -> None:
    assert abs(np.mean([r["truth_material_in_text"] for r in good]) - 0.85) <= 0.04
    forms = Counter(r["truth_type_form"] for r in good)
    assert forms["noun"] / len(good) > 0.6 and forms["synonym"] > 0 and forms["typo"] > 0
    nouns = [r for r in good if r["truth_type_form"] == "noun"]
    assert all(r["truth_true_product_type"].lower() in r["title"].lower() for r in nouns)


def test_images_show_the_labelled_color(good: list[dict[str, Any]]) -> None:
    """Single-color, solid, decoy-free products: the object's median color is nearest the label."""
    palette = np.array(list(COLOR_RGB.values()), float)
    names = list(COLOR_RGB)
    checked = agree = 0
    for r in good:
        colors = r["truth_true_color"]
        if (
            r["image"] is None
            or len(colors) != 1
            or r["truth_true_pattern"] != "solid"
            or r["truth_image_decoy"]
            or colors[0] in ("white", "grey", "beige")
        ):
            continue
        pixels = decode_image(r["image"]).reshape(-1, 3).astype(float)  # type: ignore[union-attr]
        background = pixels[0]
        obj = pixels[np.linalg.norm(pixels - background, axis=1) > 40]
        nearest = names[int(np.argmin(np.linalg.norm(palette - np.median(obj, axis=0), axis=1)))]
        checked += 1
        agree += nearest == colors[0]
    assert checked > 200
    assert agree / checked >= 0.9


def test_long_tail_and_multilabel(good: list[dict[str, Any]]) -> None:
    colors = Counter(c for r in good for c in r["truth_true_color"])
    assert len(colors) == 12 and max(colors.values()) >= 5 * min(colors.values())
    types = Counter(r["truth_true_product_type"] for r in good)
    assert len(types) == 15 and max(types.values()) >= 4 * min(types.values())
    two_colors = np.mean([len(r["truth_true_color"]) == 2 for r in good])
    blends = np.mean([len(r["truth_true_material"]) == 2 for r in good])
    assert 0.12 <= two_colors <= 0.25 and 0.15 <= blends <= 0.3


def test_label_noise_flips_a_known_share(good: list[dict[str, Any]], taxonomy: Taxonomy) -> None:
    for attr in taxonomy.names:
        flipped = [r[attr] != r[f"truth_true_{attr}"] for r in good]
        recorded = [attr in r["truth_noisy_attributes"] for r in good]
        assert flipped == recorded
        assert abs(np.mean(flipped) - MARKETPLACE.label_noise) <= 0.02
    for r in good:  # a flipped label is still a valid taxonomy value
        assert r["product_type"] in taxonomy["product_type"].values
        assert set(r["color"]) <= set(taxonomy["color"].values)


def test_merchant_values_are_true_values(good: list[dict[str, Any]]) -> None:
    with_merchant = [r for r in good if r["merchant_attributes"]]
    assert abs(len(with_merchant) / len(good) - MARKETPLACE.merchant_share) <= 0.04
    for r in with_merchant:
        for attr, values in r["merchant_attributes"]:
            truth = r[f"truth_true_{attr}"]
            assert values == (truth if isinstance(truth, list) else [truth])


def test_partitions_and_timestamps(rows: list[dict[str, Any]]) -> None:
    days = Counter(r["ingest_date"] for r in rows)
    assert len(days) == MARKETPLACE.days and min(days.values()) > 0.15 * len(rows)
    for r in rows:
        assert r["updated_at"].date() <= r["ingest_date"]


def test_each_bad_kind_at_its_rate_and_really_bad(rows: list[dict[str, Any]]) -> None:
    per_kind = round(MARKETPLACE.products * MARKETPLACE.bad_rate / len(BAD_KINDS))
    kinds = Counter(r["truth_bad_kind"] for r in rows if r["truth_bad_kind"])
    assert kinds == dict.fromkeys(BAD_KINDS, per_kind)
    good_by_id = {r["product_id"]: r for r in rows if r["truth_bad_kind"] is None}
    for r in rows:
        kind = r["truth_bad_kind"]
        if kind == "null_id":
            assert r["product_id"] is None
        elif kind == "duplicate_id":
            original = good_by_id[r["product_id"]]
            assert r["updated_at"] < original["updated_at"] and r["ingest_date"] == original["ingest_date"]
        elif kind == "empty_title":
            assert r["title"].strip() == ""
        elif kind == "long_title":
            assert len(r["title"]) > 2000
        elif kind in ("corrupt_image", "truncated_image", "empty_image"):
            assert decode_image(r["image"]) is None
        elif kind == "wrong_type":
            assert r["title"] in _WRONG_TYPE_TITLES


def test_good_rows_are_clean(good: list[dict[str, Any]]) -> None:
    ids = [r["product_id"] for r in good]
    assert None not in ids and len(set(ids)) == len(ids)
    for r in good:
        assert 0 < len(r["title"].strip()) < 300 and r["title"] not in _WRONG_TYPE_TITLES
        if r["image"] is not None:
            assert decode_image(r["image"]).shape == (96, 96, 3)  # type: ignore[union-attr]
    missing = np.mean([r["image"] is None for r in good])
    assert abs(missing - MARKETPLACE.missing_image_share) <= 0.015


def _digest(paths: list[str], root: Path) -> dict[str, str]:
    """Data files by partition (Delta file names are random UUIDs, their bytes are not)."""
    out: dict[str, str] = {}
    for path in paths:
        local = Path(path.removeprefix("file://"))
        key = f"{local.parent.relative_to(root)}/{hashlib.sha256(local.read_bytes()).hexdigest()}"
        out[key] = hashlib.sha256(local.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
def test_same_seed_gives_byte_identical_tables(tmp_path: Path, fmt: str) -> None:
    cfg = SyntheticConfig(products=300, seed=3, bad_rate=0.1, label_noise=0.1, format=fmt)  # type: ignore[arg-type]
    a = generate_marketplace(tmp_path / "a", cfg)
    b = generate_marketplace(tmp_path / "b", cfg)
    c = generate_marketplace(tmp_path / "c", cfg.model_copy(update={"seed": 4}))
    for table in ("products", "truth"):
        da = _digest(data_files(a.root / table), a.root / table)
        assert da == _digest(data_files(b.root / table), b.root / table)
        assert da != _digest(data_files(c.root / table), c.root / table)


def test_image_files_mode(tmp_path: Path) -> None:
    cfg = SyntheticConfig(products=80, seed=1, bad_rate=0.1, image_files=True)
    market = generate_marketplace(tmp_path, cfg)
    products = read_table(market.products).to_pylist()
    assert all(p["image"] is None for p in products)
    with_uri = [p for p in products if p["image_uri"]]
    assert len(with_uri) >= 70
    decoded = [decode_image(Path(p["image_uri"]).read_bytes()) is not None for p in with_uri]
    truth = {r["row_index"]: r for r in read_table(market.truth).to_pylist()}
    assert sum(decoded) == len(with_uri) - sum(
        1 for r in truth.values() if r["bad_kind"] in ("corrupt_image", "truncated_image", "empty_image")
    )


def test_generation_is_bounded_in_memory_batches(taxonomy: Taxonomy) -> None:
    from catalog_enrichment.data.synthetic import products_batches

    cfg = SyntheticConfig(products=50, seed=2)
    sizes = [b.num_rows for b, _ in products_batches(cfg, taxonomy, batch_size=16)]
    assert sizes == [16, 16, 16, 2]
    whole = pa.Table.from_batches([b for b, _ in products_batches(cfg, taxonomy)])
    parts = pa.Table.from_batches([b for b, _ in products_batches(cfg, taxonomy, batch_size=16)])
    assert whole.equals(parts)  # chunking does not change the data


def test_generator_refuses_a_foreign_taxonomy(tmp_path: Path) -> None:
    foreign = Taxonomy.from_dict({"attributes": {"size": {"kind": "multiclass", "values": ["s", "m"]}}})
    with pytest.raises(TaxonomyError, match="default taxonomy"):
        generate_marketplace(tmp_path, SyntheticConfig(products=5), taxonomy=foreign)


def test_the_long_tailed_marketplace_draws_its_own_taxonomy_with_a_long_tail(tmp_path: Path) -> None:
    from catalog_enrichment.data.render import LONG_TAIL_COLOR_RGB, SUBTYPES, ImageParts, render_product
    from catalog_enrichment.data.synthetic import synthetic_taxonomy

    cfg = SyntheticConfig(products=3000, seed=5, image_size=32, long_tail=True)
    taxonomy = synthetic_taxonomy(cfg)
    assert len(taxonomy["product_type"].values) == 40 and len(taxonomy["color"].values) == 30
    assert set(SUBTYPES) <= set(taxonomy["product_type"].values)
    assert set(LONG_TAIL_COLOR_RGB) <= set(taxonomy["color"].values)
    table = read_table(generate_marketplace(tmp_path / "lt", cfg).products)
    types = Counter(table["product_type"].to_pylist())
    colors = Counter(c for cs in table["color"].to_pylist() for c in cs)
    assert set(types) == set(taxonomy["product_type"].values)  # every value drawn at least once...
    # ...with Zipf(1.1) frequencies: the most common type is t-shirt (~27 %), the rarest ~0.4 %
    assert types.most_common(1)[0][0] == "t-shirt" and types["t-shirt"] / 3000 > 0.2
    assert min(types.values()) < 0.01 * 3000 and min(colors.values()) < 0.015 * 3000
    # a sub-type's silhouette is a variation of its base type's, not the same picture
    rng = lambda: np.random.default_rng(0)  # noqa: E731  (the same draw for both pictures)
    base = np.asarray(render_product(ImageParts("boots", ("black",), "solid", ("leather",)), rng(), size=48))
    sub = np.asarray(
        render_product(ImageParts("ankle boots", ("black",), "solid", ("leather",)), rng(), size=48)
    )
    dark = lambda img: (img.sum(axis=2) < 200).sum()  # noqa: E731  (pixels of the black product)
    assert 0.5 * dark(base) < dark(sub) < 0.9 * dark(base)  # cropped: the bottom third cut
    # the default taxonomy is refused for a long-tailed marketplace (and the other way round)
    with pytest.raises(TaxonomyError, match="long-tailed taxonomy"):
        generate_marketplace(tmp_path / "x", cfg, taxonomy=synthetic_taxonomy(SyntheticConfig()))
