"""The ``catalog-enrich bench`` command line: each benchmark's flags (its handler is in
:mod:`catalog_enrichment.bench.commands`), and the list types they parse with."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

from catalog_enrichment.bench import commands
from catalog_enrichment.bench.drift import KINDS
from catalog_enrichment.config import AppConfig

__all__ = ["BENCHES", "long_tail_flag", "numbers", "words"]

T = TypeVar("T")
Handler = Callable[[argparse.Namespace, AppConfig], int]


def finite(*, low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a number expected, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"a finite number expected, got {text!r}")
        if value < low or (low_open and value == low) or value > high:
            shown = f"above {low:g}" if low_open else f"at least {low:g}"
            bound = shown if high == math.inf else f"{shown} and at most {high:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value:g}")
        return value

    return parse


def words(text: str) -> list[str]:
    """``a, b,c`` -> ``["a", "b", "c"]`` (an argparse type)."""
    return [w.strip() for w in text.split(",") if w.strip()]


def numbers(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argparse type: ``1,2,3`` -> ``[1, 2, 3]`` of ``kind``; anything else is argparse's one-line
    error naming the flag."""

    def parse(text: str) -> list[T]:
        try:
            return [kind(n) for n in words(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"comma-separated numbers expected, got {text!r}") from None

    parse.__name__ = f"list of {getattr(kind, '__name__', 'numbers')}"
    return parse


def long_tail_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--long-tail",
        action="store_true",
        default=None,
        help="the long-tailed synthetic marketplace: 40 product types, 30 colors, Zipf frequencies "
        "(schemas/taxonomy-longtail.yaml)",
    )


def _generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--products", type=int, metavar="N", default=5000, help="products (default 5000)")
    p.add_argument("--image-size", type=int, metavar="PX", default=96, help="image size (default 96)")
    p.add_argument("--out", metavar="FILE", help="write the JSON result here too")


def _quality(p: argparse.ArgumentParser) -> None:
    p.add_argument("--products", type=int, metavar="N", default=5000, help="products (default 5000)")
    p.add_argument("--seed", type=int, metavar="S", default=0, help="random seed (default 0)")
    long_tail_flag(p)
    p.add_argument("--out", metavar="FILE", default="bench-quality.json", help="JSON (markdown beside it)")
    p.add_argument(
        "--methods", type=words, metavar="LIST", help="comma-separated fusion names (default: all)"
    )
    p.add_argument("--epochs", type=int, metavar="E", help="epochs per method (default: training.epochs)")
    p.add_argument(
        "--kl-lambda",
        type=finite(low=0, low_open=True),
        default=1.0,
        metavar="L",
        help="modality attention's lambda > 0 (1.0)",
    )
    p.add_argument("--workdir", metavar="DIR", default="bench-quality", help="the marketplace goes here")
    p.add_argument(
        "--data",
        metavar="PATH",
        help="a real labelled table (Delta or Parquet) to train on instead of a generated marketplace; "
        "needs --test-data, and --taxonomy for its attributes",
    )
    p.add_argument(
        "--test-data",
        metavar="PATH",
        help="the labelled table every contender and the simple baseline are tested on (with --data)",
    )
    p.add_argument(
        "--label-noise",
        type=float,
        metavar="R",
        help="flip R of the labels; train clean, noisy and noisy with noise pruning (001), score all three "
        "on a clean held-out marketplace",
    )
    p.add_argument(
        "--ensemble",
        type=int,
        metavar="K",
        help="train one ensemble of K members (model.ensemble) and report it beside each member",
    )
    p.add_argument(
        "--modes",
        type=words,
        metavar="LIST",
        help="with --config: training.encoders modes to run each pretrained contender in (e.g. "
        "frozen,finetune; default: its config's)",
    )


def _throughput(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--products",
        dest="sizes",
        type=numbers(int),
        metavar="N[,N...]",
        default=[16000],
        help="products per whole-process run, one or more sizes (default 16000)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model-uri", metavar="URI", help="registered model (default: the champion)")
    which.add_argument("--bundle", metavar="DIR", help="a model bundle folder (no job mode, no --peer)")
    p.add_argument(
        "--modes",
        type=words,
        metavar="LIST",
        help="subset of raw,predictor,raw_tasks,encoders,job (default: all but encoders: each encoder "
        "alone in PyTorch and in ONNX Runtime, CPU)",
    )
    p.add_argument(
        "--peer", action="store_true", help="also time the plain MLflow path (mlflow.pyfunc.spark_udf)"
    )
    p.add_argument(
        "--rescore-uri",
        metavar="URI",
        help="a second registered version over the same encoders (a new head): after each job run, time "
        "the job re-scoring the same products with it from the embedding store the first run filled "
        "(the peer then serves this version)",
    )
    p.add_argument("--repeats", type=int, metavar="R", default=3, help="runs per mode; medians reported (3)")
    p.add_argument(
        "--block", type=int, metavar="N", default=2048, help="raw/predictor alternate per N products"
    )
    p.add_argument(
        "--threads", type=int, metavar="T", help="torch threads for raw/predictor (default: cores)"
    )
    p.add_argument("--out", metavar="FILE", default="bench-throughput.json", help="JSON output")
    p.add_argument("--workdir", metavar="DIR", default="bench-throughput", help="generated tables go here")


def _chaos(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir", metavar="DIR", default="chaos", help="marketplace, model and catalogs go here"
    )
    p.add_argument(
        "--out", metavar="FILE", default="chaos/chaos.json", help="JSON (markdown table beside it)"
    )
    p.add_argument("--scenarios", type=words, metavar="LIST", help="a subset, comma-separated (default: all)")


def _write(p: argparse.ArgumentParser) -> None:
    p.add_argument("--products", type=int, metavar="N", default=100_000, help="products per run (100000)")
    p.add_argument("--repeats", type=int, metavar="R", default=3, help="fresh catalogs per kind; medians (3)")
    p.add_argument("--kinds", type=words, metavar="LIST", default=["postgres", "lakehouse"], help="catalogs")
    p.add_argument("--out", metavar="FILE", default="bench-write.json", help="JSON output")


def _scale(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rows",
        type=numbers(int),
        metavar="LIST",
        default=[10_000, 1_000_000, 5_000_000],
        help="attribute-table sizes (10k, 1M, 5M)",
    )
    p.add_argument("--increment", type=int, metavar="N", default=2000, help="products per run (2000)")
    p.add_argument("--repeats", type=int, metavar="R", default=2, help="runs per catalog; medians (2)")
    p.add_argument("--kinds", type=words, metavar="LIST", default=["lakehouse", "postgres"], help="catalogs")
    p.add_argument("--workdir", metavar="DIR", default="bench-scale", help="model and catalogs go here")
    p.add_argument("--out", metavar="FILE", default="bench-scale.json", help="JSON (markdown beside it)")


def _train_scale(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes",
        type=numbers(int),
        metavar="LIST",
        default=[10_000, 100_000, 500_000],
        help="labelled products (10k, 100k, 500k)",
    )
    p.add_argument(
        "--processes", type=numbers(int), metavar="LIST", default=[1, 2], help="training processes (1,2)"
    )
    p.add_argument("--epochs", type=int, metavar="E", default=2, help="epochs per training (2)")
    p.add_argument("--batch-size", type=int, metavar="B", default=64, help="training batch (64)")
    p.add_argument(
        "--orders",
        type=int,
        metavar="K",
        default=1,
        help="trainings of the first size in K shuffle orders, with each process count (1)",
    )
    p.add_argument("--workdir", metavar="DIR", default="bench-train-scale", help="tables, MLflow go here")
    p.add_argument(
        "--out", metavar="FILE", default="bench-train-scale.json", help="JSON (markdown beside it)"
    )


def _pretrain_text(p: argparse.ArgumentParser) -> None:
    p.add_argument("--products", type=int, metavar="N", default=5000, help="products (default 5000)")
    p.add_argument("--seed", type=int, metavar="S", default=0, help="random seed (default 0)")
    p.add_argument(
        "--label-fraction", type=float, metavar="F", default=0.1, help="share of the training labels (0.1)"
    )
    p.add_argument("--pretrain-epochs", type=int, metavar="E", default=10, help="pre-training epochs (10)")
    p.add_argument("--epochs", type=int, metavar="E", help="fine-tuning epochs (default: training.epochs)")
    p.add_argument("--out", metavar="FILE", default="bench-pretrain.json", help="JSON (markdown beside it)")
    p.add_argument(
        "--workdir", metavar="DIR", default="bench-pretrain", help="marketplace and encoders go here"
    )


def _audit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", metavar="DIR", default="demo", help="a demo folder (default ./demo)")
    p.add_argument("--size", type=int, metavar="N", default=500, help="values per sample (500)")
    p.add_argument("--seeds", type=int, metavar="K", default=40, help="samples per balance (40)")
    p.add_argument(
        "--balances",
        type=numbers(float),
        metavar="LIST",
        default=[0.0, 0.5, 1.0],
        help="review.balance (0,0.5,1)",
    )
    p.add_argument("--out", metavar="FILE", default="bench-audit.json", help="JSON (markdown beside it)")


def _drift(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int, metavar="N", default=20, help="clean batches, and per kind (20)")
    p.add_argument("--batch-size", type=int, metavar="N", default=1000, help="products per batch (1000)")
    p.add_argument("--share", type=float, metavar="F", default=0.5, help="drifted share of a batch (0.5)")
    p.add_argument("--kinds", type=words, metavar="LIST", help=f"drift kinds (default {','.join(KINDS)})")
    p.add_argument(
        "--train-products", type=int, metavar="N", default=4000, help="training marketplace (4000)"
    )
    p.add_argument("--data", metavar="PATH", help="a real catalog's labelled training table")
    p.add_argument("--test-data", metavar="PATH", help="... and its test table (the batches' products)")
    p.add_argument("--new-type", metavar="VALUE", help="product_type left out of training (default lamp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--configured-model",
        action="store_true",
        help="train the configured model and training sections (default: the tiny model)",
    )
    p.add_argument(
        "--workdir", metavar="DIR", default="bench-drift", help="marketplaces and lakehouse go here"
    )
    p.add_argument("--out", metavar="FILE", default="bench-drift.json", help="JSON (markdown beside it)")


BENCHES: tuple[tuple[str, Handler, Callable[[argparse.ArgumentParser], None], bool], ...] = (
    ("generate", commands.bench_generate, _generate, False),
    ("quality", commands.bench_quality, _quality, True),
    ("pretrain-text", commands.bench_pretrain_text, _pretrain_text, False),
    ("throughput", commands.bench_throughput, _throughput, False),
    ("write", commands.bench_write, _write, False),
    ("scale", commands.bench_scale, _scale, False),
    ("train-scale", commands.bench_train_scale, _train_scale, False),
    ("chaos", commands.bench_chaos, _chaos, False),
    ("audit", commands.bench_audit, _audit, False),
    ("drift", commands.bench_drift, _drift, False),
)
