"""What the precision bound costs on products like the calibration ones: the coverage efficiency and
realized precision the project's calibrator (``training.evaluation.calibrate``, the configured rule,
no family data, the rest's groups of variants counted as training counts them) reaches on test-sized
held-out samples of a trained model's out-of-fold scores, calibrated each time on the rest - with
the configured bound, and with the one threshold where the rest's own precision last reaches the
target (no bound). The samples are whole groups (a shared title or description, as the splits group
products), so they are as exchangeable with the calibration products as new products can be: what
the bound leaves of the efficiency there is its cost at the rest's calibration volume, not a
difference between test and calibration products.
For a model that calibrates out of fold (the stack, or ``training.crossfit_folds``). ``--test-data``
is given to training so that it carves no test split of the training table, as ``bench quality``
does; the figures use none of its scores. Values training keeps out (never seen, or unlearnable by a
fold) are not kept out here.

    python tools/bound_cost.py --data ../shared/data/hm-fashion/train.parquet \\
        --test-data ../shared/data/hm-fashion/test.parquet \\
        --taxonomy ../shared/data/hm-fashion/taxonomy.yaml --config deploy/config/pretrained.yaml

``--confidences 0.9,0.8`` also bounds each sample at those one-sided confidences (the coverage a
lower confidence buys, and how often its writes then miss the target).
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
    parser.add_argument("--test-data", help="the labelled test table, for training only (see above)")
    parser.add_argument("--taxonomy", required=True)
    parser.add_argument("--config", default="deploy/config/pretrained.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--size", type=int, default=1790, help="products per held-out sample")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bound-cost.json"))
    parser.add_argument(
        "--confidences",
        default="",
        help="more one-sided confidences to bound at, e.g. 0.9,0.8 (the same samples)",
    )
    args = parser.parse_args()
    cfg = load_config(args.config, overrides=parse_overrides(args.set))
    levels = [float(c) for c in args.confidences.split(",") if c]
    bounds = {"bound": cfg.calibration} | {
        f"bound, confidence {c:g}": type(cfg.calibration).model_validate(
            {**cfg.calibration.model_dump(), "confidence": c}
        )
        for c in levels
    }
    taxonomy = load_taxonomy(args.taxonomy)
    table = read_table(args.data)
    test = None if args.test_data is None else read_table(args.test_data)
    trained = train(table, taxonomy, cfg, test_table=test, progress=print)
    preds, labels = trained.calibration_set
    rows = trained.splits.train
    if trained.splits.calibration.size or len(rows) != len(next(iter(labels.known.values()))):
        raise SystemExit("the model calibrated on a calibration split, not out of fold: nothing to resample")
    # the splits' rows are positions in training's own order: their groups are looked up by id
    group_of = dict(zip(table["product_id"].to_pylist(), table_groups(table).tolist(), strict=True))
    _, groups = np.unique([group_of[trained.product_ids[r]] for r in rows], return_inverse=True)
    sizes = np.bincount(groups)
    rng = np.random.default_rng(args.seed)
    figures: dict[str, list[dict[str, tuple[float, float]]]] = {a.name: [] for a in taxonomy}
    for _ in progress(range(args.resamples), desc="resamples", unit="samples"):
        order = rng.permutation(len(sizes))
        held = np.isin(groups, order[np.cumsum(sizes[order]) <= args.size])
        out, rest = np.flatnonzero(held), np.flatnonzero(~held)

        def part(idx: np.ndarray) -> tuple[Predictions, EncodedLabels]:
            return Predictions({a: p[idx] for a, p in preds.probs.items()}, None, {}), labels.subset(idx)

        reports = {
            kind: evaluate(
                *part(out), taxonomy, calibrate(*part(rest), taxonomy, calibration, groups=groups[rest])
            )
            for kind, calibration in bounds.items()
        }
        reports["no bound"] = written_without_bound(
            part(rest), part(out), taxonomy, cfg.calibration.target_precision
        )
        for a in taxonomy:
            figures[a.name].append(
                {
                    kind: (r[a.name]["coverage_efficiency"], r[a.name]["realized_precision"])
                    for kind, r in reports.items()
                }
            )
    result: dict[str, dict[str, dict[str, object]]] = {}
    for name, rows_of in figures.items():
        result[name] = {}
        for kind in rows_of[0]:
            eff, prec = (np.array([row[kind][i] for row in rows_of], float) for i in (0, 1))
            ok = ~np.isnan(eff)  # a sample where no threshold reaches the target has no efficiency
            result[name][kind] = {
                "efficiency_p10_p50_p90": [float(v) for v in np.percentile(eff[ok], [10, 50, 90])],
                "efficiency_ge_0.90": float(np.mean(eff[ok] >= 0.90)),
                "samples_without_efficiency": int((~ok).sum()),
                "precision_p50": float(np.nanmedian(prec)),
                "precision_below_target": float(
                    np.mean(prec[~np.isnan(prec)] < cfg.calibration.target_precision)
                ),
                "samples_writing_nothing": int(np.isnan(prec).sum()),
            }
        print(name, json.dumps(result[name]), flush=True)
    args.out.write_text(json.dumps({"resamples": args.resamples, "size": args.size, **result}, indent=1))


if __name__ == "__main__":
    main()
