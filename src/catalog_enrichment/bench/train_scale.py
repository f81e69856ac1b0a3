"""``catalog-enrich bench train-scale``: training as the labelled table grows, in one process and in
several under TorchDistributor.

For each size, a labelled marketplace is generated once (the tiny model's 32 px images); for each
process count the training job runs as a process of its own (``catalog-enrich train`` with
``training.streaming`` and ``training.distributed.processes``, the tiny model, a SQLite MLflow store
in the work folder), and the bench records its wall time, the driver's and the ranks' peak RSS
(sampled every 0.2 s) and the registered version's test R@P95 per attribute. ``orders`` > 1 trains
the first size ``orders - 1`` more times with every process count, with shuffle buffers of 200,
300, ... rows (the same split, initial weights and data; another training order): the spread of
each process count's runs is the noise a training order alone causes, and the margin a
one-against-two comparison is judged by is 3 standard deviations of a difference of two runs.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from catalog_enrichment.bench.throughput import measure_process
from catalog_enrichment.config import TINY_MODEL, SyntheticConfig
from catalog_enrichment.contracts import load_taxonomy
from catalog_enrichment.types import Say

__all__ = ["format_train_scale", "run_train_scale", "write_config"]

_SHUFFLE_ROWS = 20_000


def _marketplace(workdir: Path, products: int, say: Say) -> Path:
    """The labelled table of ``products`` products (generated once, kept for the next run)."""
    from catalog_enrichment.data.synthetic import generate_marketplace

    root = workdir / f"labelled-{products}"
    meta = root / "generation.json"
    if meta.exists() and json.loads(meta.read_text())["rows"] == products:
        return root / "products"
    say(f"train-scale: generating {products:,} labelled products")
    generate_marketplace(
        root, SyntheticConfig(products=products, seed=1, image_size=32), taxonomy=load_taxonomy()
    )
    return root / "products"


def write_config(workdir: Path, epochs: int, batch_size: int) -> Path:
    """The config every training of the bench runs with (the tiny model, streaming)."""
    path = workdir / "train-scale.yaml"
    cfg = {
        "model": TINY_MODEL,
        "training": {
            "epochs": epochs,
            "batch_size": batch_size,
            "crossfit_folds": 0,
            "streaming": {"enabled": True},
        },
        "spark": {"master": "local[2]"},
        "mlflow": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"},
        "inference": {"device": "cpu"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _test_scores(workdir: Path, name: str) -> dict[str, float]:
    """The test R@P95 per attribute of the latest version of ``name``."""
    from catalog_enrichment import registry

    client = registry.configure_mlflow(f"sqlite:///{workdir / 'mlflow.db'}")
    version = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    metrics = client.get_run(str(version.run_id)).data.metrics
    return {
        k.split(".")[1]: round(v, 4)
        for k, v in metrics.items()
        if k.endswith(".r_at_p95") and k.startswith("test.")
    }


def _train(workdir: Path, data: Path, processes: int, shuffle_rows: int, name: str) -> dict[str, Any]:
    cli = Path(sys.executable).with_name("catalog-enrich")
    command = [
        str(cli), "train", "--config", str(workdir / "train-scale.yaml"), "--data", str(data),
        "--set", f"training.distributed.processes={processes}",
        "--set", f"training.streaming.shuffle_rows={shuffle_rows}",
        "--set", f"mlflow.registered_model={name}",
    ]  # fmt: skip
    measured = measure_process(command, dict(os.environ), workdir)
    scores = _test_scores(workdir, name)
    return {
        "processes": processes,
        "shuffle_rows": shuffle_rows,
        "seconds": round(measured["seconds"], 1),
        "driver_peak_rss_mb": round(measured["driver_peak_rss_mb"]),
        "rank_peak_rss_mb": round(measured["worker_peak_rss_mb"]) if processes > 1 else None,
        "test_r_at_p95": scores,
        "mean_r_at_p95": round(statistics.fmean(scores.values()), 4),
    }


def run_train_scale(
    workdir: Path,
    *,
    sizes: Sequence[int],
    processes: Sequence[int],
    epochs: int = 2,
    batch_size: int = 64,
    orders: int = 1,
    say: Say = print,
) -> dict[str, Any]:
    """Every size with every process count (see the module docstring); then the order runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(workdir, epochs, batch_size)
    runs = []
    for size in sizes:
        data = _marketplace(workdir, size, say)
        for n in processes:
            say(f"train-scale: {size:,} products, {n} process(es)")
            runs.append({"products": size, **_train(workdir, data, n, _SHUFFLE_ROWS, f"scale-{size}-{n}")})
            say(f"  {runs[-1]}")
    order_runs = []
    for k in range(1, orders):
        data = _marketplace(workdir, sizes[0], say)
        shuffle = 100 * (k + 1)  # smaller than the training split: each buffer gives another order
        for n in processes:
            say(f"train-scale: {sizes[0]:,} products, {n} process(es), shuffle buffer {shuffle:,}")
            order_runs.append({"products": sizes[0], **_train(workdir, data, n, shuffle, f"order-{k}-{n}")})
    margin = _margin(runs + order_runs, sizes[0], processes)
    return {"epochs": epochs, "batch_size": batch_size, "runs": runs, "order_runs": order_runs, **margin}


def _margin(runs: list[dict[str, Any]], size: int, processes: Sequence[int]) -> dict[str, Any]:
    """Per process count, the mean and spread of mean test R@P95 over training orders at ``size``;
    and the margin a difference of two runs (the first two process counts', or one count's twice)
    is judged by: 3 standard deviations of that difference, 3 * sqrt(sd_a^2 + sd_b^2)."""
    values = {
        n: [r["mean_r_at_p95"] for r in runs if r["products"] == size and r["processes"] == n]
        for n in processes
    }
    if any(len(v) < 3 for v in values.values()):
        return {}
    sds = [statistics.stdev(values[n]) for n in processes[:2]]
    pair = sds if len(sds) == 2 else sds * 2
    return {
        "order_values": {str(n): v for n, v in values.items()},
        "order_mean": {str(n): round(statistics.fmean(v), 4) for n, v in values.items()},
        "order_sd": {str(n): round(statistics.stdev(v), 4) for n, v in values.items()},
        "margin": round(3 * (pair[0] ** 2 + pair[1] ** 2) ** 0.5, 4),
    }


def format_train_scale(result: dict[str, Any]) -> str:
    lines = [
        f"Training the tiny model ({result['epochs']} epochs, batches of {result['batch_size']}, streaming) "
        "per table size and process count",
        "",
        "| products | processes | wall s | driver peak RSS MB | rank peak RSS MB | mean test R@P95 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        rank = "-" if r["rank_peak_rss_mb"] is None else r["rank_peak_rss_mb"]
        lines.append(
            f"| {r['products']:,} | {r['processes']} | {r['seconds']} | {r['driver_peak_rss_mb']} | {rank} "
            f"| {r['mean_r_at_p95']} |"
        )
    if "margin" in result:
        lines += ["", "Training order alone (shuffle buffers), mean test R@P95 per process count:", ""]
        for n, values in result["order_values"].items():
            lines.append(
                f"- {n} process(es), {len(values)} orders: mean {result['order_mean'][n]}, "
                f"sd {result['order_sd'][n]}"
            )
        lines += ["", f"Margin (3 sd of a difference of two runs): {result['margin']}"]
    return "\n".join(lines)
