"""The synthetic marketplace as two labelled tables, split by variant group (80 / 20 of the groups),
so ``catalog-enrich bench quality --data TRAIN --test-data TEST`` tests the default model beside the
simple baseline on it, as it does on a real catalog.

Usage::

    python tools/synthetic_tables.py OUT [--products 5000] [--seed 0] [--no-colour-words 0.5]

writes ``OUT/marketplace`` (the generated Delta tables), ``OUT/train.parquet`` and ``OUT/test.parquet``.
``--no-colour-words F`` takes every colour word of the taxonomy (values and synonyms) out of the
titles of a random share ``F`` of the products, as a catalog whose merchants do not name colours in
their titles (the descriptions are left as generated: some name the colour, "Color: red.", some a
decoy's).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import catalog_enrichment  # noqa: F401  (torchvision fix before anything imports timm)
from catalog_enrichment.catalog.groups import group_ids
from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.config import SyntheticConfig
from catalog_enrichment.contracts import Taxonomy, load_taxonomy
from catalog_enrichment.data.synthetic import generate_marketplace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--products", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-colour-words", type=float, default=0.0, metavar="F")
    args = parser.parse_args()
    synthetic = SyntheticConfig(products=args.products, seed=args.seed)
    taxonomy = load_taxonomy()
    market = generate_marketplace(args.out / "marketplace", synthetic, taxonomy=taxonomy)
    table = read_table(market.products)
    table = table.take(pc.sort_indices(table, [("product_id", "ascending")]))  # files come in any order
    groups = group_ids([t or "" for t in table["title"].to_pylist()], table["description"].to_pylist())
    if args.no_colour_words:  # after the grouping: the same split as without
        table = _without_colour_words(table, taxonomy, args.no_colour_words, args.seed)
    unique = np.unique(groups)
    held = np.random.default_rng(args.seed).choice(unique, size=len(unique) // 5, replace=False)
    test = np.isin(groups, held)
    pq.write_table(table.filter(~test), args.out / "train.parquet")
    pq.write_table(table.filter(test), args.out / "test.parquet")
    print(f"{table.num_rows:,} products: {int((~test).sum()):,} to train on, {int(test.sum()):,} to test on")


def _without_colour_words(table: pa.Table, taxonomy: Taxonomy, share: float, seed: int) -> pa.Table:
    """``table`` with the colour words taken out of the titles of a random ``share`` of its products."""
    colour = taxonomy["color"]
    synonyms = colour.extras.get("synonyms") or {}
    words = {*colour.values, *(w for names in synonyms.values() for w in names)}
    pattern = re.compile(
        r"\b(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b", re.I
    )
    chosen = np.random.default_rng(seed + 1).random(table.num_rows) < share
    titles = [
        " ".join(pattern.sub(" ", t).split()) if pick and isinstance(t, str) else t
        for t, pick in zip(table["title"].to_pylist(), chosen, strict=True)
    ]
    changed = sum(a != b for a, b in zip(titles, table["title"].to_pylist(), strict=True))
    print(f"colour words taken out of {changed:,} titles ({int(chosen.sum()):,} drawn)")
    return table.set_column(table.column_names.index("title"), "title", pa.array(titles, pa.string()))


if __name__ == "__main__":
    main()
