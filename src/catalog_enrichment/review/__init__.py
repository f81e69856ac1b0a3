"""Human review of what the job wrote (paper 004 §6.4), three steps:

1. ``review sample``: a stratified sample of the written values of a run or a model version, recorded
   in the catalog (``review_samples``) and written for annotators: a CSV/Parquet file, an image per
   row and a review page (:mod:`.sample`, :mod:`.page`);
2. ``review import FILE``: people's verdicts, checked whole, into the ``reviews`` table
   (:mod:`catalog_enrichment.catalog.reviews`);
3. ``report --audit``: the realized precision per attribute and category, weighted back to the
   written values, with Wilson intervals; a chart and the figures logged to MLflow (:mod:`.audit`).

The verdicts then feed the next model (``labels``: "yes" = a label, "no" = a negative for that value)
and the enrichment runs (a value people rejected is never written again by the version that wrote it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog_enrichment.config import AppConfig, MLflowConfig
from catalog_enrichment.review.audit import Audit, audit_sample, plot_audit
from catalog_enrichment.review.page import write_page
from catalog_enrichment.review.sample import (
    DrawnSample,
    draw_sample,
    sample_file_format,
    write_annotator_files,
)

if TYPE_CHECKING:
    from catalog_enrichment.catalog.base import Catalog

__all__ = ["SampleFiles", "audit_catalog", "record_audit", "sample_for_review"]


@dataclass(frozen=True)
class SampleFiles:
    sample: DrawnSample
    file: Path
    page: Path
    without_image: int


def sample_for_review(
    cfg: AppConfig,
    catalog: Catalog,
    *,
    run_id: str | None,
    model_version: str | None,
    size: int | None,
    seed: int | None,
    out: Path | None,
) -> SampleFiles:
    """Draw a sample, record it in the catalog, write the annotator file, images and page."""
    from catalog_enrichment.data.images import ImagePolicy

    size = cfg.review.sample_size if size is None else size
    seed = cfg.review.seed if seed is None else seed
    if out is not None:
        sample_file_format(out)  # before anything is drawn and recorded
    sample = draw_sample(
        catalog,
        run_id=run_id,
        model_version=model_version,
        model_name=cfg.mlflow.registered_model,
        size=size,
        seed=seed,
        balance=cfg.review.balance,
    )
    file = out or Path(f"{sample.sample_id}/{sample.sample_id}.csv")
    policy = ImagePolicy.from_config(cfg.images, catalog.image_roots())
    table, without_image = write_annotator_files(catalog, sample, file, policy)
    page = write_page(table, file.with_suffix(".html"), sample.sample_id)
    return SampleFiles(sample, file, page, without_image)


def audit_catalog(
    cfg: AppConfig, catalog: Catalog, client: Any, *, model_version: str | None, sample_id: str | None
) -> Audit:
    """Audit the latest reviewed sample of ``model_version`` (mlflow.registered_model's; or
    ``sample_id``) in ``catalog`` against the target the version was calibrated for (``client``:
    where the version is registered)."""
    from catalog_enrichment import registry
    from catalog_enrichment.calibration import version_target

    def target_of(name: str, version: str) -> float:
        calibrated = registry.calibrated_target(client, name, version)
        return version_target(cfg.calibration.target_precision, calibrated, f"{name} v{version}")

    return audit_sample(
        catalog.keyed_rows("review_samples"),
        catalog.keyed_rows("reviews"),
        model_version=model_version,
        model_name=cfg.mlflow.registered_model,
        sample_id=sample_id,
        target_of=target_of,
        confidence=cfg.review.confidence,
        min_support=cfg.review.min_category_support,
    )


def record_audit(mlflow_cfg: MLflowConfig, audit: Audit, *, client: Any, chart_dir: Path) -> Path:
    """Draw the audit's chart into ``chart_dir``; with a client, log the figures, the audit and the
    chart to MLflow and tag the model version. Returns the chart."""
    chart_dir.mkdir(parents=True, exist_ok=True)
    chart = plot_audit(audit, chart_dir / f"{audit.sample_id}.png")
    if client is not None:
        from catalog_enrichment import registry

        metrics = {
            f"{attr}.{k}": float(v)
            for attr, e in audit.attributes.items()
            for k, v in (
                ("precision", e.precision),
                ("lower", e.lower),
                ("upper", e.upper),
                ("judged", e.judged),
            )
            if v is not None
        }
        registry.log_audit_run(
            client,
            experiment=mlflow_cfg.enrichment_experiment,
            artifact_location=mlflow_cfg.artifact_location,
            audit=audit.to_dict(),
            metrics=metrics,
            chart=chart,
        )
    return chart
