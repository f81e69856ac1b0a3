"""``catalog-enrich bench throughput``: the job against its model's raw speed and against the plain
MLflow path.

* ``raw``: a tight loop of the model's forward pass over pre-decoded, pre-tokenized tensors at the
  model's batch size - the physical limit;
* ``predictor``: the per-batch predictor on Arrow batches (read + decode + tokenize + forward +
  decide), exactly what a Spark task runs per batch, without Spark;
* ``raw_tasks`` (CPU only): the same forward loop in one single-threaded process per core side by
  side, the layout a local Spark job scores in (one task per core, one torch thread per task);
* ``job``: the whole enrichment job as a process of its own, from interpreter start to exit (JVM
  start-up, model download, validation, scoring, MERGE, run report, MLflow run);
* ``peer`` (``--peer``): the plain MLflow path as a process of its own - ``mlflow.pyfunc.spark_udf``
  on the same registered version and products, scores written to Parquet
  (:mod:`catalog_enrichment.bench.peer`).

``raw``, ``predictor`` and ``raw_tasks`` run in this process on the first size; ``raw`` and
``predictor`` in alternating blocks of the same products, so a shared machine's drifting speed
lands on both. ``job`` and ``peer`` run at every size, alternating, a fresh interpreter and JVM per
run; the report gives medians, ``job_vs_peer`` (job wall time / peer wall time) per size and the
marginal milliseconds per product between sizes. Peak RSS and CPU seconds of each process's
driver, JVM and Python workers are sampled too.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from catalog_enrichment.catalog.lakehouse import read_table, write_table
from catalog_enrichment.config import AppConfig, InferenceConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.types import Say
from catalog_enrichment.versions import ModelVersion

__all__ = [
    "RawTasks",
    "ThroughputPlan",
    "measure_paired",
    "measure_predictor",
    "measure_raw",
    "run_throughput_benchmark",
]


def products_reader(n: int, taxonomy: Taxonomy, *, image_size: int, seed: int = 0) -> pa.RecordBatchReader:
    """``n`` valid synthetic products (no bad rows) as a stream: memory bounded by one batch."""
    import itertools

    from catalog_enrichment.config import SyntheticConfig
    from catalog_enrichment.data.synthetic import products_batches

    cfg = SyntheticConfig(products=n, seed=seed, image_size=image_size, bad_rate=0.0)
    batches = (b for b, _ in products_batches(cfg, taxonomy))
    first = next(batches)
    return pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], batches))


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def measure_raw(
    predictor: Any, table: pa.Table, *, warmup: int = 2, ready: Callable[[], Any] | None = None
) -> dict[str, float]:
    """Forward passes only, over batches prepared (decoded, tokenized, on the host) beforehand;
    ``ready`` is called after the warm-up, right before the clock starts."""
    batches = list(predictor.prepared(table))
    for batch in batches[:warmup]:
        predictor.forward(batch)
    _sync(predictor.device)
    if ready is not None:
        ready()
    started = time.perf_counter()
    for batch in batches:
        predictor.forward(batch)
    _sync(predictor.device)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "products_per_second": table.num_rows / seconds}


def measure_encoders(model: Any, batches: Sequence[Any], bundle_dir: Path, repeats: int) -> dict[str, Any]:
    """ms per product of each encoder of ``model`` alone, in PyTorch and in ONNX Runtime, over
    ``batches`` prepared beforehand (runtimes alternate: torch first in even repeats); the graphs are
    the bundle's (``model.encoder_runtime: onnx``) or exported here. CPU only."""
    import torch

    from catalog_enrichment.inference.bundle import BundleFolder
    from catalog_enrichment.models import runtime
    from catalog_enrichment.models.encoders import TextEncoder

    encoders = dict(runtime.encoders(model))
    kept = {name: e.graph for name, e in encoders.items()}
    products = sum(len(b.image_error) for b in batches)
    times: dict[str, dict[str, list[float]]] = {n: {"torch": [], "onnx": []} for n in encoders}

    def run(encoder: Any, some: Sequence[Any] = batches) -> float:
        started = time.perf_counter()
        for batch in some:
            x = batch.inputs
            if isinstance(encoder, TextEncoder):
                encoder(x["input_ids"], x["attention_mask"], x.get("token_type_ids"))
            else:
                encoder(x["pixel_values"], x["image_present"])
        return 1000 * (time.perf_counter() - started) / products

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        folder = BundleFolder(Path(bundle_dir)).onnx
        if not folder.is_dir():
            folder = runtime.export_encoders(model, tmp)
        graphs = {name: runtime.OnnxGraph(folder / f"{name}.onnx") for name in encoders}
        try:
            for r in range(repeats):
                for name, encoder in encoders.items():
                    for which in ("torch", "onnx") if r % 2 == 0 else ("onnx", "torch"):
                        encoder.graph = graphs[name] if which == "onnx" else None
                        run(encoder, batches[:1])  # warm-up: a runtime's first call sets it up
                        times[name][which].append(run(encoder))
        finally:
            for name, encoder in encoders.items():
                encoder.graph = kept[name]
    return {
        name: {which: statistics.median(t) for which, t in runs.items()} | {"runs": runs}
        for name, runs in times.items()
    }


def measure_predictor(predictor: Any, policy: Any, table: pa.Table, *, arrow_batch: int) -> dict[str, float]:
    """What one Spark task does with its Arrow batches: score + decide (``inference.spark.score_batches``)."""
    from catalog_enrichment.inference.spark import score_batch, score_batches

    forward_seconds = 0.0
    original = predictor.forward

    def timed_forward(batch: Any) -> Any:
        nonlocal forward_seconds
        t0 = time.perf_counter()
        out = original(batch)  # .cpu() inside waits for the device
        forward_seconds += time.perf_counter() - t0
        return out

    predictor.forward = timed_forward
    try:
        score_batch(
            predictor, policy, table.slice(0, min(arrow_batch, table.num_rows)).to_batches()[0]
        )  # warm-up
        forward_seconds = 0.0
        started = time.perf_counter()
        for _ in score_batches(predictor, policy, table.to_batches(max_chunksize=arrow_batch)):
            pass
        seconds = time.perf_counter() - started
    finally:
        predictor.forward = original
    return {
        "seconds": seconds,
        "products_per_second": table.num_rows / seconds,
        "forward_share": forward_seconds / seconds,
    }


def measure_paired(
    predictor: Any, policy: Any, table: pa.Table, *, arrow_batch: int, block: int
) -> tuple[dict[str, float], dict[str, float]]:
    """``raw`` and ``predictor`` over the same products, alternating in blocks of ``block`` products.

    A shared virtual machine's speed drifts by +-15 % over seconds; measuring the two modes in
    alternating blocks (raw first on even blocks, predictor first on odd ones) lets both see the same
    machine, so their ratio holds still while the absolute figures move. Each block restarts the
    predictor's pipeline (its first batch is prepared with the model idle), a small cost counted
    against the predictor.
    """
    raw = pred = forward = 0.0
    for k, start in enumerate(range(0, table.num_rows, block)):
        part = table.slice(start, block)
        for mode in ("raw", "predictor") if k % 2 == 0 else ("predictor", "raw"):
            if mode == "raw":
                raw += measure_raw(predictor, part)["seconds"]
            else:
                run = measure_predictor(predictor, policy, part, arrow_batch=arrow_batch)
                pred += run["seconds"]
                forward += run["forward_share"] * run["seconds"]
    n = table.num_rows
    return (
        {"seconds": raw, "products_per_second": n / raw},
        {"seconds": pred, "products_per_second": n / pred, "forward_share": forward / pred},
    )


# -- raw_tasks: the forward loop in one single-threaded process per core ------------------------
_TASK_STATE: dict[str, Any] = {}


def _raw_task_init(barrier: Any, bundle_dir: str, options: dict[str, Any]) -> None:
    import torch

    from catalog_enrichment.inference.bundle import load_bundle
    from catalog_enrichment.inference.predictor import BatchPredictor, PredictorOptions

    torch.set_num_threads(1)
    bundle = load_bundle(bundle_dir, device="cpu")
    _TASK_STATE.update(
        barrier=barrier, predictor=BatchPredictor(bundle, PredictorOptions(**options), device="cpu")
    )


def _raw_task(part: pa.Table) -> float:
    """Seconds of this process's forward loop over ``part``, started with its siblings'."""
    return measure_raw(_TASK_STATE["predictor"], part, ready=_TASK_STATE["barrier"].wait)["seconds"]


class RawTasks:
    """``processes`` spawned processes, each with the model loaded and one torch thread."""

    def __init__(self, bundle_dir: Path, options: dict[str, Any], processes: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # no fork of a process with OpenMP threads
        self.processes = processes
        self._pool = ProcessPoolExecutor(
            processes,
            mp_context=ctx,
            initializer=_raw_task_init,
            initargs=(ctx.Barrier(processes, timeout=600), str(bundle_dir), options),
        )

    def measure(self, table: pa.Table) -> dict[str, float]:
        """All processes run their share of ``table`` at once; products/s over the slowest."""
        share = -(-table.num_rows // self.processes)
        parts = [table.slice(i * share, share) for i in range(self.processes)]
        seconds = max(self._pool.map(_raw_task, parts))
        return {"seconds": seconds, "products_per_second": table.num_rows / seconds}

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _RssSampler:
    """Peak RSS of the child driver process and of every PySpark Python worker or distributed
    training rank (a ``torchrun`` child), sampled every 0.2 s, and the CPU seconds the driver, the
    JVM and the Python workers used between enter and exit."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.driver_peak = 0
        self.workers: dict[int, int] = {}
        self._first: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds when first seen)
        self._last: dict[int, float] = {}
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        for proc in self._psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(proc.cmdline())
                times = proc.cpu_times()
                rss = proc.memory_info().rss
            except self._psutil.Error:
                continue
            if "pyspark.daemon" in cmd or "pyspark.worker" in cmd or _is_rank(cmd):
                kind = "python_workers"
                self.workers[proc.pid] = max(self.workers.get(proc.pid, 0), rss)
            elif "java" in cmd:
                kind = "jvm"
            elif "torch_run_process_wrapper" in cmd or "torch.distributed.run" in cmd:
                continue  # torchrun's launchers: they only wait for the ranks
            elif "python" in cmd:
                kind = "driver"
                self.driver_peak = max(self.driver_peak, rss)
            else:
                continue
            # processes there at enter count from then; later ones (new workers) from their start. The
            # kind is the latest: spark-submit's launcher script becomes the JVM under the same pid.
            first = self._first.get(proc.pid, (kind, 0.0 if self._started else times.user + times.system))[1]
            self._first[proc.pid] = (kind, first)
            self._last[proc.pid] = times.user + times.system

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    @property
    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds per kind of process (a process that ended between samples counts to its last)."""
        out = {"driver": 0.0, "jvm": 0.0, "python_workers": 0.0}
        for pid, (kind, first) in self._first.items():
            out[kind] += self._last[pid] - first
        return out

    def __enter__(self) -> _RssSampler:
        self._sample()  # the processes that exist now count from here
        self._started = True
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class _Model:
    predictor: Any
    policy: Any


def _load(bundle_dir: Path, taxonomy: Taxonomy, inference: InferenceConfig, device: str) -> _Model:
    from catalog_enrichment.inference.bundle import load_bundle
    from catalog_enrichment.inference.decide import DecisionPolicy
    from catalog_enrichment.inference.predictor import BatchPredictor, PredictorOptions

    bundle = load_bundle(bundle_dir, device=device)
    options = PredictorOptions(**inference.predictor_options())
    predictor = BatchPredictor(bundle, options, device=device)
    return _Model(predictor, DecisionPolicy(bundle.taxonomy, bundle.calibration, taxonomy))


def _median(runs: Sequence[dict[str, Any]], key: str = "products_per_second") -> float:
    return float(statistics.median(r[key] for r in runs))


def process_commands(
    master: str,
    model: ModelVersion,
    products: Path,
    root: Path,
    config_args: Sequence[str],
    rescore: ModelVersion | None = None,
) -> dict[str, list[str]]:
    """The whole processes compared, as spark-submit would start them: the enrichment job
    (``catalog-enrich enrich --full``, into a fresh catalog under ``root``), the job again with the
    ``rescore`` version on that catalog (its embedding store filled by the first), and the plain
    MLflow path (:mod:`catalog_enrichment.bench.peer`, serving ``rescore`` when given, on Spark
    ``master``), on the same products."""

    def job(version: ModelVersion) -> list[str]:
        return [
            sys.executable, "-m", "catalog_enrichment.cli", "enrich", "--full", "--model-uri", version.uri,
            "--catalog", str(root / "catalog"), "--products", str(products), *config_args,
        ]  # fmt: skip

    served = rescore or model
    return {
        "job": job(model),
        "rescore": job(served),
        "peer": [
            sys.executable, "-m", "catalog_enrichment.bench.peer", "--model-uri", served.uri,
            "--products", str(products), "--out", str(root / "scores"), "--master", master,
        ],
    }  # fmt: skip


def _is_rank(cmd: str) -> bool:
    """A rank TorchDistributor's torchrun started: Python running its generated ``train.py``."""
    launcher = "torch.distributed.run" in cmd or "torch_run_process_wrapper" in cmd
    return "python" in cmd and cmd.endswith("/train.py") and not launcher


def measure_process(command: Sequence[str], env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Wall time of one whole process from start to exit, its processes' CPU seconds and peak RSS."""
    with _RssSampler() as usage:
        started = time.perf_counter()
        proc = subprocess.run(list(command), env=env, cwd=workdir, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise CatalogEnrichError(
            f"{' '.join(command[:4])} ... exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return {
        "seconds": seconds,
        "cpu_seconds": {k: round(v, 2) for k, v in usage.cpu_seconds.items()},
        "driver_peak_rss_mb": usage.driver_peak / 2**20,
        "worker_peak_rss_mb": max(usage.workers.values(), default=0) / 2**20,
    }


@dataclass(frozen=True)
class ThroughputPlan:
    """What ``bench throughput`` measures: ``model`` (and ``rescore``, a head re-scoring the store
    the job filled) on tables of ``sizes`` products in ``modes``, ``repeats`` times each, on
    ``device`` with ``threads`` torch threads (None: torch's default); ``block`` products per call
    in the raw modes; ``config_args`` are the whole processes' config flags."""

    model: ModelVersion
    sizes: Sequence[int]
    modes: Sequence[str] = ("raw", "predictor", "job")
    rescore: ModelVersion | None = None
    repeats: int = 3
    device: str = "cpu"
    threads: int | None = None
    block: int = 2048
    config_args: Sequence[str] = ()


def run_throughput_benchmark(
    cfg: AppConfig,
    taxonomy: Taxonomy,
    plan: ThroughputPlan,
    *,
    workdir: Path,
    progress: Say | None = None,
) -> dict[str, Any]:
    """Measure the plan's modes ``plan.repeats`` times each and report medians and ratios.

    ``raw`` and ``predictor`` run in this process on the first size, paired (:func:`measure_paired`);
    ``job`` and ``peer`` run as whole processes at every size, alternating (job first in even
    repeats, peer first in odd ones), each into a fresh folder.
    """
    import torch

    say = progress or (lambda m: print(m, flush=True))
    model, sizes, device = plan.model, plan.sizes, plan.device
    processes = _check_modes(plan.modes, model, device)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    workdir.mkdir(parents=True, exist_ok=True)
    size = _image_size(model.bundle)
    result: dict[str, Any] = {
        "sizes": list(sizes),
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "torch_threads": torch.get_num_threads(),
        "batch_size": cfg.inference.batch_size,
        "arrow_batch": cfg.spark.arrow_max_records_per_batch,
        "model": f"{model.name} v{model.version}",
        "runs": {},
    }
    in_process = [m for m in plan.modes if m not in processes]
    if in_process:  # the same products as the first size's whole-process runs
        table = read_table(_products_table(workdir, sizes[0], size, taxonomy, say))
        result.update(_in_process(cfg, taxonomy, plan, table, in_process, say))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri,
        "MLFLOW_REGISTRY_URI": cfg.mlflow.registry_uri or cfg.mlflow.tracking_uri,
    }
    for n in sizes if processes else ():
        path = _products_table(workdir, n, size, taxonomy, say)
        runs = _processes(cfg.spark.master, plan, path, processes, env, workdir, say)
        result["runs"][str(n)] = runs
        for mode in processes:
            result[f"{mode}_seconds_{n}"] = _median(runs[mode], "seconds")
    return {**result, **_ratios(result, sizes, processes)}


def _ratios(result: dict[str, Any], sizes: Sequence[int], processes: list[str]) -> dict[str, float]:
    """Each process against the peer, and the cost of one more product (the slope between sizes)."""
    out: dict[str, float] = {}
    for n in sizes if "peer" in processes else ():
        for timed in (m for m in ("job", "rescore") if m in processes):
            out[f"{timed}_vs_peer_{n}"] = result[f"{timed}_seconds_{n}"] / result[f"peer_seconds_{n}"]
    for before, after in itertools.pairwise(sizes):
        for mode in processes:
            slope = (result[f"{mode}_seconds_{after}"] - result[f"{mode}_seconds_{before}"]) / (
                after - before
            )
            out[f"{mode}_marginal_ms_per_product_{before}_{after}"] = 1000 * slope
    return out


def _check_modes(modes: Sequence[str], model: ModelVersion, device: str) -> list[str]:
    """The modes that run as whole processes (job, rescore, peer).

    Raises:
        CatalogEnrichError: raw_tasks off the CPU, or whole processes without a registered model.
    """
    if "raw_tasks" in modes and device != "cpu":
        raise CatalogEnrichError("raw_tasks measures the job's CPU layout: device cpu only")
    processes = [m for m in ("job", "rescore", "peer") if m in modes]
    if (processes and not model.name) or ("peer" in modes and "job" not in modes):
        raise CatalogEnrichError("job and peer time whole processes on a registered model: give both")
    return processes


def _processes(
    master: str,
    plan: ThroughputPlan,
    path: Path,
    processes: list[str],
    env: dict[str, str],
    workdir: Path,
    say: Say,
) -> dict[str, list[dict[str, Any]]]:
    """The whole-process runs on the products at ``path``: the plan's repeats of each mode, alternating -
    the peer after the job in even repeats, before it in odd ones; a re-score always right after its
    job (it reads the store that run filled) - each into a fresh folder."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in processes}
    repeats = plan.repeats
    for r in range(repeats):
        groups = [[m for m in processes if m != "peer"], [m for m in processes if m == "peer"]]
        root = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
        commands = process_commands(master, plan.model, path.resolve(), root, plan.config_args, plan.rescore)
        for mode in itertools.chain(*(groups if r % 2 == 0 else groups[::-1])):
            run = measure_process(commands[mode], env, workdir)
            runs[mode].append(run)
            n = path.name
            say(f"  {n}, run {r + 1}/{repeats} {mode:<7} {run['seconds']:6.1f}s")
        shutil.rmtree(root, ignore_errors=True)
    return runs


def _products_table(workdir: Path, n: int, size: int, taxonomy: Taxonomy, say: Say) -> Path:
    """``n`` valid products at ``size`` px as a Delta table under ``workdir``, generated once."""
    path = workdir / f"products-{n}-{size}px"
    if not path.exists():
        say(f"generating {n:,} products ({size} px) ...")
        # streamed: memory bounded by one batch, not by n generated images
        write_table(path, products_reader(n, taxonomy, image_size=size, seed=n), partition_by=["ingest_date"])
    return path


def _in_process(
    cfg: AppConfig, taxonomy: Taxonomy, plan: ThroughputPlan, table: pa.Table, modes: Sequence[str], say: Say
) -> dict[str, Any]:
    """``modes`` (``raw``, ``predictor``, ``raw_tasks``, ``encoders``) over ``table`` in this process:
    medians and ratios."""
    model, repeats, device, block = plan.model, plan.repeats, plan.device, plan.block
    loaded = _load(model.bundle, taxonomy, cfg.inference, device)
    arrow_batch = cfg.spark.arrow_max_records_per_batch
    paired = "raw" in modes and "predictor" in modes
    tasks = None
    if "raw_tasks" in modes:
        cores = cfg.spark.local_cores()
        say(f"starting {cores} single-threaded model processes for raw_tasks ...")
        tasks = RawTasks(model.bundle, cfg.inference.predictor_options(), cores)
    out: dict[str, Any] = {"in_process_products": table.num_rows}
    if "encoders" in modes:
        if device != "cpu":
            raise CatalogEnrichError("encoders compares the CPU runtimes: device cpu only")
        say("timing each encoder in torch and in onnx ...")
        batches = list(loaded.predictor.prepared(table))
        out["encoders_ms_per_product"] = measure_encoders(
            loaded.predictor.bundle.model, batches, model.bundle, repeats
        )
        for name, figures in out["encoders_ms_per_product"].items():
            say(f"  {name:<18} torch {figures['torch']:7.2f}  onnx {figures['onnx']:7.2f} ms/product")
        modes = [m for m in modes if m != "encoders"]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    try:
        for r in range(repeats):
            done = _one_repeat(loaded, table, modes, tasks, arrow_batch, block)
            for mode in modes:
                runs[mode].append(done[mode])
                say(f"  run {r + 1}/{repeats} {mode:<9} {done[mode]['products_per_second']:8.1f} products/s")
    finally:
        if tasks is not None:
            tasks.close()
    out["in_process_runs"] = runs
    for mode in modes:
        rate = _median(runs[mode])
        out[f"{mode}_products_per_second"] = rate
        out[f"{mode}_ms_per_product"] = 1000 / rate
    if paired:
        out["predictor_ratio"] = out["predictor_products_per_second"] / out["raw_products_per_second"]
        out["predictor_forward_share"] = _median(runs["predictor"], "forward_share")
    return out


def _one_repeat(
    loaded: Any, table: pa.Table, modes: Sequence[str], tasks: RawTasks | None, arrow_batch: int, block: int
) -> dict[str, dict[str, Any]]:
    """One measurement of each in-process mode (raw and predictor paired when both are asked)."""
    done: dict[str, dict[str, Any]] = {}
    if "raw" in modes and "predictor" in modes:
        done["raw"], done["predictor"] = measure_paired(
            loaded.predictor, loaded.policy, table, arrow_batch=arrow_batch, block=block
        )
    for mode in modes:
        if mode in done:
            continue
        if mode == "raw":
            done[mode] = measure_raw(loaded.predictor, table)
        elif mode == "predictor":
            done[mode] = measure_predictor(loaded.predictor, loaded.policy, table, arrow_batch=arrow_batch)
        else:
            assert tasks is not None
            done[mode] = tasks.measure(table)
    return done


def _image_size(bundle_dir: Path) -> int:
    from catalog_enrichment.inference.bundle import BundleFolder

    meta = BundleFolder(Path(bundle_dir)).read_meta()
    prep = meta.get("image_preprocessing")
    return int(prep["size"] if prep else meta["model"]["image"]["image_size"])
