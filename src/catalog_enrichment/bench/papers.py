"""The papers' training techniques measured where the answer is known (synthetic marketplaces).

* ``run_noise_study`` (``bench quality --label-noise R``, 001 §3.2.1): the same products trained
  with their clean labels, with R of each attribute's labels flipped, and flipped with confident-
  learning pruning; every model scored on one clean held-out marketplace. Reports the R@P95 the
  noise cost, the share pruning won back, and the precision / recall of the pruned labels against
  the injected flips.
* ``run_ensemble_study`` (``bench quality --ensemble K``, 001 §3.4): one ensemble of K members and
  each member alone, on the same test split.
* ``run_pretrain_study`` (``bench pretrain-text``, 003): text-only models fine-tuned on a small
  share of the labels from the plain encoder, a SimCSE-adapted and a ConVIRT-adapted one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import encode_labels
from catalog_enrichment.data.synthetic import generate_marketplace
from catalog_enrichment.inference.predictor import BatchPredictor
from catalog_enrichment.metrics import attribute_r_at_p
from catalog_enrichment.training.fit import PRETRAINED_ENCODER_LR
from catalog_enrichment.training.pipeline import train
from catalog_enrichment.training.trained import TrainedModel
from catalog_enrichment.types import Say

__all__ = ["run_ensemble_study", "run_noise_study", "run_pretrain_study"]

# where the held-out evaluation marketplace's seed starts (never the training marketplace's)
EVAL_SEED_OFFSET = 1000


def aligned_truth(products: pa.Table, truth: pa.Table) -> pa.Table:
    """The truth rows in ``products``' row order (the two tables are written apart; matched by id)."""
    at = {pid: i for i, pid in enumerate(truth["product_id"].to_pylist())}
    return truth.take(pa.array([at[pid] for pid in products["product_id"].to_pylist()], pa.int64()))


def clean_labels(products: pa.Table, truth: pa.Table, taxonomy: Taxonomy) -> pa.Table:
    """``products`` with every label column replaced by the generator's clean one."""
    truth = aligned_truth(products, truth)
    for attr in taxonomy:
        i = products.schema.get_field_index(attr.name)
        clean = truth[f"true_{attr.name}"].cast(products.schema.field(attr.name).type)
        products = products.set_column(i, attr.name, clean)
    return products


def r_at_p95_on(
    trained: TrainedModel, products: pa.Table, truth: pa.Table, taxonomy: Taxonomy
) -> dict[str, float]:
    """Per attribute, the R@P95 of ``trained`` (scored as it is served) against the clean labels."""
    probs = BatchPredictor(trained.bundle()).score_arrow(products).probs
    labels = encode_labels(clean_labels(products, truth, taxonomy), taxonomy)
    return {a.name: attribute_r_at_p(*labels.labelled(probs, a.name), a.kind).pooled for a in taxonomy}


def _flipped(products: pa.Table, truth: pa.Table, taxonomy: Taxonomy) -> dict[str, np.ndarray]:
    """Per attribute, which of ``products``' labels the generator flipped."""
    noisy = aligned_truth(products, truth)["noisy_attributes"].to_pylist()
    return {a.name: np.array([a.name in flips for flips in noisy], bool) for a in taxonomy}


def _train(
    table: pa.Table, taxonomy: Taxonomy, cfg: AppConfig, label: str, say: Say, device: str
) -> TrainedModel:
    say(f"== {label} ==")
    return train(table, taxonomy, cfg, device=device, progress=lambda m: say("  " + m))


def run_noise_study(
    cfg: AppConfig, taxonomy: Taxonomy, *, workdir: Path, device: str = "cpu", progress: Say | None = None
) -> dict[str, Any]:
    """See the module docstring; ``cfg.synthetic.label_noise`` is the share of flipped labels."""
    say = progress or (lambda msg: print(msg, flush=True))
    train_cfg = cfg.synthetic.model_copy(update={"bad_rate": 0.0})  # labels are the subject here
    market = generate_marketplace(workdir / "marketplace", train_cfg, taxonomy=taxonomy)
    eval_cfg = train_cfg.model_copy(
        update={"seed": cfg.synthetic.seed + EVAL_SEED_OFFSET, "label_noise": 0.0}
    )
    held_out = generate_marketplace(workdir / "held-out", eval_cfg, taxonomy=taxonomy)
    noisy, truth = read_table(market.products), read_table(market.truth)
    clean = clean_labels(noisy, truth, taxonomy)
    eval_products, eval_truth = read_table(held_out.products), read_table(held_out.truth)

    def pruned(enabled: bool) -> AppConfig:
        switch = cfg.training.noise_pruning.model_copy(update={"enabled": enabled})
        return cfg.model_copy(update={"training": cfg.training.model_copy(update={"noise_pruning": switch})})

    plain, pruning = pruned(False), pruned(True)
    result: dict[str, Any] = {
        "study": "noise",
        "products": noisy.num_rows,
        "held_out_products": eval_products.num_rows,
        "label_noise": cfg.synthetic.label_noise,
        "seed": cfg.synthetic.seed,
        "fusion": cfg.model.fusion,
        "noise_pruning": cfg.training.noise_pruning.model_dump(),
        "r_at_p95": {},
        "seconds": {},
    }
    trained: dict[str, TrainedModel] = {}
    for label, table, run_cfg in (
        ("clean", clean, plain),
        ("noisy", noisy, plain),
        ("noisy+pruned", noisy, pruning),
    ):
        started = time.perf_counter()
        trained[label] = _train(table, taxonomy, run_cfg, label, say, device)
        result["seconds"][label] = round(time.perf_counter() - started, 1)
        result["r_at_p95"][label] = r_at_p95_on(trained[label], eval_products, eval_truth, taxonomy)
        say(f"  held-out R@P95: {result['r_at_p95'][label]}")
    r = result["r_at_p95"]
    result["lost"] = {a.name: r["clean"][a.name] - r["noisy"][a.name] for a in taxonomy}
    result["recovered"] = {a.name: r["noisy+pruned"][a.name] - r["noisy"][a.name] for a in taxonomy}
    result["recovered_share"] = {
        a: (result["recovered"][a] / lost if lost > 0 else None) for a, lost in result["lost"].items()
    }
    result["removed"] = _pruned_against_flips(trained["noisy+pruned"], noisy, truth, taxonomy)
    result["checks"] = {
        "pruning_recovers_half_of_the_loss_everywhere": all(
            share is not None and share >= 0.5 for share in result["recovered_share"].values()
        ),
    }
    return result


def _pruned_against_flips(
    pruned: TrainedModel, noisy: pa.Table, truth: pa.Table, taxonomy: Taxonomy
) -> dict[str, dict[str, Any]]:
    """Per attribute: the labels pruning left out, how many of them were flipped, and the share of
    the training split's flips it found."""
    removed = pruned.label_issues
    assert removed is not None
    flipped = _flipped(noisy, truth, taxonomy)
    row = {pid: i for i, pid in enumerate(noisy["product_id"].to_pylist())}
    train_rows = {row[pruned.product_ids[i]] for i in pruned.splits.train}
    out = {}
    for a in taxonomy:
        hits = [
            bool(flipped[a.name][row[p]]) for p in removed.loc[removed["attribute"] == a.name, "product_id"]
        ]
        flips_in_training = int(sum(flipped[a.name][i] for i in train_rows))
        out[a.name] = {
            "removed": len(hits),
            "flipped": int(sum(hits)),
            "precision": float(np.mean(hits)) if hits else None,
            "flips_in_training_split": flips_in_training,
            "recall": sum(hits) / flips_in_training if flips_in_training else None,
        }
    return out


def run_ensemble_study(
    cfg: AppConfig, taxonomy: Taxonomy, *, workdir: Path, device: str = "cpu", progress: Say | None = None
) -> dict[str, Any]:
    """See the module docstring; ``cfg.model.ensemble`` describes the ensemble."""
    say = progress or (lambda msg: print(msg, flush=True))
    market = generate_marketplace(workdir / "marketplace", cfg.synthetic, taxonomy=taxonomy)
    started = time.perf_counter()
    trained = _train(read_table(market.products), taxonomy, cfg, "ensemble", say, device)
    report = trained.test_report
    members = report.members
    ensemble = {a.name: report[a.name]["r_at_p95"] for a in taxonomy}
    best = {a.name: max(m[a.name] for m in members.values()) for a in taxonomy}
    return {
        "study": "ensemble",
        "products": cfg.synthetic.products,
        "seed": cfg.synthetic.seed,
        "ensemble": cfg.model.ensemble.model_dump(),
        "fusion": cfg.model.fusion,
        "seconds": round(time.perf_counter() - started, 1),
        "r_at_p95": {"ensemble": ensemble, **members},
        "best_member": best,
        "checks": {"ensemble_ge_best_member_everywhere": all(ensemble[a] >= best[a] for a in ensemble)},
    }


def _pretrain(
    table: pa.Table, cfg: AppConfig, method: str, workdir: Path, epochs: int, device: str, say: Say
) -> Any:
    from catalog_enrichment.training.pretrain import PretrainOptions, pretrain_text

    say(f"== pretrain-text --method {method} ==")
    out = workdir / f"text-{method}"
    indented = lambda m: say("  " + m)  # noqa: E731
    options = PretrainOptions(method, epochs)  # type: ignore[arg-type]
    return pretrain_text(table, cfg, options, out=out, device=device, progress=indented)


def run_pretrain_study(
    cfg: AppConfig,
    taxonomy: Taxonomy,
    *,
    workdir: Path,
    label_fraction: float,
    pretrain_epochs: int,
    device: str = "cpu",
    progress: Say | None = None,
) -> dict[str, Any]:
    """See the module docstring: pre-training reads every product of the marketplace (no labels);
    fine-tuning uses ``label_fraction`` of the training split; all three on the same test split."""
    say = progress or (lambda msg: print(msg, flush=True))
    market = generate_marketplace(workdir / "marketplace", cfg.synthetic, taxonomy=taxonomy)
    table = read_table(market.products)
    result: dict[str, Any] = {
        "study": "pretrain-text",
        "products": table.num_rows,
        "seed": cfg.synthetic.seed,
        "label_fraction": label_fraction,
        "pretrain_epochs": pretrain_epochs,
        "pretraining": {},
        "r_at_p95": {},
        "seconds": {},
    }
    # every arm's encoder weights train at the rate of the base encoder (an adapted folder would
    # otherwise get the rate meant for pretrained weights, however they began)
    base_lr = PRETRAINED_ENCODER_LR if cfg.model.text.pretrained_path else cfg.training.learning_rate
    lr = cfg.training.encoder_learning_rate or base_lr
    finetune = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"fusion": "text_only"}),
            "training": cfg.training.model_copy(
                update={"train_fraction": label_fraction, "encoder_learning_rate": lr}
            ),
        }
    )
    folders: dict[str, str | None] = {"plain": None}
    for method in ("simcse", "convirt"):
        done = _pretrain(table, cfg, method, workdir, pretrain_epochs, device, say)
        result["pretraining"][method] = {"seconds": done.seconds, "losses": done.losses}
        folders[method] = done.path
    for label, folder in folders.items():
        text = finetune.model.text.model_copy(update={"pretrained_path": folder})
        run_cfg = finetune.model_copy(update={"model": finetune.model.model_copy(update={"text": text})})
        started = time.perf_counter()
        trained = _train(table, taxonomy, run_cfg, f"text_only from {label}", say, device)
        result["seconds"][label] = round(time.perf_counter() - started, 1)
        result["r_at_p95"][label] = {a.name: trained.test_report[a.name]["r_at_p95"] for a in taxonomy}
    r = result["r_at_p95"]
    result["checks"] = {"convirt_beats_plain_on_color": r["convirt"]["color"] > r["plain"]["color"]}
    return result


def format_study_markdown(result: dict[str, Any]) -> str:
    """A study's R@P95 table (rows: arms; columns: attributes) and its checks."""
    arms = result["r_at_p95"]
    attrs = list(next(iter(arms.values())))
    lines = [
        f"Study: {result['study']}, {result['products']:,} products, seed {result['seed']}.",
        "",
        "| R@P95 | " + " | ".join(attrs) + " |",
        "|---|" + "---|" * len(attrs),
    ]
    lines += [f"| {arm} | " + " | ".join(f"{v[a]:.3f}" for a in attrs) + " |" for arm, v in arms.items()]
    if "recovered_share" in result:
        lines += [
            "",
            "| attribute | lost to noise | won back | share | removed | of them flipped | recall of flips |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in attrs:
            rem = result["removed"][a]
            cells = [result["lost"][a], result["recovered"][a], result["recovered_share"][a]]
            cells += [rem["removed"], rem["precision"], rem["recall"]]
            lines.append(f"| {a} | " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "Checks:", ""] + [f"- {k}: {v}" for k, v in result["checks"].items()]
    return "\n".join(lines) + "\n"


def _cell(x: float | int | None) -> str:
    return "—" if x is None else str(x) if isinstance(x, int) else f"{x:.3f}"
