"""Distributed training under TorchDistributor on this machine (local mode, two gloo ranks): the same
model for the same seed and process count, and a rank that dies fails the training job with one
line, registering nothing; BatchNorm over two ranks' halves of a batch is BatchNorm over the batch.
(The standalone cluster's runs: tests/deploy/test_cluster.py.)"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from catalog_enrichment.catalog.lakehouse import write_table
from catalog_enrichment.config import SyntheticConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.synthetic import products_batches
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.faults import FAULT_ENV
from catalog_enrichment.training.distributed import (
    _executor_device,
    _fit_distributed,
    _RankJob,
    _root_cause,
    global_batch_norm,
)
from catalog_enrichment.training.fit import _rank0_score
from catalog_enrichment.training.pipeline import train
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
    cfg = SyntheticConfig(products=600, seed=1, image_size=32)
    write_table(path, pa.Table.from_batches([b for b, _ in products_batches(cfg, taxonomy)]))
    return path


def _cfg():  # type: ignore[no-untyped-def]
    training = {"streaming": {"enabled": True, "batch_rows": 256}, "distributed": {"processes": 2}}
    return tiny_config(epochs=2, training=training)


@pytest.mark.spark
def _norm_layers() -> torch.nn.Sequential:
    """torch's BatchNorm and timm's BatchNormAct (what the tiny model's byobnet uses), seeded."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.BatchNorm2d(3), BatchNormAct2d(3))
    for norm in layers:
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
        torch.nn.init.uniform_(norm.bias, -0.5, 0.5)
    return layers


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 32 rows and the weights of the loss (sum of weighted outputs)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 3, 4, 4, generator=g) * 3 + 1, torch.randn(32, 3, 4, 4, generator=g)


def _norm_step(layers: torch.nn.Sequential, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training-mode forward and backward: the output, the input's and weights' gradients, the
    running statistics."""
    x = x.clone().requires_grad_(True)
    out = layers(x)
    (out * w).sum().backward()
    grads = {f"grad.{k}": p.grad for k, p in layers.named_parameters()}
    return {"out": out.detach(), "grad.x": x.grad, **grads, **layers.state_dict()}  # type: ignore[dict-item]


def _norm_rank(rank: int, init: str, out: str) -> None:
    """Rank ``rank`` of two (gloo): its half of the batch through :func:`global_batch_norm`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        x, w = _rows()
        half = slice(16 * rank, 16 * (rank + 1))
        with global_batch_norm():
            step = _norm_step(_norm_layers(), x[half], w[half])
        torch.save(step, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn_two(rank_main: Callable[[int, str, str], None], out: Path) -> None:
    """``rank_main(rank, init, out)`` in two spawned gloo ranks meeting at a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(rank_main, args=(f"tcp://127.0.0.1:{port}", str(out)), nprocs=2)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_batch_norm_over_two_ranks_halves_is_batch_norm_over_the_batch(tmp_path: Path) -> None:
    _spawn_two(_norm_rank, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = _norm_step(_norm_layers(), *_rows())
    assert torch.allclose(torch.cat([r["out"] for r in ranks]), one["out"], atol=1e-5)
    assert torch.allclose(torch.cat([r["grad.x"] for r in ranks]), one["grad.x"], atol=1e-5)
    for key in one:
        if key.startswith("grad.") and key != "grad.x":  # a weight's gradient: DDP sums the ranks'
            assert torch.allclose(ranks[0][key] + ranks[1][key], one[key], atol=1e-4), key
        elif key != "out" and not key.startswith("grad."):  # the running statistics, on each rank
            assert all(torch.allclose(r[key].float(), one[key].float(), atol=1e-6) for r in ranks), key
    x, w = _rows()
    own = _norm_step(_norm_layers(), x[:16], w[:16])  # a half normalised on its own differs
    assert not torch.allclose(ranks[0]["out"], own["out"], atol=1e-2)
    # evaluation mode and the original function are untouched
    import torch.nn.functional as F

    before = F.batch_norm
    with global_batch_norm():
        layers = _norm_layers().eval()
        assert torch.equal(layers(_rows()[0]), _norm_layers().eval()(_rows()[0]))
    assert F.batch_norm is before


def _score_rank(rank: int, init: str, out: str) -> None:
    """Rank ``rank`` of two (gloo): its own validation score, a bit apart from the other's, agreed."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        agreed = [_rank0_score(torch.nn.Linear(1, 1), 0.5 + rank * 1e-7 + epoch) for epoch in range(2)]
        torch.save(agreed, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_rank_stops_on_rank_0s_validation_score(tmp_path: Path) -> None:
    """Ranks whose validation scores differ in the last bits (algorithms torch cannot make
    deterministic) each act on rank 0's: one stopping while the other trains on would hang it."""
    _spawn_two(_score_rank, tmp_path)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == [[0.5, 1.5], [0.5, 1.5]]
    assert _rank0_score(torch.nn.Linear(1, 1), 0.25) == 0.25  # no process group: its own


def test_ranks_on_the_executors_use_the_gpus_spark_gives_their_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/spark/k8s.conf: GPUs on the executors only. ``device: auto`` resolves to the CPU on the
    driver; the ranks on the executors train on the GPU each task is given."""
    from types import SimpleNamespace

    import pyspark.ml.torch.distributor
    from pyspark.sql import SparkSession

    assert _executor_device("auto", "1") == "cuda"
    assert _executor_device("auto", "0") == _executor_device("auto", None) == "cpu"
    assert _executor_device("cpu", "1") == "cpu"
    assert _executor_device("cuda", "1") == "cuda"
    made: list[dict[str, object]] = []

    class Distributor:
        def __init__(self, **kwargs: object) -> None:
            made.append(kwargs)

        def run(self, main: object, job: _RankJob) -> tuple[dict[str, torch.Tensor], str]:
            return {}, job.device

    conf = {"spark.task.resource.gpu.amount": "1"}
    session = SimpleNamespace(conf=SimpleNamespace(get=lambda key, default=None: conf.get(key, default)))
    monkeypatch.setattr(pyspark.ml.torch.distributor, "TorchDistributor", Distributor)
    monkeypatch.setattr(SparkSession, "active", classmethod(lambda cls: session))
    job = _RankJob(None, tiny_config(), None, (0.1, 0.1, 0.1), 1, None, 2, "cpu", (1, 1), ())  # type: ignore[arg-type]
    assert job.cfg.inference.device == "auto"
    assert _fit_distributed(job, local_mode=False) == ({}, "cuda")
    assert _fit_distributed(job, local_mode=True) == ({}, "cpu")  # on the driver: its own device
    assert [m["use_gpu"] for m in made] == [True, False]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_train_the_same_model_for_the_same_seed(spark, labelled: Path, taxonomy: Taxonomy) -> None:  # type: ignore[no-untyped-def]
    first = train(table_source(labelled), taxonomy, _cfg())
    second = train(table_source(labelled), taxonomy, _cfg())
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
    monkeypatch.setenv(FAULT_ENV, "rank:1:2")  # rank 1 SIGKILLs itself at its second step
    with pytest.raises(CatalogEnrichError) as failed:
        run_training_job(_cfg(), taxonomy, data=labelled, client=client, progress=lambda _m: None)
    message = str(failed.value)
    assert message == (
        "distributed training failed (2 processes on this machine): rank 1 ended with signal SIGKILL; "
        "nothing was registered"
    )
    assert client.search_registered_models() == []
