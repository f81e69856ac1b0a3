"""Digests of what a fixed-seed training produces, to show a refactor of the training code changes
no model: per configuration, the state dict, ``calibration.to_dict()`` and the test report, each
hashed, on a 700-product synthetic marketplace (sorted by product id, so table order is fixed) with
the tiny model and, for the frozen and stack runs, the tests' tiny pretrained encoders.

Configurations: in memory with a held-out calibration split; cross-fitting + noise pruning; a
2-member ensemble; frozen encoders; the frozen ``stack``; streamed; streamed with frozen encoders.

Run it from the checkout measured (its ``tests`` helpers and its ``src``, which has
``training.pipeline.train``), before and after a
change, and compare the lines::

    cd <checkout> && PYTHONPATH=src:. python <this file> [name ...]
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch


def digest(trained: Any) -> str:
    weights = hashlib.sha256()
    for name, tensor in sorted(trained.model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().numpy().tobytes())
    calibration = hashlib.sha256(repr(sorted(trained.calibration.to_dict().items())).encode())
    report = hashlib.sha256(json.dumps(trained.test_report.to_dict(), sort_keys=True, default=str).encode())
    return (
        f"weights {weights.hexdigest()[:12]} calibration {calibration.hexdigest()[:12]} "
        f"report {report.hexdigest()[:12]}"
    )


def main(names: list[str]) -> int:
    from tests.conftest import tiny_config
    from tests.models.test_pretrained import VOCAB, _save_image_weights, _save_text_model
    from tests.models.test_pretrained import _cfg as pretrained_cfg

    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.config import SyntheticConfig
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.data.synthetic import generate_marketplace
    from catalog_enrichment.training.pipeline import train
    from catalog_enrichment.training.stream import arrow_source

    def streamed(table: pa.Table, tax: Any, cfg: Any) -> Any:
        return train(arrow_source(table, batch_rows=128), tax, cfg)

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    tax = load_taxonomy()
    market = generate_marketplace(
        tmp / "m", SyntheticConfig(products=700, seed=3, image_size=32), taxonomy=tax
    )
    table: pa.Table = read_table(market.products).sort_by("product_id")
    paths = {"text": _save_text_model(tmp / "text", VOCAB), "image": _save_image_weights(tmp / "image.pth")}
    cache = str(tmp / "cache")

    def stack() -> Any:
        cfg = pretrained_cfg(paths, encoders="frozen", embedding_cache=cache)
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"fusion": "stack"})})

    pruning = {"crossfit_folds": 3, "noise_pruning": {"enabled": True, "folds": 2}}
    stream = {"enabled": True, "batch_rows": 128}
    frozen = pretrained_cfg(paths, encoders="frozen", embedding_cache=cache)
    ensemble = tiny_config(epochs=1, model={"ensemble": {"members": 2}})
    frozen_streamed = pretrained_cfg(paths, encoders="frozen", streaming=stream)
    cases: dict[str, Callable[[], Any]] = {
        "memory held-out": lambda: train(table, tax, tiny_config(epochs=2)),
        "memory crossfit+pruning": lambda: train(table, tax, tiny_config(epochs=2, training=pruning)),
        "memory ensemble": lambda: train(table, tax, ensemble),
        "memory frozen": lambda: train(table, tax, frozen),
        "memory stack": lambda: train(table, tax, stack()),
        "streamed": lambda: streamed(table, tax, tiny_config(epochs=2, training={"streaming": stream})),
        "streamed frozen": lambda: streamed(table, tax, frozen_streamed),
    }
    for name, run in cases.items():
        if not names or name in names:
            print(f"{name:26s} {digest(run())}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
