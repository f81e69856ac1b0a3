"""``catalog-enrich <command>`` — the command-line entry point: the parser, one small function per
command; the commands themselves are in :mod:`catalog_enrichment.commands`.

Every command takes ``--config FILE``, repeatable ``--set section.field=value`` overrides and ``-v``;
precedence is flag > ``--set`` > ``CATALOG_ENRICH_*`` > ``MLFLOW_*`` > YAML > defaults (config.py).
User mistakes (missing file, bad config, unknown attribute) print one line and exit with 2; an
enrichment run stopped by the circuit breaker exits with 3; a run that gave up waiting for another
run on the same catalog exits with 75 (EX_TEMPFAIL: try again later); anything unexpected prints
one line (``-v``: the traceback) and exits with 1.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from catalog_enrichment import __version__, commands
from catalog_enrichment.bench.cli import finite as _finite
from catalog_enrichment.bench.cli import long_tail_flag
from catalog_enrichment.commands import EXIT_ABORTED, EXIT_BUSY
from catalog_enrichment.config import AppConfig, load_config, merge_layers, parse_overrides
from catalog_enrichment.errors import CatalogEnrichError

__all__ = ["build_parser", "main", "run"]

Handler = Callable[[argparse.Namespace, AppConfig], int]
Sub = Any  # argparse's subparsers action
Flags = Callable[[argparse.ArgumentParser], None]


def _command(sub: Sub, name: str, handler: Handler, *, contenders: bool = False) -> argparse.ArgumentParser:
    """A command's parser; its help is the handler's docstring (first line: the one-line help)."""
    doc = inspect.cleandoc(handler.__doc__ or "")
    summary, _, details = doc.partition("\n\n")
    description = " ".join(details.split()) or summary[:1].upper() + summary[1:] + "."
    parser: argparse.ArgumentParser = sub.add_parser(name, help=summary, description=description)
    parser.set_defaults(handler=handler)
    _common(parser, contenders=contenders)
    return parser


def _common(parser: argparse.ArgumentParser, *, contenders: bool = False) -> None:
    if contenders:
        parser.add_argument(
            "--config",
            metavar="FILE",
            action="append",
            help="config of one contender (repeatable; 'default' = the embedded defaults): each trains "
            "the model it describes on the same marketplace, instead of every fusion method",
        )
    else:
        parser.add_argument(
            "--config", metavar="FILE", help="YAML config file (default: $CATALOG_ENRICH_CONFIG)"
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set inference.batch_size=64 (repeatable)",
    )
    parser.add_argument("--taxonomy", metavar="FILE", help="taxonomy YAML (default: the packaged one)")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: Spark's and MLflow's too)"
    )


def _generator_flags(parser: argparse.ArgumentParser, *, products_default: str) -> None:
    parser.add_argument("--products", type=int, metavar="N", help=f"number of products ({products_default})")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed (default 0)")
    parser.add_argument("--bad-rate", type=float, metavar="R", help="share of injected bad rows (default 0)")
    parser.add_argument("--label-noise", type=float, metavar="R", help="share of flipped labels (default 0)")
    parser.add_argument("--image-size", type=int, metavar="PX", help="image side in pixels (default 96)")
    parser.add_argument("--format", choices=["delta", "parquet"], help="table format (default delta)")
    parser.add_argument(
        "--image-files",
        action="store_true",
        default=None,
        help="write images as files referenced by image_uri instead of inline bytes",
    )
    long_tail_flag(parser)


def _model_flags(parser: argparse.ArgumentParser, *, products: bool = True) -> None:
    if products:
        parser.add_argument(
            "--products", metavar="PATH", help="lakehouse products table (default: catalog.products)"
        )
    parser.add_argument(
        "--catalog",
        metavar="DIR",
        help="lakehouse root holding the output tables (catalog.root); PostgreSQL: "
        "--set catalog.kind=postgres",
    )
    parser.add_argument(
        "--model-uri",
        metavar="URI",
        help="model to use (default: models:/<mlflow.registered_model>@champion)",
    )


def _generate(sub: Sub) -> None:
    p = _command(sub, "generate", commands.generate)
    p.add_argument("--out", metavar="DIR", help="output folder (default: catalog.root, the lakehouse)")
    p.add_argument("--quiet", action="store_true", help="do not print the summary")
    _generator_flags(p, products_default="default 5000")


def _summarize(sub: Sub) -> None:
    p = _command(sub, "summarize", commands.summarize)
    p.add_argument("path", metavar="DIR", help="folder written by 'generate'")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _expectations(sub: Sub) -> None:
    p = _command(sub, "expectations", commands.expectations)
    p.add_argument("--out", metavar="FILE", default="products.json", help="suite file (default %(default)s)")
    p.add_argument("--name", default="products", help="the suite's name (default %(default)s)")
    p.add_argument(
        "--model", metavar="URI", help="the model whose training inputs bound the shares (default: champion)"
    )


def _load_products(sub: Sub) -> None:
    p = _command(sub, "load-products", commands.load_products)
    p.add_argument("path", metavar="PATH", help="a products table (Delta or Parquet), e.g. from 'generate'")


def _demo(sub: Sub) -> None:
    p = _command(sub, "demo", commands.demo)
    p.add_argument("--workdir", metavar="DIR", default="demo", help="work folder (default ./demo)")
    p.add_argument("--products", type=int, metavar="N", default=3000, help="products (default 3000)")
    p.add_argument("--seed", type=int, metavar="S", default=0, help="random seed (default 0)")
    p.add_argument(
        "--catalog-kind",
        choices=["lakehouse", "postgres"],
        help="catalog the job reads and writes (default: catalog.kind); postgres uses the server of "
        "CATALOG_ENRICH_PG_DSN / PGHOST, else starts a throw-away local one",
    )


def _labels(sub: Sub) -> None:
    p = _command(sub, "labels", commands.labels)
    p.add_argument("--out", metavar="PATH", help="labelled table to write (catalog.labelled)")
    p.add_argument("--products", metavar="PATH", help="products table (default: catalog.products)")
    p.add_argument("--catalog", metavar="DIR", help="lakehouse root (catalog.root)")
    p.add_argument("--eval-data", metavar="PATH", help="frozen evaluation table (promotion.eval_data)")


def _train(sub: Sub) -> None:
    p = _command(sub, "train", commands.train)
    p.add_argument("--data", metavar="PATH", help="labelled products table (default: catalog.labelled)")
    p.add_argument("--registered-model", metavar="NAME", help="mlflow.registered_model")
    p.add_argument("--fusion", metavar="NAME", help="fusion method (model.fusion)")
    p.add_argument("--epochs", type=int, metavar="E", help="training epochs (training.epochs)")


def _int_at_least(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least`` (else a one-line error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a whole number expected, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def _pretrain_text(sub: Sub) -> None:
    p = _command(sub, "pretrain-text", commands.pretrain_text)
    p.add_argument("--data", metavar="PATH", help="products table (default: catalog.products)")
    p.add_argument("--method", choices=["simcse", "convirt"], required=True, help="003's SimCSE or ConVIRT")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for the adapted text encoder")
    p.add_argument(
        "--epochs", type=_int_at_least(1), metavar="E", default=10, help="passes over the products (10)"
    )
    p.add_argument(
        "--batch-size",
        type=_int_at_least(2),  # a product's negatives are the batch's other products
        metavar="N",
        default=32,
        help="products per batch, at least 2 (32, as 003)",
    )
    p.add_argument(
        "--learning-rate",
        type=_finite(low=0, low_open=True),
        metavar="LR",
        help="AdamW rate (default: 1e-5 for pretrained weights, as 003; else training.learning_rate)",
    )
    p.add_argument(
        "--temperature",
        type=_finite(low=0, low_open=True),
        metavar="TAU",
        help="InfoNCE temperature, above 0 (convirt 0.1, simcse 0.05)",
    )
    p.add_argument(
        "--alpha",
        type=_finite(low=0, high=1),
        metavar="A",
        default=0.75,
        help="convirt: weight of text->image, 0 to 1 (0.75)",
    )


def _promote(sub: Sub) -> None:
    p = _command(sub, "promote", commands.promote)
    p.add_argument("--registered-model", metavar="NAME", help="mlflow.registered_model")
    p.add_argument("--eval-data", metavar="PATH", help="frozen evaluation table (promotion.eval_data)")
    p.add_argument(
        "--eval-version", type=int, metavar="V", help="pinned Delta version (promotion.eval_version)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the comparison, change nothing")


def _enrich(sub: Sub) -> None:
    p = _command(sub, "enrich", commands.enrich)
    _model_flags(p)
    p.add_argument("--run-id", metavar="ID", help="run id (default: new); re-running an id changes nothing")
    p.add_argument(
        "--partition", metavar="COL=VALUE", help="only this partition, e.g. ingest_date=2026-11-01"
    )
    p.add_argument("--full", action="store_true", help="every selected product, not only the changed ones")


def _backfill(sub: Sub) -> None:
    p = _command(sub, "backfill", commands.backfill)
    _model_flags(p)
    p.add_argument("--from", dest="date_from", required=True, metavar="DATE", help="first partition (Y-M-D)")
    p.add_argument("--to", dest="date_to", required=True, metavar="DATE", help="last partition (YYYY-MM-DD)")
    p.add_argument("--force", action="store_true", help="redo partitions already done by this model version")


def _rollback(sub: Sub) -> None:
    p = _command(sub, "rollback", commands.rollback)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", metavar="ID", help="the run to undo")
    which.add_argument(
        "--model-version", metavar="V", help="undo every run of this version of mlflow.registered_model"
    )
    p.add_argument("--catalog", metavar="DIR", help="lakehouse root (catalog.root)")


def _embeddings(sub: Sub) -> None:
    p = _command(sub, "embeddings", commands.embeddings)
    p.add_argument("--catalog", metavar="DIR", help="lakehouse root (catalog.root)")
    once = p.add_mutually_exclusive_group()
    once.add_argument(
        "--vacuum", action="store_true", help="delete the vectors of encoders no aliased model version uses"
    )
    once.add_argument(
        "--fill",
        action="store_true",
        help="encode the products the store lacks for the configured frozen encoders, on the Spark executors",
    )
    p.add_argument("--data", metavar="PATH", help="table --fill reads (default: catalog.labelled)")


def _report(sub: Sub) -> None:
    p = _command(sub, "report", commands.report)
    p.add_argument("--run-id", metavar="ID", help="the run (default: the latest)")
    p.add_argument("--catalog", metavar="DIR", help="lakehouse root (catalog.root)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if it succeeded, 3 if aborted, else 1 (--health: 1 also when a health check failed; "
        "--audit: 4 if an attribute is below target, and only then)",
    )
    p.add_argument(
        "--health",
        action="store_true",
        help="the run's health checks against its model's held-out products (per attribute: score "
        "drift, coverage, value mix, estimated precision; the inputs) and what they blocked",
    )
    p.add_argument("--audit", action="store_true", help="the realized precision from people's verdicts")
    p.add_argument("--model-version", metavar="V", help="--audit: this version's latest reviewed sample")
    p.add_argument("--sample", metavar="ID", help="--audit: this sample")


def _flag_layers(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the command's own flags set (above ``--set``, below nothing)."""
    synthetic = {
        "products": getattr(args, "products", None),
        "seed": getattr(args, "seed", None),
        "bad_rate": getattr(args, "bad_rate", None),
        "label_noise": getattr(args, "label_noise", None),
        "image_size": getattr(args, "image_size", None),
        "format": getattr(args, "format", None),
        "image_files": getattr(args, "image_files", None),
        "long_tail": getattr(args, "long_tail", None),
    }
    taxonomy = getattr(args, "taxonomy", None)
    if taxonomy is None and getattr(args, "long_tail", None):
        from catalog_enrichment.contracts import schemas_dir
        from catalog_enrichment.data.synthetic import LONG_TAIL_TAXONOMY

        taxonomy = str(schemas_dir() / LONG_TAIL_TAXONOMY)
    is_train = getattr(args, "command", "") == "train"
    catalog = {"root": getattr(args, "catalog", None)}
    if getattr(args, "command", "") in ("enrich", "backfill", "labels"):
        catalog["products"] = getattr(args, "products", None)
        synthetic["products"] = None
    return {
        "catalog": catalog,
        "synthetic": synthetic,
        "taxonomy_path": taxonomy,
        "mlflow": {"registered_model": getattr(args, "registered_model", None)},
        "model": {"fusion": getattr(args, "fusion", None)},
        "training": {"epochs": getattr(args, "epochs", None) if is_train else None},
        "promotion": {
            "eval_data": getattr(args, "eval_data", None),
            "eval_version": getattr(args, "eval_version", None),
        },
    }


def _group(sub: Sub, name: str, *, help: str, description: str, metavar: str, steps: Sequence[Any]) -> None:
    """A command with subcommands (``bench``, ``review``): each of ``steps`` adds one."""
    parser = sub.add_parser(name, help=help, description=description)
    inner = parser.add_subparsers(dest=name, metavar=metavar, required=True)
    for add in steps:
        add(inner)


def _review_sample(sub: Sub) -> None:
    p = _command(sub, "sample", commands.review_sample)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", metavar="ID", help="the values this run wrote")
    which.add_argument(
        "--model-version", metavar="V", help="the values this version of mlflow.registered_model wrote"
    )
    p.add_argument("--size", type=int, metavar="N", help="values to draw (review.sample_size, 500)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed (review.seed, 0)")
    p.add_argument(
        "--out", metavar="FILE", help="sample file, .csv or .parquet (default: <sample id>/<sample id>.csv)"
    )
    p.add_argument("--catalog", metavar="DIR", help="lakehouse root (catalog.root)")


def _review_import(sub: Sub) -> None:
    p = _command(sub, "import", commands.review_import)
    p.add_argument(
        "file", metavar="FILE", help="verdict file (.csv or .parquet): the sample file or the page's"
    )
    p.add_argument("--catalog", metavar="DIR", help="lakehouse root (catalog.root)")


def _review(sub: Sub) -> None:
    _group(
        sub,
        "review",
        help="human review: sample written values, import verdicts (then: report --audit)",
        description="Sample written values for people to judge and import their verdicts.",
        metavar="STEP",
        steps=(_review_sample, _review_import),
    )


def _config(sub: Sub) -> None:
    _command(sub, "config", commands.show_config)


def _bench(sub: Sub) -> None:
    from catalog_enrichment.bench.cli import BENCHES

    def step(
        name: str, handler: Handler, flags: Callable[[argparse.ArgumentParser], None], contenders: bool
    ) -> Any:
        return lambda inner: flags(_command(inner, name, handler, contenders=contenders))

    _group(
        sub,
        "bench",
        help="benchmarks (not tests): generator speed, quality, throughput, catalog writes and scale, chaos, "
        "audit, drift",
        description="Measure and write JSON; speed targets live here, not in tests.",
        metavar="BENCH",
        steps=tuple(step(*bench) for bench in BENCHES),
    )


COMMANDS = (
    _generate,
    _summarize,
    _expectations,
    _load_products,
    _demo,
    _labels,
    _train,
    _pretrain_text,
    _promote,
    _enrich,
    _backfill,
    _rollback,
    _embeddings,
    _report,
    _review,
    _config,
    _bench,
)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line user mistakes (exit 2), for every subcommand too."""

    def error(self, message: str) -> NoReturn:
        print(f"catalog-enrich: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = _Parser(
        prog="catalog-enrich",
        description="Fill missing product attributes from text and images, writing only values "
        "calibrated to the target precision.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _config_of(args: argparse.Namespace) -> AppConfig:
    """The config a command's arguments name: the file, then ``--set``, then its flags."""
    layers = merge_layers(parse_overrides(args.overrides), _flag_layers(args))
    args.layers = layers  # for a command that loads more configs (bench quality's contenders)
    return load_config(None if isinstance(args.config, list) else args.config, overrides=layers)


def print_submit_arguments(argv: Sequence[str]) -> int:
    """``deploy/spark/submit.sh``'s helper: print, one per line, the spark-submit arguments the
    job ``argv`` (a command and its arguments, as ``jobs/`` passes them) needs from its config
    (:func:`~catalog_enrichment.runtime.submit_arguments`); returns the exit code."""
    from catalog_enrichment import runtime

    try:
        print("\n".join(runtime.submit_arguments(_config_of(build_parser().parse_args(argv)))))
    except CatalogEnrichError as exc:
        print(f"submit.sh: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a mistake, already printed in one line (--help and --version exit 0)
        if exc.code in (0, None):
            raise
        return 2
    try:
        from catalog_enrichment import runtime

        runtime.configure_logging(args.verbose)
        cfg = _config_of(args)
        handler: Handler = args.handler
        return handler(args, cfg)
    except CatalogEnrichError as exc:
        from catalog_enrichment.catalog.lock import CatalogBusy
        from catalog_enrichment.redaction import redact_text
        from catalog_enrichment.validation.rules import CircuitBreakerTripped

        print(f"catalog-enrich: error: {redact_text(str(exc))}", file=sys.stderr)
        if isinstance(exc, CatalogBusy):
            return EXIT_BUSY
        return EXIT_ABORTED if isinstance(exc, CircuitBreakerTripped) else 2
    except FileNotFoundError as exc:
        print(f"catalog-enrich: error: file not found: {exc.filename or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("catalog-enrich: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # not a known mistake: one line, the traceback with -v (both masked)
        known = _worker_error(exc)
        if known is not None:  # a known mistake raised in a Spark task: its own line, not Spark's
            from catalog_enrichment.redaction import redact_text

            print(f"catalog-enrich: error: {redact_text(known)}", file=sys.stderr)
            return 2
        if args.verbose:
            from catalog_enrichment.redaction import redact_traceback

            print(redact_traceback(exc), end="", file=sys.stderr)
            return 1
        print(f"catalog-enrich: error: {_one_line(exc)} (-v shows the traceback)", file=sys.stderr)
        return 1


def _worker_error(exc: BaseException) -> str | None:
    """The message of this package's own error (:mod:`catalog_enrichment.errors`) that a Spark task
    raised (e.g. an executor refusing the model for its image decoder), read off the Python
    worker's traceback that Spark's error carries (the last one: the cause); None without one."""
    found = re.findall(r"catalog_enrichment\.errors\.\w+: (.+)", str(exc))
    return found[-1].strip() if found else None


def _one_line(exc: BaseException) -> str:
    """An unexpected error in one line: a JVM error's own first line (the Spark error class and its
    message), not Py4J's wrapper and the Java stack."""
    from catalog_enrichment.redaction import redact_text

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("An error occurred while calling", "at "))]
    text = (useful or lines or [""])[0].removeprefix(": ")
    for prefix in ("org.apache.spark.SparkException: ", "org.apache.spark.api.python.PythonException: "):
        text = text.removeprefix(prefix)
    return redact_text(f"{type(exc).__name__}: {text}")[:400]


def _exit_now(code: list[int]) -> None:
    """End the process with ``main()``'s exit code once Python's shutdown has run every other
    atexit handler (``code`` is empty when ``main()`` raised: Python's own exit then).

    What is skipped is the interpreter's final teardown, where Arrow's C++ thread pools are
    destroyed with threads still attached to the Delta tables just read: on a busy machine that
    aborts the process ("terminate called without an active exception", SIGABRT; apache/arrow#39862,
    delta-io/delta-rs#2184) after the command has done its work, and the scheduler sees a failure.
    Non-daemon threads have been joined and Spark's, MLflow's and the other atexit handlers have run
    by the time this runs; logging and the standard streams are flushed here.
    """
    if not code:
        return
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code[0])


def run(argv: Sequence[str] | None = None) -> None:
    """The ``catalog-enrich`` console script and the ``jobs/`` entry points: :func:`main`, then a
    clean exit with its code (never returns)."""
    import atexit

    code: list[int] = []  # main()'s exit code, once it returns one
    atexit.register(_exit_now, code)  # before main(): the handlers main() registers run first (LIFO)
    code.append(main(argv))
    sys.exit(code[0])


if __name__ == "__main__":
    run()
