"""The synthetic marketplace as two labelled tables, split by variant group (80 / 20 of the groups),
so ``catalog-enrich bench quality --data TRAIN --test-data TEST`` tests the default model beside the
simple baseline on it, as it does on a real catalog.

Usage::

    python tools/synthetic_tables.py OUT [--products 5000] [--seed 0]

writes ``OUT/marketplace`` (the generated Delta tables), ``OUT/train.parquet`` and ``OUT/test.parquet``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

import catalog_enrichment  # noqa: F401  (torchvision fix before anything imports timm)
from catalog_enrichment.catalog.groups import group_ids
from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.config import SyntheticConfig
from catalog_enrichment.contracts import load_taxonomy
from catalog_enrichment.data.synthetic import generate_marketplace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--products", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    synthetic = SyntheticConfig(products=args.products, seed=args.seed)
    market = generate_marketplace(args.out / "marketplace", synthetic, taxonomy=load_taxonomy())
    table = read_table(market.products)
    table = table.take(pc.sort_indices(table, [("product_id", "ascending")]))  # files come in any order
    groups = group_ids([t or "" for t in table["title"].to_pylist()], table["description"].to_pylist())
    unique = np.unique(groups)
    held = np.random.default_rng(args.seed).choice(unique, size=len(unique) // 5, replace=False)
    test = np.isin(groups, held)
    pq.write_table(table.filter(~test), args.out / "train.parquet")
    pq.write_table(table.filter(test), args.out / "test.parquet")
    print(f"{table.num_rows:,} products: {int((~test).sum()):,} to train on, {int(test.sum()):,} to test on")


if __name__ == "__main__":
    main()
