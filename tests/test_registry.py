"""MLflow lifecycle: pyfunc round trip in a fresh process, train -> register -> promote gate against a
real ``mlflow server``, and clear errors before any partial registration."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from catalog_enrichment import registry
from catalog_enrichment.catalog.lakehouse import read_table, write_table
from catalog_enrichment.config import AppConfig, SyntheticConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.synthetic import generate_marketplace
from catalog_enrichment.errors import CatalogEnrichError, ContractError, TaxonomyError
from catalog_enrichment.inference.predictor import BatchPredictor
from catalog_enrichment.promotion import gate, promote, read_promotion_log
from catalog_enrichment.training.job import run_training_job
from tests.conftest import tiny_config

pytestmark = [pytest.mark.slow]


def _cfg(tmp: Path, tracking_uri: str, *, fusion: str = "concat", epochs: int = 3) -> AppConfig:
    return tiny_config(
        fusion=fusion,
        epochs=epochs,
        mlflow={
            "tracking_uri": tracking_uri,
            "artifact_location": str(tmp / "mlartifacts"),
            "registered_model": "test-model",
        },
        catalog={"root": str(tmp / "lakehouse")},
        # a large calibration split: a value needs >= 52 straight hits there to prove 95 %
        training={"early_stopping_patience": 0, "calibration_fraction": 0.3, "test_fraction": 0.1},
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, taxonomy: Taxonomy) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("registry-data")
    train = generate_marketplace(
        root / "train", SyntheticConfig(products=2000, seed=11, image_size=32), taxonomy=taxonomy
    )
    evalset = generate_marketplace(
        root / "eval", SyntheticConfig(products=1500, seed=12, image_size=32), taxonomy=taxonomy
    )
    return {"train": train.products, "eval": evalset.products}


def _quiet(_msg: str) -> None:
    pass


@pytest.mark.timeout(900)
def test_pyfunc_reproduces_training_scores_in_a_fresh_process(
    tmp_path: Path, data, taxonomy: Taxonomy
) -> None:  # type: ignore[no-untyped-def]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg(tmp_path, uri, epochs=2)
    client = registry.configure_mlflow(uri)
    outcome = run_training_job(cfg, taxonomy, data=data["train"], client=client, progress=_quiet)
    assert (
        registry.resolve_alias(client, "test-model", registry.CHALLENGER) == outcome.registered.version == "1"
    )

    sample = read_table(data["eval"]).slice(0, 64).select(["product_id", "title", "description", "image"])
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
    )
    env = {k: v for k, v in os.environ.items() if k != "CATALOG_ENRICH_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = pd.read_parquet(tmp_path / "scores.parquet")
    assert list(got.columns) == list(expected.columns)
    assert np.max(np.abs(got.to_numpy() - expected.to_numpy())) < 1e-5
    # the calibration the model carries is the one logged with the run
    logged = registry.download_artifact_json(outcome.registered.run_id, "tables/calibration.json")
    assert json.loads((tmp_path / "cal.json").read_text()) == logged == trained.calibration.to_dict()
    # a failed training run afterwards registers nothing and leaves the aliases where they were
    broken = tmp_path / "broken"
    write_table(broken, read_table(data["train"]).drop_columns(["pattern"]))
    with pytest.raises(ContractError):
        run_training_job(cfg, taxonomy, data=broken, client=client, progress=_quiet)
    assert registry.resolve_alias(client, "test-model", registry.CHALLENGER) == "1"
    assert len(client.search_model_versions("name='test-model'")) == 1
    tags = registry.version_tags(client, "test-model", "1")
    assert tags["data.path"] == str(Path(data["train"]).resolve()) and tags["data.version"] == "0"
    assert "eval.color.r_at_p95" in tags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite backend, served artifacts) on a loopback port."""
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [
            str(exe),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Train on one torch thread for the test, then restore the count.

    Training is seeded and gives the same weights run after run at a fixed thread count. With two
    threads, though, this test's models still moved between runs of the whole suite: MKL may use
    fewer threads than it is given, so the float sums split differently. The gated coverage of one
    attribute once fell 0.22 against the champion, past the margin below. On one thread nothing is
    split, and the three models are the same on every run.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(1500)
@pytest.mark.usefixtures("one_torch_thread")
def test_train_register_promote_load_against_a_real_mlflow_server(  # type: ignore[no-untyped-def]
    tmp_path: Path, data, taxonomy: Taxonomy, mlflow_server: str
) -> None:
    client = registry.configure_mlflow(mlflow_server)
    log = tmp_path / "promotion_log"

    def promote_now() -> dict:
        return promote(
            client,
            registered_model="test-model",
            eval_data=data["eval"],
            eval_version=None,
            # The gate's own rules are tested with known answers in test_gate_rules; here the tiny
            # models' realized precision on 1,500 eval products sits within a point of 0.95 and moves
            # from run to run (seen: 0.948 on pattern), so the lifecycle is judged at 0.93. Likewise
            # one attribute's coverage can drop by ~0.1 between the 8- and the 16-epoch model while
            # the others gain (seen: material -0.101 under a loaded CPU), so the margin is 0.2; the
            # worse model fails on writing nothing at all, far outside any margin.
            target=0.93,
            max_coverage_loss=0.2,
            log_path=log,
            progress=_quiet,
        )

    first = run_training_job(
        _cfg(tmp_path, mlflow_server, epochs=8), taxonomy, data=data["train"], client=client, progress=_quiet
    )
    decision = promote_now()
    assert decision["promote"], decision["reasons"]
    assert registry.resolve_alias(client, "test-model", registry.CHAMPION) == first.registered.version

    # a deliberately worse model: image only, few epochs -> registered as challenger, not promoted
    worse = run_training_job(
        _cfg(tmp_path, mlflow_server, fusion="image_only", epochs=1),
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

    # a better one (longer training) is promoted
    better = run_training_job(
        _cfg(tmp_path, mlflow_server, epochs=16), taxonomy, data=data["train"], client=client, progress=_quiet
    )
    decision = promote_now()
    assert decision["promote"], decision["reasons"]
    assert registry.resolve_alias(client, "test-model", registry.CHAMPION) == better.registered.version

    history = read_promotion_log(log).to_pylist()
    assert [r["promoted"] for r in history] == [True, False, True]
    assert {r["eval_version"] for r in history} == {"0"}

    # a consumer loads the champion over HTTP
    bundle = registry.load_bundle_from_uri("models:/test-model@champion")
    assert bundle.calibration.to_dict() == better.trained.calibration.to_dict()


def test_gate_rules() -> None:
    good = {
        "color": {"precision": 0.97, "coverage": 0.5, "written": 100.0},
        "material": {"precision": 0.99, "coverage": 0.6, "written": 90.0},
    }
    assert gate(good, None, target=0.95, max_coverage_loss=0.02).promote
    bad = {**good, "color": {"precision": 0.93, "coverage": 0.7, "written": 100.0}}
    result = gate(bad, None, target=0.95, max_coverage_loss=0.02)
    assert not result.promote and "FAIL color: realized precision 0.9300" in " ".join(result.reasons)
    champion = {
        "color": {"precision": 0.97, "coverage": 0.55, "written": 100.0},
        "material": {"precision": 0.99, "coverage": 0.4, "written": 90.0},
    }
    lost = gate(good, champion, target=0.95, max_coverage_loss=0.02)  # color loses 0.05 > 0.02
    assert not lost.promote and "FAIL color: coverage 0.5000 loses 0.0500" in " ".join(lost.reasons)
    assert gate(good, champion, target=0.95, max_coverage_loss=0.1).promote  # within margin, gains overall
    stronger = {a: {**m, "coverage": m["coverage"] + 0.01} for a, m in good.items()}
    flat = gate(good, stronger, target=0.95, max_coverage_loss=0.1)
    assert not flat.promote and "does not beat champion" in flat.reasons[-1]
    nothing = {a: {"precision": float("nan"), "coverage": 0.0, "written": 0.0} for a in good}
    assert not gate(nothing, None, target=0.95, max_coverage_loss=0.02).promote


@pytest.mark.timeout(300)
def test_bad_inputs_fail_before_any_registration(tmp_path: Path, data, taxonomy: Taxonomy) -> None:  # type: ignore[no-untyped-def]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = registry.configure_mlflow(uri)
    table = read_table(data["train"])
    no_material = tmp_path / "no_material"
    write_table(no_material, table.drop_columns(["material"]))
    with pytest.raises(ContractError, match=r"lacks columns \['material'\]"):
        run_training_job(_cfg(tmp_path, uri), taxonomy, data=no_material, client=client, progress=_quiet)
    extended = Taxonomy.from_dict(
        {
            "attributes": {
                **taxonomy.to_dict()["attributes"],
                "pattern": {"kind": "multiclass", "values": [*taxonomy["pattern"].values, "paisley"]},
            }
        }
    )
    with pytest.raises(TaxonomyError, match=r"never seen in the training data: \['pattern=paisley'\]"):
        run_training_job(_cfg(tmp_path, uri), extended, data=data["train"], client=client, progress=_quiet)
    assert client.search_registered_models() == []  # nothing registered by the failed runs
    with pytest.raises(CatalogEnrichError, match="does not exist"):
        promote(
            client,
            registered_model="no-such-model",
            eval_data=data["eval"],
            eval_version=None,
            target=0.95,
            max_coverage_loss=0.02,
            log_path=tmp_path / "log",
            progress=_quiet,
        )


@pytest.mark.timeout(120)
def test_unreachable_tracking_server_is_a_clear_error(tmp_path: Path, taxonomy: Taxonomy) -> None:
    client = registry.configure_mlflow(f"http://127.0.0.1:{_free_port()}")
    started = time.time()
    with pytest.raises(CatalogEnrichError, match="unreachable"):
        run_training_job(_cfg(tmp_path, "http://x"), taxonomy, data=tmp_path, client=client, progress=_quiet)
    assert time.time() - started < 90


def test_pip_requirements_are_pinned() -> None:
    reqs = registry.pip_requirements()
    assert any(r.startswith("torch==2.13.0") for r in reqs)
    assert all("==" in r for r in reqs)
    assert pa is not None
