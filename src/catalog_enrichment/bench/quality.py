"""``catalog-enrich bench quality``: every fusion method, same data and budget, calibrated and tested.

Generates a synthetic marketplace, trains each registered fusion method (plus modality attention
with lambda = 0, to show 004's modality collapse) with the same config, calibrates on the
calibration split and evaluates on the test split. Writes JSON (shape documented in the issue) and a
markdown table; checks the papers' findings and the 95 % promise and reports them under ``checks``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.synthetic import generate_marketplace
from catalog_enrichment.models.fusion import list_fusions
from catalog_enrichment.training.loop import train_and_calibrate

__all__ = ["format_quality_markdown", "quality_checks", "run_quality_benchmark"]

COLLAPSE_LABEL = "modality_attention_lambda0"
UNIMODAL = ("text_only", "image_only")


def _runs(methods: Sequence[str], kl_lambda: float) -> list[tuple[str, str, dict[str, Any]]]:
    runs: list[tuple[str, str, dict[str, Any]]] = [(m, m, {}) for m in methods]
    if "modality_attention" in methods:
        runs = [
            (label, m, {"kl_lambda": kl_lambda} if m == "modality_attention" else kw) for label, m, kw in runs
        ]
        runs.append((COLLAPSE_LABEL, "modality_attention", {"kl_lambda": 0.0}))
    return runs


def run_quality_benchmark(
    cfg: AppConfig,
    taxonomy: Taxonomy,
    *,
    workdir: Path,
    methods: Sequence[str] | None = None,
    kl_lambda: float = 1.0,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-serialisable result."""
    say = progress or (lambda msg: print(msg, flush=True))
    methods = list(methods or list_fusions())
    market = generate_marketplace(workdir / "marketplace", cfg.synthetic, taxonomy=taxonomy)
    table = read_table(market.products)
    result: dict[str, Any] = {
        "products": cfg.synthetic.products,
        "seed": cfg.synthetic.seed,
        "label_noise": cfg.synthetic.label_noise,
        "config": {
            "model": cfg.model.model_dump(mode="json"),
            "training": cfg.training.model_dump(mode="json"),
            "calibration": cfg.calibration.model_dump(mode="json"),
        },
        "torch_threads": torch.get_num_threads(),
        "methods": {},
        "modality_weights": {},
        "per_value": {},
        "seconds": {},
        "epochs": {},
    }
    for label, fusion, kwargs in _runs(methods, kl_lambda):
        say(f"== {label} ==")
        run_cfg = cfg.model_copy(
            update={
                "model": cfg.model.model_copy(
                    update={"fusion": fusion, "fusion_kwargs": {**cfg.model.fusion_kwargs, **kwargs}}
                )
            }
        )
        started = time.perf_counter()
        trained = train_and_calibrate(
            table, taxonomy, run_cfg, device=device, progress=lambda m: say("  " + m)
        )
        report = trained.test_report
        result["seconds"][label] = round(time.perf_counter() - started, 1)
        result["epochs"][label] = {"trained": len(trained.history), "best": trained.best_epoch}
        result["methods"][label] = {
            a.name: {
                k: _num(report[a.name][k]) for k in ("macro_f1", "r_at_p95", "realized_precision", "coverage")
            }
            for a in taxonomy
        }
        result["per_value"][label] = {a.name: report[a.name]["per_value"] for a in taxonomy}
        if fusion == "modality_attention":
            name = f"lambda={kwargs.get('kl_lambda', kl_lambda):g}"
            result["modality_weights"][name] = report.get("_modality_weights", {})
    result["checks"] = quality_checks(result)
    return result


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def quality_checks(result: dict[str, Any]) -> dict[str, Any]:
    """The acceptance checks of the issue, computed from a result."""
    methods = result["methods"]
    checks: dict[str, Any] = {}
    multimodal = {m: v for m, v in methods.items() if m not in UNIMODAL}
    if multimodal and all(u in methods for u in UNIMODAL):
        best = max(multimodal, key=lambda m: multimodal[m]["color"]["r_at_p95"])
        best_r = multimodal[best]["color"]["r_at_p95"]
        margin = best_r - max(methods[u]["color"]["r_at_p95"] for u in UNIMODAL)
        checks["color_best_multimodal"] = best
        checks["color_margin_over_unimodal"] = margin
        checks["color_multimodal_beats_unimodal_by_5pts"] = margin >= 0.05
    weights = result["modality_weights"]
    if "lambda=0" in weights and len(weights) > 1:
        collapsed = weights["lambda=0"].get("material", {}).get("image_mean")
        other = next(v for k, v in weights.items() if k != "lambda=0").get("material", {}).get("image_mean")
        checks["material_image_weight_lambda0"] = collapsed
        checks["material_image_weight_lambda_pos"] = other
        checks["lambda0_collapses_to_text"] = collapsed is not None and collapsed < 0.1
        checks["lambda_pos_keeps_image"] = (
            other is not None and collapsed is not None and other > max(0.1, collapsed)
        )
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
    upper_fail = [
        f"{label}/{attr}/{value}: {pv['precision']:.3f} (upper {pv['wilson_upper']:.3f}, n={pv['written']})"
        for label, attrs in result["per_value"].items()
        for attr, values in attrs.items()
        for value, pv in values.items()
        if pv["wilson_upper"] is not None and pv["wilson_upper"] < 0.95
    ]
    checks["no_value_upper_bound_below_095"] = not upper_fail
    checks["value_upper_bound_failures"] = upper_fail
    return checks


def format_quality_markdown(result: dict[str, Any]) -> str:
    """The results as markdown tables."""
    attrs = list(next(iter(result["methods"].values())))
    lines = [
        f"Synthetic marketplace: {result['products']:,} products, seed {result['seed']}, "
        f"label noise {result['label_noise']}; test split; values written only above calibrated thresholds.",
        "",
        "| method | " + " | ".join(f"{a} F1 / R@P95 / prec / cov" for a in attrs) + " | s |",
        "|---|" + "---|" * (len(attrs) + 1),
    ]

    def cell(m: dict[str, Any]) -> str:
        p = m["realized_precision"]
        return (
            f"{m['macro_f1']:.3f} / {m['r_at_p95']:.3f} / {'—' if p is None else f'{p:.3f}'} / "
            f"{m['coverage']:.3f}"
        )

    for label, per in result["methods"].items():
        lines.append(
            f"| {label} | " + " | ".join(cell(per[a]) for a in attrs) + f" | {result['seconds'][label]:.0f} |"
        )
    if result["modality_weights"]:
        lines += [
            "",
            "Modality weights (mean over test products, modality_attention):",
            "",
            "| lambda | " + " | ".join(f"{a} text / image" for a in attrs) + " |",
            "|---|" + "---|" * len(attrs),
        ]
        for label, per in result["modality_weights"].items():
            lines.append(
                f"| {label} | "
                + " | ".join(
                    f"{per[a]['text_mean']:.3f} / {per[a]['image_mean']:.3f}" if a in per else "—"
                    for a in attrs
                )
                + " |"
            )
    lines += ["", "Checks:", ""]
    lines += [f"- {k}: {v}" for k, v in result["checks"].items() if not isinstance(v, list) or v]
    return "\n".join(lines) + "\n"


def write_quality_result(result: dict[str, Any], out: Path) -> Path:
    """Write JSON to ``out`` and markdown next to it (``.md``); returns the markdown path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = out.with_suffix(".md")
    md.write_text(format_quality_markdown(result))
    return md
