"""The training job: labelled table -> trained, calibrated, evaluated, registered ``challenger``.

Checks everything that can be wrong with the input (columns, label values, the tracking server and
its experiment) *before* any model is fitted, so a bad run registers nothing and moves no alias.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch

from catalog_enrichment.catalog import open_catalog
from catalog_enrichment.catalog.lakehouse import data_files, table_format, table_version
from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import Taxonomy, check_attribute_names, mlflow_name
from catalog_enrichment.errors import ContractError
from catalog_enrichment.inference.bundle import BundleFolder, save_bundle
from catalog_enrichment.inference.predictor import BatchPredictor
from catalog_enrichment.training.pipeline import train
from catalog_enrichment.training.plots import plot_precision_recall, plot_reliability
from catalog_enrichment.training.stream import table_source
from catalog_enrichment.training.trained import TrainedModel
from catalog_enrichment.types import Say
from catalog_enrichment.versions import ModelVersion

# the MLflow table (artifact) of the labels noise pruning left out of training
PRUNED_TABLE = "noise_pruning/removed.json"

__all__ = [
    "PRUNED_TABLE",
    "DataSnapshot",
    "TrainingOutcome",
    "data_snapshot",
    "run_training_job",
]


@dataclass(frozen=True)
class DataSnapshot:
    """Which data a model was trained on: table path + Delta version, or a hash of the Parquet files."""

    path: str
    format: str
    version: int | None
    content_hash: str | None

    def tags(self, prefix: str = "data") -> dict[str, str]:
        return {
            f"{prefix}.path": self.path,
            f"{prefix}.format": self.format,
            f"{prefix}.version": "" if self.version is None else str(self.version),
            f"{prefix}.sha256": self.content_hash or "",
        }


def data_snapshot(path: str | Path) -> DataSnapshot:
    fmt = table_format(path)
    if fmt == "delta":
        return DataSnapshot(str(Path(path).resolve()), fmt, table_version(path), None)
    digest = hashlib.sha256()
    for file in data_files(path):
        digest.update(Path(file).name.encode())
        with open(file, "rb") as f:  # in chunks: a data file can be larger than memory
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return DataSnapshot(str(Path(path).resolve()), fmt, None, digest.hexdigest())


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_training_columns(names: Sequence[str], taxonomy: Taxonomy) -> None:
    """The columns training reads are there (ids, partitions and merchant values are optional), and
    no attribute is named like another column of the table (:func:`check_attribute_names`)."""
    check_attribute_names(taxonomy)
    missing = [c for c in ("title", "description", *taxonomy.names) if c not in names]
    if missing:
        raise ContractError(f"the labelled table lacks columns {missing} (contract labelled_products)")
    if "image" not in names and "image_uri" not in names:
        raise ContractError("the labelled table has neither an image nor an image_uri column")


@dataclass(frozen=True)
class TrainingOutcome:
    trained: TrainedModel
    registered: ModelVersion
    snapshot: DataSnapshot


def _example_frame(table: Any, n: int = 2) -> pd.DataFrame:
    """The logged input example: ``n`` products with an image where the data has them.

    MLflow sends a binary column base64-encoded through its serving JSON and cannot encode a null
    there ("encoding without a string argument"), so an example with an imageless product would
    not validate, and ``mlflow models predict`` / serving would reject it.
    """
    import pyarrow.compute as pc

    cols = [c for c in ("product_id", "title", "description", "category", "image") if c in table.column_names]
    if "image" in cols and pc.any(pc.is_valid(table["image"])).as_py():
        table = table.filter(pc.is_valid(table["image"]))
    frame = table.select(cols).slice(0, n).to_pandas()
    for text in ("description", "category"):  # the n-grams read the category too
        frame[text] = frame.get(text, pd.Series([""] * len(frame))).fillna("")
    return frame


def run_training_job(
    cfg: AppConfig,
    taxonomy: Taxonomy,
    *,
    data: str | Path,
    client: Any,
    device: str = "cpu",
    progress: Say = print,
) -> TrainingOutcome:
    """Train on ``data`` and register a ``challenger`` version (see the module docstring)."""
    from catalog_enrichment import registry

    registry.check_tracking_server(client)
    registry.check_experiment(client, cfg.mlflow.experiment)
    snapshot = data_snapshot(data)
    source = table_source(
        snapshot.path, version=snapshot.version, batch_rows=cfg.training.streaming.batch_rows
    )
    check_training_columns(source.names, taxonomy)
    streamed = cfg.training.streaming.enabled
    progress(
        f"training on {source.rows:,} products {'streamed ' if streamed else ''}from {_described(snapshot)}"
    )
    # frozen encoders read and fill the catalog's embedding store, as the enrichment job does (in
    # memory: a stream is read once per epoch and caches nothing)
    store = open_catalog(cfg.catalog) if cfg.inference.embedding_store and not streamed else None
    trained = train(source, taxonomy, cfg, device=device, progress=progress, store=store)
    example = _example_frame(pa.Table.from_batches([next(source.batches())]))
    trained.model.to("cpu")
    registered = _register(client, cfg, taxonomy, trained, example, snapshot)
    progress(
        f"registered {registered.name} version {registered.version} (alias '{registry.CHALLENGER}'), "
        f"run {registered.run_id}"
    )
    return TrainingOutcome(trained, registered, snapshot)


def _described(snapshot: DataSnapshot) -> str:
    return f"{snapshot.path} ({snapshot.format}{'' if snapshot.version is None else f' v{snapshot.version}'})"


def _register(
    client: Any,
    cfg: AppConfig,
    taxonomy: Taxonomy,
    trained: TrainedModel,
    example: pd.DataFrame,
    snapshot: DataSnapshot,
) -> ModelVersion:
    """The trained model as a bundle, logged with its metrics, plots and tables in one MLflow run
    and registered as a new version (alias ``challenger``)."""
    from catalog_enrichment import registry

    summary, version_tags = _summary_metrics(trained, taxonomy)
    version_tags.update({"data.path": snapshot.path, **snapshot.tags(), "git.commit": git_commit()})
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        bundle_dir = save_bundle(tmpdir / "bundle", trained.bundle())
        record = registry.TrainingRecord(
            params=cfg.to_flat_dict(),
            tags={
                **snapshot.tags(),
                "git.commit": git_commit(),
                "splits": str(trained.splits.sizes()),
                "best_epoch": str(trained.best_epoch),
            },
            epoch_metrics=_epoch_metrics(trained),
            summary_metrics=summary,
            artifacts={
                "plots": _plots(trained, taxonomy, tmpdir / "plots"),
                "tables": _tables(trained, taxonomy, BundleFolder(bundle_dir), tmpdir / "tables"),
            },
            tables={} if trained.label_issues is None else {PRUNED_TABLE: trained.label_issues},
        )
        example = (example, _score_example(trained, example))
        return registry.log_and_register(client, cfg.mlflow, bundle_dir, record, example, version_tags)


_SUMMARY_KEYS = ("r_at_p95", "macro_f1", "realized_precision", "coverage", "coverage_efficiency")


def _summary_metrics(trained: TrainedModel, taxonomy: Taxonomy) -> tuple[dict[str, float], dict[str, str]]:
    """The run's summary metrics (test and calibration of every attribute written, derived ones too;
    noise pruning, cross-fit, ensemble members) and the version's tags (the test figures, the fusion,
    the ensemble)."""
    report, model_cfg = trained.test_report, trained.config.model
    summary: dict[str, float] = {}
    tags: dict[str, str] = {"fusion": model_cfg.fusion}
    for attr in taxonomy.outputs:
        name = mlflow_name(attr.name)
        for key in _SUMMARY_KEYS:
            value = report[attr.name].get(key)
            summary[f"test.{name}.{key}"] = float("nan") if value is None else float(value)
            tags[f"eval.{name}.{key}"] = "nan" if value is None else f"{float(value):.4f}"
        pooled = trained.calibration.attributes[attr.name].pooled
        if pooled is not None:  # attribute scope: what the calibration split proved
            summary[f"calibration.{name}.written"] = float(pooled.n_written)
            bound = pooled.lower_bound
            summary[f"calibration.{name}.lower_bound"] = float("nan") if bound is None else bound
    if trained.label_issues is not None:
        removed = trained.label_issues.groupby("attribute").size()
        for attr in taxonomy:
            summary[f"noise_pruning.{mlflow_name(attr.name)}.removed"] = float(removed.get(attr.name, 0))
    for attr_name, gap in report.crossfit.items():
        summary.update(
            {f"crossfit.{mlflow_name(attr_name)}.{key}": float(value) for key, value in gap.items()}
        )
    for member, per_attribute in report.members.items():
        name = member.replace(":", "_")
        summary.update(
            {f"test.member_{name}.{mlflow_name(a)}.r_at_p95": float(r) for a, r in per_attribute.items()}
        )
    ensemble = model_cfg.ensemble
    if ensemble.members > 1:
        fusions = "/".join(ensemble.fusions or [model_cfg.fusion])
        tags["ensemble"] = f"{ensemble.members} x {fusions}, {ensemble.combine}"
    return summary, tags


def _epoch_metrics(trained: TrainedModel) -> list[dict[str, float]]:
    return [
        {
            "train_loss": h.train_loss,
            "val_mean_r_at_p95": h.val_mean_r_at_p95,
            "learning_rate": h.learning_rate,
            **{f"val_r_at_p95.{mlflow_name(a)}": r for a, r in h.val_r_at_p95.items()},
        }
        for h in trained.history
    ]


def _plots(trained: TrainedModel, taxonomy: Taxonomy, folder: Path) -> Path:
    """Per attribute written (derived ones too), the test split's precision-recall curves and
    reliability diagram, in files named by :func:`mlflow_name`."""
    folder.mkdir()
    scores, labelled = taxonomy.derive(trained.test_predictions.probs), trained.test_labels.derive(taxonomy)
    for attr in taxonomy.outputs:
        probs, labels = labelled.labelled(scores, attr.name)
        calibration = trained.calibration.attributes[attr.name]
        target = trained.config.calibration.target_precision
        name = mlflow_name(attr.name)
        plot_precision_recall(probs, labels, calibration, folder / f"pr_{name}.png", target=target)
        plot_reliability(probs, labels, attr.kind, attr.name, folder / f"reliability_{name}.png")
    return folder


def _tables(trained: TrainedModel, taxonomy: Taxonomy, bundle: BundleFolder, folder: Path) -> Path:
    """Per value metrics (calibration and test) of every attribute written (derived ones too) as
    CSV, and the bundle's calibration and evaluation."""
    folder.mkdir()
    report = trained.test_report
    per_value = [
        {
            "attribute": a.name,
            "value": v.value,
            "threshold": v.threshold,
            "calibration_support": v.support,
            "calibration_lower_bound": v.lower_bound,
            "calibration_upper_bound": v.upper_bound,
            "calibration_reason": v.reason,
            "calibration_precision": v.precision,
            "test_r_at_p95": report[a.name]["r_at_p95_per_value"][v.value],
            **{f"test_{k}": x for k, x in report[a.name]["per_value"][v.value].items()},
        }
        for a in taxonomy.outputs
        for v in trained.calibration.attributes[a.name].values
    ]
    pd.DataFrame(per_value).to_csv(folder / "per_value_metrics.csv", index=False)
    for document in (bundle.calibration, bundle.evaluation):
        shutil.copyfile(document, folder / document.name)
    return folder


def _score_example(trained: TrainedModel, frame: pd.DataFrame) -> pd.DataFrame:
    """Scores of ``frame`` by the freshly trained model (the signature's output example)."""
    with torch.inference_mode():
        return BatchPredictor(trained.bundle()).score_frame(frame)
