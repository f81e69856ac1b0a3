"""Export hm-fashion for fine-tuning on a GPU machine that has torch and timm but not this project:
the stack's own cross-fit folds (the training job's canonical order, usable photos, duplicate
groups and seed), each product's label indices, its photo as a WebP (aspect kept; 224x336 at
quality 85 is about 36 MB for the 8,181 products) and the EfficientNet-Lite0 weights.

    python tools/gpu/export_hm.py ../shared/data/hm-fashion gpu/
    python tools/gpu/export_hm.py ../shared/data/hm-fashion gpu-full/ \\
        --size 360x540 --quality 55 --half-weights
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.config import AppConfig, load_config
from catalog_enrichment.contracts import Taxonomy, load_taxonomy
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.training import memory
from catalog_enrichment.training.splits import FoldPlan


def stack_folds(
    data: Path, cfg: AppConfig, taxonomy: Taxonomy
) -> tuple[pa.Table, np.ndarray, np.ndarray, dict[str, list[int]]]:
    """hm-fashion's usable products as the training job orders them (train.parquet's, then
    test.parquet's), the test rows, each product's cross-fit fold of the stack (-1: test) and per
    attribute each product's value index (a label's first value; -1: none)."""
    train, test = read_table(str(data / "train.parquet")), read_table(str(data / "test.parquet"))
    policy = ImagePolicy.from_config(cfg.images, [])
    table, labels, groups, splits, folds, _, _ = memory._split(train, test, taxonomy, cfg, policy, print)
    fold = np.full(table.num_rows, -1, np.int64)
    for k, (_, rows) in enumerate(FoldPlan(splits.train, labels, groups, folds, cfg.training.seed).folds()):
        fold[splits.train[rows]] = k
    index = {}
    for attr in taxonomy:
        position = {v: i for i, v in enumerate(attr.values)}
        first = [(v[0] if v else None) if isinstance(v, list) else v for v in table[attr.name].to_pylist()]
        index[attr.name] = [position.get(v, -1) if v is not None else -1 for v in first]
    return table, splits.test, fold, index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the hm-fashion folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", default="deploy/config/pretrained.yaml")
    parser.add_argument("--size", default="224x336", help="width x height (H&M's photos are 2:3)")
    parser.add_argument("--quality", type=int, default=85, help="WebP quality")
    parser.add_argument(
        "--half-weights", action="store_true", help="the weights in float16 (9 MB rather than 18)"
    )
    args = parser.parse_args()
    width, height = (int(n) for n in args.size.split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    taxonomy = load_taxonomy(args.data / "taxonomy.yaml")
    table, test_rows, fold, labels = stack_folds(args.data, cfg, taxonomy)
    meta: dict[str, object] = {
        "product_id": table["product_id"].to_pylist(),
        "fold": fold.tolist(),
        "test": np.isin(np.arange(table.num_rows), test_rows).tolist(),
        "values": {a.name: list(a.values) for a in taxonomy},
        **labels,
    }
    photos, offsets = io.BytesIO(), [0]
    for data in table["image"].to_pylist():
        Image.open(io.BytesIO(data)).convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(
            photos, "WEBP", quality=args.quality
        )
        offsets.append(photos.tell())
    meta["offsets"] = offsets
    (args.out / "images.bin").write_bytes(photos.getvalue())
    (args.out / "meta.json").write_text(json.dumps(meta))
    weights = Path(str(cfg.model.image.pretrained_path))
    if args.half_weights:  # loading casts them back to the network's float32
        torch.save({k: v.half() for k, v in torch.load(weights).items()}, args.out / "image.pth")
    else:
        shutil.copy(weights, args.out / "image.pth")
    print(f"{table.num_rows} products ({int((fold >= 0).sum())} train, {test_rows.size} test) -> {args.out}")


if __name__ == "__main__":
    main()
