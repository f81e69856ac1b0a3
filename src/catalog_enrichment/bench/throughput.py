"""``catalog-enrich bench throughput``: the job against the raw speed of its own model.

In one run, on the same model, device and number of threads:

* ``raw``: a tight loop of the model's forward pass over pre-decoded, pre-tokenized tensors at the
  model's batch size - the ceiling;
* ``predictor``: the per-batch predictor on Arrow batches (read + decode + tokenize + forward +
  decide), exactly what a Spark task runs per batch, without Spark;
* ``job``: the whole enrichment run from reading the products table to the committed MERGE and
  the run report, excluding only JVM start-up (the SparkSession exists before the clock starts);
* ``raw_tasks`` (CPU only, a diagnostic): the same forward loop in one single-threaded process per
  core side by side, the layout a local Spark job scores in (one task per core, one torch thread
  per task). On a small model one process with two intra-op threads can be far less efficient than
  two processes with one each, and how much less depends on the machine's load (a shared virtual
  machine's vCPUs stall each other at every intra-op barrier), so ``job_ratio_to_raw_tasks`` says
  what Spark costs apart from the threading layout.

``predictor_ratio`` = predictor / raw and ``job_ratio`` = job / raw (medians of products per
second). ``raw`` and ``predictor`` are measured in alternating blocks of the same products so that a
shared machine's drifting speed does not land on one of them only. Peak RSS
is sampled for the driver and for each Python worker during the job, and the CPU seconds the driver,
the JVM and the Python workers use over it. ``--sweep`` runs the job at
4k, 16k and 64k products for time per product and peak worker memory.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.errors import CatalogEnrichError

__all__ = [
    "RawTasks",
    "make_products",
    "measure_paired",
    "measure_predictor",
    "measure_raw",
    "run_throughput_benchmark",
]

Say = Callable[[str], None]


def products_reader(n: int, taxonomy: Taxonomy, *, image_size: int, seed: int = 0) -> pa.RecordBatchReader:
    """``n`` valid synthetic products (no bad rows) as a stream: memory bounded by one batch."""
    import itertools

    from catalog_enrichment.config import SyntheticConfig
    from catalog_enrichment.data.synthetic import products_batches

    cfg = SyntheticConfig(products=n, seed=seed, image_size=image_size, bad_rate=0.0)
    batches = (b for b, _ in products_batches(cfg, taxonomy))
    first = next(batches)
    return pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], batches))


def make_products(n: int, taxonomy: Taxonomy, *, image_size: int, seed: int = 0) -> pa.Table:
    """``n`` valid synthetic products (no bad rows) in memory."""
    return products_reader(n, taxonomy, image_size=image_size, seed=seed).read_all()


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
    from catalog_enrichment.inference.predictor import BatchPredictor

    torch.set_num_threads(1)
    bundle = load_bundle(bundle_dir, device="cpu")
    _TASK_STATE.update(barrier=barrier, predictor=BatchPredictor(bundle, device="cpu", **options))


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
    """Peak RSS of this process and of every PySpark Python worker, sampled every 0.2 s, and the CPU
    seconds the driver, the JVM and the Python workers used between enter and exit."""

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
        me = self._psutil.Process()
        self.driver_peak = max(self.driver_peak, me.memory_info().rss)
        for proc in [me, *me.children(recursive=True)]:
            try:
                cmd = " ".join(proc.cmdline())
                times = proc.cpu_times()
                rss = proc.memory_info().rss
            except self._psutil.Error:
                continue
            if proc.pid == me.pid:
                kind = "driver"
            elif "pyspark.daemon" in cmd or "pyspark.worker" in cmd:
                kind = "python_workers"
                self.workers[proc.pid] = max(self.workers.get(proc.pid, 0), rss)
            elif "java" in cmd:
                kind = "jvm"
            else:
                continue
            # processes there at enter count from then; later ones (new workers) from their start
            self._first.setdefault(proc.pid, (kind, 0.0 if self._started else times.user + times.system))
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


def measure_job(
    spark: Any, cfg: AppConfig, taxonomy: Taxonomy, model: Any, products: Path, workdir: Path
) -> dict[str, Any]:
    """One full enrichment run into a fresh catalog; wall time from the first read to the report."""
    from catalog_enrichment.enrich import run_enrichment

    root = Path(tempfile.mkdtemp(prefix="catalog-", dir=workdir))
    run_cfg = cfg.model_copy(update={"catalog": cfg.catalog.model_copy(update={"root": str(root)})})
    with _RssSampler() as rss:
        started = time.perf_counter()
        outcome = run_enrichment(
            spark, run_cfg, taxonomy, model=model, products=products, full=True, progress=lambda m: None
        )
        seconds = time.perf_counter() - started
    report = outcome.report
    shutil.rmtree(root, ignore_errors=True)  # the catalog was only written to be timed
    return {
        "seconds": seconds,
        "products_per_second": report["rows_scored"] / seconds,
        "rows_scored": report["rows_scored"],
        "stage_seconds": report["stage_seconds"],
        "driver_peak_rss_mb": rss.driver_peak / 2**20,
        "worker_peak_rss_mb": {str(pid): v / 2**20 for pid, v in rss.workers.items()},
        "cpu_seconds": {k: round(v, 2) for k, v in rss.cpu_seconds.items()},
        "model_loads": sum(outcome.model_loads.values()),
    }


@dataclass
class _Model:
    predictor: Any
    policy: Any


def _load(bundle_dir: Path, taxonomy: Taxonomy, cfg: AppConfig, device: str, autocast: bool) -> _Model:
    from catalog_enrichment.inference.bundle import load_bundle
    from catalog_enrichment.inference.decide import DecisionPolicy
    from catalog_enrichment.inference.predictor import BatchPredictor

    bundle = load_bundle(bundle_dir, device=device)
    predictor = BatchPredictor(
        bundle, device=device, **{**cfg.inference.predictor_options(), "autocast": autocast}
    )
    return _Model(predictor, DecisionPolicy(bundle.taxonomy, bundle.calibration, taxonomy))


def _median(runs: Sequence[dict[str, Any]], key: str = "products_per_second") -> float:
    return float(statistics.median(r[key] for r in runs))


def run_throughput_benchmark(
    cfg: AppConfig,
    taxonomy: Taxonomy,
    *,
    model: Any,
    products: int,
    workdir: Path,
    modes: Sequence[str] = ("raw", "predictor", "job"),
    repeats: int = 3,
    device: str = "cpu",
    threads: int | None = None,
    spark: Any = None,
    sweep: Sequence[int] = (),
    block: int = 2048,
    progress: Say | None = None,
) -> dict[str, Any]:
    """Measure the modes ``repeats`` times each and report medians and ratios.

    ``raw`` and ``predictor`` run paired (:func:`measure_paired`, blocks of ``block`` products);
    the job runs after them in each repeat.
    """
    import torch

    say = progress or (lambda m: print(m, flush=True))
    if "raw_tasks" in modes and device != "cpu":
        raise CatalogEnrichError("raw_tasks measures the job's CPU layout: device cpu only")
    if threads:
        torch.set_num_threads(threads)
    workdir.mkdir(parents=True, exist_ok=True)
    size = _image_size(model.bundle_dir)
    say(f"generating {products:,} products ({size} px) ...")
    table = make_products(products, taxonomy, image_size=size)
    result: dict[str, Any] = {
        "products": products,
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "torch_threads": torch.get_num_threads(),
        "batch_size": cfg.inference.batch_size,
        "arrow_batch": cfg.spark.arrow_max_records_per_batch,
        "model": f"{model.name} v{model.version}",
        "runs": {m: [] for m in modes},
    }
    loaded = _load(model.bundle_dir, taxonomy, cfg, device, cfg.inference.autocast)
    table_path = None
    if "job" in modes or sweep:
        from catalog_enrichment.catalog.lakehouse import write_table

        table_path = workdir / f"products-{products}"
        if not table_path.exists():
            write_table(table_path, table, partition_by=["ingest_date"])
    arrow_batch = cfg.spark.arrow_max_records_per_batch
    paired = "raw" in modes and "predictor" in modes
    if paired:
        result["paired_block"] = block
    tasks = None
    if "raw_tasks" in modes:
        processes = spark.sparkContext.defaultParallelism if spark is not None else os.cpu_count() or 1
        say(f"starting {processes} single-threaded model processes for raw_tasks ...")
        tasks = RawTasks(model.bundle_dir, cfg.inference.predictor_options(), processes)
        result["raw_tasks_processes"] = processes
    try:
        for r in range(repeats):
            runs: dict[str, dict[str, Any]] = {}
            if paired:
                runs["raw"], runs["predictor"] = measure_paired(
                    loaded.predictor, loaded.policy, table, arrow_batch=arrow_batch, block=block
                )
            for mode in modes:
                if mode in runs:
                    pass  # measured paired above
                elif mode == "raw":
                    runs[mode] = measure_raw(loaded.predictor, table)
                elif mode == "predictor":
                    runs[mode] = measure_predictor(
                        loaded.predictor, loaded.policy, table, arrow_batch=arrow_batch
                    )
                elif mode == "raw_tasks":
                    assert tasks is not None
                    runs[mode] = tasks.measure(table)
                else:
                    assert spark is not None and table_path is not None
                    runs[mode] = measure_job(spark, cfg, taxonomy, model, table_path, workdir)
                result["runs"][mode].append(runs[mode])
                rate, secs = runs[mode]["products_per_second"], runs[mode]["seconds"]
                say(f"  run {r + 1}/{repeats} {mode:<9} {rate:8.1f} products/s ({secs:.1f}s)")
    finally:
        if tasks is not None:
            tasks.close()
    medians = {m: _median(result["runs"][m]) for m in modes}
    result.update({f"{m}_products_per_second": v for m, v in medians.items()})
    if "raw" in medians:
        for m in ("predictor", "job"):
            if m in medians:
                result[f"{m}_ratio"] = medians[m] / medians["raw"]

    def per_run(mode: str, base: str) -> list[float]:
        # each run against the base run just before it (the machine's speed drifts)
        return [
            m["products_per_second"] / b["products_per_second"]
            for b, m in zip(result["runs"][base], result["runs"][mode], strict=True)
        ]

    if "raw_tasks" in medians and "job" in medians:
        result["job_ratio_to_raw_tasks"] = medians["job"] / medians["raw_tasks"]
        result["job_ratio_to_raw_tasks_per_run"] = per_run("job", "raw_tasks")
    if "raw" in modes and "job" in modes:
        result["job_ratio_per_run"] = per_run("job", "raw")
    if paired:
        result["predictor_ratio_per_run"] = per_run("predictor", "raw")
    if "predictor" in modes:
        result["predictor_forward_share"] = _median(result["runs"]["predictor"], "forward_share")
    if "job" in modes:
        best = min(result["runs"]["job"], key=lambda r: abs(r["products_per_second"] - medians["job"]))
        result["job_stage_seconds"] = best["stage_seconds"]
        result["job_cpu_seconds"] = best["cpu_seconds"]  # who used the cores: driver, JVM, workers
        result["driver_peak_rss_mb"] = max(r["driver_peak_rss_mb"] for r in result["runs"]["job"])
        result["worker_peak_rss_mb"] = max(
            (v for r in result["runs"]["job"] for v in r["worker_peak_rss_mb"].values()), default=None
        )
    if device != "cpu" and "predictor" in modes:
        fp32 = _load(model.bundle_dir, taxonomy, cfg, device, autocast=False)
        fp32_runs = [
            measure_predictor(
                fp32.predictor, fp32.policy, table, arrow_batch=cfg.spark.arrow_max_records_per_batch
            )
            for _ in range(repeats)
        ]
        result["predictor_fp32_products_per_second"] = _median(fp32_runs)
        result["bf16_speedup"] = medians["predictor"] / result["predictor_fp32_products_per_second"]
    if sweep:
        result["sweep"] = []
        for n in sweep:
            from catalog_enrichment.catalog.lakehouse import write_table

            path = workdir / f"products-{n}"
            if not path.exists():
                say(f"generating {n:,} products for the sweep ...")
                # streamed: the sweep's driver memory is the job's, not that of 64k generated images
                write_table(
                    path, products_reader(n, taxonomy, image_size=size, seed=n), partition_by=["ingest_date"]
                )
            job = measure_job(spark, cfg, taxonomy, model, path, workdir)
            result["sweep"].append(
                {
                    "products": n,
                    "seconds": job["seconds"],
                    "ms_per_product": 1000 * job["seconds"] / n,
                    "worker_peak_rss_mb": max(job["worker_peak_rss_mb"].values(), default=None),
                    "driver_peak_rss_mb": job["driver_peak_rss_mb"],
                }
            )
            say(f"  sweep {n:>6,}: {1000 * job['seconds'] / n:.2f} ms/product")
        # the cost of each further product between sizes: flat when the job is linear in N
        # (time per product alone also falls as the fixed cost of a run is spread over more)
        for before, after in zip(result["sweep"], result["sweep"][1:], strict=False):
            after["marginal_ms_per_product"] = (
                1000 * (after["seconds"] - before["seconds"]) / (after["products"] - before["products"])
            )
    return result


def _image_size(bundle_dir: Path) -> int:
    import json

    meta = json.loads((Path(bundle_dir) / "model.json").read_text())
    prep = meta.get("image_preprocessing")
    return int(prep["size"] if prep else meta["model"]["image"]["image_size"])
