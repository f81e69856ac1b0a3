"""Distributed training under TorchDistributor on this machine (local mode, two gloo ranks): the same
model for the same seed and process count, and a rank that dies fails the training job with one
line, registering nothing. (The standalone cluster's runs: tests/deploy/test_cluster.py.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from catalog_enrichment.catalog.lakehouse import write_table
from catalog_enrichment.config import SyntheticConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.synthetic import products_batches
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.training.distributed import RANK_FAULT_ENV, _root_cause, train_streaming
from catalog_enrichment.training.stream import table_source
from tests.conftest import tiny_config
from tests.training.test_stream import _digest

TORCHRUN_FAILURE = """
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 11)
Root Cause (first observed failure):
[0]:
  time      : 2026-11-24_07:57:27
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 16419)  (SIGKILL)
  traceback : Signal 9 (SIGKILL) received by PID 16419
"""


def test_the_failure_named_is_torchruns_root_cause() -> None:
    assert _root_cause(TORCHRUN_FAILURE) == "rank 1 ended with signal SIGKILL"
    assert _root_cause(
        TORCHRUN_FAILURE.replace("  (SIGKILL)", "").replace("-9", "3").replace("Signal 9 (SIGKILL)", "")
    ) == ("rank 1 ended with exit code 3")
    assert _root_cause("pyspark.errors.PythonException: RuntimeError: gloo connection closed") == (
        "pyspark.errors.PythonException: RuntimeError: gloo connection closed"
    )


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, taxonomy: Taxonomy) -> Path:
    path = tmp_path_factory.mktemp("distributed") / "labelled"
    cfg = SyntheticConfig(products=1500, seed=1, image_size=32)
    write_table(path, pa.Table.from_batches([b for b, _ in products_batches(cfg, taxonomy)]))
    return path


def _cfg():  # type: ignore[no-untyped-def]
    training = {"streaming": {"enabled": True, "batch_rows": 256}, "distributed": {"processes": 2}}
    return tiny_config(epochs=2, training=training)


@pytest.mark.spark
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_train_the_same_model_for_the_same_seed(spark, labelled: Path, taxonomy: Taxonomy) -> None:  # type: ignore[no-untyped-def]
    first = train_streaming(table_source(labelled), taxonomy, _cfg())
    second = train_streaming(table_source(labelled), taxonomy, _cfg())
    assert _digest(first) == _digest(second)
    assert first.history[1].train_loss < first.history[0].train_loss


@pytest.mark.spark
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_rank_that_dies_fails_the_job_with_one_line_and_registers_nothing(  # type: ignore[no-untyped-def]
    spark, labelled: Path, taxonomy: Taxonomy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from catalog_enrichment import registry
    from catalog_enrichment.training.job import run_training_job

    client = registry.configure_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(RANK_FAULT_ENV, "1:2")  # rank 1 SIGKILLs itself at its second step
    with pytest.raises(CatalogEnrichError) as failed:
        run_training_job(_cfg(), taxonomy, data=labelled, client=client, progress=lambda _m: None)
    message = str(failed.value)
    assert message == (
        "distributed training failed (2 processes on this machine): rank 1 ended with signal SIGKILL; "
        "nothing was registered"
    )
    assert client.search_registered_models() == []
