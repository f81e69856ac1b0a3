"""The review commands end to end on a catalog with known truth: sample -> verdicts -> import ->
``report --audit --check``, whose exit code drives the one-line rollback."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

from catalog_enrichment.cli import main
from tests.conftest import mlflow_store
from tests.review.conftest import register_versions, written_catalog


@pytest.mark.parametrize(("judge", "code"), [("truth", 4), ("all right", 0), ("all wrong", 4)])
def test_a_failing_audit_exits_1_and_names_the_rollback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], judge: str, code: int
) -> None:
    """The catalog's colour and pattern values are about 92 % right: below target, judged truly."""
    written = written_catalog(tmp_path / "lake")
    uri = mlflow_store(tmp_path / "m.db")
    flags = ["--catalog", str(tmp_path / "lake"), "--set", f"mlflow.tracking_uri={uri}"]
    flags += ["--set", f"mlflow.artifact_location={tmp_path / 'art'}"]
    register_versions(uri, tmp_path / "art", upto=3)
    out = tmp_path / "s" / "sample.csv"
    assert main(["review", "sample", "--model-version", "3", "--size", "200", "--out", str(out), *flags]) == 0
    sample = pcsv.read_csv(out, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
    keys = zip(*(sample[c].to_pylist() for c in ("product_id", "attribute", "value")), strict=True)
    verdicts = [
        {"truth": "yes" if written.truth[k] else "no", "all right": "yes", "all wrong": "no"}[judge]
        for k in keys
    ]
    for name, column in (("verdict", verdicts), ("reviewer", ["qa"] * len(verdicts))):
        sample = sample.set_column(sample.schema.get_field_index(name), name, pa.array(column))
    pcsv.write_csv(sample, tmp_path / "v.csv")
    capsys.readouterr()
    assert main(["report", "--audit", "--check", *flags]) == 2  # no verdict yet: an error, never 4
    assert "no verdict yet" in capsys.readouterr().err
    assert main(["review", "import", str(tmp_path / "v.csv"), *flags]) == 0
    capsys.readouterr()
    assert main(["report", "--audit", "--check", *flags]) == code
    sample_id = sample["sample_id"][0].as_py()
    other = ["report", "--audit", "--check", "--model-version", "2", "--sample", sample_id, *flags]
    judged = "judged catalog-enrichment v3, not catalog-enrichment v2"
    assert main(other) == 2 and judged in capsys.readouterr().err
    assert main(["report", "--audit", "--check", *flags]) == code
    printed = capsys.readouterr().out
    assert ("rollback --model-version 3" in printed) is (code == 4)
    if judge == "truth":  # every interval holds the true precision of what was written
        for attr in ("color", "pattern"):
            line = next(ln for ln in printed.splitlines() if ln.startswith(attr))
            low, high = (float(x) for x in line.split("[")[1].split("]")[0].split(","))
            assert low <= written.true_precision(attr) <= high
    assert (tmp_path / "lake" / "audits").is_dir()


def test_an_audit_judges_a_version_by_the_target_it_was_calibrated_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    written_catalog(tmp_path / "lake")
    uri = mlflow_store(tmp_path / "m.db")
    flags = ["--catalog", str(tmp_path / "lake"), "--set", f"mlflow.tracking_uri={uri}"]
    flags += ["--set", f"mlflow.artifact_location={tmp_path / 'art'}"]
    register_versions(uri, tmp_path / "art", upto=3, target=0.9)
    out = tmp_path / "s" / "sample.csv"
    assert main(["review", "sample", "--model-version", "3", "--size", "50", "--out", str(out), *flags]) == 0
    sample = pcsv.read_csv(out, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
    for name, value in (("verdict", "yes"), ("reviewer", "qa")):
        sample = sample.set_column(sample.schema.get_field_index(name), name, pa.array([value] * len(sample)))
    pcsv.write_csv(sample, tmp_path / "v.csv")
    assert main(["review", "import", str(tmp_path / "v.csv"), *flags]) == 0
    capsys.readouterr()
    # the config's default target (0.95) is not the one version 3 was calibrated for: one line, both values
    assert main(["report", "--audit", *flags]) == 2
    assert (
        "target_precision is 0.95 but catalog-enrichment v3 was calibrated for 0.9" in capsys.readouterr().err
    )
    agree = [*flags, "--set", "calibration.target_precision=0.9"]
    assert main(["report", "--audit", "--json", *agree]) == 0
    assert '"target": 0.9' in capsys.readouterr().out
    # the same audit again changes nothing: no second MLflow run, the version's tags as they were
    from catalog_enrichment import registry

    client = registry.configure_mlflow(uri)
    experiment = client.get_experiment_by_name("enrichment").experiment_id
    tags = client.get_model_version("catalog-enrichment", "3").tags
    assert main(["report", "--audit", *agree]) == 0
    assert len(client.search_runs([experiment])) == 1
    assert client.get_model_version("catalog-enrichment", "3").tags == tags


def test_a_run_that_wrote_nothing_has_nothing_to_review_and_an_unknown_run_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The nightly DAG samples every night: a quiet night (nothing changed, nothing written) exits 0;
    a run id the catalog never ran stays an error."""
    import datetime as dt

    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.catalog.reports import RunReport
    from catalog_enrichment.config import CatalogConfig

    written_catalog(tmp_path / "lake")
    catalog = open_catalog(CatalogConfig(root=str(tmp_path / "lake")))
    catalog.upsert_report(RunReport(run_id="quiet", status="succeeded", started_at=dt.datetime.now(dt.UTC)))
    flags = ["--catalog", str(tmp_path / "lake"), "--out", str(tmp_path / "s.csv")]
    assert main(["review", "sample", "--run-id", "quiet", *flags]) == 0
    assert "run quiet wrote no value: nothing to review" in capsys.readouterr().out
    assert main(["review", "sample", "--run-id", "never-ran", *flags]) == 2
    assert "holds no value written by run never-ran" in capsys.readouterr().err
