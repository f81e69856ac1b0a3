"""A catalog that holds written values whose truth is known, without Spark or a model: products
(text, category, a small PNG each) and model rows of one version, some of them wrong."""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from catalog_enrichment.catalog.attributes import attributes_schema
from catalog_enrichment.catalog.embedded import LakehouseCatalog
from catalog_enrichment.catalog.lakehouse import write_table
from catalog_enrichment.config import CatalogConfig

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
COLORS = ["black", "white", "red", "blue", "green"]
PATTERNS = ["solid", "striped", "dotted"]
CATEGORIES = ["Tops", "Shoes", "Bags", None]


@dataclass
class WrittenCatalog:
    catalog: LakehouseCatalog
    truth: dict[tuple[str, str, str], bool]  # (product, attribute, value) -> right

    def true_precision(self, attribute: str) -> float:
        right = [ok for (_, a, _), ok in self.truth.items() if a == attribute]
        return float(np.mean(right))


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 255, 40, 90)).save(out, format="PNG")
    return out.getvalue()


def written_catalog(
    root: Path,
    *,
    products: int = 600,
    seed: int = 0,
    version: str = "3",
    ids: list[str] | None = None,
    titles: list[str] | None = None,
    families: dict[str, str] | None = None,
) -> WrittenCatalog:
    """``products`` products (``ids``, ``titles`` when given: their length is the count); colour
    and pattern values written by model version ``version`` with
    skewed value and category frequencies and a precision that differs by value (rare values are
    worse), so an unweighted sample mean is off and the weighting matters.

    ``families`` (shade -> family) adds the derived attribute ``color_family`` as the job writes it:
    the family of every written shade (right when the shade is, and for half the wrong shades: a
    wrong shade of the right family), and a family alone for a third of the products without a
    shade, right 96 % of the time."""
    rng = np.random.default_rng(seed)
    products = len(ids) if ids is not None else products
    ids = ids or [f"p{i:05d}" for i in range(products)]
    category = rng.choice(len(CATEGORIES), size=products, p=[0.55, 0.25, 0.12, 0.08])
    write_table(
        root / "products",
        pa.table(
            {
                "product_id": ids,
                "title": titles or [f"product {i}" for i in range(products)],
                "description": [f"<b>description</b> of {i}" for i in range(products)],
                "image": [png(i) for i in range(products)],
                "image_uri": pa.array([None] * products, pa.string()),
                "category": [CATEGORIES[c] for c in category],
                "updated_at": pa.array([T0] * products, pa.timestamp("us", "UTC")),
            }
        ),
    )
    rows, truth = [], {}
    for attr, values, share in (
        ("color", COLORS, [0.5, 0.25, 0.15, 0.07, 0.03]),
        ("pattern", PATTERNS, [0.8, 0.15, 0.05]),
    ):
        precision = np.linspace(0.97, 0.75, len(values))  # the rarer, the worse
        for pid in ids:
            if rng.random() < 0.2:
                continue  # nothing written for this pair
            v = int(rng.choice(len(values), p=share))
            right = bool(rng.random() < precision[v])
            truth[(pid, attr, values[v])] = right
            rows.append((pid, attr, values[v], float(rng.uniform(0.6, 1.0))))
    if families is not None:
        rows += _family_rows(ids, families, truth, np.random.default_rng(seed + 1))
    n = len(rows)
    table = pa.table(
        {
            "product_id": [r[0] for r in rows],
            "attribute": [r[1] for r in rows],
            "value": [r[2] for r in rows],
            "confidence": [r[3] for r in rows],
            "threshold": [0.5] * n,
            "source": ["model"] * n,
            "model_name": ["catalog-enrichment"] * n,
            "model_version": [version] * n,
            "run_id": ["enrich-1"] * n,
            "written_at": [T0] * n,
        },
        schema=attributes_schema(),
    )
    write_table(root / "attributes", table)
    return WrittenCatalog(LakehouseCatalog(CatalogConfig(root=str(root))), truth)


def _family_rows(
    ids: list[str],
    families: dict[str, str],
    truth: dict[tuple[str, str, str], bool],
    rng: np.random.Generator,
) -> list[tuple[str, str, str, float]]:
    shade = {pid: (value, right) for (pid, attr, value), right in truth.items() if attr == "color"}
    rows = []
    for pid in ids:
        if pid in shade:
            value, right = shade[pid]
            family, family_right = families[value], right or bool(rng.random() < 0.5)
        elif rng.random() < 1 / 3:
            family, family_right = str(rng.choice(sorted(set(families.values())))), bool(rng.random() < 0.96)
        else:
            continue
        truth[(pid, "color_family", family)] = family_right
        rows.append((pid, "color_family", family, float(rng.uniform(0.6, 1.0))))
    return rows


@pytest.fixture
def written(tmp_path: Path) -> WrittenCatalog:
    return written_catalog(tmp_path / "lakehouse")


def register_versions(
    tracking_uri: str, artifacts: Path, *, upto: int, target: float = 0.95, name: str = "catalog-enrichment"
) -> None:
    """Versions 1..``upto`` of model ``name`` in a real MLflow store, each with the calibration
    table of a run calibrated for ``target`` (the audit reads a version's target from there)."""
    import json

    from catalog_enrichment import registry

    client = registry.configure_mlflow(tracking_uri)
    experiment = client.create_experiment("training", artifact_location=artifacts.as_uri())
    client.create_registered_model(name)
    for _ in range(upto):
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, json.dumps({"target_precision": target}), "tables/calibration.json")
        client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
