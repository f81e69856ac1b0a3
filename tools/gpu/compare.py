"""A fine-tuned network (``finetune.py``'s image network or ``tools/text_member.py``'s text layers:
their out-of-fold and test probabilities) beside the CPU rows on hm-fashion: alone, and as a member
beside the recommended stack - a meta-learner per attribute over the two members' log-probabilities
(one weight each and a bias per value), cross-fitted over the same folds - each calibrated on its own
out-of-fold scores by the project's calibrator and tested on test.parquet, with paired bootstrap
intervals against the baseline and the stack.

    python tools/gpu/compare.py ../shared/data/hm-fashion gpu/meta.json finetuned.npz --out compare.json

A ``finetuned.npz`` without ``lp_<attribute>`` arrays (no linear probe) has no probe row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from catalog_enrichment.bench.baseline import run_baseline
from catalog_enrichment.bench.quality import _versus
from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.config import load_config, parse_overrides
from catalog_enrichment.contracts import load_taxonomy
from catalog_enrichment.data.dataset import EncodedLabels
from catalog_enrichment.training.evaluation import Predictions, calibrate, evaluate
from catalog_enrichment.training.pipeline import train

Scores = dict[str, np.ndarray]
METRICS = ("macro_f1", "r_at_p95", "realized_precision", "coverage", "coverage_efficiency")


def _target(labels: EncodedLabels, attr: str) -> tuple[np.ndarray, np.ndarray]:
    """(class index, labelled) per product: every labelled product has one value here."""
    t = labels.targets[attr]
    return (t.argmax(1), labels.known[attr]) if t.ndim == 2 else (t, t >= 0)


def _fit_meta(logs: np.ndarray, y: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight per member and a bias per value (L2 1e-3 on the biases), softmax, L-BFGS."""
    x, target = torch.from_numpy(logs[:, rows]), torch.from_numpy(y[rows])
    w, b = torch.ones(logs.shape[0], requires_grad=True), torch.zeros(logs.shape[2], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy((w[:, None, None] * x).sum(0) + b, target)
            + 1e-3 * (b * b).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _apply(fit: tuple[torch.Tensor, torch.Tensor], logs: np.ndarray) -> np.ndarray:
    w, b = fit
    return ((w[:, None, None] * torch.from_numpy(logs)).sum(0) + b).softmax(1).numpy()


def combine(
    members: list[tuple[Scores, Scores]], labels: EncodedLabels, folds: np.ndarray
) -> tuple[Scores, Scores, dict]:
    """Out-of-fold scores of the meta-learner (each fold's from one fitted on the others) and its test
    scores (fitted on every out-of-fold score), with its member weights per attribute."""
    oof, test, weights = {}, {}, {}
    for attr in members[0][0]:
        y, known = _target(labels, attr)
        logs = np.stack([np.log(np.clip(m[0][attr], 1e-6, 1)) for m in members])
        out = np.zeros(logs.shape[1:], np.float32)
        for k in np.unique(folds):
            out[folds == k] = _apply(_fit_meta(logs, y, known & (folds != k)), logs[:, folds == k])
        fit = _fit_meta(logs, y, known)
        oof[attr] = out
        test[attr] = _apply(fit, np.stack([np.log(np.clip(m[1][attr], 1e-6, 1)) for m in members]))
        weights[attr] = [round(float(v), 2) for v in fit[0]]
    return oof, test, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the hm-fashion folder")
    parser.add_argument("meta", type=Path, help="export_hm.py's meta.json (the folds)")
    parser.add_argument("finetuned", type=Path, help="finetune.py's or text_member.py's finetuned.npz")
    parser.add_argument(
        "--member", default="fine-tuned EfficientNet-Lite0", help="the member's name in the rows"
    )
    parser.add_argument("--config", default="deploy/config/pretrained.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--out", type=Path, default=Path("compare.json"))
    args = parser.parse_args()
    cfg = load_config(args.config, overrides=parse_overrides(args.set))
    taxonomy = load_taxonomy(args.data / "taxonomy.yaml")
    train_table, test_table = (
        read_table(str(args.data / "train.parquet")),
        read_table(str(args.data / "test.parquet")),
    )
    trained = train(train_table, taxonomy, cfg, test_table=test_table, progress=print)
    baseline, baseline_scores = run_baseline(train_table, test_table, taxonomy, cfg, say=print)
    ids = trained.product_ids
    train_ids, test_ids = [ids[i] for i in trained.splits.train], [ids[i] for i in trained.splits.test]
    oof_preds, labels = trained.calibration_set
    fold_of = dict(zip(*(json.loads(args.meta.read_text())[k] for k in ("product_id", "fold")), strict=True))
    folds = np.array([fold_of[p] for p in train_ids])
    position = {p: i for i, p in enumerate(test_ids)}
    table_order = np.array([position[p] for p in test_table["product_id"].to_pylist()])
    attrs = [a.name for a in taxonomy]
    saved = np.load(args.finetuned)
    row = {p: i for i, p in enumerate(saved["product_id"].tolist())}

    def member(prefix: str) -> tuple[Scores, Scores]:
        tr, te = [row[p] for p in train_ids], [row[p] for p in test_ids]
        return (
            {a: saved[f"{prefix}_{a}"][tr].astype(np.float32) for a in attrs},
            {a: saved[f"{prefix}_{a}"][te].astype(np.float32) for a in attrs},
        )

    stack = ({a: oof_preds.probs[a] for a in attrs}, {a: trained.test_predictions.probs[a] for a in attrs})
    rows: dict[str, tuple[Scores, Scores, dict | None]] = {
        "stack (recommended, CPU)": (*stack, None),
        f"{args.member} alone": (*member("ft"), None),
    }
    if f"lp_{attrs[0]}" in saved:
        rows["frozen EfficientNet-Lite0, linear probe"] = (*member("lp"), None)
    rows["stack + fine-tuned member"] = combine([stack, member("ft")], labels, folds)
    result: dict[str, dict] = {"baseline": {a: {k: baseline[a].get(k) for k in METRICS} for a in attrs}}
    for name, (oof, test, weights) in rows.items():
        calibration = calibrate(Predictions(oof, None, {}), labels, taxonomy, cfg.calibration)
        report = evaluate(Predictions(test, None, {}), trained.test_labels, taxonomy, calibration)
        in_table_order = {a: test[a][table_order] for a in attrs}
        versus = {
            "vs_baseline": _versus(in_table_order, baseline_scores, test_table, taxonomy),
            "vs_stack": _versus(
                in_table_order, {a: stack[1][a][table_order] for a in attrs}, test_table, taxonomy
            ),
        }
        result[name] = {
            "member_weights": weights,
            **{
                a: {**{k: report[a].get(k) for k in METRICS}, **{v: versus[v][a] for v in versus}}
                for a in attrs
            },
        }
        print(name, json.dumps(result[name], default=float), flush=True)
    args.out.write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
