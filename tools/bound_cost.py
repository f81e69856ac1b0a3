"""What the precision bound costs on products like the calibration ones: the coverage efficiency and
realized precision the project's calibrator reaches on test-sized held-out samples of a trained
model's own calibration scores (out of fold, or the calibration split), calibrated each time on the
rest - with the configured bound, and with the one threshold where the rest's own precision last
reaches the target (no bound). The samples are whole groups (a shared title or description, as
the splits group products), so they are as exchangeable with the calibration products as new
products can be: what the bound leaves of the efficiency here is its cost at this calibration
volume, not a difference between test and calibration products. Only the training table's scores
are read; ``--test-data`` is passed to training so that it carves no test split of its own, as
``bench quality`` does.

    python tools/bound_cost.py --data ../shared/data/hm-fashion/train.parquet \\
        --test-data ../shared/data/hm-fashion/test.parquet \\
        --taxonomy ../shared/data/hm-fashion/taxonomy.yaml --config deploy/config/pretrained.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from catalog_enrichment.catalog.groups import table_groups
from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.config import load_config, parse_overrides
from catalog_enrichment.contracts import load_taxonomy
from catalog_enrichment.data.dataset import EncodedLabels
from catalog_enrichment.progress import progress
from catalog_enrichment.training.evaluation import Predictions, calibrate, evaluate, written_without_bound
from catalog_enrichment.training.pipeline import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the labelled training table")
    parser.add_argument("--test-data", help="the labelled test table (never read here; see above)")
    parser.add_argument("--taxonomy", required=True)
    parser.add_argument("--config", default="deploy/config/pretrained.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--size", type=int, default=1790, help="products per held-out sample")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bound-cost.json"))
    args = parser.parse_args()
    cfg = load_config(args.config, overrides=parse_overrides(args.set))
    taxonomy = load_taxonomy(args.taxonomy)
    table = read_table(args.data)
    test = None if args.test_data is None else read_table(args.test_data)
    trained = train(table, taxonomy, cfg, test_table=test, progress=print)
    preds, labels = trained.calibration_set
    n = len(labels.known[taxonomy.names[0]])  # out of fold over the training split, or a calibration split
    rows = next(r for r in (trained.splits.train, trained.splits.calibration) if len(r) == n)
    groups = table_groups(table.take(rows))
    sizes = np.bincount(groups)
    rng = np.random.default_rng(args.seed)
    figures: dict[str, list[tuple[float, ...]]] = {a.name: [] for a in taxonomy}
    for _ in progress(range(args.resamples), desc="resamples", unit="samples"):
        order = rng.permutation(len(sizes))
        held = np.isin(groups, order[np.cumsum(sizes[order]) <= args.size])
        out, rest = np.flatnonzero(held), np.flatnonzero(~held)

        def part(idx: np.ndarray) -> tuple[Predictions, EncodedLabels]:
            return Predictions({a: p[idx] for a, p in preds.probs.items()}, None, {}), labels.subset(idx)

        report = evaluate(*part(out), taxonomy, calibrate(*part(rest), taxonomy, cfg.calibration))
        free = written_without_bound(part(rest), part(out), taxonomy, cfg.calibration.target_precision)
        for a in taxonomy:
            r, f = report[a.name], free[a.name]
            figures[a.name].append(
                (
                    r["coverage_efficiency"],
                    r["realized_precision"],
                    f["coverage_efficiency"],
                    f["realized_precision"],
                )
            )
    result = {}
    for name, rows_of in figures.items():
        x = np.array(rows_of, float)
        result[name] = {
            kind: {
                "efficiency_p10_p50_p90": [float(v) for v in np.nanpercentile(x[:, col], [10, 50, 90])],
                "efficiency_ge_0.90": float(np.mean(x[:, col] >= 0.90)),
                "precision_p50": float(np.nanmedian(x[:, col + 1])),
                "precision_below_target": float(np.mean(x[:, col + 1] < cfg.calibration.target_precision)),
            }
            for kind, col in (("bound", 0), ("no bound", 2))
        }
        print(name, json.dumps(result[name]), flush=True)
    args.out.write_text(json.dumps({"resamples": args.resamples, "size": args.size, **result}, indent=1))


if __name__ == "__main__":
    main()
