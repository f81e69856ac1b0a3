"""``catalog-enrich bench quality``: every fusion method, same data and budget, calibrated and tested.

Generates a synthetic marketplace (default or long-tailed), trains each registered fusion method
(plus, when several run, modality attention with lambda = 0, to show 004's modality collapse) with
the same config, calibrates on the calibration split under both guarantee scopes and evaluates on
the test split. Writes JSON and a markdown table; checks the papers' findings, the 95 % promise and
the coverage efficiency, and reports them under ``checks``. On a real catalog (``data``: a labelled
table to train on and one to test on, e.g. ``--data train.parquet --test-data test.parquet``) every
contender trains on the first and is tested on the second, beside the simple baseline.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from catalog_enrichment.bench.baseline import BASELINE_LABEL, run_baseline
from catalog_enrichment.calibration import Calibration
from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.config import AppConfig, CalibrationConfig, SyntheticConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import encode_labels
from catalog_enrichment.data.synthetic import generate_marketplace
from catalog_enrichment.inference.decide import DecisionPolicy
from catalog_enrichment.metrics import paired_bootstrap
from catalog_enrichment.models.fusion import trained_fusions
from catalog_enrichment.training.evaluation import written_without_bound
from catalog_enrichment.training.pipeline import train
from catalog_enrichment.types import Say

__all__ = ["format_quality_markdown", "method_runs", "quality_checks", "run_quality_benchmark"]

COLLAPSE_LABEL = "modality_attention_lambda0"
UNIMODAL = ("text_only", "image_only")
SCOPES = ("attribute", "value")
# the scopes table's last row: one threshold read off the calibration scores without a bound
NO_BOUND = "attribute, no bound"
SCOPE_METRICS = ("r_at_p95", "realized_precision", "coverage", "recall_written", "coverage_efficiency")
METHOD_METRICS = ("macro_f1", "r_at_p95", "realized_precision", "coverage", "coverage_efficiency")
# the acceptance of the attribute scope: share of the achievable recall delivered, per attribute
MIN_EFFICIENCY = 0.85
# a value written this often on the test split must not be significantly below VALUE_FLOOR
GUARD_MIN_WRITES, VALUE_FLOOR = 100, 0.90
BOOTSTRAP_RESAMPLES = 1000


def _runs(methods: Sequence[str], kl_lambda: float) -> list[tuple[str, str, dict[str, Any]]]:
    runs: list[tuple[str, str, dict[str, Any]]] = [
        (m, m, {"kl_lambda": kl_lambda} if m == "modality_attention" else {}) for m in methods
    ]
    if "modality_attention" in methods and len(methods) > 1:  # beside the others: show the collapse
        runs.append((COLLAPSE_LABEL, "modality_attention", {"kl_lambda": 0.0}))
    return runs


def method_runs(
    cfg: AppConfig, methods: Sequence[str] | None = None, kl_lambda: float = 1.0
) -> list[tuple[str, AppConfig]]:
    """(label, config) of each fusion method (default: every trained one) on ``cfg``; beside the
    others, modality attention at ``kl_lambda`` and at 0 (the collapse)."""
    return [
        (
            label,
            cfg.model_copy(
                update={
                    "model": cfg.model.model_copy(
                        update={"fusion": fusion, "fusion_kwargs": {**cfg.model.fusion_kwargs, **kwargs}}
                    )
                }
            ),
        )
        for label, fusion, kwargs in _runs(list(methods or trained_fusions()), kl_lambda)
    ]


def run_quality_benchmark(
    cfg: AppConfig,
    taxonomy: Taxonomy,
    *,
    workdir: Path,
    contenders: Sequence[tuple[str, AppConfig]] | None = None,
    data: tuple[Path, Path] | None = None,
    device: str = "cpu",
    progress: Say | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-serialisable result.

    ``contenders`` (label, config) pairs (default: :func:`method_runs` of ``cfg``): each trains the
    model its config describes (encoders, pretrained weights, training mode, fusion) on the same
    marketplace, which ``cfg.synthetic`` describes. ``data`` (a labelled table to train on, one to test on)
    replaces the synthetic marketplace with a real catalog; the simple baseline
    (:mod:`catalog_enrichment.bench.baseline`) then runs beside the contenders, once ``save`` has
    been given the contenders' result (kept should the baseline fail).
    """
    say = progress or (lambda msg: print(msg, flush=True))
    runs = list(contenders) if contenders else method_runs(cfg)
    table, test_table, source = _tables(cfg.synthetic, taxonomy, workdir, data)
    result: dict[str, Any] = {
        **source,
        "config": {
            label: {
                "model": run_cfg.model.model_dump(mode="json"),
                "training": run_cfg.training.model_dump(mode="json"),
                "calibration": run_cfg.calibration.model_dump(mode="json"),
            }
            for label, run_cfg in runs
        },
        "torch_threads": torch.get_num_threads(),
        **{k: {} for k in ("methods", "modality_weights", "seconds", "epochs", "scopes", "scope_per_value")},
        "pooled_evidence": {},
    }
    test_scores: dict[str, dict[str, np.ndarray]] = {}
    tested: np.ndarray | None = None  # the test rows the contenders were tested on
    for label, run_cfg in runs:
        say(f"== {label} ==")
        started = time.perf_counter()
        trained = train(
            table, taxonomy, run_cfg, test_table=test_table, device=device, progress=lambda m: say("  " + m)
        )
        result["seconds"][label] = round(time.perf_counter() - started, 1)
        _record(result, label, trained, run_cfg.calibration, taxonomy)
        if test_table is not None:
            test_scores[label] = _by_product(trained, test_table)
            scored = ~np.isnan(next(iter(test_scores[label].values()))).any(axis=1)
            tested = scored if tested is None else tested & scored
        kl_lambda = run_cfg.model.fusion_kwargs.get("kl_lambda")
        if run_cfg.model.fusion == "modality_attention" and kl_lambda is not None:  # a method run
            result["modality_weights"][f"lambda={kl_lambda:g}"] = trained.test_report.modality_weights
    if test_table is not None and tested is not None:
        if save is not None:
            save(copy.deepcopy({**result, "checks": quality_checks(result)}))
        say(f"== {BASELINE_LABEL} ==")
        started = time.perf_counter()
        # calibrated by the (first) contender's rule, its photos read under its image policy; tested
        # on the products the contenders were (training leaves out a product whose photo serving
        # would quarantine)
        baseline, scores_of_tested = run_baseline(
            table, test_table.filter(pa.array(tested)), taxonomy, runs[0][1], say=lambda m: say("  " + m)
        )
        baseline_scores = {}
        for attr, part in scores_of_tested.items():
            baseline_scores[attr] = np.full((len(tested), part.shape[1]), np.nan, part.dtype)
            baseline_scores[attr][tested] = part
        result["test_products_scored"] = int(tested.sum())
        result["seconds"][BASELINE_LABEL] = round(time.perf_counter() - started, 1)
        result["methods"][BASELINE_LABEL] = {
            a.name: {k: _num(baseline[a.name][k]) for k in METHOD_METRICS} for a in taxonomy.outputs
        }
        say(f"== paired bootstrap against the baseline ({BOOTSTRAP_RESAMPLES:,} resamples) ==")
        result["versus_baseline"] = {
            label: _versus(scores, baseline_scores, test_table, taxonomy)
            for label, scores in test_scores.items()
        }
    result["checks"] = quality_checks(result)
    return result


def _by_product(trained: Any, test_table: pa.Table) -> dict[str, np.ndarray]:
    """A contender's test scores, its derived attributes' included, in ``test_table``'s row order (NaN
    rows: products training left out, e.g. for an unreadable photo)."""
    position = {pid: i for i, pid in enumerate(trained.product_ids[-len(trained.splits.test) :])}
    order = [position.get(pid, -1) for pid in test_table["product_id"].to_pylist()]
    out = {}
    for attr, probs in trained.taxonomy.derive(trained.test_predictions.probs).items():
        aligned = np.full((len(order), probs.shape[1]), np.nan, np.float32)
        rows = np.array(order)
        aligned[rows >= 0] = probs[rows[rows >= 0]]
        out[attr] = aligned
    return out


def _versus(
    scores: dict[str, np.ndarray], baseline: dict[str, np.ndarray], test_table: pa.Table, taxonomy: Taxonomy
) -> dict[str, dict[str, float]]:
    """Per attribute: the contender's R@P95 minus the baseline's on the same test products, with its
    paired bootstrap 95 % interval (:func:`catalog_enrichment.metrics.paired_bootstrap`), drawing
    the test products' groups (a shared title or description, as the splits group them)."""
    from catalog_enrichment.catalog.groups import table_groups

    labels = encode_labels(test_table, taxonomy).derive(taxonomy)
    scores, baseline = taxonomy.derive(scores), taxonomy.derive(baseline)
    groups = table_groups(test_table)
    out = {}
    for attr in taxonomy.outputs:
        new, old = scores[attr.name], baseline[attr.name]
        known = ~np.isnan(new).any(axis=1) & ~np.isnan(old).any(axis=1)
        if labels.targets[attr.name].ndim == 2:
            known &= labels.known[attr.name]
        y = labels.targets[attr.name][known]
        diff, low, high = paired_bootstrap(
            new[known], old[known], y, attr.kind, resamples=BOOTSTRAP_RESAMPLES, groups=groups[known]
        )
        out[attr.name] = {"difference": round(diff, 4), "low": round(low, 4), "high": round(high, 4)}
    return out


def _tables(
    synthetic: SyntheticConfig, taxonomy: Taxonomy, workdir: Path, data: tuple[Path, Path] | None
) -> tuple[pa.Table, pa.Table | None, dict[str, Any]]:
    """The table to train on, the one to test on (None: a split of the first, a marketplace
    ``synthetic`` describes), and what they are."""
    if data is not None:
        table, test_table = read_table(data[0]), read_table(data[1])
        source = {"data": str(data[0]), "test_data": str(data[1]), "products": table.num_rows}
        return table, test_table, {**source, "test_products": test_table.num_rows}
    market = generate_marketplace(workdir / "marketplace", synthetic, taxonomy=taxonomy)
    source = {
        "products": synthetic.products,
        "seed": synthetic.seed,
        "label_noise": synthetic.label_noise,
        "long_tail": synthetic.long_tail,
    }
    return read_table(market.products), None, source


def _record(
    result: dict[str, Any],
    label: str,
    trained: Any,
    rule: CalibrationConfig,
    taxonomy: Taxonomy,
) -> None:
    """One contender's figures into ``result``: epochs, test metrics, and both calibration scopes
    (``rule``'s, which it trained with, and the other from its stored held-out scores)."""
    report = trained.test_report
    result["epochs"][label] = {"trained": len(trained.history), "best": trained.best_epoch}
    result["methods"][label] = {
        a.name: {k: _num(report[a.name][k]) for k in METHOD_METRICS} for a in taxonomy.outputs
    }
    if taxonomy.derived:
        result.setdefault("given_a_value", {})[label] = given_a_value(
            trained.test_predictions.probs, trained.calibration, trained.taxonomy
        )
    result["scopes"][label] = {}
    for scope in SCOPES:
        scoped = rule.model_copy(update={"scope": scope})
        calibration, scope_report = (
            (trained.calibration, report) if scope == rule.scope else trained.recalibrate(scoped)
        )
        if scope == "attribute":
            result["pooled_evidence"][label] = {
                name: None if a.pooled is None else asdict(a.pooled)
                for name, a in calibration.attributes.items()
            }
        result["scopes"][label][scope] = {
            a.name: {k: _num(scope_report[a.name][k]) for k in SCOPE_METRICS} for a in taxonomy.outputs
        }
        result["scope_per_value"].setdefault(scope, {})[label] = {
            a.name: scope_report[a.name]["per_value"] for a in taxonomy.outputs
        }
    if not trained.heldout.fold_family:  # the calibration scores are on the served model's scale
        unbounded = written_without_bound(
            trained.heldout.calibration,
            (trained.test_predictions, trained.test_labels),
            trained.taxonomy,
            rule.target_precision,
        )
        result["scopes"][label][NO_BOUND] = {
            a.name: {k: _num(v) for k, v in unbounded[a.name].items()} for a in taxonomy.outputs
        }


def given_a_value(
    probs: Mapping[str, np.ndarray], calibration: Calibration, taxonomy: Taxonomy
) -> dict[str, dict[str, float]]:
    """Per derived attribute: the share of products the decision gives a value of its parent, and a
    value at either level (the parent's or the group's)."""
    policy = DecisionPolicy(taxonomy, calibration, taxonomy)
    n = len(next(iter(probs.values())))
    flat = policy.decide_flat(taxonomy.derive(probs), np.zeros((n, len(policy.taxonomy)), bool))
    names = policy.taxonomy.names
    product = np.repeat(np.arange(n), np.diff(flat.offsets))
    out = {}
    for d in taxonomy.derived.values():
        parent = np.unique(product[flat.attribute == names.index(d.parent)])
        either = np.unique(product[np.isin(flat.attribute, [names.index(d.parent), names.index(d.name)])])
        out[d.name] = {d.parent: len(parent) / max(n, 1), "either": len(either) / max(n, 1)}
    return out


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def _lambda_checks(weights: dict[str, Any]) -> dict[str, Any]:
    """Modality attention: with lambda = 0 the material head collapses to text, with lambda > 0 not."""
    if "lambda=0" not in weights or len(weights) < 2:
        return {}
    collapsed = weights["lambda=0"].get("material", {}).get("image_mean")
    other = next(v for k, v in weights.items() if k != "lambda=0").get("material", {}).get("image_mean")
    return {
        "material_image_weight_lambda0": collapsed,
        "material_image_weight_lambda_pos": other,
        "lambda0_collapses_to_text": collapsed is not None and collapsed < 0.1,
        "lambda_pos_keeps_image": other is not None and collapsed is not None and other > max(0.1, collapsed),
    }


def quality_checks(result: dict[str, Any]) -> dict[str, Any]:
    """The acceptance checks of the issue, computed from a result: the contenders' (the simple
    baseline is what they are measured against, not one of them; its figures are in the table)."""
    methods = {label: m for label, m in result["methods"].items() if label != BASELINE_LABEL}
    checks: dict[str, Any] = {}
    multimodal = {m: v for m, v in methods.items() if m not in UNIMODAL}
    if multimodal and all(u in methods for u in UNIMODAL):
        best = max(multimodal, key=lambda m: multimodal[m]["color"]["r_at_p95"])
        best_r = multimodal[best]["color"]["r_at_p95"]
        margin = best_r - max(methods[u]["color"]["r_at_p95"] for u in UNIMODAL)
        checks["color_best_multimodal"] = best
        checks["color_margin_over_unimodal"] = margin
        checks["color_multimodal_beats_unimodal_by_5pts"] = margin >= 0.05
    checks.update(_lambda_checks(result["modality_weights"]))
    precision_ok = True
    worst: list[str] = []
    for label, attrs in methods.items():
        for attr, m in attrs.items():
            p = m["realized_precision"]
            if p is not None and p < 0.95:
                precision_ok = False
                worst.append(f"{label}/{attr}: {p:.3f}")
    checks["pooled_precision_ge_095_everywhere"] = precision_ok
    checks["pooled_precision_failures"] = worst
    attribute_scope = {label: scopes["attribute"] for label, scopes in result.get("scopes", {}).items()}
    low = [
        f"{label}/{attr}: {m['coverage_efficiency']}"
        for label, attrs in attribute_scope.items()
        for attr, m in attrs.items()
        if m["coverage_efficiency"] is None or m["coverage_efficiency"] < MIN_EFFICIENCY
    ]
    checks[f"attribute_scope_efficiency_ge_{MIN_EFFICIENCY}"] = not low
    checks["attribute_scope_efficiency_failures"] = low
    imprecise = [
        f"{label}/{attr}: {m['realized_precision']}"
        for label, attrs in attribute_scope.items()
        for attr, m in attrs.items()
        if m["realized_precision"] is not None and m["realized_precision"] < 0.95
    ]
    checks["attribute_scope_precision_ge_095"] = not imprecise
    checks["attribute_scope_precision_failures"] = imprecise
    upper_fail = [
        f"{scope}/{label}/{attr}/{value}: {pv['precision']:.3f} (upper {pv['wilson_upper']:.3f}, "
        f"n={pv['written']})"
        for scope, labels in result.get("scope_per_value", {}).items()
        for label, attrs in labels.items()
        for attr, values in attrs.items()
        for value, pv in values.items()
        if pv["written"] >= GUARD_MIN_WRITES and pv["wilson_upper"] < VALUE_FLOOR
    ]
    checks[f"no_value_with_{GUARD_MIN_WRITES}_writes_below_{VALUE_FLOOR}"] = not upper_fail
    checks["value_upper_bound_failures"] = upper_fail
    return checks


def format_quality_markdown(result: dict[str, Any]) -> str:
    """The results as markdown tables."""
    attrs = list(next(iter(result["methods"].values())))
    source = (
        f"Trained on {result['data']} ({result['products']:,} products), tested on {result['test_data']} "
        f"({result['test_products']:,} products"
        + (
            f"; {result['test_products_scored']:,} with a usable photo scored"
            if result.get("test_products_scored", result["test_products"]) != result["test_products"]
            else ""
        )
        + ")"
        if "data" in result
        else f"Synthetic marketplace{' (long-tailed)' if result.get('long_tail') else ''}: "
        f"{result['products']:,} products, seed {result['seed']}, label noise {result['label_noise']}; "
        "test split"
    )
    lines = [
        f"{source}; values written only above calibrated thresholds.",
        "",
        "| method | " + " | ".join(f"{a} F1 / R@P95 / prec / cov / eff" for a in attrs) + " | s |",
        "|---|" + "---|" * (len(attrs) + 1),
    ]

    def cell(m: dict[str, Any]) -> str:
        p = m["realized_precision"]
        return (
            f"{m['macro_f1']:.3f} / {m['r_at_p95']:.3f} / {'—' if p is None else f'{p:.3f}'} / "
            f"{m['coverage']:.3f} / {_fmt(m.get('coverage_efficiency'), 2)}"
        )

    for label, per in result["methods"].items():
        lines.append(
            f"| {label} | " + " | ".join(cell(per[a]) for a in attrs) + f" | {result['seconds'][label]:.0f} |"
        )
    lines += _versus_lines(result, attrs) + _scope_lines(result, attrs) + _weight_lines(result, attrs)
    for label, per in result.get("given_a_value", {}).items():
        shares = [f"{d}: {', '.join(f'{k} {v:.3f}' for k, v in share.items())}" for d, share in per.items()]
        lines += ["", f"Share of test products given a value, {label}: " + "; ".join(shares)]
    lines += ["", "Checks:", ""]
    lines += [f"- {k}: {v}" for k, v in result["checks"].items() if not isinstance(v, list) or v]
    return "\n".join(lines) + "\n"


def _versus_lines(result: dict[str, Any], attrs: list[str]) -> list[str]:
    versus = result.get("versus_baseline")
    if not versus:
        return []
    lines = [
        "",
        f"R@P95 minus the baseline's on the same test products, paired bootstrap 95 % interval "
        f"({BOOTSTRAP_RESAMPLES:,} resamples):",
        "",
        "| method | " + " | ".join(attrs) + " |",
        "|---|" + "---|" * len(attrs),
    ]
    for label, per in versus.items():
        lines.append(
            f"| {label} | "
            + " | ".join(
                f"{per[a]['difference']:+.3f} [{per[a]['low']:+.3f}, {per[a]['high']:+.3f}]" for a in attrs
            )
            + " |"
        )
    return lines


def _scope_lines(result: dict[str, Any], attrs: list[str]) -> list[str]:
    if not result.get("scopes"):
        return []
    lines = [
        "",
        "Guarantee scopes (same model, test split): realized precision / coverage efficiency "
        f"(recall written / R@P95); '{NO_BOUND}': the one threshold where the calibration scores' own "
        "precision last reaches the target, without a bound (what it misses: the test set is unlike "
        "the calibration set; the gap to the attribute scope: the bound's cost):",
        "",
        "| method | scope | " + " | ".join(attrs) + " |",
        "|---|---|" + "---|" * len(attrs),
    ]
    for label, scopes in result["scopes"].items():
        for scope, per in scopes.items():
            cells = [
                f"{_fmt(per[a]['realized_precision'])} / {_fmt(per[a]['coverage_efficiency'], 2)}"
                for a in attrs
            ]
            lines.append(f"| {label} | {scope} | " + " | ".join(cells) + " |")
    return lines


def _weight_lines(result: dict[str, Any], attrs: list[str]) -> list[str]:
    if not result["modality_weights"]:
        return []
    lines = [
        "",
        "Modality weights (mean over test products, modality_attention):",
        "",
        "| lambda | " + " | ".join(f"{a} text / image" for a in attrs) + " |",
        "|---|" + "---|" * len(attrs),
    ]
    for label, per in result["modality_weights"].items():
        cells = [
            f"{per[a]['text_mean']:.3f} / {per[a]['image_mean']:.3f}" if a in per else "—" for a in attrs
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def write_result(result: dict[str, Any], out: Path, markdown: str) -> Path:
    """Write JSON to ``out`` and ``markdown`` next to it (``.md``); returns the markdown path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown)
    return md
