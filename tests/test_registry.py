"""MLflow lifecycle: pyfunc round trip in a fresh process, train -> register -> promote gate against a
real ``mlflow server``, and clear errors before any partial registration."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from catalog_enrichment import registry
from catalog_enrichment.catalog.lakehouse import read_table, write_table
from catalog_enrichment.config import AppConfig, SyntheticConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import encode_labels
from catalog_enrichment.data.synthetic import generate_marketplace
from catalog_enrichment.errors import (
    CatalogEnrichError,
    ConfigError,
    ContractError,
    DecoderMismatch,
    TaxonomyError,
    UnservableBundle,
)
from catalog_enrichment.inference.predictor import BatchPredictor
from catalog_enrichment.promotion import (
    PROMOTING_TAG,
    CoverageChange,
    Evaluation,
    EvaluationSet,
    GateRule,
    compare_coverage,
    gate,
    promote,
    read_promotion_log,
)
from catalog_enrichment.training.job import PRUNED_TABLE, run_training_job
from tests.conftest import free_port, mlflow_store, register_bundle, save_trained, tiny_config, tiny_registry

pytestmark = [pytest.mark.slow]


def _cfg(
    tmp: Path, tracking_uri: str, *, fusion: str = "concat", epochs: int = 3, **sections: Any
) -> AppConfig:
    training = {"early_stopping_patience": 0, "calibration_fraction": 0.3, "test_fraction": 0.1}
    return tiny_config(
        fusion=fusion,
        epochs=epochs,
        model=sections.pop("model", {}),
        mlflow={
            "tracking_uri": tracking_uri,
            "artifact_location": str(tmp / "mlartifacts"),
            "registered_model": "test-model",
        },
        catalog={"root": str(tmp / "lakehouse")},
        # where object-store keys go: a secret no MLflow param or tag may show
        spark={"conf": {"spark.hadoop.fs.s3a.secret.key": SECRET}},
        # a large calibration split: a value needs >= 52 straight hits there to prove 95 %
        training={**training, **sections.pop("training", {})},
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, taxonomy: Taxonomy) -> dict[str, Path]:
    # One marketplace split into a training table and a frozen evaluation set (disjoint products
    # drawn alike: the exchangeability the calibration's guarantee assumes).
    root = tmp_path_factory.mktemp("registry-data")
    market = generate_marketplace(
        root / "market", SyntheticConfig(products=3500, seed=11, image_size=32), taxonomy=taxonomy
    )
    table = read_table(market.products).sort_by("product_id")
    write_table(root / "train", table.slice(0, 2000))
    write_table(root / "eval", table.slice(2000))
    return {"train": root / "train", "eval": root / "eval"}


def _quiet(_msg: str) -> None:
    pass


@pytest.mark.timeout(900)
def test_pyfunc_reproduces_training_scores_in_a_fresh_process(
    tmp_path: Path, data, taxonomy: Taxonomy
) -> None:  # type: ignore[no-untyped-def]
    uri = mlflow_store(tmp_path / "mlflow.db")
    cfg = _cfg(tmp_path, uri, epochs=2)
    client = registry.configure_mlflow(uri)
    # the first product has no image, the second one has: the logged input example must still suit
    # MLflow's serving JSON, whose binary columns cannot carry a null
    train = read_table(data["train"])
    images = pa.array([None, *train["image"].to_pylist()[1:]], train.schema.field("image").type)
    write_table(tmp_path / "train", train.set_column(train.schema.get_field_index("image"), "image", images))
    outcome = run_training_job(cfg, taxonomy, data=tmp_path / "train", client=client, progress=_quiet)
    assert (
        registry.resolve_alias(client, "test-model", registry.CHALLENGER) == outcome.registered.version == "1"
    )

    # category is an optional input of the signature (the stack's n-grams read it): it reaches the model
    columns = ["product_id", "title", "description", "category", "image"]
    sample = read_table(data["eval"]).slice(0, 64).select(columns)
    pq_path = tmp_path / "sample.parquet"
    import pyarrow.parquet as pq

    pq.write_table(sample, pq_path)
    from catalog_enrichment.inference.bundle import ModelBundle

    trained = outcome.trained
    bundle = ModelBundle(trained.model, trained.tokenizer, taxonomy, trained.calibration, cfg.model, {})
    expected = BatchPredictor(bundle).score_frame(sample.to_pandas())

    script = (
        "import sys, json, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({uri!r}); mlflow.set_registry_uri({uri!r})\n"
        "m = mlflow.pyfunc.load_model('models:/test-model@challenger')\n"
        f"out = m.predict(pd.read_parquet({str(pq_path)!r}))\n"
        f"out.to_parquet({str(tmp_path / 'scores.parquet')!r})\n"
        "b = m.unwrap_python_model().bundle\n"
        f"open({str(tmp_path / 'cal.json')!r}, 'w').write(json.dumps(b.calibration.to_dict()))\n"
        # the logged serving example passes the check MLflow's serving runs on a request, and scores
        "import warnings; warnings.simplefilter('ignore', FutureWarning)\n"
        "from mlflow.models import validate_serving_input\n"
        "from mlflow.models.utils import load_serving_example\n"
        "uri = 'models:/test-model@challenger'\n"
        "served = validate_serving_input(uri, load_serving_example(uri))\n"
        f"served.to_json({str(tmp_path / 'served.json')!r}, orient='records')\n"
        "import catalog_enrichment; print(catalog_enrichment.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CATALOG_ENRICH_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the package the model runs is the copy it carries, not one an environment would fetch by name
    package = Path(result.stdout.strip().splitlines()[-1])
    model_dir = package.parents[2]
    assert package.parents[1].name == "code" and (model_dir / "MLmodel").is_file(), package
    assert "catalog-enrichment" not in (model_dir / "requirements.txt").read_text()
    got = pd.read_parquet(tmp_path / "scores.parquet")
    assert list(got.columns) == list(expected.columns)
    assert np.max(np.abs(got.to_numpy() - expected.to_numpy())) < 1e-5
    # the calibration the model carries is the one logged with the run
    logged = registry.download_artifact_json(client, outcome.registered.run_id, "tables/calibration.json")
    assert json.loads((tmp_path / "cal.json").read_text()) == logged == trained.calibration.to_dict()
    served = json.loads((tmp_path / "served.json").read_text())
    assert len(served) == 2 and set(served[0]) == set(expected.columns)
    # a failed training run afterwards registers nothing and leaves the aliases where they were
    broken = tmp_path / "broken"
    write_table(broken, read_table(data["train"]).drop_columns(["pattern"]))
    with pytest.raises(ContractError):
        run_training_job(cfg, taxonomy, data=broken, client=client, progress=_quiet)
    assert registry.resolve_alias(client, "test-model", registry.CHALLENGER) == "1"
    assert len(client.search_model_versions("name='test-model'")) == 1
    tags = registry.version_tags(client, "test-model", "1")
    assert tags["data.path"] == str((tmp_path / "train").resolve()) and tags["data.version"] == "0"
    assert "eval.color.r_at_p95" in tags


SECRET = "s3cr3t-never-logged"


@pytest.mark.timeout(1500)
def test_train_register_promote_load_against_a_real_mlflow_server(  # type: ignore[no-untyped-def]
    tmp_path: Path, data, taxonomy: Taxonomy, mlflow_server: str, incoming, capfd, caplog
) -> None:
    # credentials in the URI (the server ignores them): they must reach no log and no MLflow param
    mlflow_server = mlflow_server.replace("http://", f"http://ci-user:{SECRET}@")
    client = registry.configure_mlflow(mlflow_server)
    log = tmp_path / "promotion_log"

    def promote_now(configured_target: float = 0.95) -> dict:
        # The gate's own rules are tested with known answers above; here it judges tiny models
        # trained deterministically (one torch thread, a seeded table) at the real target.
        rule = GateRule(configured_target, max_coverage_loss=0.02)
        return promote(client, "test-model", EvaluationSet(data["eval"]), rule, log_path=log, progress=_quiet)

    first = run_training_job(
        _cfg(tmp_path, mlflow_server, epochs=8), taxonomy, data=data["train"], client=client, progress=_quiet
    )
    # the version owns its target: a config that says otherwise is refused, naming both values
    with pytest.raises(
        ConfigError, match=r"target_precision is 0.9 but test-model v1 was calibrated for 0.95"
    ):
        promote_now(configured_target=0.9)
    assert registry.resolve_alias(client, "test-model", registry.CHAMPION) is None
    decision = promote_now()
    assert decision["promote"] and decision["target"] == 0.95, decision["reasons"]
    assert registry.resolve_alias(client, "test-model", registry.CHAMPION) == first.registered.version
    # promote again with no new challenger (a scheduler retry): nothing is judged against itself
    again = promote_now()
    assert not again["promote"] and again["reasons"] == ["challenger is already champion: nothing to do"]
    first_tags = registry.version_tags(client, "test-model", first.registered.version)
    assert first_tags["promotion.decision"] == "promoted"
    assert read_table(log).num_rows == 1

    # a deliberately worse model: image only without the colour statistics (which read the synthetic
    # products' flat colours well enough to pass), few epochs -> registered as challenger, not
    # promoted; trained as a two-member ensemble after noise pruning (what was pruned is an MLflow table)
    worse = run_training_job(
        _cfg(
            tmp_path,
            mlflow_server,
            fusion="image_only",
            epochs=1,
            model={"ensemble": {"members": 2}, "image": {"color_features": False}},
            training={"noise_pruning": {"enabled": True}},
        ),
        taxonomy,
        data=data["train"],
        client=client,
        progress=_quiet,
    )
    assert registry.resolve_alias(client, "test-model", registry.CHALLENGER) == worse.registered.version
    decision = promote_now()
    assert not decision["promote"], decision
    assert any(r.startswith("FAIL") for r in decision["reasons"])
    assert registry.resolve_alias(client, "test-model", registry.CHAMPION) == first.registered.version
    tags = registry.version_tags(client, "test-model", worse.registered.version)
    assert tags["promotion.decision"] == "rejected" and "FAIL" in tags["promotion.reasons"]
    assert tags["ensemble"] == "2 x image_only, mean"
    removed = mlflow.load_table(PRUNED_TABLE, run_ids=[worse.registered.run_id])
    assert len(removed) == len(worse.trained.label_issues) > 0
    assert set(removed.columns) >= {"product_id", "attribute", "rank", "given", "model_top"}
    metrics = client.get_run(worse.registered.run_id).data.metrics
    assert metrics["noise_pruning.color.removed"] == (removed["attribute"] == "color").sum()
    assert "test.member_1_image_only.color.r_at_p95" in metrics

    # a challenger as good as the champion (its bundle registered again, not trained again: the gate
    # judges what a version scores, not how it was made) is promoted
    again = register_bundle(
        client, save_trained(first.trained, tmp_path / "again"), incoming, name="test-model", artifacts=None
    )
    decision = promote_now()
    assert decision["promote"], decision["reasons"]
    assert registry.resolve_alias(client, "test-model", registry.CHAMPION) == again.version

    history = read_promotion_log(log).to_pylist()
    assert [r["promoted"] for r in history] == [True, False, True]
    assert {r["eval_version"] for r in history} == {"0"}

    # a consumer loads the champion over HTTP
    bundle = registry.load_bundle_from_uri("models:/test-model@champion")
    assert bundle.calibration.to_dict() == first.trained.calibration.to_dict()

    # a version `rollback --model-version` tagged is never promoted; a rolled-back champion is not
    # served by its alias nor compared: the next challenger is judged alone
    champion = again.version
    rolled = register_bundle(
        client, save_trained(first.trained, tmp_path / "rolled"), incoming, name="test-model", artifacts=None
    )
    registry.mark_rolled_back(client, "test-model", rolled.version, "a test")
    decision = promote_now()
    assert not decision["promote"]
    assert decision["reasons"] == [f"challenger v{rolled.version} was rolled back (a test)"]
    registry.mark_rolled_back(client, "test-model", champion, "a test")
    with pytest.raises(CatalogEnrichError, match=f"test-model v{champion}, the 'champion' alias, was rolled"):
        registry.resolve_model(client, "models:/test-model@champion")
    fresh = register_bundle(
        client, save_trained(first.trained, tmp_path / "fresh"), incoming, name="test-model", artifacts=None
    )
    decision = promote_now()
    assert decision["promote"] and list(decision["metrics"]) == ["challenger"], decision
    assert (
        decision["reasons"][-1] == f"the champion v{champion} was rolled back (a test): coverage not compared"
    )
    assert registry.resolve_alias(client, "test-model", registry.CHAMPION) == fresh.version

    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 3
    logged = [str(v) for r in runs for v in (*r.data.params.values(), *r.data.tags.values())]
    assert any("***" in v for v in logged)  # the tracking URI is logged, masked
    out, err = capfd.readouterr()
    assert SECRET not in "".join(logged) + out + err + caplog.text


def _m(written: int, correct: int, coverage: float = 0.5) -> dict[str, float]:
    return {
        "precision": correct / written if written else float("nan"),
        "coverage": coverage,
        "written": float(written),
        "correct": float(correct),
    }


def test_gate_judges_precision_by_a_bound_not_a_point_estimate() -> None:
    good = {"color": _m(100, 97), "material": _m(90, 89)}
    assert gate(good, None, target=0.95, max_coverage_loss=0.02).promote
    # 93 of 100 is below 0.95 as a point estimate but not significantly (exact upper 0.967): kept
    near = gate({**good, "color": _m(100, 93)}, None, target=0.95, max_coverage_loss=0.02)
    assert near.promote and "ok color: realized precision 0.9300 (93/100)" in near.reasons[0]
    # 880 of 1,000 is significantly below (upper 0.896): rejected
    bad = gate({**good, "color": _m(1000, 880)}, None, target=0.95, max_coverage_loss=0.02)
    assert not bad.promote and bad.reasons[0].startswith("FAIL color: realized precision 0.8800 (880/1000)")
    assert "upper bound 0.89" in bad.reasons[0]
    # few writes are judged by the same bound: 0 of 25 right is significantly below (upper 0.113),
    # 19 of 20 is not (upper 0.997)
    few = gate({**good, "color": _m(25, 0)}, None, target=0.95, max_coverage_loss=0.02)
    assert not few.promote and few.reasons[0].startswith("FAIL color: realized precision 0.0000 (0/25)")
    assert gate({**good, "color": _m(20, 19)}, None, target=0.95, max_coverage_loss=0.02).promote
    nothing = {a: _m(0, 0, 0.0) for a in good}
    assert not gate(nothing, None, target=0.95, max_coverage_loss=0.02).promote


def test_gate_compares_coverage_by_a_paired_bound() -> None:
    good = {"color": _m(100, 97, 0.5), "material": _m(90, 89, 0.6)}
    same = CoverageChange(0.6, 0.0, 0.01)
    # color's coverage change -0.05 with upper bound -0.03: significantly worse than -0.02
    lost = gate(
        good,
        {"color": CoverageChange(0.55, -0.05, -0.03), "material": same},
        target=0.95,
        max_coverage_loss=0.02,
    )
    assert not lost.promote
    assert (
        "FAIL color: coverage 0.5000 vs champion 0.5500 (change -0.0500, upper bound -0.0300)"
        in lost.reasons[2]
    )
    # a drop whose upper bound is within the margin is noise: promoted (no worse than the champion)
    noisy = gate(
        good,
        {"color": CoverageChange(0.52, -0.02, -0.01), "material": same},
        target=0.95,
        max_coverage_loss=0.02,
    )
    assert noisy.promote
    # an attribute the champion lacks (added to the taxonomy since) has nothing to compare with
    added = gate({**good, "pattern": _m(50, 49, 0.4)}, {"color": same, "material": same}, target=0.95,
                 max_coverage_loss=0.02)  # fmt: skip
    assert (
        added.promote
        and "ok pattern: coverage 0.4000, new (the champion has no such attribute)" in added.reasons
    )
    # one the challenger does not score (dropped from its training taxonomy) loses its coverage
    dropped = gate(good, {"color": same, "material": same, "pattern": CoverageChange(0.3, -0.3, -0.25)},
                   target=0.95, max_coverage_loss=0.02)  # fmt: skip
    assert not dropped.promote and (
        "FAIL pattern: the challenger does not score it, the champion covers 0.3000 (upper bound -0.2500)"
        in dropped.reasons
    )
    # one the evaluation set labels no product for is not checked, and says so
    unlabelled = {**good, "pattern": {**_m(0, 0, 0.0), "labelled": 0.0}}
    told = gate(unlabelled, None, target=0.95, max_coverage_loss=0.02)
    assert (
        told.promote
        and "pattern: no product of the evaluation set is labelled for it: not checked" in told.reasons
    )


def test_paired_coverage_comparison_has_a_known_answer() -> None:
    # per-product differences [0, 1, 0, -1]: mean 0; of the 2 products the two treat differently
    # the challenger covers 1, whose exact 95 % upper rate is sqrt(0.95) (Beta(2, 1)): the mean
    # change's bound is 2 * (2 sqrt(0.95) - 1) / 4
    new, old = np.array([1, 1, 0, 0, 1], bool), np.array([1, 0, 0, 1, 0], bool)
    labelled = {"color": np.array([1, 1, 1, 1, 1], bool)}
    # the fifth product's label is a value the champion's taxonomy lacks: compared on the other four
    theirs = {"color": np.array([1, 1, 1, 1, 0], bool)}
    changes = compare_coverage(
        Evaluation({}, {"color": new}, labelled), Evaluation({}, {"color": old}, theirs), confidence=0.95
    )
    assert changes["color"].champion == 0.5 and changes["color"].delta == 0.0
    assert changes["color"].upper == pytest.approx(2 * (2 * np.sqrt(0.95) - 1) / 4)
    # an attribute the challenger lacks: none of the champion's four labelled products covered (it
    # covers 0 of the 2 they differ on: upper rate 1 - sqrt(0.05), Beta(1, 2))
    lacking = compare_coverage(
        Evaluation({}, {}, {}), Evaluation({}, {"color": old}, theirs), confidence=0.95
    )
    assert lacking["color"].champion == 0.5 and lacking["color"].delta == -0.5
    assert lacking["color"].upper == pytest.approx(2 * (2 * (1 - np.sqrt(0.05)) - 1) / 4)


@pytest.mark.timeout(10)
def test_a_long_list_of_reasons_stays_valid_json_in_a_tag() -> None:
    reasons = [f"ok attribute_{i}: " + "x" * 90 for i in range(80)]  # about 8,700 characters as JSON
    text = registry.json_tag(reasons, "the log has all")
    kept = json.loads(text)
    assert len(text) <= registry.TAG_LIMIT and kept[:-1] == reasons[: len(kept) - 1]
    assert kept[-1] == f"... {80 - (len(kept) - 1)} more (the log has all)"
    assert json.loads(registry.json_tag(reasons[:3], "x")) == reasons[:3]


@pytest.mark.timeout(300)
def test_bad_inputs_fail_before_any_registration(tmp_path: Path, data, taxonomy: Taxonomy) -> None:  # type: ignore[no-untyped-def]
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = registry.configure_mlflow(uri)
    table = read_table(data["train"])
    no_material = tmp_path / "no_material"
    write_table(no_material, table.drop_columns(["material"]))
    with pytest.raises(ContractError, match=r"lacks columns \['material'\]"):
        run_training_job(_cfg(tmp_path, uri), taxonomy, data=no_material, client=client, progress=_quiet)
    assert client.search_registered_models() == []  # nothing registered by the failed runs
    with pytest.raises(CatalogEnrichError, match="does not exist"):
        promote(
            client, "no-such-model", EvaluationSet(data["eval"]), GateRule(0.95, max_coverage_loss=0.02),
            log_path=tmp_path / "log", progress=_quiet,
        )  # fmt: skip


@pytest.mark.timeout(120)
def test_unreachable_tracking_server_is_a_clear_error(tmp_path: Path, taxonomy: Taxonomy) -> None:
    client = registry.configure_mlflow(f"http://ci-user:{SECRET}@127.0.0.1:{free_port()}")
    started = time.time()
    with pytest.raises(CatalogEnrichError, match=r"ci-user:\*\*\*@127.0.0.1:\d+ is unreachable") as raised:
        run_training_job(_cfg(tmp_path, "http://x"), taxonomy, data=tmp_path, client=client, progress=_quiet)
    assert SECRET not in str(raised.value) and "start it" in str(raised.value)
    assert time.time() - started < 90


def test_pip_requirements_are_pinned_and_name_no_package_of_ours() -> None:
    reqs = registry.pip_requirements()
    assert any(r.startswith("torch==2.13.0") for r in reqs)
    assert all("==" in r for r in reqs)
    assert not [r for r in reqs if r.startswith("catalog-enrichment")]
    assert pa is not None


_SERVED_IMPORTS = """
import ast, importlib.metadata as md, json, sys
from catalog_enrichment import registry
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.inference.bundle import bundle_problems, load_bundle
from catalog_enrichment.inference.options import PredictorOptions
from catalog_enrichment.inference.predictor import BatchPredictor
tops = set()
for name, module in list(sys.modules.items()):
    if name.split(".")[0] == "catalog_enrichment" and getattr(module, "__file__", None):
        for node in ast.parse(open(module.__file__).read()).body:  # what loading it imports
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
names = md.packages_distributions()
print(json.dumps(sorted({d for t in tops for d in names.get(t, []) if t != "catalog_enrichment"})))
"""


@pytest.mark.timeout(120)
def test_pip_requirements_install_every_package_the_served_model_imports() -> None:
    """The model's environment (what MLflow restores for `spark_udf` or `models serve`) installs what
    the pyfunc's modules import when it loads and scores - the pinned requirements or what they
    depend on - or loading it fails there with a missing module."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement

    out = subprocess.run([sys.executable, "-c", _SERVED_IMPORTS], capture_output=True, text=True, check=True)
    imported = json.loads(out.stdout)

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    installed: set[str] = set()
    todo = [r.split("==")[0] for r in registry.pip_requirements()]
    while todo:
        name = norm(todo.pop())
        if name in installed:
            continue
        installed.add(name)
        for line in md.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):  # installed here, no extras
                todo.append(req.name)
    assert "torch" in imported and "simplejpeg" in imported  # the check sees what it is for
    assert [d for d in imported if norm(d) not in installed] == []


def test_a_sqlite_stores_runs_keep_their_artifacts_beside_it_not_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    client = registry.configure_mlflow(mlflow_store(tmp_path / "store" / "mlflow.db"))
    run_id = registry.log_enrichment_run(
        client,
        experiment="enrichment",
        artifact_location=None,
        report={"run_id": "r1", "status": "succeeded"},
        params={},
        metrics={"rows_read": 1.0},
    )
    artifacts = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(tmp_path / "store" / "mlartifacts")
    assert (artifacts / "run_report.json").is_file() and list(elsewhere.iterdir()) == []


@pytest.mark.timeout(60)
def test_an_alias_the_registry_cannot_read_is_an_error_not_an_unset_alias() -> None:
    """A registry answering 503 for the champion alias must not read as "no champion yet" (the gate
    would then promote on precision alone); an alias that is not set reads as None."""
    from mlflow.exceptions import MlflowException

    class Registry:
        def __init__(self, error: MlflowException) -> None:
            self.error = error

        def get_registered_model(self, name: str) -> object:
            return object()

        def get_model_version_by_alias(self, name: str, alias: str) -> object:
            raise self.error

    unset = MlflowException(
        "Registered model alias champion not found.", error_code="INVALID_PARAMETER_VALUE"
    )
    assert registry.resolve_alias(Registry(unset), "m", registry.CHAMPION) is None  # type: ignore[arg-type]
    down = MlflowException("503 Service Unavailable", error_code="TEMPORARILY_UNAVAILABLE")
    with pytest.raises(MlflowException, match="503"):
        registry.resolve_alias(Registry(down), "m", registry.CHAMPION)  # type: ignore[arg-type]


class _GateRegistry:
    """The registry calls a decision makes: the champion ``champion``, the challenger's ``tags``; every
    write kept in ``moved``, the alias move failing with ``fail`` (``after``: once the alias moved,
    as a request whose answer was lost)."""

    def __init__(
        self, champion: str, tags: dict[str, str], fail: Exception | None = None, after: bool = False
    ) -> None:
        self.champion, self.tags, self.fail, self.after = champion, tags, fail, after
        self.moved: list[tuple[str, ...]] = []

    def get_registered_model(self, name: str) -> object:
        return object()

    def get_model_version_by_alias(self, name: str, alias: str) -> object:
        return type("Version", (), {"version": self.champion})()

    def get_model_version(self, name: str, version: str) -> object:
        return type("Version", (), {"tags": self.tags})()

    def set_model_version_tag(self, *args: str) -> None:
        self.moved.append(args)

    def set_registered_model_alias(self, *args: str) -> None:
        if self.fail is not None and not self.after:
            raise self.fail
        self.moved.append(args)
        self.champion = args[-1]
        if self.fail is not None:
            raise self.fail


@pytest.mark.timeout(60)
def test_a_champion_moved_while_the_gate_ran_records_nothing(tmp_path: Path) -> None:
    """Another promotion moved the champion from v1 to v3 while v2 was judged against v1: no tag, no
    log row, no alias move - a clear error to run it again."""
    from catalog_enrichment.promotion import _record

    summary = {"registered_model": "m", "challenger": "2", "champion": "1", "promote": True, "reasons": []}
    client = _GateRegistry("3", {})
    with pytest.raises(CatalogEnrichError, match="moved from 1 to 3 while this promotion ran"):
        _record(client, summary, None, tmp_path / "log", _quiet)  # type: ignore[arg-type]
    assert client.moved == [] and not (tmp_path / "log").exists()


_PROMOTE = {
    "registered_model": "m", "challenger": "2", "champion": "1", "promote": True, "reasons": [],
    "eval_data": "eval", "eval_version": 0, "metrics": {},
}  # fmt: skip


@pytest.mark.timeout(60)
def test_promotions_into_one_log_decide_one_at_a_time(tmp_path: Path) -> None:
    """Another promotion holds the log's lock (its decision under way): this one waits for it, and
    checks the champion only once it holds the lock - so it finds the champion the other moved
    from v1 to v3 and records nothing. One that cannot get the lock in time records nothing
    either, and says who holds it."""
    import threading

    from catalog_enrichment.catalog.lock import CatalogBusy, catalog_lock
    from catalog_enrichment.promotion import _record

    log = tmp_path / "promotion_log"
    client = _GateRegistry("1", {})
    waiting, failed = threading.Event(), []

    def decide() -> None:
        def say(message: str) -> None:
            if "waiting up to" in message:
                waiting.set()

        try:
            _record(client, dict(_PROMOTE), dt.datetime.now(dt.UTC), log, say, lock_wait_seconds=30)  # type: ignore[arg-type]
        except CatalogEnrichError as exc:
            failed.append(exc)

    other = {"owner": "promote v3 of m", "wait_seconds": 0, "name": "_promotion_log_lock"}
    with catalog_lock(tmp_path, **other):  # type: ignore[arg-type]
        with pytest.raises(CatalogBusy, match="promote v3 of m"):
            _record(client, dict(_PROMOTE), dt.datetime.now(dt.UTC), log, _quiet, lock_wait_seconds=0)  # type: ignore[arg-type]
        assert client.moved == []
        second = threading.Thread(target=decide)
        second.start()
        assert waiting.wait(20)
        client.champion = "3"  # the holder's decision: the alias moved before it lets go
    second.join(20)
    assert [str(e) for e in failed] == [
        "'champion' of 'm' moved from 1 to 3 while this promotion ran; nothing was recorded: run "
        "promote again to compare v2 with v3"
    ]
    assert client.moved == [] and not log.exists()


@pytest.mark.timeout(60)
def test_a_challenger_rolled_back_while_the_gate_ran_is_not_promoted(tmp_path: Path) -> None:
    from catalog_enrichment.promotion import _record

    client = _GateRegistry("1", {registry.ROLLED_BACK_TAG: "lake at 2026-11-30"})
    with pytest.raises(CatalogEnrichError, match="v2 of 'm' was rolled back while this promotion ran"):
        _record(client, dict(_PROMOTE), dt.datetime.now(dt.UTC), tmp_path / "log", _quiet)
    assert client.moved == [] and not (tmp_path / "log").exists()


@pytest.mark.timeout(60)
def test_an_alias_move_that_fails_records_no_promotion(tmp_path: Path) -> None:
    """The alias moves after the judgement tags (what a retry needs to finish the record) and before
    the decision tag and the log row: where the move fails, neither says promoted; where it
    succeeds, both follow it."""
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.promotion import _record

    down = _GateRegistry("1", {}, fail=OSError("503 from the registry"))
    with pytest.raises(OSError, match="503"):
        _record(down, dict(_PROMOTE), dt.datetime.now(dt.UTC), tmp_path / "log", _quiet)
    assert ("m", "2", "promotion.decision", "promoted") not in down.moved and not (tmp_path / "log").exists()
    # and the judgement no longer says promoting: were the version made champion by hand later, a
    # promote would not record a promotion this gate never made
    promoting = [m[3] for m in down.moved if len(m) == 4 and m[2] == PROMOTING_TAG]
    assert promoting[0] and promoting[-1] == ""
    up = _GateRegistry("1", {})
    _record(up, dict(_PROMOTE), dt.datetime.now(dt.UTC), tmp_path / "log", _quiet)
    moved = up.moved.index(("m", registry.CHAMPION, "2"))
    assert ("m", "2", "promotion.champion_before", "1") in up.moved[:moved]
    assert ("m", "2", "promotion.decision", "") in up.moved[:moved]  # an earlier judgement's cleared
    assert ("m", "2", "promotion.decision", "promoted") in up.moved[moved + 1 :]
    assert read_table(tmp_path / "log")["promoted"].to_pylist() == [True]
    assert up.moved[-1] == ("m", "2", PROMOTING_TAG, "")  # the record complete: nothing to finish


@pytest.mark.timeout(60)
def test_an_alias_move_that_failed_after_the_alias_moved_records_the_promotion(tmp_path: Path) -> None:
    """The registry moved the alias and its answer was lost (a timeout, a 503 from a proxy): the
    version is champion, so the promotion is recorded - decision tag, log row - as where the move
    answered, not left champion with no record and nothing for a retry to finish."""
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.promotion import _record

    said: list[str] = []
    lost = _GateRegistry("1", {}, fail=OSError("504 from the proxy"), after=True)
    _record(lost, dict(_PROMOTE), dt.datetime.now(dt.UTC), tmp_path / "log", said.append)
    assert lost.champion == "2" and ("m", "2", "promotion.decision", "promoted") in lost.moved
    assert read_table(tmp_path / "log")["promoted"].to_pylist() == [True]
    assert lost.moved[-1] == ("m", "2", PROMOTING_TAG, "")
    assert "504 from the proxy" in said[0] and "now points at v2" in said[0]


@pytest.mark.timeout(60)
def test_the_gate_refuses_a_challenger_whose_labels_left_out_another_evaluation_set(tmp_path: Path) -> None:
    """The labels a challenger trained on (its data.* tags) record which evaluation set they left
    out: the gate judges it only on that one, at that version; a training table `labels` did not
    write is not checked, and the gate says so."""
    from deltalake import CommitProperties, write_deltalake

    from catalog_enrichment.catalog.labels import METADATA_KEY
    from catalog_enrichment.promotion import _trained_apart

    evaluation = tmp_path / "eval"
    write_table(evaluation, pa.table({"product_id": ["e1"]}))
    write_table(evaluation, pa.table({"product_id": ["e2"]}), mode="overwrite")  # version 1
    here = {"path": str(evaluation.resolve()), "version": 1}

    def labels(name: str, **sources: object) -> str:
        meta = {METADATA_KEY: json.dumps({"sources": {"products": {"path": "p", "version": 0}, **sources}})}
        write_deltalake(
            str(tmp_path / name),
            pa.table({"product_id": ["p1"]}),
            commit_properties=CommitProperties(custom_metadata=meta),
        )
        return str(tmp_path / name)

    def apart(path: str, said: list[str] | None = None) -> str | None:
        client = _GateRegistry("1", {"data.path": path, "data.version": "0"})
        return _trained_apart(client, "m", "2", evaluation, 1, (said if said is not None else []).append)

    assert apart(labels("same", evaluation=here)) is None
    assert "left out no evaluation set" in str(apart(labels("none")))
    older = apart(labels("older", evaluation={**here, "version": 0}))
    assert f"left out {evaluation.resolve()} at version 0, not {evaluation.resolve()} at version 1" in str(
        older
    )
    plain = tmp_path / "plain"
    write_table(plain, pa.table({"product_id": ["p1"]}))
    said: list[str] = []
    assert apart(str(plain), said) is None and "is not checked" in said[0]


@pytest.mark.timeout(60)
def test_a_training_table_the_gate_cannot_read_stops_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that does not answer is not a table `labels` did not write: the gate stops with the
    reason, rather than promote a challenger whose labels may hold products it is judged on."""
    import deltalake

    from catalog_enrichment.promotion import _trained_apart

    def unreachable(*args: object, **kwargs: object) -> None:
        raise OSError("Generic S3 error: connection reset")

    monkeypatch.setattr(deltalake, "DeltaTable", unreachable)
    client = _GateRegistry("1", {"data.path": "s3://lake/labels", "data.version": "3"})
    said: list[str] = []
    with pytest.raises(
        CatalogEnrichError, match=r"cannot read the history of the training table s3://lake/labels"
    ):
        _trained_apart(client, "m", "2", tmp_path / "eval", 0, said.append)
    assert said == []


@pytest.mark.timeout(600)
def test_the_gate_judges_what_the_job_would_write(scoring_bundle: Path, data, taxonomy: Taxonomy) -> None:  # type: ignore[no-untyped-def]
    """The gate counts the enrichment job's decisions, not the thresholds alone: no shade outside the
    family written (the counts never exceed the thresholds'), and nothing of an attribute the
    configured taxonomy added a value to (the job would write none of it)."""
    from catalog_enrichment.data.images import ImagePolicy
    from catalog_enrichment.inference.bundle import load_bundle
    from catalog_enrichment.metrics import written_precision_and_coverage
    from catalog_enrichment.promotion import evaluate_bundle

    bundle = load_bundle(scoring_bundle)
    table = read_table(data["eval"]).slice(0, 400)
    images = ImagePolicy(roots=(str(data["eval"]),))
    judged = evaluate_bundle(bundle, table, images)
    labels = encode_labels(table, taxonomy).derive(taxonomy)
    scores = BatchPredictor(bundle).score(table.to_pandas())
    for attr in taxonomy.outputs:
        s, y = labels.labelled(scores, attr.name)
        alone = written_precision_and_coverage(s, y, attr.kind, bundle.calibration.thresholds(attr.name))
        assert judged.metrics[attr.name]["written"] <= alone["written"], attr.name
        if attr.name not in ("color", "color_family"):  # no value groups: the same decisions
            assert judged.metrics[attr.name]["written"] == alone["written"], attr.name
    assert judged.metrics["product_type"]["written"] > 0 and judged.metrics["material"]["written"] > 0
    spec = taxonomy.to_dict()
    spec["attributes"]["product_type"]["values"].append("umbrella")
    opened = evaluate_bundle(bundle, table, images, Taxonomy.from_dict(spec))
    assert opened.metrics["product_type"]["written"] == 0 and not opened.covered["product_type"].any()
    assert opened.metrics["material"] == judged.metrics["material"]
    # a product whose photo cannot be used is quarantined by the job: nothing of it is counted
    # written (it was scored as a product without a photo)
    photos = table["image"].to_pylist()
    covered = [i for i in range(len(photos)) if photos[i] and judged.covered["product_type"][i]][:20]
    broken = table.set_column(
        table.schema.get_field_index("image"),
        "image",
        pa.array([b"not a photo" if i in covered else p for i, p in enumerate(photos)], pa.binary()),
    )
    again = evaluate_bundle(bundle, broken, images)
    for attr in taxonomy.outputs:
        assert not again.covered[attr.name][covered].any(), attr.name
        rest = np.ones(len(photos), bool)
        rest[covered] = False
        assert np.array_equal(again.covered[attr.name][rest], judged.covered[attr.name][rest]), attr.name


@pytest.mark.timeout(300)
def test_a_champion_calibrated_for_another_target_is_not_compared(  # type: ignore[no-untyped-def]
    tmp_path: Path, scoring_bundle: Path, incoming, data, monkeypatch
) -> None:
    """The target was raised since the champion was calibrated: every run refuses it, so the
    challenger, calibrated for the target, is judged alone rather than against its looser coverage."""
    import dataclasses

    client, _, champion, _ = tiny_registry(tmp_path, scoring_bundle, incoming)
    register_bundle(client, scoring_bundle, incoming, name="tiny", artifacts=tmp_path / "artifacts")
    real = registry.load_bundle_from_uri

    def looser(uri: str, *args: Any, **kwargs: Any) -> Any:
        bundle = real(uri, *args, **kwargs)
        if uri != f"models:/tiny/{champion}":
            return bundle
        return dataclasses.replace(
            bundle, calibration=dataclasses.replace(bundle.calibration, target_precision=0.9)
        )

    monkeypatch.setattr(registry, "load_bundle_from_uri", looser)
    decision = promote(
        client, "tiny", EvaluationSet(data["eval"]), GateRule(0.95, max_coverage_loss=0.02),
        log_path=tmp_path / "log", dry_run=True, progress=_quiet,
    )  # fmt: skip
    assert list(decision["metrics"]) == ["challenger"], decision
    assert (
        decision["reasons"][-1]
        == f"the champion v{champion} was calibrated for 0.9, not 0.95: coverage not compared"
    )


@pytest.mark.timeout(300)
def test_a_champion_whose_files_are_gone_is_not_compared(  # type: ignore[no-untyped-def]
    tmp_path: Path, scoring_bundle: Path, incoming, data, monkeypatch
) -> None:
    """No run can serve a champion whose files are gone: the challenger, the remedy, is judged
    alone, and the reasons say why. A store that cannot give them now is an error (run it again),
    not a reason to skip the comparison; so is a champion a later version of the package wrote
    (that version serves it, and its promotion compares the two)."""
    from mlflow.exceptions import MlflowException

    client, _, champion, _ = tiny_registry(tmp_path, scoring_bundle, incoming)
    register_bundle(client, scoring_bundle, incoming, name="tiny", artifacts=tmp_path / "artifacts")
    rule = GateRule(0.95, max_coverage_loss=0.02)
    real = mlflow.pyfunc.load_model

    def unavailable(uri: str, *args: Any, **kwargs: Any) -> Any:
        if uri == f"models:/tiny/{champion}":
            raise MlflowException("503 Service Unavailable", error_code="TEMPORARILY_UNAVAILABLE")
        return real(uri, *args, **kwargs)

    def by_later(uri: str, *args: Any, **kwargs: Any) -> Any:
        if uri == f"models:/tiny/{champion}":
            raise UnservableBundle(
                "written by catalog-enrichment 9.9.9; serve it with 9.9.9 or later", by_later=True
            )
        return real(uri, *args, **kwargs)

    def other_decoder(uri: str, *args: Any, **kwargs: Any) -> Any:
        if uri == f"models:/tiny/{champion}":
            raise DecoderMismatch("its photos were decoded by Pillow 13.0.0 ... decodes them to other pixels")
        return real(uri, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(mlflow.pyfunc, "load_model", unavailable)
        with pytest.raises(CatalogEnrichError, match=f"cannot load models:/tiny/{champion}: 503"):
            promote(
                client, "tiny", EvaluationSet(data["eval"]), rule, log_path=tmp_path / "log", progress=_quiet
            )
        # a later version of this package wrote it: that version serves it and its gate compares them
        patched.setattr(mlflow.pyfunc, "load_model", by_later)
        later = (
            rf"champion v{champion} cannot be compared with this version \(written by .*9\.9\.9 or later\)"
        )
        with pytest.raises(CatalogEnrichError, match=later):
            promote(
                client, "tiny", EvaluationSet(data["eval"]), rule, log_path=tmp_path / "log", progress=_quiet
            )
        # trained under another image decoder than this machine's: the machine is at fault (the
        # executors that serve the champion would refuse the challenger), not the champion
        patched.setattr(mlflow.pyfunc, "load_model", other_decoder)
        with pytest.raises(
            CatalogEnrichError, match=rf"champion v{champion} cannot be compared on this machine"
        ):
            promote(
                client, "tiny", EvaluationSet(data["eval"]), rule, log_path=tmp_path / "log", progress=_quiet
            )
    assert registry.resolve_alias(client, "tiny", registry.CHAMPION) == champion
    assert not (tmp_path / "log").exists()
    model_id = client.get_model_version("tiny", champion).source.removeprefix("models:/")
    # a damaged artifact (a file changed after it was registered): no run serves it either
    (meta,) = (tmp_path / "artifacts" / "models" / model_id).rglob("model.json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "score_dtype": "bfloat16"}))
    decision = promote(
        client,
        "tiny",
        EvaluationSet(data["eval"]),
        rule,
        log_path=tmp_path / "log",
        dry_run=True,
        progress=_quiet,
    )
    assert list(decision["metrics"]) == ["challenger"], decision
    assert "the model artifact is damaged: model.json is corrupt" in decision["reasons"][-1]
    shutil.rmtree(tmp_path / "artifacts" / "models" / model_id)
    decision = promote(
        client, "tiny", EvaluationSet(data["eval"]), rule, log_path=tmp_path / "log", progress=_quiet
    )
    assert list(decision["metrics"]) == ["challenger"], decision
    assert decision["reasons"][-1].startswith(f"the champion v{champion} cannot be loaded (")
    assert decision["reasons"][-1].endswith("): coverage not compared")


@pytest.mark.timeout(600)  # the first to ask may train scoring_bundle
def test_a_retry_records_a_promotion_whose_record_failed_after_the_alias_moved(  # type: ignore[no-untyped-def]
    tmp_path: Path, scoring_bundle: Path, incoming, data, monkeypatch
) -> None:
    """The alias moved, then the log could not be written (exit 2): the scheduler's retry finds the
    challenger already champion and records that promotion - log row and champion_before - once;
    so does the next promote where a training registered a new challenger before the retry."""
    from catalog_enrichment import promotion

    client, _, before, _ = tiny_registry(tmp_path, scoring_bundle, incoming)
    challenger = register_bundle(
        client, scoring_bundle, incoming, name="tiny", artifacts=tmp_path / "artifacts"
    )
    judged = promotion.GateResult(True, ["ok color: realized precision 0.9700 (97/100)"])
    monkeypatch.setattr(promotion, "_judge", lambda *args: (judged, {"challenger": {"color": _m(100, 97)}}))
    rule = GateRule(0.95, max_coverage_loss=0.02)
    log = tmp_path / "log"

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as disk:
        disk.setattr(promotion, "write_table", full)
        with pytest.raises(CatalogEnrichError, match=r"could not be recorded.*No space left"):
            promote(client, "tiny", EvaluationSet(data["eval"]), rule, log_path=log, progress=_quiet)
    assert registry.resolve_alias(client, "tiny", registry.CHAMPION) == challenger.version
    for _ in range(2):  # the retry records it; a second changes nothing
        again = promote(client, "tiny", EvaluationSet(data["eval"]), rule, log_path=log, progress=_quiet)
        assert not again["promote"] and again["reasons"][0].startswith("challenger is already champion")
    (row,) = read_promotion_log(log).to_pylist()
    assert row["challenger_version"] == challenger.version and row["champion_version"] == before
    assert row["promoted"] and row["reasons"][0] == judged.reasons[0]
    tags = registry.version_tags(client, "tiny", challenger.version)
    assert tags["promotion.decision"] == "promoted" and tags["promotion.champion_before"] == before
    assert row["decided_at"] == dt.datetime.fromisoformat(tags["promotion.decided_at"])

    cut_short = register_bundle(
        client, scoring_bundle, incoming, name="tiny", artifacts=tmp_path / "artifacts"
    ).version
    with monkeypatch.context() as disk:  # its record fails too
        disk.setattr(promotion, "write_table", full)
        with pytest.raises(CatalogEnrichError, match="could not be recorded"):
            promote(client, "tiny", EvaluationSet(data["eval"]), rule, log_path=log, progress=_quiet)
    assert registry.resolve_alias(client, "tiny", registry.CHAMPION) == cut_short
    newer = register_bundle(client, scoring_bundle, incoming, name="tiny", artifacts=tmp_path / "artifacts")
    decided = promote(client, "tiny", EvaluationSet(data["eval"]), rule, log_path=log, progress=_quiet)
    assert decided["champion"] == cut_short and decided["challenger"] == newer.version
    rows = [(r["challenger_version"], r["champion_version"]) for r in read_promotion_log(log).to_pylist()]
    assert sorted(rows) == [
        (challenger.version, before),
        (cut_short, challenger.version),
        (newer.version, cut_short),
    ]
    assert not registry.version_tags(client, "tiny", cut_short)[PROMOTING_TAG]


@pytest.mark.timeout(60)
def test_a_champion_the_configured_taxonomy_no_longer_fits_is_not_compared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every run refuses such a champion: the challenger is judged alone, and the reasons say why."""
    from catalog_enrichment import promotion

    def evaluate(bundle: str, *args: object) -> Evaluation:
        if bundle == "champion":
            raise TaxonomyError("attribute 'fit' is not in the configured taxonomy")
        return Evaluation(
            {"color": _m(100, 97)}, {"color": np.ones(100, bool)}, {"color": np.ones(100, bool)}
        )

    monkeypatch.setattr(promotion, "evaluate_bundle", evaluate)
    rule = GateRule(0.95, max_coverage_loss=0.02)
    result, metrics = promotion._judge("challenger", "champion", pa.table({}), None, rule, 0.95, None)  # type: ignore[arg-type]
    assert result.promote and list(metrics) == ["challenger"]
    assert result.reasons[-1].startswith("the champion does not fit the configured taxonomy (attribute 'fit'")
    assert not any(r.startswith("no champion yet") for r in result.reasons)


@pytest.mark.timeout(300)
def test_a_version_is_created_with_all_its_tags_in_one_call(  # type: ignore[no-untyped-def]
    tmp_path: Path, quick_bundle: Path, incoming, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version's tags (data.*, eval.*, its encoder fingerprint) come with the call that creates
    it: no tag is set one call at a time after it, where a brief server error would leave a
    version without them. The challenger alias moves last."""
    from mlflow import MlflowClient

    from catalog_enrichment.config import MLflowConfig
    from catalog_enrichment.inference.bundle import BundleFolder, load_bundle

    client = registry.configure_mlflow(mlflow_store(tmp_path / "mlflow.db"))

    def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a version tag set after the version was created")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", refused)
    frame = read_table(incoming.products).slice(0, 2).select(["product_id", "title", "description", "image"])
    frame = frame.to_pandas()
    example = (frame, BatchPredictor(load_bundle(quick_bundle)).score_frame(frame))
    cfg = MLflowConfig(registered_model="tags", experiment="training", artifact_location=str(tmp_path / "a"))
    tags = {"data.path": "/data/train", "data.version": "3", "eval.color.r_at_p95": "0.9000"}
    for expected in ("1", "2"):  # a new registered model, then one that exists
        version = registry.log_and_register(
            client, cfg, quick_bundle, registry.TrainingRecord(), example, tags
        )
        assert version.version == expected
        assert registry.resolve_alias(client, "tags", registry.CHALLENGER) == expected
        got = registry.version_tags(client, "tags", expected)
        assert {k: got[k] for k in tags} == tags
        assert got[registry.ENCODER_TAG] == BundleFolder(quick_bundle).encoder_fingerprint() is not None
        assert client.get_model_version("tags", expected).status == "READY"


@pytest.mark.timeout(300)
def test_a_deleted_experiment_is_refused_before_any_training(  # type: ignore[no-untyped-def]
    tmp_path: Path, data, taxonomy: Taxonomy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow keeps a deleted experiment's name: no run can be logged in it. The job says so, and how
    to restore it, before it fits anything; a run logged there later says the same."""
    from catalog_enrichment.training import job

    uri = mlflow_store(tmp_path / "mlflow.db")
    client = registry.configure_mlflow(uri)
    cfg = _cfg(tmp_path, uri)
    gone = client.create_experiment(cfg.mlflow.experiment)
    client.delete_experiment(gone)

    def fitted(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was fitted")

    monkeypatch.setattr(job, "train", fitted)
    said = (
        rf"MLflow experiment '{cfg.mlflow.experiment}' \(id {gone}\) in {uri} is deleted: restore it "
        rf"\(mlflow experiments restore --experiment-id {gone},"
    )
    with pytest.raises(CatalogEnrichError, match=said):
        run_training_job(cfg, taxonomy, data=data["train"], client=client, progress=_quiet)
    assert client.search_registered_models() == []
    with pytest.raises(CatalogEnrichError, match=said):
        registry.log_enrichment_run(
            client, experiment=cfg.mlflow.experiment, artifact_location=None,
            report={"run_id": "r1", "status": "succeeded"}, params={}, metrics={},
        )  # fmt: skip


@pytest.mark.timeout(60)
def test_an_enrichment_job_refuses_a_deleted_experiment_before_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enrichment run logs into its experiment once the catalog is written: a deleted one stops
    the job when it starts, not after it wrote."""
    from catalog_enrichment import runtime

    uri = mlflow_store(tmp_path / "mlflow.db")
    cfg = _cfg(tmp_path, uri)
    gone = registry.configure_mlflow(uri).create_experiment(cfg.mlflow.enrichment_experiment)
    registry.configure_mlflow(uri).delete_experiment(gone)
    monkeypatch.setattr(runtime, "spark_session", lambda cfg: None)
    monkeypatch.setattr(runtime, "model_version", lambda cfg, model_uri, client: None)
    with pytest.raises(
        CatalogEnrichError, match=rf"experiment '{cfg.mlflow.enrichment_experiment}' .* is deleted"
    ):
        runtime.job_context(cfg, None)


@pytest.mark.timeout(900)
def test_the_training_run_records_derived_attributes_and_names_mlflow_refuses(  # type: ignore[no-untyped-def]
    tmp_path: Path, taxonomy: Taxonomy
) -> None:
    """Derived attributes (color_family: groups of color's values) are written like the others, so
    the run records them like the others: test metrics, eval.* version tags, per value metrics and
    plots. An attribute named with a ``/`` names its plot files as its metrics (mlflow_name)."""
    spec = taxonomy.to_dict()
    spec["attributes"]["material/fabric"] = spec["attributes"].pop("material")
    renamed = Taxonomy.from_dict(spec)
    assert "color_family" in renamed.derived
    market = generate_marketplace(
        tmp_path / "market", SyntheticConfig(products=600, seed=3, image_size=32), taxonomy=taxonomy
    )
    table = read_table(market.products)
    write_table(tmp_path / "train", table.rename_columns(["material/fabric" if c == "material" else c
                                                         for c in table.column_names]))  # fmt: skip
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = registry.configure_mlflow(uri)
    cfg = _cfg(tmp_path, uri, epochs=1)
    outcome = run_training_job(cfg, renamed, data=tmp_path / "train", client=client, progress=_quiet)

    tags = registry.version_tags(client, "test-model", outcome.registered.version)
    metrics = client.get_run(outcome.registered.run_id).data.metrics
    for name in ("color", "color_family", "material_fabric"):
        assert f"eval.{name}.r_at_p95" in tags and f"test.{name}.r_at_p95" in metrics, name
    assert "calibration.color_family.written" in metrics
    plots = {Path(f.path).name for f in client.list_artifacts(outcome.registered.run_id, "plots")}
    assert {"pr_color_family.png", "reliability_color_family.png", "pr_material_fabric.png"} <= plots
    csv = client.download_artifacts(outcome.registered.run_id, "tables/per_value_metrics.csv", str(tmp_path))
    attributes = set(pd.read_csv(csv)["attribute"])
    assert {"color", "color_family", "material/fabric"} <= attributes


@pytest.mark.timeout(300)
def test_the_pyfunc_reads_an_image_uri_only_under_the_roots_given_at_load(  # type: ignore[no-untyped-def]
    tmp_path: Path, quick_bundle: Path, incoming
) -> None:
    """A product whose image is only an ``image_uri``: scored from that file when the model was
    loaded with ``model_config={"image_roots": [...]}`` naming its folder, as it is from the same
    bytes inline; without the roots, or outside them, scored NaN (never as a product without one)."""
    client = registry.configure_mlflow(mlflow_store(tmp_path / "mlflow.db"))
    version = register_bundle(client, quick_bundle, incoming, name="pics", artifacts=tmp_path / "a").version
    products = read_table(incoming.products).to_pandas()
    inline = products[products["image"].notna()].head(3)[["product_id", "title", "description", "image"]]
    inline = inline.reset_index(drop=True)
    (tmp_path / "photos").mkdir()
    paths = [tmp_path / "photos" / f"{i}.img" for i in range(len(inline))]
    for path, image in zip(paths, inline["image"], strict=True):
        path.write_bytes(image)
    by_uri = inline.assign(image=None, image_uri=[str(p) for p in paths])
    uri = f"models:/pics/{version}"
    expected = mlflow.pyfunc.load_model(uri).predict(inline)
    assert not expected.isna().any().any()
    rooted = mlflow.pyfunc.load_model(uri, model_config={"image_roots": [str(tmp_path / "photos")]})
    assert np.allclose(rooted.predict(by_uri).to_numpy(), expected.to_numpy(), atol=1e-6)
    elsewhere = mlflow.pyfunc.load_model(uri, model_config={"image_roots": [str(tmp_path / "a")]})
    for model in (mlflow.pyfunc.load_model(uri), elsewhere):
        assert model.predict(by_uri).isna().all().all()
